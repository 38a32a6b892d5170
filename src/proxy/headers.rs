//! Header rules for a request on its way upstream and a response on its way back.
//!
//! Hop-by-hop headers belong to one connection and are never forwarded (RFC 9110 §7.6.1): the fixed
//! list below plus every name the `Connection` header lists. Forwarding headers tell the upstream
//! who asked (`X-Forwarded-*`, and `Forwarded` from RFC 7239).

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::config::Cidr;

/// `X-Request-Id`.
pub(crate) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
static X_FORWARDED_PREFIX: HeaderName = HeaderName::from_static("x-forwarded-prefix");
/// Method-override headers some frameworks honour: a `POST` would run as `DELETE` behind the
/// CSRF and method checks, so none of them is ever forwarded (the list: [`FieldScan::flags_of`]).
fn is_method_override(name: &str) -> bool {
    FieldScan::flags_of(name) & FieldScan::METHOD_OVERRIDE != 0
}

/// Hop-by-hop headers of RFC 9110 §7.6.1, plus the historic `Keep-Alive` and `Proxy-Connection`
/// (the list: [`FieldScan::flags_of`]).
fn is_fixed_hop_by_hop(name: &str) -> bool {
    FieldScan::flags_of(name) & FieldScan::HOP_BY_HOP != 0
}

/// Which of the fields the request path asks about a header block holds, and the block's size:
/// found in one walk over the map, so that each field that is absent (nearly all of them, nearly
/// always) costs no hash lookup. nginx does the same while it parses a head (`headers_in`).
///
/// A scan describes the map it was taken of. Removing fields afterwards leaves it true for every
/// field still there; a field added afterwards is not in it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FieldScan {
    flags: u16,
    /// The block's size as `max_header_bytes` counts it: `name: value\r\n` per field.
    pub(crate) bytes: usize,
}

impl FieldScan {
    pub(crate) const CONNECTION: u16 = 1;
    pub(crate) const TE: u16 = 1 << 1;
    pub(crate) const UPGRADE: u16 = 1 << 2;
    pub(crate) const TRANSFER_ENCODING: u16 = 1 << 3;
    pub(crate) const CONTENT_LENGTH: u16 = 1 << 4;
    pub(crate) const TRACEPARENT: u16 = 1 << 5;
    pub(crate) const TRACESTATE: u16 = 1 << 6;
    pub(crate) const X_REQUEST_ID: u16 = 1 << 7;
    pub(crate) const SET_COOKIE: u16 = 1 << 8;
    /// Any field of the fixed hop-by-hop list (`Connection`, `TE` and `Upgrade` included).
    pub(crate) const HOP_BY_HOP: u16 = 1 << 9;
    pub(crate) const METHOD_OVERRIDE: u16 = 1 << 10;
    /// A field name with `_` (nginx and Envoy treat these as invalid by default: some stacks read
    /// `X_Auth_User` as `X-Auth-User`, CVE-2025-64484).
    pub(crate) const UNDERSCORE: u16 = 1 << 11;
    /// `Origin`, which the CSRF check reads.
    pub(crate) const ORIGIN: u16 = 1 << 12;
    /// `Sec-Fetch-Site`, which the CSRF check reads.
    pub(crate) const SEC_FETCH_SITE: u16 = 1 << 13;
    /// `Cookie`, from which coatcheck's own cookies are removed before forwarding.
    pub(crate) const COOKIE: u16 = 1 << 14;

    /// A scan that knows nothing: every field may be there (each check looks).
    pub(crate) const UNKNOWN: FieldScan = FieldScan {
        flags: u16::MAX,
        bytes: 0,
    };

    pub(crate) fn of(headers: &HeaderMap) -> FieldScan {
        let mut flags = 0;
        let mut bytes = 0;
        for (name, value) in headers {
            bytes += name.as_str().len() + value.len() + 4;
            flags |= Self::flags_of(name.as_str());
        }
        FieldScan { flags, bytes }
    }

    /// The flags of one field name: a `match` on its text (one switch on the length, then one
    /// comparison). This is where the hop-by-hop and method-override lists are spelled.
    fn flags_of(name: &str) -> u16 {
        const HOP: u16 = FieldScan::HOP_BY_HOP;
        match name {
            "connection" => Self::CONNECTION | HOP,
            "te" => Self::TE | HOP,
            "upgrade" => Self::UPGRADE | HOP,
            "transfer-encoding" => Self::TRANSFER_ENCODING | HOP,
            "keep-alive"
            | "proxy-connection"
            | "trailer"
            | "proxy-authenticate"
            | "proxy-authorization" => HOP,
            "content-length" => Self::CONTENT_LENGTH,
            "traceparent" => Self::TRACEPARENT,
            "tracestate" => Self::TRACESTATE,
            "x-request-id" => Self::X_REQUEST_ID,
            "set-cookie" => Self::SET_COOKIE,
            "origin" => Self::ORIGIN,
            "sec-fetch-site" => Self::SEC_FETCH_SITE,
            "cookie" => Self::COOKIE,
            "x-http-method-override" | "x-http-method" | "x-method-override" => {
                Self::METHOD_OVERRIDE
            }
            // No name above has a `_`.
            _ if name.contains('_') => Self::UNDERSCORE,
            _ => 0,
        }
    }

