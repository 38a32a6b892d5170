//! Headless Chromium from the tests: a script of `tests/e2e/` (playwright-core driving Debian's
//! `/usr/bin/chromium`, never a downloaded browser) runs as a child process, clicks through a page
//! and prints what it saw as one JSON line.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

/// `tests/e2e`: the scripts, their `package.json` and `node_modules`.
pub const E2E_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e");
/// Every browser run is bounded by this.
pub const DEADLINE: Duration = Duration::from_secs(180);
/// The browser the scripts drive unless `E2E_CHROMIUM` says otherwise.
const CHROMIUM: &str = "/usr/bin/chromium";

/// The Chromium executable; panics with how to install it when it is missing.
pub fn chromium() -> String {
    let chromium = std::env::var("E2E_CHROMIUM").unwrap_or_else(|_| CHROMIUM.to_owned());
    assert!(
        Path::new(&chromium).exists(),
        "{chromium} not found: this test needs headless Chromium. Install it with \
         `apt-get install -y chromium` (Debian; scripts/test does) or point E2E_CHROMIUM at one."
    );
    chromium
}

/// Installs `tests/e2e/node_modules` once, across concurrent test processes.
pub async fn ensure_node_modules() {
    tokio::task::spawn_blocking(|| super::idp::npm_ci_once(Path::new(E2E_DIR)))
        .await
        .expect("npm ci task")
        .unwrap_or_else(|e| panic!("{e}"));
}

/// What a script run left: its exit status, its last JSON line, and its output.
pub struct Run {
    pub success: bool,
    pub status: String,
    pub report: Option<Value>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The report, when the script exited 0 and said `"ok": true`.
    pub fn ok(&self) -> Option<&Value> {
        self.report
            .as_ref()
            .filter(|r| self.success && r["ok"] == true)
    }

    /// The report whatever it says (panics with the output when there is none).
    pub fn report(self) -> Value {
        match self.report {
            Some(r) => r,
            None => panic!(
                "no report ({}):\nstdout: {}\nstderr: {}",
                self.status, self.stdout, self.stderr
            ),
        }
    }
}

/// Runs `node tests/e2e/<script>` with `E2E_CHROMIUM` and `envs`, within [`DEADLINE`].
pub async fn run(script: &str, envs: &[(&str, String)]) -> Run {
    ensure_node_modules().await;
    let node = std::env::var("IDP_NODE").unwrap_or_else(|_| "node".into());
    let child = tokio::process::Command::new(node)
        .arg(script)
        .current_dir(E2E_DIR)
        .env("E2E_CHROMIUM", chromium())
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(DEADLINE, child)
        .await
        .unwrap_or_else(|_| panic!("the browser ({script}) took longer than {DEADLINE:?}"))
        .unwrap_or_else(|e| panic!("run node tests/e2e/{script}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let report = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok());
    Run {
        success: out.status.success(),
        status: out.status.to_string(),
        report,
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
