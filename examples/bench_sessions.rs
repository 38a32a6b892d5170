//! Benchmark helper (`bench/run`, issue 5 "Scale"): sessions held in the embedded store and in the
//! cache, created through the library, never through an endpoint. Not part of the product.
//!
//! Each subcommand is run as its own process so its resident memory is its own:
//!
//! - `populate --db PATH --n N --cookies OUT [--api-seconds S]`: creates N sessions in a fresh
//!   embedded store. The first ones go through `Sessions::create` (one durable, fsync'ed commit
//!   each, exactly as logins do) for at most S seconds, which measures the create rate; the rest are
//!   written as the same records (same ticket, same sealing, same binary encoding) in batches of 10 000
//!   per transaction, because one fsync per session would take hours for 1M on this disk. Writes
//!   every cookie value to OUT. Prints sizes and rates.
//! - `lookup --db PATH --cookies FILE [--samples K]`: opens the store with cache capacity 0 and
//!   times K `Sessions::lookup` calls of existing sessions, spread over the file: each one is a
//!   cache miss that reads the store and decrypts the record. With an empty cookie file it looks up
//!   valid tickets that have no record. Prints latency percentiles and RSS.
//! - `size --db PATH`: what the sessions of an embedded store file take: the record bytes (keys and
//!   values of the sessions table, averaged per session) and redb's own accounting (allocated
//!   pages, stored and fragmented bytes). Reads any version's file (JSON or binary records).
//! - `cachemem --n N --cache C`: N sessions created in the memory store with cache capacity C;
//!   prints the RSS growth. Run with C = N and C = 0: the difference over N is the cache's memory
//!   per session. Each session's data (tokens, claims) is made inside the measured span, so what a
//!   cached session keeps of it counts (until 2026-11-30 it was made before, and only what
//!   `create` added was measured).

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, header};
use redb::{Database, MultimapTableDefinition, TableDefinition};
use serde_json::{Value, json};

use coatcheck::config::{self, StoreKind};
use coatcheck::secret::Secret;
use coatcheck::session::store::Record;
use coatcheck::session::ticket::{Keys, Ticket};
use coatcheck::session::{Lookup, SessionData, Sessions, now, subject_key};

/// The embedded store's tables (`src/session/store/embedded.rs`), for the batched bulk load.
const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions_v1");
const BY_SUBJECT: MultimapTableDefinition<&str, &str> =
    MultimapTableDefinition::new("sessions_by_subject_v1");
const BATCH: usize = 10_000;
const COOKIE: &str = "__Host-coatcheck";
/// Bench-only session key (the helper's processes must agree on it).
const KEY: [u8; 32] = [42; 32];
/// Token sizes like the test provider's: RS256 JWT access and ID tokens, opaque refresh token.
const ACCESS_TOKEN_BYTES: usize = 800;
const ID_TOKEN_BYTES: usize = 900;
const REFRESH_TOKEN_BYTES: usize = 43;

fn session_config(store: StoreKind, cache_capacity: u64) -> config::Session {
    config::Session {
        cookie_name: COOKIE.into(),
        same_site: config::SameSite::Strict,
        idle_timeout: Duration::from_secs(12 * 3600),
        absolute_timeout: Duration::from_secs(24 * 3600),
        persistent: false,
        // The idle clock is written at most once per touch interval per session; a long interval
        // keeps this a pure read-path measurement.
        touch_interval: Duration::from_secs(24 * 3600),
        keys: vec![Secret::new(KEY.to_vec())],
        record_key: config::RecordKey::OneStep,
        store,
        cache_capacity,
        cache_ttl: Duration::from_secs(3600),
    }
}

