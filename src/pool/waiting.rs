//! The waiting room: new visitors held in arrival order while the shop is full (or while
//! an operator holds the door before a sale), and let in at the rate the pool frees room,
//! instead of being turned away with a 503.
//!
//! A visitor's place is a ticket: the time it was issued (milliseconds) and a random
//! number, carried in a signed cookie by the proxy. Order is by issue time, so a ticket
//! issued by another instance of a cluster, or before a restart, takes its place by when
//! its holder arrived.
//!
//! The line is let in by a **cutoff**: every ticket issued before it may enter, none after
//! it, so nobody is ever let in ahead of someone who came earlier. The cutoff moves forward
//! only over as many waiting tickets as the pool has room for *less those already let in
//! and not yet back*, so a burst of free room is not handed out twice. A place is spent
//! when its holder is actually served ([`Room::spend`]); a holder let in but turned away
//! by the shop a moment later keeps its place at the front.
//!
//! Nothing here takes a process-wide lock: places live in [`SHARDS`] maps chosen by the
//! ticket's random number (and again by time slice, for a place within its slice), the
//! order is a ring of atomic counters per time slice (a Fenwick tree: a place is an
//! O(log n) count), and the cutoff, the line's length and the flag that says the room
//! is in use are atomics. Tickets that were used or let
//! lapse are remembered for their whole life in Bloom filters sliced by issue time, so a
//! holder who left cannot come back later at the old place, and a used ticket is no
//! place at all (a replay), in fixed memory whatever the traffic.
//!
//! The room is tidied on its own clock ([`Room::tidy`], called by `serve` every
//! [`TIDY_EVERY`]): places whose holders stopped asking lapse whether or not anyone else
//! visits, so the autoscaler never sees a line of people who left.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Maps the places are spread over (a visit locks one of them, briefly).
pub const SHARDS: usize = 16;
/// How often `serve` tidies the room.
pub const TIDY_EVERY: Duration = Duration::from_millis(500);
/// Most time slices of the order ring (each an atomic counter): 8 MiB.
const MAX_SLICES: u64 = 1 << 21;
/// How far ahead of this clock a ticket's issue time may be (another instance's clock).
const CLOCK_SKEW_MS: u64 = 60_000;
/// Bloom filter slices the memory of used tickets is spread over (by issue time).
const MEMORY_SLICES: u64 = 8;
/// Bits per remembered ticket in each memory slice (about 1% false "used" at that load).
const MEMORY_BITS_PER_TICKET: u64 = 10;
/// Bit positions per ticket in a memory slice.
const MEMORY_HASHES: u64 = 7;

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

    fn shard(&self) -> usize {
        (self.nonce % SHARDS as u64) as usize
    }

    /// The ticket's order as one number: the issue time (42 bits: ms to the year 2109)
    /// and the nonce's top 22 bits, so a cutoff is one atomic word. Ordered as the
    /// tickets are (ties only between nonces sharing 22 bits in one millisecond).
    pub fn key(&self) -> u64 {
        (self.issued_ms << 22) | (self.nonce >> 42)
    }
}

/// What the room says to one visit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visit {
    /// Come in. `ticket`: the place to [`Room::spend`] once the holder is served (`None`:
    /// the visitor had no place and the room let it straight in).
    Enter { ticket: Option<Ticket> },
    /// Wait: `place` (1 = next) with `ticket`, new or as presented.
    Wait { ticket: Ticket, place: usize },
    /// The line is at its bound: no place for a newcomer now.
    Full,
}

/// The room the shop has for newcomers at one visit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Capacity {
    /// Newcomers the shop can take now (request slots free for them).
    pub free: u64,
    /// What one holder let in and not yet back is counted for, in slots (0..=1): its
    /// first request needs a slot only for a request's time within the reload it comes
    /// back in, so 1.0 (a whole slot for the whole reload) would let the line in one
    /// reload at a time however large the shop; the proxy sets it to the blades'
    /// latency over the page's refresh.
    pub per_let_in: f64,
}

