//! A legacy API with its own JSON login: the upstream for session capture (`[capture]`) tests and
//! the demo (`cargo run --example legacy_api`, which includes this very file).
//!
//! A real hyper HTTP/1.1 server on `127.0.0.1:0` (or a given address). Everything it does is
//! counted ([`LegacyApi::counts`]) and every request is recorded with its headers and body
//! ([`LegacyApi::seen`]), so a test can check what coatcheck sent and what it kept to itself.
//!
//! | request | answer |
//! |---|---|
//! | `POST /auth/login` `{"username", "password"}` | `200 {"access_token", "refresh_token", "expires_in", "token_type": "Bearer", "user": {"id", "name", "email"}}`; wrong credentials → `401 {"error": "invalid_credentials", "message"}`; a body that is not that JSON → `400 {"error": "bad_request", "message"}` |
//! | `POST /auth/refresh` `{"refresh_token"}` | `200` with a **new pair** (same shape as the login, `user` included). Rotation: the presented token is spent. Presenting a spent token again is **reuse**: `401 {"error": "invalid_grant"}` and the whole family (every token descended from that login) is revoked, so the newest token dies too. Unknown or revoked token → `401 invalid_grant` |
//! | `POST /auth/logout` `{"refresh_token"}` | `204`; the token's family is revoked (unknown token: `204` all the same, RFC 7009 §2.2 style) |
//! | `GET` (any method) `/api/*` | needs `Authorization: Bearer <access token>`: signature (HS256 with the server's key) and `exp` (no leeway) are checked. Missing → `401` with `WWW-Authenticate: Bearer`; invalid or expired → `401` with `WWW-Authenticate: Bearer error="invalid_token"`. Valid → `200 {"claims": {...}, "method", "path"}` |
//! | `GET /` | the team's single-page app: a login form that posts with `fetch` (with the `X-CSRF` header coatcheck asks for) and — old habit — stores whatever `access_token` the answer holds in `localStorage`, then calls `/api/me` |
//! | anything else | `404 {"error": "not_found"}` |
//!
//! Access tokens are HS256 JWTs with `sub` (the user id), `name`, `roles`, `iat` and `exp`
//! (`iat` + [`LegacyOptions::access_ttl`], 4 s by default so tests see expiry). Refresh tokens are
//! 256 random bits, base64url, opaque. Users: [`USERS`] (`alice`/`alice-pw` with roles `["user"]`,
//! `bob`/`bob-pw` with `["user", "admin"]`).
//!
//! For capture tests: the answers hold the tokens at `/access_token`, `/refresh_token` and
//! `/expires_in` (the default JSON Pointers of `[capture]`), `user` is what should pass through to
//! the browser, [`LegacyOptions::expires_in`] = `false` leaves `expires_in` out (coatcheck must
//! then read the token's `exp`), [`LegacyApi::revoke_user`] ends a user's refresh tokens behind
//! coatcheck's back, and [`LegacyApi::mint_access_token`] makes tokens with any lifetime (expired
//! ones included).
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// One account: (id = `sub`, password, display name, email, roles).
pub struct User {
    pub id: &'static str,
    pub password: &'static str,
    pub name: &'static str,
    pub email: &'static str,
    pub roles: &'static [&'static str],
}

/// The accounts the API knows; the username is the id.
pub const USERS: &[User] = &[
    User {
        id: "alice",
        password: "alice-pw",
        name: "Alice Liddell",
        email: "alice@example.test",
        roles: &["user"],
    },
    User {
        id: "bob",
        password: "bob-pw",
        name: "Bob Builder",
        email: "bob@example.test",
        roles: &["user", "admin"],
    },
];

/// Largest request body read (login and refresh bodies are tiny).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// How to start the API.
#[derive(Clone, Debug)]
pub struct LegacyOptions {
    /// Where to listen; port 0 picks a free one.
    pub addr: SocketAddr,
    /// Access-token lifetime (whole seconds); default 4 s.
    pub access_ttl: Duration,
    /// Whether login and refresh answers carry `expires_in` (default true).
    pub expires_in: bool,
}

