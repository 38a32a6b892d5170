//! `/bff/login` and `/bff/callback`: the OIDC authorization code flow with PKCE (RFC 7636) for a
//! confidential client.
//!
//! The login in progress (state, nonce, PKCE verifier, return URL) travels in its own encrypted,
//! short-lived `SameSite=Lax` cookie named `<session cookie>-login-<first 16 characters of state>`,
//! so the cross-site redirect back from the provider carries it and several tabs can log in at
//! once. A consumed state is remembered until the cookie would have expired: replaying a callback
//! never reaches the token endpoint.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Auth;
use super::id_token::{self, Expected};
use super::issuer::IssuerKind;
use super::oidc::OidcError;
use super::refresh::login_claims;
use crate::body::{self, Body, escape_html};
use crate::error::Error;
use crate::metrics::LoginResult;
use crate::proxy::headers;
use crate::secret::{self, Secret};
use crate::session::store::{EndReason, OnceSet};
use crate::session::{self, Lookup, SessionData, Sessions};

/// How long a login may take from `/bff/login` to `/bff/callback`.
pub const LOGIN_TTL: Duration = Duration::from_secs(600);
/// Longest accepted `returnUrl`.
const MAX_RETURN_URL: usize = 2048;
/// Characters of `state` that name the login cookie.
const STATE_PREFIX: usize = 16;

#[derive(Serialize, Deserialize)]
struct Transaction {
    state: Secret,
    nonce: Secret,
    verifier: Secret,
    return_url: String,
    created_at: u64,
    /// The public handle of the session this browser held when the login started. `/bff/login`
    /// is a same-site navigation, which carries the `SameSite=Strict` session cookie; the
    /// callback arrives cross-site without it, so this is how the callback knows which session
    /// the new login replaces.
    #[serde(default)]
    previous: Option<String>,
}

fn login_cookie_name(base: &str, state: &str) -> String {
    format!("{base}-login-{}", &state[..STATE_PREFIX.min(state.len())])
}

/// Checks a `returnUrl`: a same-origin path (`/…`), never `//host`, `/\host`, a scheme, control
/// characters or whitespace — also after one round of percent-decoding.
pub fn safe_return_url(raw: &str) -> Option<&str> {
    let ok = |s: &str| {
        s.starts_with('/')
            && !s.starts_with("//")
            && !s.starts_with("/\\")
            && !s.contains('\\')
            && !s.chars().any(|c| c.is_control() || c.is_whitespace())
    };
    let decoded: String =
        url::form_urlencoded::parse(format!("x={}", raw.replace('+', "%2B")).as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
    (raw.len() <= MAX_RETURN_URL && ok(raw) && ok(&decoded)).then_some(raw)
}

fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    let q = req.uri().query()?;
    url::form_urlencoded::parse(q.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// `GET /bff/login?returnUrl=/path`.
pub(crate) async fn start(auth: &Auth, req: Request<Incoming>) -> Result<Response<Body>, Error> {
    let return_url = match query_param(&req, "returnUrl") {
        None => "/".to_owned(),
        Some(r) => safe_return_url(&r)
            .ok_or_else(|| Error::BadRequest("returnUrl must be a local path such as /app".into()))?
            .to_owned(),
    };
    let state = secret::random_token(32);
    let nonce = secret::random_token(32);
    let verifier = secret::random_token(32);
    let challenge = URL_SAFE_NO_PAD.encode(secret::sha256(verifier.as_bytes()));
    let location = auth.oidc()?.authorize_url(&state, &nonce, &challenge)?;
    let name = login_cookie_name(auth.cookie_name(), &state);
    let previous = match auth.lookup(req.headers()).await {
        Ok(Lookup::Live(s)) => Some(s.handle().to_string()),
        _ => None,
    };
    let tx = Transaction {
        state: Secret::new(state),
        nonce: Secret::new(nonce),
        verifier: Secret::new(verifier),
        return_url,
        created_at: session::now(),
        previous,
    };
    let sealed = secret::seal(
        auth.sessions.keys().login_key(),
        name.as_bytes(),
        &serde_json::to_vec(&tx).map_err(Error::internal)?,
    );
    let cookie = format!(
        "{name}={}; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age={}",
        URL_SAFE_NO_PAD.encode(sealed),
        LOGIN_TTL.as_secs()
    );
    let mut res = body::redirect(StatusCode::FOUND, &location);
    let mut v = HeaderValue::from_str(&cookie).map_err(Error::internal)?;
    v.set_sensitive(true);
    res.headers_mut().append(header::SET_COOKIE, v);
    Ok(res)
}

fn clear_login_cookie(name: &str) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{name}=; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=0"
    ))
    .unwrap_or(HeaderValue::from_static("x=; Max-Age=0"))
}

