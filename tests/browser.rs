//! The product in a real browser: headless Chromium (Debian's `/usr/bin/chromium`, driven by
//! `playwright-core` from `tests/e2e/`) logs in through the real identity provider's HTML forms,
//! over HTTPS, to the demo app of `examples/sample_api.rs` behind coatcheck, calls the API with
//! `fetch` and logs out. `tests/e2e/login.mjs` does the clicking and reports what it saw as one
//! JSON line; this test starts every server and checks that report against what the upstream
//! and the provider recorded.
//!
//! Chromium must be installed (`apt-get install -y chromium`; `.ci/run` does): without it this
//! test fails, it never passes silently.

#[path = "support/bff.rs"]
mod bff;
mod support;
// The demo's single-page app, served as-is: the browser clicks the same "Log in", "Call
// /api/whoami" and "Log out" a user of `scripts/demo` does. (`main` is unused here.)
#[allow(dead_code)]
#[path = "../examples/sample_api.rs"]
mod sample_api;

use std::path::Path;

use coatcheck::config::Config;
use serde_json::Value;
use support::idp::{Idp, IdpClient, IdpOptions};
use support::upstream::Upstream;
use support::{TestProxy, WAIT, e2e};

/// Identity provider, API upstream, app upstream and coatcheck, all on loopback.
struct BrowserEnv {
    /// `https://localhost:PORT`: coatcheck's `public_origin`, and the URL the browser opens.
    origin: String,
    api: Upstream,
    idp: Idp,
    app: tokio::task::JoinHandle<std::io::Result<()>>,
    _proxy: TestProxy,
}

impl Drop for BrowserEnv {
    fn drop(&mut self) {
        self.app.abort();
    }
}

impl BrowserEnv {
    /// A browser only sends its `SameSite=Strict` cookie, and only gets past coatcheck's Origin
    /// check, when `public_origin` is the origin it really uses; so coatcheck listens on a port
    /// known in advance (not port 0) and the provider registers that origin's callback.
    async fn start() -> BrowserEnv {
        let api = Upstream::start().await;
        let app_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app_url = format!("http://{}", app_listener.local_addr().unwrap());
        let app = tokio::spawn(sample_api::serve(app_listener));
        let idp_port = bff::free_port();

        // The port is free when picked but could be taken before coatcheck binds it: try again.
        let mut attempt = 0;
        let (origin, proxy) = loop {
            attempt += 1;
            let port = bff::free_port();
            let config = config(port, idp_port, &api.url(), &app_url);
            match tokio::time::timeout(WAIT, coatcheck::app::start(config)).await {
                Ok(Ok(running)) => {
                    let proxy = TestProxy {
                        addr: running.addr,
                        redirect_addr: running.redirect_addr,
                        admin_addr: running.admin_addr,
                        running: Some(running),
                    };
                    break (format!("https://localhost:{port}"), proxy);
                }
                Ok(Err(e)) if attempt < 5 => eprintln!("coatcheck on port {port}: {e}; retrying"),
                Ok(Err(e)) => panic!("coatcheck did not start: {e}"),
                Err(_) => panic!("coatcheck did not start within {WAIT:?}"),
            }
        };

        // coatcheck retries discovery (with backoff) until the provider is up.
        let idp = Idp::start(IdpOptions {
            clients: vec![IdpClient::new(
                "coatcheck",
                "coatcheck-secret",
                format!("{origin}/bff/callback"),
                format!("{origin}/"),
            )],
            port: idp_port,
            ..IdpOptions::default()
        })
        .await;
        let env = BrowserEnv {
            origin,
            api,
            idp,
            app,
            _proxy: proxy,
        };
        env.wait_ready().await;
        env
    }

    async fn wait_ready(&self) {
        support::wait_ready(self._proxy.addr).await;
    }
}

