//! The shape of `config.toml` exactly as written by operators (serde, unknown keys rejected).
//! Nothing here is validated beyond types: [`crate::config`] turns it into the program's truth.
//! A key that names one of a few values is an enum here, spelled by its serde names, so the values
//! a key accepts are written in one place.

use serde::de::{DeserializeOwned, IntoDeserializer as _};
use serde::{Deserialize, Deserializer};

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConfigFile {
    pub(crate) server: ServerFile,
    #[serde(default)]
    pub(crate) log: LogFile,
    #[serde(default)]
    pub(crate) session: SessionFile,
    pub(crate) oidc: Option<OidcFile>,
    pub(crate) capture: Option<CaptureFile>,
    #[serde(default)]
    pub(crate) csrf: CsrfFile,
    #[serde(default, rename = "route")]
    pub(crate) routes: Vec<RouteFile>,
    pub(crate) admin: Option<AdminFile>,
    #[serde(default)]
    pub(crate) telemetry: TelemetryFile,
}

/// `[telemetry]`: OTLP span export (W3C trace-context propagation is always on).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TelemetryFile {
    pub(crate) otlp_endpoint: Option<String>,
    pub(crate) service_name: Option<String>,
    pub(crate) sample_ratio: Option<f64>,
    pub(crate) timeout: Option<String>,
}

