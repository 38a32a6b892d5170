//! Several instances on one Redis (issue 8): three real coatcheck processes, a real Redis, the real
//! provider with rotating refresh tokens and reuse detection.

#[path = "support/bff.rs"]
mod bff;
mod support;

use std::time::{Duration, Instant};

use bff::{Browser, EnvOptions};
use reqwest::Method;
use serde_json::{Value, json};
use support::ProxyProcess;
use support::idp::{Idp, IdpClient, IdpOptions, login_via_forms, logout_via_forms};
use support::redis::RedisServer as Redis;
use support::upstream::Upstream;

/// Three instances, one Redis, one provider, one API.
struct Nodes {
    redis: Redis,
    idp: Idp,
    /// Kept alive for the test (dropping it stops the API).
    _api: Upstream,
    nodes: Vec<ProxyProcess>,
}

/// Starts `n` instances; the provider's back-channel logouts go to instance `backchannel_to`.
async fn nodes(n: usize, access_token_ttl: u64, backchannel_to: usize) -> Nodes {
    let redis = Redis::start();
    let api = Upstream::start().await;
    let idp_port = bff::free_port();
    let opts = EnvOptions {
        access_token_ttl,
        store: format!(
            "kind = \"redis\"\nurl = \"{}\"\nkey_prefix = \"instances:\"",
            redis.url()
        ),
        start_idp: false,
        ..Default::default()
    };
    let text = support::proxy_config("", &bff::config_text(&opts, idp_port, &api.url()));
    let mut nodes = Vec::new();
    for _ in 0..n {
        nodes.push(ProxyProcess::start(&text).await);
    }
    let client = IdpClient {
        backchannel_logout_uri: Some(format!(
            "https://localhost:{}/bff/backchannel-logout",
            nodes[backchannel_to].addr.port()
        )),
        ..IdpClient::default()
    };
    let mut idp_opts = IdpOptions {
        port: idp_port,
        access_token_ttl,
        clients: vec![client],
        ..Default::default()
    };
    idp_opts
        .extra_config
        .insert("tls_insecure".into(), json!(true));
    let idp = Idp::start(idp_opts).await;
    for node in &nodes {
        support::wait_ready(node.addr).await;
    }
    Nodes {
        redis,
        idp,
        _api: api,
        nodes,
    }
}

impl Nodes {
    /// A browser talking to instance `i`, holding `from`'s cookies.
    fn on(&self, i: usize, from: &Browser) -> Browser {
        let mut b = Browser::new(self.nodes[i].addr);
        b.cookies = from.cookies.clone();
        b
    }

    async fn logged_in(&self, i: usize, user: &str) -> Browser {
        let mut b = Browser::new(self.nodes[i].addr);
        let r = b.login(user, &format!("{user}-pw")).await;
        assert_eq!(r.status(), 200, "login on instance {i}");
        b
    }

    async fn stat(&self, path: &[&str]) -> u64 {
        let mut v = self.idp.stats().await;
        for p in path {
            v = v[*p].clone();
        }
        v.as_u64().unwrap_or(0)
    }
}

async fn status(b: &Browser, path: &str) -> u16 {
    b.api(Method::GET, path)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// Polls until `b` is refused (401) and returns how long that took, or `None` after `within`.
async fn refused_within(b: &Browser, within: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if status(b, "/api/poll").await == 401 {
            return Some(t0.elapsed());
        }
    }
    None
}

#[tokio::test]
async fn a_session_made_on_one_instance_is_served_by_all_and_a_logout_on_one_ends_it_on_all() {
    let n = nodes(3, 60, 0).await;
    let a = n.logged_in(0, "alice").await;
    let (b, c) = (n.on(1, &a), n.on(2, &a));
    for (name, br) in [("A", &a), ("B", &b), ("C", &c)] {
        assert_eq!(status(br, "/api/x").await, 200, "instance {name}");
    }
    let r = b.api(Method::POST, "/bff/logout").send().await.unwrap();
    assert_eq!(r.status(), 200);
    // A and C hold the session in their caches: they must be told, not wait for the cache TTL.
    let (ta, tc) = tokio::join!(
        refused_within(&a, Duration::from_secs(2)),
        refused_within(&c, Duration::from_secs(2))
    );
    let (ta, tc) = (ta.expect("A refuses"), tc.expect("C refuses"));
    println!("logout on B refused on A after {ta:?}, on C after {tc:?}");
    assert!(
        ta <= Duration::from_millis(100) && tc <= Duration::from_millis(100),
        "A after {ta:?}, C after {tc:?}"
    );
}

