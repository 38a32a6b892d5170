//! The refresh cases a real provider will not produce on demand, against the scripted stub
//! provider: a refreshed ID token naming another subject, and an upstream that rejects a token
//! before its expiry (401 `invalid_token`).

#[path = "support/bff.rs"]
mod bff;
#[path = "support/stub_idp.rs"]
mod stub_idp;
mod support;

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bff::{Browser, SESSION_KEY};
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use reqwest::Method;
use serde_json::{Value, json};
use stub_idp::{KID_ES256, StubIdp};

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An upstream that answers 401 `invalid_token` to the first bearer it sees, 200 to any other.
struct Rejecting {
    addr: std::net::SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Rejecting {
    async fn start() -> Rejecting {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let state = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let state = state.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let state = state.clone();
                        async move {
                            let auth = req
                                .headers()
                                .get("authorization")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_owned();
                            let mut seen = state.lock().unwrap();
                            seen.push(auth.clone());
                            let first = seen.first().cloned().unwrap_or_default();
                            let mut res = hyper::Response::new(Full::new(Bytes::from(
                                json!({"auth": auth}).to_string(),
                            )));
                            if auth == first {
                                *res.status_mut() = hyper::StatusCode::UNAUTHORIZED;
                                res.headers_mut().insert(
                                    "www-authenticate",
                                    "Bearer error=\"invalid_token\"".parse().unwrap(),
                                );
                            }
                            Ok::<_, Infallible>(res)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Rejecting { addr, seen }
    }
}

struct Rp {
    stub: StubIdp,
    /// Kept alive for the test's duration (dropping it stops coatcheck).
    _proxy: support::TestProxy,
    browser: Browser,
}

impl Rp {
    /// Stub provider, coatcheck with a required route to `upstream`, and a logged-in browser.
    async fn start(upstream: &str, expires_in: u64) -> Rp {
        let stub = StubIdp::start().await;
        stub.script.expires_in.store(expires_in, Ordering::SeqCst);
        let config = format!(
            "[session]\nkeys = [\"{SESSION_KEY}\"]\n[session.store]\nkind = \"memory\"\n\n\
             [oidc]\nissuer = \"{}\"\nclient_id = \"coatcheck\"\nclient_secret = \"s\"\nallowed_algs = [\"ES256\"]\n\
             refresh_before_expiry = \"30s\"\n\n\
             [[route]]\npath = \"/api/\"\nupstream = \"{upstream}\"\nauth = \"required\"\n",
            stub.issuer
        );
        let proxy = support::start_proxy(&config).await;
        let mut browser = Browser::new(proxy.addr);
        support::wait_ready(proxy.addr).await;
        let location = browser.start_login("/").await;
        let url = url::Url::parse(&location).unwrap();
        let param = |n: &str| {
            url.query_pairs()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.into_owned())
                .unwrap()
        };
        let rp = Rp {
            stub,
            _proxy: proxy,
            browser,
        };
        rp.stub
            .set_id_token(Some(rp.id_token("alice", Some(&param("nonce")))));
        let mut rp = rp;
        let r = rp
            .browser
            .finish_login(&format!("/bff/callback?code=c&state={}", param("state")))
            .await;
        assert_eq!(r.status(), 200, "{:?}", r.text().await);
        rp
    }

    fn id_token(&self, sub: &str, nonce: Option<&str>) -> String {
        let mut claims = json!({"iss": self.stub.issuer, "sub": sub, "aud": "coatcheck", "iat": now(), "exp": now() + 300});
        if let Some(n) = nonce {
            claims["nonce"] = json!(n);
        }
        self.stub.keys.sign(
            &json!({"alg": "ES256", "typ": "JWT", "kid": KID_ES256}),
            &claims,
        )
    }

    fn refreshes(&self) -> usize {
        self.stub
            .token_requests()
            .iter()
            .filter(|r| r.field("grant_type") == Some("refresh_token"))
            .count()
    }
}

#[tokio::test]
async fn a_refresh_whose_id_token_names_another_subject_ends_the_session() {
    let api = support::upstream::Upstream::start().await;
    // Tokens of 2 s are due at once (the margin is half their lifetime).
    let rp = Rp::start(&api.url(), 2).await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    rp.stub.set_id_token(Some(rp.id_token("mallory", None)));
    let r = rp.browser.api(Method::GET, "/api/x").send().await.unwrap();
    assert_eq!(rp.refreshes(), 1, "the refresh happened");
    assert_eq!(r.status(), 401);
    let cleared = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .any(|c| c.to_str().unwrap().contains("Max-Age=0"));
    assert!(cleared);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "session_expired");
    assert!(
        api.seen().is_empty(),
        "nothing reached the upstream with the other subject's token"
    );
}

#[tokio::test]
async fn a_refresh_with_the_same_subject_keeps_the_session() {
    let api = support::upstream::Upstream::start().await;
    let rp = Rp::start(&api.url(), 2).await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    rp.stub.set_id_token(Some(rp.id_token("alice", None)));
    let r = rp.browser.api(Method::GET, "/api/x").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(rp.refreshes(), 1);
    assert_eq!(
        api.last().unwrap().header("authorization"),
        Some("Bearer at-1"),
        "the refreshed token went upstream"
    );
    let refresh = rp
        .stub
        .token_requests()
        .into_iter()
        .find(|r| r.field("grant_type") == Some("refresh_token"))
        .unwrap();
    assert_eq!(
        refresh.field("refresh_token"),
        Some("rt-0"),
        "the login's refresh token was spent"
    );
}

#[tokio::test]
async fn an_upstream_401_invalid_token_is_refreshed_and_replayed_once() {
    let upstream = Rejecting::start().await;
    let rp = Rp::start(&format!("http://{}", upstream.addr), 300).await;
    let r = rp
        .browser
        .api(Method::POST, "/api/orders")
        .body("{\"qty\":1}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the client never saw the 401");
    assert_eq!(rp.refreshes(), 1, "one refresh");
    let seen = upstream.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec!["Bearer at-0".to_owned(), "Bearer at-1".to_owned()],
        "replayed once with the new token"
    );
    // A request whose token is rejected again gets the upstream's 401 (no loop).
    drop(seen);
}

#[tokio::test]
async fn a_body_too_large_to_buffer_is_not_replayed_and_the_401_passes_through() {
    let upstream = Rejecting::start().await;
    let rp = Rp::start(&format!("http://{}", upstream.addr), 300).await;
    let big = vec![b'x'; 100 * 1024];
    let r = rp
        .browser
        .api(Method::POST, "/api/upload")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(rp.refreshes(), 0);
    assert_eq!(upstream.seen.lock().unwrap().len(), 1);
}
