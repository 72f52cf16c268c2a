//! The backend table: the only state shared between the request path, the health checker,
//! the admin API and the autoscaler.
//!
//! Readers (every request) take a snapshot with one atomic load and never lock. Writers
//! build a new [`Table`] from the current one and publish it with a compare-and-swap loop
//! (ArcSwap's RCU). Per-backend counters live in `Arc<Backend>` atomics that every snapshot
//! shares, so publishing a table never resets the load a backend is carrying.
//!
//! Owns: backends, their lifecycle state, selection, health state machines, drain, and the
//! pool-wide traffic counters. Must not: depend on the HTTP engine, or do I/O other than
//! the health probes it is handed.

pub mod drain;
pub mod health;
pub mod latency;
pub mod lifecycle;
pub mod select;
pub mod shed;
pub mod signal;
pub mod waiting;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use tokio::sync::{watch, Notify};

use crate::config::{Algorithm, BackendSpec, EjectionConfig, PoolConfig, MAX_WEIGHT};

pub use latency::PeakEwma;
pub use lifecycle::Event;
pub use select::{NoPick, Pick};

/// Lifecycle state of a backend in one table snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Added but not yet proven healthy (`rise` successful checks); gets no traffic.
    Warming,
    /// Takes new requests (at a ramped weight during slow start).
    InService,
    /// No new requests or carts; bound carts keep reaching it until the deadline.
    Draining,
    /// Failed health checks or was ejected; gets no traffic until it recovers.
    Down,
    /// Put aside by an operator: no traffic and no health checks until undrained.
    Maint,
    /// A warm spare kept by the autoscaler: health-checked, no traffic, promoted into
    /// service in one step when a spike comes.
    Standby,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Warming => "warming",
            State::InService => "in_service",
            State::Draining => "draining",
            State::Down => "down",
            State::Maint => "maint",
            State::Standby => "standby",
        }
    }
}

/// Where a backend came from; the autoscaler only ever removes what it provisioned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Listed in the configuration file.
    Static,
    /// Started by this process on loopback (the demo).
    Local,
    /// Ordered from a provider.
    Provisioned,
}

/// Why a pool change was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum PoolError {
    #[error("no backend with id `{0}`")]
    UnknownBackend(String),
    #[error("a backend with id `{0}` already exists")]
    DuplicateId(String),
    #[error("a backend with address {0} already exists")]
    DuplicateAddress(SocketAddr),
    #[error("weight {0} is outside 1..={MAX_WEIGHT}")]
    BadWeight(u32),
    #[error("draining `{id}` would leave {left} node(s) in service, fewer than the minimum of {min}; force it to drain anyway")]
    TooFewInService { id: String, left: usize, min: usize },
}

/// Process-wide origin for the nanosecond timestamps kept in atomics.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds from [`epoch`] to `t`.
pub fn nanos_since_epoch(t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX)
}

/// One frontend server. Identity is immutable; everything that changes per request is an
/// atomic, so the same `Arc<Backend>` is shared by every table snapshot it appears in.
#[derive(Debug)]
pub struct Backend {
    /// Stable name, unique in the pool; also the value of the route cookie.
    pub id: Arc<str>,
    pub addr: SocketAddr,
    /// `addr` as `host:port` bytes, ready to become an HTTP authority without formatting.
    pub authority: Bytes,
    /// Configured weight (1..=1000); the effective weight in a table may be lower.
    pub weight: u32,
    pub origin: Origin,
    /// Requests sent and not yet finished (response body fully sent or abandoned).
    in_flight: AtomicU32,
    /// Requests ever picked for this backend.
    requests: AtomicU64,
    /// Requests that ended in a connect error, timeout or 5xx.
    failures: AtomicU64,
    /// Failures since the last success; passive ejection looks at this.
    consecutive_failures: AtomicU32,
    /// Times this backend was ejected in a row; lengthens the next ejection.
    ejections: AtomicU32,
    /// Consecutive successful / failed active probes (the health state machine's input).
    probe_successes: AtomicU32,
    probe_failures: AtomicU32,
    /// Response-head latency estimate used by P2C.
    pub latency: PeakEwma,
    /// Metric handles registered once, so the request path does no label lookups.
    pub metrics: BackendMetrics,
    /// Woken when the last request in flight finishes, for drain waiters
    /// ([`drain::wait_drained`]); only while `idle_watchers` > 0, so the request path
    /// touches no lock when nobody waits.
    idle: Notify,
    /// Drain waiters watching this backend.
    idle_watchers: AtomicU32,
    /// Why the latest failed health probe failed (for the bootstrap deadline's report).
    last_probe_error: arc_swap::ArcSwapOption<String>,
}

