//! The request-smuggling corpus: raw bytes over TLS at coatcheck, with a recording upstream
//! behind it. For every payload the test names the status coatcheck answers and what the upstream
//! received, and checks the one rule that matters: nothing reaches the upstream in a form that
//! differs from what coatcheck judged (a refused request never arrives; a smuggled second request
//! never arrives; a forwarded body has the length coatcheck read).
//!
//! HTTP/1.1 framing (RFC 9112 §6–7), field syntax (RFC 9110 §5, RFC 9112 §5), and HTTP/2 message
//! rules (RFC 9113 §8.2–8.3) with hand-built frames, plus bounded CONTINUATION and rapid-reset
//! floods.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::upstream::{Seen, Upstream};
use support::{TestProxy, start_proxy, tls_connect};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What a payload must lead to.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// coatcheck answers with one of these statuses (or just closes, `0`) and the upstream
    /// receives nothing.
    Refused(&'static [u16]),
    /// coatcheck forwards exactly `requests` requests; the first answer has `status`.
    Forwarded { status: u16, requests: usize },
    /// RFC 9112 §6.3 item 3 for an intermediary: `Content-Length` is dropped, the chunked body is
    /// what is read and forwarded, and the connection is closed after the answer, so the bytes
    /// after the chunked body are never read as a request.
    ChunkedWinsThenClosed,
}

struct Case {
    name: &'static str,
    /// The bytes after `METHOD SP`… as sent; `{host}` is replaced by `localhost:PORT`.
    payload: String,
    expect: Expect,
}

fn case(name: &'static str, payload: &str, expect: Expect) -> Case {
    Case {
        name,
        payload: payload.to_owned(),
        expect,
    }
}

const BAD: Expect = Expect::Refused(&[400]);
/// hyper answers some framing errors itself (bare 400, 501 for an unknown coding) or closes.
const BAD_OR_CLOSED: Expect = Expect::Refused(&[0, 400, 501]);
const TOO_LARGE: Expect = Expect::Refused(&[431]);

fn ok(requests: usize) -> Expect {
    Expect::Forwarded {
        status: 200,
        requests,
    }
}

/// A chunked POST to the echo endpoint with `body` as its (possibly malformed) chunked body.
fn chunked(body: &str) -> String {
    format!(
        "POST /api/echo HTTP/1.1\r\nHost: {{host}}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{body}"
    )
}

/// A request hidden after a body: if it ever reaches the upstream, a payload smuggled it.
const SMUGGLED: &str = "GET /api/smuggled HTTP/1.1\r\nHost: {host}\r\n\r\n";

