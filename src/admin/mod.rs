//! The operators' API (hyper): list the pool, add, drain, undrain, put in maintenance and
//! remove nodes, Prometheus metrics, liveness and readiness.
//!
//! Owns: routing, authentication, JSON shapes. Must not: hold state of its own (everything
//! it shows or changes lives in `pool`, the autoscaler's shared status or the cluster), or
//! import the proxy.

pub mod api;
pub mod client;
pub mod openapi;
pub mod session;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::AdminConfig;
use crate::pool::{Backend, Origin, Pool, PoolError, State};

/// Largest request body the API reads.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// Why the admin API could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    #[error("admin API cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What the API reads and acts on.
#[derive(Clone)]
pub struct Admin {
    pub pool: Arc<Pool>,
    pub cfg: AdminConfig,
    /// Renders `/metrics`; `None` when no exporter is installed.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Whether the proxy is listening (for `/readyz`).
    pub proxy_listening: Arc<AtomicBool>,
    /// The autoscaler's status and pause switch, when one runs.
    pub autoscaler: Option<Arc<crate::autoscale::Shared>>,
    /// The TLS listeners' certificate reloads, filled in once the proxy has started (the
    /// admin API starts first so that `/readyz` can say the proxy is not up yet).
    pub tls: Arc<std::sync::OnceLock<Vec<Arc<dyn CertificateReload>>>>,
    /// Where config reloads and upgrades are asked for (the process's top level acts on
    /// them); `None` when nothing listens.
    pub control: Option<tokio::sync::mpsc::Sender<Control>>,
    /// In a cluster: operator changes are recorded in etcd for every instance.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// HTTPS (`admin.tls`): the server side, certificates reloaded underneath.
    pub server_tls: Option<Arc<rustls::ServerConfig>>,
}

/// An operator change every instance of a cluster applies.
enum Shared {
    Node(String, Option<crate::cluster::NodeIntent>),
    Static(String, Option<crate::cluster::StaticNode>),
    Paused(bool),
}

/// What an operator can ask of the whole process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlKind {
    /// Re-read the config file; if valid, hand over to a new process running it.
    Reload,
    /// Hand over to a new process started from the binary at the same path.
    Upgrade,
}

impl std::fmt::Display for ControlKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ControlKind::Reload => "config reload",
            ControlKind::Upgrade => "upgrade",
        })
    }
}

/// A request to the top level, answered with what happened or why it was refused.
#[derive(Debug)]
pub struct Control {
    pub kind: ControlKind,
    pub reply: tokio::sync::oneshot::Sender<Result<HandedOver, HandOverError>>,
}

/// A reload or upgrade that happened: a new process serves, this one is stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandedOver {
    pub kind: ControlKind,
    /// The process that serves now.
    pub successor: u32,
    /// This process, which finishes its requests and exits.
    pub this: u32,
}

impl std::fmt::Display for HandedOver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: process {} now serves; this one ({}) finishes its requests and exits",
            self.kind, self.successor, self.this
        )
    }
}

