//! Issue 9 "Hardening": each edge defence, end to end over real sockets. (Framing and field
//! syntax are in `tests/smuggling.rs`; the second login in a real browser in `tests/browser.rs`.)

#[path = "support/bff.rs"]
mod bff;
mod support;

use std::time::{Duration, Instant};

use bff::{Env, EnvOptions};
use reqwest::Method;
use support::upstream::Upstream;
use support::{
    RawConn, TestProxy, WAIT, expect_json_error, raw_get, start_proxy, start_proxy_with,
    tls_connect, try_tls_connect,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn route(path: &str, upstream: &str, extra: &str) -> String {
    format!("[[route]]\npath = {path:?}\nupstream = {upstream:?}\nauth = \"none\"\n{extra}\n")
}

async fn two_routes(api: &Upstream, public: &Upstream, public_extra: &str) -> TestProxy {
    start_proxy(&format!(
        "{}{}",
        route("/api/", &api.url(), ""),
        route("/", &public.url(), public_extra)
    ))
    .await
}

// ---------------------------------------------------------------------------------------------
// Path confusion
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn repeated_slashes_are_merged_before_routing() {
    let api = Upstream::start().await;
    let public = Upstream::start().await;
    let proxy = two_routes(&api, &public, "").await;
    for path in ["//api/echo", "///api//echo", "/./api//echo"] {
        let res = raw_get(proxy.addr, path, "").await;
        assert_eq!(res.status, 200, "{path}: {res:?}");
        assert_eq!(res.json()["uri"], "/api/echo", "{path}");
    }
    assert!(
        public.seen().is_empty(),
        "the public route received a path the protected route owns: {:?}",
        public.seen()
    );
    assert_eq!(api.seen().len(), 3);
    proxy.stop().await;
}

#[tokio::test]
async fn encoded_separators_are_refused_unless_the_route_allows_them() {
    let api = Upstream::start().await;
    let public = Upstream::start().await;
    let proxy = two_routes(&api, &public, "").await;
    for path in [
        "/api%2fecho",
        "/api%2Fecho",
        "/api%5cecho",
        "/x/a%2Fb",
        "/api/a\\b",
    ] {
        let res = raw_get(proxy.addr, path, "").await;
        assert_eq!(res.status, 400, "{path}: {res:?}");
        assert_eq!(res.json()["error"], "bad_request", "{path}");
    }
    assert!(public.seen().is_empty() && api.seen().is_empty());
    proxy.stop().await;

    // A route that opts in receives the encoding as the client wrote it.
    let proxy = two_routes(&api, &public, "allow_encoded_slashes = true").await;
    let res = raw_get(proxy.addr, "/files/a%2Fb", "").await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(res.json()["uri"], "/files/a%2Fb");
    // Only that route: the protected one still refuses.
    let res = raw_get(proxy.addr, "/api/a%2Fb", "").await;
    assert_eq!(res.status, 400);
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Request fields
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn method_overrides_never_reach_the_upstream() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&route("/api/", &up.url(), "")).await;
    let res = raw_get(
        proxy.addr,
        "/api/echo",
        "X-HTTP-Method-Override: DELETE\r\nX-HTTP-Method: DELETE\r\nX-Method-Override: DELETE\r\n",
    )
    .await;
    assert_eq!(res.status, 200);
    let seen = up.last().unwrap();
    for name in [
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
    ] {
        assert_eq!(seen.header(name), None, "{name} reached the upstream");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn underscore_header_names_are_dropped_or_refused_as_configured() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&route("/api/", &up.url(), "")).await;
    let res = raw_get(
        proxy.addr,
        "/api/echo",
        "X_Auth_User: admin\r\nX_Forwarded_For: 10.0.0.1\r\n",
    )
    .await;
    assert_eq!(res.status, 200);
    let seen = up.last().unwrap();
    assert!(
        !seen.headers.iter().any(|(n, _)| n.contains('_')),
        "{:?}",
        seen.headers
    );
    proxy.stop().await;

    let proxy = start_proxy_with(
        "underscore_headers = \"refuse\"\n",
        &route("/api/", &up.url(), ""),
    )
    .await;
    let before = up.seen().len();
    let res = raw_get(proxy.addr, "/api/echo", "X_Auth_User: admin\r\n").await;
    assert_eq!(res.status, 400);
    assert_eq!(res.json()["error"], "bad_request");
    assert_eq!(up.seen().len(), before);
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Response headers
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn every_answer_carries_hsts_and_coatchecks_own_carry_nosniff() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&route("/api/", &up.url(), "")).await;
    for client in [proxy.http1(), proxy.http2()] {
        let upstream_answer = client.get(proxy.url("/api/echo")).send().await.unwrap();
        assert_eq!(
            upstream_answer.headers()["strict-transport-security"],
            "max-age=31536000; includeSubDomains"
        );
        let own = client.get(proxy.url("/nowhere")).send().await.unwrap();
        assert_eq!(own.status(), 404);
        assert_eq!(
            own.headers()["strict-transport-security"],
            "max-age=31536000; includeSubDomains"
        );
        assert_eq!(own.headers()["x-content-type-options"], "nosniff");
        let health = client.get(proxy.url("/healthz")).send().await.unwrap();
        assert_eq!(health.headers()["x-content-type-options"], "nosniff");
    }
    proxy.stop().await;

    let proxy = start_proxy_with("hsts = \"max-age=600\"\n", &route("/api/", &up.url(), "")).await;
    let res = proxy
        .http1()
        .get(proxy.url("/api/echo"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["strict-transport-security"], "max-age=600");
    proxy.stop().await;

    let proxy = start_proxy_with("hsts = \"off\"\n", &route("/api/", &up.url(), "")).await;
    let res = proxy
        .http1()
        .get(proxy.url("/api/echo"))
        .send()
        .await
        .unwrap();
    assert!(res.headers().get("strict-transport-security").is_none());
    proxy.stop().await;
}

