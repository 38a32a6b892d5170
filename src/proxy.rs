//! Forwarding one request to its upstream and streaming the answer back.
//!
//! `proxy` receives the access token to inject as a ready `Authorization` value, never a session: it
//! cannot reach the store. Bodies stream both ways (no buffering); upgrades (WebSocket) are spliced
//! into a bidirectional byte tunnel once both sides said `101`.
//!
//! One forwarding path with named phases (after pingora's `ProxyHttp` filters): `split` (the
//! request as it arrived), `rewrite` (the request as it leaves), `send` (the upstream call and
//! the answer's own rewriting), then the caller's `Phases`: `Phases::retry_with` may send the
//! request once more with a new credential (the body was kept when `Phases::keep_for_retry`
//! said so), and `Phases::response_filter` has the last look at the answer.

pub mod headers;

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use crate::body::{Body, BodyError, Primed, Side, Stalling, UpstreamBody};

/// Request body bytes already received that are read (and their framing judged) before the
/// upstream request opens: see [`Primed`].
pub(crate) const PRIME_BYTES: usize = 64 * 1024;
/// A request body that pauses this long while being primed is forwarded with what has come.
pub(crate) const PRIME_GAP: Duration = Duration::from_millis(50);
use crate::config::{AuthMode, Route};
use crate::error::{BoxError, Error};
use crate::upstream::{Progress, Upstream, UpstreamError};
use crate::wake::QuietSleep;

/// What the caller decided about the request before it leaves.
pub(crate) struct Forward<'a> {
    /// Path to request upstream (normalized, prefix stripped if configured), without the query.
    pub(crate) path: &'a str,
    /// The peer's address, for `X-Forwarded-For`/`Forwarded`.
    pub(crate) client: IpAddr,
    /// Whether the peer is a trusted proxy (its forwarding chain is kept and appended to).
    pub(crate) peer_trusted: bool,
    /// The route prefix removed by `strip_prefix`, for `X-Forwarded-Prefix`.
    pub(crate) prefix: Option<&'a str>,
    /// A streamed body (either way) that moves no byte for this long is cut.
    pub(crate) body_idle: Duration,
    /// The request id, sent upstream and echoed back.
    pub(crate) request_id: &'a HeaderValue,
    /// `Authorization` value to inject (`Bearer <access token>`), marked sensitive.
    pub(crate) authorization: Option<HeaderValue>,
    /// Name of coatcheck's session cookie: it and its login cookies never reach the upstream.
    pub(crate) own_cookie: Option<&'a str>,
    /// The client connection the request came on.
    pub(crate) slot: &'a ConnectionSlot,
    /// The fields the client's head held (taken before any was removed).
    pub(crate) scan: headers::FieldScan,
}

/// What a caller adds to the forwarding of one request. Every method has a default that does
/// nothing, so a plain forward is [`Plain`].
pub(crate) trait Phases: Send + Sync {
    /// Whether the request body should be kept (up to the route's `retry_body_bytes`) so the
    /// request can be sent a second time.
    fn keep_for_retry(&self) -> bool {
        false
    }

    /// The upstream answered a request whose body was kept: `Some(authorization)` sends it once
    /// more with that credential, and that second answer is the one that counts.
    fn retry_with(
        &self,
        _res: &Response<Body>,
    ) -> impl Future<Output = Result<Option<HeaderValue>, Error>> + Send {
        std::future::ready(Ok(None))
    }

    /// The last look at the answer before it goes to the client.
    fn response_filter(
        &self,
        res: Response<Body>,
    ) -> impl Future<Output = Result<Response<Body>, Error>> + Send {
        std::future::ready(Ok(res))
    }
}

/// A forward with no additions.
pub(crate) struct Plain;

impl Phases for Plain {}