/// The configuration a deployment would have: `/api/` needs a session, the app is public.
fn config(port: u16, idp_port: u16, api: &str, app: &str) -> Config {
    let certs = support::certs();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\npublic_origin = \"https://localhost:{port}\"\n\n\
         [server.tls]\ncert = {cert:?}\nkey = {key:?}\n\n\
         [session]\nkeys = [\"{key_b64}\"]\n\n[session.store]\nkind = \"memory\"\n\n\
         [oidc]\nissuer = \"http://127.0.0.1:{idp_port}\"\nclient_id = \"coatcheck\"\n\
         client_secret = \"coatcheck-secret\"\nrefresh_before_expiry = \"5s\"\n\n\
         [[route]]\npath = \"/api/\"\nupstream = \"{api}\"\nauth = \"required\"\n\n\
         [[route]]\npath = \"/\"\nupstream = \"{app}\"\nauth = \"none\"\n",
        cert = certs.cert.display().to_string(),
        key = certs.key.display().to_string(),
        key_b64 = bff::SESSION_KEY,
    );
    Config::from_toml(&text, Path::new("browser.toml"))
        .unwrap_or_else(|e| panic!("test config is invalid: {e}\n{text}"))
}

/// Runs `login.mjs` against the app and returns its JSON report (panics with its output if it
/// failed).
async fn browser_login(env: &BrowserEnv, user: &str, password: &str) -> Value {
    browser_run(env, user, password, &[]).await
}

/// Like [`browser_login`], with extra `E2E_*` switches for `login.mjs`.
async fn browser_run(
    env: &BrowserEnv,
    user: &str,
    password: &str,
    extra_env: &[(&str, &str)],
) -> Value {
    let mut envs = vec![
        ("E2E_APP_URL", format!("{}/", env.origin)),
        ("E2E_USER", user.to_owned()),
        ("E2E_PASSWORD", password.to_owned()),
        ("E2E_TIMEOUT_MS", "30000".to_owned()),
    ];
    envs.extend(extra_env.iter().map(|(k, v)| (*k, (*v).to_owned())));
    let run = e2e::run("login.mjs", &envs).await;
    match run.ok() {
        Some(r) => {
            // Shown with --nocapture (and E2E_DEBUG=1 for the page's requests).
            eprint!("{}", run.stderr);
            r.clone()
        }
        None => panic!(
            "the browser login failed ({}):\nstdout: {}\nstderr: {}\nprovider log:\n{}",
            run.status,
            run.stdout,
            run.stderr,
            env.idp.log_tail().join("\n")
        ),
    }
}

/// Back on the app, logged in as alice.
fn assert_landed_logged_in_as_alice(env: &BrowserEnv, report: &Value) {
    assert!(
        report["landed_on"]
            .as_str()
            .is_some_and(|u| u.starts_with(&format!("{}/", env.origin))),
        "{report}"
    );
    assert!(
        report["shown_user"]
            .as_str()
            .is_some_and(|u| u.contains("(alice)")),
        "{report}"
    );
}

/// The ticket, as the browser stored it: HttpOnly, Secure, SameSite=Strict, Path=/, no Domain,
/// gone from script's view.
fn assert_session_cookie_is_host_only_and_hidden(report: &Value) {
    let cookie = &report["cookie"];
    assert_eq!(cookie["name"], "__Host-coatcheck", "{report}");
    assert_eq!(cookie["httpOnly"], true, "{report}");
    assert_eq!(cookie["secure"], true, "{report}");
    assert_eq!(cookie["sameSite"], "Strict", "{report}");
    assert_eq!(cookie["path"], "/", "{report}");
    assert_eq!(cookie["domain"], "localhost", "host-only: {report}");
    assert_eq!(report["document_cookie_has_session"], false, "{report}");
}

