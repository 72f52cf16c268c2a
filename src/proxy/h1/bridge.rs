//! A request that did not come over HTTP/1.1 (an HTTP/2 shopper's) sent to an HTTP/1.1
//! blade through the engine's own blade connections: the same pools, the same sending
//! (an early answer heard, a partly sent request never sent again, an unasked byte never
//! passed on) as the engine's shoppers get, and no second client beside it. The answer
//! comes back as an `http::Response` whose body reads the blade connection as the HTTP/2
//! side pulls it, and hands the connection back when its body was read to the end.

use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, ReadBuf};

use super::blades::BladeConn;
use super::chunked::Chunked;
use super::conn::Engine;
use super::head::{self, BodyKind, Field};
use super::send::send_and_read_head;
use crate::pool::Backend;
use crate::proxy::attempts::Failed;
use crate::proxy::retry::Attempt;

/// Sends `parts` (origin-form target, hop-by-hop fields gone; without a `Host`, the
/// blade's authority is sent) with `body` to `blade` and reads its answer's head within
/// `timeout`. The answer, and when the request was sent (its connection in hand).
pub async fn send(
    engine: &Rc<Engine>,
    blade: &Backend,
    parts: &http::request::Parts,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<(Response<BladeBody>, Instant), Failed> {
    let mut conn = match engine.blades.checkout(blade.addr, Instant::now()).await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(backend = &*blade.id, error = %e, "connect failed");
            return Err(Failed {
                attempt: Attempt::ConnectFailed,
                why: "connection failed",
            });
        }
    };
    let sent_at = Instant::now();
    let mut out = engine.buffers.take();
    write_head(parts, &blade.authority, body.map(<[u8]>::len), &mut out);
    let mut rbuf = engine.buffers.take();
    let mut fields = Vec::new();
    let rewrite = head::Rewrite {
        head_request: parts.method == Method::HEAD,
        hsts: None,
        dechunk: false,
        upgrade: false,
    };
    let sent = tokio::time::timeout(
        timeout,
        send_and_read_head(
            engine,
            &mut conn,
            &out,
            body,
            &mut rbuf,
            (&rewrite, &mut fields),
            None::<&mut tokio::net::TcpStream>,
        ),
    )
    .await;
    engine.buffers.give(out);
    let answer = match sent {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => {
            engine.buffers.give(rbuf);
            return Err(e.failed(conn.reused));
        }
        Err(_) => {
            engine.buffers.give(rbuf);
            return Err(Failed {
                attempt: Attempt::TimedOut,
                why: "timed out",
            });
        }
    };
    let fields = header_map(&rbuf[..answer.len], &fields);
    let mut resp = Response::new(BladeBody::new(engine.clone(), conn, rbuf, &answer));
    *resp.status_mut() = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
    *resp.headers_mut() = fields;
    if !answer.passes_length() {
        resp.headers_mut().remove(http::header::CONTENT_LENGTH);
    }
    Ok((resp, sent_at))
}

