//! The admin listener (`[admin]`) against the real provider: `/metrics` after real traffic (series,
//! labels, plausible values, nothing secret), health endpoints, and the session admin API (token
//! checks, listing and ending a subject's sessions, ending one by id). The listener is plain HTTP
//! on its own port.

#[path = "support/bff.rs"]
mod bff;
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bff::{Browser, Env, EnvOptions};
use reqwest::Method;
use serde_json::Value;

/// The admin token of these tests.
const TOKEN: &str = "admin-token-0123456789abcdef";
/// Access tokens live this long; the refresh margin is capped at half of it (2 s).
const TTL: u64 = 4;

async fn env(admin: &str) -> Env {
    Env::start(EnvOptions {
        access_token_ttl: TTL,
        extra: format!("[admin]\nlisten = \"127.0.0.1:0\"\n{admin}\n"),
        ..Default::default()
    })
    .await
}

async fn env_with_token() -> Env {
    env(&format!("token = \"{TOKEN}\"")).await
}

fn admin_addr(env: &Env) -> SocketAddr {
    env.proxy.admin_addr.expect("the admin listener is bound")
}

/// A plain-HTTP client for the admin listener.
fn admin_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(support::WAIT)
        .build()
        .unwrap()
}

fn admin_url(env: &Env, path: &str) -> String {
    format!("http://{}{path}", admin_addr(env))
}

