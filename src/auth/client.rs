//! Machine tokens for `auth = "client"` routes: coatcheck's own client-credentials token
//! (RFC 6749 §4.4), obtained from `[oidc]`'s token endpoint and injected as `Authorization: Bearer`.
//! No user, no session, no cookie is involved.
//!
//! - **One cache per grant set.** A route asks for a set of scopes and at most one audience; routes
//!   asking for the same set share one token, different sets never do. The caches are made at
//!   start-up from the routes, so nothing grows per request.
//! - **Cached until near expiry.** A token is renewed `oidc.refresh_before_expiry` before it expires,
//!   capped at half its lifetime (as session tokens are).
//! - **Single flight.** One request runs the grant; requests arriving meanwhile keep using the
//!   current token while it is valid, or wait for the grant (at most `oidc.refresh_wait`).
//! - **Outages.** A failed grant is not retried for `RETRY_AFTER_SECS`; meanwhile a still-valid
//!   token keeps being used and without one the answer is 503 `idp_unavailable` with `Retry-After`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use http::HeaderValue;
use tokio::time::Instant;

use super::issuer::{ClientGrant, IssuerError};
use super::oidc::TokenResponse;
use super::refresh::RETRY_AFTER_SECS;
use crate::config::{self, AuthMode, Route};
use crate::error::Error;

/// What a route asks the provider for: its scopes (sorted, deduplicated by config validation) and
/// its audience.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct GrantSet {
    scopes: Vec<String>,
    audience: Option<String>,
}

impl GrantSet {
    fn of(route: &Route) -> GrantSet {
        GrantSet {
            scopes: route.scopes.clone(),
            audience: route.audience.clone(),
        }
    }
}

/// A cached token, judged on the monotonic clock.
struct Token {
    /// `Bearer <access token>`, marked sensitive.
    bearer: HeaderValue,
    expires: Instant,
    /// When a new token is fetched (before `expires`).
    renew_at: Instant,
}

impl Token {
    fn new(t: TokenResponse, refresh_before: Duration) -> Result<Token, IssuerError> {
        let lifetime =
            Duration::from_secs(t.access_expires_at.saturating_sub(crate::session::now()));
        if lifetime.is_zero() {
            return Err(IssuerError::Unavailable(
                "the client-credentials token has already expired".into(),
            ));
        }
        // validate_token_response checked that it makes a header value.
        let mut bearer = HeaderValue::from_str(&format!("Bearer {}", t.access_token.expose()))
            .map_err(|_| {
                IssuerError::Unavailable("the access token is not a header value".into())
            })?;
        bearer.set_sensitive(true);
        let expires = Instant::now() + lifetime;
        Ok(Token {
            bearer,
            expires,
            renew_at: expires - refresh_before.min(lifetime / 2),
        })
    }
}

/// The token of one grant set.
struct Cache {
    set: GrantSet,
    token: RwLock<Option<Arc<Token>>>,
    /// Held by the one request running the grant; remembers the last failure.
    flight: tokio::sync::Mutex<Flight>,
}

#[derive(Default)]
struct Flight {
    failed_at: Option<Instant>,
}

/// The machine tokens of every `auth = "client"` route.
pub(crate) struct ClientTokens<G> {
    issuer: Arc<G>,
    /// Shared with the `ClientTokens` of a reloaded configuration, so a token outlives a reload.
    caches: HashMap<GrantSet, Arc<Cache>>,
    refresh_before: Duration,
    /// How long a request without a valid token waits for a grant in flight.
    wait: Duration,
}

impl<G: ClientGrant> ClientTokens<G> {
    /// One cache per distinct grant set of the `auth = "client"` routes.
    pub(crate) fn new(issuer: Arc<G>, routes: &[Route], oidc: &config::Oidc) -> ClientTokens<G> {
        let mut caches = HashMap::new();
        for r in routes.iter().filter(|r| r.auth == AuthMode::Client) {
            let set = GrantSet::of(r);
            caches
                .entry(set.clone())
                .or_insert_with(|| Arc::new(Cache::new(set)));
        }
        ClientTokens {
            issuer,
            caches,
            refresh_before: oidc.refresh_before_expiry,
            wait: oidc.refresh_wait,
        }
    }