/// The HTML page at the end of a failed login (DESIGN §5's one non-JSON error).
fn failure(status: StatusCode, reason: &str, cookie_to_clear: Option<&str>) -> Response<Body> {
    let page = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Sign-in failed</title></head>\
         <body><h1>Sign-in failed</h1><p>{}</p><p><a href=\"/bff/login\">Try again</a></p></body></html>",
        escape_html(reason)
    );
    let mut res = body::html(status, page);
    if let Some(name) = cookie_to_clear {
        res.headers_mut()
            .append(header::SET_COOKIE, clear_login_cookie(name));
    }
    res
}

/// `GET /bff/callback?code=…&state=…`.
pub(crate) async fn callback(auth: &Auth, req: Request<Incoming>) -> Result<Response<Body>, Error> {
    let state = query_param(&req, "state").unwrap_or_default();
    let valid_state = state.len() >= STATE_PREFIX
        && state
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    let name = valid_state.then(|| login_cookie_name(auth.cookie_name(), &state));
    let outcome = match verified(auth, &req, &state, name.as_deref()).await {
        Ok(Ok(tx)) => exchanged(auth, &req, tx).await,
        Ok(Err(refusal)) => Ok(Err(refusal)),
        Err(e) => Err(e),
    };
    let (res, result) = match outcome {
        Ok(Ok(login)) => {
            let res = start_session(auth, &req, login, name.as_deref().unwrap_or_default()).await;
            (res, LoginResult::Ok)
        }
        Ok(Err(Refusal::Bad(reason, result))) => (
            Ok(failure(StatusCode::BAD_REQUEST, &reason, name.as_deref())),
            result,
        ),
        Ok(Err(Refusal::Unavailable(result))) => (
            Ok(failure(
                StatusCode::SERVICE_UNAVAILABLE,
                "The identity provider is unavailable. Please try again shortly.",
                name.as_deref(),
            )),
            result,
        ),
        Err(e) => (Err(e), LoginResult::InvalidRequest),
    };
    // `coatcheck_logins_total{result}`: errors by the side that failed.
    let result = match &res {
        Err(Error::StoreUnavailable(_)) => LoginResult::StoreUnavailable,
        Err(Error::IdpUnavailable { .. }) => LoginResult::IdpUnavailable,
        Err(_) if result == LoginResult::Ok => LoginResult::InvalidRequest,
        _ => result,
    };
    auth.metrics.login(result);
    res
}

/// Why a callback is refused: the sign-in page's message (400), or the provider is unavailable;
/// with the result it counts as.
enum Refusal {
    Bad(String, LoginResult),
    Unavailable(LoginResult),
}

fn refuse<T>(reason: &str) -> Result<Result<T, Refusal>, Error> {
    refuse_as(reason, LoginResult::InvalidRequest)
}

fn refuse_as<T>(reason: &str, result: LoginResult) -> Result<Result<T, Refusal>, Error> {
    Ok(Err(Refusal::Bad(reason.to_owned(), result)))
}

