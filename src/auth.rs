//! Authentication and authorization: login (OIDC code + PKCE), sessions, CSRF, per-route policy
//! and token refresh. It decides what `Authorization` a request leaves with, then hands it to
//! `proxy`, which never sees a session.
//!
//! - [`capture`]: sessions from an existing API's own JSON login (`[capture]`).
//! - [`oidc`]: the identity provider (discovery, JWKS, token/revocation/end-session endpoints).
//! - [`id_token`]: ID and logout token validation.
//! - [`issuer`]: the token issuer abstraction (how tokens are refreshed, revoked, ended).
//! - [`login`]: `/bff/login` and `/bff/callback`, and the encrypted login cookie.
//! - [`endpoints`]: the other `/bff/*` endpoints (user, logout, sessions, back-channel logout).
//! - [`refresh`]: single-flight token refresh.
//! - [`client`]: machine tokens (client credentials) for `auth = "client"` routes.
//! - [`csrf`], [`policy`]: request checks.

pub mod capture;
pub mod client;
pub mod csrf;
pub mod endpoints;
pub mod id_token;
pub mod issuer;
pub mod login;
pub mod oidc;
pub mod policy;
pub mod refresh;

use std::sync::Arc;

use http::{HeaderName, HeaderValue, Request, Response, StatusCode, header};

use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;

use crate::body::Body;
use crate::config::{AuthMode, Config, CsrfMode, Route};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::proxy::{self, Forward};
use crate::secret::Secret;
use crate::session::store::{EndReason, Record};
use crate::session::{Lookup, Probe, Session, Sessions, store};
use crate::upstream::Upstream;

/// Expired sessions are swept from the store this often (stores with their own expiry skip it).
pub(crate) const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(300);

async fn sweep_expired(sessions: Arc<Sessions>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => match sessions.sweep().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(removed = n, cached = sessions.cached(), "expired sessions swept"),
                Err(e) => tracing::warn!(error = %e, "session sweep failed"),
            },
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Whether `path` (normalized) is one of coatcheck's own `/bff/*` endpoints.
pub(crate) fn is_bff_path(path: &str) -> bool {
    path == "/bff" || path.starts_with("/bff/")
}

/// Login URL answered with a 401.
pub(crate) const LOGIN_PATH: &str = "/bff/login";

/// Sessions, login and per-route policy: an orchestrator over the token issuer (the OIDC
/// provider, which also issues the machine tokens cached by [`client::ClientTokens`]), the session
/// records ([`Sessions`] over a [`store::Store`]), the once-set and refresh lease
/// ([`store::OnceSet`], [`store::Lease`]) and the event channel ([`store::Events`]).
///
/// The stateful parts (issuers, sessions and store, refresher, machine-token caches) are built
/// once; a reload makes a new `Auth` over the same parts with the new file's per-request settings
/// ([`Auth::reconfigured`]), held by the new router.
pub(crate) struct Auth {
    issuers: Arc<issuer::Issuers>,
    sessions: Arc<Sessions>,
    refresher: Arc<refresh::Refresher>,
    /// Machine tokens for `auth = "client"` routes (they need `[oidc]`).
    client_tokens: Option<client::ClientTokens<oidc::Provider>>,
    csrf_header: HeaderName,
    public_origin: String,
    metrics: Arc<Metrics>,
    /// `session.cache.ttl`.
    cache_ttl: std::time::Duration,
}

impl Auth {
    /// Builds the provider client, opens the session store. No network yet. Logins, refreshes,
    /// provider calls, cache and store activity are counted in `metrics`.
    pub(crate) fn new(config: &Config, metrics: Arc<Metrics>) -> Result<Auth, String> {
        let oidc = match &config.oidc {
            Some(o) => Some(Arc::new(
                oidc::Provider::new(o, &config.server.public_origin, metrics.clone())
                    .map_err(|e| e.to_string())?,
            )),
            None => None,
        };
        let capture = match &config.capture {
            Some(c) => Some(Arc::new(
                capture::Capture::new(c, &config.routes[c.route])
                    .map_err(|e| format!("capture: {e}"))?,
            )),
            None => None,
        };
        if oidc.is_none() && capture.is_none() {
            return Err("neither [oidc] nor [capture] is configured".into());
        }
        let issuers = Arc::new(issuer::Issuers { oidc, capture });
        let sessions = Arc::new(
            Sessions::with_metrics(&config.session, metrics.clone())
                .map_err(|e| format!("session.store: {e}"))?,
        );
        Ok(Auth {
            refresher: Arc::new(refresh::Refresher::new(
                issuers.clone(),
                sessions.clone(),
                config.oidc.as_ref(),
                match (&config.oidc, &config.capture) {
                    (None, Some(c)) => c.login_path.clone(),
                    _ => LOGIN_PATH.to_owned(),
                },
                metrics.clone(),
            )),
            client_tokens: match (&issuers.oidc, &config.oidc) {
                (Some(p), Some(o)) => Some(client::ClientTokens::new(p.clone(), &config.routes, o)),
                _ => None,
            },
            issuers,
            sessions,
            csrf_header: config.csrf.header.clone(),
            public_origin: config.server.public_origin.clone(),
            metrics,
            cache_ttl: config.session.cache_ttl,
        })
    }

