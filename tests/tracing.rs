//! W3C trace-context propagation and OTLP span export (issue 11): what the upstream and the
//! identity provider receive, what an OTLP/HTTP collector receives, and what it never receives.

#[path = "support/bff.rs"]
mod bff;
mod support;

use std::time::Duration;

use bff::{Browser, EnvOptions, config_text};
use reqwest::Method;
use serde_json::Value;
use support::idp::{Idp, IdpOptions, login_via_forms};
use support::otlp::{Receiver, SpanRecord};
use support::upstream::Upstream;
use support::{ProxyProcess, free_port, proxy_config, start_proxy, wait_ready};

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";
/// Spans of OTLP `SpanKind`.
const SERVER: i32 = 2;
const CLIENT: i32 = 3;

fn traceparent(trace: &str, span: &str, flags: &str) -> String {
    format!("00-{trace}-{span}-{flags}")
}

/// `(trace id, parent id, flags)` of a well-formed version-00 `traceparent`, else `None`.
fn parts(v: &str) -> Option<(String, String, String)> {
    let p: Vec<&str> = v.split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let ok = p.len() == 4
        && p[0] == "00"
        && hex(p[1], 32)
        && hex(p[2], 16)
        && hex(p[3], 2)
        && p[1].bytes().any(|b| b != b'0')
        && p[2].bytes().any(|b| b != b'0');
    ok.then(|| (p[1].to_owned(), p[2].to_owned(), p[3].to_owned()))
}

/// coatcheck in-process in front of an upstream, one public route (no export).
async fn public_proxy() -> (Upstream, support::TestProxy) {
    let api = Upstream::start().await;
    let proxy = start_proxy(&format!(
        "[[route]]\npath = \"/\"\nupstream = \"{}\"\nauth = \"none\"\n",
        api.url()
    ))
    .await;
    (api, proxy)
}

#[tokio::test]
async fn an_incoming_traceparent_keeps_its_trace_id_and_gets_coatchecks_span_as_parent() {
    let (api, proxy) = public_proxy().await;
    for flags in ["01", "00"] {
        let res = proxy
            .http1()
            .get(proxy.url("/orders"))
            .header("traceparent", traceparent(CLIENT_TRACE, CLIENT_SPAN, flags))
            .header("tracestate", "vendor=abc,other=x:y")
            .header("x-request-id", "req-trace-1")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let seen = api.last().unwrap();
        let sent = seen
            .header("traceparent")
            .expect("upstream got a traceparent");
        let (trace, parent, f) = parts(sent).unwrap_or_else(|| panic!("invalid: {sent}"));
        assert_eq!(trace, CLIENT_TRACE, "the client's trace goes on");
        assert_ne!(parent, CLIENT_SPAN, "coatcheck's own span is the parent");
        assert_eq!(f, flags, "flags are kept");
        assert_eq!(seen.header("tracestate"), Some("vendor=abc,other=x:y"));
        assert_eq!(seen.header("x-request-id"), Some("req-trace-1"));
    }
}