    /// Whether the block may hold any of `flags`' fields.
    pub(crate) fn has(self, flags: u16) -> bool {
        self.flags & flags != 0
    }

    /// [`is_upgrade_request`] for the head this scan was taken of: without `Upgrade`, no lookup.
    pub(crate) fn asks_upgrade(self, headers: &HeaderMap) -> bool {
        self.has(Self::UPGRADE) && is_upgrade_request(headers)
    }
}

/// Whether the request asks for a WebSocket upgrade in HTTP/1.1 terms: `Connection: upgrade` and
/// an `Upgrade` that names `websocket` and nothing else. Any other upgrade (`h2c`, `TLS/1.0`…) is
/// not one: its `Upgrade` header is removed as hop-by-hop and no tunnel can open.
pub(crate) fn is_upgrade_request(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(header::UPGRADE).iter();
    let websocket = match (values.next(), values.next()) {
        (Some(v), None) => v
            .to_str()
            .is_ok_and(|v| v.trim().eq_ignore_ascii_case("websocket")),
        _ => false,
    };
    websocket && connection_lists(headers, "upgrade")
}

/// Whether an upstream's `101` names exactly the WebSocket protocol the client asked for.
pub(crate) fn is_websocket_switch(headers: &HeaderMap) -> bool {
    is_upgrade_request(headers)
}

/// Removes the method-override headers (`X-HTTP-Method-Override`, `X-HTTP-Method`,
/// `X-Method-Override`).
pub(crate) fn strip_method_overrides(headers: &mut HeaderMap) {
    remove_where(headers, is_method_override);
}

/// Removes every header whose name contains `_`.
pub(crate) fn strip_underscore_names(headers: &mut HeaderMap) {
    remove_where(headers, |name| name.contains('_'));
}

/// Removes every upstream `Set-Cookie` that names one of coatcheck's own cookies (the session
/// cookie `base` or a login cookie `base-login-…`); returns the names removed (for the log; values
/// are never kept).
pub(crate) fn strip_own_set_cookies(headers: &mut HeaderMap, base: &str) -> Vec<String> {
    if !headers.contains_key(header::SET_COOKIE) {
        return Vec::new();
    }
    let mut removed = Vec::new();
    let kept: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter(|v| {
            let name = set_cookie_name(v.as_bytes());
            // A name that is not text cannot be ours, but neither can it be judged: fail closed.
            let own = std::str::from_utf8(name).is_err() || is_own_cookie(base, name);
            if own {
                removed.push(String::from_utf8_lossy(name).chars().take(128).collect());
            }
            !own
        })
        .cloned()
        .collect();
    if removed.is_empty() {
        return removed;
    }
    headers.remove(header::SET_COOKIE);
    for v in kept {
        headers.append(header::SET_COOKIE, v);
    }
    removed
}

/// The cookie name of a `Set-Cookie` value (RFC 6265 §5.2: up to the first `=`, trimmed; a
/// value without `=` has an empty name, which browsers treat as a nameless cookie).
fn set_cookie_name(v: &[u8]) -> &[u8] {
    let pair = v.split(|&b| b == b';').next().unwrap_or_default();
    let name = match pair.iter().position(|&b| b == b'=') {
        Some(i) => &pair[..i],
        None => &[][..],
    };
    name.trim_ascii()
}

fn connection_lists(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop headers. With `upgrade`, `Upgrade` is kept and `Connection: upgrade` is set
/// again (the upgrade must travel one more hop). `TE: trailers` survives (gRPC needs it).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    if headers.contains_key(header::CONNECTION) {
        let listed: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in listed {
            if !(upgrade && name == header::UPGRADE) {
                headers.remove(&name);
            }
        }
    }
    let te_trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    remove_where(headers, |name| {
        is_fixed_hop_by_hop(name) && !(upgrade && name == header::UPGRADE.as_str())
    });
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Removes every header whose name `names` accepts. Most messages carry none of them: one pass
/// over the names present says so before anything is looked up or allocated.
fn remove_where(headers: &mut HeaderMap, names: impl Fn(&str) -> bool) {
    if !headers.keys().any(|k| names(k.as_str())) {
        return;
    }
    let present: Vec<HeaderName> = headers
        .keys()
        .filter(|k| names(k.as_str()))
        .cloned()
        .collect();
    for name in present {
        headers.remove(name);
    }
}

/// Forwarding headers coatcheck owns: whatever a client sends under these names is removed before
/// coatcheck writes its own (a client must not choose the address, host or URL an upstream sees).
fn is_client_forwarding(name: &str) -> bool {
    matches!(
        name,
        "x-forwarded-proto"
            | "x-forwarded-host"
            | "x-forwarded-prefix"
            | "x-real-ip"
            | "x-original-url"
            | "x-rewrite-url"
    )
}