/// Forwards `req` to `upstream` for `route`, streaming the body under the route's size limit.
///
/// The request is split and rewritten when this is called; the future holds the outbound parts
/// once (an `async fn` holds its arguments twice, and this future is part of every proxied
/// request's, moved with it at each level above).
pub(crate) fn forward<'a>(
    upstream: &'a Upstream,
    route: &'a Route,
    req: Request<Incoming>,
    fwd: &'a Forward<'_>,
    phases: impl Phases + 'a,
) -> impl Future<Output = Result<Response<Body>, Error>> + 'a {
    let mut out = match Outbound::prepare(upstream, route, req, fwd, phases.keep_for_retry()) {
        Ok(out) => out,
        Err(e) => return tokio_util::either::Either::Left(std::future::ready(Err(e))),
    };
    tokio_util::either::Either::Right(async move {
        let res = if out.retry {
            let body = keep_body(route, out.body).await?;
            let kept = ReplayHead::keep(&out.parts);
            // Neither send carries the client request's extensions.
            out.parts.extensions = http::Extensions::new();
            let first = Request::from_parts(out.parts, Either::Right(Full::new(body.clone())));
            let res = send(upstream, route, first, None, fwd).await?;
            match phases.retry_with(&res).await? {
                Some(authorization) => {
                    let again = kept.request(authorization, body)?;
                    send(upstream, route, again, None, fwd).await?
                }
                None => res,
            }
        } else {
            let body = if http_body::Body::is_end_stream(out.body.inner()) {
                Either::Right(Full::new(Bytes::new()))
            } else {
                let limit = route.max_body_bytes as usize;
                let body = Primed::prime(out.body, PRIME_BYTES.min(limit + 1), PRIME_GAP)
                    .await
                    .map_err(|e| client_body_error(&e))?;
                Either::Left(Box::new(Limited::new(body, limit)))
            };
            let req = Request::from_parts(out.parts, body);
            send(upstream, route, req, out.client_upgrade, fwd).await?
        };
        phases.response_filter(res).await
    })
}

/// A client request split and rewritten for the upstream: the synchronous part of [`forward`].
struct Outbound {
    parts: http::request::Parts,
    body: Stalling<Incoming>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    /// Whether the body is kept (and the head with it) for one replay.
    retry: bool,
}

impl Outbound {
    fn prepare(
        upstream: &Upstream,
        route: &Route,
        req: Request<Incoming>,
        fwd: &Forward<'_>,
        keep_for_retry: bool,
    ) -> Result<Outbound, Error> {
        let (mut parts, body, client_upgrade) = split(route, req, fwd.body_idle, fwd.scan)?;
        let retry = keep_for_retry
            && client_upgrade.is_none()
            && replayable(route, &parts, body.inner(), fwd.scan);
        rewrite(upstream, route, &mut parts, fwd, client_upgrade.is_some())?;
        Ok(Outbound {
            parts,
            body,
            client_upgrade,
            retry,
        })
    }
}

/// Whether a request may be buffered for one replay: a body that is absent or declared no larger
/// than the route's `retry_body_bytes`.
fn replayable(
    route: &Route,
    parts: &http::request::Parts,
    body: &Incoming,
    scan: headers::FieldScan,
) -> bool {
    if route.retry_body_bytes == 0
        || (scan.has(headers::FieldScan::TRANSFER_ENCODING)
            && parts.headers.contains_key(header::TRANSFER_ENCODING))
    {
        return false;
    }
    match content_length(&parts.headers, scan) {
        Some(n) => n <= route.retry_body_bytes,
        // No Content-Length and no Transfer-Encoding: HTTP/1.1 has no body; HTTP/2 may stream one.
        None => parts.version != Version::HTTP_2 || http_body::Body::is_end_stream(body),
    }
}

/// Reads a body to keep for a replay: each frame within the idle limit, the whole within the
/// route timeout.
async fn keep_body(route: &Route, body: Stalling<Incoming>) -> Result<Bytes, Error> {
    // A request without a body (most replayable requests: a GET, a DELETE) has nothing to read:
    // no timer is armed and nothing is collected.
    if http_body::Body::is_end_stream(body.inner()) {
        return Ok(Bytes::new());
    }
    let collect = Limited::new(body, route.retry_body_bytes as usize).collect();
    match tokio::time::timeout(route.timeout, collect).await {
        Err(_) => Err(Error::RequestTimeout(route.timeout)),
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(Error::PayloadTooLarge {
            limit: route.retry_body_bytes,
        }),
        Ok(Err(e)) => Err(match e.downcast_ref::<BodyError>() {
            Some(b) => client_body_error(b),
            None => Error::BadRequest("reading the request body failed".into()),
        }),
    }
}

/// The head of a request sent once and kept for one replay with a new `Authorization`
/// ([`Phases::retry_with`]). Every request on a session route keeps one, and a replay is rare
/// (an upstream `401 invalid_token`), so the header fields are kept as `name:value` lines in one
/// buffer: one allocation and two copies per field, where a `HeaderMap` clone made two
/// allocations, a reference count per value (an allocation each for values built per request,
/// such as `X-Request-Id`) and a hash table, and dropped them all again. They are parsed back only
/// for a replay. `Authorization` is not kept: the replay replaces it.
struct ReplayHead {
    method: http::Method,
    uri: http::Uri,
    version: Version,
    /// `name:value\n` per field, with NUL in place of `:` for a value marked sensitive. Neither
    /// separator can occur in a field name, nor `\n` in a field value.
    fields: Vec<u8>,
}

