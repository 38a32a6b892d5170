//! The `redis` store kind against a real `redis-server` (and `redis-sentinel`): the conformance
//! suites, TTL expiry, compare-and-set races, index consistency, TLS with a private CA and an
//! ACL user, outages, restarts and a Sentinel failover.

mod support;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use coatcheck::config::RedisSettings;
use coatcheck::secret::Secret;
use coatcheck::session::store::redis::RedisStore;
use coatcheck::session::store::{
    Event, Events, Lease, OnceSet, Record, Store, StoreError, conformance,
};
use support::redis::{MASTER_NAME, Options, RedisServer, SentinelSetup, wait_for};
use tokio::sync::broadcast;

const TIMEOUT: Duration = Duration::from_millis(500);

fn settings(url: &str, prefix: &str) -> RedisSettings {
    RedisSettings {
        url: Secret::new(url.to_owned()),
        key_prefix: prefix.to_owned(),
        ca: None,
        sentinels: Vec::new(),
        sentinel_master: None,
        timeout: TIMEOUT,
    }
}

/// Polls `ping` until it succeeds (bounded).
async fn until_up(s: &RedisStore) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match s.ping().await {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => panic!("store never came up: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn store(settings: &RedisSettings) -> RedisStore {
    let s = RedisStore::new(settings).expect("settings are valid");
    until_up(&s).await;
    s
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A record as the session layer writes it: real clock, realistic sizes (32-hex handle, 64-hex
/// subject, a provider sid, ~1.5 KB sealed payload).
fn realistic(handle: &str, subject: &str, now: u64) -> Record {
    let mut r = conformance::record(handle, subject, now);
    r.idp_sid = Some(format!("{:0>64}", "51d"));
    r.user_agent = "Mozilla/5.0 (X11; Linux x86_64; rv:140.0) Gecko/20100101 Firefox/140.0".into();
    r.sealed = (0..1500u32).map(|i| (i * 7919 % 251) as u8).collect();
    r
}

/// Waits (bounded) for an event matching `want`, skipping others.
async fn expect_event(rx: &mut broadcast::Receiver<Event>, want: &Event, within: Duration) {
    let got = tokio::time::timeout(within, async {
        loop {
            match rx.recv().await {
                Ok(e) if &e == want => return,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("event channel closed: {e}"),
            }
        }
    })
    .await;
    assert!(got.is_ok(), "no {want:?} within {within:?}");
}

fn keys(redis: &RedisServer, pattern: &str) -> Vec<String> {
    let mut v: Vec<String> = redis
        .cli(&["--scan", "--pattern", pattern])
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    v.sort();
    v
}

fn members(redis: &RedisServer, key: &str) -> Vec<String> {
    let mut v: Vec<String> = redis
        .cli(&["SMEMBERS", key])
        .unwrap()
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_conformance_suite_passes() {
    let redis = RedisServer::start();
    let s = store(&settings(&redis.url(), "run:")).await;
    conformance::run(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_once_conformance_suite_passes() {
    let redis = RedisServer::start();
    let s = store(&settings(&redis.url(), "once:")).await;
    conformance::once(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_conformance_suite_passes() {
    let redis = RedisServer::start();
    let s = store(&settings(&redis.url(), "lease:")).await;
    conformance::lease(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_events_conformance_suite_passes() {
    let redis = RedisServer::start();
    let s = store(&settings(&redis.url(), "events:")).await;
    conformance::events(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_sessions_once_keys_leases_and_events() {
    let redis = RedisServer::start();
    let cfg = settings(&redis.url(), "pair:");
    let (a, b) = (store(&cfg).await, store(&cfg).await);
    let mut b_events = b.subscribe();
    let now = unix_now();
    a.create(realistic("h1", "alice", now)).await.unwrap();
    assert_eq!(b.load("h1", now).await.unwrap().unwrap().handle, "h1");
    assert!(
        a.first_use("state-1", Duration::from_secs(60))
            .await
            .unwrap()
    );
    assert!(
        !b.first_use("state-1", Duration::from_secs(60))
            .await
            .unwrap()
    );
    let token = a
        .acquire("refresh:h1", Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    assert!(
        b.acquire("refresh:h1", Duration::from_secs(5))
            .await
            .unwrap()
            .is_none()
    );
    a.release("refresh:h1", &token).await.unwrap();
    expect_event(
        &mut b_events,
        &Event::Released {
            key: "refresh:h1".into(),
        },
        Duration::from_secs(2),
    )
    .await;
    let started = Instant::now();
    let ended = Event::Changed {
        handle: "h1".into(),
        version: 1,
    };
    a.publish(&ended).await.unwrap();
    expect_event(&mut b_events, &ended, Duration::from_secs(2)).await;
    println!(
        "event from one instance to another: {:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "DESIGN §6: within 100 ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_and_its_indexes_vanish_by_redis_ttl() {
    let redis = RedisServer::start();
    let s = store(&settings(&redis.url(), "ttl:")).await;
    let now = unix_now();
    let mut r = realistic("short", "alice", now);
    r.idle_expires_at = now + 1;
    s.create(r).await.unwrap();
    let pttl: i64 = redis
        .cli(&["PTTL", "ttl:{s}:rec:short"])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!((1..=1000).contains(&pttl), "PTTL {pttl}");
    assert_eq!(
        keys(&redis, "ttl:{s}:*").len(),
        4,
        "record, exp, sub and sid"
    );
    wait_for(
        || {
            redis
                .cli(&["EXISTS", "ttl:{s}:rec:short"])
                .is_ok_and(|o| o.trim() == "0")
        },
        "the record key to expire",
    );
    assert_eq!(
        keys(&redis, "ttl:{s}:*"),
        vec!["ttl:{s}:exp"],
        "the index sets expire with their last record"
    );
    assert!(s.load("short", now).await.unwrap().is_none());
    assert_eq!(s.sweep(now + 2).await.unwrap(), 0, "nothing left to sweep");
    assert!(
        keys(&redis, "ttl:{s}:*").is_empty(),
        "sweep cleaned the expiry index"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_touch_extends_the_ttl_without_changing_the_version() {
    let redis = RedisServer::start();
    let s = store(&settings(&redis.url(), "touch:")).await;
    let now = unix_now();
    let mut r = realistic("t", "alice", now);
    r.idle_expires_at = now + 2;
    r.version = 7;
    s.create(r).await.unwrap();
    s.touch("t", now, now + 600).await.unwrap();
    for key in ["touch:{s}:rec:t", "touch:{s}:sub:alice"] {
        let pttl: i64 = redis.cli(&["PTTL", key]).unwrap().trim().parse().unwrap();
        assert!(pttl > 590_000, "{key}: PTTL {pttl}");
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let r = s
        .load("t", unix_now())
        .await
        .unwrap()
        .expect("touched record lives");
    assert_eq!((r.version, r.idle_expires_at), (7, now + 600));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_concurrent_saves_exactly_one_wins() {
    let redis = RedisServer::start();
    let cfg = settings(&redis.url(), "cas:");
    let (a, b) = (store(&cfg).await, store(&cfg).await);
    let now = unix_now();
    for round in 0..50u8 {
        let handle = format!("h{round}");
        a.create(realistic(&handle, "alice", now)).await.unwrap();
        let mut ra = realistic(&handle, "alice", now);
        ra.version = 2;
        ra.sealed = vec![b'a', round];
        let mut rb = ra.clone();
        rb.sealed = vec![b'b', round];
        let (wa, wb) = tokio::join!(a.save(ra, 1), b.save(rb, 1));
        let (wa, wb) = (wa.unwrap(), wb.unwrap());
        assert!(
            wa ^ wb,
            "round {round}: exactly one writer wins ({wa}, {wb})"
        );
        let stored = a.load(&handle, now).await.unwrap().unwrap();
        assert_eq!(stored.version, 2);
        assert_eq!(stored.sealed, vec![if wa { b'a' } else { b'b' }, round]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_indexes_follow_every_delete_and_drop_dangling_members() {
    let redis = RedisServer::start();
    let s = store(&settings(&redis.url(), "idx:")).await;
    let now = unix_now();
    let with_sid = |h: &str, sub: &str, sid: &str| {
        let mut r = realistic(h, sub, now);
        r.idp_sid = Some(sid.into());
        r
    };
    s.create(with_sid("a1", "alice", "sid-a")).await.unwrap();
    s.create(with_sid("a2", "alice", "sid-a")).await.unwrap();
    s.create(with_sid("a3", "alice", "sid-b")).await.unwrap();
    s.create(with_sid("b1", "bob", "sid-b")).await.unwrap();
    assert_eq!(members(&redis, "idx:{s}:sub:alice"), ["a1", "a2", "a3"]);
    assert_eq!(members(&redis, "idx:{s}:sid:sid-b"), ["a3", "b1"]);

    assert!(s.delete("a1").await.unwrap().is_some());
    assert_eq!(members(&redis, "idx:{s}:sub:alice"), ["a2", "a3"]);
    assert_eq!(members(&redis, "idx:{s}:sid:sid-a"), ["a2"]);

    let mut gone = s.delete_idp_session("sid-b").await.unwrap();
    gone.sort();
    assert_eq!(gone, ["a3", "b1"]);
    assert_eq!(members(&redis, "idx:{s}:sub:alice"), ["a2"]);
    assert!(members(&redis, "idx:{s}:sub:bob").is_empty());
    assert!(members(&redis, "idx:{s}:sid:sid-b").is_empty());

    assert_eq!(s.delete_subject("alice").await.unwrap(), ["a2"]);
    assert!(members(&redis, "idx:{s}:sid:sid-a").is_empty());
    assert!(
        keys(&redis, "idx:{s}:*").is_empty(),
        "{:?}",
        keys(&redis, "idx:{s}:*")
    );

    // A record that expires by TTL leaves a member behind; listing skips and removes it.
    let mut short = with_sid("c1", "carol", "sid-c");
    short.idle_expires_at = now + 1;
    s.create(short).await.unwrap();
    s.create(with_sid("c2", "carol", "sid-c")).await.unwrap();
    wait_for(
        || {
            redis
                .cli(&["EXISTS", "idx:{s}:rec:c1"])
                .is_ok_and(|o| o.trim() == "0")
        },
        "c1 to expire",
    );
    assert_eq!(members(&redis, "idx:{s}:sub:carol"), ["c1", "c2"]);
    let listed: Vec<_> = s
        .list_subject("carol", unix_now())
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.handle)
        .collect();
    assert_eq!(listed, ["c2"]);
    assert_eq!(
        members(&redis, "idx:{s}:sub:carol"),
        ["c2"],
        "dangling member removed"
    );
    assert_eq!(
        s.delete_idp_session("sid-c").await.unwrap(),
        ["c2"],
        "a dangling member is not reported as deleted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca_and_an_acl_user_passes_the_suite() {
    let redis = RedisServer::start_with(Options {
        acl_user: Some(("coatcheck".into(), "s3cret-pw".into())),
        tls: true,
        ..Options::default()
    });
    assert!(redis.url().starts_with("rediss://coatcheck:s3cret-pw@"));
    let mut cfg = settings(&redis.url(), "tls:");
    cfg.ca = Some(support::certs().ca.clone());
    let s = store(&cfg).await;
    conformance::run(&s).await;
    conformance::events(&s).await;

    // Without the CA the server is not trusted.
    let mut untrusted = cfg.clone();
    untrusted.ca = None;
    let s = RedisStore::new(&untrusted).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(matches!(s.ping().await, Err(StoreError::Unavailable(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_unavailable_and_never_shown() {
    let redis = RedisServer::start_with(Options {
        acl_user: Some(("coatcheck".into(), "right-pw".into())),
        ..Options::default()
    });
    let url = redis.url().replace("right-pw", "wrong-pw-XYZ");
    let s = RedisStore::new(&settings(&url, "pw:")).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let err = s.ping().await.unwrap_err();
    let mut text = format!("{err} {err:?}");
    let mut source = std::error::Error::source(&err);
    while let Some(e) = source {
        text += &format!(" {e} {e:?}");
        source = e.source();
    }
    assert!(!text.contains("wrong-pw-XYZ"), "password leaked: {text}");
    assert!(!text.contains("right-pw"), "password leaked: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_built_while_redis_is_down_connects_when_it_comes_up() {
    let mut redis = RedisServer::start();
    redis.stop();
    let s = RedisStore::new(&settings(&redis.url(), "late:")).expect("new() does not need Redis");
    let started = Instant::now();
    assert!(matches!(s.ping().await, Err(StoreError::Unavailable(_))));
    assert!(
        matches!(s.load("x", 0).await, Err(StoreError::Unavailable(_))),
        "calls fail while Redis is down"
    );
    assert!(
        started.elapsed() < TIMEOUT,
        "fails fast while not connected"
    );
    redis.start_again();
    until_up(&s).await;
    conformance::once(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_fails_calls_within_the_timeout_reports_lost_and_recovers_with_resumed() {
    let mut redis = RedisServer::start();
    let s = store(&settings(&redis.url(), "outage:")).await;
    let mut rx = s.subscribe();
    // Let the subscription become live before the outage.
    let probe = Event::Changed {
        handle: "probe".into(),
        version: 1,
    };
    s.publish(&probe).await.unwrap();
    expect_event(&mut rx, &probe, Duration::from_secs(5)).await;
    let now = unix_now();
    s.create(realistic("before", "alice", now)).await.unwrap();

    redis.kill9();
    for _ in 0..5 {
        let started = Instant::now();
        let r = s.load("before", now).await;
        assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
        assert!(
            started.elapsed() < TIMEOUT + Duration::from_millis(200),
            "took {:?}",
            started.elapsed()
        );
    }
    expect_event(&mut rx, &Event::Lost, Duration::from_secs(5)).await;

    redis.start_again();
    expect_event(&mut rx, &Event::Resumed, Duration::from_secs(30)).await;
    until_up(&s).await;
    assert!(
        s.load("before", now).await.unwrap().is_some(),
        "appendonly kept it"
    );
    s.create(realistic("after", "alice", now)).await.unwrap();
    let after = Event::Ended {
        handle: "after".into(),
        reason: coatcheck::session::store::EndReason::Logout,
    };
    s.publish(&after).await.unwrap();
    expect_event(&mut rx, &after, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_fails_calls_at_the_deadline_and_is_used_again_when_it_answers() {
    let redis = RedisServer::start();
    let s = store(&settings(&redis.url(), "hung:")).await;
    let mut rx = s.subscribe();
    let now = unix_now();
    s.create(realistic("h", "alice", now)).await.unwrap();
    redis.freeze(true);
    let started = Instant::now();
    let r = s.load("h", now).await;
    let took = started.elapsed();
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
    assert!(
        took >= TIMEOUT - Duration::from_millis(50) && took < TIMEOUT + Duration::from_millis(300),
        "the deadline is {TIMEOUT:?}; took {took:?}"
    );
    expect_event(&mut rx, &Event::Lost, Duration::from_secs(10)).await;
    redis.freeze(false);
    until_up(&s).await;
    assert!(s.load("h", now).await.unwrap().is_some());
    expect_event(&mut rx, &Event::Resumed, Duration::from_secs(15)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_survive_a_redis_restart_with_appendonly() {
    let mut redis = RedisServer::start();
    let s = store(&settings(&redis.url(), "aof:")).await;
    let now = unix_now();
    let r = realistic("kept", "alice", now);
    s.create(r.clone()).await.unwrap();
    assert!(
        s.first_use("spent", Duration::from_secs(600))
            .await
            .unwrap()
    );
    redis.stop();
    redis.start_again();
    until_up(&s).await;
    assert_eq!(s.load("kept", now).await.unwrap(), Some(r));
    assert_eq!(s.list_subject("alice", now).await.unwrap().len(), 1);
    assert!(
        !s.first_use("spent", Duration::from_secs(600))
            .await
            .unwrap()
    );
    redis.kill9();
    redis.start_again();
    until_up(&s).await;
    assert!(
        s.load("kept", now).await.unwrap().is_some(),
        "appendfsync always survives SIGKILL"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_sentinel_failover_the_store_works_against_the_promoted_replica() {
    let mut setup = SentinelSetup::start(3);
    let mut cfg = settings("redis://sentinel-managed/0", "sent:");
    // A dead Sentinel first: the next one is asked.
    cfg.sentinels = [
        vec![format!("127.0.0.1:{}", support::redis::free_port())],
        setup.addrs(),
    ]
    .concat();
    cfg.sentinel_master = Some(MASTER_NAME.into());
    let s = store(&cfg).await;
    let mut rx = s.subscribe();
    let now = unix_now();
    s.create(realistic("r1", "alice", now)).await.unwrap();
    wait_for(
        || {
            setup
                .replica
                .cli(&["EXISTS", "sent:{s}:rec:r1"])
                .is_ok_and(|o| o.trim() == "1")
        },
        "the record to reach the replica",
    );

    setup.fail_over();
    expect_event(&mut rx, &Event::Lost, Duration::from_secs(10)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match s.create(realistic("r2", "alice", now)).await {
            Ok(()) => break,
            Err(e) => assert!(Instant::now() < deadline, "no recovery after failover: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    expect_event(&mut rx, &Event::Resumed, Duration::from_secs(30)).await;
    assert_eq!(setup.master_port(), Some(setup.replica.port));
    assert!(
        s.load("r1", now).await.unwrap().is_some(),
        "replicated before"
    );
    assert_eq!(
        setup
            .replica
            .cli(&["EXISTS", "sent:{s}:rec:r2"])
            .unwrap()
            .trim(),
        "1",
        "written to the promoted replica"
    );
    let e = Event::Changed {
        handle: "r2".into(),
        version: 1,
    };
    s.publish(&e).await.unwrap();
    expect_event(&mut rx, &e, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_and_latency_per_session_are_reported() {
    let redis = RedisServer::start();
    let s = store(&settings(&redis.url(), "coatcheck:")).await;
    let now = unix_now();
    const N: usize = 1000;
    let handle = |i: usize| format!("{i:0>32x}");
    let subject = |i: usize| format!("{:0>64x}", i / 2);
    let used = |redis: &RedisServer| -> i64 {
        let info = redis.cli(&["INFO", "memory"]).unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let before = used(&redis);
    let started = Instant::now();
    for i in 0..N {
        let mut r = realistic(&handle(i), &subject(i), now);
        r.idp_sid = Some(format!("{:0>64x}", i));
        s.create(r).await.unwrap();
    }
    let create = started.elapsed() / N as u32;
    let started = Instant::now();
    for i in 0..N {
        assert!(s.load(&handle(i), now).await.unwrap().is_some());
    }
    let load = started.elapsed() / N as u32;
    let started = Instant::now();
    for i in 0..N {
        s.touch(&handle(i), now + 60, now + 1860).await.unwrap();
    }
    let touch = started.elapsed() / N as u32;
    let per_session = (used(&redis) - before) / N as i64;
    let record: i64 = redis
        .cli(&[
            "MEMORY",
            "USAGE",
            &format!("coatcheck:{{s}}:rec:{}", handle(0)),
            "SAMPLES",
            "0",
        ])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    println!(
        "redis memory per session: record key {record} B (MEMORY USAGE SAMPLES 0, 1500 B sealed), \
         {per_session} B in total with indexes (used_memory delta over {N}); \
         latency per call on loopback: create {create:?}, load {load:?}, touch {touch:?}"
    );
    assert!((1500..3000).contains(&record), "record key {record} B");
    assert!(per_session < 4096, "{per_session} B per session");
}
