//! Test identity provider: a real OpenID Provider (`oidc-provider` on node) driven from Rust.
//!
//! Use it from an integration test with `#[path = "support/idp.rs"] mod idp;` or from
//! `tests/support/mod.rs` as `pub mod idp;`. See `tests/support/idp/README.md` for what the
//! provider does and which knobs it has.
//!
//! ```ignore
//! let idp = Idp::start(IdpOptions::default()).await;
//! // ... point the proxy at idp.issuer, drive a login with `login_via_forms` ...
//! ```
#![allow(dead_code)]

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use url::Url;

/// Directory holding `idp.js`, `package.json` and `package-lock.json`.
pub const IDP_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/idp");

/// The provider's default resource indicator / access-token audience.
pub const DEFAULT_AUDIENCE: &str = "urn:coatcheck:api";

/// Test accounts known to the provider by default: (username = `sub`, password, roles).
pub const USERS: &[(&str, &str, &[&str])] = &[
    ("alice", "alice-pw", &["user"]),
    ("bob", "bob-pw", &["user"]),
    ("admin", "admin-pw", &["admin", "user"]),
];

const START_TIMEOUT: Duration = Duration::from_secs(45);
/// Starts of idp.js tried before a test fails.
const START_ATTEMPTS: u32 = 2;
const NPM_CI_LOCK_STALE_AFTER: Duration = Duration::from_secs(300);

/// One OAuth client registered at the provider.
#[derive(Clone, Debug)]
pub struct IdpClient {
    pub client_id: String,
    pub client_secret: String,
    pub redirect_uris: Vec<String>,
    pub post_logout_redirect_uris: Vec<String>,
    /// `client_secret_basic` (default) or `client_secret_post`. Either way the provider accepts
    /// both styles from the client (oidc-provider treats them as interchangeable).
    pub token_endpoint_auth_method: String,
    /// OIDC back-channel logout URI (http://127.0.0.1 is allowed).
    pub backchannel_logout_uri: Option<String>,
}

impl Default for IdpClient {
    fn default() -> Self {
        IdpClient {
            client_id: "coatcheck".into(),
            client_secret: "coatcheck-secret".into(),
            redirect_uris: vec!["https://localhost:8443/bff/callback".into()],
            post_logout_redirect_uris: vec!["https://localhost:8443/".into()],
            token_endpoint_auth_method: "client_secret_basic".into(),
            backchannel_logout_uri: None,
        }
    }
}

impl IdpClient {
    /// A confidential client with one redirect URI and one post-logout redirect URI.
    pub fn new(
        client_id: impl Into<String>,
        client_secret: impl Into<String>,
        redirect_uri: impl Into<String>,
        post_logout_redirect_uri: impl Into<String>,
    ) -> Self {
        IdpClient {
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            redirect_uris: vec![redirect_uri.into()],
            post_logout_redirect_uris: vec![post_logout_redirect_uri.into()],
            ..IdpClient::default()
        }
    }

    fn to_json(&self) -> Value {
        let mut v = json!({
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "redirect_uris": self.redirect_uris,
            "post_logout_redirect_uris": self.post_logout_redirect_uris,
            "token_endpoint_auth_method": self.token_endpoint_auth_method,
        });
        if let Some(uri) = &self.backchannel_logout_uri {
            v["backchannel_logout_uri"] = json!(uri);
        }
        v
    }
}

/// How to start the provider. `IdpOptions::default()` = one `coatcheck` client, short-lived
/// access tokens (60 s), in-memory state, a free port.
#[derive(Clone, Debug)]
pub struct IdpOptions {
    pub clients: Vec<IdpClient>,
    /// Access token lifetime in seconds (also the resource server's `accessTokenTTL`).
    pub access_token_ttl: u64,
    pub id_token_ttl: u64,
    pub refresh_token_ttl: u64,
    /// IdP browser-session lifetime; `None` = provider default (1 day).
    pub session_ttl: Option<u64>,
    /// Default resource indicator = `aud` of the JWT access tokens.
    pub audience: String,
    /// Persist all provider state and signing keys here, so a restart keeps refresh tokens valid.
    pub state_file: Option<PathBuf>,
    /// 0 = pick a free port.
    pub port: u16,
    /// Extra keys merged into the `IDP_CONFIG` JSON (e.g. `api_scopes`, `users`,
    /// `tls_insecure`, `expires_with_session`, `grant_ttl`, `access_token_alg`).
    pub extra_config: serde_json::Map<String, Value>,
    /// Extra environment for the node process (e.g. `NODE_EXTRA_CA_CERTS`, `IDP_DEBUG=1`).
    pub env: Vec<(String, String)>,
}

