//! A worker's spare buffers. A connection takes one when bytes arrive and gives it back
//! when its request is done, so an idle keep-alive connection holds none (nginx and
//! HAProxy do the same): memory follows the requests in progress, not the connections.

use std::any::{Any, TypeId};
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

/// Capacity of a pooled buffer: a usual request or response head and a good slice of a
/// body. Heads larger than this grow their buffer (up to `proxy.max_header_bytes`); grown
/// buffers are not kept.
pub const BUFFER_BYTES: usize = 16 * 1024;

/// Spares a worker keeps however quiet it is (1 MiB of buffers): the requests a worker
/// has in progress at once on an ordinary day.
const MIN_SPARE: usize = 64;
/// Spares a worker keeps at most (16 MiB of buffers); more are freed when given back.
const MAX_SPARE: usize = 1024;

/// What a worker keeps spares of: made fresh when none is spare, emptied when given back.
pub trait Spare: Sized {
    /// A new one, at the capacity a usual request needs.
    fn fresh() -> Self;
    /// Empties it for the next request; false when it is not worth keeping (grown past
    /// the usual size by an unusual request).
    fn reset(&mut self) -> bool;
}

impl Spare for Vec<u8> {
    fn fresh() -> Self {
        Vec::with_capacity(BUFFER_BYTES)
    }

    fn reset(&mut self) -> bool {
        self.clear();
        self.capacity() == BUFFER_BYTES
    }
}

/// Fields a head's list has room for without growing: a browser's request has 10–20,
/// a blade's answer fewer.
pub const FIELDS_CAPACITY: usize = 32;

impl Spare for Vec<super::head::Field> {
    fn fresh() -> Self {
        Vec::with_capacity(FIELDS_CAPACITY)
    }

    fn reset(&mut self) -> bool {
        self.clear();
        true
    }
}

/// One worker's spares of one kind (single-threaded, like everything of a worker):
/// buffers, and the field lists of heads.
///
/// A busy worker has many requests in progress at once (three buffers each: the request,
/// the forwarded head, the answer; two field lists): 50 connections kept ~150 buffers
/// out, and with room for only 64 spares every request freed and allocated a buffer. So
/// the pool keeps what the load needs, up to [`MAX_SPARE`], and [`Spares::trim`] (run by
/// the worker once a second under load, at once after a quiet quarter second:
/// [`Spares::tick`]) frees the spares that were not needed, down to [`MIN_SPARE`]: a
/// burst's go back when it is over, a steady load keeps its own without allocating.
#[derive(Debug)]
pub struct Spares<T> {
    spare: RefCell<Vec<T>>,
    /// The fewest spares there were since the last trim: that many were not needed.
    unused: Cell<usize>,
    /// Ticks since the last trim (see [`TICKS_PER_TRIM`]).
    ticks: Cell<u32>,
    /// Whether a spare was taken since the last tick.
    taken: Cell<bool>,
}

impl<T> Default for Spares<T> {
    fn default() -> Self {
        Self {
            spare: RefCell::new(Vec::new()),
            unused: Cell::new(0),
            ticks: Cell::new(0),
            taken: Cell::new(false),
        }
    }
}

/// A worker's spare buffers.
pub type Buffers = Spares<Vec<u8>>;

/// How often a worker ticks ([`Spares::tick`]).
pub const TRIM_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

/// Ticks between two trims while spares are being taken: a spare is freed when no
/// moment of a whole second needed it. Trimming on every tick (250 ms) freed, under a
/// load that swings from one quarter second to the next (200 shoppers on 2 cores), what
/// the next quarter took again: 0.012 allocations per request in `cargo bench --bench
/// allocations`. A quarter second in which nothing was taken trims at once.
const TICKS_PER_TRIM: u32 = 4;

impl<T: Spare> Spares<T> {
    /// An empty one: a spare, else a fresh one.
    pub fn take(&self) -> T {
        self.pop().unwrap_or_else(T::fresh)
    }

    /// Gives one back (emptied; dropped if not worth keeping).
    pub fn give(&self, mut it: T) {
        if it.reset() {
            self.push(it);
        }
    }
}

impl<T> Spares<T> {
    /// A spare, if there is one.
    fn pop(&self) -> Option<T> {
        let mut spare = self.spare.borrow_mut();
        let got = spare.pop();
        self.unused.set(self.unused.get().min(spare.len()));
        self.taken.set(true);
        got
    }

    /// Keeps `it` as a spare, unless [`MAX_SPARE`] are kept already.
    fn push(&self, it: T) {
        let mut spare = self.spare.borrow_mut();
        if spare.len() < MAX_SPARE {
            spare.push(it);
        }
    }

    /// The worker's tick: every [`TICKS_PER_TRIM`]th one trims, and so does one after a
    /// quarter second in which nothing was taken (the rush is over: what it left spare
    /// goes back at once, as it did with a trim every tick).
    pub fn tick(&self) {
        let ticks = self.ticks.get() + 1;
        if !self.taken.replace(false) {
            // Nothing was needed for a quarter second: every spare above the floor goes.
            self.unused.set(self.spare.borrow().len());
        } else if ticks < TICKS_PER_TRIM {
            self.ticks.set(ticks);
            return;
        }
        self.ticks.set(0);
        self.trim();
    }