#[tokio::test]
async fn a_back_channel_logout_delivered_to_one_instance_ends_the_session_on_all() {
    let n = nodes(3, 60, 2).await;
    let a = n.logged_in(0, "alice").await;
    let b = n.on(1, &a);
    assert_eq!(status(&a, "/api/x").await, 200);
    assert_eq!(status(&b, "/api/x").await, 200);
    let sent = n.stat(&["backchannel_logouts_sent"]).await;
    let end = format!("{}/session/end", n.idp.issuer);
    let _ = logout_via_forms(&a.idp_client, &end).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while n.stat(&["backchannel_logouts_sent"]).await <= sent {
        assert!(Instant::now() < deadline, "no back-channel logout was sent");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused_within(&a, Duration::from_secs(2)).await.is_some());
    assert!(refused_within(&b, Duration::from_secs(2)).await.is_some());
}

#[tokio::test]
async fn the_same_callback_delivered_to_two_instances_makes_one_session() {
    let n = nodes(2, 60, 0).await;
    let mut a = Browser::new(n.nodes[0].addr);
    let authorize = a.start_login("/app/home").await;
    let callback = login_via_forms(&a.idp_client, &authorize, "alice", "alice-pw")
        .await
        .unwrap();
    let mut b = n.on(1, &a);
    n.idp.reset_stats().await;
    let (ra, rb) = tokio::join!(a.finish_login(&callback), b.finish_login(&callback));
    let ok: Vec<u16> = [ra.status().as_u16(), rb.status().as_u16()].into();
    assert_eq!(
        ok.iter().filter(|s| **s == 200).count(),
        1,
        "exactly one delivery logs in: {ok:?}"
    );
    assert_eq!(
        a.session_cookie().is_some() as u8 + b.session_cookie().is_some() as u8,
        1
    );
    assert_eq!(
        n.stat(&["token_requests", "authorization_code"]).await,
        1,
        "the code is exchanged once"
    );
}

#[tokio::test]
async fn two_hundred_requests_over_three_instances_after_expiry_cause_exactly_one_refresh() {
    let n = nodes(3, 4, 0).await;
    let a = n.logged_in(0, "alice").await;
    let browsers = [n.on(0, &a), n.on(1, &a), n.on(2, &a)];
    for b in &browsers {
        assert_eq!(status(b, "/api/warm").await, 200);
    }
    for round in 0..2 {
        n.idp.reset_stats().await;
        // Access tokens live 4 s; refresh_before_expiry is capped at half: due after 2 s.
        tokio::time::sleep(Duration::from_millis(2_300)).await;
        let statuses = bff::burst(&[&browsers[0], &browsers[1], &browsers[2]], 200).await;
        assert!(
            statuses.iter().all(|&s| s == 200),
            "round {round}: {statuses:?}"
        );
        assert_eq!(
            n.stat(&["token_requests", "refresh_token"]).await,
            1,
            "round {round}: exactly one refresh grant across three instances: {}",
            n.idp.stats().await
        );
        assert_eq!(n.stat(&["refresh_token_failures"]).await, 0);
    }
}

#[tokio::test]
async fn every_instance_lists_the_sessions_created_on_all_of_them() {
    let n = nodes(3, 60, 0).await;
    let mut devices = Vec::new();
    for i in 0..3 {
        devices.push(n.logged_in(i, "bob").await);
    }
    for i in 0..3 {
        let list: Value = n
            .on(i, &devices[(i + 1) % 3])
            .api(Method::GET, "/bff/sessions")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let count = list["sessions"].as_array().map_or(0, Vec::len);
        assert_eq!(count, 3, "instance {i}: {list}");
    }
}

