//! Token refresh that never logs a user out by mistake.
//!
//! - **Proactive**: a token with less than `oidc.refresh_before_expiry` left (capped at half its
//!   lifetime, so short-lived tokens do not refresh on every request) is refreshed before the
//!   request is forwarded.
//! - **Single flight**: requests of one session queue behind one refresh (bounded by
//!   `oidc.refresh_wait`), then re-read the session and use its result. The new tokens are stored
//!   with a compare-and-set on the session version before anyone uses them.
//! - **Rotation grace**: the result of a refresh is remembered for `oidc.rotation_grace`, keyed by
//!   the refresh token it spent, so a request that raced with stale state never replays a spent
//!   refresh token (which the provider's reuse detection would punish by revoking the grant).
//! - **End vs blip**: `invalid_grant`-class answers end the session; a provider that is down does
//!   not: the current access token is used while valid, then 503 with `Retry-After`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::id_token::{self, Expected};
use super::oidc::{OidcError, Provider};
use crate::config;
use crate::error::Error;
use crate::secret;
use crate::session::{self, Session, SessionData, Sessions};

/// `Retry-After` seconds when the provider is unavailable.
pub const RETRY_AFTER_SECS: u64 = 5;

/// Refresh counters, written to the log (Prometheus comes later).
#[derive(Default)]
pub struct Metrics {
    pub refreshes: AtomicU64,
    pub ended_sessions: AtomicU64,
    pub provider_failures: AtomicU64,
    pub waiters: AtomicU64,
    pub grace_hits: AtomicU64,
}

/// The refresher.
pub struct Refresher {
    provider: Arc<Provider>,
    sessions: Arc<Sessions>,
    refresh_before: Duration,
    wait: Duration,
    /// One async lock per session being refreshed (entries removed when nobody holds them).
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Hash of a spent refresh token → the session version its refresh produced.
    recent: moka::sync::Cache<[u8; 32], u64>,
    pub metrics: Metrics,
}

impl Refresher {
    pub fn new(provider: Arc<Provider>, sessions: Arc<Sessions>, cfg: &config::Oidc) -> Refresher {
        Refresher {
            provider,
            sessions,
            refresh_before: cfg.refresh_before_expiry,
            wait: cfg.refresh_wait,
            locks: Mutex::new(HashMap::new()),
            recent: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(cfg.rotation_grace)
                .build(),
            metrics: Metrics::default(),
        }
    }

    /// Whether the access token should be refreshed now: judged on the monotonic clock
    /// ([`Session::access_deadline`]), so a wall-clock jump neither forces nor skips a refresh.
    fn due(&self, s: &Session) -> bool {
        let lifetime = s
            .data
            .access_expires_at
            .saturating_sub(s.data.access_issued_at);
        let margin = self.refresh_before.min(Duration::from_secs(lifetime / 2));
        Instant::now() + margin >= s.access_deadline
    }

    /// The session with an access token fit to forward (refreshing first if it is due).
    /// The hot path is one comparison.
    pub async fn fresh(&self, s: Arc<Session>) -> Result<Arc<Session>, Error> {
        if !self.due(&s) {
            return Ok(s);
        }
        self.refresh(s, false).await
    }

    /// After the upstream rejected the token: refresh once, unless someone already did.
    pub async fn after_rejection(&self, s: Arc<Session>) -> Result<Arc<Session>, Error> {
        self.refresh(s, true).await
    }

