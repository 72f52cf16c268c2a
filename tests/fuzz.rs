//! Fuzzing of everything of ours that reads bytes from outside: the config parser, the
//! load-test plan parser, the admin API (router, JSON bodies, tokens), cookie parsing and
//! the forwarding-header rewrite, and raw bytes at the proxy's socket.
//!
//! cargo-fuzz needs a nightly compiler, which this machine's single stable toolchain does
//! not have; this is a proptest harness over the same entry points instead. CI runs a
//! short pass (a few thousand cases each); the long run is
//!
//! ```sh
//! SURGE_FUZZ_CASES=1000000 cargo test --release --test fuzz -- --test-threads 1
//! ```
//!
//! (`SURGE_FUZZ_NET_CASES` likewise for the socket target, which is slower per case.)

mod common;

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use surge::config::{AdminConfig, Config, EMBEDDED_DEFAULT};
use surge::pool::{Backend, Origin, Pool};
use surge::proxy::headers;

fn cases(var: &str, default: u32) -> ProptestConfig {
    let cases = std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        // A failure should be reported, not shrunk for minutes on a long run.
        max_shrink_iters: 2000,
        ..ProptestConfig::default()
    }
}

/// The embedded default with one line replaced, dropped or duplicated: text that is
/// nearly a valid config reaches the validation code, not just the TOML parser.
fn mutated_config() -> impl Strategy<Value = String> {
    let lines: Vec<String> = EMBEDDED_DEFAULT.lines().map(str::to_owned).collect();
    let n = lines.len();
    let values = prop_oneof![
        Just("0".to_owned()),
        Just("-1".to_owned()),
        Just("\"\"".to_owned()),
        Just("\"0s\"".to_owned()),
        Just("\"1h\"".to_owned()),
        Just("18446744073709551616".to_owned()),
        Just("[]".to_owned()),
        Just("{}".to_owned()),
        Just("true".to_owned()),
        Just("\"999999999999999d\"".to_owned()),
        Just("\"::1\"".to_owned()),
        Just("\"256.0.0.1:80\"".to_owned()),
        any::<i64>().prop_map(|v| v.to_string()),
        any::<f64>().prop_map(|v| v.to_string()),
        "\"[ -~]{0,12}\"".prop_map(|v| v),
    ];
    (0..n, 0..3u8, values, "[ -~]{0,40}").prop_map(move |(i, how, value, junk)| {
        let mut out = lines.clone();
        match how {
            0 => {
                if let Some((key, _)) = out[i].split_once('=') {
                    out[i] = format!("{key}= {value}");
                } else {
                    out[i] = junk;
                }
            }
            1 => {
                out.remove(i);
            }
            _ => {
                let dup = out[i].clone();
                out.insert(i, dup);
            }
        }
        out.join("\n")
    })
}

