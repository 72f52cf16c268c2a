//! Hostile input and dying blades: what the internet and a shop's own infrastructure
//! throw at surge, each promise a test on real sockets (127.0.0.0/8, ports chosen at run
//! time), bounded in count and time.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use common::*;
use surge::config::Config;

/// A surge in front of `backends` (id, address) with extra `[proxy]` and `[pool]` keys.
fn surge_config(backends: &[(&str, SocketAddr)], proxy: &str, pool: &str) -> Config {
    let mut text = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nworkers = 2\naccess_log = false\nshutdown_grace = \"5s\"\n{proxy}\n[admin]\nlisten = \"127.0.0.1:0\"\n[pool]\n{pool}\n"
    );
    for (id, addr) in backends {
        text.push_str(&format!(
            "[[pool.backends]]\nid = \"{id}\"\naddress = \"{addr}\"\n"
        ));
    }
    Config::parse(&text, Path::new("test.toml")).expect("test config is valid")
}

/// Sends raw bytes, returns everything the proxy answered and whether it then closed the
/// connection (within 5 s).
async fn exchange(addr: SocketAddr, request: &[u8]) -> (String, bool) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    // The proxy may answer and close before it has read everything: that is fine.
    let _ = s.write_all(request).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            // A reset after the answer is a close too.
            Ok(Err(_)) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), false),
        }
    }
}

