//! Header work on the request path: hop-by-hop removal (RFC 9110 §7.6.1), forwarding
//! headers, request ids, and reading cookies. Allocation-free where the request is plain.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one hop and never travel further (RFC 9110 §7.6.1, plus the
/// legacy `Keep-Alive` and `Proxy-Connection`).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What a proxy in front says about the client besides `X-Forwarded-For` and
/// `-Proto` (which surge writes itself): the client's address, the host and port it
/// asked for. A blade set to trust its proxy believes them, so they pass only from
/// one of the shop's own proxies (`proxy.trusted_proxies`). From anyone else they are
/// dropped: a shopper's `X-Forwarded-Host: evil.example` would otherwise go into the
/// links a frontend builds (a password-reset mail, a redirect), and `Forwarded: for=`
/// or `X-Real-IP` would name an address of the shopper's choosing. The prefix, scheme
/// and SSL flags are read by frameworks to build URLs (Rack, Symfony), and
/// `X-Original-URL` / `X-Rewrite-URL` / `X-Forwarded-Uri` to route (IIS, Symfony,
/// Traefik-style auth): a shopper's would reach an admin path the proxy never saw. The
/// client-address headers of CDNs and other proxies (`True-Client-IP`, `X-Client-IP`)
/// and the client-certificate ones an mTLS edge sets are claims of the same kind.
pub const CLIENT_CLAIMS: [&str; 18] = [
    "forwarded",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-real-ip",
    "x-forwarded-prefix",
    "x-forwarded-scheme",
    "x-forwarded-ssl",
    "x-original-url",
    "x-rewrite-url",
    "x-forwarded-uri",
    "x-original-host",
    "x-forwarded-server",
    "true-client-ip",
    "x-client-ip",
    "x-forwarded-client-cert",
    "x-client-cert",
    "x-ssl-client-cert",
    "ssl-client-cert",
];

/// Whether `name` is one of [`CLIENT_CLAIMS`] (any case). Most fields start with none of
/// their first letters, and are told apart by one comparison.
pub fn is_client_claim(name: &[u8]) -> bool {
    matches!(
        name.first().map(u8::to_ascii_lowercase),
        Some(b'f' | b's' | b't' | b'x')
    ) && CLIENT_CLAIMS
        .iter()
        .any(|c| c.as_bytes().eq_ignore_ascii_case(name))
}

/// A `Content-Length` said more than once (`5, 5`, or two fields) as one value, as RFC
/// 9110 section 8.6 asks of a proxy passing on a length whose values agree (hyper
/// refused any that disagree when it read the answer).
pub fn one_length(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter();
    let (Some(first), rest) = (values.next(), values.count()) else {
        return;
    };
    let Ok(text) = first.to_str() else {
        return;
    };
    if rest == 0 && !text.contains(',') {
        return;
    }
    let Some(n) = text.split(',').next().map(str::trim).map(str::to_owned) else {
        return;
    };
    if let Ok(v) = HeaderValue::from_str(&n) {
        headers.insert(header::CONTENT_LENGTH, v);
    }
}

