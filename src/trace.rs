//! Distributed tracing: W3C Trace Context propagation (always on) and optional OTLP span export.
//!
//! Every request is one *hop*: a valid incoming `traceparent` (W3C Trace Context §3.2) keeps its
//! trace id; a missing, repeated or malformed one starts a new trace (and its `tracestate` is
//! dropped, §3.3.1). Coatcheck gives its hop a span id of its own and sends the upstream a
//! `traceparent` naming that span (or, with export on, the `upstream` client span) as parent, the
//! flags kept and `tracestate` unchanged. Identity-provider calls made while serving the request
//! carry a child span of the same trace; background calls (discovery, JWKS) start their own.
//!
//! The hop travels with the request's task (`scope`), so the modules to the right (`auth`,
//! `proxy`) reach it without new parameters. Without export the cost is one hand-rolled parse,
//! two draws from a thread-local generator and the one outgoing header value.
//!
//! With export on (`init`), spans go through the OpenTelemetry SDK to an OTLP/HTTP (protobuf)
//! collector: one server span per request named after the route (never the raw path), and
//! children `session.lookup`, `session.refresh`, `upstream` and `idp.<endpoint>`. No attribute
//! ever holds a header value, a query string, a token, a cookie or a secret: only the fixed
//! names below, route names from the config, host names, status codes and outcome labels.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId,
    TraceState, Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

/// `traceparent` (W3C Trace Context §3.2).
pub(crate) static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// `tracestate` (W3C Trace Context §3.3).
pub(crate) static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Length of a version-00 `traceparent`: `vv-<32 hex>-<16 hex>-ff`.
const TRACEPARENT_LEN: usize = 55;
/// The `sampled` bit of the trace flags.
const SAMPLED: u8 = 0x01;

/// A parsed `traceparent`: trace id, parent span id, trace flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TraceParent {
    pub(crate) trace_id: [u8; 16],
    pub(crate) span_id: [u8; 8],
    pub(crate) flags: u8,
}

impl TraceParent {
    /// Parses a `traceparent` value by hand (W3C Trace Context §3.2.2): lowercase hex only,
    /// version `ff` refused, all-zero ids refused, version 00 exactly 55 bytes, a later version
    /// at least 55 bytes with a `-` after the flags. Never panics; `None` means "start a trace".
    pub(crate) fn parse(v: &[u8]) -> Option<TraceParent> {
        if v.len() < TRACEPARENT_LEN {
            return None;
        }
        let version = hex_byte(v[0], v[1])?;
        let tail_ok = match version {
            0xff => false,
            0x00 => v.len() == TRACEPARENT_LEN,
            _ => v.len() == TRACEPARENT_LEN || v[TRACEPARENT_LEN] == b'-',
        };
        if !tail_ok || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
            return None;
        }
        let mut trace_id = [0u8; 16];
        for (i, b) in trace_id.iter_mut().enumerate() {
            *b = hex_byte(v[3 + 2 * i], v[4 + 2 * i])?;
        }
        let mut span_id = [0u8; 8];
        for (i, b) in span_id.iter_mut().enumerate() {
            *b = hex_byte(v[36 + 2 * i], v[37 + 2 * i])?;
        }
        let flags = hex_byte(v[53], v[54])?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            span_id,
            flags,
        })
    }

    /// The one valid `traceparent` among `headers` (two or more are invalid, §3.2.1).
    pub(crate) fn from_headers(headers: &HeaderMap) -> Option<TraceParent> {
        let mut all = headers.get_all(&TRACEPARENT).iter();
        let first = all.next()?;
        if all.next().is_some() {
            return None;
        }
        TraceParent::parse(first.as_bytes())
    }

    /// The version-00 header value.
    pub(crate) fn to_header(self) -> HeaderValue {
        // 00-<32 hex trace id>-<16 hex span id>-<2 hex flags>
        let mut out: [u8; TRACEPARENT_LEN] =
            *b"00-________________________________-________________-__";
        crate::secret::hex_into(&self.trace_id, &mut out[3..35]);
        crate::secret::hex_into(&self.span_id, &mut out[36..52]);
        crate::secret::hex_into(&[self.flags], &mut out[53..55]);
        // Only ASCII hex digits and dashes: always a valid header value.
        crate::proxy::headers::shared_value(out).unwrap_or(HeaderValue::from_static(""))
    }
}

