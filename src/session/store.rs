//! Session stores: small traits, one implementation per store kind, one conformance suite per
//! trait that every kind passes.
//!
//! - [`Store`]: the session [`Record`]s, keyed by the session's public handle (a hash of the ticket
//!   id), with indexes by subject and by provider session. The tokens and claims are in `sealed`,
//!   encrypted under a key only the cookie holder can derive; the rest is metadata needed to expire,
//!   list and revoke sessions without decrypting them. Expiry belongs to the store.
//! - [`OnceSet`]: "first use wins" with a time to live — a callback's `state`, a logout token's
//!   `jti`, a spent refresh token. With several instances, once across all of them.
//! - [`Lease`]: a short exclusive lease ("I am refreshing this session"); its release is announced
//!   as an [`Event::Released`] so waiters on every instance re-check at once.
//! - [`Events`]: the channel that tells every instance that a session changed or ended.
//!
//! `memory` and `embedded` coordinate within one process ([`local`]); `redis` across processes.
//!
//! Stored bytes are the compact binary encoding of `binary`: the embedded store keeps each
//! [`Record`] as [`Record::encode`]; Redis keeps the fields in a hash (its scripts read the numbers,
//! subject and sid as text) with `sealed` as raw bytes. Either way the sealed payload is
//! `SessionData::encode`d. JSON written by earlier versions still loads.

pub(crate) mod binary;
pub mod embedded;
pub mod local;
pub mod memory;
pub mod redis;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{BoxError, Error};
use crate::metrics::{Metrics, StoreOp};

/// One stored session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Public handle and store key (hash of the ticket id).
    pub handle: String,
    /// Hash of the session's issuer and subject (lists and revokes a user's sessions).
    pub subject: String,
    /// Bumped by every [`Store::save`]; compare-and-set guards refreshes.
    pub version: u64,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds; written at most once per `session.touch_interval`.
    pub last_seen: u64,
    /// Unix seconds: `last_seen + idle_timeout`.
    pub idle_expires_at: u64,
    /// Unix seconds: `created_at + absolute_timeout`; never extended.
    pub absolute_expires_at: u64,
    /// The browser's `User-Agent` at login (truncated), for the device list.
    pub user_agent: String,
    /// Hash of the provider's session id (`sid` claim), for back-channel logout.
    pub idp_sid: Option<String>,
    /// The encrypted session payload (tokens, claims).
    #[serde(with = "b64")]
    pub sealed: Vec<u8>,
}

impl Record {
    /// When the record stops being valid (Unix seconds).
    pub(crate) fn expires_at(&self) -> u64 {
        self.idle_expires_at.min(self.absolute_expires_at)
    }

    /// Whether the record is expired at `now` (Unix seconds).
    pub(crate) fn is_expired(&self, now: u64) -> bool {
        now >= self.expires_at()
    }

    /// The record's stored form: `RECORD_V1`, then `handle`, `subject` (length-prefixed),
    /// `version`, `created_at`, `last_seen`, `idle_expires_at`, `absolute_expires_at` (varints),
    /// `user_agent`, `idp_sid` (a presence byte, then the string), `sealed` (length-prefixed raw
    /// bytes). See `binary`.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = binary::Writer::new(
            RECORD_V1,
            binary::sized(self.handle.len())
                + binary::sized(self.subject.len())
                + 5 * 10
                + binary::sized(self.user_agent.len())
                + 1
                + binary::sized(self.idp_sid.as_ref().map_or(0, String::len))
                + binary::sized(self.sealed.len()),
        );
        w.bytes(self.handle.as_bytes())
            .bytes(self.subject.as_bytes())
            .uint(self.version)
            .uint(self.created_at)
            .uint(self.last_seen)
            .uint(self.idle_expires_at)
            .uint(self.absolute_expires_at)
            .bytes(self.user_agent.as_bytes())
            .opt_bytes(self.idp_sid.as_deref().map(str::as_bytes))
            .bytes(&self.sealed);
        w.finish()
    }

    /// A record from its stored form: [`Record::encode`]'s, or the JSON that versions before the
    /// binary format wrote (its first byte is `{`). `None` if the bytes are neither.
    pub(crate) fn decode(bytes: &[u8]) -> Option<Record> {
        if bytes.first() == Some(&b'{') {
            return serde_json::from_slice(bytes).ok();
        }
        let mut r = binary::Reader::new(RECORD_V1, bytes)?;
        let record = Record {
            handle: r.string()?,
            subject: r.string()?,
            version: r.uint()?,
            created_at: r.uint()?,
            last_seen: r.uint()?,
            idle_expires_at: r.uint()?,
            absolute_expires_at: r.uint()?,
            user_agent: r.string()?,
            idp_sid: r.opt_string()?,
            sealed: r.bytes()?.to_vec(),
        };
        r.end()?;
        Some(record)
    }
}

