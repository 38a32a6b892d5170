//! The legacy API test upstream (`tests/support/legacy_api.rs`) on its own: login, rotation,
//! reuse detection, logout, revocation and access-token expiry, spoken to over real HTTP.

mod support;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::legacy_api::{Counts, LegacyApi, LegacyOptions};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn post(api: &LegacyApi, path: &str, body: Value) -> (StatusCode, Value) {
    let r = client()
        .post(format!("{}{path}", api.url()))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn login(api: &LegacyApi, user: &str) -> Value {
    let (status, body) = post(
        api,
        "/auth/login",
        json!({"username": user, "password": format!("{user}-pw")}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn refresh(api: &LegacyApi, token: &Value) -> (StatusCode, Value) {
    post(api, "/auth/refresh", json!({"refresh_token": token})).await
}

async fn call(api: &LegacyApi, access_token: Option<&str>) -> reqwest::Response {
    let mut req = client().get(format!("{}/api/orders?x=1", api.url()));
    if let Some(t) = access_token {
        req = req.bearer_auth(t);
    }
    req.send().await.unwrap()
}

fn challenge(r: &reqwest::Response) -> String {
    r.headers()["www-authenticate"].to_str().unwrap().to_owned()
}

#[tokio::test]
async fn login_answers_a_token_pair_and_the_user_and_the_api_echoes_the_claims() {
    let api = LegacyApi::start().await;
    let body = login(&api, "alice").await;
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 4);
    assert_eq!(
        body["user"],
        json!({"id": "alice", "name": "Alice Liddell", "email": "alice@example.test"})
    );
    let refresh_token = body["refresh_token"].as_str().unwrap();
    assert!(refresh_token.len() >= 43, "256 random bits");
    let access = body["access_token"].as_str().unwrap();
    let claims = api.verify(access).unwrap();
    assert_eq!(claims.exp - claims.iat, 4);
    let r = call(&api, Some(access)).await;
    assert_eq!(r.status(), 200);
    let echoed: Value = r.json().await.unwrap();
    assert_eq!(echoed["claims"]["sub"], "alice");
    assert_eq!(echoed["claims"]["name"], "Alice Liddell");
    assert_eq!(echoed["claims"]["roles"], json!(["user"]));
    assert_eq!(echoed["path"], "/api/orders");
    let seen = api.last().unwrap();
    assert_eq!(seen.uri, "/api/orders?x=1");
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {access}").as_str())
    );
    assert_eq!(
        api.counts(),
        Counts {
            logins: 1,
            api_calls: 1,
            ..Counts::default()
        }
    );
}

#[tokio::test]
async fn wrong_credentials_and_malformed_logins_are_refused() {
    let api = LegacyApi::start().await;
    let (status, body) = post(
        &api,
        "/auth/login",
        json!({"username": "alice", "password": "bob-pw"}),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(body["error"], "invalid_credentials");
    assert!(body.get("access_token").is_none());
    let (status, _) = post(&api, "/auth/login", json!({"username": "mallory"})).await;
    assert_eq!(status, 400);
    let c = api.counts();
    assert_eq!((c.logins, c.login_failures), (0, 1));
}

#[tokio::test]
async fn a_refresh_rotates_the_pair_and_a_spent_token_is_refused() {
    let api = LegacyApi::start().await;
    let first = login(&api, "bob").await;
    let (status, second) = refresh(&api, &first["refresh_token"]).await;
    assert_eq!(status, 200, "{second}");
    assert_ne!(second["refresh_token"], first["refresh_token"]);
    assert_ne!(second["access_token"].as_str(), None);
    assert_eq!(second["user"]["id"], "bob");
    let claims = api
        .verify(second["access_token"].as_str().unwrap())
        .unwrap();
    assert_eq!(claims.roles, ["user", "admin"]);
    // The new one works, again and again.
    let (status, third) = refresh(&api, &second["refresh_token"]).await;
    assert_eq!(status, 200, "{third}");
    assert_eq!(api.counts().refreshes, 2);
    assert_eq!(api.live_families("bob"), 1);
}

#[tokio::test]
async fn replaying_a_spent_refresh_token_revokes_the_whole_family() {
    let api = LegacyApi::start().await;
    let first = login(&api, "alice").await;
    let other_login = login(&api, "alice").await;
    let (_, second) = refresh(&api, &first["refresh_token"]).await;
    let (status, body) = refresh(&api, &first["refresh_token"]).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"], "invalid_grant");
    // The legitimate newest token of that login dies with it...
    let (status, body) = refresh(&api, &second["refresh_token"]).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"], "invalid_grant");
    // ...the user's other login does not.
    let (status, _) = refresh(&api, &other_login["refresh_token"]).await;
    assert_eq!(status, 200);
    let c = api.counts();
    assert_eq!(
        (c.refreshes, c.refresh_reuse, c.refresh_refused),
        (2, 1, 1),
        "{c:?}"
    );
}

#[tokio::test]
async fn logout_and_revocation_by_a_test_end_refresh_tokens() {
    let api = LegacyApi::start().await;
    let a = login(&api, "alice").await;
    let r = client()
        .post(format!("{}/auth/logout", api.url()))
        .json(&json!({"refresh_token": a["refresh_token"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(refresh(&api, &a["refresh_token"]).await.0, 401);
    let b1 = login(&api, "bob").await;
    let b2 = login(&api, "bob").await;
    let alice = login(&api, "alice").await;
    assert_eq!(api.revoke_user("bob"), 2);
    assert_eq!(refresh(&api, &b1["refresh_token"]).await.0, 401);
    assert_eq!(refresh(&api, &b2["refresh_token"]).await.0, 401);
    assert_eq!(refresh(&api, &alice["refresh_token"]).await.0, 200);
    let c = api.counts();
    assert_eq!((c.logouts, c.refresh_refused, c.refreshes), (1, 3, 1));
    assert_eq!(
        api.seen()[1].json(),
        json!({"refresh_token": a["refresh_token"]})
    );
}

#[tokio::test]
async fn expired_invalid_and_missing_access_tokens_get_401_with_a_bearer_challenge() {
    let api = LegacyApi::start_with(LegacyOptions {
        access_ttl: Duration::from_secs(1),
        expires_in: false,
        ..LegacyOptions::default()
    })
    .await;
    let body = login(&api, "alice").await;
    assert!(body.get("expires_in").is_none(), "{body}");
    let access = body["access_token"].as_str().unwrap().to_owned();
    assert_eq!(call(&api, Some(&access)).await.status(), 200);
    // Expires by itself (no leeway).
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let r = call(&api, Some(&access)).await;
    assert_eq!(r.status(), 401);
    assert_eq!(challenge(&r), "Bearer error=\"invalid_token\"");
    let r = call(&api, Some(&api.mint_access_token("bob", -10))).await;
    assert_eq!(r.status(), 401);
    assert_eq!(challenge(&r), "Bearer error=\"invalid_token\"");
    // Signed with another key (another server's).
    let stranger = LegacyApi::start().await;
    let r = call(&api, Some(&stranger.mint_access_token("alice", 60))).await;
    assert_eq!(r.status(), 401);
    assert_eq!(challenge(&r), "Bearer error=\"invalid_token\"");
    let r = call(&api, None).await;
    assert_eq!(r.status(), 401);
    assert_eq!(challenge(&r), "Bearer");
    assert_eq!(
        call(&api, Some(&api.mint_access_token("bob", 60)))
            .await
            .status(),
        200
    );
    let c = api.counts();
    assert_eq!((c.api_calls, c.api_unauthorized), (2, 4));
}