/// Why a reload or upgrade did not happen; the running process keeps serving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandOverError {
    /// The config file does not validate (its error names file, line, key and reason).
    #[error("{0} refused, the running config keeps serving: {1}")]
    BadConfig(ControlKind, #[source] crate::config::ConfigError),
    /// The path of the running binary is unknown, so no successor can be started.
    #[error("{0} refused: the path of this binary is unknown")]
    NoSuccessor(ControlKind),
    /// The listening sockets could not be copied for the new process.
    #[error("{0} failed: {1}")]
    Sockets(ControlKind, #[source] std::io::Error),
    /// The new process did not start or did not say it was ready in time.
    #[error("{0} failed: {1}")]
    Successor(
        ControlKind,
        #[source] Box<dyn std::error::Error + Send + Sync>,
    ),
}

/// Reloads one TLS listener's certificates. The proxy's listeners implement it (wired by
/// `serve`), so the admin API reloads certificates without importing the proxy.
pub trait CertificateReload: Send + Sync {
    /// The listener's address, for the answer.
    fn listener(&self) -> String;
    /// Reads the files again and swaps them in if all load: a line saying what serves
    /// now, or why the files were refused (the old certificates keep serving).
    fn reload(&self, why: &str) -> Result<String, Box<dyn std::error::Error + Send + Sync>>;
}

/// A running admin API.
#[derive(Debug)]
pub struct AdminHandle {
    pub local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    /// A copy of the listening socket for a successor process; dropped on shutdown.
    handoff: std::sync::Mutex<Option<std::net::TcpListener>>,
    /// Fires once the API has stopped and its open calls have been answered.
    finished: std::sync::Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
}

/// How long a stopping admin API lets calls in progress finish.
const ADMIN_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Connections the admin API holds at once: beyond it a new one is closed at once, so
/// no client can exhaust the process's descriptors or memory through it. Operators'
/// tools make one call at a time.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;

/// A request's head must arrive within this, and its body within this after the head:
/// a client that trickles bytes gets 408 (body) or a closed connection (head).
pub const ADMIN_READ_TIMEOUT: Duration = Duration::from_secs(5);

impl AdminHandle {
    pub fn shutdown(&self) {
        if let Ok(mut h) = self.handoff.lock() {
            h.take();
        }
        let _ = self.shutdown.send(true);
    }

    /// Waits until the API has stopped (after [`AdminHandle::shutdown`]) and the calls in
    /// progress have been answered.
    pub async fn wait(&self) {
        let finished = self.finished.lock().ok().and_then(|mut f| f.take());
        if let Some(f) = finished {
            let _ = f.await;
        }
    }

    /// A copy of the listening socket (for a successor process).
    pub fn socket(&self) -> std::io::Result<Option<std::net::TcpListener>> {
        match self.handoff.lock() {
            Ok(h) => h.as_ref().map(std::net::TcpListener::try_clone).transpose(),
            Err(_) => Ok(None),
        }
    }
}

/// Binds `admin.cfg.listen` and serves on the current runtime.
pub async fn start(admin: Admin) -> Result<AdminHandle, AdminError> {
    start_with(admin, None).await
}

/// [`start`] on `inherited`, a socket already listening (from a predecessor process), if
/// given.
pub async fn start_with(
    admin: Admin,
    inherited: Option<std::net::TcpListener>,
) -> Result<AdminHandle, AdminError> {
    let addr = admin.cfg.listen;
    let listen_err = |source| AdminError::Listen { addr, source };
    let std_listener = match inherited {
        Some(l) => l,
        None => std::net::TcpListener::bind(addr).map_err(listen_err)?,
    };
    std_listener.set_nonblocking(true).map_err(listen_err)?;
    let handoff = std_listener.try_clone().map_err(listen_err)?;
    let listener = TcpListener::from_std(std_listener).map_err(listen_err)?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| AdminError::Listen { addr, source })?;
    if admin.cfg.token.is_none() {
        tracing::warn!(%local_addr, "admin API has no token: open to local users");
    }
    let (tx, mut rx) = watch::channel(false);
    let (finished_tx, finished) = tokio::sync::oneshot::channel();
    let admin_tls = admin.server_tls.is_some();
    let admin = Arc::new(admin);
    tokio::spawn(async move {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
        loop {
            let (stream, _) = tokio::select! {
                _ = rx.changed() => break,
                res = listener.accept() => match res {
                    Ok(c) => c,
                    Err(_) => { tokio::time::sleep(Duration::from_millis(50)).await; continue }
                },
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!(
                    limit = MAX_ADMIN_CONNECTIONS,
                    "admin API: too many connections; closed a new one"
                );
                drop(stream);
                continue;
            };
            let admin = admin.clone();
            let watcher = graceful.watcher();
            let acceptor = admin
                .server_tls
                .clone()
                .map(tokio_rustls::TlsAcceptor::from);
            tokio::spawn(async move {
                let _slot = slot;
                let service = service_fn(move |req| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(admin.handle(req).await) }
                });
                let mut http = http1::Builder::new();
                http.timer(TokioTimer::new())
                    .header_read_timeout(ADMIN_READ_TIMEOUT);
                match acceptor {
                    None => {
                        let conn = http.serve_connection(TokioIo::new(stream), service);
                        let _ = watcher.watch(conn).await;
                    }
                    Some(acceptor) => {
                        // The handshake gets the same time as a request head.
                        match tokio::time::timeout(ADMIN_READ_TIMEOUT, acceptor.accept(stream))
                            .await
                        {
                            Ok(Ok(tls)) => {
                                let conn = http.serve_connection(TokioIo::new(tls), service);
                                let _ = watcher.watch(conn).await;
                            }
                            Ok(Err(e)) => {
                                tracing::debug!(error = %e, "admin API: TLS handshake failed");
                            }
                            Err(_) => tracing::debug!("admin API: TLS handshake timed out"),
                        }
                    }
                }
            });
        }
        // Answers being written (say, "upgrade done") still reach their callers.
        let _ = tokio::time::timeout(ADMIN_SHUTDOWN_GRACE, graceful.shutdown()).await;
        let _ = finished_tx.send(());
    });
    tracing::info!(%local_addr, tls = admin_tls, "admin API listening");
    Ok(AdminHandle {
        local_addr,
        shutdown: tx,
        handoff: std::sync::Mutex::new(Some(handoff)),
        finished: std::sync::Mutex::new(Some(finished)),
    })
}

type Reply = Response<Full<Bytes>>;