/// `n` bytes in one allocation of exactly `n`, as a login holds a token (serde_json copies each
/// string of the token response once, at its length). Until 2026-11-30 the token grew by
/// `push_str`, and a cached session kept the capacity it grew to (1,024 bytes for the ID token).
fn token(n: usize, seed: usize) -> Secret {
    const PATTERN: &str = "eyJhbGciOiJSUzI1NiIsInR5cCI6ImF0K2p3dCJ9";
    let mut s = String::with_capacity(n);
    s.push_str(&format!("{seed:016x}."));
    while s.len() < n {
        s.push_str(&PATTERN[..(n - s.len()).min(PATTERN.len())]);
    }
    s.truncate(n);
    Secret::new(s)
}

fn data(i: usize) -> SessionData {
    let sub = format!("user-{i}");
    let mut claims = serde_json::Map::new();
    for (k, v) in [
        ("iss", json!("http://127.0.0.1:9090")),
        ("sub", json!(sub)),
        ("aud", json!("coatcheck")),
        ("exp", json!(now() + 300)),
        ("iat", json!(now())),
        ("auth_time", json!(now())),
        ("sid", json!(format!("sid-{i:08}-0123456789abcdef"))),
        ("name", json!(format!("User {i}"))),
        ("email", json!(format!("user-{i}@example.test"))),
        ("email_verified", json!(true)),
        ("roles", json!(["user"])),
    ] {
        claims.insert(k.into(), v);
    }
    SessionData {
        iss: "http://127.0.0.1:9090".into(),
        sub,
        claims: coatcheck::session::claims::Claims::new(&claims),
        issuer: Default::default(),
        id_token: Some(token(ID_TOKEN_BYTES, i)),
        access_token: token(ACCESS_TOKEN_BYTES, i),
        access_expires_at: now() + 3600,
        access_issued_at: now(),
        refresh_token: Some(token(REFRESH_TOKEN_BYTES, i)),
    }
}

/// The record `Sessions::create` would store for `data` under `ticket`.
fn record(ticket: &Ticket, data: &SessionData, cfg: &config::Session) -> Record {
    let handle = ticket.handle();
    let now = now();
    let sealed = ticket.seal_record(cfg.record_key, &handle, &data.encode());
    Record {
        handle,
        subject: subject_key(&data.iss, &data.sub),
        version: 1,
        created_at: now,
        last_seen: now,
        idle_expires_at: now + cfg.idle_timeout.as_secs(),
        absolute_expires_at: now + cfg.absolute_timeout.as_secs(),
        user_agent: "Mozilla/5.0 (X11; Linux x86_64) bench".into(),
        idp_sid: None,
        sealed,
    }
}

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn cookie_headers(value: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        header::COOKIE,
        HeaderValue::from_str(&format!("{COOKIE}={value}")).expect("cookie header"),
    );
    h
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

struct Opts(Vec<(String, String)>);

impl Opts {
    fn get(&self, k: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
    }
    fn num(&self, k: &str, default: f64) -> f64 {
        self.get(k).map_or(default, |v| {
            v.parse().unwrap_or_else(|e| panic!("{k}: {v:?}: {e}"))
        })
    }
    fn path(&self, k: &str) -> PathBuf {
        PathBuf::from(self.get(k).unwrap_or_else(|| panic!("{k} is required")))
    }
}

