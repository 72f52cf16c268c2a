//! `pick()` cost: tables of 4, 64 and 1,024 backends; alone, with a second thread picking
//! from the same pool, and with a writer publishing a new table every millisecond.
//! Target (issue 2): ≤ 50 ns per pick at 64 backends; a concurrent writer costs readers
//! < 10%.
//!
//! Run: `cargo bench --bench pool`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};

use surge::config::{Algorithm, EjectionConfig, StickyConfig};
use surge::pool::{nanos_since_epoch, Backend, Origin, Pick, Pool, PoolSettings, Update};

fn pool(n: usize, algorithm: Algorithm) -> Arc<Pool> {
    let settings = PoolSettings {
        name: "bench".into(),
        algorithm,
        sticky: Some(StickyConfig {
            cookie: "cart".into(),
            route_cookie: "surge_route".into(),
            route_key: Some(vec![7; 32]),
            route_key_previous: None,
            route_key_file: "data/route.key".into(),
            route_ttl: Duration::from_secs(3600),
        }),
        slow_start: Duration::ZERO,
        ejection: EjectionConfig {
            consecutive_failures: 5,
            base_time: Duration::from_secs(10),
            max_time: Duration::from_secs(300),
            max_percent: 50,
        },
        shed: None,
        protocol: Default::default(),
        // The default ceiling: what every pick pays.
        node_max_in_flight: 512,
        waiting_room: None,
    };
    let backends = (0..n)
        .map(|i| {
            let addr = SocketAddr::from(([10, (i >> 8) as u8, i as u8, 1], 8000));
            let b = Backend::new(&format!("b{i}"), addr, 1, Origin::Static);
            // Give every backend a latency sample, as on a warm proxy.
            b.latency.observe(
                Duration::from_micros(500 + (i as u64 % 7) * 100),
                Instant::now(),
            );
            Arc::new(b)
        })
        .collect();
    Arc::new(Pool::new(settings, backends))
}

/// Something running beside the measured thread until dropped.
struct Background {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Background {
    fn start(work: impl Fn() + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                work();
            }
        });
        Self {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn bench_pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    for &n in &[4usize, 64, 1024] {
        for algorithm in [Algorithm::P2cEwma, Algorithm::RoundRobin] {
            let name = match algorithm {
                Algorithm::P2cEwma => "p2c",
                Algorithm::RoundRobin => "rr",
            };
            for mode in ["alone", "two-threads", "writer-1ms"] {
                let p = pool(n, algorithm);
                let _bg = match mode {
                    "two-threads" => {
                        let p = p.clone();
                        Some(Background::start(move || {
                            let req = Pick {
                                now_ns: nanos_since_epoch(Instant::now()),
                                ..Pick::default()
                            };
                            for _ in 0..1000 {
                                let _ = black_box(p.pick(&req));
                            }
                        }))
                    }
                    "writer-1ms" => {
                        let p = p.clone();
                        Some(Background::start(move || {
                            p.update(|_, _| Update::Publish(()));
                            thread::sleep(Duration::from_millis(1));
                        }))
                    }
                    _ => None,
                };
                let req = Pick {
                    now_ns: nanos_since_epoch(Instant::now()),
                    ..Pick::default()
                };
                group.bench_with_input(
                    BenchmarkId::new(format!("{name}/{mode}"), n),
                    &n,
                    |b, _| b.iter(|| black_box(p.pick(black_box(&req)))),
                );
            }
        }
        // Sticky carts: the consistent-hash ring, and the route-cookie lookup.
        let p = pool(n, Algorithm::P2cEwma);
        let by_ring = Pick {
            sticky_key: Some(b"3f2a9c0d11e4b7a8"),
            ..Pick::default()
        };
        group.bench_with_input(BenchmarkId::new("sticky-ring", n), &n, |b, _| {
            b.iter(|| black_box(p.pick(black_box(&by_ring))))
        });
        let by_route = Pick {
            sticky_key: Some(b"3f2a9c0d11e4b7a8"),
            route: Some("b3"),
            ..Pick::default()
        };
        group.bench_with_input(BenchmarkId::new("sticky-route", n), &n, |b, _| {
            b.iter(|| black_box(p.pick(black_box(&by_route))))
        });
    }
    group.finish();
}

/// What a signed route cookie costs a cart's request: one verify (and, when a cart is
/// bound, one issue), beside the pick above.
fn bench_route(c: &mut Criterion) {
    let signer = surge::proxy::route::RouteSigner::new(&[7; 32], None, Duration::from_secs(3600));
    let now = 1_800_000_000;
    let cookie = signer.issue("bm-1a2b3c4d", now);
    let mut group = c.benchmark_group("route");
    group.bench_function("verify", |b| {
        b.iter(|| black_box(signer.verify(black_box(&cookie), now)))
    });
    group.bench_function("issue", |b| {
        b.iter(|| black_box(signer.issue(black_box("bm-1a2b3c4d"), now)))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench_pick, bench_route
}
criterion_main!(benches);
