//! The program's configuration: validated, typed, with every default named.
//!
//! [`Config::load`] reads `config.toml` (shape in [`file`](mod@file)), resolves `env:`/`file:` secrets and checks
//! everything that can be checked without the network, collecting **every** problem as
//! `key.path: reason` so an operator fixes them in one pass. Nothing is bound or fetched here.

pub mod file;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use http::{HeaderName, Method};
use url::Url;

use crate::secret::{self, Secret};
use file::{Choice, StoreKindName};

/// Default `server.limits.max_header_bytes`: request line plus headers, in bytes. 16 KiB holds a
/// browser's cookies with room to spare while bounding per-connection memory.
pub(crate) const DEFAULT_MAX_HEADER_BYTES: usize = 16 * 1024;
/// Default `server.limits.header_read_timeout`: a client gets this long to send its request headers.
pub(crate) const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `server.limits.idle_timeout`: a keep-alive connection with no traffic is closed after this.
pub(crate) const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default `server.limits.max_connections`: concurrent client connections; more wait in the backlog.
pub(crate) const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default `server.limits.shutdown_grace`: time in-flight requests get after SIGTERM/SIGINT.
pub(crate) const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Default `server.limits.body_idle_timeout`: a streamed body (upload or download) that moves no
/// byte for this long is cut; nginx's `client_body_timeout`/`proxy_read_timeout` default.
pub(crate) const DEFAULT_BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default `server.limits.max_connections_per_ip`: concurrent connections from one client address.
/// A browser opens at most 6 HTTP/1.1 connections per origin (1 with HTTP/2), so even a large
/// office behind one NAT address stays far below it.
pub(crate) const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 1_000;
/// Default `server.limits.login_requests_per_minute`: `/bff/login` plus `/bff/callback` requests
/// per client address and minute (a token bucket refilled evenly; bursts up to a fifth of it).
/// A login is two requests, so this admits 300 logins a minute from one address.
pub(crate) const DEFAULT_LOGIN_REQUESTS_PER_MINUTE: u32 = 600;
/// Default `server.hsts`: a year, subdomains included (OWASP ASVS 5.0 §3.4.1).
pub(crate) const DEFAULT_HSTS: &str = "max-age=31536000; includeSubDomains";
/// Default `oidc.metadata_refresh`: discovery and JWKS are re-read this often (besides an unknown
/// `kid`), so a rotated key or moved endpoint is picked up without a restart.
pub(crate) const DEFAULT_METADATA_REFRESH: Duration = Duration::from_secs(600);
/// Default `route.timeout`: time the upstream gets to send its response headers. The clock restarts
/// whenever the request body moves, so a long upload is not a slow upstream; a stalled one times out.
pub(crate) const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `route.max_body_bytes`: request body limit, 10 MiB.
pub(crate) const DEFAULT_MAX_BODY_BYTES: u64 = 10 * 1024 * 1024;
/// Default `route.retry_body_bytes`: bodies up to this size are buffered so a request can be replayed
/// once after an upstream 401 `invalid_token`; 64 KiB.
pub(crate) const DEFAULT_RETRY_BODY_BYTES: u64 = 64 * 1024;
/// Default `session.cookie_name`. The `__Host-` prefix makes browsers insist on Secure, Path=/ and no Domain.
pub(crate) const DEFAULT_COOKIE_NAME: &str = "__Host-coatcheck";
/// Default `session.idle_timeout` (sliding).
pub(crate) const DEFAULT_SESSION_IDLE: Duration = Duration::from_secs(30 * 60);
/// Default `session.absolute_timeout` (hard cap from login, never extended).
pub(crate) const DEFAULT_SESSION_ABSOLUTE: Duration = Duration::from_secs(12 * 3600);
/// Default `session.touch_interval`: the idle clock is written to the store at most this often per
/// session, so the hot path does not write on every request.
pub(crate) const DEFAULT_TOUCH_INTERVAL: Duration = Duration::from_secs(60);
/// Default `session.store.path` for the embedded store.
pub(crate) const DEFAULT_STORE_PATH: &str = "data/sessions.db";
/// Default `session.store.key_prefix`: every key (and the event channel) coatcheck writes in Redis
/// starts with it.
pub(crate) const DEFAULT_REDIS_KEY_PREFIX: &str = "coatcheck:";
/// Default `session.store.timeout`: deadline of one Redis call; past it the call fails with 503
/// `store_unavailable` (cached sessions keep working).
pub(crate) const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(500);
/// Default `session.cache.capacity`: decrypted sessions held in memory.
pub(crate) const DEFAULT_CACHE_CAPACITY: u64 = 100_000;
/// Default `session.cache.ttl`: a cached session is served without the store for at most this long.
pub(crate) const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(30);
/// Default `oidc.scopes`.
pub(crate) const DEFAULT_SCOPES: &[&str] = &["openid", "profile", "email", "offline_access"];
/// Default `oidc.allowed_algs`: asymmetric algorithms only (HMAC with a public key is a known attack).
pub(crate) const DEFAULT_ALGS: &[&str] = &["RS256", "ES256", "PS256"];
/// Default `oidc.clock_skew` tolerated on `exp`/`iat`/`nbf`.
pub(crate) const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(30);
/// Default `oidc.refresh_before_expiry`.
pub(crate) const DEFAULT_REFRESH_BEFORE: Duration = Duration::from_secs(60);
/// Default `oidc.timeout`: each call to the identity provider.
pub(crate) const DEFAULT_IDP_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `oidc.refresh_wait`: how long a request waits behind an in-flight refresh before 503.
pub(crate) const DEFAULT_REFRESH_WAIT: Duration = Duration::from_secs(15);
/// Default `oidc.rotation_grace`: how long the result of a refresh is kept for requests that raced it.
pub(crate) const DEFAULT_ROTATION_GRACE: Duration = Duration::from_secs(30);
/// Default `csrf.header`.
pub(crate) const DEFAULT_CSRF_HEADER: &str = "x-csrf";

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from.
    pub(crate) source: PathBuf,
    pub(crate) server: Server,
    pub(crate) log: Log,
    pub(crate) session: Session,
    pub(crate) oidc: Option<Oidc>,
    pub(crate) capture: Option<Capture>,
    pub(crate) csrf: Csrf,
    pub(crate) routes: Vec<Route>,
    /// `[admin]`, when configured.
    pub(crate) admin: Option<Admin>,
    /// `[telemetry]`: span export.
    pub(crate) telemetry: Telemetry,
}

/// Default `telemetry.service_name`: the `service.name` resource of exported spans.
pub(crate) const DEFAULT_SERVICE_NAME: &str = "coatcheck";
/// Default `telemetry.sample_ratio`: every new trace is recorded (a client's sampled flag
/// decides for the traces it started).
pub(crate) const DEFAULT_SAMPLE_RATIO: f64 = 1.0;
/// Default `telemetry.timeout`: one export request to the collector.
pub(crate) const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// `[telemetry]`: OTLP/HTTP span export. Propagation of `traceparent` is always on.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Telemetry {
    /// Collector base URL (`/v1/traces` is appended); wins over `OTEL_EXPORTER_OTLP_*`.
    pub(crate) otlp_endpoint: Option<Url>,
    /// `service.name`; default [`DEFAULT_SERVICE_NAME`], else `OTEL_SERVICE_NAME`.
    pub(crate) service_name: Option<String>,
    /// Share of new traces recorded, 0.0–1.0 (parent-based: a client's flag wins).
    pub(crate) sample_ratio: f64,
    /// Deadline of one export request.
    pub(crate) timeout: Duration,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            otlp_endpoint: None,
            service_name: None,
            sample_ratio: DEFAULT_SAMPLE_RATIO,
            timeout: DEFAULT_EXPORT_TIMEOUT,
        }
    }
}

impl Telemetry {
    /// The export settings: `[telemetry] otlp_endpoint` wins; else `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
    /// or `OTEL_EXPORTER_OTLP_ENDPOINT` turn export on (read by the exporter); `OTEL_SDK_DISABLED=true`
    /// turns it off. `None`: no export.
    pub(crate) fn export_settings(&self) -> Option<crate::trace::ExportSettings> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return None;
        }
        let endpoint = match &self.otlp_endpoint {
            Some(u) => Some(format!("{}/v1/traces", u.as_str().trim_end_matches('/'))),
            None if env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
                || env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() =>
            {
                None
            }
            None => return None,
        };
        Some(crate::trace::ExportSettings {
            endpoint,
            service_name: self
                .service_name
                .clone()
                .or_else(|| env("OTEL_SERVICE_NAME"))
                .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_owned()),
            sample_ratio: self.sample_ratio,
            timeout: self.timeout,
        })
    }
}

/// Shortest accepted `admin.token`, in characters: it guards ending anyone's sessions.
pub(crate) const MIN_ADMIN_TOKEN_CHARS: usize = 16;

/// `[admin]`: the operator listener. Plain HTTP: bind it to loopback or a private network.
#[derive(Debug, Clone)]
pub(crate) struct Admin {
    /// Where `/metrics`, `/healthz`, `/readyz` (and the session admin API) are served.
    pub(crate) listen: SocketAddr,
    /// Bearer token of the session admin API (`/sessions`); without it the API is off.
    pub(crate) token: Option<Secret>,
}

/// Default `capture.access_token`: JSON Pointer (RFC 6901) to the access token in the login and
/// refresh answers.
pub(crate) const DEFAULT_CAPTURE_ACCESS_TOKEN: &str = "/access_token";
/// Default `capture.refresh_token`.
pub(crate) const DEFAULT_CAPTURE_REFRESH_TOKEN: &str = "/refresh_token";
/// Default `capture.refresh_before_expiry` (capped at half the token's lifetime, like OIDC's).
pub(crate) const DEFAULT_CAPTURE_REFRESH_BEFORE: Duration = Duration::from_secs(10);

/// `[capture]`: sessions made from an existing API's own JSON login.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Capture {
    /// A POST here (through its route) that answers 2xx JSON with the tokens starts a session.
    pub(crate) login_path: String,
    /// Upstream path (same upstream) coatcheck POSTs `{"refresh_token": …}` to.
    pub(crate) refresh_path: String,
    /// Upstream path coatcheck POSTs `{"refresh_token": …}` to at logout.
    pub(crate) logout_path: Option<String>,
    /// JSON Pointers into the login and refresh answers.
    pub(crate) access_token: String,
    pub(crate) refresh_token: String,
    /// Without it, the access token's `exp` claim.
    pub(crate) expires_in: Option<String>,
    pub(crate) refresh_before_expiry: Duration,
    /// Index (in `routes`) of the route that serves `login_path`: its upstream answers
    /// `refresh_path` and `logout_path` too.
    pub(crate) route: usize,
}