proptest! {
    #![proptest_config(cases("SURGE_FUZZ_CASES", 3000))]

    #[test]
    fn config_parser_answers_every_text_with_a_config_or_an_error_naming_the_file(
        text in prop_oneof![mutated_config(), "(?s).{0,400}", "[\\[\\]a-z_=\". \n0-9]{0,300}"]
    ) {
        match Config::parse(&text, Path::new("fuzz.toml")) {
            Ok(cfg) => {
                prop_assert!(!cfg.proxy.listeners.is_empty());
                prop_assert!(cfg.proxy.workers >= 1);
            }
            Err(e) => {
                let message = e.to_string();
                prop_assert!(message.contains("fuzz.toml"), "{}", message);
            }
        }
    }

    #[test]
    fn load_test_plans_parse_or_are_refused_without_panicking(
        text in prop_oneof![
            "(?s).{0,300}",
            "[\\[\\]a-z_=\". \n0-9%]{0,300}",
            (0..6usize, "[ -~]{0,20}").prop_map(|(i, v)| {
                let base = "target = \"http://127.0.0.1:8080\"\n[[stages]]\nduration = \"1s\"\nrate = 10\n[[scenarios]]\nname = \"b\"\nweight = 1\nsteps = [{ path = \"/\" }]\n[[slo]]\nmetric = \"p99\"\nbelow = \"300ms\"\n";
                let mut lines: Vec<String> = base.lines().map(str::to_owned).collect();
                let i = i.min(lines.len() - 1);
                lines[i] = format!("{} = {v}", lines[i].split('=').next().unwrap_or("x"));
                lines.join("\n")
            }),
        ]
    ) {
        let _ = surge::loadtest::plan::Plan::parse(&text, "fuzz.toml");
    }

    #[test]
    fn cookie_lookup_never_panics_and_finds_what_was_set(
        name in "[a-z_]{1,8}",
        value in "[A-Za-z0-9-]{0,16}",
        noise in "[ -~]{0,64}",
        raw in proptest::collection::vec(any::<u8>(), 0..128),
    ) {
        // Arbitrary bytes as a Cookie header: any answer is a piece of the header.
        if let Ok(v) = HeaderValue::from_bytes(&raw) {
            let mut h = HeaderMap::new();
            h.insert(http::header::COOKIE, v);
            if let Some(found) = headers::cookie(&h, &name) {
                let text = String::from_utf8_lossy(&raw);
                prop_assert!(text.contains(found));
            }
        }
        // A well-formed header with the cookie after arbitrary others: found exactly.
        let clean_noise: String = noise.chars().filter(|c| *c != '=' && *c != ';').collect();
        // `x9`/`y9` cannot be a generated name; the noise has no `=`, so it is no pair.
        let header = format!("{clean_noise}; x9=1; {name}={value}; y9=2");
        prop_assert_eq!(headers::cookie_in(&header, &name), Some(value.as_str()));
    }

    #[test]
    fn forwarding_rewrite_drops_hop_by_hop_headers_and_appends_the_client(
        pairs in proptest::collection::vec(
            (prop_oneof![
                Just("connection".to_owned()),
                Just("keep-alive".to_owned()),
                Just("transfer-encoding".to_owned()),
                Just("x-forwarded-for".to_owned()),
                Just("upgrade".to_owned()),
                "[a-z-]{1,12}",
            ], proptest::collection::vec(any::<u8>(), 0..40)),
            0..12,
        ),
        ip in any::<[u8; 4]>(),
        trusted in any::<bool>(),
    ) {
        let mut h = HeaderMap::new();
        for (name, value) in &pairs {
            if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_bytes(value)) {
                h.append(n, v);
            }
        }
        headers::strip_hop_by_hop(&mut h);
        for gone in ["connection", "keep-alive", "transfer-encoding", "upgrade", "te", "trailer"] {
            prop_assert!(!h.contains_key(gone), "{} survived", gone);
        }
        let client = headers::ip_header_value(std::net::IpAddr::from(ip));
        headers::add_forwarding(&mut h, &client, "https", trusted);
        let xff = h.get("x-forwarded-for").map(|v| v.as_bytes().to_vec()).unwrap_or_default();
        prop_assert!(xff.ends_with(client.as_bytes()));
        if !trusted {
            prop_assert_eq!(&xff[..], client.as_bytes(), "an untrusted chain is replaced");
        }
        prop_assert_eq!(h.get("x-forwarded-proto").map(|v| v.as_bytes()), Some(&b"https"[..]));
    }
}

/// A fresh admin API over a pool of two nodes, as `surge serve` builds it.
fn admin() -> surge::admin::Admin {
    let cfg = Config::parse(
        "[pool]\n[[pool.backends]]\nid = \"web-1\"\naddress = \"127.0.0.1:9001\"\n[[pool.backends]]\nid = \"web-2\"\naddress = \"127.0.0.1:9002\"\n",
        Path::new("fuzz.toml"),
    )
    .expect("fuzz base config");
    let _ = Backend::new("x", ([127, 0, 0, 1], 1).into(), 1, Origin::Static);
    surge::admin::Admin {
        pool: Arc::new(Pool::from_config(&cfg.pool, Vec::new())),
        cfg: AdminConfig {
            listen: ([127, 0, 0, 1], 0).into(),
            token: Some("fuzz-token".into()),
            min_in_service: 1,
            default_drain_timeout: Duration::from_secs(60),
            hosts: Vec::new(),
            tls: None,
        },
        metrics: None,
        proxy_listening: Arc::new(AtomicBool::new(true)),
        autoscaler: None,
        cluster: None,
        tls: Arc::new(std::sync::OnceLock::new()),
        control: None,
        server_tls: None,
    }
}

fn json_body() -> impl Strategy<Value = Vec<u8>> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        "[ -~]{0,24}".prop_map(serde_json::Value::from),
        prop_oneof![
            Just("127.0.0.1:9003"),
            Just("[::1]:80"),
            Just("300s"),
            Just("web-1"),
            Just("0ms")
        ]
        .prop_map(serde_json::Value::from),
    ];
    let value = leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("address".to_owned()),
                    Just("id".to_owned()),
                    Just("weight".to_owned()),
                    Just("timeout".to_owned()),
                    Just("force".to_owned()),
                    "[a-z]{1,8}",
                ],
                inner,
                0..5
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    });
    prop_oneof![
        value.prop_map(|v| v.to_string().into_bytes()),
        proptest::collection::vec(any::<u8>(), 0..200),
    ]
}

