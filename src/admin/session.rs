//! Browser sessions of the admin API: the status page's login form trades the admin token
//! for a cookie, so the token is typed once and never kept in the page's script.
//!
//! The cookie is `<expiry>.<HMAC-SHA256>` under a key derived from the admin token:
//! stateless (any process after a reload or upgrade verifies it), worthless once the token
//! changes, and it cannot be made without the token. `HttpOnly` keeps it from scripts,
//! `SameSite=Strict` from cross-site requests (with the Origin checks of
//! `refuse_from_browser`, CSRF-safe), `Secure` on an HTTPS admin listener.

use ring::hmac;

/// The cookie's name.
pub const COOKIE: &str = "surge_admin";

/// How long a session lasts.
pub const LIFETIME_SECS: u64 = 12 * 3600;

fn key(token: &str) -> hmac::Key {
    // Derived, so the cookie's key is not the token itself.
    let derive = hmac::Key::new(hmac::HMAC_SHA256, token.as_bytes());
    let derived = hmac::sign(&derive, b"surge admin session cookie v1");
    hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref())
}

/// A session value valid until `now + LIFETIME_SECS` (Unix seconds).
pub fn issue(token: &str, now: u64) -> String {
    let expiry = now + LIFETIME_SECS;
    let tag = hmac::sign(&key(token), expiry.to_string().as_bytes());
    format!("{expiry}.{}", hex(tag.as_ref()))
}

/// Whether `value` is a session this token issued that has not expired at `now`.
pub fn valid(token: &str, value: &str, now: u64) -> bool {
    let Some((expiry, tag)) = value.split_once('.') else {
        return false;
    };
    let Ok(until) = expiry.parse::<u64>() else {
        return false;
    };
    let Some(tag) = unhex(tag) else {
        return false;
    };
    // Constant time, in ring.
    until > now && hmac::verify(&key(token), expiry.as_bytes(), &tag).is_ok()
}

/// The `Set-Cookie` value that stores `value` (or, `None`, clears the cookie).
pub fn set_cookie(value: Option<&str>, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    match value {
        Some(v) => format!(
            "{COOKIE}={v}; Path=/; Max-Age={LIFETIME_SECS}; HttpOnly; SameSite=Strict{secure}"
        ),
        None => format!("{COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict{secure}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || s.len() > 128 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_holds_for_its_lifetime_under_its_token_only() {
        let v = issue("token-a", 1000);
        assert!(valid("token-a", &v, 1001));
        assert!(valid("token-a", &v, 1000 + LIFETIME_SECS - 1));
        assert!(!valid("token-a", &v, 1000 + LIFETIME_SECS), "expired");
        assert!(!valid("token-b", &v, 1001), "another token's");
        // A later expiry with the old tag: refused.
        let (_, tag) = v.split_once('.').unwrap();
        assert!(!valid("token-a", &format!("99999999999.{tag}"), 1001));
        for junk in ["", ".", "1.", "x.y", "5.zz", "5.abc"] {
            assert!(!valid("token-a", junk, 0), "{junk}");
        }
    }

    #[test]
    fn the_cookie_is_http_only_strict_and_secure_on_tls() {
        let c = set_cookie(Some("1.ab"), true);
        assert!(c.starts_with("surge_admin=1.ab; Path=/;"));
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.ends_with("; Secure"));
        assert!(!set_cookie(Some("1.ab"), false).contains("Secure"));
        assert!(set_cookie(None, false).contains("Max-Age=0"));
    }
}
