//! The waiting room at sales-day size: 1,000,000 visitors in line (two-hour tickets,
//! issued over ten minutes). Prints the resident memory the line takes, then measures a
//! visit at that size: a waiting visitor's reload (the common case), a newcomer joining
//! the end (then served, so the line stays at a million), the waiting page's poll, and a
//! reload that lets one more in.
//! Target (issue 39): ≤ 128 MB for the million, a visit ≤ 2 µs.
//!
//! Run: `cargo bench --bench waiting_room`.

use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, Criterion};

use surge::pool::waiting::{Capacity, Room, RoomLimits, Ticket};

const VISITORS: u64 = 1_000_000;
/// Tickets issued over this long (ms) before the measurements.
const SPREAD_MS: u64 = 600_000;

/// Resident memory now, bytes (Linux).
fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * 4096)
}

fn ticket(i: u64, base: u64) -> Ticket {
    Ticket {
        issued_ms: base + i * SPREAD_MS / VISITORS,
        nonce: i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
    }
}

fn bench_room(c: &mut Criterion) {
    let now_ms = surge::pool::waiting::wall_ms();
    let base = now_ms - SPREAD_MS;
    let before = rss();
    let room = Room::new(RoomLimits {
        abandon_after: Duration::from_secs(3600),
        ticket_ttl: Duration::from_secs(2 * 3600),
        max_waiting: 2_000_000,
    });
    let now = Instant::now();
    for i in 0..VISITORS {
        let t = ticket(i, base);
        room.visit(None, now, now_ms, Capacity::slots(0), t);
    }
    let after = rss();
    let status = room.status(now_ms);
    eprintln!(
        "waiting room: {} in line, {:.1} MB resident for them ({:.0} bytes a visitor)",
        status.queued,
        (after - before) as f64 / 1e6,
        (after - before) as f64 / VISITORS as f64
    );
    let mut g = c.benchmark_group("waiting_room_1M");
    let mut i = 0u64;
    g.bench_function("reload_in_line", |b| {
        b.iter(|| {
            i = (i + 7919) % VISITORS;
            black_box(room.visit(
                Some(ticket(i, base)),
                now,
                now_ms,
                Capacity::slots(0),
                ticket(0, 0),
            ))
        })
    });
    g.bench_function("poll_place", |b| {
        b.iter(|| {
            i = (i + 7919) % VISITORS;
            black_box(room.place(ticket(i, base), now_ms))
        })
    });
    // Newcomers at 2,000 a second (the clock moves a millisecond every two), each
    // served at once after (its place spent): the line stays at a million.
    let mut n = 0u64;
    g.bench_function("newcomer_joins_then_is_served", |b| {
        b.iter(|| {
            n += 1;
            let at = now_ms + n / 2;
            let fresh = Ticket {
                issued_ms: at,
                nonce: n.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1,
            };
            black_box(room.visit(None, now, at, Capacity::slots(0), fresh));
            black_box(room.spend(fresh, at))
        })
    });
    // Each reload frees one more slot than the line has let in: one let in per visit.
    let mut free = 0u64;
    g.bench_function("reload_lets_one_in", |b| {
        b.iter(|| {
            free += 1;
            i = (i + 7919) % VISITORS;
            black_box(room.visit(
                Some(ticket(i, base)),
                now,
                now_ms,
                Capacity::slots(free),
                ticket(0, 0),
            ))
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    targets = bench_room
}
criterion_main!(benches);
