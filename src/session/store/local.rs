//! Coordination within one process: the [`OnceSet`], [`Lease`] and [`Events`] of the `memory` and
//! `embedded` store kinds. One process is the whole deployment there, so process memory is the
//! truth; with several instances the `redis` kind implements the same traits across processes.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use super::{Event, Events, Lease, OnceSet, StoreError};

/// Events buffered per subscriber before it counts as lagging (and flushes its cache).
const EVENT_BUFFER: usize = 4096;
/// Expired once-keys are purged when the set grows past this many entries.
const PURGE_ABOVE: usize = 10_000;

/// In-process once-set, leases and event channel.
pub(crate) struct Local {
    once: Mutex<HashMap<String, Instant>>,
    leases: Mutex<HashMap<String, (String, Instant)>>,
    events: broadcast::Sender<Event>,
}

impl Default for Local {
    fn default() -> Self {
        Local {
            once: Mutex::default(),
            leases: Mutex::default(),
            events: broadcast::channel(EVENT_BUFFER).0,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The maps hold plain values: a panic elsewhere cannot leave them half-updated.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl OnceSet for Local {
    async fn first_use(&self, key: &str, ttl: Duration) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut set = lock(&self.once);
        if set.len() > PURGE_ABOVE {
            set.retain(|_, until| *until > now);
        }
        match set.get_mut(key) {
            Some(until) if *until > now => Ok(false),
            Some(until) => {
                *until = now + ttl;
                Ok(true)
            }
            None => {
                set.insert(key.to_owned(), now + ttl);
                Ok(true)
            }
        }
    }

    async fn forget(&self, key: &str) -> Result<(), StoreError> {
        lock(&self.once).remove(key);
        Ok(())
    }
}

impl Lease for Local {
    async fn acquire(&self, key: &str, ttl: Duration) -> Result<Option<String>, StoreError> {
        let now = Instant::now();
        let mut leases = lock(&self.leases);
        if leases.get(key).is_some_and(|(_, until)| *until > now) {
            return Ok(None);
        }
        let token = crate::secret::random_token(16);
        leases.insert(key.to_owned(), (token.clone(), now + ttl));
        Ok(Some(token))
    }

    async fn release(&self, key: &str, token: &str) -> Result<(), StoreError> {
        let released = {
            let mut leases = lock(&self.leases);
            let mine = leases.get(key).is_some_and(|(t, _)| t == token);
            if mine {
                leases.remove(key);
            }
            mine
        };
        if released {
            self.publish(&Event::Released {
                key: key.to_owned(),
            })
            .await?;
        }
        Ok(())
    }
}

impl Events for Local {
    async fn publish(&self, event: &Event) -> Result<(), StoreError> {
        // No receiver is not an error: nobody is listening yet.
        let _ = self.events.send(event.clone());
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }
}

/// Implements [`OnceSet`], [`Lease`] and [`Events`] for a store by delegating to its `local` field.
macro_rules! delegate_local {
    ($t:ty) => {
        impl $crate::session::store::OnceSet for $t {
            async fn first_use(
                &self,
                key: &str,
                ttl: std::time::Duration,
            ) -> Result<bool, $crate::session::store::StoreError> {
                self.local.first_use(key, ttl).await
            }
            async fn forget(&self, key: &str) -> Result<(), $crate::session::store::StoreError> {
                self.local.forget(key).await
            }
        }
        impl $crate::session::store::Lease for $t {
            async fn acquire(
                &self,
                key: &str,
                ttl: std::time::Duration,
            ) -> Result<Option<String>, $crate::session::store::StoreError> {
                self.local.acquire(key, ttl).await
            }
            async fn release(
                &self,
                key: &str,
                token: &str,
            ) -> Result<(), $crate::session::store::StoreError> {
                self.local.release(key, token).await
            }
        }
        impl $crate::session::store::Events for $t {
            async fn publish(
                &self,
                event: &$crate::session::store::Event,
            ) -> Result<(), $crate::session::store::StoreError> {
                self.local.publish(event).await
            }
            fn subscribe(&self) -> tokio::sync::broadcast::Receiver<$crate::session::store::Event> {
                self.local.subscribe()
            }
        }
    };
}
pub(crate) use delegate_local;

#[cfg(test)]
mod tests {
    use super::super::conformance;
    use super::Local;

    #[tokio::test]
    async fn the_local_once_set_passes_the_conformance_suite() {
        conformance::once(&Local::default()).await;
    }

    #[tokio::test]
    async fn the_local_lease_passes_the_conformance_suite() {
        conformance::lease(&Local::default()).await;
    }

    #[tokio::test]
    async fn the_local_events_pass_the_conformance_suite() {
        conformance::events(&Local::default()).await;
    }
}
