//! The sample upstream of the local demo (`scripts/demo`): a single-page app and a tiny API,
//! both served from `http://127.0.0.1:9000` (env `SAMPLE_API_LISTEN` overrides) behind coatcheck.
//!
//! - `GET /` — the app: plain HTML and inline JavaScript, no build step. It never sees a token:
//!   it asks coatcheck who is logged in (`/bff/user`), calls the API with `fetch`, and logs out.
//! - `GET /api/whoami` — shows what coatcheck forwarded: the start of the injected
//!   `Authorization: Bearer` header and the access token's claims.
//! - any other `/api/*` — echoes the method and path.
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

/// The single-page app. Every `fetch` to coatcheck carries the CSRF header (`X-CSRF`, any
/// value): coatcheck refuses API and `/bff/*` JSON calls without it. The session cookie is
/// `HttpOnly`, so this script cannot read it; the browser attaches it by itself.
const APP: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>coatcheck demo</title>
<style>body{font:16px system-ui,sans-serif;max-width:46rem;margin:2rem auto}pre{background:#f4f4f4;padding:1rem;white-space:pre-wrap}</style>
</head><body>
<h1>coatcheck demo</h1>
<div id="anonymous" hidden><p>You are not logged in.</p><p><a id="login" href="/bff/login?returnUrl=/">Log in</a></p></div>
<div id="signed-in" hidden>
  <p>Logged in as <strong id="user"></strong> (session until <span id="expires"></span>).</p>
  <p><button id="call-api">Call /api/whoami</button> <button id="logout">Log out</button></p>
  <pre id="api-result">(no API call yet)</pre>
</div>
<script>
const CSRF = { 'X-CSRF': '1' };
const $ = (id) => document.getElementById(id);

async function showUser() {
  const res = await fetch('/bff/user', { headers: CSRF });
  if (!res.ok) { $('anonymous').hidden = false; return; }   // 401: no session
  const user = await res.json();                            // claims from the ID token, never a token
  $('user').textContent = `${user.claims.name ?? user.sub} (${user.sub})`;
  $('expires').textContent = user.session.expires_at;
  $('signed-in').hidden = false;
}

$('call-api').onclick = async () => {
  const res = await fetch('/api/whoami', { headers: CSRF });
  $('api-result').textContent = `HTTP ${res.status}\n` + JSON.stringify(await res.json(), null, 2);
};

$('logout').onclick = async () => {
  const res = await fetch('/bff/logout', { method: 'POST', headers: CSRF });
  const { logout_url } = await res.json();                  // the provider's end-session URL
  window.location.assign(logout_url || '/');
};

showUser();
</script>
</body></html>
"#;

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
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/") => respond(StatusCode::OK, "text/html; charset=utf-8", APP.into()),
        (&Method::GET, "/api/whoami") => json(StatusCode::OK, whoami(&req)),
        (method, path) if path.starts_with("/api/") => json(
            StatusCode::OK,
            json!({"method": method.as_str(), "path": path}),
        ),
        _ => json(StatusCode::NOT_FOUND, json!({"error": "not_found"})),
    }
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