impl ReplayHead {
    fn keep(parts: &http::request::Parts) -> ReplayHead {
        let mut fields = Vec::with_capacity(REPLAY_FIELDS_BYTES);
        for (name, value) in &parts.headers {
            if name == header::AUTHORIZATION {
                continue;
            }
            fields.extend_from_slice(name.as_str().as_bytes());
            fields.push(if value.is_sensitive() { 0 } else { b':' });
            fields.extend_from_slice(value.as_bytes());
            fields.push(b'\n');
        }
        ReplayHead {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            fields,
        }
    }

    /// The request to send again, with `authorization` and the kept `body`.
    fn request(
        self,
        authorization: HeaderValue,
        body: Bytes,
    ) -> Result<Request<UpstreamBody>, Error> {
        let mut req = Request::new(Either::Right(Full::new(body)));
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        let headers = req.headers_mut();
        for line in self.fields.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let (name, mut value, sensitive) = split_kept_field(line)
                .ok_or_else(|| Error::Internal("a kept request header did not parse".into()))?;
            value.set_sensitive(sensitive);
            headers.append(name, value);
        }
        headers.insert(header::AUTHORIZATION, authorization);
        Ok(req)
    }
}

/// What a request's kept fields usually take: most heads fit without growing the buffer.
const REPLAY_FIELDS_BYTES: usize = 512;

/// One `name:value` line of [`ReplayHead::fields`], parsed back.
fn split_kept_field(line: &[u8]) -> Option<(http::HeaderName, HeaderValue, bool)> {
    let at = memchr::memchr2(b':', 0, line)?;
    let name = http::HeaderName::from_bytes(&line[..at]).ok()?;
    let value = HeaderValue::from_bytes(&line[at + 1..]).ok()?;
    Some((name, value, line[at] == 0))
}

/// The client connection a request arrived on, as the listener hands it to the router
/// ([`Forward::slot`], HTTP/1.1 only): an upgraded tunnel keeps the connection's slot (it still counts against
/// `max_connections` and the per-address cap) and closes when `closing` fires at the end of the
/// shutdown grace.
#[derive(Clone)]
pub(crate) struct ConnectionSlot {
    /// Released when the connection and every tunnel made from it have ended.
    #[expect(
        dead_code,
        reason = "held only for its drop, which frees the connection's slot"
    )]
    pub(crate) hold: Arc<dyn std::any::Any + Send + Sync>,
    /// Cancelled when the shutdown grace period has ended.
    pub(crate) closing: CancellationToken,
    /// `coatcheck_upgrades_open`: held up while a tunnel made from this connection is open.
    pub(crate) tunnels_open: prometheus_client::metrics::gauge::Gauge,
    /// The route-deadline timer of an HTTP/1.1 connection's requests (`None` on HTTP/2, whose
    /// concurrent requests each arm their own).
    pub(crate) deadline: Option<Arc<ConnectionDeadline>>,
    /// The handle of the session cookie the connection presented last.
    pub(crate) handles: crate::session::ConnectionMemo,
}

/// One route-deadline timer shared by the requests of an HTTP/1.1 connection, which come one at a
/// time. A request re-arms it only when it is due earlier than the timer (or the timer has
/// fired): otherwise the timer fires first and [`deadline`] arms it again for what is left. And
/// it is polled only when it has fired or the waiting task is not the one it would wake (all of a
/// connection's requests run in its task). So a request on a busy connection costs no timer
/// registration, no removal, no reset and no poll; when the timer fires on an idle connection it
/// wakes that connection's task once, to no effect.
pub(crate) struct ConnectionDeadline {
    timer: std::sync::Mutex<Option<QuietSleep>>,
}

impl ConnectionDeadline {
    pub(crate) fn new() -> Self {
        ConnectionDeadline {
            timer: std::sync::Mutex::new(None),
        }
    }

