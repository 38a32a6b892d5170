//! Micro-benchmarks of the per-request hot path (issue 5): `cargo bench --bench micro`.
//!
//! - ticket verify: base64 decode + HMAC-SHA256 of the session cookie ([`Ticket::verify`]);
//! - session cache hit: [`Sessions::lookup`] of a cached session (cookie parse, verify, moka get);
//! - header rewrite: hop-by-hop stripping, forwarding headers and removal of coatcheck's cookies
//!   on a browser-like request head;
//! - AEAD open: AES-256-GCM open of a session record with tokens of the test provider's sizes;
//! - metrics per request: what metrics add to one proxied request with a cache hit — the
//!   (route, status) counter, the duration histogram and the cache-hit counter, on handles
//!   resolved at start-up — against the same loop without them (`metrics_off`).
//! - router per request: what the listener does to get the router of a request, before reload
//!   (`Arc::clone`) and with it (`ArcSwap::load_full`, the swap point of a reload).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderName, HeaderValue, header};

use coatcheck::config::{self, StoreKind};
use coatcheck::metrics::Metrics;
use coatcheck::proxy::headers;
use coatcheck::secret::{self, Secret};
use coatcheck::session::ticket::{Keys, Ticket};
use coatcheck::session::{Lookup, SessionData, Sessions, now};

const COOKIE: &str = "__Host-coatcheck";
/// `session.cache.ttl` of the benchmark's sessions.
const TTL: Duration = Duration::from_secs(3600);

fn session_config() -> config::Session {
    config::Session {
        cookie_name: COOKIE.into(),
        same_site: config::SameSite::Strict,
        idle_timeout: Duration::from_secs(1800),
        absolute_timeout: Duration::from_secs(43200),
        persistent: false,
        touch_interval: Duration::from_secs(60),
        keys: vec![Secret::new(vec![7u8; 32])],
        record_key: config::RecordKey::OneStep,
        store: StoreKind::Memory,
        cache_capacity: 1000,
        cache_ttl: TTL,
    }
}

fn token(n: usize) -> Secret {
    Secret::new("eyJhbGciOiJSUzI1NiJ9.".repeat(n / 21 + 1)[..n].to_owned())
}

fn session_data() -> SessionData {
    let mut claims = serde_json::Map::new();
    claims.insert("sub".into(), "alice".into());
    claims.insert("name".into(), "Alice".into());
    claims.insert("email".into(), "alice@example.test".into());
    claims.insert("roles".into(), serde_json::json!(["user"]));
    SessionData {
        iss: "http://127.0.0.1:9090".into(),
        sub: "alice".into(),
        claims: coatcheck::session::claims::Claims::new(&claims),
        issuer: Default::default(),
        id_token: Some(token(900)),
        access_token: token(800),
        access_expires_at: now() + 3600,
        access_issued_at: now(),
        refresh_token: Some(token(43)),
    }
}

fn browser_request(cookie: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("host", "localhost:8443"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36",
        ),
        ("accept", "application/json"),
        ("accept-language", "en-GB,en;q=0.9"),
        ("accept-encoding", "gzip, deflate, br"),
        ("connection", "keep-alive"),
        ("origin", "https://localhost:8443"),
        ("sec-fetch-site", "same-origin"),
        ("sec-fetch-mode", "cors"),
        ("x-csrf", "1"),
        ("referer", "https://localhost:8443/app/home"),
    ] {
        h.insert(
            HeaderName::from_static(k),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h.insert(
        header::COOKIE,
        HeaderValue::from_str(&format!("theme=dark; {COOKIE}={cookie}; _ga=GA1.1.123")).unwrap(),
    );
    h
}

fn micro(c: &mut Criterion) {
    let cfg = session_config();
    let keys = Keys::new(&cfg.keys);
    let ticket = Ticket::generate();
    let value = ticket.encode(&keys);

    c.bench_function("ticket_verify", |b| {
        b.iter(|| Ticket::verify(black_box(value.expose()), &keys).is_some())
    });

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let sessions = Sessions::new(&cfg).unwrap();
    let (cookie, _) = rt
        .block_on(sessions.create(session_data(), None, None))
        .unwrap();
    let req = browser_request(cookie.expose());
    assert!(matches!(
        rt.block_on(sessions.lookup(&req, TTL)).unwrap(),
        Lookup::Live(_)
    ));
    c.bench_function("session_cache_hit", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for _ in 0..iters {
                    black_box(sessions.lookup(black_box(&req), TTL).await.unwrap());
                }
                t.elapsed()
            })
        })
    });

    let client = "127.0.0.1".parse().unwrap();
    c.bench_function("header_rewrite", |b| {
        b.iter_batched_ref(
            || req.clone(),
            |h| {
                let host = h.get(header::HOST).cloned();
                headers::strip_hop_by_hop(h, false);
                headers::add_forwarding(h, client, false, host.as_ref(), None);
                headers::remove_cookies(h, |name| headers::is_own_cookie(COOKIE, name));
            },
            BatchSize::SmallInput,
        )
    });

    per_request_steps(c);

    let key = ticket.record_key();
    let aad = ticket.handle();
    let plain = serde_json::to_vec(&session_data()).unwrap();
    let sealed = secret::seal(&key, aad.as_bytes(), &plain);
    c.bench_function(&format!("aead_open_{}B", sealed.len()), |b| {
        b.iter(|| secret::open(&key, black_box(aad.as_bytes()), black_box(&sealed)).unwrap())
    });
}

/// The per-request bookkeeping outside the session: metrics recording and the router handle.
fn per_request_steps(c: &mut Criterion) {
    // The router's and the session cache's recording, exactly as a request does it; the elapsed
    // time is measured in both loops so that only the recording differs.
    let metrics = Metrics::new(&["/api/", "/app/", "/"]);
    let route = metrics.route_index("/api/");
    let start = Instant::now();
    c.bench_function("metrics_per_request_on", |b| {
        b.iter(|| {
            let elapsed = black_box(start).elapsed();
            metrics.request(black_box(route), black_box(200), elapsed);
            metrics.cache_hits.inc();
        })
    });
    c.bench_function("metrics_per_request_off", |b| {
        b.iter(|| black_box(black_box(start).elapsed()))
    });

    // The listener's per-request step; the cost does not depend on what the Arc holds.
    let shared = std::sync::Arc::new(session_config());
    c.bench_function("router_per_request_arc_clone", |b| {
        b.iter(|| black_box(std::sync::Arc::clone(black_box(&shared))))
    });
    let swap = arc_swap::ArcSwap::new(shared.clone());
    c.bench_function("router_per_request_arcswap_load_full", |b| {
        b.iter(|| black_box(black_box(&swap).load_full()))
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = micro
}
criterion_main!(benches);