impl Admin {
    /// Answers one API call. Generic over the body so that the fuzz harness can drive
    /// the real router without sockets.
    pub async fn handle<B>(&self, req: Request<B>) -> Reply
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let path = req.uri().path().to_owned();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let method = req.method().clone();
        match segments.as_slice() {
            ["healthz"] => {
                return only(&method, &[Method::GET], || {
                    json_reply(
                        StatusCode::OK,
                        &api::Alive {
                            status: "ok".into(),
                        },
                    )
                })
            }
            ["readyz"] => return only(&method, &[Method::GET], || self.readyz()),
            _ => {}
        }
        if let Some(refusal) = refuse_from_browser(&req, &self.cfg.hosts) {
            return refusal;
        }
        match segments.as_slice() {
            // The status page and its script hold no data: they load for anyone who can
            // reach the listener, and ask for a sign-in when the API answers 401.
            [""] | ["status"] => {
                return only(&method, &[Method::GET], || {
                    page(STATUS_PAGE, "text/html; charset=utf-8")
                })
            }
            ["status.js"] => {
                return only(&method, &[Method::GET], || {
                    page(STATUS_SCRIPT, "text/javascript; charset=utf-8")
                })
            }
            ["v1", "session"] => return self.session(req).await,
            _ => {}
        }
        if let Some(refusal) = self.refuse_unauthorized(&req) {
            return refusal;
        }
        self.route(&method, &segments, req).await
    }

    /// The signed-in routes: each path to its handler.
    async fn route<B>(&self, method: &Method, segments: &[&str], req: Request<B>) -> Reply
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let get = &[Method::GET];
        match segments {
            ["metrics"] => only(method, get, || self.metrics()),
            ["v1", "openapi.json"] => only(method, get, || {
                json_reply(StatusCode::OK, &openapi::document())
            }),
            ["v1", "autoscaler"] => only(method, get, || {
                self.with_autoscaler(|a| api::AutoscalerStatus::of(a, &self.pool))
            }),
            ["v1", "autoscaler", "history"] => only(method, get, || {
                self.with_autoscaler(api::AutoscalerHistory::of)
            }),
            ["v1", "autoscaler", action @ ("pause" | "resume")] => {
                self.pause(method, *action == "pause").await
            }
            ["v1", "waiting-room", rest @ ..] => self.waiting_room(method, rest),
            ["v1", "cluster"] => self.cluster_view(method).await,
            ["v1", "tls", "reload"] => only(method, &[Method::POST], || self.reload_tls()),
            ["v1", "config", "reload"] if method == Method::POST => {
                self.control(ControlKind::Reload).await
            }
            ["v1", "upgrade"] if method == Method::POST => self.control(ControlKind::Upgrade).await,
            ["v1", "config", "reload"] | ["v1", "upgrade"] => method_not_allowed(&[Method::POST]),
            ["v1", "nodes"] => self.nodes(method, req).await,
            ["v1", "nodes", id] => self.node(method, id, req.uri().query()).await,
            ["v1", "nodes", id, action] => self.node_action(method, id, action, req).await,
            _ => error(
                StatusCode::NOT_FOUND,
                "not_found",
                &format!("no route {}", req.uri().path()),
            ),
        }
    }

    /// `what` of the autoscaler, or 404 when there is none.
    fn with_autoscaler<T: serde::Serialize>(
        &self,
        what: impl FnOnce(&crate::autoscale::Shared) -> T,
    ) -> Reply {
        match &self.autoscaler {
            Some(a) => json_reply(StatusCode::OK, &what(a)),
            None => no_autoscaler(),
        }
    }

    /// `POST /v1/autoscaler/pause|resume`, shared with the other instances.
    async fn pause(&self, method: &Method, pause: bool) -> Reply {
        if *method != Method::POST {
            return method_not_allowed(&[Method::POST]);
        }
        let Some(a) = &self.autoscaler else {
            return no_autoscaler();
        };
        let was = a.is_paused();
        a.set_paused(pause);
        tracing::info!(paused = pause, "autoscaler switched by operator");
        let reply = json_reply(StatusCode::OK, &api::AutoscalerStatus::of(a, &self.pool));
        self.share(reply, Shared::Paused(pause), || a.set_paused(was))
            .await
    }

    /// `/v1/waiting-room` (GET) and `/v1/waiting-room/open|close` (POST).
    fn waiting_room(&self, method: &Method, rest: &[&str]) -> Reply {
        // The method first: a route that exists answers 405 to a wrong one, with or
        // without a room.
        match (rest, method) {
            ([], m) if *m != Method::GET => return method_not_allowed(&[Method::GET]),
            ([_], m) if *m != Method::POST => return method_not_allowed(&[Method::POST]),
            _ => {}
        }
        let Some(room) = &self.pool.traffic.waiting else {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no waiting room configured ([waiting_room] with [pool.shed])",
            );
        };
        match (rest, method) {
            ([], &Method::GET) => json_reply(StatusCode::OK, &api::WaitingRoom::of(room)),
            ([], _) => method_not_allowed(&[Method::GET]),
            ([action @ ("open" | "close")], &Method::POST) => {
                // Open: everyone new waits (a pre-queue before a sale); close: they are
                // let in, first come first, as the pool has room.
                room.hold(*action == "open");
                tracing::info!(held = room.held(), "waiting room switched by operator");
                json_reply(StatusCode::OK, &api::WaitingRoom::of(room))
            }
            ([_], &Method::POST) => error(
                StatusCode::NOT_FOUND,
                "not_found",
                "use /v1/waiting-room/open or /v1/waiting-room/close",
            ),
            ([_], _) => method_not_allowed(&[Method::POST]),
            _ => error(StatusCode::NOT_FOUND, "not_found", "no such route"),
        }
    }

    /// `GET /v1/cluster`.
    async fn cluster_view(&self, method: &Method) -> Reply {
        if *method != Method::GET {
            return method_not_allowed(&[Method::GET]);
        }
        match &self.cluster {
            Some(c) => json_reply(StatusCode::OK, &api::ClusterView::of(&c.view().await)),
            None => error(
                StatusCode::NOT_FOUND,
                "not_found",
                "this surge runs standalone (no [cluster] section)",
            ),
        }
    }

    /// `GET /v1/nodes` (the pool) and `POST /v1/nodes` (a static node added).
    async fn nodes<B>(&self, method: &Method, req: Request<B>) -> Reply
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        match *method {
            Method::GET => self.list(),
            Method::POST => match read_json::<api::NewNode, _>(req).await {
                Ok(Some(body)) => {
                    let (reply, added) = self.add(body);
                    let Some((id, node)) = added else {
                        return reply;
                    };
                    let pool = self.pool.clone();
                    let undo_id = id.clone();
                    self.share(reply, Shared::Static(id, Some(node)), move || {
                        let _ = pool.remove(&undo_id);
                    })
                    .await
                }
                Ok(None) => error(
                    StatusCode::BAD_REQUEST,
                    "invalid_argument",
                    "body required: {\"address\": \"IP:port\", \"id\": ..., \"weight\": ...}",
                ),
                Err(r) => r,
            },
            _ => method_not_allowed(&[Method::GET, Method::POST]),
        }
    }

    /// `GET /v1/nodes/{id}` and `DELETE /v1/nodes/{id}` (drained, then removed).
    async fn node(&self, method: &Method, id: &str, query: Option<&str>) -> Reply {
        let id = id.to_owned();
        match *method {
            Method::GET => self.get(&id),
            Method::DELETE => {
                let (reply, timeout) = self.delete(&id, query.unwrap_or(""));
                let intent = crate::cluster::NodeIntent::Removed { timeout };
                let pool = self.pool.clone();
                let undo_id = id.clone();
                self.share(reply, Shared::Node(id, Some(intent)), move || {
                    let _ = pool.undrain(&undo_id);
                })
                .await
            }
            _ => method_not_allowed(&[Method::GET, Method::DELETE]),
        }
    }

    /// `POST /v1/nodes/{id}/drain|undrain|maint`, shared with the other instances.
    async fn node_action<B>(
        &self,
        method: &Method,
        id: &str,
        action: &str,
        req: Request<B>,
    ) -> Reply
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if *method != Method::POST {
            return method_not_allowed(&[Method::POST]);
        }
        let id = id.to_owned();
        let pool = self.pool.clone();
        let undo_id = id.clone();
        let undo = move || {
            let _ = pool.undrain(&undo_id);
        };
        match action {
            "drain" => match read_json::<api::DrainRequest, _>(req).await {
                Ok(body) => {
                    let body = body.unwrap_or_default();
                    let timeout = body.timeout.unwrap_or(self.cfg.default_drain_timeout);
                    let reply = self.drain(&id, body);
                    let intent = crate::cluster::NodeIntent::Draining { timeout };
                    self.share(reply, Shared::Node(id, Some(intent)), undo)
                        .await
                }
                Err(r) => r,
            },
            "undrain" => self.undrain_shared(id).await,
            "maint" => {
                let reply = self.maint(&id);
                let intent = crate::cluster::NodeIntent::Maintenance;
                self.share(reply, Shared::Node(id, Some(intent)), undo)
                    .await
            }
            _ => error(
                StatusCode::NOT_FOUND,
                "not_found",
                &format!("no action `{action}`"),
            ),
        }
    }

    /// An undrain, recorded first: an undrain etcd did not take changes nothing.
    async fn undrain_shared(&self, id: String) -> Reply {
        if self.pool.snapshot().get(&id).is_none() {
            return unknown(&id);
        }
        let ok = json_reply(
            StatusCode::OK,
            &api::Alive {
                status: "ok".into(),
            },
        );
        let recorded = self
            .share(
                ok,
                Shared::Node(id.clone(), Some(crate::cluster::NodeIntent::Kept)),
                || {},
            )
            .await;
        if !recorded.status().is_success() {
            return recorded;
        }
        self.undrain(&id)
    }

    /// Asks the top level for a reload or an upgrade and waits for the outcome: 200 once
    /// a new process serves (this one then finishes its requests and exits), 422 with the
    /// reason when refused (bad config, new process failed): this one keeps serving.
    async fn control(&self, kind: ControlKind) -> Reply {
        let Some(tx) = &self.control else {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                "this surge was not started by `surge serve`: nothing to reload or upgrade",
            );
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        if tx.send(Control { kind, reply }).await.is_err() {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "surge is shutting down",
            );
        }
        match answer.await {
            Ok(Ok(done)) => json_reply(
                StatusCode::OK,
                &api::HandedOver {
                    result: done.to_string(),
                },
            ),
            Ok(Err(refused)) => error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "refused",
                &refused.to_string(),
            ),
            Err(_) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "surge is shutting down",
            ),
        }
    }

    /// `POST /v1/session` with `{"token": "..."}`: a browser session cookie for the
    /// status page (204), or 401; `DELETE` signs out.
    async fn session<B>(&self, req: Request<B>) -> Reply
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let secure = self.cfg.tls.is_some();
        let with_cookie = |value: Option<&str>| {
            let mut reply = Response::new(Full::new(Bytes::new()));
            *reply.status_mut() = StatusCode::NO_CONTENT;
            if let Ok(v) = HeaderValue::from_str(&session::set_cookie(value, secure)) {
                reply.headers_mut().insert(header::SET_COOKIE, v);
            }
            reply
        };
        match *req.method() {
            Method::DELETE => with_cookie(None),
            Method::POST => {
                let body = match read_json::<api::SignIn, _>(req).await {
                    Ok(Some(body)) => body,
                    Ok(None) => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            "invalid_argument",
                            "body required: {\"token\": \"<admin token>\"}",
                        )
                    }
                    Err(r) => return r,
                };
                match &self.cfg.token {
                    Some(token) if same_secret(body.token.as_bytes(), token.as_bytes()) => {
                        with_cookie(Some(&session::issue(token, unix_now())))
                    }
                    Some(_) => error(
                        StatusCode::UNAUTHORIZED,
                        "unauthorized",
                        "that is not this surge's admin token",
                    ),
                    // No token: nothing to sign in to.
                    None => with_cookie(None),
                }
            }
            _ => method_not_allowed(&[Method::POST, Method::DELETE]),
        }
    }

    /// Checks `Authorization: Bearer <token>` in constant time, or the status page's
    /// session cookie; the 401 to send if neither is there and right.
    fn refuse_unauthorized<B>(&self, req: &Request<B>) -> Option<Reply> {
        let token = self.cfg.token.as_ref()?;
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .unwrap_or(b"");
        if same_secret(given, token.as_bytes()) {
            return None;
        }
        let cookies = req.headers().get_all(header::COOKIE).iter();
        if cookies
            .filter_map(|v| v.to_str().ok())
            .flat_map(cookie::Cookie::split_parse)
            .flatten()
            .filter(|c| c.name() == session::COOKIE)
            .any(|c| session::valid(token, c.value(), unix_now()))
        {
            return None;
        }
        let mut reply = error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            if given.is_empty() {
                "missing bearer token: send `Authorization: Bearer <token>`"
            } else {
                "invalid bearer token"
            },
        );
        reply
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        Some(reply)
    }

    /// Reloads every TLS listener's certificates: 200 when all loaded, 422 naming the
    /// file and reason when one was refused (its listener keeps its old certificates).
    fn reload_tls(&self) -> Reply {
        let sets = self.tls.get().map(Vec::as_slice).unwrap_or_default();
        if sets.is_empty() {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no TLS listener configured",
            );
        }
        let listeners: Vec<api::ListenerReload> = sets
            .iter()
            .map(|t| {
                let (ok, detail) = match t.reload("admin API") {
                    Ok(summary) => (true, summary),
                    Err(e) => (false, e.to_string()),
                };
                api::ListenerReload {
                    listener: t.listener(),
                    ok,
                    detail,
                }
            })
            .collect();
        let reloaded = listeners.iter().all(|l| l.ok);
        let status = if reloaded {
            StatusCode::OK
        } else {
            StatusCode::UNPROCESSABLE_ENTITY
        };
        json_reply(
            status,
            &api::TlsReload {
                reloaded,
                listeners,
            },
        )
    }

    fn readyz(&self) -> Reply {
        let listening = self.proxy_listening.load(Ordering::Relaxed);
        let in_service = self.pool.snapshot().count(State::InService);
        let ready = listening && in_service > 0;
        json_reply(
            if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            },
            &api::Ready {
                ready,
                proxy_listening: listening,
                in_service,
            },
        )
    }

    fn metrics(&self) -> Reply {
        let Some(handle) = &self.metrics else {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no metrics exporter installed",
            );
        };
        // Gauges that are cheaper to read at scrape time than to keep on the request path.
        let table = self.pool.snapshot();
        for m in table.members() {
            metrics::gauge!(crate::telemetry::names::BACKEND_IN_FLIGHT, "backend" => m.backend.id.to_string())
                .set(f64::from(m.backend.in_flight()));
        }
        for state in crate::pool::lifecycle::STATES {
            metrics::gauge!(crate::telemetry::names::POOL_NODES, "state" => state.as_str())
                .set(table.count(state) as f64);
        }
        let mut text = handle.render();
        crate::telemetry::render_durations(
            &mut text,
            table
                .members()
                .iter()
                .map(|m| (&*m.backend.id, &m.backend.metrics.duration)),
        );
        drop(table);
        let mut reply = Response::new(Full::new(Bytes::from(text)));
        reply.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        reply
    }

    fn list(&self) -> Reply {
        let table = self.pool.snapshot();
        let now = Instant::now();
        json_reply(
            StatusCode::OK,
            &api::NodeList {
                pool: self.pool.settings().name.clone(),
                generation: table.generation,
                nodes: table
                    .members()
                    .iter()
                    .map(|m| api::Node::of(m, now))
                    .collect(),
            },
        )
    }

    fn get(&self, id: &str) -> Reply {
        match self.pool.snapshot().get(id) {
            Some(m) => json_reply(StatusCode::OK, &api::Node::of(m, Instant::now())),
            None => unknown(id),
        }
    }

    /// Adds a node; the reply, and (when added) what every instance of a cluster adds.
    fn add(&self, body: api::NewNode) -> (Reply, Option<(String, crate::cluster::StaticNode)>) {
        let Ok(addr) = body.address.parse::<SocketAddr>() else {
            let reply = error(
                StatusCode::BAD_REQUEST,
                "invalid_argument",
                &format!("address: `{}` is not an IP:port address", body.address),
            );
            return (reply, None);
        };
        let id = body
            .id
            .unwrap_or_else(|| format!("node-{}", addr).replace([':', '.', '[', ']'], "-"));
        if !crate::config::is_valid_name(&id) {
            let reply = error(
                StatusCode::BAD_REQUEST,
                "invalid_argument",
                &format!("id: `{id}` {}", crate::config::NAME_RULE),
            );
            return (reply, None);
        }
        let backend = Arc::new(Backend::new(&id, addr, body.weight, Origin::Static));
        match self.pool.add(backend) {
            Ok(()) => {
                tracing::info!(backend = %id, %addr, "node added by operator");
                let node = crate::cluster::StaticNode {
                    address: addr,
                    weight: body.weight,
                };
                (self.node_reply(StatusCode::CREATED, &id), Some((id, node)))
            }
            Err(e) => (pool_error(e), None),
        }
    }

    /// In a cluster, records an operator's change in etcd so that every instance applies
    /// it (and it outlives restarts). If etcd does not take it, the local change is
    /// undone and the call fails with 503: the instances never disagree silently.
    async fn share(&self, reply: Reply, change: Shared, undo: impl FnOnce()) -> Reply {
        let Some(c) = &self.cluster else {
            return reply;
        };
        if !reply.status().is_success() {
            return reply;
        }
        let outcome = match change {
            Shared::Node(id, intent) => c.set_node_intent(&id, intent).await,
            Shared::Static(id, node) => c.set_static(&id, node).await,
            Shared::Paused(p) => c.set_paused(p).await,
        };
        match outcome {
            Ok(()) => reply,
            Err(e) => {
                undo();
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "cluster_unavailable",
                    &format!("not recorded in the cluster store, so not done (the other instances would not follow): {e}"),
                )
            }
        }
    }

    fn drain(&self, id: &str, body: api::DrainRequest) -> Reply {
        let timeout = body.timeout.unwrap_or(self.cfg.default_drain_timeout);
        if let Some(refused) = too_long(timeout) {
            return refused;
        }
        let min = if body.force {
            0
        } else {
            self.cfg.min_in_service
        };
        match self.pool.drain_keeping(id, timeout, min) {
            Ok(_) => {
                tracing::info!(backend = id, timeout = %humantime::format_duration(timeout), force = body.force, "drain started by operator");
                self.node_reply(StatusCode::ACCEPTED, id)
            }
            Err(e) => pool_error(e),
        }
    }

    fn undrain(&self, id: &str) -> Reply {
        match self.pool.undrain(id) {
            Ok(_) => self.node_reply(StatusCode::OK, id),
            Err(e) => pool_error(e),
        }
    }

    fn maint(&self, id: &str) -> Reply {
        match self.pool.maint(id) {
            Ok(()) => self.node_reply(StatusCode::OK, id),
            Err(e) => pool_error(e),
        }
    }

    /// Drains the node, then removes it from the pool once the drain is done; the reply
    /// and the drain deadline.
    fn delete(&self, id: &str, query: &str) -> (Reply, Duration) {
        let mut timeout = self.cfg.default_drain_timeout;
        let mut force = false;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("timeout", v)) => match humantime::parse_duration(v) {
                    Ok(d) => timeout = d,
                    Err(e) => {
                        let reply = error(
                            StatusCode::BAD_REQUEST,
                            "invalid_argument",
                            &format!("timeout: {e}"),
                        );
                        return (reply, timeout);
                    }
                },
                Some(("force", v)) => force = v == "true",
                _ => {
                    let reply = error(
                        StatusCode::BAD_REQUEST,
                        "invalid_argument",
                        &format!("unknown query parameter `{pair}`"),
                    );
                    return (reply, timeout);
                }
            }
        }
        if let Some(refused) = too_long(timeout) {
            return (refused, timeout);
        }
        let min = if force { 0 } else { self.cfg.min_in_service };
        let reply = match crate::pool::drain::drain_then_remove(&self.pool, id, timeout, min) {
            Ok(_) => self.node_reply(StatusCode::ACCEPTED, id),
            Err(e) => pool_error(e),
        };
        (reply, timeout)
    }

    fn node_reply(&self, status: StatusCode, id: &str) -> Reply {
        match self.pool.snapshot().get(id) {
            Some(m) => json_reply(status, &api::Node::of(m, Instant::now())),
            None => unknown(id),
        }
    }
}

