//! Token refresh that never logs a user out by mistake.
//!
//! - **Proactive**: a token with less than `oidc.refresh_before_expiry` left (capped at half its
//!   lifetime, so short-lived tokens do not refresh on every request) is refreshed before the
//!   request is forwarded.
//! - **Single flight, across instances**: one request holds the session's refresh [`Lease`]; the
//!   others (on any instance) wait for its release, bounded by `oidc.refresh_wait`, then re-read
//!   the session from the store and use its result without calling the provider. The new tokens
//!   are stored with a compare-and-set on the session version before anyone uses them.
//! - **Rotation grace**: a refresh token is marked spent in the [`OnceSet`] for
//!   `oidc.rotation_grace` before it is presented, so no instance presents it twice (the
//!   provider's reuse detection would punish that by revoking the grant); whoever finds it spent
//!   waits for the spender's result in the store.
//! - **End vs blip**: `invalid_grant`-class answers end the session; a provider that is down does
//!   not: the current access token is used while valid, then 503 with `Retry-After`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::issuer::{Issuer, IssuerError, Issuers};
use crate::config;
use crate::error::Error;
use crate::metrics::{Metrics, Open, RefreshResult};
use crate::secret;
use crate::session::store::{Backend, EndReason, Event, Events, Lease, OnceSet, StoreError};
use crate::session::{self, Session, Sessions};

/// A waiter re-reads the store at least this often, even without hearing the lease's release.
const WAIT_POLL: Duration = Duration::from_millis(100);

/// `Retry-After` seconds when the provider is unavailable.
pub(crate) const RETRY_AFTER_SECS: u64 = 5;

/// What the lease holder found.
enum Step {
    /// The session to forward with.
    Done(Arc<Session>),
    /// Its refresh token was already presented by someone whose result is not in the store yet.
    Wait,
}

/// The refresher.
pub(crate) struct Refresher {
    /// The token issuers: a session is refreshed by the one that made it.
    issuers: Arc<Issuers>,
    sessions: Arc<Sessions>,
    /// The lease, the spent-token set and the release announcements.
    backend: Arc<Backend>,
    wait: Duration,
    grace: Duration,
    /// How long a refresh lease lives if its holder dies: long enough for the provider calls.
    lease_ttl: Duration,
    metrics: Arc<Metrics>,
    /// The `login_url` of a 401 `session_expired`.
    login_url: String,
}

impl Refresher {
    pub(crate) fn new(
        issuers: Arc<Issuers>,
        sessions: Arc<Sessions>,
        oidc: Option<&config::Oidc>,
        login_url: String,
        metrics: Arc<Metrics>,
    ) -> Refresher {
        let timeout = oidc.map_or(config::DEFAULT_IDP_TIMEOUT, |o| o.timeout);
        Refresher {
            issuers,
            backend: sessions.backend().clone(),
            sessions,
            wait: oidc.map_or(config::DEFAULT_REFRESH_WAIT, |o| o.refresh_wait),
            grace: oidc.map_or(config::DEFAULT_ROTATION_GRACE, |o| o.rotation_grace),
            lease_ttl: timeout * 2 + Duration::from_secs(2),
            metrics,
            login_url,
        }
    }

    /// 401 `session_expired`, pointing at where this configuration logs in.
    fn expired(&self) -> Error {
        Error::SessionExpired {
            login_url: self.login_url.clone(),
            clear_cookie: true,
        }
    }

    /// Whether the access token should be refreshed now: judged on the monotonic clock
    /// ([`Session::access_deadline`]), so a wall-clock jump neither forces nor skips a refresh.
    pub(crate) fn due(&self, s: &Session) -> bool {
        self.due_at(s, Instant::now())
    }

    /// [`Self::due`] at `now`, a reading of the clock the caller already has.
    pub(crate) fn due_at(&self, s: &Session, now: Instant) -> bool {
        let lifetime = s.access_expires_at.saturating_sub(s.access_issued_at);
        let margin = self
            .issuers
            .refresh_before(s.issuer())
            .min(Duration::from_secs(lifetime / 2));
        now + margin >= s.access_deadline
    }