impl Capacity {
    /// `free` slots, each holder let in counted as a whole slot.
    pub fn slots(free: u64) -> Self {
        Self {
            free,
            per_let_in: 1.0,
        }
    }
}

/// The room's numbers, for the admin API and metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoomStatus {
    pub held_by_hand: bool,
    /// Visitors waiting (not yet let in).
    pub queued: usize,
    /// Visitors let in whose holder has not come back yet.
    pub let_in: usize,
    /// Let in over the last minute, per second.
    pub admitted_per_second: f64,
    /// How long the first in line has waited.
    pub longest_wait: Duration,
}

/// How the room is sized and how long its memories last.
#[derive(Debug, Clone, Copy)]
pub struct RoomLimits {
    /// A visitor not seen for this long has left the line.
    pub abandon_after: Duration,
    /// A ticket's whole life (its signature expires then): how long a used or lapsed
    /// ticket is remembered.
    pub ticket_ttl: Duration,
    /// Most places held at once; beyond it a newcomer gets the 503.
    pub max_waiting: usize,
}

/// Counters the autoscaler's meter reads (cumulative, never reset).
#[derive(Debug, Default)]
pub struct RoomCounters {
    /// Fresh places given to new visitors.
    pub arrived: AtomicU64,
    /// Places let in (the cutoff moved over them).
    pub let_in: AtomicU64,
    /// Places spent by a holder who was served.
    pub spent: AtomicU64,
    /// Places that lapsed (holder stopped asking) or expired.
    pub lapsed: AtomicU64,
    /// Used tickets presented again (answered with a fresh place).
    pub replays: AtomicU64,
    /// Newcomers turned away because the line was at its bound.
    pub full: AtomicU64,
}

/// Where a ticket's one entry is recorded across the instances of a cluster (etcd):
/// without it a ticket could enter once on each instance.
pub trait Claims: Send + Sync {
    /// Claims `ticket` (its signature expires at `expires_unix`) for its one entry: true
    /// the first time on any instance, false after.
    fn claim(
        &self,
        ticket: Ticket,
        expires_unix: u64,
    ) -> Pin<Box<dyn Future<Output = bool> + Send + '_>>;
}

/// The waiting room of one pool.
pub struct Room {
    /// The cluster's record of used tickets, when there is a cluster.
    claims: OnceLock<Arc<dyn Claims>>,
    /// Holding the door by hand (a pre-queue before a sale): nobody new is let in.
    held: AtomicBool,
    limits: RoomLimits,
    /// Places, by ticket, with when their holder was last seen (ms since `epoch`).
    shards: Vec<Mutex<HashMap<Ticket, u64>>>,
    /// The same places by time slice of the order ring (slice number → its tickets): a
    /// place within its slice is a count over a handful, under one of [`SHARDS`] locks.
    by_slice: Vec<Mutex<HashMap<u64, Vec<Ticket>>>>,
    /// Places held (waiting, or let in and not yet back).
    places: AtomicUsize,
    /// Tickets whose [`Ticket::key`] is below this may enter.
    cutoff: AtomicU64,
    order: OrderRing,
    memory: Memory,
    /// Let-ins per wall-clock second, the last 64 seconds (`(second, count)`).
    recent: Vec<(AtomicU64, AtomicU64)>,
    epoch: Instant,
    pub counters: RoomCounters,
    /// [`Room::session_cost`], as f64 bits.
    session_cost: AtomicU64,
}

