//! Logging: the `tracing` subscriber (text or JSON, level from config or `RUST_LOG`) and the access
//! log, one line per request, written when the response body has been sent (so the duration and byte
//! count include streaming).
//!
//! The access line holds the path without its query string, and never a header value: cookies,
//! `Authorization` and query strings (which carry authorization codes) do not reach the log.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use http::{HeaderValue, Method};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::body::{Watch, Watched};
use crate::config::LogFormat;

/// The level filter of the installed subscriber, for `[log] level` on reload; `None` when `RUST_LOG`
/// chose the filter (it wins over the file) or another subscriber was installed first (tests).
static LEVEL: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Installs the global subscriber. `RUST_LOG`, when set, wins over `level`.
pub(crate) fn init(level: &str, format: LogFormat) {
    use std::io::IsTerminal;
    let from_env = EnvFilter::try_from_default_env().ok();
    let env_wins = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| EnvFilter::new(level));
    let (filter, handle) = reload::Layer::new(filter);
    // Colour only for a person at a terminal; log files and collectors get plain text.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match format {
        LogFormat::Json => registry.with(fmt.json().flatten_event(true)).try_init(),
        LogFormat::Text => registry.with(fmt).try_init(),
    };
    if installed.is_ok() && !env_wins {
        let _ = LEVEL.set(handle);
    }
}

/// What became of a new `[log] level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LevelChange {
    Applied,
    /// `RUST_LOG` is set (or the subscriber is not coatcheck's): the level stays.
    Overridden,
}

/// Applies a new `[log] level` (a filter directive, already validated) to the running subscriber.
pub(crate) fn set_level(level: &str) -> Result<LevelChange, String> {
    let Some(handle) = LEVEL.get() else {
        return Ok(LevelChange::Overridden);
    };
    let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
    handle.reload(filter).map_err(|e| e.to_string())?;
    Ok(LevelChange::Applied)
}

/// What the access log line says about one request; filled in as the request travels.
#[derive(Debug)]
pub(crate) struct AccessRecord {
    pub(crate) start: Instant,
    pub(crate) method: Method,
    /// Path only, never the query string.
    pub(crate) path: String,
    pub(crate) status: u16,
    pub(crate) route: Option<Arc<str>>,
    /// The route's index among the metrics' `route` labels ([`crate::metrics::Metrics::route_index`]).
    pub(crate) route_metric: usize,
    pub(crate) upstream: Option<Arc<str>>,
    pub(crate) request_id: HeaderValue,
    pub(crate) client: IpAddr,
    /// Short reason for an error answer (the error code), if any.
    pub(crate) error: Option<&'static str>,
    /// The request's server span (a no-op without export): it ends with this line.
    pub(crate) span: crate::trace::ServerSpan,
}

impl AccessRecord {
    fn emit(&mut self, bytes: u64) {
        self.span.finish(self.status, self.error);
        tracing::info!(
            target: "coatcheck::access",
            method = %self.method,
            path = %self.path,
            status = self.status,
            duration_ms = self.start.elapsed().as_secs_f64() * 1000.0,
            route = self.route.as_deref().unwrap_or("-"),
            upstream = self.upstream.as_deref().unwrap_or("-"),
            bytes,
            request_id = self.request_id.to_str().unwrap_or("-"),
            client = %self.client,
            error = self.error.unwrap_or("-"),
            "request"
        );
    }
}

/// Watches a response body: counts the bytes sent and writes the access log line when the body
/// ends or is dropped (e.g. because the client went away), so duration and bytes include streaming.
pub(crate) struct AccessLog {
    record: Option<Box<AccessRecord>>,
    bytes: u64,
}

impl AccessLog {
    pub(crate) fn new(record: Box<AccessRecord>) -> Self {
        AccessLog {
            record: Some(record),
            bytes: 0,
        }
    }
}

impl Watch for AccessLog {
    fn ready(&mut self, data: usize, end: bool) {
        self.bytes += data as u64;
        if end && let Some(mut r) = self.record.take() {
            r.emit(self.bytes);
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        // Bodies hyper never polls to their end (empty ones, or a client that went away).
        if let Some(mut r) = self.record.take() {
            r.emit(self.bytes);
        }
    }
}

/// A response body with its access log line.
pub(crate) type Logged<B> = Watched<B, AccessLog>;
