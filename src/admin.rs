//! The admin listener (`[admin]`): a separate plain-HTTP/1.1 listener for operators, never the
//! public TLS port. It serves
//!
//! - `GET /metrics`: every [`Metrics`] series, OpenMetrics text (Prometheus scrapes it);
//! - `GET /healthz`, `GET /readyz`: the same liveness and readiness as the public endpoints;
//! - with `admin.token` set, the session admin API (`Authorization: Bearer <token>`, compared in
//!   constant time; 401 JSON without it): `GET /sessions?sub=S[&iss=I]` lists a subject's
//!   sessions, `DELETE /sessions?sub=S[&iss=I]` ends them all on every instance,
//!   `DELETE /sessions/{id}` ends one. `iss` defaults to the configured OIDC issuer.
//!
//! Every admin API request is logged (`coatcheck::admin`): what, for whom, from where, when, and how
//! many sessions it ended. No answer and no log line holds a token, a cookie value or a secret.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::auth::{Auth, endpoints};
use crate::body::{self, Body};
use crate::config::Admin as AdminConfig;
use crate::error::Error;
use crate::listener::Drain;
use crate::metrics::{self, Metrics};
use crate::router::{self, Router};
use crate::secret::{self, Secret};
use crate::session::subject_key;

/// Concurrent admin connections (a scraper or two and an operator's curl).
const MAX_CONNECTIONS: usize = 64;
/// A client gets this long to send its request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// In-flight admin requests get this long to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Longest accepted `sub` or `iss` query value.
const MAX_PARAM: usize = 1024;

/// The admin endpoints.
pub(crate) struct Admin {
    metrics: Arc<Metrics>,
    /// The running router (swapped by a reload).
    router: Arc<arc_swap::ArcSwap<Router>>,
    auth: Option<Arc<Auth>>,
    token: Option<Secret>,
}

impl Admin {
    /// The admin endpoints over the running router (readiness) and auth (sessions).
    pub(crate) fn new(
        config: &AdminConfig,
        metrics: Arc<Metrics>,
        router: Arc<arc_swap::ArcSwap<Router>>,
        auth: Option<Arc<Auth>>,
    ) -> Admin {
        Admin {
            metrics,
            router,
            auth,
            token: config.token.clone(),
        }
    }

    /// Answers one admin request. Never fails: errors become JSON answers.
    pub(crate) async fn handle<B>(&self, req: Request<B>, peer: IpAddr) -> Response<Body> {
        let mut res = match self.handle_inner(&req, peer).await {
            Ok(res) => res,
            Err(e) => {
                if !e.is_client_error() {
                    tracing::warn!(target: "coatcheck::admin", error = %e, source = ?std::error::Error::source(&e), "admin request failed");
                }
                router::error_response(&e, None)
            }
        };
        res.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        res
    }

    async fn handle_inner<B>(
        &self,
        req: &Request<B>,
        peer: IpAddr,
    ) -> Result<Response<Body>, Error> {
        let path = req.uri().path();
        let get_only = |allow: &str| {
            if req.method() == Method::GET {
                Ok(())
            } else {
                Err(Error::MethodNotAllowed {
                    allow: allow.into(),
                })
            }
        };
        match path {
            "/metrics" => {
                get_only("GET")?;
                Ok(self.metrics_answer().await)
            }
            "/healthz" => {
                get_only("GET")?;
                Ok(body::json(StatusCode::OK, &json!({"status": "ok"})))
            }
            "/readyz" => {
                get_only("GET")?;
                Ok(self.router.load_full().readiness().await)
            }
            "/sessions" => {
                let auth = self.authorize(req, peer)?;
                match *req.method() {
                    Method::GET => self.list(auth, req, peer).await,
                    Method::DELETE => self.end_subject(auth, req, peer).await,
                    _ => Err(Error::MethodNotAllowed {
                        allow: "GET, DELETE".into(),
                    }),
                }
            }
            p if p.starts_with("/sessions/") => {
                let auth = self.authorize(req, peer)?;
                if req.method() != Method::DELETE {
                    return Err(Error::MethodNotAllowed {
                        allow: "DELETE".into(),
                    });
                }
                self.end_session(auth, &p["/sessions/".len()..], peer).await
            }
            _ => Err(Error::NotFound),
        }
    }

    async fn metrics_answer(&self) -> Response<Body> {
        if let Some(auth) = &self.auth {
            let n = auth.cached_sessions().await;
            self.metrics
                .sessions_active
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let mut res = Response::new(body::full(self.metrics.encode()));
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(metrics::CONTENT_TYPE),
        );
        res
    }