/// Removes hop-by-hop headers, including any a `Connection` field names (every one of
/// them: a client may send several). `Upgrade` goes too: the hyper path does not tunnel
/// protocol upgrades (the surge engine does), and forwarding the header alone would
/// promise the backend something the proxy cannot carry.
///
/// A message framed both ways loses its `Content-Length` first: the body hyper hands on
/// is the de-chunked one (RFC 9112 §6.3: `Transfer-Encoding` overrides the length), and
/// a length left beside it would frame the next hop's copy by a number that is not its
/// length (a shopper waiting for 100 bytes of a 2-byte answer).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none (HTTP/2 forbids them): one pass over the names, which
    // compares known names as numbers, before any removal hashes a name.
    if !headers
        .keys()
        .any(|n| HOP_BY_HOP.contains(n) || n == header::UPGRADE)
    {
        return;
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    // Headers listed in Connection are hop-by-hop for this message (rare: only then allocate).
    if headers.contains_key(header::CONNECTION) {
        // The request's own framing and target are never the client's to strip.
        let extra: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|listed| listed.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .filter(|n| *n != header::HOST && *n != header::CONTENT_LENGTH)
            .collect();
        for name in extra {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// Whether `v` is a valid `Host` value: `uri-host [ ":" port ]` (RFC 9110 section 7.2,
/// RFC 3986 section 3.2.2). A server must refuse any other with 400 (RFC 9112 section
/// 3.2); passed on, it is the blade that reads a host nobody checked (`a b`, `a/b`,
/// `a@b`), and routes, caches or builds links with it. Empty is refused too: an
/// `http(s)` target always has a host.
pub fn valid_host(v: &[u8]) -> bool {
    let (host, port) = match v.first() {
        Some(b'[') => {
            // IP-literal: `[` IPv6 or IPvFuture `]`, then the port if any.
            let Some(close) = v.iter().position(|&b| b == b']') else {
                return false;
            };
            let inside = &v[1..close];
            let literal_ok = !inside.is_empty()
                && inside
                    .iter()
                    .all(|&b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.' | b'v' | b'V'));
            if !literal_ok {
                return false;
            }
            match &v[close + 1..] {
                [] => return true,
                [b':', port @ ..] => (&[][..], port),
                _ => return false,
            }
        }
        Some(_) => match v.iter().rposition(|&b| b == b':') {
            Some(colon) => (&v[..colon], &v[colon + 1..]),
            None => (v, &[][..]),
        },
        None => return false,
    };
    // reg-name or IPv4address: unreserved, pct-encoded, sub-delims. A table: this runs
    // on every request.
    let mut i = 0;
    while i < host.len() {
        let b = host[i];
        if b == b'%' {
            if !host
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
            {
                return false;
            }
            i += 3;
            continue;
        }
        if !REG_NAME[usize::from(b)] {
            return false;
        }
        i += 1;
    }
    (v.first() == Some(&b'[') || !host.is_empty()) && port.iter().all(u8::is_ascii_digit)
}

/// The bytes a reg-name may hold as themselves: unreserved and sub-delims (RFC 3986).
const REG_NAME: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            );
        b += 1;
    }
    t
};

/// The request-level framing rules hyper leaves to surge: exactly one `Host` on HTTP/1.1
/// (at most one on HTTP/1.0), on HTTP/2 none or one equal to `:authority`, and `chunked`
/// applied at most once; the asterisk-form target only for `OPTIONS` (RFC 9112 §3.2.4)
/// and the authority-form only for CONNECT; absolute-form targets only of http(s).
pub(super) fn check_framing(
    parts: &http::request::Parts,
    h2: bool,
) -> Result<(), super::answers::Refused> {
    use super::answers::Refused;
    if parts.method != http::Method::OPTIONS
        && parts.uri.scheme().is_none()
        && parts.uri.path() == "*"
    {
        return Err(Refused::Malformed);
    }
    // An absolute-form target is for a web origin (http, https); hyper takes any scheme.
    if let Some(scheme) = parts.uri.scheme_str() {
        if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
            return Err(Refused::Malformed);
        }
    }
    // The authority-form (`host:port`) is CONNECT's alone (§3.2.3); hyper takes it for
    // any method.
    if parts.method != http::Method::CONNECT
        && parts.uri.scheme().is_none()
        && parts.uri.authority().is_some()
    {
        return Err(Refused::Malformed);
    }
    // A target's authority is the request's host (RFC 9112 §3.2.2): it is held to the
    // rules of `Host`, userinfo (`http://user@shop/`) included, which RFC 9110 §4.2.4
    // and RFC 9113 §8.3.1 make an error.
    if parts
        .uri
        .authority()
        .is_some_and(|a| !valid_host(a.as_str().as_bytes()))
    {
        return Err(Refused::BadHost);
    }
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() || first.is_some_and(|h| !valid_host(h.as_bytes())) {
        return Err(Refused::BadHost);
    }
    if h2 {
        if let (Some(host), Some(authority)) = (first, parts.uri.authority()) {
            if !host
                .as_bytes()
                .eq_ignore_ascii_case(authority.as_str().as_bytes())
            {
                return Err(Refused::BadHost);
            }
        }
    } else if first.is_none() && parts.version == http::Version::HTTP_11 {
        return Err(Refused::BadHost);
    }
    let mut te = parts.headers.get_all(header::TRANSFER_ENCODING).iter();
    if let Some(first) = te.next() {
        let chunked = std::iter::once(first)
            .chain(te)
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .filter(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"))
            .count();
        if chunked > 1 {
            return Err(Refused::BadFraming);
        }
    }
    Ok(())
}

/// Adds the peer's address (`ip`, from [`ip_header_value`], made once per connection) to
/// `X-Forwarded-For` and sets `X-Forwarded-Proto`. From a `trusted` peer (a proxy of the
/// shop's own) the chain earlier proxies set is kept and appended to; from anyone else
/// it is replaced, so a shopper cannot put a made-up address in front of their own.
pub fn add_forwarding(
    headers: &mut HeaderMap,
    ip: &HeaderValue,
    proto: &'static str,
    trusted: bool,
) {
    let ip = ip.clone();
    match headers.get(&X_FORWARDED_FOR).map(HeaderValue::as_bytes) {
        Some(prev) if trusted && !prev.is_empty() => {
            let mut joined = Vec::with_capacity(prev.len() + 2 + ip.len());
            joined.extend_from_slice(prev);
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(ip.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&joined) {
                headers.insert(X_FORWARDED_FOR, v);
            }
        }
        _ => {
            // `insert` drops every earlier X-Forwarded-For field, however many.
            headers.insert(X_FORWARDED_FOR, ip);
        }
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    // One pass over the names first: removing each claim by its name would parse and
    // hash eighteen names a request, nearly always to find none.
    if !trusted && headers.keys().any(|n| CLIENT_CLAIMS.contains(&n.as_str())) {
        for name in CLIENT_CLAIMS {
            headers.remove(name);
        }
    }
}

/// An IP address as a header value.
pub fn ip_header_value(ip: IpAddr) -> HeaderValue {
    // An IP address always formats to valid header bytes.
    let mut buf = [0u8; 45];
    let len = {
        use std::io::Write;
        let mut cursor = std::io::Cursor::new(&mut buf[..]);
        let _ = write!(cursor, "{ip}");
        cursor.position() as usize
    };
    HeaderValue::from_bytes(&buf[..len]).unwrap_or(HeaderValue::from_static("unknown"))
}

/// Makes request ids: a random per-process prefix and a counter, so ids are unique across
/// restarts and workers without a random number per request.
#[derive(Debug)]
pub struct RequestIds {
    prefix: u32,
    next: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        Self {
            prefix: fastrand::u32(..),
            next: AtomicU64::new(fastrand::u64(..1 << 32)),
        }
    }
}

impl RequestIds {
    /// Keeps the request's `X-Request-Id` if it has a usable one, else sets a new one.
    /// Returns the id in effect.
    pub fn ensure(&self, headers: &mut HeaderMap) -> HeaderValue {
        if let Some(v) = headers.get(&X_REQUEST_ID) {
            if !v.is_empty() && v.len() <= 200 {
                return v.clone();
            }
        }
        let id = self.next_id();
        headers.insert(X_REQUEST_ID, id.clone());
        id
    }

    fn next_id(&self) -> HeaderValue {
        HeaderValue::from_bytes(&self.next_raw()).unwrap_or(HeaderValue::from_static("0"))
    }

    /// A new id as bytes (no allocation): eight hex digits of the process prefix, `-`,
    /// sixteen of the counter.
    pub fn next_raw(&self) -> [u8; 25] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut buf = [0u8; 25];
        for (i, slot) in buf[..8].iter_mut().enumerate() {
            *slot = HEX[((self.prefix >> (28 - 4 * i)) & 0xf) as usize];
        }
        buf[8] = b'-';
        for (i, slot) in buf[9..].iter_mut().enumerate() {
            *slot = HEX[((n >> (60 - 4 * i)) & 0xf) as usize];
        }
        buf
    }
}

