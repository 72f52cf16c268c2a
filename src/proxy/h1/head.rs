//! Message heads: parsed with `httparse` out of the connection's buffer, checked with
//! surge's rules, remembered as offsets into that buffer (nothing copied, and no header
//! array lives across an await), and rewritten for the next hop by copying the fields
//! that travel on and writing surge's own after them.

use std::mem::MaybeUninit;

use http::Method;

use crate::proxy::answers::Refused;

/// Most header fields a head may have: the parser's slots live on the stack.
pub const MAX_FIELDS: usize = 1024;

/// A byte range of the read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span {
    start: u32,
    len: u32,
}

impl Span {
    fn of(buf: &[u8], part: &[u8]) -> Span {
        // `part` is a slice of `buf` (httparse hands out slices of its input).
        let start = part.as_ptr() as usize - buf.as_ptr() as usize;
        Span {
            start: start as u32,
            len: part.len() as u32,
        }
    }

    fn sub(self, from: usize, to: usize) -> Span {
        Span {
            start: self.start + from as u32,
            len: (to - from) as u32,
        }
    }

    /// Where it lies in its buffer.
    pub fn range(self) -> std::ops::Range<usize> {
        let start = self.start as usize;
        start..start + self.len as usize
    }

    pub fn get(self, buf: &[u8]) -> &[u8] {
        let start = self.start as usize;
        buf.get(start..start + self.len as usize)
            .unwrap_or_default()
    }

    pub fn is_empty(self) -> bool {
        self.len == 0
    }
}

/// One header field: its name and value in the buffer.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    pub name: Span,
    pub value: Span,
}

/// How a request's body is framed (RFC 9112 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (no `Content-Length`, no `Transfer-Encoding`).
    Empty,
    /// `Content-Length` (0 included: it is forwarded as such).
    Length(u64),
    Chunked,
}

/// What the engine knows of a request head once it parsed and passed the checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// Bytes of the head in the buffer, the empty line included.
    pub len: usize,
    pub method: Method,
    /// What goes on the request line upstream: the origin-form target (the path and
    /// query of an absolute-form one; `None` for an absolute-form target without a path,
    /// which becomes `/`).
    pub target: Option<Span>,
    /// The target's path, without the query.
    pub path: Span,
    pub http10: bool,
    pub framing: Framing,
    /// The connection closes after this exchange: the client said so, HTTP/1.0 without
    /// keep-alive, or both `Transfer-Encoding` and `Content-Length` were sent (the
    /// message is framed by the first; what follows it cannot be trusted).
    pub close: bool,
    /// `Expect: 100-continue` on HTTP/1.1: the client waits for a 100 before its body.
    /// HTTP/1.0's is ignored (RFC 9110 §10.1.1), and no 1xx goes to it (§15.2).
    pub expect_continue: bool,
    /// `Upgrade`'s value when `Connection` lists `upgrade` (HTTP/1.1 only).
    pub upgrade: Option<Span>,
    /// The authority the request is for: an absolute-form target's, else `Host`.
    pub host: Option<Span>,
    /// The client's `X-Request-Id`, when usable (non-empty, at most 200 bytes).
    pub request_id: Option<Span>,
}

/// The limits a request head is checked against.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    pub max_fields: usize,
    pub max_uri_bytes: usize,
}

fn slots<'b>() -> [MaybeUninit<httparse::Header<'b>>; MAX_FIELDS] {
    [const { MaybeUninit::uninit() }; MAX_FIELDS]
}

/// The length of the request target at the start of a head not complete yet (so far,
/// when its request line is not complete either). A target over the limit is refused
/// with 414 as soon as it is seen (RFC 9112 section 3), not with 431 once the whole head
/// has outgrown its own limit. Empty lines before the request line are skipped, as
/// httparse skips them.
fn partial_target_len(buf: &[u8]) -> usize {
    request_line(buf)
        .splitn(3, |&b| b == b' ')
        .nth(1)
        .map_or(0, <[u8]>::len)
}