/// The HTTP/1.1 head of `parts`: request line, the fields as they are (the caller has
/// prepared them), `fallback_host` when there is no `Host`, and the body's length when
/// there is a body.
fn write_head(
    parts: &http::request::Parts,
    fallback_host: &[u8],
    body_len: Option<usize>,
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes(),
    );
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        // `Expect` was answered on the shopper's side already.
        if name == http::header::CONTENT_LENGTH
            || name == http::header::COOKIE
            || name == http::header::EXPECT
        {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    // HTTP/2 sends each cookie as a field of its own; towards HTTP/1.1 they are one
    // field, joined with "; " (RFC 9113 section 8.2.3).
    let mut cookies = parts.headers.get_all(http::header::COOKIE).iter();
    if let Some(first) = cookies.next() {
        out.extend_from_slice(b"cookie: ");
        out.extend_from_slice(first.as_bytes());
        for more in cookies {
            out.extend_from_slice(b"; ");
            out.extend_from_slice(more.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
    }
    if !parts.headers.contains_key(http::header::HOST) {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(fallback_host);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(n) = body_len {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(n.to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// The answer's fields as a header map (hop-by-hop ones included: the forwarder strips
/// them as it does any blade's answer). The values share one copy of the head rather
/// than one allocation each.
fn header_map(head: &[u8], fields: &[Field]) -> HeaderMap {
    let shared = Bytes::copy_from_slice(head);
    let mut map = HeaderMap::with_capacity(fields.len());
    for f in fields {
        let range = f.value.range();
        if range.end > shared.len() {
            continue;
        }
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(f.name.get(head)),
            HeaderValue::from_maybe_shared(shared.slice(range)),
        ) else {
            continue;
        };
        map.append(name, value);
    }
    map
}

/// Where a body's reading stands.
enum Left {
    /// This many bytes still to come.
    Length(u64),
    Chunked(Chunked),
    /// Until the blade closes.
    UntilClose,
    /// Read to its end.
    Done,
}

/// A blade's answer body, read from its connection as it is polled. The connection goes
/// back to the engine's pool when the body ended exactly where the answer did and the
/// blade keeps it open; otherwise (or if the body is dropped early) it is closed.
pub struct BladeBody {
    engine: Rc<Engine>,
    conn: Option<BladeConn>,
    /// The answer as read so far; the body's bytes not yet passed on start at `at`.
    buf: Vec<u8>,
    at: usize,
    left: Left,
    reusable: bool,
}

impl BladeBody {
    fn new(engine: Rc<Engine>, conn: BladeConn, buf: Vec<u8>, answer: &head::ResponseHead) -> Self {
        let left = match answer.body {
            BodyKind::None | BodyKind::Length(0) => Left::Done,
            BodyKind::Length(n) => Left::Length(n),
            BodyKind::Chunked => Left::Chunked(Chunked::default()),
            BodyKind::UntilClose => Left::UntilClose,
        };
        let mut body = Self {
            engine,
            conn: Some(conn),
            buf,
            at: answer.len,
            left,
            reusable: answer.reusable,
        };
        if matches!(body.left, Left::Done) {
            body.finish();
        }
        body
    }

    /// The body ended: the connection goes back if nothing beyond the answer came.
    fn finish(&mut self) {
        self.left = Left::Done;
        let Some(conn) = self.conn.take() else {
            return;
        };
        if self.reusable && self.at == self.buf.len() {
            self.engine.blades.checkin(conn, Instant::now());
        }
    }

    /// The next piece of the body from what is buffered, if any.
    fn take_buffered(&mut self) -> Result<Option<Bytes>, std::io::Error> {
        let rest = &self.buf[self.at..];
        let piece = match &mut self.left {
            Left::Done => return Ok(None),
            _ if rest.is_empty() => return Ok(None),
            Left::Length(n) => {
                let take = rest.len().min(usize::try_from(*n).unwrap_or(usize::MAX));
                *n -= take as u64;
                self.at += take;
                let piece = Bytes::copy_from_slice(&rest[..take]);
                if *n == 0 {
                    self.finish();
                }
                piece
            }
            Left::Chunked(decoder) => {
                let mut plain = Vec::new();
                let used = decoder
                    .feed(rest, Some(&mut plain))
                    .map_err(|_| std::io::Error::other("invalid chunked body from the blade"))?;
                self.at += used;
                if decoder.done() {
                    self.finish();
                }
                Bytes::from(plain)
            }
            Left::UntilClose => {
                self.at += rest.len();
                Bytes::copy_from_slice(rest)
            }
        };
        Ok(Some(piece))
    }

    /// Reads more of the answer from the blade into `buf` (emptied first when all of
    /// it was passed on). Ready with `false` at the end of the stream.
    fn poll_more(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<bool>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(Ok(false));
        };
        if self.at == self.buf.len() {
            self.buf.clear();
            self.at = 0;
        }
        let mut chunk = [0u8; 8192];
        let mut read = ReadBuf::new(&mut chunk);
        match Pin::new(&mut conn.stream).poll_read(cx, &mut read) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) if read.filled().is_empty() => Poll::Ready(Ok(false)),
            Poll::Ready(Ok(())) => {
                self.buf.extend_from_slice(read.filled());
                Poll::Ready(Ok(true))
            }
        }
    }
}

impl Body for BladeBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        loop {
            match this.take_buffered() {
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
                Ok(Some(piece)) if !piece.is_empty() => {
                    return Poll::Ready(Some(Ok(Frame::data(piece))))
                }
                Ok(_) if matches!(this.left, Left::Done) => return Poll::Ready(None),
                Ok(_) => {}
            }
            match this.poll_more(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(true)) => {}
                Poll::Ready(Ok(false)) if matches!(this.left, Left::UntilClose) => {
                    this.conn = None;
                    this.left = Left::Done;
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(false)) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(std::io::ErrorKind::UnexpectedEof.into())));
                }
                Poll::Ready(Err(e)) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.left, Left::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.left {
            Left::Length(n) => SizeHint::with_exact(n),
            Left::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

impl Drop for BladeBody {
    fn drop(&mut self) {
        self.engine.buffers.give(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::write_head;

    #[test]
    fn an_http2_request_becomes_an_http1_head() {
        let req = http::Request::post("/cart?x=1")
            .header("host", "shop.test")
            .header("content-length", "99")
            .header("cookie", "a=1")
            .header("cookie", "cart=42")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let mut out = Vec::new();
        write_head(&parts, b"10.0.0.7:8080", Some(3), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /cart?x=1 HTTP/1.1\r\nhost: shop.test\r\ncookie: a=1; cart=42\r\ncontent-length: 3\r\n\r\n"
        );
        // No Host at all (an HTTP/1.0-style request): the blade's.
        let (parts, ()) = http::Request::get("/").body(()).unwrap().into_parts();
        let mut out = Vec::new();
        write_head(&parts, b"10.0.0.7:8080", None, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET / HTTP/1.1\r\nhost: 10.0.0.7:8080\r\n\r\n"
        );
    }
}
