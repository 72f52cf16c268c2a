//! TLS termination for a listener: a rustls server config (TLS 1.2 and 1.3 only, ring's
//! AEAD-only suites, ALPN `h2` and `http/1.1`) whose certificate is chosen per handshake
//! by SNI from a set that can be swapped while connections are open.
//!
//! Rotation: [`Tls::reload`] reads every file again and swaps the set in one atomic store
//! only if all of it loads and each key matches its certificate; otherwise the error
//! names the file and the old set keeps serving. Open connections keep the certificate
//! they were made with; new handshakes get the new one. Triggers:
//! `POST /v1/tls/reload` (wired in `serve` and `admin`) and [`Tls::watch`], which polls
//! the files' size and modification time (robust to editors and to Kubernetes' symlink
//! swaps, where inotify on the file itself misses the change).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::{CertPair, SelfSigned, TlsConfig};

/// Why certificates could not be loaded (or generated). Names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("{}: {reason}", .file.display())]
    File { file: PathBuf, reason: String },
    #[error("TLS setup: {0}")]
    Setup(String),
}

/// HTTPS to the blades: the client configuration (the CA file's certificates as the only
/// roots, TLS 1.2 and 1.3, ALPN `http/1.1`) and the name to verify, if not the blade's
/// address.
#[derive(Clone)]
pub struct UpstreamTls {
    pub connector: tokio_rustls::TlsConnector,
    pub server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl UpstreamTls {
    /// Loads the CA file of `[pool.tls]`.
    pub fn new(cfg: &crate::config::UpstreamTlsConfig) -> Result<Self, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in
            CertificateDer::pem_file_iter(&cfg.ca).map_err(|e| file_err(&cfg.ca, pem_reason(e)))?
        {
            let cert = cert.map_err(|e| file_err(&cfg.ca, pem_reason(e)))?;
            roots
                .add(cert)
                .map_err(|e| file_err(&cfg.ca, format!("not a usable CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(file_err(&cfg.ca, "holds no certificate"));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Setup(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let server_name = match &cfg.server_name {
            Some(name) => Some(
                ServerName::try_from(name.clone())
                    .map_err(|e| TlsError::Setup(format!("server_name `{name}`: {e}")))?,
            ),
            None => None,
        };
        Ok(Self {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    /// The name a blade at `addr` must prove.
    pub fn name_for(&self, addr: std::net::SocketAddr) -> ServerName<'static> {
        self.server_name
            .clone()
            .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()))
    }
}

fn file_err(file: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        file: file.to_owned(),
        reason: reason.to_string(),
    }
}

/// One loaded certificate chain with its key.
#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    cert_file: PathBuf,
}

/// The certificates a listener serves; the first is the default.
#[derive(Debug)]
struct CertSet {
    certs: Vec<Loaded>,
}

impl CertSet {
    /// The first certificate valid for `name` (exact or wildcard, as a browser would
    /// check it), else the default.
    fn pick(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = name.and_then(|n| ServerName::try_from(n).ok()) {
            for c in &self.certs {
                let valid = c.key.end_entity_cert().ok().is_some_and(|der| {
                    webpki::EndEntityCert::try_from(der)
                        .and_then(|ee| ee.verify_is_valid_for_subject_name(&name))
                        .is_ok()
                });
                if valid {
                    return Some(c.key.clone());
                }
            }
        }
        self.certs.first().map(|c| c.key.clone())
    }
}

/// rustls asks this for a certificate on every handshake.
#[derive(Debug)]
struct Resolver {
    set: ArcSwap<CertSet>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.set.load().pick(hello.server_name())
    }
}

/// Size and modification time of a file, to notice it changed.
type Stamp = Option<(u64, SystemTime)>;

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()?))
}

/// A TLS listener's certificates and rustls configuration.
#[derive(Debug)]
pub struct Tls {
    /// The listener's address, for messages.
    pub listener: String,
    files: Vec<CertPair>,
    resolver: Arc<Resolver>,
    config: Arc<rustls::ServerConfig>,
    stamps: Mutex<Vec<(Stamp, Stamp)>>,
    watch_interval: Duration,
}

