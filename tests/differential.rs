//! The HTTP/1.1 engine against hyper's: random and mutated requests sent to one surge on
//! `proxy.engine = "surge"` and one on `proxy.engine = "hyper"`, in front of the same
//! recording blade. Both must give the same verdict (refused by surge, or passed on), and
//! what reaches the blade must be the same request: method, target, the headers surge
//! does not rewrite, and the body once de-framed.
//!
//! CI runs a short pass; the long run is
//! `SURGE_DIFF_CASES=100000 cargo test --release --test differential`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use surge::config::Config;

/// The health checks' path: their requests are not the test's.
const HEALTH_PATH: &str = "/__surge_health";

/// A request as the blade saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AtBlade {
    method: String,
    target: String,
    /// Lower-case names, in the order the blade got them (grouped by name, as hyper's
    /// `HeaderMap` holds them), without the fields surge writes itself.
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

/// Fields surge writes or removes itself (framing, hop-by-hop, forwarding), which the two
/// engines may write differently without the blade seeing a different request.
const REWRITTEN: &[&str] = &[
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-request-id",
    // Surge answers `Expect: 100-continue` itself (it reads the body before a blade is
    // picked); hyper's path passes the field on as well, the engine does not.
    "expect",
];

type Seen = Arc<Mutex<Vec<AtBlade>>>;

/// A blade (hyper's server) that records every request and answers 200 `blade`.
async fn recording_blade() -> (SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind blade");
    let addr = listener.local_addr().expect("blade address");
    let seen: Seen = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let log = log.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.map(|b| b.to_bytes().to_vec());
                        if parts.uri.path() != HEALTH_PATH {
                            let mut headers: Vec<(String, Vec<u8>)> = parts
                                .headers
                                .iter()
                                .filter(|(n, _)| !REWRITTEN.contains(&n.as_str()))
                                .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                                .collect();
                            // The order of different names is the sender's business;
                            // the order of one name's values is not.
                            headers.sort_by(|a, b| a.0.cmp(&b.0));
                            log.lock().expect("log").push(AtBlade {
                                method: parts.method.to_string(),
                                target: parts.uri.to_string(),
                                headers,
                                body: body.unwrap_or_else(|_| b"<broken body>".to_vec()),
                            });
                        }
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from_static(b"blade"),
                        )))
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

fn surge_config(engine: &str, blade: SocketAddr) -> Config {
    let text = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nworkers = 1\naccess_log = false\nengine = \"{engine}\"\n\
         shutdown_grace = \"2s\"\nbody_read_timeout = \"300ms\"\nheader_read_timeout = \"300ms\"\n\
         max_connections_per_ip = 0\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n[pool]\n[pool.health]\npath = \"{HEALTH_PATH}\"\n\
         [[pool.backends]]\nid = \"blade-1\"\naddress = \"{blade}\"\n"
    );
    Config::parse(&text, Path::new("differential.toml")).expect("test config is valid")
}

/// What a proxy did with one request.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    /// Passed on: this is what the blade got.
    Passed(AtBlade),
    /// Refused by surge with a status (or closed without an answer: 0).
    Refused(u16),
}

impl Verdict {
    fn refused(&self) -> bool {
        matches!(self, Verdict::Refused(_))
    }
}

/// Sends `raw` on a new connection and reads the first final answer (1xx skipped).
/// The connection is not half-closed: hyper's server drops a connection whose client
/// half-closed before it answered, which would be a difference of the test's making.
/// Requests that never complete wait for surge's (short) timeouts instead.
async fn verdict_of(
    proxy: SocketAddr,
    open: &dyn Fn() -> usize,
    seen: &Seen,
    raw: &[u8],
    head: bool,
) -> Verdict {
    seen.lock().expect("log").clear();
    let Ok(mut s) = tokio::net::TcpStream::connect(proxy).await else {
        return Verdict::Refused(0);
    };
    let _ = s.write_all(raw).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let status = loop {
        if let Some(status) = first_answer(&mut out, head) {
            break status;
        }
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break 0,
        }
    };
    // Whatever else was sent (pipelined requests) is done with before the next case:
    // the connection closed at surge, each request it forwarded is in the log.
    drop(s);
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while open() > 0 && std::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let at_blade = seen.lock().expect("log").first().cloned();
    match at_blade {
        Some(req) if status == 200 => Verdict::Passed(req),
        _ => Verdict::Refused(status),
    }
}

