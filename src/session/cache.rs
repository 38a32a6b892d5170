//! The cache of decrypted sessions, and the epoch that lets a client connection keep the one its
//! requests use.
//!
//! Every change to the cache (an insert, an invalidation, a flush) advances the epoch after it is
//! made. A connection's memo ([`super::ConnectionMemo`]) keeps the session a lookup found together
//! with the epoch read *before* that lookup: while the epoch has not moved, nothing in the cache
//! changed since, so the kept session is exactly what the cache would answer, and the request is
//! served without the cache's hash lookup and read bookkeeping. Any change (a logout here or on
//! another instance, a refresh, a key retired) moves the epoch and sends every connection back to
//! the cache once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{HandleHash, Session};

pub(crate) struct SessionCache {
    map: moka::sync::Cache<[u8; 16], Arc<Session>, HandleHash>,
    epoch: AtomicU64,
}

impl SessionCache {
    /// At most `capacity` sessions (0: none at all, so no connection keeps one either), each
    /// dropped `ttl` after it was put in.
    pub(crate) fn new(capacity: u64, ttl: Duration) -> SessionCache {
        SessionCache {
            map: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build_with_hasher(HandleHash),
            epoch: AtomicU64::new(0),
        }
    }

    /// The epoch now; read it before [`Self::get`] to keep what the get answers.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    pub(crate) fn get(&self, key: &[u8; 16]) -> Option<Arc<Session>> {
        self.map.get(key)
    }

    pub(crate) fn insert(&self, key: [u8; 16], session: Arc<Session>) {
        self.map.insert(key, session);
        self.advance();
    }

    pub(crate) fn invalidate(&self, key: &[u8; 16]) {
        self.map.invalidate(key);
        self.advance();
    }

    pub(crate) fn invalidate_all(&self) {
        self.map.invalidate_all();
        self.advance();
    }

    /// Whether it may hold anything (`session.cache.capacity` > 0).
    pub(crate) fn is_enabled(&self) -> bool {
        self.map.policy().max_capacity() != Some(0)
    }

    pub(crate) fn entry_count(&self) -> u64 {
        self.map.entry_count()
    }

    pub(crate) fn run_pending_tasks(&self) {
        self.map.run_pending_tasks();
    }

    /// Drops a session the way eviction for room does: without advancing the epoch.
    #[cfg(test)]
    pub(crate) fn evict_for_room(&self, key: &[u8; 16]) {
        self.map.invalidate(key);
    }

    /// After the change, so that an epoch read before a get never outlives what the get saw.
    fn advance(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }
}
