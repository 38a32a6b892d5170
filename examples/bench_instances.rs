//! Benchmark helper (`bench/instances`, issue 8): measurements that need several coatcheck
//! instances on one Redis and cannot be made with wrk. Not part of the product.
//!
//! ```text
//! bench_instances invalidate --a https://localhost:PA --b https://localhost:PB --origin ORIGIN
//!                 --ca ca.crt --cookies cookies.txt [--count 1000] [--poll-timeout-ms 2000]
//!                 [--max-seconds 240]
//! bench_instances burst --urls https://localhost:P1,https://localhost:P2,https://localhost:P3
//!                 --origin ORIGIN --ca ca.crt --cookies cookies.txt --idp http://127.0.0.1:PI
//!                 [--rounds 5] [--requests 200] [--wait-ms 2300]
//! ```
//!
//! `invalidate`: for each session cookie (one `Cookie` header value per line, as `bench_login
//! --out` writes them): `GET /api/prime` on B twice (the first reads the store and caches the
//! session, the second is a cache hit); then, at once, `POST /bff/logout` on A (CSRF header,
//! `Origin` = `public_origin`) and, on another connection, `GET /api/poll` on B with the same
//! cookie, one request after the other, until B answers 401. The figure is the time B's 401
//! arrived minus the time A's logout answer arrived (negative: B refused before A's answer was
//! back), both taken here with one monotonic clock. Prints one JSON object.
//!
//! `burst`: one session, cached on every instance; then per round: wait `--wait-ms` (past the
//! point where the access token is due for refresh), send `--requests` requests at once spread
//! round-robin over the instances, and read the provider's refresh-grant count
//! (`GET /__test/stats`, the test provider's own counter) before and after. Prints one JSON object.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

struct Args {
    mode: String,
    a: String,
    b: String,
    urls: Vec<String>,
    origin: String,
    ca: String,
    cookies: String,
    idp: String,
    count: usize,
    poll_timeout: Duration,
    max_seconds: u64,
    rounds: usize,
    requests: usize,
    wait: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mode = it.next().ok_or("first argument: invalidate | burst")?;
    let mut a = Args {
        mode,
        a: String::new(),
        b: String::new(),
        urls: Vec::new(),
        origin: String::new(),
        ca: "certs/ca.crt".into(),
        cookies: String::new(),
        idp: String::new(),
        count: 1000,
        poll_timeout: Duration::from_millis(2000),
        max_seconds: 240,
        rounds: 5,
        requests: 200,
        wait: Duration::from_millis(2300),
    };
    let num = |flag: &str, v: String| -> Result<u64, String> {
        v.parse().map_err(|e| format!("{flag}: {e}"))
    };
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--a" => a.a = value()?,
            "--b" => a.b = value()?,
            "--urls" => a.urls = value()?.split(',').map(str::to_owned).collect(),
            "--origin" => a.origin = value()?,
            "--ca" => a.ca = value()?,
            "--cookies" => a.cookies = value()?,
            "--idp" => a.idp = value()?,
            "--count" => a.count = num(&flag, value()?)? as usize,
            "--poll-timeout-ms" => a.poll_timeout = Duration::from_millis(num(&flag, value()?)?),
            "--max-seconds" => a.max_seconds = num(&flag, value()?)?,
            "--rounds" => a.rounds = num(&flag, value()?)? as usize,
            "--requests" => a.requests = num(&flag, value()?)? as usize,
            "--wait-ms" => a.wait = Duration::from_millis(num(&flag, value()?)?),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.origin.is_empty() || a.cookies.is_empty() {
        return Err("--origin and --cookies are required".into());
    }
    Ok(a)
}

/// An HTTP/1.1 keep-alive client trusting the bench CA, no redirects, no cookie store.
fn client(ca: &[u8], pool: usize) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .pool_max_idle_per_host(pool)
        .redirect(reqwest::redirect::Policy::none())
        .tls_certs_only([reqwest::Certificate::from_pem(ca).expect("CA PEM")])
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

/// A same-origin `fetch` as an SPA on `origin` would send it.
fn api(
    c: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    cookie: &str,
    origin: &str,
) -> reqwest::RequestBuilder {
    c.request(method, url)
        .header(reqwest::header::COOKIE, cookie)
        .header("x-csrf", "1")
        .header(reqwest::header::ORIGIN, origin)
        .header("sec-fetch-site", "same-origin")
}

/// Sends, reads the whole body (so the connection is reused); the status and when the answer's
/// head arrived.
async fn status_at(req: reqwest::RequestBuilder) -> (u16, Instant) {
    match req.send().await {
        Ok(r) => {
            let at = Instant::now();
            let s = r.status().as_u16();
            let _ = r.bytes().await;
            (s, at)
        }
        Err(_) => (0, Instant::now()),
    }
}