impl Tls {
    /// Loads (generating the self-signed pair first if asked and missing) and builds the
    /// server configuration.
    pub fn new(listener: String, cfg: &TlsConfig) -> Result<Tls, TlsError> {
        let mut files = cfg.certificates.clone();
        if let Some(ss) = &cfg.self_signed {
            files.push(ensure_self_signed(ss)?);
        }
        let stamps = stamps_of(&files);
        let set = load(&files)?;
        publish_expiry(&set);
        let resolver = Arc::new(Resolver {
            set: ArcSwap::from_pointee(set),
        });
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Setup(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        // The server's order (AES-GCM, then ChaCha20, all AEAD with forward secrecy)
        // rather than whatever a client lists first.
        config.ignore_client_order = true;
        // Stateless resumption tickets: returning shoppers skip the full handshake on
        // any worker.
        if let Ok(ticketer) = rustls::crypto::ring::Ticketer::new() {
            config.ticketer = ticketer;
        }
        Ok(Tls {
            listener,
            files,
            resolver,
            config: Arc::new(config),
            stamps: Mutex::new(stamps),
            watch_interval: cfg.watch_interval,
        })
    }

    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.config.clone()
    }

    /// Reads every certificate and key again; swaps them in only if all load. Returns a
    /// line saying what now serves.
    pub fn reload(&self) -> Result<String, TlsError> {
        let stamps = stamps_of(&self.files);
        let result = load(&self.files);
        // Remember what was seen even on failure, so a bad file is reported once, not
        // on every poll; fixing it changes the stamp again.
        if let Ok(mut s) = self.stamps.lock() {
            *s = stamps;
        }
        let set = result?;
        let summary = set
            .certs
            .iter()
            .map(|c| c.cert_file.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        publish_expiry(&set);
        self.resolver.set.store(Arc::new(set));
        Ok(format!("{}: serving {summary}", self.listener))
    }

    /// Whether any file's size or modification time differs from the last load.
    fn changed_on_disk(&self) -> bool {
        let now = stamps_of(&self.files);
        self.stamps.lock().is_ok_and(|s| *s != now)
    }

    /// Polls the files and reloads when one changed; runs until the task is dropped.
    pub async fn watch(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.watch_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.changed_on_disk() {
                // A file being written may be caught half way: wait a moment so both
                // halves of a pair are in place, then load.
                tokio::time::sleep(Duration::from_millis(200)).await;
                let _ = self.log_reload("files changed");
            }
        }
    }

    /// Reloads and logs the outcome; returns whether it worked.
    pub fn log_reload(&self, why: &str) -> Result<String, TlsError> {
        let r = self.reload();
        let result = if r.is_ok() { "ok" } else { "refused" };
        metrics::counter!(crate::telemetry::names::TLS_RELOADS, "result" => result).increment(1);
        match &r {
            Ok(summary) => tracing::info!(why, "TLS certificates reloaded; {summary}"),
            Err(e) => tracing::error!(
                why,
                listener = %self.listener,
                "TLS reload refused, the previous certificates keep serving: {e}"
            ),
        }
        r
    }
}

fn stamps_of(files: &[CertPair]) -> Vec<(Stamp, Stamp)> {
    files
        .iter()
        .map(|p| (stamp(&p.cert), stamp(&p.key)))
        .collect()
}

/// Loads every pair; the first error wins and names its file.
fn load(files: &[CertPair]) -> Result<CertSet, TlsError> {
    let mut certs = Vec::with_capacity(files.len());
    for pair in files {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&pair.cert)
            .map_err(|e| file_err(&pair.cert, pem_reason(e)))?
            .collect::<Result<_, _>>()
            .map_err(|e| file_err(&pair.cert, pem_reason(e)))?;
        let Some(leaf) = chain.first() else {
            return Err(file_err(&pair.cert, "no PEM certificate in the file"));
        };
        if let Err(e) = webpki::EndEntityCert::try_from(leaf) {
            return Err(file_err(
                &pair.cert,
                format!("not a usable certificate: {e}"),
            ));
        }
        let key = PrivateKeyDer::from_pem_file(&pair.key)
            .map_err(|e| file_err(&pair.key, pem_reason(e)))?;
        let signer = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| file_err(&pair.key, format!("unsupported private key: {e}")))?;
        let certified = CertifiedKey::new(chain, signer);
        certified.keys_match().map_err(|e| {
            file_err(
                &pair.key,
                format!(
                    "does not match the certificate in {}: {e}",
                    pair.cert.display()
                ),
            )
        })?;
        certs.push(Loaded {
            key: Arc::new(certified),
            cert_file: pair.cert.clone(),
        });
    }
    if certs.is_empty() {
        return Err(TlsError::Setup("no certificates".into()));
    }
    Ok(CertSet { certs })
}

