//! Sessions: the server-side half of the cloakroom.
//!
//! A request's cookie is verified ([`ticket`]) before anything else; then the decrypted session is
//! looked up in the moka cache (a hit touches no store and takes no global lock), and only on a miss
//! is the record loaded from the [`store`] and opened with the key derived from the ticket's secret.

pub mod store;
pub mod ticket;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue, header};
use serde::{Deserialize, Serialize};

use crate::config::{self, StoreKind};
use crate::error::Error;
use crate::proxy::headers;
use crate::secret::{self, Secret};
use store::{AnyStore, Record, Store, StoreError};
use ticket::{CookieSpec, Keys, Ticket};

/// How long the browser's `User-Agent` may be in the device list.
const MAX_USER_AGENT: usize = 256;

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
    pub claims: serde_json::Map<String, serde_json::Value>,
    pub id_token: Secret,
    pub access_token: Secret,
    /// Unix seconds at which the access token expires.
    pub access_expires_at: u64,
    /// Unix seconds at which the access token was received.
    #[serde(default)]
    pub access_issued_at: u64,
    pub refresh_token: Option<Secret>,
}

/// A live, decrypted session.
pub struct Session {
    /// Public handle (also the store key).
    pub handle: String,
    pub subject: String,
    pub version: u64,
    pub created_at: u64,
    pub absolute_expires_at: u64,
    pub user_agent: String,
    pub idp_sid: Option<String>,
    /// Tokens and claims. `data.access_token` is empty here: the token is held once, in `bearer`.
    pub data: SessionData,
    /// `Bearer <access token>`, ready to inject (marked sensitive).
    pub bearer: HeaderValue,
    /// When the access token expires, on the monotonic clock: set when the tokens arrive (or the
    /// session is loaded), from their remaining lifetime.
    pub access_deadline: Instant,
    /// Last request seen (Unix seconds), kept in memory; written to the store at most once per
    /// `session.touch_interval`.
    last_seen: AtomicU64,
    record_key: Secret<[u8; 32]>,
}

impl Session {
    /// Whether the access token is still valid (monotonic clock).
    pub fn token_valid(&self) -> bool {
        Instant::now() < self.access_deadline
    }

