//! Token refresh against the real provider with rotation and reuse detection on and access tokens
//! of a few seconds (issue 4).

#[path = "support/bff.rs"]
mod bff;
mod support;

use std::time::Duration;

use bff::{Browser, Env, EnvOptions};
use reqwest::Method;
use serde_json::Value;

/// Access tokens live this long; `refresh_before_expiry` is capped at half of it (2 s).
const TTL: u64 = 4;

async fn env() -> Env {
    Env::start(EnvOptions {
        access_token_ttl: TTL,
        ..Default::default()
    })
    .await
}

async fn refreshes(env: &Env) -> u64 {
    env.idp().stats().await["token_requests"]["refresh_token"]
        .as_u64()
        .unwrap()
}

/// Sleeps until the session's access token is due for refresh.
async fn until_due() {
    tokio::time::sleep(Duration::from_millis(2_300)).await;
}

fn bearer_of(env: &Env) -> String {
    env.api
        .last()
        .unwrap()
        .header("authorization")
        .unwrap()
        .to_owned()
}

async fn burst(clients: &[reqwest::Client], b: &Browser, n: usize) -> Vec<u16> {
    let mut tasks = Vec::new();
    for i in 0..n {
        let req = clients[i % clients.len()]
            .get(b.url(&format!("/api/burst/{i}")))
            .header("cookie", b.cookie_header().unwrap())
            .header("x-csrf", "1");
        tasks.push(tokio::spawn(async move {
            req.send().await.map(|r| r.status().as_u16()).unwrap_or(0)
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test]
async fn two_hundred_concurrent_requests_after_expiry_cause_exactly_one_refresh() {
    let env = env().await;
    let b = env.logged_in("alice").await;
    assert_eq!(
        b.api(Method::GET, "/api/first")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let first = bearer_of(&env);
    env.idp().reset_stats().await;
    until_due().await;
    let statuses = burst(std::slice::from_ref(&b.client), &b, 200).await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert_eq!(
        refreshes(&env).await,
        1,
        "one refresh-token grant for 200 requests"
    );
    let after: std::collections::HashSet<String> = env
        .api
        .seen()
        .iter()
        .rev()
        .take(200)
        .map(|s| s.header("authorization").unwrap().to_owned())
        .collect();
    assert_eq!(after.len(), 1, "every request used the one new token");
    assert!(
        !after.contains(&first),
        "the upstream never got the token that was due"
    );
    // The token family is still valid: the next expiry refreshes fine.
    until_due().await;
    assert_eq!(
        b.api(Method::GET, "/api/later")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(refreshes(&env).await, 2);
    assert_eq!(env.idp().stats().await["refresh_token_failures"], 0);
}

#[tokio::test]
async fn requests_spread_over_tabs_and_protocols_share_one_refresh() {
    let env = env().await;
    let b = env.logged_in("bob").await;
    let clients = vec![
        support::http1_client(b.addr),
        support::http2_client(b.addr),
        support::http1_client(b.addr),
        support::http2_client(b.addr),
    ];
    env.idp().reset_stats().await;
    until_due().await;
    let statuses = burst(&clients, &b, 120).await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert_eq!(refreshes(&env).await, 1);
}

#[tokio::test]
async fn a_grant_revoked_at_the_provider_ends_the_session_with_session_expired() {
    let env = env().await;
    let b = env.logged_in("alice").await;
    assert!(env.idp().revoke_grants("alice").await >= 1);
    until_due().await;
    let r = b.api(Method::GET, "/api/x").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let cleared = r.headers().get_all("set-cookie").iter().any(|c| {
        c.to_str().unwrap().starts_with("__Host-coatcheck=;")
            && c.to_str().unwrap().contains("Max-Age=0")
    });
    assert!(cleared, "the cookie is cleared");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "session_expired");
    assert!(v["login_url"].as_str().unwrap().starts_with("/bff/login"));
    // And it stays ended.
    assert_eq!(
        b.api(Method::GET, "/api/x").send().await.unwrap().status(),
        401
    );
}

#[tokio::test]
async fn a_provider_outage_is_a_blip_not_a_logout() {
    let env = env().await;
    let b = env.logged_in("alice").await;
    env.idp().set_outage("down").await;
    until_due().await;
    // Due but still valid: the current token is used.
    assert_eq!(
        b.api(Method::GET, "/api/during")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    // Expired and the provider is down: 503 with Retry-After, cookie kept.
    let r = b.api(Method::GET, "/api/expired").send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert!(
        r.headers().get_all("set-cookie").iter().next().is_none(),
        "the cookie is kept"
    );
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "idp_unavailable");
    env.idp().set_outage("error").await;
    assert_eq!(
        b.api(Method::GET, "/api/expired")
            .send()
            .await
            .unwrap()
            .status(),
        503,
        "a 5xx provider is a blip too"
    );
    // Back: the same cookie works, no new login.
    env.idp().set_outage("off").await;
    assert_eq!(
        b.api(Method::GET, "/api/back")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn the_absolute_timeout_is_never_extended_by_refreshes() {
    let env = Env::start(EnvOptions {
        access_token_ttl: TTL,
        session: "idle_timeout = \"5s\"\nabsolute_timeout = \"5s\"\ntouch_interval = \"1s\"".into(),
        ..Default::default()
    })
    .await;
    let b = env.logged_in("alice").await;
    until_due().await;
    assert_eq!(
        b.api(Method::GET, "/api/x").send().await.unwrap().status(),
        200,
        "refreshed within the session"
    );
    tokio::time::sleep(Duration::from_millis(3_200)).await;
    let r = b.api(Method::GET, "/api/x").send().await.unwrap();
    assert_eq!(
        r.status(),
        401,
        "5 s after login the session is over, refresh or not"
    );
}
