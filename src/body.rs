//! Body types shared by every module, and helpers for the small answers coatcheck writes itself.
//!
//! Streaming is the rule: an upstream's body ([`Incoming`]) passes through untouched; only
//! coatcheck's own answers are [`Full`].

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body::{Frame, SizeHint};
use http_body_util::{Either, Full, Limited};
use hyper::body::Incoming;

/// A response body: streamed from the upstream, or written by coatcheck.
pub type Body = Either<Incoming, Full<Bytes>>;

/// A request body on its way upstream: the client's stream under the route's size limit, or a
/// buffered copy (small bodies kept for one replay after a refresh).
pub type UpstreamBody = Either<Limited<Incoming>, Full<Bytes>>;

/// Something that watches a body stream by: told of every frame that is ready and of the end.
/// Dropping the watcher is its last word (the body was dropped, finished or not).
pub trait Watch {
    /// A poll came back ready: `data` bytes of data (0 for trailers or an error), or the end.
    fn ready(&mut self, data: usize, end: bool);
}

/// A body passed through unchanged while a [`Watch`] observes it (access log, in-flight guard,
/// upload progress): one wrapper instead of one per concern.
pub struct Watched<B, W> {
    inner: B,
    watch: W,
}

impl<B, W> Watched<B, W> {
    pub fn new(inner: B, watch: W) -> Self {
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

/// A body coatcheck wrote itself.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Either::Right(Full::new(bytes.into()))
}

/// An empty body.
pub fn empty() -> Body {
    Either::Right(Full::new(Bytes::new()))
}

/// A JSON response with `Cache-Control: no-store` (coatcheck's answers are per-user or transient).
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
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
pub fn html(status: StatusCode, page: String) -> Response<Body> {
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
pub fn redirect(status: StatusCode, location: &str) -> Response<Body> {
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
pub fn escape_html(s: &str) -> String {
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
    #[test]
    fn html_escaping_covers_markup_and_quotes() {
        assert_eq!(
            super::escape_html("<script>\"'&"),
            "&lt;script&gt;&quot;&#39;&amp;"
        );
    }
}