impl Default for LegacyOptions {
    fn default() -> Self {
        LegacyOptions {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            access_ttl: Duration::from_secs(4),
            expires_in: true,
        }
    }
}

/// What the API has done since it started.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub logins: u64,
    pub login_failures: u64,
    /// Refreshes that issued a new pair.
    pub refreshes: u64,
    /// Refreshes refused because the token was unknown, revoked or malformed.
    pub refresh_refused: u64,
    /// Refreshes that presented a spent token (the family was revoked).
    pub refresh_reuse: u64,
    pub logouts: u64,
    /// `/api/*` requests answered 200.
    pub api_calls: u64,
    /// `/api/*` requests refused with 401.
    pub api_unauthorized: u64,
}

/// One request as it arrived.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    /// Path and query as received.
    pub uri: String,
    /// Header names (lowercase) and values, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Seen {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The path without the query.
    pub fn path(&self) -> &str {
        self.uri.split('?').next().unwrap_or_default()
    }

    /// The body as JSON (`Null` if it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// One refresh token.
struct RefreshRecord {
    family: u64,
    spent: bool,
}

/// One login's chain of refresh tokens.
struct Family {
    user: &'static User,
    revoked: bool,
}

#[derive(Default)]
struct Tokens {
    refresh: HashMap<String, RefreshRecord>,
    families: HashMap<u64, Family>,
    next_family: u64,
}

struct State {
    opts: LegacyOptions,
    key: Vec<u8>,
    tokens: Mutex<Tokens>,
    counts: Mutex<Counts>,
    seen: Mutex<Vec<Seen>>,
}

/// The access token's claims.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub name: String,
    pub roles: Vec<String>,
    pub iat: u64,
    pub exp: u64,
}

/// A running legacy API; stops accepting when dropped.
pub struct LegacyApi {
    pub addr: SocketAddr,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

impl Drop for LegacyApi {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl LegacyApi {
    /// Starts the API with default options on a free loopback port.
    pub async fn start() -> LegacyApi {
        Self::start_with(LegacyOptions::default()).await
    }

