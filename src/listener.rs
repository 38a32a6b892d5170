//! Listeners: accept TCP connections, terminate TLS, serve HTTP/1.1 and HTTP/2 with hyper-util's
//! auto builder, bound concurrency and idleness, and drain gracefully on shutdown.
//!
//! Also the optional plain-HTTP listener that only redirects to the HTTPS `public_origin`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;

use crate::body::{Watch, Watched};
use crate::config::Limits;
use crate::metrics::{Metrics, Open};
use crate::proxy::ConnectionSlot;
use crate::router::Router;
use crate::wake::{HeldWaker, QuietSleep};

/// Concurrent HTTP/2 streams per client connection.
pub(crate) const MAX_CONCURRENT_STREAMS: u32 = 256;
/// Longest method token the head watch waits on; longer is not a request line.
const MAX_METHOD: usize = 32;
/// The size of one read while a request head is being watched (hyper's read buffer offers 8 KiB
/// at a time, and the watch reads into it).
const HEAD_READ: usize = 8 * 1024;
/// What hyper is given in place of an oversized head: a minimal request the service answers with
/// coatcheck's JSON 431 (the `oversized` flag, which no client can set, says so); nothing follows.
const OVERSIZED_STAND_IN: &[u8] =
    b"GET / HTTP/1.1\r\nhost: coatcheck.invalid\r\nconnection: close\r\n\r\n";
/// Pending connections each serving runtime's socket queues (tokio's `TcpListener::bind` default).
const LISTEN_BACKLOG: u32 = 1024;
/// Back-off after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// One HTTPS listener's shared state: every serving runtime (one per core, see `app`) accepts
/// on its own copy of the listening socket and serves what it accepted, start to end, on its own
/// thread; the connection limits, the reload swap point and the shutdown grace are shared.
pub(crate) struct TlsServer {
    acceptor: tokio_rustls::TlsAcceptor,
    builder: auto::Builder<TokioExecutor>,
    routers: Arc<ArcSwap<Router>>,
    limits: Limits,
    metrics: Arc<Metrics>,
    permits: Arc<Semaphore>,
    per_ip: Arc<PerIp>,
    /// Fires when the shutdown grace has ended: upgraded tunnels (which hyper no longer tracks) close.
    closing: CancellationToken,
}

impl TlsServer {
    /// The shared state of one HTTPS listener.
    pub(crate) fn new(
        tls: Arc<rustls::ServerConfig>,
        routers: Arc<ArcSwap<Router>>,
        limits: Limits,
        metrics: Arc<Metrics>,
    ) -> Arc<TlsServer> {
        Arc::new(TlsServer {
            acceptor: tokio_rustls::TlsAcceptor::from(tls),
            builder: http_builder(&limits),
            permits: Arc::new(Semaphore::new(limits.max_connections)),
            per_ip: Arc::new(PerIp::new(limits.max_connections_per_ip)),
            closing: CancellationToken::new(),
            routers,
            limits,
            metrics,
        })
    }

    /// Serves HTTPS on `listener` until `shutdown` fires, then drains within
    /// `limits.shutdown_grace`. Each serving runtime calls it with its own copy of the socket.
    ///
    /// `routers` is the swap point of a reload: every request is handled by the router current
    /// when it arrived (one `ArcSwap` load), and finishes on it even if a reload swaps in another.
    pub(crate) async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        let graceful = Drain::new();
        loop {
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
            // A connection slot before anything is read: past the limit, the client waits (this
            // runtime accepts nothing more meanwhile, the rest wait in the backlog). Accepted first:
            // each runtime has its own socket, and a slot held by one runtime waiting in `accept`
            // could not serve a client queued at another's.
            let permit = tokio::select! {
                p = self.permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                _ = shutdown.cancelled() => break,
            };
            // A trusted proxy speaks for many clients: it is not held to one client's cap.
            let cap = !self.routers.load().is_trusted_proxy(remote.ip());
            let Some(ip_guard) = self.per_ip.enter(remote.ip(), cap) else {
                tracing::debug!(%remote, "too many connections from this address; closed");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            self.metrics.connections_total.inc();
            let slot = ConnectionSlot {
                // The connection counts as open until it and every tunnel made from it have ended.
                hold: Arc::new((permit, ip_guard, Open::new(&self.metrics.connections_open))),
                closing: self.closing.clone(),
                tunnels_open: self.metrics.upgrades_open.clone(),
                deadline: None,
                handles: crate::session::ConnectionMemo::default(),
            };
            tokio::spawn(
                self.clone()
                    .connection(tcp, remote, slot, graceful.watcher()),
            );
        }
        drop(listener);
        let limits = &self.limits;
        let deadline = tokio::time::Instant::now() + limits.shutdown_grace;
        drain(graceful, limits.shutdown_grace).await;
        // Upgraded tunnels hold their connection's slot: wait for them within what is left of the
        // grace (every runtime waits for all of them: the permits are shared).
        let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
        if tokio::time::timeout_at(deadline, self.permits.acquire_many(all))
            .await
            .is_err()
        {
            tracing::warn!("shutdown grace period elapsed; closing upgraded connections");
        }
        self.closing.cancel();
    }