/// Nearest-rank percentile of sorted microsecond values.
fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summary(mut us: Vec<u64>) -> Value {
    us.sort_unstable();
    let mean = if us.is_empty() {
        0.0
    } else {
        us.iter().sum::<u64>() as f64 / us.len() as f64
    };
    json!({
        "n": us.len(),
        "p50_us": pct(&us, 50.0),
        "p90_us": pct(&us, 90.0),
        "p99_us": pct(&us, 99.0),
        "max_us": us.last().copied().unwrap_or(0),
        "min_us": us.first().copied().unwrap_or(0),
        "mean_us": mean,
    })
}

fn read_cookies(path: &str) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading {path}: {e}"))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Signed microseconds `to - from`.
fn signed_us(from: Instant, to: Instant) -> i64 {
    if to >= from {
        (to - from).as_micros() as i64
    } else {
        -((from - to).as_micros() as i64)
    }
}

fn signed_summary(mut us: Vec<i64>) -> Value {
    us.sort_unstable();
    let pick = |p: f64| -> i64 {
        if us.is_empty() {
            return 0;
        }
        let rank = ((p / 100.0) * us.len() as f64).ceil() as usize;
        us[rank.clamp(1, us.len()) - 1]
    };
    let mean = if us.is_empty() {
        0.0
    } else {
        us.iter().sum::<i64>() as f64 / us.len() as f64
    };
    json!({
        "n": us.len(),
        "min_us": us.first().copied().unwrap_or(0),
        "p50_us": pick(50.0),
        "p90_us": pick(90.0),
        "p99_us": pick(99.0),
        "max_us": us.last().copied().unwrap_or(0),
        "mean_us": mean,
        "at_or_before_zero": us.iter().filter(|v| **v <= 0).count(),
    })
}

/// Polls `url` with `cookie`, one request after the other, until it answers 401 (the time that
/// answer arrived, and how many requests it took) or `within` has passed.
async fn poll_until_401(
    http: reqwest::Client,
    url: String,
    cookie: String,
    origin: String,
    within: Duration,
) -> (Option<Instant>, u64) {
    let started = Instant::now();
    let mut polls = 0u64;
    while started.elapsed() < within && polls < 1_000_000 {
        polls += 1;
        let (s, at) = status_at(api(
            &http,
            reqwest::Method::GET,
            url.clone(),
            &cookie,
            &origin,
        ))
        .await;
        if s == 401 {
            return (Some(at), polls);
        }
    }
    (None, polls)
}

async fn invalidate(args: &Args, ca: &[u8]) -> (Value, bool) {
    let cookies = read_cookies(&args.cookies);
    let (ca_client, cb_client) = (client(ca, 4), client(ca, 4));
    let deadline = Instant::now() + Duration::from_secs(args.max_seconds);
    let mut after_answer = Vec::new();
    let mut after_send = Vec::new();
    let mut logout_rtt = Vec::new();
    let mut hit_rtt = Vec::new();
    let mut polls_total = 0u64;
    let (mut prime_failed, mut logout_failed, mut never_refused) = (0u64, 0u64, 0u64);
    let mut attempted = 0usize;
    for cookie in cookies.iter().take(args.count) {
        if Instant::now() >= deadline {
            break;
        }
        attempted += 1;
        let get_b = |path: &str| {
            api(
                &cb_client,
                reqwest::Method::GET,
                format!("{}{path}", args.b),
                cookie,
                &args.origin,
            )
        };
        // Cached on B: a store read, then a cache hit (its round trip is the poll resolution).
        let (s1, _) = status_at(get_b("/api/prime")).await;
        let t = Instant::now();
        let (s2, at) = status_at(get_b("/api/prime")).await;
        if s1 != 200 || s2 != 200 {
            prime_failed += 1;
            continue;
        }
        hit_rtt.push((at - t).as_micros() as u64);
        // B is polled from just before the logout is sent until it refuses, on its own connection.
        let poller = tokio::spawn(poll_until_401(
            cb_client.clone(),
            format!("{}/api/poll", args.b),
            cookie.clone(),
            args.origin.clone(),
            args.poll_timeout,
        ));
        let sent = Instant::now();
        let (s, answered) = status_at(api(
            &ca_client,
            reqwest::Method::POST,
            format!("{}/bff/logout", args.a),
            cookie,
            &args.origin,
        ))
        .await;
        let (refused, polls) = poller.await.unwrap_or((None, 0));
        polls_total += polls;
        if s != 200 {
            logout_failed += 1;
            eprintln!("bench_instances: logout on A answered {s}");
            continue;
        }
        logout_rtt.push((answered - sent).as_micros() as u64);
        match refused {
            Some(at) => {
                after_answer.push(signed_us(answered, at));
                after_send.push(signed_us(sent, at));
            }
            None => never_refused += 1,
        }
    }
    let ok =
        never_refused == 0 && logout_failed == 0 && prime_failed == 0 && !after_answer.is_empty();
    (
        json!({
            "sessions": cookies.len(),
            "attempted": attempted,
            "measured": after_answer.len(),
            "prime_failed": prime_failed,
            "logout_failed": logout_failed,
            "not_refused_within_timeout": never_refused,
            "poll_timeout_ms": args.poll_timeout.as_millis() as u64,
            "polls_total": polls_total,
            "refused_on_b_after_logout_answer_on_a": signed_summary(after_answer),
            "refused_on_b_after_logout_sent_to_a": signed_summary(after_send),
            "logout_round_trip_on_a": summary(logout_rtt),
            "cache_hit_round_trip_on_b": summary(hit_rtt),
        }),
        ok,
    )
}