/// Why a request that a web page may have sent is refused, if it is: the admin API is
/// for operators' tools, and a page the operator has open must not drive it.
/// - DNS rebinding: `Host` must be an IP address, `localhost`, or one of `admin.hosts`
///   (a rebound name is none of these);
/// - cross-site requests (CSRF): a state-changing request whose `Origin` is not the
///   admin API's own (the `Host` it was sent to), or that the browser marks
///   `Sec-Fetch-Site: cross-site`/`same-site`, is refused. Browsers send `Origin` on
///   every non-GET request; the CLI, curl and scripts send none.
fn refuse_from_browser<B>(req: &Request<B>, hosts: &[String]) -> Option<Reply> {
    let headers = req.headers();
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    if let Some(h) = host {
        if !host_allowed(h, hosts) {
            return Some(error(
                StatusCode::FORBIDDEN,
                "forbidden_host",
                &format!("Host `{h}` is not this admin API's (use its IP address, localhost, or a name in admin.hosts)"),
            ));
        }
    }
    if matches!(*req.method(), Method::GET | Method::HEAD) {
        return None;
    }
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        if !matches!(site, "same-origin" | "none") {
            return Some(error(
                StatusCode::FORBIDDEN,
                "cross_origin",
                &format!("a {site} request from a web page cannot change surge"),
            ));
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("null");
        let authority = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        let same = match (authority, host) {
            (Some(a), Some(h)) => a.eq_ignore_ascii_case(h),
            _ => false,
        };
        if !same {
            return Some(error(
                StatusCode::FORBIDDEN,
                "cross_origin",
                &format!("Origin `{origin}` is not this admin API: a web page cannot change surge"),
            ));
        }
    }
    None
}