#[tokio::test]
async fn without_a_valid_traceparent_the_upstream_gets_a_new_trace() {
    let (api, proxy) = public_proxy().await;
    let mut traces = std::collections::HashSet::new();
    for _ in 0..3 {
        let res = proxy
            .http2()
            .get(proxy.url("/no-trace"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let seen = api.last().unwrap();
        let sent = seen.header("traceparent").expect("a new traceparent");
        let (trace, _, _) = parts(sent).unwrap_or_else(|| panic!("invalid: {sent}"));
        traces.insert(trace);
        assert!(seen.header("x-request-id").is_some(), "request ids stay");
    }
    assert_eq!(traces.len(), 3, "every request starts its own trace");
}

#[tokio::test]
async fn malformed_traceparents_never_break_a_request_and_start_a_new_trace() {
    let (api, proxy) = public_proxy().await;
    let long = format!(
        "{}-{}",
        traceparent(CLIENT_TRACE, CLIENT_SPAN, "01"),
        "x".repeat(2000)
    );
    let bad = [
        long.as_str(),
        "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
        "",
        "-",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
    ];
    for value in bad {
        let res = proxy
            .http1()
            .get(proxy.url("/malformed"))
            .header("traceparent", value)
            .header("tracestate", "vendor=abc")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "traceparent {value:?}");
        let seen = api.last().unwrap();
        let sent = seen.header("traceparent").expect("a new traceparent");
        let (trace, _, _) = parts(sent).unwrap_or_else(|| panic!("invalid: {sent}"));
        assert_ne!(trace, CLIENT_TRACE, "{value:?} is not continued");
        assert_eq!(
            seen.header("tracestate"),
            None,
            "the tracestate of an invalid traceparent is dropped ({value:?})"
        );
    }
    // Two traceparent headers are invalid too (W3C Trace Context §3.2.1).
    let res = proxy
        .http1()
        .get(proxy.url("/two"))
        .header("traceparent", traceparent(CLIENT_TRACE, CLIENT_SPAN, "01"))
        .header(
            "traceparent",
            traceparent(CLIENT_TRACE, "1111111111111111", "01"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let sent = api
        .last()
        .unwrap()
        .header("traceparent")
        .unwrap()
        .to_owned();
    assert_ne!(parts(&sent).unwrap().0, CLIENT_TRACE);
}

/// The authorization code in the provider's redirect to the callback.
fn code_of(callback: &str) -> String {
    let url = url::Url::parse(callback).expect("callback URL");
    url.query_pairs()
        .find(|(k, _)| k == "code")
        .map(|(_, v)| v.into_owned())
        .expect("code in the callback")
}

fn children<'a>(spans: &'a [SpanRecord], parent: &SpanRecord) -> Vec<&'a SpanRecord> {
    spans
        .iter()
        .filter(|s| s.trace_id == parent.trace_id && s.parent_span_id == parent.span_id)
        .collect()
}

fn server_span<'a>(spans: &'a [SpanRecord], trace: &str) -> &'a SpanRecord {
    let servers: Vec<_> = spans
        .iter()
        .filter(|s| s.trace_id == trace && s.kind == SERVER)
        .collect();
    assert_eq!(
        servers.len(),
        1,
        "one server span for trace {trace}: {spans:#?}"
    );
    servers[0]
}

fn bearer(api: &Upstream) -> String {
    let seen = api.last().unwrap();
    let auth = seen.header("authorization").expect("bearer injected");
    auth.strip_prefix("Bearer ").unwrap().to_owned()
}

/// Access-token lifetime (seconds) at the provider and in coatcheck's view: short, so a
/// request a little later refreshes.
const SHORT_TTL: u64 = 4;
/// The span the client's `traceparent` names as the parent of every request below.
const CLIENT_PARENT: &str = "1111111111111111";

/// The provider, with short-lived access tokens, and the real binary in front of `api`,
/// exporting to `receiver` as `bff-under-test` with a short batch delay; returns once ready.
async fn start_exporting_binary(receiver: &Receiver, api: &Upstream) -> (Idp, ProxyProcess) {
    let idp_port = free_port();
    let idp = Idp::start(IdpOptions {
        port: idp_port,
        access_token_ttl: SHORT_TTL,
        ..Default::default()
    })
    .await;
    let opts = EnvOptions {
        access_token_ttl: SHORT_TTL,
        extra: format!(
            "[telemetry]\notlp_endpoint = \"{}\"\nservice_name = \"bff-under-test\"\n",
            receiver.url()
        ),
        ..Default::default()
    };
    let text = proxy_config("", &config_text(&opts, idp_port, &api.url()));
    let proc = ProxyProcess::start_with_env(&text, &[("OTEL_BSP_SCHEDULE_DELAY", "200")]).await;
    wait_ready(proc.addr).await;
    (idp, proc)
}

/// Logs alice in by hand, to know the authorization code; returns the browser, the code and
/// the session cookie.
async fn log_in_by_hand(addr: std::net::SocketAddr) -> (Browser, String, String) {
    let mut b = Browser::new(addr);
    let authorize = b.start_login("/app/home").await;
    let callback = login_via_forms(&b.idp_client, &authorize, "alice", "alice-pw")
        .await
        .expect("provider login");
    let code = code_of(&callback);
    assert_eq!(b.finish_login(&callback).await.status(), 200);
    let cookie = b.session_cookie().expect("session cookie").clone();
    (b, code, cookie)
}

