//! Body types shared by every module, and helpers for the small answers coatcheck writes itself.
//!
//! Streaming is the rule: an upstream's body ([`Incoming`]) passes through untouched; only
//! coatcheck's own answers are [`Full`].

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body::{Frame, SizeHint};
use http_body_util::{Either, Full, Limited};
use hyper::body::Incoming;

/// A response body: streamed from the upstream (cut when it stalls), or written by coatcheck.
pub(crate) type Body = Either<Stalling<Incoming>, Own>;

/// A body coatcheck writes itself: all at once, or as a stream of chunks (event streams) that
/// ends when its sender is dropped.
pub(crate) enum Own {
    Full(Full<Bytes>),
    Stream(tokio::sync::mpsc::Receiver<Bytes>),
}

impl http_body::Body for Own {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            Own::Full(f) => Pin::new(f).poll_frame(cx),
            Own::Stream(rx) => rx.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Own::Full(f) => f.is_end_stream(),
            Own::Stream(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Own::Full(f) => f.size_hint(),
            Own::Stream(_) => SizeHint::default(),
        }
    }
}

/// A streamed body fed through the returned sender (dropping it ends the body).
pub(crate) fn stream(buffer: usize) -> (tokio::sync::mpsc::Sender<Bytes>, Body) {
    let (tx, rx) = tokio::sync::mpsc::channel(buffer);
    (tx, Either::Right(Own::Stream(rx)))
}

/// A request body on its way upstream: the client's stream (cut when it stalls, what had already
/// arrived judged first) under the route's size limit, or a buffered copy (small bodies kept for
/// one replay after a refresh, and every empty body).
///
/// The stream is boxed: hyper's client moves the request about ten times on its way to the
/// connection (its channel's envelope, the dispatcher), and the stream's state (120 bytes) would
/// be part of every move. An empty body (a `GET`) is an empty [`Full`] and allocates nothing.
pub(crate) type UpstreamBody = Either<Box<Limited<Primed<Stalling<Incoming>>>>, Full<Bytes>>;

/// Which peer a streamed body comes from: its failures are that peer's fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// The browser or API client (request bodies): a failure is a 4xx.
    Client,
    /// The upstream (response bodies): a failure is a 502.
    Upstream,
}

/// A streamed body failed: it stalled, or its framing broke (a malformed chunk, a cut connection).
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    /// No byte moved for the idle limit (`server.limits.body_idle_timeout`).
    #[error("the {side:?} body stalled for {idle:?}")]
    Stalled { side: Side, idle: Duration },
    /// Reading the body failed (for a client: malformed chunked framing, a cut connection).
    #[error("reading the {side:?} body failed")]
    Read {
        side: Side,
        #[source]
        source: hyper::Error,
    },
}

impl BodyError {
    /// The peer that caused the failure.
    pub(crate) fn side(&self) -> Side {
        match self {
            BodyError::Stalled { side, .. } | BodyError::Read { side, .. } => *side,
        }
    }
}

/// A streamed body that fails with [`BodyError::Stalled`] once no frame has arrived for `idle`
/// while the reader waits for one, so a peer sending a byte every half-minute cannot hold a slot
/// forever. Read errors are tagged with the [`Side`] they come from.
///
/// The idle period starts when the reader finds nothing new (the first pending poll after a
/// frame), so a body whose frames are ready when asked for never reads the clock; the timer is
/// armed only when the inner body is pending and is re-armed lazily, at most once per `idle`.
pub(crate) struct Stalling<B> {
    inner: B,
    side: Side,
    idle: Duration,
    /// Since when the reader has been waiting with no new frame; `None`: a frame came since it
    /// last waited (or it never has).
    waiting_since: Option<Instant>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> Stalling<B> {
    /// The wrapped body.
    pub(crate) fn inner(&self) -> &B {
        &self.inner
    }

    pub(crate) fn new(inner: B, side: Side, idle: Duration) -> Self {
        Stalling {
            inner,
            side,
            idle,
            waiting_since: None,
            timer: None,
        }
    }

    /// Whether the body has been idle too long (polls the timer so the task is woken later).
    fn stalled(&mut self, cx: &mut Context<'_>) -> bool {
        let since = *self.waiting_since.get_or_insert_with(Instant::now);
        let deadline = since + self.idle;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.into())));
        loop {
            if timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            if Instant::now() >= deadline {
                return true;
            }
            timer.as_mut().reset(deadline.into());
        }
    }
}