fn status_of(answer: &str) -> &str {
    answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .unwrap_or("none")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_4xx_close_the_connection_and_reach_no_blade() {
    let blade = blades(1, Duration::ZERO).await;
    let cfg = surge_config(
        &[("blade-1", blade[0].addr)],
        "max_uri_bytes = 1024\nmax_headers = 20\nmax_body_bytes = 1000\n",
        "",
    );
    let surge = surge::serve::start(&cfg).await.unwrap();
    let addr = surge.proxy.local_addr;
    let many_headers: String = (0..30).map(|i| format!("x-h{i}: v\r\n")).collect();
    let long_uri = format!("GET /{} HTTP/1.1\r\nhost: x\r\n\r\n", "a".repeat(2000));
    // Five 256-byte chunks: 1,280 bytes against a 1,000-byte limit.
    let big_chunks = format!(
        "POST /cart HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n{}0\r\n\r\n",
        format!("100\r\n{}\r\n", "a".repeat(256)).repeat(5)
    );
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("not HTTP", b"HELLO THERE\r\n\r\n".to_vec(), "400"),
        (
            "two different content-lengths",
            b"POST /cart HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab".to_vec(),
            "400",
        ),
        (
            "content-length not a number",
            b"POST /cart HTTP/1.1\r\nhost: x\r\ncontent-length: 1x\r\n\r\na".to_vec(),
            "400",
        ),
        (
            "transfer-encoding other than chunked",
            b"POST /cart HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip\r\n\r\nab".to_vec(),
            "400",
        ),
        (
            "chunked not last",
            b"POST /cart HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked, identity\r\n\r\n1\r\na\r\n0\r\n\r\n".to_vec(),
            "400",
        ),
        (
            "transfer-encoding on HTTP/1.0",
            b"POST /cart HTTP/1.0\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n".to_vec(),
            "400",
        ),
        (
            "malformed chunk size",
            b"POST /cart HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n".to_vec(),
            "400",
        ),
        (
            "chunk size overflowing 64 bits",
            b"POST /cart HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nfffffffffffffffffff\r\na\r\n0\r\n\r\n".to_vec(),
            "400",
        ),
        (
            "chunk longer than its size",
            b"POST /cart HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabcdef\r\n0\r\n\r\n".to_vec(),
            "400",
        ),
        (
            "obs-fold",
            b"GET / HTTP/1.1\r\nhost: x\r\nx-folded: a\r\n b\r\n\r\n".to_vec(),
            "400",
        ),
        (
            "bare CR",
            b"GET / HTTP/1.1\rhost: x\r\n\r\n".to_vec(),
            "400",
        ),
        (
            // RFC 9112 section 3.2: a Host that is not `host[:port]` gets 400.
            "Host that is no host",
            b"GET / HTTP/1.1\r\nhost: shop.example/admin\r\n\r\n".to_vec(),
            "400",
        ),
        (
            "Host with a space",
            b"GET / HTTP/1.1\r\nhost: shop.example evil\r\n\r\n".to_vec(),
            "400",
        ),
        (
            "space before colon",
            b"GET / HTTP/1.1\r\nhost : x\r\n\r\n".to_vec(),
            "400",
        ),
        (
            "NUL in a header value",
            b"GET / HTTP/1.1\r\nhost: x\r\nx-a: a\0b\r\n\r\n".to_vec(),
            "400",
        ),
        (
            "header section too large",
            [
                b"GET / HTTP/1.1\r\nhost: x\r\nx-big: ".to_vec(),
                vec![b'a'; 40_000],
                b"\r\n\r\n".to_vec(),
            ]
            .concat(),
            "431",
        ),
        (
            "too many header fields",
            format!("GET / HTTP/1.1\r\nhost: x\r\n{many_headers}\r\n").into_bytes(),
            "431",
        ),
        ("request target too long", long_uri.into_bytes(), "414"),
        (
            // Refused as soon as it is over the limit: not left waiting for the rest of
            // a head that would only be refused later, as too large (431).
            "request target too long, its line not ended yet",
            format!("GET /{}", "a".repeat(3000)).into_bytes(),
            "414",
        ),
        (
            "declared body too large",
            b"POST /cart HTTP/1.1\r\nhost: x\r\ncontent-length: 5000\r\n\r\nabc".to_vec(),
            "413",
        ),
        ("chunked body too large", big_chunks.into_bytes(), "413"),
        // Framing and routing rules hyper leaves to surge (RFC 9112 §3.2, §6.1).
        ("HTTP/1.1 without Host", b"GET / HTTP/1.1\r\n\r\n".to_vec(), "400"),
        (
            "two Host fields",
            b"GET / HTTP/1.1\r\nhost: a.example\r\nhost: b.example\r\n\r\n".to_vec(),
            "400",
        ),
        (
            // RFC 9110 section 15.6.6: another major version is not supported (505).
            "an HTTP/2.0 request line",
            b"GET / HTTP/2.0\r\nhost: x\r\n\r\n".to_vec(),
            "505",
        ),
        (
            // RFC 9110 section 4.2.4: userinfo in an http(s) target is an error.
            "absolute-form target with userinfo",
            b"GET http://shopper:pw@shop.example/ HTTP/1.1\r\nhost: shop.example\r\n\r\n".to_vec(),
            "400",
        ),
        (
            "chunked applied twice",
            b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec(),
            "400",
        ),
    ];
    let mut wrong = Vec::new();
    for (name, req, want) in &cases {
        let (answer, closed) = exchange(addr, req).await;
        let got = status_of(&answer);
        if got != *want || !closed {
            wrong.push(format!(
                "{name}: wanted {want} and a close, got {got} (closed: {closed}): {:?}",
                answer.lines().next()
            ));
        }
        assert_eq!(blade[0].served(), 0, "{name}: a blade saw the request");
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    let ok = get(&client(), addr, "/").await.unwrap();
    assert_eq!(ok.status, 200, "proxy still serves");
    assert_eq!(blade[0].served(), 1);
    // A well-formed chunked body is read whole and forwarded (with its length).
    let body = r#"{"product": 3, "qty": 2}"#;
    let chunked = format!(
        "POST /cart HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n{}\r\n{:x}\r\n{}\r\n0\r\n\r\n",
        10,
        &body[..10],
        body.len() - 10,
        &body[10..]
    );
    let (answer, _) = exchange(addr, chunked.as_bytes()).await;
    assert_eq!(status_of(&answer), "201", "{answer}");
    assert!(
        answer.contains("\"qty\":2") || answer.contains("\"qty\": 2"),
        "{answer}"
    );
    surge.stop().await;
}

/// `Content-Length` beside `Transfer-Encoding` is the classic desync. RFC 9112 §6.1 lets
/// a server either refuse it or frame by `Transfer-Encoding` alone and close the
/// connection afterwards; hyper does the latter. Either way what matters to a shop is
/// that the request hidden in the body never reaches a frontend as a request of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_smuggled_behind_content_length_and_chunked_never_reaches_a_blade() {
    let blade = blades(1, Duration::ZERO).await;
    let cfg = surge_config(&[("blade-1", blade[0].addr)], "", "");
    let surge = surge::serve::start(&cfg).await.unwrap();
    let addr = surge.proxy.local_addr;
    let smuggled = "GET /catalog HTTP/1.1\r\nhost: x\r\n\r\n";
    let attacks = [
        // CL.TE: a front end trusting Content-Length would pass the smuggled request on
        // inside the body; a back end trusting chunked would then run it.
        format!(
            "POST /cart HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}",
            5 + smuggled.len()
        ),
        // TE.CL, headers the other way round.
        format!(
            "POST /cart HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n{:x}\r\n{smuggled}\r\n0\r\n\r\n",
            smuggled.len()
        ),
    ];
    for (i, attack) in attacks.iter().enumerate() {
        let before = blade[0].served();
        let (answer, closed) = exchange(addr, attack.as_bytes()).await;
        assert!(closed, "attack {i}: connection left open");
        assert_eq!(
            answer.matches("HTTP/1.1 ").count(),
            1,
            "attack {i}: more than one response: {answer}"
        );
        assert!(
            blade[0].served() - before <= 1,
            "attack {i}: the blade ran the smuggled request"
        );
    }
    surge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_gets_408_and_a_connection_is_recycled_after_its_request_quota() {
    let blade = blades(1, Duration::ZERO).await;
    let cfg = surge_config(
        &[("blade-1", blade[0].addr)],
        "body_read_timeout = \"300ms\"\nmax_requests_per_connection = 3\n",
        "",
    );
    let surge = surge::serve::start(&cfg).await.unwrap();
    let addr = surge.proxy.local_addr;

    let (answer, closed) = exchange(
        addr,
        b"POST /cart HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nab",
    )
    .await;
    assert_eq!(status_of(&answer), "408", "{answer}");
    assert!(closed);
    assert_eq!(blade[0].served(), 0, "the half body reached the blade");

    // Three requests on one connection; the third answer says goodbye.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut closes = Vec::new();
    for _ in 0..3 {
        s.write_all(b"GET /catalog HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        closes.push(head.to_ascii_lowercase().contains("connection: close"));
        skip_body(&mut s, &head).await;
    }
    assert_eq!(closes, [false, false, true]);
    let mut rest = Vec::new();
    let eof = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(
        matches!(eof, Ok(Ok(0))),
        "connection not closed after the quota"
    );
    surge.stop().await;
}

/// Reads one response head (up to the blank line).
async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await {
            Ok(Ok(1)) => head.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

async fn skip_body(s: &mut TcpStream, head: &str) {
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.unwrap();
}

/// One kept-alive connection waits against three timeouts in turn (its first head, a
/// blade's answer, the idle time between requests), all kept by one timer per
/// connection: each wait must end at its own deadline, not at one armed for an earlier
/// or later wait. Here the header timeout (1 s) comes before the slow answer (1.5 s,
/// within the 3 s response timeout), and the idle timeout (2 s) counts from each answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_wait_of_a_kept_alive_connection_ends_at_its_own_deadline() {
    let blade = odd_blade().await;
    let cfg = surge_config(
        &[("odd", blade)],
        "header_read_timeout = \"1s\"\nresponse_timeout = \"3s\"\nidle_timeout = \"2s\"\n",
        "",
    );
    let surge = surge::serve::start(&cfg).await.unwrap();
    let mut s = TcpStream::connect(surge.proxy.local_addr).await.unwrap();
    let request = b"GET /slow HTTP/1.1\r\nHost: shop\r\n\r\n";

    // Past the header timeout, within the response timeout: answered, not cut.
    let sent = Instant::now();
    s.write_all(request).await.unwrap();
    let head = read_head(&mut s).await;
    assert_eq!(status_of(&head), "200", "the slow answer came: {head:?}");
    assert!(sent.elapsed() >= Duration::from_millis(1400));
    skip_body(&mut s, &head).await;

    // Idle for 1.2 s, within the 2 s idle timeout: the connection still serves. (Its
    // timer, armed for the first answer's deadline, fires while the second answer is
    // awaited, and must be set again for that one.)
    tokio::time::sleep(Duration::from_millis(1200)).await;
    s.write_all(request).await.unwrap();
    let head = read_head(&mut s).await;
    assert_eq!(
        status_of(&head),
        "200",
        "the kept-alive connection served: {head:?}"
    );
    skip_body(&mut s, &head).await;

    // Then nothing: closed after the idle timeout, counted from the last answer.
    let answered = Instant::now();
    let mut rest = Vec::new();
    let eof = tokio::time::timeout(Duration::from_secs(6), s.read_to_end(&mut rest)).await;
    assert!(
        matches!(eof, Ok(Ok(0))),
        "the idle connection is closed: {eof:?}"
    );
    let idle = answered.elapsed();
    assert!(
        idle >= Duration::from_millis(1800) && idle < Duration::from_millis(4500),
        "closed after {idle:?}, idle timeout 2 s"
    );
    surge.stop().await;
}

/// A client from a chosen loopback address (127.0.0.0/8 is all local on Linux).
async fn connect_from(source: [u8; 4], addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    socket.connect(addr).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_is_capped_in_connections_and_request_rate_and_others_are_not() {
    let blade = blades(1, Duration::ZERO).await;
    let cfg = surge_config(
        &[("blade-1", blade[0].addr)],
        "max_connections_per_ip = 5\nrequests_per_second_per_ip = 20\n",
        "",
    );
    let surge = surge::serve::start(&cfg).await.unwrap();
    let addr = surge.proxy.local_addr;

    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(connect_from([127, 0, 0, 2], addr).await.unwrap());
    }
    assert!(
        eventually(Duration::from_secs(2), || surge.proxy.limits.open() == 5).await,
        "5 connections counted"
    );
    let mut sixth = connect_from([127, 0, 0, 2], addr).await.unwrap();
    let mut answer = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), sixth.read_to_string(&mut answer)).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
    assert!(answer.contains("retry-after: 1"), "{answer}");
    // Another address is not affected.
    let mut other = connect_from([127, 0, 0, 3], addr).await.unwrap();
    other
        .write_all(b"GET /catalog HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(read_head(&mut other).await.starts_with("HTTP/1.1 200"));
    drop(other);
    // One closes: room again.
    drop(held.pop());
    assert!(eventually(Duration::from_secs(2), || surge.proxy.limits.open() == 4).await);
    let mut again = connect_from([127, 0, 0, 2], addr).await.unwrap();
    again
        .write_all(b"GET /catalog HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut again).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    skip_body(&mut again, &head).await;

    // Rate: 40 requests at once from one address; 20 per second pass, the rest get 429.
    let mut codes = Vec::new();
    for _ in 0..40 {
        again
            .write_all(b"GET /catalog HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut again).await;
        codes.push(status_of(&head).to_owned());
        skip_body(&mut again, &head).await;
    }
    let limited = codes.iter().filter(|c| *c == "429").count();
    let passed = codes.iter().filter(|c| *c == "200").count();
    assert_eq!(limited + passed, 40, "{codes:?}");
    assert!(
        (15..=25).contains(&passed),
        "about 20 in the second should pass: {codes:?}"
    );
    drop(held);
    drop(again);
    assert!(
        eventually(Duration::from_secs(2), || surge.proxy.limits.open() == 0).await,
        "connection count back to 0, is {}",
        surge.proxy.limits.open()
    );
    surge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_cut_off_while_shoppers_are_served() {
    let blade = blades(1, Duration::from_millis(1)).await;
    let cfg = surge_config(
        &[("blade-1", blade[0].addr)],
        "header_read_timeout = \"1s\"\n",
        "",
    );
    let surge = surge::serve::start(&cfg).await.unwrap();
    let addr = surge.proxy.local_addr;
    const SLOW: usize = 300;
    let cut_off = Arc::new(AtomicU64::new(0));
    let mut slow = Vec::new();
    for i in 0..SLOW {
        let cut_off = cut_off.clone();
        // Spread over 127.0.0.10-39, 10 connections each.
        let source = [127, 0, 0, 10 + (i / 10) as u8];
        slow.push(tokio::spawn(async move {
            let Ok(mut s) = connect_from(source, addr).await else {
                return;
            };
            let _ = s.write_all(b"GET / HTTP/1.1\r\n").await;
            // One header byte every 400 ms, for at most 4 s.
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(400)).await;
                if s.write_all(b"x").await.is_err() {
                    cut_off.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                let mut b = [0u8; 256];
                if let Ok(Ok(0) | Err(_)) =
                    tokio::time::timeout(Duration::from_millis(1), s.read(&mut b)).await
                {
                    cut_off.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }));
    }
    // Meanwhile a shopper browses.
    let c = client();
    let mut worst = Duration::ZERO;
    let mut served = 0;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let t = Instant::now();
        let r = get(&c, addr, "/catalog").await.expect("shopper request");
        assert_eq!(r.status, 200);
        worst = worst.max(t.elapsed());
        served += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for t in slow {
        let _ = t.await;
    }
    // The shopper's own keep-alive connection is not a slow one: it goes with the client.
    drop(c);
    let cut = cut_off.load(Ordering::Relaxed) as usize;
    eprintln!("slowloris: {cut}/{SLOW} cut off; shopper: {served} requests, worst {worst:?}");
    assert_eq!(
        cut, SLOW,
        "every slow connection is closed by the header timeout"
    );
    // The shopper never waited anywhere near the slow clients' timeout.
    assert!(
        worst < Duration::from_secs(1),
        "worst shopper request {worst:?}"
    );
    assert!(
        eventually(Duration::from_secs(2), || surge.proxy.limits.open() == 0).await,
        "connections left open: {}",
        surge.proxy.limits.open()
    );
    surge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_but_never_under_a_request() {
    let blade = blades(1, Duration::ZERO).await;
    let text = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\nh2c = true\n[proxy]\nworkers = 1\naccess_log = false\nidle_timeout = \"400ms\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n[pool]\n[[pool.backends]]\nid = \"blade-1\"\naddress = \"{}\"\n",
        blade[0].addr
    );
    let cfg = Config::parse(&text, Path::new("test.toml")).unwrap();
    let surge = surge::serve::start(&cfg).await.unwrap();
    let addr = surge.proxy.local_addr;
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let driver = tokio::spawn(conn);
    let request = || {
        http::Request::builder()
            .uri(format!("http://{addr}/catalog"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    // Busy: a request every 150 ms for 1.2 s, three idle timeouts' worth, one connection.
    for _ in 0..8 {
        let r = sender
            .send_request(request())
            .await
            .expect("kept open while busy");
        assert_eq!(r.status(), 200);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // A request slower than the idle timeout still gets its answer.
    blade[0].set_latency(Duration::from_millis(1000));
    let r = sender
        .send_request(request())
        .await
        .expect("slow request answered");
    assert_eq!(r.status(), 200);
    // Then, idle: surge closes the connection by itself.
    let closed = tokio::time::timeout(Duration::from_secs(5), driver).await;
    assert!(closed.is_ok(), "idle HTTP/2 connection still open");
    assert!(
        eventually(Duration::from_secs(2), || surge.proxy.limits.open() == 0).await,
        "connection count back to 0"
    );
    surge.stop().await;
}

/// A fake frontend misbehaving in one way.
#[derive(Clone, Copy)]
enum Misbehaviour {
    /// Reads the request, never answers.
    Silent,
    /// Answers with bytes that are not HTTP.
    Garbage,
    /// Answers with a head whose framing cannot be trusted (`Content-Length` that is not
    /// a number): no byte of it may reach the shopper.
    BadLength,
    /// Reads the request and closes: killed before answering.
    Dies,
    /// Sends a response head and half the body, then closes: killed mid-response.
    DiesMidBody,
    /// Sends a response head and half the body, then sends nothing more (stays open).
    StallsMidBody,
    /// Sends a chunked body without end, as fast as it is taken; counts once more in
    /// `seen` when the connection is closed under it.
    Endless,
}

/// Starts a fake frontend on 127.0.0.1; answers `/healthz` properly so health checks keep
/// it in, misbehaves on everything else. Returns its address and a count of requests.
async fn bad_blade(how: Misbehaviour) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicU64::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16384];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                if got.starts_with(b"GET /healthz") {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n")
                        .await;
                    return;
                }
                count.fetch_add(1, Ordering::Relaxed);
                match how {
                    Misbehaviour::Silent => {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                    Misbehaviour::Garbage => {
                        let _ = s.write_all(b"SPAM SPAM SPAM\r\n\r\n").await;
                    }
                    Misbehaviour::BadLength => {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4x\r\n\r\nbody")
                            .await;
                    }
                    Misbehaviour::Dies => {}
                    Misbehaviour::DiesMidBody => {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\nhalf")
                            .await;
                    }
                    Misbehaviour::StallsMidBody => {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\nhalf")
                            .await;
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                    Misbehaviour::Endless => {
                        let chunk = format!("4000\r\n{}\r\n", "x".repeat(0x4000));
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                            .await;
                        // Bounded: 4 GiB, far more than any socket buffer holds.
                        for _ in 0..(1 << 18) {
                            if s.write_all(chunk.as_bytes()).await.is_err() {
                                count.fetch_add(1, Ordering::Relaxed);
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dying_silent_garbage_misframed_blades_give_clean_errors_and_nothing_leaks() {
    let good = blades(1, Duration::ZERO).await;
    for (how, name, post_status) in [
        (Misbehaviour::Garbage, "garbage", 502),
        (Misbehaviour::BadLength, "bad content-length", 502),
        (Misbehaviour::Dies, "dies", 502),
        (Misbehaviour::Silent, "silent", 504),
    ] {
        let (bad, seen) = bad_blade(how).await;
        let cfg = surge_config(
            &[("bad", bad), ("blade-1", good[0].addr)],
            "response_timeout = \"500ms\"\n",
            "algorithm = \"round-robin\"\n[pool.ejection]\nconsecutive_failures = 2\nbase_time = \"30s\"\n",
        );
        let surge = surge::serve::start(&cfg).await.unwrap();
        let addr = surge.proxy.local_addr;
        let c = client();
        // Until the bad one is ejected, a POST that lands there gets surge's own error.
        let mut posts = Vec::new();
        for _ in 0..4 {
            let r = send(&c, http::Method::POST, addr, "/checkout", &[], "")
                .await
                .unwrap();
            posts.push(r.status.as_u16());
        }
        assert!(
            posts.contains(&post_status),
            "{name}: a POST to the bad blade gets {post_status}: {posts:?}"
        );
        assert!(
            posts.iter().all(|s| *s == post_status || *s == 409),
            "{name}: {posts:?} (409 = the good blade: no cart)"
        );
        // GETs are idempotent: retried on the good blade when the bad one fails them
        // (a silent blade costs its timeout, and then the shopper its 504: a request
        // that may be in progress is not sent twice).
        let mut gets = Vec::new();
        for _ in 0..10 {
            gets.push(get(&c, addr, "/catalog").await.unwrap().status.as_u16());
        }
        match how {
            Misbehaviour::Silent => assert!(gets.iter().all(|s| *s == 200 || *s == 504)),
            _ => assert!(gets.iter().all(|s| *s == 200), "{name}: {gets:?}"),
        }
        let ejected = surge
            .pool
            .snapshot()
            .get("bad")
            .map(|m| m.state != surge::pool::State::InService);
        assert_eq!(ejected, Some(true), "{name}: bad blade ejected");
        assert!(seen.load(Ordering::Relaxed) > 0);
        let counters_zero = eventually(Duration::from_secs(3), || {
            surge
                .pool
                .snapshot()
                .members()
                .iter()
                .all(|m| m.backend.in_flight() == 0)
        })
        .await;
        assert!(counters_zero, "{name}: in-flight counters back to 0");
        drop(c);
        assert!(
            eventually(Duration::from_secs(3), || surge.proxy.limits.open() == 0).await,
            "{name}: shopper connections back to 0"
        );
        surge.stop().await;
    }
}

/// A frontend answering in legal but unusual ways, by path, on kept-alive connections:
/// `/hints` a 103 Early Hints and the answer in one write, `/both` an answer framed
/// both chunked and by length, `/nocontent` a 204 with a length, `/slow` an answer after
/// 1.5 s.
async fn odd_blade() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16384];
                let mut got = Vec::new();
                loop {
                    let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&got[..end]).into_owned();
                    got.drain(..end + 4);
                    let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
                    if path == "/slow" {
                        tokio::time::sleep(Duration::from_millis(1500)).await;
                    }
                    let answer: &[u8] = match path.as_str() {
                        "/hints" => b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                        "/both" => b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
                        "/nocontent" => b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n",
                        _ => b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n",
                    };
                    if s.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Interim answers reach the shopper ahead of the answer (RFC 9110 section 15.2; a 103
/// lets the browser fetch styles while the page is made), even when both came in one
/// read (which left the request waiting for its timeout before), and never reach an
/// HTTP/1.0 client. An answer framed two ways loses its `Content-Length` (RFC 9112
/// section 6.3: a shopper trusting it would read the next answer out of this one's
/// body), and a 204 its length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interim_answers_are_passed_on_and_doubly_framed_ones_lose_their_length() {
    let blade = odd_blade().await;
    let cfg = surge_config(&[("odd", blade)], "response_timeout = \"3s\"\n", "");
    let surge = surge::serve::start(&cfg).await.unwrap();
    let addr = surge.proxy.local_addr;
    let (out, closed) = exchange(
        addr,
        b"GET /hints HTTP/1.1\r\nhost: x\r\n\r\nGET /both HTTP/1.1\r\nhost: x\r\n\r\nGET /nocontent HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(closed, "closed after the last request: {out}");
    let answers: Vec<&str> = out.split("HTTP/1.1 ").filter(|a| !a.is_empty()).collect();
    let statuses: Vec<&str> = answers.iter().map(|a| a.get(..3).unwrap_or(a)).collect();
    assert_eq!(statuses, ["103", "200", "200", "204"], "{out}");
    assert_eq!(
        answers[0], "103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n",
        "the hints as the blade gave them"
    );
    assert!(answers[1].ends_with("\r\n\r\nok"), "{out}");
    let both = answers[2].to_ascii_lowercase();
    assert!(!both.contains("content-length"), "{out}");
    assert!(both.contains("transfer-encoding: chunked\r\n"), "{out}");
    assert!(both.ends_with("\r\n\r\n2\r\nok\r\n0\r\n\r\n"), "{out}");
    assert!(
        !answers[3].to_ascii_lowercase().contains("content-length"),
        "{out}"
    );
    let (out, _) = exchange(addr, b"GET /hints HTTP/1.0\r\nhost: x\r\n\r\n").await;
    assert!(
        out.starts_with("HTTP/1.1 200 OK\r\n"),
        "no 1xx to HTTP/1.0: {out}"
    );
    assert!(out.ends_with("\r\n\r\nok"), "{out}");
    surge.stop().await;
}

/// HTTP/1.0 clients that ask for `Connection: keep-alive` (ApacheBench's `-k`, older
/// monitoring agents, some embedded devices) keep their connection when the answer has
/// a length, and are told so; the answer keeps its `Content-Length`, which is how an
/// HTTP/1.0 client tells a whole body from a cut one. A chunked answer cannot reach
/// HTTP/1.0 as such: it is de-chunked and the close ends it. Both engines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_1_0_client_keeps_its_connection_when_it_asks_and_the_length_allows() {
    let blade = odd_blade().await;
    for engine in ["surge", "hyper"] {
        let cfg = surge_config(&[("odd", blade)], &format!("engine = \"{engine}\"\n"), "");
        let surge = surge::serve::start(&cfg).await.unwrap();
        let addr = surge.proxy.local_addr;
        let (out, closed) = exchange(
            addr,
            b"GET /a HTTP/1.0\r\nconnection: keep-alive\r\n\r\nGET /b HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\nGET /c HTTP/1.0\r\n\r\n",
        )
        .await;
        // hyper answers in the client's version, surge in its own (RFC 9110 §2.5
        // allows both).
        let out = out.replace("HTTP/1.0 ", "HTTP/1.1 ");
        let answers: Vec<String> = out
            .split("HTTP/1.1 ")
            .filter(|a| !a.is_empty())
            .map(str::to_ascii_lowercase)
            .collect();
        assert_eq!(
            answers.len(),
            3,
            "{engine}: three answers on one connection: {out}"
        );
        for a in &answers[..2] {
            assert!(a.starts_with("200 ok\r\n"), "{engine}: {out}");
            assert!(
                a.contains("\r\nconnection: keep-alive\r\n"),
                "{engine}: {out}"
            );
            assert!(a.contains("\r\ncontent-length: 3\r\n"), "{engine}: {out}");
            assert!(a.ends_with("\r\n\r\nok\n"), "{engine}: {out}");
        }
        assert!(
            answers[2].contains("\r\ncontent-length: 3\r\n"),
            "{engine}: {out}"
        );
        assert!(
            !answers[2].contains("keep-alive"),
            "{engine}: the last did not ask: {out}"
        );
        assert!(
            closed,
            "{engine}: closed after the request that did not ask: {out}"
        );

        let (out, closed) = exchange(
            addr,
            b"GET /both HTTP/1.0\r\nconnection: keep-alive\r\n\r\n",
        )
        .await;
        let lower = out.to_ascii_lowercase().replace("http/1.0 ", "http/1.1 ");
        assert!(lower.starts_with("http/1.1 200 ok\r\n"), "{engine}: {out}");
        assert!(
            !lower.contains("transfer-encoding") && !lower.contains("content-length"),
            "{engine}: {out}"
        );
        assert!(lower.ends_with("\r\n\r\nok"), "{engine}: de-chunked: {out}");
        assert!(
            closed,
            "{engine}: a body without a length ends with the close"
        );
        surge.stop().await;
    }
}

/// `Expect: 100-continue`: an HTTP/1.1 client that waits for the go-ahead before its
/// body (curl does for bodies over 1 MiB, and so do many mobile HTTP stacks) gets a
/// `100 Continue`, then its answer; an HTTP/1.0 client never gets a 1xx (RFC 9110
/// §10.1.1, §15.2), and is answered once its body is in. Both engines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_expecting_100_continue_gets_it_on_http_1_1_and_never_on_1_0() {
    let blade = blades(1, Duration::ZERO).await;
    let body = r#"{"product": 3, "qty": 2}"#;
    for engine in ["surge", "hyper"] {
        let cfg = surge_config(
            &[("blade-1", blade[0].addr)],
            &format!("engine = \"{engine}\"\n"),
            "",
        );
        let surge = surge::serve::start(&cfg).await.unwrap();
        let addr = surge.proxy.local_addr;
        for version in ["1.1", "1.0"] {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let head = format!(
                "POST /cart HTTP/{version}\r\nhost: x\r\ncontent-length: {}\r\nexpect: 100-continue\r\nconnection: close\r\n\r\n",
                body.len()
            );
            s.write_all(head.as_bytes()).await.unwrap();
            let mut buf = [0u8; 4096];
            let first = tokio::time::timeout(Duration::from_millis(700), s.read(&mut buf)).await;
            match (version, first) {
                ("1.1", Ok(Ok(n))) => assert_eq!(
                    &buf[..n],
                    b"HTTP/1.1 100 Continue\r\n\r\n",
                    "{engine}: the go-ahead, alone"
                ),
                ("1.1", other) => panic!("{engine}: no 100 Continue: {other:?}"),
                (_, Ok(Ok(n))) => panic!(
                    "{engine}: HTTP/1.0 got {:?} before sending its body",
                    String::from_utf8_lossy(&buf[..n])
                ),
                // Nothing yet: the HTTP/1.0 client sends its body on its own.
                (_, _) => {}
            }
            s.write_all(body.as_bytes()).await.unwrap();
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
            let answer = String::from_utf8_lossy(&answer);
            assert!(
                answer.starts_with("HTTP/1.1 201") || answer.starts_with("HTTP/1.0 201"),
                "{engine} HTTP/{version}: {answer}"
            );
            assert!(
                answer.contains("\"qty\""),
                "{engine} HTTP/{version}: {answer}"
            );
        }
        surge.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blade_dying_mid_body_cuts_the_response_visibly_and_leaks_nothing() {
    let (bad, _) = bad_blade(Misbehaviour::DiesMidBody).await;
    let cfg = surge_config(&[("bad", bad)], "", "");
    let surge = surge::serve::start(&cfg).await.unwrap();
    let addr = surge.proxy.local_addr;
    // The head was sent already: the shopper must see a broken body, never a short
    // one passed off as complete.
    let r = get(&client(), addr, "/catalog").await;
    assert!(r.is_err(), "a truncated body looked complete: {r:?}");
    let zero = eventually(Duration::from_secs(3), || {
        surge
            .pool
            .snapshot()
            .get("bad")
            .is_some_and(|m| m.backend.in_flight() == 0)
    })
    .await;
    assert!(zero, "in-flight count back to 0");
    assert!(eventually(Duration::from_secs(3), || surge.proxy.limits.open() == 0).await);
    surge.stop().await;
}

/// `proxy.body_idle_timeout` in both directions: a blade that stalls mid-body, and a
/// shopper who stops reading, are each cut within it and give back the blade's
/// in-flight slot and connection; a shopper reading slowly but steadily is not cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_in_either_direction_is_cut_and_leaks_nothing() {
    let in_flight_zero = |surge: &surge::serve::Running| {
        surge
            .pool
            .snapshot()
            .members()
            .iter()
            .all(|m| m.backend.in_flight() == 0)
    };
    let ask = b"GET /catalog HTTP/1.1\r\nhost: shop\r\n\r\n";

    // The blade stops sending: the shopper sees a cut body within about a second.
    let (stalling, _) = bad_blade(Misbehaviour::StallsMidBody).await;
    let cfg = surge_config(&[("stalls", stalling)], "body_idle_timeout = \"1s\"\n", "");
    let surge = surge::serve::start(&cfg).await.unwrap();
    let sent = Instant::now();
    let (answer, closed) = exchange(surge.proxy.local_addr, ask).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        closed && answer.ends_with("half"),
        "the stalled body was not cut: {answer:?}"
    );
    assert!(sent.elapsed() < Duration::from_secs(5));
    assert!(eventually(Duration::from_secs(3), || in_flight_zero(&surge)).await);
    surge.stop().await;

    // The shopper stops reading an endless body: surge gives up on it, closes the blade's
    // connection and the shopper's, and counts nothing in flight.
    let (endless, seen) = bad_blade(Misbehaviour::Endless).await;
    let cfg = surge_config(&[("endless", endless)], "body_idle_timeout = \"1s\"\n", "");
    let surge = surge::serve::start(&cfg).await.unwrap();
    let mut stuck = TcpStream::connect(surge.proxy.local_addr).await.unwrap();
    stuck.write_all(ask).await.unwrap();
    assert!(
        eventually(Duration::from_secs(15), || seen.load(Ordering::Relaxed)
            == 2)
        .await,
        "the blade's connection was never closed under the stuck shopper"
    );
    assert!(eventually(Duration::from_secs(3), || in_flight_zero(&surge)).await);
    assert!(eventually(Duration::from_secs(3), || surge.proxy.limits.open() == 0).await);

    // A slower but steady reader (1 MiB every 250 ms for 3 s) is never idle for 1 s.
    // (Not much slower: the kernel wakes a writer only once about a third of its send
    // buffer, which grows to megabytes on loopback, is free.)
    let mut slow = TcpStream::connect(surge.proxy.local_addr).await.unwrap();
    slow.write_all(ask).await.unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(250)).await;
        tokio::time::timeout(Duration::from_secs(1), slow.read_exact(&mut buf))
            .await
            .expect("data keeps coming")
            .expect("a steady reader was cut");
    }
    assert_eq!(
        seen.load(Ordering::Relaxed),
        3,
        "the steady reader's body still flows"
    );
    drop(slow);
    drop(stuck);
    surge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_target_decides_host_and_connection_cannot_strip_framing() {
    let blade = blades(1, Duration::ZERO).await;
    let cfg = surge_config(&[("blade-1", blade[0].addr)], "", "");
    let surge = surge::serve::start(&cfg).await.unwrap();
    let addr = surge.proxy.local_addr;
    // Absolute form: its authority replaces Host (RFC 9112 §3.2.2).
    let (answer, _) = exchange(
        addr,
        b"GET http://shop.example/debug/headers HTTP/1.1\r\nhost: other.example\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains("shop.example") && !answer.contains("other.example"),
        "{answer}"
    );
    // Connection naming Host and Content-Length strips neither.
    let (answer, _) = exchange(
        addr,
        b"GET /debug/headers HTTP/1.1\r\nhost: shop.example\r\ncontent-length: 2\r\nconnection: host, content-length, close\r\n\r\nhi",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains("shop.example"),
        "Host was stripped: {answer}"
    );
    surge.stop().await;
}

/// The route cookie cannot be forged: an unsigned, altered, expired or foreign-key cookie
/// is ignored (the cart goes where the hash ring puts it, and gets a signed cookie), and
/// a signed cookie without its cart pins nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_expired_or_cartless_route_cookie_pins_nothing() {
    use surge::proxy::route::RouteSigner;
    let blades = blades(3, Duration::ZERO).await;
    let mut cfg = config(
        &blades,
        "algorithm = \"round-robin\"\n[pool.sticky]\ncookie = \"cart\"\nroute_ttl = \"1h\"\n",
    );
    let key = b"0123456789abcdef0123456789abcdef-test".to_vec();
    if let Some(s) = cfg.pool.sticky.as_mut() {
        s.route_key = Some(key.clone());
    }
    let surge = surge::serve::start(&cfg).await.unwrap();
    let c = client();
    let addr = surge.proxy.local_addr;
    let signer = RouteSigner::new(&key, None, Duration::from_secs(3600));
    let other = RouteSigner::new(&[9; 32], None, Duration::from_secs(3600));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let via = |cookies: String| {
        let c = c.clone();
        async move {
            send(
                &c,
                http::Method::GET,
                addr,
                "/catalog",
                &[("cookie", &cookies)],
                "",
            )
            .await
            .unwrap()
        }
    };
    let mut tried = 0;
    for n in 0..12 {
        let cart = format!("cart-{n}");
        let home = via(format!("cart={cart}")).await.blade();
        let target = blades
            .iter()
            .map(|b| b.id.clone())
            .find(|id| *id != home)
            .unwrap();
        // A valid cookie does move the cart (the control).
        let signed = signer.issue(&target, now);
        assert_eq!(
            via(format!("cart={cart}; surge_route={signed}"))
                .await
                .blade(),
            target
        );
        let third = blades
            .iter()
            .map(|b| b.id.clone())
            .find(|id| *id != home && *id != target)
            .unwrap();
        let last = if signed.ends_with('0') { "1" } else { "0" };
        let forged = [
            // Unsigned, as before signing.
            target.clone(),
            // Another node's id under this one's signature.
            format!("{third}{}", &signed[target.len()..]),
            // The signature altered.
            format!("{}{last}", &signed[..signed.len() - 1]),
            // Expired an hour ago.
            signer.issue(&target, now - 7200),
            // Signed with a key that is not this pool's.
            other.issue(&target, now),
        ];
        for f in forged {
            let r = via(format!("cart={cart}; surge_route={f}")).await;
            assert_eq!(r.blade(), home, "cookie {f} moved cart {cart}");
            let reissued = r.set_cookie("surge_route").unwrap_or_default();
            assert!(
                signer
                    .verify(&reissued, now)
                    .is_some_and(|v| v.backend == home),
                "no signed cookie for the cart's blade after {f}: {reissued}"
            );
            tried += 1;
        }
    }
    assert!(tried >= 60);
    // Signed, but without its cart: round robin goes on as if there were no cookie.
    let pinned = signer.issue(&blades[0].id, now);
    let mut seen = std::collections::HashMap::new();
    for _ in 0..30 {
        let r = via(format!("surge_route={pinned}")).await;
        *seen.entry(r.blade()).or_insert(0) += 1;
    }
    assert_eq!(
        seen.len(),
        3,
        "a cartless route cookie pinned requests: {seen:?}"
    );
    surge.stop().await;
}

/// HTTP/2 by hand: frames on a raw socket (h2c with prior knowledge on the plain
/// listener), for the abuse no well-behaved client library would send.
mod h2raw {
    use super::*;

    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const GOAWAY: u8 = 0x7;
    pub const CONTINUATION: u8 = 0x9;
    pub const END_STREAM: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// `GET /catalog` for authority `shop.test`, HPACK without the dynamic table.
    pub fn get_block() -> Vec<u8> {
        let mut b = vec![0x82, 0x86]; // :method GET, :scheme http
        b.push(0x04); // :path, literal without indexing, name index 4
        b.push(8);
        b.extend_from_slice(b"/catalog");
        b.push(0x01); // :authority, literal without indexing, name index 1
        b.push(9);
        b.extend_from_slice(b"shop.test");
        b
    }

    /// A literal header `x-pad-N: <n bytes>` (never indexed, new name).
    pub fn pad_header(i: usize, n: usize) -> Vec<u8> {
        let name = format!("x-pad-{i}");
        let mut b = vec![0x10, name.len() as u8];
        b.extend_from_slice(name.as_bytes());
        // Length as an HPACK integer with a 7-bit prefix.
        if n < 127 {
            b.push(n as u8);
        } else {
            b.push(127);
            let mut rest = n - 127;
            while rest >= 128 {
                b.push((rest % 128) as u8 | 0x80);
                rest /= 128;
            }
            b.push(rest as u8);
        }
        b.extend(std::iter::repeat_n(b'a', n));
        b
    }

    pub async fn open(addr: SocketAddr) -> TcpStream {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(PREFACE).await.unwrap();
        s.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
        s
    }

    /// Frames the server sends until it closes or `limit` passes: (type, flags, stream,
    /// payload).
    pub async fn read_frames(s: &mut TcpStream, limit: Duration) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let until = tokio::time::Instant::now() + limit;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16384];
        loop {
            while buf.len() >= 9 {
                let len =
                    (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
                if buf.len() < 9 + len {
                    break;
                }
                let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
                out.push((buf[3], buf[4], stream, buf[9..9 + len].to_vec()));
                buf.drain(..9 + len);
            }
            if out.iter().any(|f| f.0 == GOAWAY) {
                return out;
            }
            match tokio::time::timeout_at(until, s.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return out,
                Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// HTTP/2 abuse ends in a clean GOAWAY or stream error while other shoppers are served:
/// the server's limits are announced; rapid reset (streams opened and reset at once,
/// thousands of them) and a CONTINUATION flood end the connection; an oversized header
/// list is refused and never reaches the frontend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_abuse_ends_cleanly_while_others_are_served() {
    use h2raw::*;
    let blade = blades(1, Duration::ZERO).await;
    let text = format!(
        "[proxy]\nworkers = 2\naccess_log = false\nshutdown_grace = \"5s\"\nmax_header_bytes = 8192\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n[[listeners]]\nlisten = \"127.0.0.1:0\"\nh2c = true\n\
         [pool]\n[[pool.backends]]\nid = \"web-1\"\naddress = \"{}\"\n",
        blade[0].addr
    );
    let cfg = Config::parse(&text, Path::new("h2.toml")).expect("valid test config");
    let surge = surge::serve::start(&cfg).await.unwrap();
    let addr = surge.proxy.local_addr;
    let served = || surge.pool.snapshot().members()[0].backend.requests();

    // Limits announced in the server's SETTINGS: MAX_CONCURRENT_STREAMS (0x3) = 128 and
    // MAX_HEADER_LIST_SIZE (0x6) = 8192.
    let mut s = open(addr).await;
    let frames = read_frames(&mut s, Duration::from_millis(500)).await;
    let settings = frames
        .iter()
        .find(|f| f.0 == SETTINGS && f.1 & 1 == 0)
        .expect("server SETTINGS");
    let value = |id: u16| {
        settings.3.chunks(6).find_map(|c| {
            (u16::from_be_bytes([c[0], c[1]]) == id)
                .then(|| u32::from_be_bytes([c[2], c[3], c[4], c[5]]))
        })
    };
    assert_eq!(value(0x3), Some(128), "{settings:?}");
    assert_eq!(value(0x6), Some(8192), "{settings:?}");
    drop(s);

    // A well-behaved shopper keeps being served throughout.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let shopper = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let c = client();
            let (mut ok, mut bad) = (0, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match get(&c, addr, "/catalog").await {
                    Ok(r) if r.status == 200 => ok += 1,
                    Ok(r) => bad.push(r.status.to_string()),
                    Err(e) => bad.push(e.to_string()),
                }
            }
            (ok, bad)
        })
    };

    // Rapid reset: 5,000 streams, each opened and cancelled at once, in one burst.
    let mut s = open(addr).await;
    let mut burst = Vec::new();
    for i in 0..5_000u32 {
        let id = 2 * i + 1;
        burst.extend(frame(HEADERS, END_HEADERS | END_STREAM, id, &get_block()));
        burst.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
    }
    let _ = s.write_all(&burst).await;
    let frames = read_frames(&mut s, Duration::from_secs(5)).await;
    let goaway = frames.iter().find(|f| f.0 == GOAWAY);
    assert!(
        goaway.is_some(),
        "no GOAWAY after a rapid-reset burst: {} frames",
        frames.len()
    );
    let code = goaway.map(|g| u32::from_be_bytes([g.3[4], g.3[5], g.3[6], g.3[7]]));
    assert_eq!(code, Some(0xb), "GOAWAY ENHANCE_YOUR_CALM");
    assert!(served() < 5_000, "every reset stream reached the frontend");
    // The shopper goes on being served after the abusive connection is gone.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, bad) = shopper.await.unwrap();
    assert!(bad.is_empty(), "the other shopper failed: {bad:?}");
    assert!(ok > 10, "the other shopper was served: {ok}");

    // CONTINUATION flood: one header block that never ends, far past the header limit.
    let before = served();
    let mut s = open(addr).await;
    let _ = s
        .write_all(&frame(HEADERS, END_STREAM, 1, &get_block()))
        .await;
    let mut flood = Vec::new();
    for i in 0..2_000 {
        flood.extend(frame(CONTINUATION, 0, 1, &pad_header(i, 100)));
    }
    let _ = s.write_all(&flood).await;
    let frames = read_frames(&mut s, Duration::from_secs(5)).await;
    let calm = frames.iter().find(|f| f.0 == GOAWAY).map(|g| g.3[7]);
    assert_eq!(
        calm,
        Some(0xb),
        "a CONTINUATION flood must end in GOAWAY ENHANCE_YOUR_CALM: {frames:?}"
    );
    assert_eq!(
        served(),
        before,
        "a flooded header block reached the frontend"
    );

    // One header list over 8 KiB: refused (431 or a stream reset), nothing forwarded.
    let mut s = open(addr).await;
    let mut block = get_block();
    block.extend(pad_header(0, 12_000));
    let _ = s
        .write_all(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &block))
        .await;
    let frames = read_frames(&mut s, Duration::from_secs(2)).await;
    let refused = frames.iter().any(|f| {
        (f.0 == HEADERS && f.2 == 1 && f.3.first() != Some(&0x88))
            || (f.0 == RST_STREAM && f.2 == 1)
            || f.0 == GOAWAY
    });
    assert!(
        refused,
        "an oversized header list was not refused: {frames:?}"
    );
    assert_eq!(
        served(),
        before,
        "an oversized header list reached the frontend"
    );
    let r = get(&client(), addr, "/catalog").await.unwrap();
    assert_eq!(r.status, 200, "surge still serves after the abuse");
    surge.stop().await;
}

/// Request bodies held in memory are bounded process-wide: with two slow uploads holding
/// the budget, a third waits about a second and gets 503 with `Retry-After` (nothing
/// forwarded); once one upload finishes, the next fits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_uploads_cannot_take_all_the_memory() {
    let blade = blades(1, Duration::ZERO).await;
    let cfg = surge_config(
        &[("web-1", blade[0].addr)],
        "max_body_bytes = 65536\nmax_buffered_body_bytes = 100000\nbody_read_timeout = \"20s\"",
        "",
    );
    let surge = surge::serve::start(&cfg).await.unwrap();
    let addr = surge.proxy.local_addr;
    let served = || surge.pool.snapshot().members()[0].backend.requests();
    let head = |len: usize| {
        format!("POST /cart HTTP/1.1\r\nhost: shop.test\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n\r\n")
    };
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(head(40_000).as_bytes()).await.unwrap();
        s.write_all(&[b' '; 1000]).await.unwrap();
        slow.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = served();
    let asked = Instant::now();
    let (answer, closed) = exchange(
        addr,
        format!("{}{}", head(40_000), " ".repeat(40_000)).as_bytes(),
    )
    .await;
    let waited = asked.elapsed();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
    assert!(closed, "the refused upload's connection stays open");
    assert!(
        waited >= Duration::from_millis(900),
        "no wait for room: {waited:?}"
    );
    assert_eq!(served(), before, "a refused upload reached the frontend");
    // One slow upload finishes: its bytes go back, and the next upload fits.
    let mut done = slow.remove(0);
    done.write_all(&[b' '; 39_000]).await.unwrap();
    let mut first_line = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), done.read_exact(&mut first_line))
        .await
        .expect("the finished upload is answered")
        .unwrap();
    assert!(first_line.starts_with(b"HTTP/1.1 "), "{first_line:?}");
    drop(done);
    let (answer, _) = exchange(
        addr,
        format!("{}{}", head(40_000), " ".repeat(40_000)).as_bytes(),
    )
    .await;
    assert!(
        !answer.starts_with("HTTP/1.1 503"),
        "no room after an upload ended: {answer}"
    );
    drop(slow);
    surge.stop().await;
}

/// The budget is a ceiling for bodies of every framing: a chunked upload (no declared
/// length) is counted as its chunks come, not after it is all in memory. Two unfinished
/// chunked uploads of 3 MiB under a 4 MiB budget: one is refused (503) while it is still
/// sending. Before, each reserved 64 KiB and both were held whole. Both engines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_uploads_are_held_to_the_body_budget_as_they_come() {
    let blade = blades(1, Duration::ZERO).await;
    for engine in [surge::config::Engine::Surge, surge::config::Engine::Hyper] {
        let mut cfg = surge_config(
            &[("web-1", blade[0].addr)],
            "max_body_bytes = 4194304\nmax_buffered_body_bytes = 4194304\nbody_read_timeout = \"20s\"",
            "",
        );
        cfg.proxy.engine = engine;
        let surge = surge::serve::start(&cfg).await.unwrap();
        let addr = surge.proxy.local_addr;
        let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, "x".repeat(64 * 1024));
        let mut uploads = Vec::new();
        for _ in 0..2 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(
                b"POST /cart HTTP/1.1\r\nhost: shop.test\r\ntransfer-encoding: chunked\r\n\r\n",
            )
            .await
            .unwrap();
            // 3 MiB, not the last chunk: the upload is still going.
            for _ in 0..48 {
                if s.write_all(chunk.as_bytes()).await.is_err() {
                    break;
                }
            }
            uploads.push(s);
        }
        // Whichever outgrows the budget first (both are read at once) is refused.
        let mut refused = Vec::new();
        for s in uploads.iter_mut() {
            let mut answer = vec![0u8; 12];
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_secs(3), s.read_exact(&mut answer)).await
            {
                refused.push(String::from_utf8_lossy(&answer).into_owned());
            }
        }
        assert!(
            refused.iter().any(|a| a.starts_with("HTTP/1.1 503")),
            "{engine:?}: two chunked uploads were held past the budget: {refused:?}"
        );
        drop(uploads);
        surge.stop().await;
    }
}

/// A PROXY protocol v2 header for a TCP connection from `client` (IPv4 or IPv6).
fn proxy_v2(client: SocketAddr) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n\x21".to_vec();
    let mut addrs = Vec::new();
    match client {
        SocketAddr::V4(c) => {
            h.push(0x11);
            addrs.extend_from_slice(&c.ip().octets());
            addrs.extend_from_slice(&[192, 0, 2, 1]);
        }
        SocketAddr::V6(c) => {
            h.push(0x21);
            addrs.extend_from_slice(&c.ip().octets());
            addrs.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
        }
    }
    addrs.extend_from_slice(&client.port().to_be_bytes());
    addrs.extend_from_slice(&443u16.to_be_bytes());
    h.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
    h.extend_from_slice(&addrs);
    h
}

