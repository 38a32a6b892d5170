//! The whole product in a test: the real identity provider, a real upstream API and coatcheck
//! between them, plus a cookie-keeping "browser" that logs in through the provider's HTML forms.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;

use reqwest::header::{HeaderMap, HeaderValue};

use crate::support::idp::{Idp, IdpOptions, login_via_forms};
use crate::support::upstream::Upstream;
use crate::support::{TestProxy, start_proxy};

/// A fixed test session key (base64 of 32 bytes).
pub const SESSION_KEY: &str = "dGVzdC1zZXNzaW9uLWtleS0wMTIzNDU2Nzg5YWJjZGVm";
/// The public origin every test proxy claims.
pub const ORIGIN: &str = "https://localhost:8443";

pub use crate::support::free_port;

/// Knobs for [`Env::start`].
pub struct EnvOptions {
    pub access_token_ttl: u64,
    /// Extra `[[route]]`s (the default has `/api/` required and `/` none); `{api}` in them is
    /// replaced by the test upstream's URL.
    pub routes: String,
    /// Extra keys for `[session]`.
    pub session: String,
    /// Extra keys for `[oidc]`.
    pub oidc: String,
    pub store: String,
    pub idp: IdpOptions,
    /// Start the provider (false: point coatcheck at a port where nothing listens yet).
    pub start_idp: bool,
    /// Extra top-level tables appended to the configuration (e.g. `[admin]`).
    pub extra: String,
}

impl Default for EnvOptions {
    fn default() -> Self {
        EnvOptions {
            access_token_ttl: 60,
            routes: String::new(),
            session: String::new(),
            oidc: String::new(),
            store: "kind = \"memory\"".into(),
            idp: IdpOptions::default(),
            start_idp: true,
            extra: String::new(),
        }
    }
}

/// Provider, upstream and proxy.
pub struct Env {
    pub idp: Option<Idp>,
    pub idp_port: u16,
    pub api: Upstream,
    pub proxy: TestProxy,
    pub config: String,
}

/// The `[session]`, `[oidc]` and `[[route]]` part of a test configuration (no `[server]`).
pub fn config_text(opts: &EnvOptions, idp_port: u16, api: &str) -> String {
    format!(
        "[session]\nkeys = [\"{SESSION_KEY}\"]\n{session}\n[session.store]\n{store}\n\n\
         [oidc]\nissuer = \"http://127.0.0.1:{idp_port}\"\nclient_id = \"coatcheck\"\nclient_secret = \"coatcheck-secret\"\n\
         refresh_before_expiry = \"2s\"\n{oidc}\n\n\
         {routes}\n\
         [[route]]\npath = \"/api/\"\nupstream = \"{api}\"\nauth = \"required\"\n\n\
         [[route]]\npath = \"/app/\"\nupstream = \"{api}\"\nauth = \"required\"\nlogin_redirect = true\ncsrf = \"unsafe-methods\"\n\n\
         [[route]]\npath = \"/maybe/\"\nupstream = \"{api}\"\nauth = \"optional\"\n\n\
         [[route]]\npath = \"/admin/\"\nupstream = \"{api}\"\nauth = \"required\"\nroles = [\"admin\"]\n\n\
         [[route]]\npath = \"/\"\nupstream = \"{api}\"\nauth = \"none\"\n\n{extra}\n",
        session = opts.session,
        store = opts.store,
        oidc = opts.oidc,
        routes = opts.routes.replace("{api}", api),
        extra = opts.extra,
        api = api,
    )
}

impl Env {
    pub async fn start(mut opts: EnvOptions) -> Env {
        let idp_port = if opts.idp.port == 0 {
            free_port()
        } else {
            opts.idp.port
        };
        opts.idp.port = idp_port;
        opts.idp.access_token_ttl = opts.access_token_ttl;
        let api = Upstream::start().await;
        let config = config_text(&opts, idp_port, &api.url());
        let idp = if opts.start_idp {
            Some(Idp::start(opts.idp).await)
        } else {
            None
        };
        let proxy = start_proxy(&config).await;
        let env = Env {
            idp,
            idp_port,
            api,
            proxy,
            config,
        };
        if env.idp.is_some() {
            env.wait_ready().await;
        }
        env
    }

    pub fn idp(&self) -> &Idp {
        self.idp.as_ref().expect("provider started")
    }

    /// Waits until `/readyz` says ready.
    pub async fn wait_ready(&self) {
        crate::support::wait_ready(self.proxy.addr).await;
    }

    pub fn browser(&self) -> Browser {
        Browser::new(self.proxy.addr)
    }

    /// A browser logged in as `user` (password `<user>-pw`) through the provider's forms.
    pub async fn logged_in(&self, user: &str) -> Browser {
        let mut b = self.browser();
        let r = b.login(user, &format!("{user}-pw")).await;
        assert_eq!(r.status(), 200, "login as {user}: {:?}", r.text().await);
        b
    }
}

/// A browser: a cookie jar for coatcheck's origin, a separate one for the provider.
pub struct Browser {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    pub idp_client: reqwest::Client,
    pub cookies: BTreeMap<String, String>,
}

impl Browser {
    pub fn new(addr: SocketAddr) -> Browser {
        Browser {
            addr,
            client: crate::support::http1_client(addr),
            idp_client: reqwest::Client::builder()
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .cookie_store(true)
                .build()
                .unwrap(),
            cookies: BTreeMap::new(),
        }
    }