impl Default for IdpOptions {
    fn default() -> Self {
        IdpOptions {
            clients: vec![IdpClient::default()],
            access_token_ttl: 60,
            id_token_ttl: 300,
            refresh_token_ttl: 86400,
            session_ttl: None,
            audience: DEFAULT_AUDIENCE.into(),
            state_file: None,
            port: 0,
            extra_config: serde_json::Map::new(),
            env: Vec::new(),
        }
    }
}

impl IdpOptions {
    /// The JSON handed to `idp.js` in `IDP_CONFIG`.
    pub fn config_json(&self) -> Value {
        let mut v = json!({
            "clients": self.clients.iter().map(IdpClient::to_json).collect::<Vec<_>>(),
            "access_token_ttl": self.access_token_ttl,
            "id_token_ttl": self.id_token_ttl,
            "refresh_token_ttl": self.refresh_token_ttl,
            "audience": self.audience,
        });
        if let Some(ttl) = self.session_ttl {
            v["session_ttl"] = json!(ttl);
        }
        if let Some(path) = &self.state_file {
            v["state_file"] = json!(path.to_string_lossy());
        }
        let obj = v.as_object_mut().expect("object");
        for (k, val) in &self.extra_config {
            obj.insert(k.clone(), val.clone());
        }
        v
    }
}

/// A running test identity provider. The node process is killed when this is dropped.
pub struct Idp {
    /// `http://127.0.0.1:<port>`
    pub issuer: String,
    pub port: u16,
    opts: IdpOptions,
    child: Option<Child>,
    http: reqwest::Client,
    log: Arc<Mutex<VecDeque<String>>>,
}

impl Idp {
    /// Starts the provider (running `npm ci` first if its `node_modules` are missing or stale).
    /// Panics if it does not come up within two tries of 45 s.
    pub async fn start(opts: IdpOptions) -> Idp {
        ensure_node_modules().await;
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()
            .expect("reqwest client");
        let mut idp = Idp {
            issuer: String::new(),
            port: opts.port,
            opts,
            child: None,
            http,
            log: Arc::new(Mutex::new(VecDeque::new())),
        };
        idp.spawn().await;
        idp
    }

    /// Starts idp.js; a start that hangs (seen once on a loaded machine: loaded, never listening)
    /// is killed and tried once more before the test fails.
    async fn spawn(&mut self) {
        for attempt in 1..=START_ATTEMPTS {
            match self.try_spawn().await {
                Ok(()) => return,
                Err(why) if attempt < START_ATTEMPTS => {
                    eprintln!("[idp] start attempt {attempt} failed ({why}); trying again")
                }
                Err(why) => panic!("{why}"),
            }
        }
    }