#[tokio::test]
async fn an_upstream_cannot_set_or_clear_coatchecks_cookies() {
    let env = Env::start(EnvOptions::default()).await;
    let b = env.browser();
    let cookies = [
        "__Host-coatcheck=planted; Path=/; Secure; HttpOnly",
        "__Host-coatcheck=; Max-Age=0; Path=/",
        "__Host-coatcheck-login-abcdefghijklmnop=planted; Path=/",
        "theirs=1; Path=/",
    ];
    let query: String = cookies
        .iter()
        .map(|c| format!("c={}", bff::urlencode(c)))
        .collect::<Vec<_>>()
        .join("&");
    let res = b
        .request(Method::GET, &format!("/public/set-cookie?{query}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let set: Vec<_> = res
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    assert_eq!(set, ["theirs=1; Path=/"]);
}

// ---------------------------------------------------------------------------------------------
// Slow and greedy peers
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_request_body_that_stalls_is_cut_with_408() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&format!(
        "[server.limits]\nbody_idle_timeout = \"1s\"\n\n{}",
        route("/api/", &up.url(), "")
    ))
    .await;
    let mut conn = RawConn::connect(proxy.addr).await;
    conn.send(
        format!(
            "POST /api/upload HTTP/1.1\r\nHost: localhost:{}\r\nContent-Length: 100\r\n\r\n0123456789",
            proxy.addr.port()
        )
        .as_bytes(),
    )
    .await;
    let start = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(10), conn.read_response())
        .await
        .expect("the stalled upload was cut");
    assert_eq!(res.status, 408, "{res:?}");
    assert_eq!(res.json()["error"], "request_timeout");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_response_body_that_stalls_is_cut() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&format!(
        "[server.limits]\nbody_idle_timeout = \"1s\"\n\n{}",
        route("/api/", &up.url(), "")
    ))
    .await;
    let start = Instant::now();
    let res = proxy
        .http1()
        .get(proxy.url("/api/sse?events=3&every_ms=4000"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body = tokio::time::timeout(WAIT, res.bytes())
        .await
        .expect("ended in time");
    assert!(
        body.is_err(),
        "the stalled stream was delivered in full: {body:?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
    proxy.stop().await;
}

#[tokio::test]
async fn one_address_cannot_hold_more_than_its_connection_cap() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&format!(
        "[server.limits]\nmax_connections_per_ip = 2\n\n{}",
        route("/api/", &up.url(), "")
    ))
    .await;
    let a = tls_connect(proxy.addr, &[b"http/1.1"]).await;
    let b = tls_connect(proxy.addr, &[b"http/1.1"]).await;
    // The third is closed at once, before TLS.
    let mut third = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "{r:?}");
    drop((a, b));
    // Slots come back when connections close (once coatcheck has seen them close: until then a
    // new connection is still refused, so retry the handshake, then ask on that connection).
    let mut back = None;
    for _ in 0..50 {
        let attempt = try_tls_connect(proxy.addr, &[b"http/1.1"]);
        if let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(2), attempt).await {
            back = Some(RawConn::over(stream));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut c = back.expect("the address never got a connection back");
    c.send(b"GET /api/echo HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(c.read_response().await.status, 200);
    proxy.stop().await;

    // A trusted proxy speaks for many clients and is not held to the cap.
    let proxy = start_proxy_with(
        "trusted_proxies = [\"127.0.0.1\"]\n",
        &format!(
            "[server.limits]\nmax_connections_per_ip = 2\n\n{}",
            route("/api/", &up.url(), "")
        ),
    )
    .await;
    let held: Vec<_> =
        futures_util::future::join_all((0..4).map(|_| tls_connect(proxy.addr, &[b"http/1.1"])))
            .await;
    assert_eq!(raw_get(proxy.addr, "/api/echo", "").await.status, 200);
    drop(held);
    proxy.stop().await;
}

#[tokio::test]
async fn login_and_callback_are_rate_limited_per_address_with_retry_after() {
    let env = Env::start(EnvOptions {
        routes: "[server.limits]\nlogin_requests_per_minute = 10\n".into(),
        ..EnvOptions::default()
    })
    .await;
    let b = env.browser();
    // A burst of a fifth of the minute's allowance (2), then 429 with Retry-After.
    for _ in 0..2 {
        let r = b.request(Method::GET, "/bff/login").send().await.unwrap();
        assert_eq!(r.status(), 302);
    }
    let r = b
        .request(Method::GET, "/bff/callback?state=x")
        .send()
        .await
        .unwrap();
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=6).contains(&retry), "{retry}");
    expect_json_error(r, 429, "too_many_requests").await;
    // Other endpoints are not limited.
    let r = b.api(Method::GET, "/bff/user").send().await.unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn a_slow_writer_of_a_small_body_still_streams() {
    // Priming waits only for what has already arrived: a body sent in two parts 300 ms apart
    // reaches the upstream whole.
    let up = Upstream::start().await;
    let proxy = start_proxy(&route("/api/", &up.url(), "")).await;
    let mut s = tls_connect(proxy.addr, &[b"http/1.1"]).await;
    s.write_all(
        format!(
            "POST /api/upload HTTP/1.1\r\nHost: localhost:{}\r\nContent-Length: 10\r\nConnection: close\r\n\r\n01234",
            proxy.addr.port()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.write_all(b"56789").await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut got)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"bytes\":10"), "{text}");
    proxy.stop().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_its_answer_is_cut_off() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&format!(
        "[server.limits]\nbody_idle_timeout = \"1s\"\n\n{}",
        route("/api/", &up.url(), "")
    ))
    .await;
    let total: usize = 40 * 1024 * 1024;
    let mut conn = RawConn::connect(proxy.addr).await;
    conn.send(
        format!(
            "GET /api/download?bytes={total} HTTP/1.1\r\nHost: localhost:{}\r\n\r\n",
            proxy.addr.port()
        )
        .as_bytes(),
    )
    .await;
    let (status, _) = conn.read_head().await;
    assert_eq!(status, 200);
    // Read nothing while the socket buffers fill and the write stalls.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut got = conn.buffered().len();
    let mut buf = vec![0u8; 64 * 1024];
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match conn.stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got += n,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the connection stayed open");
    assert!(
        got < total,
        "the whole answer was delivered to a reader that stalled for 4 s"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_back_channel_logout_body_that_stalls_is_cut_with_408() {
    let env = Env::start(EnvOptions {
        routes: "[server.limits]\nbody_idle_timeout = \"1s\"\n".into(),
        ..EnvOptions::default()
    })
    .await;
    let mut conn = RawConn::connect(env.proxy.addr).await;
    conn.send(
        b"POST /bff/backchannel-logout HTTP/1.1\r\nHost: localhost\r\n\
          Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 500\r\n\r\nlogout_token=ey",
    )
    .await;
    let start = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(10), conn.read_response())
        .await
        .expect("the stalled logout request was cut");
    assert_eq!(res.status, 408, "{res:?}");
    assert_eq!(res.json()["error"], "request_timeout");
    assert!(start.elapsed() < Duration::from_secs(5));
}

