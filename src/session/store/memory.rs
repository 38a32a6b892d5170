//! In-memory store: for tests and throwaway use. Sessions are lost at exit.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use super::local::{Local, delegate_local};
use super::{Record, Store, StoreError};

/// A store in a `HashMap` (one lock; it is only reached on cache misses).
#[derive(Default)]
pub(crate) struct MemoryStore {
    inner: Mutex<Inner>,
    local: Local,
}

delegate_local!(MemoryStore);

#[derive(Default)]
struct Inner {
    records: HashMap<String, Record>,
    by_subject: HashMap<String, HashSet<String>>,
    by_idp_sid: HashMap<String, HashSet<String>>,
}

fn unindex(index: &mut HashMap<String, HashSet<String>>, key: &str, handle: &str) {
    if let Some(set) = index.get_mut(key) {
        set.remove(handle);
        if set.is_empty() {
            index.remove(key);
        }
    }
}

impl Inner {
    fn remove(&mut self, handle: &str) -> Option<Record> {
        let r = self.records.remove(handle)?;
        unindex(&mut self.by_subject, &r.subject, handle);
        if let Some(sid) = &r.idp_sid {
            unindex(&mut self.by_idp_sid, sid, handle);
        }
        Some(r)
    }

    fn remove_all(&mut self, handles: Vec<String>) -> Vec<String> {
        for h in &handles {
            self.remove(h);
        }
        handles
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
        if let Some(sid) = &record.idp_sid {
            g.by_idp_sid
                .entry(sid.clone())
                .or_default()
                .insert(record.handle.clone());
        }
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

    async fn delete_idp_session(&self, idp_sid: &str) -> Result<Vec<String>, StoreError> {
        let mut g = self.lock();
        let handles = g
            .by_idp_sid
            .get(idp_sid)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        Ok(g.remove_all(handles))
    }

    async fn delete_subject(&self, subject: &str) -> Result<Vec<String>, StoreError> {
        let mut g = self.lock();
        let handles = g
            .by_subject
            .get(subject)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        Ok(g.remove_all(handles))
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
        let s = super::MemoryStore::default();
        super::super::conformance::run(&s).await;
        super::super::conformance::once(&s).await;
        super::super::conformance::lease(&s).await;
        super::super::conformance::events(&s).await;
    }
}