/// The provider's answer as it arrived: not an error, this browser's login (cookie, state, age),
/// used once across every instance, from the provider that was asked (RFC 9207).
async fn verified(
    auth: &Auth,
    req: &Request<Incoming>,
    state: &str,
    name: Option<&str>,
) -> Result<Result<Transaction, Refusal>, Error> {
    if let Some(error) = query_param(req, "error") {
        let description = query_param(req, "error_description").unwrap_or_default();
        tracing::info!(error = %error.chars().take(64).collect::<String>(), "the identity provider refused the login");
        return refuse_as(
            &format!(
                "The identity provider answered: {} {}",
                error.chars().take(64).collect::<String>(),
                description.chars().take(256).collect::<String>()
            ),
            LoginResult::Denied,
        );
    }
    let Some(name) = name else {
        return refuse("The sign-in answer has no valid state.");
    };
    let Some(cookie) = headers::cookie(req.headers(), name) else {
        return refuse(
            "This sign-in was not started in this browser, or it took too long. Please start again.",
        );
    };
    let Some(tx) = open_transaction(auth, name, cookie) else {
        return refuse("The sign-in cookie is not valid.");
    };
    if session::now().saturating_sub(tx.created_at) > LOGIN_TTL.as_secs() {
        return refuse("The sign-in took too long. Please start again.");
    }
    if !secret::constant_time_eq(tx.state.expose().as_bytes(), state.as_bytes()) {
        return refuse("The sign-in answer does not match this browser's sign-in.");
    }
    // First use wins, on every instance at once: of several deliveries of the same answer racing
    // each other only one reaches the token endpoint.
    let once_key = format!("state:{}", secret::hex(&secret::sha256(state.as_bytes())));
    if !auth.once().first_use(&once_key, LOGIN_TTL).await? {
        return refuse("This sign-in answer was already used.");
    }
    let meta = auth.oidc()?.metadata()?;
    // RFC 9207 §2.4: `iss` must be the provider's issuer, byte for byte; a provider that
    // advertises the parameter always sends it, so its absence is a mix-up attempt.
    match query_param(req, "iss") {
        Some(iss) if iss.as_bytes() != meta.issuer.as_bytes() => {
            refuse("The sign-in answer comes from another identity provider.")
        }
        None if meta.authorization_response_iss_parameter_supported => {
            refuse("The sign-in answer does not name its identity provider.")
        }
        _ => Ok(Ok(tx)),
    }
}

/// A login whose code was exchanged and whose ID token passed every check.
struct Exchanged {
    tx: Transaction,
    tokens: super::oidc::TokenResponse,
    id_token: Secret,
    claims: serde_json::Map<String, Value>,
}

/// Exchanges the code (RFC 7636 verifier) and validates the ID token against the login's nonce.
async fn exchanged(
    auth: &Auth,
    req: &Request<Incoming>,
    tx: Transaction,
) -> Result<Result<Exchanged, Refusal>, Error> {
    let Some(code) = query_param(req, "code").filter(|c| !c.is_empty()) else {
        return refuse("The sign-in answer has no code.");
    };
    let mut tokens = match auth
        .oidc()?
        .exchange_code(&Secret::new(code), &tx.verifier)
        .await
    {
        Ok(t) => t,
        Err(e @ (OidcError::Unavailable(_) | OidcError::Invalid(_))) => {
            tracing::warn!(error = %e, "code exchange failed");
            let result = if super::refresh::is_timeout(&e) {
                LoginResult::Timeout
            } else {
                LoginResult::IdpUnavailable
            };
            return Ok(Err(Refusal::Unavailable(result)));
        }
        Err(e) => {
            tracing::info!(error = %e, "code exchange refused");
            return refuse_as(
                "The identity provider refused the sign-in code.",
                LoginResult::InvalidGrant,
            );
        }
    };
    let Some(id_token) = tokens.id_token.take() else {
        return refuse_as(
            "The identity provider sent no ID token.",
            LoginResult::InvalidToken,
        );
    };
    let expected = Expected {
        nonce: Some(tx.nonce.expose()),
    };
    match id_token::validate(auth.oidc()?, id_token.expose(), expected).await {
        Ok(claims) => Ok(Ok(Exchanged {
            tx,
            tokens,
            id_token,
            claims,
        })),
        Err(Ok(e)) => {
            tracing::warn!(error = %e, "ID token refused at login");
            refuse_as(
                "The identity provider's ID token is not valid.",
                LoginResult::InvalidToken,
            )
        }
        Err(Err(e)) => Err(e),
    }
}

