//! Upstreams: where a route's requests go, and the connections that carry them.
//!
//! HTTP/1.1 keep-alive to every upstream through a pool of hyper connections of its own
//! (`pool`); HTTP/2 to an https upstream that offers `h2` by ALPN and upgrades (WebSocket cannot
//! ride HTTP/2 here) through hyper-util's pooled clients.
//!
//! Each serving runtime (one per core, see `app`) has its own pools: a pooled connection's task
//! runs on the runtime that opened it, so a request never waits on another core's wake-up, and
//! the pool's lock is never contended.

mod pool;

use std::cell::Cell;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http::uri::{Authority, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use url::Url;

use self::pool::Pool;
use crate::body::{UpstreamBody, Watch, Watched};
use crate::tls::{self, TlsError};

/// Idle pooled connections to an upstream are closed after this long.
pub(crate) const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Connecting (TCP) to an upstream may take at most this long; the route timeout bounds the rest.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Pool slots per upstream: serving runtime `i` uses slot `i % POOL_SLOTS` (slot 0: any other
/// thread). Only the slots in use hold a pool or a client.
const POOL_SLOTS: usize = 64;

/// A request body on its way upstream.
type SendBody = Watched<UpstreamBody, Progress>;
type HttpClient = Client<HttpsConnector<HttpConnector>, SendBody>;

thread_local! {
    /// Which serving runtime this thread runs (0: none, e.g. the main runtime or a test's).
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Marks the current thread as serving runtime `index` (1-based), so it uses its own pools.
pub(crate) fn set_worker(index: usize) {
    WORKER.with(|w| w.set(index));
}

/// hyper-util's clients of one serving runtime, for HTTP/2 and upgrades.
struct Clients {
    client: HttpClient,
    upgrade_client: HttpClient,
}

/// Why a request got no answer from its upstream: the connection could not be made, or the
/// exchange on it failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    #[error("connecting to the upstream failed")]
    Connect(#[source] std::io::Error),
    #[error("connecting to the upstream took longer than {0:?}")]
    ConnectTimeout(Duration),
    #[error("the TLS handshake with the upstream failed")]
    Tls(#[source] std::io::Error),
    #[error("the request to the upstream failed")]
    Send(#[source] hyper::Error),
    /// From hyper-util's client (HTTP/2 and upgrades).
    #[error("the request to the upstream failed")]
    Client(#[source] hyper_util::client::legacy::Error),
}

/// A boxed future of an exchange with the upstream.
type Boxed<'a, T> = Pin<Box<dyn Future<Output = Result<T, UpstreamError>> + Send + 'a>>;

/// hyper's answer to a request sent on a pooled HTTP/1.1 connection (the request comes back if
/// the connection turned out closed before it was written).
type PooledAnswer<'a> = Pin<
    Box<
        dyn Future<
                Output = Result<
                    Response<Incoming>,
                    hyper::client::conn::TrySendError<Request<SendBody>>,
                >,
            > + Send
            + 'a,
    >,
>;

/// A request handed to an upstream connection ([`Upstream::send`]): its answer, once it comes.
///
/// A named future rather than a boxed `async` block: the block kept hyper's future twice (as the
/// value it captured and as the value it awaited) beside the retry's state, 1,568 bytes copied
/// into a new allocation per request; here only hyper's own future (392 bytes) is boxed.
pub(crate) struct Sending<'a> {
    upstream: &'a Upstream,
    state: SendState<'a>,
}

enum SendState<'a> {
    /// On a pooled HTTP/1.1 connection. One that turns out closed before the request was written
    /// (the upstream closed it while idle) costs one more try on a new connection, as
    /// hyper-util's `retry_canceled_requests` does.
    Pooled(PooledAnswer<'a>),
    /// On a new connection, over HTTP/2, or an upgrade.
    Other(Boxed<'a, Response<Incoming>>),
}

impl Future for Sending<'_> {
    type Output = Result<Response<Incoming>, UpstreamError>;

    fn poll(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                SendState::Pooled(answer) => match std::task::ready!(answer.as_mut().poll(cx)) {
                    Ok(res) => return std::task::Poll::Ready(Ok(res)),
                    Err(mut e) => match e.take_message() {
                        Some(req) => this.state = SendState::Other(this.upstream.send_new(req)),
                        None => {
                            return std::task::Poll::Ready(Err(UpstreamError::Send(
                                e.into_error(),
                            )));
                        }
                    },
                },
                SendState::Other(answer) => return answer.as_mut().poll(cx),
            }
        }
    }
}

/// A new connection: HTTP/1.1, or an upstream that chose HTTP/2 by ALPN.
enum Connected {
    Http1(SendRequest<SendBody>),
    Http2,
}

/// One configured upstream.
pub(crate) struct Upstream {
    /// The upstream URL as configured, for logs.
    pub(crate) name: Arc<str>,
    scheme: Scheme,
    authority: Authority,
    /// `host:port` to connect to (the port defaulted from the scheme).
    addr: String,
    /// The name the upstream's certificate must hold (https).
    server_name: ServerName<'static>,
    /// The upstream URL's path without its trailing slash ("" for "/").
    base_path: String,
    /// `Host` value sent upstream unless the route preserves the client's.
    pub(crate) host: HeaderValue,
    tls: rustls::ClientConfig,
    /// The TLS connector of the HTTP/1.1 pool (offers `h2` and `http/1.1`); `None` for http.
    tls_connector: Option<tokio_rustls::TlsConnector>,
    /// The upstream chose HTTP/2 by ALPN: its requests go through hyper-util's client.
    speaks_h2: AtomicBool,
    pools: Box<[OnceLock<Arc<Pool<SendBody>>>]>,
    clients: Box<[OnceLock<Box<Clients>>]>,
}

impl Upstream {
    /// Builds the upstream; `ca` adds a trust anchor for an https upstream.
    pub(crate) fn new(
        url: &Url,
        ca: Option<&Path>,
        ca_key: &'static str,
    ) -> Result<Upstream, TlsError> {
        let roots = tls::root_store(ca_key, ca)?;
        let tls = tls::client_config(roots, &[])?;
        // `host_str` already brackets IPv6 literals.
        let host = url.host_str().unwrap_or_default().to_owned();
        let authority = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.clone(),
        };
        let https = url.scheme() == "https";
        let server_name = match url.host() {
            Some(url::Host::Ipv4(ip)) => ServerName::from(std::net::IpAddr::from(ip)),
            Some(url::Host::Ipv6(ip)) => ServerName::from(std::net::IpAddr::from(ip)),
            _ => ServerName::try_from(host.clone())
                .unwrap_or_else(|_| ServerName::try_from("localhost").expect("a valid DNS name")),
        };
        let tls_connector = https.then(|| {
            let mut cfg = tls.clone();
            cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            tokio_rustls::TlsConnector::from(Arc::new(cfg))
        });
        Ok(Upstream {
            name: Arc::from(url.as_str().trim_end_matches('/')),
            scheme: if https { Scheme::HTTPS } else { Scheme::HTTP },
            host: HeaderValue::from_str(&authority)
                .unwrap_or(HeaderValue::from_static("localhost")),
            authority: authority
                .parse()
                .unwrap_or_else(|_| Authority::from_static("localhost")),
            addr: format!("{host}:{}", url.port_or_known_default().unwrap_or(80)),
            server_name,
            base_path: url.path().trim_end_matches('/').to_owned(),
            tls,
            tls_connector,
            speaks_h2: AtomicBool::new(false),
            pools: (0..POOL_SLOTS).map(|_| OnceLock::new()).collect(),
            clients: (0..POOL_SLOTS).map(|_| OnceLock::new()).collect(),
        })
    }

    /// The upstream request target for a client request `client` whose (already normalized,
    /// possibly stripped) path is `path`: origin-form (the upstream's base path, `path`, the
    /// client's query), as an HTTP/1.1 connection sends it (RFC 9112 §3.2.1; the `Host` header
    /// names the upstream). [`Upstream::send`] makes it absolute where a client needs that.
    ///
    /// When that is the client's own path and query byte for byte (no base path, nothing
    /// stripped or normalized away), the client's are shared rather than copied and re-validated.
    pub(crate) fn uri(&self, client: &Uri, path: &str) -> Result<Uri, http::Error> {
        let pq = match client.path_and_query() {
            Some(pq) if self.base_path.is_empty() && client.path() == path => pq.clone(),
            _ => {
                let query = client.query();
                let mut pq = String::with_capacity(
                    self.base_path.len() + path.len() + query.map_or(0, |q| q.len() + 1),
                );
                pq.push_str(&self.base_path);
                pq.push_str(path);
                if let Some(q) = query {
                    pq.push('?');
                    pq.push_str(q);
                }
                http::uri::PathAndQuery::try_from(pq)?
            }
        };
        let mut parts = http::uri::Parts::default();
        parts.path_and_query = Some(pq);
        Ok(Uri::from_parts(parts)?)
    }

    /// Sends a request (HTTP/1.1 or, if negotiated, HTTP/2; `upgrade` forces HTTP/1.1). The
    /// [`Progress`] tells when its body last moved towards the upstream.
    ///
    /// The request is handed to the connection now; the [`Sending`] future waits for the answer.
    pub(crate) fn send(
        &self,
        req: Request<UpstreamBody>,
        upgrade: bool,
    ) -> (Sending<'_>, Progress) {
        let progress = Progress::new();
        let req = req.map(|inner| Watched::new(inner, progress.clone()));
        let state = if upgrade {
            let req = self.absolute(req);
            let response = self.clients().upgrade_client.request(req);
            SendState::Other(Box::pin(async move {
                response.await.map_err(UpstreamError::Client)
            }))
        } else if self.speaks_h2.load(Ordering::Relaxed) {
            SendState::Other(self.send_h2(req))
        } else {
            self.send_http1(req)
        };
        let sending = Sending {
            upstream: self,
            state,
        };
        (sending, progress)
    }

    /// Sends a request on a pooled HTTP/1.1 connection, or on a new one.
    fn send_http1(&self, req: Request<SendBody>) -> SendState<'_> {
        let pool = self.pool();
        let Some(mut sender) = pool.take() else {
            return SendState::Other(self.send_new(req));
        };
        // hyper hands the request to the connection's task now; the future waits for the answer.
        let response = sender.try_send_request(req);
        pool.put(sender);
        SendState::Pooled(Box::pin(response))
    }

    /// Sends a request on a new connection (boxed: a rare path, and the connect future is large).
    fn send_new(&self, req: Request<SendBody>) -> Boxed<'_, Response<Incoming>> {
        Box::pin(async move {
            let mut sender = match self.connect().await? {
                Connected::Http1(sender) => sender,
                Connected::Http2 => return self.send_h2(req).await,
            };
            let response = sender.try_send_request(req);
            self.pool().put(sender);
            let res = response.await;
            res.map_err(|e| UpstreamError::Send(e.into_error()))
        })
    }

    /// Sends a request through hyper-util's client, which speaks HTTP/2 to this upstream.
    fn send_h2(&self, req: Request<SendBody>) -> Boxed<'_, Response<Incoming>> {
        let response = self.clients().client.request(self.absolute(req));
        Box::pin(async move { response.await.map_err(UpstreamError::Client) })
    }

    /// Opens a connection: TCP (`CONNECT_TIMEOUT`, `TCP_NODELAY`), TLS for https, then HTTP/1.1
    /// unless the upstream chose `h2`.
    ///
    /// Boxed by a plain function: awaited inline, the connect future (a TLS session, several
    /// KiB) would be part of the future that awaits it.
    fn connect(&self) -> Boxed<'_, Connected> {
        Box::pin(self.connect_unboxed())
    }

    async fn connect_unboxed(&self) -> Result<Connected, UpstreamError> {
        let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&*self.addr)).await
        {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err(UpstreamError::Connect(e)),
            Err(_) => return Err(UpstreamError::ConnectTimeout(CONNECT_TIMEOUT)),
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(upstream = %self.name, error = %e, "TCP_NODELAY not set");
        }
        let Some(connector) = &self.tls_connector else {
            return handshake(tcp).await;
        };
        let tls = connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(UpstreamError::Tls)?;
        if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
            // This connection is dropped; hyper-util's client opens (and pools) its own.
            self.speaks_h2.store(true, Ordering::Relaxed);
            return Ok(Connected::Http2);
        }
        handshake(tls).await
    }

    /// `req` with an absolute URI (this upstream's scheme and authority), as hyper-util's client
    /// needs it (HTTP/2, and the upgrade client).
    fn absolute<B>(&self, mut req: Request<B>) -> Request<B> {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = req.uri().path_and_query().cloned();
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
        req
    }

    /// This thread's HTTP/1.1 pool, made on first use.
    fn pool(&self) -> &Arc<Pool<SendBody>> {
        let slot = WORKER.with(Cell::get) % POOL_SLOTS;
        self.pools[slot].get_or_init(|| Pool::new(POOL_IDLE_TIMEOUT))
    }

    /// This thread's hyper-util clients, made on first use.
    fn clients(&self) -> &Clients {
        let slot = WORKER.with(Cell::get) % POOL_SLOTS;
        self.clients[slot].get_or_init(|| {
            Box::new(Clients {
                client: build_client(self.tls.clone(), true),
                upgrade_client: build_client(self.tls.clone(), false),
            })
        })
    }
}