/// Behind an L4 balancer: the PROXY header names the client, whose address is forwarded
/// and counted under the per-address limits (IPv6 by /64); a peer that is not a trusted
/// balancer, or a connection without a valid header, is closed and reaches no blade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_protocol_names_the_client_only_from_a_trusted_balancer() {
    let blade = blades(1, Duration::ZERO).await;
    let text = format!(
        "[proxy]\nworkers = 2\naccess_log = false\nshutdown_grace = \"5s\"\n\
         trusted_proxies = [\"127.0.0.1\"]\nmax_connections_per_ip = 2\n\
         [[listeners]]\nlisten = \"127.0.0.1:0\"\nproxy_protocol = true\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n[pool]\n\
         [[pool.backends]]\nid = \"blade-1\"\naddress = \"{}\"\n",
        blade[0].addr
    );
    let cfg = Config::parse(&text, Path::new("test.toml")).expect("valid");
    let surge = surge::serve::start(&cfg).await.unwrap();
    let addr = surge.proxy.local_addr;
    let ask = b"GET /debug/headers HTTP/1.1\r\nhost: shop\r\nx-forwarded-for: 6.6.6.6\r\nconnection: close\r\n\r\n";

    // v1 and v2 (IPv4 and IPv6): the header's client is the one forwarded, and what the
    // client claimed in X-Forwarded-For is replaced (it is not a trusted proxy).
    let v1 = [&b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 443\r\n"[..], ask].concat();
    let v2_4 = [proxy_v2("198.51.100.9:4000".parse().unwrap()), ask.to_vec()].concat();
    let v2_6 = [
        proxy_v2("[2001:db8::7]:4000".parse().unwrap()),
        ask.to_vec(),
    ]
    .concat();
    for (request, client) in [
        (v1, "203.0.113.7"),
        (v2_4, "198.51.100.9"),
        (v2_6, "2001:db8::7"),
    ] {
        let (answer, _) = exchange(addr, &request).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{client}: {answer}");
        let body = &answer[answer.find("\r\n\r\n").map_or(0, |i| i + 4)..];
        let seen: serde_json::Value = serde_json::from_str(body).expect("headers as JSON");
        assert_eq!(seen["x-forwarded-for"], client, "{body}");
    }
    assert_eq!(blade[0].served(), 3);

    // Refused, each closed with nothing forwarded: a valid header from an untrusted peer,
    // no header at all, a broken one.
    let from_untrusted = async {
        let mut s = connect_from([127, 0, 0, 2], addr).await.expect("connect");
        let _ = s
            .write_all(&[&b"PROXY TCP4 203.0.113.7 192.0.2.1 1 443\r\n"[..], ask].concat())
            .await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        out
    };
    assert_eq!(from_untrusted.await, b"", "an untrusted peer got an answer");
    for bad in [
        ask.to_vec(),
        [&b"PROXY TCP4 203.0.113.7 192.0.2.1 99999 443\r\n"[..], ask].concat(),
        [&b"PROXY TCP4 999.0.113.7 192.0.2.1 1 443\r\n"[..], ask].concat(),
    ] {
        let (answer, closed) = exchange(addr, &bad).await;
        assert!(
            closed && answer.is_empty(),
            "{:?} got {answer:?}",
            String::from_utf8_lossy(&bad)
        );
    }
    assert_eq!(
        blade[0].served(),
        3,
        "a refused connection reached the blade"
    );

    // The limits count the real client: all these come from 127.0.0.1, yet only the
    // third from one client (IPv6: one /64) is refused.
    async fn hold(addr: SocketAddr, header: Vec<u8>) -> TcpStream {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(&header).await.expect("header");
        s
    }
    let mut held = Vec::new();
    for client in [
        "203.0.113.7:1",
        "203.0.113.7:2",
        "[2001:db8:1:2::1]:1",
        "[2001:db8:1:2::2]:1",
    ] {
        held.push(hold(addr, proxy_v2(client.parse().unwrap())).await);
    }
    assert!(
        eventually(Duration::from_secs(3), || surge.proxy.limits.open() == 4).await,
        "4 held connections counted, {}",
        surge.proxy.limits.open()
    );
    for (client, expect) in [
        ("203.0.113.7:3", "503"),
        ("[2001:db8:1:2::3]:1", "503"),
        ("203.0.113.8:1", "200"),
        ("[2001:db8:1:3::1]:1", "200"),
    ] {
        let request = [proxy_v2(client.parse().unwrap()), ask.to_vec()].concat();
        let (answer, _) = exchange(addr, &request).await;
        assert_eq!(status_of(&answer), expect, "{client}: {answer}");
    }
    drop(held);
    assert!(eventually(Duration::from_secs(3), || surge.proxy.limits.open() == 0).await);
    surge.stop().await;
}

