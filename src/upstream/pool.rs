//! The HTTP/1.1 connections of one upstream on one serving runtime: keep-alive reuse without a
//! map, a key or a shared lock.
//!
//! A connection is a hyper [`SendRequest`] whose connection task runs on the runtime that opened
//! it. It is *busy* from the moment a request is handed to it until hyper says it is ready again
//! (`is_ready`: the response has been read off the connection to its end, which for a body larger
//! than hyper's buffers means the proxy has forwarded it, and the connection is kept alive), then
//! *idle*. A connection the upstream closed, or whose response was abandoned (hyper then closes
//! it), is never ready again and is dropped when found.
//! Nothing is spawned per request to notice that: a busy connection is promoted to idle when a
//! later [`Pool::take`] (or the sweep) finds it ready, and dropped when it is found closed.
//!
//! The sweep (a task per pool, started with the first connection, every [`SWEEP_EVERY`]) closes
//! the connections idle for [`super::POOL_IDLE_TIMEOUT`] and keeps at most [`MAX_IDLE`] idle.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use hyper::client::conn::http1::SendRequest;

/// Idle connections kept per upstream per serving runtime. The bench drives 32 connections per
/// runtime; 64 leaves room for bursts without holding more than about 64 × 16 KiB of buffers and
/// 64 upstream sockets per runtime (nginx's `keepalive` directive is usually 32–128 per worker).
/// A connection that becomes idle while this many are idle is closed.
pub(crate) const MAX_IDLE: usize = 64;

/// How often the sweep runs: an idle connection is closed between `POOL_IDLE_TIMEOUT` and
/// `POOL_IDLE_TIMEOUT` + this after its response ended.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(15);

/// Busy connections a [`Pool::take`] looks past before it gives up on the idle ones: the
/// oldest busy connections are the likeliest to be done, but one streaming a long response must
/// not hide the others.
const LOOK_PAST: usize = 4;

/// The connections of one upstream on one serving runtime.
pub(crate) struct Pool<B> {
    /// Locked only by the runtime that owns the pool (and its sweep), so never contended.
    conns: Mutex<Conns<B>>,
    /// Sweeps in a row a connection may stay idle.
    idle_sweeps: u64,
}

struct Conns<B> {
    /// Ready connections; the most recently used last, taken first (the others can expire).
    idle: Vec<Idle<B>>,
    /// Connections with a request in flight or a response body still being read, oldest first.
    busy: VecDeque<SendRequest<B>>,
    /// Sweeps so far: the pool's clock (no clock read per request).
    sweeps: u64,
    /// Whether a sweep task is running for this pool.
    sweeping: bool,
}

struct Idle<B> {
    sender: SendRequest<B>,
    /// The value of `sweeps` when the connection was found idle (it was busy at that sweep).
    since: u64,
}

impl<B: Send + 'static> Pool<B> {
    /// An empty pool whose idle connections are closed after `idle_timeout`.
    pub(crate) fn new(idle_timeout: Duration) -> Arc<Self> {
        Arc::new(Pool {
            conns: Mutex::new(Conns {
                idle: Vec::new(),
                busy: VecDeque::new(),
                sweeps: 0,
                sweeping: false,
            }),
            // Found idle during sweep interval k (after sweep k; it was busy at sweep k), closed
            // at sweep k + n + 1: idle for at least n and at most n + 1 intervals.
            idle_sweeps: idle_timeout
                .as_secs()
                .div_ceil(SWEEP_EVERY.as_secs().max(1)),
        })
    }

    /// A connection ready for a request, if one is idle. Connections found closed are dropped.
    pub(crate) fn take(&self) -> Option<SendRequest<B>> {
        let mut c = self.lock();
        c.promote(LOOK_PAST);
        if let Some(s) = c.pop_ready() {
            return Some(s);
        }
        // About to open a connection: worth a look at every busy one first.
        c.promote(usize::MAX);
        c.pop_ready()
    }

    /// Hands back a connection a request was just sent on: it is busy until hyper says it is
    /// ready for the next one.
    pub(crate) fn put(self: &Arc<Self>, sender: SendRequest<B>) {
        let mut c = self.lock();
        c.busy.push_back(sender);
        if !c.sweeping {
            c.sweeping = true;
            drop(c);
            tokio::spawn(sweep_task(Arc::downgrade(self)));
        }
    }

    /// Promotes the busy connections that are done, closes those idle too long and any beyond
    /// [`MAX_IDLE`].
    pub(crate) fn sweep(&self) {
        let mut c = self.lock();
        // Promoted now, a connection counts as idle since the interval that just ended.
        c.promote(usize::MAX);
        c.sweeps += 1;
        let Conns { idle, sweeps, .. } = &mut *c;
        let oldest = sweeps.saturating_sub(self.idle_sweeps);
        idle.retain(|i| i.since >= oldest && i.sender.is_ready());
    }

    /// Idle and busy connections held (tests).
    #[cfg(test)]
    pub(crate) fn counts(&self) -> (usize, usize) {
        let c = self.lock();
        (c.idle.len(), c.busy.len())
    }

    fn lock(&self) -> MutexGuard<'_, Conns<B>> {
        // The pool's state stays consistent at every step: a panic elsewhere does not poison it.
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<B> Conns<B> {
    /// Moves the busy connections that are ready to the idle ones and drops the closed ones,
    /// looking past at most `limit` that are still busy.
    fn promote(&mut self, limit: usize) {
        let mut still_busy = 0;
        for _ in 0..self.busy.len() {
            let Some(s) = self.busy.pop_front() else {
                break;
            };
            if s.is_ready() {
                if self.idle.len() < MAX_IDLE {
                    let since = self.sweeps;
                    self.idle.push(Idle { sender: s, since });
                }
            } else if !s.is_closed() {
                self.busy.push_back(s);
                still_busy += 1;
                if still_busy >= limit {
                    break;
                }
            }
        }
    }

    /// The most recently used idle connection that is still ready.
    fn pop_ready(&mut self) -> Option<SendRequest<B>> {
        while let Some(i) = self.idle.pop() {
            if i.sender.is_ready() {
                return Some(i.sender);
            }
        }
        None
    }
}