/// The forwarding chain a trusted proxy may pass on (`X-Forwarded-For`, RFC 7239 `Forwarded`).
fn is_forwarding_chain(name: &str) -> bool {
    matches!(name, "x-forwarded-for" | "forwarded")
}

/// The client's address: the peer's, unless the peer is a trusted proxy, in which case the
/// right-most `X-Forwarded-For` entry that is not itself a trusted proxy (the left-most one when
/// every hop is trusted). An entry that is not an IP address ends the walk.
pub(crate) fn client_ip(headers: &HeaderMap, peer: IpAddr, trusted: &[Cidr]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    let mut client = peer;
    if !is_trusted(peer) || !headers.contains_key(&X_FORWARDED_FOR) {
        return client;
    }
    let entries: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect();
    for entry in entries.iter().rev() {
        if !is_trusted(client) {
            break;
        }
        match entry.trim().parse::<IpAddr>() {
            Ok(ip) => client = ip,
            Err(_) => break,
        }
    }
    client
}

/// Writes the forwarding headers (RFC 7239 `Forwarded`, `X-Forwarded-For`, `-Proto`, `-Host`, and
/// `-Prefix` when a prefix was stripped). The `X-Forwarded-For`/`Forwarded` chain a client sent is
/// kept and appended to only when `peer_trusted` (the peer is in `server.trusted_proxies`);
/// otherwise it is replaced. Every other forwarding header a client sent is removed.
pub fn add_forwarding(
    headers: &mut HeaderMap,
    peer: IpAddr,
    peer_trusted: bool,
    host: Option<&HeaderValue>,
    prefix: Option<&str>,
) {
    remove_where(headers, |name| {
        is_client_forwarding(name) || (!peer_trusted && is_forwarding_chain(name))
    });
    let host = host.filter(|h| h.to_str().is_ok_and(is_token_like));
    let host_str = host.and_then(|h| h.to_str().ok());
    FORWARDING.with_borrow_mut(|memo| {
        let memo = ForwardingMemo::of(memo, peer.to_canonical(), host_str);
        append_to_list(headers, &X_FORWARDED_FOR, &memo.ip, &memo.x_forwarded_for);
        append_to_list(
            headers,
            &FORWARDED,
            memo.forwarded.to_str().unwrap_or_default(),
            &memo.forwarded,
        );
    });
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("https"));
    if let Some(h) = host {
        headers.insert(X_FORWARDED_HOST.clone(), h.clone());
    }
    if let Some(v) = prefix
        .filter(|p| !p.is_empty())
        .and_then(|p| HeaderValue::from_str(p).ok())
    {
        headers.insert(X_FORWARDED_PREFIX.clone(), v);
    }
}

thread_local! {
    /// The forwarding values this thread wrote last. A connection sends its requests from one
    /// address (and nearly always one `Host`), so they are formatted once per connection, not per
    /// request; a `HeaderValue` clone shares its bytes.
    static FORWARDING: std::cell::RefCell<Option<ForwardingMemo>> =
        const { std::cell::RefCell::new(None) };
}

/// `X-Forwarded-For` and `Forwarded` items for one client address and `Host`.
struct ForwardingMemo {
    peer: IpAddr,
    host: Option<Box<str>>,
    /// The address as text.
    ip: Box<str>,
    x_forwarded_for: HeaderValue,
    /// `for=…;proto=https[;host="…"]`.
    forwarded: HeaderValue,
}

impl ForwardingMemo {
    /// The memo for `peer` and `host`, made (and kept in `slot`) unless `slot` already holds it.
    fn of<'a>(
        slot: &'a mut Option<ForwardingMemo>,
        peer: IpAddr,
        host: Option<&str>,
    ) -> &'a ForwardingMemo {
        if slot
            .as_ref()
            .is_some_and(|m| m.peer == peer && m.host.as_deref() == host)
        {
            return slot.as_ref().expect("checked above");
        }
        let ip = peer.to_string();
        // RFC 7239 §6: IPv6 addresses are quoted and bracketed.
        let mut fwd = String::with_capacity(48 + host.map_or(0, str::len));
        if peer.is_ipv6() {
            fwd.push_str("for=\"[");
            fwd.push_str(&ip);
            fwd.push_str("]\"");
        } else {
            fwd.push_str("for=");
            fwd.push_str(&ip);
        }
        fwd.push_str(";proto=https");
        if let Some(h) = host {
            fwd.push_str(";host=\"");
            fwd.push_str(h);
            fwd.push('"');
        }
        slot.insert(ForwardingMemo {
            peer,
            host: host.map(Box::from),
            x_forwarded_for: HeaderValue::from_str(&ip)
                .expect("an address is a valid header value"),
            forwarded: HeaderValue::from_str(&fwd).expect("checked host and address"),
            ip: ip.into_boxed_str(),
        })
    }
}

/// Host values are `host[:port]`; anything else is not echoed into forwarding headers.
fn is_token_like(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 255
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b))
}

