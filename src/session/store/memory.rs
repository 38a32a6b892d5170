//! In-memory store: for tests and throwaway use. Sessions are lost at exit.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use super::{Record, Store, StoreError};

/// A store in a `HashMap` (one lock; it is only reached on cache misses).
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    records: HashMap<String, Record>,
    by_subject: HashMap<String, HashSet<String>>,
}

impl Inner {
    fn remove(&mut self, handle: &str) -> Option<Record> {
        let r = self.records.remove(handle)?;
        if let Some(set) = self.by_subject.get_mut(&r.subject) {
            set.remove(handle);
            if set.is_empty() {
                self.by_subject.remove(&r.subject);
            }
        }
        Some(r)
    }
}

impl MemoryStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps inconsistent in a way that matters
        // more than losing every session; keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Store for MemoryStore {
    async fn create(&self, record: Record) -> Result<(), StoreError> {
        let mut g = self.lock();
        if g.records.contains_key(&record.handle) {
            return Err(StoreError::Exists);
        }
        g.by_subject
            .entry(record.subject.clone())
            .or_default()
            .insert(record.handle.clone());
        g.records.insert(record.handle.clone(), record);
        Ok(())
    }

    async fn load(&self, handle: &str, now: u64) -> Result<Option<Record>, StoreError> {
        Ok(self
            .lock()
            .records
            .get(handle)
            .filter(|r| !r.is_expired(now))
            .cloned())
    }

    async fn save(&self, record: Record, expected_version: u64) -> Result<bool, StoreError> {
        let mut g = self.lock();
        match g.records.get_mut(&record.handle) {
            Some(r) if r.version == expected_version => {
                *r = record;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn touch(
        &self,
        handle: &str,
        last_seen: u64,
        idle_expires_at: u64,
    ) -> Result<(), StoreError> {
        if let Some(r) = self.lock().records.get_mut(handle) {
            r.last_seen = last_seen;
            r.idle_expires_at = idle_expires_at;
        }
        Ok(())
    }

    async fn delete(&self, handle: &str) -> Result<Option<Record>, StoreError> {
        Ok(self.lock().remove(handle))
    }

    async fn delete_subject(&self, subject: &str) -> Result<Vec<String>, StoreError> {
        let mut g = self.lock();
        let handles: Vec<String> = g
            .by_subject
            .get(subject)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        for h in &handles {
            g.remove(h);
        }
        Ok(handles)
    }

    async fn list_subject(&self, subject: &str, now: u64) -> Result<Vec<Record>, StoreError> {
        let g = self.lock();
        Ok(g.by_subject
            .get(subject)
            .map(|s| {
                s.iter()
                    .filter_map(|h| g.records.get(h))
                    .filter(|r| !r.is_expired(now))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn sweep(&self, now: u64) -> Result<usize, StoreError> {
        let mut g = self.lock();
        let expired: Vec<String> = g
            .records
            .values()
            .filter(|r| r.is_expired(now))
            .map(|r| r.handle.clone())
            .collect();
        for h in &expired {
            g.remove(h);
        }
        Ok(expired.len())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn the_memory_store_passes_the_conformance_suite() {
        super::super::conformance::run(&super::MemoryStore::default()).await;
    }
}