/// `surge_tls_certificate_expiry_timestamp_seconds{certificate}`: when each serving
/// leaf certificate's validity ends (Unix time), so an alert can warn weeks ahead.
fn publish_expiry(set: &CertSet) {
    for c in &set.certs {
        let Some(leaf) = c.key.cert.first() else {
            continue;
        };
        if let Some(end) = not_after(leaf) {
            metrics::gauge!(
                crate::telemetry::names::TLS_CERTIFICATE_EXPIRY,
                "certificate" => c.cert_file.display().to_string()
            )
            .set(end as f64);
        }
    }
}

/// The end of a certificate's validity, in Unix seconds.
fn not_after(der: &CertificateDer<'_>) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    Some(cert.validity().not_after.timestamp())
}

fn pem_reason(e: rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error as E;
    match e {
        E::Io(io) => format!("cannot read: {io}"),
        E::NoItemsFound => "no PEM item of the expected kind (certificate or private key)".into(),
        other => format!("bad PEM: {other:?}"),
    }
}

/// The self-signed pair in `ss.dir`, generated (rcgen) if missing. The directory is
/// made (or tightened to) owner-only, and the key is written owner-only through a new
/// file renamed into place: never through a symlink planted at its path, never with the
/// permissions of a key file left there before.
pub fn ensure_self_signed(ss: &SelfSigned) -> Result<CertPair, TlsError> {
    let pair = CertPair {
        cert: ss.dir.join("selfsigned.crt"),
        key: ss.dir.join("selfsigned.key"),
    };
    if pair.cert.exists() && pair.key.exists() && !self_signed_ending(&pair.cert) {
        return Ok(pair);
    }
    private_dir(&ss.dir)?;
    let generated = self_signed(&ss.names, SELF_SIGNED_VALIDITY)?;
    write_replacing(
        &pair.key,
        generated.key_pair.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_replacing(&pair.cert, generated.cert.pem().as_bytes(), 0o644)?;
    tracing::info!(
        cert = %pair.cert.display(),
        names = ?ss.names,
        "generated a self-signed certificate"
    );
    Ok(pair)
}

/// How long a generated self-signed certificate is valid: a year (audit tools flag the
/// ~2,000 years rcgen gives by default), made again at start when it nears its end.
const SELF_SIGNED_VALIDITY: std::time::Duration = std::time::Duration::from_secs(365 * 86_400);
/// A self-signed certificate with less than this left is made again at start.
const SELF_SIGNED_RENEW_WITHIN: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);

/// A self-signed certificate for `names`, valid from a day ago (clocks differ) for
/// `validity`.
fn self_signed(
    names: &[String],
    validity: std::time::Duration,
) -> Result<rcgen::CertifiedKey, TlsError> {
    let setup = |e: rcgen::Error| TlsError::Setup(format!("cannot generate a certificate: {e}"));
    let key_pair = rcgen::KeyPair::generate().map_err(setup)?;
    let mut params = rcgen::CertificateParams::new(names.to_vec()).map_err(setup)?;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + validity;
    let cert = params.self_signed(&key_pair).map_err(setup)?;
    Ok(rcgen::CertifiedKey { cert, key_pair })
}

/// Whether the certificate in `file` ends within [`SELF_SIGNED_RENEW_WITHIN`] (or cannot
/// be read: made again too).
fn self_signed_ending(file: &Path) -> bool {
    let Ok(pem) = std::fs::read(file) else {
        return true;
    };
    let end = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
        .next()
        .and_then(Result::ok)
        .and_then(|der| not_after(&der));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    end.is_none_or(|end| end - now < SELF_SIGNED_RENEW_WITHIN.as_secs() as i64)
}

/// Creates `dir` (and its parents) with mode 0700, or tightens it to 0700 if it exists.
pub(super) fn private_dir(dir: &Path) -> Result<(), TlsError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| file_err(dir, e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| file_err(dir, e))
}

