//! The route cookie, signed: `<backend id>~<expiry>~<mac>`, the MAC an HMAC-SHA256 (ring)
//! over the id and the expiry under the pool's route key. A shopper cannot pin itself to
//! a node of its choosing (to pile load on one blade, or to reach one being drained):
//! a forged, altered, expired or unknown cookie is ignored and the cart is placed by the
//! hash ring as if there were none. During a key rotation the previous key still
//! verifies, and every cookie it verifies is issued again under the new one.

use std::path::Path;
use std::time::Duration;

use ring::hmac;

/// Bytes of the MAC kept in the cookie (128 bits: forging one is 2^128 guesses).
const MAC_BYTES: usize = 16;
/// Shortest key accepted.
pub const MIN_KEY_BYTES: usize = 32;

/// Signs and checks route cookies.
pub struct RouteSigner {
    key: hmac::Key,
    previous: Option<hmac::Key>,
    ttl: Duration,
}

impl std::fmt::Debug for RouteSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteSigner")
            .field("ttl", &self.ttl)
            .field("previous", &self.previous.is_some())
            .finish_non_exhaustive()
    }
}

/// A route cookie that verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified<'a> {
    pub backend: &'a str,
    /// Issue it again (past half its life, or signed with the previous key).
    pub renew: bool,
}

impl RouteSigner {
    /// A signer with `key` (and the `previous` one, still accepted), cookies valid `ttl`.
    pub fn new(key: &[u8], previous: Option<&[u8]>, ttl: Duration) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
            previous: previous.map(|p| hmac::Key::new(hmac::HMAC_SHA256, p)),
            ttl,
        }
    }

    /// The hex MAC of `backend` and `expiry`, into `out` (no allocation: it runs on every
    /// cart request).
    fn mac(key: &hmac::Key, backend: &str, expiry: u64, out: &mut [u8; MAC_BYTES * 2]) {
        let mut ctx = hmac::Context::with_key(key);
        ctx.update(backend.as_bytes());
        ctx.update(b"~");
        let mut digits = [0u8; 20];
        ctx.update(decimal(expiry, &mut digits));
        let tag = ctx.sign();
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for (i, b) in tag.as_ref()[..MAC_BYTES].iter().enumerate() {
            out[2 * i] = HEX[usize::from(b >> 4)];
            out[2 * i + 1] = HEX[usize::from(b & 0xf)];
        }
    }

    /// The cookie value binding a cart to `backend`, issued at `now` (Unix seconds).
    pub fn issue(&self, backend: &str, now: u64) -> String {
        let expiry = now.saturating_add(self.ttl.as_secs());
        let mut mac = [0u8; MAC_BYTES * 2];
        Self::mac(&self.key, backend, expiry, &mut mac);
        format!(
            "{backend}~{expiry}~{}",
            std::str::from_utf8(&mac).unwrap_or_default()
        )
    }

    /// A value for `subject` that expires at `expiry` (Unix seconds) whenever it is issued:
    /// what a renewal must not extend (a waiting-room ticket lives as long as it was
    /// given to live when issued).
    pub fn issue_until(&self, subject: &str, expiry: u64) -> String {
        let mut mac = [0u8; MAC_BYTES * 2];
        Self::mac(&self.key, subject, expiry, &mut mac);
        format!(
            "{subject}~{expiry}~{}",
            std::str::from_utf8(&mac).unwrap_or_default()
        )
    }

    /// The backend `value` binds to, if it is a cookie this pool signed and it has not
    /// expired at `now`.
    pub fn verify<'a>(&self, value: &'a str, now: u64) -> Option<Verified<'a>> {
        let mut parts = value.splitn(3, '~');
        let (backend, expiry, mac) = (parts.next()?, parts.next()?, parts.next()?);
        let expiry: u64 = expiry.parse().ok()?;
        if backend.is_empty() || expiry <= now || mac.len() != MAC_BYTES * 2 {
            return None;
        }
        let matches = |key: &hmac::Key| -> bool {
            let mut expected = [0u8; MAC_BYTES * 2];
            Self::mac(key, backend, expiry, &mut expected);
            subtle::ConstantTimeEq::ct_eq(&expected[..], mac.as_bytes()).into()
        };
        let half_life = self.ttl.as_secs() / 2;
        if matches(&self.key) {
            return Some(Verified {
                backend,
                renew: expiry.saturating_sub(now) < half_life,
            });
        }
        match &self.previous {
            Some(p) if matches(p) => Some(Verified {
                backend,
                renew: true,
            }),
            _ => None,
        }
    }
}