/// Appends `item` to the list header `name` (a chain a trusted proxy sent), or sets it to `alone`
/// (`item` as a value) when there is nothing to append to.
fn append_to_list(headers: &mut HeaderMap, name: &HeaderName, item: &str, alone: &HeaderValue) {
    // One lookup: nearly always the name is absent (a client's own values were just removed).
    let mut entry = match headers.entry(name.clone()) {
        http::header::Entry::Vacant(e) => {
            e.insert(alone.clone());
            return;
        }
        http::header::Entry::Occupied(e) => e,
    };
    let mut existing = entry.iter().filter_map(|v| v.to_str().ok()).peekable();
    if existing.peek().is_none() {
        entry.insert(alone.clone());
        return;
    }
    let mut joined = String::with_capacity(128);
    for e in existing {
        joined.push_str(e);
        joined.push_str(", ");
    }
    joined.push_str(item);
    if let Ok(v) = HeaderValue::from_str(&joined) {
        entry.insert(v);
    }
}

/// The request id: the client's `X-Request-Id` when it is short and printable, else a new random one.
pub(crate) fn request_id(headers: &HeaderMap, scan: FieldScan) -> HeaderValue {
    if scan.has(FieldScan::X_REQUEST_ID)
        && let Some(v) = headers.get(&X_REQUEST_ID)
        && !v.is_empty()
        && v.len() <= 128
        && v.as_bytes().iter().all(|b| b.is_ascii_graphic())
    {
        return v.clone();
    }
    // A random per-thread prefix and a counter: unique without a CSPRNG call per request
    // (request ids identify, they do not authorize), and without a counter that every serving
    // thread writes (its cache line would move between cores on every request).
    thread_local! {
        static NEXT: std::cell::Cell<(u64, u64)> = std::cell::Cell::new({
            let mut b = [0u8; 8];
            crate::secret::random_bytes(&mut b);
            (u64::from_le_bytes(b), 0)
        });
    }
    let (prefix, n) = NEXT.with(|next| {
        let (prefix, n) = next.get();
        next.set((prefix, n.wrapping_add(1)));
        (prefix, n)
    });
    let mut hex = [0u8; 32];
    let (high, low) = hex.split_at_mut(16);
    crate::secret::hex_into(&prefix.to_be_bytes(), high);
    crate::secret::hex_into(&n.to_be_bytes(), low);
    shared_value(hex).expect("hex digits are a valid header value")
}

/// A header value made once per request and then cloned (into the upstream request, the response,
/// a replay copy): its bytes are owned as a whole, so a clone shares them. `HeaderValue::from_bytes`
/// copies into a `Vec`, and the first clone of such bytes allocates again to share them.
pub(crate) fn shared_value<const N: usize>(
    bytes: [u8; N],
) -> Result<HeaderValue, http::header::InvalidHeaderValue> {
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(bytes))
}

/// Whether cookie `name` is one of coatcheck's: the session cookie `base` or a login cookie
/// `base-login-…`.
pub fn is_own_cookie(base: &str, name: &[u8]) -> bool {
    name.strip_prefix(base.as_bytes())
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(b"-login"))
}

/// Removes the cookies `is_own` selects from the `Cookie` header(s), keeping every other cookie in
/// order and byte for byte (as one header). One pass: the cookies kept are gathered in one buffer,
/// allocated only if there are any.
pub fn remove_cookies(headers: &mut HeaderMap, is_own: impl Fn(&[u8]) -> bool) {
    // The usual case, one cookie in one field: dropped whole or left as it is, with no pass over
    // pairs and no buffer.
    let mut fields = headers.get_all(header::COOKIE).iter();
    if let (Some(v), None) = (fields.next(), fields.next())
        && memchr::memchr(b';', v.as_bytes()).is_none()
    {
        let pair = v.as_bytes().trim_ascii();
        if !pair.is_empty() && is_own(split_pair(pair).0) {
            headers.remove(header::COOKIE);
        }
        return;
    }
    let mut kept = Vec::new();
    let mut changed = false;
    for v in headers.get_all(header::COOKIE) {
        for pair in cookie_pairs(v.as_bytes()).filter(|pair| !pair.is_empty()) {
            if is_own(split_pair(pair).0) {
                changed = true;
            } else {
                if !kept.is_empty() {
                    kept.extend_from_slice(b"; ");
                }
                kept.extend_from_slice(pair);
            }
        }
    }
    if !changed {
        return;
    }
    // The bytes kept came from valid header values, joined by "; ": valid too.
    match (!kept.is_empty()).then(|| HeaderValue::from_bytes(&kept)) {
        Some(Ok(v)) => headers.insert(header::COOKIE, v),
        _ => headers.remove(header::COOKIE),
    };
}

/// The value of cookie `name` in the request's `Cookie` header(s), if present exactly once.
/// (Two cookies with our name are refused: a sibling subdomain may have planted one.) The header
/// is read as bytes: a browser may send another cookie with UTF-8 or other non-ASCII bytes in its
/// value, and that must not hide ours.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    std::str::from_utf8(cookie_bytes(headers, name)?).ok()
}

