use super::*;

/// A wall-clock base for the tests' tickets (Unix ms).
const BASE: u64 = 1_760_000_000_000;

fn t(ms: u64) -> Ticket {
    Ticket {
        issued_ms: BASE + ms,
        nonce: ms * 7 + 1,
    }
}

/// A room whose tickets live 30 minutes: its order ring then counts to the millisecond.
fn room(abandon_secs: u64) -> Room {
    Room::new(RoomLimits {
        abandon_after: Duration::from_secs(abandon_secs),
        ticket_ttl: Duration::from_secs(1800),
        max_waiting: 1000,
    })
}

fn wait(ticket: Ticket, place: usize) -> Visit {
    Visit::Wait { ticket, place }
}

fn enter(ticket: Ticket) -> Visit {
    Visit::Enter {
        ticket: Some(ticket),
    }
}

#[test]
fn visitors_wait_in_arrival_order_and_enter_as_room_frees() {
    let room = room(30);
    let now = Instant::now();
    let ms = BASE + 100;
    assert_eq!(
        room.visit(None, now, ms, Capacity::slots(0), t(1)),
        wait(t(1), 1)
    );
    assert_eq!(
        room.visit(None, now, ms, Capacity::slots(0), t(2)),
        wait(t(2), 2)
    );
    // A refresh neither loses nor improves a place.
    assert_eq!(
        room.visit(Some(t(2)), now, ms, Capacity::slots(0), t(9)),
        wait(t(2), 2)
    );
    assert_eq!(
        room.visit(Some(t(1)), now, ms, Capacity::slots(0), t(9)),
        wait(t(1), 1)
    );
    // A newcomer while others wait goes behind them, room or not; the one free slot
    // goes to the first in line.
    assert_eq!(
        room.visit(None, now, ms, Capacity::slots(1), t(3)),
        wait(t(3), 2)
    );
    assert_eq!(room.place(t(1), ms), Some((0, true)));
    assert_eq!(
        room.visit(Some(t(2)), now, ms, Capacity::slots(1), t(9)),
        wait(t(2), 1)
    );
    assert_eq!(
        room.visit(Some(t(1)), now, ms, Capacity::slots(1), t(9)),
        enter(t(1))
    );
    assert!(room.spend(t(1), ms));
    // Used once: the same ticket again is a replay, and goes to the end.
    assert_eq!(
        room.visit(Some(t(1)), now, ms, Capacity::slots(0), t(4)),
        wait(t(4), 3)
    );
    assert_eq!(room.counters.replays.load(Ordering::Relaxed), 1);
    // A ticket from another instance takes its place by its issue time.
    let other = Ticket {
        issued_ms: BASE + 2,
        nonce: 5,
    };
    assert_eq!(
        room.visit(Some(other), now, ms, Capacity::slots(0), t(9)),
        wait(other, 1)
    );
    let s = room.status(ms);
    assert_eq!(s.queued, 4);
    assert_eq!(s.longest_wait, Duration::from_millis(98));
}

#[test]
fn an_empty_room_lets_in_at_once_unless_the_door_is_held() {
    let room = room(30);
    let now = Instant::now();
    let ms = BASE + 10;
    assert_eq!(
        room.visit(None, now, ms, Capacity::slots(3), t(1)),
        Visit::Enter { ticket: None }
    );
    assert!(!room.in_use());
    room.hold(true);
    assert!(room.in_use());
    assert_eq!(
        room.visit(None, now, ms, Capacity::slots(3), t(2)),
        wait(t(2), 1)
    );
    assert_eq!(
        room.visit(Some(t(2)), now, ms, Capacity::slots(3), t(9)),
        wait(t(2), 1)
    );
    room.hold(false);
    assert_eq!(
        room.visit(Some(t(2)), now, ms, Capacity::slots(3), t(9)),
        enter(t(2))
    );
}

