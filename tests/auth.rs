//! OIDC login, sessions, bearer injection, CSRF and logout against the real identity provider.

#[path = "support/bff.rs"]
mod bff;
mod support;

use bff::{Browser, Env, EnvOptions, ORIGIN};
use reqwest::Method;
use serde_json::Value;

async fn json(r: reqwest::Response) -> Value {
    r.json().await.unwrap()
}

#[tokio::test]
async fn login_sets_a_strict_http_only_ticket_and_bounces_to_the_return_url() {
    let env = Env::start(EnvOptions::default()).await;
    let mut b = env.browser();
    let r = b.login("alice", "alice-pw").await;
    assert_eq!(r.status(), 200);
    let h = r.headers().clone();
    assert_eq!(h["referrer-policy"], "no-referrer");
    assert_eq!(h["cache-control"], "no-store");
    let cookies: Vec<&str> = h
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    let session = cookies
        .iter()
        .find(|c| c.starts_with("__Host-coatcheck="))
        .expect("session cookie");
    assert!(
        session.ends_with("; Path=/; Secure; HttpOnly; SameSite=Strict"),
        "{session}"
    );
    assert!(!session.contains("Domain"), "{session}");
    assert!(
        cookies
            .iter()
            .any(|c| c.starts_with("__Host-coatcheck-login-") && c.contains("Max-Age=0")),
        "login cookie cleared: {cookies:?}"
    );
    let page = r.text().await.unwrap();
    assert!(page.contains("url=/app/home"), "{page}");
    // The page the browser sees carries no token.
    assert!(!page.contains("eyJ"), "{page}");
}

#[tokio::test]
async fn api_requests_leave_with_the_bearer_and_without_coatcheck_cookies() {
    let env = Env::start(EnvOptions::default()).await;
    let mut b = env.logged_in("alice").await;
    b.cookies.insert("theme".into(), "dark".into());
    let r = b
        .api(Method::GET, "/api/items")
        .header("authorization", "Bearer forged")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = env.api.last().unwrap();
    let auth = seen.header("authorization").unwrap();
    assert!(
        auth.starts_with("Bearer ey") && auth != "Bearer forged",
        "{auth}"
    );
    assert_eq!(auth.matches('.').count(), 2, "a JWT access token");
    assert_eq!(seen.header("cookie"), Some("theme=dark"));
}

#[tokio::test]
async fn requests_without_a_session_get_401_json_with_a_login_url() {
    let env = Env::start(EnvOptions::default()).await;
    let b = env.browser();
    let r = b.api(Method::GET, "/api/items").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let v = json(r).await;
    assert_eq!(v["error"], "unauthenticated");
    assert!(v["login_url"].as_str().unwrap().starts_with("/bff/login"));
    assert!(env.api.seen().is_empty(), "the upstream was not contacted");
}

