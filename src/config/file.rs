//! The shape of `config.toml` exactly as written by operators (serde, unknown keys rejected).
//! Nothing here is validated beyond types: [`crate::config`] turns it into the program's truth.

use serde::Deserialize;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub server: ServerFile,
    #[serde(default)]
    pub log: LogFile,
    #[serde(default)]
    pub session: SessionFile,
    pub oidc: Option<OidcFile>,
    pub capture: Option<CaptureFile>,
    #[serde(default)]
    pub csrf: CsrfFile,
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteFile>,
    pub admin: Option<AdminFile>,
    #[serde(default)]
    pub telemetry: TelemetryFile,
}

/// `[telemetry]`: OTLP span export (W3C trace-context propagation is always on).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryFile {
    pub otlp_endpoint: Option<String>,
    pub service_name: Option<String>,
    pub sample_ratio: Option<f64>,
    pub timeout: Option<String>,
}

/// `[admin]`: the operator listener (metrics, health, session admin API).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    pub listen: String,
    /// A secret (inline, `env:NAME`, `file:PATH`); enables the session admin API.
    pub token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    pub listen: String,
    pub public_origin: String,
    pub http_redirect_listen: Option<String>,
    /// Networks (CIDR or single addresses) whose `X-Forwarded-For`/`Forwarded` chain is kept.
    pub trusted_proxies: Option<Vec<String>>,
    /// What to do with request header names containing `_`.
    pub underscore_headers: Option<UnderscoreHeaders>,
    /// `Strict-Transport-Security` value, or "off".
    pub hsts: Option<String>,
    pub tls: TlsFile,
    #[serde(default)]
    pub limits: LimitsFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    pub max_header_bytes: Option<i64>,
    pub header_read_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub max_connections: Option<i64>,
    pub shutdown_grace: Option<String>,
    pub body_idle_timeout: Option<String>,
    pub max_connections_per_ip: Option<i64>,
    pub login_requests_per_minute: Option<i64>,
}

/// `server.underscore_headers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnderscoreHeaders {
    /// Remove the header and forward the request (default).
    Drop,
    /// Refuse the request with 400.
    Refuse,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogFile {
    pub level: Option<String>,
    pub format: Option<String>,
}

/// `session.record_key`: how the key of a record the process writes is derived from its ticket
/// (records written either way are read).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKey {
    /// NIST SP 800-56C rev. 2 one-step derivation with SHA-256 (default).
    #[default]
    OneStep,
    /// HKDF-SHA256, as versions before `one_step`: for a rolling upgrade, while older instances
    /// still read the same store.
    Hkdf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionFile {
    pub cookie_name: Option<String>,
    pub same_site: Option<String>,
    pub idle_timeout: Option<String>,
    pub absolute_timeout: Option<String>,
    pub persistent: Option<bool>,
    pub touch_interval: Option<String>,
    pub record_key: Option<RecordKey>,
    #[serde(default)]
    pub keys: Vec<String>,
    #[serde(default)]
    pub store: StoreFile,
    #[serde(default)]
    pub cache: CacheFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreFile {
    pub kind: Option<String>,
    pub path: Option<String>,
    pub url: Option<String>,
    pub key_prefix: Option<String>,
    pub ca: Option<String>,
    pub sentinels: Option<Vec<String>>,
    pub sentinel_master: Option<String>,
    pub timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheFile {
    pub capacity: Option<i64>,
    pub ttl: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcFile {
    pub issuer: String,
    pub client_id: String,
    pub client_secret: String,
    pub scopes: Option<Vec<String>>,
    pub allowed_algs: Option<Vec<String>>,
    pub clock_skew: Option<String>,
    pub refresh_before_expiry: Option<String>,
    pub post_logout_redirect: Option<String>,
    pub ca: Option<String>,
    pub token_endpoint_auth_method: Option<String>,
    pub timeout: Option<String>,
    pub refresh_wait: Option<String>,
    pub rotation_grace: Option<String>,
    pub metadata_refresh: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureFile {
    pub login_path: String,
    pub refresh_path: String,
    pub logout_path: Option<String>,
    pub access_token: Option<String>,
    pub refresh_token: Option<String>,
    pub expires_in: Option<String>,
    pub refresh_before_expiry: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsrfFile {
    pub header: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    pub path: String,
    pub upstream: String,
    pub auth: Option<String>,
    pub strip_prefix: Option<bool>,
    pub roles: Option<Vec<String>>,
    pub timeout: Option<String>,
    pub max_body_bytes: Option<i64>,
    pub retry_body_bytes: Option<i64>,
    pub methods: Option<Vec<String>>,
    pub preserve_host: Option<bool>,
    pub ca: Option<String>,
    pub login_redirect: Option<bool>,
    pub csrf: Option<String>,
    pub audience: Option<String>,
    /// `auth = "client"`: scopes of the client-credentials grant.
    pub scopes: Option<Vec<String>>,
    pub allow_encoded_slashes: Option<bool>,
}