/// What the admission and affinity decisions read of a request: one trait over hyper's
/// parsed request and the HTTP/1.1 engine's head (offsets into its read buffer), so the
/// decisions are written once for both engines.
pub trait RequestView {
    fn method(&self) -> &http::Method;
    /// The target's path (no query).
    fn path(&self) -> &str;
    /// Every value of the header `name` (lowercase), in order.
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a;
}

impl RequestView for http::request::Parts {
    fn method(&self) -> &http::Method {
        &self.method
    }

    fn path(&self) -> &str {
        self.uri.path()
    }

    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers.get_all(name).iter().map(HeaderValue::as_bytes)
    }
}

/// The value of cookie `name` among a request's `Cookie` headers (see [`cookie`]).
pub fn cookie_of<'a, V: RequestView>(view: &'a V, name: &str) -> Option<&'a str> {
    view.values("cookie")
        .filter_map(|v| std::str::from_utf8(v).ok())
        .find_map(|v| cookie_in(v, name))
}

/// The value of cookie `name` among the request's `Cookie` headers (RFC 6265 §5.4 form:
/// `a=1; b=2`). The first occurrence wins, as browsers send the most specific first.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| cookie_in(v, name))
}

/// Finds `name` in one `Cookie` header value.
pub fn cookie_in<'a>(value: &'a str, name: &str) -> Option<&'a str> {
    value.split(';').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k.trim() == name).then(|| v.trim().trim_matches('"'))
    })
}