async fn scrape(env: &Env) -> String {
    let r = admin_client()
        .get(admin_url(env, "/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    let text = r.text().await.unwrap();
    assert!(text.ends_with("# EOF\n"), "an exposition ends with # EOF");
    text
}

/// The value of one series (`name{labels}` exactly as exposed), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.split(' ').next().unwrap().parse().unwrap())
}

fn must(text: &str, series: &str) -> f64 {
    value(text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

async fn get_api(b: &Browser, path: &str) -> u16 {
    b.api(Method::GET, path)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn user(b: &Browser) -> Value {
    let r = b.api(Method::GET, "/bff/user").send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

fn admin(env: &Env, method: Method, path: &str) -> reqwest::RequestBuilder {
    admin_client()
        .request(method, admin_url(env, path))
        .bearer_auth(TOKEN)
}

/// `GET path` on the admin API with the token; its JSON (asserting 200).
async fn admin_get(env: &Env, path: &str) -> Value {
    let r = admin(env, Method::GET, path).send().await.unwrap();
    assert_eq!(r.status(), 200, "GET {path}");
    r.json().await.unwrap()
}

/// Asserts that series `series` of `text` is at least `min`.
fn assert_at_least(text: &str, series: &str, min: f64) {
    let v = must(text, series);
    assert!(v >= min, "{series} is {v}, expected at least {min}");
}

/// Asserts that series `series` of `text` is exactly `expected`.
fn assert_value(text: &str, series: &str, expected: f64) {
    assert_eq!(must(text, series), expected, "{series}");
}

/// Three API requests with a session, one without, a login: counted by route and status, timed,
/// and the login counted by result.
fn assert_requests_and_logins_counted(text: &str) {
    assert_at_least(
        text,
        "coatcheck_requests_total{route=\"/api/\",status=\"200\"}",
        3.0,
    );
    assert_value(
        text,
        "coatcheck_requests_total{route=\"/api/\",status=\"401\"}",
        1.0,
    );
    // The public /readyz polled at start-up matched no route; the login went through /bff/.
    assert_at_least(
        text,
        "coatcheck_requests_total{route=\"-\",status=\"200\"}",
        1.0,
    );
    assert_at_least(
        text,
        "coatcheck_requests_total{route=\"/bff/\",status=\"302\"}",
        1.0,
    );
    assert_at_least(
        text,
        "coatcheck_request_duration_seconds_count{route=\"/api/\"}",
        4.0,
    );
    assert_at_least(
        text,
        "coatcheck_request_duration_seconds_bucket{le=\"+Inf\",route=\"/api/\"}",
        4.0,
    );
    assert_value(text, "coatcheck_logins_total{result=\"ok\"}", 1.0);
    assert_value(
        text,
        "coatcheck_logins_total{result=\"invalid_grant\"}",
        0.0,
    );
}

/// The session store, the provider and the connections are measured; nothing failed, was reloaded,
/// logged out, upgraded or waited for.
fn assert_store_provider_and_connections_measured(text: &str) {
    assert!(value(text, "coatcheck_session_cache_misses_total").is_some());
    assert_value(text, "coatcheck_store_errors_total", 0.0);
    assert_at_least(
        text,
        "coatcheck_store_call_duration_seconds_count{op=\"create\"}",
        1.0,
    );
    assert_at_least(text, "coatcheck_sessions_active", 1.0);
    assert_at_least(
        text,
        "coatcheck_idp_request_duration_seconds_count{endpoint=\"discovery\"}",
        1.0,
    );
    assert_at_least(
        text,
        "coatcheck_idp_request_duration_seconds_count{endpoint=\"token\"}",
        1.0,
    );
    assert_at_least(text, "coatcheck_connections_open", 1.0);
    assert_at_least(text, "coatcheck_connections_total", 1.0);
    for zero in [
        "coatcheck_config_reloads_total{result=\"ok\"}",
        "coatcheck_config_reloads_total{result=\"error\"}",
        "coatcheck_backchannel_logout_total{result=\"ok\"}",
        "coatcheck_refresh_total{result=\"idp_unavailable\"}",
        "coatcheck_refresh_waiters",
        "coatcheck_upgrades_total",
    ] {
        assert_value(text, zero, 0.0);
    }
}

/// Neither the access token last forwarded, nor `alice`'s session cookie, nor any configured secret
/// appears in the exposition `text`.
fn assert_no_secret_in(text: &str, env: &Env, alice: &Browser) {
    let bearer = env
        .api
        .last()
        .unwrap()
        .header("authorization")
        .unwrap()
        .to_owned();
    let access_token = bearer.strip_prefix("Bearer ").unwrap();
    let cookie = alice.session_cookie().unwrap();
    for secret in [
        access_token,
        cookie.as_str(),
        TOKEN,
        "coatcheck-secret",
        bff::SESSION_KEY,
    ] {
        assert!(
            !text.contains(secret),
            "the exposition holds a secret: {secret}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_real_traffic_count_routes_statuses_logins_cache_hits_and_refreshes() {
    let env = env_with_token().await;
    let alice = env.logged_in("alice").await;
    for _ in 0..3 {
        assert_eq!(get_api(&alice, "/api/items").await, 200);
    }
    // Without a session: 401 on the same route.
    assert_eq!(get_api(&env.browser(), "/api/items").await, 401);
    let before = scrape(&env).await;
    assert_requests_and_logins_counted(&before);
    let hits = must(&before, "coatcheck_session_cache_hits_total");
    assert!(hits >= 3.0, "every API request after login is a cache hit");
    assert_store_provider_and_connections_measured(&before);

    assert_eq!(get_api(&alice, "/api/items").await, 200);
    let after = scrape(&env).await;
    assert!(
        must(&after, "coatcheck_session_cache_hits_total") > hits,
        "cache hits increase"
    );

    // After the access token is due, the next request refreshes it.
    tokio::time::sleep(Duration::from_millis(2_300)).await;
    assert_eq!(get_api(&alice, "/api/items").await, 200);
    let refreshed = scrape(&env).await;
    assert_at_least(&refreshed, "coatcheck_refresh_total{result=\"ok\"}", 1.0);
    assert_value(
        &refreshed,
        "coatcheck_refresh_total{result=\"invalid_grant\"}",
        0.0,
    );

    // Nothing secret anywhere in the exposition.
    assert_no_secret_in(&refreshed, &env, &alice);
    // Request paths never become labels.
    assert!(!refreshed.contains("/api/items"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_is_plain_http_on_its_own_port_with_health_endpoints() {
    let env = env("").await;
    let addr = admin_addr(&env);
    assert_ne!(addr.port(), env.proxy.addr.port());
    let c = admin_client();
    let r = c.get(admin_url(&env, "/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "ok");
    let r = c.get(admin_url(&env, "/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "ready");
    // No TLS on the admin port.
    let tls = support::http1_client(addr)
        .get(format!("https://localhost:{}/metrics", addr.port()))
        .send()
        .await;
    assert!(tls.is_err(), "the admin listener does not speak TLS");
    // The public port does not serve the exposition (its `/` route goes to the upstream).
    let public = env
        .browser()
        .request(Method::GET, "/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!public.contains("coatcheck_requests_total"));
    // Without admin.token the session admin API is off.
    let r = c
        .get(admin_url(&env, "/sessions?sub=alice"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = c.post(admin_url(&env, "/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_admin_api_refuses_requests_without_the_right_token() {
    let env = env_with_token().await;
    let c = admin_client();
    let without = c
        .get(admin_url(&env, "/sessions?sub=alice"))
        .send()
        .await
        .unwrap();
    let wrong = c
        .delete(admin_url(&env, "/sessions?sub=alice"))
        .bearer_auth("admin-token-0123456789abcdeX")
        .send()
        .await
        .unwrap();
    let basic = c
        .delete(admin_url(&env, &format!("/sessions/{}", "a".repeat(32))))
        .basic_auth("admin", Some(TOKEN))
        .send()
        .await
        .unwrap();
    for r in [without, wrong, basic] {
        assert_eq!(r.status(), 401);
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"], "unauthenticated");
        assert!(!body.to_string().contains(TOKEN));
    }
    let text = scrape(&env).await;
    assert_eq!(
        must(&text, "coatcheck_admin_actions_total{action=\"refused\"}"),
        3.0
    );
}

/// The admin API path that lists (GET) or ends (DELETE) the sessions of subject `sub`.
fn of_subject(sub: &str) -> String {
    format!("/sessions?sub={}", bff::urlencode(sub))
}

/// How many sessions a listing holds.
fn session_count(list: &Value) -> usize {
    list["sessions"].as_array().unwrap().len()
}

/// The session's id, from `/bff/user`.
async fn session_id(b: &Browser) -> Value {
    user(b).await["session"]["id"].clone()
}

/// The field names of the first session of a listing, sorted.
fn session_keys(list: &Value) -> Vec<String> {
    let mut k: Vec<String> = list["sessions"][0]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    k.sort();
    k
}

/// The admin listing of `ids` (two sessions): each listed with every field an operator needs.
fn assert_lists_the_sessions(list: &Value, ids: &[Value]) {
    let sessions = list["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 2, "{list}");
    for s in sessions {
        assert!(ids.contains(&s["id"]), "{s}");
        for key in [
            "created_at",
            "last_seen",
            "expires_at",
            "idle_expires_at",
            "user_agent",
            "current",
        ] {
            assert!(s.get(key).is_some(), "{key} missing in {s}");
        }
    }
}

/// The configured issuer may be named explicitly (both sessions of `sub`); another issuer has
/// none of them.
async fn assert_listing_filters_by_issuer(env: &Env, sub: &str) {
    let issuer = format!("http://127.0.0.1:{}", env.idp_port);
    let explicit = admin_get(
        env,
        &format!("{}&iss={}", of_subject(sub), bff::urlencode(&issuer)),
    )
    .await;
    assert_eq!(session_count(&explicit), 2);
    let other = admin_get(
        env,
        &format!("{}&iss=https%3A%2F%2Fother.example", of_subject(sub)),
    )
    .await;
    assert_eq!(session_count(&other), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_lists_and_ends_every_session_of_a_subject() {
    let env = env_with_token().await;
    let laptop = env.logged_in("alice").await;
    let phone = env.logged_in("alice").await;
    let bob = env.logged_in("bob").await;
    let sub = user(&laptop).await["sub"].as_str().unwrap().to_owned();
    let ids = [session_id(&laptop).await, session_id(&phone).await];

    let r = admin(&env, Method::GET, &of_subject(&sub))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let list: Value = r.json().await.unwrap();
    assert_lists_the_sessions(&list, &ids);
    // The same shape as the user's own /bff/sessions.
    let own: Value = laptop
        .api(Method::GET, "/bff/sessions")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(session_keys(&list), session_keys(&own));
    assert_listing_filters_by_issuer(&env, &sub).await;
    let r = admin(&env, Method::GET, "/sessions").send().await.unwrap();
    assert_eq!(r.status(), 400, "sub is required");

    let r = admin(&env, Method::DELETE, &of_subject(&sub))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["revoked"], 2);
    for b in [&laptop, &phone] {
        assert_eq!(
            get_api(b, "/api/items").await,
            401,
            "alice's sessions ended"
        );
    }
    assert_eq!(
        get_api(&bob, "/api/items").await,
        200,
        "bob's session is untouched"
    );
    let list = admin_get(&env, &of_subject(&sub)).await;
    assert_eq!(session_count(&list), 0);
    let text = scrape(&env).await;
    assert_eq!(
        must(
            &text,
            "coatcheck_admin_actions_total{action=\"end_subject\"}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_ends_one_session_by_its_id() {
    let env = env_with_token().await;
    let laptop = env.logged_in("alice").await;
    let phone = env.logged_in("alice").await;
    let id = user(&laptop).await["session"]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let r = admin(&env, Method::DELETE, &format!("/sessions/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["revoked"], id.as_str());
    assert_eq!(
        get_api(&laptop, "/api/items").await,
        401,
        "that session ended"
    );
    assert_eq!(
        get_api(&phone, "/api/items").await,
        200,
        "the other one lives"
    );

    let again = admin(&env, Method::DELETE, &format!("/sessions/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 404, "an ended session is gone");
    let bad = admin(&env, Method::DELETE, "/sessions/not-a-session-id")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 404);
    let get = admin(&env, Method::GET, &format!("/sessions/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_counted_by_result_a_provider_outage_and_a_stray_callback() {
    let env = env("").await;
    let alice = env.logged_in("alice").await;
    // A callback this browser never started a login for.
    let r = env
        .browser()
        .request(
            Method::GET,
            "/bff/callback?code=x&state=0123456789abcdef0123",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    env.idp().set_outage("down").await;
    // Due but still valid: the refresh fails, the current token serves. The token is due two
    // seconds before it expires (`refresh_before_expiry`), counted from when the provider issued
    // it, so the requests go on until the first refresh was attempted rather than after a fixed
    // sleep from the end of the login (which, on a loaded machine, could land past the expiry).
    let failed_refreshes = |text: &str| {
        must(text, "coatcheck_refresh_total{result=\"idp_unavailable\"}")
            + must(text, "coatcheck_refresh_total{result=\"timeout\"}")
    };
    let give_up = std::time::Instant::now() + Duration::from_secs(TTL);
    loop {
        assert_eq!(get_api(&alice, "/api/during").await, 200);
        if failed_refreshes(&scrape(&env).await) > 0.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < give_up,
            "no refresh was attempted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.idp().set_outage("off").await;

    let text = scrape(&env).await;
    assert_eq!(must(&text, "coatcheck_logins_total{result=\"ok\"}"), 1.0);
    assert_eq!(
        must(&text, "coatcheck_logins_total{result=\"invalid_request\"}"),
        1.0
    );
    assert_eq!(failed_refreshes(&text), 1.0, "one failed refresh\n{text}");
    assert_eq!(must(&text, "coatcheck_refresh_total{result=\"ok\"}"), 0.0);
    assert!(must(&text, "coatcheck_idp_errors_total{endpoint=\"token\"}") >= 1.0);
    assert_eq!(must(&text, "coatcheck_store_errors_total"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_websocket_is_counted_as_an_upgrade_and_an_open_connection_until_it_closes() {
    let up = support::upstream::Upstream::start().await;
    let proxy = support::start_proxy(&format!(
        "[[route]]\npath = \"/api/\"\nupstream = \"{}\"\nauth = \"none\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        up.url()
    ))
    .await;
    let admin = proxy.admin_addr.unwrap();
    let scrape = || async move {
        admin_client()
            .get(format!("http://{admin}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let mut ws = support::RawConn::connect(proxy.addr).await;
    ws.send(
        format!(
            "GET /api/ws HTTP/1.1\r\nHost: localhost:{}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            proxy.addr.port()
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(ws.read_head().await.0, 101);
    ws.send(b"ping").await;
    assert_eq!(ws.read_exact(4).await, b"ping");
    let open = scrape().await;
    assert_eq!(must(&open, "coatcheck_upgrades_total"), 1.0);
    assert_eq!(must(&open, "coatcheck_upgrades_open"), 1.0);
    assert_eq!(must(&open, "coatcheck_connections_open"), 1.0);
    assert_eq!(
        must(
            &open,
            "coatcheck_requests_total{route=\"/api/\",status=\"101\"}"
        ),
        1.0
    );
    drop(ws);
    let deadline = tokio::time::Instant::now() + support::WAIT;
    loop {
        let text = scrape().await;
        if must(&text, "coatcheck_upgrades_open") == 0.0
            && must(&text, "coatcheck_connections_open") == 0.0
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the tunnel is still counted as open\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ending_a_subjects_sessions_on_one_instance_ends_them_on_every_instance() {
    let redis = support::redis::RedisServer::start();
    let api = support::upstream::Upstream::start().await;
    let idp_port = bff::free_port();
    let opts = EnvOptions {
        store: format!(
            "kind = \"redis\"\nurl = \"{}\"\nkey_prefix = \"admin:\"",
            redis.url()
        ),
        extra: format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n"),
        ..Default::default()
    };
    let text = bff::config_text(&opts, idp_port, &api.url());
    let one = support::start_proxy(&text).await;
    let two = support::start_proxy(&text).await;
    let _idp = support::idp::Idp::start(support::idp::IdpOptions {
        port: idp_port,
        ..Default::default()
    })
    .await;
    support::wait_ready(one.addr).await;
    support::wait_ready(two.addr).await;

    let mut alice = Browser::new(one.addr);
    assert_eq!(alice.login("alice", "alice-pw").await.status(), 200);
    let sub = user(&alice).await["sub"].as_str().unwrap().to_owned();
    let mut on_two = Browser::new(two.addr);
    on_two.cookies = alice.cookies.clone();
    // Now cached on the second instance too.
    assert_eq!(get_api(&on_two, "/api/x").await, 200);
    assert_eq!(get_api(&on_two, "/api/x").await, 200);

    let r = admin_client()
        .delete(format!(
            "http://{}/sessions?sub={}",
            one.admin_addr.unwrap(),
            bff::urlencode(&sub)
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["revoked"], 1);
    // The other instance is told (DESIGN §6: within 100 ms); allow a loaded machine a second.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    loop {
        let status = get_api(&on_two, "/api/x").await;
        if status == 401 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the second instance still serves the ended session ({status})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get_api(&alice, "/api/x").await, 401);
}

/// Runs `coatcheck sessions --admin URL ARGS…` with `token` in `COATCHECK_ADMIN_TOKEN`.
async fn cli(env: &Env, token: &str, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_coatcheck"))
        .args(["sessions", "--admin", &admin_url(env, "")])
        .args(args)
        .env("COATCHECK_ADMIN_TOKEN", token)
        .output()
        .await
        .expect("coatcheck sessions runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sessions_command_lists_and_ends_sessions_through_the_admin_api() {
    let env = env_with_token().await;
    let laptop = env.logged_in("alice").await;
    let phone = env.logged_in("alice").await;
    let bob = env.logged_in("bob").await;
    let sub = user(&laptop).await["sub"].as_str().unwrap().to_owned();
    let id = |v: Value| v["session"]["id"].as_str().unwrap().to_owned();
    let (laptop_id, phone_id) = (id(user(&laptop).await), id(user(&phone).await));

    let (code, out, err) = cli(&env, TOKEN, &["list", "--sub", &sub]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&laptop_id) && out.contains(&phone_id), "{out}");
    assert_eq!(out.lines().count(), 3, "a header and two sessions: {out}");
    let (code, out, _) = cli(&env, TOKEN, &["--json", "list", "--sub", &sub]).await;
    assert_eq!(code, 0);
    let listed: Value = serde_json::from_str(&out).expect("--json prints the API's JSON");
    assert_eq!(listed["sessions"].as_array().unwrap().len(), 2);

    let (code, out, err) = cli(&env, TOKEN, &["end", "--id", &laptop_id]).await;
    assert_eq!(
        (code, out.trim()),
        (0, &*format!("ended session {laptop_id}")),
        "{err}"
    );
    assert_eq!(get_api(&laptop, "/api/items").await, 401);
    assert_eq!(get_api(&phone, "/api/items").await, 200);

    let (code, out, _) = cli(&env, TOKEN, &["end", "--sub", &sub]).await;
    assert_eq!(
        (code, out.trim()),
        (0, "ended 1 session(s) on every instance")
    );
    assert_eq!(get_api(&phone, "/api/items").await, 401);
    assert_eq!(
        get_api(&bob, "/api/items").await,
        200,
        "another user is untouched"
    );

    // A wrong token: the API's refusal, exit 1, and the token shown nowhere.
    let wrong = "not-the-admin-token-0123456789";
    let (code, out, err) = cli(&env, wrong, &["list", "--sub", &sub]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("401"), "{err}");
    assert!(!err.contains(wrong) && !out.contains(wrong));
    let (code, _, err) = cli(&env, TOKEN, &["end", "--id", &laptop_id]).await;
    assert_eq!(code, 1, "an ended session is not found: {err}");
    assert!(err.contains("404"), "{err}");
}
