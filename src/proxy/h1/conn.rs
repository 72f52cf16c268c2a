//! One shopper connection on the HTTP/1.1 engine: wait for bytes holding no buffer, read
//! and check a head, read the body whole when there is one (as the hyper path does), let
//! admission and affinity decide, send the request to a blade (again to another when
//! that is safe), and relay the answer with its own framing. Surge's own answers are the
//! same responses the hyper path gives, written out here.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use crate::proxy::drive::Ticket;
use http::header::HeaderValue;
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::blades::{BladeConn, Blades};
use super::buffers::{Buffers, Pooled, Slots, Spares, BUFFER_BYTES};
use super::chunked::Chunked;
use super::deadline::{self, Deadline};
use super::head::{self, BodyKind, Field, Forwarding, Framing, HeadLimits, RequestHead};
use super::send::send_and_read_head;
use crate::pool::{Backend, InFlight, Outcome, State};
use crate::proxy::admission::Entry;
use crate::proxy::answers::{self, ProxyFailure, Refused};
use crate::proxy::conn_info::ConnInfo;
use crate::proxy::forward::{self, Forwarder};
use crate::proxy::headers::X_REQUEST_ID;
use crate::proxy::transport::Transport;
use crate::proxy::{attempts, retry};
use crate::telemetry::names;

/// How long a connection closed after an error answer is still read from (and the bytes
/// dropped), so the close is a FIN after the answer rather than a reset that can destroy it.
const LINGER: Duration = Duration::from_secs(1);

/// One worker's engine: its forwarder (decisions, pool, limits), buffers and blade
/// connections.
pub struct Engine {
    pub fwd: Rc<Forwarder>,
    pub buffers: Buffers,
    /// Where requests' work runs (see [`serve`]).
    slots: Slots,
    pub blades: Blades,
    /// Seconds since the Unix epoch, refreshed by [`Engine::tick`]: what cookies' and
    /// admission's expiry counts in, without a clock reading per request.
    pub unix_now: std::cell::Cell<u64>,
    /// Spare field lists (offsets of a head's fields), pooled like the buffers: two per
    /// request in progress. (Kept to 64 before, so at 200 connections most requests
    /// allocated and grew their lists: 1.1 allocations per request.)
    fields: Spares<Vec<Field>>,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
    pub limits: HeadLimits,
}

impl Engine {
    pub fn new(fwd: Rc<Forwarder>, blades: Blades, cfg: &crate::config::ProxyConfig) -> Self {
        Self {
            fwd,
            buffers: Buffers::default(),
            slots: Slots::default(),
            blades,
            unix_now: std::cell::Cell::new(unix_seconds()),
            fields: Spares::default(),
            header_read_timeout: cfg.header_read_timeout,
            idle_timeout: cfg.idle_timeout,
            max_header_bytes: cfg.max_header_bytes,
            limits: HeadLimits {
                max_fields: cfg.max_headers,
                max_uri_bytes: cfg.max_uri_bytes,
            },
        }
    }

    /// The worker's housekeeping, every [`super::buffers::TRIM_INTERVAL`]: spare buffers,
    /// field lists and slots trimmed to the load (once a second), the cached wall clock
    /// refreshed.
    pub fn tick(&self) {
        self.buffers.tick();
        self.fields.tick();
        self.slots.tick();
        self.unix_now.set(unix_seconds());
    }

    fn take_fields(&self) -> Vec<Field> {
        self.fields.take()
    }

    fn give_fields(&self, f: Vec<Field>) {
        self.fields.give(f);
    }
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What the connection does after an exchange.
enum After {
    /// Keep it open; the next message starts at this offset of the buffer.
    KeepAlive(usize),
    Close,
    /// Closed with an error answer already written: linger, then close.
    Refused,
}

/// Serves a shopper connection until it closes, idles out or the worker stops.
///
/// Between requests the connection's task holds only its socket and a few words; the
/// work of a request (read the head, exchange, relay: kilobytes of state) runs in one of
/// the worker's pooled slots ([`Slots`]), taken when bytes arrive and given back after.
pub async fn serve<S: Transport + 'static>(
    engine: Rc<Engine>,
    mut io: S,
    info: Rc<ConnInfo>,
    ticket: Ticket,
) {
    // Bytes of the next request already read (pipelined), in their buffer.
    let mut carry: Option<Vec<u8>> = None;
    // The connection's one timer, for every deadline it waits against (see
    // `deadline`): the first request must come within the header timeout of the accept,
    // later ones within the idle timeout, after which a kept-alive connection is closed;
    // a request's waits put their deadlines in `waits`. (The clock is read only when a
    // wait has to wait.)
    let accepted = tokio::time::Instant::now();
    let sleep = tokio::time::sleep_until(accepted + engine.header_read_timeout);
    tokio::pin!(sleep);
    let mut timer = deadline::Timer::new(sleep);
    let waits = Rc::new(Deadline::default());
    let mut first = true;
    loop {
        // A later request's head deadline counts from its first bytes (see `read_head`).
        let head_deadline = first.then(|| accepted + engine.header_read_timeout);
        if carry.is_none() {
            let mut idle_until = first.then_some(accepted + engine.header_read_timeout);
            let woke = poll_fn(|cx| {
                if io.poll_readable(cx).is_ready() {
                    return Poll::Ready(true);
                }
                if ticket.poll_stop(cx).is_ready() {
                    return Poll::Ready(false);
                }
                let until =
                    *idle_until.get_or_insert_with(|| waits.idle_until(engine.idle_timeout));
                timer.poll_until(until, cx).map(|()| false)
            });
            if !woke.await {
                return;
            }
        }
        first = false;
        let mut work = engine.slots.run(|| {
            turn(
                engine.clone(),
                info.clone(),
                waits.clone(),
                io,
                carry.take(),
                head_deadline,
            )
        });
        // The request's work first; then the timer, for the deadline it waits against.
        let done = poll_fn(|cx| loop {
            if let Poll::Ready(done) = Pin::new(&mut work).poll(cx) {
                return Poll::Ready(done);
            }
            if waits.poll_timer(&mut timer, cx).is_pending() {
                return Poll::Pending;
            }
        })
        .await;
        io = done.io;
        match done.next {
            Next::KeepAlive(pipelined) if !ticket.stopping() => {
                carry = pipelined;
            }
            Next::KeepAlive(pipelined) => {
                if let Some(b) = pipelined {
                    engine.buffers.give(b);
                }
                let _ = io.shutdown().await;
                return;
            }
            Next::Closed => return,
        }
    }
}