#[tokio::test]
async fn redis_down_logs_nobody_out_and_everything_recovers_by_itself() {
    let mut n = nodes(3, 60, 0).await;
    let a = n.logged_in(0, "alice").await;
    let b = n.on(1, &a);
    assert_eq!(status(&a, "/api/x").await, 200);
    assert_eq!(status(&b, "/api/x").await, 200);
    // Load on A and B while Redis crashes (a crash, not a clean shutdown: only what was
    // acknowledged with appendfsync counts).
    let load = |b: Browser| {
        tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..40 {
                out.push(status(&b, &format!("/api/load/{i}")).await);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            out
        })
    };
    let (load_a, load_b) = (load(n.on(0, &a)), load(n.on(1, &a)));
    tokio::time::sleep(Duration::from_millis(150)).await;
    n.redis.kill9();
    for (name, l) in [("A", load_a), ("B", load_b)] {
        let statuses = l.await.unwrap();
        assert!(
            statuses.iter().all(|&s| s == 200),
            "cached sessions on {name} keep working: {statuses:?}"
        );
    }
    for i in 0..5 {
        assert_eq!(
            status(&a, &format!("/api/down/{i}")).await,
            200,
            "cached on A"
        );
    }
    // A cache miss (instance C never saw the session) and a new login get 503, not a logout.
    let c = n.on(2, &a);
    let r = c.api(Method::GET, "/api/miss").send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "store_unavailable");
    assert!(
        c.session_cookie().is_some(),
        "the cookie is kept during the outage"
    );
    let mut newcomer = Browser::new(n.nodes[0].addr);
    let login = newcomer.login("bob", "bob-pw").await;
    assert_eq!(login.status(), 503, "a login cannot create a session now");
    let ready = support::http1_client(n.nodes[0].addr)
        .get(format!(
            "https://localhost:{}/readyz",
            n.nodes[0].addr.port()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503, "/readyz says not ready");
    // Redis returns (same data directory): nobody restarts coatcheck.
    n.redis.start_again();
    for node in &n.nodes {
        support::wait_ready(node.addr).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&c, "/api/back").await != 200 {
        assert!(Instant::now() < deadline, "C never recovered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status(&a, "/api/back").await, 200);
    assert_eq!(status(&b, "/api/back").await, 200);
    assert_eq!(newcomer.login("bob", "bob-pw").await.status(), 200);
}

#[tokio::test]
async fn kill_9_of_one_instance_leaves_its_sessions_served_by_the_others() {
    let mut n = nodes(3, 60, 0).await;
    let a = n.logged_in(0, "alice").await;
    assert_eq!(status(&a, "/api/x").await, 200);
    let mut first = n.nodes.remove(0);
    first.signal("KILL");
    assert!(first.wait_exit(Duration::from_secs(5)).await.is_some());
    assert_eq!(status(&n.on(0, &a), "/api/after").await, 200);
    assert_eq!(status(&n.on(1, &a), "/api/after").await, 200);
}

#[tokio::test]
async fn an_instance_started_without_redis_reports_not_ready_and_connects_when_it_appears() {
    let mut redis = Redis::start();
    redis.stop();
    let api = Upstream::start().await;
    let idp = Idp::start(IdpOptions::default()).await;
    let opts = EnvOptions {
        store: format!("kind = \"redis\"\nurl = \"{}\"", redis.url()),
        start_idp: false,
        ..Default::default()
    };
    let text = support::proxy_config("", &bff::config_text(&opts, idp.port, &api.url()));
    let node = ProxyProcess::start(&text).await;
    let readyz = || async {
        support::http1_client(node.addr)
            .get(format!("https://localhost:{}/readyz", node.addr.port()))
            .send()
            .await
            .unwrap()
            .status()
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(readyz().await, 503, "not ready without Redis");
    let mut b = Browser::new(node.addr);
    assert_eq!(b.login("alice", "alice-pw").await.status(), 503);
    redis.start_again();
    support::wait_ready(node.addr).await;
    let mut b = Browser::new(node.addr);
    assert_eq!(b.login("alice", "alice-pw").await.status(), 200);
    assert_eq!(status(&b, "/api/x").await, 200);
}

#[tokio::test]
async fn a_logout_on_one_instance_is_pushed_to_an_event_stream_on_another() {
    let n = nodes(2, 60, 0).await;
    let a = n.logged_in(0, "alice").await;
    let b = n.on(1, &a);
    let stream = bff::open_events(&a).await;
    assert_eq!(stream.status(), 200);
    let (seen, took) = bff::logout_heard(stream, &b).await;
    let seen = seen.expect("the event arrives");
    assert!(seen.contains("\"reason\":\"logout\""), "{seen}");
    assert!(took < Duration::from_secs(1), "{took:?}");
}

#[tokio::test]
async fn a_store_that_refuses_writes_never_fails_a_read() {
    // Instance B's Redis user may read and subscribe but not write: its idle-clock writes fail.
    let redis = Redis::start();
    redis
        .cli(&[
            "ACL",
            "SETUSER",
            "reader",
            "on",
            ">reader-pw",
            "~*",
            "&*",
            "+@read",
            "+@connection",
            "+subscribe",
            "+ping",
            "+@scripting",
            "+role",
            "+client",
            "+hello",
            "+info",
        ])
        .unwrap();
    let api = Upstream::start().await;
    let idp = Idp::start(IdpOptions::default()).await;
    let config = |url: &str| {
        let opts = EnvOptions {
            store: format!("kind = \"redis\"\nurl = \"{url}\"\nkey_prefix = \"ro:\""),
            session: "touch_interval = \"1s\"".into(),
            start_idp: false,
            ..Default::default()
        };
        support::proxy_config("", &bff::config_text(&opts, idp.port, &api.url()))
    };
    let writer = ProxyProcess::start(&config(&redis.url())).await;
    let reader_url = redis.url().replace("redis://", "redis://reader:reader-pw@");
    let reader = ProxyProcess::start(&config(&reader_url)).await;
    support::wait_ready(writer.addr).await;
    support::wait_ready(reader.addr).await;
    let mut a = Browser::new(writer.addr);
    assert_eq!(a.login("alice", "alice-pw").await.status(), 200);
    let mut b = Browser::new(reader.addr);
    b.cookies = a.cookies.clone();
    // Past the touch interval: B's first read wants to write the idle clock, and cannot.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    for i in 0..3 {
        assert_eq!(
            status(&b, &format!("/api/read/{i}")).await,
            200,
            "request {i}"
        );
    }
    assert!(
        reader.logs().contains("could not record session activity"),
        "the failed write was logged"
    );
}
