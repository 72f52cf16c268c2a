//! The PROXY protocol (HAProxy's v1 text line and v2 binary header), which an L4 balancer
//! or CDN in front of surge sends first on each connection to say who the client really
//! is. Parsing is `ppp`'s; this module reads the header off the socket without taking
//! a byte of what follows, and decides which address the connection counts as.
//!
//! Only peers in `proxy.trusted_proxies` may send it (anyone else could claim any
//! address); a listener with `proxy_protocol = true` closes connections from others.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use ppp::{v1, v2, HeaderResult, PartialResult};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The longest header accepted: v1 is at most 107 bytes; v2 is 16 bytes and its
/// addresses plus TLVs (AWS, GCP and Azure add a few dozen bytes of TLVs).
const MAX_HEADER: usize = 4096;

/// Why a PROXY header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("the connection closed before a complete PROXY header")]
    Closed,
    #[error("not a PROXY protocol header: {0}")]
    Invalid(String),
    #[error("PROXY header longer than {MAX_HEADER} bytes")]
    TooLong,
}

/// What a complete header says: the client it speaks for (`None` for `LOCAL` / `UNKNOWN`
/// connections, the balancer's own health checks, which count as the balancer) and how
/// many bytes of the input it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    pub client: Option<SocketAddr>,
    pub len: usize,
}

/// Parses a header at the start of `input`: `Ok(None)` while more bytes are needed.
pub fn parse(input: &[u8]) -> Result<Option<Parsed>, HeaderError> {
    let result = HeaderResult::parse(input);
    if result.is_incomplete() {
        return if input.len() >= MAX_HEADER {
            Err(HeaderError::TooLong)
        } else {
            Ok(None)
        };
    }
    match result {
        HeaderResult::V1(Ok(h)) => Ok(Some(Parsed {
            client: match h.addresses {
                v1::Addresses::Tcp4(a) => Some((a.source_address, a.source_port).into()),
                v1::Addresses::Tcp6(a) => Some((a.source_address, a.source_port).into()),
                v1::Addresses::Unknown => None,
            },
            len: h.header.len(),
        })),
        HeaderResult::V2(Ok(h)) => Ok(Some(Parsed {
            client: match (h.command, h.addresses) {
                (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                    Some((a.source_address, a.source_port).into())
                }
                (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
                    Some((a.source_address, a.source_port).into())
                }
                _ => None,
            },
            len: h.len(),
        })),
        HeaderResult::V1(Err(e)) => Err(HeaderError::Invalid(e.to_string())),
        HeaderResult::V2(Err(e)) => Err(HeaderError::Invalid(e.to_string())),
    }
}

/// Reads a PROXY header from `io`; returns what it says and the stream, which still
/// yields every byte after the header.
pub(super) async fn read<S: AsyncRead + Unpin>(
    mut io: S,
) -> Result<(Parsed, Prefixed<S>), HeaderError> {
    let mut buf = Vec::with_capacity(256);
    loop {
        let mut chunk = [0u8; 512];
        let want = chunk
            .len()
            .min(MAX_HEADER - buf.len().min(MAX_HEADER))
            .max(1);
        let n = io
            .read(&mut chunk[..want])
            .await
            .map_err(|_| HeaderError::Closed)?;
        if n == 0 {
            return Err(HeaderError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(parsed) = parse(&buf)? {
            buf.drain(..parsed.len);
            return Ok((parsed, Prefixed::new(buf, io)));
        }
    }
}

/// A stream that first yields bytes already read from it (what followed the PROXY header
/// in the same read), then reads on.
pub(super) struct Prefixed<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix,
            at: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.at < this.prefix.len() {
            let n = (this.prefix.len() - this.at).min(out.remaining());
            out.put_slice(&this.prefix[this.at..this.at + n]);
            this.at += n;
            if this.at == this.prefix.len() {
                this.prefix = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, out)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: super::transport::Transport> super::transport::Transport for Prefixed<S> {
    /// Bytes after the PROXY header that came with it are there to read already.
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<bool> {
        if self.at < self.prefix.len() {
            return Poll::Ready(true);
        }
        self.inner.poll_readable(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
        let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(addresses.len() as u16).to_be_bytes());
        h.extend_from_slice(addresses);
        h
    }

    #[test]
    fn v1_and_v2_headers_name_the_client_and_their_length() {
        let line = b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 443\r\nGET / HTTP/1.1\r\n";
        let p = parse(line).unwrap().unwrap();
        assert_eq!(p.client, Some("203.0.113.7:51234".parse().unwrap()));
        assert_eq!(&line[p.len..p.len + 3], b"GET");
        let line = b"PROXY TCP6 2001:db8::7 2001:db8::1 51234 443\r\n";
        assert_eq!(
            parse(line).unwrap().unwrap().client,
            Some("[2001:db8::7]:51234".parse().unwrap())
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n").unwrap().unwrap().client, None);

        let mut addrs = vec![198, 51, 100, 9, 192, 0, 2, 1];
        addrs.extend_from_slice(&4000u16.to_be_bytes());
        addrs.extend_from_slice(&443u16.to_be_bytes());
        let mut bin = v2(1, 0x11, &addrs);
        let len = bin.len();
        bin.extend_from_slice(b"GET");
        let p = parse(&bin).unwrap().unwrap();
        assert_eq!(p.client, Some("198.51.100.9:4000".parse().unwrap()));
        assert_eq!(p.len, len);
        // LOCAL: the balancer's own check, counted as the balancer.
        assert_eq!(parse(&v2(0, 0x00, &[])).unwrap().unwrap().client, None);
    }

    #[test]
    fn partial_headers_wait_and_other_bytes_are_refused() {
        let line = b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 443\r\n";
        for cut in [1, 5, 20, line.len() - 1] {
            assert_eq!(parse(&line[..cut]), Ok(None), "cut at {cut}");
        }
        let bin = v2(1, 0x11, &[198, 51, 100, 9, 192, 0, 2, 1, 0, 1, 0, 2]);
        assert_eq!(parse(&bin[..10]), Ok(None));
        assert_eq!(parse(&bin[..bin.len() - 1]), Ok(None));
        for bad in [
            &b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"[..],
            b"PROXY TCP4 not-an-address 192.0.2.1 1 2\r\n",
            b"PROXY TCP4 203.0.113.7 192.0.2.1 99999 443\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 and so on, a TLS hello",
        ] {
            assert!(
                matches!(parse(bad), Err(HeaderError::Invalid(_))),
                "{:?}: {:?}",
                String::from_utf8_lossy(bad),
                parse(bad)
            );
        }
        let endless = [b'P'; MAX_HEADER];
        assert!(parse(&endless).is_err());
    }

    #[tokio::test]
    async fn what_follows_the_header_is_read_after_it() {
        let (mut client, server) = tokio::io::duplex(1024);
        let sent = b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 443\r\nGET / HTTP/1.1\r\n\r\n";
        tokio::io::AsyncWriteExt::write_all(&mut client, sent)
            .await
            .unwrap();
        drop(client);
        let (parsed, mut rest) = read(server).await.unwrap();
        assert_eq!(parsed.client, Some("203.0.113.7:51234".parse().unwrap()));
        let mut after = Vec::new();
        rest.read_to_end(&mut after).await.unwrap();
        assert_eq!(after, b"GET / HTTP/1.1\r\n\r\n");
    }
}
