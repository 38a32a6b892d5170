//! The router: one request in, one response out. It screens the request (Host, method, header
//! names, forwarding headers), normalizes the path, answers coatcheck's own endpoints, picks the
//! route (longest prefix), applies the route's policy through `auth`, hands the request to
//! `proxy`, and is the one place that turns an [`Error`] into a response.
//!
//! - `ratelimit`: per-client-address token buckets for `/bff/login` and `/bff/callback`.

pub(crate) mod ratelimit;

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version, header};
use hyper::body::Incoming;
use serde_json::json;

use crate::auth::{self, Auth};
use crate::body::{self, Body};
use crate::config::{AuthMode, Cidr, Config, Route, UnderscoreHeaders};
use crate::error::Error;
use crate::metrics::{BFF_ROUTE, Metrics, NO_ROUTE};
use crate::proxy::{self, ConnectionSlot, headers};
use crate::telemetry::{AccessLog, AccessRecord, LogPath, Logged};
use crate::tls::TlsError;
use crate::trace;
use crate::upstream::Upstream;

/// One route with its upstream client.
pub(crate) struct RouteEntry {
    pub(crate) config: Route,
    /// The route's normalized prefix (no trailing slash, "" for the root).
    prefix: String,
    /// Number of path segments in `prefix` (for `strip_prefix`).
    prefix_segments: usize,
    pub(crate) name: Arc<str>,
    pub(crate) upstream: Upstream,
    /// Index of the route's metric handles ([`Metrics::route_index`]).
    metric: usize,
}

impl RouteEntry {
    /// The path sent upstream: with the route's prefix stripped when `strip_prefix` is set.
    fn forward_path<'p>(&self, path: &'p NormalizedPath<'_>) -> &'p str {
        if self.config.strip_prefix {
            strip_segments(&path.raw, self.prefix_segments)
        } else {
            &path.raw
        }
    }
}

/// The request router.
pub(crate) struct Router {
    routes: Vec<RouteEntry>,
    max_header_bytes: usize,
    auth: Option<Arc<Auth>>,
    trusted_proxies: Vec<Cidr>,
    underscore_headers: UnderscoreHeaders,
    hsts: Option<HeaderValue>,
    body_idle: Duration,
    /// Shared by the routers of successive reloads: a reload does not refill anyone's bucket.
    login_limit: Arc<ratelimit::RateLimiter>,
    metrics: Arc<Metrics>,
    /// Metric indexes of the `/bff/` and `-` (no route) labels.
    bff_metric: usize,
    no_route_metric: usize,
}

/// Methods refused on every route (405): `TRACE`/`TRACK` echo the request (cookies included) back
/// to a script, and `CONNECT` would open a tunnel to anywhere.
const REFUSED_METHODS: [&str; 3] = ["TRACE", "TRACK", "CONNECT"];
/// `Allow` for a refused method (a route's `methods` allowlist may narrow it further).
const DEFAULT_ALLOW: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";
static X_CONTENT_TYPE_OPTIONS: HeaderName = HeaderName::from_static("x-content-type-options");

impl Router {
    /// Builds the route table (longest prefix first) and the upstream clients.
    pub(crate) fn new(
        config: &Config,
        auth: Option<Arc<Auth>>,
        metrics: Arc<Metrics>,
    ) -> Result<Router, TlsError> {
        let mut routes = Vec::with_capacity(config.routes.len());
        for r in &config.routes {
            let prefix = r.path.trim_end_matches('/').to_owned();
            routes.push(RouteEntry {
                prefix_segments: prefix.matches('/').count(),
                prefix,
                name: Arc::from(r.path.as_str()),
                upstream: Upstream::new(&r.upstream, r.ca.as_deref(), "route.ca")?,
                metric: metrics.route_index(&r.path),
                config: r.clone(),
            });
        }
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        Ok(Router {
            routes,
            max_header_bytes: config.server.limits.max_header_bytes,
            auth,
            trusted_proxies: config.server.trusted_proxies.clone(),
            underscore_headers: config.server.underscore_headers,
            hsts: config.server.hsts.clone(),
            body_idle: config.server.limits.body_idle_timeout,
            login_limit: Arc::new(ratelimit::RateLimiter::per_minute(
                config.server.limits.login_requests_per_minute,
            )),
            bff_metric: metrics.route_index(BFF_ROUTE),
            no_route_metric: metrics.route_index(NO_ROUTE),
            metrics,
        })
    }

    /// This router with the login rate limiter of `running` (whose limit a reload keeps: it is
    /// one of `server.limits`), so the buckets carry over.
    pub(crate) fn keeping_login_limit_of(mut self, running: &Router) -> Router {
        self.login_limit = running.login_limit.clone();
        self
    }