    /// The session admin API is on only with `admin.token` and sessions; the caller must present
    /// the token.
    fn authorize<B>(&self, req: &Request<B>, peer: IpAddr) -> Result<&Auth, Error> {
        let (Some(token), Some(auth)) = (&self.token, &self.auth) else {
            return Err(Error::NotFound);
        };
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        match presented {
            Some(p) if secret::constant_time_eq(p.as_bytes(), token.expose().as_bytes()) => {
                Ok(auth)
            }
            _ => {
                self.metrics.admin_action("refused");
                tracing::warn!(target: "coatcheck::admin", client = %peer, method = %req.method(), path = req.uri().path(), at = %now(), presented = presented.is_some(), "admin request refused: missing or wrong token");
                Err(Error::AdminUnauthorized)
            }
        }
    }

    /// The subject key named by `?sub=S[&iss=I]`, with `sub` and `iss` for the log.
    fn subject<B>(&self, auth: &Auth, req: &Request<B>) -> Result<(String, String, String), Error> {
        let mut sub = None;
        let mut iss = None;
        for (k, v) in url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
            match k.as_ref() {
                "sub" => sub = Some(v.into_owned()),
                "iss" => iss = Some(v.into_owned()),
                _ => {}
            }
        }
        let sub = sub
            .filter(|s| !s.is_empty() && s.len() <= MAX_PARAM)
            .ok_or_else(|| Error::BadRequest("sub (the user's subject) is required".into()))?;
        let iss = match iss {
            Some(i) if !i.is_empty() && i.len() <= MAX_PARAM => i,
            Some(_) => return Err(Error::BadRequest("iss must not be empty".into())),
            None => auth
                .oidc_issuer()
                .ok_or_else(|| {
                    Error::BadRequest("iss is required: no [oidc] issuer is configured".into())
                })?
                .to_owned(),
        };
        Ok((subject_key(&iss, &sub), sub, iss))
    }

    async fn list<B>(
        &self,
        auth: &Auth,
        req: &Request<B>,
        peer: IpAddr,
    ) -> Result<Response<Body>, Error> {
        let (key, sub, iss) = self.subject(auth, req)?;
        let records = auth.subject_sessions(&key).await?;
        self.metrics.admin_action("list_sessions");
        tracing::info!(target: "coatcheck::admin", action = "list_sessions", sub = %sub, iss = %iss, sessions = records.len(), client = %peer, at = %now(), "admin: listed a subject's sessions");
        Ok(body::json(
            StatusCode::OK,
            &endpoints::session_list(records, None),
        ))
    }

    async fn end_subject<B>(
        &self,
        auth: &Auth,
        req: &Request<B>,
        peer: IpAddr,
    ) -> Result<Response<Body>, Error> {
        let (key, sub, iss) = self.subject(auth, req)?;
        let ended = auth.revoke_subject(&key).await?;
        self.metrics.admin_action("end_subject");
        tracing::info!(target: "coatcheck::admin", action = "end_subject", sub = %sub, iss = %iss, ended, client = %peer, at = %now(), "admin: ended every session of a subject");
        Ok(body::json(StatusCode::OK, &json!({"revoked": ended})))
    }

    async fn end_session(
        &self,
        auth: &Auth,
        id: &str,
        peer: IpAddr,
    ) -> Result<Response<Body>, Error> {
        // A session id is the public handle: 32 lowercase hex digits.
        let valid = id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !valid || !auth.revoke_session(id).await? {
            tracing::info!(target: "coatcheck::admin", action = "end_session", found = false, client = %peer, at = %now(), "admin: no such session");
            return Err(Error::NotFound);
        }
        self.metrics.admin_action("end_session");
        tracing::info!(target: "coatcheck::admin", action = "end_session", session = %id, client = %peer, at = %now(), "admin: ended a session");
        Ok(body::json(StatusCode::OK, &json!({"revoked": id})))
    }
}

fn now() -> humantime::Rfc3339Timestamp {
    humantime::format_rfc3339_seconds(SystemTime::now())
}

/// Serves the admin listener until `shutdown`, then drains briefly.
pub(crate) async fn serve(listener: TcpListener, admin: Arc<Admin>, shutdown: CancellationToken) {
    let graceful = Drain::new();
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.cancelled() => break,
        };
        let (tcp, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let admin = admin.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let peer = remote.ip();
            let svc = service_fn(move |req: Request<Incoming>| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.handle(req, peer).await) }
            });
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            if let Err(e) = watcher
                .watch(b.serve_connection(TokioIo::new(tcp), svc))
                .await
            {
                tracing::debug!(%remote, error = %e, "admin connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("admin listener: shutdown grace elapsed");
    }
}