/// The first byte of a [`Record::encode`]d record (JSON records start with `{`).
pub(crate) const RECORD_V1: u8 = 1;

/// `sealed` in the JSON form of a record (the stored form before [`RECORD_V1`], still read):
/// unpadded standard base64.
mod b64 {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD_NO_PAD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD_NO_PAD.encode(v))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        STANDARD_NO_PAD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend is unreachable or failing.
    #[error("session store unavailable: {0}")]
    Unavailable(#[source] BoxError),
    /// `create` found a record with the same handle (a 128-bit collision: in practice a bug).
    #[error("a session with this handle already exists")]
    Exists,
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Error {
        match e {
            StoreError::Unavailable(e) => Error::StoreUnavailable(e),
            StoreError::Exists => Error::Internal("session handle collision".into()),
        }
    }
}

/// What every session store offers. Times are Unix seconds.
pub trait Store: Send + Sync {
    /// Stores a new record; fails with [`StoreError::Exists`] if the handle is taken.
    fn create(&self, record: Record) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// The record, unless missing or expired at `now`.
    fn load(
        &self,
        handle: &str,
        now: u64,
    ) -> impl Future<Output = Result<Option<Record>, StoreError>> + Send;
    /// Replaces the record if its stored version is still `expected_version` (compare-and-set);
    /// `record.version` must be the new version. `Ok(false)` if the version moved on or it is gone.
    fn save(
        &self,
        record: Record,
        expected_version: u64,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Updates the idle clock without touching the version.
    fn touch(
        &self,
        handle: &str,
        last_seen: u64,
        idle_expires_at: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Deletes one record, returning it if it existed.
    fn delete(
        &self,
        handle: &str,
    ) -> impl Future<Output = Result<Option<Record>, StoreError>> + Send;
    /// Deletes every record whose `idp_sid` is `idp_sid`, returning their handles.
    fn delete_idp_session(
        &self,
        idp_sid: &str,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;
    /// Deletes every record of a subject, returning their handles.
    fn delete_subject(
        &self,
        subject: &str,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;
    /// The live records of a subject.
    fn list_subject(
        &self,
        subject: &str,
        now: u64,
    ) -> impl Future<Output = Result<Vec<Record>, StoreError>> + Send;
    /// Removes records expired at `now`; returns how many.
    fn sweep(&self, now: u64) -> impl Future<Output = Result<usize, StoreError>> + Send;
    /// Checks that the backend answers.
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// "First use wins": a set of keys that are remembered for a time to live.
pub trait OnceSet: Send + Sync {
    /// Records `key` for `ttl`. `Ok(true)` for the first caller (on any instance); `Ok(false)`
    /// while the key is remembered.
    fn first_use(
        &self,
        key: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Forgets `key`, so that it may be used again (a spent mark whose use never left coatcheck).
    fn forget(&self, key: &str) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// A short exclusive lease. The holder proves itself with the token it was given; a lease whose
/// holder died expires by itself after its time to live.
pub trait Lease: Send + Sync {
    /// Takes the lease `key` for `ttl` unless someone holds it: `Some(token)` on success.
    fn acquire(
        &self,
        key: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<String>, StoreError>> + Send;
    /// Releases the lease if `token` still holds it, and announces [`Event::Released`] to every
    /// instance.
    fn release(
        &self,
        key: &str,
        token: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// Why a session ended (the `reason` of the session-ended event).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The user logged out (this device, another device, or everywhere).
    Logout,
    /// The grant was refused by the provider, or an operator revoked the session.
    Revoked,
    /// The idle or absolute timeout passed.
    Expired,
    /// The provider sent a back-channel logout.
    Backchannel,
}

/// What one instance tells every instance (itself included).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Event {
    /// A session's record changed (refreshed tokens): cached copies older than `version` are
    /// dropped and reloaded.
    Changed { handle: String, version: u64 },
    /// A session ended: cached copies are dropped and the session is refused.
    Ended { handle: String, reason: EndReason },
    /// A lease was released: whoever waits for it re-checks now.
    Released { key: String },
    /// Local only: the subscription dropped or fell behind; events may have been missed.
    Lost,
    /// Local only: the subscription is live again (after [`Event::Lost`]).
    Resumed,
}

/// The invalidation channel.
pub trait Events: Send + Sync {
    /// Sends `event` to every instance, this one included.
    fn publish(&self, event: &Event) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Events from every instance. A receiver that lags must treat it as [`Event::Lost`].
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Event>;
}

/// The configured store (static dispatch; no boxing on the load path).
pub(crate) enum AnyStore {
    Memory(memory::MemoryStore),
    Embedded(embedded::EmbeddedStore),
    Redis(redis::RedisStore),
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            AnyStore::Memory($s) => $e,
            AnyStore::Embedded($s) => $e,
            AnyStore::Redis($s) => $e,
        }
    };
}

impl Store for AnyStore {
    async fn create(&self, record: Record) -> Result<(), StoreError> {
        dispatch!(self, s => s.create(record).await)
    }
    async fn load(&self, handle: &str, now: u64) -> Result<Option<Record>, StoreError> {
        dispatch!(self, s => s.load(handle, now).await)
    }
    async fn save(&self, record: Record, expected_version: u64) -> Result<bool, StoreError> {
        dispatch!(self, s => s.save(record, expected_version).await)
    }
    async fn touch(
        &self,
        handle: &str,
        last_seen: u64,
        idle_expires_at: u64,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.touch(handle, last_seen, idle_expires_at).await)
    }
    async fn delete(&self, handle: &str) -> Result<Option<Record>, StoreError> {
        dispatch!(self, s => s.delete(handle).await)
    }
    async fn delete_idp_session(&self, idp_sid: &str) -> Result<Vec<String>, StoreError> {
        dispatch!(self, s => s.delete_idp_session(idp_sid).await)
    }
    async fn delete_subject(&self, subject: &str) -> Result<Vec<String>, StoreError> {
        dispatch!(self, s => s.delete_subject(subject).await)
    }
    async fn list_subject(&self, subject: &str, now: u64) -> Result<Vec<Record>, StoreError> {
        dispatch!(self, s => s.list_subject(subject, now).await)
    }
    async fn sweep(&self, now: u64) -> Result<usize, StoreError> {
        dispatch!(self, s => s.sweep(now).await)
    }
    async fn ping(&self) -> Result<(), StoreError> {
        dispatch!(self, s => s.ping().await)
    }
}

impl OnceSet for AnyStore {
    async fn first_use(&self, key: &str, ttl: Duration) -> Result<bool, StoreError> {
        dispatch!(self, s => s.first_use(key, ttl).await)
    }
    async fn forget(&self, key: &str) -> Result<(), StoreError> {
        dispatch!(self, s => s.forget(key).await)
    }
}

impl Lease for AnyStore {
    async fn acquire(&self, key: &str, ttl: Duration) -> Result<Option<String>, StoreError> {
        dispatch!(self, s => s.acquire(key, ttl).await)
    }
    async fn release(&self, key: &str, token: &str) -> Result<(), StoreError> {
        dispatch!(self, s => s.release(key, token).await)
    }
}

impl Events for AnyStore {
    async fn publish(&self, event: &Event) -> Result<(), StoreError> {
        dispatch!(self, s => s.publish(event).await)
    }
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Event> {
        dispatch!(self, s => s.subscribe())
    }
}

/// The configured store as coatcheck uses it: every call timed and its failures counted
/// (`coatcheck_store_call_duration_seconds{op}`, `coatcheck_store_errors_total`).
pub(crate) struct Backend {
    store: AnyStore,
    metrics: Arc<Metrics>,
}

impl Backend {
    /// Wraps `store`; its calls are recorded in `metrics`.
    pub(crate) fn new(store: AnyStore, metrics: Arc<Metrics>) -> Backend {
        Backend { store, metrics }
    }

    /// The store itself, untimed.
    #[cfg(test)]
    pub(crate) fn inner(&self) -> &AnyStore {
        &self.store
    }

    async fn timed<T>(
        &self,
        op: StoreOp,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let start = Instant::now();
        let r = call.await;
        self.metrics.store_call(
            op,
            start.elapsed(),
            matches!(r, Err(StoreError::Unavailable(_))),
        );
        r
    }
}

impl Store for Backend {
    async fn create(&self, record: Record) -> Result<(), StoreError> {
        self.timed(StoreOp::Create, self.store.create(record)).await
    }
    async fn load(&self, handle: &str, now: u64) -> Result<Option<Record>, StoreError> {
        self.timed(StoreOp::Load, self.store.load(handle, now))
            .await
    }
    async fn save(&self, record: Record, expected_version: u64) -> Result<bool, StoreError> {
        self.timed(StoreOp::Save, self.store.save(record, expected_version))
            .await
    }
    async fn touch(
        &self,
        handle: &str,
        last_seen: u64,
        idle_expires_at: u64,
    ) -> Result<(), StoreError> {
        self.timed(
            StoreOp::Touch,
            self.store.touch(handle, last_seen, idle_expires_at),
        )
        .await
    }
    async fn delete(&self, handle: &str) -> Result<Option<Record>, StoreError> {
        self.timed(StoreOp::Delete, self.store.delete(handle)).await
    }
    async fn delete_idp_session(&self, idp_sid: &str) -> Result<Vec<String>, StoreError> {
        self.timed(
            StoreOp::DeleteIdpSession,
            self.store.delete_idp_session(idp_sid),
        )
        .await
    }
    async fn delete_subject(&self, subject: &str) -> Result<Vec<String>, StoreError> {
        self.timed(StoreOp::DeleteSubject, self.store.delete_subject(subject))
            .await
    }
    async fn list_subject(&self, subject: &str, now: u64) -> Result<Vec<Record>, StoreError> {
        self.timed(StoreOp::ListSubject, self.store.list_subject(subject, now))
            .await
    }
    async fn sweep(&self, now: u64) -> Result<usize, StoreError> {
        self.timed(StoreOp::Sweep, self.store.sweep(now)).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.timed(StoreOp::Ping, self.store.ping()).await
    }
}

impl OnceSet for Backend {
    async fn first_use(&self, key: &str, ttl: Duration) -> Result<bool, StoreError> {
        self.timed(StoreOp::FirstUse, self.store.first_use(key, ttl))
            .await
    }
    async fn forget(&self, key: &str) -> Result<(), StoreError> {
        self.timed(StoreOp::Forget, self.store.forget(key)).await
    }
}

impl Lease for Backend {
    async fn acquire(&self, key: &str, ttl: Duration) -> Result<Option<String>, StoreError> {
        self.timed(StoreOp::Acquire, self.store.acquire(key, ttl))
            .await
    }
    async fn release(&self, key: &str, token: &str) -> Result<(), StoreError> {
        self.timed(StoreOp::Release, self.store.release(key, token))
            .await
    }
}

impl Events for Backend {
    async fn publish(&self, event: &Event) -> Result<(), StoreError> {
        self.timed(StoreOp::Publish, self.store.publish(event))
            .await
    }
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Event> {
        self.store.subscribe()
    }
}

/// The conformance suites: every store kind runs exactly these checks (`tests/` runs them against
/// a real Redis, so the module is public but hidden).
#[doc(hidden)]
pub mod conformance {
    use super::*;

    pub fn record(handle: &str, subject: &str, now: u64) -> Record {
        Record {
            handle: handle.into(),
            subject: subject.into(),
            version: 1,
            created_at: now,
            last_seen: now,
            idle_expires_at: now + 1800,
            absolute_expires_at: now + 43200,
            user_agent: "test".into(),
            idp_sid: None,
            sealed: vec![1, 2, 3],
        }
    }

    /// The [`Store`] suite: create, compare-and-set, touch, expiry and the deletes, in order.
    pub async fn run<S: Store>(s: &S) {
        let now = 1_700_000_000;
        s.ping().await.unwrap();
        // Each step starts from what the one before left in the store.
        create_and_load(s, now).await;
        compare_and_set(s, now).await;
        touch_and_expiry(s, now).await;
        by_subject(s, now).await;
        delete_one(s, now).await;
        provider_sessions(s, now).await;
        sweep_expired(s, now).await;
    }

    /// Create, load and a refused duplicate; every field comes back as it went in.
    async fn create_and_load<S: Store>(s: &S, now: u64) {
        s.create(record("a", "alice", now)).await.unwrap();
        assert!(matches!(
            s.create(record("a", "alice", now)).await,
            Err(StoreError::Exists)
        ));
        assert_eq!(
            s.load("a", now).await.unwrap().unwrap().sealed,
            vec![1, 2, 3]
        );
        assert!(s.load("missing", now).await.unwrap().is_none());
        // Every field comes back as it went in: any byte in `sealed`, any text in the strings.
        let mut exact = record("exact", "erin", now);
        exact.sealed = (0..=255).collect();
        exact.user_agent = "Mözilla/5.0 \"quoted\" \u{0}".into();
        exact.idp_sid = Some("sid-exact".into());
        s.create(exact.clone()).await.unwrap();
        assert_eq!(s.load("exact", now).await.unwrap(), Some(exact));
        assert_eq!(s.delete_subject("erin").await.unwrap(), vec!["exact"]);
    }

    /// `save` wins only from the version it expects and never creates; `a` is at version 2 after.
    async fn compare_and_set<S: Store>(s: &S, now: u64) {
        let mut next = record("a", "alice", now);
        next.version = 2;
        next.sealed = vec![9];
        assert!(s.save(next.clone(), 1).await.unwrap());
        assert!(
            !s.save(next.clone(), 1).await.unwrap(),
            "a stale version must not win"
        );
        assert_eq!(s.load("a", now).await.unwrap().unwrap().sealed, vec![9]);
        assert!(
            !s.save(record("nope", "alice", now), 0).await.unwrap(),
            "save never creates"
        );
    }

    /// `touch` keeps the version and moves the idle clock; past it, `load` finds nothing.
    async fn touch_and_expiry<S: Store>(s: &S, now: u64) {
        s.touch("a", now + 10, now + 1810).await.unwrap();
        let r = s.load("a", now + 10).await.unwrap().unwrap();
        assert_eq!(
            (r.version, r.last_seen, r.idle_expires_at),
            (2, now + 10, now + 1810)
        );
        assert!(
            s.load("a", now + 1810).await.unwrap().is_none(),
            "idle-expired records are not returned"
        );
    }

    /// Listing and deleting by subject (`a` is still stored, and listed as of `now`).
    async fn by_subject<S: Store>(s: &S, now: u64) {
        s.create(record("b", "alice", now)).await.unwrap();
        s.create(record("c", "bob", now)).await.unwrap();
        let mut alice: Vec<_> = s
            .list_subject("alice", now)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.handle)
            .collect();
        alice.sort();
        assert_eq!(alice, vec!["a", "b"]);
        let mut gone = s.delete_subject("alice").await.unwrap();
        gone.sort();
        assert_eq!(gone, vec!["a", "b"]);
        assert!(s.load("b", now).await.unwrap().is_none());
        assert!(s.list_subject("alice", now).await.unwrap().is_empty());
    }

    /// `delete` returns the record once and takes it out of its subject's index.
    async fn delete_one<S: Store>(s: &S, now: u64) {
        assert_eq!(s.delete("c").await.unwrap().unwrap().handle, "c");
        assert!(s.delete("c").await.unwrap().is_none());
        assert!(s.list_subject("bob", now).await.unwrap().is_empty());
    }

    /// Deleting by provider session (`sid`), and the two indexes following each other's deletes.
    async fn provider_sessions<S: Store>(s: &S, now: u64) {
        let mut f = record("f", "dave", now);
        f.idp_sid = Some("sid-1".into());
        let mut g = record("g", "dave", now);
        g.idp_sid = Some("sid-2".into());
        s.create(f).await.unwrap();
        s.create(g).await.unwrap();
        assert_eq!(s.delete_idp_session("sid-1").await.unwrap(), vec!["f"]);
        assert!(s.delete_idp_session("sid-1").await.unwrap().is_empty());
        let dave: Vec<_> = s
            .list_subject("dave", now)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.handle)
            .collect();
        assert_eq!(dave, vec!["g"], "the subject index follows the sid delete");
        assert_eq!(s.delete_subject("dave").await.unwrap(), vec!["g"]);
        assert!(
            s.delete_idp_session("sid-2").await.unwrap().is_empty(),
            "the sid index follows the subject delete"
        );
    }

    /// `sweep` removes what is past its absolute expiry and nothing else.
    async fn sweep_expired<S: Store>(s: &S, now: u64) {
        let mut old = record("d", "carol", now);
        old.absolute_expires_at = now + 5;
        s.create(old).await.unwrap();
        s.create(record("e", "carol", now)).await.unwrap();
        assert_eq!(s.sweep(now + 6).await.unwrap(), 1);
        assert_eq!(s.list_subject("carol", now + 6).await.unwrap().len(), 1);
        assert!(s.delete("d").await.unwrap().is_none());
    }

    /// "First use wins", including under a race, and forgetting after the time to live.
    pub async fn once<S: OnceSet>(s: &S) {
        // Long enough that a loaded machine cannot let it lapse between two calls; the expiry is
        // checked on its own key with a short one.
        let ttl = Duration::from_secs(30);
        assert!(s.first_use("once-a", ttl).await.unwrap());
        assert!(
            !s.first_use("once-a", ttl).await.unwrap(),
            "a second use loses"
        );
        assert!(
            s.first_use("once-b", ttl).await.unwrap(),
            "keys are independent"
        );
        s.forget("once-b").await.unwrap();
        assert!(
            s.first_use("once-b", ttl).await.unwrap(),
            "a forgotten key is new"
        );
        assert!(
            s.first_use("once-short", Duration::from_millis(300))
                .await
                .unwrap()
        );
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(
            s.first_use("once-short", ttl).await.unwrap(),
            "a key is forgotten after its time to live"
        );
        // Sixteen racing callers: exactly one wins.
        let wins = futures_util::future::join_all(
            (0..16).map(|_| s.first_use("once-race", Duration::from_secs(5))),
        )
        .await
        .into_iter()
        .filter(|r| *r.as_ref().unwrap())
        .count();
        assert_eq!(wins, 1);
    }

    /// One holder at a time; only the holder releases; an abandoned lease expires; a release is
    /// announced.
    pub async fn lease<S: Lease + Events>(s: &S) {
        let mut events = s.subscribe();
        // Long enough that a loaded machine cannot let it lapse between two calls.
        let ttl = Duration::from_secs(30);
        let t1 = s
            .acquire("lease-a", ttl)
            .await
            .unwrap()
            .expect("free lease");
        assert!(s.acquire("lease-a", ttl).await.unwrap().is_none(), "held");
        s.release("lease-a", "not-the-token").await.unwrap();
        assert!(
            s.acquire("lease-a", ttl).await.unwrap().is_none(),
            "a stranger's release does nothing"
        );
        s.release("lease-a", &t1).await.unwrap();
        let released = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match events.recv().await {
                    Ok(Event::Released { key }) if key == "lease-a" => return,
                    Ok(_) => {}
                    Err(e) => panic!("event channel: {e}"),
                }
            }
        })
        .await;
        assert!(released.is_ok(), "the release is announced");
        let t2 = s.acquire("lease-a", ttl).await.unwrap().expect("released");
        assert_ne!(t1, t2, "every holder gets its own token");
        s.acquire("lease-short", Duration::from_millis(300))
            .await
            .unwrap()
            .expect("free lease");
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(
            s.acquire("lease-short", ttl).await.unwrap().is_some(),
            "an abandoned lease expires"
        );
        let wins = futures_util::future::join_all(
            (0..16).map(|_| s.acquire("lease-race", Duration::from_secs(5))),
        )
        .await
        .into_iter()
        .filter(|r| r.as_ref().unwrap().is_some())
        .count();
        assert_eq!(wins, 1, "racing acquirers: exactly one wins");
    }