/// One lowercase hex pair (§3.2.2.1: uppercase is invalid).
fn hex_byte(hi: u8, lo: u8) -> Option<u8> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    Some(nibble(hi)? << 4 | nibble(lo)?)
}

thread_local! {
    /// wyrand state, seeded per thread from the operating system's generator (through aws-lc).
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let mut b = [0u8; 8];
    // The system generator does not fail on supported platforms; a fixed odd seed still gives
    // distinct ids per draw (ids need to be unique, not secret).
    if aws_lc_rs::rand::fill(&mut b).is_err() {
        return 0x9e37_79b9_7f4a_7c15;
    }
    u64::from_le_bytes(b)
}

/// wyrand (Wang Yi): a fast, well-distributed 64-bit generator; ids are not secrets.
fn next_u64() -> u64 {
    RNG.with(|s| {
        let x = s.get().wrapping_add(0xa076_1d64_78bd_642f);
        s.set(x);
        let t = u128::from(x) * u128::from(x ^ 0xe703_7ed1_a0b4_28db);
        (t >> 64) as u64 ^ t as u64
    })
}

fn new_span_id() -> [u8; 8] {
    loop {
        let v = next_u64();
        if v != 0 {
            return v.to_be_bytes();
        }
    }
}

fn new_trace_id() -> [u8; 16] {
    loop {
        let v = (u128::from(next_u64()) << 64) | u128::from(next_u64());
        if v != 0 {
            return v.to_be_bytes();
        }
    }
}

/// The SDK's ids come from the same thread-local generator (no global lock).
#[derive(Debug)]
struct FastIds;

impl opentelemetry_sdk::trace::IdGenerator for FastIds {
    fn new_trace_id(&self) -> TraceId {
        TraceId::from_bytes(new_trace_id())
    }
    fn new_span_id(&self) -> SpanId {
        SpanId::from_bytes(new_span_id())
    }
}

/// The export pipeline, set once at start-up when `[telemetry]` or the environment asks for it.
struct Export {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

static EXPORT: OnceLock<Export> = OnceLock::new();

fn tracer() -> Option<&'static SdkTracer> {
    EXPORT.get().map(|e| &e.tracer)
}

/// The trace context of the request being served, carried by its task.
pub(crate) struct Hop {
    /// This hop's trace id, span id and flags (the server span's, with export on).
    own: TraceParent,
    /// Whether the client sent a valid `traceparent` (else its `tracestate` is dropped).
    continued: bool,
    /// With export on: the server span's context, parent of the children.
    cx: Option<Context>,
    /// The span context IdP calls hang under (the refresh span while it is open).
    idp_parent: RefCell<Option<Context>>,
    /// Whether the session lookup was served from the cache (set by `session`).
    cache_hit: Cell<Option<bool>>,
}

tokio::task_local! {
    static HOP: Hop;
}

/// The server span of one request; ends when dropped (the access log holds it until the
/// response body has been sent).
#[derive(Debug, Default)]
pub(crate) struct ServerSpan(Option<Box<opentelemetry_sdk::trace::Span>>);

impl ServerSpan {
    /// Names the span after the route (`GET /api/`) and records the route's auth mode.
    pub(crate) fn set_route(&mut self, method: &http::Method, route: &str, auth: &'static str) {
        if let Some(s) = &mut self.0 {
            s.update_name(format!("{method} {route}"));
            s.set_attribute(KeyValue::new("http.route", route.to_owned()));
            s.set_attribute(KeyValue::new("coatcheck.auth", auth));
        }
    }

    /// Records the answer: status code, result (the error code or `ok`), Error status on 5xx.
    pub(crate) fn finish(&mut self, status: u16, error: Option<&'static str>) {
        if let Some(s) = &mut self.0 {
            s.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
            s.set_attribute(KeyValue::new("coatcheck.result", error.unwrap_or("ok")));
            if status >= 500 {
                s.set_status(Status::error(error.unwrap_or("server error")));
            }
        }
    }
}

/// What the router knows about a request when it starts its hop.
pub(crate) struct RequestInfo<'a> {
    pub(crate) method: &'a http::Method,
    pub(crate) version: http::Version,
    /// For the `:authority` of an HTTP/2 request without `Host`.
    pub(crate) uri: &'a http::Uri,
    pub(crate) request_id: &'a HeaderValue,
    /// Whether the head holds a `traceparent` (when it does not, none is looked for).
    pub(crate) traceparent: bool,
}