/// What a connection does after a turn.
enum Next {
    /// Wait for the next request (with the bytes of it already read, if any).
    KeepAlive(Option<Vec<u8>>),
    /// The connection is closed.
    Closed,
}

/// A turn's result: the transport back, and what comes next.
struct Done<S> {
    io: S,
    next: Next,
}

/// One turn of a connection: a head read, its exchange (or refusal), and the buffer's
/// fate. Owns what it uses, so that it can run in a pooled slot.
async fn turn<S: Transport>(
    engine: Rc<Engine>,
    info: Rc<ConnInfo>,
    waits: Rc<Deadline>,
    mut io: S,
    carry: Option<Vec<u8>>,
    head_deadline: Option<tokio::time::Instant>,
) -> Done<S> {
    let mut buf = carry.unwrap_or_else(|| engine.buffers.take());
    let mut fields = engine.take_fields();
    // The blade's answer's fields, as offsets into its buffer (see `head::parse_response`).
    let mut answer_fields = engine.take_fields();
    let after = match read_head(
        &engine,
        &waits,
        &mut io,
        &mut buf,
        &mut fields,
        head_deadline,
    )
    .await
    {
        HeadRead::Head(head) => {
            exchange(
                &engine,
                &waits,
                &mut io,
                &mut buf,
                (&head, &fields),
                &mut answer_fields,
                &info,
            )
            .await
        }
        HeadRead::Refused(why) => {
            write_own(&mut io, answers::refusal(why, &info), &info, false, true).await;
            After::Refused
        }
        HeadRead::Gone => After::Close,
    };
    engine.give_fields(fields);
    engine.give_fields(answer_fields);
    let next = match after {
        After::KeepAlive(next) => {
            buf.drain(..next.min(buf.len()));
            if buf.is_empty() {
                engine.buffers.give(buf);
                Next::KeepAlive(None)
            } else {
                Next::KeepAlive(Some(buf))
            }
        }
        After::Close => {
            engine.buffers.give(buf);
            let _ = io.shutdown().await;
            Next::Closed
        }
        After::Refused => {
            buf.clear();
            linger(&mut io, &mut buf).await;
            engine.buffers.give(buf);
            Next::Closed
        }
    };
    Done { io, next }
}