/// Room freed for two: two are let in. While they have not come back, the same free
/// room lets in nobody else (it was handed out already).
#[test]
fn room_let_in_but_not_yet_used_is_not_handed_out_twice() {
    let room = room(30);
    let now = Instant::now();
    let ms = BASE + 100;
    for i in 1..=5 {
        room.visit(None, now, ms, Capacity::slots(0), t(i));
    }
    assert_eq!(
        room.visit(Some(t(5)), now, ms, Capacity::slots(2), t(9)),
        wait(t(5), 3)
    );
    assert_eq!(room.status(ms).let_in, 2);
    // Still room for two (the two let in have not taken it yet): nobody more.
    assert_eq!(
        room.visit(Some(t(4)), now, ms, Capacity::slots(2), t(9)),
        wait(t(4), 2)
    );
    assert_eq!(
        room.visit(Some(t(3)), now, ms, Capacity::slots(2), t(9)),
        wait(t(3), 1)
    );
    // One of them came in and was served; room for three now lets in one more.
    assert_eq!(
        room.visit(Some(t(1)), now, ms, Capacity::slots(2), t(9)),
        enter(t(1))
    );
    assert!(room.spend(t(1), ms));
    assert_eq!(
        room.visit(Some(t(3)), now, ms, Capacity::slots(2), t(9)),
        enter(t(3))
    );
    assert_eq!(
        room.visit(Some(t(4)), now, ms, Capacity::slots(2), t(9)),
        wait(t(4), 1)
    );
    assert_eq!(room.counters.let_in.load(Ordering::Relaxed), 3);
}

/// A holder let in but turned away by the shop a moment later (shed) keeps its place at
/// the front: nothing was spent.
#[test]
fn a_place_is_spent_only_when_its_holder_is_served() {
    let room = room(30);
    let now = Instant::now();
    let ms = BASE + 100;
    room.visit(None, now, ms, Capacity::slots(0), t(1));
    room.visit(None, now, ms, Capacity::slots(0), t(2));
    assert_eq!(
        room.visit(Some(t(1)), now, ms, Capacity::slots(1), t(9)),
        enter(t(1))
    );
    // Not spent (the shop shed it): the next visit lets it in again, not the second.
    assert_eq!(
        room.visit(Some(t(1)), now, ms, Capacity::slots(1), t(9)),
        enter(t(1))
    );
    assert_eq!(
        room.visit(Some(t(2)), now, ms, Capacity::slots(1), t(9)),
        wait(t(2), 1)
    );
    assert!(room.spend(t(1), ms));
    assert!(!room.spend(t(1), ms), "a place is spent once");
}

/// Places of holders who stopped asking lapse on the room's own clock, with no other
/// visit: the line the autoscaler reads empties.
#[test]
fn abandoned_places_lapse_without_any_other_visit() {
    let room = room(10);
    let t0 = Instant::now();
    let ms = BASE + 100;
    room.visit(None, t0, ms, Capacity::slots(0), t(1));
    room.visit(None, t0, ms, Capacity::slots(0), t(2));
    room.visit(None, t0, ms, Capacity::slots(1), t(3));
    assert_eq!(room.status(ms).let_in, 1);
    room.tidy(t0 + Duration::from_secs(5), ms + 5000);
    assert_eq!(room.status(ms + 5000).queued, 2);
    room.tidy(t0 + Duration::from_secs(11), ms + 11_000);
    assert_eq!(room.status(ms + 11_000).queued, 0);
    assert!(!room.in_use(), "the let-in place lapsed too");
    assert_eq!(room.counters.lapsed.load(Ordering::Relaxed), 3);
}

/// A holder who left (its place lapsed) cannot come back later at the old place, ahead
/// of everyone who waited meanwhile: it starts again at the end.
#[test]
fn a_lapsed_ticket_does_not_come_back_at_its_old_place() {
    let room = room(10);
    let t0 = Instant::now();
    let ms = BASE + 100;
    room.visit(None, t0, ms, Capacity::slots(0), t(1));
    let later = t0 + Duration::from_secs(15);
    room.visit(None, later, ms + 15_000, Capacity::slots(0), t(15_000));
    room.tidy(later, ms + 15_000);
    assert_eq!(room.status(ms + 15_000).queued, 1);
    let back = room.visit(
        Some(t(1)),
        later,
        ms + 15_000,
        Capacity::slots(0),
        t(15_001),
    );
    assert_eq!(back, wait(t(15_001), 2));
}