/// A new session for a verified login (the browser's previous one ends), then the bounce page.
async fn start_session(
    auth: &Auth,
    req: &Request<Incoming>,
    login: Exchanged,
    name: &str,
) -> Result<Response<Body>, Error> {
    let Exchanged {
        tx,
        tokens,
        id_token,
        claims,
    } = login;
    let sub = claims
        .get("sub")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let idp_sid = claims.get("sid").and_then(Value::as_str).map(str::to_owned);
    // The session the browser held before this login is retired: a new login always means a new
    // session. With SameSite=Strict the callback carries no session cookie, so the session named
    // at /bff/login (sealed in the login cookie) is the one that ends; with Lax, the cookie itself.
    if let Some(previous) = &tx.previous {
        let _ = auth.sessions.delete(previous, EndReason::Logout).await;
    }
    if let Ok(Lookup::Live(old)) = auth.lookup(req.headers()).await {
        let _ = auth.sessions.delete(&old.handle(), EndReason::Logout).await;
    }
    let data = SessionData {
        iss: auth.oidc()?.metadata()?.issuer.clone(),
        sub,
        claims: login_claims(claims),
        issuer: IssuerKind::Oidc,
        id_token: Some(id_token),
        access_token: tokens.access_token,
        access_expires_at: tokens.access_expires_at,
        access_issued_at: session::now(),
        refresh_token: tokens.refresh_token,
    };
    let (value, created) = auth
        .sessions
        .create(
            data,
            Sessions::user_agent(req.headers()),
            idp_sid.as_deref(),
        )
        .await?;
    tracing::info!(session = %created.handle(), "login complete; session created");
    Ok(bounce(
        &tx.return_url,
        auth.sessions.set_cookie(&value),
        clear_login_cookie(name),
    ))
}

fn open_transaction(auth: &Auth, name: &str, cookie: &str) -> Option<Transaction> {
    let sealed = URL_SAFE_NO_PAD.decode(cookie).ok()?;
    auth.sessions
        .keys()
        .login_keys()
        .find_map(|k| secret::open(k, name.as_bytes(), &sealed))
        .and_then(|plain| serde_json::from_slice(&plain).ok())
}

/// A same-site bounce page: the callback arrives as a cross-site navigation, on which browsers
/// withhold `SameSite=Strict` cookies; this page's own navigation is same-site, so the new session
/// cookie is sent on the very first page.
fn bounce(
    return_url: &str,
    session_cookie: HeaderValue,
    clear_login: HeaderValue,
) -> Response<Body> {
    let target = escape_html(return_url);
    let page = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"0;url={target}\">\
         <title>Signed in</title></head><body><p>Signed in. <a href=\"{target}\">Continue</a></p></body></html>"
    );
    let mut res = body::html(StatusCode::OK, page);
    res.headers_mut().append(header::SET_COOKIE, session_cookie);
    res.headers_mut().append(header::SET_COOKIE, clear_login);
    res
}

#[cfg(test)]
mod tests {
    use super::safe_return_url;

    #[test]
    fn only_local_paths_are_accepted_as_return_urls() {
        for ok in ["/", "/app", "/app?x=1&y=%2F", "/a/b#frag"] {
            assert!(safe_return_url(ok).is_some(), "{ok}");
        }
        for bad in [
            "//evil.test",
            "/\\evil.test",
            "https:evil.test",
            "https://evil.test",
            "evil",
            "/%2F/evil.test",
            "/%5Cevil",
            "/ /x",
            "/\t/evil",
            "%2F%2Fevil",
            "",
        ] {
            assert!(safe_return_url(bad).is_none(), "{bad}");
        }
    }
}