/// Whether a response's `Set-Cookie` headers set cookie `name`.
pub fn sets_cookie(headers: &HeaderMap, name: &str) -> bool {
    headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split_once('=').is_some_and(|(k, _)| k.trim() == name))
}

#[cfg(test)]
mod tests {
    use super::check_framing;
    use crate::proxy::answers::Refused;

    fn parts(version: http::Version, uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder().version(version).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn host_values_are_checked_against_the_uri_grammar() {
        for good in [
            "shop.example",
            "shop.example:8080",
            "SHOP.example.",
            "127.0.0.1",
            "[::1]",
            "[::1]:443",
            "[fe80::1.2.3.4]",
            "xn--bcher-kva.example",
            "a%20b",
            "a:",
        ] {
            assert!(valid_host(good.as_bytes()), "{good} is valid");
        }
        for bad in [
            "", "a b", "a/b", "u@a", "a?b", "a#b", "a\\b", "[::1", "[::1]x", "[]", "a:80x",
            "a:8:0", ":80", "a%2", "a%zz", "\"a\"", "a<b>",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad:?} is refused");
        }
    }

    #[test]
    fn host_and_chunked_rules() {
        use http::Version;
        let ok = |p: &http::request::Parts, h2| check_framing(p, h2).is_ok();
        assert!(ok(&parts(Version::HTTP_11, "/", &[("host", "a")]), false));
        assert!(
            !ok(&parts(Version::HTTP_11, "/", &[]), false),
            "HTTP/1.1 needs Host"
        );
        assert!(
            ok(&parts(Version::HTTP_10, "/", &[]), false),
            "HTTP/1.0 may omit it"
        );
        assert!(!ok(
            &parts(Version::HTTP_10, "/", &[("host", "a"), ("host", "b")]),
            false
        ));
        // HTTP/2: Host may be absent or equal to :authority, never different.
        assert!(ok(
            &parts(Version::HTTP_2, "https://shop.example/", &[]),
            true
        ));
        assert!(ok(
            &parts(
                Version::HTTP_2,
                "https://shop.example/",
                &[("host", "SHOP.example")]
            ),
            true
        ));
        assert_eq!(
            check_framing(
                &parts(
                    Version::HTTP_2,
                    "https://shop.example/",
                    &[("host", "evil.example")]
                ),
                true
            )
            .err(),
            Some(Refused::BadHost)
        );
        // chunked at most once, across fields too.
        assert!(ok(
            &parts(
                Version::HTTP_11,
                "/",
                &[("host", "a"), ("transfer-encoding", "gzip, chunked")]
            ),
            false
        ));
        assert_eq!(
            check_framing(
                &parts(
                    Version::HTTP_11,
                    "/",
                    &[
                        ("host", "a"),
                        ("transfer-encoding", "chunked"),
                        ("transfer-encoding", "Chunked")
                    ]
                ),
                false
            )
            .err(),
            Some(Refused::BadFraming)
        );
    }