    /// The caches of `routes` (after a reload): a grant set already cached keeps its token; a new
    /// one starts empty; one no route asks for any more is dropped.
    pub(crate) fn reconfigured(&self, routes: &[Route]) -> ClientTokens<G> {
        let mut caches = HashMap::new();
        for r in routes.iter().filter(|r| r.auth == AuthMode::Client) {
            let set = GrantSet::of(r);
            let cache = match self.caches.get(&set) {
                Some(c) => c.clone(),
                None => Arc::new(Cache::new(set.clone())),
            };
            caches.entry(set).or_insert(cache);
        }
        ClientTokens {
            issuer: self.issuer.clone(),
            caches,
            refresh_before: self.refresh_before,
            wait: self.wait,
        }
    }

    /// The `Authorization` value for a request to `route`. The hot path is a map lookup, a read
    /// lock and one comparison.
    pub(crate) async fn bearer(&self, route: &Route) -> Result<HeaderValue, Error> {
        // The caches are made from the same routes the router holds: a miss is a bug. Fail closed.
        let cache = self.caches.get(&GrantSet::of(route)).ok_or_else(|| {
            Error::internal(format!(
                "route[{}] has no client-credentials cache",
                route.index
            ))
        })?;
        let now = Instant::now();
        let current = cache.current();
        if let Some(t) = current.as_ref().filter(|t| now < t.renew_at) {
            return Ok(t.bearer.clone());
        }
        let valid = current.filter(|t| now < t.expires);
        let flight = match (cache.flight.try_lock(), valid) {
            (Ok(flight), _) => flight,
            // Someone is renewing: the current token still serves meanwhile.
            (Err(_), Some(t)) => return Ok(t.bearer.clone()),
            (Err(_), None) => match tokio::time::timeout(self.wait, cache.flight.lock()).await {
                Ok(flight) => flight,
                Err(_) => return Err(unavailable(None)),
            },
        };
        self.renew(cache, flight).await
    }

    /// Runs the grant unless the flight before ours already renewed the token or failed recently.
    async fn renew(
        &self,
        cache: &Cache,
        mut flight: tokio::sync::MutexGuard<'_, Flight>,
    ) -> Result<HeaderValue, Error> {
        let now = Instant::now();
        let current = cache.current();
        if let Some(t) = current.as_ref().filter(|t| now < t.renew_at) {
            return Ok(t.bearer.clone());
        }
        let valid = current.filter(|t| now < t.expires);
        let backoff = Duration::from_secs(RETRY_AFTER_SECS);
        if flight.failed_at.is_some_and(|at| now < at + backoff) {
            return valid
                .map(|t| t.bearer.clone())
                .ok_or_else(|| unavailable(None));
        }
        let set = &cache.set;
        let result = self
            .issuer
            .client_credentials(&set.scopes, set.audience.as_deref())
            .await
            .and_then(|t| Token::new(t, self.refresh_before));
        match result {
            Ok(token) => {
                tracing::info!(
                    scopes = ?set.scopes,
                    audience = ?set.audience,
                    expires_in_s = token.expires.saturating_duration_since(Instant::now()).as_secs(),
                    "client-credentials token obtained"
                );
                let token = Arc::new(token);
                *cache.token.write().unwrap_or_else(|p| p.into_inner()) = Some(token.clone());
                flight.failed_at = None;
                Ok(token.bearer.clone())
            }
            Err(e) => {
                flight.failed_at = Some(Instant::now());
                tracing::warn!(
                    scopes = ?set.scopes,
                    audience = ?set.audience,
                    error = %e,
                    cached_token_still_valid = valid.is_some(),
                    retry_in_s = RETRY_AFTER_SECS,
                    "client-credentials grant failed"
                );
                valid
                    .map(|t| t.bearer.clone())
                    .ok_or_else(|| unavailable(Some(e)))
            }
        }
    }
}

impl Cache {
    fn new(set: GrantSet) -> Cache {
        Cache {
            set,
            token: RwLock::new(None),
            flight: tokio::sync::Mutex::new(Flight::default()),
        }
    }