    /// Whether `peer` is one of `server.trusted_proxies` (it speaks for many clients).
    pub(crate) fn is_trusted_proxy(&self, peer: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|c| c.contains(peer))
    }

    /// Whether every configured piece is ready (identity provider metadata, session store).
    pub(crate) async fn ready(&self) -> Result<(), String> {
        match &self.auth {
            Some(a) => a.ready().await,
            None => Ok(()),
        }
    }

    /// The answer of `/readyz` (here and on the admin listener): 200, or 503 with the reason, which
    /// may name internal URLs, in the log and not in the answer.
    pub(crate) async fn readiness(&self) -> Response<Body> {
        match self.ready().await {
            Ok(()) => body::json(StatusCode::OK, &json!({"status": "ready"})),
            Err(why) => {
                tracing::warn!(reason = %why, "not ready");
                body::json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({"status": "not_ready", "message": "a dependency is not ready yet"}),
                )
            }
        }
    }

    /// Handles one request from `peer`. Never fails: errors become JSON answers (DESIGN §5).
    /// `slot` is the client connection's ([`ConnectionSlot`]: its deadline timer on HTTP/1.1,
    /// what an upgraded tunnel holds, the handle memo).
    ///
    /// An `async` block rather than an `async fn`, as [`Router::handle_inner`]: an `async fn` keeps
    /// the request twice (the argument and the local it is moved into), and this future is the
    /// whole request's, moved into the listener's box once per request.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn would keep the request twice (see above)"
    )]
    pub(crate) fn handle(
        &self,
        req: Request<Incoming>,
        peer: IpAddr,
        slot: Arc<ConnectionSlot>,
    ) -> impl Future<Output = Response<Logged<Body>>> + '_ {
        async move {
            let scan = headers::FieldScan::of(req.headers());
            let client = headers::client_ip(req.headers(), peer, &self.trusted_proxies);
            let request_id = headers::request_id(req.headers(), scan);
            let http1 = req.version() <= Version::HTTP_11;
            let (hop, span) = trace::start(
                req.headers(),
                &trace::RequestInfo {
                    method: req.method(),
                    version: req.version(),
                    uri: req.uri(),
                    request_id: &request_id,
                    traceparent: scan.has(headers::FieldScan::TRACEPARENT),
                },
            );
            let mut record = Box::new(AccessRecord {
                start: Instant::now(),
                method: req.method().clone(),
                path: LogPath::new(req.uri().path()),
                status: 0,
                route: None,
                route_metric: self.no_route_metric,
                upstream: None,
                request_id: request_id.clone(),
                client,
                error: None,
                span,
            });
            let inner = self.handle_inner(
                req,
                Arrival { peer, client, scan },
                &request_id,
                &slot,
                &mut record,
            );
            let res = match trace::scope(hop, inner).await {
                Ok(res) => res,
                Err(e) => self.fail(&e, &mut record),
            };
            self.finish(res, record, http1)
        }
    }

    /// The answer to a request whose header block exceeded `max_header_bytes` before it could be
    /// parsed (the listener stopped reading it): the same JSON 431 the router gives below hyper's
    /// ceiling, so every size gets one answer.
    pub(crate) fn refuse_oversized_head(&self, peer: IpAddr) -> Response<Logged<Body>> {
        let request_id = headers::request_id(&http::HeaderMap::new(), headers::FieldScan::UNKNOWN);
        let mut record = Box::new(AccessRecord {
            start: Instant::now(),
            method: Method::GET,
            path: LogPath::Note("(header block over the limit)"),
            status: 0,
            route: None,
            route_metric: self.no_route_metric,
            upstream: None,
            request_id,
            client: peer,
            error: None,
            span: trace::ServerSpan::default(),
        });
        let e = Error::HeadersTooLarge {
            limit: self.max_header_bytes,
        };
        let mut res = self.fail(&e, &mut record);
        res.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        self.finish(res, record, true)
    }

    /// Logs a failure once and turns it into coatcheck's JSON answer.
    fn fail(&self, e: &Error, record: &mut AccessRecord) -> Response<Body> {
        record.error = Some(e.code());
        let request_id = &record.request_id;
        if e.is_client_error() {
            tracing::debug!(error = %e, request_id = ?request_id, "request refused");
        } else {
            tracing::warn!(error = %e, source = ?std::error::Error::source(e), request_id = ?request_id, "request failed");
        }
        error_response(e, self.auth.as_deref())
    }

    /// Headers every answer gets (request id, HSTS, `nosniff` on coatcheck's own), then the access
    /// log around the body.
    fn finish(
        &self,
        mut res: Response<Body>,
        mut record: Box<AccessRecord>,
        http1: bool,
    ) -> Response<Logged<Body>> {
        let own_answer = matches!(res.body(), http_body_util::Either::Right(_));
        let bad_request = res.status() == StatusCode::BAD_REQUEST;
        let h = res.headers_mut();
        // Never indexed by HPACK (RFC 7541 §7.1.3): the id is new on every answer, so an HTTP/2
        // dynamic-table entry for it would never be used again; it would only cost the encoder a
        // table insert and a walk of the ids already held on every response, and push out the
        // entries that do repeat (content-type, HSTS). HTTP/1.1 ignores the flag.
        let mut id = record.request_id.clone();
        id.set_sensitive(true);
        h.insert(headers::X_REQUEST_ID.clone(), id);
        // The edge owns transport security: coatcheck's HSTS replaces an upstream's.
        if let Some(hsts) = &self.hsts {
            h.insert(header::STRICT_TRANSPORT_SECURITY, hsts.clone());
        }
        if own_answer {
            h.insert(
                X_CONTENT_TYPE_OPTIONS.clone(),
                HeaderValue::from_static("nosniff"),
            );
        }
        // After a malformed request the HTTP/1.1 byte stream cannot be trusted to frame the next
        // one: close it (RFC 9112 §6.3, as nginx does).
        if http1 && bad_request {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        record.status = res.status().as_u16();
        // Time to the response head: a long stream (SSE, download) or a tunnel does not skew it.
        self.metrics
            .request(record.route_metric, record.status, record.start.elapsed());
        if res.status() == StatusCode::SWITCHING_PROTOCOLS {
            self.metrics.upgrades_total.inc();
        }
        res.map(|b| Logged::new(b, AccessLog::new(record)))
    }

    /// The phases of one request, in order: the request filter, coatcheck's own endpoints, route
    /// selection, then the upstream phase (the route's policy through `auth`, the forward through
    /// `proxy`).
    ///
    /// An `async` block rather than an `async fn`: an `async fn` keeps each argument twice (the
    /// argument and the local it is moved into), and this future is moved with the request's.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn would keep the request twice (see above)"
    )]
    fn handle_inner<'a>(
        &'a self,
        mut req: Request<Incoming>,
        arrival: Arrival,
        request_id: &'a HeaderValue,
        slot: &'a ConnectionSlot,
        record: &'a mut AccessRecord,
    ) -> impl Future<Output = Result<Response<Body>, Error>> + 'a {
        async move {
            let Arrival { peer, client, scan } = arrival;
            // A Uri clone shares its bytes; it lets the path outlive the request handed on below.
            let uri = req.uri().clone();
            let path = self.request_filter(&mut req, &uri, scan)?;
            if let Some(res) = self.own_endpoint(&path).await {
                return Ok(res);
            }
            if let Some(auth) = &self.auth
                && auth::is_bff_path(&path.matched)
            {
                return self.serve_bff(auth, req, &path, client, record).await;
            }
            let entry = self.select_route(&req, &path, record)?;
            let mut fwd = proxy::Forward {
                path: entry.forward_path(&path),
                client: peer,
                peer_trusted: self.is_trusted_proxy(peer),
                prefix: entry.config.strip_prefix.then_some(entry.prefix.as_str()),
                body_idle: self.body_idle,
                request_id,
                authorization: None,
                own_cookie: self.auth.as_ref().map(|a| a.cookie_name()),
                slot,
                scan,
            };
            self.upstream_phase(entry, req, &path, &mut fwd).await
        }
    }

    /// The request filter ([`Router::screen`]), the header block's size, and the normalized path
    /// (an encoded separator is refused on coatcheck's own endpoints).
    fn request_filter<'u>(
        &self,
        req: &mut Request<Incoming>,
        uri: &'u http::Uri,
        scan: headers::FieldScan,
    ) -> Result<NormalizedPath<'u>, Error> {
        let size = head_bytes(req, scan);
        if size > self.max_header_bytes {
            return Err(Error::HeadersTooLarge {
                limit: self.max_header_bytes,
            });
        }
        self.screen(req, scan)?;
        let path = NormalizedPath::parse(uri.path())?;
        if path.separator && self.is_own_path(&path.matched) {
            return Err(encoded_separator());
        }
        Ok(path)
    }

    /// Whether coatcheck answers `path` itself: `/healthz`, `/readyz`, and `/bff/*` with `[oidc]`.
    fn is_own_path(&self, path: &str) -> bool {
        matches!(path, "/healthz" | "/readyz") || (self.auth.is_some() && auth::is_bff_path(path))
    }

    /// `/healthz` and `/readyz`, answered by coatcheck itself.
    async fn own_endpoint(&self, path: &NormalizedPath<'_>) -> Option<Response<Body>> {
        match path.matched.as_ref() {
            "/healthz" => Some(body::json(StatusCode::OK, &json!({"status": "ok"}))),
            // Boxed: a rare answer whose future would otherwise be part of every request's.
            "/readyz" => Some(Box::pin(self.readiness()).await),
            _ => None,
        }
    }

    /// coatcheck's `/bff/*` endpoints (login, callback, logout, session, ...). Boxed: their
    /// futures are large and rare; inline, every proxied request's future would carry them.
    async fn serve_bff(
        &self,
        auth: &Auth,
        req: Request<Incoming>,
        path: &NormalizedPath<'_>,
        client: IpAddr,
        record: &mut AccessRecord,
    ) -> Result<Response<Body>, Error> {
        record.route = Some(Arc::from(BFF_ROUTE));
        record.route_metric = self.bff_metric;
        record.span.set_route(req.method(), BFF_ROUTE, "bff");
        if matches!(path.matched.as_ref(), "/bff/login" | "/bff/callback") {
            self.login_limit.check(client)?;
        }
        // The one /bff/* endpoint that reads a request body: the whole exchange (body read
        // included) gets `body_idle_timeout`, so a provider-side peer trickling its logout
        // request cannot hold a slot.
        if path.matched == "/bff/backchannel-logout" {
            return Box::pin(tokio::time::timeout(
                self.body_idle,
                auth.handle_bff(req, &path.matched),
            ))
            .await
            .unwrap_or(Err(Error::RequestTimeout(self.body_idle)));
        }
        Box::pin(auth.handle_bff(req, &path.matched)).await
    }

    /// The route for `path` (404 without one), recorded for the access log, metrics and trace, and
    /// its per-route checks: encoded separators, the `methods` allowlist.
    fn select_route(
        &self,
        req: &Request<Incoming>,
        path: &NormalizedPath<'_>,
        record: &mut AccessRecord,
    ) -> Result<&RouteEntry, Error> {
        let entry = self.route_for(&path.matched).ok_or(Error::NotFound)?;
        record.route = Some(entry.name.clone());
        record.route_metric = entry.metric;
        record.upstream = Some(entry.upstream.name.clone());
        let route = &entry.config;
        record
            .span
            .set_route(req.method(), &entry.name, auth_label(route.auth));
        if path.separator && !route.allow_encoded_slashes {
            return Err(encoded_separator());
        }
        if let Some(methods) = &route.methods
            && !methods.contains(req.method())
        {
            let allow = methods
                .iter()
                .map(Method::as_str)
                .collect::<Vec<_>>()
                .join(", ");
            return Err(Error::MethodNotAllowed { allow });
        }
        Ok(entry)
    }

    /// The route's policy, then the forward: a public route goes straight to `proxy`; the others
    /// through `auth` (session or machine token, and the capture of an API's own login).
    ///
    /// Decided when called, like the phases below it: the future is the forward's own, not one
    /// that holds the request a second time around it.
    fn upstream_phase<'a>(
        &'a self,
        entry: &'a RouteEntry,
        req: Request<Incoming>,
        path: &NormalizedPath<'_>,
        fwd: &'a mut proxy::Forward<'_>,
    ) -> impl Future<Output = Result<Response<Body>, Error>> + 'a {
        use tokio_util::either::Either;
        let refuse = |e| Either::Left(Either::Left(std::future::ready(Err(e))));
        let route = &entry.config;
        if let Some(auth) = &self.auth
            && let Some(capture) = auth.capture()
        {
            // The API's refresh endpoint is coatcheck's alone: its answers hold tokens.
            if capture.is_refresh_endpoint(route, fwd.path) {
                return refuse(Error::Forbidden(
                    "coatcheck refreshes this session's tokens itself".into(),
                ));
            }
            if req.method() == Method::POST && path.matched.as_ref() == capture.login_path() {
                // Boxed: the login's future is large and rare; inline, every request would carry it.
                let login = auth.capture_login(&entry.upstream, route, req, fwd);
                return Either::Left(Either::Right(Box::pin(login)));
            }
        }
        match (route.auth, &self.auth) {
            (AuthMode::None, _) => Either::Right(Either::Left(proxy::forward(
                &entry.upstream,
                route,
                req,
                fwd,
                proxy::Plain,
            ))),
            (_, Some(auth)) => Either::Right(Either::Right(auth.forward(
                &entry.upstream,
                route,
                req,
                fwd,
            ))),
            // Config validation makes this unreachable; fail closed all the same.
            (_, None) => refuse(Error::Internal(
                "route needs authentication but no [oidc] is configured".into(),
            )),
        }
    }

    /// The request filter every request passes before routing (RFC 9110/9112/9113 field rules):
    /// one valid `Host` without userinfo, no `TRACE`/`TRACK`/`CONNECT`, no method-override
    /// headers, no header names with `_` (dropped, or refused with `underscore_headers = "refuse"`).
    fn screen(&self, req: &mut Request<Incoming>, scan: headers::FieldScan) -> Result<(), Error> {
        check_host(req)?;
        if REFUSED_METHODS.contains(&req.method().as_str()) {
            return Err(Error::MethodNotAllowed {
                allow: DEFAULT_ALLOW.into(),
            });
        }
        let h = req.headers_mut();
        if scan.has(headers::FieldScan::METHOD_OVERRIDE) {
            headers::strip_method_overrides(h);
        }
        if scan.has(headers::FieldScan::UNDERSCORE) {
            match self.underscore_headers {
                UnderscoreHeaders::Drop => headers::strip_underscore_names(h),
                UnderscoreHeaders::Refuse => {
                    return Err(Error::BadRequest(
                        "header names must not contain underscores".into(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The route whose prefix is the longest one matching `path` on a segment boundary.
    fn route_for(&self, path: &str) -> Option<&RouteEntry> {
        self.routes.iter().find(|r| prefix_matches(&r.prefix, path))
    }
}

/// Who sent a request, and what its head holds.
#[derive(Clone, Copy)]
struct Arrival {
    /// The connection's peer.
    peer: IpAddr,
    /// The client: the peer, or the address a trusted proxy forwarded for.
    client: IpAddr,
    scan: headers::FieldScan,
}

/// `coatcheck.auth` of a request's span: the route's auth mode as configured.
fn auth_label(mode: AuthMode) -> &'static str {
    match mode {
        AuthMode::Required => "required",
        AuthMode::Optional => "optional",
        AuthMode::None => "none",
        AuthMode::Bearer => "bearer",
        AuthMode::Client => "client",
    }
}

fn encoded_separator() -> Error {
    Error::BadRequest("the path contains an encoded slash or backslash".into())
}

/// RFC 9112 §3.2: an HTTP/1.1 request has exactly one `Host`; RFC 9110 §4.2.4: no userinfo in
/// an authority; RFC 9113 §8.3.1: an HTTP/2 `Host` must name the same authority as `:authority`.
fn check_host<B>(req: &Request<B>) -> Result<(), Error> {
    let bad = |why: &str| Err(Error::BadRequest(why.into()));
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return bad("the request has more than one Host header");
    }
    if host.is_none() && req.version() == Version::HTTP_11 {
        return bad("an HTTP/1.1 request needs a Host header");
    }
    if let Some(h) = host {
        let ok = h.is_empty() || is_host_without_userinfo(h.as_bytes());
        if !ok {
            return bad("the Host header is not a valid host[:port]");
        }
    }
    if let Some(a) = req.uri().authority() {
        if a.as_str().contains('@') {
            return bad("the request target must not carry userinfo");
        }
        if req.version() == Version::HTTP_2
            && let Some(h) = host
            && !h.as_bytes().eq_ignore_ascii_case(a.as_str().as_bytes())
        {
            return bad("Host and :authority name different hosts");
        }
    }
    Ok(())
}

/// `host[:port]` with a reg-name, IPv4 or bracketed IPv6 host, and no userinfo. The common form
/// ([`is_plain_host_port`]) is accepted without `http`'s authority parser, which copies the bytes
/// into a new allocation on every request.
fn is_host_without_userinfo(h: &[u8]) -> bool {
    is_plain_host_port(h) || is_host_without_userinfo_parsed(h)
}

/// A DNS name or IPv4 address (letters, digits, `.` and `-`), then optionally `:` and one to five
/// digits: a subset of what [`is_host_without_userinfo_parsed`] accepts.
fn is_plain_host_port(h: &[u8]) -> bool {
    let (host, port) = match memchr::memchr(b':', h) {
        Some(i) => (&h[..i], Some(&h[i + 1..])),
        None => (h, None),
    };
    !host.is_empty()
        && h.len() <= 255
        && host
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        && port.is_none_or(|p| (1..=5).contains(&p.len()) && p.iter().all(u8::is_ascii_digit))
}

fn is_host_without_userinfo_parsed(h: &[u8]) -> bool {
    !h.contains(&b'@')
        && h.len() <= 255
        && http::uri::Authority::try_from(h).is_ok()
        && h.iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"-._~:[]!$&'()*+,;=%".contains(&b))
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix.is_empty()
        || (path.starts_with(prefix)
            && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/')))
}

/// `path` without its first `n` segments ("/api/users", 1 → "/users"; "/api", 1 → "/").
fn strip_segments(path: &str, n: usize) -> &str {
    if n == 0 {
        return path;
    }
    match path.match_indices('/').nth(n) {
        Some((i, _)) => &path[i..],
        None => "/",
    }
}

/// Size of the request line and headers as they would be on an HTTP/1.1 wire.
fn head_bytes<B>(req: &Request<B>, scan: headers::FieldScan) -> usize {
    let line = req.method().as_str().len()
        + req.uri().path_and_query().map_or(1, |p| p.as_str().len())
        + 12;
    line + scan.bytes
}

/// Turns an error into coatcheck's JSON answer (DESIGN §5); the admin listener's too.
pub(crate) fn error_response(e: &Error, auth: Option<&Auth>) -> Response<Body> {
    let mut value = json!({"error": e.code(), "message": e.public_message()});
    match e {
        Error::Unauthenticated { login_url } | Error::SessionExpired { login_url, .. } => {
            value["login_url"] = json!(login_url);
        }
        _ => {}
    }
    let mut res = body::json(e.status(), &value);
    let h = res.headers_mut();
    match e {
        Error::MethodNotAllowed { allow } => {
            if let Ok(v) = HeaderValue::from_str(allow) {
                h.insert(header::ALLOW, v);
            }
        }
        Error::IdpUnavailable { retry_after, .. } | Error::TooManyRequests { retry_after } => {
            h.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
        }
        Error::StoreUnavailable(_) => {
            h.insert(
                header::RETRY_AFTER,
                HeaderValue::from(crate::session::STORE_RETRY_AFTER_SECS),
            );
        }
        Error::SessionExpired {
            clear_cookie: true, ..
        } => {
            if let Some(auth) = auth {
                h.append(header::SET_COOKIE, auth.clear_session_cookie());
            }
        }
        Error::Unauthenticated { .. } | Error::AdminUnauthorized => {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        _ => {}
    }
    res
}

/// A request path after percent-decoding checks and dot-segment removal.
///
/// `matched` is what routes are matched against: segments percent-decoded, except that bytes which
/// would change the segment structure or are not text (`/`, `\`, `%`, controls, invalid UTF-8) stay
/// encoded. `raw` is what goes upstream: the client's own encoding, minus resolved dot segments.
/// Decoded `.`/`..` segments (`%2e%2e`) count as dot segments, so `/api/%2e%2e/admin` is `/admin`
/// everywhere; a segment hiding one behind an encoded slash (`..%2f`) is refused.
///
/// Repeated slashes are merged (`//api//x` is `/api/x`, as nginx's `merge_slashes` does) in both,
/// so no upstream can read a path as belonging to another route than coatcheck did. `separator`
/// records an encoded `/` or `\` (or a raw `\`): the router refuses those unless the route sets
/// `allow_encoded_slashes`, because upstreams disagree on whether `%2F` separates segments.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct NormalizedPath<'a> {
    pub(crate) matched: Cow<'a, str>,
    pub(crate) raw: Cow<'a, str>,
    pub(crate) separator: bool,
}

impl<'a> NormalizedPath<'a> {
    /// Normalizes `path` (the URI path, starting with `/`).
    pub(crate) fn parse(path: &'a str) -> Result<NormalizedPath<'a>, Error> {
        if !path.starts_with('/') {
            return Err(Error::BadRequest(
                "the request target must be an absolute path".into(),
            ));
        }
        if already_normal(path.as_bytes()) {
            return Ok(NormalizedPath {
                matched: Cow::Borrowed(path),
                raw: Cow::Borrowed(path),
                separator: false,
            });
        }
        Self::normalize(path)
    }

    /// The slow path of [`NormalizedPath::parse`]: decodes, resolves and joins the segments.
    fn normalize(path: &'a str) -> Result<NormalizedPath<'a>, Error> {
        let mut out: Vec<(&str, String)> = Vec::new();
        let segments: Vec<&str> = path[1..].split('/').collect();
        let last = segments.len() - 1;
        let mut trailing_slash = false;
        let mut separator = false;
        for (i, seg) in segments.iter().enumerate() {
            if seg.is_empty() {
                // `//` is one slash; a final empty segment is the trailing slash.
                if i == last {
                    trailing_slash = true;
                }
                continue;
            }
            let decoded = percent_decode(seg)?;
            match dot_segment(&decoded)? {
                Some(up) => {
                    if up && out.pop().is_none() {
                        return Err(Error::BadRequest("the path climbs above the root".into()));
                    }
                    if i == last {
                        trailing_slash = true;
                    }
                }
                None => {
                    separator |= check_separators(&decoded)?;
                    out.push((seg, matched_segment(&decoded)));
                }
            }
        }
        let (raw, matched) = join_segments(&out, trailing_slash, path.len());
        Ok(NormalizedPath {
            matched: Cow::Owned(matched),
            raw: Cow::Owned(raw),
            separator,
        })
    }
}

/// Whether `path` (which starts with `/`) is normal already: nothing percent-encoded, no `\` or
/// `;`, no empty segment but a final one (`//`), no `.` or `..` segment. One pass over the bytes
/// (nearly every path a proxy sees), where three searches each walked it.
fn already_normal(path: &[u8]) -> bool {
    let mut segment_start = 1;
    for (i, &b) in path.iter().enumerate().skip(1) {
        match b {
            b'%' | b'\\' | b';' => return false,
            b'/' => {
                if matches!(&path[segment_start..i], b"" | b"." | b"..") {
                    return false;
                }
                segment_start = i + 1;
            }
            _ => {}
        }
    }
    !matches!(&path[segment_start.min(path.len())..], b"." | b"..")
}

/// Whether a decoded segment is `.` (`Some(false)`) or `..` (`Some(true)`); refuses a NUL byte
/// and a dot segment hidden behind a path parameter (some servlet containers read `..;x` as `..`).
fn dot_segment(decoded: &[u8]) -> Result<Option<bool>, Error> {
    if decoded.contains(&0) {
        return Err(Error::BadRequest("the path contains a NUL byte".into()));
    }
    if decoded.starts_with(b"..;") || decoded.starts_with(b".;") {
        return Err(Error::BadRequest(
            "the path hides a dot segment behind a path parameter".into(),
        ));
    }
    Ok(match decoded {
        b"." => Some(false),
        b".." => Some(true),
        _ => None,
    })
}

/// Whether a decoded segment holds an encoded `/` or `\`; refuses one that hides a dot segment
/// behind it.
fn check_separators(decoded: &[u8]) -> Result<bool, Error> {
    let has_separator = decoded.iter().any(|&b| b == b'/' || b == b'\\');
    if has_separator
        && decoded
            .split(|&b| b == b'/' || b == b'\\')
            .any(|p| p == b"." || p == b"..")
    {
        return Err(Error::BadRequest(
            "the path hides a dot segment behind an encoded separator".into(),
        ));
    }
    Ok(has_separator)
}

/// The raw and the matched path of the kept segments (as sent, as decoded for matching).
fn join_segments(out: &[(&str, String)], trailing_slash: bool, len: usize) -> (String, String) {
    let mut raw = String::with_capacity(len);
    let mut matched = String::with_capacity(len);
    for (r, m) in out {
        raw.push('/');
        raw.push_str(r);
        matched.push('/');
        matched.push_str(m);
    }
    if out.is_empty() || trailing_slash {
        raw.push('/');
        matched.push('/');
    }
    (raw, matched)
}

fn percent_decode(seg: &str) -> Result<Vec<u8>, Error> {
    let b = seg.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = |c: u8| (c as char).to_digit(16);
            match (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) {
                (Some(h), Some(l)) => out.push((h * 16 + l) as u8),
                _ => {
                    return Err(Error::BadRequest(
                        "the path has an invalid percent-encoding".into(),
                    ));
                }
            }
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// A decoded segment for matching: text as text, structure-changing or non-text bytes re-encoded.
fn matched_segment(decoded: &[u8]) -> String {
    let text = String::from_utf8_lossy(decoded);
    if matches!(text, Cow::Owned(_)) {
        return decoded.iter().map(|b| format!("%{b:02X}")).collect();
    }
    let mut s = String::with_capacity(decoded.len());
    for c in text.chars() {
        if c == '/' || c == '\\' || c == '%' || c.is_control() {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                s.push_str(&format!("%{b:02X}"));
            }
        } else {
            s.push(c);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plain_host_fast_path_accepts_only_what_the_full_check_accepts() {
        let parts: [&[u8]; 14] = [
            b"a",
            b"localhost",
            b"127.0.0.1",
            b"-",
            b".",
            b"x.y-z",
            b":",
            b":0",
            b":8443",
            b":123456",
            b"[::1]",
            b"@",
            b"_",
            b"%41",
        ];
        let mut plain = 0;
        for a in parts {
            for b in parts {
                for c in parts {
                    let h = [a, b, c].concat();
                    if is_plain_host_port(&h) {
                        plain += 1;
                        assert!(
                            is_host_without_userinfo_parsed(&h),
                            "{}",
                            String::from_utf8_lossy(&h)
                        );
                    }
                }
            }
        }
        assert!(
            plain > 100,
            "the fast path takes the common forms ({plain})"
        );
        assert!(is_plain_host_port(b"localhost:8443") && is_plain_host_port(b"10.0.0.1"));
        for refused in [
            &b"a:"[..],
            b":80",
            b"a:123456",
            b"a:b",
            b"[::1]:80",
            b"u@h",
            b"a_b",
        ] {
            assert!(
                !is_plain_host_port(refused),
                "{}",
                String::from_utf8_lossy(refused)
            );
        }
        assert!(
            is_host_without_userinfo(b"[::1]:8443"),
            "the full check still runs"
        );
        assert!(!is_host_without_userinfo(b"user@host"));
    }

    fn norm(p: &str) -> Result<(String, String), u16> {
        NormalizedPath::parse(p)
            .map(|n| (n.matched.into_owned(), n.raw.into_owned()))
            .map_err(|e| e.status().as_u16())
    }

    #[test]
    fn plain_paths_are_taken_as_they_are() {
        assert_eq!(
            norm("/api/users/1").unwrap(),
            ("/api/users/1".into(), "/api/users/1".into())
        );
    }

    #[test]
    fn dot_segments_are_resolved_even_when_encoded() {
        assert_eq!(norm("/api/../admin").unwrap().0, "/admin");
        assert_eq!(
            norm("/api/%2e%2e/admin").unwrap(),
            ("/admin".into(), "/admin".into())
        );
        assert_eq!(norm("/api/%2E%2e/").unwrap().0, "/");
        assert_eq!(norm("/api/./x/.").unwrap().0, "/api/x/");
    }

    #[test]
    fn traversal_behind_encoded_separators_is_refused() {
        assert_eq!(norm("/api/..%2fadmin"), Err(400));
        assert_eq!(norm("/api/..%5cadmin"), Err(400));
        assert_eq!(norm("/api/%2e%2e%2fadmin"), Err(400));
        assert_eq!(norm("/.."), Err(400));
        assert_eq!(norm("/api/../../etc"), Err(400));
    }

    #[test]
    fn nul_and_invalid_encodings_are_refused() {
        assert_eq!(norm("/api/a%00b"), Err(400));
        assert_eq!(norm("/api/%zz"), Err(400));
        assert_eq!(norm("/api/%4"), Err(400));
    }

    #[test]
    fn encoded_slashes_stay_inside_their_segment() {
        let (m, r) = norm("/api/a%2Fb").unwrap();
        assert_eq!(m, "/api/a%2Fb");
        assert_eq!(r, "/api/a%2Fb");
        assert_eq!(
            norm("/ap%69/x").unwrap(),
            ("/api/x".into(), "/ap%69/x".into())
        );
    }

    #[test]
    fn prefixes_match_on_segment_boundaries() {
        assert!(prefix_matches("/api", "/api"));
        assert!(prefix_matches("/api", "/api/x"));
        assert!(!prefix_matches("/api", "/apix"));
        assert!(prefix_matches("", "/anything"));
    }

    #[test]
    fn strip_prefix_removes_whole_segments() {
        assert_eq!(strip_segments("/api/users?x", 1), "/users?x");
        assert_eq!(strip_segments("/api", 1), "/");
        assert_eq!(strip_segments("/a/b/c", 2), "/c");
        assert_eq!(strip_segments("/x", 0), "/x");
    }
}

#[cfg(test)]
mod properties {
    //! "A normalized path routes where the upstream's reading of it routes."
    use proptest::prelude::*;

    use super::*;

    /// Route prefixes as the router keeps them (normalized, no trailing slash).
    const PREFIXES: &[&str] = &["", "/api", "/api/public", "/admin", "/pub"];

    /// Longest-prefix choice, the rule `Router::route_for` applies.
    fn route(path: &str) -> Option<&'static str> {
        let mut sorted = PREFIXES.to_vec();
        sorted.sort_by_key(|p| std::cmp::Reverse(p.len()));
        sorted.into_iter().find(|p| prefix_matches(p, path))
    }

    /// How a typical upstream reads the path it receives: percent-decode once, `\` as `/`, merge
    /// slashes, remove dot segments (RFC 3986 §5.2.4).
    fn upstream_reading(raw: &str) -> String {
        let decoded: Vec<u8> = {
            let b = raw.as_bytes();
            let mut out = Vec::new();
            let mut i = 0;
            while i < b.len() {
                let hex = |c: u8| (c as char).to_digit(16);
                if b[i] == b'%'
                    && let (Some(h), Some(l)) = (
                        b.get(i + 1).copied().and_then(hex),
                        b.get(i + 2).copied().and_then(hex),
                    )
                {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                out.push(b[i]);
                i += 1;
            }
            out
        };
        let text = String::from_utf8_lossy(&decoded).replace('\\', "/");
        let mut out: Vec<&str> = Vec::new();
        let trailing = text.ends_with('/') || text.ends_with("/.") || text.ends_with("/..");
        for seg in text.split('/') {
            match seg {
                "" | "." => {}
                ".." => {
                    out.pop();
                }
                s => out.push(s),
            }
        }
        let mut p = format!("/{}", out.join("/"));
        if trailing && p != "/" {
            p.push('/');
        }
        p
    }

    fn segment() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "api", "admin", "public", "pub", "x", "bff", ".", "..", "%2e", "%2E%2e", ".%2e", "%2f",
            "%2F", "%5c", "%2561", "%61pi", "%61dmin", "a%2fb", "", "a;b", "..;", "\\", "api%2f..",
            "%00", "%zz", "%",
        ])
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn a_normalized_path_routes_where_the_upstreams_reading_of_it_routes(
            segs in prop::collection::vec(segment(), 0..8)
        ) {
            let path = format!("/{}", segs.join("/"));
            if let Ok(n) = NormalizedPath::parse(&path) {
                prop_assert!(n.raw.starts_with('/'));
                prop_assert!(!n.raw.contains("//"), "{path} -> {}", n.raw);
                // Encoded separators are refused unless a route opts in: nothing to compare.
                if !n.separator {
                    let ours = route(&n.matched);
                    let theirs = route(&upstream_reading(&n.raw));
                    prop_assert_eq!(ours, theirs, "{} -> matched {} raw {} read as {}",
                        path, n.matched, n.raw, upstream_reading(&n.raw));
                }
            }
        }

        #[test]
        fn normalizing_a_normalized_path_changes_nothing(
            segs in prop::collection::vec(segment(), 0..8)
        ) {
            let path = format!("/{}", segs.join("/"));
            if let Ok(n) = NormalizedPath::parse(&path) {
                let again = NormalizedPath::parse(&n.raw).expect("a normalized path parses");
                prop_assert_eq!(&again.raw, &n.raw);
                prop_assert_eq!(&again.matched, &n.matched);
            }
        }

        #[test]
        fn a_path_taken_as_normal_is_what_normalizing_it_gives(
            segs in prop::collection::vec(segment(), 0..8), trailing in any::<bool>()
        ) {
            let path = format!("/{}{}", segs.join("/"), if trailing { "/" } else { "" });
            if already_normal(path.as_bytes()) {
                let n = NormalizedPath::normalize(&path).expect("a normal path parses");
                prop_assert_eq!(&n.raw, &path);
                prop_assert_eq!(&n.matched, &path);
                prop_assert!(!n.separator);
            }
        }

        #[test]
        fn any_path_text_is_judged_without_panicking(path in "/[ -~]{0,40}") {
            let _ = NormalizedPath::parse(&path);
        }
    }
}