/// Per-backend metric handles. Registered when the backend is created, against whatever
/// recorder is installed then (install it before building the pool).
#[derive(Debug)]
pub struct BackendMetrics {
    /// `surge_requests_total` for code classes 1xx..5xx (index = first digit - 1).
    pub requests_by_class: [metrics::Counter; 5],
    /// `surge_request_duration_seconds` (surge's own: written at scrape time).
    pub duration: crate::telemetry::DurationHistogram,
}

impl BackendMetrics {
    fn register(id: &Arc<str>) -> Self {
        use crate::telemetry::names;
        let class = |c: &'static str| metrics::counter!(names::REQUESTS_TOTAL, "backend" => id.to_string(), "code_class" => c);
        Self {
            requests_by_class: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            duration: crate::telemetry::DurationHistogram::default(),
        }
    }

    /// Counts one response with `status` (100..=599).
    pub fn count_status(&self, status: u16) {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        self.requests_by_class[class].increment(1);
    }
}

impl Backend {
    pub fn new(id: &str, addr: SocketAddr, weight: u32, origin: Origin) -> Self {
        let id: Arc<str> = Arc::from(id);
        Self {
            metrics: BackendMetrics::register(&id),
            id,
            addr,
            authority: Bytes::from(addr.to_string()),
            weight,
            origin,
            in_flight: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            probe_successes: AtomicU32::new(0),
            probe_failures: AtomicU32::new(0),
            latency: PeakEwma::new(),
            idle: Notify::new(),
            idle_watchers: AtomicU32::new(0),
            last_probe_error: arc_swap::ArcSwapOption::empty(),
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// Why the latest failed health probe failed, if one ever did.
    pub fn last_probe_error(&self) -> Option<String> {
        self.last_probe_error.load_full().map(|e| (*e).clone())
    }

    /// Consecutive successful and failed health probes, as the health checker last saw.
    pub fn probe_streak(&self) -> (u32, u32) {
        (
            self.probe_successes.load(Ordering::Relaxed),
            self.probe_failures.load(Ordering::Relaxed),
        )
    }
}

/// Keeps a backend's in-flight count raised for as long as it lives; dropping it, on any
/// exit path (success, error, cancelled client), lowers the count again.
#[derive(Debug)]
pub struct InFlight {
    backend: Arc<Backend>,
    /// The backend's state in the snapshot it was picked from.
    state: State,
}

impl InFlight {
    fn new(backend: Arc<Backend>, state: State) -> Self {
        backend.in_flight.fetch_add(1, Ordering::Relaxed);
        backend.requests.fetch_add(1, Ordering::Relaxed);
        Self { backend, state }
    }

    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }

    /// The backend's state when it was picked (draining backends close client keep-alive).
    pub fn state(&self) -> State {
        self.state
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // SeqCst (on x86 the same instruction as Relaxed): pairs with a drain waiter's
        // registration, so the waiter either sees the count at 0 or is woken.
        let before = self.backend.in_flight.fetch_sub(1, Ordering::SeqCst);
        if before == 1 && self.backend.idle_watchers.load(Ordering::SeqCst) > 0 {
            self.backend.idle.notify_waiters();
        }
    }
}

/// A backend's place in one snapshot: the shared backend plus the state that changes only
/// when a new table is published.
#[derive(Debug, Clone)]
pub struct Member {
    pub backend: Arc<Backend>,
    pub state: State,
    /// When `state` was entered; slow start ramps from here.
    pub since: Instant,
    /// Whether this stint in service ramps its weight (not for backends up at boot).
    pub slow_start: bool,
    /// While draining: bound carts keep reaching the backend until this instant.
    pub drain_deadline: Option<Instant>,
    /// While ejected: the health checker may not bring it back before this instant.
    pub down_until: Option<Instant>,
}

impl Member {
    fn new(backend: Arc<Backend>, state: State, now: Instant) -> Self {
        Self {
            backend,
            state,
            since: now,
            slow_start: false,
            drain_deadline: None,
            down_until: None,
        }
    }

