//! Forwarding one request to its upstream and streaming the answer back.
//!
//! `proxy` receives the access token to inject as a ready `Authorization` value, never a session: it
//! cannot reach the store. Bodies stream both ways (no buffering); upgrades (WebSocket) are spliced
//! into a bidirectional byte tunnel once both sides said `101`.

pub mod headers;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{Either, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::body::{Body, UpstreamBody};
use crate::config::{AuthMode, Route};
use crate::error::{BoxError, Error};
use crate::upstream::{Progress, Upstream};

/// What the caller decided about the request before it leaves.
pub struct Forward<'a> {
    /// Path to request upstream (normalized, prefix stripped if configured), without the query.
    pub path: &'a str,
    /// The client's address, for `X-Forwarded-For`/`Forwarded`.
    pub client: IpAddr,
    /// The request id, sent upstream and echoed back.
    pub request_id: &'a HeaderValue,
    /// `Authorization` value to inject (`Bearer <access token>`), marked sensitive.
    pub authorization: Option<HeaderValue>,
    /// Name of coatcheck's session cookie: it and its login cookies never reach the upstream.
    pub own_cookie: Option<&'a str>,
}

/// Forwards `req` to `upstream` for `route`, streaming the body under the route's size limit.
pub async fn forward(
    upstream: &Upstream,
    route: &Route,
    req: Request<Incoming>,
    fwd: Forward<'_>,
) -> Result<Response<Body>, Error> {
    let (mut parts, body, client_upgrade) = split(route, req)?;
    rewrite(upstream, route, &mut parts, &fwd, client_upgrade.is_some())?;
    let body = Either::Left(Limited::new(body, route.max_body_bytes as usize));
    send(
        upstream,
        route,
        Request::from_parts(parts, body),
        client_upgrade,
    )
    .await
}

/// Splits a client request, refusing a declared body over the route's limit up front and taking
/// the upgrade handle of an HTTP/1.1 upgrade request.
pub fn split(
    route: &Route,
    mut req: Request<Incoming>,
) -> Result<
    (
        http::request::Parts,
        Incoming,
        Option<hyper::upgrade::OnUpgrade>,
    ),
    Error,
> {
    if let Some(len) = content_length(req.headers())
        && len > route.max_body_bytes
    {
        return Err(Error::PayloadTooLarge {
            limit: route.max_body_bytes,
        });
    }
    let upgrade = req.version() == Version::HTTP_11 && headers::is_upgrade_request(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    Ok((parts, body, client_upgrade))
}

/// The declared `Content-Length`, if any.
pub fn content_length(h: &http::HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Rewrites a request head for the upstream: URI, hop-by-hop and forwarding headers, `Host`,
/// coatcheck's own cookies removed, the browser's `Authorization` replaced by the injected one.
pub fn rewrite(
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
        .uri(fwd.path, parts.uri.query())
        .map_err(|e| Error::BadRequest(format!("cannot build the upstream URI: {e}")))?;
    // The pooled client picks HTTP/1.1 or HTTP/2 per connection; an HTTP/2 request version would be
    // refused on an HTTP/1.1 connection (see ../shared/CRATES.md).
    parts.version = Version::HTTP_11;
    let h = &mut parts.headers;
    headers::strip_hop_by_hop(h, upgrade);
    headers::add_forwarding(h, fwd.client, original_host.as_ref());
    h.insert(headers::X_REQUEST_ID.clone(), fwd.request_id.clone());
    match original_host {
        Some(host) if route.preserve_host => h.insert(header::HOST, host),
        _ => h.insert(header::HOST, upstream.host.clone()),
    };
    if let Some(base) = fwd.own_cookie {
        headers::remove_cookies(h, |name| headers::is_own_cookie(base, name));
    }
    // On a session route the browser never chooses the upstream credential: whatever it sent is
    // replaced (or removed). Public routes pass the client's own header like any proxy.
    if matches!(route.auth, AuthMode::Required | AuthMode::Optional) {
        h.remove(header::AUTHORIZATION);
    }
    if let Some(auth) = &fwd.authorization {
        h.insert(header::AUTHORIZATION, auth.clone());
    }
    Ok(())
}

/// Sends a prepared request and turns the upstream's answer (or failure) into ours.
pub async fn send(
    upstream: &Upstream,
    route: &Route,
    req: Request<UpstreamBody>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Result<Response<Body>, Error> {
    let request_id = req.headers().get(&headers::X_REQUEST_ID).cloned();
    let (response, progress) = upstream.send(req, client_upgrade.is_some());
    let mut res = tokio::select! {
        r = response => r.map_err(|e| classify(e, route))?,
        () = deadline(&progress, route.timeout) => return Err(Error::GatewayTimeout(route.timeout)),
    };
    let upgraded = res.status() == StatusCode::SWITCHING_PROTOCOLS;
    if upgraded {
        let Some(client_upgrade) = client_upgrade else {
            return Err(Error::BadGateway(
                "upstream switched protocols without being asked".into(),
            ));
        };
        let upstream_upgrade = hyper::upgrade::on(&mut res);
        tokio::spawn(async move {
            match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok((client, upstream)) => {
                    let mut client = TokioIo::new(client);
                    let mut upstream = TokioIo::new(upstream);
                    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await
                    {
                        tracing::debug!(error = %e, "upgraded connection ended");
                    }
                }
                Err(e) => tracing::debug!(error = %e, "upgrade did not complete"),
            }
        });
    }
    headers::strip_hop_by_hop(res.headers_mut(), upgraded);
    if let Some(id) = request_id {
        res.headers_mut().insert(headers::X_REQUEST_ID.clone(), id);
    }
    Ok(res.map(Either::Left))
}

/// Resolves once the upstream has had `timeout` since the request body last moved (since the
/// request was sent, for a request without a body): an upload is not counted against the
/// upstream, but neither may it stall for longer than `timeout`.
async fn deadline(progress: &Progress, timeout: Duration) {
    loop {
        let due = progress.last() + timeout;
        if Instant::now() >= due {
            return;
        }
        tokio::time::sleep_until(due.into()).await;
    }
}

/// A client error is ours to report precisely: the body limit shows up as a body error.
fn classify(e: hyper_util::client::legacy::Error, route: &Route) -> Error {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return Error::PayloadTooLarge {
                limit: route.max_body_bytes,
            };
        }
        source = s.source();
    }
    Error::BadGateway(BoxError::from(e))
}