/// `pool.node_max_in_flight`: one client pinning itself to a blade (a cart cookie it
/// chose, or the route cookie of its cart) cannot give that blade more than its ceiling;
/// unbound requests spill over to other blades, bound ones get 503 and keep their cart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_pinned_client_cannot_pile_requests_onto_one_blade() {
    let blades = blades(3, Duration::from_millis(400)).await;
    let backends: Vec<(&str, SocketAddr)> =
        blades.iter().map(|b| (b.id.as_str(), b.addr)).collect();
    let mut cfg = surge_config(
        &backends,
        "",
        "node_max_in_flight = 4\n[pool.sticky]\ncookie = \"cart\"\n",
    );
    if let Some(s) = cfg.pool.sticky.as_mut() {
        s.route_key = Some(b"a test key that is 32 bytes long!".to_vec());
    }
    let surge = surge::serve::start(&cfg).await.unwrap();
    let addr = surge.proxy.local_addr;
    let c = client();
    let first = send(
        &c,
        http::Method::GET,
        addr,
        "/catalog",
        &[("cookie", "cart=pinned")],
        "",
    )
    .await
    .unwrap();
    let home = first.blade();
    let route = first.set_cookie("surge_route").expect("a route cookie");
    let served = |id: &str| blades.iter().find(|b| b.id == id).map_or(0, |b| b.served());
    let at_home = served(&home);

    // 12 at once with the cart and its route cookie: at most the ceiling (plus one per
    // proxy worker, which counts on its own) reach the cart's blade; the rest get 503
    // with Retry-After, and none is moved to another blade (the cart lives on its own).
    let bound_cookie = format!("cart=pinned; surge_route={route}");
    let answers = at_once(&c, addr, 12, "/catalog", &bound_cookie).await;
    let ok: Vec<_> = answers.iter().filter(|r| r.status == 200).collect();
    let refused: Vec<_> = answers.iter().filter(|r| r.status == 503).collect();
    assert_eq!(ok.len() + refused.len(), 12);
    assert!(
        (4..=6).contains(&ok.len()),
        "{} reached the blade",
        ok.len()
    );
    assert!(ok.iter().all(|r| r.blade() == home));
    assert!(refused
        .iter()
        .all(|r| r.headers.contains_key("retry-after")));
    assert_eq!(served(&home) - at_home, ok.len() as u64);

    // 12 at once with the cart cookie only: all served, the surplus by the other blades.
    let at_home = served(&home);
    let answers = at_once(&c, addr, 12, "/catalog", "cart=pinned").await;
    assert!(answers.iter().all(|r| r.status == 200));
    let home_now = served(&home) - at_home;
    assert!(
        (4..=6).contains(&home_now),
        "{home_now} reached the pinned blade"
    );
    assert!(answers.iter().any(|r| r.blade() != home));
    surge.stop().await;
}