    /// The session with an access token fit to forward (refreshing first if it is due).
    /// The hot path is one comparison.
    pub(crate) async fn fresh(&self, s: Arc<Session>) -> Result<Arc<Session>, Error> {
        if !self.due(&s) {
            return Ok(s);
        }
        // Boxed, here and below: the refresh (a lease, a token request) is a large future that
        // would otherwise be part of every forwarded request's future, and moved with it.
        Box::pin(self.traced_refresh(s, false)).await
    }

    /// After the upstream rejected the token: refresh once, unless someone already did.
    pub(crate) async fn after_rejection(&self, s: Arc<Session>) -> Result<Arc<Session>, Error> {
        Box::pin(self.traced_refresh(s, true)).await
    }

    /// [`Self::refresh`] inside a `session.refresh` span (its outcome: `ok` or the error code).
    async fn traced_refresh(&self, s: Arc<Session>, rejected: bool) -> Result<Arc<Session>, Error> {
        let mut span = crate::trace::session_refresh();
        let r = self.refresh(s, rejected).await;
        span.outcome(r.as_ref().map_or_else(Error::code, |_| "ok"));
        r
    }

    async fn refresh(&self, seen: Arc<Session>, rejected: bool) -> Result<Arc<Session>, Error> {
        let key = format!("refresh:{}", seen.handle());
        let deadline = Instant::now() + self.wait;
        let mut released = self.backend.subscribe();
        loop {
            match self.backend.acquire(&key, self.lease_ttl).await {
                Ok(Some(token)) => {
                    let step = self.refresh_locked(&seen, rejected).await;
                    if let Err(e) = self.backend.release(&key, &token).await {
                        tracing::warn!(session = %seen.handle(), error = %e, "could not release the refresh lease; it expires by itself");
                    }
                    if let Step::Done(s) = step? {
                        return Ok(s);
                    }
                    // The spender's result is not in the store yet: look again shortly.
                    if Instant::now() >= deadline {
                        return self.gave_up_waiting(seen, rejected);
                    }
                    tokio::time::sleep_until(deadline.min(Instant::now() + WAIT_POLL).into()).await;
                    continue;
                }
                Ok(None) => {}
                Err(e) => return self.store_blip(seen, rejected, e),
            }
            if Instant::now() >= deadline {
                return self.gave_up_waiting(seen, rejected);
            }
            // Someone else holds the lease (here or on another instance): wait for its release,
            // then take its result from the store.
            let until = deadline.min(Instant::now() + WAIT_POLL);
            {
                let _waiting = Open::new(&self.metrics.refresh_waiters);
                wait_release(&mut released, &key, until).await;
            }
            match self.sessions.reload(&seen).await {
                Ok(Some(current))
                    if current.version != seen.version && (rejected || !self.due(&current)) =>
                {
                    self.metrics.refresh(RefreshResult::Shared);
                    return Ok(current);
                }
                Ok(Some(_)) => {}
                Ok(None) => return Err(self.expired()),
                Err(Error::StoreUnavailable(e)) => {
                    return self.store_blip(seen, rejected, StoreError::Unavailable(e));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The store could not coordinate the refresh: nobody is logged out for that. The current
    /// token serves while it is valid, then 503.
    fn store_blip(
        &self,
        seen: Arc<Session>,
        rejected: bool,
        e: StoreError,
    ) -> Result<Arc<Session>, Error> {
        self.metrics.refresh(RefreshResult::StoreUnavailable);
        tracing::warn!(target: "coatcheck::refresh", session = %seen.handle(), error = %e, "refresh postponed; session store unavailable");
        if !rejected && seen.token_valid() {
            return Ok(seen);
        }
        Err(e.into())
    }

    fn gave_up_waiting(&self, seen: Arc<Session>, rejected: bool) -> Result<Arc<Session>, Error> {
        self.metrics.refresh(RefreshResult::WaitTimeout);
        if !rejected && seen.token_valid() {
            return Ok(seen);
        }
        Err(Error::IdpUnavailable {
            source: Some("timed out waiting for a token refresh".into()),
            retry_after: RETRY_AFTER_SECS,
        })
    }

    async fn refresh_locked(&self, seen: &Session, rejected: bool) -> Result<Step, Error> {
        // Whoever held the lease before us may have refreshed already (here or on another
        // instance): the store is the truth.
        let Some(current) = self.sessions.reload(seen).await? else {
            return Err(self.expired());
        };
        let now = session::now();
        if current.version != seen.version && (rejected || !self.due(&current)) {
            self.metrics.refresh(RefreshResult::Shared);
            return Ok(Step::Done(current));
        }
        if !rejected && !self.due(&current) {
            return Ok(Step::Done(current));
        }
        let Some(refresh_token) = current.refresh_token() else {
            return if current.token_valid() && !rejected {
                Ok(Step::Done(current))
            } else {
                self.end(&current, "no refresh token", RefreshResult::NoRefreshToken)
                    .await
            };
        };
        let spent = format!(
            "spent:{}",
            secret::hex(&secret::sha256(refresh_token.expose().as_bytes()))
        );
        match self.backend.first_use(&spent, self.grace).await {
            Ok(true) => {}
            // Presented moments ago by a request whose result is not in the store yet.
            Ok(false) => return Ok(Step::Wait),
            Err(e) => return self.store_blip(current, rejected, e).map(Step::Done),
        }
        let issued = match self.issuers.get(current.issuer()) {
            Ok(issuer) => {
                issuer
                    .refresh(&current.full_data(), &refresh_token, now)
                    .await
            }
            Err(e) => Err(e),
        };
        let data = match issued {
            Ok(data) => data,
            Err(IssuerError::Refused(why)) => {
                return self.end(&current, &why, RefreshResult::InvalidGrant).await;
            }
            Err(e @ IssuerError::Unavailable(_)) => {
                // The issuer did not take the token: it may be presented again.
                if let Err(e) = self.backend.forget(&spent).await {
                    tracing::warn!(error = %e, "could not clear a spent-token mark; it expires by itself");
                }
                return self.blip(current, e, rejected).map(Step::Done);
            }
        };
        match self.sessions.update(&current, data).await? {
            Some(updated) => {
                self.metrics.refresh(RefreshResult::Ok);
                tracing::info!(target: "coatcheck::refresh", session = %updated.handle(), "access token refreshed");
                Ok(Step::Done(updated))
            }
            // Another instance won the compare-and-set: its result is in the store.
            None => {
                self.metrics.refresh(RefreshResult::Shared);
                self.sessions
                    .reload(&current)
                    .await?
                    .map(Step::Done)
                    .ok_or_else(|| self.expired())
            }
        }
    }

    async fn end(&self, s: &Session, why: &str, result: RefreshResult) -> Result<Step, Error> {
        self.metrics.refresh(result);
        tracing::info!(target: "coatcheck::refresh", session = %s.handle(), reason = why, "refresh refused; session ended");
        self.sessions
            .delete(&s.handle(), EndReason::Revoked)
            .await?;
        Err(self.expired())
    }

    fn blip(
        &self,
        current: Arc<Session>,
        e: IssuerError,
        rejected: bool,
    ) -> Result<Arc<Session>, Error> {
        self.metrics.refresh(if is_timeout(&e) {
            RefreshResult::Timeout
        } else {
            RefreshResult::IdpUnavailable
        });
        tracing::warn!(target: "coatcheck::refresh", session = %current.handle(), error = %e, "refresh failed; identity provider unavailable");
        if !rejected && current.token_valid() {
            return Ok(current);
        }
        Err(Error::IdpUnavailable {
            source: Some(Box::new(e)),
            retry_after: RETRY_AFTER_SECS,
        })
    }
}

/// Whether an error (or one of its sources) is an HTTP client timeout.
pub(crate) fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if e.downcast_ref::<reqwest::Error>()
            .is_some_and(reqwest::Error::is_timeout)
        {
            return true;
        }
        cur = e.source();
    }
    false
}

/// Waits until `key`'s lease is announced released, or until `until`.
async fn wait_release(
    events: &mut tokio::sync::broadcast::Receiver<Event>,
    key: &str,
    until: Instant,
) {
    let _ = tokio::time::timeout_at(until.into(), async {
        loop {
            match events.recv().await {
                Ok(Event::Released { key: k }) if k == key => return,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                // No channel: fall back to the poll interval.
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    std::future::pending::<()>().await
                }
            }
        }
    })
    .await;
}

/// The claims kept from an ID token: everything but values tied to one token or login.
pub(crate) fn login_claims(
    mut claims: serde_json::Map<String, Value>,
) -> crate::session::claims::Claims {
    for k in ["nonce", "at_hash", "c_hash", "s_hash"] {
        claims.remove(k);
    }
    crate::session::claims::Claims::new(&claims)
}