/// Writes `bytes` to a new file beside `path` (created exclusively, not following
/// symlinks, with `mode`), then renames it over `path`: a symlink at `path` is replaced,
/// not followed.
pub(super) fn write_replacing(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| file_err(&tmp, e))?;
    f.write_all(bytes).map_err(|e| file_err(&tmp, e))?;
    f.sync_all().map_err(|e| file_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| file_err(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &Path, name: &str, names: &[&str]) -> CertPair {
        let g = rcgen::generate_simple_self_signed(
            names.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
        .unwrap();
        let p = CertPair {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        };
        std::fs::write(&p.cert, g.cert.pem()).unwrap();
        std::fs::write(&p.key, g.key_pair.serialize_pem()).unwrap();
        p
    }

    fn tmp() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "surge-tls-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn the_self_signed_key_is_owner_only_in_an_owner_only_dir_and_never_through_a_symlink() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let base = tmp();
        let ss = SelfSigned {
            dir: base.join("tls"),
            names: vec!["localhost".into()],
        };
        let p = ensure_self_signed(&ss).unwrap();
        assert_eq!(mode(&p.key), 0o600);
        assert_eq!(mode(&ss.dir), 0o700);
        assert!(load(std::slice::from_ref(&p)).is_ok(), "the pair loads");
        // Regenerated (the certificate went missing) over a key left world-readable, with
        // the directory loosened, and the key path a symlink to another file.
        std::fs::remove_file(&p.cert).unwrap();
        std::fs::set_permissions(&ss.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let victim = base.join("victim");
        std::fs::write(&victim, "not yours").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::remove_file(&p.key).unwrap();
        std::os::unix::fs::symlink(&victim, &p.key).unwrap();
        let p = ensure_self_signed(&ss).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "not yours");
        assert!(!std::fs::symlink_metadata(&p.key)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(mode(&p.key), 0o600);
        assert_eq!(mode(&ss.dir), 0o700);
        let _ = std::fs::remove_dir_all(base);
    }

    /// The certificate made at first start is valid for a year (not rcgen's ~2,000), and
    /// one nearing its end is made again at the next start.
    #[test]
    fn the_self_signed_certificate_lasts_a_year_and_is_remade_near_its_end() {
        let base = tmp();
        let ss = SelfSigned {
            dir: base.join("tls"),
            names: vec!["localhost".into()],
        };
        let end_of = |p: &CertPair| {
            let pem = std::fs::read(&p.cert).unwrap();
            let der = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
                .next()
                .unwrap()
                .unwrap();
            not_after(&der).unwrap()
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let p = ensure_self_signed(&ss).unwrap();
        let days = (end_of(&p) - now) / 86_400;
        assert!((364..=366).contains(&days), "valid {days} days");
        // One with a week left (an old surge's, or a year on) is made again.
        let old = self_signed(&ss.names, std::time::Duration::from_secs(7 * 86_400)).unwrap();
        std::fs::write(&p.cert, old.cert.pem()).unwrap();
        let p = ensure_self_signed(&ss).unwrap();
        assert!((end_of(&p) - now) / 86_400 >= 364, "not made again");
        let _ = std::fs::remove_dir_all(base);
    }

    #[test]
    fn sni_picks_the_covering_certificate_and_falls_back_to_the_first() {
        let d = tmp();
        let a = pair(&d, "a", &["shop.example"]);
        let b = pair(&d, "b", &["*.api.example"]);
        let set = load(&[a, b]).unwrap();
        let leaf = |k: Option<Arc<CertifiedKey>>| k.unwrap().cert[0].clone();
        assert_eq!(
            leaf(set.pick(Some("x.api.example"))),
            set.certs[1].key.cert[0]
        );
        assert_eq!(
            leaf(set.pick(Some("shop.example"))),
            set.certs[0].key.cert[0]
        );
        assert_eq!(
            leaf(set.pick(Some("other.example"))),
            set.certs[0].key.cert[0]
        );
        assert_eq!(leaf(set.pick(None)), set.certs[0].key.cert[0]);
    }

    #[test]
    fn a_key_from_another_certificate_is_refused_naming_the_file() {
        let d = tmp();
        let a = pair(&d, "a", &["a.example"]);
        let b = pair(&d, "b", &["b.example"]);
        let mixed = CertPair {
            cert: a.cert.clone(),
            key: b.key.clone(),
        };
        let e = load(&[mixed]).unwrap_err().to_string();
        assert!(e.contains("b.key") && e.contains("does not match"), "{e}");
        let garbage = d.join("garbage.crt");
        std::fs::write(&garbage, "not pem").unwrap();
        let e = load(&[CertPair {
            cert: garbage,
            key: a.key,
        }])
        .unwrap_err()
        .to_string();
        assert!(e.contains("garbage.crt"), "{e}");
    }
}
