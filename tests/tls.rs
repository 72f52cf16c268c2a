//! TLS termination and HTTP/2, end to end: a real surge with TLS listeners on 127.0.0.1,
//! real blades, and a rustls client that records which certificate it was served.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use common::*;
use surge::config::Config;

/// Accepts any certificate: the tests check *which* one was served, not its chain.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

async fn tls_connect(addr: SocketAddr, sni: &str, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = TcpStream::connect(addr).await.unwrap();
    connector
        .connect(ServerName::try_from(sni.to_owned()).unwrap(), tcp)
        .await
        .unwrap()
}

fn leaf(s: &TlsStream<TcpStream>) -> Vec<u8> {
    s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// Writes a fresh self-signed pair for `names` at `cert`/`key` (each by rename, so a
/// reader never sees half a file); returns the certificate's DER.
fn write_pair(cert: &Path, key: &Path, names: &[&str]) -> Vec<u8> {
    let g =
        rcgen::generate_simple_self_signed(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    let tmp = cert.with_extension("tmp");
    std::fs::write(&tmp, g.key_pair.serialize_pem()).unwrap();
    std::fs::rename(&tmp, key).unwrap();
    std::fs::write(&tmp, g.cert.pem()).unwrap();
    std::fs::rename(&tmp, cert).unwrap();
    g.cert.der().to_vec()
}

fn tmp_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "surge-tls-test-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A plain listener (with `plain_extra`) and a TLS listener serving `pairs`, in front of
/// `blades`.
fn tls_config(
    blades: &[surge::blade::BladeHandle],
    pairs: &[(PathBuf, PathBuf)],
    plain_extra: &str,
    pool_extra: &str,
) -> Config {
    let mut text = format!(
        "[proxy]\nworkers = 2\naccess_log = false\nshutdown_grace = \"5s\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[listeners]]\nlisten = \"127.0.0.1:0\"\n{plain_extra}\n\
         [[listeners]]\nlisten = \"127.0.0.1:0\"\nhsts = \"1day\"\n[listeners.tls]\nwatch_interval = \"100ms\"\n"
    );
    for (cert, key) in pairs {
        text.push_str(&format!(
            "[[listeners.tls.certificates]]\ncert = \"{}\"\nkey = \"{}\"\n",
            cert.display(),
            key.display()
        ));
    }
    text.push_str(&format!("[pool]\n{pool_extra}\n"));
    for b in blades {
        text.push_str(&format!(
            "[[pool.backends]]\nid = \"{}\"\naddress = \"{}\"\n",
            b.id, b.addr
        ));
    }
    Config::parse(&text, Path::new("tls-test.toml")).expect("valid test config")
}

fn tls_addr(surge: &surge::serve::Running) -> SocketAddr {
    surge.proxy.listeners.iter().find(|b| b.tls).unwrap().addr
}

/// One HTTP/1.1 GET on a TLS stream; returns (status, x-surge-blade, body).
async fn h1_get(stream: TlsStream<TcpStream>, host: &str, path: &str) -> (u16, String, String) {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", host)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let blade = header(&resp, "x-surge-blade");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, blade, String::from_utf8_lossy(&body).into_owned())
}

fn header<B>(resp: &http::Response<B>, name: &str) -> String {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_that_covers_the_name_else_the_first() {
    let blades = blades(1, Duration::ZERO).await;
    let dir = tmp_dir();
    let (a_crt, a_key) = (dir.join("a.crt"), dir.join("a.key"));
    let (b_crt, b_key) = (dir.join("b.crt"), dir.join("b.key"));
    let a = write_pair(&a_crt, &a_key, &["a.shop.test"]);
    let b = write_pair(&b_crt, &b_key, &["*.b.shop.test"]);
    let cfg = tls_config(&blades, &[(a_crt, a_key), (b_crt, b_key)], "", "");
    let surge = surge::serve::start(&cfg).await.unwrap();
    let addr = tls_addr(&surge);
    for (sni, want, label) in [
        ("a.shop.test", &a, "exact name"),
        ("www.b.shop.test", &b, "wildcard"),
        ("other.test", &a, "unknown name gets the default"),
    ] {
        let s = tls_connect(addr, sni, &[b"http/1.1"]).await;
        assert!(leaf(&s) == *want, "{label}: wrong certificate for {sni}");
        let (status, blade, _) = h1_get(s, sni, "/catalog").await;
        assert_eq!((status, blade.as_str()), (200, "blade-1"), "{label}");
    }
    surge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_and_h1_over_tls_reach_the_blade_as_https_with_hsts() {
    let blades = blades(1, Duration::ZERO).await;
    let dir = tmp_dir();
    let (crt, key) = (dir.join("shop.crt"), dir.join("shop.key"));
    write_pair(&crt, &key, &["shop.test"]);
    // h2c towards the blade: the blade must see HTTP/2 too.
    let cfg = tls_config(&blades, &[(crt, key)], "", "protocol = \"h2c\"");
    let surge = surge::serve::start(&cfg).await.unwrap();
    let addr = tls_addr(&surge);

    // HTTP/2, negotiated by ALPN.
    let s = tls_connect(addr, "shop.test", &[b"h2", b"http/1.1"]).await;
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .unwrap();
    tokio::spawn(conn);
    // Several streams at once on the one connection.
    let mut answers = Vec::new();
    for _ in 0..10 {
        let req = Request::get("https://shop.test/debug/headers")
            .body(Empty::<Bytes>::new())
            .unwrap();
        answers.push(sender.send_request(req));
    }
    for a in answers {
        let resp = a.await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(header(&resp, "strict-transport-security"), "max-age=86400");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(seen["x-forwarded-proto"], "https", "{seen}");
        assert_eq!(seen[":version"], "HTTP/2.0", "h2c to the blade: {seen}");
        assert_eq!(seen[":authority"], "shop.test", "{seen}");
    }

    // HTTP/1.1 on the same listener.
    let s = tls_connect(addr, "shop.test", &[b"http/1.1"]).await;
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (status, blade, body) = h1_get(s, "shop.test", "/debug/headers").await;
    assert_eq!((status, blade.as_str()), (200, "blade-1"));
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["x-forwarded-proto"], "https");
    surge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_listeners_redirect_to_https_or_speak_h2c() {
    let blades = blades(1, Duration::ZERO).await;
    let dir = tmp_dir();
    let (crt, key) = (dir.join("shop.crt"), dir.join("shop.key"));
    write_pair(&crt, &key, &["shop.test"]);
    let cfg = tls_config(
        &blades,
        &[(crt.clone(), key.clone())],
        "redirect_https = \"https://shop.test:8443\"",
        "",
    );
    let surge = surge::serve::start(&cfg).await.unwrap();
    let r = get(&client(), surge.proxy.local_addr, "/cart?x=1")
        .await
        .unwrap();
    assert_eq!(r.status, 308);
    assert_eq!(
        r.headers.get("location").unwrap(),
        "https://shop.test:8443/cart?x=1"
    );
    assert_eq!(blades[0].served(), 0, "a redirect must not reach the blade");
    surge.stop().await;

    let cfg = tls_config(&blades, &[(crt, key)], "h2c = true", "");
    let surge = surge::serve::start(&cfg).await.unwrap();
    let tcp = TcpStream::connect(surge.proxy.local_addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get(format!("http://{}/catalog", surge.proxy.local_addr))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    // HTTP/1.1 still works on the same h2c listener.
    let r = get(&client(), surge.proxy.local_addr, "/catalog")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    surge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_under_steady_traffic_drops_nothing_and_a_bad_certificate_is_refused() {
    let blades = blades(2, Duration::ZERO).await;
    let dir = tmp_dir();
    let (crt, key) = (dir.join("shop.crt"), dir.join("shop.key"));
    let old = write_pair(&crt, &key, &["shop.test"]);
    let cfg = tls_config(&blades, &[(crt.clone(), key.clone())], "", "");
    let surge = surge::serve::start(&cfg).await.unwrap();
    let addr = tls_addr(&surge);
    let admin = surge.admin.local_addr;

    // A shopper on one kept-alive connection, made before the rotation...
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let kept_ok = Arc::new(AtomicU64::new(0));
    let s = tls_connect(addr, "shop.test", &[b"http/1.1"]).await;
    let (mut kept, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let steady = {
        let (stop, failures, kept_ok) = (stop.clone(), failures.clone(), kept_ok.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let req = Request::get("/catalog")
                    .header("host", "shop.test")
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                match kept.send_request(req).await {
                    Ok(r) if r.status() == 200 => {
                        let _ = r.into_body().collect().await;
                        kept_ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failures
                        .lock()
                        .unwrap()
                        .push(format!("kept: {}", r.status())),
                    Err(e) => failures.lock().unwrap().push(format!("kept: {e}")),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    // ...and shoppers arriving on new connections all along, noting the certificate.
    let seen: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let arrivals = {
        let (stop, failures, seen) = (stop.clone(), failures.clone(), seen.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let s = tls_connect(addr, "shop.test", &[b"http/1.1"]).await;
                seen.lock().unwrap().push(leaf(&s));
                let (status, _, _) = h1_get(s, "shop.test", "/catalog").await;
                if status != 200 {
                    failures.lock().unwrap().push(format!("new: {status}"));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let c = client();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Rotation through the admin API.
    let new = write_pair(&crt, &key, &["shop.test"]);
    let r = send(&c, http::Method::POST, admin, "/v1/tls/reload", &[], "")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    let latest = |want: &Vec<u8>| seen.lock().unwrap().last() == Some(want);
    assert!(
        eventually(Duration::from_secs(2), || latest(&new)).await,
        "new handshakes still get the old certificate"
    );

    // A broken certificate: refused with the file named, the current one keeps serving.
    std::fs::write(&crt, "-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    let r = send(&c, http::Method::POST, admin, "/v1/tls/reload", &[], "")
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&r.body).into_owned();
    assert_eq!(r.status, 422, "{text}");
    assert!(text.contains("shop.crt"), "{text}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(latest(&new), "a refused reload changed the certificate");

    // Rotation by the file watcher alone (no reload call).
    let third = write_pair(&crt, &key, &["shop.test"]);
    assert!(
        eventually(Duration::from_secs(3), || latest(&third)).await,
        "the watcher did not pick up the new files"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;

    stop.store(true, Ordering::Relaxed);
    steady.await.unwrap();
    arrivals.await.unwrap();
    let failures = failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "{failures:?}");
    assert!(
        kept_ok.load(Ordering::Relaxed) > 50,
        "the connection opened before the rotation stopped serving"
    );
    let all_three = {
        let seen = seen.lock().unwrap();
        seen.contains(&old) && seen.contains(&new) && seen.contains(&third)
    };
    assert!(all_three, "not every certificate was seen");
    surge.stop().await;
}

/// The route cookie is `Secure` on a TLS listener (never sent back over plain HTTP),
/// and not on a plain one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_route_cookie_is_secure_over_tls() {
    let blades = blades(2, Duration::ZERO).await;
    let dir = tmp_dir();
    let (crt, key) = (dir.join("shop.crt"), dir.join("shop.key"));
    write_pair(&crt, &key, &["shop.test"]);
    let sticky = format!(
        "[pool.sticky]\ncookie = \"cart\"\nroute_key_file = \"{}\"",
        dir.join("route.key").display()
    );
    let cfg = tls_config(&blades, &[(crt, key)], "", &sticky);
    let surge = surge::serve::start(&cfg).await.unwrap();
    let route_cookie = |resp: &http::Response<hyper::body::Incoming>| {
        resp.headers()
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|v| v.starts_with("surge_route="))
            .map(str::to_owned)
    };
    let s = tls_connect(tls_addr(&surge), "shop.test", &[b"http/1.1"]).await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::post("/cart")
        .header("host", "shop.test")
        .body(http_body_util::Full::new(Bytes::from_static(
            b"{\"product\": 1}",
        )))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 201);
    let cookie = route_cookie(&resp).expect("a route cookie over TLS");
    assert!(cookie.ends_with("; Secure"), "{cookie}");
    let plain = surge.proxy.listeners.iter().find(|b| !b.tls).unwrap().addr;
    let r = send(
        &client(),
        http::Method::POST,
        plain,
        "/cart",
        &[],
        "{\"product\": 1}",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 201);
    let cookie = r
        .headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("surge_route="))
        .expect("a route cookie over plain HTTP")
        .to_owned();
    assert!(!cookie.contains("Secure"), "{cookie}");
    surge.stop().await;
}

/// `[admin.tls]`: the admin API speaks HTTPS only; `surge nodes --admin-ca` (the
/// client with the shop's CA) reaches it, a client without the CA does not trust it, a
/// plain-HTTP request gets no answer, and the token is still required.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_can_speak_https_only() {
    use surge::admin::client::{AdminClient, ClientError};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let blades = blades(1, Duration::ZERO).await;
    let dir = tmp_dir();
    let (crt, key) = (dir.join("admin.crt"), dir.join("admin.key"));
    write_pair(&crt, &key, &["localhost", "127.0.0.1"]);
    let text = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nworkers = 1\naccess_log = false\n\
         [admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"a-token-of-sixteen-chars\"\n\
         [[admin.tls.certificates]]\ncert = \"{}\"\nkey = \"{}\"\n\
         [pool]\n[[pool.backends]]\nid = \"blade-1\"\naddress = \"{}\"\n",
        crt.display(),
        key.display(),
        blades[0].addr
    );
    let cfg = Config::parse(&text, Path::new("admin-tls.toml")).expect("valid");
    let surge = surge::serve::start(&cfg).await.unwrap();
    let base = format!("https://127.0.0.1:{}", surge.admin.local_addr.port());
    let pem = std::fs::read(&crt).unwrap();
    let token = Some("a-token-of-sixteen-chars".to_owned());

    let trusted = AdminClient::with_ca(&base, token.clone(), &pem).unwrap();
    let nodes = trusted.nodes().await.expect("nodes over HTTPS");
    assert_eq!(nodes.nodes.len(), 1);
    let drained = trusted.drain("blade-1", None, true).await.expect("a drain");
    assert_eq!(drained.state, "draining");

    let untrusting = AdminClient::new(&base, token.clone());
    match untrusting.nodes().await {
        Err(ClientError::Unreachable { reason, .. }) => {
            assert!(reason.to_lowercase().contains("certificate"), "{reason}")
        }
        other => panic!("a client without the CA got {other:?}"),
    }
    let no_token = AdminClient::with_ca(&base, None, &pem).unwrap();
    match no_token.nodes().await {
        Err(ClientError::Api { status, .. }) => assert_eq!(status, 401),
        other => panic!("no token got {other:?}"),
    }
    // Plain HTTP on the HTTPS port: no HTTP answer.
    let mut s = TcpStream::connect(surge.admin.local_addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    assert!(
        !out.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    surge.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// An HTTPS/1.1 keep-alive connection waiting for its next request lives by
/// `proxy.idle_timeout`, as a plain one does, not by `header_read_timeout` (which is for
/// a request that has begun). Before, the engine could not tell when a TLS connection had
/// bytes without reading, so it waited inside a head read, holding a buffer, and closed
/// the connection after the header timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_https_keep_alive_connection_lives_by_the_idle_timeout() {
    let blades = blades(1, Duration::ZERO).await;
    let dir = tmp_dir();
    let (crt, key) = (dir.join("shop.crt"), dir.join("shop.key"));
    write_pair(&crt, &key, &["shop.test"]);
    let mut cfg = tls_config(&blades, &[(crt, key)], "", "");
    cfg.proxy.header_read_timeout = Duration::from_millis(500);
    cfg.proxy.idle_timeout = Duration::from_secs(3);
    let surge = surge::serve::start(&cfg).await.unwrap();
    let s = tls_connect(tls_addr(&surge), "shop.test", &[b"http/1.1"]).await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    let closed = Arc::new(AtomicBool::new(false));
    let flag = closed.clone();
    tokio::spawn(async move {
        let _ = conn.await;
        flag.store(true, Ordering::SeqCst);
    });
    let ask = || {
        Request::get("/catalog")
            .header("host", "shop.test")
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    let first = sender.send_request(ask()).await.unwrap();
    assert_eq!(first.status(), 200);
    first.into_body().collect().await.unwrap();
    // Idle for four header timeouts, well within the idle timeout.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !closed.load(Ordering::SeqCst),
        "closed after the header timeout while idle"
    );
    let second = sender.send_request(ask()).await.expect("still open");
    assert_eq!(second.status(), 200);
    second.into_body().collect().await.unwrap();
    // And closed once the idle timeout has passed with nothing asked.
    let gone = eventually(Duration::from_secs(6), || closed.load(Ordering::SeqCst)).await;
    assert!(gone, "an idle connection outlived the idle timeout");
    surge.stop().await;
}

/// A blade speaking HTTP/1.1 with every framing: `/len` (Content-Length), `/chunked`,
/// `/close` (until the connection closes), `/empty` (204), `POST /echo` (the body back),
/// `HEAD /len`. Counts the connections it accepted.
async fn framing_blade() -> (SocketAddr, Arc<AtomicU64>) {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some((head, body)) = read_request(&mut s, &mut buf).await {
                    let mut words = head.split(' ');
                    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
                    let seen = |name: &str| {
                        head.lines()
                            .filter_map(|l| l.strip_prefix(&format!("{name}:")))
                            .map(str::trim)
                            .collect::<Vec<_>>()
                            .join(" | ")
                    };
                    let said = |text: String| {
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{text}",
                            text.len()
                        )
                        .into_bytes()
                    };
                    let answer: Vec<u8> = match (method, path) {
                        (_, "/length") => said(seen("content-length")),
                        (_, "/cookie") => said(seen("cookie")),
                        (_, "/expect") => said(seen("expect")),
                        (_, "/empty-len") => b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n".to_vec(),
                        ("connect", _) => b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_vec(),
                        ("head", "/len") => b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n".to_vec(),
                        (_, "/len") => b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello".to_vec(),
                        (_, "/chunked") => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n".to_vec(),
                        (_, "/empty") => b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
                        ("post", "/echo") => {
                            let mut a = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
                            a.extend_from_slice(&body);
                            a
                        }
                        (_, "/close") => {
                            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil close").await;
                            return;
                        }
                        _ => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
                    };
                    if s.write_all(&answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// HTTP/2 shoppers reach HTTP/1.1 blades through the engine's own blade connections:
/// every framing of an answer arrives whole, a body goes up, HEAD and 204 carry none,
/// and one blade connection carries request after request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_shoppers_reach_http1_blades_with_every_framing_on_kept_connections() {
    let (blade, accepted) = framing_blade().await;
    let dir = tmp_dir();
    let (crt, key) = (dir.join("shop.crt"), dir.join("shop.key"));
    write_pair(&crt, &key, &["shop.test"]);
    let text = format!(
        "[proxy]\nworkers = 1\naccess_log = false\nshutdown_grace = \"5s\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[listeners]]\nlisten = \"127.0.0.1:0\"\n[listeners.tls]\n\
         [[listeners.tls.certificates]]\ncert = \"{}\"\nkey = \"{}\"\n\
         [pool]\n[pool.health]\npath = \"/health\"\n[[pool.backends]]\nid = \"framing\"\naddress = \"{blade}\"\n",
        crt.display(),
        key.display()
    );
    let cfg = Config::parse(&text, Path::new("h2-bridge.toml")).unwrap();
    let surge = surge::serve::start(&cfg).await.unwrap();
    let s = tls_connect(tls_addr(&surge), "shop.test", &[b"h2"]).await;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut ask = |method: &str, path: &str, body: &'static str, fields: &[(&str, &str)]| {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("https://shop.test{path}"));
        for (name, value) in fields {
            req = req.header(*name, *value);
        }
        let body = http_body_util::Full::new(Bytes::from_static(body.as_bytes()));
        let f = sender.send_request(req.body(body).unwrap());
        async move {
            let resp = f.await.unwrap();
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
    };
    assert_eq!(ask("GET", "/len", "", &[]).await, (200, "hello".into()));
    assert_eq!(
        ask("GET", "/chunked", "", &[]).await,
        (200, "hello world".into())
    );
    assert_eq!(
        ask("GET", "/close", "", &[]).await,
        (200, "until close".into())
    );
    assert_eq!(ask("GET", "/empty", "", &[]).await, (204, String::new()));
    assert_eq!(ask("HEAD", "/len", "", &[]).await, (200, String::new()));
    assert_eq!(
        ask("POST", "/echo", "a cart", &[]).await,
        (200, "a cart".into())
    );
    // The blade's Content-Length on a 204 does not reach an HTTP/2 shopper (its stream
    // would be broken by a length without DATA).
    assert_eq!(
        ask("GET", "/empty-len", "", &[]).await,
        (204, String::new())
    );
    // An empty POST keeps its `Content-Length: 0`; HTTP/2's cookie fields are one field
    // towards HTTP/1.1 (RFC 9113 section 8.2.3).
    assert_eq!(
        ask("POST", "/length", "", &[("content-length", "0")]).await,
        (200, "0".into())
    );
    assert_eq!(
        ask(
            "GET",
            "/cookie",
            "",
            &[("cookie", "a=1"), ("cookie", "cart=42")]
        )
        .await,
        (200, "a=1; cart=42".into())
    );
    // Sequential requests reuse the blade connection (health checks use their own).
    let before = accepted.load(Ordering::SeqCst);
    for _ in 0..20 {
        assert_eq!(ask("GET", "/len", "", &[]).await, (200, "hello".into()));
        assert_eq!(
            ask("GET", "/chunked", "", &[]).await,
            (200, "hello world".into())
        );
    }
    let opened = accepted.load(Ordering::SeqCst) - before;
    assert!(
        opened <= 3,
        "{opened} blade connections for 40 sequential requests"
    );
    // A proxy tunnel is refused, never sent to a blade.
    let tunnel = Request::builder()
        .method("CONNECT")
        .uri("internal-admin:8080")
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let refused = sender.send_request(tunnel).await.unwrap();
    assert_eq!(refused.status(), 501);
    surge.stop().await;
}