    /// Weight for new requests at `now`: 0 unless in service; during slow start it ramps
    /// linearly from 10% to the full weight.
    pub fn effective_weight(&self, now: Instant, slow_start: Duration) -> u32 {
        if self.state != State::InService {
            return 0;
        }
        let full = self.backend.weight;
        if !self.slow_start || slow_start.is_zero() {
            return full;
        }
        let elapsed = now.saturating_duration_since(self.since);
        if elapsed >= slow_start {
            return full;
        }
        let share = 0.1 + 0.9 * elapsed.as_secs_f64() / slow_start.as_secs_f64();
        ((f64::from(full) * share).round() as u32).clamp(1, full)
    }

    /// Whether requests bound to this backend (by route cookie) may still go to it at
    /// `now_ns` (nanoseconds since the pool's epoch, as [`Pick::now_ns`]).
    pub fn accepts_bound(&self, now_ns: u64) -> bool {
        match self.state {
            State::InService => true,
            State::Draining => self
                .drain_deadline
                .is_some_and(|d| now_ns < nanos_since_epoch(d)),
            State::Warming | State::Down | State::Maint | State::Standby => false,
        }
    }

    /// Whether the backend is still ramping up at `now`.
    fn ramping(&self, now: Instant, slow_start: Duration) -> bool {
        self.state == State::InService
            && self.slow_start
            && now.saturating_duration_since(self.since) < slow_start
    }
}

/// Settings of a pool that do not change while it runs.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub name: String,
    pub algorithm: Algorithm,
    /// Cart cookie and route cookie names, when carts are sticky.
    pub sticky: Option<crate::config::StickyConfig>,
    pub slow_start: Duration,
    pub ejection: EjectionConfig,
    /// Load shedding; `None` when off.
    pub shed: Option<shed::ShedConfig>,
    /// What the proxy speaks to the backends.
    pub protocol: crate::config::UpstreamProtocol,
    /// Requests one backend may have in flight before selection skips it; 0: no ceiling.
    pub node_max_in_flight: u32,
    /// The waiting room, with shedding.
    pub waiting_room: Option<crate::config::WaitingRoomConfig>,
}

impl PoolSettings {
    pub fn from_config(cfg: &PoolConfig) -> Self {
        Self {
            name: cfg.name.clone(),
            algorithm: cfg.algorithm,
            sticky: cfg.sticky.clone(),
            slow_start: cfg.slow_start,
            ejection: cfg.ejection.clone(),
            shed: (cfg.shed.max_in_flight_per_node > 0).then(|| cfg.shed.clone()),
            protocol: cfg.protocol,
            node_max_in_flight: cfg.node_max_in_flight,
            waiting_room: cfg.waiting_room.clone(),
        }
    }
}

/// One immutable snapshot of the pool, with everything selection needs precomputed.
#[derive(Debug)]
pub struct Table {
    members: Vec<Member>,
    /// Precomputed selection structures over `members`.
    pub(crate) select: select::Selector,
    /// Member index by backend id, for the route cookie.
    by_id: HashMap<Arc<str>, usize>,
    /// Increases by one with every publish; shows that a swap happened.
    pub generation: u64,
    /// Whether some member is still ramping (the maintenance loop republishes until not).
    ramping: bool,
}

impl Table {
    fn build(
        members: Vec<Member>,
        settings: &PoolSettings,
        generation: u64,
        now: Instant,
        previous: Option<&Table>,
    ) -> Self {
        let weights: Vec<u32> = members
            .iter()
            .map(|m| m.effective_weight(now, settings.slow_start))
            .collect();
        let select =
            select::Selector::build(&members, &weights, settings, previous.map(|t| &t.select));
        let by_id = members
            .iter()
            .enumerate()
            .map(|(i, m)| (m.backend.id.clone(), i))
            .collect();
        let ramping = members.iter().any(|m| m.ramping(now, settings.slow_start));
        Self {
            members,
            select,
            by_id,
            generation,
            ramping,
        }
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }

    pub fn get(&self, id: &str) -> Option<&Member> {
        self.by_id.get(id).map(|&i| &self.members[i])
    }