    async fn try_spawn(&mut self) -> Result<(), String> {
        let config = self.opts.config_json().to_string();
        let mut cmd = Command::new(node_binary());
        cmd.arg("idp.js")
            .current_dir(IDP_DIR)
            .env("IDP_PORT", self.port.to_string())
            .env("IDP_CONFIG", config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in &self.opts.env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning `{} idp.js` in {IDP_DIR}: {e}", node_binary()));

        // stderr: forward to the test's output (captured by the harness) and keep a tail for errors.
        let stderr = child.stderr.take().expect("stderr piped");
        let log = self.log.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[idp] {line}");
                let mut log = log.lock().unwrap();
                if log.len() >= 50 {
                    log.pop_front();
                }
                log.push_back(line);
            }
        });

        let stdout = child.stdout.take().expect("stdout piped");
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(START_TIMEOUT, lines.next_line()).await;
        let line = match first {
            Ok(Ok(Some(line))) => line,
            other => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Err(format!(
                    "test IdP did not start ({other:?}); stderr tail:\n{}",
                    self.log
                        .lock()
                        .unwrap()
                        .iter()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("\n")
                ));
            }
        };
        // Keep draining stdout so the pipe never fills or closes under the child.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

        let v: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("unexpected first stdout line from idp.js {line:?}: {e}"));
        let issuer = v["issuer"]
            .as_str()
            .expect("issuer in first line")
            .to_string();
        let port = Url::parse(&issuer)
            .ok()
            .and_then(|u| u.port())
            .expect("issuer has a port");
        self.issuer = issuer;
        self.port = port;
        self.child = Some(child);
        Ok(())
    }

    /// Stops the provider: SIGTERM, then SIGKILL after 5 s. Idempotent.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
    }

    /// Stops and starts the provider again on the same port with the same options. With
    /// `state_file` set, sessions, grants, refresh tokens and signing keys survive.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.opts.port = self.port;
        self.spawn().await;
    }

    /// The options this provider was started with (port filled in after the first start).
    pub fn options(&self) -> &IdpOptions {
        &self.opts
    }

    /// `issuer` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.issuer, path)
    }

    pub fn discovery_url(&self) -> String {
        self.url("/.well-known/openid-configuration")
    }

    /// Last lines the provider wrote to stderr.
    pub fn log_tail(&self) -> Vec<String> {
        self.log.lock().unwrap().iter().cloned().collect()
    }

    async fn test_post(&self, path_and_query: &str) -> Value {
        let resp = self
            .http
            .post(self.url(path_and_query))
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path_and_query}: {e}"));
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        assert!(
            status.is_success(),
            "POST {path_and_query}: {status} {body}"
        );
        serde_json::from_str(&body).unwrap_or(Value::Null)
    }

    /// `{"token_requests": {"authorization_code": n, "refresh_token": n, "client_credentials": n}, "refresh_token_failures": n,
    /// "revocations": n, "backchannel_logouts_sent": n, "grants_revoked": n, ...}`
    pub async fn stats(&self) -> Value {
        let resp = self
            .http
            .get(self.url("/__test/stats"))
            .send()
            .await
            .expect("GET /__test/stats");
        resp.json().await.expect("stats JSON")
    }

    pub async fn reset_stats(&self) {
        self.test_post("/__test/reset-stats").await;
    }

    /// Revokes every grant (with its refresh and access tokens) of `sub`; returns how many.
    pub async fn revoke_grants(&self, sub: &str) -> u64 {
        let q = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("sub", sub)
            .finish();
        let v = self.test_post(&format!("/__test/revoke-grants?{q}")).await;
        v["revoked"].as_u64().expect("revoked count")
    }

    /// `down` (connection dropped), `error` (503), `slow` (no answer for 30 s) or `off`.
    /// Applies to every request except `/__test/*`.
    pub async fn set_outage(&self, mode: &str) {
        let q = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("mode", mode)
            .finish();
        self.test_post(&format!("/__test/outage?{q}")).await;
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}

fn node_binary() -> String {
    std::env::var("IDP_NODE").unwrap_or_else(|_| "node".to_string())
}

fn npm_binary() -> String {
    std::env::var("IDP_NPM").unwrap_or_else(|_| "npm".to_string())
}

/// Makes sure `tests/support/idp/node_modules` matches `package-lock.json`, running `npm ci`
/// at most once across concurrently running test processes (a `mkdir` lock directory).
pub async fn ensure_node_modules() {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    let result = tokio::task::spawn_blocking(|| {
        DONE.get_or_init(|| npm_ci_once(Path::new(IDP_DIR))).clone()
    })
    .await
    .expect("npm ci task");
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Runs `npm ci` in `dir` unless its `node_modules` already matches `package-lock.json`, at most once
/// across concurrently running test processes (a `mkdir` lock directory). Blocking.
pub fn npm_ci_once(dir: &Path) -> Result<(), String> {
    let lock_file = dir.join("package-lock.json");
    let marker = dir.join("node_modules").join(".coatcheck-installed");
    let lock_dir = dir.join(".npm-ci.lock");
    let wanted =
        std::fs::read(&lock_file).map_err(|e| format!("reading {}: {e}", lock_file.display()))?;
    let installed = || std::fs::read(&marker).map(|m| m == wanted).unwrap_or(false);
    let deadline = Instant::now() + Duration::from_secs(600);

    loop {
        if installed() {
            return Ok(());
        }
        match std::fs::create_dir(&lock_dir) {
            Ok(()) => {
                let r = if installed() {
                    Ok(())
                } else {
                    run_npm_ci(dir).and_then(|()| {
                        std::fs::write(&marker, &wanted)
                            .map_err(|e| format!("writing {}: {e}", marker.display()))
                    })
                };
                let _ = std::fs::remove_dir(&lock_dir);
                return r;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // Someone else is installing. Break the lock if its owner died long ago.
                let stale = std::fs::metadata(&lock_dir)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > NPM_CI_LOCK_STALE_AFTER);
                if stale {
                    let _ = std::fs::remove_dir(&lock_dir);
                    continue;
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "timed out waiting for another process's `npm ci` ({} exists)",
                        lock_dir.display()
                    ));
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(e) => return Err(format!("creating {}: {e}", lock_dir.display())),
        }
    }
}