/// Starts HTTP/1.1 on a new connection; its task runs on this runtime until the connection ends.
async fn handshake<T>(io: T) -> Result<Connected, UpstreamError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(UpstreamError::Send)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream connection ended");
        }
    });
    Ok(Connected::Http1(sender))
}

/// When a request body last made progress towards the upstream (a chunk sent, or its end); the
/// time the request was handed over until then. Lets a response deadline start once the upload is
/// done instead of counting a long upload against the upstream.
#[derive(Clone)]
pub(crate) struct Progress {
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
    pub(crate) fn last(&self) -> Instant {
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

    fn upstream(url: &str) -> Upstream {
        tls::install_provider();
        Upstream::new(&Url::parse(url).unwrap(), None, "route[0].ca").unwrap()
    }

    #[test]
    fn upstream_uris_join_the_base_path_and_keep_the_query() {
        let u = upstream("http://127.0.0.1:9000/v1/");
        let client: Uri = "/users?a=1".parse().unwrap();
        let target = u.uri(&client, "/users").unwrap();
        assert_eq!(target.to_string(), "/v1/users?a=1", "origin-form");
        let absolute = u.absolute(Request::new(()));
        assert_eq!(absolute.uri().to_string(), "http://127.0.0.1:9000/");
        let mut req = Request::new(());
        *req.uri_mut() = target;
        assert_eq!(
            u.absolute(req).uri().to_string(),
            "http://127.0.0.1:9000/v1/users?a=1"
        );
        let u = upstream("https://[::1]:9443");
        let mut req = Request::new(());
        *req.uri_mut() = u.uri(&"/".parse().unwrap(), "/").unwrap();
        assert_eq!(u.absolute(req).uri().to_string(), "https://[::1]:9443/");
        assert_eq!(u.host, "[::1]:9443");
    }

    #[test]
    fn without_a_base_path_the_clients_own_path_and_query_are_kept_or_rebuilt() {
        let u = upstream("http://127.0.0.1:9000");
        // The same path: the client's target, query included, from any request form.
        for (client, want) in [
            ("/api/users?a=1&b=%2F", "/api/users?a=1&b=%2F"),
            ("/api/users", "/api/users"),
            ("/api/users?", "/api/users?"),
            ("https://localhost:8443/api/x?q", "/api/x?q"),
        ] {
            let client: Uri = client.parse().unwrap();
            let target = u.uri(&client, client.path()).unwrap();
            assert_eq!(target.to_string(), want);
            assert!(target.scheme().is_none() && target.authority().is_none());
        }
        // A different path (stripped, normalized): rebuilt from it, the query kept.
        let client: Uri = "/api/./users?a=1".parse().unwrap();
        assert_eq!(u.uri(&client, "/users").unwrap().to_string(), "/users?a=1");
        assert_eq!(
            u.uri(&"/api/".parse().unwrap(), "/").unwrap().to_string(),
            "/"
        );
    }
}
