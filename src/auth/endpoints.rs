//! coatcheck's own `/bff/*` endpoints (DESIGN §3) other than login and callback: user, logout,
//! sessions (devices), logout-all and the back-channel logout receiver.

use std::time::{Duration, UNIX_EPOCH};

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{Value, json};

use super::issuer::Issuer;
use super::{Auth, id_token, login};
use crate::body::{self, Body};
use crate::config::CsrfMode;
use crate::error::Error;
use crate::metrics::BackchannelResult;
use crate::proxy::headers::FieldScan;
use crate::secret::{self, Secret};
use crate::session::store::{EndReason, OnceSet, Record};
use crate::session::{self, Lookup, Session, subject_key};

/// How long logout waits for the provider to revoke the refresh token.
const REVOKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest back-channel logout request body.
const MAX_LOGOUT_BODY: usize = 64 * 1024;

/// Routes a `/bff/*` request.
pub(crate) async fn dispatch(
    auth: &Auth,
    req: Request<Incoming>,
    path: &str,
) -> Result<Response<Body>, Error> {
    let method = req.method().clone();
    match (method, path) {
        (Method::GET, "/bff/login") => login::start(auth, req).await,
        (Method::GET, "/bff/callback") => login::callback(auth, req).await,
        (Method::GET, "/bff/user") => user(auth, req).await,
        (Method::GET, "/bff/logout") => logout_get(auth, req).await,
        (Method::POST, "/bff/logout") => logout_post(auth, req).await,
        (Method::GET, "/bff/sessions") => sessions(auth, req).await,
        (Method::DELETE, p) if p.starts_with("/bff/sessions/") => {
            delete_session(auth, req, &p["/bff/sessions/".len()..]).await
        }
        (Method::POST, "/bff/logout-all") => logout_all(auth, req).await,
        (Method::POST, "/bff/backchannel-logout") => backchannel_logout(auth, req).await,
        (Method::GET, "/bff/events") => events(auth, req).await,
        (_, "/bff/login" | "/bff/callback" | "/bff/user" | "/bff/sessions" | "/bff/events") => {
            Err(Error::MethodNotAllowed {
                allow: "GET".into(),
            })
        }
        (_, "/bff/logout") => Err(Error::MethodNotAllowed {
            allow: "GET, POST".into(),
        }),
        (_, "/bff/logout-all" | "/bff/backchannel-logout") => Err(Error::MethodNotAllowed {
            allow: "POST".into(),
        }),
        _ => Err(Error::NotFound),
    }
}

/// JSON endpoints need the CSRF header and a same-site origin.
fn csrf(auth: &Auth, req: &Request<Incoming>) -> Result<(), Error> {
    auth.csrf().check(
        req.headers(),
        FieldScan::UNKNOWN,
        req.method(),
        CsrfMode::All,
        false,
    )
}

fn rfc3339(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

fn logout_url(s: &Session) -> String {
    format!("/bff/logout?sid={}", s.handle())
}

async fn user(auth: &Auth, req: Request<Incoming>) -> Result<Response<Body>, Error> {
    csrf(auth, &req)?;
    let s = auth.require_session(&req).await?;
    Ok(body::json(
        StatusCode::OK,
        &json!({
            "sub": s.sub(),
            "claims": s.claims().to_map(),
            "session": {
                "id": s.handle().as_str(),
                "created_at": rfc3339(s.created_at),
                "expires_at": rfc3339(s.absolute_expires_at),
                "idle_expires_at": rfc3339(s.idle_expires_at(auth.sessions.idle)),
            },
            "logout_url": logout_url(&s),
        }),
    ))
}

/// Ends a session: store and cache, then (best effort, bounded) the refresh token at the provider.
/// Returns where the browser should go next.
async fn end_session(auth: &Auth, s: &Session) -> Result<String, Error> {
    auth.sessions.delete(&s.handle(), EndReason::Logout).await?;
    if let Some(rt) = &s.refresh_token() {
        let revoke = async { auth.issuers.get(s.issuer())?.revoke(rt).await };
        match tokio::time::timeout(REVOKE_TIMEOUT, revoke).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(session = %s.handle(), error = %e, "refresh token revocation failed; the session is ended locally")
            }
            Err(_) => {
                tracing::warn!(session = %s.handle(), "refresh token revocation timed out; the session is ended locally")
            }
        }
    }
    tracing::info!(session = %s.handle(), "logged out");
    Ok(match auth.issuers.get(s.issuer()) {
        Ok(issuer) => issuer.logout_url(&s.full_data(), &secret::random_token(16)),
        Err(_) => auth.post_logout_redirect().to_owned(),
    })
}

