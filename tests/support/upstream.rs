//! A real upstream for the proxy tests: hyper 1.x on `127.0.0.1:0`, plain HTTP or TLS (ALPN `h2`,
//! `http/1.1`) with the test certificates.
//!
//! Endpoints are found by the first path segment that names one, wherever it sits, so a route
//! prefix in front does not matter (`/api/slow?ms=10` and `/slow?ms=10` both sleep). Anything else
//! is echoed.
//!
//! | endpoint | answer |
//! |---|---|
//! | *(any other path)* | `200` JSON: `method`, `uri` (path + query as received), `version`, `headers`, `body_bytes` |
//! | `/status/{n}` | status `n`, JSON |
//! | `/slow?ms=N` | sleeps `N` ms, then `200`; a request dropped before that counts in [`State::cancelled`] |
//! | `/download?bytes=N` | `N` bytes streamed in 64 KiB chunks (`&chunked=1`: no `Content-Length`) |
//! | `/upload` | counts the request body without keeping it: `{"bytes": n}` |
//! | `/sse?events=N&every_ms=M` | `text/event-stream`, one event every `M` ms (default 5 × 200 ms) |
//! | `/ws` | HTTP/1.1 `Upgrade: websocket` → `101`, then echoes raw bytes |
//! | `/redirect` | `302` to `/elsewhere` |
//! | `/hop` | a response carrying hop-by-hop headers (and `Connection`-listed ones) |
//! | `/set-cookie?c=NAME%3DVALUE&c=…` | `200` with one `Set-Cookie` per `c` (percent-decoded) |

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

type ResBody = UnsyncBoxBody<Bytes, std::io::Error>;

/// What one request looked like when it arrived.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    /// Path and query exactly as received.
    pub uri: String,
    pub version: String,
    /// Header names (lowercase) and values in arrival order.
    pub headers: Vec<(String, String)>,
}

impl Seen {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The path (without the query).
    pub fn path(&self) -> &str {
        self.uri.split('?').next().unwrap_or_default()
    }
}

/// Counters and records shared by the server and the test.
#[derive(Default)]
pub struct State {
    /// Every request, in arrival order.
    pub seen: Mutex<Vec<Seen>>,
    /// `/slow` requests that started sleeping.
    pub slow_started: AtomicUsize,
    /// `/slow` requests that finished sleeping and answered.
    pub slow_finished: AtomicUsize,
    /// `/slow` requests dropped (client or proxy went away) before they answered.
    pub cancelled: AtomicUsize,
    /// Bytes received by `/upload` so far (all requests).
    pub upload_bytes: AtomicU64,
    /// Connections accepted so far.
    pub connections: AtomicUsize,
    /// Tells every connection to close once idle (see [`Upstream::close_idle_connections`]).
    close_idle: Notify,
    /// Signalled on every change above.
    pub changed: Notify,
}

impl State {
    fn record(&self, seen: Seen) {
        self.seen.lock().unwrap().push(seen);
        self.changed.notify_waiters();
    }
}

/// A running upstream server; stops accepting when dropped.
pub struct Upstream {
    pub addr: SocketAddr,
    pub tls: bool,
    pub state: Arc<State>,
    accept: JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// coatcheck's own server configuration with the test certificates (`h2` and `http/1.1`).
fn tls_config() -> Arc<rustls::ServerConfig> {
    let certs = super::certs();
    coatcheck::tls::install_provider();
    let cert = coatcheck::tls::ServerCert::load(&certs.cert, &certs.key).expect("test certs load");
    coatcheck::tls::server_config(Arc::new(cert)).expect("TLS configuration")
}

impl Upstream {
    /// A plain-HTTP upstream (HTTP/1.1, and HTTP/2 with prior knowledge).
    pub async fn start() -> Upstream {
        Self::spawn(None).await
    }

    /// An HTTPS upstream with the test certificates (valid for `localhost` and `127.0.0.1`),
    /// offering `h2` and `http/1.1` by ALPN.
    pub async fn start_tls() -> Upstream {
        Self::spawn(Some(tokio_rustls::TlsAcceptor::from(tls_config()))).await
    }

    /// An HTTPS upstream like [`Upstream::start_tls`] that offers only `http/1.1` by ALPN.
    pub async fn start_tls_http1() -> Upstream {
        let mut cfg = (*tls_config()).clone();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Self::spawn(Some(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))).await
    }