    /// Resolves at `due` (at once when `due` has passed), or earlier: the caller checks.
    async fn until(&self, due: Instant) {
        let due = tokio::time::Instant::from_std(due);
        {
            let mut timer = self.timer.lock().unwrap_or_else(|p| p.into_inner());
            match timer.as_mut() {
                Some(t) if !t.is_elapsed() && t.deadline() <= due => {}
                Some(t) => t.reset(due),
                None => *timer = Some(QuietSleep::until(due)),
            }
        }
        std::future::poll_fn(|cx| {
            let mut timer = self.timer.lock().unwrap_or_else(|p| p.into_inner());
            match timer.as_mut() {
                Some(t) => t.poll_fired(cx),
                None => std::task::Poll::Ready(()),
            }
        })
        .await;
    }
}

/// Splits a client request, refusing a declared body over the route's limit up front and taking
/// the upgrade handle of an HTTP/1.1 upgrade request.
pub(crate) fn split(
    route: &Route,
    mut req: Request<Incoming>,
    body_idle: Duration,
    scan: headers::FieldScan,
) -> Result<
    (
        http::request::Parts,
        Stalling<Incoming>,
        Option<hyper::upgrade::OnUpgrade>,
    ),
    Error,
> {
    if let Some(len) = content_length(req.headers(), scan)
        && len > route.max_body_bytes
    {
        return Err(Error::PayloadTooLarge {
            limit: route.max_body_bytes,
        });
    }
    let upgrade = req.version() == Version::HTTP_11 && scan.asks_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    Ok((
        parts,
        Stalling::new(body, Side::Client, body_idle),
        client_upgrade,
    ))
}

/// The declared `Content-Length`, if any.
pub(crate) fn content_length(h: &http::HeaderMap, scan: headers::FieldScan) -> Option<u64> {
    if !scan.has(headers::FieldScan::CONTENT_LENGTH) {
        return None;
    }
    h.get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Rewrites a request head for the upstream: URI, hop-by-hop and forwarding headers, `Host`,
/// coatcheck's own cookies removed, the browser's `Authorization` replaced by the injected one.
pub(crate) fn rewrite(
    upstream: &Upstream,
    route: &Route,
    parts: &mut http::request::Parts,
    fwd: &Forward<'_>,
    upgrade: bool,
) -> Result<(), Error> {
    // The client's host: `Host` (HTTP/1.1) or the `:authority` of the request URI (HTTP/2), taken
    // before the URI is rewritten to the upstream's.
    let original_host = parts.headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    parts.uri = upstream
        .uri(&parts.uri, fwd.path)
        .map_err(|e| Error::BadRequest(format!("cannot build the upstream URI: {e}")))?;
    // The pooled client picks HTTP/1.1 or HTTP/2 per connection; an HTTP/2 request version would be
    // refused on an HTTP/1.1 connection (see ../shared/CRATES.md).
    parts.version = Version::HTTP_11;
    let h = &mut parts.headers;
    // Without any hop-by-hop field there is nothing to strip (and no upgrade to keep).
    if fwd.scan.has(headers::FieldScan::HOP_BY_HOP) {
        headers::strip_hop_by_hop(h, upgrade);
    }
    headers::add_forwarding(
        h,
        fwd.client,
        fwd.peer_trusted,
        original_host.as_ref(),
        fwd.prefix,
    );
    h.insert(headers::X_REQUEST_ID.clone(), fwd.request_id.clone());
    match original_host {
        Some(host) if route.preserve_host => h.insert(header::HOST, host),
        _ => h.insert(header::HOST, upstream.host.clone()),
    };
    if let Some(base) = fwd.own_cookie
        && fwd.scan.has(headers::FieldScan::COOKIE)
    {
        headers::remove_cookies(h, |name| headers::is_own_cookie(base, name));
    }
    // On a session or machine-token route the browser never chooses the upstream credential:
    // whatever it sent is replaced (`insert` drops every earlier value) or removed. Public routes
    // pass the client's own header.
    match &fwd.authorization {
        Some(auth) => {
            h.insert(header::AUTHORIZATION, auth.clone());
        }
        None if matches!(
            route.auth,
            AuthMode::Required | AuthMode::Optional | AuthMode::Client
        ) =>
        {
            h.remove(header::AUTHORIZATION);
        }
        None => {}
    }
    Ok(())
}

/// Sends a prepared request and turns the upstream's answer (or failure) into ours.
///
/// The request is handed to the upstream connection when this is called, not when the future is
/// first polled: the future then holds only what the answer needs. As an `async fn` it would hold
/// the request twice (an argument and its local copy, about 350 bytes each) for its whole life,
/// and every future above it on the request path would carry and move those bytes.
pub(crate) fn send<'a>(
    upstream: &'a Upstream,
    route: &'a Route,
    mut req: Request<UpstreamBody>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    fwd: &'a Forward<'_>,
) -> impl Future<Output = Result<Response<Body>, Error>> + 'a {
    let tracestate = fwd.scan.has(headers::FieldScan::TRACESTATE);
    let span = crate::trace::upstream(req.headers_mut(), &upstream.host, tracestate);
    let (response, progress) = upstream.send(req, client_upgrade.is_some());
    let sent = Sent {
        response,
        progress,
        span,
        client_upgrade,
    };
    answer(upstream, route, sent, fwd)
}

