//! Sessions: the server-side half of the cloakroom.
//!
//! A request's cookie is verified ([`ticket`]) before anything else; then the decrypted session is
//! looked up in the moka cache (a hit touches no store and never waits for a lock: moka records the
//! read in a lock-free buffer, and applies a batch of them to its eviction policy only when its
//! housekeeping lock is free, `try_lock`), and only on a miss is the record loaded from the
//! [`store`] and opened with the key derived from the ticket's secret. A client connection keeps
//! the session its last request found in the cache, for as long as nothing in the cache changes
//! ([`cache`]'s epoch): the next request on it skips the cache's lookup.
//!
//! Caches are told, not left to expire: every change is published on the store's event channel
//! ([`store::Events`]) and every instance drops its copy. An instance whose subscription dropped
//! checks each cached session against the store until it has resubscribed (and then flushes). While
//! the store is unreachable, cached sessions keep being served for `OUTAGE_GRACE` and nobody is
//! logged out: a failed write is retried, never turned into a logout.

mod cache;
pub mod claims;
pub mod store;
pub mod ticket;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use http::{HeaderMap, HeaderValue, header};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::{self, RecordKey, StoreKind};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::proxy::headers;
use crate::secret::{self, Secret};
use cache::SessionCache;
use store::{AnyStore, Backend, EndReason, Event, Events, Record, Store, StoreError};
use ticket::{CookieSpec, HandleMemo, Keys, Presented, Ticket};

/// What a client connection remembers of the session its requests present (see [`HandleMemo`]
/// and [`cache`]): the handle of the cookie's id and, while the cache's epoch has not moved, the
/// session the cache answered for it.
pub(crate) type ConnectionMemo = HandleMemo<(Arc<Session>, u64)>;

/// How long the browser's `User-Agent` may be in the device list.
const MAX_USER_AGENT: usize = 256;
/// While the store is unreachable, a session cached by this instance keeps being served for this
/// long after it was last read from the store (beyond `session.cache.ttl`); then 503.
pub(crate) const OUTAGE_GRACE: Duration = Duration::from_secs(300);
/// Open `/bff/events` streams per session (tabs of one browser share a session).
pub const MAX_STREAMS_PER_SESSION: usize = 16;
/// Open `/bff/events` streams per instance.
pub(crate) const MAX_STREAMS: usize = 10_000;

/// `Retry-After` seconds on a 503 `store_unavailable`.
pub(crate) const STORE_RETRY_AFTER_SECS: u64 = 2;
/// A write that failed because the store was unreachable (refreshed tokens) is retried this often…
const RETRY_SAVE_EVERY: Duration = Duration::from_secs(1);
/// …for at most this long.
const RETRY_SAVE_FOR: Duration = Duration::from_secs(600);

/// Unix seconds now.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The sealed part of a session: tokens and identity. Only the cookie holder can open it.
#[derive(Clone, Serialize, Deserialize)]
pub struct SessionData {
    pub iss: String,
    pub sub: String,
    /// The ID token's claims (shown by `/bff/user`; `roles` drives route policy).
    pub claims: claims::Claims,
    /// Which issuer made the session (absent in records of older versions: OIDC).
    #[serde(default)]
    pub issuer: crate::auth::issuer::IssuerKind,
    /// The ID token (OIDC sessions; other issuers have none).
    #[serde(default)]
    pub id_token: Option<Secret>,
    pub access_token: Secret,
    /// Unix seconds at which the access token expires.
    pub access_expires_at: u64,
    /// Unix seconds at which the access token was received.
    #[serde(default)]
    pub access_issued_at: u64,
    pub refresh_token: Option<Secret>,
}

/// The first byte of a [`SessionData::encode`]d payload (JSON payloads start with `{`).
pub(crate) const DATA_V1: u8 = 1;

impl SessionData {
    /// The sealed plaintext: `DATA_V1`, then `iss`, `sub` (length-prefixed), `issuer` (one byte:
    /// 0 OIDC, 1 capture), `claims` (a binary JSON object: member count, then key and tagged
    /// value pairs — see `store::binary`; parsing them as JSON text was the largest cost of
    /// opening a session), `id_token` (a presence byte, then the string), `access_token`,
    /// `access_expires_at`, `access_issued_at` (varints), `refresh_token` (presence byte, string).
    pub fn encode(&self) -> Vec<u8> {
        use store::binary::{Writer, sized};
        let claims = self.claims.encoded_len();
        let opt_len = |t: &Option<Secret>| t.as_ref().map_or(0, |t| t.expose().len()) + 1;
        let mut w = Writer::new(
            DATA_V1,
            sized(self.iss.len())
                + sized(self.sub.len())
                + 1
                + claims
                + sized(opt_len(&self.id_token))
                + sized(self.access_token.expose().len())
                + 2 * 10
                + sized(opt_len(&self.refresh_token)),
        );
        let issuer = match self.issuer {
            crate::auth::issuer::IssuerKind::Oidc => 0,
            crate::auth::issuer::IssuerKind::Capture => 1,
        };
        w.bytes(self.iss.as_bytes())
            .bytes(self.sub.as_bytes())
            .u8(issuer);
        self.claims.write(&mut w);
        w.opt_bytes(self.id_token.as_ref().map(|t| t.expose().as_bytes()))
            .bytes(self.access_token.expose().as_bytes())
            .uint(self.access_expires_at)
            .uint(self.access_issued_at)
            .opt_bytes(self.refresh_token.as_ref().map(|t| t.expose().as_bytes()));
        w.finish()
    }

    /// The session data from a sealed plaintext: [`SessionData::encode`]'s, or the JSON that
    /// versions before the binary format sealed (its first byte is `{`). `None` if neither.
    #[cfg(test)]
    pub(crate) fn decode(plain: &[u8]) -> Option<SessionData> {
        let (mut data, access_token) = SessionData::decode_parts(plain)?;
        data.access_token = Secret::new(access_token.into_owned());
        Some(data)
    }

    /// `SessionData::decode` with the access token apart (the field is left empty): borrowed
    /// from `plain` in the binary form, checked to be UTF-8 but not copied, so that a session
    /// opened from the store writes it once, into its bearer.
    fn decode_parts(plain: &[u8]) -> Option<(SessionData, std::borrow::Cow<'_, str>)> {
        if plain.first() == Some(&b'{') {
            let mut data: SessionData = serde_json::from_slice(plain).ok()?;
            let access_token = std::mem::take(&mut data.access_token).into_inner();
            return Some((data, access_token.into()));
        }
        let mut r = store::binary::Reader::new(DATA_V1, plain)?;
        let iss = r.string()?;
        let sub = r.string()?;
        let issuer = match r.u8()? {
            0 => crate::auth::issuer::IssuerKind::Oidc,
            1 => crate::auth::issuer::IssuerKind::Capture,
            _ => return None,
        };
        let claims = claims::Claims::read(&mut r)?;
        let id_token = r.opt_string()?.map(Secret::new);
        let access_token = r.str()?;
        let data = SessionData {
            iss,
            sub,
            claims,
            issuer,
            id_token,
            access_token: Secret::default(),
            access_expires_at: r.uint()?,
            access_issued_at: r.uint()?,
            refresh_token: r.opt_string()?.map(Secret::new),
        };
        r.end()?;
        Some((data, access_token.into()))
    }
}

/// A live, decrypted session.
///
/// Laid out for the cache, where a session is this struct, its claims, its bearer and one block of
/// strings: the handle and the subject keys are kept as the 16 bytes they are hashes of (formatted
/// as hex where a string is needed: `Session::handle`, `Session::subject`, a store write), and
/// the issuer, subject, user agent, ID token and refresh token share one allocation (`strings`).
/// `Session::full_data` puts the [`SessionData`] back together for a refresh or a logout.
pub struct Session {
    /// Public handle (also the store key), as bytes: see [`Session::handle`].
    handle: [u8; 16],
    /// [`subject_key`] of the issuer and subject, as bytes: see [`Session::subject`].
    subject: [u8; 16],
    /// [`subject_key`] of `("sid", provider session)`, as bytes (written back on an update).
    idp_sid: Option<[u8; 16]>,
    /// Which issuer made the session.
    issuer: crate::auth::issuer::IssuerKind,
    pub(crate) version: u64,
    pub(crate) created_at: u64,
    pub(crate) absolute_expires_at: u64,
    /// Unix seconds at which the access token expires.
    pub(crate) access_expires_at: u64,
    /// Unix seconds at which the access token was received.
    pub(crate) access_issued_at: u64,
    /// The ID token's claims (`roles` drives route policy).
    claims: claims::Claims,
    /// `Bearer <access token>`, ready to inject (marked sensitive): the one copy of the access
    /// token a session keeps.
    pub(crate) bearer: HeaderValue,
    /// The issuer, the subject, the user agent, the ID token and the refresh token, in that order,
    /// then their lengths (each a little-endian u32; [`ABSENT`]: none): one allocation, not five.
    strings: Box<[u8]>,
    /// When the access token expires, on the monotonic clock: set when the tokens arrive (or the
    /// session is loaded), from their remaining lifetime.
    pub(crate) access_deadline: Instant,
    /// Last request seen (Unix seconds), kept in memory; written to the store at most once per
    /// `session.touch_interval`.
    last_seen: AtomicU64,
    /// When this copy was read from (or written to) the store: a cached copy is served without
    /// asking the store for `session.cache.ttl` after it.
    read_at: Instant,
    /// The cookie's characters this copy was verified for: the same cookie again needs no second
    /// MAC and no decoding. The record key is derived from them when a write needs it
    /// ([`Session::ticket`]), not kept beside them.
    ticket: Secret<ticket::Encoded>,
}