/// Whether `Host` names this admin API: an IP address (any port), `localhost`, or one of
/// `hosts`.
fn host_allowed(host: &str, hosts: &[String]) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => {
            return v6
                .split_once(']')
                .is_some_and(|(a, _)| a.parse::<std::net::Ipv6Addr>().is_ok())
        }
        None => host.rsplit_once(':').map_or(host, |(n, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                n
            } else {
                host
            }
        }),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name.parse::<std::net::Ipv4Addr>().is_ok() || name == "localhost" || hosts.contains(&name)
}

/// Reads a JSON body; `Ok(None)` when it is empty. A body must say it is JSON
/// (`Content-Type: application/json`): 415 otherwise.
async fn read_json<T, B>(req: Request<B>) -> Result<Option<T>, Reply>
where
    T: serde::de::DeserializeOwned,
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    let collected = tokio::time::timeout(
        ADMIN_READ_TIMEOUT,
        Limited::new(req.into_body(), MAX_BODY_BYTES).collect(),
    )
    .await;
    let bytes = match collected {
        Ok(Ok(b)) => b.to_bytes(),
        Err(_) => {
            return Err(error(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                &format!(
                    "the body did not arrive within {}",
                    humantime::format_duration(ADMIN_READ_TIMEOUT)
                ),
            ))
        }
        Ok(Err(_)) => {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                &format!("body larger than {MAX_BODY_BYTES} bytes"),
            ))
        }
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    if !json {
        return Err(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the body must be JSON, sent with `Content-Type: application/json`",
        ));
    }
    // Every body of this API is an object: serde would also read a struct out of an
    // array (`[]` as a drain with every field defaulted).
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "the body must be a JSON object",
        ));
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| error(StatusCode::BAD_REQUEST, "invalid_json", &e.to_string()))
}