/// A request handed to the upstream connection, and what its answer needs.
struct Sent<'a> {
    response: crate::upstream::Sending<'a>,
    /// When the request body last moved (the deadline counts from there).
    progress: Progress,
    span: crate::trace::ChildSpan,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
}

/// The second half of [`send`]: waits for the upstream's answer (within the route's deadline) and
/// turns it, or the failure, into ours.
async fn answer(
    upstream: &Upstream,
    route: &Route,
    sent: Sent<'_>,
    fwd: &Forward<'_>,
) -> Result<Response<Body>, Error> {
    let Sent {
        response,
        progress,
        mut span,
        client_upgrade,
    } = sent;
    let slot = fwd.slot;
    // Biased: the answer is polled first, and no random branch order is drawn on every poll (an
    // answer and an expired deadline in the same poll are rare, and the answer may win).
    let mut res = tokio::select! {
        biased;
        r = response => r.map_err(|e| {
            let e = classify(e, route);
            span.fail(e.code());
            e
        })?,
        () = deadline(&progress, route.timeout, slot.deadline.as_deref()) => {
            span.fail("gateway_timeout");
            return Err(Error::GatewayTimeout(route.timeout));
        }
    };
    span.set(
        "http.response.status_code",
        i64::from(res.status().as_u16()),
    );
    if res.status().is_server_error() {
        span.fail("upstream_error");
    }
    drop(span);
    let upgraded = res.status() == StatusCode::SWITCHING_PROTOCOLS;
    if upgraded {
        let Some(client_upgrade) = client_upgrade else {
            return Err(Error::BadGateway(
                "upstream switched protocols without being asked".into(),
            ));
        };
        // Only a checked WebSocket may become a raw tunnel.
        if !headers::is_websocket_switch(res.headers()) {
            return Err(Error::BadGateway(
                "upstream switched to a protocol other than websocket".into(),
            ));
        }
        let upstream_upgrade = hyper::upgrade::on(&mut res);
        tokio::spawn(tunnel(client_upgrade, upstream_upgrade, slot.clone()));
    }
    let scan = headers::FieldScan::of(res.headers());
    if scan.has(headers::FieldScan::HOP_BY_HOP) {
        headers::strip_hop_by_hop(res.headers_mut(), upgraded);
    }
    if let Some(base) = fwd.own_cookie
        && scan.has(headers::FieldScan::SET_COOKIE)
    {
        let removed = headers::strip_own_set_cookies(res.headers_mut(), base);
        if !removed.is_empty() {
            tracing::warn!(upstream = %upstream.name, cookies = ?removed, "dropped upstream Set-Cookie naming coatcheck's own cookies");
        }
    }
    // The answer's `X-Request-Id` is the router's to set (`Router::finish`), on every answer.
    Ok(res.map(|b| Either::Left(Stalling::new(b, Side::Upstream, fwd.body_idle))))
}

/// Splices an upgraded client connection and upstream connection together until either side
/// closes or the shutdown grace ends; the client connection's slot is held meanwhile.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    slot: ConnectionSlot,
) {
    let closing = slot.closing.clone();
    match tokio::try_join!(client, upstream) {
        Ok((client, upstream)) => {
            let _open = crate::metrics::Open::new(&slot.tunnels_open);
            let mut client = TokioIo::new(client);
            let mut upstream = TokioIo::new(upstream);
            tokio::select! {
                r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "upgraded connection ended");
                    }
                }
                () = closing.cancelled() => tracing::debug!("upgraded connection closed at shutdown"),
            }
        }
        Err(e) => tracing::debug!(error = %e, "upgrade did not complete"),
    }
    drop(slot);
}