/// The strings of [`Session::strings`], by position.
const ISS: usize = 0;
const SUB: usize = 1;
const USER_AGENT: usize = 2;
const ID_TOKEN: usize = 3;
const REFRESH_TOKEN: usize = 4;
const STRINGS: usize = 5;
/// In [`Session::strings`], the length of a string the session does not have.
const ABSENT: u32 = u32::MAX;

/// [`Session::strings`] of these strings (`None`: absent).
fn pack_strings(strings: [Option<&str>; STRINGS]) -> Box<[u8]> {
    let len: usize = strings.iter().flatten().map(|s| s.len()).sum();
    let mut buf = Vec::with_capacity(len + 4 * STRINGS);
    for s in strings.iter().flatten() {
        buf.extend_from_slice(s.as_bytes());
    }
    for s in strings {
        // A string of 4 GiB cannot have arrived in an HTTP message.
        let n = s.map_or(ABSENT, |s| u32::try_from(s.len()).unwrap_or(ABSENT));
        buf.extend_from_slice(&n.to_le_bytes());
    }
    buf.into_boxed_slice()
}

/// A 16-byte hash (a handle, a subject key) as the 32 lowercase hex digits the store and the API
/// name it by, formatted on the stack.
#[derive(Clone, Copy)]
pub(crate) struct Hex([u8; 32]);

impl Hex {
    fn of(bytes: &[u8; 16]) -> Hex {
        let mut out = [0u8; 32];
        secret::hex_into(bytes, &mut out);
        Hex(out)
    }

    pub(crate) fn as_str(&self) -> &str {
        // Hex digits only: always UTF-8.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::ops::Deref for Hex {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Display for Hex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Session {
    /// Whether the access token is still valid (monotonic clock).
    pub(crate) fn token_valid(&self) -> bool {
        Instant::now() < self.access_deadline
    }

    /// When the session ends if idle from now on.
    pub(crate) fn idle_expires_at(&self, idle: Duration) -> u64 {
        (self.last_seen.load(Ordering::Relaxed) + idle.as_secs()).min(self.absolute_expires_at)
    }
}

/// The result of looking a request's cookie up.
pub enum Lookup {
    /// No cookie, or one that fails verification.
    None,
    /// A genuine ticket whose session has ended (timeout, logout, revoked).
    Ended,
    /// A live session.
    Live(Arc<Session>),
}

/// What [`Sessions::probe`] finds without waiting.
pub(crate) enum Probe {
    /// The answer: no session, an ended one, or a live cached copy.
    Found(Lookup),
    /// A genuine ticket whose session the cache cannot answer for: [`Sessions::resolve`].
    Miss(Miss),
}

/// A cache miss (or a cached copy too old to serve alone), to complete from the store.
pub(crate) struct Miss {
    /// The cookie's characters, verified (by the MAC, or equal to the cached copy's).
    value: Secret<ticket::Encoded>,
    /// The ticket the MAC check made; `None` when the value is the cached copy's own.
    ticket: Option<Ticket>,
    key: [u8; 16],
    /// The copy too old to serve alone: it still serves while the store is down.
    cached: Option<Arc<Session>>,
    now: u64,
}

/// The session manager: ticket, cache and store.
pub struct Sessions {
    /// Swapped whole when a reload adds or retires a key (`session.keys`).
    keys: ArcSwap<Keys>,
    pub(crate) cookie: CookieSpec,
    store: Arc<Backend>,
    metrics: Arc<Metrics>,
    cache: SessionCache,
    /// Sessions ended recently (here or on another instance): a load that raced the end must not
    /// put them back in the cache.
    ended: moka::sync::Cache<[u8; 16], (), HandleHash>,
    /// Whether this instance hears every event (false while the subscription is down).
    told: AtomicBool,
    /// `/bff/events` streams waiting for their session to end, by session.
    watchers: std::sync::Mutex<HashMap<[u8; 16], watch::Sender<Option<EndReason>>>>,
    /// Open `/bff/events` streams on this instance.
    streams: AtomicUsize,
    pub(crate) idle: Duration,
    pub(crate) absolute: Duration,
    touch_interval: Duration,
    /// How the key of a record this process writes is derived (`session.record_key`).
    record_key: RecordKey,
}

/// Hashes a cache key, a handle: its first eight bytes, which are already the output of SHA-256
/// (the handle is a hash of the ticket id), so no second keyed hash (SipHash) is needed. Only the
/// handles of tickets coatcheck issued are ever inserted (a presented ticket is verified before its
/// session is cached), so a client cannot fill a bucket by choosing handles.
#[derive(Clone, Copy, Default)]
pub(crate) struct HandleHash;

impl std::hash::BuildHasher for HandleHash {
    type Hasher = HandleHasher;