/// The page's fetch reached the upstream, which saw a bearer JWT and no coatcheck cookie.
fn assert_api_calls_carry_the_bearer_and_no_session_cookie(env: &BrowserEnv, report: &Value) {
    assert_eq!(report["whoami"]["status"], 200, "{report}");
    assert_eq!(report["whoami"]["body"]["uri"], "/api/whoami", "{report}");
    assert!(
        report["whoami"]["authorization"]
            .as_str()
            .is_some_and(|a| a.starts_with("Bearer ey")),
        "{report}"
    );
    assert_eq!(report["api_button"], "HTTP 200", "{report}");
    let api_calls: Vec<_> = env
        .api
        .seen()
        .into_iter()
        .filter(|s| s.path() == "/api/whoami")
        .collect();
    assert_eq!(
        api_calls.len(),
        3,
        "the page's fetch, the app's button, the fetch beside a UTF-8 app cookie; nothing after logout"
    );
    // Browsers send cookie values as they were set: an app cookie holding UTF-8 must neither hide
    // the session nor be lost on the way to the API.
    assert_eq!(report["whoami_with_utf8_cookie"], 200, "{report}");
    assert_eq!(
        api_calls[2].header("cookie"),
        Some("e2e-theme=Zo\u{eb}\u{1f311}"),
        "the app's cookie reaches the API byte for byte, without coatcheck's"
    );
    for seen in &api_calls {
        let auth = seen.header("authorization").unwrap_or_default();
        assert!(auth.starts_with("Bearer ey"), "upstream saw {auth:?}");
        assert_eq!(auth.matches('.').count(), 2, "a JWT access token");
        assert!(
            !seen
                .header("cookie")
                .unwrap_or_default()
                .contains("coatcheck"),
            "coatcheck's cookies never reach the upstream: {:?}",
            seen.header("cookie")
        );
    }
}

/// Logged out: the API refuses the browser, the cookie is gone, the provider's session ended
/// and the refresh token was revoked.
async fn assert_logged_out_everywhere(env: &BrowserEnv, report: &Value) {
    assert_eq!(report["after_logout"]["status"], 401, "{report}");
    assert_eq!(
        report["after_logout"]["body"]["error"], "unauthenticated",
        "{report}"
    );
    assert_eq!(report["cookie_after_logout"], false, "{report}");
    assert!(
        report["after_logout_url"]
            .as_str()
            .is_some_and(|u| u.starts_with(&format!("{}/", env.origin))),
        "{report}"
    );
    let stats = env.idp.stats().await;
    assert_eq!(stats["logins"], 1, "{stats}");
    assert_eq!(stats["token_requests"]["authorization_code"], 1, "{stats}");
    assert_eq!(stats["revocations"], 1, "refresh token revoked: {stats}");
    assert_eq!(stats["end_sessions"], 1, "provider session ended: {stats}");
}

#[tokio::test]
async fn a_real_browser_logs_in_calls_the_api_with_the_bearer_and_logs_out() {
    e2e::chromium();
    let env = BrowserEnv::start().await;

    let report = browser_login(&env, "alice", "alice-pw").await;
    eprintln!("browser report: {report}");

    assert_landed_logged_in_as_alice(&env, &report);
    assert_session_cookie_is_host_only_and_hidden(&report);
    assert_api_calls_carry_the_bearer_and_no_session_cookie(&env, &report);
    assert_logged_out_everywhere(&env, &report).await;
}

#[tokio::test]
async fn logging_in_again_in_a_real_browser_ends_the_previous_session_with_strict_cookies() {
    e2e::chromium();
    let env = BrowserEnv::start().await;
    let report = browser_run(&env, "alice", "alice-pw", &[("E2E_RELOGIN", "1")]).await;
    eprintln!("browser report: {report}");
    let first = report["first_session"].as_str().expect("first session id");
    let second = report["second_session"]
        .as_str()
        .expect("second session id");
    assert_ne!(
        first, second,
        "the second login made a new session: {report}"
    );
    let ids: Vec<&str> = report["sessions_after_relogin"]
        .as_array()
        .expect("session list")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    // The callback came back cross-site without the SameSite=Strict cookie, yet the session the
    // browser held when it started the login is gone.
    assert!(
        !ids.contains(&first),
        "the first session survived: {report}"
    );
    assert_eq!(ids, [second], "{report}");
    assert_eq!(report["after_logout"]["status"], 401, "{report}");
}