#[derive(Debug, Clone)]
pub(crate) struct Server {
    pub(crate) listen: SocketAddr,
    /// `scheme://host[:port]`, no trailing slash.
    pub(crate) public_origin: String,
    pub(crate) http_redirect_listen: Option<SocketAddr>,
    pub(crate) tls: Tls,
    pub(crate) limits: Limits,
    /// Peers whose forwarding chain (`X-Forwarded-For`, `Forwarded`) is kept and appended to.
    pub(crate) trusted_proxies: Vec<Cidr>,
    /// What happens to request header names containing `_`.
    pub(crate) underscore_headers: UnderscoreHeaders,
    /// The `Strict-Transport-Security` value on every HTTPS answer; `None` when switched off.
    pub(crate) hsts: Option<http::HeaderValue>,
}

pub(crate) use file::{AuthMode, ClientAuth, CsrfMode, LogFormat, UnderscoreHeaders};
pub use file::{RecordKey, SameSite};

/// An IP network (`10.0.0.0/8`, `2001:db8::/32`, or one address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cidr {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `addr/prefix` or a bare address (a /32 or /128).
    pub(crate) fn parse(s: &str) -> Option<Cidr> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: std::net::IpAddr = a.trim().parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && p.len() <= 3 => {
                p.parse::<u8>().ok().filter(|&n| n <= max)?
            }
            Some(_) => return None,
        };
        Some(Cidr { addr, prefix })
    }

    /// Whether `ip` is inside the network (an IPv4-mapped IPv6 address counts as IPv4).
    pub(crate) fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr::{V4, V6};
        match (self.addr, ip.to_canonical()) {
            (V4(net), V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (V6(net), V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Tls {
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Limits {
    pub(crate) max_header_bytes: usize,
    pub(crate) header_read_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) max_connections: usize,
    pub(crate) shutdown_grace: Duration,
    /// A streamed body that moves no byte for this long is cut.
    pub(crate) body_idle_timeout: Duration,
    pub(crate) max_connections_per_ip: usize,
    pub(crate) login_requests_per_minute: u32,
}

#[derive(Debug, Clone)]
pub(crate) struct Log {
    /// A `tracing` filter directive; `RUST_LOG` wins when set.
    pub(crate) level: String,
    pub(crate) format: LogFormat,
}

#[derive(Debug, Clone)]
pub struct Session {
    pub cookie_name: String,
    pub same_site: SameSite,
    pub idle_timeout: Duration,
    pub absolute_timeout: Duration,
    pub persistent: bool,
    pub touch_interval: Duration,
    /// Decoded keys; the first signs, all verify.
    pub keys: Vec<Secret<Vec<u8>>>,
    /// How the key of a record this process writes is derived (`session.record_key`).
    pub record_key: RecordKey,
    pub store: StoreKind,
    pub cache_capacity: u64,
    pub cache_ttl: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    Memory,
    Embedded { path: PathBuf },
    Redis(RedisSettings),
}

/// `[session.store]` with `kind = "redis"` (see docs/operations.md, "Running several instances").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisSettings {
    /// `redis://` or `rediss://` (TLS), `user:password@` (ACL) and `/N` (database) allowed; a
    /// secret (inline, `env:NAME`, `file:PATH`). With Sentinel only its scheme, credentials and
    /// database are used. Never logged.
    pub url: Secret,
    /// Prefix of every key and of the event channel; default `DEFAULT_REDIS_KEY_PREFIX`.
    pub key_prefix: String,
    /// Extra trust anchor (PEM) for `rediss://`, beside the system roots.
    pub ca: Option<PathBuf>,
    /// Sentinel `host:port`s; empty: connect to the URL's host directly.
    pub sentinels: Vec<String>,
    /// The master name the Sentinels monitor; required with `sentinels`.
    pub sentinel_master: Option<String>,
    /// Deadline of one Redis call; default `DEFAULT_REDIS_TIMEOUT`.
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Oidc {
    pub(crate) issuer: Url,
    pub(crate) client_id: String,
    pub(crate) client_secret: Secret,
    pub(crate) scopes: Vec<String>,
    pub(crate) allowed_algs: Vec<jsonwebtoken::Algorithm>,
    pub(crate) clock_skew: Duration,
    pub(crate) refresh_before_expiry: Duration,
    pub(crate) post_logout_redirect: String,
    pub(crate) ca: Option<PathBuf>,
    pub(crate) client_auth: ClientAuth,
    pub(crate) timeout: Duration,
    pub(crate) refresh_wait: Duration,
    pub(crate) rotation_grace: Duration,
    /// The issuer exactly as written in the file (compared byte for byte with discovery and `iss`).
    pub(crate) issuer_id: String,
    pub(crate) metadata_refresh: Duration,
}

#[derive(Debug, Clone)]
pub(crate) struct Csrf {
    pub(crate) header: HeaderName,
}

#[derive(Debug, Clone)]
pub(crate) struct Route {
    /// Index in the file, for `route[N]` in messages and logs.
    pub(crate) index: usize,
    pub(crate) path: String,
    pub(crate) upstream: Url,
    pub(crate) auth: AuthMode,
    pub(crate) strip_prefix: bool,
    pub(crate) roles: Vec<String>,
    pub(crate) timeout: Duration,
    pub(crate) max_body_bytes: u64,
    pub(crate) retry_body_bytes: u64,
    pub(crate) methods: Option<Vec<Method>>,
    pub(crate) preserve_host: bool,
    pub(crate) ca: Option<PathBuf>,
    pub(crate) login_redirect: bool,
    pub(crate) csrf: CsrfMode,
    /// `auth = "bearer"`: the `aud` the client's token must carry, if set. `auth = "client"`: the
    /// audience (resource indicator) the client-credentials token is requested for, if set.
    pub(crate) audience: Option<String>,
    /// `auth = "client"`: scopes of the client-credentials grant, sorted and without duplicates;
    /// empty (default): no `scope` parameter, the provider's default for the client.
    pub(crate) scopes: Vec<String>,
    /// Whether `%2F`/`%5C` (and a raw `\\`) may appear in a path routed here.
    pub(crate) allow_encoded_slashes: bool,
}

/// One configuration problem: which key, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub(crate) reason: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

/// Everything wrong with a configuration file.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {} problem(s):\n{}", problems.len(), problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError {
    pub(crate) file: String,
    pub(crate) problems: Vec<Problem>,
}

struct Problems(Vec<Problem>);

impl Problems {
    fn push(&mut self, key: impl Into<String>, reason: impl Into<String>) {
        self.0.push(Problem {
            key: key.into(),
            reason: reason.into(),
        });
    }

    fn duration(&mut self, key: &str, raw: Option<&str>, default: Duration) -> Duration {
        let Some(raw) = raw else { return default };
        match humantime::parse_duration(raw) {
            Ok(d) if d.is_zero() => {
                self.push(key, format!("{raw:?} must be greater than zero"));
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.push(
                    key,
                    format!(
                        "{raw:?} is not a duration ({e}); write e.g. \"90s\", \"30m\", \"12h\""
                    ),
                );
                default
            }
        }
    }

    /// One of `T`'s values, `default` when absent. A value `T` does not know is a problem that
    /// names the values it does, and `None`: the caller picks what stands in for it.
    fn choice<T: Copy>(&mut self, key: &str, raw: Option<&Choice<T>>, default: T) -> Option<T> {
        match raw {
            None => Some(default),
            Some(Choice::Known(v)) => Some(*v),
            Some(Choice::Unknown { value, expected }) => {
                self.push(key, format!("{value:?} must be {}", one_of(expected)));
                None
            }
        }
    }

    fn positive(&mut self, key: &str, raw: Option<i64>, default: u64) -> u64 {
        match raw {
            None => default,
            Some(v) if v > 0 => v as u64,
            Some(v) => {
                self.push(key, format!("{v} must be a positive integer"));
                default
            }
        }
    }

    fn socket_addr(&mut self, key: &str, raw: &str) -> Option<SocketAddr> {
        match raw.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.push(
                    key,
                    format!(
                        "{raw:?} is not an address:port such as \"127.0.0.1:8443\" or \"[::]:8443\""
                    ),
                );
                None
            }
        }
    }

    fn readable_file(&mut self, key: &str, base: &Path, raw: &str) -> PathBuf {
        let path = resolve_path(base, raw);
        if let Err(e) = std::fs::metadata(&path) {
            self.push(key, format!("cannot read {}: {e}", path.display()));
        }
        path
    }
}

/// `"a" or "b"`, `"a", "b" or "c"`: the values a key accepts, for its message.
fn one_of(values: &[&str]) -> String {
    let quoted: Vec<String> = values.iter().map(|v| format!("{v:?}")).collect();
    match quoted.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => quoted.concat(),
    }
}

/// Relative paths in the file are relative to the working directory, as operators expect from a
/// command line; absolute paths are taken as they are. (`base` is kept for future use.)
fn resolve_path(_base: &Path, raw: &str) -> PathBuf {
    PathBuf::from(raw)
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            problems: vec![Problem {
                key: "(file)".into(),
                reason: format!("cannot read: {e}"),
            }],
        })?;
        Self::from_toml(&text, path)
    }

    /// Parses and validates configuration text; `path` names it in errors and anchors relative paths.
    /// Unknown keys, type errors and semantic problems are reported together.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let (raw, unknown) = parse(text).map_err(|problems| ConfigError {
            file: file.clone(),
            problems,
        })?;
        let mut p = Problems(unknown);
        let config = validate(raw, path, &mut p);
        if p.0.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError {
                file,
                problems: p.0,
            })
        }
    }

    /// Whether any route needs sessions (and therefore OIDC and session keys).
    pub(crate) fn needs_sessions(&self) -> bool {
        self.routes
            .iter()
            .any(|r| matches!(r.auth, AuthMode::Required | AuthMode::Optional))
            || self.oidc.is_some()
            || self.capture.is_some()
    }
}

/// Most unknown keys collected from one file before giving up.
const MAX_UNKNOWN_KEYS: usize = 100;

/// Parses the file's shape. Unknown keys do not stop the parse: each is recorded as a problem and
/// removed, and the parse goes on, so `check-config` lists them beside every other problem. The
/// serde shape in [`file`] stays the one description of the known keys.
fn parse(text: &str) -> Result<(file::ConfigFile, Vec<Problem>), Vec<Problem>> {
    let table: toml::Table = toml::from_str(text).map_err(|e| {
        vec![Problem {
            key: "(syntax)".into(),
            reason: one_line(text, &e),
        }]
    })?;
    let mut table = toml::Value::Table(table);
    let mut unknown = Vec::new();
    loop {
        let result = match toml::de::Deserializer::parse(text) {
            // The text itself while nothing was removed: type errors keep their line number.
            Ok(de) if unknown.is_empty() => deserialize(de, text),
            _ => deserialize(table.clone(), text),
        };
        let problem = match result {
            Ok(raw) => return Ok((raw, unknown)),
            Err(problem) => problem,
        };
        match problem.unknown.as_ref() {
            Some((segments, name))
                if unknown.len() < MAX_UNKNOWN_KEYS && remove_key(&mut table, segments, name) =>
            {
                unknown.push(problem.problem);
            }
            _ => {
                unknown.push(problem.problem);
                return Err(unknown);
            }
        }
    }
}

