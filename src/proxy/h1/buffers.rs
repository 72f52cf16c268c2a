//! A worker's spare buffers. A connection takes one when bytes arrive and gives it back
//! when its request is done, so an idle keep-alive connection holds none (nginx and
//! HAProxy do the same): memory follows the requests in progress, not the connections.

use std::any::{Any, TypeId};
use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

/// Capacity of a pooled buffer: a usual request or response head and a good slice of a
/// body. Heads larger than this grow their buffer (up to `proxy.max_header_bytes`); grown
/// buffers are not kept.
pub const BUFFER_BYTES: usize = 16 * 1024;

/// Spare buffers kept per worker; more are freed. A burst of requests in progress at
/// once takes many buffers; keeping them all afterwards would make the burst's peak the
/// worker's memory for good. 64 (1 MiB) covers the requests a worker has in progress at
/// once on an ordinary day.
const MAX_SPARE: usize = 64;

/// One worker's spare buffers (single-threaded, like everything of a worker).
#[derive(Debug, Default)]
pub struct Buffers {
    spare: RefCell<Vec<Vec<u8>>>,
}

impl Buffers {
    /// An empty buffer of [`BUFFER_BYTES`] capacity.
    pub fn take(&self) -> Vec<u8> {
        self.spare
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(BUFFER_BYTES))
    }

    /// Gives a buffer back (emptied).
    pub fn give(&self, mut buf: Vec<u8>) {
        if buf.capacity() != BUFFER_BYTES {
            return;
        }
        buf.clear();
        let mut spare = self.spare.borrow_mut();
        if spare.len() < MAX_SPARE {
            spare.push(buf);
        }
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

/// Slots kept per worker and kind of connection (plain, TLS); more are freed.
const MAX_SPARE_SLOTS: usize = 256;

/// A worker's spare slots for requests' work: a future's memory, reused. A connection's
/// task would otherwise be sized for its largest state, a request's work, for as long
/// as the connection lives; run in a slot, that memory belongs to the connection only
/// while one of its requests is in progress, and comes from the pool without an
/// allocation. One list per future type (a worker has one per transport).
#[derive(Default)]
pub struct Slots {
    spare: RefCell<HashMap<TypeId, Vec<Box<dyn Any>>>>,
}

/// A slot: a pinned place for one future of type `F`, empty between uses.
type Slot<F> = Pin<Box<Option<F>>>;

impl Slots {
    /// Runs `fut` to completion in a slot of the pool. Not an `async fn`: that would keep
    /// `fut` itself in its own state, inline in the caller's, which is what slots avoid.
    pub fn run<F: Future + 'static>(&self, fut: F) -> InSlot<'_, F> {
        let mut slot = self.take::<F>();
        Pin::as_mut(&mut *slot).set(Some(fut));
        InSlot {
            slots: self,
            slot: Some(slot),
        }
    }

    fn take<F: 'static>(&self) -> Box<Slot<F>> {
        let spare = self
            .spare
            .borrow_mut()
            .get_mut(&TypeId::of::<F>())
            .and_then(Vec::pop);
        match spare.map(|s| s.downcast::<Slot<F>>()) {
            Some(Ok(slot)) => slot,
            _ => Box::new(Box::pin(None)),
        }
    }

    fn give<F: 'static>(&self, slot: Box<Slot<F>>) {
        let mut spare = self.spare.borrow_mut();
        let list = spare.entry(TypeId::of::<F>()).or_default();
        if list.len() < MAX_SPARE_SLOTS {
            list.push(slot);
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
        let first = runtime.block_on(slots.run(work(1, held.clone())));
        assert_eq!(first, 2);
        assert_eq!(std::rc::Rc::strong_count(&held), 1, "dropped on completion");
        let place = |slots: &Slots| {
            slots
                .spare
                .borrow()
                .values()
                .flatten()
                .map(|b| std::ptr::from_ref::<dyn Any>(&**b).cast::<u8>() as usize)
                .collect::<Vec<_>>()
        };
        let before = place(&slots);
        assert_eq!(before.len(), 1);
        assert_eq!(runtime.block_on(slots.run(work(21, held.clone()))), 42);
        assert_eq!(place(&slots), before, "the same slot again");
    }
}