/// Sweeps the pool every [`SWEEP_EVERY`] until it is dropped (its upstream left the
/// configuration) or the runtime stops (then the next [`Pool::put`] starts another).
async fn sweep_task<B: Send + 'static>(pool: Weak<Pool<B>>) {
    struct Running<B: Send + 'static>(Weak<Pool<B>>);
    impl<B: Send + 'static> Drop for Running<B> {
        fn drop(&mut self) {
            if let Some(pool) = self.0.upgrade() {
                pool.lock().sweeping = false;
            }
        }
    }
    let running = Running(pool);
    let start = tokio::time::Instant::now() + SWEEP_EVERY;
    let mut every = tokio::time::interval_at(start, SWEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(pool) = running.0.upgrade() else {
            return;
        };
        pool.sweep();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::{Request, Response};
    use http_body_util::{BodyExt, Empty, Full};
    use hyper::body::Incoming;
    use hyper_util::rt::TokioIo;

    type Sender = SendRequest<Empty<Bytes>>;

    /// A connection to an in-memory HTTP/1.1 server that answers `ok` to everything.
    async fn connection() -> Sender {
        connection_answering(Bytes::from("ok")).await
    }

    /// A connection to an in-memory HTTP/1.1 server that answers `body` to everything.
    async fn connection_answering(body: Bytes) -> Sender {
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                let body = body.clone();
                async move { Ok::<_, std::convert::Infallible>(Response::new(Full::new(body))) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(server), svc)
                .await;
        });
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client))
            .await
            .unwrap();
        tokio::spawn(conn);
        sender
    }

    /// Sends one request through the pool and reads the answer to its end.
    async fn request(pool: &Arc<Pool<Empty<Bytes>>>, fresh: &mut usize) {
        let mut sender = match pool.take() {
            Some(s) => s,
            None => {
                *fresh += 1;
                connection().await
            }
        };
        let res = sender.try_send_request(Request::new(Empty::new()));
        pool.put(sender);
        let body = res.await.unwrap().into_body().collect().await.unwrap();
        assert_eq!(body.to_bytes(), "ok");
        settle().await;
    }

    /// Lets the connection tasks see the end of their exchanges.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn consecutive_requests_reuse_one_connection() {
        let pool = Pool::new(Duration::from_secs(90));
        let mut fresh = 0;
        for _ in 0..5 {
            request(&pool, &mut fresh).await;
        }
        assert_eq!(fresh, 1);
    }

    #[tokio::test]
    async fn a_connection_is_not_taken_while_its_response_is_being_read() {
        let pool = Pool::new(Duration::from_secs(90));
        // Larger than what hyper buffers: the connection stays busy until the body is read.
        let mut sender = connection_answering(Bytes::from(vec![b'x'; 1 << 20])).await;
        let res = sender.try_send_request(Request::new(Empty::new()));
        pool.put(sender);
        let res = res.await.unwrap();
        settle().await;
        assert!(pool.take().is_none(), "the response body is unread");
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.len(), 1 << 20);
        settle().await;
        assert!(
            pool.take().is_some(),
            "read to its end, the connection is idle"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_are_closed_after_the_idle_timeout() {
        let pool = Pool::new(Duration::from_secs(90));
        let mut fresh = 0;
        request(&pool, &mut fresh).await;
        pool.sweep();
        assert_eq!(pool.counts(), (1, 0), "found idle");
        for _ in 0..5 {
            pool.sweep();
        }
        assert_eq!(pool.counts(), (1, 0), "idle for 6 sweeps (90 s): kept");
        pool.sweep();
        assert_eq!(pool.counts(), (0, 0), "idle for 7 sweeps: closed");
        // The sweep task does the same on its own.
        request(&pool, &mut fresh).await;
        tokio::time::sleep(Duration::from_secs(90) + 2 * SWEEP_EVERY).await;
        assert_eq!(pool.counts(), (0, 0));
        assert_eq!(fresh, 2);
    }

    #[tokio::test]
    async fn at_most_max_idle_connections_are_kept() {
        let pool = Pool::new(Duration::from_secs(90));
        // MAX_IDLE + 3 requests in flight at once, so each needs its own connection.
        let mut pending = Vec::new();
        for _ in 0..MAX_IDLE + 3 {
            let mut sender = connection().await;
            pending.push(sender.try_send_request(Request::new(Empty::new())));
            pool.put(sender);
        }
        for res in pending {
            res.await.unwrap().into_body().collect().await.unwrap();
        }
        settle().await;
        pool.sweep();
        assert_eq!(pool.counts(), (MAX_IDLE, 0));
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_never_taken() {
        let pool = Pool::new(Duration::from_secs(90));
        let (client, server) = tokio::io::duplex(1024);
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(client))
                .await
                .unwrap();
        tokio::spawn(conn);
        let res = sender.try_send_request(Request::new(Empty::new()));
        pool.put(sender);
        drop(server);
        assert!(res.await.is_err());
        settle().await;
        assert!(pool.take().is_none());
        assert_eq!(pool.counts(), (0, 0), "dropped once found closed");
    }
}
