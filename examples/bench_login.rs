//! Benchmark helper (`bench/run`): logs in through a BFF and the real test identity provider's HTML
//! forms, like a browser would, and prints the BFF's session cookies. Not part of the product.
//!
//! ```text
//! bench_login --base https://localhost:8443 --login /bff/login?returnUrl=/ --ca certs/ca.crt
//!             [--user alice --password alice-pw] [--count N --concurrency C] [--out cookies.txt]
//!             [--verify /api/__auth --header x-csrf:1]
//!             [--pid BFF_PID] [--metrics http://127.0.0.1:ADMIN/metrics]
//! ```
//!
//! Works with any BFF whose login route redirects to the provider and whose callback sets a
//! session cookie (coatcheck's `/bff/login`, the Node.js peer's `/login`). Each login is a fresh
//! browser: new provider session, login form, consent form, callback. With `--count` > 1 it also
//! reports logins/s and where the time of one login goes. `--out` gets one `Cookie` header value per
//! line; `--verify` checks that a request with the first of them reaches the upstream with a bearer.
//! `--pid` adds the BFF's CPU time per login (every thread's `schedstat`, nanoseconds) and `--metrics`
//! the time coatcheck spent waiting for the provider's token endpoint (its own histogram), so that
//! the provider's time can be taken out of the figure.

#[path = "../tests/support/idp.rs"]
mod idp;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

