//! A sample shop frontend ("blade"): catalogue, product pages, a cart held in this
//! process's memory, checkout, and a health endpoint. It is the backend of the demo, the
//! tests and the load tests.
//!
//! Carts live only in the blade that created them, as in many real shop frontends: if the
//! load balancer sends a cart elsewhere, the shopper's cart is gone (`GET /cart` → 404,
//! checkout → 409). That is what makes cart stickiness observable.
//!
//! `GET /debug/headers` echoes the request headers the blade received, so tests can see
//! what the proxy forwards. Every response names the blade in `x-surge-blade`. Service time (`latency`) and CPU cost
//! (`cpu_work`) per request are adjustable at run time, as is the health answer, so tests
//! can make a blade slow or sick without killing it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, COOKIE, SET_COOKIE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// Header that names the blade that answered.
pub const BLADE_HEADER: &str = "x-surge-blade";

/// Largest request body a blade reads (cart and checkout bodies are tiny).
const MAX_BODY_BYTES: usize = 64 * 1024;

/// Products in the sample catalogue.
const PRODUCTS: u32 = 50;

/// What a blade is started with.
#[derive(Debug, Clone)]
pub struct BladeConfig {
    pub id: String,
    pub listen: SocketAddr,
    /// Added service time per request (not for `/healthz`).
    pub latency: Duration,
    /// Rounds of hashing per request, to cost CPU like template rendering would.
    pub cpu_work: u32,
    /// Serve HTTPS with this configuration instead of plain HTTP (a frontend that is not
    /// on a private network).
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// Why a blade could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BladeError {
    #[error("blade {id}: cannot listen on {addr}: {source}")]
    Bind {
        id: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Knobs and counters shared between a running blade and its handle.
#[derive(Debug)]
struct Shared {
    id: HeaderValue,
    /// Added latency in microseconds.
    latency_us: AtomicU64,
    cpu_work: AtomicU32,
    /// Whether `/healthz` answers 200 (else 503).
    healthy: AtomicBool,
    /// Requests served, health checks excluded.
    served: AtomicU64,
    /// Connections accepted since start.
    accepted: AtomicU64,
    /// Until when every request waits (a stall, e.g. a GC pause), as an offset from
    /// `epoch`; 0 for none.
    stall_until_us: AtomicU64,
    /// Origin of `stall_until_us`.
    epoch: std::time::Instant,
    /// Cart id → (product, quantity) lines.
    carts: Mutex<HashMap<String, Vec<(u32, u32)>>>,
    catalog: Bytes,
}

/// A running blade. Dropping the handle does not stop it; call [`BladeHandle::kill`].
#[derive(Debug)]
pub struct BladeHandle {
    pub id: String,
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl BladeHandle {
    /// Stops at once, as a crash would: the listener and every open connection close,
    /// mid-response or not.
    pub fn kill(&self) {
        self.task.abort();
    }

    /// Whether the blade is still running.
    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }

    pub fn set_latency(&self, latency: Duration) {
        self.shared
            .latency_us
            .store(latency.as_micros() as u64, Ordering::Relaxed);
    }

    /// Freezes request handling for `d` from now (requests wait, then answer).
    pub fn stall(&self, d: Duration) {
        let until = self.shared.epoch.elapsed() + d;
        self.shared
            .stall_until_us
            .store(until.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.shared.healthy.store(healthy, Ordering::Relaxed);
    }

    /// Requests served so far, health checks excluded.
    pub fn served(&self) -> u64 {
        self.shared.served.load(Ordering::Relaxed)
    }

    /// Connections accepted so far (health checks included).
    pub fn connections(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Carts this blade holds.
    pub fn carts(&self) -> usize {
        self.shared.carts.lock().map_or(0, |c| c.len())
    }
}

/// Binds and starts a blade on the current tokio runtime.
pub async fn start(cfg: BladeConfig) -> Result<BladeHandle, BladeError> {
    let listener = bind(cfg.listen).map_err(|source| BladeError::Bind {
        id: cfg.id.clone(),
        addr: cfg.listen,
        source,
    })?;
    let addr = listener.local_addr().map_err(|source| BladeError::Bind {
        id: cfg.id.clone(),
        addr: cfg.listen,
        source,
    })?;
    let shared = Arc::new(Shared {
        id: HeaderValue::from_str(&cfg.id).unwrap_or(HeaderValue::from_static("blade")),
        latency_us: AtomicU64::new(cfg.latency.as_micros() as u64),
        cpu_work: AtomicU32::new(cfg.cpu_work),
        healthy: AtomicBool::new(true),
        served: AtomicU64::new(0),
        accepted: AtomicU64::new(0),
        stall_until_us: AtomicU64::new(0),
        epoch: std::time::Instant::now(),
        carts: Mutex::new(HashMap::new()),
        catalog: catalog_json(),
    });
    let acceptor = cfg.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let task = tokio::spawn(accept_loop(listener, shared.clone(), acceptor));
    Ok(BladeHandle {
        id: cfg.id,
        addr,
        shared,
        task,
    })
}

/// Binds with `SO_REUSEADDR` so a killed blade can be restarted on the same port at once.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
) {
    // Owning the connections here means aborting this task closes all of them.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                shared.accepted.fetch_add(1, Ordering::Relaxed);
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                let acceptor = acceptor.clone();
                connections.spawn(async move {
                    let service = service_fn(move |req| handle(shared.clone(), req));
                    let http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match acceptor {
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                        Some(acceptor) => {
                            if let Ok(tls) = acceptor.accept(stream).await {
                                let _ = http.serve_connection(TokioIo::new(tls), service).await;
                            }
                        }
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path();
    if path == "/healthz" {
        let healthy = shared.healthy.load(Ordering::Relaxed);
        let (status, body) = if healthy {
            (StatusCode::OK, "ok\n")
        } else {
            (StatusCode::SERVICE_UNAVAILABLE, "unhealthy\n")
        };
        return Ok(reply(&shared, status, "text/plain", Bytes::from(body)));
    }
    shared.served.fetch_add(1, Ordering::Relaxed);
    let stall_until = Duration::from_micros(shared.stall_until_us.load(Ordering::Relaxed));
    let since_epoch = shared.epoch.elapsed();
    if stall_until > since_epoch {
        tokio::time::sleep(stall_until - since_epoch).await;
    }
    let latency = Duration::from_micros(shared.latency_us.load(Ordering::Relaxed));
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    burn_cpu(shared.cpu_work.load(Ordering::Relaxed));

    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let cart_id = cookie(&req, "cart").map(str::to_owned);
    let resp = match (method, path.as_str()) {
        (Method::GET, "/") => reply(
            &shared,
            StatusCode::OK,
            "text/html; charset=utf-8",
            Bytes::from_static(
                b"<!doctype html><title>surge shop</title><h1>surge shop</h1><a href=\"/catalog\">catalog</a>\n",
            ),
        ),
        (Method::GET, "/debug/headers") => {
            let mut headers: serde_json::Map<String, serde_json::Value> = req
                .headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        serde_json::Value::from(String::from_utf8_lossy(v.as_bytes()).into_owned()),
                    )
                })
                .collect();
            // The protocol the request came in, as a pseudo-header (never a real name).
            headers.insert(
                ":version".into(),
                serde_json::Value::from(format!("{:?}", req.version())),
            );
            if let Some(a) = req.uri().authority() {
                headers.insert(":authority".into(), serde_json::Value::from(a.as_str()));
            }
            json(&shared, StatusCode::OK, &serde_json::Value::Object(headers))
        }
        (Method::GET, "/catalog") => reply(
            &shared,
            StatusCode::OK,
            "application/json",
            shared.catalog.clone(),
        ),
        (Method::GET, p) if p.starts_with("/product/") => {
            match p["/product/".len()..].parse::<u32>() {
                Ok(id) if (1..=PRODUCTS).contains(&id) => json(
                    &shared,
                    StatusCode::OK,
                    &serde_json::json!({"id": id, "name": format!("Product {id}"), "price_cents": price(id)}),
                ),
                _ => error(&shared, StatusCode::NOT_FOUND, "no such product"),
            }
        }
        (Method::POST, "/cart") => add_to_cart(&shared, cart_id, req.into_body()).await,
        (Method::GET, "/cart") => {
            let carts = shared.carts.lock().map_err(|_| ()).ok();
            match (carts, cart_id) {
                (Some(carts), Some(id)) if carts.contains_key(&id) => {
                    let lines = carts.get(&id).cloned().unwrap_or_default();
                    drop(carts);
                    json(&shared, StatusCode::OK, &cart_json(&id, &lines))
                }
                _ => error(&shared, StatusCode::NOT_FOUND, "unknown cart"),
            }
        }
        (Method::POST, "/checkout") => {
            let removed = cart_id.as_ref().and_then(|id| {
                shared
                    .carts
                    .lock()
                    .ok()
                    .and_then(|mut carts| carts.remove(id))
            });
            match removed {
                Some(lines) => {
                    let items: u32 = lines.iter().map(|l| l.1).sum();
                    let total: u64 = lines
                        .iter()
                        .map(|&(p, q)| u64::from(price(p)) * u64::from(q))
                        .sum();
                    json(
                        &shared,
                        StatusCode::OK,
                        &serde_json::json!({"order": new_id(), "items": items, "total_cents": total}),
                    )
                }
                None => error(&shared, StatusCode::CONFLICT, "unknown cart: nothing to check out"),
            }
        }
        _ => error(&shared, StatusCode::NOT_FOUND, "not found"),
    };
    Ok(resp)
}

/// `POST /cart` with an optional JSON body `{"product": 7, "qty": 2}` (default: one of
/// product 1). Creates the cart, and sets the `cart` cookie, when the request has none this
/// blade knows.
async fn add_to_cart(
    shared: &Shared,
    cart_id: Option<String>,
    body: Incoming,
) -> Response<Full<Bytes>> {
    let bytes = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error(shared, StatusCode::PAYLOAD_TOO_LARGE, "body too large"),
    };
    #[derive(serde::Deserialize)]
    struct Line {
        product: u32,
        #[serde(default = "one")]
        qty: u32,
    }
    fn one() -> u32 {
        1
    }
    let line = if bytes.iter().all(u8::is_ascii_whitespace) {
        Line { product: 1, qty: 1 }
    } else {
        match serde_json::from_slice::<Line>(&bytes) {
            Ok(l) if (1..=PRODUCTS).contains(&l.product) && (1..=99).contains(&l.qty) => l,
            Ok(_) => {
                return error(
                    shared,
                    StatusCode::BAD_REQUEST,
                    "product or qty out of range",
                )
            }
            Err(e) => {
                return error(
                    shared,
                    StatusCode::BAD_REQUEST,
                    &format!("bad cart line: {e}"),
                )
            }
        }
    };
    let Ok(mut carts) = shared.carts.lock() else {
        return error(
            shared,
            StatusCode::INTERNAL_SERVER_ERROR,
            "cart store poisoned",
        );
    };
    let (id, created) = match cart_id {
        Some(id) if carts.contains_key(&id) => (id, false),
        _ => (new_id(), true),
    };
    let lines = carts.entry(id.clone()).or_default();
    lines.push((line.product, line.qty));
    let body = cart_json(&id, lines);
    drop(carts);
    let mut resp = json(
        shared,
        if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        &body,
    );
    if created {
        if let Ok(v) = HeaderValue::from_str(&format!("cart={id}; Path=/; HttpOnly; SameSite=Lax"))
        {
            resp.headers_mut().append(SET_COOKIE, v);
        }
    }
    resp
}

fn cart_json(id: &str, lines: &[(u32, u32)]) -> serde_json::Value {
    let items: Vec<_> = lines
        .iter()
        .map(|&(p, q)| serde_json::json!({"product": p, "qty": q}))
        .collect();
    serde_json::json!({"cart": id, "lines": items})
}

fn price(product: u32) -> u32 {
    999 + product * 100
}

fn catalog_json() -> Bytes {
    let items: Vec<_> = (1..=PRODUCTS)
        .map(|id| serde_json::json!({"id": id, "name": format!("Product {id}"), "price_cents": price(id)}))
        .collect();
    Bytes::from(serde_json::to_vec(&items).unwrap_or_default())
}

fn new_id() -> String {
    format!("{:016x}", fastrand::u64(..))
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.headers()
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn burn_cpu(rounds: u32) {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for i in 0..rounds {
        i.hash(&mut h);
    }
    std::hint::black_box(h.finish());
}

fn reply(
    shared: &Shared,
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut().insert(BLADE_HEADER, shared.id.clone());
    resp
}

fn json(shared: &Shared, status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    reply(shared, status, "application/json", Bytes::from(body))
}

fn error(shared: &Shared, status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json(shared, status, &serde_json::json!({"error": message}))
}
