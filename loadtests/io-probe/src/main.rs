//! The same byte relay on two I/O interfaces, to measure what moving a proxy from epoll
//! onto io_uring would change in its CPU per request (issue 18 asks for the figure before
//! io_uring is adopted).
//!
//! Each shopper's connection gets its own connection to the one blade, and bytes are
//! relayed both ways as they come: with HTTP/1.1 keep-alive that is a proxy without any
//! HTTP work, so what is left is the cost of the I/O interface and the kernel's TCP work.
//! Both modes do the same TCP work (the same reads and writes of the same sizes); only
//! how they are asked for differs:
//! - `epoll`: edge-triggered readiness and non-blocking `recv`/`send`, the way nginx and
//!   surge's engine (through tokio) work: one system call per read or write, and an
//!   `epoll_wait` per batch of readiness.
//! - `uring`: a `recv` always queued on each socket and a `send` queued as soon as a
//!   `recv` completes, everything submitted and reaped in one `io_uring_enter` per turn
//!   (single issuer, deferred task work: the kernel runs the completions when the
//!   process enters, not in interrupts).
//!
//! Usage: `surge-io-probe epoll|uring LISTEN UPSTREAM`, e.g.
//! `surge-io-probe uring 127.0.0.1:8080 127.0.0.1:9000`. One thread, like one worker.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};

/// Each direction's buffer: as large as surge's engine uses for a head or a relay.
const BUF: usize = 16 * 1024;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = || -> ! {
        eprintln!("usage: surge-io-probe epoll|uring LISTEN UPSTREAM");
        std::process::exit(2)
    };
    if args.len() != 4 {
        usage()
    }
    let (Ok(listen), Ok(upstream)) = (args[2].parse::<SocketAddr>(), args[3].parse()) else {
        usage()
    };
    let result = TcpListener::bind(listen).and_then(|listener| match args[1].as_str() {
        "epoll" => epoll::run(listener, upstream),
        "uring" => uring::run(listener, upstream),
        _ => usage(),
    });
    if let Err(e) = result {
        eprintln!("surge-io-probe: {e}");
        std::process::exit(1)
    }
}

/// A new connection to the blade for a newly accepted shopper, or None (the shopper's
/// socket closed) when the blade cannot be reached. Blocking: on loopback it takes
/// microseconds, and the probe measures kept-alive connections, not their set-up.
fn blade_for(shopper: RawFd, upstream: SocketAddr) -> Option<RawFd> {
    set_nodelay(shopper);
    match TcpStream::connect(upstream).and_then(|s| s.set_nodelay(true).map(|()| s)) {
        Ok(stream) => Some(stream.into_raw_fd()),
        Err(e) => {
            eprintln!("surge-io-probe: connect to {upstream}: {e}");
            close(shopper);
            None
        }
    }
}