/// Sends `n` GETs of `path` with `cookie` at once; every one must complete.
async fn at_once(
    c: &HttpClient,
    addr: SocketAddr,
    n: usize,
    path: &str,
    cookie: &str,
) -> Vec<Reply> {
    let mut all = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (c, path, cookie) = (c.clone(), path.to_owned(), cookie.to_owned());
        all.spawn(async move {
            send(
                &c,
                http::Method::GET,
                addr,
                &path,
                &[("cookie", &cookie)],
                "",
            )
            .await
        });
    }
    let mut out = Vec::new();
    while let Some(r) = all.join_next().await {
        out.push(r.expect("task").expect("request completes"));
    }
    out
}

/// A blade that refuses uploads the way many do: it reads the request head, answers
/// `413` with `Connection: close` and closes without reading the body. Counts the
/// POSTs it saw (health checks are GETs).
async fn refusing_blade() -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicU64::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                if head.starts_with(b"POST") {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 9\r\nconnection: close\r\n\r\ntoo large",
                    )
                    .await;
                // Dropped with the body unread: the kernel resets the connection.
            });
        }
    });
    (addr, seen)
}

/// RFC 9112 section 9.6: a blade's answer that comes while the body is still being
/// written (here a 413 from a blade that closes without reading the upload) goes to the
/// shopper, and a request of which any byte reached a blade is never sent again. Before,
/// the failed write counted as "unsent": the POST went to the other blade too (up to four
/// times) and the shopper mostly got a 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blade_refusing_an_upload_early_is_heard_and_the_post_sent_once() {
    for engine in [surge::config::Engine::Surge, surge::config::Engine::Hyper] {
        let (one, seen_one) = refusing_blade().await;
        let (two, seen_two) = refusing_blade().await;
        let mut cfg = surge_config(
            &[("web-1", one), ("web-2", two)],
            "max_body_bytes = 33554432\nmax_buffered_body_bytes = 67108864\nbody_read_timeout = \"20s\"",
            "",
        );
        cfg.proxy.engine = engine;
        let surge = surge::serve::start(&cfg).await.unwrap();
        let addr = surge.proxy.local_addr;
        let mut answers = Vec::new();
        let sizes = [1usize << 20, 4 << 20, 4 << 20, 4 << 20, 16 << 20, 16 << 20];
        for size in sizes {
            let mut request = format!(
                "POST /upload HTTP/1.1\r\nhost: shop.test\r\ncontent-length: {size}\r\nconnection: close\r\n\r\n"
            )
            .into_bytes();
            request.resize(request.len() + size, b'x');
            let (answer, _) = exchange(addr, &request).await;
            answers.push(status_of(&answer).to_owned());
        }
        let seen = seen_one.load(Ordering::SeqCst) + seen_two.load(Ordering::SeqCst);
        assert_eq!(
            seen,
            sizes.len() as u64,
            "{engine:?}: each POST reaches a blade once (answers {answers:?})"
        );
        assert!(
            answers.iter().all(|a| a == "413"),
            "{engine:?}: the blade's 413 reaches the shopper: {answers:?}"
        );
        surge.stop().await;
    }
}

