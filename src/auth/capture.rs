//! Session capture (`[capture]`): sessions made from an existing API's own JSON login.
//!
//! The browser POSTs its credentials to `capture.login_path` (with the CSRF header, like any
//! state-changing request). coatcheck forwards the request through the route that serves the path;
//! when the API answers 2xx JSON holding the tokens at the configured JSON Pointers (RFC 6901),
//! coatcheck keeps them in a new session, removes those members from the JSON the browser gets (the
//! rest, e.g. a `user` object, passes through) and sets the session cookie. A 4xx — or a 2xx
//! without the tokens — passes through untouched and creates nothing.
//!
//! From then on the session is refreshed by POSTing `{"refresh_token": …}` to `refresh_path` on the
//! same upstream (`Issuer::refresh`) and ended by POSTing it to `logout_path`. The API's
//! `refresh_path` is coatcheck's alone: a browser request to it through a route is refused, so a
//! refresh answer can never carry tokens to the browser.

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderValue, Response, header};
use http_body_util::{BodyExt, Limited};
use serde_json::{Map, Value, json};
use url::Url;

use super::Auth;
use super::issuer::{Issuer, IssuerError, IssuerKind};
use crate::body::Body;
use crate::config::{self, Route};
use crate::error::Error;
use crate::secret::Secret;
use crate::session::store::EndReason;
use crate::session::{Session, SessionData};
use crate::tls::{self, TlsError};

/// Largest login or refresh answer read for tokens.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;
/// An access token whose lifetime neither `expires_in` nor an `exp` claim tells is refreshed after
/// this long.
pub(crate) const DEFAULT_LIFETIME_SECS: u64 = 300;
/// How long coatcheck waits for the API's refresh and logout answers.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The capture issuer: the API's own login, refresh and logout.
pub(crate) struct Capture {
    cfg: config::Capture,
    /// The upstream of the route that serves the login (refresh and logout go there too).
    upstream: Url,
    http: reqwest::Client,
    /// The sessions' `iss`: names the API, so subjects of different issuers never mix.
    iss: String,
}

/// Tokens found in an answer.
struct Found {
    access_token: Secret,
    refresh_token: Option<Secret>,
    expires_at: u64,
}

impl Capture {
    /// Builds the client for the login route's upstream (no network yet).
    pub(crate) fn new(cfg: &config::Capture, route: &Route) -> Result<Capture, TlsError> {
        let tls = tls::client_config(tls::root_store("ca", route.ca.as_deref())?, &[b"http/1.1"])?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(CALL_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("coatcheck/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| TlsError::File {
                key: "ca",
                path: Default::default(),
                reason: e.to_string(),
            })?;
        Ok(Capture {
            cfg: cfg.clone(),
            iss: format!("capture:{}", route.upstream),
            upstream: route.upstream.clone(),
            http,
        })
    }

    /// The public login path.
    pub(crate) fn login_path(&self) -> &str {
        &self.cfg.login_path
    }

    /// Whether `route` forwarding to `upstream_path` would reach the API's refresh endpoint.
    pub(crate) fn is_refresh_endpoint(&self, route: &Route, upstream_path: &str) -> bool {
        route.upstream == self.upstream
            && upstream_path.trim_end_matches('/') == self.cfg.refresh_path.trim_end_matches('/')
    }

    /// `refresh_before_expiry` of capture sessions.
    pub(crate) fn refresh_before(&self) -> Duration {
        self.cfg.refresh_before_expiry
    }

    fn url(&self, path: &str) -> Url {
        let mut u = self.upstream.clone();
        u.set_path(&format!(
            "{}{path}",
            self.upstream.path().trim_end_matches('/')
        ));
        u
    }