/// The status of the first final response once it is wholly in `out` (interim ones are
/// removed from `out`).
fn first_answer(out: &mut Vec<u8>, head_request: bool) -> Option<u16> {
    loop {
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut fields);
        let len = match resp.parse(out) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return None,
            Err(_) => return Some(0),
        };
        let code = resp.code.unwrap_or(0);
        if (100..200).contains(&code) {
            out.drain(..len);
            continue;
        }
        let length = resp
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| {
                std::str::from_utf8(h.value)
                    .ok()?
                    .trim()
                    .parse::<usize>()
                    .ok()
            })
            .unwrap_or(0);
        let body = if head_request { 0 } else { length };
        return (out.len() >= len + body).then_some(code);
    }
}

/// Requests made of plausible pieces: the methods, targets, versions and fields where
/// parsers and proxies have disagreed before (framing, Host, folding, odd bytes).
fn request() -> impl Strategy<Value = Vec<u8>> {
    let method = prop_oneof![
        12 => Just("GET"),
        6 => Just("POST"),
        1 => Just("PUT"),
        1 => Just("HEAD"),
        1 => Just("DELETE"),
        1 => Just("OPTIONS"),
        1 => Just("PATCH"),
        1 => Just("PURGE"),
        1 => Just("get"),
        1 => Just("G@T"),
        1 => Just(""),
    ];
    let target = prop_oneof![
        8 => Just("/".to_owned()),
        12 => "/[a-z0-9/._~%-]{0,20}(\\?[a-z0-9=&%+]{0,16})?",
        1 => Just("*".to_owned()),
        1 => Just("http://shop.example/cart?x=1".to_owned()),
        1 => Just("http://shop.example".to_owned()),
        1 => Just("https://shop.example:8443/a".to_owned()),
        1 => Just("//double/slash".to_owned()),
        1 => Just("/a b".to_owned()),
        1 => Just("/caf\u{e9}".to_owned()),
        1 => Just("shop.example:443".to_owned()),
        1 => Just("/#frag".to_owned()),
    ];
    let version = prop_oneof![
        16 => Just("HTTP/1.1"),
        3 => Just("HTTP/1.0"),
        1 => Just("HTTP/1.2"),
        1 => Just("HTTP/2.0"),
        1 => Just("http/1.1"),
        1 => Just("HTTP/1.1 "),
    ];
    let field = prop_oneof![
        1 => Just("host: shop.example".to_owned()),
        1 => Just("Host: other.example".to_owned()),
        1 => Just("host:".to_owned()),
        1 => Just("host: shop.example:8080".to_owned()),
        1 => Just("host: bad host".to_owned()),
        2 => Just("content-length: 5".to_owned()),
        1 => Just("content-length: 0".to_owned()),
        1 => Just("content-length: 05".to_owned()),
        1 => Just("content-length: 5, 5".to_owned()),
        1 => Just("content-length: 6".to_owned()),
        1 => Just("content-length: -1".to_owned()),
        1 => Just("content-length: +5".to_owned()),
        1 => Just("content-length: 5 ".to_owned()),
        2 => Just("transfer-encoding: chunked".to_owned()),
        1 => Just("Transfer-Encoding: CHUNKED".to_owned()),
        1 => Just("transfer-encoding: gzip, chunked".to_owned()),
        1 => Just("transfer-encoding: chunked, gzip".to_owned()),
        1 => Just("transfer-encoding: identity".to_owned()),
        1 => Just("transfer-encoding:chunked".to_owned()),
        1 => Just("connection: close".to_owned()),
        1 => Just("connection: keep-alive".to_owned()),
        1 => Just("connection: x-hop, close".to_owned()),
        1 => Just("x-hop: dropped".to_owned()),
        1 => Just("keep-alive: timeout=5".to_owned()),
        1 => Just("te: trailers".to_owned()),
        1 => Just("expect: 100-continue".to_owned()),
        1 => Just("expect: nonsense".to_owned()),
        1 => Just("x-forwarded-for: 203.0.113.9".to_owned()),
        1 => Just("x-request-id: abc-123".to_owned()),
        1 => Just("cookie: cart=42; surge_route=blade-1".to_owned()),
        1 => Just(" folded: continuation".to_owned()),
        1 => Just("bad header: space in name".to_owned()),
        1 => Just("x-empty:".to_owned()),
        1 => Just("x-tab:\tvalue\t".to_owned()),
        1 => Just("x-ctl: a\u{1}b".to_owned()),
        1 => Just("x-utf8: \u{e9}t\u{e9}".to_owned()),
        1 => Just(":colon: first".to_owned()),
        12 => "x-[a-z]{1,8}: [ -~]{0,16}",
    ];
    let body = prop_oneof![
        3 => Just(Vec::new()),
        3 => Just(b"hello".to_vec()),
        2 => Just(b"5\r\nhello\r\n0\r\n\r\n".to_vec()),
        1 => Just(b"5;ext=1\r\nhello\r\n0\r\nx-trailer: t\r\n\r\n".to_vec()),
        1 => Just(b"5\r\nhel".to_vec()),
        1 => Just(b"zz\r\nhello\r\n0\r\n\r\n".to_vec()),
        1 => Just(b"hel".to_vec()),
        1 => Just(b"hello, world".to_vec()),
        1 => Just(b"GET /next HTTP/1.1\r\nhost: shop.example\r\n\r\n".to_vec()),
    ];
    let newline = prop_oneof![8 => Just("\r\n"), 1 => Just("\n")];
    (
        method,
        target,
        version,
        proptest::collection::vec(field, 0..5),
        body,
        newline,
        // Most requests name their host first, as browsers do; some do not, or twice.
        prop_oneof![6 => Just(true), 1 => Just(false)],
        // A few bytes flipped anywhere (the mutations a fuzzer makes), in one in four.
        prop_oneof![
            3 => Just(Vec::new()),
            1 => proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..3),
        ],
    )
        .prop_map(|(method, target, version, fields, body, nl, host, flips)| {
            let mut raw = format!("{method} {target} {version}{nl}").into_bytes();
            if host {
                raw.extend_from_slice(b"Host: shop.example");
                raw.extend_from_slice(nl.as_bytes());
            }
            for f in fields {
                raw.extend_from_slice(f.as_bytes());
                raw.extend_from_slice(nl.as_bytes());
            }
            raw.extend_from_slice(nl.as_bytes());
            raw.extend_from_slice(&body);
            for (at, byte) in flips {
                let i = at.index(raw.len());
                raw[i] = byte;
            }
            raw
        })
}