#[tokio::test]
async fn a_navigation_to_a_login_redirect_route_is_sent_to_login_but_fetch_is_not() {
    let env = Env::start(EnvOptions::default()).await;
    let b = env.browser();
    let r = b
        .request(Method::GET, "/app/page?x=1")
        .header("sec-fetch-mode", "navigate")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    assert_eq!(
        r.headers()["location"],
        "/bff/login?returnUrl=%2Fapp%2Fpage%3Fx%3D1"
    );
    let r = b
        .request(Method::GET, "/app/page")
        .header("sec-fetch-mode", "cors")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn csrf_refusals_never_reach_the_upstream() {
    let env = Env::start(EnvOptions::default()).await;
    let b = env.logged_in("alice").await;
    let no_header = b.request(Method::POST, "/api/items").send().await.unwrap();
    assert_eq!(no_header.status(), 403);
    assert_eq!(json(no_header).await["error"], "csrf");
    let foreign = b
        .api(Method::POST, "/api/items")
        .header("origin", "https://evil.test")
        .send()
        .await
        .unwrap();
    assert_eq!(foreign.status(), 403);
    let cross = b
        .api(Method::GET, "/api/items")
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .unwrap();
    assert_eq!(cross.status(), 403);
    assert!(env.api.seen().is_empty(), "{:?}", env.api.seen());
}

#[tokio::test]
async fn bff_user_shows_claims_and_never_a_token() {
    let env = Env::start(EnvOptions::default()).await;
    let b = env.logged_in("alice").await;
    let r = b.api(Method::GET, "/bff/user").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let text = r.text().await.unwrap();
    assert!(!text.contains("eyJ"), "no JWT in /bff/user: {text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["sub"], "alice");
    assert_eq!(v["claims"]["roles"], serde_json::json!(["user"]));
    let id = v["session"]["id"].as_str().unwrap();
    assert_eq!(v["logout_url"], format!("/bff/logout?sid={id}"));
    assert!(
        !b.session_cookie().unwrap().contains(id),
        "the public id is not the cookie"
    );
    for k in ["created_at", "expires_at", "idle_expires_at"] {
        assert!(
            humantime::parse_rfc3339(v["session"][k].as_str().unwrap()).is_ok(),
            "{k}"
        );
    }
    let anon = env
        .browser()
        .api(Method::GET, "/bff/user")
        .send()
        .await
        .unwrap();
    assert_eq!(anon.status(), 401);
}

#[tokio::test]
async fn roles_decide_between_403_and_the_upstream() {
    let env = Env::start(EnvOptions::default()).await;
    let alice = env.logged_in("alice").await;
    let r = alice.api(Method::GET, "/admin/x").send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(json(r).await["error"], "forbidden");
    let admin = env.logged_in("admin").await;
    assert_eq!(
        admin
            .api(Method::GET, "/admin/x")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn logout_by_get_needs_the_session_id_then_ends_everything() {
    let env = Env::start(EnvOptions::default()).await;
    let mut b = env.logged_in("alice").await;
    let user = json(b.api(Method::GET, "/bff/user").send().await.unwrap()).await;
    // A cross-site <img src=/bff/logout> does not know the id: nothing happens.
    let r = b.request(Method::GET, "/bff/logout").send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        b.api(Method::GET, "/api/x").send().await.unwrap().status(),
        200,
        "still logged in"
    );
    env.idp().reset_stats().await;
    let r = b
        .request(Method::GET, user["logout_url"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(
        location.contains("/session/end")
            || location.contains("end_session")
            || location.contains("logout"),
        "{location}"
    );
    assert!(
        location.contains("id_token_hint=") && location.contains("post_logout_redirect_uri="),
        "{location}"
    );
    let cleared = r.headers().get_all("set-cookie").iter().any(|c| {
        c.to_str().unwrap().starts_with("__Host-coatcheck=;")
            && c.to_str().unwrap().contains("Max-Age=0")
    });
    assert!(cleared);
    let old = b.cookies.clone();
    b.absorb(r.headers());
    assert_eq!(
        env.idp().stats().await["revocations"],
        1,
        "the refresh token was revoked"
    );
    // The old ticket is dead even if the browser kept it.
    b.cookies = old;
    let r = b.api(Method::GET, "/api/x").send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(json(r).await["error"], "session_expired");
}

#[tokio::test]
async fn logout_by_post_answers_json_with_the_end_session_url() {
    let env = Env::start(EnvOptions::default()).await;
    let b = env.logged_in("bob").await;
    assert_eq!(
        b.request(Method::POST, "/bff/logout")
            .send()
            .await
            .unwrap()
            .status(),
        403,
        "CSRF header required"
    );
    let r = b.api(Method::POST, "/bff/logout").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v = json(r).await;
    assert!(
        v["logout_url"]
            .as_str()
            .unwrap()
            .starts_with(&format!("http://127.0.0.1:{}", env.idp_port)),
        "{v}"
    );
    assert_eq!(
        b.api(Method::GET, "/api/x").send().await.unwrap().status(),
        401
    );
}

#[tokio::test]
async fn the_origin_header_of_the_public_origin_is_accepted() {
    let env = Env::start(EnvOptions::default()).await;
    let b = env.logged_in("alice").await;
    let r = b
        .api(Method::POST, "/api/x")
        .header("origin", ORIGIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn optional_routes_forward_with_a_token_only_when_there_is_a_session() {
    let env = Env::start(EnvOptions::default()).await;
    let anon = env.browser();
    assert_eq!(
        anon.api(Method::GET, "/maybe/x")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(env.api.last().unwrap().header("authorization"), None);
    let b = env.logged_in("alice").await;
    assert_eq!(
        b.api(Method::GET, "/maybe/x")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert!(
        env.api
            .last()
            .unwrap()
            .header("authorization")
            .unwrap()
            .starts_with("Bearer ey")
    );
}

#[tokio::test]
async fn public_routes_never_see_a_token_or_the_ticket() {
    let env = Env::start(EnvOptions::default()).await;
    let b = env.logged_in("alice").await;
    assert_eq!(
        b.request(Method::GET, "/public")
            .header("authorization", "Bearer mine")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let seen = env.api.last().unwrap();
    assert_eq!(
        seen.header("authorization"),
        Some("Bearer mine"),
        "auth = none passes the client's own header untouched"
    );
    assert!(
        !seen
            .header("cookie")
            .unwrap_or("")
            .contains("__Host-coatcheck"),
        "the ticket never leaves"
    );
}

#[tokio::test]
async fn upstream_redirects_are_passed_back_not_followed() {
    let env = Env::start(EnvOptions::default()).await;
    let b = env.logged_in("alice").await;
    let r = b.api(Method::GET, "/api/redirect").send().await.unwrap();
    assert_eq!(r.status(), 302);
    assert_eq!(r.headers()["location"], "/elsewhere");
    assert_eq!(env.api.seen().len(), 1, "coatcheck did not follow it");
}

#[tokio::test]
async fn bearer_routes_accept_the_providers_tokens_and_nothing_else() {
    // A second coatcheck in front of the same API with an extra `bearer` route.
    let env = Env::start(EnvOptions::default()).await;
    let extra = format!(
        "{}\n[[route]]\npath = \"/m2m/\"\nupstream = \"{}\"\nauth = \"bearer\"\n",
        env.config,
        env.api.url()
    );
    let proxy = support::start_proxy(&extra).await;
    let b = env.logged_in("alice").await;
    b.api(Method::GET, "/api/token").send().await.unwrap();
    let token = env
        .api
        .last()
        .unwrap()
        .header("authorization")
        .unwrap()
        .to_owned();
    let client = support::http1_client(proxy.addr);
    let url = format!("https://localhost:{}/m2m/x", proxy.addr.port());
    assert_eq!(
        client
            .get(&url)
            .header("authorization", &token)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        env.api.last().unwrap().header("authorization"),
        Some(token.as_str())
    );
    let mut tampered = token.clone();
    tampered.pop();
    tampered.push(if token.ends_with('A') { 'B' } else { 'A' });
    assert_eq!(
        client
            .get(&url)
            .header("authorization", tampered)
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(client.get(&url).send().await.unwrap().status(), 401);
    assert_eq!(
        client
            .get(&url)
            .header(
                "authorization",
                "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0."
            )
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
}

/// Opens a WebSocket upgrade to `/api/ws` with the given extra header lines; returns the status.
async fn websocket_upgrade(b: &Browser, extra: &str) -> (u16, support::RawConn) {
    let mut conn = support::RawConn::connect(b.addr).await;
    let cookie = b
        .cookie_header()
        .map(|c| format!("Cookie: {}\r\n", c.to_str().unwrap()))
        .unwrap_or_default();
    conn.send(
        format!(
            "GET /api/ws HTTP/1.1\r\nHost: localhost:{}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{cookie}{extra}\r\n",
            b.addr.port()
        )
        .as_bytes(),
    )
    .await;
    let (status, _) = conn.read_head().await;
    (status, conn)
}

#[tokio::test]
async fn websocket_upgrades_are_checked_by_origin_and_carry_the_bearer() {
    let env = Env::start(EnvOptions::default()).await;
    let b = env.logged_in("alice").await;
    let (status, _) = websocket_upgrade(&b, "Origin: https://evil.test\r\n").await;
    assert_eq!(status, 403, "a foreign origin is refused");
    let (status, _) = websocket_upgrade(&b, "").await;
    assert_eq!(status, 403, "no origin, no upgrade");
    assert!(env.api.seen().is_empty());
    let (status, mut conn) = websocket_upgrade(&b, &format!("Origin: {ORIGIN}\r\n")).await;
    assert_eq!(status, 101);
    let seen = env.api.last().unwrap();
    assert!(
        seen.header("authorization")
            .unwrap()
            .starts_with("Bearer ey"),
        "the upgrade request carries the bearer"
    );
    assert!(
        !seen
            .header("cookie")
            .unwrap_or("")
            .contains("__Host-coatcheck")
    );
    conn.send(b"ping").await;
    assert_eq!(conn.read_exact(4).await, b"ping");
}

#[tokio::test]
async fn a_provider_that_is_down_during_logout_does_not_keep_the_session_alive() {
    let env = Env::start(EnvOptions::default()).await;
    let b = env.logged_in("alice").await;
    env.idp().set_outage("down").await;
    let r = b.api(Method::POST, "/bff/logout").send().await.unwrap();
    assert_eq!(
        r.status(),
        200,
        "logout answers even though revocation failed"
    );
    let cleared = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .any(|c| c.to_str().unwrap().contains("Max-Age=0"));
    assert!(cleared);
    env.idp().set_outage("off").await;
    let r = b.api(Method::GET, "/api/x").send().await.unwrap();
    assert_eq!(r.status(), 401, "the session is gone locally");
    assert_eq!(
        env.idp().stats().await["revocations"],
        0,
        "the provider never got the revocation"
    );
}
