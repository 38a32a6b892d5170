//! Two coatcheck instances over one real Redis (`[session.store] kind = "redis"`): a session made
//! on one is served by the other, and readiness follows Redis.

#[path = "support/bff.rs"]
mod bff;
#[path = "support/stub_idp.rs"]
mod stub_idp;
mod support;

use std::time::Duration;

use bff::{Browser, SESSION_KEY};
use serde_json::json;
use stub_idp::{KID_ES256, StubIdp};
use support::redis::RedisServer;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn readyz(addr: std::net::SocketAddr) -> u16 {
    support::http1_client(addr)
        .get(format!("https://localhost:{}/readyz", addr.port()))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

async fn until_readyz(addr: std::net::SocketAddr, status: u16) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while readyz(addr).await != status {
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz never answered {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_made_on_one_instance_is_served_by_another_and_readiness_follows_redis() {
    let mut redis = RedisServer::start();
    let stub = StubIdp::start().await;
    let api = support::upstream::Upstream::start().await;
    let config = format!(
        "[session]\nkeys = [\"{SESSION_KEY}\"]\n[session.store]\nkind = \"redis\"\nurl = \"{url}\"\nkey_prefix = \"two:\"\n\n\
         [oidc]\nissuer = \"{issuer}\"\nclient_id = \"coatcheck\"\nclient_secret = \"s\"\nallowed_algs = [\"ES256\"]\n\n\
         [[route]]\npath = \"/api/\"\nupstream = \"{api}\"\nauth = \"required\"\n",
        url = redis.url(),
        issuer = stub.issuer,
        api = api.url(),
    );
    let a = support::start_proxy(&config).await;
    let b = support::start_proxy(&config).await;
    support::wait_ready(a.addr).await;
    support::wait_ready(b.addr).await;

    // Log in on A.
    let mut on_a = Browser::new(a.addr);
    let location = on_a.start_login("/").await;
    let url = url::Url::parse(&location).unwrap();
    let param = |n: &str| {
        url.query_pairs()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.into_owned())
            .unwrap()
    };
    let claims = json!({"iss": stub.issuer, "sub": "alice", "aud": "coatcheck", "iat": now(), "exp": now() + 300, "nonce": param("nonce")});
    stub.set_id_token(Some(stub.keys.sign(
        &json!({"alg": "ES256", "typ": "JWT", "kid": KID_ES256}),
        &claims,
    )));
    let r = on_a
        .finish_login(&format!("/bff/callback?code=c&state={}", param("state")))
        .await;
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    assert!(
        redis
            .cli(&["--scan", "--pattern", "two:{s}:rec:*"])
            .unwrap()
            .lines()
            .count()
            == 1,
        "the session is in Redis"
    );

    // The same cookie on B.
    let mut on_b = Browser::new(b.addr);
    on_b.cookies = on_a.cookies.clone();
    let r = on_b
        .api(reqwest::Method::GET, "/api/x")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "B serves A's session: {:?}",
        r.text().await
    );

    // Readiness follows Redis, and comes back by itself.
    redis.kill9();
    until_readyz(a.addr, 503).await;
    until_readyz(b.addr, 503).await;
    redis.start_again();
    until_readyz(a.addr, 200).await;
    until_readyz(b.addr, 200).await;
    let r = on_b
        .api(reqwest::Method::GET, "/api/x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "after the outage: {:?}", r.text().await);
}