/// Starts the hop of a request: continues the client's trace or starts one.
pub(crate) fn start(headers: &HeaderMap, info: &RequestInfo<'_>) -> (Hop, ServerSpan) {
    let parent = if info.traceparent {
        TraceParent::from_headers(headers)
    } else {
        None
    };
    let Some(tracer) = tracer() else {
        let own = TraceParent {
            trace_id: parent.map_or_else(new_trace_id, |p| p.trace_id),
            span_id: new_span_id(),
            flags: parent.map_or(SAMPLED, |p| p.flags),
        };
        return (hop(own, parent.is_some(), None), ServerSpan(None));
    };
    let parent_cx = match parent {
        Some(p) => Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from_bytes(p.trace_id),
            SpanId::from_bytes(p.span_id),
            TraceFlags::new(p.flags),
            true,
            TraceState::NONE,
        )),
        None => Context::new(),
    };
    let version = match info.version {
        http::Version::HTTP_2 => "2",
        http::Version::HTTP_10 => "1.0",
        _ => "1.1",
    };
    let mut attributes = vec![
        KeyValue::new("http.request.method", info.method.as_str().to_owned()),
        KeyValue::new("url.scheme", "https"),
        KeyValue::new("network.protocol.version", version),
        KeyValue::new(
            "coatcheck.request_id",
            info.request_id.to_str().unwrap_or("-").to_owned(),
        ),
    ];
    let host = headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| info.uri.authority().map(|a| a.as_str()));
    // The Host is screened (and refused if malformed) only after this: keep it short.
    if let Some(host) = host.filter(|h| h.len() <= 255) {
        let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
        attributes.push(KeyValue::new("server.address", host.to_owned()));
    }
    let span = tracer
        .span_builder(info.method.as_str().to_owned())
        .with_kind(SpanKind::Server)
        .with_attributes(attributes)
        .start_with_context(tracer, &parent_cx);
    let sc = span.span_context().clone();
    let own = TraceParent {
        trace_id: sc.trace_id().to_bytes(),
        span_id: sc.span_id().to_bytes(),
        flags: sc.trace_flags().to_u8(),
    };
    let cx = Context::new().with_remote_span_context(SpanContext::new(
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags(),
        false,
        TraceState::NONE,
    ));
    (
        hop(own, parent.is_some(), Some(cx)),
        ServerSpan(Some(Box::new(span))),
    )
}

fn hop(own: TraceParent, continued: bool, cx: Option<Context>) -> Hop {
    Hop {
        own,
        continued,
        cx,
        idp_parent: RefCell::new(None),
        cache_hit: Cell::new(None),
    }
}

/// Runs `f` (the handling of one request) with `hop` as its trace context.
pub(crate) fn scope<F: Future>(hop: Hop, f: F) -> impl Future<Output = F::Output> {
    HOP.scope(hop, f)
}

/// A child span (with export on and a sampled parent); ends when dropped.
#[derive(Debug, Default)]
pub(crate) struct ChildSpan {
    /// Boxed: a span is a few hundred bytes, and the request's futures move this around on every
    /// request even when export is off (`None`).
    span: Option<Box<opentelemetry_sdk::trace::Span>>,
    /// The `traceparent` naming this span (or the hop, without export) for an outgoing call.
    traceparent: Option<HeaderValue>,
}

impl ChildSpan {
    /// Adds an attribute (fixed names and non-secret values only: see the module docs).
    pub(crate) fn set(&mut self, key: &'static str, value: impl Into<opentelemetry::Value>) {
        if let Some(s) = &mut self.span {
            s.set_attribute(KeyValue::new(key, value));
        }
    }

    /// Marks the span failed, with a short reason (an error code, never a message from a peer).
    pub(crate) fn fail(&mut self, reason: &'static str) {
        if let Some(s) = &mut self.span {
            s.set_status(Status::error(reason));
        }
    }

    /// The `traceparent` to send with the call this span stands for.
    pub(crate) fn traceparent(&self) -> Option<&HeaderValue> {
        self.traceparent.as_ref()
    }
}

