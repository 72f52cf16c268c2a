//! The waiting room: new visitors held in arrival order while the shop is full (or while
//! an operator holds the door before a sale), and let in at the rate the pool frees room,
//! instead of being turned away with a 503.
//!
//! A visitor's place is a ticket: the time it was issued (milliseconds) and a random
//! number, carried in a signed cookie by the proxy. Order is by issue time, so a ticket
//! issued by another instance of a cluster, or before a restart, takes its place by when
//! its holder arrived. A refresh neither loses nor improves a place; a ticket that was
//! used to enter (replayed) or is unknown and expired is no place at all.
//!
//! Shared by every worker behind one mutex: only visitors of a full shop come here, a few
//! per second each, never the requests of shoppers already in.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A place in the line: issued at (Unix ms), and a random number that tells apart
/// tickets issued in the same millisecond.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ticket {
    pub issued_ms: u64,
    pub nonce: u64,
}

impl Ticket {
    /// The ticket as the text the proxy signs (`q<issued_ms>.<nonce>`).
    pub fn subject(&self) -> String {
        format!("q{}.{}", self.issued_ms, self.nonce)
    }

    /// The ticket a signed subject names.
    pub fn from_subject(subject: &str) -> Option<Self> {
        let (ms, nonce) = subject.strip_prefix('q')?.split_once('.')?;
        Some(Self {
            issued_ms: ms.parse().ok()?,
            nonce: nonce.parse().ok()?,
        })
    }
}

/// What the room says to one visit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visit {
    /// Come in (the ticket, if any, is used up).
    Enter,
    /// Wait: `place` (1 = next) with `ticket`, new or as presented.
    Wait { ticket: Ticket, place: usize },
}

/// The room's numbers, for the admin API and metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoomStatus {
    pub held_by_hand: bool,
    pub queued: usize,
    /// Let in over the last minute, per second.
    pub admitted_per_second: f64,
    /// How long the first in line has waited.
    pub longest_wait: Duration,
}

#[derive(Debug, Default)]
struct Line {
    /// Waiting tickets, in order, with when their holder was last seen.
    waiting: BTreeMap<Ticket, Instant>,
    /// Tickets let in whose holder has not come back yet, with when.
    admitted: HashMap<Ticket, Instant>,
    /// Tickets used to enter (a second use is a replay), with when.
    used: HashMap<Ticket, Instant>,
    /// When visitors were let in, the last minute.
    recent: VecDeque<Instant>,
}

/// The waiting room of one pool.
#[derive(Debug)]
pub struct Room {
    /// Holding the door by hand (a pre-queue before a sale): nobody new is let in.
    held: AtomicBool,
    line: Mutex<Line>,
    /// A visitor not seen for this long has left the line.
    abandon_after: Duration,
}

/// How long a used ticket is remembered as used.
const USED_MEMORY: Duration = Duration::from_secs(3600);

impl Room {
    pub fn new(abandon_after: Duration) -> Self {
        Self {
            held: AtomicBool::new(false),
            line: Mutex::new(Line::default()),
            abandon_after,
        }
    }

    /// Holds the door (or opens it again).
    pub fn hold(&self, held: bool) {
        self.held.store(held, Ordering::SeqCst);
    }

    pub fn held(&self) -> bool {
        self.held.load(Ordering::SeqCst)
    }

    /// Whether anyone waits or the door is held: a newcomer must then come through the
    /// room, not around it.
    pub fn in_use(&self) -> bool {
        self.held()
            || self
                .line
                .lock()
                .is_ok_and(|l| !l.waiting.is_empty() || !l.admitted.is_empty())
    }

    /// Visitors in line now.
    pub fn waiting(&self) -> usize {
        self.line.lock().map_or(0, |l| l.waiting.len())
    }

    /// One visit at `now` (`now_ms` the wall clock) by the holder of `ticket` (`None`:
    /// none, or not one this pool signed), with `free` visitors the pool can take now.
    /// `fresh` is the ticket a visitor without a place gets.
    pub fn visit(&self, ticket: Option<Ticket>, now: Instant, free: u64, fresh: Ticket) -> Visit {
        let Ok(mut line) = self.line.lock() else {
            return Visit::Enter;
        };
        self.tidy(&mut line, now);
        // A used ticket is a replay: a fresh place, like a visitor without one.
        let ticket = ticket
            .filter(|t| !line.used.contains_key(t))
            .unwrap_or(fresh);
        if !line.admitted.contains_key(&ticket) {
            line.waiting.insert(ticket, now);
        }
        // Let in, in order, as many as the pool has room for now. Those let in come
        // back with their next reload as shoppers already in (they may use the room
        // kept for them), so they hold no place in the count meanwhile: a reload takes
        // seconds, a request milliseconds.
        if !self.held() {
            let mut spare = usize::try_from(free).unwrap_or(usize::MAX);
            while spare > 0 {
                let Some((t, _)) = line.waiting.pop_first() else {
                    break;
                };
                line.admitted.insert(t, now);
                spare -= 1;
            }
        }
        if line.admitted.remove(&ticket).is_some() {
            line.used.insert(ticket, now);
            line.recent.push_back(now);
            return Visit::Enter;
        }
        let place = line.waiting.range(..=ticket).count();
        Visit::Wait { ticket, place }
    }

    /// The place of `ticket` now, and whether it may come in, without counting a visit
    /// (what the waiting page polls).
    pub fn place(&self, ticket: Ticket) -> Option<(usize, bool)> {
        let line = self.line.lock().ok()?;
        if line.admitted.contains_key(&ticket) {
            return Some((0, true));
        }
        line.waiting
            .contains_key(&ticket)
            .then(|| (line.waiting.range(..=ticket).count(), false))
    }