    use super::*;

    #[test]
    fn every_client_claim_is_recognised_in_any_case_and_nothing_else() {
        for claim in CLIENT_CLAIMS {
            assert!(is_client_claim(claim.as_bytes()), "{claim}");
            assert!(
                is_client_claim(claim.to_ascii_uppercase().as_bytes()),
                "{claim}"
            );
        }
        for other in [
            "x-request-id",
            "accept",
            "forwarded-by",
            "",
            "s",
            "user-agent",
        ] {
            assert!(!is_client_claim(other.as_bytes()), "{other}");
        }
    }

    #[test]
    fn hop_by_hop_and_connection_listed_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::HOST, HeaderValue::from_static("shop"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::HOST));
    }

    #[test]
    fn a_message_framed_two_ways_loses_its_length() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("100"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty(), "{h:?}");
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("100"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h[header::CONTENT_LENGTH], "100");
    }

    #[test]
    fn forwarded_for_appends_from_a_trusted_peer_and_is_replaced_otherwise() {
        let mut h = HeaderMap::new();
        add_forwarding(
            &mut h,
            &ip_header_value("10.1.2.3".parse().unwrap()),
            "http",
            false,
        );
        add_forwarding(
            &mut h,
            &ip_header_value("::1".parse().unwrap()),
            "http",
            true,
        );
        assert_eq!(h[&X_FORWARDED_FOR], "10.1.2.3, ::1");
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("198.51.100.7"));
        add_forwarding(
            &mut h,
            &ip_header_value("192.0.2.1".parse().unwrap()),
            "https",
            false,
        );
        assert_eq!(
            h.get_all(&X_FORWARDED_FOR).iter().collect::<Vec<_>>(),
            ["192.0.2.1"],
            "an untrusted peer's chain is dropped, all of it"
        );
        assert_eq!(h[&X_FORWARDED_PROTO], "https");
    }

    #[test]
    fn request_id_is_kept_or_made_unique() {
        let ids = RequestIds::default();
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_static("abc"));
        assert_eq!(ids.ensure(&mut h), "abc");
        let (mut a, mut b) = (HeaderMap::new(), HeaderMap::new());
        let (ia, ib) = (ids.ensure(&mut a), ids.ensure(&mut b));
        assert_ne!(ia, ib);
        assert_eq!(ia.len(), 25);
    }

    #[test]
    fn cookies_are_found_by_exact_name() {
        assert_eq!(cookie_in("xcart=1; cart=abc; other=2", "cart"), Some("abc"));
        assert_eq!(cookie_in("cart=\"q\"", "cart"), Some("q"));
        assert_eq!(cookie_in("carts=1", "cart"), None);
        assert_eq!(cookie_in("", "cart"), None);
        assert_eq!(cookie_in(";;=;cart", "cart"), None);
    }
}