    /// Number of backends taking new requests.
    pub fn eligible(&self) -> usize {
        self.select.eligible_len()
    }

    /// Number of members in `state`.
    pub fn count(&self, state: State) -> usize {
        self.members.iter().filter(|m| m.state == state).count()
    }
}

/// Pool-wide traffic counters written by the proxy and read by the autoscaler and admin
/// API (neither of which imports the proxy).
#[derive(Debug, Default)]
pub struct Traffic {
    /// Shopper connections accepted.
    pub connections_accepted: AtomicU64,
    /// Connections that count for scaling (see [`signal`]).
    pub scaling: signal::ScalingSignal,
    /// Requests received from shoppers.
    pub requests: AtomicU64,
    /// Requests answered by surge itself with 502/503/504.
    pub proxy_errors: AtomicU64,
    /// Admitted, waiting and shed requests (load shedding).
    pub admission: Arc<shed::Admission>,
    /// Time from request received to response head, pool-wide (for the p99 guard).
    pub latency: latency::LatencyHistogram,
    /// The waiting room (`None`: newcomers of a full shop get 503).
    pub waiting: Option<waiting::Room>,
}

/// Outcome of one proxied request, as passive ejection sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The backend answered with something other than 5xx.
    Success,
    /// Connect error, broken connection, timeout, or a 5xx response.
    Failure,
}

/// A named set of backends behind one lock-free table.
#[derive(Debug)]
pub struct Pool {
    settings: PoolSettings,
    table: ArcSwap<Table>,
    /// Round-robin position; lives outside the table so a publish does not restart it.
    rr_cursor: AtomicUsize,
    pub traffic: Traffic,
    /// The generation of the table last published: waiters for a pool change (shedding
    /// queue, drains, start-up) subscribe instead of polling.
    changes: watch::Sender<u64>,
    /// Health-check rounds completed (probe streaks are atomics, not publishes).
    probe_rounds: watch::Sender<u64>,
}

impl Pool {
    /// A pool whose backends start in service (as HAProxy's do): the health checker takes
    /// out what is not.
    pub fn new(settings: PoolSettings, backends: Vec<Arc<Backend>>) -> Self {
        let now = Instant::now();
        let members = backends
            .into_iter()
            .map(|b| Member::new(b, State::InService, now))
            .collect();
        let table = Table::build(members, &settings, 0, now, None);
        let waiting = settings.waiting_room.as_ref().map(|w| {
            let room = waiting::Room::new(waiting::RoomLimits {
                abandon_after: w.abandon_after,
                ticket_ttl: w.ticket_ttl,
                max_waiting: w.max_waiting,
            });
            room.hold(w.held);
            room
        });
        Self {
            settings,
            table: ArcSwap::from_pointee(table),
            rr_cursor: AtomicUsize::new(0),
            traffic: Traffic {
                waiting,
                ..Traffic::default()
            },
            changes: watch::Sender::new(0),
            probe_rounds: watch::Sender::new(0),
        }
    }

    /// Changes whenever a new table is published (the value is its generation).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Changes after every health-check round.
    pub fn probe_rounds(&self) -> watch::Receiver<u64> {
        self.probe_rounds.subscribe()
    }

    /// Called by the health checker when a round of probes is recorded.
    fn probed(&self) {
        self.probe_rounds.send_modify(|n| *n += 1);
    }

    /// Builds the pool from the configuration's static backends plus `extra`.
    pub fn from_config(cfg: &PoolConfig, extra: Vec<Arc<Backend>>) -> Self {
        let mut backends: Vec<Arc<Backend>> = cfg
            .backends
            .iter()
            .map(|b: &BackendSpec| Arc::new(Backend::new(&b.id, b.addr, b.weight, Origin::Static)))
            .collect();
        backends.extend(extra);
        Self::new(PoolSettings::from_config(cfg), backends)
    }

    pub fn settings(&self) -> &PoolSettings {
        &self.settings
    }

    /// The current snapshot: one atomic load, no lock.
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Table>> {
        self.table.load()
    }

    /// The current snapshot as an owned `Arc`, for holders that outlive a request.
    pub fn snapshot_full(&self) -> Arc<Table> {
        self.table.load_full()
    }