/// A used ticket is remembered for its whole life (two hours here), not one hour.
#[test]
fn a_used_ticket_is_no_place_for_its_whole_life() {
    let room = Room::new(RoomLimits {
        abandon_after: Duration::from_secs(30),
        ticket_ttl: Duration::from_secs(7200),
        max_waiting: 1000,
    });
    let t0 = Instant::now();
    let ms = BASE + 100;
    room.visit(None, t0, ms, Capacity::slots(0), t(1));
    assert_eq!(
        room.visit(Some(t(1)), t0, ms, Capacity::slots(1), t(9)),
        enter(t(1))
    );
    assert!(room.spend(t(1), ms));
    let hour = 3_600_000;
    for step in 1..=3 {
        let at = t0 + Duration::from_millis(step * hour / 2 + 1000);
        room.tidy(at, ms + step * hour / 2 + 1000);
    }
    let at = t0 + Duration::from_millis(hour + hour / 2 + 2000);
    let fresh = t(hour + hour / 2 + 2000);
    assert_eq!(
        room.visit(Some(t(1)), at, fresh.issued_ms, Capacity::slots(0), fresh),
        wait(fresh, 1),
        "a replay 1.5 h later gets a fresh place"
    );
}

#[test]
fn the_line_is_bounded() {
    let room = Room::new(RoomLimits {
        abandon_after: Duration::from_secs(30),
        ticket_ttl: Duration::from_secs(1800),
        max_waiting: 3,
    });
    let now = Instant::now();
    for i in 1..=3 {
        assert!(matches!(
            room.visit(None, now, BASE + 10, Capacity::slots(0), t(i)),
            Visit::Wait { .. }
        ));
    }
    assert_eq!(
        room.visit(None, now, BASE + 10, Capacity::slots(0), t(4)),
        Visit::Full
    );
    // Those in line keep their places.
    assert_eq!(
        room.visit(Some(t(2)), now, BASE + 10, Capacity::slots(0), t(9)),
        wait(t(2), 2)
    );
}

/// Let-in order is ticket order whatever order the holders visit in, over many places
/// and slices of the order ring.
#[test]
fn places_and_cutoffs_hold_over_many_tickets() {
    let room = Room::new(RoomLimits {
        abandon_after: Duration::from_secs(600),
        ticket_ttl: Duration::from_secs(1800),
        max_waiting: 1_000_000,
    });
    let now = Instant::now();
    let n = 20_000u64;
    let ms = BASE + 3 * n;
    for i in 0..n {
        room.visit(None, now, ms, Capacity::slots(0), t(3 * i));
    }
    assert_eq!(room.status(ms).queued, n as usize);
    assert_eq!(
        room.visit(Some(t(3 * 12_345)), now, ms, Capacity::slots(0), t(1)),
        wait(t(3 * 12_345), 12_346)
    );
    // Room for 5,000: exactly the first 5,000 (by ticket) may enter.
    room.visit(Some(t(0)), now, ms, Capacity::slots(5_000), t(1));
    assert_eq!(room.status(ms).let_in, 5_000);
    assert_eq!(room.place(t(3 * 4_999), ms), Some((0, true)));
    assert_eq!(room.place(t(3 * 5_000), ms), Some((1, false)));
}