/// Half-closes and reads (dropping the bytes) for a moment, so the client reads the
/// answer before the close instead of losing it to a reset.
async fn linger<S: Transport>(io: &mut S, buf: &mut Vec<u8>) {
    let _ = tokio::time::timeout(LINGER, async {
        let _ = io.shutdown().await;
        loop {
            buf.clear();
            match io.read_buf(buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
}

enum HeadRead {
    Head(RequestHead),
    Refused(Refused),
    /// The client closed, sent garbage it cannot be answered for, or timed out.
    Gone,
}

/// Reads until a whole head is in `buf` (or a refusal, or the deadline).
async fn read_head<S: Transport>(
    engine: &Engine,
    waits: &Deadline,
    io: &mut S,
    buf: &mut Vec<u8>,
    fields: &mut Vec<Field>,
    mut deadline: Option<tokio::time::Instant>,
) -> HeadRead {
    loop {
        if !buf.is_empty() {
            match head::parse_request(buf, engine.limits, fields) {
                Ok(Some(head)) => return HeadRead::Head(head),
                Ok(None) => {}
                Err(why) => return HeadRead::Refused(why),
            }
            if buf.len() >= engine.max_header_bytes {
                return HeadRead::Refused(Refused::HeadTooLarge);
            }
        }
        if buf.len() == buf.capacity() {
            buf.reserve(BUFFER_BYTES.min(engine.max_header_bytes - buf.len()).max(1));
        }
        let read = waits.within(
            || {
                *deadline
                    .get_or_insert_with(|| tokio::time::Instant::now() + engine.header_read_timeout)
            },
            io.read_buf(buf),
        );
        match read.await {
            Some(Ok(0)) | Some(Err(_)) | None => return HeadRead::Gone,
            Some(Ok(_)) => {}
        }
    }
}

/// Writes one of surge's own answers (a `Response` of the shared answer functions).
async fn write_own<S: Transport>(
    io: &mut S,
    resp: answers::Own,
    info: &ConnInfo,
    head_request: bool,
    close: bool,
) -> bool {
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        if name == http::header::CONNECTION {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(h) = &info.hsts {
        if !parts
            .headers
            .contains_key(http::header::STRICT_TRANSPORT_SECURITY)
        {
            out.extend_from_slice(b"strict-transport-security: ");
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(b"content-length: ");
    head::push_decimal(&mut out, body.len() as u64);
    out.extend_from_slice(b"\r\n");
    let close = close || parts.headers.contains_key(http::header::CONNECTION);
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !head_request {
        out.extend_from_slice(&body);
    }
    io.write_all(&out).await.is_ok() && io.flush().await.is_ok()
}

/// One request and its answer.
async fn exchange<S: Transport>(
    engine: &Engine,
    waits: &Deadline,
    io: &mut S,
    buf: &mut Vec<u8>,
    (head, fields): (&RequestHead, &[Field]),
    answer_fields: &mut Vec<Field>,
    info: &ConnInfo,
) -> After {
    let fwd = &engine.fwd;
    let served = info.requests.get().saturating_add(1);
    info.requests.set(served);
    let head_request = head.method == http::Method::HEAD;
    let rewrite = head::Rewrite {
        head_request,
        hsts: info.hsts.as_ref().map(HeaderValue::as_bytes),
        dechunk: head.http10,
        upgrade: head.upgrade.is_some(),
    };
    // `head.close` holds HTTP/1.0's rule (closed unless it asked `keep-alive`).
    let mut relay_close = head.close
        || served >= fwd.max_requests_per_connection
        || fwd.closing.load(Ordering::Relaxed);
    // HTTP/1.0 keeps its connection only for a blade's answer of known length, told so
    // with `Connection: keep-alive` (RFC 9112 appendix C.2.2; `relay`); surge's own
    // answers close it.
    let close = relay_close || head.http10;
    if let Some(after) = answered_before_body(engine, io, buf, head, info, close).await {
        return after;
    }
    // The body, read whole before any blade is picked (see `Forwarder::read_body`).
    let (body, next, _reserved) = match read_body(engine, io, buf, head).await {
        Ok(b) => b,
        Err(why) => {
            let resp = answers::refusal(why, info);
            log_own(fwd, info, head, buf, &resp, None);
            write_own(io, resp, info, head_request, true).await;
            return After::Refused;
        }
    };
    let start = Instant::now();
    fwd.count_request(info, start);
    let minted = head
        .request_id
        .is_none()
        .then(|| fwd.request_ids.next_raw());
    let request_id: &[u8] = match (&minted, head.request_id) {
        (Some(id), _) => id,
        (None, Some(span)) => span.get(buf),
        (None, None) => b"-",
    };
    let view = head::View { buf, head, fields };
    let unix_now = engine.unix_now.get();
    let request = (&view, request_id, start, unix_now);
    let (entry, waited) = match admit(engine, io, info, request, (close, next)).await {
        Ok(e) => e,
        Err(after) => return after,
    };
    let request = Admitted {
        view: &view,
        info,
        rewrite: &rewrite,
        minted: minted.as_ref().map(|m| &m[..]),
        request_id,
        body: body.as_deref().map(Vec::as_slice),
        start,
        unix_now,
        entry,
        waited,
        next,
        close,
    };
    to_blades(engine, waits, io, request, answer_fields, &mut relay_close).await
}

/// A request let in, its body read, as the engine takes it to blades.
struct Admitted<'a> {
    view: &'a head::View<'a>,
    info: &'a ConnInfo,
    rewrite: &'a head::Rewrite<'a>,
    /// The request id surge made, when the request had none.
    minted: Option<&'a [u8]>,
    request_id: &'a [u8],
    body: Option<&'a [u8]>,
    start: Instant,
    unix_now: u64,
    entry: Entry,
    /// Admission made it wait (the arrival's clock reading is not the first send's).
    waited: bool,
    /// Where the next request starts in the buffer.
    next: usize,
    /// Surge's own answer (a failure) closes the connection.
    close: bool,
}

/// Sends the request to a blade (again to another when that is safe) and relays the
/// answer, or answers the failure; says what becomes of the connection.
async fn to_blades<S: Transport>(
    engine: &Engine,
    waits: &Deadline,
    io: &mut S,
    r: Admitted<'_>,
    answer_fields: &mut Vec<Field>,
    relay_close: &mut bool,
) -> After {
    let (buf, head) = (r.view.buf, r.view.head);
    let (cart, route) = engine.fwd.affinity_in(r.view, r.unix_now);
    let mut out = engine.buffers.take();
    let mut rbuf = engine.buffers.take();
    let outgoing = Outgoing {
        view: r.view,
        info: r.info,
        minted: r.minted,
        body: r.body,
        rewrite: r.rewrite,
        start: r.start,
        // This clock reading serves as the first send's too when nothing waited between.
        fresh: (!r.waited).then_some(r.start),
    };
    let target = attempts::Target {
        sticky_key: cart.map(str::as_bytes),
        route: route.as_ref().map(|r| r.backend),
        now_ns: crate::pool::nanos_since_epoch(r.start),
    };
    let buffers = (&mut out, &mut rbuf);
    let answered = send(engine, waits, io, outgoing, target, buffers, answer_fields).await;
    let (guard, (conn, answer, answered_at)) = match answered {
        Ok(a) => a,
        Err(failure) => {
            engine.buffers.give(out);
            engine.buffers.give(rbuf);
            let request = (r.info, head, buf, r.request_id);
            let after = (r.rewrite.head_request, r.close, r.next);
            return answer_failure(engine, io, failure, request, r.start, after).await;
        }
    };
    let relay_of = Relay {
        guard,
        conn,
        rbuf,
        answer,
        answered_at,
        answer_fields,
        rewrite: r.rewrite,
        out,
        entry: r.entry,
        route,
        had_cart: cart.is_some(),
        request_id: r.request_id,
        info: r.info,
        head,
        path: head.path.get(buf),
        started: r.start,
        unix_now: r.unix_now,
        close: relay_close,
    };
    match relay(engine, waits, io, relay_of).await {
        RelayEnd::Done if !*relay_close => After::KeepAlive(r.next),
        RelayEnd::Done | RelayEnd::Cut => After::Close,
        RelayEnd::Tunnel(mut conn) => {
            tunnel(engine, io, &mut conn, &buf[r.next.min(buf.len())..]).await;
            After::Close
        }
    }
}

/// Surge's own answers that come before the body is read: the redirect of a plain
/// listener set to HTTPS, and the per-address request rate's 429. `None`: neither.
async fn answered_before_body<S: Transport>(
    engine: &Engine,
    io: &mut S,
    buf: &[u8],
    head: &RequestHead,
    info: &ConnInfo,
    close: bool,
) -> Option<After> {
    let fwd = &engine.fwd;
    let resp = if let Some(origin) = &info.redirect_https {
        let target = head.target.map_or(&b"/"[..], |t| t.get(buf));
        let req = http::Request::builder()
            .uri(std::str::from_utf8(target).unwrap_or("/"))
            .body(())
            .unwrap_or_default();
        answers::redirect(origin, &req)
    } else if !fwd.limits.allow_request(info.peer.ip()) {
        let resp = answers::refusal(Refused::RateLimited, info);
        log_own(fwd, info, head, buf, &resp, None);
        resp
    } else {
        return None;
    };
    // The body is not read: the connection cannot carry another request.
    let close = close || head.framing != Framing::Empty;
    let head_request = head.method == http::Method::HEAD;
    if !write_own(io, resp, info, head_request, close).await || close {
        return Some(After::Close);
    }
    Some(After::KeepAlive(head.len))
}

/// Admission (shedding, the waiting room), only when the pool sheds or has a waiting
/// room (its answers need the id as a header value, which costs an allocation). The
/// entry and whether the request waited for it; or what became of the connection after
/// surge's own answer.
async fn admit<S: Transport>(
    engine: &Engine,
    io: &mut S,
    info: &ConnInfo,
    (view, request_id, start, unix_now): (&head::View<'_>, &[u8], Instant, u64),
    (close, next): (bool, usize),
) -> Result<(Entry, bool), After> {
    let fwd = &engine.fwd;
    if fwd.pool.settings().shed.is_none() && fwd.queue_signer.is_none() {
        return Ok((Entry::default(), false));
    }
    let id = HeaderValue::from_bytes(request_id).unwrap_or(HeaderValue::from_static("-"));
    let resp = match fwd.enter(view, info, &id, unix_now).await {
        Ok(entry) => return Ok((entry, true)),
        Err(resp) => resp,
    };
    let head = view.head;
    log_own(fwd, info, head, view.buf, &resp, Some(start));
    // Surge's answer may ask to close (a waiting page: its holder is back in seconds, and
    // an idle connection per waiting visitor is not kept).
    let asks_close = resp.headers().contains_key(http::header::CONNECTION);
    let close = close || asks_close || !matches!(head.framing, Framing::Empty | Framing::Length(_));
    let head_request = head.method == http::Method::HEAD;
    if !write_own(io, resp, info, head_request, close).await || close {
        return Err(After::Close);
    }
    Err(After::KeepAlive(next))
}

/// A request as the engine sends it to blades.
struct Outgoing<'a> {
    view: &'a head::View<'a>,
    info: &'a ConnInfo,
    /// The request id surge made, when the request had none.
    minted: Option<&'a [u8]>,
    body: Option<&'a [u8]>,
    rewrite: &'a head::Rewrite<'a>,
    start: Instant,
    /// The request's arrival, when nothing waited since: the first send's clock too.
    fresh: Option<Instant>,
}

/// Sends the request to blades through [`attempts::run`]: its head written for each
/// blade (the `Host` an HTTP/1.0 request lacks is the blade's), the answer's head read
/// into `rbuf` with its fields in `answer_fields`; interim answers go on to the shopper.
///
/// Not an `async fn`: it returns the retry loop's own future, one level of future less
/// to build and move on every request.
fn send<'a, S: Transport>(
    engine: &'a Engine,
    waits: &'a Deadline,
    io: &'a mut S,
    mut r: Outgoing<'a>,
    target: attempts::Target<'a>,
    (out, rbuf): (&'a mut Vec<u8>, &'a mut Vec<u8>),
    answer_fields: &'a mut Vec<Field>,
) -> impl Future<Output = Result<(InFlight, (BladeConn, head::ResponseHead, Instant)), ProxyFailure>> + 'a
{
    let fwd = &engine.fwd;
    let (buf, head, fields) = (r.view.buf, r.view.head, r.view.fields);
    let peer = r.info.peer.ip();
    let trusted = fwd.trusted_proxies.iter().any(|n| n.contains(&peer));
    let upgrade = head.upgrade.map(|u| u.get(buf));
    let idempotent = attempts::idempotent(&head.method);
    let timeout = fwd.response_timeout;
    attempts::run(
        &fwd.pool,
        timeout,
        target,
        idempotent,
        async move |backend: &Arc<Backend>| {
            let mut conn = engine
                .blades
                .checkout(backend.addr, r.start)
                .await
                .map_err(|e| {
                    tracing::debug!(backend = &*backend.id, error = %e, "connect failed");
                    attempts::Failed {
                        attempt: retry::Attempt::ConnectFailed,
                        why: "connection failed",
                    }
                })?;
            out.clear();
            let forwarding = Forwarding {
                client_ip: r.info.client_ip.as_bytes(),
                proto: r.info.proto,
                trusted,
                new_request_id: r.minted,
                fallback_host: &backend.authority,
                body_len: r.body.map(<[u8]>::len),
                upgrade,
            };
            head::write_request(buf, head, fields, &forwarding, out);
            let sent = match r.fresh.take() {
                Some(t) if conn.reused => t,
                _ => Instant::now(),
            };
            let deadline = tokio::time::Instant::from_std(sent) + timeout;
            rbuf.clear();
            // No 1xx to an HTTP/1.0 client (RFC 9110 section 15.2).
            let shopper = (!head.http10).then_some(&mut *io);
            let reading = (r.rewrite, &mut *answer_fields);
            let sending =
                send_and_read_head(engine, &mut conn, out, r.body, rbuf, reading, shopper);
            match waits.within(|| deadline, sending).await {
                Some(Ok(answer)) => {
                    let now = Instant::now();
                    let latency = now.saturating_duration_since(sent);
                    backend.latency.observe(latency, now);
                    let total = now.saturating_duration_since(r.start);
                    fwd.pool.traffic.latency.record(total);
                    Ok((conn, answer, now))
                }
                Some(Err(e)) => Err(e.failed(conn.reused)),
                None => Err(attempts::Failed {
                    attempt: retry::Attempt::TimedOut,
                    why: "timed out",
                }),
            }
        },
    )
}

/// Answers the shopper with surge's 502/503/504 for a request no blade answered, logs
/// it, and says what becomes of the connection.
async fn answer_failure<S: Transport>(
    engine: &Engine,
    io: &mut S,
    failure: ProxyFailure,
    (info, head, buf, request_id): (&ConnInfo, &RequestHead, &[u8], &[u8]),
    start: Instant,
    (head_request, close, next): (bool, bool, usize),
) -> After {
    let fwd = &engine.fwd;
    let backend_id = failure.backend_id();
    let id = HeaderValue::from_bytes(request_id).unwrap_or(HeaderValue::from_static("-"));
    let mut resp = fwd.failure_response(failure, &id);
    resp.headers_mut().insert(X_REQUEST_ID, id);
    if fwd.access_log {
        forward::access_line(
            info,
            head.method.as_str(),
            std::str::from_utf8(head.path.get(buf)).unwrap_or("-"),
            resp.status().as_u16(),
            backend_id.as_deref().unwrap_or("-"),
            Some(start),
            std::str::from_utf8(request_id).unwrap_or("-"),
        );
    }
    if !write_own(io, resp, info, head_request, close).await || close {
        return After::Close;
    }
    After::KeepAlive(next)
}

/// Logs one of surge's own answers (refusals, admission answers).
fn log_own(
    fwd: &Forwarder,
    info: &ConnInfo,
    head: &RequestHead,
    buf: &[u8],
    resp: &answers::Own,
    started: Option<Instant>,
) {
    if !fwd.access_log {
        return;
    }
    let id = resp
        .headers()
        .get(X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    forward::access_line(
        info,
        head.method.as_str(),
        std::str::from_utf8(head.path.get(buf)).unwrap_or("-"),
        resp.status().as_u16(),
        "-",
        started,
        id,
    );
}

/// What a body read gives: the body (de-framed), where the next message starts in the
/// buffer, and the body's reservation in the budget.
type ReadBody<'e> = (
    Option<Pooled<'e>>,
    usize,
    Option<crate::proxy::limits::BodyReservation>,
);

/// Reads the request's body whole, within `proxy.max_body_bytes`, the body budget and
/// `proxy.body_read_timeout`; answers `Expect: 100-continue` first.
async fn read_body<'e, S: Transport>(
    engine: &'e Engine,
    io: &mut S,
    buf: &mut Vec<u8>,
    head: &RequestHead,
) -> Result<ReadBody<'e>, Refused> {
    let fwd = &engine.fwd;
    let declared = match head.framing {
        Framing::Empty => return Ok((None, head.len, None)),
        Framing::Length(0) => return Ok((Some(engine.buffers.take_pooled()), head.len, None)),
        Framing::Length(n) => n,
        Framing::Chunked => 0,
    };
    if declared > fwd.max_body_bytes {
        return Err(Refused::BodyTooLarge);
    }
    let mut reserved = fwd.reserve_body(declared).await?;
    let in_buf = buf.len() - head.len;
    // The client waits for our go before sending the body (unless it already did).
    if head.expect_continue
        && in_buf == 0
        && io
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .is_err()
    {
        return Err(Refused::BadBody);
    }
    let read = tokio::time::timeout(fwd.body_read_timeout, async {
        match head.framing {
            Framing::Length(n) => read_sized_body(engine, io, buf, head.len, n).await,
            _ => read_chunked_body(engine, io, buf, head.len, &mut reserved).await,
        }
    })
    .await;
    match read {
        Ok(Ok((body, next))) => {
            if !reserved.grow_to(body.len() as u64) {
                return Err(Refused::BodyBudget);
            }
            Ok((Some(body), next, Some(reserved)))
        }
        Ok(Err(why)) => Err(why),
        Err(_) => Err(Refused::BodyTimeout),
    }
}

/// A body of `n` bytes after the head (`head_len` bytes of `buf`, some of the body
/// perhaps with it). The body, and where the next request starts in `buf`.
async fn read_sized_body<'e, S: Transport>(
    engine: &'e Engine,
    io: &mut S,
    buf: &mut Vec<u8>,
    head_len: usize,
    n: u64,
) -> Result<(Pooled<'e>, usize), Refused> {
    let n = usize::try_from(n).map_err(|_| Refused::BodyTooLarge)?;
    // A pooled buffer: a body within its capacity costs no allocation.
    let mut body = engine.buffers.take_pooled();
    body.reserve(n);
    let have = (buf.len() - head_len).min(n);
    body.extend_from_slice(&buf[head_len..head_len + have]);
    if have == n {
        return Ok((body, head_len + n));
    }
    buf.truncate(head_len);
    while body.len() < n {
        let want = n - body.len();
        let got = (&mut *io)
            .take(want as u64)
            .read_buf(&mut *body)
            .await
            .map_err(|_| Refused::BadBody)?;
        if got == 0 {
            return Err(Refused::BadBody);
        }
    }
    Ok((body, head_len))
}

/// A chunked body after the head (`head_len` bytes of `buf`), de-framed, each piece
/// reserved in the body budget before it is held. The body, and where the next request
/// starts in `buf` (what came after the body is kept there, after the head).
async fn read_chunked_body<'e, S: Transport>(
    engine: &'e Engine,
    io: &mut S,
    buf: &mut Vec<u8>,
    head_len: usize,
    reserved: &mut crate::proxy::limits::BodyReservation,
) -> Result<(Pooled<'e>, usize), Refused> {
    let limit = engine.fwd.max_body_bytes;
    let mut decoder = Chunked::default();
    let mut body = engine.buffers.take_pooled();
    let used = decoder
        .feed(&buf[head_len..], Some(&mut body))
        .map_err(|_| Refused::BadBody)?;
    if body.len() as u64 > limit {
        return Err(Refused::BodyTooLarge);
    }
    if !reserved.grow_to(body.len() as u64) {
        return Err(Refused::BodyBudget);
    }
    if decoder.done() {
        return Ok((body, head_len + used));
    }
    buf.truncate(head_len);
    let mut scratch = engine.buffers.take();
    let result = loop {
        scratch.clear();
        match io.read_buf(&mut scratch).await {
            Ok(0) | Err(_) => break Err(Refused::BadBody),
            Ok(_) => {}
        }
        let Ok(used) = decoder.feed(&scratch, Some(&mut body)) else {
            break Err(Refused::BadBody);
        };
        if body.len() as u64 > limit {
            break Err(Refused::BodyTooLarge);
        }
        if !reserved.grow_to(body.len() as u64) {
            break Err(Refused::BodyBudget);
        }
        if decoder.done() {
            // What follows the body is the next request: after the head.
            buf.extend_from_slice(&scratch[used..]);
            break Ok((body, head_len));
        }
    };
    engine.buffers.give(scratch);
    result
}

/// Everything the relay of an answer needs.
struct Relay<'a> {
    guard: InFlight,
    conn: BladeConn,
    rbuf: Vec<u8>,
    /// The answer's head at the start of `rbuf`, as `send_and_read_head` parsed it.
    answer: head::ResponseHead,
    /// When the answer's head was read.
    answered_at: Instant,
    answer_fields: &'a [Field],
    rewrite: &'a head::Rewrite<'a>,
    out: Vec<u8>,
    entry: Entry,
    route: Option<crate::proxy::route::Verified<'a>>,
    had_cart: bool,
    request_id: &'a [u8],
    info: &'a ConnInfo,
    head: &'a RequestHead,
    path: &'a [u8],
    started: Instant,
    unix_now: u64,
    close: &'a mut bool,
}