/// A deserialization problem, and for an unknown key where it sits (path segments, name).
struct ParseProblem {
    problem: Problem,
    unknown: Option<(Vec<PathSegment>, String)>,
}

enum PathSegment {
    Key(String),
    Index(usize),
}

fn deserialize<'de, D>(de: D, text: &str) -> Result<file::ConfigFile, ParseProblem>
where
    D: serde::Deserializer<'de>,
    D::Error: std::fmt::Display + SpannedError,
{
    serde_path_to_error::deserialize(de).map_err(|e| {
        let segments: Vec<PathSegment> = e
            .path()
            .iter()
            .filter_map(|s| match s {
                serde_path_to_error::Segment::Map { key } => Some(PathSegment::Key(key.clone())),
                serde_path_to_error::Segment::Seq { index } => Some(PathSegment::Index(*index)),
                _ => None,
            })
            .collect();
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.message_text();
        let at = inner
            .span_start()
            .map(|s| format!(" (line {})", line_of(text, s)))
            .unwrap_or_default();
        let name = message
            .strip_prefix("unknown field `")
            .and_then(|rest| rest.split_once('`'))
            .map(|(name, rest)| (name.to_owned(), rest.trim_start_matches(", ").to_owned()));
        // The path ends with the unknown key itself.
        let mut segments = segments;
        if name.is_some() {
            segments.pop();
        }
        let problem = match &name {
            Some((_, expected)) => Problem {
                key: path.clone(),
                reason: format!("unknown key; {expected}{at}"),
            },
            None => Problem {
                key: if path == "." {
                    "(top level)".to_owned()
                } else {
                    path
                },
                reason: format!("{message}{at}"),
            },
        };
        ParseProblem {
            problem,
            unknown: name.map(|(n, _)| (segments, n)),
        }
    })
}

/// Error types that may know their message and location in the text.
trait SpannedError {
    fn message_text(&self) -> String;
    fn span_start(&self) -> Option<usize>;
}

impl SpannedError for toml::de::Error {
    fn message_text(&self) -> String {
        self.message().to_owned()
    }
    fn span_start(&self) -> Option<usize> {
        self.span().map(|s| s.start)
    }
}

/// Removes `name` from the table at `segments`; whether it was there.
fn remove_key(root: &mut toml::Value, segments: &[PathSegment], name: &str) -> bool {
    let mut v = root;
    for seg in segments {
        let next = match (seg, v) {
            (PathSegment::Key(k), toml::Value::Table(t)) => t.get_mut(k),
            (PathSegment::Index(i), toml::Value::Array(a)) => a.get_mut(*i),
            _ => None,
        };
        match next {
            Some(n) => v = n,
            None => return false,
        }
    }
    match v {
        toml::Value::Table(t) => t.remove(name).is_some(),
        _ => false,
    }
}

fn one_line(text: &str, e: &toml::de::Error) -> String {
    let at = e
        .span()
        .map(|s| format!(" (line {})", line_of(text, s.start)))
        .unwrap_or_default();
    format!("{}{at}", e.message())
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

fn validate(raw: file::ConfigFile, path: &Path, p: &mut Problems) -> Config {
    let base = path.parent().unwrap_or(Path::new("."));
    let server = validate_server(raw.server, base, p);
    let log = validate_log(raw.log, p);
    let csrf = Csrf {
        header: match raw.csrf.header.as_deref() {
            None => HeaderName::from_static(DEFAULT_CSRF_HEADER),
            Some(h) => HeaderName::try_from(h).unwrap_or_else(|_| {
                p.push("csrf.header", format!("{h:?} is not a valid header name"));
                HeaderName::from_static(DEFAULT_CSRF_HEADER)
            }),
        },
    };
    let oidc = raw.oidc.map(|o| validate_oidc(o, base, p));
    let routes = validate_routes(raw.routes, base, p);
    let capture = raw.capture.map(|c| validate_capture(c, &routes, p));
    // Machine-token routes need no session; [oidc] and [capture] do (their logins).
    let needs = routes
        .iter()
        .any(|r| !matches!(r.auth, AuthMode::None | AuthMode::Client))
        || oidc.is_some()
        || capture.is_some();
    let session = validate_session(raw.session, base, needs, p);
    let admin = raw.admin.and_then(|a| validate_admin(a, &server, p));
    let telemetry = validate_telemetry(raw.telemetry, p);
    for r in &routes {
        let user_session = matches!(r.auth, AuthMode::Required | AuthMode::Optional);
        if r.auth == AuthMode::Client && oidc.is_none() {
            p.push(
                format!("route[{}].auth", r.index),
                "\"client\" needs an [oidc] section: its token endpoint, client_id and client_secret obtain the client-credentials token",
            );
        } else if r.auth != AuthMode::None && oidc.is_none() && !(user_session && capture.is_some())
        {
            p.push(
                format!("route[{}].auth", r.index),
                if user_session {
                    "needs an [oidc] or a [capture] section"
                } else {
                    "needs an [oidc] section (issuer, client_id, client_secret)"
                },
            );
        }
    }
    Config {
        source: path.to_owned(),
        server,
        log,
        session,
        oidc,
        capture,
        csrf,
        routes,
        admin,
        telemetry,
    }
}

fn validate_telemetry(t: file::TelemetryFile, p: &mut Problems) -> Telemetry {
    let otlp_endpoint = t.otlp_endpoint.and_then(|raw| match Url::parse(&raw) {
        Ok(u) if !matches!(u.scheme(), "http" | "https") => {
            p.push(
                "telemetry.otlp_endpoint",
                format!("{raw:?} must be an http:// or https:// URL"),
            );
            None
        }
        Ok(u) if u.host_str().is_none() || u.query().is_some() || u.fragment().is_some() => {
            p.push(
                "telemetry.otlp_endpoint",
                format!("{raw:?} must name a host, without query or fragment (e.g. \"http://127.0.0.1:4318\")"),
            );
            None
        }
        Ok(u) => Some(u),
        Err(e) => {
            p.push(
                "telemetry.otlp_endpoint",
                format!("{raw:?} is not a valid URL ({e}); write e.g. \"http://127.0.0.1:4318\""),
            );
            None
        }
    });
    let sample_ratio = match t.sample_ratio {
        None => DEFAULT_SAMPLE_RATIO,
        Some(r) if (0.0..=1.0).contains(&r) => r,
        Some(r) => {
            p.push(
                "telemetry.sample_ratio",
                format!("{r} must be between 0.0 and 1.0"),
            );
            DEFAULT_SAMPLE_RATIO
        }
    };
    let service_name = t.service_name.filter(|n| {
        let ok = !n.trim().is_empty() && n.len() <= 255 && !n.chars().any(char::is_control);
        if !ok {
            p.push(
                "telemetry.service_name",
                format!("{n:?} must be 1 to 255 printable characters"),
            );
        }
        ok
    });
    let timeout = p.duration(
        "telemetry.timeout",
        t.timeout.as_deref(),
        DEFAULT_EXPORT_TIMEOUT,
    );
    Telemetry {
        otlp_endpoint,
        service_name,
        sample_ratio,
        timeout,
    }
}

fn validate_admin(a: file::AdminFile, server: &Server, p: &mut Problems) -> Option<Admin> {
    let listen = p.socket_addr("admin.listen", &a.listen)?;
    // Port 0 (tests) picks a free port each time: never the same socket.
    let public = [Some(server.listen), server.http_redirect_listen];
    if listen.port() != 0 && public.contains(&Some(listen)) {
        p.push(
            "admin.listen",
            format!("{listen} is already a public listener; the admin listener is plain HTTP and needs its own address (e.g. \"127.0.0.1:9100\")"),
        );
    }
    let token = match a.token.as_deref().map(secret::resolve) {
        None => None,
        Some(Err(e)) => {
            p.push("admin.token", e);
            None
        }
        Some(Ok(t)) if t.expose().trim().chars().count() < MIN_ADMIN_TOKEN_CHARS => {
            p.push(
                "admin.token",
                format!("is shorter than {MIN_ADMIN_TOKEN_CHARS} characters; generate one with: openssl rand -hex 32"),
            );
            None
        }
        Some(Ok(t)) => Some(Secret::new(t.expose().trim().to_owned())),
    };
    Some(Admin { listen, token })
}

/// The route that serves `path`: the longest matching prefix on a segment boundary.
fn route_for<'a>(routes: &'a [Route], path: &str) -> Option<&'a Route> {
    routes
        .iter()
        .filter(|r| {
            let prefix = r.path.trim_end_matches('/');
            path == prefix
                || path.starts_with(&r.path)
                || (path.starts_with(prefix) && path[prefix.len()..].starts_with('/'))
        })
        .max_by_key(|r| r.path.len())
}

fn validate_capture(c: file::CaptureFile, routes: &[Route], p: &mut Problems) -> Capture {
    let path_ok = |key: &str, v: &str, p: &mut Problems| {
        if !v.starts_with('/') || v.contains(['?', '#']) || v.chars().any(char::is_whitespace) {
            p.push(
                key,
                format!("{v:?} must be a path such as /auth/login (no query)"),
            );
        }
    };
    path_ok("capture.login_path", &c.login_path, p);
    path_ok("capture.refresh_path", &c.refresh_path, p);
    if let Some(l) = &c.logout_path {
        path_ok("capture.logout_path", l, p);
    }
    let pointer = |key: &str, v: Option<String>, default: &str, p: &mut Problems| {
        let v = v.unwrap_or_else(|| default.to_owned());
        if !v.starts_with('/') {
            p.push(
                key,
                format!("{v:?} must be a JSON Pointer (RFC 6901) such as /access_token"),
            );
        }
        v
    };
    let access_token = pointer(
        "capture.access_token",
        c.access_token,
        DEFAULT_CAPTURE_ACCESS_TOKEN,
        p,
    );
    let refresh_token = pointer(
        "capture.refresh_token",
        c.refresh_token,
        DEFAULT_CAPTURE_REFRESH_TOKEN,
        p,
    );
    let expires_in = c
        .expires_in
        .map(|e| pointer("capture.expires_in", Some(e), "", p));
    let route = match route_for(routes, &c.login_path) {
        Some(r) if r.auth == AuthMode::None => r.index,
        Some(r) => {
            p.push(
                "capture.login_path",
                format!("is served by route[{}] (path {:?}), whose auth must be \"none\": the login is public", r.index, r.path),
            );
            r.index
        }
        None => {
            p.push("capture.login_path", "no [[route]] serves this path");
            0
        }
    };
    Capture {
        refresh_before_expiry: p.duration(
            "capture.refresh_before_expiry",
            c.refresh_before_expiry.as_deref(),
            DEFAULT_CAPTURE_REFRESH_BEFORE,
        ),
        login_path: c.login_path,
        refresh_path: c.refresh_path,
        logout_path: c.logout_path,
        access_token,
        refresh_token,
        expires_in,
        route,
    }
}

