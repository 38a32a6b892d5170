//! Redis store: sessions, once-set, leases and events shared by every coatcheck instance that
//! points at the same Redis (DESIGN.md §6).
//!
//! # Key layout
//! Every key starts with `<key_prefix>{s}:` — the `{s}` hash tag puts all of a deployment's keys
//! in one Redis Cluster slot, so each Lua script touches keys of one slot only:
//!
//! | key | type | holds | expiry |
//! |---|---|---|---|
//! | `{s}:rec:<handle>` | hash | `v` version, `ls` last_seen, `ie` idle_expires_at, `ae` absolute_expires_at, `ca` created_at, `sub`, `sid`, `ua`, `s` sealed bytes | TTL = the record's remaining life |
//! | `{s}:sub:<subject>` | set | handles of the subject's records | TTL ≥ its longest record |
//! | `{s}:sid:<idp_sid>` | set | handles of the provider session's records | TTL ≥ its longest record |
//! | `{s}:exp` | sorted set | handle → expires_at, for [`Store::sweep`] | none (swept) |
//! | `{s}:once:<key>` | string | `1` | the once-key's TTL |
//! | `{s}:lease:<key>` | string | the holder's token | the lease's TTL |
//!
//! Events go to the channel `<key_prefix>events` as JSON ([`Event`]).
//!
//! The record TTL is `expires_at - last_seen` seconds, measured by Redis from the write: it never
//! ends a record before `expires_at` (last_seen is never in the future), it does not depend on the
//! clocks of Redis and coatcheck agreeing, and logical expiry is checked on every load anyway.
//!
//! # Availability
//! [`RedisStore::new`] never waits for Redis: a background task connects (via Sentinel when
//! configured), health-checks the connection every second and reconnects with backoff, forever.
//! Until it is connected every call fails at once with [`StoreError::Unavailable`]; every call
//! has a deadline (`session.store.timeout`). A second task holds the event subscription and
//! reports [`Event::Lost`] / [`Event::Resumed`] as it drops and comes back; [`Store::ping`]
//! (readiness) needs both.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::StreamExt as _;
use redis::aio::MultiplexedConnection;
use redis::{AsyncCommands as _, Script};
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;
use url::Url;

use super::{Event, Events, Lease, OnceSet, Record, Store, StoreError};
use crate::config::RedisSettings;
use crate::error::BoxError;

/// Events buffered per local subscriber before it counts as lagging (and flushes its cache).
const EVENT_BUFFER: usize = 4096;
/// Deadline for establishing a connection (TCP, TLS, AUTH, SELECT), and for asking a Sentinel.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// First wait before reconnecting; doubled per failure up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between reconnection attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often an idle connection (commands and subscription) is checked with `PING`.
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
/// Records examined per `sweep` script call (keeps each script short).
const SWEEP_BATCH: usize = 500;

/// Writes the record hash and its index entries. Expects `KEYS[1]` = record, `KEYS[2]` = the
/// expiry zset, `KEYS[3..]` = the index sets; `ARGV[1]` = ttl ms, `ARGV[2]` = expires_at,
/// `ARGV[3]` = handle, hash field/value pairs from `ARGV[FIELDS]`.
const WRITE_LUA: &str = r#"
local function write(first_field)
  redis.call('HSET', KEYS[1], unpack(ARGV, first_field))
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
  for i = 3, #KEYS do
    redis.call('SADD', KEYS[i], ARGV[3])
    if redis.call('PTTL', KEYS[i]) < tonumber(ARGV[1]) then
      redis.call('PEXPIRE', KEYS[i], ARGV[1])
    end
  end
end
"#;

/// Deletes one record and its index entries. `p` is `<key_prefix>{s}:`.
const DROP_LUA: &str = r#"
local function drop(p, h)
  local rec = p .. 'rec:' .. h
  local idx = redis.call('HMGET', rec, 'sub', 'sid')
  redis.call('ZREM', p .. 'exp', h)
  if redis.call('DEL', rec) == 0 then return false end
  if idx[1] and idx[1] ~= '' then redis.call('SREM', p .. 'sub:' .. idx[1], h) end
  if idx[2] and idx[2] ~= '' then redis.call('SREM', p .. 'sid:' .. idx[2], h) end
  return true
end
"#;