/// A child of the current request's server span, or `None` outside a request.
fn child_of_hop(name: &'static str, kind: SpanKind, attrs: Vec<KeyValue>) -> Option<ChildSpan> {
    HOP.try_with(|hop| {
        let Some((tracer, cx)) = tracer().zip(hop.cx.as_ref()) else {
            return ChildSpan {
                span: None,
                traceparent: None,
            };
        };
        let parent = hop.idp_parent.borrow();
        let cx = if matches!(kind, SpanKind::Client) && name.starts_with("idp.") {
            parent.as_ref().unwrap_or(cx)
        } else {
            cx
        };
        let span = tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attrs)
            .start_with_context(tracer, cx);
        ChildSpan {
            traceparent: Some(traceparent_of(span.span_context())),
            span: Some(Box::new(span)),
        }
    })
    .ok()
}

fn traceparent_of(sc: &SpanContext) -> HeaderValue {
    TraceParent {
        trace_id: sc.trace_id().to_bytes(),
        span_id: sc.span_id().to_bytes(),
        flags: sc.trace_flags().to_u8(),
    }
    .to_header()
}

/// The `session.lookup` span; the cache outcome is added when it ends.
pub(crate) struct LookupSpan(ChildSpan);

/// Starts `session.lookup` (a no-op without export).
pub(crate) fn session_lookup() -> LookupSpan {
    LookupSpan(child_of_hop("session.lookup", SpanKind::Internal, Vec::new()).unwrap_or_default())
}

impl Drop for LookupSpan {
    fn drop(&mut self) {
        if self.0.span.is_some()
            && let Ok(Some(hit)) = HOP.try_with(|h| h.cache_hit.take())
        {
            self.0
                .set("coatcheck.session.cache", if hit { "hit" } else { "miss" });
        }
    }
}

/// Notes whether the session lookup of the current request was a cache hit.
pub(crate) fn note_cache(hit: bool) {
    let _ = HOP.try_with(|h| h.cache_hit.set(Some(hit)));
}

/// The `session.refresh` span: while it is open, IdP calls of this request hang under it.
pub(crate) struct RefreshSpan(ChildSpan);

/// Starts `session.refresh` (a no-op without export).
pub(crate) fn session_refresh() -> RefreshSpan {
    let span = child_of_hop("session.refresh", SpanKind::Internal, Vec::new()).unwrap_or_default();
    if let Some(s) = &span.span {
        let sc = s.span_context().clone();
        let _ = HOP.try_with(|h| {
            *h.idp_parent.borrow_mut() = Some(Context::new().with_remote_span_context(sc));
        });
    }
    RefreshSpan(span)
}

impl RefreshSpan {
    /// Records how the refresh ended (`ok` or an error code).
    pub(crate) fn outcome(&mut self, outcome: &'static str) {
        self.0.set("coatcheck.refresh.outcome", outcome);
        if outcome != "ok" && outcome != "session_expired" {
            self.0.fail(outcome);
        }
    }
}

impl Drop for RefreshSpan {
    fn drop(&mut self) {
        if self.0.span.is_some() {
            let _ = HOP.try_with(|h| h.idp_parent.borrow_mut().take());
        }
    }
}

/// The `upstream` client span and the `traceparent`/`tracestate` the upstream request carries:
/// the hop's (or this span's) trace, `tracestate` dropped when the client's trace was not valid.
/// Outside a request the headers are left as they are. `tracestate`: whether the headers may hold a
/// `tracestate` (when they do not, there is nothing to drop and none is looked for).
pub(crate) fn upstream(
    headers: &mut HeaderMap,
    authority: &HeaderValue,
    tracestate: bool,
) -> ChildSpan {
    let mut attrs = Vec::new();
    if tracer().is_some()
        && let Ok(a) = authority.to_str()
        && let Ok(a) = a.parse::<http::uri::Authority>()
    {
        attrs.push(KeyValue::new("server.address", a.host().to_owned()));
        if let Some(p) = a.port_u16() {
            attrs.push(KeyValue::new("server.port", i64::from(p)));
        }
    }
    let span = child_of_hop("upstream", SpanKind::Client, attrs);
    let hop = HOP.try_with(|h| (h.own, h.continued));
    if let (Some(span), Ok((own, continued))) = (span, hop) {
        let value = span.traceparent.clone().unwrap_or_else(|| own.to_header());
        headers.insert(TRACEPARENT.clone(), value);
        if !continued && tracestate {
            headers.remove(&TRACESTATE);
        }
        return span;
    }
    ChildSpan::default()
}