fn validate_server(s: file::ServerFile, base: &Path, p: &mut Problems) -> Server {
    let listen = p
        .socket_addr("server.listen", &s.listen)
        .unwrap_or_else(|| ([127, 0, 0, 1], 8443).into());
    let http_redirect_listen = s
        .http_redirect_listen
        .as_deref()
        .and_then(|a| p.socket_addr("server.http_redirect_listen", a));
    let public_origin = public_origin(&s.public_origin, p);
    let tls = Tls {
        cert: p.readable_file("server.tls.cert", base, &s.tls.cert),
        key: p.readable_file("server.tls.key", base, &s.tls.key),
    };
    let limits = validate_limits(s.limits, p);
    let trusted_proxies = trusted_proxies(s.trusted_proxies.unwrap_or_default(), p);
    let hsts = hsts(s.hsts.as_deref(), p);
    Server {
        listen,
        public_origin,
        http_redirect_listen,
        tls,
        limits,
        trusted_proxies,
        underscore_headers: s.underscore_headers.unwrap_or(UnderscoreHeaders::Drop),
        hsts,
    }
}

/// `server.public_origin`: an https origin, serialized without a trailing slash; empty when refused.
fn public_origin(raw: &str, p: &mut Problems) -> String {
    match Url::parse(raw) {
        Ok(u) if u.scheme() != "https" => {
            p.push(
                "server.public_origin",
                format!("{raw:?} must be an https:// origin (the session cookie is Secure)"),
            );
            String::new()
        }
        Ok(u)
            if u.host_str().is_none()
                || u.path() != "/"
                || u.query().is_some()
                || u.fragment().is_some() =>
        {
            p.push(
                "server.public_origin",
                format!("{raw:?} must be an origin only: https://host[:port], no path"),
            );
            String::new()
        }
        Ok(u) => u.origin().ascii_serialization(),
        Err(e) => {
            p.push("server.public_origin", format!("{raw:?} is not a URL: {e}"));
            String::new()
        }
    }
}

/// `[server.limits]`.
fn validate_limits(l: file::LimitsFile, p: &mut Problems) -> Limits {
    let max_header_bytes = p.positive(
        "server.limits.max_header_bytes",
        l.max_header_bytes,
        DEFAULT_MAX_HEADER_BYTES as u64,
    );
    if !(1024..=1024 * 1024).contains(&max_header_bytes) {
        p.push(
            "server.limits.max_header_bytes",
            format!("{max_header_bytes} must be between 1024 and 1048576"),
        );
    }
    Limits {
        max_header_bytes: max_header_bytes as usize,
        header_read_timeout: p.duration(
            "server.limits.header_read_timeout",
            l.header_read_timeout.as_deref(),
            DEFAULT_HEADER_READ_TIMEOUT,
        ),
        idle_timeout: p.duration(
            "server.limits.idle_timeout",
            l.idle_timeout.as_deref(),
            DEFAULT_IDLE_TIMEOUT,
        ),
        max_connections: p.positive(
            "server.limits.max_connections",
            l.max_connections,
            DEFAULT_MAX_CONNECTIONS as u64,
        ) as usize,
        shutdown_grace: p.duration(
            "server.limits.shutdown_grace",
            l.shutdown_grace.as_deref(),
            DEFAULT_SHUTDOWN_GRACE,
        ),
        body_idle_timeout: p.duration(
            "server.limits.body_idle_timeout",
            l.body_idle_timeout.as_deref(),
            DEFAULT_BODY_IDLE_TIMEOUT,
        ),
        max_connections_per_ip: p.positive(
            "server.limits.max_connections_per_ip",
            l.max_connections_per_ip,
            DEFAULT_MAX_CONNECTIONS_PER_IP as u64,
        ) as usize,
        login_requests_per_minute: p
            .positive(
                "server.limits.login_requests_per_minute",
                l.login_requests_per_minute,
                u64::from(DEFAULT_LOGIN_REQUESTS_PER_MINUTE),
            )
            .min(u64::from(u32::MAX)) as u32,
    }
}

/// `server.trusted_proxies`: each a network or a single address.
fn trusted_proxies(raw: Vec<String>, p: &mut Problems) -> Vec<Cidr> {
    let mut out = Vec::new();
    for (i, t) in raw.iter().enumerate() {
        match Cidr::parse(t) {
            Some(c) => out.push(c),
            None => p.push(
                format!("server.trusted_proxies[{i}]"),
                format!("{t:?} is not a network such as \"10.0.0.0/8\" or an address"),
            ),
        }
    }
    out
}

/// `server.hsts`: `"off"`, or a header value that starts with `max-age=N`; default [`DEFAULT_HSTS`].
fn hsts(raw: Option<&str>, p: &mut Problems) -> Option<http::HeaderValue> {
    if raw == Some("off") {
        return None;
    }
    let v = raw.unwrap_or(DEFAULT_HSTS);
    let ok = v
        .trim()
        .to_ascii_lowercase()
        .strip_prefix("max-age=")
        .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()));
    match http::HeaderValue::from_str(v) {
        Ok(h) if ok => Some(h),
        _ => {
            p.push(
                "server.hsts",
                format!("{v:?} must be \"off\" or a header value starting with max-age=N"),
            );
            None
        }
    }
}

fn validate_log(l: file::LogFile, p: &mut Problems) -> Log {
    let format = p
        .choice("log.format", l.format.as_ref(), LogFormat::Text)
        .unwrap_or(LogFormat::Text);
    let level = l.level.unwrap_or_else(|| "info".to_owned());
    if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
        p.push(
            "log.level",
            format!("{level:?} is not a level or filter such as \"info\" or \"coatcheck=debug\""),
        );
    }
    Log { level, format }
}

fn validate_session(s: file::SessionFile, base: &Path, needed: bool, p: &mut Problems) -> Session {
    let cookie_name = cookie_name(s.cookie_name, p);
    let same_site = p
        .choice("session.same_site", s.same_site.as_ref(), SameSite::Strict)
        .unwrap_or(SameSite::Strict);
    let (idle_timeout, absolute_timeout) =
        session_timeouts(s.idle_timeout.as_deref(), s.absolute_timeout.as_deref(), p);
    let keys = session_keys(&s.keys, needed, p);
    let store = validate_store(&s.store, base, p);
    let cache_capacity = cache_capacity(s.cache.capacity, p);
    let touch_interval = touch_interval(s.touch_interval.as_deref(), idle_timeout, p);
    Session {
        cookie_name,
        same_site,
        idle_timeout,
        absolute_timeout,
        persistent: s.persistent.unwrap_or(false),
        touch_interval,
        keys,
        record_key: s.record_key.unwrap_or_default(),
        store,
        cache_capacity,
        cache_ttl: p.duration(
            "session.cache.ttl",
            s.cache.ttl.as_deref(),
            DEFAULT_CACHE_TTL,
        ),
    }
}

/// `session.cookie_name`: a cookie-name token; default [`DEFAULT_COOKIE_NAME`].
fn cookie_name(raw: Option<String>, p: &mut Problems) -> String {
    let cookie_name = raw.unwrap_or_else(|| DEFAULT_COOKIE_NAME.to_owned());
    if cookie_name.is_empty()
        || !cookie_name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        p.push(
            "session.cookie_name",
            format!("{cookie_name:?} must be letters, digits, '-', '_' or '.'"),
        );
    }
    cookie_name
}

/// `session.idle_timeout` and `session.absolute_timeout`, as (idle, absolute).
fn session_timeouts(
    idle_raw: Option<&str>,
    absolute_raw: Option<&str>,
    p: &mut Problems,
) -> (Duration, Duration) {
    // A default adapts to the values the user wrote; only a contradiction they wrote is refused.
    let idle_written = idle_raw.and_then(|r| humantime::parse_duration(r).ok());
    let absolute_timeout = p.duration(
        "session.absolute_timeout",
        absolute_raw,
        DEFAULT_SESSION_ABSOLUTE.max(idle_written.unwrap_or_default()),
    );
    let idle_timeout = p.duration(
        "session.idle_timeout",
        idle_raw,
        DEFAULT_SESSION_IDLE.min(absolute_timeout),
    );
    if idle_timeout > absolute_timeout {
        p.push(
            "session.idle_timeout",
            "must not be longer than session.absolute_timeout",
        );
    }
    (idle_timeout, absolute_timeout)
}

/// `session.keys`: secrets holding base64 of at least 32 bytes; at least one when `needed`.
fn session_keys(raw: &[String], needed: bool, p: &mut Problems) -> Vec<Secret<Vec<u8>>> {
    let mut keys = Vec::new();
    for (i, k) in raw.iter().enumerate() {
        let key = format!("session.keys[{i}]");
        match secret::resolve(k) {
            Err(e) => p.push(key, e),
            Ok(v) => match base64::engine::general_purpose::STANDARD.decode(v.expose().trim()) {
                Ok(bytes) if bytes.len() >= 32 => keys.push(Secret::new(bytes)),
                Ok(bytes) => p.push(
                    key,
                    format!(
                        "decodes to {} bytes; at least 32 are needed (openssl rand -base64 32)",
                        bytes.len()
                    ),
                ),
                Err(_) => p.push(
                    key,
                    "is not valid base64 (generate one with: openssl rand -base64 32)",
                ),
            },
        }
    }
    if needed && raw.is_empty() {
        p.push("session.keys", "at least one key is needed when sessions are used (e.g. [\"env:COATCHECK_SESSION_KEY\"] with openssl rand -base64 32)");
    }
    keys
}

/// `[session.store]`: which kind, and the keys that kind reads.
fn validate_store(st: &file::StoreFile, base: &Path, p: &mut Problems) -> StoreKind {
    let kind = p.choice(
        "session.store.kind",
        st.kind.as_ref(),
        StoreKindName::Embedded,
    );
    match kind {
        Some(StoreKindName::Embedded) => {
            not_for_kind(p, st, "embedded");
            StoreKind::Embedded {
                path: resolve_path(base, st.path.as_deref().unwrap_or(DEFAULT_STORE_PATH)),
            }
        }
        Some(StoreKindName::Memory) => {
            not_for_kind(p, st, "memory");
            StoreKind::Memory
        }
        Some(StoreKindName::Redis) => redis_settings(p, base, st),
        // An unknown kind: the other keys are not checked against a kind nobody meant.
        None => StoreKind::Memory,
    }
}