/// `KEYS` as [`WRITE_LUA`]; 0 if the handle exists, else writes and returns 1.
const CREATE_LUA: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
write(4)
return 1
"#;

/// `KEYS` as [`WRITE_LUA`]; `ARGV[4]` = expected version, `ARGV[5]` = prefix. Compare-and-set.
const SAVE_LUA: &str = r#"
local cur = redis.call('HMGET', KEYS[1], 'v', 'sub', 'sid')
if not cur[1] or cur[1] ~= ARGV[4] then return 0 end
local p, h = ARGV[5], ARGV[3]
if cur[2] and cur[2] ~= '' then redis.call('SREM', p .. 'sub:' .. cur[2], h) end
if cur[3] and cur[3] ~= '' then redis.call('SREM', p .. 'sid:' .. cur[3], h) end
redis.call('DEL', KEYS[1])
write(6)
return 1
"#;

/// `KEYS[1]` = record, `KEYS[2]` = expiry zset; `ARGV` = last_seen, idle_expires_at, handle,
/// prefix. Moves the idle clock and the TTLs; the version stays.
const TOUCH_LUA: &str = r#"
local cur = redis.call('HMGET', KEYS[1], 'ae', 'sub', 'sid')
if not cur[1] then return 0 end
redis.call('HSET', KEYS[1], 'ls', ARGV[1], 'ie', ARGV[2])
local exp = math.min(tonumber(ARGV[2]), tonumber(cur[1]))
local ttl = math.max((exp - tonumber(ARGV[1])) * 1000, 1000)
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('ZADD', KEYS[2], exp, ARGV[3])
local p = ARGV[4]
for i, kind in ipairs({'sub:', 'sid:'}) do
  local v = cur[i + 1]
  if v and v ~= '' and redis.call('PTTL', p .. kind .. v) < ttl then
    redis.call('PEXPIRE', p .. kind .. v, ttl)
  end
end
return 1
"#;

/// `KEYS[1]` = record; `ARGV` = prefix, handle. Returns the record's fields (empty if none).
const DELETE_LUA: &str = r#"
local r = redis.call('HGETALL', KEYS[1])
drop(ARGV[1], ARGV[2])
return r
"#;

/// `KEYS[1]` = an index set; `ARGV[1]` = prefix. Deletes every record in it and the set; returns
/// the handles of the records that existed.
const DELETE_SET_LUA: &str = r#"
local out = {}
for _, h in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if drop(ARGV[1], h) then table.insert(out, h) end
end
redis.call('DEL', KEYS[1])
return out
"#;

/// `KEYS[1]` = a subject set; `ARGV[1]` = prefix. Returns `{handle, fields}` pairs; members whose
/// record has expired are removed from the set.
const LIST_LUA: &str = r#"
local out = {}
for _, h in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local r = redis.call('HGETALL', ARGV[1] .. 'rec:' .. h)
  if #r == 0 then
    redis.call('SREM', KEYS[1], h)
  else
    table.insert(out, {h, r})
  end
end
return out
"#;

/// `KEYS[1]` = expiry zset; `ARGV` = prefix, now, batch. Drops records expired at `now`; returns
/// `{dropped, examined}`.
const SWEEP_LUA: &str = r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
local n = 0
for _, h in ipairs(due) do
  local t = redis.call('HMGET', ARGV[1] .. 'rec:' .. h, 'ie', 'ae')
  if not t[1] then
    redis.call('ZREM', KEYS[1], h)
  else
    local exp = math.min(tonumber(t[1]), tonumber(t[2]))
    if exp <= tonumber(ARGV[2]) then
      if drop(ARGV[1], h) then n = n + 1 end
    else
      redis.call('ZADD', KEYS[1], exp, h)
    end
  end
