//! Sending one request to a blade and reading its answer's head. The request is written
//! while the blade's answer is watched for (RFC 9112 section 9.6): a blade that refuses
//! an upload answers before it has read the body (413, 401, a redirect) and closes, and
//! that answer is what the shopper gets, not a 502. A request of which any byte left
//! surge counts as sent: only one that never started may go again to any blade.

use std::future::poll_fn;
use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::blades::{BladeConn, Stream};
use super::buffers::BUFFER_BYTES;
use super::conn::Engine;
use super::head::{self, Field};
use crate::proxy::transport::Transport;

/// How sending a request to a blade failed.
pub(super) enum SendError {
    /// Not a byte written: the blade cannot have acted on it.
    Unsent,
    /// Written (wholly or in part), then the connection closed or reset before any byte
    /// of an answer.
    ClosedEarly,
    /// The blade answered with something that is not an HTTP response.
    Garbage,
    /// The answer broke off inside its head.
    Incomplete,
}

impl SendError {
    /// The retry decision's view of this failure (`reused`: a pooled connection).
    pub(super) fn failed(self, reused: bool) -> crate::proxy::attempts::Failed {
        use crate::proxy::attempts::Failed;
        use crate::proxy::retry::Attempt;
        match self {
            SendError::Unsent => Failed {
                attempt: Attempt::Unsent { reused },
                why: "connection failed",
            },
            SendError::ClosedEarly => Failed {
                attempt: Attempt::Failed { closed_early: true },
                why: "connection error",
            },
            SendError::Garbage => Failed {
                attempt: Attempt::Failed {
                    closed_early: false,
                },
                why: "invalid HTTP response",
            },
            SendError::Incomplete => Failed {
                attempt: Attempt::Failed {
                    closed_early: false,
                },
                why: "connection closed before the response was complete",
            },
        }
    }
}

/// How writing a request ended.
#[derive(Debug, PartialEq, Eq)]
enum Written {
    /// All of it, flushed.
    Whole,
    /// The blade began its final answer before taking all of it.
    Answered,
    /// The connection failed or closed; `any`: some bytes had left by then.
    Failed { any: bool },
}