/// `session.cache.capacity`: zero (no cache) or more; default [`DEFAULT_CACHE_CAPACITY`].
fn cache_capacity(raw: Option<i64>, p: &mut Problems) -> u64 {
    match raw {
        None => DEFAULT_CACHE_CAPACITY,
        Some(c) if c >= 0 => c as u64,
        Some(c) => {
            p.push(
                "session.cache.capacity",
                format!("{c} must be zero or more"),
            );
            DEFAULT_CACHE_CAPACITY
        }
    }
}

/// `session.touch_interval`, which must stay below `idle_timeout`.
fn touch_interval(raw: Option<&str>, idle_timeout: Duration, p: &mut Problems) -> Duration {
    // Derived: at most half the idle timeout, so the store's idle clock keeps up.
    let touch_interval = p.duration(
        "session.touch_interval",
        raw,
        DEFAULT_TOUCH_INTERVAL
            .min(idle_timeout / 2)
            .max(Duration::from_millis(1)),
    );
    if touch_interval >= idle_timeout {
        // The store's idle clock would fall behind the sliding window and end active sessions.
        p.push(
            "session.touch_interval",
            "must be shorter than session.idle_timeout",
        );
    }
    touch_interval
}

/// Keys of `[session.store]` that only one kind reads: naming one for another kind is a mistake.
fn not_for_kind(p: &mut Problems, st: &file::StoreFile, kind: &str) {
    let redis_only = [
        ("url", st.url.is_some()),
        ("key_prefix", st.key_prefix.is_some()),
        ("ca", st.ca.is_some()),
        ("sentinels", st.sentinels.is_some()),
        ("sentinel_master", st.sentinel_master.is_some()),
        ("timeout", st.timeout.is_some()),
    ];
    for (key, set) in redis_only {
        if set {
            p.push(
                format!("session.store.{key}"),
                format!("only applies to kind = \"redis\", not {kind:?}"),
            );
        }
    }
}

/// `[session.store]` with `kind = "redis"`. The URL is a secret: no message quotes it.
fn redis_settings(p: &mut Problems, base: &Path, st: &file::StoreFile) -> StoreKind {
    if st.path.is_some() {
        p.push("session.store.path", "only applies to kind = \"embedded\"");
    }
    let url = redis_url(st.url.as_deref(), p);
    let key_prefix = redis_key_prefix(st.key_prefix.clone(), p);
    let rediss = Url::parse(url.expose()).is_ok_and(|u| u.scheme() == "rediss");
    let ca = redis_ca(st.ca.as_deref(), rediss, base, p);
    let sentinels = redis_sentinels(st, p);
    let timeout = p.duration(
        "session.store.timeout",
        st.timeout.as_deref(),
        DEFAULT_REDIS_TIMEOUT,
    );
    StoreKind::Redis(RedisSettings {
        url,
        key_prefix,
        ca,
        sentinels,
        sentinel_master: st.sentinel_master.clone(),
        timeout,
    })
}

/// `session.store.url`: required, a secret holding a `redis://` or `rediss://` URL.
fn redis_url(raw: Option<&str>, p: &mut Problems) -> Secret {
    match raw.map(secret::resolve) {
        None => {
            p.push(
                "session.store.url",
                "is required for kind = \"redis\" (e.g. \"env:COATCHECK_REDIS_URL\" holding redis://host:6379/0)",
            );
            Secret::default()
        }
        Some(Err(e)) => {
            p.push("session.store.url", e);
            Secret::default()
        }
        Some(Ok(u)) => {
            if let Err(reason) = check_redis_url(u.expose()) {
                p.push("session.store.url", reason);
            }
            u
        }
    }
}

/// `session.store.key_prefix`; default [`DEFAULT_REDIS_KEY_PREFIX`].
fn redis_key_prefix(raw: Option<String>, p: &mut Problems) -> String {
    let key_prefix = raw.unwrap_or_else(|| DEFAULT_REDIS_KEY_PREFIX.to_owned());
    if key_prefix.contains(['{', '}']) || key_prefix.chars().any(char::is_whitespace) {
        p.push(
            "session.store.key_prefix",
            format!("{key_prefix:?} must not contain braces or whitespace (braces would change the Redis Cluster hash tag)"),
        );
    }
    key_prefix
}

/// `session.store.ca`: a readable PEM file, only with a `rediss://` URL.
fn redis_ca(raw: Option<&str>, rediss: bool, base: &Path, p: &mut Problems) -> Option<PathBuf> {
    let ca = raw.map(|raw| {
        if !rediss {
            p.push("session.store.ca", "only applies to a rediss:// URL");
        }
        p.readable_file("session.store.ca", base, raw)
    });
    if let Some(path) = ca.as_ref().filter(|path| path.exists()) {
        let pem = std::fs::read(path).unwrap_or_default();
        use rustls_pki_types::pem::PemObject as _;
        let certs = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .unwrap_or_default();
        if certs.is_empty() {
            p.push(
                "session.store.ca",
                format!("{} holds no PEM certificate", path.display()),
            );
        }
    }
    ca
}

/// `session.store.sentinels` and `session.store.sentinel_master`, which go together.
fn redis_sentinels(st: &file::StoreFile, p: &mut Problems) -> Vec<String> {
    let sentinels = st.sentinels.clone().unwrap_or_default();
    for (i, addr) in sentinels.iter().enumerate() {
        let ok = addr.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|n| n > 0)
        });
        if !ok {
            p.push(
                format!("session.store.sentinels[{i}]"),
                format!("{addr:?} is not a host:port such as \"10.0.0.5:26379\""),
            );
        }
    }
    if st.sentinels.as_ref().is_some_and(Vec::is_empty) {
        p.push(
            "session.store.sentinels",
            "is empty; list the Sentinels as [\"host:26379\", ...] or remove the key",
        );
    }
    match (&st.sentinel_master, sentinels.is_empty()) {
        (None, false) => p.push(
            "session.store.sentinel_master",
            "is required with session.store.sentinels (the name in \"sentinel monitor <name> ...\")",
        ),
        (Some(_), true) if st.sentinels.is_none() => p.push(
            "session.store.sentinel_master",
            "only applies together with session.store.sentinels",
        ),
        (Some(m), _) if m.is_empty() || m.chars().any(char::is_whitespace) => p.push(
            "session.store.sentinel_master",
            format!("{m:?} is not a Sentinel master name"),
        ),
        _ => {}
    }
    sentinels
}

/// Checks a Redis URL; the reason never quotes the URL (it may hold a password).
fn check_redis_url(raw: &str) -> Result<(), String> {
    let u = Url::parse(raw).map_err(|e| {
        format!("is not a valid URL ({e}); write redis://[user:password@]host[:port][/db] or rediss://...")
    })?;
    if !matches!(u.scheme(), "redis" | "rediss") {
        return Err(format!(
            "scheme {:?} must be \"redis\" or \"rediss\" (TLS)",
            u.scheme()
        ));
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err("has no host; write redis://host:6379/0".into());
    }
    let db = u.path().trim_start_matches('/');
    if !db.is_empty() && db.parse::<u16>().is_err() {
        return Err(format!("path {db:?} must be a database number such as /0"));
    }
    if u.query().is_some() || u.fragment().is_some() {
        return Err("must not have a query or fragment".into());
    }
    Ok(())
}

/// Whether `url` is http on a loopback host (allowed for local development and tests).
pub(crate) fn is_loopback_http(url: &Url) -> bool {
    url.scheme() == "http"
        && match url.host() {
            Some(url::Host::Ipv4(a)) => a.is_loopback(),
            Some(url::Host::Ipv6(a)) => a.is_loopback(),
            Some(url::Host::Domain(d)) => d == "localhost",
            None => false,
        }
}

fn validate_oidc(o: file::OidcFile, base: &Path, p: &mut Problems) -> Oidc {
    let issuer = issuer(&o.issuer, p);
    if o.client_id.is_empty() {
        p.push("oidc.client_id", "must not be empty");
    }
    let client_secret = secret::resolve(&o.client_secret).unwrap_or_else(|e| {
        p.push("oidc.client_secret", e);
        Secret::default()
    });
    let scopes = o
        .scopes
        .unwrap_or_else(|| DEFAULT_SCOPES.iter().map(|s| s.to_string()).collect());
    if !scopes.iter().any(|s| s == "openid") {
        p.push("oidc.scopes", "must include \"openid\"");
    }
    let allowed_algs = allowed_algs(o.allowed_algs, p);
    let client_auth = p
        .choice(
            "oidc.token_endpoint_auth_method",
            o.token_endpoint_auth_method.as_ref(),
            ClientAuth::Basic,
        )
        .unwrap_or(ClientAuth::Basic);
    let post_logout_redirect = post_logout_redirect(o.post_logout_redirect, p);
    Oidc {
        issuer,
        issuer_id: o.issuer.clone(),
        metadata_refresh: p.duration(
            "oidc.metadata_refresh",
            o.metadata_refresh.as_deref(),
            DEFAULT_METADATA_REFRESH,
        ),
        client_id: o.client_id,
        client_secret,
        scopes,
        allowed_algs,
        clock_skew: clock_skew(o.clock_skew.as_deref(), p),
        refresh_before_expiry: p.duration(
            "oidc.refresh_before_expiry",
            o.refresh_before_expiry.as_deref(),
            DEFAULT_REFRESH_BEFORE,
        ),
        post_logout_redirect,
        ca: o.ca.map(|c| p.readable_file("oidc.ca", base, &c)),
        client_auth,
        timeout: p.duration("oidc.timeout", o.timeout.as_deref(), DEFAULT_IDP_TIMEOUT),
        refresh_wait: p.duration(
            "oidc.refresh_wait",
            o.refresh_wait.as_deref(),
            DEFAULT_REFRESH_WAIT,
        ),
        rotation_grace: p.duration(
            "oidc.rotation_grace",
            o.rotation_grace.as_deref(),
            DEFAULT_ROTATION_GRACE,
        ),
    }
}

/// `oidc.issuer`: https, or http on a loopback host; a placeholder when refused.
fn issuer(raw: &str, p: &mut Problems) -> Url {
    match Url::parse(raw) {
        Ok(u) if u.scheme() == "https" || is_loopback_http(&u) => u,
        Ok(_) => {
            p.push(
                "oidc.issuer",
                format!("{raw:?} must be https:// (http:// only for a loopback host)"),
            );
            Url::parse("https://invalid.invalid").expect("constant URL")
        }
        Err(e) => {
            p.push("oidc.issuer", format!("{raw:?} is not a URL: {e}"));
            Url::parse("https://invalid.invalid").expect("constant URL")
        }
    }
}

