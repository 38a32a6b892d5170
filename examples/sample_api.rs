//! The sample upstream of the local demo (`scripts/demo`): a single-page app and a tiny API,
//! both served from `http://127.0.0.1:9000` (env `SAMPLE_API_LISTEN` overrides) behind coatcheck.
//!
//! - `GET /` — the app (`examples/sample_app.html`): plain HTML and inline JavaScript, no build
//!   step, a tour with one panel per feature. It never sees a token: it asks coatcheck who is
//!   logged in (`/bff/user`), calls the API with `fetch`, lists and ends the user's sessions
//!   (`/bff/sessions`, `/bff/logout-all`), listens on `/bff/events` and logs out.
//! - `GET /api/whoami` — shows what coatcheck forwarded: the start of the injected
//!   `Authorization: Bearer` header and the access token's claims.
//! - `GET /api/token` — only the access token's `iat`, `exp` and `jti` (the tour's countdown polls
//!   it, and sees a silent refresh as a new `jti`).
//! - any other `/api/*` — echoes the method and path.
//!
//! Several coatcheck instances (`scripts/demo --instances 3`) each forward to
//! `http://127.0.0.1:9000/i/<n>` (a path in `upstream` is prepended), so every path may start with
//! `/i/<n>`: the prefix is removed and every API answer says `"instance": <n>` — which instance
//! served the call, without coatcheck adding anything.
//!
//! Run it alone with `cargo run --example sample_api`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// Where the demo's `config.toml` expects the sample API.
const DEFAULT_LISTEN: &str = "127.0.0.1:9000";

/// The single-page app: a tour of what coatcheck does, one panel each (`data-panel="who"`, `"api"`,
/// `"token"`, `"devices"`, `"live"`). Every `fetch` to coatcheck carries the CSRF header (`X-CSRF`,
/// any value): coatcheck refuses API and `/bff/*` JSON calls without it. The session cookie is
/// `HttpOnly`, so the page's script cannot read it; the browser attaches it by itself.
const APP: &str = include_str!("sample_app.html");

#[tokio::main]
async fn main() -> ExitCode {
    let listen = std::env::var("SAMPLE_API_LISTEN").unwrap_or_else(|_| DEFAULT_LISTEN.into());
    let addr: SocketAddr = match listen.parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!(
                "sample_api: SAMPLE_API_LISTEN={listen:?} is not an address like {DEFAULT_LISTEN}: {e}"
            );
            return ExitCode::FAILURE;
        }
    };
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("sample_api: cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("sample_api listening on http://{addr}");
    if let Err(e) = serve(listener).await {
        eprintln!("sample_api: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Serves HTTP/1.1 connections from `listener` until accepting fails.
pub async fn serve(listener: TcpListener) -> std::io::Result<()> {
    loop {
        let (tcp, _) = listener.accept().await?;
        tokio::spawn(async move {
            let service = service_fn(|req| async move { Ok::<_, Infallible>(handle(req)) });
            // A client that goes away mid-request is not worth reporting in a demo.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

fn handle(req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (instance, path) = split_instance(req.uri().path());
    let mut answer = match (req.method(), path) {
        (&Method::GET, "/") => {
            return respond(StatusCode::OK, "text/html; charset=utf-8", APP.into());
        }
        (&Method::GET, "/api/whoami") => whoami(&req),
        (&Method::GET, "/api/token") => token(&req),
        (method, path) if path.starts_with("/api/") => {
            json!({"method": method.as_str(), "path": path})
        }
        _ => return json(StatusCode::NOT_FOUND, json!({"error": "not_found"})),
    };
    if let (Some(n), Some(obj)) = (instance, answer.as_object_mut()) {
        obj.insert("instance".into(), json!(n));
    }
    json(StatusCode::OK, answer)
}

/// `/i/<n>/rest` → (`Some(n)`, `/rest`); any other path is returned as is.
fn split_instance(path: &str) -> (Option<u32>, &str) {
    let Some(rest) = path.strip_prefix("/i/") else {
        return (None, path);
    };
    let (n, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match n.parse() {
        Ok(n) => (Some(n), if tail.is_empty() { "/" } else { tail }),
        Err(_) => (None, path),
    }
}

/// The bearer token coatcheck injected, if any.
fn bearer(req: &Request<Incoming>) -> Option<&str> {
    req.headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
}

/// The access token's lifetime claims only: enough for a countdown and to notice a refresh.
fn token(req: &Request<Incoming>) -> Value {
    let claims = bearer(req).map_or(Value::Null, jwt_payload);
    let pick = |k: &str| claims.get(k).cloned().unwrap_or(Value::Null);
    json!({"token_claims": {"iat": pick("iat"), "exp": pick("exp"), "jti": pick("jti")}})
}

/// What the API learned from coatcheck. Only a prefix of the token is shown: an API must never
/// hand a bearer token back to the browser, which is the point of a BFF.
fn whoami(req: &Request<Incoming>) -> Value {
    let header = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let token = header.and_then(|h| h.strip_prefix("Bearer "));
    let shown = match (header, token) {
        // At most 12 characters, and never more than half of a (suspiciously short) token.
        (_, Some(t)) => json!(format!(
            "Bearer {}…",
            t.chars().take(12.min(t.len() / 2)).collect::<String>()
        )),
        (Some(h), None) => json!(format!("{} …", h.split(' ').next().unwrap_or_default())),
        (None, None) => Value::Null,
    };
    json!({
        "authorization": shown,
        "token_claims": token.map_or(Value::Null, jwt_payload),
        "note": "coatcheck added this Authorization header; the browser only holds an HttpOnly \
                 session cookie. The claims are decoded WITHOUT verification, for display: a real \
                 API must verify the JWT (signature, iss, aud, exp) before trusting it.",
    })
}

/// The payload (middle part) of a JWT, base64url-decoded and parsed — no signature check.
fn jwt_payload(token: &str) -> Value {
    token
        .split('.')
        .nth(1)
        .and_then(|p| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p)
                .ok()
        })
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or(Value::Null)
}

fn json(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    respond(status, "application/json", body.to_string().into())
}

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(body));
    *res.status_mut() = status;
    let headers = res.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    // What /api/whoami says depends on who asks: never let a cache keep it.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}