/// Tickets a few milliseconds apart share a slice of the order ring (two-hour tickets):
/// places and let-ins are still exact, one ticket at a time.
#[test]
fn tickets_in_one_time_slice_keep_exact_places() {
    let room = Room::new(RoomLimits {
        abandon_after: Duration::from_secs(30),
        ticket_ttl: Duration::from_secs(7200),
        max_waiting: 1000,
    });
    let now = Instant::now();
    let ms = BASE + 100;
    let same = |i: u64| Ticket {
        issued_ms: BASE,
        nonce: i << 60,
    };
    for i in 1..=4 {
        assert_eq!(
            room.visit(None, now, ms, Capacity::slots(0), same(i)),
            wait(same(i), i as usize)
        );
    }
    assert_eq!(
        room.visit(Some(same(4)), now, ms, Capacity::slots(1), same(9)),
        wait(same(4), 3)
    );
    assert_eq!(room.place(same(1), ms), Some((0, true)));
    assert_eq!(room.place(same(2), ms), Some((1, false)));
    assert_eq!(room.status(ms).let_in, 1);
}

/// Once everyone in line has been let in (they are on their way back), a newcomer who
/// finds room beyond theirs comes straight in: the line does not make every newcomer
/// wait one reload after the pool has grown.
#[test]
fn with_nobody_left_waiting_a_newcomer_comes_straight_in() {
    let room = room(30);
    let now = Instant::now();
    let ms = BASE + 100;
    room.visit(None, now, ms, Capacity::slots(0), t(1));
    room.visit(None, now, ms, Capacity::slots(0), t(2));
    // Room for five: both let in (not back yet), room left.
    assert_eq!(
        room.visit(Some(t(2)), now, ms, Capacity::slots(5), t(9)),
        enter(t(2))
    );
    assert_eq!(room.status(ms).queued, 0);
    assert_eq!(
        room.visit(None, now, ms, Capacity::slots(5), t(3)),
        Visit::Enter { ticket: None }
    );
    // Someone waits (not let in yet): a newcomer goes behind them, room or not.
    room.visit(None, now, ms, Capacity::slots(0), t(4));
    assert_eq!(
        room.visit(None, now, ms, Capacity::slots(3), t(5)),
        wait(t(5), 1)
    );
    assert_eq!(room.place(t(4), ms), Some((0, true)));
}

/// A ticket issued by a clock ahead of this one (another instance's, up to the skew
/// allowed) must not carry the cutoff into the future: everyone arriving before that
/// time would be let in uncounted, around a held door.
#[test]
fn a_ticket_from_a_clock_ahead_never_moves_the_cutoff_into_the_future() {
    let room = room(30);
    let now = Instant::now();
    let ms = BASE + 100;
    let ahead = Ticket {
        issued_ms: ms + 59_000,
        nonce: 3,
    };
    assert_eq!(
        room.visit(Some(ahead), now, ms, Capacity::slots(5), t(1)),
        wait(ahead, 1),
        "let in before its time"
    );
    room.hold(true);
    let next = Ticket {
        issued_ms: ms + 1000,
        nonce: 5,
    };
    assert!(
        matches!(
            room.visit(None, now, ms + 1000, Capacity::slots(5), next),
            Visit::Wait { .. }
        ),
        "a newcomer got in around the held door"
    );
}

/// Places on both sides of the order ring's wrap (the ring is a power of two of time
/// slices): places and cutoffs stay exact across it.
#[test]
fn places_straddling_the_rings_wrap_keep_their_order() {
    let room = room(30);
    let len = room.order.len as u64;
    let slice = room.order.slice_ms;
    // The first ticket three slices before a multiple of the ring's length.
    let start = (BASE / (len * slice) + 1) * len * slice - 3 * slice;
    let now = Instant::now();
    let at = |i: u64| Ticket {
        issued_ms: start + i * slice,
        nonce: i + 1,
    };
    let ms = start + 20 * slice;
    for i in 0..8 {
        assert_eq!(
            room.visit(None, now, ms, Capacity::slots(0), at(i)),
            wait(at(i), i as usize + 1)
        );
    }
    // Room for five: exactly the first five, three before the wrap and two after.
    room.visit(Some(at(7)), now, ms, Capacity::slots(5), at(99));
    assert_eq!(room.place(at(4), ms), Some((0, true)));
    assert_eq!(room.place(at(5), ms), Some((1, false)));
    assert_eq!(room.status(ms).let_in, 5);
}