/// The start of a JSON body whose rest never comes (100 bytes are announced).
const STALLED_JSON_START: &str = "{\"a\":";

#[tokio::test]
async fn the_body_copy_kept_for_a_replay_has_a_read_deadline() {
    let env = Env::start(EnvOptions {
        routes: "[server.limits]\nbody_idle_timeout = \"1s\"\n".into(),
        ..EnvOptions::default()
    })
    .await;
    let b = env.logged_in("alice").await;
    let cookie = b.cookie_header().expect("a session cookie");
    let before = env.api.seen().len();
    let mut conn = RawConn::connect(env.proxy.addr).await;
    conn.send(
        format!(
            "POST /api/echo HTTP/1.1\r\nHost: localhost:8443\r\nOrigin: {}\r\nX-CSRF: 1\r\nCookie: {}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{}",
            bff::ORIGIN,
            cookie.to_str().unwrap(),
            STALLED_JSON_START
        )
        .as_bytes(),
    )
    .await;
    let start = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(10), conn.read_response())
        .await
        .expect("the stalled body was cut");
    assert_eq!(res.status, 408, "{res:?}");
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(env.api.seen().len(), before, "nothing was forwarded");
}

#[tokio::test]
async fn a_stripped_prefix_is_named_in_x_forwarded_prefix() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&route("/api/", &up.url(), "strip_prefix = true")).await;
    let res = raw_get(proxy.addr, "/api/echo", "X-Forwarded-Prefix: /evil\r\n").await;
    assert_eq!(res.status, 200);
    let seen = up.last().unwrap();
    assert_eq!(seen.path(), "/echo");
    assert_eq!(seen.header("x-forwarded-prefix"), Some("/api"));
    proxy.stop().await;
}