/// `[admin]`: the operator listener (metrics, health, session admin API).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AdminFile {
    pub(crate) listen: String,
    /// A secret (inline, `env:NAME`, `file:PATH`); enables the session admin API.
    pub(crate) token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServerFile {
    pub(crate) listen: String,
    pub(crate) public_origin: String,
    pub(crate) http_redirect_listen: Option<String>,
    /// Networks (CIDR or single addresses) whose `X-Forwarded-For`/`Forwarded` chain is kept.
    pub(crate) trusted_proxies: Option<Vec<String>>,
    /// What to do with request header names containing `_`.
    pub(crate) underscore_headers: Option<UnderscoreHeaders>,
    /// `Strict-Transport-Security` value, or "off".
    pub(crate) hsts: Option<String>,
    pub(crate) tls: TlsFile,
    #[serde(default)]
    pub(crate) limits: LimitsFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TlsFile {
    pub(crate) cert: String,
    pub(crate) key: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LimitsFile {
    pub(crate) max_header_bytes: Option<i64>,
    pub(crate) header_read_timeout: Option<String>,
    pub(crate) idle_timeout: Option<String>,
    pub(crate) max_connections: Option<i64>,
    pub(crate) shutdown_grace: Option<String>,
    pub(crate) body_idle_timeout: Option<String>,
    pub(crate) max_connections_per_ip: Option<i64>,
    pub(crate) login_requests_per_minute: Option<i64>,
}

/// `server.underscore_headers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum UnderscoreHeaders {
    /// Remove the header and forward the request (default).
    Drop,
    /// Refuse the request with 400.
    Refuse,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogFile {
    pub(crate) level: Option<String>,
    pub(crate) format: Option<Choice<LogFormat>>,
}

/// `log.format`: how log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum LogFormat {
    /// Human-readable lines (default).
    Text,
    /// One JSON object per line.
    Json,
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
pub(crate) struct SessionFile {
    pub(crate) cookie_name: Option<String>,
    pub(crate) same_site: Option<Choice<SameSite>>,
    pub(crate) idle_timeout: Option<String>,
    pub(crate) absolute_timeout: Option<String>,
    pub(crate) persistent: Option<bool>,
    pub(crate) touch_interval: Option<String>,
    pub(crate) record_key: Option<RecordKey>,
    #[serde(default)]
    pub(crate) keys: Vec<String>,
    #[serde(default)]
    pub(crate) store: StoreFile,
    #[serde(default)]
    pub(crate) cache: CacheFile,
}

/// `session.same_site`: the `SameSite` attribute of the session cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SameSite {
    /// `SameSite=Strict` (default).
    Strict,
    /// `SameSite=Lax`.
    Lax,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StoreFile {
    pub(crate) kind: Option<Choice<StoreKindName>>,
    pub(crate) path: Option<String>,
    pub(crate) url: Option<String>,
    pub(crate) key_prefix: Option<String>,
    pub(crate) ca: Option<String>,
    pub(crate) sentinels: Option<Vec<String>>,
    pub(crate) sentinel_master: Option<String>,
    pub(crate) timeout: Option<String>,
}

/// `session.store.kind`, by name; [`crate::config::StoreKind`] carries each kind's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum StoreKindName {
    /// In-process, lost at exit: for tests and throwaway use.
    Memory,
    /// A persistent file (redb) (default).
    Embedded,
    /// A Redis shared by any number of instances.
    Redis,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CacheFile {
    pub(crate) capacity: Option<i64>,
    pub(crate) ttl: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OidcFile {
    pub(crate) issuer: String,
    pub(crate) client_id: String,
    pub(crate) client_secret: String,
    pub(crate) scopes: Option<Vec<String>>,
    pub(crate) allowed_algs: Option<Vec<String>>,
    pub(crate) clock_skew: Option<String>,
    pub(crate) refresh_before_expiry: Option<String>,
    pub(crate) post_logout_redirect: Option<String>,
    pub(crate) ca: Option<String>,
    pub(crate) token_endpoint_auth_method: Option<Choice<ClientAuth>>,
    pub(crate) timeout: Option<String>,
    pub(crate) refresh_wait: Option<String>,
    pub(crate) rotation_grace: Option<String>,
    pub(crate) metadata_refresh: Option<String>,
}

/// `oidc.token_endpoint_auth_method`: how the client authenticates at the token and revocation
/// endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub(crate) enum ClientAuth {
    /// HTTP Basic, id and secret form-encoded first (RFC 6749 §2.3.1) (default).
    #[serde(rename = "client_secret_basic")]
    Basic,
    /// `client_id` and `client_secret` in the form body.
    #[serde(rename = "client_secret_post")]
    Post,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CaptureFile {
    pub(crate) login_path: String,
    pub(crate) refresh_path: String,
    pub(crate) logout_path: Option<String>,
    pub(crate) access_token: Option<String>,
    pub(crate) refresh_token: Option<String>,
    pub(crate) expires_in: Option<String>,
    pub(crate) refresh_before_expiry: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CsrfFile {
    pub(crate) header: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RouteFile {
    pub(crate) path: String,
    pub(crate) upstream: String,
    pub(crate) auth: Option<Choice<AuthMode>>,
    pub(crate) strip_prefix: Option<bool>,
    pub(crate) roles: Option<Vec<String>>,
    pub(crate) timeout: Option<String>,
    pub(crate) max_body_bytes: Option<i64>,
    pub(crate) retry_body_bytes: Option<i64>,
    pub(crate) methods: Option<Vec<String>>,
    pub(crate) preserve_host: Option<bool>,
    pub(crate) ca: Option<String>,
    pub(crate) login_redirect: Option<bool>,
    pub(crate) csrf: Option<Choice<CsrfMode>>,
    pub(crate) audience: Option<String>,
    /// `auth = "client"`: scopes of the client-credentials grant.
    pub(crate) scopes: Option<Vec<String>>,
    pub(crate) allow_encoded_slashes: Option<bool>,
}

/// `route[N].auth`: who a route's requests are forwarded for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum AuthMode {
    /// A session is needed; its access token is forwarded (default).
    Required,
    /// A session's access token is forwarded when there is one.
    Optional,
    /// Public: forwarded as sent, never with a token from coatcheck.
    None,
    /// The client's own bearer JWT, validated and forwarded unchanged.
    Bearer,
    /// No user: coatcheck's own client-credentials token from `[oidc]` (RFC 6749 §4.4).
    Client,
}

/// `route[N].csrf`: which requests must carry the CSRF header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum CsrfMode {
    /// Every request needs the CSRF header (default).
    All,
    /// `GET`, `HEAD` and `OPTIONS` are exempt from the header (the `Origin` and `Sec-Fetch-Site`
    /// checks still apply): for routes browsers navigate to.
    UnsafeMethods,
    /// No CSRF check at all, WebSocket `Origin` check included.
    Off,
}

/// The value of a key that names one of `T`'s values (`T` a fieldless serde enum). A string `T`
/// does not know is kept, not refused while parsing, so validation reports it beside every other
/// problem, with the values `T` accepts. Anything but a string is a parse error, as for any string
/// key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Choice<T> {
    /// One of `T`'s values.
    Known(T),
    /// Not one of them.
    Unknown {
        /// As written.
        value: String,
        /// `T`'s serde names, in declaration order.
        expected: &'static [&'static str],
    },
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Choice<T> {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        let value = String::deserialize(de)?;
        match T::deserialize(value.as_str().into_deserializer()) {
            Ok(known) => Ok(Choice::Known(known)),
            Err(NotAValue::Unknown(expected)) => Ok(Choice::Unknown { value, expected }),
            Err(NotAValue::Other(message)) => Err(serde::de::Error::custom(message)),
        }
    }
}

/// Why a string is not one of an enum's values, as serde reports it.
#[derive(Debug)]
enum NotAValue {
    /// Not one of these names.
    Unknown(&'static [&'static str]),
    /// Anything else: `T` is not a fieldless enum.
    Other(String),
}