    /// One client connection: the TLS handshake, then HTTP/1.1 or HTTP/2 until it ends.
    async fn connection(
        self: Arc<Self>,
        tcp: tokio::net::TcpStream,
        remote: SocketAddr,
        mut slot: ConnectionSlot,
        watcher: Watcher,
    ) {
        let limits = &self.limits;
        let handshake_timeout = limits.header_read_timeout;
        let tls = match tokio::time::timeout(handshake_timeout, self.acceptor.accept(tcp)).await {
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
        // HTTP/2 carries PING frames (ours, and clients' own) that would keep an idle connection
        // open forever if bytes counted as activity: there, only requests do.
        let count_bytes = tls.get_ref().1.alpn_protocol() != Some(b"h2");
        // HTTP/1.1 serves one request at a time: they share one route-deadline timer.
        slot.deadline = count_bytes.then(|| Arc::new(crate::proxy::ConnectionDeadline::new()));
        let activity = Arc::new(Activity::new());
        let head_watch =
            count_bytes.then(|| HeadWatch::new(limits.max_header_bytes, handshake_timeout));
        let io = TokioIo::new(IdleIo::new(
            tls,
            limits.idle_timeout,
            activity.clone(),
            count_bytes,
            limits.body_idle_timeout,
            head_watch,
        ));
        let client = remote.ip();
        let routers = self.routers.clone();
        // Shared by the connection's requests: handing it to one costs one reference count (it
        // used to travel as a request extension: a map and a box allocated per request).
        let slot = Arc::new(slot);
        let svc = service_fn(move |req: Request<Incoming>| {
            let router = routers.load_full();
            let guard = InFlight::new(activity.clone());
            // Every request shares the connection's handle memo; only an HTTP/1.1 request can
            // become a tunnel (`proxy::split`; HTTP/2 has no protocol switch, RFC 9113 §8.6) or
            // share the connection's deadline timer (an HTTP/2 connection has none).
            let slot = slot.clone();
            let activity = activity.clone();
            async move {
                if activity.oversized.load(Ordering::Acquire) {
                    return Ok::<_, Infallible>(
                        router
                            .refuse_oversized_head(client)
                            .map(|b| Watched::new(b, guard)),
                    );
                }
                // Boxed: the request future is large, and hyper would otherwise move it by value.
                let res = Box::pin(router.handle(req, client, slot)).await;
                if res.status() == StatusCode::SWITCHING_PROTOCOLS {
                    activity.upgraded.store(true, Ordering::Release);
                }
                Ok::<_, Infallible>(res.map(|b| Watched::new(b, guard)))
            }
        });
        let conn = self.builder.serve_connection_with_upgrades(io, svc);
        if let Err(e) = watcher.watch(conn).await {
            tracing::debug!(%remote, error = %e, "connection ended with an error");
        }
    }
}

/// The graceful drain of one listener's connections: `shutdown` asks each connection to finish
/// its request in flight and close, then waits until every one has. hyper-util's
/// `GracefulShutdown` does the same but polls its shutdown signal (a `watch` notification) on
/// every poll of every connection, about 100 instructions each, three times per request; here a
/// connection polls it once, which registers the task's waker, and again only when the drain has
/// begun (one atomic load) or the task's waker changed.
pub(crate) struct Drain {
    tx: watch::Sender<()>,
    draining: Arc<AtomicBool>,
}

impl Drain {
    pub(crate) fn new() -> Drain {
        Drain {
            tx: watch::Sender::new(()),
            draining: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Connections being served.
    pub(crate) fn count(&self) -> usize {
        self.tx.receiver_count()
    }

    /// A connection's share of the drain, handed to its task.
    pub(crate) fn watcher(&self) -> Watcher {
        Watcher {
            rx: self.tx.subscribe(),
            draining: self.draining.clone(),
        }
    }

    /// Asks every connection to close after its request in flight, and waits until all have.
    pub(crate) async fn shutdown(self) {
        self.draining.store(true, Ordering::Release);
        let _ = self.tx.send(());
        self.tx.closed().await;
    }
}

impl Drop for Drain {
    /// A dropped drain (its listener's task aborted) closes connections as a shutdown does.
    fn drop(&mut self) {
        self.draining.store(true, Ordering::Release);
    }
}

/// One connection's share of a [`Drain`]; it counts as open until its `watch` future ends.
pub(crate) struct Watcher {
    rx: watch::Receiver<()>,
    draining: Arc<AtomicBool>,
}

impl Watcher {
    /// Serves `conn` until it ends; after [`Drain::shutdown`] (or a dropped `Drain`) it is asked to
    /// close once its request in flight is answered.
    pub(crate) fn watch<C: GracefulConnection>(self, conn: C) -> impl Future<Output = C::Output> {
        let Watcher { mut rx, draining } = self;
        Watching {
            conn,
            signal: async move {
                let _ = rx.changed().await;
                // Held until the connection has ended: it counts as open meanwhile.
                rx
            },
            asked: None,
            waker: HeldWaker::default(),
            draining,
        }
    }
}

pin_project_lite::pin_project! {
    /// A connection served under a [`Drain`] ([`Watcher::watch`]).
    struct Watching<C, F: Future> {
        #[pin]
        conn: C,
        #[pin]
        signal: F,
        // Once the connection has been asked to close: the signal's receiver, held to the end.
        asked: Option<F::Output>,
        // The waker the signal holds.
        waker: HeldWaker,
        draining: Arc<AtomicBool>,
    }
}

impl<C: GracefulConnection, F: Future> Future for Watching<C, F> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let mut this = self.project();
        if this.asked.is_none() && (!this.waker.holds(cx) || this.draining.load(Ordering::Acquire))
        {
            match this.signal.poll(cx) {
                Poll::Ready(rx) => {
                    *this.asked = Some(rx);
                    this.conn.as_mut().graceful_shutdown();
                }
                Poll::Pending => this.waker.polled_pending(cx),
            }
        }
        this.conn.poll(cx)
    }
}

/// Concurrent connections per client address (`server.limits.max_connections_per_ip`). Holds an
/// entry only for addresses with an open connection, so memory is bounded by `max_connections`.
struct PerIp {
    cap: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PerIp {
    fn new(cap: usize) -> Self {
        PerIp {
            cap,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a new connection from `ip`, or `None` when the address is at its cap (and `capped`).
    fn enter(self: &Arc<Self>, ip: IpAddr, capped: bool) -> Option<IpGuard> {
        let ip = ip.to_canonical();
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_insert(0);
        if capped && *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(IpGuard {
            ip,
            per_ip: self.clone(),
        })
    }
}

/// One open connection (or its upgraded tunnel) from an address.
struct IpGuard {
    ip: IpAddr,
    per_ip: Arc<PerIp>,
}

impl Drop for IpGuard {
    fn drop(&mut self) {
        let mut open = self.per_ip.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

async fn drain(graceful: Drain, grace: Duration) {
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
        // No timer per request: the header watch bounds a head from its first byte, and IdleIo
        // closes a connection that waits longer than `header_read_timeout` for its next request.
        .header_read_timeout(None)
        // Hard ceiling for hyper's parser, never reached: the header watch (HeadWatch) stops a head
        // at max_header_bytes and the router answers 431 JSON; hyper holds at most that plus one read.
        .max_buf_size(limits.max_header_bytes * 2 + 2 * HEAD_READ)
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
pub(crate) async fn serve_redirect(
    listener: TcpListener,
    public_origin: String,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let origin: Arc<str> = Arc::from(public_origin);
    let graceful = Drain::new();
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

/// The requests in flight on one connection, and when a request last started or ended.
struct Activity {
    in_flight: AtomicUsize,
    /// Requests whose response has ended (body dropped).
    ended: AtomicU64,
    /// Set when the header watch stopped an oversized head: the next request is answered 431.
    oversized: std::sync::atomic::AtomicBool,
    /// Set once the bytes are no longer HTTP/1.1 (a response switched protocols, or the client
    /// spoke HTTP/2 with prior knowledge).
    upgraded: std::sync::atomic::AtomicBool,
    /// Milliseconds after `epoch` of the last start or end of a request.
    last_change_ms: AtomicU64,
    epoch: Instant,
}

impl Activity {
    fn new() -> Self {
        Activity {
            in_flight: AtomicUsize::new(0),
            ended: AtomicU64::new(0),
            oversized: std::sync::atomic::AtomicBool::new(false),
            upgraded: std::sync::atomic::AtomicBool::new(false),
            last_change_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_change_ms.store(ms, Ordering::Relaxed);
    }

    fn last_change(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_change_ms.load(Ordering::Relaxed))
    }

    fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) > 0
    }
}

/// Counts a request as in flight until its response body is dropped (streams included), so idle
/// detection never cuts a quiet long-poll or server-sent-event stream.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        activity.touch();
        InFlight(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.ended.fetch_add(1, Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// The in-flight guard rides the response body: it needs no frame, only its drop.
impl Watch for InFlight {
    fn ready(&mut self, _data: usize, _end: bool) {}
}

/// Connection I/O that reports end-of-file once no request has been in flight for `timeout` (and,
/// with `count_bytes`, no bytes went either way for as long): hyper then closes it like a client
/// hang-up. HTTP/1.1 counts bytes so that an upgraded connection (WebSocket) stays open while it
/// carries traffic; HTTP/2 does not, or keep-alive PINGs would hold an idle connection forever.
///
/// The deadline is checked lazily: activity only stores an `Instant`; the timer is re-armed at most
/// once per `timeout`.
///
/// A write that stays blocked for `write_stall` (the client stopped reading its response) fails
/// with `TimedOut`, so a peer that never reads cannot hold the connection and its upstream stream.
struct IdleIo<T> {
    inner: T,
    timeout: Duration,
    /// HTTP/1.1: the shorter limit (`header_read_timeout`) while the connection waits for its next
    /// request head, until a protocol switch. This was hyper's timer, armed on every request.
    between_heads: Option<Duration>,
    count_bytes: bool,
    last_io: Instant,
    /// Polled only when it may have fired or for another reader (see [`IdleIo::expired`]).
    sleep: QuietSleep,
    activity: Arc<Activity>,
    write_stall: Duration,
    /// Since when writes have been blocked, with the timer that wakes us to check.
    blocked: Option<(Instant, Pin<Box<Sleep>>)>,
    /// HTTP/1.1 only: holds each request head back until it is complete or over the limit.
    head: Option<HeadWatch>,
    /// When coatcheck closes an HTTP/1.1 connection (an oversized head, a request body refused or
    /// left unread, `Connection: close`, shutdown): the write side is shut and the rest of the
    /// client's bytes are read and dropped for a while (a lingering close, as nginx does), so the
    /// client receives the answer (431, 413, …) instead of a reset for the bytes it is still
    /// sending. Not after a protocol switch: a tunnel's bytes are the upstream's, never dropped.
    linger: Option<(Pin<Box<Sleep>>, usize)>,
}

/// How long a lingering close keeps reading what the client still sends.
const LINGER: Duration = Duration::from_secs(2);
/// Most bytes a lingering close reads and drops.
const LINGER_BYTES: usize = 1024 * 1024;

/// Watches HTTP/1.1 request heads on the wire: bytes are held until the head is complete (then
/// handed to hyper at once) or exceeds `limit` (then hyper gets [`OVERSIZED_STAND_IN`] and the
/// connection ends after the 431). Re-armed once every request whose head it released has been
/// answered; off for good after a protocol switch.
struct HeadWatch {
    limit: usize,
    held: Vec<u8>,
    /// Bytes to hand to hyper before reading more, and how much of them is gone.
    out: Vec<u8>,
    out_pos: usize,
    /// Heads released so far; watching resumes when as many responses have ended.
    released: u64,
    watching: bool,
    eof_after_out: bool,
    /// A head must be complete this long after its first byte (`header_read_timeout`): hyper
    /// never sees a held head, so its own timer cannot judge it.
    read_timeout: Duration,
    /// When the head being held got its first bytes.
    started: Option<tokio::time::Instant>,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl HeadWatch {
    fn new(limit: usize, read_timeout: Duration) -> Self {
        HeadWatch {
            read_timeout,
            started: None,
            deadline: None,
            limit,
            held: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            released: 0,
            watching: true,
            eof_after_out: false,
        }
    }

    /// Whether `held` contains a complete head.
    fn complete(&self) -> bool {
        head_complete(&self.held)
    }
}

/// Whether `bytes` contain a complete head: an empty line after the first non-empty one (leading
/// empty lines are ignored, RFC 9112 §2.2).
fn head_complete(bytes: &[u8]) -> bool {
    // A head that came whole with nothing after it (nearly every one) ends in its empty line.
    if bytes.ends_with(b"\r\n\r\n") && !matches!(bytes.first(), Some(b'\r' | b'\n')) {
        return true;
    }
    let start = bytes
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(bytes.len());
    let rest = &bytes[start..];
    // Only the line ends are looked at (memchr: a vector scan), not every byte twice.
    memchr::memchr_iter(b'\n', rest)
        .any(|i| matches!(&rest[i + 1..], [b'\n', ..] | [b'\r', b'\n', ..]))
}

impl<T> IdleIo<T> {
    /// Whether closing this connection lingers ([`IdleIo::linger`]): HTTP/1.1 (which counts
    /// bytes; an oversized head is HTTP/1.1 too) before any protocol switch.
    fn lingers(&self) -> bool {
        self.count_bytes && !self.activity.upgraded.load(Ordering::Acquire)
    }

    fn new(
        inner: T,
        timeout: Duration,
        activity: Arc<Activity>,
        count_bytes: bool,
        write_stall: Duration,
        head: Option<HeadWatch>,
    ) -> Self {
        let between_heads = head.as_ref().map(|h| h.read_timeout);
        IdleIo {
            head,
            linger: None,
            inner,
            timeout,
            between_heads,
            count_bytes,
            last_io: Instant::now(),
            sleep: QuietSleep::until(
                tokio::time::Instant::now() + between_heads.map_or(timeout, |d| d.min(timeout)),
            ),
            activity,
            write_stall,
            blocked: None,
        }
    }

    /// Notes the outcome of a write: progress clears the stall clock; a pending write starts it
    /// and, once it has run for `write_stall`, turns into an error.
    fn write_outcome<R>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        if r.is_ready() {
            self.blocked = None;
            return r;
        }
        let stall = self.write_stall;
        let (since, timer) = self
            .blocked
            .get_or_insert_with(|| (Instant::now(), Box::pin(tokio::time::sleep(stall))));
        if timer.as_mut().poll(cx).is_ready() && since.elapsed() >= stall {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped reading",
            )));
        }
        Poll::Pending
    }

    /// How long the connection may go without activity now (see `between_heads`).
    fn idle_limit(&self) -> Duration {
        match self.between_heads {
            Some(d) if !self.activity.upgraded.load(Ordering::Acquire) => self.timeout.min(d),
            _ => self.timeout,
        }
    }

    fn last_activity(&self) -> Instant {
        let requests = self.activity.last_change();
        if self.count_bytes {
            requests.max(self.last_io)
        } else {
            requests
        }
    }

    /// Whether the connection has been idle for too long (polls the timer so we are woken later).
    ///
    /// Every pending read asks, twice per request: while the timer has not fired and holds this
    /// reader's waker, [`QuietSleep::poll_fired`] answers with one atomic load instead of a poll
    /// (the task budget, the timer's state, its waker compared and stored again).
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.sleep.poll_fired(cx).is_pending() {
                return false;
            }
            let timeout = self.idle_limit();
            let deadline = self.last_activity() + timeout;
            if !self.activity.busy() && Instant::now() >= deadline {
                return true;
            }
            let next = if Instant::now() >= deadline {
                Instant::now() + timeout
            } else {
                deadline
            };
            self.sleep.reset(next.into());
        }
    }
}

impl<T: AsyncRead + Unpin> IdleIo<T> {
    /// Reads from the socket, noting activity; end of stream once idle for too long.
    fn read_inner(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.last_io = Instant::now();
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

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let Some(mut head) = this.head.take() else {
            return this.read_inner(cx, buf);
        };
        let r = this.read_watched(&mut head, cx, buf);
        // After a protocol switch the bytes are not HTTP: the watch is dropped for good.
        if !this.activity.upgraded.load(Ordering::Acquire) || !head.drained() {
            this.head = Some(head);
        }
        r
    }
}

impl HeadWatch {
    /// Whether `held` may be the start of a request: optional empty lines, then a method token
    /// (RFC 9110 §5.6.2 `tchar`s, at most [`MAX_METHOD`] of them) and, once it ends, a space.
    fn may_be_head(&self) -> bool {
        let start = self
            .held
            .iter()
            .position(|&b| b != b'\r' && b != b'\n')
            .unwrap_or(self.held.len());
        for (i, &b) in self.held[start..].iter().enumerate() {
            if b == b' ' {
                return i > 0;
            }
            let tchar = b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
            if !tchar || i >= MAX_METHOD {
                return false;
            }
        }
        true
    }

    /// Whether every byte held back has been handed to hyper.
    fn drained(&self) -> bool {
        self.out_pos >= self.out.len()
    }
}

impl<T: AsyncRead + Unpin> IdleIo<T> {
    fn read_watched(
        &mut self,
        head: &mut HeadWatch,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if head.hand_out(buf) {
                return Poll::Ready(Ok(()));
            }
            if head.eof_after_out {
                return Poll::Ready(Ok(()));
            }
            if self.activity.oversized.load(Ordering::Acquire) {
                // The stand-in said `connection: close`: hyper answers it and closes; the client's
                // remaining bytes are left for the lingering close (an end of stream now would
                // make hyper drop the answer).
                return Poll::Pending;
            }
            if !head.watching {
                let answered = self.activity.ended.load(Ordering::Acquire) >= head.released;
                if !answered || self.activity.upgraded.load(Ordering::Acquire) {
                    return self.read_inner(cx, buf);
                }
                head.watching = true;
            }
            if buf.remaining() == 0 {
                // No room: nothing can be handed over (what any read into an empty buffer says).
                return Poll::Ready(Ok(()));
            }
            // Read straight into hyper's buffer. A head that comes whole in one read with nothing
            // held (nearly every one) is released where it lies; any other bytes are taken back
            // out into `held` (a head in pieces, the rest of a body the service did not read).
            let before = buf.filled().len();
            match self.read_inner(cx, buf) {
                Poll::Pending => return head.poll_deadline(cx),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if buf.filled().len() == before => head.end_of_stream(),
                Poll::Ready(Ok(())) => {
                    let read = &buf.filled()[before..];
                    if head.held.is_empty() && head_complete(read) {
                        head.released_in_place(read, &self.activity);
                        return Poll::Ready(Ok(()));
                    }
                    head.take_read(read, &self.activity);
                    buf.set_filled(before);
                }
            }
        }
    }
}

/// The steps of [`IdleIo::read_watched`] on the watch's own state.
impl HeadWatch {
    /// Copies what is left of `out` into `buf`; false when nothing was left to hand over.
    #[inline]
    fn hand_out(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        if self.out_pos >= self.out.len() {
            return false;
        }
        let n = buf.remaining().min(self.out.len() - self.out_pos);
        buf.put_slice(&self.out[self.out_pos..self.out_pos + n]);
        self.out_pos += n;
        true
    }

