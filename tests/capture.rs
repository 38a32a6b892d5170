//! Session capture (issue 10): coatcheck in front of an API with its own JSON login
//! (`tests/support/legacy_api.rs`), no identity provider at all.

#[path = "support/bff.rs"]
mod bff;
mod support;

use std::time::Duration;

use bff::{Browser, ORIGIN, SESSION_KEY};
use reqwest::Method;
use serde_json::{Value, json};
use support::legacy_api::{LegacyApi, LegacyOptions};

/// The legacy API behind coatcheck, with `[capture]` and no `[oidc]`.
struct Env {
    api: LegacyApi,
    proxy: support::TestProxy,
}

async fn env_with(opts: LegacyOptions, capture_extra: &str) -> Env {
    let api = LegacyApi::start_with(opts).await;
    let config = format!(
        "[session]\nkeys = [\"{SESSION_KEY}\"]\n[session.store]\nkind = \"memory\"\n\n\
         [capture]\nlogin_path = \"/auth/login\"\nrefresh_path = \"/auth/refresh\"\n\
         logout_path = \"/auth/logout\"\nrefresh_before_expiry = \"2s\"\n{capture_extra}\n\n\
         [[route]]\npath = \"/api/admin/\"\nupstream = \"{api}\"\nauth = \"required\"\nroles = [\"admin\"]\n\n\
         [[route]]\npath = \"/api/\"\nupstream = \"{api}\"\nauth = \"required\"\n\n\
         [[route]]\npath = \"/auth/\"\nupstream = \"{api}\"\nauth = \"none\"\n",
        api = api.url(),
    );
    let proxy = support::start_proxy(&config).await;
    Env { api, proxy }
}

async fn env() -> Env {
    env_with(
        LegacyOptions::default(),
        "access_token = \"/access_token\"\nrefresh_token = \"/refresh_token\"\nexpires_in = \"/expires_in\"",
    )
    .await
}

/// What the browser received: status, every header and the body, as one string to search.
struct Seen {
    status: u16,
    everything: String,
    body: Value,
}

async fn seen(r: reqwest::Response, b: &mut Browser) -> Seen {
    b.absorb(r.headers());
    let status = r.status().as_u16();
    let headers = format!("{:?}", r.headers());
    let text = r.text().await.unwrap();
    Seen {
        status,
        everything: format!("{headers}\n{text}"),
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
    }
}

async fn login(env: &Env, b: &mut Browser, user: &str) -> Seen {
    let r = b
        .api(Method::POST, "/auth/login")
        .json(&json!({"username": user, "password": format!("{user}-pw")}))
        .send()
        .await
        .unwrap();
    let _ = env;
    seen(r, b).await
}

/// The bearer the API last received.
fn last_bearer(env: &Env) -> String {
    last_bearer_of(&env.api)
}

#[tokio::test]
async fn a_login_through_coatcheck_keeps_the_tokens_and_sets_the_cookie() {
    let env = env().await;
    let mut b = Browser::new(env.proxy.addr);
    let s = login(&env, &mut b, "alice").await;
    assert_eq!(s.status, 200, "{}", s.everything);
    assert_eq!(
        s.body["user"]["name"], "Alice Liddell",
        "the rest passes through"
    );
    assert!(s.body.get("access_token").is_none() && s.body.get("refresh_token").is_none());
    assert!(b.session_cookie().is_some(), "the session cookie is set");
    let mut seen_by_browser = vec![s.everything];
    let r = b.api(Method::GET, "/api/items").send().await.unwrap();
    let api = seen(r, &mut b).await;
    assert_eq!(api.status, 200);
    assert_eq!(api.body["claims"]["sub"], "alice");
    seen_by_browser.push(api.everything);
    let bearer = last_bearer(&env);
    let token = bearer.strip_prefix("Bearer ").unwrap();
    let user = seen(
        b.api(Method::GET, "/bff/user").send().await.unwrap(),
        &mut b,
    )
    .await;
    assert_eq!(user.status, 200);
    assert_eq!(user.body["sub"], "alice");
    assert_eq!(user.body["claims"]["name"], "Alice Liddell");
    seen_by_browser.push(user.everything);
    for text in &seen_by_browser {
        assert!(
            !text.contains(token),
            "an access token reached the browser: {text}"
        );
        assert!(!text.contains("refresh_token"), "{text}");
    }
}

