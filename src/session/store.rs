//! Session stores: one small trait, three backends, one conformance suite every backend passes.
//!
//! A store holds [`Record`]s keyed by the session's public handle (a hash of the ticket id). The
//! tokens and claims are in `sealed`, encrypted under a key only the cookie holder can derive; the
//! rest is metadata needed to expire, list and revoke sessions without decrypting them. Expiry
//! belongs to the store: expired records are never returned, and [`Store::sweep`] removes them.

pub mod embedded;
pub mod memory;

use std::future::Future;

use serde::{Deserialize, Serialize};

use crate::error::{BoxError, Error};

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
    pub fn expires_at(&self) -> u64 {
        self.idle_expires_at.min(self.absolute_expires_at)
    }

    /// Whether the record is expired at `now` (Unix seconds).
    pub fn is_expired(&self, now: u64) -> bool {
        now >= self.expires_at()
    }
}

mod b64 {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD_NO_PAD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD_NO_PAD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
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

/// The configured store (static dispatch; no boxing on the load path).
pub enum AnyStore {
    Memory(memory::MemoryStore),
    Embedded(embedded::EmbeddedStore),
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            AnyStore::Memory($s) => $e,
            AnyStore::Embedded($s) => $e,
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

/// The conformance suite: every backend runs exactly these checks.
#[cfg(test)]
pub(crate) mod conformance {
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

    pub async fn run<S: Store>(s: &S) {
        let now = 1_700_000_000;
        s.ping().await.unwrap();
        // create / load / duplicate
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
        // compare-and-set
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
        // touch keeps the version and moves the idle clock
        s.touch("a", now + 10, now + 1810).await.unwrap();
        let r = s.load("a", now + 10).await.unwrap().unwrap();
        assert_eq!(
            (r.version, r.last_seen, r.idle_expires_at),
            (2, now + 10, now + 1810)
        );
        // expiry
        assert!(
            s.load("a", now + 1810).await.unwrap().is_none(),
            "idle-expired records are not returned"
        );
        // subjects
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
        // delete
        assert_eq!(s.delete("c").await.unwrap().unwrap().handle, "c");
        assert!(s.delete("c").await.unwrap().is_none());
        assert!(s.list_subject("bob", now).await.unwrap().is_empty());
        // sweep
        let mut old = record("d", "carol", now);
        old.absolute_expires_at = now + 5;
        s.create(old).await.unwrap();
        s.create(record("e", "carol", now)).await.unwrap();
        assert_eq!(s.sweep(now + 6).await.unwrap(), 1);
        assert_eq!(s.list_subject("carol", now + 6).await.unwrap().len(), 1);
        assert!(s.delete("d").await.unwrap().is_none());
    }
}