proptest! {
    #![proptest_config(cases("SURGE_FUZZ_CASES", 3000))]

    #[test]
    fn the_admin_api_answers_any_call_with_json_and_never_a_5xx(
        method in prop_oneof![Just(Method::GET), Just(Method::POST), Just(Method::DELETE), Just(Method::PUT)],
        path in prop_oneof![
            Just("/v1/nodes".to_owned()),
            Just("/v1/nodes/web-1".to_owned()),
            Just("/v1/nodes/web-1/drain".to_owned()),
            Just("/v1/nodes/web-2/undrain".to_owned()),
            Just("/v1/nodes/web-1/maint".to_owned()),
            Just("/v1/autoscaler".to_owned()),
            Just("/v1/tls/reload".to_owned()),
            Just("/v1/config/reload".to_owned()),
            Just("/healthz".to_owned()),
            "/v1/nodes/[a-z0-9%.-]{0,12}(/[a-z]{0,8})?",
            "/[ -~&&[^ #?]]{0,30}",
        ],
        query in prop_oneof![Just(String::new()), "\\?[a-z=&0-9]{0,20}"],
        token in prop_oneof![Just("Bearer fuzz-token".to_owned()), "[ -~]{0,20}"],
        body in json_body(),
    ) {
        let Ok(req) = Request::builder()
            .method(method)
            .uri(format!("{path}{query}"))
            .header("authorization", token.as_str())
            .body(Full::new(Bytes::from(body)))
        else {
            return Ok(());
        };
        let admin = admin();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let reply = runtime.block_on(admin.handle(req));
        let status = reply.status().as_u16();
        prop_assert!(status < 500, "{} for {}", status, path);
        let content_type = reply
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body = runtime.block_on(reply.into_body().collect()).map(|b| b.to_bytes()).unwrap_or_default();
        // The status page and its script are the only answers that are not JSON.
        let page = matches!(path.trim_matches('/'), "" | "status" | "status.js") && status == 200;
        prop_assert_eq!(page, !content_type.starts_with("application/json") && !path.ends_with("metrics") && status != 204, "{} {}", path, content_type);
        if status != 204 && !path.ends_with("metrics") && !page {
            prop_assert!(serde_json::from_slice::<serde_json::Value>(&body).is_ok(), "not JSON: {:?}", body);
        }
        // Whatever was asked, the pool stays consistent.
        let table = admin.pool.snapshot();
        let mut ids: Vec<&str> = table.members().iter().map(|m| &*m.backend.id).collect();
        ids.sort_unstable();
        ids.dedup();
        prop_assert_eq!(ids.len(), table.members().len());
        prop_assert!(table.members().iter().all(|m| (1..=1000).contains(&m.backend.weight)));
    }
}

/// Raw bytes at the proxy's socket: requests made of valid pieces, mutated. Whatever
/// arrives, surge answers (or closes) promptly, and keeps serving. This is the default
/// HTTP/1.1 engine, surge's own (`proxy.engine = "surge"`); `tests/differential.rs`
/// holds it against hyper's.
#[test]
fn raw_bytes_at_the_proxy_get_an_answer_or_a_close_and_break_nothing() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let n: u32 = std::env::var("SURGE_FUZZ_NET_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    runtime.block_on(async move {
        let blades = common::blades(1, Duration::ZERO).await;
        let cfg = common::config(&blades, "");
        let surge = surge::serve::start(&cfg).await.expect("surge starts");
        let addr = surge.proxy.local_addr;
        let pieces: [&[u8]; 16] = [
            b"GET / HTTP/1.1\r\n",
            b"POST /cart HTTP/1.1\r\n",
            b"host: shop\r\n",
            b"content-length: 5\r\n",
            b"content-length: -1\r\n",
            b"transfer-encoding: chunked\r\n",
            b"connection: keep-alive, upgrade\r\n",
            b"cookie: cart=abc; surge_route=blade-1\r\n",
            b"\r\n",
            b"5\r\nhello\r\n0\r\n\r\n",
            b"hello",
            b"\n",
            b"\r",
            b" ",
            b"\x00\xff",
            b"GET /catalog HTTP/1.1\r\nhost: x\r\n\r\n",
        ];
        let mut rng = fastrand::Rng::with_seed(0x5eed);
        for case in 0..n {
            let mut req = Vec::new();
            for _ in 0..rng.usize(1..8) {
                req.extend_from_slice(pieces[rng.usize(..pieces.len())]);
            }
            // Flip a few bytes.
            for _ in 0..rng.usize(0..3) {
                if !req.is_empty() {
                    let i = rng.usize(..req.len());
                    req[i] = rng.u8(..);
                }
            }
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let _ = s.write_all(&req).await;
            let _ = s.shutdown().await;
            let mut out = Vec::new();
            let done = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut out)).await;
            assert!(
                done.is_ok(),
                "case {case}: no answer and no close for {req:?}"
            );
            if !out.is_empty() {
                assert!(out.starts_with(b"HTTP/1.1 "), "case {case}: {out:?}");
            }
        }
        let ok = common::get(&common::client(), addr, "/catalog")
            .await
            .expect("still serves");
        assert_eq!(ok.status, 200);
        let zero =
            common::eventually(Duration::from_secs(5), || surge.proxy.limits.open() == 0).await;
        assert!(zero, "connections left open: {}", surge.proxy.limits.open());
        surge.stop().await;
    });
}