    async fn refresh(&self, seen: Arc<Session>, rejected: bool) -> Result<Arc<Session>, Error> {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            locks.entry(seen.handle.clone()).or_default().clone()
        };
        self.metrics.waiters.fetch_add(1, Ordering::Relaxed);
        let guard = tokio::time::timeout(self.wait, lock.lock()).await;
        self.metrics.waiters.fetch_sub(1, Ordering::Relaxed);
        let result = match guard {
            Ok(_guard) => self.refresh_locked(&seen, rejected).await,
            Err(_) => Err(Error::IdpUnavailable {
                source: Some("timed out waiting for a token refresh".into()),
                retry_after: RETRY_AFTER_SECS,
            }),
        };
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        // The map's reference and ours: nobody else waits on it any more.
        if Arc::strong_count(&lock) <= 2 {
            locks.remove(&seen.handle);
        }
        result
    }

    async fn refresh_locked(&self, seen: &Session, rejected: bool) -> Result<Arc<Session>, Error> {
        // Whoever held the lock before us may have refreshed already (here or on another
        // instance): the store is the truth.
        let Some(current) = self.sessions.reload(seen).await? else {
            return Err(Error::SessionExpired {
                login_url: super::LOGIN_PATH.into(),
                clear_cookie: true,
            });
        };
        let now = session::now();
        if current.version != seen.version && (rejected || !self.due(&current)) {
            return Ok(current);
        }
        if !rejected && !self.due(&current) {
            return Ok(current);
        }
        let Some(refresh_token) = current.data.refresh_token.clone() else {
            return if current.token_valid() && !rejected {
                Ok(current)
            } else {
                self.end(&current, "no refresh token").await
            };
        };
        let spent = secret::sha256(refresh_token.expose().as_bytes());
        if let Some(version) = self.recent.get(&spent)
            && version >= current.version
        {
            // Refreshed moments ago by a racing request whose write we have not seen yet.
            self.metrics.grace_hits.fetch_add(1, Ordering::Relaxed);
            if let Some(s) = self.sessions.reload(&current).await? {
                return Ok(s);
            }
        }
        self.metrics.refreshes.fetch_add(1, Ordering::Relaxed);
        let tokens = match self.provider.refresh(&refresh_token).await {
            Ok(t) => t,
            Err(e) if e.ends_session() => return self.end(&current, &e.to_string()).await,
            Err(e) => return self.blip(current, e, rejected),
        };
        let mut data = SessionData {
            access_token: tokens.access_token,
            access_expires_at: tokens.access_expires_at,
            access_issued_at: now,
            refresh_token: tokens
                .refresh_token
                .or_else(|| current.data.refresh_token.clone()),
            ..current.data.clone()
        };
        if let Some(id_token) = tokens.id_token {
            match id_token::validate(&self.provider, id_token.expose(), Expected { nonce: None })
                .await
            {
                Ok(claims) => {
                    // OpenID Connect Core §12.2: same iss, sub and aud, or the session ends.
                    let same = claims.get("sub").and_then(Value::as_str) == Some(data.sub.as_str())
                        && claims.get("iss").and_then(Value::as_str) == Some(data.iss.as_str())
                        && claims.get("aud") == current.data.claims.get("aud");
                    if !same {
                        return self
                            .end(
                                &current,
                                "refreshed ID token names another subject, issuer or audience",
                            )
                            .await;
                    }
                    data.claims = login_claims(claims);
                    data.id_token = id_token;
                }
                Err(Ok(e)) => return self.end(&current, &e.to_string()).await,
                Err(Err(e)) => return Err(e),
            }
        }
        match self.sessions.update(&current, data).await? {
            Some(updated) => {
                self.recent.insert(spent, updated.version);
                tracing::info!(
                    target: "coatcheck::refresh",
                    session = %updated.handle,
                    refreshes = self.metrics.refreshes.load(Ordering::Relaxed),
                    ended = self.metrics.ended_sessions.load(Ordering::Relaxed),
                    provider_failures = self.metrics.provider_failures.load(Ordering::Relaxed),
                    waiters = self.metrics.waiters.load(Ordering::Relaxed),
                    "access token refreshed"
                );
                Ok(updated)
            }
            // Another instance won the compare-and-set: its result is in the store.
            None => self
                .sessions
                .reload(&current)
                .await?
                .ok_or(Error::SessionExpired {
                    login_url: super::LOGIN_PATH.into(),
                    clear_cookie: true,
                }),
        }
    }

    async fn end(&self, s: &Session, why: &str) -> Result<Arc<Session>, Error> {
        self.metrics.ended_sessions.fetch_add(1, Ordering::Relaxed);
        tracing::info!(target: "coatcheck::refresh", session = %s.handle, reason = why, "refresh refused; session ended");
        self.sessions.delete(&s.handle).await?;
        Err(Error::SessionExpired {
            login_url: super::LOGIN_PATH.into(),
            clear_cookie: true,
        })
    }

    fn blip(
        &self,
        current: Arc<Session>,
        e: OidcError,
        rejected: bool,
    ) -> Result<Arc<Session>, Error> {
        self.metrics
            .provider_failures
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(target: "coatcheck::refresh", session = %current.handle, error = %e, failures = self.metrics.provider_failures.load(Ordering::Relaxed), "refresh failed; identity provider unavailable");
        if !rejected && current.token_valid() {
            return Ok(current);
        }
        Err(Error::IdpUnavailable {
            source: Some(Box::new(e)),
            retry_after: RETRY_AFTER_SECS,
        })
    }
}

/// The claims kept from an ID token: everything but values tied to one token or login.
pub fn login_claims(mut claims: serde_json::Map<String, Value>) -> serde_json::Map<String, Value> {
    for k in ["nonce", "at_hash", "c_hash", "s_hash"] {
        claims.remove(k);
    }
    claims
}
