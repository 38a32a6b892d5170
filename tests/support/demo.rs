//! The real `scripts/demo` in a test: the script itself is run (debug binaries, short-lived access
//! tokens), so the tests exercise exactly what a person gets, and cannot drift from it.
//!
//! The demo listens on fixed ports (8443, 9000, 9001, 9090, 8080; 6390 and 8501–8503 with
//! `--instances 3`), outside the 20000–31999 range the other tests pick from; an exclusive lock
//! file makes the demo tests of every test process take turns. The script runs in its own process
//! group, which is ended (TERM, then KILL) when [`Demo`] is dropped.
#![allow(dead_code)]

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The repository: the script runs here and writes `data/` and `certs/` as for a person.
pub const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// The origin the demo serves.
pub const ORIGIN: &str = "https://localhost:8443";
/// Access-token lifetime the tests ask the demo's provider for: coatcheck refreshes a token with
/// less than half its life left (`refresh_before_expiry` is capped at half), so within seconds.
pub const ACCESS_TOKEN_TTL: u32 = 10;
/// Start-up bound: the script builds the debug binaries first (a no-op once built, a few minutes
/// on a cold target directory of a loaded 2-core machine).
const START_WITHIN: Duration = Duration::from_secs(600);
/// How long one demo test waits for another test's demo to finish.
const LOCK_WITHIN: Duration = Duration::from_secs(900);

/// Where the demo tests leave their artefacts (screenshots, the script's output).
pub fn artefacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("demo");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A running `scripts/demo`.
pub struct Demo {
    child: Child,
    /// The script's stdout and stderr (every piece it starts writes there too).
    pub log: PathBuf,
    /// Ports that answer `/readyz` once everything is up.
    ports: Vec<u16>,
    _lock: File,
}

impl Demo {
    /// Runs `scripts/demo ARGS` and waits until coatcheck (each instance) is ready.
    pub async fn start(args: &[&str]) -> Demo {
        let lock = tokio::task::spawn_blocking(take_lock).await.unwrap();
        let label = if args.is_empty() {
            "oidc".to_owned()
        } else {
            args.join("")
                .replace("--", "-")
                .trim_matches('-')
                .to_owned()
        };
        let log = artefacts().join(format!("scripts-demo-{label}.log"));
        let out = File::create(&log).unwrap();
        let child = {
            use std::os::unix::process::CommandExt as _;
            Command::new("bash")
                .arg("scripts/demo")
                .args(args)
                .current_dir(ROOT)
                .env("DEMO_PROFILE", "debug")
                .env("DEMO_ACCESS_TOKEN_TTL", ACCESS_TOKEN_TTL.to_string())
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .process_group(0)
                .spawn()
                .expect("run bash scripts/demo")
        };
        let ports = match args.iter().position(|a| *a == "--instances") {
            Some(i) => {
                let n: u16 = args[i + 1].parse().unwrap();
                (1..=n).map(|k| 8500 + k).chain([8443]).collect()
            }
            None => vec![8443],
        };
        let mut demo = Demo {
            child,
            log,
            ports,
            _lock: lock,
        };
        demo.wait_ready().await;
        demo
    }

    /// The last lines of the script's output.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_WITHIN;
        let mut pending = self.ports.clone();
        while !pending.is_empty() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "scripts/demo exited ({status}) before it was ready:\n{}",
                    self.log_tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "scripts/demo was not ready within {START_WITHIN:?}:\n{}",
                self.log_tail()
            );
            if Path::new(ROOT).join("certs/ca.crt").exists() {
                let port = pending[0];
                let ready = client_for(port)
                    .get(format!("https://localhost:{port}/readyz"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200);
                if ready {
                    pending.remove(0);
                    continue;
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Ends the script's process group: TERM (the script stops what it started), then KILL.
    pub fn stop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Whatever is left of the group (a child still draining its connections).
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.wait();
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One demo at a time across test processes (the ports are fixed).
fn take_lock() -> File {
    let path = std::env::temp_dir().join("coatcheck-demo-ports.lock");
    let file = File::create(&path).unwrap();
    let deadline = Instant::now() + LOCK_WITHIN;
    loop {
        match file.try_lock() {
            Ok(()) => return file,
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("{}: {e}", path.display()),
        }
    }
}

/// An HTTPS client that trusts the demo's development CA (`certs/ca.crt`) and sends
/// `localhost:<port>` to 127.0.0.1; no redirects followed.
pub fn client_for(port: u16) -> reqwest::Client {
    coatcheck::tls::install_provider();
    let ca = std::fs::read(Path::new(ROOT).join("certs/ca.crt")).expect("certs/ca.crt");
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
        .resolve("localhost", SocketAddr::from(([127, 0, 0, 1], port)))
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// Logs `user` in through the demo provider's HTML forms, as a browser would, and returns the
/// session cookie as a `Cookie` header value (`__Host-coatcheck=…`).
pub async fn login_cookie(user: &str) -> String {
    let client = client_for(8443);
    let start = client
        .get(format!("{ORIGIN}/bff/login?returnUrl=%2F"))
        .send()
        .await
        .expect("GET /bff/login");
    assert_eq!(start.status(), 302, "GET /bff/login");
    let login_cookie =
        cookie_pair(start.headers(), "__Host-coatcheck-login").expect("login cookie");
    let authorize = start.headers()["location"].to_str().unwrap().to_owned();
    let idp = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .cookie_store(true)
        .build()
        .unwrap();
    let callback =
        crate::support::idp::login_via_forms(&idp, &authorize, user, &format!("{user}-pw"))
            .await
            .unwrap_or_else(|e| panic!("provider login as {user}: {e}"));
    let done = client
        .get(&callback)
        .header("cookie", login_cookie)
        .header("user-agent", format!("curl/8 ({user}, tests/concepts.rs)"))
        .send()
        .await
        .expect("GET /bff/callback");
    assert_eq!(done.status(), 200, "callback: {:?}", done.text().await);
    cookie_pair(done.headers(), "__Host-coatcheck=").expect("session cookie")
}

/// `name=value` of the first `Set-Cookie` whose name starts with `prefix`.
fn cookie_pair(headers: &reqwest::header::HeaderMap, prefix: &str) -> Option<String> {
    headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(prefix))
        .map(|v| v.split(';').next().unwrap_or_default().to_owned())
}
