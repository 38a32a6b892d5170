//! Benchmark helper (`bench/run`): a fixed-rate HTTPS load generator. Not part of the product.
//!
//! `wrk` measures saturation; it cannot hold a fixed rate (wrk2 is not in Debian). This client
//! sends GETs over `--connections` keep-alive HTTP/1.1 + TLS connections on an absolute schedule
//! (`--rate` requests/s spread evenly over the connections; `--rate 0` = as fast as possible) and
//! prints one JSON object: requests, statuses, achieved rate (answers received over the wall-clock
//! time until the last one), latency percentiles in microseconds. The run ends on the clock: a
//! subject that cannot keep up is not given extra time.
//!
//! Latency is measured from the moment a request is written, like wrk. `late_requests` counts
//! requests whose scheduled time came before the previous answer on their connection (the server
//! fell behind the rate); `co_p99_us` is the p99 measured from the scheduled time instead
//! (coordinated-omission corrected). With `--cookies FILE` each request takes the next `Cookie`
//! line of the file (several sessions); `--slow-ms` reports the requests slower than that (the
//! ones that queued behind a token refresh in the refresh benchmark).
//!
//! ```text
//! bench_load --url https://localhost:8443/api/x --ca certs/ca.crt --rate 5000 --duration 10
//!            [--connections 16] [--header x-csrf:1] [--cookie 'a=b'] [--cookies FILE] [--slow-ms 5]
//!            [--pace timer|spin]
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpStream;
use tokio::time::Instant;

