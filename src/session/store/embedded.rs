//! The embedded, persistent store (the default): one redb file.
//!
//! redb commits with `Durability::Immediate` (fsync before the commit returns), so a session that
//! was acknowledged survives `kill -9` and power loss. Calls run on the blocking thread pool.

use std::path::Path;
use std::sync::Arc;

use redb::{
    Database, MultimapTableDefinition, ReadableDatabase, ReadableMultimapTable, ReadableTable,
    TableDefinition,
};

use super::local::{Local, delegate_local};
use super::{Record, Store, StoreError};

const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions_v1");
const BY_SUBJECT: MultimapTableDefinition<&str, &str> =
    MultimapTableDefinition::new("sessions_by_subject_v1");
/// Created by version 0.2 and filled from then on: records written before it carry no sid index
/// entry, which only matters to a back-channel logout naming a sid that was issued before.
const BY_IDP_SID: MultimapTableDefinition<&str, &str> =
    MultimapTableDefinition::new("sessions_by_idp_sid_v1");

/// A redb-backed store. Once-only state, leases and events stay in this process: the file
/// belongs to one process (redb locks it).
pub(crate) struct EmbeddedStore {
    db: Arc<Database>,
    local: Local,
}

delegate_local!(EmbeddedStore);

fn unavailable(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Unavailable(Box::new(e.into()))
}

/// A stored record (binary, or JSON written by older versions: [`Record::decode`]). A malformed
/// one is treated as absent — the session has ended, exactly as a record that no longer decrypts —
/// and logged (its handle is public; the bytes are not logged).
fn decode(handle: &str, bytes: &[u8]) -> Option<Record> {
    let r = Record::decode(bytes);
    if r.is_none() {
        tracing::warn!(session = %handle, len = bytes.len(), "a stored session record is malformed; treating it as ended");
    }
    r
}

impl EmbeddedStore {
    /// Opens (or creates) the database file, creating its directory if needed.
    pub(crate) fn open(path: &Path) -> Result<EmbeddedStore, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Unavailable(format!("creating {}: {e}", dir.display()).into())
            })?;
        }
        // The records are sealed, but their metadata is nobody else's business: owner-only file.
        #[cfg(unix)]
        if !path.exists() {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| {
                    StoreError::Unavailable(format!("creating {}: {e}", path.display()).into())
                })?;
        }
        let db = Database::create(path).map_err(|e| {
            StoreError::Unavailable(format!("opening {}: {e}", path.display()).into())
        })?;
        let txn = db.begin_write().map_err(unavailable)?;
        txn.open_table(SESSIONS).map_err(unavailable)?;
        txn.open_multimap_table(BY_SUBJECT).map_err(unavailable)?;
        txn.open_multimap_table(BY_IDP_SID).map_err(unavailable)?;
        txn.commit().map_err(unavailable)?;
        Ok(EmbeddedStore {
            db: Arc::new(db),
            local: Local::default(),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| StoreError::Unavailable(Box::new(e)))?
    }

    /// Applies `f` to the record under `handle` inside one write transaction.
    async fn update<T: Send + 'static>(
        &self,
        handle: &str,
        f: impl FnOnce(Option<Record>) -> (Option<Record>, T) + Send + 'static,
    ) -> Result<T, StoreError> {
        let handle = handle.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            let out = {
                let mut t = txn.open_table(SESSIONS).map_err(unavailable)?;
                let current = match t.get(handle.as_str()).map_err(unavailable)? {
                    Some(v) => decode(&handle, v.value()),
                    None => None,
                };
                let (next, out) = f(current);
                if let Some(next) = next {
                    t.insert(handle.as_str(), next.encode().as_slice())
                        .map_err(unavailable)?;
                }
                out
            };
            txn.commit().map_err(unavailable)?;
            Ok(out)
        })
        .await
    }

    /// Deletes every record that `index` lists under `key`, in one transaction.
    async fn delete_indexed(
        &self,
        index: MultimapTableDefinition<'static, &'static str, &'static str>,
        key: &str,
    ) -> Result<Vec<String>, StoreError> {
        let key = key.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            let handles: Vec<String> = {
                let idx = txn.open_multimap_table(index).map_err(unavailable)?;
                let values = idx.get(key.as_str()).map_err(unavailable)?;
                values
                    .map(|v| v.map(|v| v.value().to_owned()))
                    .collect::<Result<_, _>>()
                    .map_err(unavailable)?
            };
            Self::remove_in(&txn, &handles)?;
            txn.commit().map_err(unavailable)?;
            Ok(handles)
        })
        .await
    }

    fn remove_in(txn: &redb::WriteTransaction, handles: &[String]) -> Result<usize, StoreError> {
        let mut t = txn.open_table(SESSIONS).map_err(unavailable)?;
        let mut idx = txn.open_multimap_table(BY_SUBJECT).map_err(unavailable)?;
        let mut sids = txn.open_multimap_table(BY_IDP_SID).map_err(unavailable)?;
        let mut n = 0;
        for h in handles {
            let Some(removed) = t.remove(h.as_str()).map_err(unavailable)? else {
                continue;
            };
            n += 1;
            // A malformed record is removed all the same; its index entries (if any) point at
            // nothing and are skipped by every reader.
            if let Some(r) = decode(h, removed.value()) {
                idx.remove(r.subject.as_str(), h.as_str())
                    .map_err(unavailable)?;
                if let Some(sid) = &r.idp_sid {
                    sids.remove(sid.as_str(), h.as_str()).map_err(unavailable)?;
                }
            }
        }
        Ok(n)
    }
}