/// Sends `method path` through coatcheck with a sampled `traceparent` of `trace` under
/// [`CLIENT_PARENT`], and checks it succeeded.
async fn send_traced(b: &Browser, method: Method, path: &str, trace: &str) {
    let res = b
        .api(method, path)
        .header("traceparent", traceparent(trace, CLIENT_PARENT, "01"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

/// Stops the binary gracefully (which exports what is still queued) and returns the spans
/// once the refresh and the first request's server span are in.
async fn stop_and_collect(proc: &mut ProxyProcess, receiver: &Receiver) -> Vec<SpanRecord> {
    proc.signal("TERM");
    assert!(proc.wait_exit(Duration::from_secs(20)).await.is_some());
    let got = receiver
        .wait_for(Duration::from_secs(5), |s| {
            s.iter().any(|s| s.name == "session.refresh")
                && s.iter()
                    .any(|s| s.trace_id == CLIENT_TRACE && s.kind == SERVER)
        })
        .await;
    let spans = receiver.spans();
    assert!(got, "spans arrived: {spans:#?}\n{:?}", receiver.refused());
    spans
}

/// (d) One server span per request, named after the route, under the client's span; the
/// session lookup and the upstream call under it, and the upstream saw the upstream span as
/// its parent (`upstream_tp`: the `traceparent` it got).
fn assert_first_request_tree(spans: &[SpanRecord], api: &Upstream, upstream_tp: &str) {
    let server = server_span(spans, CLIENT_TRACE);
    assert_eq!(server.name, "GET /api/");
    assert_eq!(server.parent_span_id, CLIENT_PARENT);
    assert_eq!(server.service_name, "bff-under-test");
    assert_eq!(server.attr("http.route"), Some("/api/"));
    assert_eq!(server.attr("http.request.method"), Some("GET"));
    assert_eq!(server.attr("http.response.status_code"), Some("200"));
    assert_eq!(server.attr("coatcheck.auth"), Some("required"));
    assert_eq!(server.attr("coatcheck.result"), Some("ok"));
    assert_eq!(server.attr("url.scheme"), Some("https"));
    assert_eq!(server.attr("network.protocol.version"), Some("1.1"));
    assert!(server.attr("coatcheck.request_id").is_some());
    let kids = children(spans, server);
    let lookup = kids
        .iter()
        .find(|s| s.name == "session.lookup")
        .expect("session.lookup under the server span");
    assert!(matches!(
        lookup.attr("coatcheck.session.cache"),
        Some("hit" | "miss")
    ));
    let upstream = kids
        .iter()
        .find(|s| s.name == "upstream")
        .expect("upstream under the server span");
    assert_eq!(upstream.kind, CLIENT);
    assert_eq!(
        upstream.attr("server.port"),
        Some(api.addr.port().to_string().as_str())
    );
    assert_eq!(upstream.attr("http.response.status_code"), Some("200"));
    let (t, parent, _) = parts(upstream_tp).unwrap();
    assert_eq!(t, CLIENT_TRACE);
    assert_eq!(
        parent, upstream.span_id,
        "the upstream's parent is the upstream span"
    );
}

/// The refresh: a span under the second request's server span, and the `idp.token` call under
/// it, which is returned.
fn refresh_token_call<'a>(spans: &'a [SpanRecord], refresh_trace: &str) -> &'a SpanRecord {
    let server2 = server_span(spans, refresh_trace);
    let refresh = children(spans, server2)
        .into_iter()
        .find(|s| s.name == "session.refresh")
        .expect("session.refresh under the server span");
    assert_eq!(refresh.attr("coatcheck.refresh.outcome"), Some("ok"));
    let token_call = children(spans, refresh)
        .into_iter()
        .find(|s| s.name == "idp.token")
        .expect("idp.token under session.refresh");
    assert_eq!(token_call.kind, CLIENT);
    token_call
}

/// The provider (its `stats`) saw the refresh's token call with that call's span as parent, and
/// the code exchange with some valid `traceparent`.
fn assert_token_calls_traced(stats: &Value, refresh_trace: &str, token_call: &SpanRecord) {
    let calls = stats["token_traceparents"].as_array().unwrap();
    let refresh_tp = calls
        .iter()
        .find(|c| c["grant_type"] == "refresh_token")
        .and_then(|c| c["traceparent"].as_str())
        .expect("the refresh request carried a traceparent");
    let (t, parent, _) = parts(refresh_tp).unwrap();
    assert_eq!(
        t, refresh_trace,
        "the token endpoint sees the request's trace"
    );
    assert_eq!(parent, token_call.span_id);
    let code_tp = calls
        .iter()
        .find(|c| c["grant_type"] == "authorization_code")
        .and_then(|c| c["traceparent"].as_str())
        .expect("the code exchange carried a traceparent");
    assert!(parts(code_tp).is_some());
}

/// The provider (its `stats`) saw the revocation in the logout's trace, under the
/// `idp.revocation` span of the logout's server span.
fn assert_revocation_traced(spans: &[SpanRecord], stats: &Value, logout_trace: &str) {
    let revoked = stats["revocation_traceparents"].as_array().unwrap();
    let revoke_tp = revoked
        .iter()
        .find_map(|v| v.as_str())
        .expect("the revocation carried a traceparent");
    assert_eq!(parts(revoke_tp).unwrap().0, logout_trace);
    let logout = server_span(spans, logout_trace);
    assert_eq!(logout.name, "POST /bff/");
    let revocation = children(spans, logout)
        .into_iter()
        .find(|s| s.name == "idp.revocation")
        .expect("idp.revocation under the logout's server span");
    assert_eq!(parts(revoke_tp).unwrap().1, revocation.span_id);
}

/// (e) No attribute (and no byte of any export) holds a secret, a cookie or a query.
fn assert_nothing_secret_exported(
    spans: &[SpanRecord],
    receiver: &Receiver,
    secrets: [(&str, &str); 6],
) {
    for s in spans {
        for (k, v) in &s.attributes {
            for (what, secret) in secrets {
                assert!(!v.contains(secret), "{what} in {}.{k} = {v}", s.name);
            }
            assert!(!v.contains('?'), "a query string in {}.{k} = {v}", s.name);
            assert!(
                !v.to_ascii_lowercase().contains("bearer"),
                "{}.{k} = {v}",
                s.name
            );
        }
    }
    for body in receiver.bodies() {
        for (what, secret) in secrets {
            assert!(
                !body.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{what} in an export request"
            );
        }
    }
}

#[tokio::test]
async fn exported_spans_form_one_tree_per_request_and_carry_no_secret() {
    let receiver = Receiver::start().await;
    let api = Upstream::start().await;
    let (idp, mut proc) = start_exporting_binary(&receiver, &api).await;
    let (b, code, cookie) = log_in_by_hand(proc.addr).await;

    send_traced(&b, Method::GET, "/api/one?secret-query=1", CLIENT_TRACE).await;
    let upstream_tp = api
        .last()
        .unwrap()
        .header("traceparent")
        .unwrap()
        .to_owned();
    let token_one = bearer(&api);

    // Past the refresh margin (half the 4 s lifetime): the next request refreshes first.
    tokio::time::sleep(Duration::from_millis(2_300)).await;
    let refresh_trace = "5bf92f3577b34da6a3ce929d0e0e4737";
    send_traced(&b, Method::GET, "/api/two", refresh_trace).await;
    let token_two = bearer(&api);
    assert_ne!(token_one, token_two, "the token was refreshed");

    // Logout revokes the refresh token at the provider, inside the logout request's trace.
    let logout_trace = "6bf92f3577b34da6a3ce929d0e0e4738";
    send_traced(&b, Method::POST, "/bff/logout", logout_trace).await;

    let spans = stop_and_collect(&mut proc, &receiver).await;
    assert_first_request_tree(&spans, &api, &upstream_tp);
    // The refresh's token call is traced, and the provider saw that call's traceparent.
    let token_call = refresh_token_call(&spans, refresh_trace);
    let stats = idp.stats().await;
    assert_token_calls_traced(&stats, refresh_trace, token_call);
    assert_revocation_traced(&spans, &stats, logout_trace);

    assert_nothing_secret_exported(
        &spans,
        &receiver,
        [
            ("session cookie", cookie.as_str()),
            ("first access token", token_one.as_str()),
            ("refreshed access token", token_two.as_str()),
            ("client secret", "coatcheck-secret"),
            ("authorization code", code.as_str()),
            ("query string", "secret-query"),
        ],
    );
}

#[tokio::test]
async fn the_standard_otel_environment_variables_turn_export_on() {
    let receiver = Receiver::start().await;
    let api = Upstream::start().await;
    let text = proxy_config(
        "",
        &format!(
            "[[route]]\npath = \"/\"\nupstream = \"{}\"\nauth = \"none\"\n",
            api.url()
        ),
    );
    let url = receiver.url();
    let proc = ProxyProcess::start_with_env(
        &text,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", url.as_str()),
            ("OTEL_SERVICE_NAME", "from-the-environment"),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
    )
    .await;
    let client = support::http1_client(proc.addr);
    // GETs `path` (with the client's `traceparent`, if any) and returns the one the upstream got.
    let sent = |path: &'static str, client_tp: Option<String>| {
        let mut req = client.get(format!("https://localhost:{}{path}", proc.addr.port()));
        if let Some(tp) = client_tp {
            req = req.header("traceparent", tp);
        }
        let api = &api;
        async move {
            assert_eq!(req.send().await.unwrap().status(), 200, "{path}");
            api.last()
                .unwrap()
                .header("traceparent")
                .unwrap()
                .to_owned()
        }
    };
    let (trace, _, _) = parts(&sent("/hello?x=1", None).await).unwrap();
    // A client that says "not sampled" is obeyed: nothing of its trace is exported, and the
    // upstream is told the same.
    let unsampled = sent(
        "/unsampled",
        Some(traceparent(CLIENT_TRACE, CLIENT_SPAN, "00")),
    )
    .await;
    assert_eq!(parts(&unsampled).unwrap().2, "00");
    // A request after the unsampled one: once its span is in, the unsampled one would be too.
    let (after, _, _) = parts(&sent("/after", None).await).unwrap();
    let got = receiver
        .wait_for(Duration::from_secs(10), |s| {
            s.iter().any(|s| s.trace_id == trace && s.kind == SERVER)
                && s.iter().any(|s| s.trace_id == after && s.kind == SERVER)
        })
        .await;
    let spans = receiver.spans();
    assert!(
        got,
        "no server span for {trace}: {spans:#?}\n{}",
        proc.logs()
    );
    let server = server_span(&spans, &trace);
    assert!(
        spans.iter().all(|s| s.trace_id != CLIENT_TRACE),
        "an unsampled trace was exported: {spans:#?}"
    );
    assert_eq!(server.name, "GET /");
    assert_eq!(server.parent_span_id, "", "a trace coatcheck started");
    assert_eq!(server.service_name, "from-the-environment");
    assert_eq!(server.attr("coatcheck.auth"), Some("none"));
    assert!(
        children(&spans, server)
            .iter()
            .any(|s| s.name == "upstream"),
        "upstream span: {spans:#?}"
    );
}

#[test]
fn invalid_telemetry_values_are_reported_by_check_config_with_their_key() {
    let dir = std::env::temp_dir().join(format!("coatcheck-trace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = proxy_config(
        "",
        "[[route]]\npath = \"/\"\nupstream = \"http://127.0.0.1:9000\"\nauth = \"none\"\n\n\
         [telemetry]\notlp_endpoint = \"ftp://collector\"\nsample_ratio = 1.5\n\
         service_name = \"\"\ntimeout = \"soon\"\n",
    );
    let path = dir.join("bad.toml");
    std::fs::write(&path, text).unwrap();
    let out = std::process::Command::new(support::binary())
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    for key in [
        "telemetry.otlp_endpoint: ",
        "telemetry.sample_ratio: ",
        "telemetry.service_name: ",
        "telemetry.timeout: ",
    ] {
        assert!(
            stderr.lines().any(|l| l.trim_start().starts_with(key)),
            "{key} missing from:\n{stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