enum RelayEnd {
    /// The whole answer went to the shopper.
    Done,
    /// The answer broke off (either side): the shopper's connection must close.
    Cut,
    /// 101: bytes both ways from now on.
    Tunnel(BladeConn),
}

/// Writes the shopper's head and relays the body with its framing.
async fn relay<S: Transport>(
    engine: &Engine,
    waits: &Deadline,
    io: &mut S,
    mut r: Relay<'_>,
) -> RelayEnd {
    let backend = r.guard.backend().clone();
    let dechunk = r.rewrite.dechunk;
    write_answer_head(&engine.fwd, &mut r, &backend);
    account(&engine.fwd, &r, &backend);
    let Relay {
        guard,
        conn,
        mut rbuf,
        answer: resp,
        answered_at,
        out,
        entry,
        started,
        ..
    } = r;
    // The first body bytes came with the head: one vectored write for both.
    rbuf.drain(..resp.len);
    // The whole answer came with its head (as most do): what follows is one write to
    // the shopper, and the head's reading serves as the answer's end too.
    let whole = match resp.body {
        BodyKind::None => true,
        BodyKind::Length(n) => rbuf.len() as u64 >= n,
        _ => false,
    };
    let mut conn = Some(conn);
    let mut held = Some((guard, entry));
    let end = relay_body(
        engine, waits, io, &mut conn, &out, &mut rbuf, resp, dechunk, &mut held,
    )
    .await;
    let done = if whole { answered_at } else { Instant::now() };
    waits.answered(done);
    backend
        .metrics
        .duration
        .record(done.saturating_duration_since(started).as_secs_f64());
    drop(held);
    engine.buffers.give(out);
    engine.buffers.give(rbuf);
    match (end, conn) {
        (BodyEnd::Reusable, Some(c)) => {
            engine.blades.checkin(c, done);
            RelayEnd::Done
        }
        (BodyEnd::Reusable | BodyEnd::Closed, _) => RelayEnd::Done,
        (BodyEnd::Upgraded, Some(c)) => RelayEnd::Tunnel(c),
        _ => RelayEnd::Cut,
    }
}