    /// Starts the API; panics if the address cannot be bound.
    pub async fn start_with(opts: LegacyOptions) -> LegacyApi {
        let listener = TcpListener::bind(opts.addr)
            .await
            .unwrap_or_else(|e| panic!("binding the legacy API to {}: {e}", opts.addr));
        let addr = listener.local_addr().expect("bound address");
        let state = Arc::new(State {
            key: random_bytes(32),
            opts,
            tokens: Mutex::default(),
            counts: Mutex::default(),
            seen: Mutex::default(),
        });
        let st = state.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(handle(&st, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        LegacyApi {
            addr,
            state,
            accept,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A snapshot of the counters.
    pub fn counts(&self) -> Counts {
        self.state.counts.lock().unwrap().clone()
    }

    /// Every request so far, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// The last request, if any.
    pub fn last(&self) -> Option<Seen> {
        self.state.seen.lock().unwrap().last().cloned()
    }

    /// Revokes every refresh token family of `user` (as an administrator would); returns how many
    /// families were live.
    pub fn revoke_user(&self, user: &str) -> usize {
        let mut t = self.state.tokens.lock().unwrap();
        let mut n = 0;
        for f in t.families.values_mut() {
            if f.user.id == user && !f.revoked {
                f.revoked = true;
                n += 1;
            }
        }
        n
    }

    /// How many refresh token families of `user` are live.
    pub fn live_families(&self, user: &str) -> usize {
        let t = self.state.tokens.lock().unwrap();
        t.families
            .values()
            .filter(|f| f.user.id == user && !f.revoked)
            .count()
    }

    /// An access token for `user` signed with the API's key, expiring `ttl_secs` from now
    /// (negative: already expired).
    pub fn mint_access_token(&self, user: &str, ttl_secs: i64) -> String {
        let u = find_user(user).unwrap_or_else(|| panic!("unknown user {user}"));
        let now = unix_now();
        sign(
            &self.state.key,
            &Claims {
                sub: u.id.into(),
                name: u.name.into(),
                roles: u.roles.iter().map(|r| r.to_string()).collect(),
                iat: now,
                exp: now.saturating_add_signed(ttl_secs),
            },
        )
    }

    /// Verifies an access token as `/api/*` does.
    pub fn verify(&self, token: &str) -> Result<Claims, String> {
        verify(&self.state.key, token)
    }
}

fn find_user(id: &str) -> Option<&'static User> {
    USERS.iter().find(|u| u.id == id)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    aws_lc_rs::rand::fill(&mut b).expect("system randomness");
    b
}

fn sign(key: &[u8], claims: &Claims) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(key),
    )
    .expect("HS256 signing")
}

fn verify(key: &[u8], token: &str) -> Result<Claims, String> {
    let mut v = Validation::new(Algorithm::HS256);
    v.leeway = 0;
    v.set_required_spec_claims(&["exp", "sub"]);
    jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(key), &v)
        .map(|d| d.claims)
        .map_err(|e| e.to_string())
}

type Answer = Response<Full<Bytes>>;

/// The single-page app served at `/`. After the login it shows what a script on the page can see:
/// the login answer, `document.cookie` and `localStorage` (the browser test reads `window.*`).
pub const SPA: &str = r#"<!doctype html><meta charset="utf-8"><title>legacy SPA</title>
<h1>Legacy SPA</h1>
<p><input id="username" placeholder="alice"> <input id="password" type="password" placeholder="alice-pw">
<button id="login">Log in</button></p>
<pre id="out"></pre><pre id="done"></pre>
<script>
document.querySelector('#login').onclick = async () => {
  const h = { 'Content-Type': 'application/json', 'X-CSRF': '1' };
  const r = await fetch('/auth/login', { method: 'POST', headers: h, body: JSON.stringify({
    username: document.querySelector('#username').value,
    password: document.querySelector('#password').value }) });
  window.loginStatus = r.status;
  window.loginAnswer = await r.json();
  if (window.loginAnswer.access_token) localStorage.setItem('access_token', window.loginAnswer.access_token);
  const a = await fetch('/api/me', { headers: { 'X-CSRF': '1' } });
  window.apiStatus = a.status;
  window.apiAnswer = await a.json();
  document.querySelector('#out').textContent = JSON.stringify({
    login: window.loginAnswer, api: window.apiAnswer,
    document_cookie: document.cookie, local_storage: { ...localStorage } }, null, 2);
  document.querySelector('#done').textContent = 'yes';
};
</script>"#;

fn json_answer(status: StatusCode, body: &Value) -> Answer {
    let mut res = Response::new(Full::new(Bytes::from(body.to_string())));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

fn error(status: StatusCode, code: &str, message: &str) -> Answer {
    json_answer(status, &json!({"error": code, "message": message}))
}

async fn handle(st: &State, req: Request<Incoming>) -> Answer {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "bad_request",
                "body too large",
            );
        }
    };
    st.seen.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        uri: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |p| p.to_string()),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.clone(),
    });
    let path = parts.uri.path();
    match (&parts.method, path) {
        (&Method::POST, "/auth/login") => login(st, &body),
        (&Method::POST, "/auth/refresh") => refresh(st, &body),
        (&Method::POST, "/auth/logout") => logout(st, &body),
        (_, p) if p == "/api" || p.starts_with("/api/") => api(st, &parts),
        (&Method::GET, "/") => {
            let mut res = Response::new(Full::new(Bytes::from_static(SPA.as_bytes())));
            res.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            res
        }
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such endpoint"),
    }
}

#[derive(Deserialize)]
struct LoginBody {
    username: String,
    password: String,
}

#[derive(Deserialize)]
struct RefreshBody {
    refresh_token: String,
}

/// A new access token and a new refresh token in `family`: the login/refresh answer.
fn issue(st: &State, t: &mut Tokens, family: u64, user: &'static User) -> Answer {
    let now = unix_now();
    let ttl = st.opts.access_ttl.as_secs();
    let access = sign(
        &st.key,
        &Claims {
            sub: user.id.into(),
            name: user.name.into(),
            roles: user.roles.iter().map(|r| r.to_string()).collect(),
            iat: now,
            exp: now + ttl,
        },
    );
    let refresh = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes(32));
    t.refresh.insert(
        refresh.clone(),
        RefreshRecord {
            family,
            spent: false,
        },
    );
    let mut body = json!({
        "access_token": access,
        "refresh_token": refresh,
        "token_type": "Bearer",
        "user": {"id": user.id, "name": user.name, "email": user.email},
    });
    if st.opts.expires_in {
        body["expires_in"] = json!(ttl);
    }
    json_answer(StatusCode::OK, &body)
}