struct Args {
    base: String,
    login: String,
    ca: String,
    user: String,
    password: String,
    count: usize,
    concurrency: usize,
    out: Option<String>,
    verify: Option<String>,
    headers: Vec<(String, String)>,
    /// The BFF's process: its CPU time over the logins is measured (`/proc/PID/task/*/schedstat`).
    pid: Option<u32>,
    /// The BFF's metrics URL (coatcheck's admin `/metrics`): the time its token-endpoint calls took.
    metrics: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        base: "https://localhost:8443".into(),
        login: "/bff/login?returnUrl=/".into(),
        ca: "certs/ca.crt".into(),
        user: "alice".into(),
        password: "alice-pw".into(),
        count: 1,
        concurrency: 1,
        out: None,
        verify: None,
        headers: Vec::new(),
        pid: None,
        metrics: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--base" => a.base = value()?,
            "--login" => a.login = value()?,
            "--ca" => a.ca = value()?,
            "--user" => a.user = value()?,
            "--password" => a.password = value()?,
            "--count" => a.count = value()?.parse().map_err(|e| format!("--count: {e}"))?,
            "--concurrency" => {
                a.concurrency = value()?
                    .parse()
                    .map_err(|e| format!("--concurrency: {e}"))?
            }
            "--out" => a.out = Some(value()?),
            "--verify" => a.verify = Some(value()?),
            "--pid" => a.pid = Some(value()?.parse().map_err(|e| format!("--pid: {e}"))?),
            "--metrics" => a.metrics = Some(value()?),
            "--header" => {
                let h = value()?;
                let (k, v) = h.split_once(':').ok_or("--header wants name:value")?;
                a.headers.push((k.trim().into(), v.trim().into()));
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

/// Time spent in each leg of one login.
#[derive(Default, Clone, Copy)]
struct Legs {
    /// The BFF's login route (state, PKCE, redirect).
    start: Duration,
    /// The provider: authorization endpoint, login form, consent form, redirects.
    provider: Duration,
    /// The BFF's callback: code exchange at the provider, ID token validation, session creation.
    callback: Duration,
}

/// A cookie jar for the BFF's origin (the provider's is reqwest's own).
#[derive(Default)]
struct Jar(BTreeMap<String, String>);

impl Jar {
    fn absorb(&mut self, headers: &reqwest::header::HeaderMap) {
        for v in headers.get_all(reqwest::header::SET_COOKIE) {
            let Ok(s) = v.to_str() else { continue };
            let (pair, attrs) = s.split_once(';').unwrap_or((s, ""));
            let Some((name, value)) = pair.split_once('=') else {
                continue;
            };
            if attrs.to_ascii_lowercase().contains("max-age=0") || value.trim().is_empty() {
                self.0.remove(name.trim());
            } else {
                self.0.insert(name.trim().into(), value.trim().into());
            }
        }
    }

    fn header(&self) -> String {
        self.0
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

async fn login_once(args: &Args, bff: &reqwest::Client) -> Result<(String, Legs), String> {
    let mut legs = Legs::default();
    let mut jar = Jar::default();
    let t = Instant::now();
    let r = bff
        .get(format!("{}{}", args.base, args.login))
        .send()
        .await
        .map_err(|e| format!("login start: {e}"))?;
    if !r.status().is_redirection() {
        return Err(format!("login start answered {}", r.status()));
    }
    jar.absorb(r.headers());
    let authorize = r.headers()[reqwest::header::LOCATION]
        .to_str()
        .map_err(|e| e.to_string())?
        .to_owned();
    legs.start = t.elapsed();

    let t = Instant::now();
    let idp_client = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .cookie_store(true)
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| e.to_string())?;
    let callback =
        idp::login_via_forms(&idp_client, &authorize, &args.user, &args.password).await?;
    legs.provider = t.elapsed();

    let t = Instant::now();
    let r = bff
        .get(&callback)
        .header(reqwest::header::COOKIE, jar.header())
        .send()
        .await
        .map_err(|e| format!("callback: {e}"))?;
    let status = r.status();
    jar.absorb(r.headers());
    let _ = r.bytes().await;
    legs.callback = t.elapsed();
    if !(status.is_success() || status.is_redirection()) {
        return Err(format!("callback answered {status}"));
    }
    Ok((jar.header(), legs))
}

fn main() {
    let args = match parse_args() {
        Ok(a) => Arc::new(a),
        Err(e) => {
            eprintln!("bench_login: {e}");
            std::process::exit(64);
        }
    };
    coatcheck::tls::install_provider();
    let ca = std::fs::read(&args.ca).unwrap_or_else(|e| panic!("reading {}: {e}", args.ca));
    let bff = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .tls_certs_only([reqwest::Certificate::from_pem(&ca).expect("CA PEM")])
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let code = runtime.block_on(async move {
        let cpu_before = args.pid.map(cpu_ns);
        let token_before = token_time(&bff, args.metrics.as_deref()).await;
        let started = Instant::now();
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..args.concurrency.max(1) {
            let (args, bff, next) = (args.clone(), bff.clone(), next.clone());
            workers.spawn(async move {
                let mut done = Vec::new();
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < args.count {
                    done.push(login_once(&args, &bff).await);
                }
                done
            });
        }
        let mut cookies = Vec::new();
        let mut legs = Vec::new();
        let mut failures = 0usize;
        while let Some(r) = workers.join_next().await {
            for one in r.expect("login worker") {
                match one {
                    Ok((c, l)) => {
                        cookies.push(c);
                        legs.push(l);
                    }
                    Err(e) => {
                        failures += 1;
                        eprintln!("bench_login: {e}");
                    }
                }
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        let own = Own {
            cpu_ns: args.pid.map(cpu_ns).zip(cpu_before).map(|(a, b)| a - b),
            token: token_time(&bff, args.metrics.as_deref())
                .await
                .zip(token_before)
                .map(|((s1, n1), (s0, n0))| (s1 - s0, n1 - n0)),
        };
        if cookies.is_empty() {
            eprintln!("bench_login: no login succeeded");
            return 1;
        }
        if let Some(out) = &args.out {
            std::fs::write(out, cookies.join("\n") + "\n").expect("writing --out");
        }
        if let Some(path) = &args.verify {
            let mut req = bff
                .get(format!("{}{path}", args.base))
                .header(reqwest::header::COOKIE, &cookies[0]);
            for (k, v) in &args.headers {
                req = req.header(k.as_str(), v.as_str());
            }
            match req.send().await {
                Ok(r) if r.status().is_success() => {
                    let body = r.text().await.unwrap_or_default();
                    if !body.contains("\"bearer\":true") {
                        eprintln!("bench_login: {path} did not see a bearer: {body}");
                        return 1;
                    }
                }
                Ok(r) => {
                    eprintln!("bench_login: {path} answered {}", r.status());
                    return 1;
                }
                Err(e) => {
                    eprintln!("bench_login: {path}: {e}");
                    return 1;
                }
            }
        }
        let mean = |f: fn(&Legs) -> Duration| {
            legs.iter().map(|l| f(l).as_secs_f64()).sum::<f64>() / legs.len() as f64 * 1000.0
        };
        println!(
            "{}",
            json!({
                "logins": cookies.len(),
                "failures": failures,
                "concurrency": args.concurrency,
                "seconds": elapsed,
                "logins_per_s": cookies.len() as f64 / elapsed,
                "mean_ms": {
                    "bff_login_start": mean(|l| l.start),
                    "provider_forms": mean(|l| l.provider),
                    "bff_callback": mean(|l| l.callback),
                },
                "own": own.report(
                    cookies.len(),
                    args.concurrency.max(1),
                    mean(|l| l.start) + mean(|l| l.callback),
                ),
            })
        );
        i32::from(failures > 0)
    });
    std::process::exit(code);
}

/// What the BFF itself spent over the logins, with the provider's time taken out.
struct Own {
    /// CPU nanoseconds of every BFF thread.
    cpu_ns: Option<u64>,
    /// Seconds the BFF waited for the provider's token endpoint, and how many calls.
    token: Option<(f64, f64)>,
}

impl Own {
    /// `bff_ms`: the mean wall time of the BFF's two legs (login start + callback) per login.
    fn report(&self, logins: usize, concurrency: usize, bff_ms: f64) -> serde_json::Value {
        let n = logins as f64;
        let cpu_ms = self.cpu_ns.map(|ns| ns as f64 / 1e6 / n);
        let token_ms = self.token.map(|(s, _)| s * 1000.0 / n);
        let without_provider = token_ms.map(|t| bff_ms - t);
        json!({
            "cpu_ms_per_login": cpu_ms,
            "logins_per_cpu_second": cpu_ms.map(|ms| 1000.0 / ms),
            "token_endpoint_ms_per_login": token_ms,
            "token_endpoint_calls": self.token.map(|(_, c)| c),
            "bff_ms_per_login_without_provider": without_provider,
            "logins_per_s_without_provider": without_provider.map(|ms| concurrency as f64 * 1000.0 / ms),
        })
    }
}

/// CPU time of every thread of `pid` so far, in nanoseconds (`/proc/PID/task/*/schedstat`, first
/// field). Threads that ended before the second reading are missed; coatcheck's serving threads
/// live as long as the process.
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// coatcheck's `coatcheck_idp_request_duration_seconds` sum and count for the token endpoint.
async fn token_time(client: &reqwest::Client, url: Option<&str>) -> Option<(f64, f64)> {
    let text = client.get(url?).send().await.ok()?.text().await.ok()?;
    let read = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name) && l.contains("endpoint=\"token\""))?
            .rsplit(' ')
            .next()?
            .parse::<f64>()
            .ok()
    };
    Some((
        read("coatcheck_idp_request_duration_seconds_sum")?,
        read("coatcheck_idp_request_duration_seconds_count")?,
    ))
}