    /// When the session ends if idle from now on.
    pub fn idle_expires_at(&self, idle: Duration) -> u64 {
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

/// The session manager: ticket, cache and store.
pub struct Sessions {
    keys: Keys,
    pub cookie: CookieSpec,
    store: AnyStore,
    cache: moka::future::Cache<[u8; 16], Arc<Session>>,
    pub idle: Duration,
    pub absolute: Duration,
    touch_interval: Duration,
}

/// Decrypts a record's sealed data with the session's record key (`None`: altered or wrong key).
fn open_record(key: &[u8; 32], record: &Record) -> Option<SessionData> {
    let plain = secret::open(key, record.handle.as_bytes(), &record.sealed)?;
    serde_json::from_slice(&plain).ok()
}

/// Hash identifying a user across their sessions (issuer + subject).
pub fn subject_key(iss: &str, sub: &str) -> String {
    secret::hex(&secret::sha256(format!("coatcheck subject v1\0{iss}\0{sub}").as_bytes())[..16])
}

fn handle_bytes(handle: &str) -> Option<[u8; 16]> {
    if handle.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, chunk) in handle.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

impl Sessions {
    /// Opens the configured store and builds the cache.
    pub fn new(cfg: &config::Session) -> Result<Sessions, StoreError> {
        let store = match &cfg.store {
            StoreKind::Memory => AnyStore::Memory(store::memory::MemoryStore::default()),
            StoreKind::Embedded { path } => {
                AnyStore::Embedded(store::embedded::EmbeddedStore::open(path)?)
            }
            StoreKind::Redis(settings) => AnyStore::Redis(store::redis::RedisStore::new(settings)?),
        };
        Ok(Sessions {
            keys: Keys::new(&cfg.keys),
            cookie: CookieSpec {
                name: cfg.cookie_name.clone(),
                same_site: cfg.same_site,
                max_age: cfg.persistent.then_some(cfg.absolute_timeout.as_secs()),
            },
            store,
            cache: moka::future::Cache::builder()
                .max_capacity(cfg.cache_capacity)
                .time_to_live(cfg.cache_ttl)
                .build(),
            idle: cfg.idle_timeout,
            absolute: cfg.absolute_timeout,
            touch_interval: cfg.touch_interval,
        })
    }

    /// The keys (login cookies use them too).
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Whether the store answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.store.ping().await
    }

    /// Looks up the session named by the request's cookie.
    pub async fn lookup(&self, headers: &HeaderMap) -> Result<Lookup, Error> {
        let Some(value) = headers::cookie(headers, &self.cookie.name) else {
            return Ok(Lookup::None);
        };
        let Some(ticket) = Ticket::verify(value, &self.keys) else {
            return Ok(Lookup::None);
        };
        let key = ticket.handle_bytes();
        let now = now();
        if let Some(s) = self.cache.get(&key).await {
            if now >= s.idle_expires_at(self.idle) {
                self.cache.invalidate(&key).await;
                return Ok(Lookup::Ended);
            }
            s.last_seen.fetch_max(now, Ordering::Relaxed);
            return Ok(Lookup::Live(s));
        }
        let handle = secret::hex(&key);
        let Some(record) = self.store.load(&handle, now).await? else {
            return Ok(Lookup::Ended);
        };
        let record_key = ticket.record_key();
        let Some(data) = open_record(&record_key, &record) else {
            tracing::warn!(session = %handle, "a session record did not decrypt with its ticket; treating it as ended");
            return Ok(Lookup::Ended);
        };
        let last_seen = record.last_seen;
        let absolute_expires_at = record.absolute_expires_at;
        let session = Session::from_parts(record, data, Secret::new(record_key));
        if now.saturating_sub(last_seen) >= self.touch_interval.as_secs() {
            let idle_expires_at = (now + self.idle.as_secs()).min(absolute_expires_at);
            self.store.touch(&handle, now, idle_expires_at).await?;
            session.last_seen.store(now, Ordering::Relaxed);
        }
        Ok(Lookup::Live(self.remember(session).await))
    }

    /// Puts a session in the cache (the one place that does).
    async fn remember(&self, session: Session) -> Arc<Session> {
        let session = Arc::new(session);
        if self.cache.policy().max_capacity() == Some(0) {
            return session;
        }
        let key = handle_bytes(&session.handle).expect("handles are 32 hex digits");
        self.cache.insert(key, session.clone()).await;
        session
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
        let key = ticket.record_key();
        let sealed = secret::seal(
            &key,
            handle.as_bytes(),
            &serde_json::to_vec(&data).map_err(Error::internal)?,
        );
        let ua = user_agent.and_then(|v| v.to_str().ok()).unwrap_or("");
        let record = Record {
            handle: handle.clone(),
            subject: subject_key(&data.iss, &data.sub),
            version: 1,
            created_at: now,
            last_seen: now,
            idle_expires_at: now + self.idle.as_secs().min(self.absolute.as_secs()),
            absolute_expires_at: now + self.absolute.as_secs(),
            user_agent: ua.chars().take(MAX_USER_AGENT).collect(),
            idp_sid: idp_sid.map(|s| subject_key("sid", s)),
            sealed,
        };
        self.store.create(record.clone()).await?;
        let session = self
            .remember(Session::from_parts(record, data, Secret::new(key)))
            .await;
        Ok((ticket.encode(&self.keys), session))
    }

    /// Replaces a session's data if nobody else changed it since `current` was read
    /// (compare-and-set on the version). `Ok(None)` if it changed or is gone.
    pub async fn update(
        &self,
        current: &Session,
        data: SessionData,
    ) -> Result<Option<Arc<Session>>, Error> {
        let sealed = secret::seal(
            current.record_key.expose(),
            current.handle.as_bytes(),
            &serde_json::to_vec(&data).map_err(Error::internal)?,
        );
        let last_seen = current.last_seen.load(Ordering::Relaxed);
        let record = Record {
            handle: current.handle.clone(),
            subject: current.subject.clone(),
            version: current.version + 1,
            created_at: current.created_at,
            last_seen,
            idle_expires_at: (last_seen + self.idle.as_secs()).min(current.absolute_expires_at),
            absolute_expires_at: current.absolute_expires_at,
            user_agent: current.user_agent.clone(),
            idp_sid: current.idp_sid.clone(),
            sealed,
        };
        if !self.store.save(record.clone(), current.version).await? {
            return Ok(None);
        }
        Ok(Some(
            self.remember(Session::from_parts(
                record,
                data,
                current.record_key.clone(),
            ))
            .await,
        ))
    }

    /// Reloads a session from the store (after a lost compare-and-set), bypassing the cache.
    pub async fn reload(&self, current: &Session) -> Result<Option<Arc<Session>>, Error> {
        let Some(record) = self.store.load(&current.handle, now()).await? else {
            self.evict(&current.handle).await;
            return Ok(None);
        };
        let data = open_record(current.record_key.expose(), &record)
            .ok_or_else(|| Error::internal("session record no longer decrypts"))?;
        Ok(Some(
            self.remember(Session::from_parts(
                record,
                data,
                current.record_key.clone(),
            ))
            .await,
        ))
    }

    /// Deletes one session from the store and the cache.
    pub async fn delete(&self, handle: &str) -> Result<Option<Record>, Error> {
        self.evict(handle).await;
        Ok(self.store.delete(handle).await?)
    }

    /// Deletes every session of a subject (by its [`subject_key`]).
    pub async fn delete_subject(&self, subject: &str) -> Result<usize, Error> {
        let handles = self.store.delete_subject(subject).await?;
        for h in &handles {
            self.evict(h).await;
        }
        Ok(handles.len())
    }

    /// The live sessions of a subject.
    pub async fn list(&self, subject: &str) -> Result<Vec<Record>, Error> {
        Ok(self.store.list_subject(subject, now()).await?)
    }

    async fn evict(&self, handle: &str) {
        if let Some(k) = handle_bytes(handle) {
            self.cache.invalidate(&k).await;
        }
    }

    /// Removes expired records from the store; run periodically.
    pub async fn sweep(&self) -> Result<usize, StoreError> {
        self.store.sweep(now()).await
    }

    /// Sessions held in the cache (approximate).
    pub fn cached(&self) -> u64 {
        self.cache.entry_count()
    }

    /// The `Set-Cookie` header value for `value`.
    pub fn set_cookie(&self, value: &Secret) -> HeaderValue {
        self.cookie.set(value)
    }

    /// The `Set-Cookie` header value that clears the session cookie.
    pub fn clear_cookie(&self) -> HeaderValue {
        self.cookie.clear()
    }

    /// Extracts the `User-Agent` header.
    pub fn user_agent(headers: &HeaderMap) -> Option<&HeaderValue> {
        headers.get(header::USER_AGENT)
    }
}

impl Session {
    fn from_parts(record: Record, mut data: SessionData, record_key: Secret<[u8; 32]>) -> Session {
        let mut bearer = HeaderValue::from_str(&format!("Bearer {}", data.access_token.expose()))
            .unwrap_or(HeaderValue::from_static("Bearer invalid"));
        bearer.set_sensitive(true);
        // In memory the access token lives once, in `bearer` (a cached session is mostly tokens).
        data.access_token = Secret::default();
        let access_deadline =
            Instant::now() + Duration::from_secs(data.access_expires_at.saturating_sub(now()));
        Session {
            handle: record.handle,
            subject: record.subject,
            version: record.version,
            created_at: record.created_at,
            absolute_expires_at: record.absolute_expires_at,
            user_agent: record.user_agent,
            idp_sid: record.idp_sid,
            data,
            bearer,
            access_deadline,
            last_seen: AtomicU64::new(record.last_seen),
            record_key,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> config::Session {
        config::Session {
            cookie_name: "__Host-coatcheck".into(),
            same_site: config::SameSite::Strict,
            idle_timeout: Duration::from_secs(1800),
            absolute_timeout: Duration::from_secs(43200),
            persistent: false,
            touch_interval: Duration::from_secs(60),
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
            id_token: Secret::new("id".into()),
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
        let Lookup::Live(found) = s.lookup(&cookie_headers(&value)).await.unwrap() else {
            panic!("not found")
        };
        assert_eq!(found.handle, created.handle);
        assert_eq!(found.bearer, "Bearer at-secret");
    }

    #[tokio::test]
    async fn the_store_record_holds_no_token_in_clear() {
        let s = Sessions::new(&cfg()).unwrap();
        let (_, created) = s.create(data(), None, None).await.unwrap();
        let AnyStore::Memory(m) = &s.store else {
            unreachable!()
        };
        let rec = m.load(&created.handle, now()).await.unwrap().unwrap();
        let json = serde_json::to_string(&rec).unwrap();
        assert!(
            !json.contains("at-secret") && !json.contains("alice"),
            "{json}"
        );
    }

    #[tokio::test]
    async fn a_deleted_session_has_ended_even_if_it_was_cached() {
        let s = Sessions::new(&cfg()).unwrap();
        let (value, created) = s.create(data(), None, None).await.unwrap();
        s.delete(&created.handle).await.unwrap();
        assert!(matches!(
            s.lookup(&cookie_headers(&value)).await.unwrap(),
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
}