fn only(method: &Method, allowed: &[Method], f: impl FnOnce() -> Reply) -> Reply {
    if allowed.contains(method) {
        f()
    } else {
        method_not_allowed(allowed)
    }
}

fn method_not_allowed(allowed: &[Method]) -> Reply {
    let list = allowed
        .iter()
        .map(Method::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    let mut r = error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &format!("allowed: {list}"),
    );
    if let Ok(v) = HeaderValue::from_str(&list) {
        r.headers_mut().insert(header::ALLOW, v);
    }
    r
}

/// 400 for a drain timeout beyond [`crate::pool::drain::MAX_DRAIN_TIMEOUT`].
fn too_long(timeout: Duration) -> Option<Reply> {
    let max = crate::pool::drain::MAX_DRAIN_TIMEOUT;
    (timeout > max).then(|| {
        error(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            &format!(
                "timeout: {} is longer than the maximum drain of {}",
                humantime::format_duration(timeout),
                humantime::format_duration(max)
            ),
        )
    })
}

fn unknown(id: &str) -> Reply {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        &format!("no node with id `{id}`"),
    )
}

fn pool_error(e: PoolError) -> Reply {
    let status = match &e {
        PoolError::UnknownBackend(_) => StatusCode::NOT_FOUND,
        PoolError::DuplicateId(_)
        | PoolError::DuplicateAddress(_)
        | PoolError::TooFewInService { .. } => StatusCode::CONFLICT,
        PoolError::BadWeight(_) => StatusCode::BAD_REQUEST,
    };
    let kind = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::CONFLICT => "conflict",
        _ => "invalid_argument",
    };
    error(status, kind, &e.to_string())
}