/// `oidc.allowed_algs`: JWS algorithms, never HMAC; default [`DEFAULT_ALGS`].
fn allowed_algs(raw: Option<Vec<String>>, p: &mut Problems) -> Vec<jsonwebtoken::Algorithm> {
    use jsonwebtoken::Algorithm as A;
    let mut allowed_algs = Vec::new();
    for (i, a) in raw
        .unwrap_or_else(|| DEFAULT_ALGS.iter().map(|s| s.to_string()).collect())
        .iter()
        .enumerate()
    {
        match a.parse::<A>() {
            Ok(A::HS256 | A::HS384 | A::HS512) => p.push(
                format!("oidc.allowed_algs[{i}]"),
                format!(
                    "{a:?}: HMAC algorithms are refused (key confusion); use RS*, PS*, ES* or EdDSA"
                ),
            ),
            Ok(alg) => allowed_algs.push(alg),
            Err(_) => p.push(
                format!("oidc.allowed_algs[{i}]"),
                format!("{a:?} is not a JWS algorithm such as \"RS256\""),
            ),
        }
    }
    if allowed_algs.is_empty() {
        p.push("oidc.allowed_algs", "must name at least one algorithm");
    }
    allowed_algs
}

/// `oidc.post_logout_redirect`: a local path; default `/`.
fn post_logout_redirect(raw: Option<String>, p: &mut Problems) -> String {
    let post_logout_redirect = raw.unwrap_or_else(|| "/".to_owned());
    if !post_logout_redirect.starts_with('/') || post_logout_redirect.starts_with("//") {
        p.push(
            "oidc.post_logout_redirect",
            format!("{post_logout_redirect:?} must be a local path such as \"/\""),
        );
    }
    post_logout_redirect
}

/// `oidc.clock_skew`; default [`DEFAULT_CLOCK_SKEW`].
fn clock_skew(raw: Option<&str>, p: &mut Problems) -> Duration {
    match raw.map(humantime::parse_duration) {
        // Zero skew is a legitimate (strict) choice, unlike a zero timeout.
        Some(Ok(d)) if d.is_zero() => Duration::ZERO,
        _ => p.duration("oidc.clock_skew", raw, DEFAULT_CLOCK_SKEW),
    }
}

/// `route[N].scopes`: only with `auth = "client"`; each a scope token (RFC 6749 §3.3), sorted and
/// deduplicated so that routes asking for the same set share one token.
fn client_scopes(
    raw: Option<Vec<String>>,
    auth: AuthMode,
    k: &dyn Fn(&str) -> String,
    p: &mut Problems,
) -> Vec<String> {
    let Some(raw) = raw else {
        return Vec::new();
    };
    if auth != AuthMode::Client {
        p.push(k("scopes"), "only applies to auth = \"client\"");
        return Vec::new();
    }
    let mut scopes = Vec::with_capacity(raw.len());
    for (j, s) in raw.into_iter().enumerate() {
        // scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
        let ok = !s.is_empty()
            && s.bytes()
                .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b));
        if ok {
            scopes.push(s);
        } else {
            p.push(
                format!("{}[{j}]", k("scopes")),
                format!("{s:?} is not a scope (printable ASCII, no spaces, quotes or backslashes)"),
            );
        }
    }
    scopes.sort();
    scopes.dedup();
    scopes
}

fn validate_routes(routes: Vec<file::RouteFile>, base: &Path, p: &mut Problems) -> Vec<Route> {
    let mut out: Vec<Route> = Vec::new();
    for (i, r) in routes.into_iter().enumerate() {
        let route = validate_route(i, r, &out, base, p);
        out.push(route);
    }
    if out.is_empty() {
        p.push("route", "at least one [[route]] is needed");
    }
    out
}

/// `route[i]`; `earlier` are the routes before it, whose paths it must not repeat.
fn validate_route(
    i: usize,
    r: file::RouteFile,
    earlier: &[Route],
    base: &Path,
    p: &mut Problems,
) -> Route {
    let k = |name: &str| format!("route[{i}].{name}");
    check_route_path(&r.path, earlier, &k, p);
    let upstream = route_upstream(&r.upstream, &k, p);
    // An unknown auth stands in as "none": it needs no [oidc] and no session keys.
    let auth = p
        .choice(&k("auth"), r.auth.as_ref(), AuthMode::Required)
        .unwrap_or(AuthMode::None);
    let csrf = p
        .choice(&k("csrf"), r.csrf.as_ref(), CsrfMode::All)
        .unwrap_or(CsrfMode::All);
    let methods = route_methods(r.methods, &k, p);
    let roles = r.roles.unwrap_or_default();
    if !roles.is_empty() && matches!(auth, AuthMode::None | AuthMode::Client) {
        p.push(
            k("roles"),
            "needs auth = \"required\", \"optional\" or \"bearer\" (there is no user to hold roles otherwise)",
        );
    }
    let scopes = client_scopes(r.scopes, auth, &k, p);
    check_audience(r.audience.as_deref(), auth, &k, p);
    let ca = r.ca.map(|c| {
        if upstream.scheme() != "https" {
            p.push(k("ca"), "only applies to an https:// upstream");
        }
        p.readable_file(&k("ca"), base, &c)
    });
    let login_redirect = r.login_redirect.unwrap_or(false);
    if login_redirect && auth != AuthMode::Required {
        p.push(k("login_redirect"), "only applies to auth = \"required\"");
    }
    Route {
        index: i,
        path: r.path,
        upstream,
        auth,
        strip_prefix: r.strip_prefix.unwrap_or(false),
        roles,
        timeout: p.duration(&k("timeout"), r.timeout.as_deref(), DEFAULT_ROUTE_TIMEOUT),
        max_body_bytes: p.positive(
            &k("max_body_bytes"),
            r.max_body_bytes,
            DEFAULT_MAX_BODY_BYTES,
        ),
        retry_body_bytes: match r.retry_body_bytes {
            Some(0) => 0,
            raw => p.positive(&k("retry_body_bytes"), raw, DEFAULT_RETRY_BODY_BYTES),
        },
        methods,
        preserve_host: r.preserve_host.unwrap_or(false),
        ca,
        login_redirect,
        csrf,
        audience: r.audience,
        scopes,
        allow_encoded_slashes: r.allow_encoded_slashes.unwrap_or(false),
    }
}

/// `route[N].path`: an absolute, plain prefix that no earlier route uses.
fn check_route_path(path: &str, earlier: &[Route], k: &dyn Fn(&str) -> String, p: &mut Problems) {
    if !path.starts_with('/')
        || path.contains(['?', '#', '%', '\\'])
        || path.split('/').any(|s| s == "." || s == "..")
    {
        p.push(
            k("path"),
            format!("{path:?} must be an absolute, plain path prefix such as \"/api/\""),
        );
    }
    if let Some(prev) = earlier.iter().find(|o| o.path == path) {
        p.push(
            k("path"),
            format!("{path:?} is already used by route[{}]", prev.index),
        );
    }
}

/// `route[N].upstream`: an http(s) URL with a host and no query; a placeholder when refused.
fn route_upstream(raw: &str, k: &dyn Fn(&str) -> String, p: &mut Problems) -> Url {
    match Url::parse(raw) {
        Ok(u)
            if matches!(u.scheme(), "http" | "https")
                && u.host_str().is_some()
                && u.query().is_none()
                && u.fragment().is_none() =>
        {
            u
        }
        Ok(_) => {
            p.push(
                k("upstream"),
                format!("{raw:?} must be an http:// or https:// URL with a host and no query"),
            );
            Url::parse("http://invalid.invalid").expect("constant URL")
        }
        Err(e) => {
            p.push(k("upstream"), format!("{raw:?} is not a URL: {e}"));
            Url::parse("http://invalid.invalid").expect("constant URL")
        }
    }
}

/// `route[N].methods`: HTTP methods (any case), at least one when the key is given.
fn route_methods(
    raw: Option<Vec<String>>,
    k: &dyn Fn(&str) -> String,
    p: &mut Problems,
) -> Option<Vec<Method>> {
    let methods = raw.map(|ms| {
        ms.iter()
            .enumerate()
            .filter_map(
                |(j, m)| match Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
                    Ok(m) => Some(m),
                    Err(_) => {
                        p.push(
                            format!("{}[{j}]", k("methods")),
                            format!("{m:?} is not an HTTP method"),
                        );
                        None
                    }
                },
            )
            .collect::<Vec<_>>()
    });
    if methods.as_ref().is_some_and(|m| m.is_empty()) {
        p.push(
            k("methods"),
            "must list at least one method (or be left out)",
        );
    }
    methods
}