    /// Published events reach every subscriber, in order.
    pub async fn events<S: Events>(s: &S) {
        let mut a = s.subscribe();
        let mut b = s.subscribe();
        let sent = [
            Event::Changed {
                handle: "h1".into(),
                version: 2,
            },
            Event::Ended {
                handle: "h2".into(),
                reason: EndReason::Backchannel,
            },
        ];
        for e in &sent {
            s.publish(e).await.unwrap();
        }
        for rx in [&mut a, &mut b] {
            for want in &sent {
                let got = tokio::time::timeout(Duration::from_secs(2), async {
                    loop {
                        match rx.recv().await {
                            // Resumed/Lost may be interleaved by a (re)subscribing backend.
                            Ok(Event::Resumed | Event::Lost) => continue,
                            other => return other,
                        }
                    }
                })
                .await
                .expect("event delivered")
                .unwrap();
                assert_eq!(&got, want);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn typical() -> Record {
        Record {
            handle: "0123456789abcdef0123456789abcdef".into(),
            subject: "fedcba9876543210fedcba9876543210".into(),
            version: 3,
            created_at: 1_700_000_000,
            last_seen: 1_700_000_600,
            idle_expires_at: 1_700_002_400,
            absolute_expires_at: 1_700_043_200,
            user_agent: "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0"
                .into(),
            idp_sid: Some("00112233445566778899aabbccddeeff".into()),
            // A sealed payload the size of a session with two JWTs.
            sealed: (0..2000u32).map(|i| (i * 7919 % 251) as u8).collect(),
        }
    }

    #[test]
    fn a_record_in_the_old_json_format_still_decodes() {
        let r = typical();
        // Exactly what the JSON format wrote: field names, sealed bytes as unpadded base64.
        let json = serde_json::to_vec(&r).unwrap();
        assert!(json.windows(8).any(|w| w == b"\"sealed\""));
        assert_eq!(Record::decode(&json), Some(r));
    }

    #[test]
    fn a_binary_record_is_at_least_a_quarter_smaller_than_the_json_one() {
        let r = typical();
        let (bin, json) = (r.encode(), serde_json::to_vec(&r).unwrap());
        assert_eq!(bin[0], RECORD_V1);
        assert_eq!(Record::decode(&bin), Some(r.clone()));
        // base64 alone costs a third of the sealed bytes; the field names ~150 bytes more.
        assert!(
            bin.len() * 4 <= json.len() * 3,
            "{} vs {}",
            bin.len(),
            json.len()
        );
        // And the binary form carries nearly nothing beyond the field values themselves.
        let payload = r.handle.len()
            + r.subject.len()
            + r.user_agent.len()
            + r.idp_sid.as_ref().map_or(0, String::len)
            + r.sealed.len();
        assert!(bin.len() <= payload + 40, "{} vs {payload}", bin.len());
    }

    fn any_record() -> impl Strategy<Value = Record> {
        (
            ("[0-9a-f]{0,40}", ".{0,40}", any::<[u64; 5]>()),
            (".{0,300}", proptest::option::of(".{0,40}")),
            proptest::collection::vec(any::<u8>(), 0..600),
        )
            .prop_map(
                |((handle, subject, n), (user_agent, idp_sid), sealed)| Record {
                    handle,
                    subject,
                    version: n[0],
                    created_at: n[1],
                    last_seen: n[2],
                    idle_expires_at: n[3],
                    absolute_expires_at: n[4],
                    user_agent,
                    idp_sid,
                    sealed,
                },
            )
    }

    proptest! {
        #[test]
        fn records_round_trip_through_the_binary_encoding(r in any_record()) {
            let bin = r.encode();
            prop_assert_eq!(Record::decode(&bin), Some(r));
            // No strict prefix and no extension decodes: truncation is detected, never a panic.
            for n in 0..bin.len() {
                prop_assert_eq!(Record::decode(&bin[..n]), None);
            }
            prop_assert_eq!(Record::decode(&[&bin[..], &[0]].concat()), None);
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_record_decoder(
            mut bytes in proptest::collection::vec(any::<u8>(), 0..300),
            v1: bool,
        ) {
            if v1 && !bytes.is_empty() {
                bytes[0] = RECORD_V1;
            }
            let _ = Record::decode(&bytes);
        }

        #[test]
        fn flipping_any_byte_of_a_record_never_panics(r in any_record(), at: usize, bit in 0u8..8) {
            let mut bin = r.encode();
            let i = at % bin.len();
            bin[i] ^= 1 << bit;
            let _ = Record::decode(&bin);
        }
    }
}