/// The shopper's answer head into `r.out`: the blade's, rewritten, with the route and
/// admission cookies, the request id, and whether the connection closes after it
/// (`r.close`).
fn write_answer_head(fwd: &Forwarder, r: &mut Relay<'_>, backend: &Backend) {
    let draining = r.guard.state() == State::Draining;
    let Relay {
        rbuf,
        answer,
        answer_fields,
        rewrite,
        out,
        entry,
        route,
        had_cart,
        request_id,
        info,
        head,
        unix_now,
        close,
        ..
    } = r;
    let dechunk = rewrite.dechunk;
    let secure = info.tls.is_some();
    out.clear();
    head::write_response(
        rbuf,
        answer,
        answer_fields,
        rewrite,
        out,
        |facts, resp, out| {
            if let Some(v) = fwd.route_cookie(
                *route,
                *had_cart,
                |name| facts.sets_cookie(name),
                &backend.id,
                secure,
                *unix_now,
            ) {
                header_line(out, b"set-cookie", v.as_bytes());
            }
            if !facts.has("x-request-id") {
                header_line(out, b"x-request-id", request_id);
            }
            for c in [&entry.admission_cookie, &entry.queue_cookie]
                .into_iter()
                .flatten()
            {
                header_line(out, b"set-cookie", c.as_bytes());
            }
            // A draining blade's shoppers reconnect, so their next requests are spread
            // over the blades that stay; a body framed by the close ends the connection.
            **close |= draining
                || resp.body == BodyKind::UntilClose
                || (dechunk && resp.body == BodyKind::Chunked);
            // An HTTP/1.0 shopper that asked to keep the connection is told it stays
            // (`close` is then false only for an answer of known length); without the
            // field it would take the connection as closing.
            if head.http10 && !**close {
                header_line(out, b"connection", b"keep-alive");
            }
            **close
        },
    );
}