    /// The same issuers, sessions, store and refresher with `config`'s per-request settings: the
    /// CSRF header, `session.cache.ttl`, and the machine-token grant sets of its routes (a grant
    /// set already in use keeps its cached token). Everything else in `config` is the running one's
    /// (the reload keeps keys that need a restart).
    pub(crate) fn reconfigured(&self, config: &Config) -> Auth {
        Auth {
            issuers: self.issuers.clone(),
            sessions: self.sessions.clone(),
            refresher: self.refresher.clone(),
            client_tokens: self
                .client_tokens
                .as_ref()
                .map(|t| t.reconfigured(&config.routes)),
            csrf_header: config.csrf.header.clone(),
            public_origin: self.public_origin.clone(),
            metrics: self.metrics.clone(),
            cache_ttl: config.session.cache_ttl,
        }
    }

    /// Puts a reloaded `session.keys` in force (rotation: the first key signs from now on).
    pub(crate) fn set_session_keys(&self, keys: &[Secret<Vec<u8>>]) {
        self.sessions.set_keys(keys);
    }

    /// Looks up the request's session (through the cache, `session.cache.ttl`).
    async fn lookup(&self, headers: &http::HeaderMap) -> Result<Lookup, Error> {
        let _span = crate::trace::session_lookup();
        self.sessions.lookup(headers, self.cache_ttl).await
    }