    /// The tokens of a login or refresh answer, if it holds an access token.
    fn find(&self, answer: &Value, now: u64) -> Option<Found> {
        let token = |ptr: &str| {
            answer
                .pointer(ptr)
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
                .map(|t| Secret::new(t.to_owned()))
        };
        let access_token = token(&self.cfg.access_token)?;
        // It becomes a header value: a token that cannot be one is no token.
        HeaderValue::from_str(&format!("Bearer {}", access_token.expose())).ok()?;
        let expires_in =
            self.cfg
                .expires_in
                .as_deref()
                .and_then(|ptr| match answer.pointer(ptr)? {
                    Value::Number(n) => n.as_u64(),
                    Value::String(s) => s.parse().ok(),
                    _ => None,
                });
        let claims = payload(access_token.expose());
        let exp = claims.get("exp").and_then(Value::as_u64);
        let expires_at = match (expires_in, exp) {
            (Some(s), _) => now.saturating_add(s),
            (None, Some(exp)) => exp,
            (None, None) => now.saturating_add(DEFAULT_LIFETIME_SECS),
        };
        Some(Found {
            access_token,
            refresh_token: token(&self.cfg.refresh_token),
            expires_at,
        })
    }

    /// Removes the token members from an answer that goes to the browser.
    fn strip(&self, answer: &mut Value) {
        for ptr in [&self.cfg.access_token, &self.cfg.refresh_token] {
            let (parent, key) = ptr.rsplit_once('/').unwrap_or(("", ptr));
            let key = key.replace("~1", "/").replace("~0", "~");
            let target = if parent.is_empty() {
                Some(&mut *answer)
            } else {
                answer.pointer_mut(parent)
            };
            if let Some(Value::Object(o)) = target {
                o.remove(&key);
            }
        }
    }

    /// A new session's data from the tokens of a login answer.
    fn session_data(&self, found: Found, now: u64) -> SessionData {
        let claims = payload(found.access_token.expose());
        let sub = match claims.get("sub") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => String::new(),
        };
        SessionData {
            iss: self.iss.clone(),
            sub,
            claims: display_claims(claims),
            issuer: IssuerKind::Capture,
            id_token: None,
            access_token: found.access_token,
            access_expires_at: found.expires_at,
            access_issued_at: now,
            refresh_token: found.refresh_token,
        }
    }

    async fn post(
        &self,
        path: &str,
        refresh_token: &Secret,
    ) -> Result<reqwest::Response, IssuerError> {
        let url = self.url(path);
        let mut span = crate::trace::idp("idp.capture", url.as_str());
        let req = self
            .http
            .post(url)
            .json(&json!({"refresh_token": refresh_token.expose()}));
        let res = crate::trace::traced(req, &span)
            .send()
            .await
            .map_err(|e| IssuerError::Unavailable(Box::new(e.without_url())));
        match &res {
            Ok(r) => span.set("http.response.status_code", i64::from(r.status().as_u16())),
            Err(_) => span.fail("idp_unavailable"),
        }
        res
    }
}

/// The payload of a JWT, read without verification: the API issued it to coatcheck over the
/// connection coatcheck opened, and the API verifies it on every call. Empty for opaque tokens.
fn payload(token: &str) -> Map<String, Value> {
    token
        .split('.')
        .nth(1)
        .and_then(|p| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p)
                .ok()
        })
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// The claims `/bff/user` shows: everything but values tied to the one token.
fn display_claims(mut claims: Map<String, Value>) -> crate::session::claims::Claims {
    claims.remove("jti");
    crate::session::claims::Claims::new(&claims)
}

impl Issuer for Capture {
    async fn refresh(
        &self,
        current: &SessionData,
        refresh_token: &Secret,
        now: u64,
    ) -> Result<SessionData, IssuerError> {
        let res = self.post(&self.cfg.refresh_path, refresh_token).await?;
        let status = res.status();
        if status.is_client_error() {
            return Err(IssuerError::Refused(format!(
                "the API answered {status} to the refresh"
            )));
        }
        if !status.is_success() {
            return Err(IssuerError::Unavailable(
                format!("the API answered {status} to the refresh").into(),
            ));
        }
        let body = res
            .bytes()
            .await
            .map_err(|e| IssuerError::Unavailable(Box::new(e.without_url())))?;
        if body.len() > MAX_ANSWER_BYTES {
            return Err(IssuerError::Unavailable(
                "the refresh answer is too large".into(),
            ));
        }
        let answer: Value = serde_json::from_slice(&body)
            .map_err(|_| IssuerError::Unavailable("the refresh answer is not JSON".into()))?;
        let found = self.find(&answer, now).ok_or_else(|| {
            IssuerError::Unavailable("the refresh answer holds no access token".into())
        })?;
        let claims = payload(found.access_token.expose());
        // The refreshed token must be the same user's.
        if let Some(sub) = claims
            .get("sub")
            .map(|s| s.as_str().map_or_else(|| s.to_string(), str::to_owned))
            && sub != current.sub
        {
            return Err(IssuerError::Refused(
                "the refreshed token names another subject".into(),
            ));
        }
        Ok(SessionData {
            claims: if claims.is_empty() {
                current.claims.clone()
            } else {
                display_claims(claims)
            },
            access_token: found.access_token,
            access_expires_at: found.expires_at,
            access_issued_at: now,
            refresh_token: found
                .refresh_token
                .or_else(|| current.refresh_token.clone()),
            ..current.clone()
        })
    }