/// The request line at the start of `buf` (so far), after the empty lines httparse
/// skips, without its line end.
fn request_line(buf: &[u8]) -> &[u8] {
    let start = buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(buf.len());
    let line = buf[start..]
        .split(|&b| b == b'\n')
        .next()
        .unwrap_or_default();
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Whether the request line at the start of `buf` is well formed but of another major
/// version than 1 (`GET / HTTP/2.0`): not malformed, just not ours (505). A minor
/// version above 1 (`HTTP/1.2`) stays a 400, as hyper's path has it.
fn other_major_version(buf: &[u8]) -> bool {
    match request_line(buf).splitn(3, |&b| b == b' ').nth(2) {
        Some([b'H', b'T', b'T', b'P', b'/', major, b'.', minor]) => {
            major.is_ascii_digit() && *major != b'1' && *major != b'0' && minor.is_ascii_digit()
        }
        _ => false,
    }
}

/// Parses the request head at the start of `buf`. `Ok(None)`: not complete yet. The
/// fields go to `fields` (cleared first) as offsets into `buf`.
pub fn parse_request(
    buf: &[u8],
    limits: HeadLimits,
    fields: &mut Vec<Field>,
) -> Result<Option<RequestHead>, Refused> {
    fields.clear();
    let mut slots = slots();
    let n = limits.max_fields.clamp(1, MAX_FIELDS);
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut slots[..n]) {
        Ok(httparse::Status::Partial) if partial_target_len(buf) > limits.max_uri_bytes => {
            return Err(Refused::UriTooLong)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Ok(httparse::Status::Complete(len)) => len,
        Err(httparse::Error::TooManyHeaders) => return Err(Refused::TooManyHeaders),
        Err(httparse::Error::Version) if other_major_version(buf) => return Err(Refused::Version),
        Err(_) => return Err(Refused::Malformed),
    };
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(Refused::Malformed);
    };
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| Refused::Malformed)?;
    if method == Method::CONNECT {
        return Err(Refused::Connect);
    }
    if target.len() > limits.max_uri_bytes {
        return Err(Refused::UriTooLong);
    }
    let http10 = version == 0;
    let target_span = Span::of(buf, target.as_bytes());
    let form = target_form(target.as_bytes()).ok_or(Refused::Malformed)?;
    if matches!(form, TargetForm::Asterisk) && method != Method::OPTIONS {
        return Err(Refused::Malformed);
    }

    let mut seen = RequestFields::default();
    for h in req.headers.iter() {
        let field = Field {
            name: Span::of(buf, h.name.as_bytes()),
            value: Span::of(buf, h.value),
        };
        fields.push(field);
        seen.note(h.name.as_bytes(), h.value, field, http10)?;
    }
    seen.check(buf, http10)?;
    let RequestFields {
        host,
        length,
        saw_length,
        te,
        conn_close,
        conn_keep_alive,
        conn_upgrade,
        expect_continue,
        upgrade,
        request_id,
        ..
    } = seen;
    let (target, path, host) = match form {
        TargetForm::Origin { path_len } => (Some(target_span), target_span.sub(0, path_len), host),
        TargetForm::Asterisk => (Some(target_span), target_span, host),
        TargetForm::Absolute {
            authority,
            rest,
            path_len,
        } => {
            let rest_span = (rest.0 < rest.1).then(|| target_span.sub(rest.0, rest.1));
            let path = target_span.sub(rest.0, rest.0 + path_len);
            (
                rest_span,
                path,
                Some(target_span.sub(authority.0, authority.1)),
            )
        }
    };
    let framing = if te {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::Empty
    };
    let close = conn_close || (http10 && !conn_keep_alive) || (te && saw_length);
    Ok(Some(RequestHead {
        len,
        method,
        target,
        path,
        http10,
        framing,
        close,
        expect_continue: expect_continue && !http10,
        upgrade: upgrade.filter(|u| conn_upgrade && !http10 && !u.is_empty()),
        host,
        request_id,
    }))
}

/// What a request's fields say about its framing, its host and its connection, noted
/// one field at a time.
#[derive(Default)]
struct RequestFields {
    hosts: usize,
    host: Option<Span>,
    length: Option<u64>,
    saw_length: bool,
    te: bool,
    chunked_count: usize,
    chunked_last: bool,
    conn_close: bool,
    conn_keep_alive: bool,
    conn_upgrade: bool,
    expect_continue: bool,
    upgrade: Option<Span>,
    request_id: Option<Span>,
}

impl RequestFields {
    /// Notes one field (`name`: `value`, at `field` in the buffer); a field that makes
    /// the request's framing unknowable refuses it at once.
    fn note(
        &mut self,
        name: &[u8],
        value: &[u8],
        field: Field,
        http10: bool,
    ) -> Result<(), Refused> {
        match name.len() {
            4 if name.eq_ignore_ascii_case(b"host") => {
                self.hosts += 1;
                self.host = Some(field.value);
            }
            14 if name.eq_ignore_ascii_case(b"content-length") => {
                // One number per field (`5, 5` is refused, as hyper does); repeated
                // fields must agree. After Transfer-Encoding it no longer counts (the
                // body is chunked); before, it is judged as it comes, as hyper does.
                self.saw_length = true;
                if !self.te {
                    match content_length(value.trim_ascii()) {
                        Some(n) if self.length.is_none_or(|l| l == n) => self.length = Some(n),
                        _ => return Err(Refused::Malformed),
                    }
                }
            }
            17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                if http10 {
                    return Err(Refused::Malformed);
                }
                self.te = true;
                self.codings(value)?;
            }
            10 if name.eq_ignore_ascii_case(b"connection") => {
                for token in value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    self.conn_close |= token.eq_ignore_ascii_case(b"close");
                    self.conn_keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
                    self.conn_upgrade |= token.eq_ignore_ascii_case(b"upgrade");
                }
            }
            6 if name.eq_ignore_ascii_case(b"expect") => {
                self.expect_continue |= value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
            }
            7 if name.eq_ignore_ascii_case(b"upgrade") => self.upgrade = Some(field.value),
            12 if name.eq_ignore_ascii_case(b"x-request-id")
                && self.request_id.is_none()
                && !value.is_empty()
                && value.len() <= 200 =>
            {
                self.request_id = Some(field.value);
            }
            _ => {}
        }
        Ok(())
    }

    /// The codings of one `Transfer-Encoding` field.
    fn codings(&mut self, value: &[u8]) -> Result<(), Refused> {
        for coding in value.split(|&b| b == b',') {
            let coding = coding.trim_ascii();
            if coding.is_empty() {
                continue;
            }
            if coding.eq_ignore_ascii_case(b"chunked") {
                self.chunked_count += 1;
                self.chunked_last = true;
            } else if self.chunked_last {
                // A coding after chunked: the body's end cannot be known.
                return Err(Refused::Malformed);
            }
        }
        Ok(())
    }

    /// Once every field is noted: one chunked coding at most and last, one valid Host.
    fn check(&self, buf: &[u8], http10: bool) -> Result<(), Refused> {
        if self.chunked_count > 1 {
            return Err(Refused::BadFraming);
        }
        if self.te && !self.chunked_last {
            // A request body framed by something other than chunked has no knowable end.
            return Err(Refused::Malformed);
        }
        // HTTP/1.1 requires exactly one Host, an absolute-form target too (RFC 9112 §3.2).
        if self.hosts > 1
            || (self.hosts == 0 && !http10)
            || self
                .host
                .is_some_and(|h| !crate::proxy::headers::valid_host(h.get(buf)))
        {
            return Err(Refused::BadHost);
        }
        Ok(())
    }
}