/// The rogue's second answer, sent unasked.
const EVIL: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nEVIL!";

/// A blade that speaks out of turn: `/page` is 64 KiB followed at once by a second,
/// unasked answer; `/empty` is a 204, and the unasked answer 300 ms later; anything else
/// is `ok`. Over TLS when `tls` is given.
async fn out_of_turn_blade(tls: Option<Arc<rustls::ServerConfig>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                match acceptor {
                    Some(a) => {
                        if let Ok(s) = a.accept(tcp).await {
                            speak_out_of_turn(s).await;
                        }
                    }
                    None => speak_out_of_turn(tcp).await,
                }
            });
        }
    });
    addr
}

async fn speak_out_of_turn<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S) {
    let mut buf = Vec::new();
    while let Some((head, _)) = read_request(&mut s, &mut buf).await {
        let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
        let written = match path.as_str() {
            "/page" => {
                let mut answer = b"HTTP/1.1 200 OK\r\ncontent-length: 65536\r\n\r\n".to_vec();
                answer.resize(answer.len() + 65536, b'p');
                answer.extend_from_slice(EVIL);
                s.write_all(&answer).await
            }
            "/empty" => {
                let first = s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await;
                let _ = s.flush().await;
                tokio::time::sleep(Duration::from_millis(300)).await;
                first.and(s.write_all(EVIL).await)
            }
            _ => {
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await
            }
        };
        if written.is_err() || s.flush().await.is_err() {
            return;
        }
    }
}