/// The answer counted: the blade's health, its status counts, the access log.
fn account(fwd: &Forwarder, r: &Relay<'_>, backend: &Backend) {
    let status = r.answer.status;
    let outcome = if status >= 500 {
        Outcome::Failure
    } else {
        Outcome::Success
    };
    fwd.pool.record(backend, outcome);
    backend.metrics.count_status(status);
    if fwd.access_log {
        forward::access_line(
            r.info,
            r.head.method.as_str(),
            std::str::from_utf8(r.path).unwrap_or("-"),
            status,
            &backend.id,
            Some(r.started),
            std::str::from_utf8(r.request_id).unwrap_or("-"),
        );
    }
}

fn header_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

enum BodyEnd {
    /// Read exactly to its end; the blade connection may serve again.
    Reusable,
    /// Complete, but the blade connection cannot be reused (it closed, or framing by close).
    Closed,
    /// The 101 went out: tunnel.
    Upgraded,
    /// Broke off.
    Cut,
}

/// The request's place at its blade (in flight) and under admission, given up as soon
/// as the blade has sent the whole answer: before the last write to the shopper, so a
/// shopper who has the answer never sees the request still counted.
type Held = Option<(InFlight, Entry)>;

/// Relays the body after the shopper's head (`out`), starting with what is in `rbuf`.
#[allow(clippy::too_many_arguments)]
async fn relay_body<S: Transport>(
    engine: &Engine,
    waits: &Deadline,
    io: &mut S,
    conn: &mut Option<BladeConn>,
    out: &[u8],
    rbuf: &mut Vec<u8>,
    resp: head::ResponseHead,
    dechunk: bool,
    held: &mut Held,
) -> BodyEnd {
    let mut body = BodyRelay {
        waits,
        io,
        conn,
        rbuf,
        held,
        idle: engine.fwd.body_idle_timeout,
    };
    let end_of_answer = |extra: bool| {
        if extra || !resp.reusable {
            BodyEnd::Closed
        } else {
            BodyEnd::Reusable
        }
    };
    match resp.body {
        BodyKind::None => {
            body.held.take();
            let extra = !body.rbuf.is_empty();
            if write_parts(body.io, out, &[]).await.is_err() {
                return BodyEnd::Cut;
            }
            if resp.status == 101 {
                return if extra && write_parts(body.io, body.rbuf, &[]).await.is_err() {
                    BodyEnd::Cut
                } else {
                    BodyEnd::Upgraded
                };
            }
            end_of_answer(extra)
        }
        BodyKind::UntilClose if resp.status == 101 => {
            body.held.take();
            if write_parts(body.io, out, body.rbuf).await.is_err() {
                return BodyEnd::Cut;
            }
            BodyEnd::Upgraded
        }
        BodyKind::Length(n) => match body.length(out, n).await {
            Some(extra) => end_of_answer(extra),
            None => BodyEnd::Cut,
        },
        BodyKind::Chunked => match body.chunked(out, dechunk).await {
            Some(extra) => end_of_answer(extra),
            None => BodyEnd::Cut,
        },
        BodyKind::UntilClose => body.until_close(out).await,
    }
}