#[tokio::test]
async fn an_early_answer_to_a_request_whose_body_comes_later_leaves_the_connection_usable() {
    // The head watch must not swallow a request body the router never read (a 404 here) when
    // that body arrives after the head, as browsers send it.
    let up = Upstream::start().await;
    let proxy = start_proxy(&route("/api/", &up.url(), "")).await;
    let mut conn = RawConn::connect(proxy.addr).await;
    let host = format!("localhost:{}", proxy.addr.port());
    conn.send(
        format!("POST /nowhere HTTP/1.1\r\nHost: {host}\r\nContent-Length: 13\r\n\r\n").as_bytes(),
    )
    .await;
    let res = conn.read_response().await;
    assert_eq!(res.status, 404);
    tokio::time::sleep(Duration::from_millis(100)).await;
    conn.send(b"{\"late\":true}").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The same connection serves the next request, or has been closed cleanly; it never hangs.
    let _ = tokio::time::timeout(
        WAIT,
        conn.stream
            .write_all(format!("GET /api/echo HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes()),
    )
    .await;
    let mut got = conn.buffered().to_vec();
    let mut buf = [0u8; 4096];
    let outcome = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match conn.stream.read(&mut buf).await {
                Ok(0) | Err(_) => return "closed",
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    if String::from_utf8_lossy(&got).contains("\"uri\":\"/api/echo\"") {
                        return "served";
                    }
                }
            }
        }
    })
    .await;
    assert!(
        outcome.is_ok(),
        "the connection hung: {:?}",
        String::from_utf8_lossy(&got)
    );
    eprintln!("OUTCOME {outcome:?}");
    proxy.stop().await;
}