/// The HTTP/1.1 corpus, group by group.
fn http1_corpus() -> Vec<Case> {
    [
        both_framings_cases(),
        transfer_encoding_cases(),
        content_length_cases(),
        field_syntax_cases(),
        host_cases(),
        method_and_upgrade_cases(),
        size_cases(),
        chunked_body_cases(),
        pipelining_cases(),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// Content-Length and Transfer-Encoding together (RFC 9112 §6.3 item 3).
fn both_framings_cases() -> Vec<Case> {
    vec![
        case(
            "CL.TE: both framings, the chunked body ends early and hides a request",
            &format!(
                "POST /api/echo HTTP/1.1\r\nHost: {{host}}\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}",
                5 + SMUGGLED.len()
            ),
            Expect::ChunkedWinsThenClosed,
        ),
        case(
            "TE.CL: both framings, the length ends early and hides a request",
            &format!(
                "POST /api/echo HTTP/1.1\r\nHost: {{host}}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{SMUGGLED}\r\n0\r\n\r\n",
                SMUGGLED.len()
            ),
            BAD_OR_CLOSED,
        ),
    ]
}

/// Obfuscated Transfer-Encoding.
fn transfer_encoding_cases() -> Vec<Case> {
    vec![
        case(
            "TE: xchunked is not chunked",
            &format!(
                "POST /api/echo HTTP/1.1\r\nHost: {{host}}\r\nTransfer-Encoding: xchunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
            BAD_OR_CLOSED,
        ),
        case(
            "TE with a space before the colon",
            &format!(
                "POST /api/echo HTTP/1.1\r\nHost: {{host}}\r\nTransfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
            BAD_OR_CLOSED,
        ),
        case(
            "TE twice, the second one unknown",
            &format!(
                "POST /api/echo HTTP/1.1\r\nHost: {{host}}\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
            BAD_OR_CLOSED,
        ),
        case(
            "TE: chunked followed by another coding",
            &format!(
                "POST /api/echo HTTP/1.1\r\nHost: {{host}}\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
            BAD_OR_CLOSED,
        ),
        case(
            "TE in an HTTP/1.0 request",
            &format!(
                "POST /api/echo HTTP/1.0\r\nHost: {{host}}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
            BAD_OR_CLOSED,
        ),
        case(
            "TE spelled with an underscore is only a header, never framing",
            "POST /api/echo HTTP/1.1\r\nHost: {host}\r\nTransfer_Encoding: chunked\r\nContent-Length: 5\r\nConnection: close\r\n\r\n0\r\n\r\n",
            ok(1),
        ),
    ]
}

/// Content-Length values that are not one plain decimal number.
fn content_length_cases() -> Vec<Case> {
    vec![
        case(
            "two different Content-Lengths",
            "POST /api/echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            BAD_OR_CLOSED,
        ),
        case(
            "a Content-Length list with different values",
            "POST /api/echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5, 6\r\n\r\nhello!",
            BAD_OR_CLOSED,
        ),
        case(
            "a signed Content-Length",
            "POST /api/echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: +5\r\n\r\nhello",
            BAD_OR_CLOSED,
        ),
        case(
            "a negative Content-Length",
            "POST /api/echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: -1\r\n\r\nhello",
            BAD_OR_CLOSED,
        ),
        case(
            "a hexadecimal Content-Length",
            "POST /api/echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0x5\r\n\r\nhello",
            BAD_OR_CLOSED,
        ),
        case(
            "an overflowing Content-Length",
            "POST /api/echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: 99999999999999999999999\r\n\r\nhello",
            BAD_OR_CLOSED,
        ),
    ]
}

/// Field syntax (RFC 9110 §5, RFC 9112 §5), the request target and the version.
fn field_syntax_cases() -> Vec<Case> {
    vec![
        case(
            "obs-fold (a continuation line)",
            "GET /api/echo HTTP/1.1\r\nHost: {host}\r\nX-A: a\r\n b\r\nConnection: close\r\n\r\n",
            BAD_OR_CLOSED,
        ),
        case(
            "a bare CR inside a field value",
            "GET /api/echo HTTP/1.1\r\nHost: {host}\r\nX-A: a\rb\r\nConnection: close\r\n\r\n",
            BAD_OR_CLOSED,
        ),
        case(
            "a NUL inside a field value",
            "GET /api/echo HTTP/1.1\r\nHost: {host}\r\nX-A: a\0b\r\nConnection: close\r\n\r\n",
            BAD_OR_CLOSED,
        ),
        case(
            "a space inside a field name",
            "GET /api/echo HTTP/1.1\r\nHost: {host}\r\nX A: b\r\nConnection: close\r\n\r\n",
            BAD_OR_CLOSED,
        ),
        case(
            "a field line without a colon",
            "GET /api/echo HTTP/1.1\r\nHost: {host}\r\nX-A\r\nConnection: close\r\n\r\n",
            BAD_OR_CLOSED,
        ),
        case(
            "a NUL in the request target",
            "GET /api/a\0b HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n",
            BAD_OR_CLOSED,
        ),
        case(
            "bare LF line endings are read as one request (RFC 9112 §2.2 allows it)",
            "GET /api/echo HTTP/1.1\nHost: {host}\nConnection: close\n\n",
            ok(1),
        ),
        case(
            "an invalid HTTP version",
            "GET /api/echo HTTP/1.2\r\nHost: {host}\r\nConnection: close\r\n\r\n",
            Expect::Refused(&[0, 400, 505]),
        ),
    ]
}

/// Host (RFC 9112 §3.2).
fn host_cases() -> Vec<Case> {
    vec![
        case(
            "no Host",
            "GET /api/echo HTTP/1.1\r\nConnection: close\r\n\r\n",
            BAD,
        ),
        case(
            "two Hosts",
            "GET /api/echo HTTP/1.1\r\nHost: {host}\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
            BAD,
        ),
        case(
            "userinfo in Host",
            "GET /api/echo HTTP/1.1\r\nHost: user@{host}\r\nConnection: close\r\n\r\n",
            BAD,
        ),
        case(
            "userinfo in an absolute-form target",
            "GET http://user@localhost/api/echo HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n",
            BAD,
        ),
    ]
}

/// Methods coatcheck never forwards, and upgrades other than WebSocket.
fn method_and_upgrade_cases() -> Vec<Case> {
    vec![
        case(
            "TRACE",
            "TRACE /api/echo HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n",
            Expect::Refused(&[405]),
        ),
        case(
            "TRACK",
            "TRACK /api/echo HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n",
            Expect::Refused(&[405]),
        ),
        case(
            "CONNECT",
            "CONNECT {host} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n",
            Expect::Refused(&[400, 405]),
        ),
        case(
            "Upgrade: h2c is answered as plain HTTP/1.1",
            "GET /api/echo HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nConnection: close\r\n\r\n",
            ok(1),
        ),
    ]
}

/// A request line and a field line over the header limit.
fn size_cases() -> Vec<Case> {
    let long = "a".repeat(40 * 1024);
    vec![
        case(
            "an oversized request line",
            &format!("GET /api/{long} HTTP/1.1\r\nHost: {{host}}\r\nConnection: close\r\n\r\n"),
            TOO_LARGE,
        ),
        case(
            "an oversized field line",
            &format!(
                "GET /api/echo HTTP/1.1\r\nHost: {{host}}\r\nX-Big: {long}\r\nConnection: close\r\n\r\n"
            ),
            TOO_LARGE,
        ),
    ]
}

/// Malformed chunked bodies: the client's fault, 400 JSON, never upstream.
fn chunked_body_cases() -> Vec<Case> {
    vec![
        case("chunk size 0x5", &chunked("0x5\r\nhello\r\n0\r\n\r\n"), BAD),
        case("chunk size +5", &chunked("+5\r\nhello\r\n0\r\n\r\n"), BAD),
        case("chunk size -5", &chunked("-5\r\nhello\r\n0\r\n\r\n"), BAD),
        case(
            "chunk size with a leading space",
            &chunked(" 5\r\nhello\r\n0\r\n\r\n"),
            BAD,
        ),
        case(
            "an overflowing chunk size",
            &chunked("fffffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
            BAD,
        ),
        case(
            "an empty chunk size line",
            &chunked("\r\nhello\r\n0\r\n\r\n"),
            BAD,
        ),
        case(
            "a CR inside a chunk extension",
            &chunked("5;a=b\rc\r\nhello\r\n0\r\n\r\n"),
            BAD,
        ),
        case(
            "chunk data not followed by CRLF",
            &chunked("5\r\nhelloXX0\r\n\r\n"),
            BAD,
        ),
        case(
            "a non-hex chunk size",
            &chunked("g\r\nhello\r\n0\r\n\r\n"),
            BAD,
        ),
        case(
            "a well-formed chunked body with an extension passes",
            &chunked("5;name=value\r\nhello\r\n0\r\n\r\n"),
            ok(1),
        ),
    ]
}

/// Pipelining: two well-formed requests are two requests.
fn pipelining_cases() -> Vec<Case> {
    vec![case(
        "two pipelined requests are forwarded as two",
        "GET /api/echo HTTP/1.1\r\nHost: {host}\r\n\r\nGET /api/echo HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n",
        ok(2),
    )]
}

/// Statuses of every response in `bytes` (HTTP/1.x status lines at response starts).
fn statuses(bytes: &[u8]) -> Vec<u16> {
    let text = String::from_utf8_lossy(bytes);
    let mut out = Vec::new();
    let mut rest: &str = &text;
    while let Some(i) = rest.find("HTTP/1.") {
        let line = &rest[i..];
        if let Some(code) = line.get(9..12).and_then(|c| c.parse().ok()) {
            out.push(code);
        }
        rest = &rest[i + 8..];
    }
    out
}

/// Sends `payload` on a fresh connection and collects everything until the connection closes
/// (bounded).
async fn exchange(addr: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut s = tls_connect(addr, &[b"http/1.1"]).await;
    let _ = s.write_all(payload).await;
    let _ = s.flush().await;
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 8192];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
    got
}

async fn corpus_proxy(up: &Upstream) -> TestProxy {
    start_proxy(&format!(
        "[server.limits]\nmax_header_bytes = 16384\n\n[[route]]\npath = \"/api/\"\nupstream = {:?}\nauth = \"none\"\n",
        up.url()
    ))
    .await
}

#[tokio::test]
async fn every_http1_smuggling_payload_is_judged_once_and_never_reaches_the_upstream_otherwise() {
    let up = Upstream::start().await;
    let proxy = corpus_proxy(&up).await;
    let host = format!("localhost:{}", proxy.addr.port());
    let corpus = http1_corpus();
    let mut failures = Vec::new();
    for c in &corpus {
        let before = up.seen().len();
        let got = exchange(proxy.addr, c.payload.replace("{host}", &host).as_bytes()).await;
        let statuses = statuses(&got);
        let seen = up.seen();
        let arrived = &seen[before..];
        log_case(c, &statuses, arrived);
        let problems = misjudgements(c.expect, &got, &statuses, arrived);
        if !problems.is_empty() {
            failures.push(format!(
                "{}: {} — got {:?}",
                c.name,
                problems.join("; "),
                String::from_utf8_lossy(&got[..got.len().min(300)])
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} payloads misjudged:\n{}",
        failures.len(),
        corpus.len(),
        failures.join("\n")
    );
    // After the whole corpus the proxy still serves.
    let res = support::raw_get(proxy.addr, "/api/echo", "").await;
    assert_eq!(res.status, 200);
    proxy.stop().await;
}

/// Prints what a payload was answered and what reached the upstream, to read a failure by.
fn log_case(c: &Case, statuses: &[u16], arrived: &[Seen]) {
    eprintln!(
        "CASE {}: {:?} arrived {:?}",
        c.name,
        statuses,
        arrived
            .iter()
            .map(|s| (
                &s.method,
                &s.uri,
                s.header("content-length"),
                s.header("transfer-encoding")
            ))
            .collect::<Vec<_>>()
    );
}

/// Everything wrong with how a payload that must lead to `expect` was judged: `got` is what
/// coatcheck answered (with the response `statuses`), `arrived` what reached the upstream.
fn misjudgements(expect: Expect, got: &[u8], statuses: &[u16], arrived: &[Seen]) -> Vec<String> {
    let first = statuses.first().copied().unwrap_or(0);
    let mut problems = Vec::new();
    if arrived.iter().any(|s| s.uri.contains("smuggled")) {
        problems.push("a smuggled request reached the upstream".to_owned());
    }
    problems.extend(match expect {
        Expect::Refused(allowed) => refusal_problems(allowed, first, got, arrived),
        Expect::ChunkedWinsThenClosed => chunked_wins_problems(first, got, statuses, arrived),
        Expect::Forwarded { status, requests } => {
            forwarding_problems(status, requests, first, arrived)
        }
    });
    problems
}

/// [`Expect::Refused`]: an allowed status (`first`), nothing upstream, and coatcheck's own
/// refusals written as its JSON error.
fn refusal_problems(allowed: &[u16], first: u16, got: &[u8], arrived: &[Seen]) -> Vec<String> {
    let mut problems = Vec::new();
    if !allowed.contains(&first) {
        problems.push(format!("status {first}, expected one of {allowed:?}"));
    }
    if !arrived.is_empty() {
        problems.push(format!("{} request(s) reached the upstream", arrived.len()));
    }
    // Answers coatcheck writes itself are JSON.
    if first != 0
        && allowed.contains(&first)
        && matches!(first, 400 | 405 | 431)
        && !allowed.contains(&0)
        && !String::from_utf8_lossy(got).contains("\"error\"")
    {
        problems.push("the refusal is not coatcheck's JSON error".to_owned());
    }
    problems
}

/// [`Expect::ChunkedWinsThenClosed`]: one 200 answer, one upstream request without
/// Content-Length, the connection closed and the (empty) chunked body forwarded.
fn chunked_wins_problems(
    first: u16,
    got: &[u8],
    statuses: &[u16],
    arrived: &[Seen],
) -> Vec<String> {
    let mut problems = Vec::new();
    let text = String::from_utf8_lossy(got).to_ascii_lowercase();
    if first != 200 || arrived.len() != 1 || statuses.len() != 1 {
        problems.push(format!(
            "{statuses:?}, {} upstream request(s)",
            arrived.len()
        ));
    }
    if arrived.iter().any(|s| s.header("content-length").is_some()) {
        problems.push("Content-Length reached the upstream".to_owned());
    }
    if !text.contains("connection: close") || !text.contains("\"body_bytes\":0") {
        problems.push("not closed, or the body was not the chunked one".to_owned());
    }
    problems
}

/// [`Expect::Forwarded`]: the first answer has `status`, exactly `requests` requests arrived, and
/// none carries an underscore field, `Upgrade` or `HTTP2-Settings`.
fn forwarding_problems(status: u16, requests: usize, first: u16, arrived: &[Seen]) -> Vec<String> {
    let mut problems = Vec::new();
    if first != status {
        problems.push(format!("status {first}, expected {status}"));
    }
    if arrived.len() != requests {
        problems.push(format!(
            "{} request(s) reached the upstream, expected {requests}",
            arrived.len()
        ));
    }
    if arrived.iter().any(|s| {
        s.headers
            .iter()
            .any(|(n, _)| n.contains('_') || n == "upgrade" || n == "http2-settings")
    }) {
        problems.push(format!(
            "forbidden headers reached the upstream: {arrived:?}"
        ));
    }
    problems
}

#[tokio::test]
async fn a_forwarded_body_has_exactly_the_length_coatcheck_read() {
    let up = Upstream::start().await;
    let proxy = corpus_proxy(&up).await;
    let host = format!("localhost:{}", proxy.addr.port());
    for (payload, bytes) in [
        (chunked("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"), 11),
        (
            "POST /api/echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello".to_owned(),
            5,
        ),
    ] {
        let got = exchange(proxy.addr, payload.replace("{host}", &host).as_bytes()).await;
        let text = String::from_utf8_lossy(&got);
        assert!(
            text.contains(&format!("\"body_bytes\":{bytes}")),
            "{text}"
        );
    }
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------
// HTTP/2, frame by frame
// ---------------------------------------------------------------------------------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const GOAWAY: u8 = 7;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 1;
const END_HEADERS: u8 = 4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541 §5.1).
fn hpack_int(first: u8, n: u32, mut v: usize, out: &mut Vec<u8>) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128 + 128) as u8);
        v /= 128;
    }
    out.push(v as u8);
}

/// A header block of literal fields without indexing, no Huffman (RFC 7541 §6.2.2).
fn hpack(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (n, v) in fields {
        out.push(0);
        hpack_int(0, 7, n.len(), &mut out);
        out.extend_from_slice(n.as_bytes());
        hpack_int(0, 7, v.len(), &mut out);
        out.extend_from_slice(v.as_bytes());
    }
    out
}

/// What the server did with stream 1.
#[derive(Debug, PartialEq, Eq)]
enum H2Outcome {
    /// A response HEADERS frame (with the status when it is a static-table one).
    Answered(Option<u16>),
    /// RST_STREAM on the stream.
    Reset,
    /// GOAWAY (connection error) or the connection closed.
    ConnectionError,
    /// Nothing within the wait.
    Silent,
}

async fn h2_exchange(addr: SocketAddr, frames: &[Vec<u8>]) -> H2Outcome {
    let mut s = tls_connect(addr, &[b"h2"]).await;
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    for f in frames {
        out.extend_from_slice(f);
    }
    let _ = s.write_all(&out).await;
    let _ = s.flush().await;
    let mut buf = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut chunk = [0u8; 8192];
    loop {
        // Parse whatever frames are complete.
        let mut at = 0;
        while buf.len() >= at + 9 {
            let len = (usize::from(buf[at]) << 16)
                | (usize::from(buf[at + 1]) << 8)
                | usize::from(buf[at + 2]);
            if buf.len() < at + 9 + len {
                break;
            }
            let kind = buf[at + 3];
            let stream = u32::from_be_bytes([buf[at + 5], buf[at + 6], buf[at + 7], buf[at + 8]])
                & 0x7fff_ffff;
            let payload = &buf[at + 9..at + 9 + len];
            match (kind, stream) {
                (HEADERS, 1) => {
                    // Static-table :status (RFC 7541 Appendix A): 8 = 200, 12 = 400, 13 = 404.
                    let status = match payload.first() {
                        Some(0x88) => Some(200),
                        Some(0x8c) => Some(400),
                        Some(0x8d) => Some(404),
                        _ => None,
                    };
                    return H2Outcome::Answered(status);
                }
                (RST_STREAM, 1) => return H2Outcome::Reset,
                (GOAWAY, 0) => return H2Outcome::ConnectionError,
                _ => {}
            }
            at += 9 + len;
        }
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            return H2Outcome::Silent;
        };
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return H2Outcome::ConnectionError,
            Err(_) => return H2Outcome::Silent,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn request_fields<'a>(authority: &'a str, path: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", authority),
        (":path", path),
    ]
}

/// A GET for `/api/echo` on `host` with the `extra` fields after its pseudo-headers.
fn echo_request_with<'a>(host: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<u8> {
    let mut f = request_fields(host, "/api/echo");
    f.extend_from_slice(extra);
    hpack(&f)
}

/// Every malformed HTTP/2 header block, by name (RFC 9113 §8.2–8.3).
fn malformed_h2_cases(host: &str) -> Vec<(&'static str, Vec<u8>)> {
    [
        malformed_h2_field_name_cases(host),
        malformed_h2_pseudo_header_cases(host),
        malformed_h2_value_cases(host),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// Connection-specific fields, `te` other than trailers, an uppercase name, an unknown
/// pseudo-header (RFC 9113 §8.2.1–8.2.2, §8.3).
fn malformed_h2_field_name_cases(host: &str) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "connection-specific header: connection",
            echo_request_with(host, &[("connection", "keep-alive")]),
        ),
        (
            "connection-specific header: transfer-encoding",
            echo_request_with(host, &[("transfer-encoding", "chunked")]),
        ),
        (
            "connection-specific header: keep-alive",
            echo_request_with(host, &[("keep-alive", "timeout=5")]),
        ),
        (
            "connection-specific header: upgrade",
            echo_request_with(host, &[("upgrade", "websocket")]),
        ),
        (
            "te other than trailers",
            echo_request_with(host, &[("te", "gzip")]),
        ),
        (
            "an uppercase field name",
            echo_request_with(host, &[("X-Upper", "1")]),
        ),
        (
            "an unknown pseudo-header",
            echo_request_with(host, &[(":foo", "bar")]),
        ),
    ]
}

/// Pseudo-headers out of place, repeated, missing or empty (RFC 9113 §8.3).
fn malformed_h2_pseudo_header_cases(host: &str) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "a pseudo-header after a regular field",
            hpack(&[
                (":method", "GET"),
                (":scheme", "https"),
                ("x-a", "1"),
                (":authority", host),
                (":path", "/api/echo"),
            ]),
        ),
        (
            "a duplicated :path",
            hpack(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", host),
                (":path", "/api/echo"),
                (":path", "/api/smuggled"),
            ]),
        ),
        (
            "no :path",
            hpack(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", host),
            ]),
        ),
        (
            "no :method",
            hpack(&[
                (":scheme", "https"),
                (":authority", host),
                (":path", "/api/echo"),
            ]),
        ),
        (
            "an empty :path",
            hpack(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", host),
                (":path", ""),
            ]),
        ),
    ]
}