impl Store for EmbeddedStore {
    async fn create(&self, record: Record) -> Result<(), StoreError> {
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            {
                let mut t = txn.open_table(SESSIONS).map_err(unavailable)?;
                if t.get(record.handle.as_str())
                    .map_err(unavailable)?
                    .is_some()
                {
                    return Err(StoreError::Exists);
                }
                t.insert(record.handle.as_str(), record.encode().as_slice())
                    .map_err(unavailable)?;
                let mut idx = txn.open_multimap_table(BY_SUBJECT).map_err(unavailable)?;
                idx.insert(record.subject.as_str(), record.handle.as_str())
                    .map_err(unavailable)?;
                if let Some(sid) = &record.idp_sid {
                    let mut sids = txn.open_multimap_table(BY_IDP_SID).map_err(unavailable)?;
                    sids.insert(sid.as_str(), record.handle.as_str())
                        .map_err(unavailable)?;
                }
            }
            txn.commit().map_err(unavailable)
        })
        .await
    }

    /// Read on the calling thread, not the blocking pool: a redb read never waits for a writer
    /// (readers see the last commit; the fsync happens on the writer's side), and a lookup is one
    /// B-tree descent through pages that are in redb's cache or the OS page cache — shorter than
    /// the hand-off to a pool thread and back that it used to cost on every cache miss. A page in
    /// neither cache is read from disk on the serving thread, and that core's other connections
    /// wait for it: a store far larger than memory wants the Redis store or a larger session cache.
    async fn load(&self, handle: &str, now: u64) -> Result<Option<Record>, StoreError> {
        let txn = self.db.begin_read().map_err(unavailable)?;
        let t = txn.open_table(SESSIONS).map_err(unavailable)?;
        match t.get(handle).map_err(unavailable)? {
            Some(v) => Ok(decode(handle, v.value()).filter(|r| !r.is_expired(now))),
            None => Ok(None),
        }
    }

    async fn save(&self, record: Record, expected_version: u64) -> Result<bool, StoreError> {
        let handle = record.handle.clone();
        self.update(&handle, move |current| match current {
            Some(c) if c.version == expected_version => (Some(record), true),
            _ => (None, false),
        })
        .await
    }

    async fn touch(
        &self,
        handle: &str,
        last_seen: u64,
        idle_expires_at: u64,
    ) -> Result<(), StoreError> {
        self.update(handle, move |current| {
            let next = current.map(|mut r| {
                r.last_seen = last_seen;
                r.idle_expires_at = idle_expires_at;
                r
            });
            (next, ())
        })
        .await
    }

    async fn delete(&self, handle: &str) -> Result<Option<Record>, StoreError> {
        let handle = handle.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            let removed = {
                let t = txn.open_table(SESSIONS).map_err(unavailable)?;
                t.get(handle.as_str())
                    .map_err(unavailable)?
                    .map(|v| decode(&handle, v.value()))
            };
            // A malformed record is deleted too, and answered as absent.
            if removed.is_some() {
                Self::remove_in(&txn, std::slice::from_ref(&handle))?;
            }
            txn.commit().map_err(unavailable)?;
            Ok(removed.flatten())
        })
        .await
    }

    async fn delete_idp_session(&self, idp_sid: &str) -> Result<Vec<String>, StoreError> {
        self.delete_indexed(BY_IDP_SID, idp_sid).await
    }

    async fn delete_subject(&self, subject: &str) -> Result<Vec<String>, StoreError> {
        self.delete_indexed(BY_SUBJECT, subject).await
    }

    async fn list_subject(&self, subject: &str, now: u64) -> Result<Vec<Record>, StoreError> {
        let subject = subject.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let idx = txn.open_multimap_table(BY_SUBJECT).map_err(unavailable)?;
            let t = txn.open_table(SESSIONS).map_err(unavailable)?;
            let mut out = Vec::new();
            for h in idx.get(subject.as_str()).map_err(unavailable)? {
                let h = h.map_err(unavailable)?;
                if let Some(v) = t.get(h.value()).map_err(unavailable)?
                    && let Some(r) = decode(h.value(), v.value())
                    && !r.is_expired(now)
                {
                    out.push(r);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn sweep(&self, now: u64) -> Result<usize, StoreError> {
        self.blocking(move |db| {
            let expired: Vec<String> = {
                let txn = db.begin_read().map_err(unavailable)?;
                let t = txn.open_table(SESSIONS).map_err(unavailable)?;
                let mut out = Vec::new();
                for entry in t.iter().map_err(unavailable)? {
                    let (k, v) = entry.map_err(unavailable)?;
                    if decode(k.value(), v.value()).is_none_or(|r| r.is_expired(now)) {
                        out.push(k.value().to_owned());
                    }
                }
                out
            };
            if expired.is_empty() {
                return Ok(0);
            }
            let txn = db.begin_write().map_err(unavailable)?;
            let n = Self::remove_in(&txn, &expired)?;
            txn.commit().map_err(unavailable)?;
            Ok(n)
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.blocking(|db| db.begin_read().map(|_| ()).map_err(unavailable))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!(
            "coatcheck-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ))
    }

    #[tokio::test]
    async fn the_embedded_store_passes_the_conformance_suite() {
        let path = tmp("conformance.db");
        let s = EmbeddedStore::open(&path).unwrap();
        super::super::conformance::run(&s).await;
        super::super::conformance::once(&s).await;
        super::super::conformance::lease(&s).await;
        super::super::conformance::events(&s).await;
        std::fs::remove_file(path).ok();
    }

    #[tokio::test]
    async fn records_survive_reopening_the_file() {
        let path = tmp("reopen.db");
        let now = 1_700_000_000;
        {
            let s = EmbeddedStore::open(&path).unwrap();
            s.create(super::super::conformance::record("x", "s", now))
                .await
                .unwrap();
        }
        let s = EmbeddedStore::open(&path).unwrap();
        assert!(s.load("x", now).await.unwrap().is_some());
        std::fs::remove_file(path).ok();
    }
}