/// [`cookie`]'s value as bytes, not checked as text: for a reader that checks the characters
/// itself (the session ticket is base64url of a fixed length), so they are not walked twice.
pub fn cookie_bytes<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    let mut found = None;
    for v in headers.get_all(header::COOKIE) {
        for pair in cookie_pairs(v.as_bytes()) {
            if let (n, Some(value)) = split_pair(pair)
                && n == name.as_bytes()
            {
                if found.is_some() {
                    return None;
                }
                found = Some(value);
            }
        }
    }
    found
}

/// The `;`-separated pairs of a `Cookie` value, trimmed of ASCII whitespace (RFC 6265 §4.2.1).
/// Every authenticated request parses its cookie twice (the session's, then the ones forwarded):
/// the separators are found with `memchr`, and only the value picked out is checked as text.
fn cookie_pairs(s: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut start = 0;
    memchr::memchr_iter(b';', s)
        .chain(std::iter::once(s.len()))
        .map(move |end| {
            let pair = s[start..end].trim_ascii();
            start = end + 1;
            pair
        })
}

/// A cookie pair's name and value, each trimmed; no `=`: all name, no value.
fn split_pair(pair: &[u8]) -> (&[u8], Option<&[u8]>) {
    match memchr::memchr(b'=', pair) {
        Some(i) => (pair[..i].trim_ascii(), Some(pair[i + 1..].trim_ascii())),
        None => (pair, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_and_connection_listed_headers_are_removed() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret-Hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip, trailers"),
            ("proxy-authorization", "Basic x"),
            ("proxy-authenticate", "Basic"),
            ("proxy-connection", "keep-alive"),
            ("trailer", "x-checksum"),
            ("upgrade", "h2c"),
            ("x-keep", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["x-keep"], "yes");
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn upgrades_keep_upgrade_and_connection() {
        let mut h = map(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("keep-alive", "1"),
        ]);
        assert!(is_upgrade_request(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert!(!h.contains_key("keep-alive"));
    }

    #[test]
    fn forwarding_headers_from_a_client_are_replaced() {
        let mut h = map(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("forwarded", "for=203.0.113.9"),
            ("x-real-ip", "203.0.113.9"),
            ("x-original-url", "/admin"),
            ("x-rewrite-url", "/admin"),
            ("x-forwarded-prefix", "/evil"),
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-proto", "http"),
        ]);
        add_forwarding(&mut h, "192.0.2.1".parse().unwrap(), false, None, None);
        assert_eq!(h["x-forwarded-for"], "192.0.2.1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["forwarded"], "for=192.0.2.1;proto=https");
        for gone in [
            "x-real-ip",
            "x-original-url",
            "x-rewrite-url",
            "x-forwarded-prefix",
            "x-forwarded-host",
        ] {
            assert!(!h.contains_key(gone), "{gone}");
        }
    }

    #[test]
    fn forwarding_values_follow_each_request_address_and_host_on_one_thread() {
        let host = |h: &str| HeaderValue::from_str(h).unwrap();
        let cases = [
            (
                "192.0.2.1",
                Some("a.example"),
                "for=192.0.2.1;proto=https;host=\"a.example\"",
            ),
            (
                "192.0.2.1",
                Some("a.example"),
                "for=192.0.2.1;proto=https;host=\"a.example\"",
            ),
            (
                "192.0.2.2",
                Some("a.example"),
                "for=192.0.2.2;proto=https;host=\"a.example\"",
            ),
            (
                "192.0.2.2",
                Some("b.example:8443"),
                "for=192.0.2.2;proto=https;host=\"b.example:8443\"",
            ),
            ("192.0.2.2", None, "for=192.0.2.2;proto=https"),
            ("2001:db8::1", None, "for=\"[2001:db8::1]\";proto=https"),
            ("::ffff:192.0.2.3", None, "for=192.0.2.3;proto=https"),
        ];
        for (peer, h, forwarded) in cases {
            let mut m = HeaderMap::new();
            let hv = h.map(host);
            add_forwarding(&mut m, peer.parse().unwrap(), false, hv.as_ref(), None);
            assert_eq!(m["forwarded"], forwarded, "{peer} {h:?}");
            let ip: IpAddr = peer.parse::<IpAddr>().unwrap().to_canonical();
            assert_eq!(m["x-forwarded-for"], ip.to_string().as_str());
            assert_eq!(m.get("x-forwarded-host").map(|v| v.to_str().unwrap()), h);
        }
        // Behind a trusted proxy the chain is appended to, and the next request is not.
        let mut m = map(&[
            ("x-forwarded-for", "198.51.100.7"),
            ("forwarded", "for=198.51.100.7"),
        ]);
        add_forwarding(&mut m, "10.0.0.2".parse().unwrap(), true, None, None);
        assert_eq!(m["x-forwarded-for"], "198.51.100.7, 10.0.0.2");
        assert_eq!(m["forwarded"], "for=198.51.100.7, for=10.0.0.2;proto=https");
        let mut m = HeaderMap::new();
        add_forwarding(&mut m, "10.0.0.2".parse().unwrap(), true, None, None);
        assert_eq!(m["x-forwarded-for"], "10.0.0.2");
    }

    #[test]
    fn the_client_address_comes_from_the_chain_only_behind_trusted_proxies() {
        let trusted = [Cidr::parse("10.0.0.0/8").unwrap()];
        let h = map(&[("x-forwarded-for", "198.51.100.7, 203.0.113.9, 10.1.1.1")]);
        let peer: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(
            client_ip(&h, peer, &trusted),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        let stranger: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(client_ip(&h, stranger, &trusted), stranger);
        let junk = map(&[("x-forwarded-for", "bogus, 10.1.1.1")]);
        assert_eq!(
            client_ip(&junk, peer, &trusted),
            "10.1.1.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn only_websocket_upgrades_are_upgrades() {
        let ws = map(&[("connection", "upgrade"), ("upgrade", "websocket")]);
        assert!(is_upgrade_request(&ws));
        for other in ["h2c", "websocket, h2c", "TLS/1.0", ""] {
            let h = map(&[("connection", "upgrade"), ("upgrade", other)]);
            assert!(!is_upgrade_request(&h), "{other}");
        }
        let two = map(&[
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("upgrade", "h2c"),
        ]);
        assert!(!is_upgrade_request(&two));
    }

    #[test]
    fn upstream_set_cookies_naming_our_cookies_are_dropped() {
        let mut h = map(&[
            ("set-cookie", "__Host-coatcheck=evil; Path=/"),
            ("set-cookie", "theirs=1; Path=/"),
            ("set-cookie", " __Host-coatcheck-login-abc =x"),
            ("set-cookie", "__Host-coatcheck=; Max-Age=0"),
        ]);
        let removed = strip_own_set_cookies(&mut h, "__Host-coatcheck");
        assert_eq!(removed.len(), 3, "{removed:?}");
        let left: Vec<_> = h.get_all("set-cookie").iter().collect();
        assert_eq!(left, ["theirs=1; Path=/"]);
    }

    #[test]
    fn method_overrides_and_underscore_names_are_removed() {
        let mut h = map(&[
            ("x-http-method-override", "DELETE"),
            ("x-http-method", "DELETE"),
            ("x-method-override", "DELETE"),
            ("transfer_encoding", "chunked"),
            ("x_auth_user", "admin"),
            ("x-ok", "1"),
        ]);
        assert!(FieldScan::of(&h).has(FieldScan::METHOD_OVERRIDE));
        strip_method_overrides(&mut h);
        assert!(FieldScan::of(&h).has(FieldScan::UNDERSCORE));
        strip_underscore_names(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        let left = FieldScan::of(&h);
        assert!(!left.has(FieldScan::UNDERSCORE | FieldScan::METHOD_OVERRIDE));
    }

    #[test]
    fn a_scan_finds_each_field_it_names_and_sizes_the_block() {
        let cases: [(&str, u16); 16] = [
            ("connection", FieldScan::CONNECTION | FieldScan::HOP_BY_HOP),
            ("te", FieldScan::TE | FieldScan::HOP_BY_HOP),
            ("upgrade", FieldScan::UPGRADE | FieldScan::HOP_BY_HOP),
            (
                "transfer-encoding",
                FieldScan::TRANSFER_ENCODING | FieldScan::HOP_BY_HOP,
            ),
            ("keep-alive", FieldScan::HOP_BY_HOP),
            ("proxy-authorization", FieldScan::HOP_BY_HOP),
            ("content-length", FieldScan::CONTENT_LENGTH),
            ("traceparent", FieldScan::TRACEPARENT),
            ("tracestate", FieldScan::TRACESTATE),
            ("x-request-id", FieldScan::X_REQUEST_ID),
            ("set-cookie", FieldScan::SET_COOKIE),
            ("x-http-method-override", FieldScan::METHOD_OVERRIDE),
            ("x_auth_user", FieldScan::UNDERSCORE),
            ("origin", FieldScan::ORIGIN),
            ("sec-fetch-site", FieldScan::SEC_FETCH_SITE),
            ("cookie", FieldScan::COOKIE),
        ];
        let all = cases.iter().fold(0, |a, (_, f)| a | f);
        for (name, flags) in cases {
            // Among ordinary fields, and with a second value of the same name.
            let h = map(&[("host", "a"), (name, "1"), ("accept", "*/*"), (name, "2")]);
            let scan = FieldScan::of(&h);
            assert!(scan.has(flags), "{name}");
            assert!(!scan.has(all & !flags), "{name}: {scan:?}");
            let bytes = 4 + 1 + 4 + 6 + 3 + 4 + 2 * (name.len() + 1 + 4);
            assert_eq!(scan.bytes, bytes, "{name}");
        }
        let plain = FieldScan::of(&map(&[("host", "a"), ("accept", "b=c"), ("x-csrf", "1")]));
        assert!(!plain.has(all), "{plain:?}");
        assert!(FieldScan::UNKNOWN.has(all));
    }

    #[test]
    fn forwarding_headers_behind_a_trusted_proxy_append_and_quote_ipv6() {
        let mut h = map(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("forwarded", "for=203.0.113.9"),
        ]);
        add_forwarding(
            &mut h,
            "::1".parse().unwrap(),
            true,
            Some(&HeaderValue::from_static("localhost:8443")),
            None,
        );
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, ::1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "localhost:8443");
        assert_eq!(
            h["forwarded"],
            "for=203.0.113.9, for=\"[::1]\";proto=https;host=\"localhost:8443\""
        );
    }

    #[test]
    fn request_ids_are_kept_when_sane_and_generated_otherwise() {
        assert_eq!(
            request_id(&map(&[("x-request-id", "abc-123")]), FieldScan::UNKNOWN),
            "abc-123"
        );
        let generated = request_id(&map(&[("x-request-id", "has space")]), FieldScan::UNKNOWN);
        assert_eq!(generated.len(), 32);
        assert_ne!(generated, request_id(&HeaderMap::new(), FieldScan::UNKNOWN));
        // Each thread counts on its own, from its own random prefix: no id repeats across them.
        let made: Vec<Vec<HeaderValue>> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        (0..1000)
                            .map(|_| request_id(&HeaderMap::new(), FieldScan::UNKNOWN))
                            .collect()
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let all: std::collections::HashSet<&HeaderValue> = made.iter().flatten().collect();
        assert_eq!(all.len(), 4000);
    }

    #[test]
    fn only_coatchecks_own_cookies_are_removed() {
        let own = |n: &[u8]| is_own_cookie("__Host-coatcheck", n);
        let mut h = map(&[
            (
                "cookie",
                "a=1; __Host-coatcheck=secret; b=2; __Host-coatcheckx=keep",
            ),
            ("cookie", "__Host-coatcheck-login-abc=x"),
        ]);
        remove_cookies(&mut h, own);
        assert_eq!(h["cookie"], "a=1; b=2; __Host-coatcheckx=keep");
        let mut h = map(&[("cookie", "__Host-coatcheck=secret")]);
        remove_cookies(&mut h, own);
        assert!(!h.contains_key("cookie"));
        // One cookie alone: someone else's is forwarded byte for byte, ours (spaced) is dropped.
        let mut h = map(&[("cookie", " theme=dark ")]);
        remove_cookies(&mut h, own);
        assert_eq!(h["cookie"], " theme=dark ");
        let mut h = map(&[("cookie", " __Host-coatcheck-login-abc = x ")]);
        remove_cookies(&mut h, own);
        assert!(!h.contains_key("cookie"));
    }

    #[test]
    fn another_cookie_with_non_ascii_bytes_hides_nothing_and_is_forwarded_as_sent() {
        let mut h = HeaderMap::new();
        let raw = "name=Zo\u{eb}; __Host-coatcheck=ticket; theme=\u{1f311}".as_bytes();
        h.insert(header::COOKIE, HeaderValue::from_bytes(raw).unwrap());
        assert_eq!(cookie(&h, "__Host-coatcheck"), Some("ticket"));
        remove_cookies(&mut h, |n| is_own_cookie("__Host-coatcheck", n));
        assert_eq!(
            h[header::COOKIE].as_bytes(),
            "name=Zo\u{eb}; theme=\u{1f311}".as_bytes()
        );
    }

    #[test]
    fn a_duplicated_cookie_is_not_trusted() {
        assert_eq!(cookie(&map(&[("cookie", "a=1; s=v")]), "s"), Some("v"));
        assert_eq!(cookie(&map(&[("cookie", "s=v1; s=v2")]), "s"), None);
        assert_eq!(cookie_bytes(&map(&[("cookie", "s=v1; s=v2")]), "s"), None);
    }

    #[test]
    fn cookie_bytes_finds_what_cookie_finds_without_the_text_check() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_bytes(b"a=\xff\xfe; s=ok; t=\xc3\x28").unwrap(),
        );
        assert_eq!(cookie_bytes(&h, "s"), Some(&b"ok"[..]));
        assert_eq!(cookie(&h, "s"), Some("ok"));
        assert_eq!(cookie_bytes(&h, "t"), Some(&b"\xc3\x28"[..]));
        assert_eq!(cookie(&h, "t"), None, "not UTF-8: no text value");
        assert_eq!(cookie_bytes(&h, "u"), None);
    }
}

#[cfg(test)]
mod properties {
    //! The forwarding-header rewrite, for any client-sent values and any peer.
    use std::net::{Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;

    use super::*;

    fn peer() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(|b| IpAddr::V4(Ipv4Addr::from(b))),
            any::<[u8; 16]>().prop_map(|b| IpAddr::V6(Ipv6Addr::from(b))),
        ]
    }

    fn field_value() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop::sample::select(vec![
                "203.0.113.9",
                "10.0.0.1",
                "::1",
                "[::1]",
                ",",
                " ",
                "for=",
                "\"",
                ";",
                "unknown",
                "host=evil",
                "proto=http",
                "x",
                "2001:db8::7",
                "_",
            ]),
            0..6,
        )
        .prop_map(|parts| parts.concat())
    }

    const OWNED: &[&str] = &[
        "x-forwarded-for",
        "forwarded",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-forwarded-prefix",
        "x-real-ip",
        "x-original-url",
        "x-rewrite-url",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn forwarding_headers_say_what_coatcheck_saw_whatever_the_client_sent(
            sent in prop::collection::vec((prop::sample::select(OWNED), field_value()), 0..10),
            peer in peer(),
            trusted in any::<bool>(),
        ) {
            let mut h = HeaderMap::new();
            let mut client_xff = Vec::new();
            for (name, value) in &sent {
                if let Ok(v) = HeaderValue::from_str(value) {
                    if *name == "x-forwarded-for" {
                        client_xff.push(value.clone());
                    }
                    h.append(*name, v);
                }
            }
            add_forwarding(&mut h, peer, trusted, Some(&HeaderValue::from_static("app.example:443")), None);
            let ip = peer.to_canonical().to_string();
            for name in ["x-forwarded-for", "forwarded", "x-forwarded-proto", "x-forwarded-host"] {
                prop_assert_eq!(h.get_all(name).iter().count(), 1, "{}", name);
            }
            for gone in ["x-forwarded-prefix", "x-real-ip", "x-original-url", "x-rewrite-url"] {
                prop_assert!(!h.contains_key(gone), "{}", gone);
            }
            prop_assert_eq!(&h["x-forwarded-proto"], "https");
            prop_assert_eq!(&h["x-forwarded-host"], "app.example:443");
            let xff = h["x-forwarded-for"].to_str().unwrap().to_owned();
            if trusted {
                prop_assert!(xff == ip || xff.ends_with(&format!(", {ip}")), "{}", xff);
            } else {
                prop_assert_eq!(&xff, &ip);
                let fwd = h["forwarded"].to_str().unwrap();
                prop_assert!(fwd.starts_with("for="), "{}", fwd);
                prop_assert!(!fwd.contains(','), "{}", fwd);
            }
        }

        #[test]
        fn cookie_parsing_finds_what_a_split_and_trim_finds(
            value in "[ \t;=ab]{0,24}",
            name in "[ab]{1,2}",
        ) {
            // The reference: the parser before memchr (str::split, str::trim, split_once).
            let reference = |s: &str| -> Option<String> {
                let mut found = None;
                for pair in s.split(';') {
                    if let Some((n, v)) = pair.trim().split_once('=') && n.trim() == name {
                        if found.is_some() {
                            return None;
                        }
                        found = Some(v.trim().to_owned());
                    }
                }
                found
            };
            let with_cookie = || {
                let mut h = HeaderMap::new();
                h.insert(header::COOKIE, HeaderValue::from_str(&value).unwrap());
                h
            };
            let h = with_cookie();
            prop_assert_eq!(cookie(&h, &name).map(str::to_owned), reference(&value));
            let mut kept = with_cookie();
            remove_cookies(&mut kept, |n| n == name.as_bytes());
            let rest = kept.get("cookie").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
            let expected: Vec<&str> = value
                .split(';')
                .map(str::trim)
                .filter(|p| !p.is_empty() && p.split_once('=').map_or(*p, |(n, _)| n).trim() != name)
                .collect();
            let changed = value.split(';').map(str::trim).any(|p| {
                !p.is_empty() && p.split_once('=').map_or(p, |(n, _)| n).trim() == name
            });
            if changed {
                prop_assert_eq!(rest, expected.join("; "));
            } else {
                prop_assert_eq!(rest, value.clone());
            }
        }

        #[test]
        fn the_client_address_is_the_peer_unless_the_peer_is_trusted(
            xff in field_value(),
            peer in peer(),
        ) {
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(&xff) {
                h.insert("x-forwarded-for", v);
            }
            let none: [Cidr; 0] = [];
            prop_assert_eq!(client_ip(&h, peer, &none), peer);
            let everyone = [Cidr::parse("0.0.0.0/0").unwrap(), Cidr::parse("::/0").unwrap()];
            let c = client_ip(&h, peer, &everyone);
            let listed = xff.split(',').any(|e| e.trim().parse::<IpAddr>().ok() == Some(c));
            prop_assert!(c == peer || listed, "{} from {}", c, xff);
        }

        #[test]
        fn upstream_set_cookies_for_our_names_never_survive(
            names in prop::collection::vec(
                prop::sample::select(vec![
                    "__Host-coatcheck", " __Host-coatcheck", "__Host-coatcheck-login-x",
                    "__Host-coatcheck-loginx", "theirs", "__Host-coatcheckx", "", "a",
                ]),
                0..6,
            ),
        ) {
            let mut h = HeaderMap::new();
            for n in &names {
                h.append(header::SET_COOKIE, HeaderValue::from_str(&format!("{n}=v; Path=/")).unwrap());
            }
            strip_own_set_cookies(&mut h, "__Host-coatcheck");
            for v in h.get_all(header::SET_COOKIE) {
                let name = std::str::from_utf8(set_cookie_name(v.as_bytes())).unwrap();
                prop_assert!(!is_own_cookie("__Host-coatcheck", name.as_bytes()), "{:?}", v);
            }
        }
    }
}