/// Bad field values, userinfo, a Host that disagrees, TRACE; and the one block that is
/// forwarded, without its underscore field.
fn malformed_h2_value_cases(host: &str) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "a CR in a field value",
            echo_request_with(host, &[("x-a", "a\rb")]),
        ),
        (
            "a NUL in a field value",
            echo_request_with(host, &[("x-a", "a\0b")]),
        ),
        ("userinfo in :authority", {
            let mut f = request_fields("user@localhost", "/api/echo");
            f.push(("x-a", "1"));
            hpack(&f)
        }),
        (
            "Host differs from :authority",
            echo_request_with(host, &[("host", "evil.example")]),
        ),
        ("TRACE", {
            let mut f = request_fields(host, "/api/echo");
            f[0] = (":method", "TRACE");
            hpack(&f)
        }),
        (
            "an underscore field name is dropped, not forwarded",
            echo_request_with(host, &[("x_auth_user", "admin")]),
        ),
    ]
}

/// Whether an HTTP/2 case was handled as it must be: refused (nothing reached the upstream and
/// the stream got no 200 and no silence), or, for the underscore case alone, answered 200 with
/// one request upstream that lacks the underscore field.
fn h2_case_judged_right(name: &str, outcome: &H2Outcome, arrived: &[Seen]) -> bool {
    let forwarded_cleanly = name.starts_with("an underscore")
        && arrived.len() == 1
        && arrived[0].header("x_auth_user").is_none()
        && *outcome == H2Outcome::Answered(Some(200));
    let refused = arrived.is_empty()
        && *outcome != H2Outcome::Answered(Some(200))
        && *outcome != H2Outcome::Silent;
    forwarded_cleanly || refused
}