    async fn spawn(tls: Option<tokio_rustls::TlsAcceptor>) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let is_tls = tls.is_some();
        let st = state.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                st.connections.fetch_add(1, Ordering::SeqCst);
                let st = st.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        None => serve(tcp, st).await,
                        Some(acceptor) => {
                            let Ok(Ok(stream)) =
                                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
                                    .await
                            else {
                                return;
                            };
                            serve(stream, st).await;
                        }
                    }
                });
            }
        });
        Upstream {
            addr,
            tls: is_tls,
            state,
            accept,
        }
    }

    /// `http://127.0.0.1:PORT` or `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Every request seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Closes every connection that is idle (a keep-alive connection between requests) without a
    /// word, as an upstream whose keep-alive timeout ran out does; busy ones close after their
    /// answer.
    pub fn close_idle_connections(&self) {
        self.state.close_idle.notify_waiters();
    }

    /// The most recent request seen.
    pub fn last(&self) -> Option<Seen> {
        self.state.seen.lock().unwrap().last().cloned()
    }

    /// Waits (bounded by `timeout`) until `cond` holds for the state.
    pub async fn wait_for(&self, timeout: Duration, cond: impl Fn(&State) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.state.changed.notified();
            if cond(&self.state) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return cond(&self.state);
            }
        }
    }
}

/// Serves one connection (HTTP/1.1 with upgrades, or HTTP/2) until it ends or is told to close.
async fn serve<I>(io: I, st: Arc<State>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = {
        let st = st.clone();
        service_fn(move |req| {
            let st = st.clone();
            async move { Ok::<_, Infallible>(handle(req, st).await) }
        })
    };
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            () = st.close_idle.notified() => conn.as_mut().graceful_shutdown(),
        }
    }
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn full(b: impl Into<Bytes>) -> ResBody {
    Full::new(b.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

fn json_response(status: StatusCode, value: serde_json::Value) -> Response<ResBody> {
    let mut res = Response::new(full(serde_json::to_vec(&value).unwrap()));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

const ENDPOINTS: &[&str] = &[
    "status",
    "slow",
    "download",
    "upload",
    "sse",
    "ws",
    "redirect",
    "hop",
    "set-cookie",
];

async fn handle(req: Request<Incoming>, st: Arc<State>) -> Response<ResBody> {
    let seen = seen_of(&req);
    st.record(seen.clone());
    let segments: Vec<String> = req.uri().path().split('/').map(str::to_owned).collect();
    let found = segments
        .iter()
        .position(|s| ENDPOINTS.contains(&s.as_str()));
    let Some(at) = found else {
        return echo(req, seen).await;
    };
    match segments[at].as_str() {
        "status" => status(segments.get(at + 1).map(String::as_str)),
        "slow" => slow(req, st).await,
        "download" => download(&req),
        "upload" => upload(req, st).await,
        "sse" => sse(&req),
        "ws" => websocket(req),
        "redirect" => redirect(),
        "set-cookie" => set_cookie(&req),
        "hop" => hop(),
        _ => unreachable!("every endpoint is handled"),
    }
}

/// The record of `req` as it arrived.
fn seen_of(req: &Request<Incoming>) -> Seen {
    Seen {
        method: req.method().to_string(),
        uri: req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned(),
        version: format!("{:?}", req.version()),
        headers: req
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
    }
}

/// `/status/{code}`: answers with that status (200 when `code` is missing or not a status).
fn status(code: Option<&str>) -> Response<ResBody> {
    let code = code
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::OK);
    json_response(code, json!({"status": code.as_u16()}))
}

/// `/redirect`: a 302 to `/elsewhere`.
fn redirect() -> Response<ResBody> {
    let mut res = Response::new(full(""));
    *res.status_mut() = StatusCode::FOUND;
    res.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static("/elsewhere"));
    res
}

/// `/set-cookie?c=…&c=…`: one `Set-Cookie` per `c` parameter.
fn set_cookie(req: &Request<Incoming>) -> Response<ResBody> {
    let mut res = json_response(StatusCode::OK, json!({"cookies": true}));
    let q = req.uri().query().unwrap_or_default().to_owned();
    for (k, v) in url::form_urlencoded::parse(q.as_bytes()) {
        if k == "c"
            && let Ok(v) = HeaderValue::from_str(&v)
        {
            res.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    res
}

/// `/hop`: hop-by-hop response headers (and the ones `Connection` names) beside an end-to-end one.
fn hop() -> Response<ResBody> {
    let mut res = json_response(StatusCode::OK, json!({"hop": true}));
    let h = res.headers_mut();
    h.insert(
        header::CONNECTION,
        HeaderValue::from_static("x-upstream-hop, keep-alive"),
    );
    h.insert("x-upstream-hop", HeaderValue::from_static("secret"));
    h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
    h.insert(
        header::PROXY_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"upstream\""),
    );
    h.insert(header::TRAILER, HeaderValue::from_static("x-checksum"));
    h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
    h.insert("x-end-to-end", HeaderValue::from_static("kept"));
    res
}

async fn echo(req: Request<Incoming>, seen: Seen) -> Response<ResBody> {
    // Count the body (if any) without keeping it.
    let mut body = req.into_body();
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
            Err(_) => break,
        }
    }
    json_response(
        StatusCode::OK,
        json!({
            "method": seen.method,
            "uri": seen.uri,
            "version": seen.version,
            "headers": seen.headers,
            "body_bytes": n,
        }),
    )
}