async fn idp_stats(http: &reqwest::Client, idp: &str) -> Value {
    match http.get(format!("{idp}/__test/stats")).send().await {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

fn stat(v: &Value, path: &[&str]) -> i64 {
    let mut v = v;
    for p in path {
        v = &v[*p];
    }
    v.as_i64().unwrap_or(-1)
}

/// Fires `n` requests at once, round-robin over `urls`; statuses (0 = transport error) and the
/// slowest request.
async fn fire(
    http: &reqwest::Client,
    urls: &[String],
    n: usize,
    cookie: &str,
    origin: &str,
    tag: &str,
) -> (BTreeMap<String, u64>, Duration) {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let req = api(
            http,
            reqwest::Method::GET,
            format!("{}/api/{tag}/{i}", urls[i % urls.len()]),
            cookie,
            origin,
        );
        tasks.spawn(async move { status_at(req).await });
    }
    let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
    let mut slowest = Duration::ZERO;
    while let Some(r) = tasks.join_next().await {
        let (s, at) = r.unwrap_or((0, Instant::now()));
        *statuses.entry(s.to_string()).or_default() += 1;
        slowest = slowest.max(at - started);
    }
    (statuses, slowest)
}

async fn burst(args: &Args, ca: &[u8]) -> (Value, bool) {
    let cookie = read_cookies(&args.cookies)
        .into_iter()
        .next()
        .expect("one cookie");
    let http = client(ca, args.requests);
    let plain = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let grants = |v: &Value| stat(v, &["token_requests", "refresh_token"]);
    let failures = |v: &Value| stat(v, &["refresh_token_failures"]);
    // Warm-up right after the login (the token is not yet due): caches the session on every
    // instance and opens the connections the rounds reuse.
    let s0 = idp_stats(&plain, &args.idp).await;
    let (warm, _) = fire(
        &http,
        &args.urls,
        args.requests,
        &cookie,
        &args.origin,
        "warm",
    )
    .await;
    let s1 = idp_stats(&plain, &args.idp).await;
    let mut rounds = Vec::new();
    let mut ok = true;
    for round in 1..=args.rounds {
        let before = idp_stats(&plain, &args.idp).await;
        tokio::time::sleep(args.wait).await;
        let (statuses, slowest) = fire(
            &http,
            &args.urls,
            args.requests,
            &cookie,
            &args.origin,
            "burst",
        )
        .await;
        let after = idp_stats(&plain, &args.idp).await;
        let g = grants(&after) - grants(&before);
        let f = failures(&after) - failures(&before);
        let all_ok = statuses.len() == 1 && statuses.contains_key("200");
        ok &= g == 1 && f == 0 && all_ok;
        rounds.push(json!({
            "round": round,
            "refresh_grants": g,
            "refresh_failures": f,
            "statuses": statuses,
            "slowest_ms": slowest.as_secs_f64() * 1000.0,
        }));
    }
    (
        json!({
            "instances": args.urls.len(),
            "requests_per_round": args.requests,
            "wait_ms": args.wait.as_millis() as u64,
            "warmup": {"statuses": warm, "refresh_grants": grants(&s1) - grants(&s0)},
            "rounds": rounds,
        }),
        ok,
    )
}

fn main() {
    let args = match parse_args() {
        Ok(a) => Arc::new(a),
        Err(e) => {
            eprintln!("bench_instances: {e}");
            std::process::exit(64);
        }
    };
    coatcheck::tls::install_provider();
    let ca = std::fs::read(&args.ca).unwrap_or_else(|e| panic!("reading {}: {e}", args.ca));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (out, ok) = runtime.block_on(async {
        match args.mode.as_str() {
            "invalidate" => invalidate(&args, &ca).await,
            "burst" => burst(&args, &ca).await,
            other => {
                eprintln!("bench_instances: unknown mode {other}");
                std::process::exit(64);
            }
        }
    });
    println!("{out}");
    std::process::exit(i32::from(!ok));
}