async fn populate(o: &Opts) -> Value {
    let db = o.path("--db");
    let n = o.num("--n", 0.0) as usize;
    let api_budget = Duration::from_secs_f64(o.num("--api-seconds", 20.0));
    let _ = std::fs::remove_file(&db);
    let cfg = session_config(StoreKind::Embedded { path: db.clone() }, 0);
    let keys = Keys::new(&cfg.keys);
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(o.path("--cookies")).expect("creating --cookies"),
    );

    // 1. Through the library's API: one durable commit per session, like a login.
    let sessions = Sessions::new(&cfg).expect("opening the embedded store");
    let started = Instant::now();
    let mut api = 0;
    while api < n && started.elapsed() < api_budget {
        let (cookie, _) = sessions
            .create(data(api), None, None)
            .await
            .expect("Sessions::create");
        writeln!(out, "{}", cookie.expose()).expect("writing cookies");
        api += 1;
    }
    let api_secs = started.elapsed().as_secs_f64();
    drop(sessions);

    // 2. The rest: the same records, many per transaction.
    let started = Instant::now();
    if api < n {
        let database = Database::create(&db).expect("reopening the store file");
        let mut i = api;
        while i < n {
            let txn = database.begin_write().expect("write transaction");
            {
                let mut t = txn.open_table(SESSIONS).expect("sessions table");
                let mut idx = txn.open_multimap_table(BY_SUBJECT).expect("subject index");
                for _ in 0..BATCH.min(n - i) {
                    let ticket = Ticket::generate();
                    let d = data(i);
                    let r = record(&ticket, &d, &cfg);
                    t.insert(r.handle.as_str(), r.encode().as_slice())
                        .expect("insert");
                    idx.insert(r.subject.as_str(), r.handle.as_str())
                        .expect("index insert");
                    writeln!(out, "{}", ticket.encode(&keys).expose()).expect("writing cookies");
                    i += 1;
                }
            }
            txn.commit().expect("commit");
        }
    }
    let bulk_secs = started.elapsed().as_secs_f64();
    out.flush().expect("flushing cookies");
    let file_bytes = std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0);
    json!({
        "n": n,
        "api_creates": api,
        "api_seconds": api_secs,
        "api_creates_per_s": if api_secs > 0.0 { api as f64 / api_secs } else { 0.0 },
        "bulk_creates": n - api,
        "bulk_seconds": bulk_secs,
        "file_bytes": file_bytes,
        "disk_bytes_per_session": if n > 0 { file_bytes as f64 / n as f64 } else { 0.0 },
    })
}

async fn lookup(o: &Opts) -> Value {
    let samples = o.num("--samples", 20_000.0) as usize;
    let rss_start = rss_kib("VmRSS:");
    let cfg = session_config(
        StoreKind::Embedded {
            path: o.path("--db"),
        },
        0,
    );
    let keys = Keys::new(&cfg.keys);
    let sessions = Sessions::new(&cfg).expect("opening the embedded store");
    let rss_open = rss_kib("VmRSS:");
    // Pick `samples` cookies spread evenly over the file (streamed: 1M cookies are 87 MB).
    let total = std::io::BufReader::new(std::fs::File::open(o.path("--cookies")).expect("cookies"))
        .lines()
        .count();
    let mut picked = Vec::with_capacity(samples);
    if total == 0 {
        picked.extend((0..samples).map(|_| Ticket::generate().encode(&keys).expose().clone()));
    } else {
        let step = (total as f64 / samples as f64).max(1.0);
        let mut next = 0.0f64;
        for (i, line) in
            std::io::BufReader::new(std::fs::File::open(o.path("--cookies")).expect("cookies"))
                .lines()
                .enumerate()
        {
            if i as f64 >= next {
                picked.push(line.expect("cookie line"));
                next += step;
            }
        }
    }
    // Shuffle (deterministically) so the reads are not in insertion order.
    let len = picked.len();
    for i in (1..len).rev() {
        let j = (i.wrapping_mul(2_654_435_761) ^ (i >> 3)) % (i + 1);
        picked.swap(i, j);
    }
    let mut lat_us = Vec::with_capacity(picked.len());
    let (mut live, mut absent) = (0usize, 0usize);
    let started = Instant::now();
    for c in &picked {
        let h = cookie_headers(c);
        let t = Instant::now();
        let r = sessions
            .lookup(&h, Duration::from_secs(3600))
            .await
            .expect("lookup");
        lat_us.push(t.elapsed().as_secs_f64() * 1e6);
        match r {
            Lookup::Live(_) => live += 1,
            Lookup::Ended | Lookup::None => absent += 1,
        }
    }
    let secs = started.elapsed().as_secs_f64();
    lat_us.sort_by(f64::total_cmp);
    json!({
        "cookies_in_file": total,
        "lookups": picked.len(),
        "live": live,
        "absent": absent,
        "lookups_per_s": picked.len() as f64 / secs,
        "p50_us": percentile(&lat_us, 50.0),
        "p99_us": percentile(&lat_us, 99.0),
        "p999_us": percentile(&lat_us, 99.9),
        "max_us": lat_us.last().copied().unwrap_or(0.0),
        "rss_start_kib": rss_start,
        "rss_after_open_kib": rss_open,
        "rss_after_lookups_kib": rss_kib("VmRSS:"),
        "hwm_kib": rss_kib("VmHWM:"),
    })
}