/// `n` in decimal, written into the end of `buf`.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A key for another purpose derived from `key` (HMAC-SHA256 of `purpose`), so that
/// what one key signs never verifies under the other.
pub fn derive_key(key: &[u8], purpose: &[u8]) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), purpose)
        .as_ref()
        .to_vec()
}

/// 32 random bytes from the system's CSPRNG (a key that lives and dies with this
/// process); `None` if the system has no randomness to give.
pub fn random_key() -> Option<Vec<u8>> {
    let mut raw = vec![0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw).ok()?;
    Some(raw)
}

/// Why the route key could not be had.
#[derive(Debug, thiserror::Error)]
#[error("route cookie key {file}: {reason}")]
pub struct RouteKeyError {
    pub file: String,
    pub reason: String,
}

/// The key in `file`, generated (32 random bytes, hex, owner-only) if the file does not
/// exist: route cookies then survive restarts and upgrades on this host. Instances that
/// must honour each other's cookies share a key through `SURGE_ROUTE_KEY` instead.
pub fn key_from_file(file: &Path) -> Result<Vec<u8>, RouteKeyError> {
    let err = |reason: String| RouteKeyError {
        file: file.display().to_string(),
        reason,
    };
    match std::fs::read_to_string(file) {
        Ok(text) => {
            let key = text.trim().as_bytes().to_vec();
            if key.len() < MIN_KEY_BYTES {
                return Err(err(format!("shorter than {MIN_KEY_BYTES} bytes")));
            }
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut raw = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
                .map_err(|_| err("no randomness to make a key".into()))?;
            let key = hex(&raw);
            if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
                super::tls::private_dir(dir).map_err(|e| err(e.to_string()))?;
            }
            super::tls::write_replacing(file, format!("{key}\n").as_bytes(), 0o600)
                .map_err(|e| err(e.to_string()))?;
            tracing::info!(file = %file.display(), "generated the route cookie key");
            Ok(key.into_bytes())
        }
        Err(e) => Err(err(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn a_cookie_verifies_until_it_expires_and_nothing_forged_does() {
        let s = RouteSigner::new(&[7; 32], None, DAY);
        let now = 1_800_000_000;
        let c = s.issue("blade-2", now);
        assert!(c.starts_with("blade-2~"), "{c}");
        assert_eq!(
            s.verify(&c, now + 10),
            Some(Verified {
                backend: "blade-2",
                renew: false
            })
        );
        assert_eq!(
            s.verify(&c, now + DAY.as_secs() / 2 + 1).map(|v| v.renew),
            Some(true)
        );
        assert_eq!(s.verify(&c, now + DAY.as_secs()), None, "expired");
        let (id, rest) = c.split_once('~').unwrap();
        let expiry = rest.split('~').next().unwrap();
        for forged in [
            "blade-2".to_owned(),
            c.replace("blade-2", "blade-1"),
            format!(
                "{id}~{}~{}",
                expiry.parse::<u64>().unwrap() + 1,
                &c[c.len() - 32..]
            ),
            format!("{}0", &c[..c.len() - 1]),
            format!("{id}~{expiry}~"),
            "~~".into(),
            String::new(),
        ] {
            assert_eq!(s.verify(&forged, now), None, "{forged}");
        }
        let other = RouteSigner::new(&[8; 32], None, DAY);
        assert_eq!(other.verify(&c, now), None, "another pool's key");
    }

    #[test]
    fn the_previous_key_still_verifies_and_asks_for_renewal() {
        let old = RouteSigner::new(&[1; 32], None, DAY);
        let new = RouteSigner::new(&[2; 32], Some(&[1; 32]), DAY);
        let c = old.issue("bm-1a2b3c4d", 100);
        assert_eq!(
            new.verify(&c, 200),
            Some(Verified {
                backend: "bm-1a2b3c4d",
                renew: true
            })
        );
    }

    #[test]
    fn a_key_file_is_made_once_owner_only_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("surge-route-{}", fastrand::u64(..)));
        let file = dir.join("keys").join("route.key");
        let k1 = key_from_file(&file).unwrap();
        assert_eq!(k1.len(), 64);
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            key_from_file(&file).unwrap(),
            k1,
            "the same key after a restart"
        );
        std::fs::write(&file, "short\n").unwrap();
        assert!(key_from_file(&file).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }
}