#[tokio::test]
async fn wrong_credentials_pass_the_apis_401_through_and_make_no_session() {
    let env = env().await;
    let mut b = Browser::new(env.proxy.addr);
    let r = b
        .api(Method::POST, "/auth/login")
        .json(&json!({"username": "alice", "password": "wrong"}))
        .send()
        .await
        .unwrap();
    let s = seen(r, &mut b).await;
    assert_eq!(s.status, 401);
    assert_eq!(s.body["error"], "invalid_credentials");
    assert!(b.session_cookie().is_none());
}

#[tokio::test]
async fn a_login_without_the_csrf_header_never_reaches_the_api() {
    let env = env().await;
    let b = Browser::new(env.proxy.addr);
    let r = b
        .request(Method::POST, "/auth/login")
        .header("origin", ORIGIN)
        .json(&json!({"username": "alice", "password": "alice-pw"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "csrf");
    assert_eq!(env.api.counts().logins, 0);
}

#[tokio::test]
async fn a_hundred_concurrent_requests_after_expiry_cause_exactly_one_refresh() {
    let env = env().await;
    let mut b = Browser::new(env.proxy.addr);
    assert_eq!(login(&env, &mut b, "alice").await.status, 200);
    assert_eq!(
        b.api(Method::GET, "/api/a").send().await.unwrap().status(),
        200
    );
    let first = last_bearer(&env);
    for round in 0..2 {
        // Tokens live 4 s; refresh_before_expiry 2 s.
        tokio::time::sleep(Duration::from_millis(2_300)).await;
        let before = env.api.counts();
        let statuses = bff::burst(&[&b], 100).await;
        assert!(
            statuses.iter().all(|&s| s == 200),
            "round {round}: {statuses:?}"
        );
        let after = env.api.counts();
        assert_eq!(
            after.refreshes - before.refreshes,
            1,
            "round {round}: one refresh"
        );
        assert_eq!(
            after.refresh_reuse, 0,
            "a spent refresh token was never presented"
        );
    }
    assert_ne!(last_bearer(&env), first, "the new access token is injected");
}

#[tokio::test]
async fn the_tokens_exp_serves_when_the_answer_has_no_expires_in() {
    let env = env_with(
        LegacyOptions {
            expires_in: false,
            ..Default::default()
        },
        "",
    )
    .await;
    let mut b = Browser::new(env.proxy.addr);
    assert_eq!(login(&env, &mut b, "alice").await.status, 200);
    tokio::time::sleep(Duration::from_millis(2_300)).await;
    assert_eq!(
        b.api(Method::GET, "/api/x").send().await.unwrap().status(),
        200
    );
    assert_eq!(
        env.api.counts().refreshes,
        1,
        "refreshed from the token's exp"
    );
}

#[tokio::test]
async fn a_refused_refresh_ends_the_session() {
    let env = env().await;
    let mut b = Browser::new(env.proxy.addr);
    assert_eq!(login(&env, &mut b, "alice").await.status, 200);
    assert!(env.api.revoke_user("alice") > 0);
    tokio::time::sleep(Duration::from_millis(2_300)).await;
    let r = b.api(Method::GET, "/api/x").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "session_expired");
    assert_eq!(body["login_url"], "/auth/login");
}

#[tokio::test]
async fn logout_ends_the_session_and_calls_the_apis_logout() {
    let env = env().await;
    let mut b = Browser::new(env.proxy.addr);
    assert_eq!(login(&env, &mut b, "alice").await.status, 200);
    let r = b.api(Method::POST, "/bff/logout").send().await.unwrap();
    assert_eq!(r.status(), 200);
    b.absorb(r.headers());
    assert_eq!(env.api.counts().logouts, 1);
    assert_eq!(
        env.api.live_families("alice"),
        0,
        "the refresh token was revoked"
    );
    assert_eq!(
        b.api(Method::GET, "/api/x").send().await.unwrap().status(),
        401
    );
}

#[tokio::test]
async fn the_apis_refresh_endpoint_is_not_reachable_through_a_route() {
    let env = env().await;
    let b = Browser::new(env.proxy.addr);
    let r = b
        .api(Method::POST, "/auth/refresh")
        .json(&json!({"refresh_token": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        env.api.counts().refresh_refused + env.api.counts().refreshes,
        0
    );
}

#[tokio::test]
async fn roles_come_from_the_access_tokens_claims() {
    let env = env().await;
    let mut alice = Browser::new(env.proxy.addr);
    let mut bob = Browser::new(env.proxy.addr);
    assert_eq!(login(&env, &mut alice, "alice").await.status, 200);
    assert_eq!(login(&env, &mut bob, "bob").await.status, 200);
    assert_eq!(
        alice
            .api(Method::GET, "/api/admin/x")
            .send()
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(
        bob.api(Method::GET, "/api/admin/x")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn logging_in_again_ends_the_previous_session() {
    let env = env().await;
    let mut b = Browser::new(env.proxy.addr);
    assert_eq!(login(&env, &mut b, "alice").await.status, 200);
    let old = b.cookies.clone();
    assert_eq!(login(&env, &mut b, "alice").await.status, 200);
    assert_ne!(b.cookies, old, "a new cookie");
    let mut stale = Browser::new(env.proxy.addr);
    stale.cookies = old;
    assert_eq!(
        stale
            .api(Method::GET, "/api/x")
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
}

// ---------------------------------------------------------------------------------------------
// In a real browser
// ---------------------------------------------------------------------------------------------

/// coatcheck on a port known in advance (the browser's origin must be `public_origin`) in front
/// of the legacy API, which serves the team's SPA at `/` too (see `support::legacy_api::SPA`).
struct BrowserEnv {
    api: LegacyApi,
    running: coatcheck::app::Running,
    port: u16,
}

async fn browser_env() -> BrowserEnv {
    support::e2e::chromium();
    let api = LegacyApi::start().await;
    let port = bff::free_port();
    let certs = support::certs();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\npublic_origin = \"https://localhost:{port}\"\n\
         [server.tls]\ncert = {cert:?}\nkey = {key:?}\n\
         [session]\nkeys = [\"{SESSION_KEY}\"]\n[session.store]\nkind = \"memory\"\n\
         [capture]\nlogin_path = \"/auth/login\"\nrefresh_path = \"/auth/refresh\"\n\
         [[route]]\npath = \"/api/\"\nupstream = \"{api}\"\nauth = \"required\"\n\
         [[route]]\npath = \"/auth/\"\nupstream = \"{api}\"\nauth = \"none\"\n\
         [[route]]\npath = \"/\"\nupstream = \"{api}\"\nauth = \"none\"\n",
        cert = certs.cert.display().to_string(),
        key = certs.key.display().to_string(),
        api = api.url(),
    );
    let config = coatcheck::config::Config::from_toml(&text, std::path::Path::new("capture.toml"))
        .unwrap_or_else(|e| panic!("{e}"));
    let running = coatcheck::app::start(config)
        .await
        .expect("coatcheck starts");
    BrowserEnv { api, running, port }
}

/// Runs `tests/e2e/<script>` against the app and returns its one-line JSON report.
async fn browser_run(env: &BrowserEnv, script: &str) -> Value {
    let app = format!("https://localhost:{}/", env.port);
    support::e2e::run(script, &[("E2E_APP_URL", app)])
        .await
        .report()
}

#[tokio::test]
async fn in_a_real_browser_the_page_never_holds_a_token() {
    let env = browser_env().await;
    let report = browser_run(&env, "capture.mjs").await;
    let api = &env.api;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["login_status"], 200, "{report}");
    assert_eq!(
        report["login_answer"]["user"]["name"], "Alice Liddell",
        "{report}"
    );
    assert_eq!(report["api_status"], 200, "{report}");
    assert_eq!(report["api_answer"]["claims"]["sub"], "alice", "{report}");
    // What a script on the page can reach holds no token.
    let bearer = last_bearer_of(api);
    let token = bearer.strip_prefix("Bearer ").unwrap();
    let page_view = format!(
        "{} {} {} {}",
        report["login_answer"],
        report["document_cookie"],
        report["local_storage"],
        report["session_storage"]
    );
    assert!(!page_view.contains(token), "{page_view}");
    assert!(report["login_answer"].get("access_token").is_none());
    assert!(report["login_answer"].get("refresh_token").is_none());
    assert_eq!(
        report["local_storage"], "{}",
        "the old code found nothing to store"
    );
    assert_eq!(
        report["document_cookie"], "",
        "the session cookie is HttpOnly"
    );
    let cookie = report["cookies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "__Host-coatcheck")
        .expect("the session cookie is in the jar");
    assert_eq!(cookie["httpOnly"], true);
    assert_eq!(cookie["secure"], true);
    assert_eq!(cookie["sameSite"], "Strict");
    env.running.shutdown();
}

#[tokio::test]
async fn in_a_real_browser_a_logout_in_one_tab_reaches_the_other_tabs_event_source() {
    let env = browser_env().await;
    let report = browser_run(&env, "events.mjs").await;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["data"], "{\"reason\":\"logout\"}", "{report}");
    let ms = report["latency_ms"].as_f64().unwrap();
    assert!(ms < 1000.0, "the other tab heard it after {ms} ms");
    env.running.shutdown();
}

fn last_bearer_of(api: &LegacyApi) -> String {
    api.seen()
        .iter()
        .rev()
        .find_map(|s| s.header("authorization").map(str::to_owned))
        .expect("the API saw a bearer")
}

#[tokio::test]
async fn an_api_outage_during_refresh_keeps_the_session() {
    let env = env().await;
    let mut b = Browser::new(env.proxy.addr);
    assert_eq!(login(&env, &mut b, "alice").await.status, 200);
    let Env { api, proxy } = env;
    drop(api);
    // Due for refresh but still valid: the refresh fails, the current token is used (the API
    // itself is down too, so the answer is a 502 from coatcheck, not a logout).
    tokio::time::sleep(Duration::from_millis(2_300)).await;
    let r = b.api(Method::GET, "/api/x").send().await.unwrap();
    assert_eq!(r.status(), 502);
    // Expired and not refreshable: 503 with Retry-After, and the cookie is kept.
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    let r = b.api(Method::GET, "/api/x").send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert!(
        r.headers().get("set-cookie").is_none(),
        "the cookie is kept"
    );
    let user = b.api(Method::GET, "/bff/user").send().await.unwrap();
    assert_eq!(user.status(), 200, "the session still exists");
    drop(proxy);
}

#[tokio::test]
async fn beside_oidc_each_session_is_refreshed_by_the_issuer_that_made_it() {
    let legacy = LegacyApi::start().await;
    let env = bff::Env::start(bff::EnvOptions {
        access_token_ttl: 4,
        routes: format!(
            "[[route]]\npath = \"/auth/\"\nupstream = \"{}\"\nauth = \"none\"\n",
            legacy.url()
        ),
        extra: "[capture]\nlogin_path = \"/auth/login\"\nrefresh_path = \"/auth/refresh\"\n\
                refresh_before_expiry = \"2s\"\n"
            .into(),
        ..Default::default()
    })
    .await;
    let oidc_user = env.logged_in("bob").await;
    let mut captured = Browser::new(env.proxy.addr);
    let r = captured
        .api(Method::POST, "/auth/login")
        .json(&json!({"username": "alice", "password": "alice-pw"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    captured.absorb(r.headers());
    for b in [&oidc_user, &captured] {
        assert_eq!(
            b.api(Method::GET, "/api/x").send().await.unwrap().status(),
            200
        );
    }
    env.idp().reset_stats().await;
    tokio::time::sleep(Duration::from_millis(2_300)).await;
    for b in [&oidc_user, &captured] {
        assert_eq!(
            b.api(Method::GET, "/api/y").send().await.unwrap().status(),
            200
        );
    }
    let idp_refreshes = env.idp().stats().await["token_requests"]["refresh_token"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(
        idp_refreshes, 1,
        "the OIDC session refreshed at the provider"
    );
    assert_eq!(legacy.counts().refreshes, 1, "the captured one at the API");
    let user: Value = captured
        .api(Method::GET, "/bff/user")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(user["sub"], "alice");
}

#[tokio::test]
async fn a_login_answer_without_tokens_at_the_pointers_passes_through_and_makes_no_session() {
    let env = env_with(
        LegacyOptions::default(),
        "access_token = \"/session/token\"",
    )
    .await;
    let mut b = Browser::new(env.proxy.addr);
    let s = login(&env, &mut b, "alice").await;
    assert_eq!(s.status, 200);
    assert_eq!(
        s.body["user"]["name"], "Alice Liddell",
        "the answer is the API's, untouched"
    );
    assert!(b.session_cookie().is_none(), "no session");
    assert_eq!(
        b.api(Method::GET, "/api/x").send().await.unwrap().status(),
        401
    );
}