fn size(o: &Opts) -> Value {
    use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};
    let db = Database::create(o.path("--db")).expect("opening the store file");
    let (n, record_bytes, json) = {
        let txn = db.begin_read().expect("read transaction");
        let t = txn.open_table(SESSIONS).expect("sessions table");
        let mut bytes = 0u64;
        let mut json = 0u64;
        for entry in t.iter().expect("iterating") {
            let (k, v) = entry.expect("entry");
            bytes += (k.value().len() + v.value().len()) as u64;
            json += u64::from(v.value().first() == Some(&b'{'));
        }
        (t.len().expect("len"), bytes, json)
    };
    let stats = db
        .begin_write()
        .expect("write transaction")
        .stats()
        .expect("stats");
    let per = |b: u64| if n > 0 { b as f64 / n as f64 } else { 0.0 };
    json!({
        "sessions": n,
        "json_records": json,
        "record_bytes_per_session": per(record_bytes),
        "allocated_bytes_per_session": per(stats.allocated_pages() * stats.page_size() as u64),
        "stored_bytes_per_session": per(stats.stored_bytes()),
        "fragmented_bytes": stats.fragmented_bytes(),
        "file_bytes": std::fs::metadata(o.path("--db")).map(|m| m.len()).unwrap_or(0),
    })
}

async fn cachemem(o: &Opts) -> Value {
    let n = o.num("--n", 100_000.0) as usize;
    let cache = o.num("--cache", n as f64) as u64;
    let sessions = Sessions::new(&session_config(StoreKind::Memory, cache)).expect("memory store");
    // Each session's data is made inside the measurement, as a login makes it: with capacity N
    // the cache keeps all of it (tokens, claims, identity), with capacity 0 it is freed and its
    // memory reused, so the difference is what a cached session holds.
    let before = rss_kib("VmRSS:");
    let started = Instant::now();
    for i in 0..n {
        sessions.create(data(i), None, None).await.expect("create");
    }
    let secs = started.elapsed().as_secs_f64();
    // Let moka finish its pending maintenance (evictions with capacity 0).
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = sessions
            .lookup(&HeaderMap::new(), Duration::from_secs(3600))
            .await;
    }
    let after = rss_kib("VmRSS:");
    json!({
        "n": n,
        "cache_capacity": cache,
        "cached": sessions.cached(),
        "create_seconds": secs,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "rss_growth_bytes_per_session": if n > 0 { (after.saturating_sub(before) * 1024) as f64 / n as f64 } else { 0.0 },
        "token_bytes_per_session": ACCESS_TOKEN_BYTES + ID_TOKEN_BYTES + REFRESH_TOKEN_BYTES,
    })
}

fn main() {
    let mut args = std::env::args().skip(1);
    let cmd = args.next().unwrap_or_default();
    let rest: Vec<String> = args.collect();
    let opts = Opts(
        rest.chunks(2)
            .map(|c| (c[0].clone(), c.get(1).cloned().unwrap_or_default()))
            .collect(),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let out = runtime.block_on(async {
        match cmd.as_str() {
            "populate" => populate(&opts).await,
            "lookup" => lookup(&opts).await,
            "cachemem" => cachemem(&opts).await,
            "size" => size(&opts),
            _ => {
                eprintln!("usage: bench_sessions populate|lookup|size|cachemem [--opt value]...");
                std::process::exit(64);
            }
        }
    });
    println!("{out}");
}