/// A blade connection goes back to the pool only when nothing at all came beyond the
/// answer, checked at the moment it is taken again and through TLS: bytes rustls has
/// already decrypted count too. Before, a TLS blade's unasked answer sent right behind a
/// long body sat decrypted inside rustls, the socket looked quiet, and the next shopper
/// on that connection was given it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_a_blade_sends_unasked_reach_no_shopper() {
    let (ca_pem, blade_tls) = blade_pki();
    let ca = std::env::temp_dir().join(format!("surge-rogue-ca-{}.pem", fastrand::u64(..)));
    std::fs::write(&ca, ca_pem).unwrap();
    for tls in [false, true] {
        let blade = out_of_turn_blade(tls.then(|| blade_tls.clone())).await;
        let pool_tls = if tls {
            format!("[pool.tls]\nca = \"{}\"\n", ca.display())
        } else {
            String::new()
        };
        let mut cfg = surge_config(&[("rogue", blade)], "", &pool_tls);
        // One worker: one set of blade connections, so the second shopper meets the
        // connection the first one used.
        cfg.proxy.workers = 1;
        let surge = surge::serve::start(&cfg).await.unwrap();
        let addr = surge.proxy.local_addr;
        for first in ["/page", "/empty"] {
            let ask = format!("GET {first} HTTP/1.1\r\nhost: shop.test\r\n\r\n");
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(ask.as_bytes()).await.unwrap();
            let mut seen = Vec::new();
            let mut chunk = [0u8; 8192];
            let whole = if first == "/page" { 65536 } else { 0 };
            while !seen.windows(4).any(|w| w == b"\r\n\r\n")
                || seen.len() < seen.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4 + whole
            {
                let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
                    .await
                    .expect("the first answer comes")
                    .unwrap();
                assert!(n > 0, "tls {tls}, {first}: closed early");
                seen.extend_from_slice(&chunk[..n]);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let (answer, _) = exchange(
                addr,
                b"GET /next HTTP/1.1\r\nhost: shop.test\r\nconnection: close\r\n\r\n",
            )
            .await;
            assert!(
                !answer.contains("EVIL!"),
                "tls {tls}, after {first}: the next shopper got the blade's unasked answer"
            );
            assert!(answer.ends_with("ok"), "tls {tls}, after {first}: {answer}");
        }
        surge.stop().await;
    }
    let _ = std::fs::remove_file(&ca);
}