async fn logout_get(auth: &Auth, req: Request<Incoming>) -> Result<Response<Body>, Error> {
    let sid = url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .find(|(k, _)| k == "sid")
        .map(|(_, v)| v.into_owned());
    let session = match auth.lookup(req.headers()).await? {
        Lookup::Live(s) => s,
        // Nothing to end: go where a logout would have gone (forgetting a dead ticket).
        Lookup::Ended => {
            let mut res = body::redirect(StatusCode::FOUND, auth.post_logout_redirect());
            res.headers_mut()
                .append(header::SET_COOKIE, auth.clear_session_cookie());
            return Ok(res);
        }
        Lookup::None => {
            return Ok(body::redirect(
                StatusCode::FOUND,
                auth.post_logout_redirect(),
            ));
        }
    };
    // A cross-site <img src=/bff/logout> cannot know the session's id: it ends nothing.
    if !sid.is_some_and(|sid| secret::constant_time_eq(sid.as_bytes(), session.handle().as_bytes()))
    {
        return Err(Error::BadRequest(
            "sid does not name the current session".into(),
        ));
    }
    let next = end_session(auth, &session).await?;
    let mut res = body::redirect(StatusCode::FOUND, &next);
    res.headers_mut()
        .append(header::SET_COOKIE, auth.clear_session_cookie());
    Ok(res)
}

async fn logout_post(auth: &Auth, req: Request<Incoming>) -> Result<Response<Body>, Error> {
    csrf(auth, &req)?;
    let next = match auth.lookup(req.headers()).await? {
        Lookup::Live(s) => end_session(auth, &s).await?,
        _ => auth.post_logout_redirect().to_owned(),
    };
    let mut res = body::json(StatusCode::OK, &json!({"logout_url": next}));
    res.headers_mut()
        .append(header::SET_COOKIE, auth.clear_session_cookie());
    Ok(res)
}

async fn sessions(auth: &Auth, req: Request<Incoming>) -> Result<Response<Body>, Error> {
    csrf(auth, &req)?;
    let s = auth.require_session(&req).await?;
    let records = auth.sessions.list(&s.subject()).await?;
    Ok(body::json(
        StatusCode::OK,
        &session_list(records, Some(s.handle().as_str())),
    ))
}

/// `{"sessions": [...]}`, newest first: the answer of `GET /bff/sessions` (and of the admin API's
/// `GET /sessions`, where no session is the caller's `current` one).
pub(crate) fn session_list(records: Vec<Record>, current: Option<&str>) -> Value {
    let mut list: Vec<Value> = records
        .into_iter()
        .map(|r| {
            json!({
                "id": r.handle,
                "created_at": rfc3339(r.created_at),
                "last_seen": rfc3339(r.last_seen),
                "expires_at": rfc3339(r.absolute_expires_at),
                "idle_expires_at": rfc3339(r.expires_at()),
                "user_agent": r.user_agent,
                "current": current == Some(r.handle.as_str()),
            })
        })
        .collect();
    list.sort_by(|a, b| b["created_at"].as_str().cmp(&a["created_at"].as_str()));
    json!({"sessions": list})
}

async fn delete_session(
    auth: &Auth,
    req: Request<Incoming>,
    id: &str,
) -> Result<Response<Body>, Error> {
    csrf(auth, &req)?;
    let s = auth.require_session(&req).await?;
    // Only the user's own sessions can be named; anything else is indistinguishable from absent.
    if !auth
        .sessions
        .list(&s.subject())
        .await?
        .iter()
        .any(|r| r.handle == id)
    {
        return Err(Error::NotFound);
    }
    // Revoking the current session is a logout: its refresh token is revoked at the provider too.
    // (Other sessions' tokens are sealed under keys only their own cookies hold.)
    if id == s.handle().as_str() {
        end_session(auth, &s).await?;
    } else {
        auth.sessions.delete(id, EndReason::Revoked).await?;
    }
    let mut res = body::json(StatusCode::OK, &json!({"revoked": id}));
    if id == s.handle().as_str() {
        res.headers_mut()
            .append(header::SET_COOKIE, auth.clear_session_cookie());
    }
    Ok(res)
}

async fn logout_all(auth: &Auth, req: Request<Incoming>) -> Result<Response<Body>, Error> {
    csrf(auth, &req)?;
    let s = auth.require_session(&req).await?;
    let next = end_session(auth, &s).await?;
    let revoked = auth
        .sessions
        .delete_subject(&s.subject(), EndReason::Logout)
        .await?
        + 1;
    let mut res = body::json(
        StatusCode::OK,
        &json!({"revoked": revoked, "logout_url": next}),
    );
    res.headers_mut()
        .append(header::SET_COOKIE, auth.clear_session_cookie());
    Ok(res)
}

/// `GET /bff/events`: a `text/event-stream` that says `session-ended` (with the reason) the moment
/// the session ends on any instance, then closes; comment heartbeats meanwhile.
async fn events(auth: &Auth, req: Request<Incoming>) -> Result<Response<Body>, Error> {
    // EventSource cannot send the CSRF header: a GET judged by Origin and Fetch Metadata.
    auth.csrf().check(
        req.headers(),
        FieldScan::UNKNOWN,
        req.method(),
        CsrfMode::UnsafeMethods,
        false,
    )?;
    let s = auth.require_session(&req).await?;
    let watch = auth
        .sessions
        .watch_end(&s)
        .ok_or(Error::TooManyRequests { retry_after: 5 })?;
    let (tx, body) = body::stream(4);
    tokio::spawn(event_stream(auth.sessions.clone(), s, watch, tx));
    let mut res = Response::new(body);
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    // Proxies in front must pass each event at once.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(res)
}

