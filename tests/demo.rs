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

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use demo::Demo;
use serde_json::Value;

/// `package.json`, `package-lock.json` and `demo.mjs`.
const E2E_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e");
/// The browser `demo.mjs` drives unless `E2E_CHROMIUM` says otherwise.
const CHROMIUM: &str = "/usr/bin/chromium";
/// Upper bound for one browser run (launch, logins, every panel, a token refresh).
const BROWSER_DEADLINE: Duration = Duration::from_secs(180);

fn chromium() -> String {
    let chromium = std::env::var("E2E_CHROMIUM").unwrap_or_else(|_| CHROMIUM.to_owned());
    assert!(
        Path::new(&chromium).exists(),
        "{chromium} not found: this test needs headless Chromium. Install it with \
         `apt-get install -y chromium` (Debian; scripts/test does) or point E2E_CHROMIUM at one."
    );
    chromium
}

/// Runs `demo.mjs` in `mode` against the running demo; its JSON report (panics with its output
/// and the demo's if it failed).
async fn browse(demo: &Demo, mode: &str) -> Value {
    let chromium = chromium();
    tokio::task::spawn_blocking(|| support::idp::npm_ci_once(Path::new(E2E_DIR)))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}"));
    let shots = demo::artefacts().join("screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let node = std::env::var("IDP_NODE").unwrap_or_else(|_| "node".into());
    let run = tokio::process::Command::new(node)
        .arg("demo.mjs")
        .current_dir(E2E_DIR)
        .env("E2E_MODE", mode)
        .env("E2E_APP_URL", format!("{}/", demo::ORIGIN))
        .env("E2E_CHROMIUM", chromium)
        .env("E2E_SCREENSHOTS", &shots)
        .env("E2E_TIMEOUT_MS", "20000")
        .env(
            "E2E_REFRESH_WITHIN_MS",
            (demo::ACCESS_TOKEN_TTL * 3000).to_string(),
        )
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(BROWSER_DEADLINE, run)
        .await
        .unwrap_or_else(|_| panic!("the browser took longer than {BROWSER_DEADLINE:?}"))
        .expect("run node tests/e2e/demo.mjs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok());
    match report {
        Some(r) if out.status.success() && r["ok"] == true => {
            eprint!("{stderr}");
            eprintln!("screenshots: {}", shots.display());
            eprintln!("report: {r}");
            r
        }
        _ => panic!(
            "the browser run ({mode}) failed ({}):\nstdout: {stdout}\nstderr: {stderr}\n\
             screenshots so far: {}\nscripts/demo output ({}):\n{}",
            out.status,
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