struct Args {
    url: Uri,
    ca: String,
    rate: f64,
    duration: Duration,
    connections: usize,
    headers: Vec<(HeaderName, HeaderValue)>,
    cookies: Vec<HeaderValue>,
    slow: Duration,
    /// `--pace spin`: wait for each scheduled time by yielding instead of on tokio's timer.
    spin: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut url = None;
    let mut a = Args {
        url: Uri::from_static("https://localhost/"),
        ca: "certs/ca.crt".into(),
        rate: 0.0,
        duration: Duration::from_secs(10),
        connections: 16,
        headers: Vec::new(),
        cookies: Vec::new(),
        slow: Duration::from_millis(5),
        spin: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => url = Some(value()?.parse::<Uri>().map_err(|e| format!("--url: {e}"))?),
            "--ca" => a.ca = value()?,
            "--rate" => a.rate = value()?.parse().map_err(|e| format!("--rate: {e}"))?,
            "--duration" => {
                a.duration = Duration::from_secs_f64(
                    value()?.parse().map_err(|e| format!("--duration: {e}"))?,
                )
            }
            "--connections" => {
                a.connections = value()?
                    .parse()
                    .map_err(|e| format!("--connections: {e}"))?
            }
            "--slow-ms" => {
                a.slow = Duration::from_secs_f64(
                    value()?
                        .parse::<f64>()
                        .map_err(|e| format!("--slow-ms: {e}"))?
                        / 1000.0,
                )
            }
            "--pace" => {
                a.spin = match value()?.as_str() {
                    "timer" => false,
                    "spin" => true,
                    other => return Err(format!("--pace: timer or spin, not {other}")),
                }
            }
            "--header" => {
                let h = value()?;
                let (k, v) = h.split_once(':').ok_or("--header wants name:value")?;
                a.headers.push((
                    HeaderName::from_bytes(k.trim().as_bytes()).map_err(|e| e.to_string())?,
                    HeaderValue::from_str(v.trim()).map_err(|e| e.to_string())?,
                ));
            }
            "--cookie" => a
                .cookies
                .push(HeaderValue::from_str(&value()?).map_err(|e| e.to_string())?),
            "--cookies" => {
                let path = value()?;
                let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
                for line in text.lines().filter(|l| !l.trim().is_empty()) {
                    a.cookies
                        .push(HeaderValue::from_str(line.trim()).map_err(|e| e.to_string())?);
                }
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    a.url = url.ok_or("--url is required")?;
    if a.url.scheme_str() != Some("https") {
        return Err("--url must be https".into());
    }
    a.connections = a.connections.max(1);
    Ok(a)
}

#[derive(Default)]
struct ConnResult {
    latencies_us: Vec<u32>,
    co_latencies_us: Vec<u32>,
    statuses: BTreeMap<u16, u64>,
    errors: u64,
    late: u64,
    /// When the last answer on this connection arrived.
    last_done: Option<Instant>,
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect(
    addr: SocketAddr,
    host: &str,
    tls: &tokio_rustls::TlsConnector,
) -> Result<Sender, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let name =
        rustls_pki_types::ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?;
    let stream = tls
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

async fn run_connection(
    args: Arc<Args>,
    index: usize,
    addr: SocketAddr,
    tls: tokio_rustls::TlsConnector,
    start: Instant,
) -> ConnResult {
    let mut out = ConnResult::default();
    let host = args.url.host().unwrap_or("localhost").to_owned();
    let mut sender = match connect(addr, &host, &tls).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bench_load: {e}");
            out.errors += 1;
            return out;
        }
    };
    let end = start + args.duration;
    let interval =
        (args.rate > 0.0).then(|| Duration::from_secs_f64(args.connections as f64 / args.rate));
    let offset = if args.rate > 0.0 {
        Duration::from_secs_f64(index as f64 / args.rate)
    } else {
        Duration::ZERO
    };
    let authority = args
        .url
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    let path = args
        .url
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let mut j: u64 = 0;
    let mut prev_done = start;
    loop {
        let scheduled = match interval {
            Some(iv) => start + offset + iv.mul_f64(j as f64),
            None => Instant::now(),
        };
        // An overloaded subject does not get extra time: the run ends on the wall clock.
        if scheduled >= end || Instant::now() >= end {
            break;
        }
        if interval.is_some() && prev_done > scheduled {
            // The previous answer on this connection came after this request's slot.
            out.late += 1;
        }
        wait_until(scheduled, args.spin).await;
        let mut req = Request::get(path.as_str())
            .header(http::header::HOST, authority.as_str())
            .body(Empty::<Bytes>::new())
            .expect("request");
        for (k, v) in &args.headers {
            req.headers_mut().insert(k.clone(), v.clone());
        }
        if !args.cookies.is_empty() {
            let c = &args.cookies[(index + j as usize * args.connections) % args.cookies.len()];
            req.headers_mut().insert(http::header::COOKIE, c.clone());
        }
        j += 1;
        if sender.ready().await.is_err() {
            out.errors += 1;
            match connect(addr, &host, &tls).await {
                Ok(s) => sender = s,
                Err(_) => break,
            }
            continue;
        }
        let sent = Instant::now();
        match sender.send_request(req).await {
            Ok(res) => {
                let status = res.status().as_u16();
                let ok = res.into_body().collect().await.is_ok();
                let done = Instant::now();
                prev_done = done;
                out.last_done = Some(done);
                if !ok {
                    out.errors += 1;
                    continue;
                }
                *out.statuses.entry(status).or_default() += 1;
                out.latencies_us
                    .push((done - sent).as_micros().min(u32::MAX as u128) as u32);
                out.co_latencies_us.push(
                    (done - scheduled.min(sent))
                        .as_micros()
                        .min(u32::MAX as u128) as u32,
                );
            }
            Err(_) => {
                out.errors += 1;
                match connect(addr, &host, &tls).await {
                    Ok(s) => sender = s,
                    Err(_) => break,
                }
            }
        }
    }
    out
}

/// Waits for a request's scheduled time. tokio's timer has a resolution of one millisecond, so at
/// 15,000 requests/s it releases the requests of each millisecond together, in bursts of 15.
/// `spin` sleeps on the timer only to within a millisecond and then yields until the time has
/// come: the requests leave evenly spaced, as a fixed rate means, at the price of keeping the
/// generator's core busy (for a core of its own, as in bench/cpu's pinned layout).
async fn wait_until(scheduled: Instant, spin: bool) {
    if !spin {
        if scheduled > Instant::now() {
            tokio::time::sleep_until(scheduled).await;
        }
        return;
    }
    let early = scheduled - Duration::from_millis(1);
    if early > Instant::now() {
        tokio::time::sleep_until(early).await;
    }
    while Instant::now() < scheduled {
        tokio::task::yield_now().await;
    }
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn main() {
    let args = match parse_args() {
        Ok(a) => Arc::new(a),
        Err(e) => {
            eprintln!("bench_load: {e}");
            std::process::exit(64);
        }
    };
    coatcheck::tls::install_provider();
    let ca = std::fs::read(&args.ca).unwrap_or_else(|e| panic!("reading {}: {e}", args.ca));
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        <rustls_pki_types::CertificateDer as rustls_pki_types::pem::PemObject>::pem_slice_iter(&ca)
    {
        roots.add(cert.expect("CA PEM")).expect("CA certificate");
    }
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let port = args.url.port_u16().unwrap_or(443);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    // One thread: the generator should take as little of the machine's two cores as it can.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let result = runtime.block_on(async move {
        let start = Instant::now() + Duration::from_millis(200);
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..args.connections {
            tasks.spawn(run_connection(args.clone(), i, addr, tls.clone(), start));
        }
        let mut all = ConnResult::default();
        while let Some(r) = tasks.join_next().await {
            let r = r.expect("connection task");
            all.latencies_us.extend(r.latencies_us);
            all.co_latencies_us.extend(r.co_latencies_us);
            for (k, v) in r.statuses {
                *all.statuses.entry(k).or_default() += v;
            }
            all.errors += r.errors;
            all.late += r.late;
            all.last_done = all.last_done.max(r.last_done);
        }
        let secs = all
            .last_done
            .map_or(0.0, |d| d.saturating_duration_since(start).as_secs_f64())
            .max(args.duration.as_secs_f64());
        (all, args, secs)
    });
    let (mut all, args, secs) = result;
    all.latencies_us.sort_unstable();
    all.co_latencies_us.sort_unstable();
    let n = all.latencies_us.len();
    let slow_us = args.slow.as_micros() as u32;
    let slow: Vec<u32> = all
        .latencies_us
        .iter()
        .copied()
        .filter(|&l| l >= slow_us)
        .collect();
    let l = &all.latencies_us;
    println!(
        "{}",
        json!({
            "requests": n,
            "errors": all.errors,
            "statuses": all.statuses,
            "target_rate": args.rate,
            "rps": n as f64 / secs,
            "connections": args.connections,
            "duration_s": secs,
            "p50_us": percentile(l, 50.0),
            "p90_us": percentile(l, 90.0),
            "p99_us": percentile(l, 99.0),
            "p999_us": percentile(l, 99.9),
            "max_us": l.last().copied().unwrap_or(0),
            "mean_us": if n > 0 { l.iter().map(|&x| x as f64).sum::<f64>() / n as f64 } else { 0.0 },
            "co_p99_us": percentile(&all.co_latencies_us, 99.0),
            "late_requests": all.late,
            "pace": if args.spin { "spin" } else { "timer" },
            "slow_threshold_us": slow_us,
            "slow_requests": slow.len(),
            "slow_mean_us": if slow.is_empty() { 0.0 } else { slow.iter().map(|&x| x as f64).sum::<f64>() / slow.len() as f64 },
            "slow_p50_us": percentile(&slow, 50.0),
            "slow_max_us": slow.last().copied().unwrap_or(0),
        })
    );
}