/// One answer body on its way from the blade (`conn`, what came already in `rbuf`) to
/// the shopper (`io`).
struct BodyRelay<'a, S> {
    waits: &'a Deadline,
    io: &'a mut S,
    conn: &'a mut Option<BladeConn>,
    rbuf: &'a mut Vec<u8>,
    held: &'a mut Held,
    idle: Duration,
}

impl<S: Transport> BodyRelay<'_, S> {
    /// Reads the next bytes of the body into `rbuf` (emptied first), at most `want`.
    /// `None` when the blade closed (0 bytes) or failed.
    async fn read_next(&mut self, want: u64) -> Option<usize> {
        self.rbuf.clear();
        let c = self.conn.as_mut()?;
        match read_some(self.waits, &mut c.stream, self.rbuf, want, self.idle).await {
            Ok(0) | Err(_) => None,
            Ok(got) => Some(got),
        }
    }

    /// A body of `n` bytes after the head `out`. Whether bytes beyond it came (the
    /// connection cannot serve again then), or `None` if it broke off.
    async fn length(&mut self, out: &[u8], n: u64) -> Option<bool> {
        let mut left = n;
        let first = self
            .rbuf
            .len()
            .min(usize::try_from(left).unwrap_or(usize::MAX));
        let extra = self.rbuf.len() > first;
        left -= first as u64;
        if left == 0 {
            self.held.take();
        }
        write_parts(self.io, out, &self.rbuf[..first]).await.ok()?;
        while left > 0 {
            let want = left.min(self.rbuf.capacity() as u64);
            left -= self.read_next(want).await? as u64;
            if left == 0 {
                self.held.take();
            }
            write_parts(self.io, self.rbuf, &[]).await.ok()?;
        }
        Some(extra)
    }

    /// A chunked body after the head `out`, passed on as it is or (`dechunk`, towards an
    /// HTTP/1.0 shopper) as its plain bytes. Whether bytes beyond it came, or `None`.
    async fn chunked(&mut self, out: &[u8], dechunk: bool) -> Option<bool> {
        let mut decoder = Chunked::default();
        let mut plain = dechunk.then(Vec::new);
        let mut pending_head = true;
        loop {
            let used = decoder.feed(self.rbuf, plain.as_mut()).ok()?;
            let extra = used < self.rbuf.len();
            if decoder.done() {
                self.held.take();
            }
            let piece: &[u8] = match &plain {
                Some(p) => p,
                None => &self.rbuf[..used],
            };
            if pending_head {
                pending_head = false;
                write_parts(self.io, out, piece).await.ok()?;
            } else {
                write_parts(self.io, piece, &[]).await.ok()?;
            }
            if let Some(p) = plain.as_mut() {
                p.clear();
            }
            if decoder.done() {
                return Some(extra);
            }
            self.read_next(self.rbuf.capacity() as u64).await?;
        }
    }

    /// A body framed by the blade's close, after the head `out`.
    async fn until_close(&mut self, out: &[u8]) -> BodyEnd {
        if write_parts(self.io, out, self.rbuf).await.is_err() {
            return BodyEnd::Cut;
        }
        loop {
            self.rbuf.clear();
            let Some(c) = self.conn.as_mut() else {
                return BodyEnd::Cut;
            };
            let want = self.rbuf.capacity() as u64;
            match read_some(self.waits, &mut c.stream, self.rbuf, want, self.idle).await {
                Ok(0) => {
                    *self.conn = None;
                    return BodyEnd::Closed;
                }
                Err(_) => return BodyEnd::Cut,
                Ok(_) => {}
            }
            if write_parts(self.io, self.rbuf, &[]).await.is_err() {
                return BodyEnd::Cut;
            }
        }
    }
}

