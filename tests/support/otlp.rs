//! A small OTLP/HTTP receiver: `POST /v1/traces` with `application/x-protobuf`, decoded with
//! `opentelemetry-proto` (`ExportTraceServiceRequest`), every span kept for assertions together
//! with the raw request bodies (to search them for secrets).
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message as _;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// One exported span, flattened.
#[derive(Clone, Debug)]
pub struct SpanRecord {
    /// Lowercase hex.
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    /// OTLP `SpanKind`: 2 server, 3 client, 1 internal.
    pub kind: i32,
    /// Every attribute with its value rendered as a string.
    pub attributes: Vec<(String, String)>,
    /// OTLP status code: 0 unset, 1 ok, 2 error.
    pub status: i32,
    /// The resource's `service.name`.
    pub service_name: String,
}

impl SpanRecord {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct State {
    spans: Mutex<Vec<SpanRecord>>,
    bodies: Mutex<Vec<Bytes>>,
    /// Requests that were not a protobuf `POST /v1/traces`.
    refused: Mutex<Vec<String>>,
}

/// The receiver, listening on `127.0.0.1:<free port>`.
pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Receiver {
    pub async fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let st = state.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(handle(req, &st).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Receiver {
            addr,
            state,
            accept,
        }
    }

    /// `http://127.0.0.1:PORT` (the base URL: exporters append `/v1/traces`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<SpanRecord> {
        self.state.spans.lock().unwrap().clone()
    }

    /// Every export request body as received.
    pub fn bodies(&self) -> Vec<Bytes> {
        self.state.bodies.lock().unwrap().clone()
    }

    pub fn refused(&self) -> Vec<String> {
        self.state.refused.lock().unwrap().clone()
    }

    /// Waits (bounded) until `cond` holds for the spans received so far.
    pub async fn wait_for(&self, within: Duration, cond: impl Fn(&[SpanRecord]) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if cond(&self.spans()) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn handle(req: Request<Incoming>, st: &State) -> Response<Full<Bytes>> {
    let ok_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/x-protobuf"));
    if req.method() != http::Method::POST || req.uri().path() != "/v1/traces" || !ok_type {
        st.refused.lock().unwrap().push(format!(
            "{} {} {:?}",
            req.method(),
            req.uri(),
            req.headers()
        ));
        return answer(StatusCode::NOT_FOUND, Bytes::new());
    }
    let Ok(body) = req.into_body().collect().await else {
        return answer(StatusCode::BAD_REQUEST, Bytes::new());
    };
    let body = body.to_bytes();
    let Ok(export) = ExportTraceServiceRequest::decode(body.clone()) else {
        st.refused.lock().unwrap().push("undecodable body".into());
        return answer(StatusCode::BAD_REQUEST, Bytes::new());
    };
    st.bodies.lock().unwrap().push(body);
    let mut spans = st.spans.lock().unwrap();
    for rs in export.resource_spans {
        let service_name = rs
            .resource
            .as_ref()
            .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
            .map(|a| render(a.value.as_ref()))
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                spans.push(SpanRecord {
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    name: s.name,
                    kind: s.kind,
                    attributes: s.attributes.iter().map(pair).collect(),
                    status: s.status.map_or(0, |st| st.code),
                    service_name: service_name.clone(),
                });
            }
        }
    }
    // An empty ExportTraceServiceResponse.
    answer(StatusCode::OK, Bytes::new())
}

fn answer(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/x-protobuf")
        .body(Full::new(body))
        .unwrap()
}

fn pair(kv: &KeyValue) -> (String, String) {
    (kv.key.clone(), render(kv.value.as_ref()))
}

fn render(v: Option<&AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