/// The status page (`GET /`) and its script, served from the binary.
const STATUS_PAGE: &str = include_str!("status.html");
const STATUS_SCRIPT: &str = include_str!("status.js");

/// A static page with headers that keep it to itself: scripts only from this origin, no
/// framing by another site (clickjacking), no sniffing, no caching.
fn page(body: &'static str, content_type: &'static str) -> Reply {
    let mut reply = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    let h = reply.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    reply
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn json_reply<T: Serialize>(status: StatusCode, value: &T) -> Reply {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// `{"error": kind, "detail": text}` with `status`.
fn error(status: StatusCode, kind: &str, detail: &str) -> Reply {
    json_reply(
        status,
        &api::ErrorBody {
            error: kind.to_owned(),
            detail: detail.to_owned(),
        },
    )
}

/// Whether `given` is the secret, in time that tells nothing of the secret, its length
/// included: the two SHA-256 digests (always 32 bytes) are compared in constant time. A
/// plain constant-time comparison of the values answers at once when their lengths
/// differ, so an attacker could time their way to the token's length.
fn same_secret(given: &[u8], secret: &[u8]) -> bool {
    let given = ring::digest::digest(&ring::digest::SHA256, given);
    let secret = ring::digest::digest(&ring::digest::SHA256, secret);
    bool::from(given.as_ref().ct_eq(secret.as_ref()))
}

fn no_autoscaler() -> Reply {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        "no autoscaler configured ([autoscale] and [provider])",
    )
}

#[cfg(test)]
mod tests {
    use super::host_allowed;

    #[test]
    fn only_addresses_localhost_and_configured_names_are_this_api() {
        let hosts = vec!["lb-1.shop.internal".to_owned()];
        for ok in [
            "127.0.0.1:9090",
            "127.0.0.1",
            "10.0.0.11:9090",
            "[::1]:9090",
            "localhost:9090",
            "LOCALHOST",
            "lb-1.shop.internal:9090",
            "lb-1.shop.internal.",
        ] {
            assert!(host_allowed(ok, &hosts), "{ok}");
        }
        for bad in [
            "evil.example:9090",
            "127.0.0.1.evil.example",
            "localhost.evil.example:9090",
            "[::1",
            "",
            "lb-1.shop.internal.evil:9090",
        ] {
            assert!(!host_allowed(bad, &hosts), "{bad}");
        }
    }
}
