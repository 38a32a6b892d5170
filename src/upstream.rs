//! Upstreams: where a route's requests go, and the pooled hyper-util clients that carry them.
//!
//! HTTP/1.1 keep-alive to every upstream; HTTP/2 to an https upstream that offers `h2` by ALPN;
//! a separate HTTP/1.1-only client for upgrades (WebSocket cannot ride HTTP/2 here).
//!
//! Each serving runtime (one per core, see `app`) has its own pools: a pooled connection's task
//! runs on the runtime that opened it, so a request never waits on another core's wake-up.

use std::cell::Cell;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http::uri::{Authority, Scheme};
use http::{HeaderValue, Request, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use url::Url;

use crate::body::{UpstreamBody, Watch, Watched};
use crate::tls::{self, TlsError};

/// Idle pooled connections to an upstream are closed after this long.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Connecting (TCP) to an upstream may take at most this long; the route timeout bounds the rest.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Pool slots per upstream: serving runtime `i` uses slot `i % POOL_SLOTS` (slot 0: any other
/// thread). Only the slots in use hold a client.
const POOL_SLOTS: usize = 64;

type HttpClient = Client<HttpsConnector<HttpConnector>, Watched<UpstreamBody, Progress>>;

thread_local! {
    /// Which serving runtime this thread runs (0: none, e.g. the main runtime or a test's).
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Marks the current thread as serving runtime `index` (1-based), so it uses its own pools.
pub(crate) fn set_worker(index: usize) {
    WORKER.with(|w| w.set(index));
}

/// The clients of one serving runtime.
struct Pools {
    client: HttpClient,
    upgrade_client: HttpClient,
}

/// One configured upstream.
pub struct Upstream {
    /// The upstream URL as configured, for logs.
    pub name: Arc<str>,
    scheme: Scheme,
    authority: Authority,
    /// The upstream URL's path without its trailing slash ("" for "/").
    base_path: String,
    /// `Host` value sent upstream unless the route preserves the client's.
    pub host: HeaderValue,
    tls: rustls::ClientConfig,
    pools: Box<[OnceLock<Box<Pools>>]>,
}

impl Upstream {
    /// Builds the upstream and its clients; `ca` adds a trust anchor for an https upstream.
    pub fn new(url: &Url, ca: Option<&Path>, ca_key: &'static str) -> Result<Upstream, TlsError> {
        let roots = tls::root_store(ca_key, ca)?;
        let tls = tls::client_config(roots, &[])?;
        // `host_str` already brackets IPv6 literals.
        let host = url.host_str().unwrap_or_default().to_owned();
        let authority = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host,
        };
        Ok(Upstream {
            name: Arc::from(url.as_str().trim_end_matches('/')),
            scheme: if url.scheme() == "https" {
                Scheme::HTTPS
            } else {
                Scheme::HTTP
            },
            host: HeaderValue::from_str(&authority)
                .unwrap_or(HeaderValue::from_static("localhost")),
            authority: authority
                .parse()
                .unwrap_or_else(|_| Authority::from_static("localhost")),
            base_path: url.path().trim_end_matches('/').to_owned(),
            tls,
            pools: (0..POOL_SLOTS).map(|_| OnceLock::new()).collect(),
        })
    }

    /// The upstream URI for a request whose (already normalized, possibly stripped) path is `path`.
    pub fn uri(&self, path: &str, query: Option<&str>) -> Result<Uri, http::Error> {
        let mut pq = String::with_capacity(
            self.base_path.len() + path.len() + query.map_or(0, |q| q.len() + 1),
        );
        pq.push_str(&self.base_path);
        pq.push_str(path);
        if let Some(q) = query {
            pq.push('?');
            pq.push_str(q);
        }
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
    }

    /// Sends a request (HTTP/1.1 or, if negotiated, HTTP/2; `upgrade` forces HTTP/1.1). The
    /// [`Progress`] tells when its body last moved towards the upstream.
    pub fn send(&self, req: Request<UpstreamBody>, upgrade: bool) -> (ResponseFuture, Progress) {
        let progress = Progress::new();
        let req = req.map(|inner| Watched::new(inner, progress.clone()));
        let pools = self.pools();
        let response = if upgrade {
            pools.upgrade_client.request(req)
        } else {
            pools.client.request(req)
        };
        (response, progress)
    }

    /// This thread's clients, made on first use.
    fn pools(&self) -> &Pools {
        let slot = WORKER.with(Cell::get) % POOL_SLOTS;
        self.pools[slot].get_or_init(|| {
            Box::new(Pools {
                client: build_client(self.tls.clone(), true),
                upgrade_client: build_client(self.tls.clone(), false),
            })
        })
    }
}

/// When a request body last made progress towards the upstream (a chunk sent, or its end); the
/// time the request was handed over until then. Lets a response deadline start once the upload is
/// done instead of counting a long upload against the upstream.
#[derive(Clone)]
pub struct Progress {
    epoch: Instant,
    /// Milliseconds after `epoch`.
    last_ms: Arc<AtomicU64>,
}

impl Progress {
    fn new() -> Self {
        Progress {
            epoch: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// The last time the request body moved.
    pub fn last(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// A request body on its way upstream notes its [`Progress`] whenever a chunk (or its end) moves.
impl Watch for Progress {
    fn ready(&mut self, _data: usize, _end: bool) {
        self.touch();
    }
}

fn build_client(tls: rustls::ClientConfig, h2: bool) -> HttpClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1();
    let connector = if h2 {
        builder.enable_http2().wrap_connector(http)
    } else {
        builder.wrap_connector(http)
    };
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_uris_join_the_base_path_and_keep_the_query() {
        tls::install_provider();
        let u = Upstream::new(
            &Url::parse("http://127.0.0.1:9000/v1/").unwrap(),
            None,
            "route[0].ca",
        )
        .unwrap();
        assert_eq!(
            u.uri("/users", Some("a=1")).unwrap().to_string(),
            "http://127.0.0.1:9000/v1/users?a=1"
        );
        let u = Upstream::new(
            &Url::parse("https://[::1]:9443").unwrap(),
            None,
            "route[0].ca",
        )
        .unwrap();
        assert_eq!(u.uri("/", None).unwrap().to_string(), "https://[::1]:9443/");
        assert_eq!(u.host, "[::1]:9443");
    }
}