    /// Picks a backend for a request and counts it in flight. `None` when no backend
    /// can take it (the proxy answers 503).
    pub fn pick(&self, req: &Pick<'_>) -> Result<InFlight, select::NoPick> {
        let table = self.table.load();
        select::pick(&table, req, &self.rr_cursor).map(|i| {
            let m = &table.members[i];
            InFlight::new(m.backend.clone(), m.state)
        })
    }

    /// Applies `change` to a copy of the members and publishes the result, retrying if
    /// another writer published first. Nothing is published when `change` says
    /// [`Update::Keep`]. It may run more than once, so it must only
    /// touch the members it is given.
    pub fn update<T>(&self, mut change: impl FnMut(&mut Vec<Member>, Instant) -> Update<T>) -> T {
        loop {
            let now = Instant::now();
            let current = self.table.load_full();
            let mut members = current.members.clone();
            let result = match change(&mut members, now) {
                Update::Keep(v) => return v,
                Update::Publish(v) => v,
            };
            let next = Arc::new(Table::build(
                members,
                &self.settings,
                current.generation + 1,
                now,
                Some(&current),
            ));
            let generation = next.generation;
            let prev = self.table.compare_and_swap(&current, next);
            if Arc::ptr_eq(&prev, &current) {
                self.changes.send_replace(generation);
                return result;
            }
        }
    }

    /// Adds a backend in `Warming`: it takes traffic once the health checker has seen it
    /// healthy `rise` times, then ramps up over the slow-start period.
    pub fn add(&self, backend: Arc<Backend>) -> Result<(), PoolError> {
        self.add_as(backend, State::Warming)
    }

    /// Adds a backend directly in service, without waiting for health checks.
    pub fn add_in_service(&self, backend: Arc<Backend>) -> Result<(), PoolError> {
        self.add_as(backend, State::InService)
    }

    /// Adds a backend as a warm spare (no traffic until [`Pool::promote`]).
    pub fn add_standby(&self, backend: Arc<Backend>) -> Result<(), PoolError> {
        self.add_as(backend, State::Standby)
    }

    /// Adds a backend in `state`, in one publish; ids and addresses stay unique.
    fn add_as(&self, backend: Arc<Backend>, state: State) -> Result<(), PoolError> {
        if backend.weight == 0 || backend.weight > MAX_WEIGHT {
            return Err(PoolError::BadWeight(backend.weight));
        }
        self.update(|members, now| {
            if members.iter().any(|m| m.backend.id == backend.id) {
                return Update::Keep(Err(PoolError::DuplicateId(backend.id.to_string())));
            }
            if members.iter().any(|m| m.backend.addr == backend.addr) {
                return Update::Keep(Err(PoolError::DuplicateAddress(backend.addr)));
            }
            members.push(Member::new(backend.clone(), state, now));
            Update::Publish(Ok(()))
        })
    }

    /// Moves one backend for `event` (see [`lifecycle`]); the state it is in afterwards,
    /// and whether it moved.
    fn apply(&self, id: &str, event: Event) -> Result<(State, bool), PoolError> {
        self.update(|members, now| {
            let Some(m) = members.iter_mut().find(|m| &*m.backend.id == id) else {
                return Update::Keep(Err(PoolError::UnknownBackend(id.to_string())));
            };
            match lifecycle::apply(m, event, now) {
                Some(state) => Update::Publish(Ok((state, true))),
                None => Update::Keep(Ok((m.state, false))),
            }
        })
    }

    /// Moves a healthy standby backend into service (ramping up). Returns whether it did.
    pub fn promote(&self, id: &str) -> bool {
        self.apply(id, Event::Promote).is_ok_and(|(_, moved)| moved)
    }

    /// Moves a drained backend to standby instead of releasing it. Returns whether it did.
    pub fn park(&self, id: &str) -> bool {
        self.apply(id, Event::Park).is_ok_and(|(_, moved)| moved)
    }

    /// Ends a drain or a maintenance: a drained backend takes new requests again (ramping
    /// up); one back from maintenance first proves itself healthy (`Warming`). Returns
    /// the state it is in now.
    pub fn undrain(&self, id: &str) -> Result<State, PoolError> {
        self.apply(id, Event::Undrain).map(|(state, _)| state)
    }