    /// Starts what runs beside the requests until `shutdown`: provider discovery (retried until
    /// it answers: `auth = "none"` routes serve meanwhile and `/readyz` says not ready), following
    /// the session event channel, and sweeping expired sessions.
    pub(crate) fn spawn_background(&self, shutdown: &CancellationToken) {
        if let Some(provider) = self.issuers.oidc.clone() {
            let stop = shutdown.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = provider.discover_and_refresh() => {}
                    _ = stop.cancelled() => {}
                }
            });
        }
        tokio::spawn(self.sessions.clone().follow_events(shutdown.clone()));
        tokio::spawn(sweep_expired(self.sessions.clone(), shutdown.clone()));
    }

    /// The once-set (callback states, logout token ids, spent refresh tokens).
    fn once(&self) -> &impl store::OnceSet {
        self.sessions.backend().as_ref()
    }

    /// The OIDC provider; 404 for its endpoints when only `[capture]` is configured.
    fn oidc(&self) -> Result<&Arc<oidc::Provider>, Error> {
        self.issuers.oidc.as_ref().ok_or(Error::NotFound)
    }

    /// The capture issuer, when `[capture]` is configured.
    pub(crate) fn capture(&self) -> Option<&capture::Capture> {
        self.issuers.capture.as_deref()
    }

    /// Where a browser without a session logs in: `/bff/login` with OIDC, else the capture login.
    fn login_path(&self) -> &str {
        match (&self.issuers.oidc, self.capture()) {
            (None, Some(c)) => c.login_path(),
            _ => LOGIN_PATH,
        }
    }

    /// Where the browser goes after a logout without a provider session to end.
    fn post_logout_redirect(&self) -> &str {
        self.issuers
            .oidc
            .as_ref()
            .map_or("/", |p| p.cfg.post_logout_redirect.as_str())
    }

    /// Ready when the issuers are (the provider's metadata is loaded) and the store answers.
    pub(crate) async fn ready(&self) -> Result<(), String> {
        self.issuers.ready()?;
        self.sessions.ping().await.map_err(|e| e.to_string())
    }

    /// The issuer sessions of OIDC logins carry (`iss` of [`crate::session::subject_key`]):
    /// the provider's issuer exactly as configured (discovery must match it byte for byte).
    pub(crate) fn oidc_issuer(&self) -> Option<&str> {
        self.issuers.oidc.as_ref().map(|p| p.cfg.issuer_id.as_str())
    }

    /// The live sessions of a subject (by its [`crate::session::subject_key`]).
    pub(crate) async fn subject_sessions(&self, subject: &str) -> Result<Vec<Record>, Error> {
        self.sessions.list(subject).await
    }

    /// Ends every session of a subject on every instance; how many ended.
    pub(crate) async fn revoke_subject(&self, subject: &str) -> Result<usize, Error> {
        self.sessions
            .delete_subject(subject, EndReason::Revoked)
            .await
    }

    /// Ends one session (by its public handle) on every instance; whether it existed.
    pub(crate) async fn revoke_session(&self, handle: &str) -> Result<bool, Error> {
        Ok(self
            .sessions
            .delete(handle, EndReason::Revoked)
            .await?
            .is_some())
    }

    /// Sessions held in this instance's cache.
    pub(crate) async fn cached_sessions(&self) -> u64 {
        self.sessions.cached_now().await
    }

    /// The session cookie's name (login cookies are `<name>-login-…`).
    pub(crate) fn cookie_name(&self) -> &str {
        &self.sessions.cookie.name
    }

    /// `Set-Cookie` that removes the session cookie.
    pub(crate) fn clear_session_cookie(&self) -> HeaderValue {
        self.sessions.clear_cookie()
    }

    fn csrf(&self) -> csrf::Check<'_> {
        csrf::Check {
            header: &self.csrf_header,
            public_origin: &self.public_origin,
        }
    }

    /// Forwards a request to a route whose `auth` is `required`, `optional`, `bearer` or `client`.
    ///
    /// The hot path (a live cached session, the CSRF check passed, roles allowed, a token fit to
    /// forward) is decided when this is called, and its future is [`proxy::forward`]'s alone.
    /// Everything that waits or answers otherwise (a store read, a refresh, a login, a machine
    /// token) is one boxed future: inline, its state would be part of, and moved with, every
    /// request's future.
    pub(crate) fn forward<'a>(
        &'a self,
        upstream: &'a Upstream,
        route: &'a Route,
        req: Request<Incoming>,
        fwd: &'a mut Forward<'_>,
    ) -> impl Future<Output = Result<Response<Body>, Error>> + 'a {
        use tokio_util::either::Either;
        match self.start(route, &req, fwd) {
            Start::Ready(session) => {
                fwd.authorization = Some(session.bearer.clone());
                let phases = SessionPhases {
                    auth: self,
                    session,
                };
                Either::Left(proxy::forward(upstream, route, req, fwd, phases))
            }
            start => Either::Right(Box::pin(
                self.forward_slow(upstream, route, req, fwd, start),
            )),
        }
    }

    /// How a request begins, decided without waiting.
    fn start(&self, route: &Route, req: &Request<Incoming>, fwd: &Forward<'_>) -> Start {
        if !matches!(route.auth, AuthMode::Required | AuthMode::Optional) {
            return Start::NoSession;
        }
        let upgrade = fwd.scan.asks_upgrade(req.headers());
        if let Err(e) =
            self.csrf()
                .check(req.headers(), fwd.scan, req.method(), route.csrf, upgrade)
        {
            return Start::Refused(e);
        }
        // The span ends with the lookup: here on the hot path, after the store read on a miss.
        let span = crate::trace::session_lookup();
        let memo = Some(&fwd.slot.handles);
        // One reading of the clock for the cache's freshness and the token's.
        let at = std::time::Instant::now();
        match self.sessions.probe(req.headers(), self.cache_ttl, memo, at) {
            Probe::Found(Lookup::Live(s))
                if policy::check_roles(route, s.claims().roles()).is_ok()
                    && !self.refresher.due_at(&s, at) =>
            {
                Start::Ready(s)
            }
            probe => Start::Probed(probe, span),
        }
    }

    /// The rest of [`Auth::forward`]: whatever is not the hot path.
    async fn forward_slow(
        &self,
        upstream: &Upstream,
        route: &Route,
        req: Request<Incoming>,
        fwd: &mut Forward<'_>,
        start: Start,
    ) -> Result<Response<Body>, Error> {
        let lookup = match start {
            Start::NoSession if route.auth == AuthMode::Bearer => {
                return self.forward_bearer(upstream, route, req, fwd).await;
            }
            Start::NoSession => return self.forward_client(upstream, route, req, fwd).await,
            Start::Ready(s) => Lookup::Live(s),
            Start::Probed(Probe::Found(found), _span) => found,
            Start::Probed(Probe::Miss(miss), _span) => {
                self.sessions.resolve(miss, self.cache_ttl).await?
            }
            // A navigation cannot carry the CSRF header. Without a session it is sent to log in
            // all the same: nothing is forwarded, so there is nothing to forge.
            Start::Refused(e) if route.login_redirect && policy::is_navigation(req.headers()) => {
                match self.lookup(req.headers()).await? {
                    Lookup::Live(_) => return Err(e),
                    other => other,
                }
            }
            Start::Refused(e) => return Err(e),
        };
        let session = match lookup {
            Lookup::Live(s) => s,
            Lookup::Ended if route.auth == AuthMode::Required => {
                return self.not_logged_in(route, &req, true);
            }
            Lookup::None if route.auth == AuthMode::Required => {
                return self.not_logged_in(route, &req, false);
            }
            // `optional`: forwarded without a token; an ended session's cookie is cleared.
            other => {
                let ended = matches!(other, Lookup::Ended);
                return self
                    .forward_anonymous(upstream, route, req, fwd, ended)
                    .await;
            }
        };
        policy::check_roles(route, session.claims().roles())?;
        let session = self.refresher.fresh(session).await?;
        fwd.authorization = Some(session.bearer.clone());
        let phases = SessionPhases {
            auth: self,
            session,
        };
        proxy::forward(upstream, route, req, fwd, phases).await
    }

    /// `auth = "client"`: no user, so no session is looked up; coatcheck's own token replaces
    /// the client's.
    async fn forward_client(
        &self,
        upstream: &Upstream,
        route: &Route,
        req: Request<Incoming>,
        fwd: &mut Forward<'_>,
    ) -> Result<Response<Body>, Error> {
        let upgrade = fwd.scan.asks_upgrade(req.headers());
        self.csrf()
            .check(req.headers(), fwd.scan, req.method(), route.csrf, upgrade)?;
        let tokens = self
            .client_tokens
            .as_ref()
            .ok_or_else(|| Error::Internal("auth = \"client\" needs [oidc]".into()))?;
        fwd.authorization = Some(tokens.bearer(route).await?);
        proxy::forward(upstream, route, req, fwd, proxy::Plain).await
    }

    /// `auth = "optional"` without a live session: forwarded without a token; the cookie of an
    /// `ended` session is cleared.
    async fn forward_anonymous(
        &self,
        upstream: &Upstream,
        route: &Route,
        req: Request<Incoming>,
        fwd: &Forward<'_>,
        ended: bool,
    ) -> Result<Response<Body>, Error> {
        let mut res = proxy::forward(upstream, route, req, fwd, proxy::Plain).await?;
        if ended {
            res.headers_mut()
                .append(header::SET_COOKIE, self.clear_session_cookie());
        }
        Ok(res)
    }

    /// A POST to `capture.login_path`: checked like any state-changing request (CSRF header,
    /// `Origin`, Fetch Metadata), forwarded through its public route, and turned into a session
    /// when the API answers with tokens ([`capture::LoginPhases`]).
    pub(crate) async fn capture_login(
        &self,
        upstream: &Upstream,
        route: &Route,
        mut req: Request<Incoming>,
        fwd: &Forward<'_>,
    ) -> Result<Response<Body>, Error> {
        let capture = self.capture().ok_or(Error::NotFound)?;
        self.csrf()
            .check(req.headers(), fwd.scan, req.method(), CsrfMode::All, false)?;
        let previous = match self.lookup(req.headers()).await {
            Ok(Lookup::Live(s)) => Some(s),
            _ => None,
        };
        // The answer is read for tokens: it must come unencoded.
        req.headers_mut().remove(header::ACCEPT_ENCODING);
        let phases = capture::LoginPhases {
            auth: self,
            capture,
            previous,
            user_agent: Sessions::user_agent(req.headers()).cloned(),
            timeout: route.timeout,
        };
        proxy::forward(upstream, route, req, fwd, phases).await
    }

    /// `auth = "bearer"`: a non-browser client's own JWT, validated like the provider's tokens.
    async fn forward_bearer(
        &self,
        upstream: &Upstream,
        route: &Route,
        req: Request<Incoming>,
        fwd: &mut Forward<'_>,
    ) -> Result<Response<Body>, Error> {
        let unauth = || Error::Unauthenticated {
            login_url: LOGIN_PATH.into(),
        };
        let value = req
            .headers()
            .get(header::AUTHORIZATION)
            .ok_or_else(unauth)?
            .clone();
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .ok_or_else(unauth)?;
        let claims =
            match id_token::validate_access_token(self.oidc()?, token, route.audience.as_deref())
                .await
            {
                Ok(c) => c,
                Err(Ok(e)) => {
                    tracing::debug!(error = %e, "bearer token refused");
                    return Err(unauth());
                }
                Err(Err(e)) => return Err(e),
            };
        policy::check_roles(route, &policy::roles(&claims))?;
        fwd.authorization = Some(value);
        proxy::forward(upstream, route, req, fwd, proxy::Plain).await
    }

    /// 401 (`unauthenticated` or `session_expired`) — or, for a top-level navigation to a route
    /// with `login_redirect`, a redirect to the login.
    fn not_logged_in(
        &self,
        route: &Route,
        req: &Request<Incoming>,
        ended: bool,
    ) -> Result<Response<Body>, Error> {
        let return_url = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let login_url = match self.issuers.oidc {
            Some(_) => format!(
                "{LOGIN_PATH}?returnUrl={}",
                url::form_urlencoded::byte_serialize(return_url.as_bytes()).collect::<String>()
            ),
            None => self.login_path().to_owned(),
        };
        if route.login_redirect && policy::is_navigation(req.headers()) {
            let mut res = crate::body::redirect(StatusCode::FOUND, &login_url);
            if ended {
                res.headers_mut()
                    .append(header::SET_COOKIE, self.clear_session_cookie());
            }
            return Ok(res);
        }
        Err(if ended {
            Error::SessionExpired {
                login_url,
                clear_cookie: true,
            }
        } else {
            Error::Unauthenticated { login_url }
        })
    }

    /// Answers a `/bff/*` request.
    pub(crate) async fn handle_bff(
        &self,
        req: Request<Incoming>,
        path: &str,
    ) -> Result<Response<Body>, Error> {
        let mut res = endpoints::dispatch(self, req, path).await?;
        // Every /bff/* answer is per-user: never cached by anyone.
        res.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        Ok(res)
    }

    /// The live session of a request, or 401.
    pub(crate) async fn require_session(
        &self,
        req: &Request<Incoming>,
    ) -> Result<Arc<Session>, Error> {
        match self.lookup(req.headers()).await? {
            Lookup::Live(s) => Ok(s),
            Lookup::Ended => Err(Error::SessionExpired {
                login_url: self.login_path().into(),
                clear_cookie: true,
            }),
            Lookup::None => Err(Error::Unauthenticated {
                login_url: self.login_path().into(),
            }),
        }
    }
}

