//! Session lifecycle: persistence across restarts, the device list, back-channel logout, and a
//! provider that is down when coatcheck starts.

#[path = "support/bff.rs"]
mod bff;
mod support;

use std::time::Duration;

use bff::{Browser, Env, EnvOptions};
use reqwest::Method;
use serde_json::{Value, json};
use support::idp::{Idp, IdpClient, IdpOptions};

#[tokio::test]
async fn sessions_in_the_embedded_store_survive_a_restart() {
    let dir = support::TempDir::new("sessions-restart");
    let store = format!(
        "kind = \"embedded\"\npath = {:?}",
        dir.join("sessions.db").display().to_string()
    );
    let env = Env::start(EnvOptions {
        store: store.clone(),
        ..Default::default()
    })
    .await;
    let mut b = env.logged_in("alice").await;
    assert_eq!(
        b.api(Method::GET, "/api/before")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let Env {
        idp,
        api,
        proxy,
        config,
        ..
    } = env;
    proxy.stop().await;
    // A new process would start from the same file: so does this new instance.
    let proxy = support::start_proxy(&config).await;
    b.addr = proxy.addr;
    b.client = support::http1_client(proxy.addr);
    let r = b.api(Method::GET, "/api/after").send().await.unwrap();
    assert_eq!(r.status(), 200, "the session survived the restart");
    assert!(
        api.last()
            .unwrap()
            .header("authorization")
            .unwrap()
            .starts_with("Bearer ey")
    );
    drop(idp);
}

/// The status of `method path` sent as the SPA sends it (`Browser::api`: cookies, CSRF header).
async fn api_status(b: &Browser, method: Method, path: &str) -> reqwest::StatusCode {
    b.api(method, path).send().await.unwrap().status()
}

/// The id of the browser's session, from `/bff/user`.
async fn session_id(b: &Browser) -> String {
    b.api(Method::GET, "/bff/user")
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["session"]["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn users_list_and_revoke_their_own_sessions() {
    let env = Env::start(EnvOptions::default()).await;
    let laptop = env.logged_in("alice").await;
    let phone = env.logged_in("alice").await;
    let other = env.logged_in("bob").await;
    let r = laptop
        .api(Method::GET, "/bff/sessions")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let list: Value = r.json().await.unwrap();
    let sessions = list["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 2, "{list}");
    assert_eq!(
        sessions
            .iter()
            .filter(|s| s["current"] == json!(true))
            .count(),
        1
    );
    let phone_id = session_id(&phone).await;
    let bob_id = session_id(&other).await;
    // Someone else's session cannot be named.
    let bobs_session = format!("/bff/sessions/{bob_id}");
    assert_eq!(
        api_status(&laptop, Method::DELETE, &bobs_session).await,
        404
    );
    assert_eq!(api_status(&other, Method::GET, "/api/x").await, 200);
    // Revoke the phone from the laptop.
    let phones_session = format!("/bff/sessions/{phone_id}");
    assert_eq!(
        laptop
            .request(Method::DELETE, &phones_session)
            .send()
            .await
            .unwrap()
            .status(),
        403,
        "CSRF header required"
    );
    assert_eq!(
        api_status(&laptop, Method::DELETE, &phones_session).await,
        200
    );
    assert_eq!(api_status(&phone, Method::GET, "/api/x").await, 401);
    assert_eq!(api_status(&laptop, Method::GET, "/api/x").await, 200);
    // Log out everywhere.
    let phone2 = env.logged_in("alice").await;
    assert_eq!(
        api_status(&laptop, Method::POST, "/bff/logout-all").await,
        200
    );
    assert_eq!(api_status(&phone2, Method::GET, "/api/x").await, 401);
    assert_eq!(api_status(&laptop, Method::GET, "/api/x").await, 401);
    assert_eq!(
        api_status(&other, Method::GET, "/api/x").await,
        200,
        "bob is untouched"
    );
}

#[tokio::test]
async fn a_provider_down_at_start_up_delays_logins_not_the_proxy() {
    let env = Env::start(EnvOptions {
        start_idp: false,
        ..Default::default()
    })
    .await;
    let b = env.browser();
    let ready = b.request(Method::GET, "/readyz").send().await.unwrap();
    assert_eq!(ready.status(), 503);
    assert_eq!(ready.json::<Value>().await.unwrap()["status"], "not_ready");
    assert_eq!(
        b.request(Method::GET, "/healthz")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        b.request(Method::GET, "/public/page")
            .send()
            .await
            .unwrap()
            .status(),
        200,
        "auth = none routes are served"
    );
    let login = b.request(Method::GET, "/bff/login").send().await.unwrap();
    assert_eq!(login.status(), 503);
    assert_eq!(
        login.json::<Value>().await.unwrap()["error"],
        "idp_unavailable"
    );
    // The provider comes up: coatcheck notices by itself, no restart.
    let idp = Idp::start(IdpOptions {
        port: env.idp_port,
        ..Default::default()
    })
    .await;
    env.wait_ready().await;
    let mut b = env.browser();
    assert_eq!(b.login("alice", "alice-pw").await.status(), 200);
    drop(idp);
}

#[tokio::test]
async fn a_back_channel_logout_from_the_provider_ends_the_session_at_once() {
    let env = Env::start(EnvOptions {
        start_idp: false,
        ..Default::default()
    })
    .await;
    let client = IdpClient {
        backchannel_logout_uri: Some(format!(
            "https://localhost:{}/bff/backchannel-logout",
            env.proxy.addr.port()
        )),
        ..IdpClient::default()
    };
    let mut opts = IdpOptions {
        port: env.idp_port,
        clients: vec![client],
        ..Default::default()
    };
    opts.extra_config.insert("tls_insecure".into(), json!(true));
    let idp = Idp::start(opts).await;
    env.wait_ready().await;
    let mut b = env.browser();
    assert_eq!(b.login("alice", "alice-pw").await.status(), 200);
    assert_eq!(
        b.api(Method::GET, "/api/x").send().await.unwrap().status(),
        200
    );
    // RP-initiated logout at the provider (as another RP, or the user at the provider, would do):
    // the provider posts a logout token to every RP of that session.
    let user: Value = b
        .api(Method::GET, "/bff/user")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let _ = user;
    let sessions_before = idp.stats().await["backchannel_logouts_sent"]
        .as_u64()
        .unwrap_or(0);
    let end = format!("{}/session/end", idp.issuer);
    let _ = support::idp::logout_via_forms(&b.idp_client, &end).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if idp.stats().await["backchannel_logouts_sent"]
            .as_u64()
            .unwrap_or(0)
            > sessions_before
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the provider sent no back-channel logout: {}",
            idp.stats().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = b.api(Method::GET, "/api/x").send().await.unwrap();
    assert_eq!(
        r.status(),
        401,
        "the session ended without the browser doing anything"
    );
}

#[tokio::test]
async fn a_forged_logout_token_is_refused() {
    let env = Env::start(EnvOptions::default()).await;
    let b = env.logged_in("alice").await;
    let r = b
        .client
        .post(b.url("/bff/backchannel-logout"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("logout_token=eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSJ9.")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        b.api(Method::GET, "/api/x").send().await.unwrap().status(),
        200
    );
}

#[tokio::test]
async fn an_acknowledged_session_survives_kill_9_and_a_restart() {
    let env = Env::start(EnvOptions::default()).await;
    let dir = support::TempDir::new("sessions-kill9");
    let store = format!(
        "kind = \"embedded\"\npath = {:?}",
        dir.join("sessions.db").display().to_string()
    );
    let text = support::proxy_config("", &env.config.replace("kind = \"memory\"", &store));
    let first = support::ProxyProcess::start(&text).await;
    let mut b = Browser::new(first.addr);
    wait_ready(&b).await;
    assert_eq!(b.login("alice", "alice-pw").await.status(), 200);
    assert_eq!(
        b.api(Method::GET, "/api/before")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // No shutdown, no flush: the process is killed outright.
    first.signal("KILL");
    let mut first = first;
    assert!(first.wait_exit(Duration::from_secs(10)).await.is_some());
    let second = support::ProxyProcess::start(&text).await;
    b.addr = second.addr;
    b.client = support::http1_client(second.addr);
    wait_ready(&b).await;
    let r = b.api(Method::GET, "/api/after").send().await.unwrap();
    assert_eq!(
        r.status(),
        200,
        "the session written before the crash is still there"
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

async fn wait_ready(b: &Browser) {
    support::wait_ready(b.addr).await;
}