fn run_npm_ci(dir: &Path) -> Result<(), String> {
    let out = std::process::Command::new(npm_binary())
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running `npm ci` in {}: {e}", dir.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`npm ci` in {} failed ({}):\n{}\n{}",
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

// -------------------------------------------------------------------------------------------
// driving the provider's HTML pages
// -------------------------------------------------------------------------------------------

/// One `<form>` found in a page.
#[derive(Clone, Debug, Default)]
pub struct HtmlForm {
    pub action: String,
    pub method: String,
    /// `(name, value)` of every `<input>` and named `<button>` inside the form, in order.
    pub fields: Vec<(String, String)>,
}

impl HtmlForm {
    pub fn has_field(&self, name: &str) -> bool {
        self.fields.iter().any(|(n, _)| n == name)
    }

    /// Sets (or adds) a field value.
    pub fn set(&mut self, name: &str, value: &str) {
        match self.fields.iter_mut().find(|(n, _)| n == name) {
            Some(f) => f.1 = value.to_string(),
            None => self.fields.push((name.to_string(), value.to_string())),
        }
    }
}

/// Finds the `<form>`s of a page by simple string scanning (enough for the provider's pages).
pub fn parse_forms(html: &str) -> Vec<HtmlForm> {
    let lower = html.to_ascii_lowercase();
    let mut forms = Vec::new();
    let mut pos = 0;
    while let Some(start) = lower[pos..].find("<form").map(|i| i + pos) {
        let Some(tag_end) = lower[start..].find('>').map(|i| i + start) else {
            break;
        };
        let tag = &html[start..=tag_end];
        let end = lower[tag_end..]
            .find("</form")
            .map(|i| i + tag_end)
            .unwrap_or(html.len());
        let mut form = HtmlForm {
            action: attr(tag, "action").unwrap_or_default(),
            method: attr(tag, "method")
                .unwrap_or_else(|| "get".into())
                .to_ascii_lowercase(),
            fields: Vec::new(),
        };
        let inner = &html[tag_end + 1..end];
        let inner_lower = &lower[tag_end + 1..end];
        for el in ["<input", "<button"] {
            let mut p = 0;
            while let Some(s) = inner_lower[p..].find(el).map(|i| i + p) {
                let Some(e) = inner_lower[s..].find('>').map(|i| i + s) else {
                    break;
                };
                let t = &inner[s..=e];
                if let Some(name) = attr(t, "name") {
                    form.fields
                        .push((name, attr(t, "value").unwrap_or_default()));
                }
                p = e + 1;
            }
        }
        forms.push(form);
        pos = end;
    }
    forms
}

fn attr(tag: &str, name: &str) -> Option<String> {
    let lower = tag.to_ascii_lowercase();
    let mut from = 0;
    while let Some(i) = lower[from..].find(name).map(|i| i + from) {
        from = i + name.len();
        let before_ok = i > 0 && lower.as_bytes()[i - 1].is_ascii_whitespace();
        let rest = lower[from..].trim_start();
        if !before_ok || !rest.starts_with('=') {
            continue;
        }
        let value_start = from + (lower[from..].len() - rest.len()) + 1;
        let raw = tag[value_start..].trim_start();
        let value = match raw.chars().next() {
            Some(q @ ('"' | '\'')) => raw[1..].split(q).next().unwrap_or(""),
            _ => raw
                .split(|c: char| c.is_ascii_whitespace() || c == '>' || c == '/')
                .next()
                .unwrap_or(""),
        };
        return Some(html_unescape(value));
    }
    None
}

fn html_unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&#x27;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// Text of the `id="error"` element of a login page, if any.
fn page_error(html: &str) -> Option<String> {
    let i = html.find("id=\"error\"")?;
    let start = html[i..].find('>')? + i + 1;
    let end = html[start..].find('<')? + start;
    Some(html_unescape(&html[start..end]))
}

fn same_origin(a: &Url, b: &Url) -> bool {
    a.origin() == b.origin()
}

/// Drives the provider's real HTML login + consent forms. `client` must not follow redirects
/// and should have a cookie store (IdP session cookies).
///
/// Starts at `authorize_url` (an IdP authorization-endpoint URL, e.g. the `Location` a relying
/// party's login route redirected to), follows redirects that stay on the IdP's origin, fills
/// in the login form (`user`/`password`) and the consent form, and returns the first redirect
/// `Location` that leaves the IdP origin (the RP's redirect_uri with `code` & `state`, or with
/// `error` if the provider refused the request). A rejected password is an `Err`.
pub async fn login_via_forms(
    client: &reqwest::Client,
    authorize_url: &str,
    user: &str,
    password: &str,
) -> Result<String, String> {
    drive_forms(client, authorize_url, Some((user, password))).await
}

/// Like [`login_via_forms`] but for RP-initiated logout: starts at an end-session URL (e.g. what
/// a relying party's logout route redirected to), confirms the provider's "sign out?" form with a
/// plain form POST and returns the first redirect `Location` leaving the IdP origin (the
/// `post_logout_redirect_uri`, with `state`). If the provider ends on its own "signed out" page
/// (no post-logout redirect) that page's URL is returned.
pub async fn logout_via_forms(
    client: &reqwest::Client,
    end_session_url: &str,
) -> Result<String, String> {
    drive_forms(client, end_session_url, None).await
}

async fn drive_forms(
    client: &reqwest::Client,
    start_url: &str,
    credentials: Option<(&str, &str)>,
) -> Result<String, String> {
    let origin = Url::parse(start_url).map_err(|e| format!("bad start url {start_url}: {e}"))?;
    let mut url = origin.clone();
    let mut post: Option<Vec<(String, String)>> = None;
    let mut answered = FormsAnswered::default();

    for _ in 0..25 {
        let req = match post.take() {
            Some(fields) => client.post(url.clone()).form(&fields),
            None => client.get(url.clone()),
        };
        let resp = req.send().await.map_err(|e| format!("{url}: {e}"))?;
        let status = resp.status();

        if status.is_redirection() {
            let next = redirect_target(&url, &resp)?;
            if !same_origin(&next, &origin) {
                return Ok(next.to_string());
            }
            url = next;
            continue;
        }

        let body = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(format!("{url}: {status}: {body}"));
        }
        match answer_page(&url, status, &body, credentials, &mut answered)? {
            PageStep::Post(next, fields) => {
                url = next;
                post = Some(fields);
            }
            PageStep::Done(last) => return Ok(last),
        }
    }
    Err(format!("too many steps driving the IdP from {start_url}"))
}