    /// Puts a backend in maintenance at once: no traffic (bound carts included) and no
    /// health checks. Requests already on it finish.
    pub fn maint(&self, id: &str) -> Result<(), PoolError> {
        self.apply(id, Event::Maint).map(|_| ())
    }

    /// Removes a backend from the table at once. Requests already on it finish (they hold
    /// the `Arc<Backend>`); new ones go elsewhere.
    pub fn remove(&self, id: &str) -> Result<Arc<Backend>, PoolError> {
        self.update(
            |members, _| match members.iter().position(|m| &*m.backend.id == id) {
                Some(i) => Update::Publish(Ok(members.remove(i).backend)),
                None => Update::Keep(Err(PoolError::UnknownBackend(id.to_string()))),
            },
        )
    }

    /// Records the outcome of one proxied request; enough consecutive failures eject the
    /// backend (Envoy's outlier detection), never more than `max_percent` of the pool.
    pub fn record(&self, backend: &Backend, outcome: Outcome) {
        match outcome {
            Outcome::Success => {
                // Read before writing: keeps the cache line shared on the happy path.
                if backend.consecutive_failures.load(Ordering::Relaxed) != 0 {
                    backend.consecutive_failures.store(0, Ordering::Relaxed);
                }
            }
            Outcome::Failure => {
                backend.failures.fetch_add(1, Ordering::Relaxed);
                let n = backend.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
                let threshold = self.settings.ejection.consecutive_failures;
                if threshold > 0 && n == threshold {
                    self.eject(&backend.id);
                }
            }
        }
    }

    /// Takes a backend out for a back-off period that grows with each ejection.
    fn eject(&self, id: &str) -> bool {
        let ej = self.settings.ejection.clone();
        let ejected = self.update(|members, now| {
            let total = members.len().max(1);
            let down = members.iter().filter(|m| m.state == State::Down).count();
            if (down + 1) * 100 > total * ej.max_percent as usize {
                return Update::Keep(false);
            }
            let Some(m) = members
                .iter_mut()
                .find(|m| &*m.backend.id == id && m.state == State::InService)
            else {
                return Update::Keep(false);
            };
            let times = m.backend.ejections.load(Ordering::Relaxed) + 1;
            let length = ej.base_time.saturating_mul(times).min(ej.max_time);
            lifecycle::apply(
                m,
                Event::Eject {
                    until: now + length,
                },
                now,
            );
            Update::Publish(true)
        });
        if ejected {
            if let Some(m) = self.snapshot().get(id) {
                m.backend.ejections.fetch_add(1, Ordering::Relaxed);
                m.backend.probe_successes.store(0, Ordering::Relaxed);
                tracing::warn!(backend = id, "ejected after consecutive failures");
            }
        }
        ejected
    }

    /// Periodic upkeep: republishes while a backend ramps up so its effective weight grows.
    pub fn tick(&self) {
        if self.table.load().ramping {
            self.update(|_, _| Update::Publish(()));
        }
    }
}

/// What a [`Pool::update`] closure decided: publish the changed members, or keep the
/// current table. Either way it carries the closure's result.
#[derive(Debug)]
pub enum Update<T> {
    Publish(T),
    Keep(T),
}

#[cfg(test)]
mod tests;

/// Builders for unit tests across `pool` and its users.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::{Backend, Member, Origin, PoolSettings, State};
    use crate::config::{Algorithm, EjectionConfig};

    /// Pool settings with no ejection, slow start or shedding.
    pub(crate) fn settings(algorithm: Algorithm) -> PoolSettings {
        PoolSettings {
            name: "t".into(),
            algorithm,
            sticky: None,
            slow_start: Duration::ZERO,
            ejection: EjectionConfig {
                consecutive_failures: 0,
                base_time: Duration::from_secs(1),
                max_time: Duration::from_secs(1),
                max_percent: 50,
            },
            shed: None,
            protocol: Default::default(),
            node_max_in_flight: 0,
            waiting_room: None,
        }
    }

    /// A static backend `b` on 127.0.0.1:1 in `state`.
    pub(crate) fn member(state: State) -> Member {
        let b = Arc::new(Backend::new(
            "b",
            "127.0.0.1:1".parse().expect("an address"),
            1,
            Origin::Static,
        ));
        Member::new(b, state, Instant::now())
    }
}