/// `route[N].audience`: one audience, only with `auth = "bearer"` or `"client"`.
fn check_audience(
    audience: Option<&str>,
    auth: AuthMode,
    k: &dyn Fn(&str) -> String,
    p: &mut Problems,
) {
    let Some(a) = audience else { return };
    if !matches!(auth, AuthMode::Bearer | AuthMode::Client) {
        p.push(
            k("audience"),
            "only applies to auth = \"bearer\" or \"client\"",
        );
    } else if a.is_empty() || a.chars().any(char::is_whitespace) {
        p.push(
            k("audience"),
            format!("{a:?} must be one audience (a URI or name, no spaces)"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp_cert() -> (String, String) {
        let dir = std::env::temp_dir();
        let c = dir.join("coatcheck-config-test.crt");
        std::fs::write(&c, "x").unwrap();
        (c.display().to_string(), c.display().to_string())
    }

    fn base(extra: &str) -> String {
        let (c, k) = tmp_cert();
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\npublic_origin = \"https://localhost:8443\"\n[server.tls]\ncert = \"{c}\"\nkey = \"{k}\"\n{extra}"
        )
    }

    fn problems(text: &str) -> Vec<Problem> {
        Config::from_toml(text, Path::new("t.toml"))
            .err()
            .map(|e| e.problems)
            .unwrap_or_default()
    }

    fn with_telemetry(t: &str) -> String {
        base(&format!(
            "[[route]]\npath = \"/\"\nupstream = \"http://127.0.0.1:9000\"\nauth = \"none\"\n[telemetry]\n{t}"
        ))
    }

    #[test]
    fn telemetry_keys_are_parsed_with_their_defaults() {
        let c = Config::from_toml(
            &with_telemetry("otlp_endpoint = \"http://127.0.0.1:4318/\"\nsample_ratio = 0.25"),
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(c.telemetry.sample_ratio, 0.25);
        assert_eq!(c.telemetry.timeout, DEFAULT_EXPORT_TIMEOUT);
        let s = c.telemetry.export_settings().expect("export on");
        assert_eq!(
            s.endpoint.as_deref(),
            Some("http://127.0.0.1:4318/v1/traces")
        );
        let off = Config::from_toml(&with_telemetry(""), Path::new("t.toml")).unwrap();
        assert_eq!(off.telemetry, Telemetry::default());
    }

    #[test]
    fn bad_telemetry_values_name_their_key() {
        let keys = |t: &str| -> Vec<String> {
            problems(&with_telemetry(t))
                .into_iter()
                .map(|p| p.key)
                .collect()
        };
        assert_eq!(
            keys("otlp_endpoint = \"ftp://x\""),
            ["telemetry.otlp_endpoint"]
        );
        assert_eq!(
            keys("otlp_endpoint = \"not a url\""),
            ["telemetry.otlp_endpoint"]
        );
        assert_eq!(
            keys("otlp_endpoint = \"http://h:4318?x=1\""),
            ["telemetry.otlp_endpoint"]
        );
        assert_eq!(keys("sample_ratio = -0.1"), ["telemetry.sample_ratio"]);
        assert_eq!(keys("sample_ratio = nan"), ["telemetry.sample_ratio"]);
        assert_eq!(keys("service_name = \" \""), ["telemetry.service_name"]);
        assert_eq!(keys("timeout = \"0s\""), ["telemetry.timeout"]);
        assert!(
            !keys("exporter = \"x\"").is_empty(),
            "unknown keys are refused"
        );
    }

    fn redis_store(store: &str) -> String {
        base(&format!(
            "[[route]]\npath = \"/\"\nupstream = \"http://127.0.0.1:9000\"\nauth = \"none\"\n[session.store]\nkind = \"redis\"\n{store}"
        ))
    }

    #[test]
    fn a_redis_store_gets_its_defaults_and_keeps_the_url_secret() {
        let c = Config::from_toml(
            &redis_store("url = \"redis://u:pw-123@10.0.0.1:6380/3\"\n"),
            Path::new("t.toml"),
        )
        .unwrap();
        let StoreKind::Redis(r) = &c.session.store else {
            panic!("{:?}", c.session.store)
        };
        assert_eq!(r.key_prefix, DEFAULT_REDIS_KEY_PREFIX);
        assert_eq!(r.timeout, DEFAULT_REDIS_TIMEOUT);
        assert!(r.sentinels.is_empty() && r.sentinel_master.is_none() && r.ca.is_none());
        assert_eq!(r.url.expose(), "redis://u:pw-123@10.0.0.1:6380/3");
        assert!(
            !format!("{c:?}").contains("pw-123"),
            "Debug redacts the URL"
        );
    }

    #[test]
    fn redis_store_problems_name_the_key_and_never_quote_the_url() {
        for (store, key) in [
            ("", "session.store.url"),
            ("url = \"https://u:pw-123@h/0\"\n", "session.store.url"),
            ("url = \"redis://u:pw-123@/0\"\n", "session.store.url"),
            ("url = \"redis://u:pw-123@h/x\"\n", "session.store.url"),
            ("url = \"redis://u:pw-123@h/0?db=1\"\n", "session.store.url"),
            (
                "url = \"redis://h\"\nkey_prefix = \"a{b}\"\n",
                "session.store.key_prefix",
            ),
            (
                "url = \"redis://h\"\ntimeout = \"0s\"\n",
                "session.store.timeout",
            ),
            (
                "url = \"redis://h\"\nsentinel_master = \"m\"\n",
                "session.store.sentinel_master",
            ),
            (
                "url = \"redis://h\"\nsentinels = [\"h:26379\"]\n",
                "session.store.sentinel_master",
            ),
            (
                "url = \"redis://h\"\nsentinels = [\"h:0\"]\nsentinel_master = \"m\"\n",
                "session.store.sentinels[0]",
            ),
            (
                "url = \"redis://h\"\nsentinels = []\nsentinel_master = \"m\"\n",
                "session.store.sentinels",
            ),
            (
                "url = \"redis://h\"\npath = \"x.db\"\n",
                "session.store.path",
            ),
        ] {
            let p = problems(&redis_store(store));
            assert_eq!(p.len(), 1, "{store}: {p:?}");
            assert_eq!(p[0].key, key, "{store}: {p:?}");
            assert!(!p[0].reason.contains("pw-123"), "{store}: {p:?}");
        }
        let p = problems(&base(
            "[[route]]\npath = \"/\"\nupstream = \"http://127.0.0.1:9000\"\nauth = \"none\"\n[session.store]\nkind = \"memory\"\ntimeout = \"1s\"\n",
        ));
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, "session.store.timeout");
    }

    #[test]
    fn a_minimal_config_with_one_route_is_valid_and_gets_defaults() {
        let c = Config::from_toml(
            &base(
                "[[route]]\npath = \"/\"\nupstream = \"http://127.0.0.1:9000\"\nauth = \"none\"\n",
            ),
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(c.server.limits.max_header_bytes, DEFAULT_MAX_HEADER_BYTES);
        assert_eq!(c.routes[0].timeout, DEFAULT_ROUTE_TIMEOUT);
        assert_eq!(c.server.public_origin, "https://localhost:8443");
    }

    #[test]
    fn the_admin_listener_needs_its_own_address_and_a_long_enough_token() {
        let route =
            "[[route]]\npath = \"/\"\nupstream = \"http://127.0.0.1:9000\"\nauth = \"none\"\n";
        let ok = Config::from_toml(
            &base(&format!(
                "{route}[admin]\nlisten = \"127.0.0.1:9100\"\ntoken = \"0123456789abcdef-admin\"\n"
            )),
            Path::new("t.toml"),
        )
        .unwrap();
        let admin = ok.admin.expect("[admin] configured");
        assert_eq!(admin.listen.port(), 9100);
        assert_eq!(admin.token.unwrap().expose(), "0123456789abcdef-admin");
        let without = Config::from_toml(&base(route), Path::new("t.toml")).unwrap();
        assert!(without.admin.is_none());
        for (admin, key) in [
            ("listen = \"9100\"\n", "admin.listen"),
            (
                "listen = \"127.0.0.1:9100\"\ntoken = \"tiny-tok\"\n",
                "admin.token",
            ),
            ("listen = \"127.0.0.1:9100\"\ntoken = \"\"\n", "admin.token"),
            (
                "listen = \"127.0.0.1:9100\"\ntoken = \"env:COATCHECK_TEST_UNSET_ADMIN_TOKEN\"\n",
                "admin.token",
            ),
            ("token = \"0123456789abcdef-admin\"\n", "admin"),
            ("listen = \"127.0.0.1:9100\"\nport = 1\n", "admin.port"),
        ] {
            let p = problems(&base(&format!("{route}[admin]\n{admin}")));
            assert_eq!(p.len(), 1, "{admin}: {p:?}");
            assert!(p[0].key.starts_with(key), "{admin}: {p:?}");
            assert!(
                !p[0].reason.contains("tiny-tok"),
                "the token is never quoted: {p:?}"
            );
        }
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:8443\"\npublic_origin = \"https://localhost:8443\"\n[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n{route}[admin]\nlisten = \"127.0.0.1:8443\"\n",
            tmp_cert().0,
            tmp_cert().1
        );
        let p = problems(&text);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, "admin.listen");
    }

    #[test]
    fn unknown_keys_are_named_with_their_path() {
        let p = problems(&base("[server.limits]\nmax_headr_bytes = 1\n"));
        let keys: Vec<_> = p.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"server.limits.max_headr_bytes"), "{p:?}");
        assert!(p[0].reason.contains("max_header_bytes"), "{p:?}");
    }

    #[test]
    fn every_problem_is_listed_at_once() {
        let p = problems(&base(
            "[server.limits]\nidle_timeout = \"soon\"\nmax_connections = -1\n[[route]]\npath = \"api\"\nupstream = \"ftp://x\"\nauth = \"none\"\nmethods = [\"G T\"]\n",
        ));
        let keys: Vec<_> = p.iter().map(|p| p.key.as_str()).collect();
        for k in [
            "server.limits.idle_timeout",
            "server.limits.max_connections",
            "route[0].path",
            "route[0].upstream",
            "route[0].methods[0]",
        ] {
            assert!(keys.contains(&k), "{k} missing from {keys:?}");
        }
    }

    /// A file with `[oidc]`, a session key and one route, each section followed by `log`,
    /// `session`, `oidc` and `route`.
    fn enum_keys(log: &str, session: &str, oidc: &str, route: &str) -> String {
        base(&format!(
            "[log]\n{log}\n\
             [session]\nkeys = [\"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"]\n{session}\n\
             [oidc]\nissuer = \"http://127.0.0.1:1\"\nclient_id = \"c\"\nclient_secret = \"s\"\n{oidc}\n\
             [[route]]\npath = \"/\"\nupstream = \"http://127.0.0.1:9000\"\n{route}\n"
        ))
    }

    #[test]
    fn an_unknown_value_of_each_enum_key_is_listed_with_the_values_its_enum_accepts() {
        let p = problems(&enum_keys(
            "format = \"xml\"",
            "same_site = \"none\"\nstore.kind = \"postgres\"",
            "token_endpoint_auth_method = \"private_key_jwt\"",
            "auth = \"sometimes\"\ncsrf = \"unsafe_methods\"",
        ));
        let listed: Vec<String> = p.iter().map(Problem::to_string).collect();
        assert_eq!(
            listed,
            [
                r#"log.format: "xml" must be "text" or "json""#,
                r#"oidc.token_endpoint_auth_method: "private_key_jwt" must be "client_secret_basic" or "client_secret_post""#,
                r#"route[0].auth: "sometimes" must be "required", "optional", "none", "bearer" or "client""#,
                r#"route[0].csrf: "unsafe_methods" must be "all", "unsafe-methods" or "off""#,
                r#"session.same_site: "none" must be "strict" or "lax""#,
                r#"session.store.kind: "postgres" must be "memory", "embedded" or "redis""#,
            ]
        );
    }

    #[test]
    fn enum_keys_written_are_taken_and_absent_ones_get_their_defaults() {
        let c = Config::from_toml(&enum_keys("", "", "", ""), Path::new("t.toml")).unwrap();
        assert_eq!(c.log.format, LogFormat::Text);
        assert_eq!(c.session.same_site, SameSite::Strict);
        assert_eq!(
            c.session.store,
            StoreKind::Embedded {
                path: PathBuf::from(DEFAULT_STORE_PATH)
            }
        );
        assert_eq!(c.oidc.unwrap().client_auth, ClientAuth::Basic);
        assert_eq!(
            (c.routes[0].auth, c.routes[0].csrf),
            (AuthMode::Required, CsrfMode::All)
        );
        let c = Config::from_toml(
            &enum_keys(
                "format = \"json\"",
                "same_site = \"lax\"\nstore.kind = \"memory\"",
                "token_endpoint_auth_method = \"client_secret_post\"",
                "auth = \"bearer\"\ncsrf = \"unsafe-methods\"",
            ),
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.session.same_site, SameSite::Lax);
        assert_eq!(c.session.store, StoreKind::Memory);
        assert_eq!(c.oidc.unwrap().client_auth, ClientAuth::Post);
        assert_eq!(
            (c.routes[0].auth, c.routes[0].csrf),
            (AuthMode::Bearer, CsrfMode::UnsafeMethods)
        );
    }

    #[test]
    fn an_unknown_store_kind_checks_no_other_key_and_an_unknown_auth_needs_no_oidc() {
        // Not checked against a kind nobody meant: the Redis keys are not "only for redis".
        let p = problems(&enum_keys(
            "",
            "store.kind = \"redis-cluster\"\nstore.url = \"redis://10.0.0.1\"",
            "",
            "",
        ));
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, "session.store.kind");
        // Stands in as "none", which needs no [oidc].
        let p = problems(&base(
            "[[route]]\npath = \"/\"\nupstream = \"http://127.0.0.1:9000\"\nauth = \"requried\"\n",
        ));
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, "route[0].auth");
    }

    #[test]
    fn an_enum_key_that_is_not_a_string_is_a_type_error() {
        let p = problems(&enum_keys("", "same_site = 1", "", ""));
        let listed: Vec<String> = p.iter().map(Problem::to_string).collect();
        assert_eq!(
            listed,
            ["session.same_site: invalid type: integer `1`, expected a string (line 11)"]
        );
    }

    fn capture(capture: &str, public_auth: &str) -> String {
        base(&format!(
            "[session]\nkeys = [\"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"]\n\
             [capture]\n{capture}\n\
             [[route]]\npath = \"/api/\"\nupstream = \"http://127.0.0.1:9000\"\n\
             [[route]]\npath = \"/auth/\"\nupstream = \"http://127.0.0.1:9000\"\nauth = \"{public_auth}\"\n"
        ))
    }

    #[test]
    fn capture_alone_serves_authenticated_routes_and_gets_its_defaults() {
        let c = Config::from_toml(
            &capture(
                "login_path = \"/auth/login\"\nrefresh_path = \"/auth/refresh\"",
                "none",
            ),
            Path::new("t.toml"),
        )
        .unwrap();
        let cap = c.capture.unwrap();
        assert_eq!(cap.route, 1, "the route that serves the login");
        assert_eq!(cap.access_token, DEFAULT_CAPTURE_ACCESS_TOKEN);
        assert_eq!(cap.refresh_token, DEFAULT_CAPTURE_REFRESH_TOKEN);
        assert_eq!(cap.refresh_before_expiry, DEFAULT_CAPTURE_REFRESH_BEFORE);
        assert!(c.oidc.is_none());
    }

    #[test]
    fn capture_problems_name_their_key() {
        for (text, key) in [
            (
                capture(
                    "login_path = \"/nowhere\"\nrefresh_path = \"/auth/refresh\"",
                    "none",
                ),
                "capture.login_path",
            ),
            (
                capture(
                    "login_path = \"/auth/login\"\nrefresh_path = \"/auth/refresh\"",
                    "required",
                ),
                "capture.login_path",
            ),
            (
                capture(
                    "login_path = \"auth/login\"\nrefresh_path = \"/auth/refresh\"",
                    "none",
                ),
                "capture.login_path",
            ),
            (
                capture(
                    "login_path = \"/auth/login\"\nrefresh_path = \"/r?x=1\"",
                    "none",
                ),
                "capture.refresh_path",
            ),
            (
                capture(
                    "login_path = \"/auth/login\"\nrefresh_path = \"/r\"\naccess_token = \"access_token\"",
                    "none",
                ),
                "capture.access_token",
            ),
            (
                capture(
                    "login_path = \"/auth/login\"\nrefresh_path = \"/r\"\nrefresh_before_expiry = \"soon\"",
                    "none",
                ),
                "capture.refresh_before_expiry",
            ),
            (
                capture(
                    "login_path = \"/auth/login\"\nrefresh_path = \"/r\"\nlogin = 1",
                    "none",
                ),
                "capture.login",
            ),
        ] {
            let p = problems(&text);
            assert!(p.iter().any(|p| p.key.starts_with(key)), "{key}: {p:?}");
        }
    }

    #[test]
    fn authenticated_routes_need_oidc_and_keys() {
        let p = problems(&base(
            "[[route]]\npath = \"/\"\nupstream = \"http://127.0.0.1:1\"\n",
        ));
        let keys: Vec<_> = p.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"route[0].auth"), "{keys:?}");
        assert!(keys.contains(&"session.keys"), "{keys:?}");
    }

    fn session_base(session: &str) -> String {
        base(&format!(
            "[oidc]\nissuer = \"http://127.0.0.1:1\"\nclient_id = \"c\"\nclient_secret = \"s\"\n[session]\nkeys = [\"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"]\n{session}\n[[route]]\npath = \"/\"\nupstream = \"http://127.0.0.1:1\"\n"
        ))
    }

    #[test]
    fn session_record_key_is_one_step_by_default_hkdf_on_request_and_nothing_else() {
        let parse = |extra: &str| Config::from_toml(&session_base(extra), Path::new("t.toml"));
        assert_eq!(parse("").unwrap().session.record_key, RecordKey::OneStep);
        assert_eq!(
            parse("record_key = \"hkdf\"\n").unwrap().session.record_key,
            RecordKey::Hkdf
        );
        assert_eq!(
            parse("record_key = \"one_step\"\n")
                .unwrap()
                .session
                .record_key,
            RecordKey::OneStep
        );
        let p = problems(&session_base("record_key = \"sha1\"\n"));
        assert!(
            p.iter()
                .any(|p| p.key.contains("record_key") && p.reason.contains("one_step")),
            "{p:?}"
        );
    }

    #[test]
    fn a_short_idle_timeout_alone_is_valid_and_the_touch_interval_follows_it() {
        let c = Config::from_toml(
            &session_base("idle_timeout = \"20s\"\n"),
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(c.session.idle_timeout, Duration::from_secs(20));
        assert_eq!(c.session.touch_interval, Duration::from_secs(10));
    }

    #[test]
    fn a_short_absolute_timeout_alone_is_valid_and_the_idle_timeout_follows_it() {
        let c = Config::from_toml(
            &session_base("absolute_timeout = \"20m\"\n"),
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(c.session.absolute_timeout, Duration::from_secs(1200));
        assert_eq!(c.session.idle_timeout, Duration::from_secs(1200));
        let c = Config::from_toml(
            &session_base("idle_timeout = \"24h\"\n"),
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(c.session.absolute_timeout, Duration::from_secs(24 * 3600));
    }

    #[test]
    fn contradictions_the_user_wrote_are_still_refused() {
        let p = problems(&session_base(
            "idle_timeout = \"2h\"\nabsolute_timeout = \"1h\"\ntouch_interval = \"3h\"\n",
        ));
        let keys: Vec<_> = p.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"session.idle_timeout"), "{keys:?}");
        assert!(keys.contains(&"session.touch_interval"), "{keys:?}");
    }

    #[test]
    fn unknown_keys_and_semantic_problems_are_listed_together() {
        let p = problems(&base(
            "bogus_top = 1\n[server.limits]\nmax_headr_bytes = 1\nidle_timeout = \"soon\"\n[[route]]\npath = \"api\"\nupstream = \"http://127.0.0.1:1\"\nauth = \"none\"\nfoo = 2\n",
        ));
        let keys: Vec<_> = p.iter().map(|p| p.key.as_str()).collect();
        for k in [
            "server.tls.bogus_top",
            "server.limits.max_headr_bytes",
            "route[0].foo",
            "server.limits.idle_timeout",
            "route[0].path",
        ] {
            assert!(keys.contains(&k), "{k} missing from {keys:?}");
        }
    }

    #[test]
    fn networks_parse_and_contain_their_addresses() {
        let n = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(n.contains("10.255.0.1".parse().unwrap()));
        assert!(n.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!n.contains("11.0.0.1".parse().unwrap()));
        let v6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(v6.contains("2001:db8:1::1".parse().unwrap()));
        assert!(!v6.contains("2001:db9::1".parse().unwrap()));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        assert!(
            Cidr::parse("192.0.2.1")
                .unwrap()
                .contains("192.0.2.1".parse().unwrap())
        );
        for bad in [
            "10.0.0.0/33",
            "10.0.0.0/",
            "x/8",
            "10.0.0.0/+8",
            "::/129",
            "",
        ] {
            assert!(Cidr::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn http_issuers_are_refused_unless_loopback() {
        assert!(is_loopback_http(
            &Url::parse("http://127.0.0.1:3000").unwrap()
        ));
        assert!(!is_loopback_http(
            &Url::parse("http://idp.example.com").unwrap()
        ));
    }

    #[test]
    fn hmac_algorithms_are_refused() {
        let p = problems(&base(
            "[oidc]\nissuer = \"http://127.0.0.1:1\"\nclient_id = \"c\"\nclient_secret = \"s\"\nallowed_algs = [\"HS256\"]\n[session]\nkeys = [\"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"]\n[[route]]\npath = \"/\"\nupstream = \"http://127.0.0.1:1\"\n",
        ));
        assert!(p.iter().any(|p| p.key == "oidc.allowed_algs[0]"), "{p:?}");
    }

    const OIDC: &str = "[oidc]\nissuer = \"http://127.0.0.1:1\"\nclient_id = \"c\"\nclient_secret = \"s\"\n[session]\nkeys = [\"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"]\n";

    #[test]
    fn client_routes_need_oidc_but_no_session_keys() {
        let p = problems(&base(
            "[[route]]\npath = \"/m/\"\nupstream = \"http://127.0.0.1:1\"\nauth = \"client\"\n",
        ));
        let keys: Vec<_> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["route[0].auth"], "{p:?}");
        assert!(p[0].reason.contains("[oidc]"), "{p:?}");
    }

    #[test]
    fn client_scopes_are_sorted_and_deduplicated() {
        let c = Config::from_toml(
            &base(&format!(
                "{OIDC}[[route]]\npath = \"/m/\"\nupstream = \"http://127.0.0.1:1\"\nauth = \"client\"\nscopes = [\"write\", \"read\", \"write\"]\naudience = \"urn:x\"\n"
            )),
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(c.routes[0].auth, AuthMode::Client);
        assert_eq!(c.routes[0].scopes, ["read", "write"]);
        assert_eq!(c.routes[0].audience.as_deref(), Some("urn:x"));
    }

    #[test]
    fn scopes_roles_and_audience_are_refused_where_they_mean_nothing() {
        let p = problems(&base(&format!(
            "{OIDC}[[route]]\npath = \"/a/\"\nupstream = \"http://127.0.0.1:1\"\nscopes = [\"x\"]\naudience = \"urn:x\"\n\
             [[route]]\npath = \"/m/\"\nupstream = \"http://127.0.0.1:1\"\nauth = \"client\"\nroles = [\"admin\"]\nscopes = [\"a b\"]\n"
        )));
        let keys: Vec<_> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "route[0].scopes",
                "route[0].audience",
                "route[1].roles",
                "route[1].scopes[0]"
            ],
            "{p:?}"
        );
    }
}