    /// Drops visitors who left, admissions nobody came back for, and old memories.
    fn tidy(&self, line: &mut Line, now: Instant) {
        let gone = |seen: &Instant| now.saturating_duration_since(*seen) > self.abandon_after;
        line.waiting.retain(|_, seen| !gone(seen));
        line.admitted.retain(|_, at| !gone(at));
        line.used
            .retain(|_, at| now.saturating_duration_since(*at) < USED_MEMORY);
        while line
            .recent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > Duration::from_secs(60))
        {
            line.recent.pop_front();
        }
    }

    /// The numbers, at `now_ms` (wall clock, for the first ticket's wait).
    pub fn status(&self, now: Instant, now_ms: u64) -> RoomStatus {
        let Ok(mut line) = self.line.lock() else {
            return RoomStatus {
                held_by_hand: self.held(),
                queued: 0,
                admitted_per_second: 0.0,
                longest_wait: Duration::ZERO,
            };
        };
        self.tidy(&mut line, now);
        RoomStatus {
            held_by_hand: self.held(),
            queued: line.waiting.len(),
            admitted_per_second: line.recent.len() as f64 / 60.0,
            longest_wait: line.waiting.keys().next().map_or(Duration::ZERO, |t| {
                Duration::from_millis(now_ms.saturating_sub(t.issued_ms))
            }),
        }
    }

    /// A guess of the wait for `place`, from the pace of the last minute.
    pub fn estimate(&self, place: usize, now: Instant) -> Option<Duration> {
        let status = self.status(now, 0);
        (status.admitted_per_second > 0.0)
            .then(|| Duration::from_secs_f64(place as f64 / status.admitted_per_second))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: u64) -> Ticket {
        Ticket {
            issued_ms: ms,
            nonce: ms * 7,
        }
    }

    #[test]
    fn visitors_wait_in_arrival_order_and_enter_as_room_frees() {
        let room = Room::new(Duration::from_secs(30));
        let now = Instant::now();
        // Full: the first two get places 1 and 2.
        assert_eq!(
            room.visit(None, now, 0, t(1)),
            Visit::Wait {
                ticket: t(1),
                place: 1
            }
        );
        assert_eq!(
            room.visit(None, now, 0, t(2)),
            Visit::Wait {
                ticket: t(2),
                place: 2
            }
        );
        // A refresh neither loses nor improves a place.
        assert_eq!(
            room.visit(Some(t(2)), now, 0, t(9)),
            Visit::Wait {
                ticket: t(2),
                place: 2
            }
        );
        assert_eq!(
            room.visit(Some(t(1)), now, 0, t(9)),
            Visit::Wait {
                ticket: t(1),
                place: 1
            }
        );
        // A newcomer while others wait goes behind them, room or not.
        assert_eq!(
            room.visit(None, now, 1, t(3)),
            Visit::Wait {
                ticket: t(3),
                place: 2
            }
        );
        // One slot freed (above): the first in line was let in; the second is now first.
        assert_eq!(room.place(t(1)), Some((0, true)));
        assert_eq!(
            room.visit(Some(t(2)), now, 0, t(9)),
            Visit::Wait {
                ticket: t(2),
                place: 1
            }
        );
        assert_eq!(room.visit(Some(t(1)), now, 0, t(9)), Visit::Enter);
        // Used once: the same ticket again is a replay, and goes to the end.
        assert_eq!(
            room.visit(Some(t(1)), now, 0, t(4)),
            Visit::Wait {
                ticket: t(4),
                place: 3
            }
        );
        // A ticket from another instance takes its place by its issue time.
        assert_eq!(
            room.visit(
                Some(Ticket {
                    issued_ms: 2,
                    nonce: 0
                }),
                now,
                0,
                t(9)
            ),
            Visit::Wait {
                ticket: Ticket {
                    issued_ms: 2,
                    nonce: 0
                },
                place: 1
            }
        );
        let s = room.status(now, 10);
        assert_eq!(s.queued, 4);
        assert_eq!(s.longest_wait, Duration::from_millis(8));
    }

    #[test]
    fn an_empty_room_lets_in_at_once_unless_the_door_is_held() {
        let room = Room::new(Duration::from_secs(30));
        let now = Instant::now();
        assert_eq!(room.visit(None, now, 3, t(1)), Visit::Enter);
        assert!(!room.in_use());
        room.hold(true);
        assert!(room.in_use());
        assert_eq!(
            room.visit(None, now, 3, t(2)),
            Visit::Wait {
                ticket: t(2),
                place: 1
            }
        );
        assert_eq!(
            room.visit(Some(t(2)), now, 3, t(9)),
            Visit::Wait {
                ticket: t(2),
                place: 1
            }
        );
        room.hold(false);
        assert_eq!(room.visit(Some(t(2)), now, 3, t(9)), Visit::Enter);
    }

    #[test]
    fn visitors_who_left_lose_their_place() {
        let room = Room::new(Duration::from_secs(10));
        let t0 = Instant::now();
        room.visit(None, t0, 0, t(1));
        room.visit(None, t0, 0, t(2));
        let later = t0 + Duration::from_secs(8);
        room.visit(Some(t(2)), later, 0, t(9));
        let much_later = t0 + Duration::from_secs(15);
        // The first never came back: the second moves up.
        assert_eq!(
            room.visit(Some(t(2)), much_later, 0, t(9)),
            Visit::Wait {
                ticket: t(2),
                place: 1
            }
        );
        assert_eq!(Ticket::from_subject(&t(5).subject()), Some(t(5)));
        assert_eq!(Ticket::from_subject("admitted"), None);
    }
}