/// The `idp.<endpoint>` client span of an identity-provider (or capture API) call, with the
/// `traceparent` to send: a child of the current request's trace, or a new trace outside one.
pub(crate) fn idp(name: &'static str, url: &str) -> ChildSpan {
    let mut attrs = Vec::new();
    if tracer().is_some()
        && let Ok(url) = url::Url::parse(url)
    {
        if let Some(h) = url.host_str() {
            attrs.push(KeyValue::new("server.address", h.to_owned()));
        }
        if let Some(p) = url.port_or_known_default() {
            attrs.push(KeyValue::new("server.port", i64::from(p)));
        }
    }
    if let Some(mut span) = child_of_hop(name, SpanKind::Client, attrs.clone()) {
        if span.traceparent.is_none() {
            // Without export: a fresh span id in the request's trace.
            let own = HOP.try_with(|h| h.own).ok();
            span.traceparent = own.map(|own| {
                TraceParent {
                    span_id: new_span_id(),
                    ..own
                }
                .to_header()
            });
        }
        return span;
    }
    // A background call: a trace of its own.
    match tracer() {
        Some(t) => {
            let span = t
                .span_builder(name)
                .with_kind(SpanKind::Client)
                .with_attributes(attrs)
                .start_with_context(t, &Context::new());
            ChildSpan {
                traceparent: Some(traceparent_of(span.span_context())),
                span: Some(Box::new(span)),
            }
        }
        None => ChildSpan {
            span: None,
            traceparent: Some(
                TraceParent {
                    trace_id: new_trace_id(),
                    span_id: new_span_id(),
                    flags: SAMPLED,
                }
                .to_header(),
            ),
        },
    }
}

/// `request` with the `traceparent` of `span`, if any.
pub(crate) fn traced(
    request: reqwest::RequestBuilder,
    span: &ChildSpan,
) -> reqwest::RequestBuilder {
    match span.traceparent() {
        Some(v) => request.header(&TRACEPARENT, v.clone()),
        None => request,
    }
}

/// Where and how spans are exported; from `[telemetry]` and the `OTEL_*` environment.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ExportSettings {
    /// The full traces URL (`…/v1/traces`), or `None` to let `OTEL_EXPORTER_OTLP_*` decide.
    pub(crate) endpoint: Option<String>,
    pub(crate) service_name: String,
    pub(crate) sample_ratio: f64,
    pub(crate) timeout: Duration,
}

/// Errors of starting the export pipeline.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TraceError {
    #[error("cannot build the OTLP HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(#[source] opentelemetry_otlp::ExporterBuildError),
}

/// Starts span export (call once, inside the tokio runtime). `None` settings leave it off.
pub(crate) fn init(settings: Option<&ExportSettings>) -> Result<bool, TraceError> {
    use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
    use opentelemetry_sdk::trace::{Sampler, span_processor_with_async_runtime};
    let Some(s) = settings else { return Ok(false) };
    if EXPORT.get().is_some() {
        return Ok(true);
    }
    let client = reqwest::Client::builder()
        .timeout(s.timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(TraceError::Client)?;
    let mut builder = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_timeout(s.timeout);
    if let Some(e) = &s.endpoint {
        builder = builder.with_endpoint(e.clone());
    }
    let exporter = builder.build().map_err(TraceError::Exporter)?;
    let processor = span_processor_with_async_runtime::BatchSpanProcessor::builder(
        exporter,
        opentelemetry_sdk::runtime::Tokio,
    )
    .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_id_generator(FastIds)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            s.sample_ratio,
        ))))
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(s.service_name.clone())
                .build(),
        )
        .build();
    let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "coatcheck");
    let _ = EXPORT.set(Export { provider, tracer });
    Ok(true)
}