/// Sends a POST whose Content-Length (3) disagrees with its DATA (11 bytes), which is malformed
/// (RFC 9113 §8.1.1); the failure to report if it was answered 200.
async fn content_length_mismatch_failure(
    addr: SocketAddr,
    up: &Upstream,
    host: &str,
) -> Option<String> {
    let before = up.seen().len();
    let mut f = request_fields(host, "/api/echo");
    f[0] = (":method", "POST");
    f.push(("content-length", "3"));
    let outcome = h2_exchange(
        addr,
        &[
            frame(HEADERS, END_HEADERS, 1, &hpack(&f)),
            frame(DATA, END_STREAM, 1, b"hello world"),
        ],
    )
    .await;
    let arrived = up.seen()[before..].to_vec();
    (outcome == H2Outcome::Answered(Some(200)))
        .then(|| format!("content-length mismatch answered 200; upstream got {arrived:?}"))
}

#[tokio::test]
async fn malformed_http2_requests_never_reach_the_upstream() {
    let up = Upstream::start().await;
    let proxy = corpus_proxy(&up).await;
    let host = format!("localhost:{}", proxy.addr.port());
    let cases = malformed_h2_cases(&host);
    let mut failures = Vec::new();
    for (name, block) in &cases {
        let before = up.seen().len();
        let outcome = h2_exchange(
            proxy.addr,
            &[frame(HEADERS, END_STREAM | END_HEADERS, 1, block)],
        )
        .await;
        let arrived = up.seen()[before..].to_vec();
        if !h2_case_judged_right(name, &outcome, &arrived) {
            failures.push(format!("{name}: {outcome:?}, upstream got {arrived:?}"));
        }
    }
    // A Content-Length that disagrees with the DATA is malformed (RFC 9113 §8.1.1).
    failures.extend(content_length_mismatch_failure(proxy.addr, &up, &host).await);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let res = proxy
        .http2()
        .get(proxy.url("/api/echo"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    proxy.stop().await;
}

#[tokio::test]
async fn a_continuation_flood_is_cut_off_and_the_proxy_keeps_serving() {
    let up = Upstream::start().await;
    let proxy = corpus_proxy(&up).await;
    let host = format!("localhost:{}", proxy.addr.port());
    let mut frames = vec![frame(
        HEADERS,
        0,
        1,
        &hpack(&request_fields(&host, "/api/echo")),
    )];
    // 20 000 CONTINUATION frames of 64 bytes (1.25 MiB of header block), never END_HEADERS.
    let junk = hpack(&[("x-flood", &"f".repeat(56))]);
    for _ in 0..20_000 {
        frames.push(frame(CONTINUATION, 0, 1, &junk));
    }
    let outcome = h2_exchange(proxy.addr, &frames).await;
    assert_eq!(outcome, H2Outcome::ConnectionError);
    // Control: the same frames, a few CONTINUATIONs and an end, make a request that is served.
    // (END_STREAM rides on HEADERS; END_HEADERS on the last CONTINUATION.)
    let mut control = vec![frame(
        HEADERS,
        END_STREAM,
        1,
        &hpack(&request_fields(&host, "/api/echo")),
    )];
    for _ in 0..3 {
        control.push(frame(CONTINUATION, 0, 1, &junk));
    }
    control.push(frame(CONTINUATION, END_HEADERS, 1, &[]));
    assert_eq!(
        h2_exchange(proxy.addr, &control).await,
        H2Outcome::Answered(Some(200))
    );
    assert_eq!(up.seen().len(), 1, "only the control request arrived");
    let res = proxy
        .http2()
        .get(proxy.url("/api/echo"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    proxy.stop().await;
}

#[tokio::test]
async fn a_rapid_reset_flood_is_cut_off_and_the_proxy_keeps_serving() {
    let up = Upstream::start().await;
    let proxy = corpus_proxy(&up).await;
    let host = format!("localhost:{}", proxy.addr.port());
    let block = hpack(&request_fields(&host, "/api/slow?ms=2000"));
    let mut frames = Vec::new();
    // 5 000 streams, each opened and reset at once (CVE-2023-44487).
    for i in 0..5_000u32 {
        let id = 2 * i + 1;
        frames.push(frame(HEADERS, END_STREAM | END_HEADERS, id, &block));
        frames.push(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
    }
    let mut s = tls_connect(proxy.addr, &[b"h2"]).await;
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    for f in &frames {
        out.extend_from_slice(f);
    }
    let _ = s.write_all(&out).await;
    let _ = s.flush().await;
    // The server ends the connection (GOAWAY, then close) rather than serve the flood.
    let mut got = Vec::new();
    let mut chunk = [0u8; 8192];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the flooding connection was kept open");
    // GOAWAY with ENHANCE_YOUR_CALM (0xb): the HTTP/2 layer's rapid-reset defence.
    assert_eq!(goaway_code(&got), Some(0xb), "{got:?}");
    // Far fewer upstream requests than streams were started.
    let started = up.seen().len();
    assert!(
        started < 1_000,
        "{started} of 5000 reset streams reached the upstream"
    );
    let res = proxy
        .http2()
        .get(proxy.url("/api/echo"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    proxy.stop().await;
}

/// The error code of the first GOAWAY frame in `bytes`, if any.
fn goaway_code(bytes: &[u8]) -> Option<u32> {
    let mut at = 0;
    while bytes.len() >= at + 9 {
        let len = (usize::from(bytes[at]) << 16)
            | (usize::from(bytes[at + 1]) << 8)
            | usize::from(bytes[at + 2]);
        if bytes.len() < at + 9 + len {
            return None;
        }
        if bytes[at + 3] == GOAWAY && len >= 8 {
            let p = &bytes[at + 9..];
            return Some(u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
        }
        at += 9 + len;
    }
    None
}

#[tokio::test]
async fn http2_with_prior_knowledge_is_not_mistaken_for_http1_heads() {
    // Without ALPN the listener watches HTTP/1.1 heads; a client that starts with the HTTP/2
    // preface instead must be served on and on, whatever its binary frames hold.
    let up = Upstream::start().await;
    let proxy = corpus_proxy(&up).await;
    let host = format!("localhost:{}", proxy.addr.port());
    let mut s = tls_connect(proxy.addr, &[]).await;
    let padding = "p".repeat(1000);
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    s.write_all(&out).await.unwrap();
    let mut answered = 0;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    for i in 0..40u32 {
        let mut f = request_fields(&host, "/api/echo");
        f.push(("x-padding", &padding));
        s.write_all(&frame(
            HEADERS,
            END_STREAM | END_HEADERS,
            2 * i + 1,
            &hpack(&f),
        ))
        .await
        .unwrap();
        // Wait for this stream's answer before the next (so every request ends first).
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut at = 0;
            let mut done = false;
            while buf.len() >= at + 9 {
                let len = (usize::from(buf[at]) << 16)
                    | (usize::from(buf[at + 1]) << 8)
                    | usize::from(buf[at + 2]);
                if buf.len() < at + 9 + len {
                    break;
                }
                let stream =
                    u32::from_be_bytes([buf[at + 5], buf[at + 6], buf[at + 7], buf[at + 8]])
                        & 0x7fff_ffff;
                if buf[at + 3] == HEADERS && stream == 2 * i + 1 {
                    done = true;
                }
                assert_ne!(buf[at + 3], GOAWAY, "GOAWAY after {answered} requests");
                at += 9 + len;
            }
            buf.drain(..at);
            if done {
                answered += 1;
                break;
            }
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("no answer to request {i}"));
            match tokio::time::timeout(left, s.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                other => panic!("connection ended after {answered} requests: {other:?}"),
            }
        }
    }
    assert_eq!(answered, 40);
    drop(s);
    proxy.stop().await;
}