impl serde::de::Error for NotAValue {
    fn custom<M: std::fmt::Display>(message: M) -> Self {
        NotAValue::Other(message.to_string())
    }

    fn unknown_variant(_variant: &str, expected: &'static [&'static str]) -> Self {
        NotAValue::Unknown(expected)
    }
}

impl std::fmt::Display for NotAValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotAValue::Unknown(expected) => write!(f, "not one of {expected:?}"),
            NotAValue::Other(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for NotAValue {}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// `value` (TOML) as the value of a key whose type is `Choice<T>`.
    fn parse<T: DeserializeOwned>(value: &str) -> Result<Choice<T>, String> {
        toml::from_str::<BTreeMap<String, Choice<T>>>(&format!("k = {value}"))
            .map(|mut m| m.remove("k").expect("the key just parsed"))
            .map_err(|e| e.message().to_owned())
    }

    fn known<T: DeserializeOwned + std::fmt::Debug>(value: &str) -> T {
        match parse::<T>(&format!("{value:?}")) {
            Ok(Choice::Known(v)) => v,
            other => panic!("{value:?} is not known: {other:?}"),
        }
    }

    fn expected<T: DeserializeOwned + std::fmt::Debug>() -> &'static [&'static str] {
        match parse::<T>("\"no such value\"") {
            Ok(Choice::Unknown { expected, .. }) => expected,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn each_spelled_value_parses_to_its_variant() {
        assert_eq!(known::<LogFormat>("text"), LogFormat::Text);
        assert_eq!(known::<LogFormat>("json"), LogFormat::Json);
        assert_eq!(known::<SameSite>("strict"), SameSite::Strict);
        assert_eq!(known::<SameSite>("lax"), SameSite::Lax);
        assert_eq!(known::<StoreKindName>("memory"), StoreKindName::Memory);
        assert_eq!(known::<StoreKindName>("embedded"), StoreKindName::Embedded);
        assert_eq!(known::<StoreKindName>("redis"), StoreKindName::Redis);
        assert_eq!(
            known::<ClientAuth>("client_secret_basic"),
            ClientAuth::Basic
        );
        assert_eq!(known::<ClientAuth>("client_secret_post"), ClientAuth::Post);
        assert_eq!(known::<AuthMode>("required"), AuthMode::Required);
        assert_eq!(known::<AuthMode>("optional"), AuthMode::Optional);
        assert_eq!(known::<AuthMode>("none"), AuthMode::None);
        assert_eq!(known::<AuthMode>("bearer"), AuthMode::Bearer);
        assert_eq!(known::<AuthMode>("client"), AuthMode::Client);
        assert_eq!(known::<CsrfMode>("all"), CsrfMode::All);
        assert_eq!(known::<CsrfMode>("unsafe-methods"), CsrfMode::UnsafeMethods);
        assert_eq!(known::<CsrfMode>("off"), CsrfMode::Off);
    }

    #[test]
    fn an_unknown_value_is_kept_with_the_values_the_enum_accepts_in_order() {
        assert_eq!(
            parse::<CsrfMode>("\"unsafe_methods\""),
            Ok(Choice::Unknown {
                value: "unsafe_methods".to_owned(),
                expected: &["all", "unsafe-methods", "off"],
            })
        );
        assert_eq!(expected::<LogFormat>(), ["text", "json"]);
        assert_eq!(expected::<SameSite>(), ["strict", "lax"]);
        assert_eq!(expected::<StoreKindName>(), ["memory", "embedded", "redis"]);
        assert_eq!(
            expected::<ClientAuth>(),
            ["client_secret_basic", "client_secret_post"]
        );
        assert_eq!(
            expected::<AuthMode>(),
            ["required", "optional", "none", "bearer", "client"]
        );
    }

    #[test]
    fn values_are_matched_exactly() {
        for written in ["Lax", " lax", "LAX", ""] {
            assert!(
                matches!(
                    parse::<SameSite>(&format!("{written:?}")),
                    Ok(Choice::Unknown { .. })
                ),
                "{written:?}"
            );
        }
    }

    #[test]
    fn a_value_that_is_not_a_string_is_a_parse_error() {
        assert_eq!(
            parse::<SameSite>("1"),
            Err("invalid type: integer `1`, expected a string".to_owned())
        );
        assert_eq!(
            parse::<AuthMode>("true"),
            Err("invalid type: boolean `true`, expected a string".to_owned())
        );
        assert_eq!(
            parse::<CsrfMode>("[\"all\"]"),
            Err("invalid type: sequence, expected a string".to_owned())
        );
    }
}