/// Exports the spans still queued and stops the exporter (at shutdown).
pub(crate) async fn shutdown() {
    let Some(e) = EXPORT.get() else { return };
    let provider = e.provider.clone();
    // The SDK's shutdown blocks on the export task: keep it off the runtime's workers.
    let done = tokio::task::spawn_blocking(move || provider.shutdown());
    match tokio::time::timeout(Duration::from_secs(10), done).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "span export did not shut down cleanly"),
        Ok(Err(e)) => tracing::warn!(error = %e, "span export shutdown failed"),
        Err(_) => tracing::warn!("span export shutdown timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn parse(s: &str) -> Option<TraceParent> {
        TraceParent::parse(s.as_bytes())
    }

    #[test]
    fn a_valid_traceparent_is_parsed_and_written_back_the_same() {
        let p = parse(VALID).expect("valid");
        assert_eq!(p.trace_id[0], 0x4b);
        assert_eq!(p.span_id[7], 0xb7);
        assert_eq!(p.flags, 1);
        assert_eq!(p.to_header().to_str().unwrap(), VALID);
    }

    #[test]
    fn uppercase_hex_is_refused() {
        assert!(parse(&VALID.to_uppercase()).is_none());
        assert!(parse("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01").is_none());
    }

    #[test]
    fn all_zero_ids_are_refused() {
        assert!(parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none());
        assert!(parse("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01").is_none());
    }

    #[test]
    fn versions_follow_the_forward_compatibility_rules() {
        assert!(parse(&VALID.replacen("00", "ff", 1)).is_none());
        assert!(parse(&VALID.replacen("00", "0g", 1)).is_none());
        // Version 00 is exactly 55 bytes; a later version may carry more after a dash.
        assert!(parse(&format!("{VALID}-x")).is_none());
        let v1 = VALID.replacen("00", "01", 1);
        assert!(parse(&v1).is_some());
        assert!(parse(&format!("{v1}-future")).is_some());
        assert!(parse(&format!("{v1}x")).is_none());
    }

    #[test]
    fn wrong_lengths_and_separators_are_refused() {
        assert!(parse("").is_none());
        assert!(parse(&VALID[..54]).is_none());
        assert!(parse(&VALID.replace('-', "_")).is_none());
        assert!(parse("00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01").is_none());
    }

    #[test]
    fn two_traceparent_headers_are_invalid() {
        let mut h = HeaderMap::new();
        h.append(&TRACEPARENT, HeaderValue::from_static(VALID));
        assert!(TraceParent::from_headers(&h).is_some());
        h.append(&TRACEPARENT, HeaderValue::from_static(VALID));
        assert!(TraceParent::from_headers(&h).is_none());
    }

    #[test]
    fn generated_ids_are_never_zero_and_differ() {
        let a = new_trace_id();
        let b = new_trace_id();
        assert_ne!(a, [0; 16]);
        assert_ne!(a, b);
        assert_ne!(new_span_id(), new_span_id());
    }

    #[tokio::test]
    async fn without_export_the_upstream_gets_the_clients_trace_and_a_new_parent() {
        let mut incoming = HeaderMap::new();
        incoming.insert(&TRACEPARENT, HeaderValue::from_static(VALID));
        let id = HeaderValue::from_static("r1");
        let info = RequestInfo {
            method: &http::Method::GET,
            version: http::Version::HTTP_11,
            uri: &http::Uri::from_static("/"),
            request_id: &id,
            traceparent: true,
        };
        let (hop, _span) = start(&incoming, &info);
        let out = scope(hop, async {
            let mut h = incoming.clone();
            h.insert(&TRACESTATE, HeaderValue::from_static("a=b"));
            let _s = upstream(&mut h, &HeaderValue::from_static("x:1"), true);
            h
        })
        .await;
        let sent = TraceParent::from_headers(&out).expect("sent");
        let came = parse(VALID).unwrap();
        assert_eq!(sent.trace_id, came.trace_id);
        assert_ne!(sent.span_id, came.span_id);
        assert_eq!(sent.flags, came.flags);
        assert_eq!(out.get(&TRACESTATE).unwrap(), "a=b");
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::TraceParent;

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(v in prop::collection::vec(any::<u8>(), 0..120)) {
            let _ = TraceParent::parse(&v);
        }

        #[test]
        fn whatever_parses_writes_back_as_a_parsable_version_00(
            v in "[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}"
        ) {
            if let Some(p) = TraceParent::parse(v.as_bytes()) {
                let back = p.to_header();
                prop_assert_eq!(TraceParent::parse(back.as_bytes()), Some(p));
            }
        }
    }
}