    /// No bytes now: an error once the held head is past its deadline, else wait.
    #[inline]
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(d) = self.deadline.as_mut()
            && d.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the request head took too long",
            )));
        }
        Poll::Pending
    }

    /// End of stream: what was held goes to hyper, then the end.
    #[inline]
    fn end_of_stream(&mut self) {
        self.out = std::mem::take(&mut self.held);
        self.out_pos = 0;
        self.eof_after_out = true;
    }

    /// Holds the bytes just read and decides what the held bytes are now.
    #[inline]
    fn take_read(&mut self, bytes: &[u8], activity: &Activity) {
        // The head's clock starts at its first bytes; the timer itself is made only for a head
        // that did not come whole in one read (no timer per request).
        if self.held.is_empty() {
            self.started = Some(tokio::time::Instant::now());
        }
        self.held.extend_from_slice(bytes);
        if self.complete() {
            self.release(activity);
        } else if !self.may_be_head() {
            // Not a request line (the rest of a body the service never read, which hyper
            // drains): hand it over as it is; hyper judges it if it is garbage.
            self.deadline = None;
            self.out = std::mem::take(&mut self.held);
            self.out_pos = 0;
        } else if self.held.len() <= self.limit {
            if self.deadline.is_none()
                && let Some(started) = self.started
            {
                self.deadline = Some(Box::pin(tokio::time::sleep_until(
                    started + self.read_timeout,
                )));
            }
        } else {
            self.refuse_oversized(activity);
        }
    }

    /// A complete head that was read straight into hyper's buffer: stop watching until its
    /// response has ended.
    #[inline]
    fn released_in_place(&mut self, head: &[u8], activity: &Activity) {
        self.deadline = None;
        // HTTP/2 with prior knowledge (no ALPN): not HTTP/1.1 heads from here on.
        if head.starts_with(b"PRI * HTTP/2.0") {
            activity.upgraded.store(true, Ordering::Release);
        }
        self.released += 1;
        self.watching = false;
    }

    /// A complete head: hand it to hyper and stop watching until its response has ended.
    #[inline]
    fn release(&mut self, activity: &Activity) {
        self.deadline = None;
        // HTTP/2 with prior knowledge (no ALPN): not HTTP/1.1 heads from here on.
        if self.held.starts_with(b"PRI * HTTP/2.0") {
            activity.upgraded.store(true, Ordering::Release);
        }
        // Swapped, not taken: both buffers keep their capacity for the next head.
        self.out.clear();
        std::mem::swap(&mut self.out, &mut self.held);
        if self.held.capacity() > 2 * HEAD_READ {
            self.held = Vec::new(); // a rare large head: not kept per connection
        }
        self.out_pos = 0;
        self.released += 1;
        self.watching = false;
    }

    /// A head over the limit: hyper gets the stand-in, which it answers and then closes.
    #[cold]
    fn refuse_oversized(&mut self, activity: &Activity) {
        tracing::debug!(
            bytes = self.held.len(),
            limit = self.limit,
            "request head over the limit"
        );
        activity.oversized.store(true, Ordering::Release);
        self.held = Vec::new();
        self.out = OVERSIZED_STAND_IN.to_vec();
        self.out_pos = 0;
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.last_io = Instant::now();
        }
        self.write_outcome(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.last_io = Instant::now();
        }
        self.write_outcome(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.write_outcome(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.lingers() {
            return Pin::new(&mut this.inner).poll_shutdown(cx);
        }
        if this.linger.is_none() {
            if let Err(e) = std::task::ready!(Pin::new(&mut this.inner).poll_shutdown(cx)) {
                return Poll::Ready(Err(e));
            }
            this.linger = Some((Box::pin(tokio::time::sleep(LINGER)), 0));
        }
        let Some((timer, drained)) = this.linger.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let mut scratch = [0u8; 8192];
        loop {
            if *drained >= LINGER_BYTES || timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            let mut rb = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if !rb.filled().is_empty() => *drained += rb.filled().len(),
                Poll::Ready(_) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Binds a TCP listener, naming the key on failure.
pub(crate) async fn bind(key: &str, addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("{key}: cannot listen on {addr}: {e}"))
}

/// Binds `addr` once per serving runtime, with `SO_REUSEPORT`: the kernel spreads new connections
/// evenly over the runtimes. Each runtime registers its socket with its own reactor
/// ([`TcpListener::from_std`] on that runtime).
///
/// `SO_REUSEPORT` would also let another process of the same user join the group and take a share
/// of the connections. For a named port, a plain bind first (closed at once) keeps the usual
/// refusal of an address in use, also by another coatcheck. For port 0, the first socket is bound
/// with `SO_REUSEPORT` directly: the kernel's choice of a port for port 0 never falls on a port in
/// use, reuse or not, and the socket is held while the others join it, so no other process can be
/// given the same port in between (a probe closed before the group exists could be).
pub(crate) fn bind_serving(
    key: &str,
    addr: SocketAddr,
    n: usize,
) -> Result<Vec<std::net::TcpListener>, String> {
    let fail = |e: io::Error| format!("{key}: cannot listen on {addr}: {e}");
    if addr.port() != 0 {
        drop(std::net::TcpListener::bind(addr).map_err(fail)?);
    }
    let first = reuseport_listener(addr).map_err(fail)?;
    let at = first.local_addr().map_err(fail)?;
    let mut all = vec![first];
    for _ in 1..n.max(1) {
        all.push(reuseport_listener(at).map_err(fail)?);
    }
    Ok(all)
}

/// One listening socket on `addr` with `SO_REUSEADDR` and `SO_REUSEPORT`.
fn reuseport_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }?;
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)?.into_std()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_serving_group_is_never_shared_with_another_listener() {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let a = bind_serving("server.listen", any, 2).unwrap();
        let at = a[0].local_addr().unwrap();
        assert!(a.iter().all(|l| l.local_addr().unwrap() == at));
        // Port 0 again: another port, never a share of the first group.
        for _ in 0..50 {
            let b = bind_serving("server.listen", any, 2).unwrap();
            assert_ne!(b[0].local_addr().unwrap(), at);
        }
        // The group's port named explicitly: refused, with the key.
        let e = bind_serving("server.listen", at, 2).unwrap_err();
        assert!(e.starts_with("server.listen: cannot listen on"), "{e}");
    }

    /// An HTTP/1.1 connection over an in-memory pipe, served under `drain`, whose one request
    /// (if the client sends one) is answered after `delay`.
    fn drained_connection(
        drain: &Drain,
        delay: Duration,
    ) -> (
        tokio::io::DuplexStream,
        tokio::task::JoinHandle<hyper::Result<()>>,
    ) {
        let (client, server) = tokio::io::duplex(4096);
        let svc = service_fn(move |_req: Request<Incoming>| async move {
            tokio::time::sleep(delay).await;
            Ok::<_, Infallible>(Response::new(http_body_util::Full::new(Bytes::from(
                "done",
            ))))
        });
        let conn =
            hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(server), svc);
        (client, tokio::spawn(drain.watcher().watch(conn)))
    }

    #[tokio::test]
    async fn a_drain_closes_idle_connections_at_once_and_lets_a_request_in_flight_finish() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let drain = Drain::new();
        let (_idle_client, idle) = drained_connection(&drain, Duration::ZERO);
        let (mut busy_client, busy) = drained_connection(&drain, Duration::from_millis(300));
        busy_client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        // Both connections have been polled (the busy one is in its request, the idle one waits
        // for one) before the drain starts: each was told by the signal it polled once.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(drain.count(), 2);
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(5), drain.shutdown())
            .await
            .expect("every connection ended");
        assert!(
            started.elapsed() >= Duration::from_millis(200),
            "{:?}",
            started.elapsed()
        );
        assert!(idle.await.unwrap().is_ok());
        assert!(busy.await.unwrap().is_ok());
        let mut answer = String::new();
        busy_client.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("connection: close"), "{answer}");
        assert!(answer.ends_with("done"), "{answer}");
    }

    #[tokio::test]
    async fn the_idle_timer_wakes_the_reader_that_waits_now() {
        use tokio::io::AsyncReadExt;
        let (_client, server) = tokio::io::duplex(64);
        let mut io = IdleIo::new(
            server,
            Duration::from_millis(300),
            Arc::new(Activity::new()),
            true,
            Duration::from_secs(5),
            None,
        );
        // A first reader whose waker wakes nobody waits, then leaves: the timer holds its waker.
        let mut buf = [0u8; 8];
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let pending = Pin::new(&mut io).poll_read(&mut cx, &mut ReadBuf::new(&mut buf));
        assert!(pending.is_pending());
        // This task reads next: the timer must wake it once the connection has been idle.
        let started = Instant::now();
        let n = tokio::time::timeout(Duration::from_secs(5), io.read(&mut buf))
            .await
            .expect("the idle connection ended")
            .unwrap();
        assert_eq!(n, 0);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(200) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
    }

    fn watch(held: &[u8]) -> HeadWatch {
        let mut w = HeadWatch::new(1024, Duration::from_secs(1));
        w.held = held.to_vec();
        w
    }

    #[test]
    fn a_head_is_complete_at_its_empty_line_after_leading_empty_lines() {
        assert!(watch(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").complete());
        assert!(watch(b"GET / HTTP/1.1\nHost: x\n\n").complete());
        assert!(!watch(b"GET / HTTP/1.1\r\nHost: x\r\n").complete());
        // Leading empty lines (RFC 9112 §2.2) do not end a head that has not started.
        assert!(!watch(b"\r\n\r\nGET / HTTP/1.1\r\n").complete());
        assert!(!watch(b"\r\n\r\n").complete());
        assert!(!watch(b"\r\n\r\n\r\n").complete());
        assert!(watch(b"\r\nGET / HTTP/1.1\r\n\r\n").complete());
        // A body in the same read: the empty line is not at the end.
        assert!(watch(b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi").complete());
        assert!(!watch(b"POST / HTTP/1.1\r\nX: \r\r\n\r").complete());
    }

    #[test]
    fn only_a_method_token_and_a_space_may_start_a_head() {
        for ok in [
            &b"GET"[..],
            b"GET /",
            b"\r\nPOST / HTTP/1.1",
            b"M-SEARCH *",
            b"",
        ] {
            assert!(watch(ok).may_be_head(), "{:?}", String::from_utf8_lossy(ok));
        }
        let long = vec![b'A'; MAX_METHOD + 1];
        for not in [
            &b"{\"late\":true}"[..],
            b" GET /",
            b"a=1&b=2",
            b"\x16\x03\x01",
            &long,
        ] {
            assert!(
                !watch(not).may_be_head(),
                "{:?}",
                String::from_utf8_lossy(not)
            );
        }
    }
}
