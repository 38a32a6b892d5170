//! Listeners: accept TCP connections, terminate TLS, serve HTTP/1.1 and HTTP/2 with hyper-util's
//! auto builder, bound concurrency and idleness, and drain gracefully on shutdown.
//!
//! Also the optional plain-HTTP listener that only redirects to the HTTPS `public_origin`.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;

use crate::config::Limits;
use crate::router::Router;

/// Concurrent HTTP/2 streams per client connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 256;
/// Back-off after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serves HTTPS on `listener` until `shutdown` fires, then drains within `limits.shutdown_grace`.
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Arc<Router>,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let builder = Arc::new(http_builder(&limits));
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        // Take a connection slot before accepting: past the limit, new clients wait in the backlog.
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.cancelled() => break,
        };
        let (tcp, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let builder = builder.clone();
        let router = router.clone();
        let watcher = graceful.watcher();
        let handshake_timeout = limits.header_read_timeout;
        let idle_timeout = limits.idle_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%remote, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%remote, "TLS handshake timed out");
                    return;
                }
            };
            let in_flight = Arc::new(AtomicUsize::new(0));
            let io = TokioIo::new(IdleIo::new(tls, idle_timeout, in_flight.clone()));
            let client = remote.ip();
            let svc = service_fn(move |req: Request<Incoming>| {
                let router = router.clone();
                let guard = InFlight::new(in_flight.clone());
                async move {
                    Ok::<_, Infallible>(router.handle(req, client).await.map(|b| Tracked {
                        inner: b,
                        _guard: guard,
                    }))
                }
            });
            let conn = builder.serve_connection_with_upgrades(io, svc);
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%remote, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    drain(graceful, limits.shutdown_grace).await;
}

async fn drain(graceful: GracefulShutdown, grace: Duration) {
    let open = graceful.count();
    if open > 0 {
        tracing::info!(
            connections = open,
            grace_s = grace.as_secs_f64(),
            "draining connections"
        );
    }
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace period elapsed; closing remaining connections");
    }
}

fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        // hyper also runs this timer while a keep-alive connection waits for its next request.
        .header_read_timeout(limits.header_read_timeout)
        // Hard ceiling for hyper's parser; the router answers 431 JSON from max_header_bytes below it.
        .max_buf_size((limits.max_header_bytes * 2).max(16 * 1024) + 4096)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size((limits.max_header_bytes * 2 + 4096) as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

/// Serves the plain-HTTP redirect listener: every request gets `308` to the same path and query
/// on `public_origin`.
pub async fn serve_redirect(
    listener: TcpListener,
    public_origin: String,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let origin: Arc<str> = Arc::from(public_origin);
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.cancelled() => break,
        };
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r { Ok(c) => c, Err(_) => { tokio::time::sleep(ACCEPT_BACKOFF).await; continue; } },
            _ = shutdown.cancelled() => break,
        };
        let origin = origin.clone();
        let watcher = graceful.watcher();
        let header_timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req: Request<Incoming>| {
                let origin = origin.clone();
                async move { Ok::<_, Infallible>(redirect_to_https(&origin, &req)) }
            });
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let _ = watcher
                .watch(b.serve_connection(TokioIo::new(tcp), svc))
                .await;
        });
    }
    drain(graceful, limits.shutdown_grace).await;
}

fn redirect_to_https(
    origin: &str,
    req: &Request<Incoming>,
) -> Response<http_body_util::Empty<Bytes>> {
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut res = Response::new(http_body_util::Empty::new());
    *res.status_mut() = StatusCode::PERMANENT_REDIRECT;
    let location = format!("{origin}{pq}");
    if let Ok(v) = HeaderValue::from_str(&location) {
        res.headers_mut().insert(header::LOCATION, v);
    }
    res
}

/// Counts a request as in flight until its response body is dropped (streams included), so idle
/// detection never cuts a quiet long-poll or server-sent-event stream.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(count: Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        InFlight(count)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body carrying its [`InFlight`] guard.
struct Tracked<B> {
    inner: B,
    _guard: InFlight,
}

impl<B: http_body::Body<Data = Bytes> + Unpin> http_body::Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Connection I/O that reports end-of-file once the connection has seen no bytes either way for
/// `timeout` while no request is in flight: hyper then closes it like a client hang-up.
///
/// The deadline is checked lazily: activity only stores an `Instant`; the timer is re-armed at most
/// once per `timeout`.
struct IdleIo<T> {
    inner: T,
    timeout: Duration,
    last_activity: Instant,
    sleep: Pin<Box<Sleep>>,
    in_flight: Arc<AtomicUsize>,
}

impl<T> IdleIo<T> {
    fn new(inner: T, timeout: Duration, in_flight: Arc<AtomicUsize>) -> Self {
        IdleIo {
            inner,
            timeout,
            last_activity: Instant::now(),
            sleep: Box::pin(tokio::time::sleep(timeout)),
            in_flight,
        }
    }

    /// Whether the connection has been idle for too long (polls the timer so we are woken later).
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
            let deadline = self.last_activity + self.timeout;
            if self.in_flight.load(Ordering::Relaxed) == 0 && Instant::now() >= deadline {
                return true;
            }
            let next = if Instant::now() >= deadline {
                Instant::now() + self.timeout
            } else {
                deadline
            };
            self.sleep.as_mut().reset(next.into());
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.last_activity = Instant::now();
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                if self.expired(cx) {
                    // End of stream: hyper closes the connection as if the client had.
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.last_activity = Instant::now();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.last_activity = Instant::now();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Binds a TCP listener, naming the key on failure.
pub async fn bind(key: &str, addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("{key}: cannot listen on {addr}: {e}"))
}