impl std::fmt::Debug for Room {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Room")
            .field("held", &self.held())
            .field("places", &self.places.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Room {
    pub fn new(limits: RoomLimits) -> Self {
        let span_ms = limits.ticket_ttl.as_millis() as u64 + 2 * CLOCK_SKEW_MS;
        Self {
            claims: OnceLock::new(),
            held: AtomicBool::new(false),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            by_slice: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            places: AtomicUsize::new(0),
            cutoff: AtomicU64::new(0),
            order: OrderRing::new(span_ms),
            memory: Memory::new(span_ms, limits.max_waiting),
            recent: (0..64)
                .map(|_| (AtomicU64::new(0), AtomicU64::new(0)))
                .collect(),
            epoch: Instant::now(),
            counters: RoomCounters::default(),
            session_cost: AtomicU64::new(0),
            limits,
        }
    }

    /// Records used tickets in `claims` too (a cluster's store): set once, at start.
    pub fn share_claims(&self, claims: Arc<dyn Claims>) {
        let _ = self.claims.set(claims);
    }

    /// Claims `ticket` for its one entry across the cluster (true without a cluster).
    pub async fn claim(&self, ticket: Ticket, expires_unix: u64) -> bool {
        match self.claims.get() {
            Some(c) => c.claim(ticket, expires_unix).await,
            None => true,
        }
    }

    /// Holds the door (or opens it again).
    pub fn hold(&self, held: bool) {
        self.held.store(held, Ordering::SeqCst);
    }

    pub fn held(&self) -> bool {
        self.held.load(Ordering::SeqCst)
    }

    /// Whether anyone holds a place or the door is held: a newcomer must then come
    /// through the room, not around it. One atomic load (no lock).
    pub fn in_use(&self) -> bool {
        self.held() || self.places.load(Ordering::Acquire) > 0
    }

    /// Every place held: waiting, or let in and not back yet (one atomic load). A holder
    /// let in is at its waiting page until it comes back: still demand.
    pub fn places(&self) -> usize {
        self.places.load(Ordering::Acquire)
    }

    /// Whether anyone waits not yet let in, or the door is held: a newcomer that is not a
    /// page load would then cut in line.
    pub fn someone_waits(&self) -> bool {
        self.held() || self.waiting() > 0
    }

    /// What one shopper let in costs the shop, in request-slot seconds, as last measured
    /// (see [`SessionCost`]); 0 when not measured.
    pub fn session_cost(&self) -> f64 {
        f64::from_bits(self.session_cost.load(Ordering::Relaxed))
    }

    pub fn set_session_cost(&self, slot_seconds: f64) {
        self.session_cost
            .store(slot_seconds.to_bits(), Ordering::Relaxed);
    }

    /// Visitors in line now, not yet let in (as of the last tidy or visit).
    pub fn waiting(&self) -> usize {
        self.places
            .load(Ordering::Acquire)
            .saturating_sub(self.let_in_not_back(wall_ms()))
    }

    /// Places let in whose holder has not come back yet.
    fn let_in_not_back(&self, now_ms: u64) -> usize {
        self.count_below(self.cutoff.load(Ordering::Acquire), now_ms)
    }

    /// Places whose key is below `key`: whole time slices from the order ring, then the
    /// few in `key`'s own slice.
    fn count_below(&self, key: u64, now_ms: u64) -> usize {
        let slice_ms = self.order.slice_ms;
        let slice = (key >> 22) / slice_ms;
        let in_slice = self.slice_shard(slice).lock().map_or(0, |slices| {
            slices
                .get(&slice)
                .map_or(0, |ts| ts.iter().filter(|t| t.key() < key).count())
        });
        self.order.count_before(slice * slice_ms, now_ms) + in_slice
    }

    /// The places issued in the time slice starting at `start`, in order.
    fn slice_places(&self, start: u64) -> Vec<Ticket> {
        let slice = start / self.order.slice_ms;
        let mut all = self.slice_shard(slice).lock().map_or(Vec::new(), |slices| {
            slices.get(&slice).cloned().unwrap_or_default()
        });
        all.sort_unstable();
        all
    }

    fn slice_shard(&self, slice: u64) -> &Mutex<HashMap<u64, Vec<Ticket>>> {
        &self.by_slice[(slice % SHARDS as u64) as usize]
    }

    /// Records `t` in (or out of) its time slice.
    fn index(&self, t: Ticket, present: bool) {
        let slice = t.issued_ms / self.order.slice_ms;
        let Ok(mut slices) = self.slice_shard(slice).lock() else {
            return;
        };
        if present {
            slices.entry(slice).or_default().push(t);
        } else if let Some(ts) = slices.get_mut(&slice) {
            if let Some(i) = ts.iter().position(|x| *x == t) {
                ts.swap_remove(i);
            }
            if ts.is_empty() {
                slices.remove(&slice);
            }
        }
    }

    fn millis(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// One visit at `now` (`now_ms` the wall clock) by the holder of `ticket` (`None`:
    /// none, or not one this pool signed), with `room` in the shop now. `fresh` is the
    /// ticket a visitor without a place gets.
    pub fn visit(
        &self,
        ticket: Option<Ticket>,
        now: Instant,
        now_ms: u64,
        room: Capacity,
        fresh: Ticket,
    ) -> Visit {
        let free = room.free;
        let seen = self.millis(now);
        let ticket = ticket.filter(|t| self.valid(t, now_ms));
        let mine = match ticket.map(|t| (t, self.touch(t, seen))) {
            Some((t, true)) => t,
            // Not here: used or let lapse (a replay: a fresh place at the end), or
            // unknown (another instance's, or from before a restart: its own time).
            Some((t, false)) if !self.memory.contains(&t) => match self.insert(t, seen) {
                true => t,
                false => return self.full(),
            },
            other => {
                if other.is_some() {
                    self.counters.replays.fetch_add(1, Ordering::Relaxed);
                }
                // A visitor without a place who finds nobody waiting (every place let
                // in already) and room in the shop now comes straight in: it passes
                // nobody, and those let in have their room kept (they come back as
                // shoppers already in, whose share newcomers cannot take).
                if !self.held()
                    && free > 0
                    && self.places.load(Ordering::Acquire) <= self.let_in_not_back(now_ms)
                {
                    return Visit::Enter { ticket: None };
                }
                if !self.insert(fresh, seen) {
                    return self.full();
                }
                self.counters.arrived.fetch_add(1, Ordering::Relaxed);
                fresh
            }
        };
        self.let_in(room, now_ms);
        if mine.key() < self.cutoff.load(Ordering::Acquire) {
            return Visit::Enter { ticket: Some(mine) };
        }
        Visit::Wait {
            ticket: mine,
            place: self.place_of(&mine, now_ms),
        }
    }

    fn full(&self) -> Visit {
        self.counters.full.fetch_add(1, Ordering::Relaxed);
        Visit::Full
    }

    /// Whether `t` can hold a place at `now_ms`: not expired, not from the far future.
    fn valid(&self, t: &Ticket, now_ms: u64) -> bool {
        let ttl = self.limits.ticket_ttl.as_millis() as u64;
        t.issued_ms.saturating_add(ttl) > now_ms && t.issued_ms <= now_ms + CLOCK_SKEW_MS
    }

    /// Marks `t`'s holder as seen; whether it holds a place here.
    fn touch(&self, t: Ticket, seen: u64) -> bool {
        let Ok(mut shard) = self.shards[t.shard()].lock() else {
            return false;
        };
        match shard.get_mut(&t) {
            Some(at) => {
                *at = seen;
                true
            }
            None => false,
        }
    }

    /// Gives `t` a place (false: the line is at its bound).
    fn insert(&self, t: Ticket, seen: u64) -> bool {
        let held = self.places.fetch_add(1, Ordering::AcqRel);
        if held >= self.limits.max_waiting {
            self.places.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        let Ok(mut shard) = self.shards[t.shard()].lock() else {
            self.places.fetch_sub(1, Ordering::AcqRel);
            return false;
        };
        if shard.insert(t, seen).is_some() {
            // Two visits of one new holder at once: one place.
            self.places.fetch_sub(1, Ordering::AcqRel);
        } else {
            drop(shard);
            self.index(t, true);
            self.order.add(t.issued_ms, 1);
        }
        true
    }

    /// Moves the cutoff over as many waiting places as the shop has room for, less
    /// what those let in and not yet back will take. Nothing while the door is held.
    fn let_in(&self, room: Capacity, now_ms: u64) {
        if self.held() || room.free == 0 {
            return;
        }
        let cutoff = self.cutoff.load(Ordering::Acquire);
        let out = self.count_below(cutoff, now_ms);
        let taken = (out as f64 * room.per_let_in.clamp(0.0, 1.0)).ceil() as u64;
        let Some(slots) = room.free.checked_sub(taken).filter(|m| *m > 0) else {
            return;
        };
        let per = room.per_let_in.clamp(0.01, 1.0);
        let more = (slots as f64 / per).floor() as usize;
        if more == 0 {
            return;
        }
        let (next, counted) = self.cutoff_for(out.saturating_add(more), now_ms);
        // Never ahead of this clock: a cutoff in the future (a ticket from a clock ahead
        // of ours, or a place spent meanwhile) would let in, uncounted, whoever comes
        // before it, the door held or not.
        let next = next.min((now_ms + 1) << 22);
        if next > cutoff && self.cutoff.fetch_max(next, Ordering::AcqRel) < next {
            let moved = counted.saturating_sub(out) as u64;
            self.counters.let_in.fetch_add(moved, Ordering::Relaxed);
        }
    }

    /// The cutoff key that lets in the first `target` places (or all there are), and how
    /// many that is: the slice where the count is reached (a binary search over the
    /// order ring), then the place within it.
    fn cutoff_for(&self, target: usize, now_ms: u64) -> (u64, usize) {
        let slice_ms = self.order.slice_ms;
        // Never past the last place: a cutoff ahead of it would let in, uncounted,
        // visitors who have not even arrived.
        let end = (now_ms + CLOCK_SKEW_MS) / slice_ms * slice_ms + slice_ms;
        let target = target.min(self.order.count_before(end, now_ms));
        if target == 0 {
            return (0, 0);
        }
        let cut = self.order.first_reaching(target, now_ms);
        let start = cut.saturating_sub(slice_ms);
        let before = self.order.count_before(start, now_ms);
        let in_slice = self.slice_places(start);
        match target.checked_sub(before + 1).and_then(|k| in_slice.get(k)) {
            Some(t) => (t.key() + 1, target),
            None => (cut << 22, before + in_slice.len()),
        }
    }

    /// `t`'s place in line (1 = next), counting only those not yet let in.
    fn place_of(&self, t: &Ticket, now_ms: u64) -> usize {
        let cutoff = self.cutoff.load(Ordering::Acquire);
        let ahead = self.count_below(t.key(), now_ms);
        ahead.saturating_sub(self.count_below(cutoff, now_ms)) + 1
    }

    /// The holder of `t` was served: its place is spent, and the ticket is remembered
    /// as used for the rest of its life. False when it held no place (used already).
    pub fn spend(&self, t: Ticket, now_ms: u64) -> bool {
        if !self.remove(&t) {
            return false;
        }
        self.memory.insert(&t);
        self.counters.spent.fetch_add(1, Ordering::Relaxed);
        let second = now_ms / 1000;
        let (at, count) = &self.recent[(second % 64) as usize];
        if at.swap(second, Ordering::AcqRel) != second {
            count.store(0, Ordering::Release);
        }
        count.fetch_add(1, Ordering::AcqRel);
        true
    }

    fn remove(&self, t: &Ticket) -> bool {
        let Ok(mut shard) = self.shards[t.shard()].lock() else {
            return false;
        };
        if shard.remove(t).is_none() {
            return false;
        }
        drop(shard);
        self.index(*t, false);
        self.order.add(t.issued_ms, -1);
        self.places.fetch_sub(1, Ordering::AcqRel);
        true
    }

    /// The place of `ticket` now, and whether it may come in (what the waiting page
    /// polls between reloads: the holder is still there).
    pub fn place(&self, ticket: Ticket, now_ms: u64) -> Option<(usize, bool)> {
        if !self.touch(ticket, self.millis(Instant::now())) {
            return None;
        }
        if ticket.key() < self.cutoff.load(Ordering::Acquire) {
            return Some((0, true));
        }
        Some((self.place_of(&ticket, now_ms), false))
    }

    /// Lets lapse the places whose holders stopped asking (waiting or let in), and those
    /// whose ticket expired; they are remembered, so a holder who comes back later starts
    /// again at the end. Runs on the room's own clock, one shard locked at a time.
    pub fn tidy(&self, now: Instant, now_ms: u64) {
        let seen_limit = self
            .millis(now)
            .saturating_sub(self.limits.abandon_after.as_millis() as u64);
        let ttl = self.limits.ticket_ttl.as_millis() as u64;
        for shard in &self.shards {
            let mut gone = Vec::new();
            if let Ok(mut places) = shard.lock() {
                places.retain(|t, seen| {
                    let keep = *seen >= seen_limit && t.issued_ms.saturating_add(ttl) > now_ms;
                    if !keep {
                        gone.push(*t);
                    }
                    keep
                });
            }
            for t in &gone {
                self.index(*t, false);
                self.order.add(t.issued_ms, -1);
                self.memory.insert(t);
            }
            self.places.fetch_sub(gone.len(), Ordering::AcqRel);
            self.counters
                .lapsed
                .fetch_add(gone.len() as u64, Ordering::Relaxed);
        }
        self.memory
            .forget_before(now_ms.saturating_sub(ttl + CLOCK_SKEW_MS));
    }

    /// The numbers, at `now_ms` (wall clock).
    pub fn status(&self, now_ms: u64) -> RoomStatus {
        let second = now_ms / 1000;
        let admitted: u64 = self
            .recent
            .iter()
            .filter(|(at, _)| {
                let at = at.load(Ordering::Acquire);
                at < second && second - at <= 60
            })
            .map(|(_, n)| n.load(Ordering::Acquire))
            .sum();
        let cutoff = self.cutoff.load(Ordering::Acquire);
        let let_in = self.count_below(cutoff, now_ms);
        RoomStatus {
            held_by_hand: self.held(),
            queued: self.places.load(Ordering::Acquire).saturating_sub(let_in),
            let_in,
            admitted_per_second: admitted as f64 / 60.0,
            longest_wait: self
                .order
                .first_at_or_after(cutoff >> 22, now_ms)
                .map_or(Duration::ZERO, |ms| {
                    Duration::from_millis(now_ms.saturating_sub(ms))
                }),
        }
    }

    /// A guess of the wait for `place`, from the pace of the last minute.
    pub fn estimate(&self, place: usize, now_ms: u64) -> Option<Duration> {
        let status = self.status(now_ms);
        (status.admitted_per_second > 0.0)
            .then(|| Duration::from_secs_f64(place as f64 / status.admitted_per_second))
    }
}

/// What one shopper let in costs the shop, by Little's law over a window: the mean of
/// the requests in flight over the rate shoppers came in is the request-slot seconds one
/// holds. Known from the calm before a sale (so the first decision of a step can size
/// the pool, and the room can weigh those it lets in by the load they will bring).
#[derive(Debug)]
pub struct SessionCost {
    window: Duration,
    /// (when, shoppers come in so far, requests in flight then).
    samples: std::collections::VecDeque<(Instant, u64, u64)>,
}

/// Shoppers come in over the window before what one costs is trusted.
const MIN_SESSIONS_MEASURED: u64 = 20;

impl SessionCost {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            samples: std::collections::VecDeque::new(),
        }
    }

    /// One reading: shoppers come in so far (cumulative), requests in flight now.
    pub fn observe(&mut self, now: Instant, came_in: u64, in_flight: u64) {
        self.samples.push_back((now, came_in, in_flight));
        while self
            .samples
            .get(1)
            .is_some_and(|s| now.saturating_duration_since(s.0) >= self.window)
        {
            self.samples.pop_front();
        }
    }

    /// Request-slot seconds one shopper holds; `None` until enough came in to tell.
    pub fn slot_seconds(&self) -> Option<f64> {
        let (first, last) = (self.samples.front()?, self.samples.back()?);
        let secs = last.0.saturating_duration_since(first.0).as_secs_f64();
        let came_in = last.1.saturating_sub(first.1);
        if secs < 1.0 || came_in < MIN_SESSIONS_MEASURED {
            return None;
        }
        let mean_in_flight =
            self.samples.iter().map(|s| s.2 as f64).sum::<f64>() / self.samples.len() as f64;
        Some(mean_in_flight / (came_in as f64 / secs)).filter(|s| *s > 0.0)
    }
}

/// The wall clock in Unix milliseconds.
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How many places were issued in each time slice, as a ring of atomic counters under a
/// Fenwick tree: adding a place and counting those issued before a time are O(log n).
/// Every live ticket was issued within one ticket life of now, and the ring spans more
/// than that, so no two live slices share a counter.
struct OrderRing {
    tree: Vec<AtomicI32>,
    /// Milliseconds per slice.
    slice_ms: u64,
    /// Slices (a power of two).
    len: usize,
    /// The ring's span, ms: counts look back this far from now.
    span_ms: u64,
}

impl OrderRing {
    fn new(span_ms: u64) -> Self {
        let slice_ms = span_ms.div_ceil(MAX_SLICES).max(1);
        let len = span_ms.div_ceil(slice_ms).next_power_of_two() as usize;
        Self {
            tree: (0..=len).map(|_| AtomicI32::new(0)).collect(),
            slice_ms,
            len,
            span_ms,
        }
    }

    fn index(&self, ms: u64) -> usize {
        ((ms / self.slice_ms) % self.len as u64) as usize
    }

    fn add(&self, ms: u64, delta: i32) {
        let mut i = self.index(ms) + 1;
        while i <= self.len {
            self.tree[i].fetch_add(delta, Ordering::AcqRel);
            i += i & i.wrapping_neg();
        }
    }

    /// Places in slices `[0, i)`.
    fn prefix(&self, mut i: usize) -> i64 {
        let mut sum = 0i64;
        while i > 0 {
            sum += i64::from(self.tree[i].load(Ordering::Acquire));
            i &= i - 1;
        }
        sum
    }

    /// The oldest time a live ticket can have at `now_ms`.
    fn oldest(&self, now_ms: u64) -> u64 {
        (now_ms + CLOCK_SKEW_MS).saturating_sub(self.span_ms - self.slice_ms)
    }

    /// Places issued before `ms` (in whole slices), counted from the oldest live slice.
    fn count_before(&self, ms: u64, now_ms: u64) -> usize {
        let lo = self.oldest(now_ms);
        if ms <= lo {
            return 0;
        }
        let hi = ms.min(now_ms + CLOCK_SKEW_MS + self.slice_ms);
        let (a, b) = (self.index(lo), self.index(hi));
        let slots = hi / self.slice_ms - lo / self.slice_ms;
        let sum = if slots >= self.len as u64 {
            self.prefix(self.len)
        } else if a <= b {
            self.prefix(b) - self.prefix(a)
        } else {
            self.prefix(self.len) - self.prefix(a) + self.prefix(b)
        };
        usize::try_from(sum).unwrap_or(0)
    }

    /// The first slice boundary (ms) by which `target` places were issued, or the end
    /// of the ring when fewer are: a descent of the Fenwick tree from the oldest live
    /// slice (the ring may wrap once), O(log n) counter reads.
    fn first_reaching(&self, target: usize, now_ms: u64) -> u64 {
        let sl = self.slice_ms;
        let (lo, hi) = (self.oldest(now_ms) / sl, (now_ms + CLOCK_SKEW_MS) / sl + 1);
        if self.count_before(hi * sl, now_ms) < target {
            return hi * sl;
        }
        let len = self.len as u64;
        let a = (lo % len) as usize;
        let before_a = self.prefix(a);
        let tail = self.prefix(self.len) - before_a;
        let target = target as i64;
        // Within the slices from the oldest to the ring's end, or past the wrap.
        let slice = if tail >= target {
            lo + self.descend(before_a + target).saturating_sub(a) as u64
        } else {
            lo + (len - a as u64) + self.descend(target - tail) as u64
        };
        ((slice + 1) * sl).min(hi * sl)
    }

    /// The array index of the slice where the count from index 0 reaches `want`.
    fn descend(&self, want: i64) -> usize {
        let (mut pos, mut rest, mut step) = (0usize, want, self.len);
        while step > 0 {
            let next = pos + step;
            if next <= self.len {
                let here = i64::from(self.tree[next].load(Ordering::Acquire));
                if here < rest {
                    pos = next;
                    rest -= here;
                }
            }
            step >>= 1;
        }
        pos.min(self.len - 1)
    }

    /// The start of the first slice at or after `ms` that holds a place, if any.
    fn first_at_or_after(&self, ms: u64, now_ms: u64) -> Option<u64> {
        let from = ms.max(self.oldest(now_ms)) / self.slice_ms * self.slice_ms;
        let base = self.count_before(from, now_ms);
        let end = (now_ms + CLOCK_SKEW_MS) / self.slice_ms * self.slice_ms + self.slice_ms;
        if self.count_before(end, now_ms) <= base {
            return None;
        }
        Some(self.first_reaching(base + 1, now_ms) - self.slice_ms)
    }
}

/// Tickets used or let lapse, remembered until they expire: Bloom filters, one per slice
/// of issue time, each cleared when its slice has passed out of every ticket's life.
/// Fixed memory; a false "used" (about 1% at the designed load) only gives an unknown
/// ticket a fresh place.
struct Memory {
    slices: Vec<Mutex<MemorySlice>>,
    slice_ms: u64,
    bits: u64,
}

struct MemorySlice {
    /// Which slice of time (issue ms / slice_ms) these bits remember; `u64::MAX`: none.
    holds: u64,
    bits: Vec<u64>,
}

impl Memory {
    fn new(span_ms: u64, expected: usize) -> Self {
        let slice_ms = span_ms.div_ceil(MEMORY_SLICES - 2).max(1);
        let bits = (expected as u64 * MEMORY_BITS_PER_TICKET)
            .next_power_of_two()
            .max(1024);
        Self {
            slices: (0..MEMORY_SLICES)
                .map(|_| {
                    Mutex::new(MemorySlice {
                        holds: u64::MAX,
                        bits: Vec::new(),
                    })
                })
                .collect(),
            slice_ms,
            bits,
        }
    }

    fn positions(&self, t: &Ticket) -> impl Iterator<Item = u64> {
        let h1 = t.nonce ^ t.issued_ms.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let h2 = t.nonce.rotate_left(32).wrapping_mul(0xbf58_476d_1ce4_e5b9) | 1;
        let mask = self.bits - 1;
        (0..MEMORY_HASHES).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)) & mask)
    }

    fn insert(&self, t: &Ticket) {
        let which = t.issued_ms / self.slice_ms;
        let Ok(mut slice) = self.slices[(which % MEMORY_SLICES) as usize].lock() else {
            return;
        };
        if slice.holds != which {
            slice.holds = which;
            slice.bits.clear();
            slice.bits.resize((self.bits / 64) as usize, 0);
        }
        for p in self.positions(t) {
            slice.bits[(p / 64) as usize] |= 1 << (p % 64);
        }
    }

    fn contains(&self, t: &Ticket) -> bool {
        let which = t.issued_ms / self.slice_ms;
        let Ok(slice) = self.slices[(which % MEMORY_SLICES) as usize].lock() else {
            return false;
        };
        slice.holds == which
            && self
                .positions(t)
                .all(|p| slice.bits[(p / 64) as usize] & (1 << (p % 64)) != 0)
    }

    /// Frees the slices that only remember tickets issued before `ms`.
    fn forget_before(&self, ms: u64) {
        for slice in &self.slices {
            if let Ok(mut s) = slice.lock() {
                if s.holds != u64::MAX && (s.holds + 1) * self.slice_ms <= ms {
                    s.holds = u64::MAX;
                    s.bits = Vec::new();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