/// A tunnel's writes are bounded like its reads: a blade that accepts a WebSocket and
/// then stops reading ends the tunnel after `proxy.idle_timeout` (the shopper's
/// connection closes) instead of holding surge's write, its buffers and both connections
/// for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_to_a_blade_that_stops_reading_ends_at_the_idle_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let blade = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Some((head, _)) = read_request(&mut s, &mut Vec::new()).await else {
                    return;
                };
                if !head.contains("upgrade: websocket") {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                    return;
                }
                let _ = s
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n")
                    .await;
                // Never reads again; holds the connection open for the test's length.
                tokio::time::sleep(Duration::from_secs(30)).await;
                drop(s);
            });
        }
    });
    let cfg = surge_config(&[("chat", blade)], "idle_timeout = \"1s\"", "");
    let surge = surge::serve::start(&cfg).await.unwrap();
    let mut s = TcpStream::connect(surge.proxy.local_addr).await.unwrap();
    s.write_all(
        b"GET /chat HTTP/1.1\r\nhost: shop.test\r\nupgrade: websocket\r\nconnection: upgrade\r\n\
          sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("the 101 comes")
            .unwrap();
        assert!(n > 0, "closed before the 101");
        head.extend_from_slice(&buf[..n]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    // Frames until every buffer on the way is full and a write waits.
    let frame = vec![0x82u8; 64 * 1024];
    for _ in 0..4096 {
        match tokio::time::timeout(Duration::from_millis(500), s.write_all(&frame)).await {
            Ok(Ok(())) => {}
            _ => break,
        }
    }
    let started = Instant::now();
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(6), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(_)) => continue,
            Err(_) => break false,
        }
    };
    assert!(
        closed,
        "the tunnel still held the shopper {:?} after its blade stopped reading",
        started.elapsed()
    );
    surge.stop().await;
}