    fn build_hasher(&self) -> HandleHasher {
        HandleHasher(0)
    }
}

/// See [`HandleHash`]: folds the bytes it is given (a handle's, after its length) into 64 bits.
pub(crate) struct HandleHasher(u64);

impl std::hash::Hasher for HandleHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut word = [0u8; 8];
        for chunk in bytes.chunks(8) {
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(29) ^ u64::from_le_bytes(word);
        }
    }

    fn write_usize(&mut self, _len: usize) {
        // The length prefix of a 16-byte key: the same for every key.
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Decrypts a record's sealed data with the session's ticket ([`Ticket::open_record`]) and
/// decodes it into the session's data and its bearer (`None`: altered, another ticket's, or a
/// payload that does not decode). The access token goes from the plaintext straight into the
/// bearer.
fn open_record(ticket: &Ticket, record: &Record) -> Option<(SessionData, HeaderValue)> {
    let plain = ticket.open_record(&record.handle, &record.sealed)?;
    let (data, access_token) = SessionData::decode_parts(&plain)?;
    Some((data, bearer(access_token.as_bytes())))
}

/// `Authorization: Bearer <token>` (RFC 6750 §2.1), marked sensitive: built in place, the one
/// copy of the token a session keeps (no formatted string copied once more).
fn bearer(token: &[u8]) -> HeaderValue {
    let mut value = Vec::with_capacity(BEARER.len() + token.len());
    value.extend_from_slice(BEARER);
    value.extend_from_slice(token);
    let mut bearer = HeaderValue::from_maybe_shared(bytes::Bytes::from(value))
        .unwrap_or(HeaderValue::from_static("Bearer invalid"));
    bearer.set_sensitive(true);
    bearer
}

/// Hash identifying a user across their sessions (issuer + subject).
pub fn subject_key(iss: &str, sub: &str) -> String {
    secret::hex(&secret::sha256(format!("coatcheck subject v1\0{iss}\0{sub}").as_bytes())[..16])
}

/// The cache key of a public handle (32 lowercase or uppercase hex digits); `None` otherwise. On
/// every cache miss (the session is remembered by it), so it decodes nibbles directly.
fn handle_bytes(handle: &str) -> Option<[u8; 16]> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let hex: &[u8; 32] = handle.as_bytes().try_into().ok()?;
    let mut out = [0u8; 16];
    for (o, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *o = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

impl Sessions {
    /// Opens the configured store and builds the cache, with metrics of its own.
    pub fn new(cfg: &config::Session) -> Result<Sessions, StoreError> {
        Self::with_metrics(cfg, Arc::new(Metrics::default()))
    }

    /// Opens the configured store and builds the cache; cache and store activity go to `metrics`.
    pub(crate) fn with_metrics(
        cfg: &config::Session,
        metrics: Arc<Metrics>,
    ) -> Result<Sessions, StoreError> {
        let store = match &cfg.store {
            StoreKind::Memory => AnyStore::Memory(store::memory::MemoryStore::default()),
            StoreKind::Embedded { path } => {
                AnyStore::Embedded(store::embedded::EmbeddedStore::open(path)?)
            }
            StoreKind::Redis(settings) => AnyStore::Redis(store::redis::RedisStore::new(settings)?),
        };
        // Entries stay in memory past their freshness so they can be served during a store outage.
        // (`session.cache.ttl` may change on reload: a longer one than at start-up is still
        // evicted at start-up's ttl plus the grace, which costs a store read, never a logout.)
        let keep = cfg.cache_ttl + OUTAGE_GRACE;
        Ok(Sessions {
            keys: ArcSwap::from_pointee(Keys::new(&cfg.keys)),
            cookie: CookieSpec {
                name: cfg.cookie_name.clone(),
                same_site: cfg.same_site,
                max_age: cfg.persistent.then_some(cfg.absolute_timeout.as_secs()),
            },
            store: Arc::new(Backend::new(store, metrics.clone())),
            metrics,
            cache: SessionCache::new(cfg.cache_capacity, keep),
            ended: moka::sync::Cache::builder()
                .max_capacity(cfg.cache_capacity.max(1000))
                .time_to_live(keep)
                .build_with_hasher(HandleHash),
            told: AtomicBool::new(true),
            watchers: std::sync::Mutex::default(),
            streams: AtomicUsize::new(0),
            idle: cfg.idle_timeout,
            absolute: cfg.absolute_timeout,
            touch_interval: cfg.touch_interval,
            record_key: cfg.record_key,
        })
    }

    /// The keys in force (login cookies use them too).
    pub(crate) fn keys(&self) -> arc_swap::Guard<Arc<Keys>> {
        self.keys.load()
    }

    /// Puts a new `session.keys` in force (reload): the first signs new tickets and login cookies
    /// from now on; cookies signed under a key no longer listed stop verifying.
    pub(crate) fn set_keys(&self, configured: &[Secret<Vec<u8>>]) {
        self.keys.store(Arc::new(Keys::new(configured)));
        // Cached copies remember the tickets they were verified for under the old keys: every
        // cookie is verified again (a store read each, never a logout).
        self.cache.invalidate_all();
    }

    /// Whether the store answers.
    pub(crate) async fn ping(&self) -> Result<(), StoreError> {
        self.store.ping().await
    }

    /// The store's once-set, lease and event channel (for `auth`).
    pub(crate) fn backend(&self) -> &Arc<Backend> {
        &self.store
    }

    /// Looks up the session named by the request's cookie; a cached copy read from the store less
    /// than `cache_ttl` ago (`session.cache.ttl`, reloadable, so passed in) is served as it is.
    pub async fn lookup(&self, headers: &HeaderMap, cache_ttl: Duration) -> Result<Lookup, Error> {
        match self.probe(headers, cache_ttl, None, Instant::now()) {
            Probe::Found(found) => Ok(found),
            // Boxed: the miss path's future (store read, idle-clock write, cache insert) is larger
            // than everything else in a request; inline, every cache hit's future would carry it.
            Probe::Miss(miss) => Box::pin(self.resolve(miss, cache_ttl)).await,
        }
    }

    /// The part of [`Sessions::lookup`] that never waits: the cookie checked, and the cached copy
    /// served if it may be; a [`Miss`] for [`Sessions::resolve`] to read from the store otherwise.
    /// `memo` is the client connection's ([`ConnectionMemo`]), where there is one; `at` is the
    /// caller's reading of the clock.
    pub(crate) fn probe(
        &self,
        headers: &HeaderMap,
        cache_ttl: Duration,
        memo: Option<&ConnectionMemo>,
        at: Instant,
    ) -> Probe {
        let Some(value) = headers::cookie_bytes(headers, &self.cookie.name) else {
            return Probe::Found(Lookup::None);
        };
        let Some(presented) = Presented::of(value) else {
            return Probe::Found(Lookup::None);
        };
        let Some((key, kept)) = presented.lookup(memo) else {
            return Probe::Found(Lookup::None);
        };
        let epoch = self.cache.epoch();
        let cached = match kept {
            // Nothing in the cache changed since the connection kept it: what a get would answer.
            Some((s, at_epoch)) if at_epoch == epoch => Some(s),
            _ => {
                let cached = self.cache.get(&key);
                if let (Some(m), Some(s)) = (memo, &cached) {
                    m.keep(&key, (s.clone(), epoch));
                }
                cached
            }
        };
        // A cached copy was verified for exactly these characters, or the MAC decides (before
        // any store lookup).
        let verified = cached
            .as_ref()
            .is_some_and(|s| presented.is(s.ticket.expose()));
        let ticket = if verified {
            None
        } else {
            match presented.verify(&self.keys.load()) {
                Some(ticket) => Some(ticket),
                None => return Probe::Found(Lookup::None),
            }
        };
        let now = now();
        let cached = match cached {
            Some(s) if now >= s.idle_expires_at(self.idle) => {
                self.cache.invalidate(&key);
                return Probe::Found(Lookup::Ended);
            }
            // The hot path: a fresh copy on an instance that hears every event.
            Some(s)
                if self.told.load(Ordering::Acquire)
                    && at.saturating_duration_since(s.read_at) < cache_ttl =>
            {
                s.last_seen.fetch_max(now, Ordering::Relaxed);
                self.metrics.cache_hits.inc();
                crate::trace::note_cache(true);
                return Probe::Found(Lookup::Live(s));
            }
            other => other,
        };
        self.metrics.cache_misses.inc();
        crate::trace::note_cache(false);
        Probe::Miss(Miss {
            value: Secret::new(presented.encoded()),
            ticket,
            key,
            cached,
            now,
        })
    }

    /// The rest of a lookup the cache could not answer: the record from the store; while the store
    /// is down, a copy read recently enough.
    pub(crate) async fn resolve(&self, miss: Miss, cache_ttl: Duration) -> Result<Lookup, Error> {
        let Miss {
            value,
            ticket,
            key,
            cached,
            now,
        } = miss;
        match self.load(&value, ticket, key, now).await {
            Ok(found) => Ok(found),
            // Nobody is logged out because the store is down: a copy read recently enough serves.
            Err(e) => match cached {
                Some(s) if s.read_at.elapsed() < cache_ttl + OUTAGE_GRACE => {
                    tracing::warn!(session = %s.handle(), error = %e, "session store unavailable; serving the cached session");
                    s.last_seen.fetch_max(now, Ordering::Relaxed);
                    Ok(Lookup::Live(s))
                }
                _ => Err(e.into()),
            },
        }
    }

    /// A cache miss: the record from the store, opened with the ticket's key (`ticket`: the one
    /// the MAC check made, `None` when the value is a cached copy's own).
    async fn load(
        &self,
        value: &Secret<ticket::Encoded>,
        ticket: Option<Ticket>,
        key: [u8; 16],
        now: u64,
    ) -> Result<Lookup, StoreError> {
        let handle = Hex::of(&key);
        let Some(record) = self.store.load(&handle, now).await? else {
            self.cache.invalidate(&key);
            return Ok(Lookup::Ended);
        };
        let ticket = ticket.unwrap_or_else(|| ticket::of_verified(value.expose()));
        let Some((data, bearer)) = open_record(&ticket, &record) else {
            tracing::warn!(session = %handle, "a session record did not decrypt with its ticket or did not decode; treating it as ended");
            return Ok(Lookup::Ended);
        };
        let last_seen = record.last_seen;
        let absolute_expires_at = record.absolute_expires_at;
        let Some(session) = Session::from_parts(record, data, bearer, value.clone()) else {
            tracing::warn!(session = %handle, "a session record names no valid subject; treating it as ended");
            return Ok(Lookup::Ended);
        };
        if now.saturating_sub(last_seen) >= self.touch_interval.as_secs() {
            let idle_expires_at = (now + self.idle.as_secs()).min(absolute_expires_at);
            // A failed idle-clock write never fails a read: the next miss tries again.
            match self.store.touch(&handle, now, idle_expires_at).await {
                Ok(()) => session.last_seen.store(now, Ordering::Relaxed),
                Err(e) => {
                    tracing::warn!(session = %handle, error = %e, "could not record session activity; will retry")
                }
            }
        }
        Ok(match self.remember(session).await {
            Some(s) => Lookup::Live(s),
            None => Lookup::Ended,
        })
    }

    /// Puts a session in the cache (the one place that does). `None` if the session ended while
    /// it was being read: then it is not cached.
    async fn remember(&self, session: Session) -> Option<Arc<Session>> {
        let session = Arc::new(session);
        let key = session.handle;
        if self.cache.is_enabled() {
            self.cache.insert(key, session.clone());
        }
        // Checked after the insert: an end announced in between is seen here, and one announced
        // later evicts the entry we just inserted.
        if self.ended.contains_key(&key) {
            self.cache.invalidate(&key);
            return None;
        }
        Some(session)
    }

    /// Drops a session from this instance's cache and remembers that it ended (a load racing the
    /// end will not put it back).
    async fn evict_ended(&self, handle: &str) -> Option<[u8; 16]> {
        let k = handle_bytes(handle)?;
        self.ended.insert(k, ());
        self.cache.invalidate(&k);
        Some(k)
    }

    /// [`Sessions::evict_ended`], and tells the streams that wait for the session.
    async fn forget_ended(&self, handle: &str, reason: EndReason) {
        if let Some(k) = self.evict_ended(handle).await {
            let waiting = self.lock_watchers().remove(&k);
            if let Some(tx) = waiting {
                let _ = tx.send(Some(reason));
            }
        }
    }

    fn lock_watchers(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<[u8; 16], watch::Sender<Option<EndReason>>>> {
        self.watchers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a stream that waits for `session` to end (on any instance). `None` when this
    /// session or this instance has as many streams open as allowed.
    pub(crate) fn watch_end(self: &Arc<Self>, session: &Session) -> Option<EndWatch> {
        let key = session.handle;
        if self.streams.fetch_add(1, Ordering::AcqRel) >= MAX_STREAMS {
            self.streams.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let rx = {
            let mut w = self.lock_watchers();
            let tx = w.entry(key).or_insert_with(|| watch::channel(None).0);
            (tx.receiver_count() < MAX_STREAMS_PER_SESSION).then(|| tx.subscribe())
        };
        let Some(rx) = rx else {
            self.streams.fetch_sub(1, Ordering::AcqRel);
            return None;
        };
        Some(EndWatch {
            rx,
            key,
            sessions: self.clone(),
        })
    }

    /// Why the session has ended, as far as this instance knows without asking the store:
    /// its idle or absolute timeout passed, or its end was announced before a stream registered.
    pub(crate) async fn ended_by_now(&self, session: &Session, now: u64) -> Option<EndReason> {
        let key = session.handle;
        if self.ended.contains_key(&key) {
            return Some(EndReason::Revoked);
        }
        // The cached copy sees the requests of every tab; an uncached session was idle here.
        let latest = self.cache.get(&key);
        let s = latest.as_deref().unwrap_or(session);
        (now >= s.idle_expires_at(self.idle)).then_some(EndReason::Expired)
    }

    /// Applies an event from any instance (this one included) to the cache.
    pub(crate) async fn apply(&self, event: Event) {
        match event {
            Event::Changed { handle, version } => {
                // Not in the cache (evicted for room) is treated as older: a client connection may
                // still keep a copy, and the invalidation's epoch lets it go.
                if let Some(k) = handle_bytes(&handle)
                    && self.cache.get(&k).is_none_or(|s| s.version < version)
                {
                    self.cache.invalidate(&k);
                }
            }
            Event::Ended { handle, reason } => self.forget_ended(&handle, reason).await,
            Event::Released { .. } => {}
            Event::Lost => {
                tracing::warn!(
                    "session event subscription lost; checking cached sessions against the store until it is back"
                );
                self.told.store(false, Ordering::Release);
            }
            Event::Resumed => {
                // Whatever was missed meanwhile: start from the store.
                self.cache.invalidate_all();
                self.told.store(true, Ordering::Release);
                tracing::info!("session event subscription resumed; cache flushed");
            }
        }
    }

    /// Follows the event channel until `shutdown`; run once per process.
    pub(crate) async fn follow_events(
        self: Arc<Self>,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let mut rx = self.store.subscribe();
        loop {
            let event = tokio::select! {
                e = rx.recv() => e,
                _ = shutdown.cancelled() => return,
            };
            match event {
                Ok(e) => self.apply(e).await,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(
                        missed = n,
                        "session events arrived faster than handled; cache flushed"
                    );
                    self.cache.invalidate_all();
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// Tells every instance (best effort: the change itself is already in the store, and other
    /// instances' copies expire after `session.cache.ttl` at the latest).
    async fn announce(&self, event: Event) {
        if let Err(e) = self.store.publish(&event).await {
            tracing::warn!(error = %e, "could not announce a session change to other instances");
        }
    }

    /// Creates a new session (always a new ticket: no fixation). Returns the cookie value.
    pub async fn create(
        &self,
        data: SessionData,
        user_agent: Option<&HeaderValue>,
        idp_sid: Option<&str>,
    ) -> Result<(Secret, Arc<Session>), Error> {
        let ticket = Ticket::generate();
        let handle = ticket.handle();
        let now = now();
        let sealed = ticket.seal_record(self.record_key, &handle, &data.encode());
        let ua = user_agent.and_then(|v| v.to_str().ok()).unwrap_or("");
        let record = Record {
            handle: handle.clone(),
            subject: subject_key(&data.iss, &data.sub),
            version: 1,
            created_at: now,
            last_seen: now,
            idle_expires_at: now + self.idle.as_secs().min(self.absolute.as_secs()),
            absolute_expires_at: now + self.absolute.as_secs(),
            // The first MAX_USER_AGENT characters, copied once at their length.
            user_agent: ua[..ua
                .char_indices()
                .nth(MAX_USER_AGENT)
                .map_or(ua.len(), |(i, _)| i)]
                .to_owned(),
            idp_sid: idp_sid.map(|s| subject_key("sid", s)),
            sealed,
        };
        self.store.create(record.clone()).await?;
        let encoded = ticket::encode(&ticket.signed(&self.keys.load()));
        let bearer = bearer(data.access_token.expose().as_bytes());
        let session = Session::from_parts(record, data, bearer, Secret::new(encoded))
            .ok_or_else(|| Error::internal("a new session's record names no valid subject"))?;
        let session = self
            .remember(session)
            .await
            .ok_or_else(|| Error::internal("a new session was ended before it was created"))?;
        Ok((ticket::cookie_value(&encoded), session))
    }

    /// Replaces a session's data if nobody else changed it since `current` was read
    /// (compare-and-set on the version). `Ok(None)` if it changed or is gone.
    ///
    /// If the store is unreachable the new data is not lost (it may hold a rotated refresh token
    /// that the provider will not accept twice): it is served from this instance's cache and the
    /// write is retried in the background.
    pub(crate) async fn update(
        &self,
        current: &Session,
        data: SessionData,
    ) -> Result<Option<Arc<Session>>, Error> {
        let handle = current.handle();
        let sealed = current
            .ticket()
            .seal_record(self.record_key, &handle, &data.encode());
        let last_seen = current.last_seen.load(Ordering::Relaxed);
        let record = Record {
            handle: handle.to_string(),
            subject: current.subject().to_string(),
            version: current.version + 1,
            created_at: current.created_at,
            last_seen,
            idle_expires_at: (last_seen + self.idle.as_secs()).min(current.absolute_expires_at),
            absolute_expires_at: current.absolute_expires_at,
            user_agent: current.user_agent().to_owned(),
            idp_sid: current.idp_sid.as_ref().map(|sid| Hex::of(sid).to_string()),
            sealed,
        };
        match self.store.save(record.clone(), current.version).await {
            Ok(true) => {}
            Ok(false) => return Ok(None),
            Err(e) => {
                tracing::warn!(session = %handle, error = %e, "could not save refreshed tokens; serving them from memory and retrying the write");
                self.retry_save(record.clone(), current.version);
            }
        }
        let version = record.version;
        let bearer = bearer(data.access_token.expose().as_bytes());
        let updated = match Session::from_parts(record, data, bearer, current.ticket.clone()) {
            Some(session) => self.remember(session).await,
            None => None,
        };
        self.announce(Event::Changed {
            handle: handle.to_string(),
            version,
        })
        .await;
        Ok(updated)
    }

    /// Retries a compare-and-set that failed because the store was unreachable.
    fn retry_save(&self, record: Record, expected_version: u64) {
        let store = self.store.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            while started.elapsed() < RETRY_SAVE_FOR {
                tokio::time::sleep(RETRY_SAVE_EVERY).await;
                let version = record.version;
                let handle = record.handle.clone();
                match store.save(record.clone(), expected_version).await {
                    Ok(saved) => {
                        tracing::info!(session = %handle, saved, "delayed session write finished");
                        if saved {
                            let _ = store.publish(&Event::Changed { handle, version }).await;
                        }
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(session = %handle, error = %e, "delayed session write failed; retrying")
                    }
                }
            }
            tracing::error!(session = %record.handle, "gave up writing refreshed tokens to the session store");
        });
    }

    /// Reloads a session from the store (after a lost compare-and-set), bypassing the cache.
    pub(crate) async fn reload(&self, current: &Session) -> Result<Option<Arc<Session>>, Error> {
        let handle = current.handle();
        let Some(record) = self.store.load(&handle, now()).await? else {
            self.evict(&handle).await;
            return Ok(None);
        };
        let (data, bearer) = open_record(&current.ticket(), &record)
            .ok_or_else(|| Error::internal("session record no longer decrypts"))?;
        let session = Session::from_parts(record, data, bearer, current.ticket.clone())
            .ok_or_else(|| Error::internal("session record names no valid subject"))?;
        Ok(self.remember(session).await)
    }

    /// Ends one session: deleted from the store, dropped from every instance's cache.
    pub(crate) async fn delete(
        &self,
        handle: &str,
        reason: EndReason,
    ) -> Result<Option<Record>, Error> {
        // The cache first: a request racing the delete must not be served meanwhile.
        self.evict_ended(handle).await;
        let gone = self.store.delete(handle).await?;
        self.announce_ended(std::slice::from_ref(&handle.to_owned()), reason)
            .await;
        Ok(gone)
    }

    /// Ends every session of a subject (by its [`subject_key`]).
    pub(crate) async fn delete_subject(
        &self,
        subject: &str,
        reason: EndReason,
    ) -> Result<usize, Error> {
        let handles = self.store.delete_subject(subject).await?;
        self.announce_ended(&handles, reason).await;
        Ok(handles.len())
    }

    /// Ends every session of a provider session (by the [`subject_key`] of `("sid", sid)`).
    pub(crate) async fn delete_idp_session(
        &self,
        idp_sid: &str,
        reason: EndReason,
    ) -> Result<usize, Error> {
        let handles = self.store.delete_idp_session(idp_sid).await?;
        self.announce_ended(&handles, reason).await;
        Ok(handles.len())
    }

    async fn announce_ended(&self, handles: &[String], reason: EndReason) {
        for handle in handles {
            self.forget_ended(handle, reason).await;
            self.announce(Event::Ended {
                handle: handle.clone(),
                reason,
            })
            .await;
        }
    }

    /// The live sessions of a subject.
    pub(crate) async fn list(&self, subject: &str) -> Result<Vec<Record>, Error> {
        Ok(self.store.list_subject(subject, now()).await?)
    }

    async fn evict(&self, handle: &str) {
        if let Some(k) = handle_bytes(handle) {
            self.cache.invalidate(&k);
        }
    }

    /// Removes expired records from the store; run periodically.
    pub(crate) async fn sweep(&self) -> Result<usize, StoreError> {
        self.store.sweep(now()).await
    }

    /// Sessions held in the cache (approximate).
    pub fn cached(&self) -> u64 {
        self.cache.entry_count()
    }

    /// Sessions held in the cache, after the cache's pending bookkeeping (for metrics scrapes).
    pub(crate) async fn cached_now(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }

    /// The `Set-Cookie` header value for `value`.
    pub(crate) fn set_cookie(&self, value: &Secret) -> HeaderValue {
        self.cookie.set(value)
    }

    /// The `Set-Cookie` header value that clears the session cookie.
    pub(crate) fn clear_cookie(&self) -> HeaderValue {
        self.cookie.clear()
    }

    /// Extracts the `User-Agent` header.
    pub(crate) fn user_agent(headers: &HeaderMap) -> Option<&HeaderValue> {
        headers.get(header::USER_AGENT)
    }
}

/// A stream's registration with [`Sessions::watch_end`]; unregisters when dropped.
pub(crate) struct EndWatch {
    rx: watch::Receiver<Option<EndReason>>,
    key: [u8; 16],
    sessions: Arc<Sessions>,
}

impl EndWatch {
    /// Resolves with the reason once the session has ended.
    pub(crate) async fn ended(&mut self) -> EndReason {
        loop {
            if let Some(r) = *self.rx.borrow_and_update() {
                return r;
            }
            if self.rx.changed().await.is_err() {
                // The sender was dropped without a reason: cannot happen while registered.
                std::future::pending::<()>().await;
            }
        }
    }
}

impl Drop for EndWatch {
    fn drop(&mut self) {
        self.sessions.streams.fetch_sub(1, Ordering::AcqRel);
        let mut w = self.sessions.lock_watchers();
        // Ours is the last receiver (it is dropped right after): nobody else waits here.
        if w.get(&self.key).is_some_and(|tx| tx.receiver_count() <= 1) {
            w.remove(&self.key);
        }
    }
}

/// What comes before the access token in `Authorization` (RFC 6750 §2.1).
const BEARER: &[u8] = b"Bearer ";

impl Session {
    /// The ticket this session was verified for, whose record key seals and opens its store
    /// record (on a write or a reload only: a read that finds it cached needs none).
    fn ticket(&self) -> Ticket {
        ticket::of_verified(self.ticket.expose())
    }

    /// A session of `record` and `data` whose access token is `bearer`'s ([`bearer`]; `data`'s
    /// own, if any, is dropped). `None` if the record's subject or provider session is not a
    /// [`subject_key`] (only coatcheck writes records: a garbled one).
    fn from_parts(
        record: Record,
        data: SessionData,
        bearer: HeaderValue,
        ticket: Secret<ticket::Encoded>,
    ) -> Option<Session> {
        let handle = handle_bytes(&record.handle)?;
        let subject = handle_bytes(&record.subject)?;
        let idp_sid = match &record.idp_sid {
            Some(sid) => Some(handle_bytes(sid)?),
            None => None,
        };
        let strings = pack_strings([
            Some(&data.iss),
            Some(&data.sub),
            Some(&record.user_agent),
            data.id_token.as_ref().map(|t| t.expose().as_str()),
            data.refresh_token.as_ref().map(|t| t.expose().as_str()),
        ]);
        let access_deadline =
            Instant::now() + Duration::from_secs(data.access_expires_at.saturating_sub(now()));
        Some(Session {
            handle,
            subject,
            idp_sid,
            issuer: data.issuer,
            version: record.version,
            created_at: record.created_at,
            absolute_expires_at: record.absolute_expires_at,
            access_expires_at: data.access_expires_at,
            access_issued_at: data.access_issued_at,
            claims: data.claims,
            bearer,
            strings,
            access_deadline,
            last_seen: AtomicU64::new(record.last_seen),
            read_at: Instant::now(),
            ticket,
        })
    }

    /// The public handle (32 lowercase hex digits; also the store key).
    pub(crate) fn handle(&self) -> Hex {
        Hex::of(&self.handle)
    }

    /// The [`subject_key`] of the session's issuer and subject (what the store lists it by).
    pub(crate) fn subject(&self) -> Hex {
        Hex::of(&self.subject)
    }

    /// Which issuer made the session.
    pub(crate) fn issuer(&self) -> crate::auth::issuer::IssuerKind {
        self.issuer
    }

    /// The ID token's claims (shown by `/bff/user`; `roles` drives route policy).
    pub(crate) fn claims(&self) -> &claims::Claims {
        &self.claims
    }

    /// The string at `which` ([`ISS`] …) of `strings`; `None` if absent.
    fn string(&self, which: usize) -> Option<&str> {
        let b = &self.strings[..];
        let lens = b.len().checked_sub(4 * STRINGS)?;
        let len = |i: usize| {
            let at = lens + 4 * i;
            let n = u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?);
            (n != ABSENT).then_some(n as usize)
        };
        let start = (0..which).filter_map(len).sum::<usize>();
        // Copied from `&str`s whole: always UTF-8.
        std::str::from_utf8(b.get(start..start + len(which)?)?).ok()
    }

    /// The issuer (`iss`) the session's subject belongs to.
    pub(crate) fn iss(&self) -> &str {
        self.string(ISS).unwrap_or_default()
    }

    /// The subject (`sub`) at the issuer.
    pub(crate) fn sub(&self) -> &str {
        self.string(SUB).unwrap_or_default()
    }

    /// The browser's `User-Agent` when the session was created (its first characters).
    fn user_agent(&self) -> &str {
        self.string(USER_AGENT).unwrap_or_default()
    }

    /// The refresh token (a copy), if the session has one.
    pub(crate) fn refresh_token(&self) -> Option<Secret> {
        self.string(REFRESH_TOKEN)
            .map(|t| Secret::new(t.to_owned()))
    }

    /// The session's data, tokens copied (but for the access token: it is left empty, the bearer
    /// holds it), for an issuer's refresh or logout.
    pub(crate) fn full_data(&self) -> SessionData {
        SessionData {
            iss: self.iss().to_owned(),
            sub: self.sub().to_owned(),
            claims: self.claims.clone(),
            issuer: self.issuer,
            id_token: self.string(ID_TOKEN).map(|t| Secret::new(t.to_owned())),
            access_token: Secret::default(),
            access_expires_at: self.access_expires_at,
            access_issued_at: self.access_issued_at,
            refresh_token: self.refresh_token(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(30);

    #[test]
    fn the_handle_hash_depends_on_every_byte_of_the_handle() {
        use std::hash::BuildHasher;
        let base = [0x5au8; 16];
        let h = HandleHash.hash_one(base);
        let mut seen = std::collections::HashSet::from([h]);
        for i in 0..16 {
            let mut k = base;
            k[i] ^= 1;
            assert!(
                seen.insert(HandleHash.hash_one(k)),
                "byte {i} did not change the hash"
            );
        }
    }

    fn cfg() -> config::Session {
        config::Session {
            cookie_name: "__Host-coatcheck".into(),
            same_site: config::SameSite::Strict,
            idle_timeout: Duration::from_secs(1800),
            absolute_timeout: Duration::from_secs(43200),
            persistent: false,
            touch_interval: Duration::from_secs(60),
            record_key: RecordKey::OneStep,
            keys: vec![Secret::new(vec![7u8; 32])],
            store: StoreKind::Memory,
            cache_capacity: 100,
            cache_ttl: Duration::from_secs(30),
        }
    }

    fn data() -> SessionData {
        SessionData {
            iss: "https://idp".into(),
            sub: "alice".into(),
            claims: Default::default(),
            issuer: Default::default(),
            id_token: Some(Secret::new("id".into())),
            access_token: Secret::new("at-secret".into()),
            access_expires_at: now() + 60,
            access_issued_at: now(),
            refresh_token: Some(Secret::new("rt".into())),
        }
    }

    fn cookie_headers(value: &Secret) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("other=1; __Host-coatcheck={}", value.expose()))
                .unwrap(),
        );
        h
    }

    #[tokio::test]
    async fn a_created_session_is_found_by_its_cookie_and_carries_the_bearer() {
        let s = Sessions::new(&cfg()).unwrap();
        let (value, created) = s.create(data(), None, None).await.unwrap();
        let Lookup::Live(found) = s.lookup(&cookie_headers(&value), TTL).await.unwrap() else {
            panic!("not found")
        };
        assert_eq!(found.handle().as_str(), created.handle().as_str());
        assert_eq!(found.bearer, "Bearer at-secret");
    }

    #[tokio::test]
    async fn a_cached_session_is_served_only_for_the_exact_cookie_it_was_verified_for() {
        let s = Sessions::new(&cfg()).unwrap();
        let (value, _) = s.create(data(), None, None).await.unwrap();
        assert!(matches!(
            s.lookup(&cookie_headers(&value), TTL).await.unwrap(),
            Lookup::Live(_)
        ));
        // Same id (so the same cache entry), another secret or MAC: the MAC decides, and fails.
        for at in [20, 40, 80] {
            let mut altered = value.expose().clone().into_bytes();
            altered[at] = if altered[at] == b'A' { b'B' } else { b'A' };
            let altered = Secret::new(String::from_utf8(altered).unwrap());
            assert!(
                matches!(
                    s.lookup(&cookie_headers(&altered), TTL).await.unwrap(),
                    Lookup::None
                ),
                "byte {at} altered"
            );
        }
        // A key retired by reload: the cached copy no longer vouches for the old cookie.
        s.set_keys(&[Secret::new(vec![8u8; 32])]);
        assert!(matches!(
            s.lookup(&cookie_headers(&value), TTL).await.unwrap(),
            Lookup::None
        ));
    }

    /// A lookup as a request on a client connection makes it (`memo`: the connection's).
    async fn lookup_on(s: &Sessions, value: &Secret, memo: &ConnectionMemo) -> Lookup {
        match s.probe(&cookie_headers(value), TTL, Some(memo), Instant::now()) {
            Probe::Found(found) => found,
            Probe::Miss(miss) => s.resolve(miss, TTL).await.unwrap(),
        }
    }

    #[tokio::test]
    async fn one_connections_handle_memo_finds_each_cookies_own_session_and_vouches_for_none() {
        let s = Sessions::new(&cfg()).unwrap();
        let (a, created_a) = s.create(data(), None, None).await.unwrap();
        let (b, created_b) = s.create(data(), None, None).await.unwrap();
        // A trusted proxy's connection carries several users' cookies, in any order.
        let memo = ConnectionMemo::default();
        for (value, created) in [
            (&a, &created_a),
            (&b, &created_b),
            (&b, &created_b),
            (&a, &created_a),
        ] {
            let Lookup::Live(found) = lookup_on(&s, value, &memo).await else {
                panic!("not found")
            };
            assert_eq!(found.handle().as_str(), created.handle().as_str());
        }
        // The memo holds `a`'s id characters: a value sharing them with another secret or MAC
        // gets `a`'s handle from it, and is still refused.
        for at in [24, 40, 85] {
            let mut altered = a.expose().clone().into_bytes();
            altered[at] = if altered[at] == b'A' { b'B' } else { b'A' };
            let altered = Secret::new(String::from_utf8(altered).unwrap());
            assert!(
                matches!(lookup_on(&s, &altered, &memo).await, Lookup::None),
                "byte {at} altered"
            );
        }
        assert!(matches!(lookup_on(&s, &a, &memo).await, Lookup::Live(_)));
    }

    #[tokio::test]
    async fn a_session_a_connection_kept_is_given_up_when_the_cache_changes() {
        let s = Sessions::new(&cfg()).unwrap();
        let (value, created) = s.create(data(), None, None).await.unwrap();
        let memo = ConnectionMemo::default();
        // Found in the cache: the connection keeps it, at the cache's epoch.
        let Lookup::Live(first) = lookup_on(&s, &value, &memo).await else {
            panic!("not found")
        };
        let (kept, epoch) = memo.kept().expect("kept");
        assert!(Arc::ptr_eq(&kept, &first) && epoch == s.cache.epoch());
        // Gone from the store: only the cache or the connection can answer now, and they do.
        s.store.delete(&created.handle()).await.unwrap();
        assert!(matches!(
            lookup_on(&s, &value, &memo).await,
            Lookup::Live(_)
        ));
        // A change of the record elsewhere (a refresh) drops the cached copy and moves the epoch:
        // the connection no longer answers with what it kept.
        s.apply(Event::Changed {
            handle: created.handle().to_string(),
            version: first.version + 1,
        })
        .await;
        assert_ne!(memo.kept().map(|(_, e)| e), Some(s.cache.epoch()));
        assert!(matches!(lookup_on(&s, &value, &memo).await, Lookup::Ended));
        // Ended on another instance while this connection holds a copy: refused on its next request.
        let (value, created) = s.create(data(), None, None).await.unwrap();
        for _ in 0..3 {
            assert!(matches!(
                lookup_on(&s, &value, &memo).await,
                Lookup::Live(_)
            ));
        }
        assert!(memo.kept().is_some_and(|(_, e)| e == s.cache.epoch()));
        s.apply(Event::Ended {
            handle: created.handle().to_string(),
            reason: EndReason::Logout,
        })
        .await;
        assert!(matches!(lookup_on(&s, &value, &memo).await, Lookup::Ended));
    }

    #[tokio::test]
    async fn a_change_to_a_session_evicted_for_room_still_reaches_the_connection_that_kept_it() {
        let s = Sessions::new(&cfg()).unwrap();
        let (value, created) = s.create(data(), None, None).await.unwrap();
        let memo = ConnectionMemo::default();
        let Lookup::Live(first) = lookup_on(&s, &value, &memo).await else {
            panic!("not found")
        };
        // Evicted for room: the connection still answers with its copy (nothing changed)…
        s.cache.evict_for_room(&first.handle);
        let Lookup::Live(again) = lookup_on(&s, &value, &memo).await else {
            panic!("not found")
        };
        assert!(Arc::ptr_eq(&again, &first));
        // …until the record changes elsewhere: then the store's copy is read.
        s.store.delete(&created.handle()).await.unwrap();
        s.apply(Event::Changed {
            handle: created.handle().to_string(),
            version: first.version + 1,
        })
        .await;
        assert!(matches!(lookup_on(&s, &value, &memo).await, Lookup::Ended));
    }

    #[tokio::test]
    async fn without_a_cache_a_connection_keeps_no_session() {
        let s = Sessions::new(&config::Session {
            cache_capacity: 0,
            ..cfg()
        })
        .unwrap();
        let (value, _) = s.create(data(), None, None).await.unwrap();
        let memo = ConnectionMemo::default();
        for _ in 0..2 {
            assert!(matches!(
                lookup_on(&s, &value, &memo).await,
                Lookup::Live(_)
            ));
        }
        assert!(memo.kept().is_none());
    }

    #[tokio::test]
    async fn the_store_record_holds_no_token_in_clear() {
        let s = Sessions::new(&cfg()).unwrap();
        let (_, created) = s.create(data(), None, None).await.unwrap();
        let AnyStore::Memory(m) = s.store.inner() else {
            unreachable!()
        };
        let rec = m.load(&created.handle(), now()).await.unwrap().unwrap();
        let json = serde_json::to_string(&rec).unwrap();
        assert!(
            !json.contains("at-secret") && !json.contains("alice"),
            "{json}"
        );
    }

    #[tokio::test]
    async fn the_user_agent_is_kept_to_its_first_characters_without_spare_capacity() {
        let s = Sessions::new(&cfg()).unwrap();
        for (ua, kept) in [
            (String::new(), String::new()),
            ("Mozilla/5.0".to_owned(), "Mozilla/5.0".to_owned()),
            ("x".repeat(300), "x".repeat(MAX_USER_AGENT)),
            ("a".repeat(MAX_USER_AGENT), "a".repeat(MAX_USER_AGENT)),
            // Not visible ASCII: not kept at all (as before).
            ("é".repeat(300), String::new()),
        ] {
            let value = HeaderValue::from_bytes(ua.as_bytes()).unwrap();
            let (_, created) = s.create(data(), Some(&value), None).await.unwrap();
            assert_eq!(created.user_agent(), kept);
            let stored = record_of(&s, &created.handle()).await;
            assert_eq!(stored.user_agent, kept);
        }
    }

    #[tokio::test]
    async fn a_session_gives_back_its_identity_and_tokens_whole_absent_and_empty_apart() {
        let s = Sessions::new(&cfg()).unwrap();
        let ua = HeaderValue::from_static("Mozilla/5.0 test");
        for (id_token, refresh_token) in [
            (Some("id.token.x"), Some("rt-é")),
            (None, Some("")),
            (Some(""), None),
            (None, None),
        ] {
            let mut d = data();
            d.claims = claims::Claims::new(&claims());
            d.id_token = id_token.map(|t| Secret::new(t.into()));
            d.refresh_token = refresh_token.map(|t| Secret::new(t.into()));
            let (value, created) = s.create(d.clone(), Some(&ua), Some("sid-1")).await.unwrap();
            s.cache.invalidate_all();
            let Lookup::Live(found) = s.lookup(&cookie_headers(&value), TTL).await.unwrap() else {
                panic!("not found")
            };
            for session in [&created, &found] {
                d.access_token = Secret::default();
                assert_same(&session.full_data(), &d);
                assert_eq!(session.iss(), "https://idp");
                assert_eq!(session.sub(), "alice");
                assert_eq!(session.user_agent(), "Mozilla/5.0 test");
                assert_eq!(
                    session
                        .refresh_token()
                        .map(|t| t.expose().clone())
                        .as_deref(),
                    refresh_token
                );
                assert_eq!(session.bearer, "Bearer at-secret");
                assert_eq!(
                    session.subject().as_str(),
                    subject_key("https://idp", "alice")
                );
            }
            // An update writes back what the cache kept of the record.
            let before = record_of(&s, &created.handle()).await;
            let updated = s.update(&found, found.full_data()).await.unwrap().unwrap();
            let after = record_of(&s, &updated.handle()).await;
            assert_eq!(after.handle, before.handle);
            assert_eq!(after.subject, before.subject);
            assert_eq!(after.user_agent, before.user_agent);
            assert_eq!(after.idp_sid, before.idp_sid);
            assert_eq!(after.idp_sid, Some(subject_key("sid", "sid-1")));
        }
    }

    #[test]
    fn a_cached_session_is_small() {
        // The struct of every cached session (its strings, claims and bearer are apart): it was
        // 432 bytes while handle and subject were hex strings and the tokens three `String`s; 272
        // while it kept the cookie's 64 decoded bytes instead of its 86 characters (which spare
        // every cache hit the decoding).
        assert!(
            std::mem::size_of::<Session>() <= 288,
            "{}",
            std::mem::size_of::<Session>()
        );
    }

    #[tokio::test]
    async fn a_deleted_session_has_ended_even_if_it_was_cached() {
        let s = Sessions::new(&cfg()).unwrap();
        let (value, created) = s.create(data(), None, None).await.unwrap();
        s.delete(&created.handle(), EndReason::Logout)
            .await
            .unwrap();
        assert!(matches!(
            s.lookup(&cookie_headers(&value), TTL).await.unwrap(),
            Lookup::Ended
        ));
    }

    #[tokio::test]
    async fn a_stale_update_loses_the_compare_and_set() {
        let s = Sessions::new(&cfg()).unwrap();
        let (_, v1) = s.create(data(), None, None).await.unwrap();
        let v2 = s
            .update(&v1, data())
            .await
            .unwrap()
            .expect("first update wins");
        assert_eq!(v2.version, 2);
        assert!(
            s.update(&v1, data()).await.unwrap().is_none(),
            "an update from stale state must lose"
        );
    }

    #[tokio::test]
    async fn an_end_announced_by_another_instance_evicts_the_cached_session() {
        let s = Sessions::new(&cfg()).unwrap();
        let (value, created) = s.create(data(), None, None).await.unwrap();
        // Another instance deleted the record and announced it; this cache still holds it.
        s.store.delete(&created.handle()).await.unwrap();
        assert!(matches!(
            s.lookup(&cookie_headers(&value), TTL).await.unwrap(),
            Lookup::Live(_)
        ));
        s.apply(Event::Ended {
            handle: created.handle().to_string(),
            reason: EndReason::Logout,
        })
        .await;
        assert!(matches!(
            s.lookup(&cookie_headers(&value), TTL).await.unwrap(),
            Lookup::Ended
        ));
    }

    #[tokio::test]
    async fn a_load_that_raced_an_end_is_not_cached() {
        let s = Sessions::new(&cfg()).unwrap();
        let (value, created) = s.create(data(), None, None).await.unwrap();
        s.cache.invalidate_all();
        // The end is announced while a request is between its store read and its cache insert.
        s.forget_ended(&created.handle(), EndReason::Logout).await;
        let Lookup::Ended = s.lookup(&cookie_headers(&value), TTL).await.unwrap() else {
            panic!("a session ended meanwhile must not be served or cached");
        };
        assert!(
            s.cache
                .get(&handle_bytes(&created.handle()).unwrap())
                .is_none()
        );
    }

    #[tokio::test]
    async fn while_events_are_lost_every_lookup_asks_the_store_and_resuming_flushes() {
        let s = Sessions::new(&cfg()).unwrap();
        let (value, created) = s.create(data(), None, None).await.unwrap();
        s.apply(Event::Lost).await;
        s.store.delete(&created.handle()).await.unwrap();
        assert!(
            matches!(
                s.lookup(&cookie_headers(&value), TTL).await.unwrap(),
                Lookup::Ended
            ),
            "a cache that may have missed events is not trusted"
        );
        let (value, created) = s.create(data(), None, None).await.unwrap();
        s.apply(Event::Resumed).await;
        s.cache.run_pending_tasks();
        assert_eq!(s.cached(), 0, "resuming flushes the cache");
        s.store.delete(&created.handle()).await.unwrap();
        assert!(matches!(
            s.lookup(&cookie_headers(&value), TTL).await.unwrap(),
            Lookup::Ended
        ));
    }

    #[tokio::test]
    async fn a_change_announced_for_an_older_copy_evicts_it_but_not_a_newer_one() {
        let s = Sessions::new(&cfg()).unwrap();
        let (_, v1) = s.create(data(), None, None).await.unwrap();
        let key = handle_bytes(&v1.handle()).unwrap();
        s.apply(Event::Changed {
            handle: v1.handle().to_string(),
            version: 1,
        })
        .await;
        assert!(s.cache.get(&key).is_some(), "same version: kept");
        s.apply(Event::Changed {
            handle: v1.handle().to_string(),
            version: 2,
        })
        .await;
        assert!(s.cache.get(&key).is_none(), "older copy: dropped");
    }

    fn claims() -> serde_json::Map<String, serde_json::Value> {
        let serde_json::Value::Object(m) = serde_json::json!({
            "iss": "https://idp", "sub": "alice", "aud": "coatcheck", "exp": 1_900_000_000u64,
            "name": "Alice Ünicode", "roles": ["admin", "user"], "nested": {"a": [1, 2.5, null]}
        }) else {
            unreachable!()
        };
        m
    }

    fn assert_same(a: &SessionData, b: &SessionData) {
        assert_eq!(
            serde_json::to_value(a).unwrap(),
            serde_json::to_value(b).unwrap()
        );
    }

    /// The embedded store's table, as the store names it (to plant records of older versions).
    const SESSIONS_TABLE: redb::TableDefinition<&str, &[u8]> =
        redb::TableDefinition::new("sessions_v1");

    fn embedded_cfg(name: &str) -> (config::Session, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!(
            "coatcheck-session-{name}-{}-{:?}.db",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_file(&path);
        let mut c = cfg();
        c.store = StoreKind::Embedded { path: path.clone() };
        c.cache_capacity = 0;
        (c, path)
    }

    /// Writes `bytes` as the stored record of `handle` in the embedded store file at `path`.
    fn plant(path: &std::path::Path, handle: &str, bytes: &[u8]) {
        let db = redb::Database::create(path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(SESSIONS_TABLE)
            .unwrap()
            .insert(handle, bytes)
            .unwrap();
        txn.commit().unwrap();
    }

    /// The record the store holds for `handle` (which must exist).
    async fn record_of(s: &Sessions, handle: &str) -> Record {
        s.store.load(handle, now()).await.unwrap().unwrap()
    }

    /// A record as a login at this moment stores it, with `sealed` as its payload.
    fn stored_record(handle: String, data: &SessionData, sealed: Vec<u8>) -> Record {
        let t = now();
        Record {
            handle,
            subject: subject_key(&data.iss, &data.sub),
            version: 1,
            created_at: t,
            last_seen: t,
            idle_expires_at: t + 1800,
            absolute_expires_at: t + 43200,
            user_agent: "old browser".into(),
            idp_sid: None,
            sealed,
        }
    }

    /// A record exactly as versions before the binary format wrote it: the record as JSON with the
    /// sealed payload in base64, the payload `SessionData` as JSON.
    fn legacy_record(ticket: &Ticket, data: &SessionData) -> Vec<u8> {
        let handle = ticket.handle();
        let sealed =
            ticket.seal_record(RecordKey::Hkdf, &handle, &serde_json::to_vec(data).unwrap());
        let json = serde_json::to_vec(&stored_record(handle, data, sealed)).unwrap();
        assert_eq!(json.first(), Some(&b'{'));
        json
    }

    #[tokio::test]
    async fn a_session_stored_in_the_old_json_format_still_opens_and_is_rewritten_in_binary() {
        let (c, path) = embedded_cfg("legacy");
        let ticket = Ticket::generate();
        let mut d = data();
        d.claims = claims::Claims::new(&claims());
        plant(&path, &ticket.handle(), &legacy_record(&ticket, &d));
        let s = Sessions::new(&c).unwrap();
        let cookie = ticket.encode(&s.keys());
        let Lookup::Live(found) = s.lookup(&cookie_headers(&cookie), TTL).await.unwrap() else {
            panic!("a record written by the JSON format must still open")
        };
        assert_eq!(found.bearer, "Bearer at-secret");
        assert_eq!(found.claims(), &d.claims);
        assert_eq!(found.refresh_token().unwrap().expose(), "rt");
        // A write (here a refresh) stores it in the binary format; it still opens.
        let updated = s.update(&found, d.clone()).await.unwrap().unwrap();
        let stored = record_of(&s, &updated.handle()).await;
        let (opened, bearer) = open_record(&updated.ticket(), &stored).unwrap();
        assert_eq!(bearer, "Bearer at-secret");
        assert_eq!(opened.claims, d.claims);
        let plain = updated
            .ticket()
            .open_record(&stored.handle, &stored.sealed)
            .unwrap();
        assert_same(&SessionData::decode(&plain).unwrap(), &d);
        assert_eq!(plain[0], DATA_V1, "new writes seal the binary payload");
        assert!(stored.sealed.starts_with(ticket::SEALED_V2));
        drop(s);
        std::fs::remove_file(path).ok();
    }

    #[tokio::test]
    async fn a_binary_record_sealed_under_the_previous_record_key_opens_and_a_write_reseals_it() {
        let (c, path) = embedded_cfg("hkdf");
        let ticket = Ticket::generate();
        let handle = ticket.handle();
        let d = data();
        let sealed = ticket.seal_record(RecordKey::Hkdf, &handle, &d.encode());
        let record = stored_record(handle.clone(), &d, sealed);
        plant(&path, &handle, &record.encode());
        let s = Sessions::new(&c).unwrap();
        let cookie = ticket.encode(&s.keys());
        let Lookup::Live(found) = s.lookup(&cookie_headers(&cookie), TTL).await.unwrap() else {
            panic!("a record sealed by the version before the one-step record key must open")
        };
        assert_eq!(found.bearer, "Bearer at-secret");
        let updated = s.update(&found, d.clone()).await.unwrap().unwrap();
        let stored = record_of(&s, &handle).await;
        assert!(stored.sealed.starts_with(ticket::SEALED_V2));
        let (_, bearer) = open_record(&updated.ticket(), &stored).unwrap();
        assert_eq!(bearer, "Bearer at-secret");
        let plain = ticket.open_record(&handle, &stored.sealed).unwrap();
        assert_same(&SessionData::decode(&plain).unwrap(), &d);
        drop(s);
        std::fs::remove_file(path).ok();
    }

    #[tokio::test]
    async fn with_record_key_hkdf_records_are_written_as_older_versions_read_them() {
        let s = Sessions::new(&config::Session {
            record_key: RecordKey::Hkdf,
            ..cfg()
        })
        .unwrap();
        let (_, created) = s.create(data(), None, None).await.unwrap();
        let updated = s.update(&created, data()).await.unwrap().unwrap();
        let stored = record_of(&s, &updated.handle()).await;
        assert!(!stored.sealed.starts_with(ticket::SEALED_V2));
        // What a version before the one-step key does: HKDF-SHA256 of the secret, the id as salt.
        let signed = {
            use base64::Engine as _;
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(created.ticket.expose())
                .unwrap()
        };
        let key = secret::derive_key(
            &signed[16..32],
            &signed[..16],
            b"coatcheck session record v1",
        );
        let plain = secret::open(&key, stored.handle.as_bytes(), &stored.sealed).unwrap();
        assert_same(&SessionData::decode(&plain).unwrap(), &data());
    }

    #[tokio::test]
    async fn a_garbled_or_truncated_stored_record_is_an_ended_session_not_a_panic_or_an_outage() {
        let (c, path) = embedded_cfg("garbled");
        let ticket = Ticket::generate();
        let t = now();
        let good = Record {
            handle: ticket.handle(),
            subject: "s".into(),
            version: 1,
            created_at: t,
            last_seen: t,
            idle_expires_at: t + 1800,
            absolute_expires_at: t + 43200,
            user_agent: String::new(),
            idp_sid: None,
            sealed: ticket.seal_record(RecordKey::OneStep, &ticket.handle(), &data().encode()),
        }
        .encode();
        let mut bad: Vec<Vec<u8>> = (0..good.len()).map(|n| good[..n].to_vec()).collect();
        bad.push([&good[..], b"x"].concat());
        bad.push(b"{not json".to_vec());
        bad.push(vec![0xff; 40]);
        for (i, bytes) in bad.iter().enumerate() {
            plant(&path, &ticket.handle(), bytes);
            let s = Sessions::new(&c).unwrap();
            let cookie = ticket.encode(&s.keys());
            let found = s.lookup(&cookie_headers(&cookie), TTL).await;
            assert!(
                matches!(found, Ok(Lookup::Ended)),
                "case {i} ({} bytes) must be an ended session",
                bytes.len()
            );
        }
        std::fs::remove_file(path).ok();
    }

    #[tokio::test]
    async fn a_sealed_payload_that_decrypts_but_does_not_decode_is_an_ended_session() {
        let s = Sessions::new(&cfg()).unwrap();
        let (value, created) = s.create(data(), None, None).await.unwrap();
        let good = data().encode();
        let payloads = [
            good[..good.len() / 2].to_vec(),
            [&good[..], &[0]].concat(),
            vec![DATA_V1, 0xff, 0xff, 0xff],
            b"{\"iss\": 1}".to_vec(),
            vec![],
        ];
        for p in payloads {
            let mut r = record_of(&s, &created.handle()).await;
            let version = r.version;
            r.version += 1;
            r.sealed = created
                .ticket()
                .seal_record(RecordKey::OneStep, &r.handle, &p);
            assert!(s.store.save(r, version).await.unwrap());
            s.cache.invalidate_all();
            assert!(matches!(
                s.lookup(&cookie_headers(&value), TTL).await.unwrap(),
                Lookup::Ended
            ));
        }
    }

    #[test]
    fn the_binary_session_data_is_smaller_than_the_json_and_opens_the_same() {
        let mut d = data();
        d.claims = claims::Claims::new(&claims());
        let bin = d.encode();
        let json = serde_json::to_vec(&d).unwrap();
        assert_eq!(bin[0], DATA_V1);
        assert_same(&SessionData::decode(&bin).unwrap(), &d);
        assert_same(&SessionData::decode(&json).unwrap(), &d);
        // The field names and quoting are gone: at least 100 bytes less for these fields.
        assert!(
            bin.len() + 100 <= json.len(),
            "{} vs {}",
            bin.len(),
            json.len()
        );
    }

    proptest::proptest! {
        #[test]
        fn session_data_round_trips_through_the_binary_encoding(
            iss in ".{0,40}", sub in ".{0,40}", capture: bool,
            claim in proptest::option::of((".{1,10}", ".{0,30}")),
            id_token in proptest::option::of(".{0,200}"), access in ".{0,300}",
            exp: u64, iat: u64, refresh in proptest::option::of(".{0,60}"),
        ) {
            let d = SessionData {
                iss, sub,
                claims: claims::Claims::new(&claim.into_iter().map(|(k, v)| (k, v.into())).collect()),
                issuer: if capture {
                    crate::auth::issuer::IssuerKind::Capture
                } else {
                    crate::auth::issuer::IssuerKind::Oidc
                },
                id_token: id_token.map(Secret::new),
                access_token: Secret::new(access),
                access_expires_at: exp,
                access_issued_at: iat,
                refresh_token: refresh.map(Secret::new),
            };
            let bin = d.encode();
            let (rest, token) = SessionData::decode_parts(&bin).expect("decodes");
            proptest::prop_assert_eq!(token.as_ref(), d.access_token.expose().as_str());
            proptest::prop_assert!(rest.access_token.expose().is_empty());
            let back = SessionData::decode(&bin).expect("decodes");
            proptest::prop_assert_eq!(
                serde_json::to_value(&back).unwrap(),
                serde_json::to_value(&d).unwrap()
            );
            // Every strict prefix is refused, never a panic.
            for n in 0..bin.len() {
                proptest::prop_assert!(SessionData::decode(&bin[..n]).is_none());
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_session_data_decoder(
            mut bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
            v1: bool,
        ) {
            if v1 && !bytes.is_empty() {
                bytes[0] = DATA_V1;
            }
            let _ = SessionData::decode(&bytes);
        }
    }

    #[test]
    fn handle_bytes_decodes_exactly_the_hex_handles() {
        let t = Ticket::generate();
        assert_eq!(handle_bytes(&t.handle()), Some(t.handle_bytes()));
        assert_eq!(
            handle_bytes(&t.handle().to_uppercase()),
            Some(t.handle_bytes())
        );
        for bad in [
            "",
            "0",
            &"0".repeat(31),
            &"0".repeat(33),
            &"g".repeat(32),
            &"é".repeat(16),
        ] {
            assert_eq!(handle_bytes(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn session_data_written_before_issuers_existed_still_opens_as_oidc() {
        let old = r#"{"iss":"https://idp","sub":"alice","claims":{},"id_token":"id-1",
            "access_token":"at","access_expires_at":1,"access_issued_at":0,"refresh_token":"rt"}"#;
        let d: SessionData = serde_json::from_str(old).unwrap();
        assert_eq!(d.issuer, crate::auth::issuer::IssuerKind::Oidc);
        assert_eq!(d.id_token.unwrap().expose(), "id-1");
        let none = old.replace(r#""id_token":"id-1","#, "");
        let d: SessionData = serde_json::from_str(&none).unwrap();
        assert!(d.id_token.is_none(), "the ID token is optional");
    }
}