/// Resolves once the upstream has had `timeout` since the request body last moved (since the
/// request was sent, for a request without a body): an upload is not counted against the
/// upstream, but neither may it stall for longer than `timeout`.
async fn deadline(progress: &Progress, timeout: Duration, shared: Option<&ConnectionDeadline>) {
    loop {
        let due = progress.last() + timeout;
        match shared {
            Some(timer) => timer.until(due).await,
            None => tokio::time::sleep_until(due.into()).await,
        }
        if Instant::now() >= progress.last() + timeout {
            return;
        }
    }
}

/// Which side broke the exchange. Failures of the client's own request body (the size limit, a
/// malformed chunked framing, a stall) surface here as errors of the upstream call, but they are
/// the client's: 413, 400 or 408, never a 502 that blames the upstream. Every other failure,
/// connecting (refused, timed out, TLS) or on the connection (closed, malformed answer), is a 502.
fn classify(e: UpstreamError, route: &Route) -> Error {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return Error::PayloadTooLarge {
                limit: route.max_body_bytes,
            };
        }
        if let Some(b) = s.downcast_ref::<BodyError>()
            && b.side() == Side::Client
        {
            return client_body_error(b);
        }
        source = s.source();
    }
    Error::BadGateway(BoxError::from(e))
}

/// The answer to a client body that failed while coatcheck read it.
pub(crate) fn client_body_error(e: &BodyError) -> Error {
    match e {
        BodyError::Stalled { idle, .. } => Error::RequestTimeout(*idle),
        BodyError::Read { .. } => Error::BadRequest(
            "the request body is malformed (invalid chunked framing) or was cut off".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(fields: &[(&str, &[u8], bool)]) -> http::request::Parts {
        let mut req = Request::new(());
        *req.method_mut() = http::Method::PUT;
        *req.uri_mut() = "http://up.test/a/b?c=d".parse().unwrap();
        for (name, value, sensitive) in fields {
            let mut v = HeaderValue::from_bytes(value).unwrap();
            v.set_sensitive(*sensitive);
            req.headers_mut()
                .append(http::HeaderName::from_bytes(name.as_bytes()).unwrap(), v);
        }
        req.into_parts().0
    }

    /// Each field name with its values (bytes, sensitive) in order: what a request means, whatever
    /// order the map keeps its names in.
    fn fields(h: &http::HeaderMap) -> std::collections::BTreeMap<String, Vec<(Vec<u8>, bool)>> {
        let mut out = std::collections::BTreeMap::<_, Vec<_>>::new();
        for (n, v) in h {
            out.entry(n.to_string())
                .or_default()
                .push((v.as_bytes().to_vec(), v.is_sensitive()));
        }
        out
    }

    #[tokio::test]
    async fn a_replay_sends_the_kept_head_and_body_with_the_new_authorization() {
        let parts = head(&[
            ("host", b"up.test", false),
            ("authorization", b"Bearer old", true),
            ("x-multi", b"one", false),
            ("cookie", b"app=1; b=2", true),
            ("x-multi", b"two: with colon\tand tab \xe9", false),
            ("x-empty", b"", false),
        ]);
        let kept = ReplayHead::keep(&parts);
        let mut expected = parts.headers.clone();
        expected.remove(header::AUTHORIZATION);
        let mut new = HeaderValue::from_static("Bearer new");
        new.set_sensitive(true);
        expected.insert(header::AUTHORIZATION, new.clone());

        let req = kept.request(new, Bytes::from_static(b"body")).unwrap();
        assert_eq!(req.method(), http::Method::PUT);
        assert_eq!(req.uri(), &parts.uri);
        assert_eq!(req.version(), parts.version);
        assert_eq!(fields(req.headers()), fields(&expected));
        let body = req.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"body");
    }

    proptest::proptest! {
        #[test]
        fn any_valid_field_survives_being_kept(
            name in "[a-z0-9!#$%&'*+.^_`|~-]{1,20}",
            value in proptest::collection::vec(
                proptest::prop_oneof![Just(b'\t'), 0x20u8..0x7f, 0x80u8..=0xff],
                0..64,
            ),
            sensitive: bool,
        ) {
            let parts = head(&[(&name, &value, sensitive)]);
            let req = ReplayHead::keep(&parts)
                .request(HeaderValue::from_static("Bearer x"), Bytes::new())
                .unwrap();
            let mut kept = fields(req.headers());
            let mut sent = fields(&parts.headers);
            kept.remove("authorization");
            sent.remove("authorization");
            proptest::prop_assert_eq!(kept, sent);
        }
    }

    use proptest::strategy::Just;
}