/// How often an idle event stream sends a comment (keeps proxies from timing it out) and checks
/// the session's timeouts.
pub(crate) const EVENTS_HEARTBEAT: Duration = Duration::from_secs(15);

async fn event_stream(
    sessions: std::sync::Arc<crate::session::Sessions>,
    s: std::sync::Arc<Session>,
    mut watch: crate::session::EndWatch,
    tx: tokio::sync::mpsc::Sender<bytes::Bytes>,
) {
    if tx
        .send(bytes::Bytes::from_static(b": connected\n\n"))
        .await
        .is_err()
    {
        return;
    }
    let mut tick = tokio::time::interval(EVENTS_HEARTBEAT);
    tick.tick().await;
    let reason = loop {
        tokio::select! {
            r = watch.ended() => break r,
            _ = tick.tick() => {
                if let Some(r) = sessions.ended_by_now(&s, session::now()).await {
                    break r;
                }
                if tx.send(bytes::Bytes::from_static(b": heartbeat\n\n")).await.is_err() {
                    return;
                }
            }
            () = tx.closed() => return,
        }
    };
    let reason = serde_json::to_string(&json!({ "reason": reason })).unwrap_or_default();
    let _ = tx
        .send(format!("event: session-ended\ndata: {reason}\n\n").into())
        .await;
}

/// OpenID Connect Back-Channel Logout 1.0 §2.5–2.8: the provider posts `logout_token`. Counted in
/// `coatcheck_backchannel_logout_total{result}`.
async fn backchannel_logout(auth: &Auth, req: Request<Incoming>) -> Result<Response<Body>, Error> {
    let mut result = None;
    let res = backchannel_logout_inner(auth, req, &mut result).await;
    let result = result.unwrap_or(match &res {
        Ok(_) => BackchannelResult::Ok,
        Err(Error::StoreUnavailable(_)) => BackchannelResult::StoreUnavailable,
        Err(Error::IdpUnavailable { .. }) => BackchannelResult::IdpUnavailable,
        Err(_) => BackchannelResult::BadRequest,
    });
    auth.metrics.backchannel_logout(result);
    res
}

async fn backchannel_logout_inner(
    auth: &Auth,
    req: Request<Incoming>,
    result: &mut Option<BackchannelResult>,
) -> Result<Response<Body>, Error> {
    let body = Limited::new(req.into_body(), MAX_LOGOUT_BODY)
        .collect()
        .await
        .map_err(|_| {
            Error::BadRequest("the logout request body is unreadable or too large".into())
        })?
        .to_bytes();
    let token = url::form_urlencoded::parse(&body)
        .find(|(k, _)| k == "logout_token")
        .map(|(_, v)| Secret::new(v.into_owned()))
        .ok_or_else(|| Error::BadRequest("logout_token is missing".into()))?;
    let claims = match id_token::validate_logout_token(auth.oidc()?, token.expose()).await {
        Ok(c) => c,
        Err(Ok(e)) => {
            *result = Some(BackchannelResult::InvalidToken);
            return Err(Error::BadRequest(e.to_string()));
        }
        Err(Err(e)) => return Err(e),
    };
    let iss = claims
        .get("iss")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let jti = claims
        .get("jti")
        .and_then(Value::as_str)
        .unwrap_or_default();
    // Refused for as long as the token could be accepted: until its exp (plus the clock skew).
    let valid_for = claims
        .get("exp")
        .and_then(Value::as_u64)
        .unwrap_or(0)
        .saturating_sub(session::now())
        .min(id_token::LOGOUT_TOKEN_MAX_AGE)
        + auth.oidc()?.cfg.clock_skew.as_secs()
        + 1;
    let once_key = format!("jti:{}", subject_key(iss, jti));
    if !auth
        .once()
        .first_use(&once_key, Duration::from_secs(valid_for))
        .await?
    {
        *result = Some(BackchannelResult::Replayed);
        return Err(Error::BadRequest(
            "this logout token was already used".into(),
        ));
    }
    let sid = claims.get("sid").and_then(Value::as_str);
    let ended = match (claims.get("sub").and_then(Value::as_str), sid) {
        (Some(sub), None) => {
            auth.sessions
                .delete_subject(&subject_key(iss, sub), EndReason::Backchannel)
                .await?
        }
        // A sid names the provider session, with or without a sub (§2.4).
        (_, Some(sid)) => {
            auth.sessions
                .delete_idp_session(&subject_key("sid", sid), EndReason::Backchannel)
                .await?
        }
        (None, None) => {
            *result = Some(BackchannelResult::InvalidToken);
            return Err(Error::BadRequest("neither sub nor sid".into()));
        }
    };
    tracing::info!(sessions = ended, at = session::now(), "back-channel logout");
    Ok(body::json(StatusCode::OK, &json!({"ended": ended})))
}