fn login(st: &State, body: &[u8]) -> Answer {
    let Ok(b) = serde_json::from_slice::<LoginBody>(body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "send {\"username\": ..., \"password\": ...}",
        );
    };
    let user = find_user(&b.username).filter(|u| u.password == b.password);
    let Some(user) = user else {
        st.counts.lock().unwrap().login_failures += 1;
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid_credentials",
            "wrong username or password",
        );
    };
    st.counts.lock().unwrap().logins += 1;
    let mut t = st.tokens.lock().unwrap();
    t.next_family += 1;
    let family = t.next_family;
    t.families.insert(
        family,
        Family {
            user,
            revoked: false,
        },
    );
    issue(st, &mut t, family, user)
}

fn refresh(st: &State, body: &[u8]) -> Answer {
    let refused = |why: &str| error(StatusCode::UNAUTHORIZED, "invalid_grant", why);
    let Ok(b) = serde_json::from_slice::<RefreshBody>(body) else {
        st.counts.lock().unwrap().refresh_refused += 1;
        return refused("send {\"refresh_token\": ...}");
    };
    let mut guard = st.tokens.lock().unwrap();
    let t = &mut *guard;
    let Some(record) = t.refresh.get_mut(&b.refresh_token) else {
        st.counts.lock().unwrap().refresh_refused += 1;
        return refused("unknown refresh token");
    };
    let family = record.family;
    if record.spent {
        // Reuse detection: whoever holds the newer token is not necessarily its owner.
        if let Some(f) = t.families.get_mut(&family) {
            f.revoked = true;
        }
        st.counts.lock().unwrap().refresh_reuse += 1;
        return refused("refresh token already used; every token of this login is revoked");
    }
    record.spent = true;
    let Some(f) = t.families.get(&family).filter(|f| !f.revoked) else {
        st.counts.lock().unwrap().refresh_refused += 1;
        return refused("refresh token revoked");
    };
    let user = f.user;
    st.counts.lock().unwrap().refreshes += 1;
    issue(st, t, family, user)
}

fn logout(st: &State, body: &[u8]) -> Answer {
    let Ok(b) = serde_json::from_slice::<RefreshBody>(body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "send {\"refresh_token\": ...}",
        );
    };
    st.counts.lock().unwrap().logouts += 1;
    let mut t = st.tokens.lock().unwrap();
    if let Some(family) = t.refresh.get(&b.refresh_token).map(|r| r.family)
        && let Some(f) = t.families.get_mut(&family)
    {
        f.revoked = true;
    }
    let mut res = Response::new(Full::new(Bytes::new()));
    *res.status_mut() = StatusCode::NO_CONTENT;
    res
}

fn api(st: &State, parts: &http::request::Parts) -> Answer {
    let unauthorized = |challenge: &'static str, why: &str| {
        st.counts.lock().unwrap().api_unauthorized += 1;
        let mut res = error(StatusCode::UNAUTHORIZED, "unauthorized", why);
        res.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(challenge),
        );
        res
    };
    // RFC 6750 §3.1: no error code when the request carried no credentials at all.
    let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
        return unauthorized("Bearer", "an access token is required");
    };
    let token = value.to_str().ok().and_then(|v| {
        v.strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
    });
    let claims = match token.map(|t| verify(&st.key, t)) {
        Some(Ok(c)) => c,
        Some(Err(why)) => return unauthorized("Bearer error=\"invalid_token\"", &why),
        None => {
            return unauthorized(
                "Bearer error=\"invalid_token\"",
                "the Authorization header is not a bearer token",
            );
        }
    };
    st.counts.lock().unwrap().api_calls += 1;
    json_answer(
        StatusCode::OK,
        &json!({
            "claims": claims,
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
        }),
    )
}