/// Reads at most `want` bytes into `buf`; a blade that sends nothing of the body for
/// `idle` is cut (`proxy.body_idle_timeout`).
async fn read_some<R: AsyncRead + Unpin>(
    waits: &Deadline,
    r: &mut R,
    buf: &mut Vec<u8>,
    want: u64,
    idle: Duration,
) -> std::io::Result<usize> {
    let mut limited = r.take(want);
    let read = limited.read_buf(buf);
    match waits
        .within(|| tokio::time::Instant::now() + idle, read)
        .await
    {
        Some(res) => res,
        None => {
            metrics::counter!(names::BODIES_STALLED, "side" => "backend").increment(1);
            Err(std::io::ErrorKind::TimedOut.into())
        }
    }
}

/// Writes `a` then `b` (vectored: one system call when the socket takes both).
async fn write_parts<W: AsyncWrite + Unpin>(w: &mut W, a: &[u8], b: &[u8]) -> std::io::Result<()> {
    let (mut a, mut b) = (a, b);
    while !a.is_empty() || !b.is_empty() {
        let bufs = [std::io::IoSlice::new(a), std::io::IoSlice::new(b)];
        let n = w.write_vectored(&bufs).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    Ok(())
}

/// Bytes both ways between the shopper and the blade after a 101, until either side
/// closes or nothing moves for `proxy.idle_timeout`: a read waiting that long ends the
/// tunnel, and so does a write that long (a side that stops reading must not hold the
/// other, and a worker's buffers, for ever).
async fn tunnel<S: Transport>(engine: &Engine, io: &mut S, conn: &mut BladeConn, early: &[u8]) {
    let idle = engine.idle_timeout;
    if !early.is_empty() && !within(idle, conn.stream.write_all(early)).await {
        return;
    }
    metrics::counter!(names::TUNNELS_TOTAL).increment(1);
    let (mut up, mut down) = (engine.buffers.take(), engine.buffers.take());
    let mut blade_open = true;
    let mut shopper_open = true;
    while blade_open || shopper_open {
        up.clear();
        down.clear();
        let step = tokio::time::timeout(idle, async {
            tokio::select! {
                r = io.read_buf(&mut up), if shopper_open => (true, r),
                r = conn.stream.read_buf(&mut down), if blade_open => (false, r),
            }
        })
        .await;
        let moved = match step {
            Err(_) | Ok((_, Err(_))) => false,
            // A half-close is passed on; the tunnel ends when both sides are done.
            Ok((true, Ok(0))) => {
                shopper_open = false;
                let _ = within(idle, conn.stream.shutdown()).await;
                true
            }
            Ok((false, Ok(0))) => {
                blade_open = false;
                let _ = within(idle, io.shutdown()).await;
                true
            }
            Ok((true, Ok(_))) => within(idle, conn.stream.write_all(&up)).await,
            Ok((false, Ok(_))) => within(idle, io.write_all(&down)).await,
        };
        if !moved {
            break;
        }
    }
    engine.buffers.give(up);
    engine.buffers.give(down);
}

/// Whether `io` finished without error within `limit`.
async fn within(limit: Duration, io: impl Future<Output = std::io::Result<()>>) -> bool {
    matches!(tokio::time::timeout(limit, io).await, Ok(Ok(())))
}