/// A `Content-Length` value: digits only (no sign, no spaces inside), within u64.
fn content_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

enum TargetForm {
    /// `/path?query`; `path_len` bytes of path.
    Origin { path_len: usize },
    /// `OPTIONS *`.
    Asterisk,
    /// `http://authority/path?query`: byte ranges of the authority and of what follows it.
    Absolute {
        authority: (usize, usize),
        rest: (usize, usize),
        path_len: usize,
    },
}

fn target_form(t: &[u8]) -> Option<TargetForm> {
    if t.first() == Some(&b'/') {
        let path_len = t.iter().position(|&b| b == b'?').unwrap_or(t.len());
        return Some(TargetForm::Origin { path_len });
    }
    if t == b"*" {
        return Some(TargetForm::Asterisk);
    }
    let scheme_len = if t.len() >= 7 && t[..7].eq_ignore_ascii_case(b"http://") {
        7
    } else if t.len() >= 8 && t[..8].eq_ignore_ascii_case(b"https://") {
        8
    } else {
        return None;
    };
    let after = &t[scheme_len..];
    let end = after
        .iter()
        .position(|&b| b == b'/' || b == b'?' || b == b'#')
        .unwrap_or(after.len());
    let authority = &after[..end];
    // The `http` crate's reading of an authority (brackets, port), the one hyper's path
    // applies, and then the rules of `Host`: the authority is the request's host
    // (RFC 9112 §3.2.2), and userinfo (`http://user@shop/`) is an error (RFC 9110
    // §4.2.4). Absolute-form targets are rare (other proxies), so the copy costs
    // nothing that matters.
    if !crate::proxy::headers::valid_host(authority)
        || http::uri::Authority::try_from(authority).is_err()
    {
        return None;
    }
    let rest = &after[end..];
    if rest.first() == Some(&b'#') {
        return None;
    }
    let path_len = if rest.first() == Some(&b'/') {
        rest.iter().position(|&b| b == b'?').unwrap_or(rest.len())
    } else {
        0
    };
    if rest.first() == Some(&b'?') {
        // `http://host?q` has an empty path: not forwardable as origin-form as is.
        return None;
    }
    Some(TargetForm::Absolute {
        authority: (scheme_len, scheme_len + end),
        rest: (scheme_len + end, t.len()),
        path_len,
    })
}