/// Counts a `/slow` request as cancelled if it is dropped before it answers.
struct CancelGuard {
    st: Arc<State>,
    done: bool,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if self.done {
            self.st.slow_finished.fetch_add(1, Ordering::SeqCst);
        } else {
            self.st.cancelled.fetch_add(1, Ordering::SeqCst);
        }
        self.st.changed.notify_waiters();
    }
}

async fn slow(req: Request<Incoming>, st: Arc<State>) -> Response<ResBody> {
    let ms: u64 = query(&req)
        .get("ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let mut guard = CancelGuard {
        st: st.clone(),
        done: false,
    };
    st.slow_started.fetch_add(1, Ordering::SeqCst);
    st.changed.notify_waiters();
    tokio::time::sleep(Duration::from_millis(ms)).await;
    guard.done = true;
    drop(guard);
    json_response(StatusCode::OK, json!({"slept_ms": ms}))
}

const CHUNK: usize = 64 * 1024;
static ZEROS: [u8; CHUNK] = [b'x'; CHUNK];

fn download(req: &Request<Incoming>) -> Response<ResBody> {
    let q = query(req);
    let total: u64 = q.get("bytes").and_then(|v| v.parse().ok()).unwrap_or(0);
    let chunked = q.get("chunked").is_some_and(|v| v == "1");
    let stream = futures_util::stream::unfold(total, |left| async move {
        if left == 0 {
            return None;
        }
        let n = left.min(CHUNK as u64) as usize;
        let data = Bytes::from_static(&ZEROS[..n]);
        Some((Ok::<_, std::io::Error>(Frame::data(data)), left - n as u64))
    });
    let mut res = Response::new(StreamBody::new(stream).boxed_unsync());
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if !chunked {
        res.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(total));
    }
    res
}

async fn upload(req: Request<Incoming>, st: Arc<State>) -> Response<ResBody> {
    let mut body = req.into_body();
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    n += d.len() as u64;
                    st.upload_bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
            }
            Err(e) => {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    json!({"bytes": n, "error": e.to_string()}),
                );
            }
        }
    }
    json_response(StatusCode::OK, json!({"bytes": n}))
}

fn sse(req: &Request<Incoming>) -> Response<ResBody> {
    let q = query(req);
    let events: u32 = q.get("events").and_then(|v| v.parse().ok()).unwrap_or(5);
    let every = Duration::from_millis(
        q.get("every_ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(200),
    );
    let stream = futures_util::stream::unfold(0u32, move |i| async move {
        if i == events {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(every).await;
        }
        let event = format!("id: {i}\ndata: event {i}\n\n");
        Some((
            Ok::<_, std::io::Error>(Frame::data(Bytes::from(event))),
            i + 1,
        ))
    });
    let mut res = Response::new(StreamBody::new(stream).boxed_unsync());
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    res
}

/// `Sec-WebSocket-Accept` for a key (RFC 6455 §4.2.2).
pub fn websocket_accept(key: &str) -> String {
    let mut input = key.as_bytes().to_vec();
    input.extend_from_slice(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, &input);
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

fn websocket(mut req: Request<Incoming>) -> Response<ResBody> {
    let wants = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let key = req
        .headers()
        .get("sec-websocket-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (true, Some(key)) = (wants, key) else {
        return json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": "not a websocket upgrade"}),
        );
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            let io = TokioIo::new(upgraded);
            let (mut r, mut w) = tokio::io::split(io);
            let _ = tokio::io::copy(&mut r, &mut w).await;
        }
    });
    let mut res = Response::new(full(""));
    *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = res.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(
        "sec-websocket-accept",
        HeaderValue::from_str(&websocket_accept(&key)).unwrap(),
    );
    res
}
