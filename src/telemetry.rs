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
    pub(crate) path: LogPath,
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

/// The path of an access log line, cut to [`LOG_PATH_BYTES`] at a character boundary. Held in the
/// record itself when it is short (nearly every path is), so a request's log line costs no
/// allocation of its own; the record is boxed, so its size is moved only once.
pub(crate) enum LogPath {
    Inline {
        len: u8,
        bytes: [u8; LOG_PATH_INLINE],
    },
    Heap(Box<str>),
    /// Where no request path exists (a head refused before it was parsed).
    Note(&'static str),
}

/// Longest path an access log line shows.
const LOG_PATH_BYTES: usize = 512;
/// Longest path kept in the record itself.
const LOG_PATH_INLINE: usize = 96;

impl LogPath {
    pub(crate) fn new(path: &str) -> LogPath {
        let path = truncate(path, LOG_PATH_BYTES);
        if path.len() > LOG_PATH_INLINE {
            return LogPath::Heap(path.into());
        }
        let mut bytes = [0u8; LOG_PATH_INLINE];
        bytes[..path.len()].copy_from_slice(path.as_bytes());
        LogPath::Inline {
            len: path.len() as u8,
            bytes,
        }
    }

    fn as_str(&self) -> &str {
        match self {
            // The bytes were a `str` cut at a character boundary: always valid.
            LogPath::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..usize::from(*len)]).unwrap_or("-")
            }
            LogPath::Heap(path) => path,
            LogPath::Note(note) => note,
        }
    }
}

impl std::fmt::Debug for LogPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for LogPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `s` cut to at most `max` bytes, at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_path_is_kept_whole_up_to_its_limit_and_cut_at_a_character_boundary() {
        for len in [0, 1, 95, 96, 97, 511, 512] {
            let path = "a".repeat(len);
            assert_eq!(LogPath::new(&path).to_string(), path, "{len}");
        }
        assert!(matches!(
            LogPath::new(&"a".repeat(96)),
            LogPath::Inline { .. }
        ));
        assert!(matches!(LogPath::new(&"a".repeat(97)), LogPath::Heap(_)));
        assert_eq!(LogPath::new(&"a".repeat(600)).to_string().len(), 512);
        // "é" is two bytes: a cut inside it moves back to the boundary.
        let path = format!("{}é", "a".repeat(511));
        assert_eq!(LogPath::new(&path).to_string(), "a".repeat(511));
        let path = format!("/{}", "é".repeat(60));
        assert_eq!(LogPath::new(&path).to_string(), path);
        assert_eq!(LogPath::Note("(note)").to_string(), "(note)");
    }
}