    /// Frees the spares no request needed since the last trim (keeping [`MIN_SPARE`]).
    pub fn trim(&self) {
        let mut spare = self.spare.borrow_mut();
        let keep = (spare.len() - self.unused.get().min(spare.len())).max(MIN_SPARE);
        if spare.len() > keep {
            spare.truncate(keep);
            spare.shrink_to(MIN_SPARE);
        }
        self.unused.set(spare.len());
    }

    /// Spares now.
    #[cfg(test)]
    pub fn spares(&self) -> usize {
        self.spare.borrow().len()
    }
}

/// A pooled buffer that goes back to its pool when dropped: a request body, which lives
/// through many branches of an exchange.
pub struct Pooled<'a> {
    pool: &'a Buffers,
    buf: Vec<u8>,
}

impl Buffers {
    pub fn take_pooled(&self) -> Pooled<'_> {
        Pooled {
            pool: self,
            buf: self.take(),
        }
    }
}

impl std::ops::Deref for Pooled<'_> {
    type Target = Vec<u8>;

    fn deref(&self) -> &Vec<u8> {
        &self.buf
    }
}

impl std::ops::DerefMut for Pooled<'_> {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buf));
    }
}

/// A worker's spare slots for requests' work: a future's memory, reused. A connection's
/// task would otherwise be sized for its largest state, a request's work, for as long
/// as the connection lives; run in a slot, that memory belongs to the connection only
/// while one of its requests is in progress, and comes from the pool without an
/// allocation. One list per future type (a worker has one per transport), kept and
/// trimmed like the buffers ([`Spares`]): a worker with 1,000 requests in progress (slow
/// blades on a sales morning) takes its slots from the pool too, and gives the memory
/// back a second or two after the rush. (Kept to 256 per kind before, never trimmed:
/// past 256 requests in progress every request allocated its slot, and a burst's 256
/// stayed for good.)
///
/// A list of lists, looked up by scanning: there are one or two kinds, and hashing a
/// `TypeId` for each request cost more than the scan.
#[derive(Default)]
pub struct Slots {
    spare: RefCell<Vec<(TypeId, SpareSlots)>>,
}

/// One kind's spare slots (each a `Box<Slot<F>>` for that kind's `F`).
type SpareSlots = Spares<Box<dyn Any>>;

/// A slot: a pinned place for one future of type `F`, empty between uses.
type Slot<F> = Pin<Box<Option<F>>>;

impl Slots {
    /// Runs the future `make` makes to completion in a slot of the pool. Not an `async
    /// fn`: that would keep the future in its own state, inline in the caller's, which is
    /// what slots avoid. Takes a maker rather than the future: a future is sized for its
    /// largest state (kilobytes), and one made first and then handed over was copied
    /// whole twice per request on its way into the slot; made where it is stored, only
    /// its few words of arguments are written.
    #[inline(always)]
    pub fn run<F: Future + 'static>(&self, make: impl FnOnce() -> F) -> InSlot<'_, F> {
        let mut slot = self.take::<F>();
        Pin::as_mut(&mut *slot).set(Some(make()));
        InSlot {
            slots: self,
            slot: Some(slot),
        }
    }

    fn take<F: 'static>(&self) -> Box<Slot<F>> {
        let spare = self.with_kind::<F, _>(Spares::pop);
        match spare.map(|s| s.downcast::<Slot<F>>()) {
            Some(Ok(slot)) => slot,
            _ => Box::new(Box::pin(None)),
        }
    }

    fn give<F: 'static>(&self, slot: Box<Slot<F>>) {
        self.with_kind::<F, _>(|list| list.push(slot));
    }

    /// `f` on the spares of `F`'s kind, made on first use (so that the takes of a first
    /// rush count towards its trim too).
    fn with_kind<F: 'static, R>(&self, f: impl FnOnce(&SpareSlots) -> R) -> R {
        let kind = TypeId::of::<F>();
        let mut spare = self.spare.borrow_mut();
        let at = match spare.iter().position(|(k, _)| *k == kind) {
            Some(at) => at,
            None => {
                spare.push((kind, Spares::default()));
                spare.len() - 1
            }
        };
        f(&spare[at].1)
    }

    /// The worker's tick (see [`Spares::tick`]), for each kind.
    pub fn tick(&self) {
        for (_, list) in self.spare.borrow().iter() {
            list.tick();
        }
    }
}

/// A future running in a slot; the slot goes back to the pool when it completes.
pub struct InSlot<'a, F: 'static> {
    slots: &'a Slots,
    slot: Option<Box<Slot<F>>>,
}

impl<F: Future + 'static> Future for InSlot<'_, F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        let Some(slot) = this.slot.as_mut() else {
            // Polled after completion: nothing more comes.
            return Poll::Pending;
        };
        let Some(fut) = Pin::as_mut(&mut **slot).as_pin_mut() else {
            return Poll::Pending;
        };
        let out = std::task::ready!(fut.poll(cx));
        if let Some(mut slot) = this.slot.take() {
            // Dropped in place, and the emptied slot goes back.
            Pin::as_mut(&mut *slot).set(None);
            this.slots.give(slot);
        }
        Poll::Ready(out)
    }
}