end
return {n, #due}
"#;

/// `KEYS[1]` = lease; `ARGV` = token, channel, event. Compare-and-delete, then announce.
const RELEASE_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
"#;

struct Scripts {
    create: Script,
    save: Script,
    touch: Script,
    delete: Script,
    delete_set: Script,
    list: Script,
    sweep: Script,
    release: Script,
}

impl Scripts {
    fn new() -> Scripts {
        let with = |lib: &str, body: &str| Script::new(&format!("{lib}{body}"));
        Scripts {
            create: with(WRITE_LUA, CREATE_LUA),
            save: with(WRITE_LUA, SAVE_LUA),
            touch: Script::new(TOUCH_LUA),
            delete: with(DROP_LUA, DELETE_LUA),
            delete_set: with(DROP_LUA, DELETE_SET_LUA),
            list: Script::new(LIST_LUA),
            sweep: with(DROP_LUA, SWEEP_LUA),
            release: Script::new(RELEASE_LUA),
        }
    }
}

/// Where to connect: a fixed server, or the master a Sentinel names.
enum Target {
    Direct(redis::Client),
    Sentinel {
        /// The configured URL; the master's host and port replace its own.
        url: Url,
        sentinels: Vec<redis::Client>,
        master: String,
    },
}

/// State shared with the background tasks.
struct Shared {
    target: Target,
    certs: Option<redis::TlsCertificates>,
    timeout: Duration,
    /// The live command connection and its generation.
    conn: RwLock<Option<(u64, MultiplexedConnection)>>,
    /// Wakes the connector when a call found the connection broken.
    broken: Notify,
    events: broadcast::Sender<Event>,
    channel: String,
    /// Whether the event subscription is live (else this instance may miss events).
    subscribed: AtomicBool,
}

/// The `redis` store kind. Cheap to call from many tasks (one multiplexed connection).
pub struct RedisStore {
    shared: Arc<Shared>,
    scripts: Scripts,
    /// `<key_prefix>{s}:`
    prefix: String,
    stop: CancellationToken,
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn unavailable(e: impl Into<BoxError>) -> StoreError {
    StoreError::Unavailable(e.into())
}

/// Whether the connection that produced `e` should be replaced (rather than the call merely
/// failing): the socket is gone, or a failover demoted the server to a read-only replica.
fn breaks_connection(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_unrecoverable_error()
        || e.is_timeout()
        || e.code() == Some("READONLY")
        || e.code() == Some("MASTERDOWN")
}

impl RedisStore {
    /// Builds the store and starts connecting in the background. Fails only on settings that
    /// cannot work (a URL that does not parse, an unreadable `ca`), never because Redis is down.
    /// Needs a tokio runtime.
    pub fn new(settings: &RedisSettings) -> Result<RedisStore, StoreError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| unavailable("the redis store needs a tokio runtime"))?;
        // Parse errors are reported without the URL: it may hold a password.
        let url = Url::parse(settings.url.expose())
            .map_err(|e| unavailable(format!("session.store.url is not a valid URL: {e}")))?;
        let tls = match url.scheme() {
            "redis" => false,
            "rediss" => true,
            other => {
                return Err(unavailable(format!(
                    "session.store.url: scheme {other:?} must be redis or rediss"
                )));
            }
        };
        let certs = match &settings.ca {
            Some(path) if tls => Some(trust_anchors(path)?),
            _ => None,
        };
        let open = |u: &str| -> Result<redis::Client, StoreError> {
            match &certs {
                Some(c) => redis::Client::build_with_tls(u, c.clone()),
                None => redis::Client::open(u),
            }
            .map_err(|e| unavailable(format!("session.store: {e}")))
        };
        let target = if settings.sentinels.is_empty() {
            Target::Direct(open(settings.url.expose())?)
        } else {
            let scheme = url.scheme();
            let sentinels = settings
                .sentinels
                .iter()
                .map(|addr| open(&format!("{scheme}://{addr}")))
                .collect::<Result<_, _>>()?;
            Target::Sentinel {
                url: url.clone(),
                sentinels,
                master: settings.sentinel_master.clone().unwrap_or_default(),
            }
        };
        let shared = Arc::new(Shared {
            target,
            certs,
            timeout: settings.timeout,
            conn: RwLock::new(None),
            broken: Notify::new(),
            events: broadcast::channel(EVENT_BUFFER).0,
            channel: format!("{}events", settings.key_prefix),
            subscribed: AtomicBool::new(false),
        });
        let stop = CancellationToken::new();
        runtime.spawn(connector(shared.clone(), stop.clone()));
        runtime.spawn(subscriber(shared.clone(), stop.clone()));
        Ok(RedisStore {
            shared,
            scripts: Scripts::new(),
            prefix: format!("{}{{s}}:", settings.key_prefix),
            stop,
        })
    }

    fn exp_key(&self) -> String {
        format!("{}exp", self.prefix)
    }

    fn key(&self, kind: &str, id: &str) -> String {
        format!("{}{kind}:{id}", self.prefix)
    }

    /// Runs one call on the live connection with the configured deadline; a broken connection is
    /// handed to the connector to replace.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let Some((generation, conn)) = self.shared.current() else {
            return Err(unavailable("redis is not connected"));
        };
        match tokio::time::timeout(self.shared.timeout, f(conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if breaks_connection(&e) {
                    self.shared.discard(generation);
                }
                Err(unavailable(e))
            }
            Err(_) => {
                self.shared.discard(generation);
                Err(unavailable(format!(
                    "redis did not answer within {:?}",
                    self.shared.timeout
                )))
            }
        }
    }

    /// Runs a write script (create / save) for `record`.
    async fn write(
        &self,
        script: &Script,
        record: &Record,
        extra: &[String],
    ) -> Result<bool, StoreError> {
        let expires_at = record.expires_at();
        let ttl_ms = expires_at.saturating_sub(record.last_seen).max(1) * 1000;
        let mut inv = script.prepare_invoke();
        inv.key(self.key("rec", &record.handle))
            .key(self.exp_key())
            .key(self.key("sub", &record.subject));
        if let Some(sid) = &record.idp_sid {
            inv.key(self.key("sid", sid));
        }
        inv.arg(ttl_ms).arg(expires_at).arg(&record.handle);
        // The script's own arguments; the hash fields follow (its `write(4 + extra.len())`).
        for a in extra {
            inv.arg(a);
        }
        inv.arg("v")
            .arg(record.version)
            .arg("ls")
            .arg(record.last_seen)
            .arg("ie")
            .arg(record.idle_expires_at)
            .arg("ae")
            .arg(record.absolute_expires_at)
            .arg("ca")
            .arg(record.created_at)
            .arg("sub")
            .arg(&record.subject)
            .arg("sid")
            .arg(record.idp_sid.as_deref().unwrap_or(""))
            .arg("ua")
            .arg(&record.user_agent)
            .arg("s")
            .arg(&record.sealed[..]);
        let written: i64 = self
            .call(|mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        Ok(written == 1)
    }

    async fn delete_set(&self, kind: &str, id: &str) -> Result<Vec<String>, StoreError> {
        let mut inv = self.scripts.delete_set.key(self.key(kind, id));
        inv.arg(&self.prefix);
        self.call(|mut c| async move { inv.invoke_async(&mut c).await })
            .await
    }
}