    async fn revoke(&self, refresh_token: &Secret) -> Result<(), IssuerError> {
        let Some(path) = &self.cfg.logout_path else {
            return Ok(());
        };
        let res = self.post(path, refresh_token).await?;
        if res.status().is_success() {
            Ok(())
        } else {
            Err(IssuerError::Unavailable(
                format!("the API answered {} to the logout", res.status()).into(),
            ))
        }
    }

    fn logout_url(&self, _data: &SessionData, _state: &str) -> String {
        "/".to_owned()
    }

    fn ready(&self) -> Result<(), String> {
        Ok(())
    }
}

/// The phases of a login POST through capture: the answer is read, and if it holds tokens, a
/// session is made and the tokens are removed from it.
pub(super) struct LoginPhases<'a> {
    pub(crate) auth: &'a Auth,
    pub(crate) capture: &'a Capture,
    /// The session this browser had before (ended when the new one starts: no fixation).
    pub(crate) previous: Option<std::sync::Arc<Session>>,
    pub(crate) user_agent: Option<HeaderValue>,
    pub(crate) timeout: Duration,
}

impl crate::proxy::Phases for LoginPhases<'_> {
    async fn response_filter(&self, res: Response<Body>) -> Result<Response<Body>, Error> {
        if !res.status().is_success() {
            return Ok(res);
        }
        let (mut parts, body) = res.into_parts();
        // The login request went without Accept-Encoding: an encoded answer cannot be inspected,
        // and an answer that may hold tokens never passes uninspected.
        if parts
            .headers
            .get(header::CONTENT_ENCODING)
            .is_some_and(|v| v != "identity")
        {
            return Err(Error::BadGateway(
                "the login answer is content-encoded".into(),
            ));
        }
        let read = Limited::new(body, MAX_ANSWER_BYTES).collect();
        let bytes = match tokio::time::timeout(self.timeout, read).await {
            Ok(Ok(c)) => c.to_bytes(),
            Ok(Err(e)) => {
                return Err(Error::BadGateway(
                    format!("reading the login answer: {e}").into(),
                ));
            }
            Err(_) => return Err(Error::GatewayTimeout(self.timeout)),
        };
        let now = crate::session::now();
        let found = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|answer| Some((self.capture.find(&answer, now)?, answer)));
        let Some((found, mut answer)) = found else {
            tracing::warn!(status = %parts.status, "the login answer holds no tokens at the configured pointers; no session made");
            return Ok(rebuild(parts, bytes));
        };
        let data = self.capture.session_data(found, now);
        let (value, created) = self
            .auth
            .sessions
            .create(data, self.user_agent.as_ref(), None)
            .await?;
        if let Some(old) = &self.previous
            && let Err(e) = self
                .auth
                .sessions
                .delete(&old.handle(), EndReason::Logout)
                .await
        {
            tracing::warn!(session = %old.handle(), error = %e, "could not end the previous session");
        }
        self.auth.metrics.login(crate::metrics::LoginResult::Ok);
        tracing::info!(session = %created.handle(), "logged in (capture)");
        self.capture.strip(&mut answer);
        let body = serde_json::to_vec(&answer).map_err(Error::internal)?;
        parts.headers.remove(header::CONTENT_LENGTH);
        parts
            .headers
            .append(header::SET_COOKIE, self.auth.sessions.set_cookie(&value));
        parts
            .headers
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        Ok(rebuild(parts, Bytes::from(body)))
    }
}

fn rebuild(mut parts: http::response::Parts, bytes: Bytes) -> Response<Body> {
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    Response::from_parts(parts, crate::body::full(bytes))
}