    /// `https://localhost:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr.port())
    }

    /// Rewrites a URL on the public origin to the test proxy's real port.
    pub fn local(&self, url: &str) -> String {
        url.replacen(
            ORIGIN,
            &format!("https://localhost:{}", self.addr.port()),
            1,
        )
    }

    /// Remembers the response's `Set-Cookie`s (a `Max-Age=0` deletes).
    pub fn absorb(&mut self, headers: &HeaderMap) {
        for v in headers.get_all("set-cookie") {
            let s = v.to_str().unwrap();
            let (pair, attrs) = s.split_once(';').unwrap_or((s, ""));
            let (name, value) = pair.split_once('=').unwrap();
            if attrs.contains("Max-Age=0") {
                self.cookies.remove(name.trim());
            } else {
                self.cookies
                    .insert(name.trim().to_owned(), value.trim().to_owned());
            }
        }
    }

    pub fn cookie_header(&self) -> Option<HeaderValue> {
        if self.cookies.is_empty() {
            return None;
        }
        let s = self
            .cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ");
        Some(HeaderValue::from_str(&s).unwrap())
    }

    /// A request to coatcheck carrying the jar (no CSRF header, no Origin).
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut b = self.client.request(method, self.url(path));
        if let Some(c) = self.cookie_header() {
            b = b.header("cookie", c);
        }
        b
    }

    /// A same-origin `fetch` with the CSRF header, as an SPA would send.
    pub fn api(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.request(method, path)
            .header("x-csrf", "1")
            .header("origin", ORIGIN)
            .header("sec-fetch-site", "same-origin")
    }

    /// Starts a login: `/bff/login` → the provider's authorization URL.
    pub async fn start_login(&mut self, return_url: &str) -> String {
        let r = self
            .request(
                reqwest::Method::GET,
                &format!("/bff/login?returnUrl={}", urlencode(return_url)),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 302, "login start: {:?}", r.text().await);
        self.absorb(r.headers());
        r.headers()["location"].to_str().unwrap().to_owned()
    }

    /// Logs in through the provider's forms; returns the callback response (the bounce page).
    pub async fn login(&mut self, user: &str, password: &str) -> reqwest::Response {
        let authorize = self.start_login("/app/home").await;
        let callback = login_via_forms(&self.idp_client, &authorize, user, password)
            .await
            .expect("provider login");
        self.finish_login(&callback).await
    }

    /// Delivers the provider's redirect to coatcheck's callback.
    pub async fn finish_login(&mut self, callback: &str) -> reqwest::Response {
        let r = self
            .request(
                reqwest::Method::GET,
                &self.local(callback).replacen(&self.url(""), "", 1),
            )
            .send()
            .await
            .unwrap();
        self.absorb(r.headers());
        r
    }

    pub fn session_cookie(&self) -> Option<&String> {
        self.cookies.get("__Host-coatcheck")
    }
}

/// `n` concurrent same-origin `GET /api/burst/<i>`, spread over `browsers` in turn; their statuses
/// (0 for a request that failed to complete).
pub async fn burst(browsers: &[&Browser], n: usize) -> Vec<u16> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let req =
                browsers[i % browsers.len()].api(reqwest::Method::GET, &format!("/api/burst/{i}"));
            tokio::spawn(async move { req.send().await.map(|r| r.status().as_u16()).unwrap_or(0) })
        })
        .collect();
    let mut statuses = Vec::with_capacity(n);
    for t in tasks {
        statuses.push(t.await.unwrap_or(0));
    }
    statuses
}

/// Opens the event stream as `EventSource` would (no CSRF header: Origin and Fetch Metadata).
pub async fn open_events(b: &Browser) -> reqwest::Response {
    b.request(reqwest::Method::GET, "/bff/events")
        .header("accept", "text/event-stream")
        .header("sec-fetch-site", "same-origin")
        .send()
        .await
        .unwrap()
}

/// Reads the stream until `needle` shows up; the text read so far, or `None` after `within`.
pub async fn read_events_until(
    r: reqwest::Response,
    needle: &str,
    within: std::time::Duration,
) -> Option<String> {
    let mut body = r.bytes_stream();
    let mut seen = String::new();
    let deadline = std::time::Instant::now() + within;
    while !seen.contains(needle) {
        let left = deadline.checked_duration_since(std::time::Instant::now())?;
        match tokio::time::timeout(left, futures_util::StreamExt::next(&mut body)).await {
            Ok(Some(Ok(chunk))) => seen.push_str(&String::from_utf8_lossy(&chunk)),
            _ => return None,
        }
    }
    Some(seen)
}

/// Reads `stream` (an open `/bff/events`) while `by` logs out with `POST /bff/logout`: what the
/// stream said up to `session-ended` (`None` if that never came within 5 s) and how long after
/// the logout was sent it took.
pub async fn logout_heard(
    stream: reqwest::Response,
    by: &Browser,
) -> (Option<String>, std::time::Duration) {
    let reader = tokio::spawn(read_events_until(
        stream,
        "event: session-ended",
        std::time::Duration::from_secs(5),
    ));
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let t0 = std::time::Instant::now();
    let logout = by.api(reqwest::Method::POST, "/bff/logout").send().await;
    assert_eq!(logout.unwrap().status(), 200, "the logout");
    let heard = reader.await.unwrap();
    (heard, t0.elapsed())
}

pub fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}