    fn current(&self) -> Option<Arc<Token>> {
        self.token.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// 503 `idp_unavailable`: no valid token and none to be had right now.
fn unavailable(source: Option<IssuerError>) -> Error {
    Error::IdpUnavailable {
        source: source.map(|e| Box::new(e) as _),
        retry_after: RETRY_AFTER_SECS,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::config::Config;
    use crate::secret::Secret;

    /// A provider that counts grants, takes `delay` per grant and can be switched off.
    struct Fake {
        grants: AtomicUsize,
        lifetime: u64,
        delay: Duration,
        down: std::sync::atomic::AtomicBool,
        asked: Mutex<Vec<(Vec<String>, Option<String>)>>,
    }

    impl Fake {
        fn new(lifetime: u64, delay: Duration) -> Arc<Fake> {
            Arc::new(Fake {
                grants: AtomicUsize::new(0),
                lifetime,
                delay,
                down: Default::default(),
                asked: Mutex::default(),
            })
        }
    }

    impl ClientGrant for Fake {
        async fn client_credentials(
            &self,
            scopes: &[String],
            audience: Option<&str>,
        ) -> Result<TokenResponse, IssuerError> {
            tokio::time::sleep(self.delay).await;
            if self.down.load(Ordering::SeqCst) {
                return Err(IssuerError::Unavailable("down".into()));
            }
            let n = self.grants.fetch_add(1, Ordering::SeqCst) + 1;
            self.asked
                .lock()
                .unwrap()
                .push((scopes.to_vec(), audience.map(str::to_owned)));
            Ok(TokenResponse {
                access_token: Secret::new(format!("t{n}")),
                access_expires_at: crate::session::now() + self.lifetime,
                refresh_token: None,
                id_token: None,
            })
        }
    }

    fn config(routes: &str) -> Config {
        let dir = std::env::temp_dir();
        let c = dir.join("coatcheck-client-test.crt");
        std::fs::write(&c, "x").unwrap();
        let c = c.display();
        Config::from_toml(
            &format!(
                "[server]\nlisten = \"127.0.0.1:0\"\npublic_origin = \"https://localhost:8443\"\n\
                 [server.tls]\ncert = \"{c}\"\nkey = \"{c}\"\n\
                 [session]\nkeys = [\"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"]\n\
                 [oidc]\nissuer = \"http://127.0.0.1:1\"\nclient_id = \"c\"\nclient_secret = \"s\"\n\
                 refresh_before_expiry = \"60s\"\nrefresh_wait = \"15s\"\n{routes}"
            ),
            Path::new("t.toml"),
        )
        .unwrap()
    }

    fn tokens(fake: &Arc<Fake>, c: &Config) -> ClientTokens<Fake> {
        ClientTokens::new(fake.clone(), &c.routes, c.oidc.as_ref().unwrap())
    }

    const TWO_ROUTES: &str = "[[route]]\npath = \"/a/\"\nupstream = \"http://127.0.0.1:1\"\nauth = \"client\"\nscopes = [\"read\", \"api\"]\n\
         [[route]]\npath = \"/b/\"\nupstream = \"http://127.0.0.1:1\"\nauth = \"client\"\nscopes = [\"api\", \"read\", \"api\"]\n\
         [[route]]\npath = \"/c/\"\nupstream = \"http://127.0.0.1:1\"\nauth = \"client\"\nscopes = [\"write\"]\naudience = \"urn:x\"\n\
         [[route]]\npath = \"/\"\nupstream = \"http://127.0.0.1:1\"\nauth = \"none\"\n";

    fn bearer_text(v: &HeaderValue) -> &str {
        v.to_str().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_hundred_concurrent_requests_cause_one_grant() {
        let fake = Fake::new(300, Duration::from_millis(200));
        let c = config(TWO_ROUTES);
        let t = Arc::new(tokens(&fake, &c));
        let route = c.routes[0].clone();
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let (t, route) = (t.clone(), route.clone());
            tasks.push(tokio::spawn(async move { t.bearer(&route).await }));
        }
        for task in tasks {
            let v = task.await.unwrap().unwrap();
            assert_eq!(bearer_text(&v), "Bearer t1");
            assert!(v.is_sensitive());
        }
        assert_eq!(fake.grants.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_keeps_the_token_of_a_grant_set_still_in_use_and_adds_new_sets() {
        let fake = Fake::new(300, Duration::ZERO);
        let before = config(TWO_ROUTES);
        let t = tokens(&fake, &before);
        let a = t.bearer(&before.routes[0]).await.unwrap();
        // Route /a/ keeps its scopes under another path; /c/ goes; /d/ asks for a new set.
        let after = config(
            "[[route]]\npath = \"/moved/\"\nupstream = \"http://127.0.0.1:1\"\nauth = \"client\"\nscopes = [\"api\", \"read\"]\n\
             [[route]]\npath = \"/d/\"\nupstream = \"http://127.0.0.1:1\"\nauth = \"client\"\nscopes = [\"new\"]\n",
        );
        let r = t.reconfigured(&after.routes);
        assert_eq!(r.caches.len(), 2);
        assert_eq!(r.bearer(&after.routes[0]).await.unwrap(), a);
        assert_eq!(
            fake.grants.load(Ordering::SeqCst),
            1,
            "no new grant for a kept set"
        );
        assert_ne!(r.bearer(&after.routes[1]).await.unwrap(), a);
        assert!(
            r.bearer(&before.routes[2]).await.is_err(),
            "a dropped set fails closed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn routes_with_the_same_set_share_a_token_and_other_sets_get_their_own() {
        let fake = Fake::new(300, Duration::ZERO);
        let c = config(TWO_ROUTES);
        let t = tokens(&fake, &c);
        assert_eq!(t.caches.len(), 2);
        let a = t.bearer(&c.routes[0]).await.unwrap();
        let b = t.bearer(&c.routes[1]).await.unwrap();
        let other = t.bearer(&c.routes[2]).await.unwrap();
        assert_eq!(a, b);
        assert_ne!(a, other);
        assert_eq!(fake.grants.load(Ordering::SeqCst), 2);
        let asked = fake.asked.lock().unwrap().clone();
        assert_eq!(asked[0], (vec!["api".into(), "read".into()], None));
        assert_eq!(asked[1], (vec!["write".into()], Some("urn:x".into())));
    }

    #[tokio::test(start_paused = true)]
    async fn the_token_is_renewed_within_the_margin_capped_at_half_its_lifetime() {
        // 60 s margin, 20 s lifetime: renewed after 10 s, not on every request.
        let fake = Fake::new(20, Duration::ZERO);
        let c = config(TWO_ROUTES);
        let t = tokens(&fake, &c);
        let r = &c.routes[0];
        assert_eq!(bearer_text(&t.bearer(r).await.unwrap()), "Bearer t1");
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(bearer_text(&t.bearer(r).await.unwrap()), "Bearer t1");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(bearer_text(&t.bearer(r).await.unwrap()), "Bearer t2");
        assert_eq!(fake.grants.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn during_a_renewal_requests_keep_the_valid_token_without_waiting() {
        let fake = Fake::new(20, Duration::from_secs(3));
        let c = config(TWO_ROUTES);
        let t = Arc::new(tokens(&fake, &c));
        let r = c.routes[0].clone();
        t.bearer(&r).await.unwrap();
        tokio::time::advance(Duration::from_secs(11)).await;
        let renewing = {
            let (t, r) = (t.clone(), r.clone());
            tokio::spawn(async move { t.bearer(&r).await })
        };
        tokio::task::yield_now().await;
        let started = Instant::now();
        assert_eq!(bearer_text(&t.bearer(&r).await.unwrap()), "Bearer t1");
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(bearer_text(&renewing.await.unwrap().unwrap()), "Bearer t2");
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_keeps_a_valid_token_then_answers_503_without_hammering_the_provider() {
        let fake = Fake::new(20, Duration::ZERO);
        let c = config(TWO_ROUTES);
        let t = tokens(&fake, &c);
        let r = &c.routes[0];
        t.bearer(r).await.unwrap();
        fake.down.store(true, Ordering::SeqCst);
        tokio::time::advance(Duration::from_secs(11)).await;
        // Due, the grant fails: the token is still valid for 9 s and keeps serving.
        assert_eq!(bearer_text(&t.bearer(r).await.unwrap()), "Bearer t1");
        tokio::time::advance(Duration::from_secs(10)).await;
        let e = t.bearer(r).await.unwrap_err();
        assert_eq!(e.code(), "idp_unavailable");
        assert!(
            matches!(e, Error::IdpUnavailable { retry_after, .. } if retry_after == RETRY_AFTER_SECS)
        );
        // Within the back-off nobody calls the provider again.
        let grants = fake.grants.load(Ordering::SeqCst);
        fake.down.store(false, Ordering::SeqCst);
        assert!(t.bearer(r).await.is_err());
        assert_eq!(fake.grants.load(Ordering::SeqCst), grants);
        tokio::time::advance(Duration::from_secs(RETRY_AFTER_SECS)).await;
        assert_eq!(bearer_text(&t.bearer(r).await.unwrap()), "Bearer t2");
    }

    #[tokio::test(start_paused = true)]
    async fn a_route_whose_set_was_not_known_at_start_up_fails_closed() {
        let fake = Fake::new(20, Duration::ZERO);
        let c = config(TWO_ROUTES);
        let t = tokens(&fake, &c);
        let mut r = c.routes[0].clone();
        r.scopes = vec!["admin".into()];
        assert_eq!(t.bearer(&r).await.unwrap_err().code(), "internal");
        assert_eq!(fake.grants.load(Ordering::SeqCst), 0);
    }
}
