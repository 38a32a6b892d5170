//! The foundation's integration tests: coatcheck as a TLS-terminating, streaming reverse proxy in
//! front of a real upstream (tests/support/upstream.rs), over real sockets on port 0.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use serde_json::Value;
use support::upstream::{Upstream, websocket_accept};
use support::{
    ProxyProcess, RawConn, TestProxy, WAIT, expect_json_error, http1_client, proxy_config, raw_get,
    raw_request, start_proxy, start_proxy_with,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A `[[route]]` table with `auth = "none"` plus `extra` keys.
fn route(path: &str, upstream: &str, extra: &str) -> String {
    format!("[[route]]\npath = {path:?}\nupstream = {upstream:?}\nauth = \"none\"\n{extra}\n")
}

async fn proxy_to(upstream: &Upstream) -> TestProxy {
    start_proxy(&route("/api/", &upstream.url(), "")).await
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// The headers an `/echo` answer says the upstream received.
fn echoed_headers(body: &Value) -> Vec<(String, String)> {
    body["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p[0].as_str().unwrap().to_owned(),
                p[1].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// HTTP versions, TLS, upstream schemes
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn http1_requests_are_proxied_through_tls() {
    let up = Upstream::start().await;
    let proxy = proxy_to(&up).await;
    let res = proxy
        .http1()
        .get(proxy.url("/api/echo?x=1&y=two"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.version(), reqwest::Version::HTTP_11);
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["method"], "GET");
    assert_eq!(body["uri"], "/api/echo?x=1&y=two");
    assert_eq!(body["version"], "HTTP/1.1");

    let res = proxy
        .http1()
        .post(proxy.url("/api/echo"))
        .body(vec![7u8; 10_000])
        .send()
        .await
        .unwrap();
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["method"], "POST");
    assert_eq!(body["body_bytes"], 10_000);
    proxy.stop().await;
}

#[tokio::test]
async fn http2_requests_are_proxied_through_tls() {
    let up = Upstream::start().await;
    let proxy = proxy_to(&up).await;
    let client = proxy.http2();
    for i in 0..3 {
        let res = client
            .get(proxy.url(&format!("/api/echo?i={i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(res.version(), reqwest::Version::HTTP_2, "ALPN chose h2");
        assert_eq!(res.status(), 200);
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["uri"], format!("/api/echo?i={i}"));
        // The plain-HTTP upstream is spoken to in HTTP/1.1 whatever the client used.
        assert_eq!(body["version"], "HTTP/1.1");
    }
    let res = client
        .put(proxy.url("/api/echo"))
        .body(vec![1u8; 100_000])
        .send()
        .await
        .unwrap();
    assert_eq!(res.version(), reqwest::Version::HTTP_2);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["method"], "PUT");
    assert_eq!(body["body_bytes"], 100_000);
    proxy.stop().await;
}

#[tokio::test]
async fn an_https_upstream_is_trusted_through_the_route_ca() {
    let up = Upstream::start_tls().await;
    let certs = support::certs();
    let proxy = start_proxy(&format!(
        "{}{}",
        route(
            "/trusted/",
            &up.url(),
            &format!("ca = {:?}", certs.ca.display().to_string())
        ),
        route("/untrusted/", &up.url(), ""),
    ))
    .await;
    let client = proxy.http1();
    let res = client.get(proxy.url("/trusted/echo")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["uri"], "/trusted/echo");
    // The upstream offers h2 by ALPN and the pooled client takes it.
    assert_eq!(body["version"], "HTTP/2.0");

    // Without the route's `ca`, the test CA is unknown: the upstream is not trusted.
    let res = client
        .get(proxy.url("/untrusted/echo"))
        .send()
        .await
        .unwrap();
    expect_json_error(res, 502, "bad_gateway").await;
    assert_eq!(
        up.seen().len(),
        1,
        "the untrusted request never got through"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn tls_1_2_and_1_3_and_both_alpn_protocols_are_offered() {
    let up = Upstream::start().await;
    let proxy = proxy_to(&up).await;
    coatcheck::tls::install_provider();
    let roots = coatcheck::tls::root_store("test", Some(&support::certs().ca)).unwrap();
    // (TLS version, ALPN offered, ALPN expected)
    type Case = (
        &'static rustls::SupportedProtocolVersion,
        &'static [&'static [u8]],
        Option<&'static [u8]>,
    );
    let cases: [Case; 4] = [
        (&rustls::version::TLS13, &[b"h2", b"http/1.1"], Some(b"h2")),
        (&rustls::version::TLS12, &[b"h2", b"http/1.1"], Some(b"h2")),
        (&rustls::version::TLS13, &[b"http/1.1"], Some(b"http/1.1")),
        (&rustls::version::TLS12, &[], None),
    ];
    for (version, alpn, want_alpn) in cases {
        let mut cfg = rustls::ClientConfig::builder_with_protocol_versions(&[version])
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let mut tls = tokio::time::timeout(
            WAIT,
            tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg)).connect(
                rustls_pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            ),
        )
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{version:?} {alpn:?}: {e}"));
        let (_, conn) = tls.get_ref();
        assert_eq!(conn.protocol_version(), Some(version.version));
        assert_eq!(conn.alpn_protocol(), want_alpn, "{version:?} {alpn:?}");
        if want_alpn != Some(b"h2") {
            // Without ALPN, HTTP/1.1 is spoken.
            tls.write_all(
                b"GET /api/echo HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            )
            .await
            .unwrap();
            let mut out = Vec::new();
            let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut out))
                .await
                .unwrap();
            let text = String::from_utf8_lossy(&out);
            assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        }
    }
    proxy.stop().await;
}

#[tokio::test]
async fn connect_and_absolute_form_requests_never_make_an_open_proxy() {
    let up = Upstream::start().await;
    let elsewhere = Upstream::start().await;
    let proxy = proxy_to(&up).await;
    // CONNECT would open a tunnel to anywhere: refused.
    let res = raw_request(
        proxy.addr,
        format!(
            "CONNECT {0} HTTP/1.1\r\nHost: {0}\r\nConnection: close\r\n\r\n",
            elsewhere.addr
        )
        .as_bytes(),
    )
    .await;
    assert!(matches!(res.status, 400 | 404 | 405), "{res:?}");
    // OPTIONS * names no path.
    let res = raw_request(
        proxy.addr,
        b"OPTIONS * HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(matches!(res.status, 400 | 404), "{res:?}");
    // An absolute-form target is routed by its path, to the configured upstream only.
    let res = raw_request(
        proxy.addr,
        format!(
            "GET http://{}/api/echo HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            elsewhere.addr
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(res.json()["uri"], "/api/echo");
    assert!(
        elsewhere.seen().is_empty(),
        "coatcheck acted as an open proxy"
    );
    assert_eq!(up.seen().len(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn healthz_answers_ok_without_an_upstream() {
    let proxy = start_proxy(&route("/api/", "http://127.0.0.1:9", "")).await;
    for client in [proxy.http1(), proxy.http2()] {
        let res = client.get(proxy.url("/healthz")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(
            res.headers()["content-type"].to_str().unwrap(),
            "application/json"
        );
        let body: Value = res.json().await.unwrap();
        assert_eq!(body, serde_json::json!({"status": "ok"}));
    }
    proxy.stop().await;
}

#[tokio::test]
async fn upstream_statuses_and_redirects_pass_through_unchanged() {
    let up = Upstream::start().await;
    let proxy = proxy_to(&up).await;
    let client = proxy.http1();
    let res = client
        .get(proxy.url("/api/status/503"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(res.json::<Value>().await.unwrap()["status"], 503);
    let res = client
        .get(proxy.url("/api/status/404"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    assert_eq!(res.json::<Value>().await.unwrap()["status"], 404);
    let res = client.get(proxy.url("/api/redirect")).send().await.unwrap();
    assert_eq!(res.status(), 302);
    assert_eq!(res.headers()["location"], "/elsewhere");
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Upstream connections
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn consecutive_requests_reuse_one_upstream_connection() {
    let up = Upstream::start().await;
    let proxy = proxy_to(&up).await;
    // One client connection: one serving runtime, one pool.
    let client = proxy.http1();
    for i in 0..5 {
        let res = client
            .get(proxy.url(&format!("/api/echo?i={i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let body: Value = res.json().await.unwrap();
        assert_eq!(
            body["uri"],
            format!("/api/echo?i={i}"),
            "origin form upstream"
        );
    }
    // A streamed answer read to its end gives its connection back too.
    let res = client
        .get(proxy.url("/api/download?bytes=300000&chunked=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.bytes().await.unwrap().len(), 300_000);
    let res = client.get(proxy.url("/api/echo")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    res.bytes().await.unwrap();
    assert_eq!(up.connections(), 1, "keep-alive: one upstream connection");
    proxy.stop().await;
}

#[tokio::test]
async fn an_https_upstream_that_speaks_only_http1_gets_reused_connections() {
    let up = Upstream::start_tls_http1().await;
    let certs = support::certs();
    let proxy = start_proxy(&route(
        "/api/",
        &up.url(),
        &format!("ca = {:?}", certs.ca.display().to_string()),
    ))
    .await;
    let client = proxy.http1();
    for _ in 0..3 {
        let res = client.get(proxy.url("/api/echo")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["version"], "HTTP/1.1", "ALPN chose http/1.1");
        assert_eq!(body["uri"], "/api/echo");
    }
    assert_eq!(up.connections(), 1, "one TLS connection, kept alive");
    proxy.stop().await;
}

#[tokio::test]
async fn an_upstream_that_closes_its_idle_connection_fails_no_request() {
    let up = Upstream::start().await;
    let proxy = proxy_to(&up).await;
    let client = proxy.http1();
    for round in 1..=3 {
        let res = client.get(proxy.url("/api/echo")).send().await.unwrap();
        assert_eq!(res.status(), 200, "round {round}");
        res.bytes().await.unwrap();
        assert_eq!(up.connections(), round);
        // The upstream's keep-alive timeout runs out: it closes the idle connection silently.
        up.close_idle_connections();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    proxy.stop().await;
}

#[tokio::test]
async fn one_upstream_connection_carries_answers_of_every_shape_in_turn() {
    // A pooled connection is ready for the next request once its answer has been read to the
    // end, whatever the answer's shape: empty, streamed, chunked, refused, redirected, a HEAD, a
    // request with an upload.
    let up = Upstream::start().await;
    let proxy = proxy_to(&up).await;
    let client = proxy.http1();
    let big = 1 << 20;
    for round in 0..2 {
        for (path, want) in [
            ("/api/echo", None),
            ("/api/status/204", Some(0)),
            (&*format!("/api/download?bytes={big}"), Some(big)),
            ("/api/download?bytes=100000&chunked=1", Some(100_000)),
            ("/api/status/404", None),
            ("/api/redirect", Some(0)),
        ] {
            let res = client.get(proxy.url(path)).send().await.unwrap();
            assert!(res.status().as_u16() < 500, "{path}: {}", res.status());
            let body = res.bytes().await.unwrap();
            if let Some(n) = want {
                assert_eq!(body.len(), n, "{path}");
            }
        }
        let res = client
            .head(proxy.url("/api/download?bytes=5000"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let res = client
            .post(proxy.url("/api/upload"))
            .body(vec![7u8; 300_000])
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert!(!res.bytes().await.unwrap().is_empty());
        assert_eq!(
            up.connections(),
            1,
            "round {round}: a connection was not reused"
        );
    }
    proxy.stop().await;
}

#[tokio::test]
async fn concurrent_requests_open_connections_that_are_then_reused() {
    let up = Upstream::start().await;
    let proxy = proxy_to(&up).await;
    let client = proxy.http1();
    let burst = || {
        futures_util::future::join_all((0..8).map(|_| async {
            let res = client
                .get(proxy.url("/api/slow?ms=50"))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 200);
            res.bytes().await.unwrap();
        }))
    };
    burst().await;
    let opened = up.connections();
    assert!(
        opened >= 2,
        "requests in flight at once need their own connections"
    );
    burst().await;
    burst().await;
    assert!(
        up.connections() <= opened + 2,
        "{} connections after {opened}: idle ones were not reused",
        up.connections()
    );
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Streaming
// ---------------------------------------------------------------------------------------------

/// Bytes moved each way by the memory tests. 1 GiB unless `COATCHECK_TEST_STREAM_BYTES` says
/// otherwise.
fn stream_bytes() -> u64 {
    std::env::var("COATCHECK_TEST_STREAM_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 30)
}

/// RSS growth allowed while streaming.
const RSS_GROWTH_LIMIT_KIB: u64 = 64 * 1024;

/// Samples the process's RSS every 50 ms until told to stop; returns the peak.
fn sample_rss(
    pid: u32,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<u64>,
) {
    let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut peak = 0;
        loop {
            peak = peak.max(support::rss_kib(pid).unwrap_or(0));
            tokio::select! {
                _ = &mut rx => return peak,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    });
    (tx, task)
}

async fn streaming_proxy_process(up: &Upstream) -> ProxyProcess {
    ProxyProcess::start(&proxy_config(
        "",
        &format!(
            "[log]\nlevel = \"info\"\n\n{}",
            route(
                "/",
                &up.url(),
                "max_body_bytes = 4294967296\ntimeout = \"300s\""
            )
        ),
    ))
    .await
}

/// Warms the proxy up (TLS sessions, pools, allocator arenas) and returns its settled RSS.
async fn warm_up(proc: &ProxyProcess, clients: &[reqwest::Client]) -> u64 {
    let url = format!("https://localhost:{}", proc.addr.port());
    for client in clients {
        for _ in 0..2 {
            let res = client
                .get(format!("{url}/download?bytes=16777216"))
                .send()
                .await
                .unwrap();
            assert_eq!(res.bytes().await.unwrap().len(), 16 << 20);
            let res = client
                .post(format!("{url}/upload"))
                .body(vec![0u8; 16 << 20])
                .send()
                .await
                .unwrap();
            assert_eq!(res.json::<Value>().await.unwrap()["bytes"], 16 << 20);
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    proc.rss_kib()
}

/// An HTTP/1.1-only and an HTTP/2 client for a long transfer.
fn streaming_clients(addr: std::net::SocketAddr) -> [(&'static str, reqwest::Client); 2] {
    let long = |b: reqwest::ClientBuilder| b.timeout(Duration::from_secs(600)).build().unwrap();
    [
        ("HTTP/1.1", long(support::client_builder(addr).http1_only())),
        ("HTTP/2.0", long(support::client_builder(addr))),
    ]
}

/// Prints and checks the RSS figures of one transfer.
fn check_rss(what: &str, total: u64, took: Duration, baseline: u64, peak: u64) {
    eprintln!(
        "{what}: {} MiB in {:.1} s ({:.0} MiB/s); coatcheck RSS baseline {baseline} KiB, peak {peak} KiB, growth {} KiB",
        total >> 20,
        took.as_secs_f64(),
        (total >> 20) as f64 / took.as_secs_f64(),
        peak.saturating_sub(baseline)
    );
    assert!(
        peak.saturating_sub(baseline) < RSS_GROWTH_LIMIT_KIB,
        "{what}: RSS grew from {baseline} KiB to {peak} KiB while streaming {total} bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_download_streams_through_with_flat_memory() {
    let up = Upstream::start().await;
    let proc = streaming_proxy_process(&up).await;
    let clients = streaming_clients(proc.addr);
    let baseline = warm_up(&proc, &clients.clone().map(|(_, c)| c)).await;
    let total = stream_bytes();
    for (version, client) in clients {
        let (stop, peak) = sample_rss(proc.pid);
        let start = Instant::now();
        let res = client
            .get(format!(
                "https://localhost:{}/download?bytes={total}",
                proc.addr.port()
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(format!("{:?}", res.version()), version);
        let mut stream = res.bytes_stream();
        let mut got = 0u64;
        while let Some(chunk) = stream.next().await {
            got += chunk.expect("download chunk").len() as u64;
        }
        let took = start.elapsed();
        stop.send(()).unwrap();
        assert_eq!(got, total);
        check_rss(
            &format!("download over {version}"),
            total,
            took,
            baseline,
            peak.await.unwrap(),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_upload_streams_through_with_flat_memory() {
    let up = Upstream::start().await;
    let proc = streaming_proxy_process(&up).await;
    let clients = streaming_clients(proc.addr);
    let baseline = warm_up(&proc, &clients.clone().map(|(_, c)| c)).await;
    let total = stream_bytes();
    static CHUNK: [u8; 64 * 1024] = [b'u'; 64 * 1024];
    for (version, client) in clients {
        let body = futures_util::stream::unfold(total, |left| async move {
            if left == 0 {
                return None;
            }
            let n = left.min(CHUNK.len() as u64) as usize;
            Some((
                Ok::<_, std::io::Error>(bytes::Bytes::from_static(&CHUNK[..n])),
                left - n as u64,
            ))
        });
        let (stop, peak) = sample_rss(proc.pid);
        let start = Instant::now();
        let res = client
            .post(format!("https://localhost:{}/upload", proc.addr.port()))
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(format!("{:?}", res.version()), version);
        let body: Value = res.json().await.unwrap();
        let took = start.elapsed();
        stop.send(()).unwrap();
        assert_eq!(body["bytes"], total);
        check_rss(
            &format!("upload over {version}"),
            total,
            took,
            baseline,
            peak.await.unwrap(),
        );
    }
}

/// Reads an event stream, noting when each complete event arrived (relative to `start`).
async fn event_arrivals(res: reqwest::Response, start: Instant) -> Vec<Duration> {
    let mut stream = res.bytes_stream();
    let mut buf = Vec::new();
    let mut arrivals = Vec::new();
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk.unwrap());
        while let Some(i) = buf.windows(2).position(|w| w == b"\n\n") {
            buf.drain(..i + 2);
            arrivals.push(start.elapsed());
        }
    }
    arrivals
}

#[tokio::test]
async fn server_sent_events_arrive_as_they_are_sent() {
    let up = Upstream::start().await;
    let proxy = proxy_to(&up).await;
    for client in [proxy.http1(), proxy.http2()] {
        let start = Instant::now();
        let res = client
            .get(proxy.url("/api/sse?events=5&every_ms=300"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["content-type"], "text/event-stream");
        let arrivals = event_arrivals(res, start).await;
        assert_eq!(arrivals.len(), 5, "{arrivals:?}");
        // The upstream spends 1.2 s sending; buffered delivery would land everything at the end.
        let spread = arrivals[4] - arrivals[0];
        assert!(
            spread >= Duration::from_millis(700),
            "events arrived together, not as sent: {arrivals:?}"
        );
        let batches = arrivals
            .windows(2)
            .filter(|w| w[1] - w[0] >= Duration::from_millis(100))
            .count();
        assert!(batches >= 2, "events arrived in bursts: {arrivals:?}");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn a_chunked_download_is_streamed_to_http1_and_http2_clients() {
    let up = Upstream::start().await;
    let proxy = proxy_to(&up).await;
    for client in [proxy.http1(), proxy.http2()] {
        let res = client
            .get(proxy.url("/api/download?bytes=5000000&chunked=1"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert!(res.headers().get("content-length").is_none());
        assert_eq!(res.bytes().await.unwrap().len(), 5_000_000);
    }
    proxy.stop().await;
}

#[tokio::test]
async fn websocket_upgrades_are_proxied_both_ways() {
    let up = Upstream::start().await;
    let proxy = proxy_to(&up).await;
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let mut conn = RawConn::connect(proxy.addr).await;
    conn.send(
        format!(
            "GET /api/ws HTTP/1.1\r\nHost: localhost:{}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nKeep-Alive: timeout=5\r\n\r\n",
            proxy.addr.port()
        )
        .as_bytes(),
    )
    .await;
    let (status, headers) = conn.read_head().await;
    assert_eq!(status, 101, "{headers:?}");
    assert_eq!(
        header(&headers, "upgrade").map(str::to_ascii_lowercase),
        Some("websocket".into())
    );
    assert!(
        header(&headers, "connection").is_some_and(|v| v.eq_ignore_ascii_case("upgrade")),
        "{headers:?}"
    );
    assert_eq!(
        header(&headers, "sec-websocket-accept"),
        Some(websocket_accept(key).as_str())
    );
    assert_eq!(websocket_accept(key), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    let seen = up.last().unwrap();
    assert_eq!(seen.header("upgrade"), Some("websocket"));
    assert_eq!(seen.header("connection"), Some("upgrade"));
    assert_eq!(seen.header("sec-websocket-key"), Some(key));
    assert_eq!(seen.header("keep-alive"), None);
    assert!(conn.buffered().is_empty());

    // Small messages echo one by one …
    for msg in [&b"hello"[..], b"websocket", b"\x81\x05bytes"] {
        conn.send(msg).await;
        assert_eq!(conn.read_exact(msg.len()).await, msg);
    }
    // … and a large one streams both ways at once.
    let (mut r, mut w) = tokio::io::split(conn.stream);
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let expected = big.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&big).await.unwrap();
        w.flush().await.unwrap();
        w
    });
    let mut back = vec![0u8; expected.len()];
    tokio::time::timeout(WAIT, r.read_exact(&mut back))
        .await
        .expect("echo in time")
        .unwrap();
    assert!(back == expected, "echoed bytes differ");
    drop(writer.await.unwrap());
    // The tunnel holds its connection's slot until the client closes it.
    drop(r);
    proxy.stop().await;
}

async fn open_websocket(proxy: &TestProxy) -> RawConn {
    let mut conn = RawConn::connect(proxy.addr).await;
    conn.send(
        format!(
            "GET /api/ws HTTP/1.1\r\nHost: localhost:{}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            proxy.addr.port()
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(conn.read_head().await.0, 101);
    conn
}

#[tokio::test]
async fn an_open_websocket_counts_against_max_connections() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&format!(
        "[server.limits]\nmax_connections = 1\n{}",
        route("/api/", &up.url(), "")
    ))
    .await;
    let mut ws = open_websocket(&proxy).await;
    ws.send(b"ping").await;
    assert_eq!(ws.read_exact(4).await, b"ping");
    // The only slot is the tunnel's: a new client waits in the backlog.
    let waiting = tokio::time::timeout(
        Duration::from_millis(800),
        raw_get(proxy.addr, "/api/echo", ""),
    )
    .await;
    assert!(
        waiting.is_err(),
        "a second connection was served: {waiting:?}"
    );
    drop(ws);
    let res = tokio::time::timeout(WAIT, raw_get(proxy.addr, "/api/echo", ""))
        .await
        .expect("served once the tunnel closed");
    assert_eq!(res.status, 200);
    proxy.stop().await;
}

#[tokio::test]
async fn an_open_websocket_is_closed_when_the_shutdown_grace_ends() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&format!(
        "[server.limits]\nshutdown_grace = \"1s\"\n{}",
        route("/api/", &up.url(), "")
    ))
    .await;
    let mut ws = open_websocket(&proxy).await;
    let start = Instant::now();
    proxy.stop().await;
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "{:?}",
        start.elapsed()
    );
    let closed = ws.closed_within(Duration::from_secs(5)).await;
    assert!(closed.is_some(), "the tunnel outlived the shutdown grace");
}

// ---------------------------------------------------------------------------------------------
// Headers
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn hop_by_hop_headers_are_not_forwarded() {
    let up = Upstream::start().await;
    let proxy = proxy_to(&up).await;
    let res = raw_request(
        proxy.addr,
        format!(
            "GET /api/echo HTTP/1.1\r\nHost: localhost:{}\r\n\
             Connection: close, X-Secret-Hop, x-other-hop\r\n\
             X-Secret-Hop: 1\r\nX-Other-Hop: 2\r\nKeep-Alive: timeout=5\r\n\
             Proxy-Authorization: Basic Zm9vOmJhcg==\r\nProxy-Connection: keep-alive\r\n\
             TE: trailers, gzip\r\nTrailer: X-Checksum\r\nUpgrade: h2c\r\n\
             X-End-To-End: kept\r\n\r\n",
            proxy.addr.port()
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(res.status, 200, "{res:?}");
    let seen = echoed_headers(&res.json());
    for gone in [
        "connection",
        "x-secret-hop",
        "x-other-hop",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "trailer",
        "upgrade",
    ] {
        assert_eq!(header(&seen, gone), None, "{gone} reached the upstream");
    }
    // `TE: trailers` is the one TE value that may travel (gRPC needs it).
    assert_eq!(header(&seen, "te"), Some("trailers"));
    assert_eq!(header(&seen, "x-end-to-end"), Some("kept"));
    proxy.stop().await;
}

#[tokio::test]
async fn hop_by_hop_headers_from_the_upstream_are_not_returned() {
    let up = Upstream::start().await;
    let proxy = proxy_to(&up).await;
    // HTTP/1.1, read byte by byte.
    let mut conn = RawConn::connect(proxy.addr).await;
    conn.send(
        format!(
            "GET /api/hop HTTP/1.1\r\nHost: localhost:{}\r\n\r\n",
            proxy.addr.port()
        )
        .as_bytes(),
    )
    .await;
    let res = conn.read_response().await;
    assert_eq!(res.status, 200);
    for gone in [
        "x-upstream-hop",
        "keep-alive",
        "proxy-authenticate",
        "trailer",
        "proxy-connection",
    ] {
        assert_eq!(res.header(gone), None, "{gone} reached the client: {res:?}");
    }
    assert!(
        !res.headers
            .iter()
            .any(|(n, v)| n == "connection" && v.to_ascii_lowercase().contains("x-upstream-hop")),
        "{res:?}"
    );
    assert_eq!(res.header("x-end-to-end"), Some("kept"));
    // The connection is still usable (nothing the upstream said closed it).
    conn.send(
        format!(
            "GET /api/echo HTTP/1.1\r\nHost: localhost:{}\r\n\r\n",
            proxy.addr.port()
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(conn.read_response().await.status, 200);

    // HTTP/2: connection-specific headers must not appear at all (RFC 9113 §8.2.2).
    let res = proxy
        .http2()
        .get(proxy.url("/api/hop"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.version(), reqwest::Version::HTTP_2);
    assert_eq!(res.status(), 200);
    for gone in [
        "x-upstream-hop",
        "keep-alive",
        "proxy-authenticate",
        "connection",
    ] {
        assert!(
            res.headers().get(gone).is_none(),
            "{gone}: {:?}",
            res.headers()
        );
    }
    assert_eq!(res.headers()["x-end-to-end"], "kept");
    proxy.stop().await;
}

#[tokio::test]
async fn forwarding_headers_are_written_by_coatcheck_not_taken_from_the_client() {
    let up = Upstream::start().await;
    let proxy = proxy_to(&up).await;
    let host = format!("localhost:{}", proxy.addr.port());
    for client in [proxy.http1(), proxy.http2()] {
        let res = client
            .get(proxy.url("/api/echo"))
            .header("x-forwarded-for", "203.0.113.9")
            .header("forwarded", "for=203.0.113.9")
            .header("x-forwarded-proto", "http")
            .header("x-forwarded-host", "evil.example")
            .header("x-forwarded-prefix", "/evil")
            .header("x-real-ip", "203.0.113.9")
            .header("x-original-url", "/admin")
            .header("x-rewrite-url", "/admin")
            .send()
            .await
            .unwrap();
        let seen = echoed_headers(&res.json().await.unwrap());
        assert_eq!(header(&seen, "x-forwarded-for"), Some("127.0.0.1"));
        assert_eq!(header(&seen, "x-forwarded-proto"), Some("https"));
        assert_eq!(header(&seen, "x-forwarded-host"), Some(host.as_str()));
        assert_eq!(
            header(&seen, "forwarded"),
            Some(format!("for=127.0.0.1;proto=https;host=\"{host}\"").as_str())
        );
        for gone in [
            "x-forwarded-prefix",
            "x-real-ip",
            "x-original-url",
            "x-rewrite-url",
        ] {
            assert_eq!(header(&seen, gone), None, "{gone} reached the upstream");
        }
        // Exactly one of each: nothing duplicated.
        for name in [
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "forwarded",
        ] {
            assert_eq!(seen.iter().filter(|(n, _)| n == name).count(), 1, "{name}");
        }
    }
    proxy.stop().await;
}

#[tokio::test]
async fn a_trusted_proxys_forwarding_chain_is_kept_and_appended_to() {
    let up = Upstream::start().await;
    let proxy = start_proxy_with(
        "trusted_proxies = [\"127.0.0.0/8\"]\n",
        &route("/api/", &up.url(), ""),
    )
    .await;
    let host = format!("localhost:{}", proxy.addr.port());
    let res = proxy
        .http1()
        .get(proxy.url("/api/echo"))
        .header("x-forwarded-for", "203.0.113.9")
        .header("forwarded", "for=203.0.113.9")
        .header("x-forwarded-host", "evil.example")
        .send()
        .await
        .unwrap();
    let seen = echoed_headers(&res.json().await.unwrap());
    assert_eq!(
        header(&seen, "x-forwarded-for"),
        Some("203.0.113.9, 127.0.0.1")
    );
    assert_eq!(header(&seen, "x-forwarded-host"), Some(host.as_str()));
    assert_eq!(
        header(&seen, "forwarded"),
        Some(format!("for=203.0.113.9, for=127.0.0.1;proto=https;host=\"{host}\"").as_str())
    );
    proxy.stop().await;
}

#[tokio::test]
async fn request_ids_are_kept_or_generated_and_echoed() {
    let up = Upstream::start().await;
    let proxy = proxy_to(&up).await;
    let client = proxy.http1();
    let res = client
        .get(proxy.url("/api/echo"))
        .header("x-request-id", "client-chosen-42")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["x-request-id"], "client-chosen-42");
    let seen = echoed_headers(&res.json().await.unwrap());
    assert_eq!(header(&seen, "x-request-id"), Some("client-chosen-42"));

    let mut ids = Vec::new();
    for bad in [None, Some("has spaces in it"), Some(&"x".repeat(300)[..])] {
        let mut req = client.get(proxy.url("/api/echo"));
        if let Some(v) = bad {
            req = req.header("x-request-id", v);
        }
        let res = req.send().await.unwrap();
        let id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
        assert_eq!(id.len(), 32, "{id}");
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        let seen = echoed_headers(&res.json().await.unwrap());
        assert_eq!(header(&seen, "x-request-id"), Some(id.as_str()));
        assert_eq!(seen.iter().filter(|(n, _)| n == "x-request-id").count(), 1);
        ids.push(id);
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "every generated id is new");

    // coatcheck's own answers carry it too.
    let res = client
        .get(proxy.url("/nowhere"))
        .header("x-request-id", "err-1")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["x-request-id"], "err-1");
    proxy.stop().await;
}

#[tokio::test]
async fn host_is_rewritten_to_the_upstream_unless_preserved() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&format!(
        "{}{}",
        route("/api/", &up.url(), ""),
        route("/keep/", &up.url(), "preserve_host = true"),
    ))
    .await;
    let client_host = format!("localhost:{}", proxy.addr.port());
    let upstream_host = up.addr.to_string();
    for client in [proxy.http1(), proxy.http2()] {
        let res = client.get(proxy.url("/api/echo")).send().await.unwrap();
        let seen = echoed_headers(&res.json().await.unwrap());
        assert_eq!(header(&seen, "host"), Some(upstream_host.as_str()));
        assert_eq!(seen.iter().filter(|(n, _)| n == "host").count(), 1);
        assert_eq!(
            header(&seen, "x-forwarded-host"),
            Some(client_host.as_str())
        );

        let res = client.get(proxy.url("/keep/echo")).send().await.unwrap();
        let seen = echoed_headers(&res.json().await.unwrap());
        assert_eq!(header(&seen, "host"), Some(client_host.as_str()));
        assert_eq!(seen.iter().filter(|(n, _)| n == "host").count(), 1);
    }
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn strip_prefix_removes_the_route_prefix() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&format!(
        "{}{}{}",
        route("/api/", &up.url(), "strip_prefix = true"),
        route("/v/", &format!("{}/base/", up.url()), "strip_prefix = true"),
        route("/keep/", &up.url(), ""),
    ))
    .await;
    let client = proxy.http1();
    for (path, want) in [
        ("/api/users/1?x=y", "/users/1?x=y"),
        ("/api/", "/"),
        ("/api", "/"),
        ("/v/users", "/base/users"),
        ("/keep/users", "/keep/users"),
    ] {
        let res = client.get(proxy.url(path)).send().await.unwrap();
        assert_eq!(res.status(), 200, "{path}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["uri"], want, "{path}");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn the_longest_matching_prefix_wins() {
    let root = Upstream::start().await;
    let api = Upstream::start().await;
    let admin = Upstream::start().await;
    // Declared shortest first: order in the file must not matter.
    let proxy = start_proxy(&format!(
        "{}{}{}",
        route("/", &root.url(), ""),
        route("/api/", &api.url(), ""),
        route("/api/admin/", &admin.url(), ""),
    ))
    .await;
    let client = proxy.http1();
    for (path, want) in [
        ("/api/admin/users", "admin"),
        ("/api/admin", "admin"),
        ("/api/adminx", "api"),
        ("/api/x", "api"),
        ("/api", "api"),
        ("/apix", "root"),
        ("/", "root"),
        ("/other/thing", "root"),
    ] {
        let before = [root.seen().len(), api.seen().len(), admin.seen().len()];
        let res = client.get(proxy.url(path)).send().await.unwrap();
        assert_eq!(res.status(), 200, "{path}");
        let after = [root.seen().len(), api.seen().len(), admin.seen().len()];
        let which = ["root", "api", "admin"]
            .iter()
            .zip(before.iter().zip(after.iter()))
            .filter(|(_, (b, a))| a > b)
            .map(|(n, _)| *n)
            .collect::<Vec<_>>();
        assert_eq!(which, vec![want], "{path}");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn path_traversal_never_reaches_another_routes_upstream() {
    let api = Upstream::start().await;
    let other = Upstream::start().await;
    let proxy = start_proxy(&format!(
        "{}{}",
        route("/api/", &api.url(), ""),
        route("/other/", &other.url(), ""),
    ))
    .await;
    // Climbing out behind an encoded separator, or above the root: refused outright.
    for path in [
        "/api/..%2fother/x",
        "/api/..%2Fother/x",
        "/api/%2e%2e%2fother/x",
        "/api/%2E%2E%2Fother/x",
        "/api/..%5cother/x",
        "/api/..%5Cother/x",
        "/api/.%2e/.%2e/other/x",
        "/api/%2e%2e/%2e%2e/other/x",
        "/api/../../other/x",
    ] {
        let res = raw_get(proxy.addr, path, "").await;
        assert_eq!(res.status, 400, "{path}: {res:?}");
        assert_eq!(res.json()["error"], "bad_request", "{path}");
    }
    assert!(api.seen().is_empty(), "{:?}", api.seen());
    assert!(other.seen().is_empty(), "{:?}", other.seen());

    // Dot segments (plain or percent-encoded) are resolved before routing, so the route chosen
    // is the one of the path the upstream receives: each upstream only ever sees its own prefix.
    for (path, want) in [
        ("/api/%2e%2e/other/x", "/other/x"),
        ("/api/%2E%2E/other/x", "/other/x"),
        ("/api/../other/x", "/other/x"),
        ("/api/./../other/x", "/other/x"),
        ("/api/.%2e/other/x", "/other/x"),
        ("/other/%2e%2e/api/y", "/api/y"),
        ("/api/sub/%2e%2e/z", "/api/z"),
    ] {
        let res = raw_get(proxy.addr, path, "").await;
        assert_eq!(res.status, 200, "{path}: {res:?}");
        assert_eq!(res.json()["uri"], want, "{path}");
    }
    for (up, prefix) in [(&api, "/api/"), (&other, "/other/")] {
        for seen in up.seen() {
            let p = seen.path().to_ascii_lowercase();
            assert!(p.starts_with(prefix), "{prefix} upstream saw {p}");
            assert!(
                !p.contains("..") && !p.contains("%2e") && !p.contains("%2f") && !p.contains("%5c"),
                "{prefix} upstream saw {p}"
            );
        }
    }
    assert_eq!(other.seen().len(), 5);
    assert_eq!(api.seen().len(), 2);
    proxy.stop().await;
}

#[tokio::test]
async fn nul_and_invalid_percent_encodings_are_bad_requests() {
    let up = Upstream::start().await;
    let proxy = proxy_to(&up).await;
    for path in [
        "/api/a%00b",
        "/api/%00",
        "/api/%zz",
        "/api/%4",
        "/api/%",
        "/api/x%g0",
    ] {
        let res = raw_get(proxy.addr, path, "").await;
        assert_eq!(res.status, 400, "{path}: {res:?}");
        assert_eq!(res.json()["error"], "bad_request", "{path}");
        assert_eq!(res.header("content-type"), Some("application/json"));
    }
    // A raw NUL or space in the request line never gets past the HTTP parser.
    for line in [&b"GET /api/a\x00b HTTP/1.1"[..], b"GET /api/a b HTTP/1.1"] {
        let mut req = line.to_vec();
        req.extend_from_slice(b"\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        let mut conn = RawConn::connect(proxy.addr).await;
        conn.send(&req).await;
        let closed = conn.closed_within(Duration::from_secs(10)).await;
        assert!(
            closed.is_some(),
            "connection left open after a malformed request line"
        );
        let text = String::from_utf8_lossy(conn.buffered()).into_owned();
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 400"),
            "{text}"
        );
    }
    assert!(up.seen().is_empty(), "{:?}", up.seen());
    // Still serving.
    let res = raw_get(proxy.addr, "/api/ok", "").await;
    assert_eq!(res.status, 200);
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Failures are answers
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn unknown_paths_get_404_json() {
    let up = Upstream::start().await;
    let proxy = proxy_to(&up).await;
    for client in [proxy.http1(), proxy.http2()] {
        for path in ["/nothing", "/apix", "/ap"] {
            let res = client.get(proxy.url(path)).send().await.unwrap();
            expect_json_error(res, 404, "not_found").await;
        }
    }
    assert!(up.seen().is_empty());
    proxy.stop().await;
}

#[tokio::test]
async fn methods_outside_the_allowlist_get_405_with_allow() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&route("/api/", &up.url(), "methods = [\"GET\", \"head\"]")).await;
    let client = proxy.http1();
    let res = client.get(proxy.url("/api/echo")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let res = client.head(proxy.url("/api/echo")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    for method in [
        reqwest::Method::POST,
        reqwest::Method::DELETE,
        reqwest::Method::OPTIONS,
    ] {
        let res = client
            .request(method.clone(), proxy.url("/api/echo"))
            .send()
            .await
            .unwrap();
        let allow = res.headers()["allow"].to_str().unwrap().to_owned();
        assert_eq!(allow, "GET, HEAD", "{method}");
        expect_json_error(res, 405, "method_not_allowed").await;
    }
    assert_eq!(up.seen().len(), 2);
    proxy.stop().await;
}

#[tokio::test]
async fn a_content_length_over_the_limit_gets_413() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&route("/api/", &up.url(), "max_body_bytes = 1024")).await;
    for client in [proxy.http1(), proxy.http2()] {
        let res = client
            .post(proxy.url("/api/upload"))
            .body(vec![0u8; 2048])
            .send()
            .await
            .unwrap();
        expect_json_error(res, 413, "payload_too_large").await;
        // At the limit is fine.
        let res = client
            .post(proxy.url("/api/upload"))
            .body(vec![0u8; 1024])
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.json::<Value>().await.unwrap()["bytes"], 1024);
    }
    // The oversized requests never reached the upstream.
    assert_eq!(up.seen().len(), 2);
    proxy.stop().await;
}

fn chunked_body(chunks: usize, size: usize) -> reqwest::Body {
    let stream = futures_util::stream::iter(
        (0..chunks).map(move |_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'c'; size]))),
    );
    reqwest::Body::wrap_stream(stream)
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_gets_413() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&route("/api/", &up.url(), "max_body_bytes = 100000")).await;
    for client in [proxy.http1(), proxy.http2()] {
        let res = client
            .post(proxy.url("/api/upload"))
            .body(chunked_body(64, 4096))
            .send()
            .await
            .unwrap();
        expect_json_error(res, 413, "payload_too_large").await;
        // Under the limit, a body without Content-Length streams through.
        let res = client
            .post(proxy.url("/api/upload"))
            .body(chunked_body(20, 4096))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.json::<Value>().await.unwrap()["bytes"], 20 * 4096);
    }
    proxy.stop().await;
}

/// An early answer reaches a client that is still sending (RFC 9112 §9.6): coatcheck answers 413
/// in the middle of a chunked upload and closes the connection, but it keeps reading and dropping
/// what the client sends for a while (a lingering close). Closed at once, its socket would meet
/// the client's next bytes with a reset, which fails the client's writes and throws away the
/// answer the client has not read yet.
#[tokio::test]
async fn an_early_413_reaches_a_client_that_keeps_sending() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&route("/api/", &up.url(), "max_body_bytes = 1000")).await;
    let mut conn = RawConn::connect(proxy.addr).await;
    conn.send(
        b"POST /api/upload HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: chunked\r\n\r\n",
    )
    .await;
    let chunk = format!("1000\r\n{}\r\n", "a".repeat(0x1000));
    // 4 KiB is over the limit: coatcheck answers 413 and closes its side.
    conn.send(chunk.as_bytes()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The client has read nothing yet and goes on sending. Each write succeeds (`send` panics on
    // a broken pipe or a reset), and so does the read of the answer afterwards.
    for _ in 0..16 {
        conn.send(chunk.as_bytes()).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let res = conn.read_response().await;
    assert_eq!(res.status, 413, "{:?}", String::from_utf8_lossy(&res.body));
    assert_eq!(res.json()["error"], "payload_too_large");
    assert!(
        res.headers
            .iter()
            .any(|(n, v)| n == "connection" && v == "close"),
        "{:?}",
        res.headers
    );
    proxy.stop().await;
}

#[tokio::test]
async fn oversized_request_headers_get_431() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&format!(
        "[server.limits]\nmax_header_bytes = 4096\n\n{}",
        route("/api/", &up.url(), "")
    ))
    .await;
    let big = "b".repeat(6000);
    for client in [proxy.http1(), proxy.http2()] {
        let res = client
            .get(proxy.url("/api/echo"))
            .header("x-big", &big)
            .send()
            .await
            .unwrap();
        expect_json_error(res, 431, "request_header_fields_too_large").await;
        // Just under the limit passes.
        let res = client
            .get(proxy.url("/api/echo"))
            .header("x-big", "b".repeat(3000))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    // At every size past the limit, up to far beyond hyper's own ceiling, the answer is the same
    // JSON 431 (the listener stops reading the head and the router answers).
    for size in [4_200, 9_000, 12_000, 20_000, 60_000, 200_000] {
        let conn = RawConn::connect(proxy.addr).await;
        let huge = format!(
            "GET /api/echo HTTP/1.1\r\nHost: localhost\r\nX-Huge: {}\r\n\r\n",
            "h".repeat(size)
        );
        // The proxy stops reading once it has judged: write in the background, read meanwhile.
        let (mut r, mut w) = tokio::io::split(conn.stream);
        let writer = tokio::spawn(async move {
            let _ = tokio::time::timeout(WAIT, w.write_all(huge.as_bytes())).await;
            w
        });
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut got)).await;
        drop(writer.await);
        let text = String::from_utf8_lossy(&got).into_owned();
        assert!(text.starts_with("HTTP/1.1 431"), "{size}: {text}");
        assert!(
            text.contains("\"error\":\"request_header_fields_too_large\""),
            "{size}: {text}"
        );
        assert!(
            text.to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{text}"
        );
    }
    assert_eq!(up.seen().len(), 2, "only the small requests got through");
    let res = proxy
        .http1()
        .get(proxy.url("/api/echo"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    proxy.stop().await;
}

#[tokio::test]
async fn an_unreachable_upstream_gets_502() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let proxy = start_proxy(&route("/api/", &format!("http://127.0.0.1:{port}"), "")).await;
    for client in [proxy.http1(), proxy.http2()] {
        let res = client.get(proxy.url("/api/echo")).send().await.unwrap();
        let body = expect_json_error(res, 502, "bad_gateway").await;
        // No internal detail (address, OS error) in the message.
        let msg = body["message"].as_str().unwrap();
        assert!(
            !msg.contains(&port.to_string()) && !msg.contains("refused"),
            "{msg}"
        );
    }
    proxy.stop().await;
}

#[tokio::test]
async fn an_upstream_that_breaks_the_exchange_gets_502() {
    // An "upstream" that answers garbage, and one that hangs up at once.
    let garbage = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hangup = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (garbage_addr, hangup_addr) = (garbage.local_addr().unwrap(), hangup.local_addr().unwrap());
    let servers = tokio::spawn(async move {
        loop {
            tokio::select! {
                Ok((mut s, _)) = garbage.accept() => {
                    tokio::spawn(async move {
                        let mut buf = [0u8; 1024];
                        let _ = s.read(&mut buf).await;
                        let _ = s.write_all(b"this is not HTTP\r\n\r\n").await;
                    });
                }
                Ok((s, _)) = hangup.accept() => drop(s),
            }
        }
    });
    let proxy = start_proxy(&format!(
        "{}{}",
        route("/garbage/", &format!("http://{garbage_addr}"), ""),
        route("/hangup/", &format!("http://{hangup_addr}"), ""),
    ))
    .await;
    for client in [proxy.http1(), proxy.http2()] {
        for path in ["/garbage/x", "/hangup/x"] {
            let res = client.get(proxy.url(path)).send().await.unwrap();
            expect_json_error(res, 502, "bad_gateway").await;
        }
    }
    // The proxy is unharmed.
    let res = proxy
        .http1()
        .get(proxy.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    servers.abort();
    proxy.stop().await;
}

/// The requests of one HTTP/1.1 connection share one deadline timer, re-armed for each: every
/// request gets its whole `timeout` counted from its own start (not from an earlier request's), and
/// the timer works again after it has fired.
#[tokio::test]
async fn the_requests_of_one_connection_each_get_their_whole_timeout() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&route("/api/", &up.url(), "timeout = \"400ms\"")).await;
    let mut conn = RawConn::connect(proxy.addr).await;
    let get = |ms: u64| format!("GET /api/slow?ms={ms} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    // 250 ms into a 400 ms timeout, the next request starts: had it kept the first one's deadline,
    // it would be cut 150 ms later.
    for round in 0..2 {
        conn.send(get(250).as_bytes()).await;
        assert_eq!(conn.read_response().await.status, 200, "round {round}");
        let start = Instant::now();
        conn.send(get(320).as_bytes()).await;
        let res = conn.read_response().await;
        assert_eq!(
            res.status,
            200,
            "round {round}: {res:?} after {:?}",
            start.elapsed()
        );
        // A request that outlives its timeout is cut at its own deadline (the timer fires) …
        let start = Instant::now();
        conn.send(get(5000).as_bytes()).await;
        let res = conn.read_response().await;
        assert_eq!(res.status, 504, "round {round}: {res:?}");
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(390) && took < Duration::from_secs(3),
            "round {round}: 504 after {took:?}"
        );
        // … and the same connection's timer serves the next round.
    }
    proxy.stop().await;
}

/// The shared timer is armed for the earliest deadline: after a request on a route with a long
/// timeout, a request on a route with a short one on the same connection is cut at its own.
#[tokio::test]
async fn a_shorter_route_timeout_after_a_longer_one_on_one_connection_is_kept() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&format!(
        "{}{}",
        route("/long/", &up.url(), "timeout = \"20s\""),
        route("/short/", &up.url(), "timeout = \"300ms\""),
    ))
    .await;
    let mut conn = RawConn::connect(proxy.addr).await;
    conn.send(b"GET /long/slow?ms=10 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    assert_eq!(conn.read_response().await.status, 200);
    let start = Instant::now();
    conn.send(b"GET /short/slow?ms=5000 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    let res = conn.read_response().await;
    let took = start.elapsed();
    assert_eq!(res.status, 504, "{res:?} after {took:?}");
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_secs(3),
        "504 after {took:?}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_slow_upstream_gets_504_and_is_cancelled() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&route("/api/", &up.url(), "timeout = \"300ms\"")).await;
    let start = Instant::now();
    let res = proxy
        .http1()
        .get(proxy.url("/api/slow?ms=5000"))
        .send()
        .await
        .unwrap();
    expect_json_error(res, 504, "gateway_timeout").await;
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "504 took {:?}",
        start.elapsed()
    );
    // The abandoned upstream request is dropped, not left running.
    assert!(
        up.wait_for(Duration::from_secs(10), |s| s
            .cancelled
            .load(Ordering::SeqCst)
            == 1)
            .await,
        "the upstream request was not cancelled"
    );
    // A fast answer on the same route still works.
    let res = proxy
        .http2()
        .get(proxy.url("/api/slow?ms=10"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    proxy.stop().await;
}

/// The listener holds each request head until it is whole (see `HeadWatch`); a head that comes
/// whole in one read is handed to hyper where it was read. Every way a head can arrive on one
/// connection must reach the upstream intact and in order.
#[tokio::test]
async fn request_heads_arriving_whole_in_pieces_or_pipelined_all_reach_the_upstream() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&route("/api/", &up.url(), "")).await;
    let mut conn = RawConn::connect(proxy.addr).await;
    // Whole, in one write.
    conn.send(b"GET /api/echo?n=1 HTTP/1.1\r\nHost: localhost\r\nX-N: 1\r\n\r\n")
        .await;
    assert_eq!(conn.read_response().await.status, 200);
    // In pieces: the first read is held, the rest joins it.
    for piece in [
        &b"GET /api/echo?n=2 HT"[..],
        b"TP/1.1\r\nHost: localhost\r\nX-N",
        b": 2\r\n",
        b"\r\n",
    ] {
        conn.send(piece).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert_eq!(conn.read_response().await.status, 200);
    // Empty lines before a head are ignored (RFC 9112 §2.2), also when they come alone.
    conn.send(b"\r\n").await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    conn.send(b"GET /api/echo?n=3 HTTP/1.1\r\nHost: localhost\r\nX-N: 3\r\n\r\n")
        .await;
    assert_eq!(conn.read_response().await.status, 200);
    // A head and its body in one write, then two pipelined heads in one write.
    conn.send(
        b"POST /api/echo?n=4 HTTP/1.1\r\nHost: localhost\r\nX-N: 4\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await;
    let res = conn.read_response().await;
    assert_eq!(res.status, 200);
    conn.send(
        b"GET /api/echo?n=5 HTTP/1.1\r\nHost: localhost\r\nX-N: 5\r\n\r\n\
          GET /api/echo?n=6 HTTP/1.1\r\nHost: localhost\r\nX-N: 6\r\n\r\n",
    )
    .await;
    assert_eq!(conn.read_response().await.status, 200);
    assert_eq!(conn.read_response().await.status, 200);
    let seen = up.seen();
    let got: Vec<_> = seen
        .iter()
        .map(|s| {
            (
                s.method.as_str(),
                s.uri.as_str(),
                s.header("x-n").unwrap_or("-"),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("GET", "/api/echo?n=1", "1"),
            ("GET", "/api/echo?n=2", "2"),
            ("GET", "/api/echo?n=3", "3"),
            ("POST", "/api/echo?n=4", "4"),
            ("GET", "/api/echo?n=5", "5"),
            ("GET", "/api/echo?n=6", "6"),
        ]
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_client_trickling_its_headers_is_cut_off() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&format!(
        "[server.limits]\nheader_read_timeout = \"1s\"\n\n{}",
        route("/api/", &up.url(), "")
    ))
    .await;
    let mut conn = RawConn::connect(proxy.addr).await;
    let start = Instant::now();
    conn.send(b"GET /api/echo HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        .await;
    // One byte every 200 ms, for up to 15 s: the proxy must hang up long before.
    let mut cut_after = None;
    for _ in 0..75 {
        if tokio::time::timeout(WAIT, conn.stream.write_all(b"a"))
            .await
            .map(|r| r.is_err())
            .unwrap_or(true)
        {
            cut_after = Some(start.elapsed());
            break;
        }
        let _ = conn.stream.flush().await;
        if conn
            .closed_within(Duration::from_millis(200))
            .await
            .is_some()
        {
            cut_after = Some(start.elapsed());
            break;
        }
    }
    let cut_after = cut_after.expect("the trickling client was never cut off");
    assert!(
        cut_after >= Duration::from_millis(800) && cut_after < Duration::from_secs(8),
        "cut off after {cut_after:?}"
    );
    let text = String::from_utf8_lossy(conn.buffered()).into_owned();
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    assert!(up.seen().is_empty());

    // A client that opens TCP and never starts TLS is cut off too.
    let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "a silent connection was left open: {r:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(8));

    // Normal clients are unaffected.
    assert_eq!(raw_get(proxy.addr, "/api/echo", "").await.status, 200);
    proxy.stop().await;
}

#[tokio::test]
async fn a_client_that_disconnects_cancels_its_upstream_request() {
    let up = Upstream::start().await;
    let proxy = proxy_to(&up).await;
    // HTTP/1.1: the client closes its connection.
    let mut conn = RawConn::connect(proxy.addr).await;
    conn.send(b"GET /api/slow?ms=20000 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    assert!(
        up.wait_for(WAIT, |s| s.slow_started.load(Ordering::SeqCst) == 1)
            .await
    );
    drop(conn);
    assert!(
        up.wait_for(WAIT, |s| s.cancelled.load(Ordering::SeqCst) == 1)
            .await,
        "HTTP/1.1: the upstream request outlived its client"
    );

    // HTTP/2: the client resets its stream (the connection stays up).
    let client = proxy.http2();
    let url = proxy.url("/api/slow?ms=20000");
    let c = client.clone();
    let task = tokio::spawn(async move { c.get(url).send().await });
    assert!(
        up.wait_for(WAIT, |s| s.slow_started.load(Ordering::SeqCst) == 2)
            .await
    );
    task.abort();
    assert!(
        up.wait_for(WAIT, |s| s.cancelled.load(Ordering::SeqCst) == 2)
            .await,
        "HTTP/2: the upstream request outlived its stream"
    );
    let res = client.get(proxy.url("/api/echo")).send().await.unwrap();
    assert_eq!(res.version(), reqwest::Version::HTTP_2);
    assert_eq!(res.status(), 200);
    assert_eq!(up.state.slow_finished.load(Ordering::SeqCst), 0);
    proxy.stop().await;
}

#[tokio::test]
async fn the_connection_limit_holds_and_the_proxy_keeps_serving() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&format!(
        "[server.limits]\nmax_connections = 4\nheader_read_timeout = \"15s\"\n\n{}",
        route("/api/", &up.url(), "")
    ))
    .await;
    // Four idle TLS connections take every slot.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(RawConn::connect(proxy.addr).await);
    }
    // Past the limit, handshakes wait (the kernel backlog holds the TCP connections).
    let attempts: Vec<_> = (0..16)
        .map(|_| {
            let addr = proxy.addr;
            tokio::spawn(async move {
                tokio::time::timeout(
                    Duration::from_millis(1500),
                    support::try_tls_connect(addr, &[b"http/1.1"]),
                )
                .await
            })
        })
        .collect();
    let mut waiting = Vec::new();
    for a in attempts {
        match a.await.unwrap() {
            Ok(Ok(_)) => panic!("a fifth connection was served while four were open"),
            Ok(Err(e)) => panic!("connection failed instead of waiting: {e}"),
            Err(_) => waiting.push(()),
        }
    }
    assert_eq!(waiting.len(), 16);
    // The held connections themselves work.
    held[0]
        .send(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    assert_eq!(held[0].read_response().await.status, 200);

    // A flood of connections that connect and go away, some with garbage.
    for i in 0..100 {
        if let Ok(mut tcp) = tokio::net::TcpStream::connect(proxy.addr).await
            && i % 2 == 0
        {
            let _ = tcp.write_all(b"\x16\x03\x01garbage").await;
        }
    }
    // When the slots free up, the proxy serves again.
    drop(held);
    let client = support::client_builder(proxy.addr)
        .http1_only()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let res = client.get(proxy.url("/api/echo")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let mut concurrent = Vec::new();
    for _ in 0..8 {
        let c = support::http1_client(proxy.addr);
        let url = proxy.url("/api/slow?ms=200");
        concurrent.push(tokio::spawn(async move { c.get(url).send().await }));
    }
    for c in concurrent {
        assert_eq!(c.await.unwrap().unwrap().status(), 200);
    }
    // And it is still running (nothing crashed the accept loop).
    assert!(proxy.running.is_some());
    proxy.stop().await;
}

#[tokio::test]
async fn the_http_redirect_listener_answers_308_to_the_https_origin() {
    let up = Upstream::start().await;
    let proxy = start_proxy_with(
        "http_redirect_listen = \"127.0.0.1:0\"",
        &route("/api/", &up.url(), ""),
    )
    .await;
    let redirect = proxy.redirect_addr.expect("redirect listener bound");
    let client = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    for (path, want) in [
        ("/", "https://localhost:8443/"),
        (
            "/api/users?id=7&x=%20y",
            "https://localhost:8443/api/users?id=7&x=%20y",
        ),
        (
            "/bff/login?returnUrl=/a",
            "https://localhost:8443/bff/login?returnUrl=/a",
        ),
    ] {
        for method in [reqwest::Method::GET, reqwest::Method::POST] {
            let res = client
                .request(method.clone(), format!("http://{redirect}{path}"))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 308, "{method} {path}");
            assert_eq!(res.headers()["location"], want, "{method} {path}");
        }
    }
    assert!(up.seen().is_empty(), "the redirect listener never proxies");
    proxy.stop().await;
}

/// An HTTP/2 connection made with hyper's client, sending its own PINGs every 300 ms (as some
/// clients do). Returns the request sender and a task that ends (with the time it took) when the
/// connection closes.
async fn pinging_h2_connection(
    addr: std::net::SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    tokio::task::JoinHandle<Duration>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let tls = support::tls_connect(addr, &[b"h2"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_millis(300))
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(tls))
        .await
        .unwrap();
    let start = Instant::now();
    let task = tokio::spawn(async move {
        let _ = conn.await;
        start.elapsed()
    });
    (send, task)
}

#[tokio::test]
async fn an_http1_connection_waits_for_its_next_request_at_most_header_read_timeout() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&format!(
        "[server.limits]\nidle_timeout = \"30s\"\nheader_read_timeout = \"1s\"\n\n{}",
        route("/api/", &up.url(), "")
    ))
    .await;
    let soon = |d: Option<Duration>| {
        d.is_some_and(|d| d >= Duration::from_millis(800) && d < Duration::from_secs(5))
    };
    // A TLS connection that never sends a request.
    let mut silent = RawConn::connect(proxy.addr).await;
    let closed = silent.closed_within(Duration::from_secs(10)).await;
    assert!(soon(closed), "a silent connection closed after {closed:?}");
    // A keep-alive connection after its answer.
    let mut kept = RawConn::connect(proxy.addr).await;
    kept.send(b"GET /api/echo HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    assert_eq!(kept.read_response().await.status, 200);
    let closed = kept.closed_within(Duration::from_secs(10)).await;
    assert!(
        soon(closed),
        "an idle keep-alive connection closed after {closed:?}"
    );
    // A slow upstream answer is not a wait for the next request: the connection stays.
    let mut slow = RawConn::connect(proxy.addr).await;
    slow.send(b"GET /api/slow?ms=2500 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    assert_eq!(slow.read_response().await.status, 200);
    proxy.stop().await;
}

#[tokio::test]
async fn idle_connections_are_closed_but_busy_ones_are_not() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&format!(
        "[server.limits]\nidle_timeout = \"2s\"\nheader_read_timeout = \"20s\"\n\n{}",
        route("/api/", &up.url(), "")
    ))
    .await;
    let idle_ok = |d: Duration| d >= Duration::from_millis(1500) && d < Duration::from_secs(10);

    // HTTP/1.1 keep-alive: closed once idle.
    let mut h1 = RawConn::connect(proxy.addr).await;
    h1.send(b"GET /api/echo HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    assert_eq!(h1.read_response().await.status, 200);
    let closed = h1.closed_within(Duration::from_secs(15)).await;
    assert!(
        closed.is_some_and(idle_ok),
        "HTTP/1.1 idle close after {closed:?}"
    );

    // HTTP/2: closed once idle, even though the client keeps PINGing.
    let (mut send, conn) = pinging_h2_connection(proxy.addr).await;
    let req = http::Request::get(proxy.url("/api/echo"))
        .body(http_body_util::Empty::new())
        .unwrap();
    let res = send.send_request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    drop(res);
    let closed = tokio::time::timeout(Duration::from_secs(15), conn).await;
    assert!(
        matches!(closed, Ok(Ok(d)) if idle_ok(d)),
        "HTTP/2 idle close: {closed:?}"
    );

    // Quiet streams (3 s between events, longer than the idle timeout) are not idle.
    let sse = |client: reqwest::Client| {
        let url = proxy.url("/api/sse?events=3&every_ms=3000");
        tokio::spawn(async move {
            let start = Instant::now();
            let res = client.get(url).send().await.unwrap();
            event_arrivals(res, start).await
        })
    };
    let (a, b) = (sse(proxy.http1()), sse(proxy.http2()));
    // Meanwhile, a WebSocket that talks every 500 ms outlives the idle timeout too.
    let mut ws = RawConn::connect(proxy.addr).await;
    ws.send(b"GET /api/ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        .await;
    assert_eq!(ws.read_head().await.0, 101);
    for i in 0..10u8 {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        ws.send(&[b'm', i]).await;
        assert_eq!(
            ws.read_exact(2).await,
            [b'm', i],
            "WebSocket cut after {i} messages"
        );
    }
    // An upgraded connection that falls silent is idle like any other.
    let closed = ws.closed_within(Duration::from_secs(15)).await;
    assert!(
        closed.is_some_and(idle_ok),
        "silent WebSocket close: {closed:?}"
    );
    for task in [a, b] {
        let arrivals = tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
        assert_eq!(arrivals.len(), 3, "a quiet stream was cut: {arrivals:?}");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn the_route_timeout_leaves_time_for_a_slow_upload() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&route("/api/", &up.url(), "timeout = \"1s\"")).await;
    // 3 s of upload; the upstream answers once it has the whole body.
    let body = futures_util::stream::unfold(0u32, |i| async move {
        if i == 10 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        Some((
            Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'u'; 1000])),
            i + 1,
        ))
    });
    let res = proxy
        .http1()
        .post(proxy.url("/api/upload"))
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap()["bytes"], 10_000);

    // An upload that stalls is cut off like a silent upstream.
    let mut conn = RawConn::connect(proxy.addr).await;
    conn.send(
        b"POST /api/upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\nonly ten b",
    )
    .await;
    let start = Instant::now();
    let res = conn.read_response().await;
    assert_eq!(res.status, 504, "{res:?}");
    assert_eq!(res.json()["error"], "gateway_timeout");
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "{:?}",
        start.elapsed()
    );
    proxy.stop().await;
}

#[tokio::test]
async fn expect_100_continue_uploads_work() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&route("/api/", &up.url(), "max_body_bytes = 1000")).await;
    let mut conn = RawConn::connect(proxy.addr).await;
    conn.send(b"POST /api/upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 500\r\nExpect: 100-continue\r\n\r\n")
        .await;
    let (status, _) = conn.read_head().await;
    assert_eq!(status, 100, "the client is told to go on");
    conn.send(&[b'e'; 500]).await;
    let res = conn.read_response().await;
    assert_eq!(res.status, 200);
    assert_eq!(res.json()["bytes"], 500);
    // Over the limit, the answer comes at once and no body is asked for.
    let mut conn = RawConn::connect(proxy.addr).await;
    conn.send(b"POST /api/upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n")
        .await;
    let res = conn.read_response().await;
    assert_eq!(res.status, 413);
    assert_eq!(res.json()["error"], "payload_too_large");
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Shutdown
// ---------------------------------------------------------------------------------------------

/// Polls until a TCP connect to `addr` is refused (bounded); returns whether it was.
async fn refuses_connections(addr: std::net::SocketAddr, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr))
            .await
        {
            Ok(Err(_)) => return true,
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    false
}

#[tokio::test]
async fn graceful_shutdown_lets_an_in_flight_request_finish() {
    let up = Upstream::start().await;
    let mut proxy = start_proxy(&format!(
        "[server.limits]\nshutdown_grace = \"20s\"\n\n{}",
        route("/api/", &up.url(), "")
    ))
    .await;
    let addr = proxy.addr;
    let client = proxy.http1();
    let url = proxy.url("/api/slow?ms=4000");
    let in_flight = tokio::spawn(async move {
        let res = client.get(url).send().await?;
        let status = res.status();
        res.json::<Value>().await.map(|b| (status, b))
    });
    assert!(
        up.wait_for(WAIT, |s| s.slow_started.load(Ordering::SeqCst) == 1)
            .await
    );
    let running = proxy.running.take().unwrap();
    running.shutdown();
    let stopped = tokio::spawn(running.wait());
    assert!(
        refuses_connections(addr, Duration::from_secs(5)).await,
        "still accepting after shutdown"
    );
    assert!(!in_flight.is_finished(), "the slow request ended early");
    let (status, body) = tokio::time::timeout(WAIT, in_flight)
        .await
        .expect("in-flight request finished")
        .unwrap()
        .expect("in-flight request succeeded");
    assert_eq!(status, 200);
    assert_eq!(body["slept_ms"], 4000);
    tokio::time::timeout(WAIT, stopped)
        .await
        .expect("coatcheck stopped after draining")
        .unwrap();
    assert_eq!(up.state.cancelled.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let up = Upstream::start().await;
    let mut proc = ProxyProcess::start(&proxy_config(
        "",
        &format!(
            "[server.limits]\nshutdown_grace = \"20s\"\n\n{}",
            route("/api/", &up.url(), "")
        ),
    ))
    .await;
    let addr = proc.addr;
    let client = http1_client(addr);
    let res = client
        .get(format!("https://localhost:{}/healthz", addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let url = format!("https://localhost:{}/api/slow?ms=4000", addr.port());
    let c = client.clone();
    let in_flight = tokio::spawn(async move {
        let res = c.get(url).send().await?;
        let status = res.status();
        res.json::<Value>().await.map(|b| (status, b))
    });
    assert!(
        up.wait_for(WAIT, |s| s.slow_started.load(Ordering::SeqCst) == 1)
            .await
    );
    proc.signal("TERM");
    assert!(
        refuses_connections(addr, Duration::from_secs(5)).await,
        "still accepting after SIGTERM; logs:\n{}",
        proc.logs()
    );
    let (status, body) = tokio::time::timeout(WAIT, in_flight)
        .await
        .expect("in-flight request finished")
        .unwrap()
        .unwrap_or_else(|e| panic!("in-flight request failed: {e}; logs:\n{}", proc.logs()));
    assert_eq!(status, 200);
    assert_eq!(body["slept_ms"], 4000);
    let exit = proc
        .wait_exit(WAIT)
        .await
        .unwrap_or_else(|| panic!("coatcheck did not exit; logs:\n{}", proc.logs()));
    assert_eq!(exit.code(), Some(0), "logs:\n{}", proc.logs());
    let logs = proc.logs();
    assert!(
        !logs.contains("ms=4000"),
        "query strings never reach the log:\n{logs}"
    );
    assert_access_lines_for_drained_request(&logs, &up.url());
}

/// One access line per request, with what an operator needs: the drained `/api/slow?ms=4000`
/// request sent to `upstream`, and the `/healthz` probe before it.
fn assert_access_lines_for_drained_request(logs: &str, upstream: &str) {
    let access: Vec<Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "coatcheck::access")
        .collect();
    let slow = access
        .iter()
        .find(|v| v["path"] == "/api/slow")
        .unwrap_or_else(|| panic!("no access line for the drained request:\n{logs}"));
    assert_eq!(slow["method"], "GET", "{slow}");
    assert_eq!(slow["status"], 200, "{slow}");
    assert_eq!(slow["route"], "/api/", "{slow}");
    assert_eq!(slow["upstream"], upstream, "{slow}");
    assert!(slow["bytes"].as_u64().is_some_and(|b| b > 0), "{slow}");
    assert!(
        slow["duration_ms"].as_f64().is_some_and(|d| d >= 4000.0),
        "{slow}"
    );
    assert_eq!(
        slow["request_id"].as_str().map(str::len),
        Some(32),
        "{slow}"
    );
    assert!(
        access
            .iter()
            .any(|v| v["path"] == "/healthz" && v["status"] == 200)
    );
}

/// Client I/O that keeps a copy of every byte it reads (the plaintext under TLS).
struct Recording<T> {
    inner: T,
    read: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Recording<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let got = buf.filled()[before..].to_vec();
        self.read.lock().unwrap().extend_from_slice(&got);
        r
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Recording<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// How an HPACK field representation stores its field (RFC 7541 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hpack {
    /// §6.1: a reference to a table entry.
    Indexed,
    /// §6.2.1: a literal the decoder adds to its dynamic table.
    Incremental,
    /// §6.2.2: a literal not added to the table.
    WithoutIndexing,
    /// §6.2.3: a literal that no hop may ever add to a table.
    NeverIndexed,
}

/// The representation of each field of an HPACK header block, in order (size updates skipped).
fn hpack_representations(mut block: &[u8]) -> Vec<Hpack> {
    fn int(block: &mut &[u8], prefix: u32) -> usize {
        let max = (1usize << prefix) - 1;
        let mut v = usize::from(block[0]) & max;
        *block = &block[1..];
        if v == max {
            let mut shift = 0;
            loop {
                let b = block[0];
                *block = &block[1..];
                v += usize::from(b & 0x7f) << shift;
                shift += 7;
                if b & 0x80 == 0 {
                    break;
                }
            }
        }
        v
    }
    fn string(block: &mut &[u8]) {
        let len = int(block, 7);
        *block = &block[len..];
    }
    let mut out = Vec::new();
    while !block.is_empty() {
        let b = block[0];
        let (kind, prefix) = match b {
            _ if b & 0x80 != 0 => (Hpack::Indexed, 7),
            _ if b & 0xc0 == 0x40 => (Hpack::Incremental, 6),
            _ if b & 0xe0 == 0x20 => {
                int(&mut block, 5);
                continue;
            }
            _ if b & 0xf0 == 0x10 => (Hpack::NeverIndexed, 4),
            _ => (Hpack::WithoutIndexing, 4),
        };
        let name = int(&mut block, prefix);
        if kind != Hpack::Indexed {
            if name == 0 {
                string(&mut block);
            }
            string(&mut block);
        }
        out.push(kind);
    }
    out
}

#[tokio::test]
async fn http2_answers_send_their_request_id_as_a_never_indexed_literal() {
    // The id is new on every answer: an HPACK table entry for it would never be referenced, and
    // would push out fields that repeat. The fields that do repeat still come from the table.
    let up = Upstream::start().await;
    let proxy = proxy_to(&up).await;
    let tls = support::tls_connect(proxy.addr, &[b"h2"]).await;
    let read = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let io = Recording {
        inner: tls,
        read: read.clone(),
    };
    let (mut send, conn) = h2::client::handshake(io).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut answers = Vec::new();
    for _ in 0..3 {
        let req = http::Request::get(proxy.url("/api/echo")).body(()).unwrap();
        send = send.ready().await.unwrap();
        let (res, _) = send.send_request(req, true).unwrap();
        let res = tokio::time::timeout(WAIT, res).await.unwrap().unwrap();
        assert_eq!(res.status(), 200);
        let (head, mut body) = res.into_parts();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            body.flow_control().release_capacity(chunk.len()).unwrap();
        }
        answers.push(head.headers);
    }
    // The server's HEADERS frames, in stream order (each fits one frame: END_HEADERS).
    let bytes = read.lock().unwrap().clone();
    let mut blocks = Vec::new();
    let mut at = 0;
    while at + 9 <= bytes.len() {
        let len = (usize::from(bytes[at]) << 16)
            | (usize::from(bytes[at + 1]) << 8)
            | usize::from(bytes[at + 2]);
        if bytes[at + 3] == 1 {
            assert_ne!(bytes[at + 4] & 0x4, 0, "END_HEADERS on the HEADERS frame");
            blocks.push(bytes[at + 9..at + 9 + len].to_vec());
        }
        at += 9 + len;
    }
    assert_eq!(blocks.len(), 3);
    let mut ids = Vec::new();
    for (i, (block, headers)) in blocks.iter().zip(&answers).enumerate() {
        let kinds = hpack_representations(block);
        // The first field is :status; then the regular fields in the order they were decoded.
        assert_eq!(kinds.len(), headers.len() + 1, "answer {i}: {kinds:?}");
        let kind_of = |name: &str| {
            let at = headers.iter().position(|(k, _)| k == name).unwrap();
            kinds[at + 1]
        };
        assert_eq!(kind_of("x-request-id"), Hpack::NeverIndexed, "answer {i}");
        if i > 0 {
            assert_eq!(
                kind_of("strict-transport-security"),
                Hpack::Indexed,
                "answer {i}: HSTS comes from the table"
            );
        }
        ids.push(headers["x-request-id"].clone());
    }
    assert!(ids[0] != ids[1] && ids[1] != ids[2], "{ids:?}");
    drop(send);
    conn.abort();
    proxy.stop().await;
}