/// Which of the provider's forms one drive has answered: each may be answered only once.
#[derive(Default)]
struct FormsAnswered {
    login: bool,
    consent: bool,
    logout: bool,
}

/// What [`drive_forms`] does after a page of the provider.
enum PageStep {
    /// Post these fields to this URL.
    Post(Url, Vec<(String, String)>),
    /// Stop, returning this URL.
    Done(String),
}

/// Where the redirect `resp` (an answer from `url`) points, resolved against `url`.
fn redirect_target(url: &Url, resp: &reqwest::Response) -> Result<Url, String> {
    let status = resp.status();
    let loc = resp
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| format!("{url}: {status} without Location"))?;
    url.join(loc)
        .map_err(|e| format!("{url}: bad Location {loc:?}: {e}"))
}

/// Answers one successful page of the provider at `url`: fills in its login, consent or logout
/// form, or ends on the provider's own "signed out" page; any other page is an `Err`.
fn answer_page(
    url: &Url,
    status: reqwest::StatusCode,
    body: &str,
    credentials: Option<(&str, &str)>,
    answered: &mut FormsAnswered,
) -> Result<PageStep, String> {
    let forms = parse_forms(body);

    // Login form.
    if let Some(mut form) = forms
        .iter()
        .find(|f| f.has_field("login") && f.has_field("password"))
        .cloned()
    {
        let Some((user, password)) = credentials else {
            return Err(format!("{url}: unexpected login form"));
        };
        if answered.login {
            return Err(format!(
                "login as {user:?} rejected: {}",
                page_error(body).unwrap_or_else(|| "login form shown again".into())
            ));
        }
        answered.login = true;
        form.set("login", user);
        form.set("password", password);
        return post_form(url, form);
    }

    // Consent form.
    if let Some(form) = forms.iter().find(|f| f.action.ends_with("/confirm")) {
        if answered.consent {
            return Err(format!("{url}: consent form shown twice"));
        }
        answered.consent = true;
        return post_form(url, form.clone());
    }

    // RP-initiated logout confirmation (or its auto-submitting variant without a session).
    if let Some(form) = forms.iter().find(|f| f.has_field("xsrf")) {
        if credentials.is_some() || answered.logout {
            return Err(format!("{url}: unexpected logout form: {body}"));
        }
        answered.logout = true;
        let mut form = form.clone();
        form.set("logout", "yes");
        return post_form(url, form);
    }

    if credentials.is_none() && answered.logout {
        // Provider's own "signed out" page: no post_logout_redirect_uri was used.
        return Ok(PageStep::Done(url.to_string()));
    }
    Err(format!("{url}: unexpected page ({status}): {body}"))
}

/// Posts `form`'s fields to its action, resolved against the page's `url`.
fn post_form(url: &Url, form: HtmlForm) -> Result<PageStep, String> {
    let action = url
        .join(&form.action)
        .map_err(|e| format!("bad form action: {e}"))?;
    Ok(PageStep::Post(action, form.fields))
}