#[test]
fn both_engines_refuse_the_same_requests_and_pass_on_the_same_ones() {
    let cases = std::env::var("SURGE_DIFF_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (blade, seen, ours, hypers) = runtime.block_on(async {
        let (blade, seen) = recording_blade().await;
        let ours = surge::serve::start(&surge_config("surge", blade))
            .await
            .expect("surge engine starts");
        let hypers = surge::serve::start(&surge_config("hyper", blade))
            .await
            .expect("hyper engine starts");
        (blade, seen, ours, hypers)
    });
    let _ = blade;
    let (a, b) = (ours.proxy.local_addr, hypers.proxy.local_addr);
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        max_shrink_iters: 500,
        ..ProptestConfig::default()
    });
    let passed = std::cell::Cell::new(0u32);
    let result = runner.run(&request(), |raw| {
        let head = raw.starts_with(b"HEAD ");
        let (mine, theirs) = runtime.block_on(async {
            (
                verdict_of(a, &|| ours.proxy.limits.open(), &seen, &raw, head).await,
                verdict_of(b, &|| hypers.proxy.limits.open(), &seen, &raw, head).await,
            )
        });
        let shown = String::from_utf8_lossy(&raw).into_owned();
        if mine.refused() != theirs.refused() {
            return Err(TestCaseError::fail(format!(
                "different verdicts for {shown:?}: surge engine {mine:?}, hyper {theirs:?}"
            )));
        }
        if mine != theirs && !mine.refused() {
            return Err(TestCaseError::fail(format!(
                "different requests at the blade for {shown:?}:\n surge engine {mine:?}\n hyper        {theirs:?}"
            )));
        }
        if !mine.refused() {
            passed.set(passed.get() + 1);
        }
        Ok(())
    });
    runtime.block_on(async {
        ours.stop().await;
        hypers.stop().await;
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // The generator must reach the blade often, or the comparison of requests is empty.
    // It reaches it for about 22% of its requests (116-144 of 600 seen over runs, the
    // seed being random): a floor of one in eight keeps that promise without failing one
    // run in eight on the draw, as a floor of one in five did.
    let passed = passed.get();
    eprintln!("{passed} of {cases} requests passed on by both engines, the rest refused by both");
    assert!(
        passed * 8 >= cases,
        "only {passed} of {cases} requests were passed on"
    );
}