/// The `ca` file's certificates plus the system roots, as PEM for redis-rs (which otherwise
/// trusts only the file when given one: `ca` is an *extra* trust anchor).
fn trust_anchors(path: &std::path::Path) -> Result<redis::TlsCertificates, StoreError> {
    use base64::Engine as _;
    let mut pem = std::fs::read(path)
        .map_err(|e| unavailable(format!("session.store.ca: {}: {e}", path.display())))?;
    pem.push(b'\n');
    // redis-rs refuses the whole bundle if one anchor does not parse: keep only those that do.
    let mut check = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        if check.add(cert.clone()).is_err() {
            continue;
        }
        let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        pem.extend_from_slice(b"-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            pem.extend_from_slice(line);
            pem.push(b'\n');
        }
        pem.extend_from_slice(b"-----END CERTIFICATE-----\n");
    }
    Ok(redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    })
}

impl Shared {
    fn current(&self) -> Option<(u64, MultiplexedConnection)> {
        self.conn.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Drops connection `generation` (if still current) and wakes the connector.
    fn discard(&self, generation: u64) {
        let mut slot = self.conn.write().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_some_and(|(g, _)| *g == generation) {
            *slot = None;
            drop(slot);
            self.broken.notify_one();
        }
    }

    /// The client for the current master (asks the Sentinels when configured).
    async fn client(&self) -> Result<redis::Client, BoxError> {
        match &self.target {
            Target::Direct(c) => Ok(c.clone()),
            Target::Sentinel {
                url,
                sentinels,
                master,
            } => {
                let mut last: BoxError = "no sentinel configured".into();
                for s in sentinels {
                    match self.ask_sentinel(s, master).await {
                        Ok((host, port)) => {
                            let mut u = url.clone();
                            u.set_host(Some(&host))?;
                            u.set_port(Some(port))
                                .map_err(|()| "cannot set the master's port")?;
                            let client = match &self.certs {
                                Some(c) => redis::Client::build_with_tls(u.as_str(), c.clone()),
                                None => redis::Client::open(u.as_str()),
                            }?;
                            return Ok(client);
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    }

    async fn ask_sentinel(
        &self,
        sentinel: &redis::Client,
        master: &str,
    ) -> Result<(String, u16), BoxError> {
        let ask = async {
            let mut c = sentinel.get_multiplexed_async_connection().await?;
            let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(master)
                .query_async(&mut c)
                .await?;
            Ok::<_, redis::RedisError>(addr)
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, ask).await {
            Err(_) => Err("the sentinel did not answer in time".into()),
            Ok(Err(e)) => Err(e.into()),
            Ok(Ok(None)) => Err(format!("the sentinel knows no master named {master:?}").into()),
            Ok(Ok(Some(a))) => Ok(a),
        }
    }

    /// Connects to the current master and checks that it is one (a Sentinel may still name a
    /// demoted master during a failover).
    async fn connect(&self) -> Result<MultiplexedConnection, BoxError> {
        let client = self.client().await?;
        let attempt = async {
            let mut c = client.get_multiplexed_async_connection().await?;
            let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut c).await?;
            let is_master = matches!(role.first(), Some(redis::Value::BulkString(b)) if b == b"master")
                || matches!(role.first(), Some(redis::Value::SimpleString(s)) if s == "master");
            Ok::<_, redis::RedisError>((c, is_master))
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
            Err(_) => Err("connecting timed out".into()),
            Ok(Err(e)) => Err(e.into()),
            Ok(Ok((_, false))) => Err("the server is a replica, not the master".into()),
            Ok(Ok((c, true))) => Ok(c),
        }
    }

    fn describe(&self) -> String {
        match &self.target {
            // ConnectionAddr's Display is host:port; it holds no credentials.
            Target::Direct(c) => c.get_connection_info().addr().to_string(),
            Target::Sentinel { master, url, .. } => {
                format!("sentinel master {master:?} ({})", url.scheme())
            }
        }
    }
}

/// Keeps one command connection alive: connects with backoff, checks it every
/// [`HEALTH_INTERVAL`], and replaces it when a call found it broken.
async fn connector(shared: Arc<Shared>, stop: CancellationToken) {
    let mut backoff = BACKOFF_MIN;
    let mut generation = 0u64;
    let mut was_up = false;
    loop {
        if let Some((g, mut conn)) = shared.current() {
            tokio::select! {
                () = stop.cancelled() => return,
                () = shared.broken.notified() => {}
                () = tokio::time::sleep(HEALTH_INTERVAL) => {
                    let ok = matches!(
                        tokio::time::timeout(shared.timeout.max(CONNECT_TIMEOUT), redis::cmd("PING").query_async::<()>(&mut conn)).await,
                        Ok(Ok(()))
                    );
                    if !ok {
                        shared.discard(g);
                    }
                }
            }
            continue;
        }
        if was_up {
            tracing::warn!(redis = %shared.describe(), "session store connection lost; reconnecting");
            was_up = false;
        }
        let attempt = tokio::select! {
            () = stop.cancelled() => return,
            r = shared.connect() => r,
        };
        match attempt {
            Ok(conn) => {
                generation += 1;
                *shared.conn.write().unwrap_or_else(|p| p.into_inner()) = Some((generation, conn));
                tracing::info!(redis = %shared.describe(), "session store connected");
                backoff = BACKOFF_MIN;
                was_up = true;
            }
            Err(e) => {
                tracing::warn!(redis = %shared.describe(), error = %e, retry_in = ?backoff, "session store unreachable");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Holds the subscription to the event channel and feeds the local broadcast; reports
/// [`Event::Lost`] when it drops (or cannot be made at start) and [`Event::Resumed`] when it is
/// live again.
async fn subscriber(shared: Arc<Shared>, stop: CancellationToken) {
    let mut backoff = BACKOFF_MIN;
    let mut lost = false;
    loop {
        let live = tokio::select! {
            () = stop.cancelled() => return,
            r = subscribe(&shared) => r,
        };
        match live {
            Ok((mut sink, mut stream)) => {
                backoff = BACKOFF_MIN;
                shared.subscribed.store(true, Ordering::Release);
                if lost {
                    let _ = shared.events.send(Event::Resumed);
                    lost = false;
                }
                let mut health = tokio::time::interval(HEALTH_INTERVAL);
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        msg = stream.next() => match msg {
                            Some(msg) => match serde_json::from_slice::<Event>(msg.get_payload_bytes()) {
                                // Lost/Resumed are local only; another instance cannot send them.
                                Ok(Event::Lost | Event::Resumed) => {}
                                Ok(e) => { let _ = shared.events.send(e); }
                                Err(e) => tracing::warn!(error = %e, "ignoring an unreadable session event"),
                            },
                            None => break,
                        },
                        _ = health.tick() => {
                            let ping = tokio::time::timeout(shared.timeout.max(CONNECT_TIMEOUT), sink.ping::<redis::Value>()).await;
                            if !matches!(ping, Ok(Ok(_))) {
                                break;
                            }
                        }
                    }
                }
                shared.subscribed.store(false, Ordering::Release);
                tracing::warn!("session event subscription lost; resubscribing");
            }
            Err(e) => {
                tracing::debug!(error = %e, "session event subscription failed");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
        if !lost {
            let _ = shared.events.send(Event::Lost);
            lost = true;
        }
    }
}

async fn subscribe(
    shared: &Shared,
) -> Result<(redis::aio::PubSubSink, redis::aio::PubSubStream), BoxError> {
    let client = shared.client().await?;
    let attempt = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(&shared.channel).await?;
        Ok::<_, redis::RedisError>(pubsub.split())
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
        Err(_) => Err("subscribing timed out".into()),
        Ok(r) => Ok(r?),
    }
}

fn field<'a>(h: &'a HashMap<String, Vec<u8>>, name: &str) -> Result<&'a [u8], StoreError> {
    h.get(name)
        .map(Vec::as_slice)
        .ok_or_else(|| unavailable(format!("stored session lacks field {name:?}")))
}

fn text(h: &HashMap<String, Vec<u8>>, name: &str) -> Result<String, StoreError> {
    String::from_utf8(field(h, name)?.to_vec())
        .map_err(|_| unavailable(format!("stored session field {name:?} is not UTF-8")))
}

fn number(h: &HashMap<String, Vec<u8>>, name: &str) -> Result<u64, StoreError> {
    std::str::from_utf8(field(h, name)?)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| unavailable(format!("stored session field {name:?} is not a number")))
}

/// A record from its hash fields (an empty hash: no record).
fn decode(handle: &str, h: &HashMap<String, Vec<u8>>) -> Result<Option<Record>, StoreError> {
    if h.is_empty() {
        return Ok(None);
    }
    let sid = text(h, "sid")?;
    Ok(Some(Record {
        handle: handle.to_owned(),
        subject: text(h, "sub")?,
        version: number(h, "v")?,
        created_at: number(h, "ca")?,
        last_seen: number(h, "ls")?,
        idle_expires_at: number(h, "ie")?,
        absolute_expires_at: number(h, "ae")?,
        user_agent: text(h, "ua")?,
        idp_sid: (!sid.is_empty()).then_some(sid),
        sealed: field(h, "s")?.to_vec(),
    }))
}

impl Store for RedisStore {
    async fn create(&self, record: Record) -> Result<(), StoreError> {
        if self.write(&self.scripts.create, &record, &[]).await? {
            Ok(())
        } else {
            Err(StoreError::Exists)
        }
    }

    async fn load(&self, handle: &str, now: u64) -> Result<Option<Record>, StoreError> {
        let key = self.key("rec", handle);
        let h: HashMap<String, Vec<u8>> = self
            .call(|mut c| async move { c.hgetall(key).await })
            .await?;
        Ok(decode(handle, &h)?.filter(|r| !r.is_expired(now)))
    }

    async fn save(&self, record: Record, expected_version: u64) -> Result<bool, StoreError> {
        let extra = [expected_version.to_string(), self.prefix.clone()];
        self.write(&self.scripts.save, &record, &extra).await
    }

    async fn touch(
        &self,
        handle: &str,
        last_seen: u64,
        idle_expires_at: u64,
    ) -> Result<(), StoreError> {
        let mut inv = self.scripts.touch.key(self.key("rec", handle));
        inv.key(self.exp_key())
            .arg(last_seen)
            .arg(idle_expires_at)
            .arg(handle)
            .arg(&self.prefix);
        let _: i64 = self
            .call(|mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        Ok(())
    }

    async fn delete(&self, handle: &str) -> Result<Option<Record>, StoreError> {
        let mut inv = self.scripts.delete.key(self.key("rec", handle));
        inv.arg(&self.prefix).arg(handle);
        let h: HashMap<String, Vec<u8>> = self
            .call(|mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        decode(handle, &h)
    }

    async fn delete_idp_session(&self, idp_sid: &str) -> Result<Vec<String>, StoreError> {
        self.delete_set("sid", idp_sid).await
    }

    async fn delete_subject(&self, subject: &str) -> Result<Vec<String>, StoreError> {
        self.delete_set("sub", subject).await
    }

    async fn list_subject(&self, subject: &str, now: u64) -> Result<Vec<Record>, StoreError> {
        let mut inv = self.scripts.list.key(self.key("sub", subject));
        inv.arg(&self.prefix);
        let rows: Vec<(String, HashMap<String, Vec<u8>>)> = self
            .call(|mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (handle, h) in rows {
            if let Some(r) = decode(&handle, &h)?.filter(|r| !r.is_expired(now)) {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Redis drops abandoned records by their TTL; this removes records that are logically
    /// expired at `now` sooner, and cleans the expiry index of records whose TTL ended.
    async fn sweep(&self, now: u64) -> Result<usize, StoreError> {
        let mut total = 0;
        loop {
            let mut inv = self.scripts.sweep.key(self.exp_key());
            inv.arg(&self.prefix).arg(now).arg(SWEEP_BATCH);
            let (dropped, examined): (usize, usize) = self
                .call(|mut c| async move { inv.invoke_async(&mut c).await })
                .await?;
            total += dropped;
            if examined < SWEEP_BATCH {
                return Ok(total);
            }
        }
    }

    /// Ready means both: commands are answered and the event subscription is live (an instance
    /// that cannot hear events could serve a session another instance ended).
    async fn ping(&self) -> Result<(), StoreError> {
        if !self.shared.subscribed.load(Ordering::Acquire) {
            return Err(unavailable("the redis event subscription is not live"));
        }
        self.call(|mut c| async move { redis::cmd("PING").query_async::<()>(&mut c).await })
            .await
    }
}

impl OnceSet for RedisStore {
    async fn first_use(&self, key: &str, ttl: Duration) -> Result<bool, StoreError> {
        let key = self.key("once", key);
        let ms = ttl.as_millis().max(1) as u64;
        let set: Option<String> = self
            .call(|mut c| async move {
                redis::cmd("SET")
                    .arg(key)
                    .arg(1)
                    .arg("NX")
                    .arg("PX")
                    .arg(ms)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(set.is_some())
    }

    async fn forget(&self, key: &str) -> Result<(), StoreError> {
        let key = self.key("once", key);
        self.call(|mut c| async move { c.del::<_, ()>(key).await })
            .await
    }
}

impl Lease for RedisStore {
    async fn acquire(&self, key: &str, ttl: Duration) -> Result<Option<String>, StoreError> {
        let key = self.key("lease", key);
        let token = crate::secret::random_token(16);
        let ms = ttl.as_millis().max(1) as u64;
        let t = token.clone();
        let set: Option<String> = self
            .call(|mut c| async move {
                redis::cmd("SET")
                    .arg(key)
                    .arg(t)
                    .arg("NX")
                    .arg("PX")
                    .arg(ms)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(set.map(|_| token))
    }

    async fn release(&self, key: &str, token: &str) -> Result<(), StoreError> {
        let event = serde_json::to_string(&Event::Released {
            key: key.to_owned(),
        })
        .map_err(unavailable)?;
        let mut inv = self.scripts.release.key(self.key("lease", key));
        inv.arg(token).arg(&self.shared.channel).arg(event);
        let _: i64 = self
            .call(|mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        Ok(())
    }
}

impl Events for RedisStore {
    async fn publish(&self, event: &Event) -> Result<(), StoreError> {
        let payload = serde_json::to_string(event).map_err(unavailable)?;
        let channel = self.shared.channel.clone();
        self.call(|mut c| async move { c.publish::<_, _, ()>(channel, payload).await })
            .await
    }

    fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.shared.events.subscribe()
    }
}
