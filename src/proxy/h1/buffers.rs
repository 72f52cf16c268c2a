//! A worker's spare buffers. A connection takes one when bytes arrive and gives it back
//! when its request is done, so an idle keep-alive connection holds none (nginx and
//! HAProxy do the same): memory follows the requests in progress, not the connections.

use std::cell::RefCell;

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
}
