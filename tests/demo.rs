//! The demo's tour in a real browser (issue 13): the real `scripts/demo` (debug binaries, access
//! tokens of a few seconds), headless Chromium (Debian's `/usr/bin/chromium` driven by
//! `playwright-core` from `tests/e2e/`) clicking through every panel of
//! `examples/sample_app.html`, then `--instances 3` and `--capture`. `tests/e2e/demo.mjs` does the
//! clicking, saves a screenshot of every panel and state, and reports what it saw as one JSON line;
//! these tests check that report.
//!
//! Screenshots and the script's output: `$CARGO_TARGET_TMPDIR/demo/` (`target/tmp/demo/`), printed
//! by each test. Chromium and `redis-server` must be installed (`scripts/test` installs them):
//! without them these tests fail, they never pass silently.

#[path = "support/demo.rs"]
mod demo;
mod support;

use demo::Demo;
use serde_json::Value;
use support::e2e;

/// Runs `demo.mjs` in `mode` against the running demo; its JSON report (panics with its output
/// and the demo's if it failed).
async fn browse(demo: &Demo, mode: &str) -> Value {
    let shots = demo::artefacts().join("screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let envs = [
        ("E2E_MODE", mode.to_owned()),
        ("E2E_APP_URL", format!("{}/", demo::ORIGIN)),
        ("E2E_SCREENSHOTS", shots.display().to_string()),
        ("E2E_TIMEOUT_MS", "20000".to_owned()),
        (
            "E2E_REFRESH_WITHIN_MS",
            (demo::ACCESS_TOKEN_TTL * 3000).to_string(),
        ),
    ];
    let run = e2e::run("demo.mjs", &envs).await;
    match run.ok() {
        Some(r) => {
            eprint!("{}", run.stderr);
            eprintln!("screenshots: {}", shots.display());
            eprintln!("report: {r}");
            r.clone()
        }
        None => panic!(
            "the browser run ({mode}) failed ({}):\nstdout: {}\nstderr: {}\n\
             screenshots so far: {}\nscripts/demo output ({}):\n{}",
            run.status,
            run.stdout,
            run.stderr,
            shots.display(),
            demo.log.display(),
            demo.log_tail()
        ),
    }
}

fn shots_named(report: &Value) -> Vec<&str> {
    report["screenshots"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect()
}

#[tokio::test]
async fn the_tour_shows_who_the_api_claims_a_silent_refresh_the_devices_and_the_live_line() {
    let demo = Demo::start(&[]).await;
    let r = browse(&demo, "tour").await;

    // who: the user and the session's end.
    assert!(r["who"].as_str().unwrap().contains("Alice"), "{r}");
    assert!(r["who"].as_str().unwrap().contains("(alice)"), "{r}");
    assert!(r["who_until"].as_str().unwrap().contains("in "), "{r}");
    // The page's script sees no cookie at all: the session cookie is HttpOnly.
    assert_eq!(r["document_cookie"], "\"\"", "{r}");
    // api: the claims of the token coatcheck injected; the token itself only as a short prefix.
    assert_eq!(r["api"]["status"], "HTTP 200", "{r}");
    assert_eq!(r["api"]["sub"], "alice", "{r}");
    assert!(
        r["api_claims_shown"].as_str().unwrap().contains("jti"),
        "{r}"
    );
    // token: a countdown, then a refresh nobody on the page asked for.
    assert!(
        r["refresh_line"]
            .as_str()
            .unwrap()
            .contains("silently refreshed"),
        "{r}"
    );
    // devices and live: the phone revoked from the laptop, pushed at once; then everywhere.
    assert_eq!(r["devices"], 3, "{r}");
    assert!(
        r["phone_live"]["text"]
            .as_str()
            .unwrap()
            .contains("revoked"),
        "{r}"
    );
    assert!(
        r["phone_live"]["after_click_ms"].as_u64().unwrap() < 10_000,
        "pushed, not noticed later: {r}"
    );
    assert_eq!(r["phone_api_after"], 401, "{r}");
    assert!(
        r["laptop_live"]["text"]
            .as_str()
            .unwrap()
            .contains("logout"),
        "{r}"
    );
    assert!(
        r["tablet_live"]["text"]
            .as_str()
            .unwrap()
            .contains("logout"),
        "{r}"
    );
    assert_eq!(r["tablet_api_after"], 401, "{r}");
    let shots = shots_named(&r);
    for panel in [
        "anonymous",
        "who",
        "api",
        "token-countdown",
        "token-refreshed",
        "live-connected",
        "devices",
        "phone-live-revoked",
        "devices-after-revoke",
        "tablet-live-logout",
    ] {
        assert!(
            shots.iter().any(|s| s.ends_with(&format!("-{panel}.png"))),
            "no screenshot of {panel}: {shots:?}"
        );
    }
}

#[tokio::test]
async fn with_three_instances_a_logout_on_one_ends_the_session_on_all() {
    let demo = Demo::start(&["--instances", "3"]).await;
    let r = browse(&demo, "instances").await;
    let (a, b, a2) = (&r["instance_a"], &r["instance_b"], &r["instance_a2"]);
    assert!(a.is_u64() && b.is_u64() && a2.is_u64(), "{r}");
    assert_ne!(a, b, "two browsers on two instances: {r}");
    assert_ne!(a, a2, "one session served by two instances: {r}");
    // Logged out on instance a: the other instance's event stream said so, and the session is
    // refused on every instance.
    assert!(
        r["b_live"]["text"].as_str().unwrap().contains("logout"),
        "{r}"
    );
    assert_eq!(r["b_after"], 401, "{r}");
    assert_eq!(r["a2_after"]["status"], 401, "{r}");
    let log = std::fs::read_to_string(&demo.log).unwrap();
    for i in 1..=3 {
        assert!(
            log.contains(&format!("→ instance {i} ")),
            "the balancer never used instance {i}:\n{}",
            demo.log_tail()
        );
    }
}

#[tokio::test]
async fn the_capture_demo_logs_in_through_the_legacy_api_without_a_token_in_the_page() {
    let demo = Demo::start(&["--capture"]).await;
    let r = browse(&demo, "capture").await;
    assert_eq!(r["login_status"], 200, "{r}");
    assert!(r["login_answer"]["user"].is_object(), "{r}");
    assert!(r["login_answer"].get("access_token").is_none(), "{r}");
    assert_eq!(r["api_sub"], "alice", "{r}");
    assert_eq!(r["local_storage"], serde_json::json!({}), "{r}");
    assert_eq!(r["cookie"]["httpOnly"], true, "{r}");
    assert!(shots_named(&r).len() >= 2, "{r}");
}