impl std::fmt::Debug for Slots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slots").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_emptied_and_grown_ones_are_not_kept() {
        let pool = Buffers::default();
        let mut a = pool.take();
        a.extend_from_slice(b"GET /");
        let ptr = a.as_ptr();
        pool.give(a);
        let b = pool.take();
        assert!(b.is_empty());
        assert_eq!(b.as_ptr(), ptr, "the same allocation, reused");
        let mut big = Vec::with_capacity(BUFFER_BYTES);
        big.resize(BUFFER_BYTES + 1, 0);
        pool.give(big);
        pool.give(b);
        assert_eq!(pool.spare.borrow().len(), 1);
    }

    /// A steady load keeps the buffers it uses (no allocation per request); what a burst
    /// left is freed once an interval passes without it being needed.
    #[test]
    fn slots_follow_the_load_like_buffers() {
        let slots = Slots::default();
        let spare =
            |slots: &Slots| -> usize { slots.spare.borrow().iter().map(|(_, l)| l.spares()).sum() };
        let rush: Vec<_> = (0..600).map(|_| slots.take::<[u8; 64]>()).collect();
        rush.into_iter().for_each(|s| slots.give(s));
        assert_eq!(spare(&slots), 600, "more than the old cap of 256 kept");
        slots.tick();
        assert_eq!(spare(&slots), 600, "needed within the last quarter: kept");
        slots.tick();
        assert_eq!(
            spare(&slots),
            MIN_SPARE,
            "a quiet quarter: freed to the floor"
        );
    }

    #[test]
    fn a_busy_pool_trims_once_a_second_and_a_quiet_one_at_once() {
        let pool = Buffers::default();
        let burst: Vec<_> = (0..300).map(|_| pool.take()).collect();
        burst.into_iter().for_each(|b| pool.give(b));
        // A light load: one buffer taken and given back each quarter second.
        let quarter = |pool: &Buffers| {
            let b = pool.take();
            pool.give(b);
            pool.tick();
        };
        pool.tick();
        for _ in 1..TICKS_PER_TRIM {
            quarter(&pool);
            assert_eq!(pool.spares(), 300, "within the second of the burst: kept");
        }
        for _ in 0..TICKS_PER_TRIM - 1 {
            quarter(&pool);
            assert_eq!(pool.spares(), 300, "busy: trimmed only once a second");
        }
        quarter(&pool);
        assert_eq!(pool.spares(), MIN_SPARE, "a second of light load: freed");
        let burst: Vec<_> = (0..300).map(|_| pool.take()).collect();
        burst.into_iter().for_each(|b| pool.give(b));
        pool.tick();
        assert_eq!(pool.spares(), 300, "the quarter of the burst: kept");
        pool.tick();
        assert_eq!(pool.spares(), MIN_SPARE, "a quiet quarter: freed at once");
    }

    #[test]
    fn the_spares_follow_the_load() {
        let pool = Buffers::default();
        let burst: Vec<_> = (0..300).map(|_| pool.take()).collect();
        burst.into_iter().for_each(|b| pool.give(b));
        pool.trim();
        assert_eq!(pool.spares(), 300, "needed during this interval: kept");
        for _ in 0..3 {
            let load: Vec<_> = (0..150).map(|_| pool.take()).collect();
            load.into_iter().for_each(|b| pool.give(b));
            pool.trim();
            assert_eq!(pool.spares(), 150, "what the steady load uses stays");
        }
        pool.trim();
        assert_eq!(
            pool.spares(),
            MIN_SPARE,
            "a quiet interval frees all but the floor"
        );
        let over: Vec<_> = (0..MAX_SPARE + 10).map(|_| pool.take()).collect();
        over.into_iter().for_each(|b| pool.give(b));
        assert_eq!(pool.spares(), MAX_SPARE);
    }

    /// The same slot serves one request after another, and a request's state is dropped
    /// when it completes (what it held, such as a blade connection, is given back then).
    #[test]
    fn a_slot_is_reused_and_its_future_dropped_once_done() {
        let slots = Slots::default();
        let held = std::rc::Rc::new(());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let work = |n: u32, held: std::rc::Rc<()>| async move {
            tokio::task::yield_now().await;
            drop(held);
            n * 2
        };
        let first = runtime.block_on(slots.run(|| work(1, held.clone())));
        assert_eq!(first, 2);
        assert_eq!(std::rc::Rc::strong_count(&held), 1, "dropped on completion");
        let place = |slots: &Slots| {
            let mut at = Vec::new();
            for (_, list) in slots.spare.borrow().iter() {
                for b in list.spare.borrow().iter() {
                    at.push(std::ptr::from_ref::<dyn Any>(&**b).cast::<u8>() as usize);
                }
            }
            at
        };
        let before = place(&slots);
        assert_eq!(before.len(), 1);
        assert_eq!(runtime.block_on(slots.run(|| work(21, held.clone()))), 42);
        assert_eq!(place(&slots), before, "the same slot again");
    }
}
