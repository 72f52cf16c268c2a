//! Binding the shopper-facing listeners: one `SO_REUSEPORT` socket per worker and
//! listener (or the sockets a predecessor process handed over), TLS loaded, and copies of
//! every socket kept for a successor.

use std::net::SocketAddr;
use std::sync::Arc;

use http::HeaderValue;
use socket2::{Domain, Protocol, Socket, Type};

use super::{tls, ProxyError};
use crate::config::{ListenerConfig, ProxyConfig};

/// A bound listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    pub addr: SocketAddr,
    pub tls: bool,
}

/// What a worker needs to serve one listener (sendable to the worker thread).
#[derive(Clone)]
pub(super) struct ListenerSpec {
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub h2c: bool,
    pub redirect_https: Option<String>,
    pub hsts: Option<HeaderValue>,
    /// Connections start with a PROXY header, accepted from these peers only.
    pub proxy_protocol: Option<Arc<[ipnet::IpNet]>>,
}

impl ListenerSpec {
    fn new(l: &ListenerConfig, tls: Option<&Arc<tls::Tls>>, trusted: &[ipnet::IpNet]) -> Self {
        Self {
            proxy_protocol: l.proxy_protocol.then(|| trusted.into()),
            tls: tls.map(|t| t.server_config()),
            h2c: l.h2c,
            redirect_https: l.redirect_https.clone(),
            hsts: l
                .hsts
                .and_then(|d| HeaderValue::from_str(&format!("max-age={}", d.as_secs())).ok()),
        }
    }
}

/// Every configured listener, bound.
pub(super) struct Listeners {
    /// Per worker: its sockets, each with the listener it belongs to.
    pub per_worker: Vec<Vec<(std::net::TcpListener, ListenerSpec)>>,
    /// The listeners in the order of the configuration.
    pub bound: Vec<Bound>,
    /// The TLS listeners' certificate sets.
    pub tls: Vec<Arc<tls::Tls>>,
    /// Copies of every socket, for a successor process.
    pub handoff: Vec<std::net::TcpListener>,
}

/// Binds every listener of `cfg` for `workers` workers, taking sockets from `inherited`
/// (by configured address) before binding new ones. Every inherited socket is served,
/// even if there are more than workers.
pub(super) fn bind(
    cfg: &ProxyConfig,
    workers: usize,
    inherited: &mut dyn FnMut(SocketAddr) -> Vec<std::net::TcpListener>,
) -> Result<Listeners, ProxyError> {
    let mut per_worker: Vec<Vec<(std::net::TcpListener, ListenerSpec)>> =
        (0..workers).map(|_| Vec::new()).collect();
    let mut out = Listeners {
        per_worker: Vec::new(),
        bound: Vec::new(),
        tls: Vec::new(),
        handoff: Vec::new(),
    };
    for l in &cfg.listeners {
        let mut these = if l.listen.port() == 0 {
            Vec::new()
        } else {
            inherited(l.listen)
        };
        for s in &these {
            s.set_nonblocking(true)
                .map_err(|source| ProxyError::Listen {
                    addr: l.listen,
                    source,
                })?;
        }
        if these.is_empty() {
            these.push(reuseport_listener(l.listen)?);
        }
        let addr = these[0].local_addr().map_err(|source| ProxyError::Listen {
            addr: l.listen,
            source,
        })?;
        // Inherited sockets are shared among the workers rather than joined by new
        // SO_REUSEPORT ones: the kernel lets only the socket owner's user bind beside it,
        // and systemd's sockets (socket activation) belong to root, not to the unit's
        // user. Sockets bound here get a sibling each.
        let inherited_count = these.len();
        while these.len() < workers {
            let next = if inherited_count > 0 {
                these[these.len() % inherited_count]
                    .try_clone()
                    .map_err(|source| ProxyError::Listen { addr, source })?
            } else {
                reuseport_listener(addr)?
            };
            these.push(next);
        }
        for s in &these {
            out.handoff.push(
                s.try_clone()
                    .map_err(|source| ProxyError::Listen { addr, source })?,
            );
        }
        let tls = match &l.tls {
            Some(t) => Some(Arc::new(
                tls::Tls::new(addr.to_string(), t)
                    .map_err(|source| ProxyError::Tls { addr, source })?,
            )),
            None => None,
        };
        let spec = ListenerSpec::new(l, tls.as_ref(), &cfg.trusted_proxies);
        for (i, s) in these.into_iter().enumerate() {
            per_worker[i % workers].push((s, spec.clone()));
        }
        out.bound.push(Bound {
            addr,
            tls: tls.is_some(),
        });
        out.tls.extend(tls);
    }
    out.per_worker = per_worker;
    Ok(out)
}

/// A non-blocking listening socket on `addr` that other workers (and a successor process)
/// may bind too, the kernel spreading new connections over them.
fn reuseport_listener(addr: SocketAddr) -> Result<std::net::TcpListener, ProxyError> {
    let listen_err = |source| ProxyError::Listen { addr, source };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(listen_err)?;
    socket.set_reuse_address(true).map_err(listen_err)?;
    socket.set_reuse_port(true).map_err(listen_err)?;
    socket.set_nonblocking(true).map_err(listen_err)?;
    socket.bind(&addr.into()).map_err(listen_err)?;
    socket.listen(4096).map_err(listen_err)?;
    Ok(socket.into())
}