/// Writes the request and reads until the blade's response head is whole in `rbuf`.
/// Interim (1xx) answers go on to `shopper` as they come (a 103 Early Hints is useful
/// only early), except a 100 (surge answers `Expect` itself) or with no `shopper`.
/// An answer that came before the request was all written leaves the connection
/// unusable for another request (`reusable` is false).
pub(super) async fn send_and_read_head<S: Transport>(
    engine: &Engine,
    conn: &mut BladeConn,
    head_bytes: &[u8],
    body: Option<&[u8]>,
    rbuf: &mut Vec<u8>,
    (rewrite, fields): (&head::Rewrite<'_>, &mut Vec<Field>),
    mut shopper: Option<&mut S>,
) -> Result<head::ResponseHead, SendError> {
    let written = write_watching(
        &mut conn.stream,
        (head_bytes, body.unwrap_or_default()),
        rbuf,
        engine.max_header_bytes,
    )
    .await;
    if written == (Written::Failed { any: false }) {
        return Err(SendError::Unsent);
    }
    let cut_short = written != Written::Whole;
    // An interim answer came: the blade has the request, whatever happens next.
    let mut answered = false;
    loop {
        // What is in the buffer first: an interim answer and the final one often come
        // in one read.
        if !rbuf.is_empty() {
            // Parsed and checked here, while another blade can still be asked; `relay`
            // writes the shopper's head from what this leaves in `fields`.
            match head::parse_response(rbuf, engine.limits.max_fields, rewrite, fields) {
                Ok(head::Parsed::Partial) => {}
                Ok(head::Parsed::Interim(interim)) => {
                    answered = true;
                    if let Some(io) = shopper.as_deref_mut().filter(|_| interim.status != 100) {
                        let mut out = engine.buffers.take();
                        head::write_interim(rbuf, &interim, fields, &mut out);
                        // A shopper gone shows when the final answer is written.
                        let _ = io.write_all(&out).await;
                        let _ = io.flush().await;
                        engine.buffers.give(out);
                    }
                    rbuf.drain(..interim.len);
                    continue;
                }
                Ok(head::Parsed::Final(mut answer)) => {
                    // The blade is out of step with a request it did not take whole.
                    answer.reusable &= !cut_short;
                    return Ok(answer);
                }
                Err(_) => return Err(SendError::Garbage),
            }
        }
        if rbuf.len() == rbuf.capacity() {
            if rbuf.len() >= engine.max_header_bytes {
                return Err(SendError::Garbage);
            }
            rbuf.reserve(BUFFER_BYTES);
        }
        match conn.stream.read_buf(rbuf).await {
            Ok(0) | Err(_) if rbuf.is_empty() && !answered => return Err(SendError::ClosedEarly),
            Ok(0) | Err(_) => return Err(SendError::Incomplete),
            Ok(_) => {}
        }
    }
}

/// Writes `head` then `body` (vectored) and flushes, reading what the blade sends
/// meanwhile into `rbuf` whenever the socket takes no more. A request that fits the
/// socket's buffer is written without a single read; only a long upload is watched.
/// `limit`: what the blade may send before its answer's head must be whole (more ends
/// the write as an answer, which the head's parse then refuses).
async fn write_watching(
    stream: &mut Stream,
    (head, body): (&[u8], &[u8]),
    rbuf: &mut Vec<u8>,
    limit: usize,
) -> Written {
    let total = head.len() + body.len();
    let mut done = 0usize;
    poll_fn(|cx| loop {
        let step = if done < total {
            let (a, b) = match head.get(done..) {
                Some(rest) => (rest, body),
                None => (&[][..], &body[done - head.len()..]),
            };
            let bufs = [IoSlice::new(a), IoSlice::new(b)];
            match Pin::new(&mut *stream).poll_write_vectored(cx, &bufs) {
                Poll::Ready(Ok(n)) if n > 0 => {
                    done += n;
                    continue;
                }
                Poll::Ready(_) => return Poll::Ready(Written::Failed { any: done > 0 }),
                Poll::Pending => Poll::Pending,
            }
        } else {
            Pin::new(&mut *stream).poll_flush(cx).map(|r| match r {
                Ok(()) => Written::Whole,
                Err(_) => Written::Failed { any: done > 0 },
            })
        };
        if step.is_ready() {
            return step;
        }
        // The socket takes no more for now: perhaps because the blade has answered.
        match poll_answer(stream, cx, rbuf) {
            Poll::Ready(true) if rbuf.len() >= limit || final_begun(rbuf) => {
                return Poll::Ready(Written::Answered)
            }
            // An interim answer: the blade still wants the rest.
            Poll::Ready(true) => continue,
            Poll::Ready(false) => return Poll::Ready(Written::Failed { any: done > 0 }),
            Poll::Pending => return Poll::Pending,
        }
    })
    .await
}

/// Reads what the blade has sent into `rbuf`: ready with `true` when bytes came, `false`
/// at the end of the stream or an error.
fn poll_answer(stream: &mut Stream, cx: &mut Context<'_>, rbuf: &mut Vec<u8>) -> Poll<bool> {
    let mut chunk = [0u8; 2048];
    let mut read = ReadBuf::new(&mut chunk);
    match Pin::new(stream).poll_read(cx, &mut read) {
        Poll::Ready(Ok(())) if !read.filled().is_empty() => {
            rbuf.extend_from_slice(read.filled());
            Poll::Ready(true)
        }
        Poll::Ready(_) => Poll::Ready(false),
        Poll::Pending => Poll::Pending,
    }
}

/// Whether `rbuf` holds the start of a final answer (or of something that is not HTTP)
/// after any whole interim (1xx) heads.
fn final_begun(mut rbuf: &[u8]) -> bool {
    // "HTTP/1.1 1": the status's first digit is the tenth byte.
    while let Some(&digit) = rbuf.get(9) {
        if digit != b'1' {
            return true;
        }
        match rbuf.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(end) => rbuf = &rbuf[end + 4..],
            None => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::final_begun;

    #[test]
    fn a_final_answer_is_seen_behind_interim_ones() {
        assert!(!final_begun(b""));
        assert!(!final_begun(b"HTTP/1.1 "));
        assert!(final_begun(b"HTTP/1.1 413 Con"));
        assert!(!final_begun(b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n"));
        assert!(!final_begun(b"HTTP/1.1 103 Early Hints\r\n\r\n"));
        assert!(final_begun(
            b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 302 Found"
        ));
        assert!(final_begun(b"garbage that is not http"));
    }
}