impl<B> http_body::Body for Stalling<B>
where
    B: http_body::Body<Data = Bytes, Error = hyper::Error> + Unpin,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.waiting_since = None;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(source))) => Poll::Ready(Some(Err(BodyError::Read {
                side: this.side,
                source,
            }))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if this.stalled(cx) {
                    return Poll::Ready(Some(Err(BodyError::Stalled {
                        side: this.side,
                        idle: this.idle,
                    })));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Something that watches a body stream by: told of every frame that is ready and of the end.
/// Dropping the watcher is its last word (the body was dropped, finished or not).
pub(crate) trait Watch {
    /// A poll came back ready: `data` bytes of data (0 for trailers or an error), or the end.
    fn ready(&mut self, data: usize, end: bool);
}

/// A body passed through unchanged while a [`Watch`] observes it (access log, in-flight guard,
/// upload progress): one wrapper instead of one per concern.
pub(crate) struct Watched<B, W> {
    inner: B,
    watch: W,
}

impl<B, W> Watched<B, W> {
    pub(crate) fn new(inner: B, watch: W) -> Self {
        Watched { inner, watch }
    }
}

impl<B: http_body::Body<Data = Bytes> + Unpin, W: Watch + Unpin> http_body::Body for Watched<B, W> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => this
                .watch
                .ready(frame.data_ref().map_or(0, |d| d.len()), false),
            Poll::Ready(Some(Err(_))) => this.watch.ready(0, false),
            Poll::Ready(None) => this.watch.ready(0, true),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A body whose first frames were read before the upstream request was opened, then replayed
/// ahead of the rest of the stream.
///
/// [`Primed::prime`] reads the body until it ends, `max` bytes have come, or it pauses for `gap`:
/// a request whose body arrives with its head (the usual case, and every smuggling payload) has
/// its chunked framing judged in full before the upstream sees a byte, so a malformed body is a
/// 400 from coatcheck and never a half-request upstream. A body still on its way (a slow upload,
/// a bidirectional stream) is forwarded after at most one `gap` of delay and streams as before.
pub(crate) struct Primed<B> {
    ready: std::collections::VecDeque<Frame<Bytes>>,
    inner: B,
}

impl<B> Primed<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    /// Reads `inner` until it ends, holds `max` data bytes, or pauses for `gap`.
    pub(crate) async fn prime(
        mut inner: B,
        max: usize,
        gap: Duration,
    ) -> Result<Primed<B>, B::Error> {
        use http_body_util::BodyExt as _;
        let mut ready = std::collections::VecDeque::new();
        let mut bytes = 0;
        while bytes < max && !inner.is_end_stream() {
            match tokio::time::timeout(gap, inner.frame()).await {
                Ok(Some(Ok(frame))) => {
                    bytes += frame.data_ref().map_or(0, Bytes::len);
                    ready.push_back(frame);
                }
                Ok(Some(Err(e))) => return Err(e),
                Ok(None) | Err(_) => break,
            }
        }
        Ok(Primed { ready, inner })
    }
}

impl<B> http_body::Body for Primed<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        if let Some(frame) = self.ready.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.ready.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let buffered: u64 = self
            .ready
            .iter()
            .filter_map(|f| f.data_ref())
            .map(|d| d.len() as u64)
            .sum();
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + buffered);
        if let Some(u) = inner.upper() {
            hint.set_upper(u + buffered);
        }
        hint
    }
}

/// A body coatcheck wrote itself.
pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Either::Right(Own::Full(Full::new(bytes.into())))
}

/// An empty body.
pub(crate) fn empty() -> Body {
    full(Bytes::new())
}

/// A JSON response with `Cache-Control: no-store` (coatcheck's answers are per-user or transient).
pub(crate) fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut res = Response::new(full(serde_json::to_vec(value).unwrap_or_default()));
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// An HTML response (login failure pages, the post-login bounce page), never cached, never framed,
/// never leaking the URL through `Referer`.
pub(crate) fn html(status: StatusCode, page: String) -> Response<Body> {
    let mut res = Response::new(full(page));
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; frame-ancestors 'none'"),
    );
    res
}

/// A redirect (`302 Found` unless told otherwise) to `location`, never cached.
pub(crate) fn redirect(status: StatusCode, location: &str) -> Response<Body> {
    let mut res = Response::new(empty());
    *res.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(location) {
        res.headers_mut().insert(header::LOCATION, v);
    }
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// Escapes text for inclusion in HTML (element content or a quoted attribute).
pub(crate) fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;
    use std::collections::VecDeque;

    /// A body that answers from a script: `Some` a frame, `None` (and an empty script) pending.
    struct Script(VecDeque<Option<&'static str>>);

    impl http_body::Body for Script {
        type Data = Bytes;
        type Error = hyper::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
            match self.0.pop_front() {
                Some(Some(data)) => {
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(data.as_bytes())))))
                }
                _ => Poll::Pending,
            }
        }
    }

    /// Polls once: `Some(true)` a frame, `Some(false)` stalled, `None` pending.
    fn poll_once(body: &mut Stalling<Script>) -> Option<bool> {
        let waker = std::task::Waker::noop();
        match Pin::new(body).poll_frame(&mut Context::from_waker(waker)) {
            Poll::Ready(Some(Ok(_))) => Some(true),
            Poll::Ready(Some(Err(BodyError::Stalled { .. }))) => Some(false),
            Poll::Pending => None,
            other => panic!("unexpected {:?}", other.map(|f| f.map(|r| r.is_ok()))),
        }
    }

    #[tokio::test]
    async fn a_body_is_cut_once_the_reader_has_waited_idle_with_no_frame() {
        // Real time: the idle clock is the monotonic clock, which tokio's paused time does not move.
        let idle = Duration::from_millis(1000);
        let pause = |ms| tokio::time::sleep(Duration::from_millis(ms));
        let script = ["a", "", "b", "", ""].map(|s| (!s.is_empty()).then_some(s));
        let mut body = Stalling::new(Script(script.into()), Side::Upstream, idle);
        assert_eq!(poll_once(&mut body), Some(true));
        // The reader was busy elsewhere, longer than `idle`: that is not waiting for the body.
        pause(1500).await;
        assert_eq!(poll_once(&mut body), None);
        pause(600).await;
        // A frame restarts the period.
        assert_eq!(poll_once(&mut body), Some(true));
        assert_eq!(poll_once(&mut body), None);
        pause(600).await;
        assert_eq!(
            poll_once(&mut body),
            None,
            "0.6 s of waiting since the last frame"
        );
        pause(800).await;
        assert_eq!(poll_once(&mut body), Some(false), "1.4 s");
    }

    #[test]
    fn html_escaping_covers_markup_and_quotes() {
        assert_eq!(
            super::escape_html("<script>\"'&"),
            "&lt;script&gt;&quot;&#39;&amp;"
        );
    }
}