/// Fields that describe one hop and never travel further (RFC 9110 §7.6.1, plus the
/// legacy `Keep-Alive` and `Proxy-Connection`), and those surge writes itself.
fn is_hop_by_hop(name: &[u8]) -> bool {
    const HOP: [&[u8]; 9] = [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    ];
    HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// Whether `name` is listed in one of the `Connection` fields (hop-by-hop for this
/// message); `Host` and `Content-Length` never are: the client's framing and target
/// are not the client's to strip.
fn listed_in_connection(buf: &[u8], fields: &[Field], name: &[u8]) -> bool {
    if name.eq_ignore_ascii_case(b"host") || name.eq_ignore_ascii_case(b"content-length") {
        return false;
    }
    fields
        .iter()
        .filter(|f| f.name.get(buf).eq_ignore_ascii_case(b"connection"))
        .flat_map(|f| f.value.get(buf).split(|&b| b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(name))
}

/// Whether any `Connection` field lists something besides the usual tokens (then each
/// field is checked against the list).
fn connection_lists_others(buf: &[u8], fields: &[Field]) -> bool {
    fields
        .iter()
        .filter(|f| f.name.get(buf).eq_ignore_ascii_case(b"connection"))
        .flat_map(|f| f.value.get(buf).split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .any(|t| {
            !t.is_empty()
                && !t.eq_ignore_ascii_case(b"close")
                && !t.eq_ignore_ascii_case(b"keep-alive")
                && !t.eq_ignore_ascii_case(b"upgrade")
        })
}

/// What surge adds to a request on its way to a blade.
#[derive(Debug)]
pub struct Forwarding<'a> {
    /// The shopper's address (for `X-Forwarded-For`).
    pub client_ip: &'a [u8],
    /// `http` or `https`.
    pub proto: &'a str,
    /// The peer is one of the shop's own proxies: its `X-Forwarded-For` chain is kept.
    pub trusted: bool,
    /// A request id surge made (the request had no usable one).
    pub new_request_id: Option<&'a [u8]>,
    /// `Host` for an HTTP/1.0 request without one: the blade's address.
    pub fallback_host: &'a [u8],
    /// The body's length as forwarded (de-chunked), or `None` for no body.
    pub body_len: Option<usize>,
    /// Tunnel: `Connection: upgrade` and this `Upgrade` go on.
    pub upgrade: Option<&'a [u8]>,
}

/// Writes the request head a blade gets: origin-form target, HTTP/1.1, `Host` first,
/// the client's fields but the hop-by-hop ones and those surge rewrites, then
/// `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Request-Id` (when new), `Content-Length`.
pub fn write_request(
    buf: &[u8],
    head: &RequestHead,
    fields: &[Field],
    fwd: &Forwarding<'_>,
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    match head.target {
        Some(t) => out.extend_from_slice(t.get(buf)),
        None => out.push(b'/'),
    }
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    match head.host {
        Some(h) => out.extend_from_slice(h.get(buf)),
        None => out.extend_from_slice(fwd.fallback_host),
    }
    out.extend_from_slice(b"\r\n");
    let check_listed = connection_lists_others(buf, fields);
    let mut earlier_xff: Option<Span> = None;
    for f in fields {
        let name = f.name.get(buf);
        let skip = is_hop_by_hop(name)
            || name.eq_ignore_ascii_case(b"host")
            || name.eq_ignore_ascii_case(b"content-length")
            || name.eq_ignore_ascii_case(b"expect")
            || name.eq_ignore_ascii_case(b"x-forwarded-proto")
            || (fwd.new_request_id.is_some() && name.eq_ignore_ascii_case(b"x-request-id"))
            || (!fwd.trusted && crate::proxy::headers::is_client_claim(name));
        if skip {
            continue;
        }
        if name.eq_ignore_ascii_case(b"x-forwarded-for") {
            earlier_xff.get_or_insert(f.value);
            continue;
        }
        if check_listed && listed_in_connection(buf, fields, name) {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(f.value.get(buf));
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    match earlier_xff.map(|v| v.get(buf)) {
        // From one of the shop's own proxies the chain goes on; from anyone else it is
        // replaced, so a shopper cannot put a made-up address in front of their own.
        Some(prev) if fwd.trusted && !prev.is_empty() => {
            out.extend_from_slice(prev);
            out.extend_from_slice(b", ");
        }
        _ => {}
    }
    out.extend_from_slice(fwd.client_ip);
    out.extend_from_slice(b"\r\nx-forwarded-proto: ");
    out.extend_from_slice(fwd.proto.as_bytes());
    out.extend_from_slice(b"\r\n");
    if let Some(id) = fwd.new_request_id {
        out.extend_from_slice(b"x-request-id: ");
        out.extend_from_slice(id);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(n) = fwd.body_len {
        out.extend_from_slice(b"content-length: ");
        push_decimal(out, n as u64);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(u) = fwd.upgrade {
        out.extend_from_slice(b"connection: upgrade\r\nupgrade: ");
        out.extend_from_slice(u);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends `n` in decimal.
pub fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// How a response's body is framed (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// No body: a HEAD request, 204, 304.
    None,
    Length(u64),
    Chunked,
    /// Until the blade closes (no length, no chunked).
    UntilClose,
}

impl ResponseHead {
    /// Whether the blade's `Content-Length` may reach the shopper (not beside
    /// `Transfer-Encoding`, not on a 101 or 204).
    pub fn passes_length(&self) -> bool {
        !self.drop_length
    }
}

/// A blade's response head as the engine relays it.
#[derive(Debug, Clone, Copy)]
pub struct ResponseHead {
    pub len: usize,
    pub status: u16,
    /// The reason phrase, in the buffer.
    reason: Span,
    /// What the answer's `Connection` fields list (their fields are hop-by-hop too).
    connection: Listed,
    pub body: BodyKind,
    /// The blade keeps the connection open after this response.
    pub reusable: bool,
    /// The blade's `Content-Length` is not passed on (see `parse_response`).
    drop_length: bool,
    /// The length the blade's `Content-Length` fields agreed on: passed on as one value
    /// (`5, 5` or two fields of `5` are one length, RFC 9110 section 8.6).
    length: Option<u64>,
}

/// The tokens of a head's `Connection` fields, seen by the parse so that the rewrite
/// need not read them again. Nearly every answer lists only `keep-alive` or `close`;
/// only `other` makes the rewrite search the list for each field's name.
#[derive(Debug, Clone, Copy, Default)]
struct Listed {
    close: bool,
    keep_alive: bool,
    other: bool,
}

/// What parsing a blade's answer gave.
#[derive(Debug)]
pub enum Parsed {
    /// Not complete yet.
    Partial,
    /// An interim answer (1xx but 101): passed on to the shopper ([`write_interim`])
    /// or skipped, and the final answer read after it.
    Interim(InterimHead),
    Final(ResponseHead),
}

/// An interim (1xx) answer's head, its fields in `fields` as [`parse_response`] left them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InterimHead {
    /// Its length at the start of the buffer.
    pub len: usize,
    pub status: u16,
    reason: Span,
}

/// What the engine asks of a response while rewriting it.
pub struct ResponseFacts<'a> {
    buf: &'a [u8],
    fields: &'a [Field],
}

impl ResponseFacts<'_> {
    /// Whether the response sets cookie `name` (`Set-Cookie: name=...`).
    pub fn sets_cookie(&self, name: &str) -> bool {
        self.fields.iter().any(|h| {
            h.name.get(self.buf).eq_ignore_ascii_case(b"set-cookie")
                && std::str::from_utf8(h.value.get(self.buf))
                    .ok()
                    .and_then(|v| v.split_once('='))
                    .is_some_and(|(k, _)| k.trim() == name)
        })
    }

    /// Whether the response has field `name`.
    pub fn has(&self, name: &str) -> bool {
        self.fields
            .iter()
            .any(|h| h.name.get(self.buf).eq_ignore_ascii_case(name.as_bytes()))
    }
}

/// What surge does to a response on its way to the shopper.
#[derive(Debug, Clone, Copy)]
pub struct Rewrite<'a> {
    /// The request was HEAD (the response has no body, whatever it says).
    pub head_request: bool,
    /// Surge's `Strict-Transport-Security` (replaces the blade's).
    pub hsts: Option<&'a [u8]>,
    /// The client gets the body de-chunked (an HTTP/1.0 client).
    pub dechunk: bool,
    /// An upgrade was asked for (a 101 is acceptable).
    pub upgrade: bool,
}

/// Why a blade's answer cannot be relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadResponse;

/// Parses and checks the blade's response head at the start of `buf`: its framing, and
/// whether it may be relayed at all (a 101 nobody asked for, a `Content-Length` that is
/// not one number, are refused here, while the request can still go to another blade).
/// The fields go to `fields` (cleared first) as offsets into `buf`, so that
/// [`write_response`] rewrites the head without parsing it again.
pub fn parse_response(
    buf: &[u8],
    max_fields: usize,
    rw: &Rewrite<'_>,
    fields: &mut Vec<Field>,
) -> Result<Parsed, BadResponse> {
    let mut slots = slots();
    let n = max_fields.clamp(1, MAX_FIELDS);
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut slots[..n],
    ) {
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Ok(httparse::Status::Complete(len)) => len,
        Err(_) => return Err(BadResponse),
    };
    let (Some(version), Some(status)) = (resp.version, resp.code) else {
        return Err(BadResponse);
    };
    let reason = Span::of(buf, resp.reason.unwrap_or("").as_bytes());
    fields.clear();
    // Every 1xx but 101 is interim (RFC 9110 section 15.2): never the final answer,
    // whatever its code (an unknown 1xx too).
    if (100..200).contains(&status) && status != 101 {
        fields.extend(resp.headers.iter().map(|h| Field {
            name: Span::of(buf, h.name.as_bytes()),
            value: Span::of(buf, h.value),
        }));
        return Ok(Parsed::Interim(InterimHead {
            len,
            status,
            reason,
        }));
    }
    if status == 101 && !rw.upgrade {
        return Err(BadResponse);
    }
    let mut length: Option<u64> = None;
    let mut te_chunked = None;
    let mut listed = Listed::default();
    for h in resp.headers.iter() {
        fields.push(Field {
            name: Span::of(buf, h.name.as_bytes()),
            value: Span::of(buf, h.value),
        });
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            for part in h.value.split(|&b| b == b',') {
                let v = content_length(part.trim_ascii()).ok_or(BadResponse)?;
                if length.is_some_and(|l| l != v) {
                    return Err(BadResponse);
                }
                length = Some(v);
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            let last = h
                .value
                .split(|&b| b == b',')
                .map(<[u8]>::trim_ascii)
                .rfind(|c| !c.is_empty());
            te_chunked = Some(last.is_some_and(|c| c.eq_ignore_ascii_case(b"chunked")));
        } else if name.eq_ignore_ascii_case(b"connection") {
            for t in h.value.split(|&b| b == b',') {
                let t = t.trim_ascii();
                if t.eq_ignore_ascii_case(b"close") {
                    listed.close = true;
                } else if t.eq_ignore_ascii_case(b"keep-alive") {
                    listed.keep_alive = true;
                } else if !t.is_empty() {
                    listed.other = true;
                }
            }
        }
    }
    let body = if status == 101 {
        BodyKind::UntilClose
    } else if rw.head_request || status == 204 || status == 304 || (100..200).contains(&status) {
        BodyKind::None
    } else {
        match (te_chunked, length) {
            (Some(true), _) => BodyKind::Chunked,
            (Some(false), _) => BodyKind::UntilClose,
            (None, Some(n)) => BodyKind::Length(n),
            (None, None) => BodyKind::UntilClose,
        }
    };
    // Both `Transfer-Encoding` and `Content-Length`: the former frames the answer, and
    // the latter must not reach the shopper (RFC 9112 section 6.3: a recipient that
    // trusted it would read another answer out of this one's body). Such a blade is not
    // trusted with another request either.
    let both = te_chunked.is_some() && length.is_some();
    let reusable = !listed.close
        && (version == 1 || listed.keep_alive)
        && te_chunked.is_none_or(|c| c)
        && body != BodyKind::UntilClose
        && !both;
    Ok(Parsed::Final(ResponseHead {
        len,
        status,
        reason,
        connection: listed,
        body,
        reusable,
        // Nor on a 101 or 204, which have no content (RFC 9110 section 8.6).
        drop_length: te_chunked.is_some() || status == 101 || status == 204,
        length,
    }))
}

/// Writes an interim answer [`parse_response`] gave (`buf` and `fields` as it left
/// them) to `out` for the shopper: status line and fields but the hop-by-hop ones (for
/// a 103 Early Hints, its `Link` fields, which let the browser fetch styles and scripts
/// while the blade still works on the page).
pub fn write_interim(buf: &[u8], head: &InterimHead, fields: &[Field], out: &mut Vec<u8>) {
    out.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(out, u64::from(head.status));
    out.push(b' ');
    out.extend_from_slice(head.reason.get(buf));
    out.extend_from_slice(b"\r\n");
    for h in fields {
        let name = h.name.get(buf);
        if is_hop_by_hop(name)
            || name.eq_ignore_ascii_case(b"content-length")
            || listed_in_connection(buf, fields, name)
        {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value.get(buf));
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes the shopper's head for a response [`parse_response`] accepted (`buf` and
/// `fields` as it left them) to `out`: status line, the blade's fields but the hop-by-hop
/// ones, then `extra` (surge's own fields, written by the caller), then the empty line.
/// `extra` returning true adds `Connection: close`, decided after the response is seen.
pub fn write_response(
    buf: &[u8],
    head: &ResponseHead,
    fields: &[Field],
    rw: &Rewrite<'_>,
    out: &mut Vec<u8>,
    extra: impl FnOnce(&ResponseFacts<'_>, &ResponseHead, &mut Vec<u8>) -> bool,
) {
    let status = head.status;
    out.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(out, u64::from(status));
    out.push(b' ');
    out.extend_from_slice(head.reason.get(buf));
    out.extend_from_slice(b"\r\n");
    // Fields that `Connection` names are hop-by-hop too (see `Listed`).
    let Listed {
        close: lists_close,
        keep_alive: lists_keep_alive,
        other: lists_other,
    } = head.connection;
    let listed = |name: &[u8]| {
        (lists_close && name.eq_ignore_ascii_case(b"close"))
            || (lists_keep_alive && name.eq_ignore_ascii_case(b"keep-alive"))
            || (lists_other
                && fields
                    .iter()
                    .filter(|f| f.name.get(buf).eq_ignore_ascii_case(b"connection"))
                    .flat_map(|f| f.value.get(buf).split(|&b| b == b','))
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(name)))
    };
    let mut length_written = false;
    for h in fields {
        let name = h.name.get(buf);
        if name.eq_ignore_ascii_case(b"content-length")
            && !head.drop_length
            && !(rw.dechunk && head.body == BodyKind::Chunked)
        {
            if let (Some(n), false) = (head.length, length_written) {
                out.extend_from_slice(name);
                out.extend_from_slice(b": ");
                push_decimal(out, n);
                out.extend_from_slice(b"\r\n");
                length_written = true;
            }
            continue;
        }
        let keep_te = name.eq_ignore_ascii_case(b"transfer-encoding")
            && head.body == BodyKind::Chunked
            && !rw.dechunk;
        let keep_upgrade = status == 101 && name.eq_ignore_ascii_case(b"upgrade");
        if (is_hop_by_hop(name) && !keep_te && !keep_upgrade)
            || (rw.hsts.is_some() && name.eq_ignore_ascii_case(b"strict-transport-security"))
            || ((head.drop_length || (rw.dechunk && head.body == BodyKind::Chunked))
                && name.eq_ignore_ascii_case(b"content-length"))
            || (!name.eq_ignore_ascii_case(b"content-length") && !keep_upgrade && listed(name))
        {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value.get(buf));
        out.extend_from_slice(b"\r\n");
    }
    if status == 101 {
        out.extend_from_slice(b"connection: upgrade\r\n");
    }
    if let Some(v) = rw.hsts {
        out.extend_from_slice(b"strict-transport-security: ");
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
    }
    let facts = ResponseFacts { buf, fields };
    if extra(&facts, head, out) && status != 101 {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A request head as the decisions read it: the buffer and the field offsets.
pub struct View<'a> {
    pub buf: &'a [u8],
    pub head: &'a RequestHead,
    pub fields: &'a [Field],
}

impl crate::proxy::headers::RequestView for View<'_> {
    fn method(&self) -> &Method {
        &self.head.method
    }

    fn path(&self) -> &str {
        std::str::from_utf8(self.head.path.get(self.buf)).unwrap_or("/")
    }

    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.fields
            .iter()
            .filter(move |f| f.name.get(self.buf).eq_ignore_ascii_case(name.as_bytes()))
            .map(|f| f.value.get(self.buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HeadLimits = HeadLimits {
        max_fields: 100,
        max_uri_bytes: 8192,
    };

    fn parse(raw: &[u8]) -> Result<Option<RequestHead>, Refused> {
        parse_request(raw, LIMITS, &mut Vec::new())
    }

    fn forwarded(raw: &[u8], body_len: Option<usize>) -> String {
        forwarded_from(raw, body_len, false)
    }

    fn forwarded_from(raw: &[u8], body_len: Option<usize>, trusted: bool) -> String {
        let mut fields = Vec::new();
        let head = parse_request(raw, LIMITS, &mut fields).unwrap().unwrap();
        let mut out = Vec::new();
        write_request(
            raw,
            &head,
            &fields,
            &Forwarding {
                client_ip: b"192.0.2.7",
                proto: "http",
                trusted,
                new_request_id: Some(b"id-1"),
                fallback_host: b"10.0.0.1:80",
                body_len,
                upgrade: None,
            },
            &mut out,
        );
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_partial_head_waits_and_a_complete_one_is_framed() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\nhost: a\r\n"), Ok(None));
        let h = parse(b"POST /cart?x=1 HTTP/1.1\r\nHost: a\r\ncontent-length: 5\r\n\r\nhello")
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Length(5));
        assert_eq!(h.len, 55);
        assert!(!h.close);
        let h = parse(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(h.close, "HTTP/1.0 closes unless it asks for keep-alive");
        let h = parse(
            b"GET / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.framing, Framing::Chunked);
        assert!(
            h.close,
            "chunked beside a length: framed by chunked, then closed"
        );
    }

    #[test]
    fn surge_rules_refuse_what_cannot_be_trusted() {
        let cases: &[(&[u8], Refused)] = &[
            (b"GET / HTTP/1.1\r\n\r\n", Refused::BadHost),
            (
                b"GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n",
                Refused::BadHost,
            ),
            (
                b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
                Refused::Malformed,
            ),
            (
                b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: +1\r\n\r\n",
                Refused::Malformed,
            ),
            (
                b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: gzip\r\n\r\n",
                Refused::Malformed,
            ),
            (
                b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked, gzip\r\n\r\n",
                Refused::Malformed,
            ),
            (
                b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked, chunked\r\n\r\n",
                Refused::BadFraming,
            ),
            (
                b"POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n",
                Refused::Malformed,
            ),
            (
                b"GET / HTTP/1.1\r\nhost: a\r\nx: a\r\n b\r\n\r\n",
                Refused::Malformed,
            ),
            (b"GET / HTTP/1.1\r\nhost : a\r\n\r\n", Refused::Malformed),
            (b"GET * HTTP/1.1\r\nhost: a\r\n\r\n", Refused::Malformed),
            (
                b"GET nowhere HTTP/1.1\r\nhost: a\r\n\r\n",
                Refused::Malformed,
            ),
            (
                b"CONNECT shop:443 HTTP/1.1\r\nhost: shop:443\r\n\r\n",
                Refused::Connect,
            ),
        ];
        for (raw, want) in cases {
            assert_eq!(
                parse(raw).err(),
                Some(*want),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        let long = format!("GET /{} HTTP/1.1\r\nhost: a\r\n\r\n", "a".repeat(9000));
        assert_eq!(parse(long.as_bytes()).err(), Some(Refused::UriTooLong));
        // Refused as soon as the target is over the limit, complete or not, and with its
        // own status, not as a head too large once the head reaches its limit.
        for cut in [5000, 8300, 9010, 9020] {
            let partial = &long.as_bytes()[..cut];
            // "GET " then the target: its length so far is `cut - 4`.
            let want = (cut - 4 > LIMITS.max_uri_bytes).then_some(Refused::UriTooLong);
            assert_eq!(parse(partial).err(), want, "cut at {cut}");
        }
        let partial = format!("\r\nGET /{} HTTP/1.1\r\nhost: a\r\n", "a".repeat(100));
        assert!(
            matches!(parse(partial.as_bytes()), Ok(None)),
            "a short target waits"
        );
        let many: String = (0..101).map(|i| format!("x-{i}: v\r\n")).collect();
        let many = format!("GET / HTTP/1.1\r\nhost: a\r\n{many}\r\n");
        assert_eq!(parse(many.as_bytes()).err(), Some(Refused::TooManyHeaders));
    }

    #[test]
    fn the_forwarded_head_drops_hop_by_hop_fields_and_adds_surges() {
        let out = forwarded(
            b"GET /p?q HTTP/1.1\r\nHost: shop\r\nConnection: keep-alive, x-secret\r\nx-secret: 1\r\nTE: trailers\r\nUpgrade: websocket\r\nX-Forwarded-For: 6.6.6.6\r\nAccept: */*\r\n\r\n",
            None,
        );
        assert_eq!(
            out,
            "GET /p?q HTTP/1.1\r\nhost: shop\r\nAccept: */*\r\nx-forwarded-for: 192.0.2.7\r\nx-forwarded-proto: http\r\nx-request-id: id-1\r\n\r\n"
        );
        // An absolute-form target's authority is the Host; the body goes with its length.
        let out = forwarded(
            b"POST http://shop.example/cart HTTP/1.1\r\nhost: other\r\ntransfer-encoding: chunked\r\n\r\n",
            Some(12),
        );
        assert!(
            out.starts_with("POST /cart HTTP/1.1\r\nhost: shop.example\r\n"),
            "{out}"
        );
        assert!(out.ends_with("content-length: 12\r\n\r\n"), "{out}");
        assert!(!out.contains("other") && !out.contains("chunked"), "{out}");
        // HTTP/1.0 without Host: the blade's address.
        let out = forwarded(b"GET / HTTP/1.0\r\n\r\n", None);
        assert!(
            out.starts_with("GET / HTTP/1.1\r\nhost: 10.0.0.1:80\r\n"),
            "{out}"
        );
    }

    #[test]
    fn what_a_shopper_claims_of_its_address_host_and_port_passes_only_from_a_trusted_proxy() {
        let raw = b"GET / HTTP/1.1\r\nhost: shop\r\nX-Forwarded-Host: evil.example\r\nforwarded: for=6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nx-forwarded-port: 1\r\nAccept: */*\r\n\r\n";
        assert_eq!(
            forwarded_from(raw, None, false),
            "GET / HTTP/1.1\r\nhost: shop\r\nAccept: */*\r\nx-forwarded-for: 192.0.2.7\r\nx-forwarded-proto: http\r\nx-request-id: id-1\r\n\r\n"
        );
        let out = forwarded_from(raw, None, true);
        for kept in [
            "X-Forwarded-Host: evil.example\r\n",
            "forwarded: for=6.6.6.6\r\n",
            "X-Real-IP: 6.6.6.6\r\n",
            "x-forwarded-port: 1\r\n",
        ] {
            assert!(
                out.contains(kept),
                "{kept} dropped from a trusted proxy: {out}"
            );
        }
    }

    #[test]
    fn another_major_version_is_not_supported_and_a_broken_one_is_malformed() {
        for (line, want) in [
            (&b"GET / HTTP/2.0\r\nhost: a\r\n\r\n"[..], Refused::Version),
            (b"GET / HTTP/3.0\r\nhost: a\r\n\r\n", Refused::Version),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Refused::Version),
            (b"GET / HTTP/1.2\r\nhost: a\r\n\r\n", Refused::Malformed),
            (b"GET / HTTP/0.9\r\nhost: a\r\n\r\n", Refused::Malformed),
            (b"GET / HTTP/2\r\nhost: a\r\n\r\n", Refused::Malformed),
            (b"GET / http/2.0\r\nhost: a\r\n\r\n", Refused::Malformed),
            (b"GET /\r\n\r\n", Refused::Malformed),
        ] {
            assert_eq!(
                parse(line).err(),
                Some(want),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn an_http_1_0_expectation_is_ignored() {
        let expect = |raw: &[u8]| parse(raw).unwrap().unwrap().expect_continue;
        assert!(expect(
            b"POST / HTTP/1.1\r\nhost: a\r\nexpect: 100-continue\r\ncontent-length: 1\r\n\r\n"
        ));
        assert!(!expect(
            b"POST / HTTP/1.0\r\nexpect: 100-continue\r\ncontent-length: 1\r\n\r\n"
        ));
    }

    #[test]
    fn an_absolute_target_is_held_to_the_rules_of_host() {
        for bad in [
            &b"GET http://user:pw@shop.example/ HTTP/1.1\r\nhost: shop.example\r\n\r\n"[..],
            b"GET http://@shop.example/ HTTP/1.1\r\nhost: shop.example\r\n\r\n",
            b"GET http://shop.example:8x/ HTTP/1.1\r\nhost: shop.example\r\n\r\n",
            b"GET http://shop\"example/ HTTP/1.1\r\nhost: shop.example\r\n\r\n",
        ] {
            assert!(
                parse(bad).is_err(),
                "{:?} was taken",
                String::from_utf8_lossy(bad)
            );
        }
        for good in [
            &b"GET http://shop.example:8080/a HTTP/1.1\r\nhost: x\r\n\r\n"[..],
            b"GET http://[::1]:8080/a HTTP/1.1\r\nhost: x\r\n\r\n",
        ] {
            assert!(matches!(parse(good), Ok(Some(_))), "{good:?}");
        }
    }

    fn rewrite(raw: &[u8], rw: Rewrite<'_>) -> (Result<Parsed, BadResponse>, String) {
        let (mut out, mut fields) = (Vec::new(), Vec::new());
        let parsed = parse_response(raw, 100, &rw, &mut fields);
        if let Ok(Parsed::Final(head)) = &parsed {
            write_response(raw, head, &fields, &rw, &mut out, |facts, _, out| {
                if !facts.has("x-request-id") {
                    out.extend_from_slice(b"x-request-id: r\r\n");
                }
                false
            });
        }
        (parsed, String::from_utf8(out).unwrap())
    }

    const PLAIN: Rewrite<'static> = Rewrite {
        head_request: false,
        hsts: None,
        dechunk: false,
        upgrade: false,
    };

    /// A blade's length said twice (one field `5, 5`, or two fields) is one length: the
    /// shopper gets one value (RFC 9110 section 8.6), not a list a strict client refuses.
    #[test]
    fn a_length_said_twice_reaches_the_shopper_once() {
        for raw in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\nhello"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nContent-Length: 5\r\n\r\nhello",
        ] {
            let (parsed, out) = rewrite(raw, PLAIN);
            assert!(matches!(parsed, Ok(Parsed::Final(_))), "{out}");
            let lengths: Vec<&str> = out
                .lines()
                .filter(|l| l.to_ascii_lowercase().starts_with("content-length"))
                .collect();
            assert_eq!(lengths.len(), 1, "{out}");
            assert!(lengths[0].ends_with(": 5"), "{out}");
        }
    }

    #[test]
    fn an_http_1_0_shopper_keeps_the_length_and_loses_only_the_chunking() {
        let to_1_0 = Rewrite {
            dechunk: true,
            ..PLAIN
        };
        let (_, out) = rewrite(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", to_1_0);
        assert_eq!(
            out, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nx-request-id: r\r\n\r\n",
            "the length tells an HTTP/1.0 client where the body ends"
        );
        let (_, out) = rewrite(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            to_1_0,
        );
        assert_eq!(out, "HTTP/1.1 200 OK\r\nx-request-id: r\r\n\r\n");
    }

    #[test]
    fn responses_are_framed_by_rfc_9112_and_keep_their_end_to_end_fields() {
        let (p, out) = rewrite(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive, x-hop\r\nx-hop: 1\r\nKeep-Alive: timeout=5\r\nSet-Cookie: cart=1\r\n\r\nok",
            PLAIN,
        );
        let Ok(Parsed::Final(h)) = p else {
            panic!("{p:?}")
        };
        assert_eq!(
            (h.status, h.body, h.reusable),
            (200, BodyKind::Length(2), true)
        );
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nSet-Cookie: cart=1\r\nx-request-id: r\r\n\r\n"
        );
        let (p, out) = rewrite(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            PLAIN,
        );
        assert!(matches!(
            p,
            Ok(Parsed::Final(ResponseHead {
                body: BodyKind::Chunked,
                reusable: true,
                ..
            }))
        ));
        assert!(out.contains("Transfer-Encoding: chunked"), "{out}");
        let (p, _) = rewrite(b"HTTP/1.0 200 OK\r\n\r\n", PLAIN);
        assert!(matches!(
            p,
            Ok(Parsed::Final(ResponseHead {
                body: BodyKind::UntilClose,
                reusable: false,
                ..
            }))
        ));
        let (p, _) = rewrite(b"HTTP/1.1 204 No Content\r\n\r\n", PLAIN);
        assert!(matches!(
            p,
            Ok(Parsed::Final(ResponseHead {
                body: BodyKind::None,
                ..
            }))
        ));
        // A 204's length, which no sender may send, is not passed on.
        let (_, out) = rewrite(
            b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
            PLAIN,
        );
        assert!(
            !out.to_ascii_lowercase().contains("content-length"),
            "{out}"
        );
        // Chunked with a length too: framed by the chunks, the length dropped (a shopper
        // trusting it would read past this answer), the blade connection not reused.
        let (p, out) = rewrite(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n",
            PLAIN,
        );
        assert!(matches!(
            p,
            Ok(Parsed::Final(ResponseHead {
                body: BodyKind::Chunked,
                reusable: false,
                ..
            }))
        ));
        assert!(
            !out.to_ascii_lowercase().contains("content-length"),
            "{out}"
        );
        assert!(out.contains("Transfer-Encoding: chunked"), "{out}");
        let (p, _) = rewrite(
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n",
            Rewrite {
                head_request: true,
                ..PLAIN
            },
        );
        assert!(matches!(
            p,
            Ok(Parsed::Final(ResponseHead {
                body: BodyKind::None,
                ..
            }))
        ));
        let hints = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\nConnection: x-a\r\nX-A: 1\r\nKeep-Alive: 5\r\n\r\n";
        let mut fields = Vec::new();
        let Ok(Parsed::Interim(interim)) = parse_response(hints, 100, &PLAIN, &mut fields) else {
            panic!("103 is interim");
        };
        let mut out = Vec::new();
        write_interim(hints, &interim, &fields, &mut out);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n",
            "hop-by-hop fields, and those Connection names, are not passed on"
        );
        for (raw, status) in [
            (&b"HTTP/1.1 100 Continue\r\n\r\n"[..], 100),
            (b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n", 103),
            (b"HTTP/1.1 199 Whatever\r\n\r\n", 199),
        ] {
            assert!(
                matches!(
                    rewrite(raw, PLAIN).0,
                    Ok(Parsed::Interim(InterimHead { len, status: s, .. })) if len == raw.len() && s == status
                ),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        assert_eq!(
            rewrite(b"HTTP/1.1 101 Switching\r\n\r\n", PLAIN).0.err(),
            Some(BadResponse)
        );
        assert_eq!(
            rewrite(
                b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
                PLAIN
            )
            .0
            .err(),
            Some(BadResponse)
        );
        assert!(matches!(
            rewrite(b"HTTP/1.1 200 OK\r\nContent-", PLAIN).0,
            Ok(Parsed::Partial)
        ));
    }
}