/// `TCP_NODELAY` on an accepted socket, as every proxy measured here sets it.
fn set_nodelay(fd: RawFd) {
    let on: libc::c_int = 1;
    // SAFETY: a valid option pointer and length for an int option.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

fn close(fd: RawFd) {
    // SAFETY: the caller owns fd and does not use it again.
    unsafe { libc::close(fd) };
}

mod epoll {
    use super::*;

    const LISTENER: u64 = u64::MAX;
    /// A shopper that does not read its answers is cut off past this many bytes queued.
    const MAX_PENDING: usize = 4 << 20;

    /// A shopper's connection (side 0) and its blade connection (side 1).
    struct Pair {
        fds: [RawFd; 2],
        /// Bytes waiting to be written to `fds[i]` when it becomes writable again.
        pending: [Vec<u8>; 2],
    }

    pub fn run(listener: TcpListener, upstream: SocketAddr) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        // SAFETY: plain system calls; every result is checked.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(io::Error::last_os_error());
        }
        register(ep, listener.as_raw_fd(), libc::EPOLLIN as u32, LISTENER)?;
        let mut pairs: Vec<Option<Pair>> = Vec::new();
        let mut free: Vec<usize> = Vec::new();
        let mut closed: Vec<usize> = Vec::new();
        let mut buf = vec![0u8; BUF];
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
        loop {
            // SAFETY: events is a valid array of its length.
            let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, -1) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for ev in &events[..n as usize] {
                let (flags, token) = (ev.events, ev.u64);
                if token == LISTENER {
                    accept_all(ep, &listener, upstream, &mut pairs, &mut free);
                    continue;
                }
                let (idx, side) = ((token >> 1) as usize, (token & 1) as usize);
                let Some(pair) = pairs.get_mut(idx).and_then(Option::as_mut) else {
                    continue;
                };
                if !service(pair, side, flags, &mut buf) {
                    close(pair.fds[0]);
                    close(pair.fds[1]);
                    pairs[idx] = None;
                    closed.push(idx);
                }
            }
            // Slots are reused only after the batch: a later event of the batch may
            // still name a pair closed earlier in it.
            free.append(&mut closed);
        }
    }

    fn register(ep: RawFd, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: ev is a valid event for the call's duration.
        if unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn accept_all(
        ep: RawFd,
        listener: &TcpListener,
        upstream: SocketAddr,
        pairs: &mut Vec<Option<Pair>>,
        free: &mut Vec<usize>,
    ) {
        loop {
            // SAFETY: no address is asked for.
            let fd = unsafe {
                libc::accept4(
                    listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::WouldBlock {
                    eprintln!("surge-io-probe: accept: {e}");
                }
                return;
            }
            let Some(blade) = blade_for(fd, upstream) else {
                continue;
            };
            // SAFETY: blade is our open socket.
            unsafe {
                let fl = libc::fcntl(blade, libc::F_GETFL);
                libc::fcntl(blade, libc::F_SETFL, fl | libc::O_NONBLOCK);
            }
            let idx = free.pop().unwrap_or_else(|| {
                pairs.push(None);
                pairs.len() - 1
            });
            pairs[idx] = Some(Pair {
                fds: [fd, blade],
                pending: [Vec::new(), Vec::new()],
            });
            let interest =
                (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
            for (side, sock) in [fd, blade].into_iter().enumerate() {
                if let Err(e) = register(ep, sock, interest, ((idx as u64) << 1) | side as u64) {
                    eprintln!("surge-io-probe: epoll_ctl: {e}");
                }
            }
        }
    }

    /// Handles readiness on `pair.fds[side]`; false when the pair is to be closed.
    fn service(pair: &mut Pair, side: usize, flags: u32, buf: &mut [u8]) -> bool {
        let other = 1 - side;
        if flags & libc::EPOLLOUT as u32 != 0
            && !pair.pending[side].is_empty()
            && !flush(pair.fds[side], &mut pair.pending[side])
        {
            return false;
        }
        let readable = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
        if flags & readable == 0 {
            return true;
        }
        // A read shorter than the buffer emptied the socket, so the next bytes bring a
        // new edge (nginx relies on the same); only a closing peer is read to the end.
        let until_end = flags & (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0;
        loop {
            // SAFETY: buf is valid for its length.
            let n = unsafe { libc::recv(pair.fds[side], buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n == 0 {
                return false;
            }
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => return true,
                    io::ErrorKind::Interrupted => continue,
                    _ => return false,
                }
            }
            let n = n as usize;
            if !forward(pair.fds[other], &mut pair.pending[other], &buf[..n]) {
                return false;
            }
            if n < buf.len() && !until_end {
                return true;
            }
        }
    }

    /// Writes `data` to `fd` now, or queues what the socket did not take.
    fn forward(fd: RawFd, pending: &mut Vec<u8>, data: &[u8]) -> bool {
        if !pending.is_empty() {
            pending.extend_from_slice(data);
            return pending.len() <= MAX_PENDING;
        }
        let Some(at) = send_some(fd, data) else {
            return false;
        };
        pending.extend_from_slice(&data[at..]);
        true
    }

    /// Writes queued bytes once the socket is writable again.
    fn flush(fd: RawFd, pending: &mut Vec<u8>) -> bool {
        let Some(at) = send_some(fd, pending) else {
            return false;
        };
        pending.drain(..at);
        true
    }

    /// Sends as much of `data` as the socket takes now: how many bytes it took, or None
    /// when the connection failed.
    fn send_some(fd: RawFd, data: &[u8]) -> Option<usize> {
        let mut at = 0;
        while at < data.len() {
            // SAFETY: the slice is valid for its length.
            let w = unsafe {
                libc::send(
                    fd,
                    data[at..].as_ptr().cast(),
                    data.len() - at,
                    libc::MSG_NOSIGNAL,
                )
            };
            if w < 0 {
                match io::Error::last_os_error().kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => break,
                    _ => return None,
                }
            }
            at += w as usize;
        }
        Some(at)
    }
}

mod uring {
    use super::*;
    use io_uring::{cqueue, opcode, squeue, types, IoUring, SubmissionQueue, Submitter};

    const ACCEPT: u64 = u64::MAX;
    const RECV: u64 = 0;
    const SEND: u64 = 1;

    /// A shopper's connection (side 0) and its blade connection (side 1).
    struct Pair {
        fds: [RawFd; 2],
        /// `bufs[s]` holds what was received from `fds[s]`, until it is sent on.
        bufs: [Box<[u8]>; 2],
        len: [usize; 2],
        sent: [usize; 2],
        /// Operations queued in the kernel that name this pair's sockets and buffers:
        /// the pair (and its buffers) is freed only when none is left.
        inflight: u32,
        closing: bool,
    }

    fn data(idx: usize, side: usize, op: u64) -> u64 {
        ((idx as u64) << 2) | ((side as u64) << 1) | op
    }

    pub fn run(listener: TcpListener, upstream: SocketAddr) -> io::Result<()> {
        let mut ring: IoUring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_coop_taskrun()
            .build(4096)?;
        let (submitter, mut sq, mut cq) = ring.split();
        let accept = opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
            .build()
            .user_data(ACCEPT);
        push(&submitter, &mut sq, accept.clone())?;
        let mut pairs: Vec<Option<Pair>> = Vec::new();
        let mut free: Vec<usize> = Vec::new();
        loop {
            sq.sync();
            if let Err(e) = submitter.submit_and_wait(1) {
                if !matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) {
                    return Err(e);
                }
            }
            cq.sync();
            for cqe in &mut cq {
                let (res, tag) = (cqe.result(), cqe.user_data());
                if tag == ACCEPT {
                    if res >= 0 {
                        let idx = open(res, upstream, &mut pairs, &mut free);
                        if let Some(idx) = idx {
                            for side in 0..2 {
                                let e = recv(&mut pairs, idx, side);
                                push(&submitter, &mut sq, e)?;
                            }
                        }
                    } else {
                        eprintln!(
                            "surge-io-probe: accept: {}",
                            io::Error::from_raw_os_error(-res)
                        );
                    }
                    if !cqueue::more(cqe.flags()) {
                        push(&submitter, &mut sq, accept.clone())?;
                    }
                    continue;
                }
                let (idx, side, op) = ((tag >> 2) as usize, ((tag >> 1) & 1) as usize, tag & 1);
                let Some(pair) = pairs.get_mut(idx).and_then(Option::as_mut) else {
                    continue;
                };
                pair.inflight -= 1;
                if pair.closing || res <= 0 {
                    begin_close(pair);
                    if pair.inflight == 0 {
                        close(pair.fds[0]);
                        close(pair.fds[1]);
                        pairs[idx] = None;
                        free.push(idx);
                    }
                    continue;
                }
                let next = if op == RECV {
                    pair.len[side] = res as usize;
                    pair.sent[side] = 0;
                    send(&mut pairs, idx, side)
                } else {
                    pair.sent[side] += res as usize;
                    if pair.sent[side] < pair.len[side] {
                        send(&mut pairs, idx, side)
                    } else {
                        recv(&mut pairs, idx, side)
                    }
                };
                push(&submitter, &mut sq, next)?;
            }
        }
    }

    /// A new pair for an accepted shopper, or None when the blade cannot be reached.
    fn open(
        fd: RawFd,
        upstream: SocketAddr,
        pairs: &mut Vec<Option<Pair>>,
        free: &mut Vec<usize>,
    ) -> Option<usize> {
        let blade = blade_for(fd, upstream)?;
        let idx = free.pop().unwrap_or_else(|| {
            pairs.push(None);
            pairs.len() - 1
        });
        pairs[idx] = Some(Pair {
            fds: [fd, blade],
            bufs: [
                vec![0; BUF].into_boxed_slice(),
                vec![0; BUF].into_boxed_slice(),
            ],
            len: [0; 2],
            sent: [0; 2],
            inflight: 0,
            closing: false,
        });
        Some(idx)
    }

    /// A receive on `fds[side]` into `bufs[side]`.
    fn recv(pairs: &mut [Option<Pair>], idx: usize, side: usize) -> squeue::Entry {
        let pair = pairs[idx].as_mut().expect("a live pair");
        pair.inflight += 1;
        let buf = &mut pair.bufs[side];
        opcode::Recv::new(
            types::Fd(pair.fds[side]),
            buf.as_mut_ptr(),
            buf.len() as u32,
        )
        .build()
        .user_data(data(idx, side, RECV))
    }

    /// A send of what is left of `bufs[side]` to the other socket.
    fn send(pairs: &mut [Option<Pair>], idx: usize, side: usize) -> squeue::Entry {
        let pair = pairs[idx].as_mut().expect("a live pair");
        pair.inflight += 1;
        let rest = &pair.bufs[side][pair.sent[side]..pair.len[side]];
        opcode::Send::new(
            types::Fd(pair.fds[1 - side]),
            rest.as_ptr(),
            rest.len() as u32,
        )
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data(data(idx, side, SEND))
    }

    /// Shuts both sockets down so that the operations still queued on them complete.
    fn begin_close(pair: &mut Pair) {
        if !pair.closing {
            pair.closing = true;
            for fd in pair.fds {
                // SAFETY: fd is the pair's open socket.
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            }
        }
    }

    fn push(
        submitter: &Submitter<'_>,
        sq: &mut SubmissionQueue<'_>,
        entry: squeue::Entry,
    ) -> io::Result<()> {
        // SAFETY: every buffer an entry names lives in a pair that is freed only after
        // all of its operations have completed.
        unsafe {
            if sq.push(&entry).is_ok() {
                return Ok(());
            }
            sq.sync();
            submitter.submit()?;
            sq.sync();
            sq.push(&entry)
                .map_err(|_| io::Error::other("the submission queue stays full"))
        }
    }
}