/// How [`Auth::forward`] begins a request, decided without waiting.
enum Start {
    /// The hot path: a live cached session, allowed on the route, with a token fit to forward.
    Ready(Arc<Session>),
    /// The CSRF check passed; the lookup waits for the store, or the session is missing, ended,
    /// not allowed, or due for a refresh. The lookup's span is open until the lookup ends.
    Probed(Probe, crate::trace::LookupSpan),
    /// The CSRF check failed.
    Refused(Error),
    /// `auth = "bearer"` or `"client"`: no session is looked up.
    NoSession,
}

/// The forwarding phases of a request that carries a session's access token: the request is kept
/// for one replay (small bodies only) and, when the upstream rejects the token itself, the token is
/// refreshed once and the request replayed with the new one.
struct SessionPhases<'a> {
    auth: &'a Auth,
    session: Arc<Session>,
}

impl proxy::Phases for SessionPhases<'_> {
    fn keep_for_retry(&self) -> bool {
        true
    }

    async fn retry_with(&self, res: &Response<Body>) -> Result<Option<HeaderValue>, Error> {
        if !is_invalid_token(res) {
            return Ok(None);
        }
        tracing::info!(session = %self.session.handle(), "upstream rejected the access token; refreshing once and replaying");
        let session = self
            .auth
            .refresher
            .after_rejection(self.session.clone())
            .await?;
        Ok(Some(session.bearer.clone()))
    }
}

/// An upstream 401 saying the token itself is bad (RFC 6750 §3.1 `invalid_token`).
fn is_invalid_token(res: &Response<Body>) -> bool {
    res.status() == StatusCode::UNAUTHORIZED
        && res
            .headers()
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .any(|v| v.to_str().is_ok_and(|s| s.contains("invalid_token")))
}
