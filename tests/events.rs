//! `GET /bff/events`: the session-ended push (issue 11), on one instance and across instances.

#[path = "support/bff.rs"]
mod bff;
mod support;

use std::time::{Duration, Instant};

use bff::{Env, EnvOptions, ORIGIN};
use reqwest::Method;

use bff::{open_events as open, read_events_until as read_until};

#[tokio::test]
async fn a_logout_in_another_tab_is_pushed_to_the_event_stream_at_once() {
    let env = Env::start(EnvOptions::default()).await;
    let b = env.logged_in("alice").await;
    let r = open(&b).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    assert_eq!(r.headers()["cache-control"], "no-store");
    let (text, took) = bff::logout_heard(r, &b).await;
    let text = text.expect("the event arrives");
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert!(text.contains("data: {\"reason\":\"logout\"}"), "{text}");
}

#[tokio::test]
async fn a_revoked_device_hears_revoked() {
    let env = Env::start(EnvOptions::default()).await;
    let phone = env.logged_in("alice").await;
    let laptop = env.logged_in("alice").await;
    let user: serde_json::Value = phone
        .api(Method::GET, "/bff/user")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let phone_id = user["session"]["id"].as_str().unwrap().to_owned();
    let reader = tokio::spawn(read_until(
        open(&phone).await,
        "event: session-ended",
        Duration::from_secs(5),
    ));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = laptop
        .api(Method::DELETE, &format!("/bff/sessions/{phone_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = reader.await.unwrap().expect("the event arrives");
    assert!(text.contains("\"reason\":\"revoked\""), "{text}");
}

#[tokio::test]
async fn the_event_stream_needs_a_session_and_a_same_site_request() {
    let env = Env::start(EnvOptions::default()).await;
    let anonymous = env.browser();
    assert_eq!(open(&anonymous).await.status(), 401);
    let b = env.logged_in("alice").await;
    let cross = b
        .request(Method::GET, "/bff/events")
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .unwrap();
    assert_eq!(cross.status(), 403);
    let other_origin = b
        .request(Method::GET, "/bff/events")
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(other_origin.status(), 403);
    let ok = b
        .request(Method::GET, "/bff/events")
        .header("origin", ORIGIN)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn streams_per_session_are_capped() {
    let env = Env::start(EnvOptions::default()).await;
    let b = env.logged_in("alice").await;
    let mut open_streams = Vec::new();
    for _ in 0..coatcheck::session::MAX_STREAMS_PER_SESSION {
        let r = open(&b).await;
        assert_eq!(r.status(), 200);
        open_streams.push(r);
    }
    assert_eq!(open(&b).await.status(), 429);
    drop(open_streams.pop());
    // The dropped stream's slot frees once the server notices the closed connection.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = open(&b).await;
        if r.status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the slot was never freed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
