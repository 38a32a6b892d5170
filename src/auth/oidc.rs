//! The identity provider: discovery, JWKS, and the token, revocation and end-session endpoints.
//!
//! Metadata is fetched in the background with backoff until it succeeds, so coatcheck starts (and
//! serves `auth = "none"` routes) while the provider is down; logins answer 503 `idp_unavailable`
//! meanwhile. Every call has a timeout and a response size limit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use url::Url;

use crate::config::{self, ClientAuth};
use crate::error::{BoxError, Error};
use crate::metrics::{IdpEndpoint, Metrics};
use crate::secret::Secret;
use crate::tls::{self, TlsError};
use crate::trace::{self, ChildSpan};

/// Largest response accepted from the provider (discovery, JWKS, tokens).
pub(crate) const MAX_RESPONSE_BYTES: usize = 256 * 1024;
/// An unknown `kid` refetches the JWKS at most this often.
pub(crate) const JWKS_REFETCH_INTERVAL: Duration = Duration::from_secs(30);
/// Discovery retries back off up to this interval.
pub(crate) const DISCOVERY_MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Access-token lifetime assumed when the provider gives neither `expires_in` nor a JWT `exp`.
pub(crate) const DEFAULT_ACCESS_TOKEN_LIFETIME: u64 = 300;
/// Longest access-token lifetime believed (seconds, a year): a larger (or absurd) `expires_in` is
/// capped, so no timestamp arithmetic can overflow.
pub(crate) const MAX_ACCESS_TOKEN_LIFETIME: u64 = 365 * 24 * 3600;

/// A failed call to the provider: either it is unavailable (network, timeout, 5xx, garbage) or it
/// answered with an OAuth error (RFC 6749 §5.2).
#[derive(Debug, thiserror::Error)]
pub(crate) enum OidcError {
    #[error("identity provider unavailable: {0}")]
    Unavailable(#[source] BoxError),
    #[error("identity provider refused: {error}")]
    Rejected { error: String, status: u16 },
    #[error("identity provider answered something invalid: {0}")]
    Invalid(String),
}

impl OidcError {
    /// Whether the answer means the grant is gone for good (the session must end).
    pub(crate) fn ends_session(&self) -> bool {
        matches!(self, OidcError::Rejected { error, .. } if matches!(error.as_str(), "invalid_grant" | "invalid_client" | "unauthorized_client" | "unsupported_grant_type" | "invalid_scope" | "invalid_request"))
    }

    /// As a request error: the provider is unavailable.
    pub(crate) fn into_unavailable(self) -> Error {
        Error::IdpUnavailable {
            source: Some(Box::new(self)),
            retry_after: 5,
        }
    }
}

/// Provider metadata (OpenID Connect Discovery 1.0 §3), the parts coatcheck uses.
#[derive(Debug, Deserialize)]
pub(crate) struct Metadata {
    pub(crate) issuer: String,
    pub(crate) authorization_endpoint: Url,
    pub(crate) token_endpoint: Url,
    pub(crate) jwks_uri: Url,
    pub(crate) end_session_endpoint: Option<Url>,
    pub(crate) revocation_endpoint: Option<Url>,
    #[serde(default)]
    pub(crate) code_challenge_methods_supported: Vec<String>,
    /// RFC 9207 §3: the provider puts `iss` in every authorization response; coatcheck then
    /// requires it.
    #[serde(default)]
    pub(crate) authorization_response_iss_parameter_supported: bool,
}

/// A token endpoint answer (RFC 6749 §5.1), validated.
pub(crate) struct TokenResponse {
    pub(crate) access_token: Secret,
    /// Unix seconds.
    pub(crate) access_expires_at: u64,
    pub(crate) refresh_token: Option<Secret>,
    pub(crate) id_token: Option<Secret>,
}

#[derive(Deserialize)]
struct RawTokenResponse {
    access_token: Option<Secret>,
    token_type: Option<String>,
    expires_in: Option<serde_json::Value>,
    refresh_token: Option<Secret>,
    id_token: Option<Secret>,
}

#[derive(Deserialize)]
struct OAuthError {
    error: String,
}

struct Jwks {
    keys: HashMap<String, (Jwk, Arc<DecodingKey>)>,
    /// Keys without a `kid`.
    anonymous: Vec<(Jwk, Arc<DecodingKey>)>,
    fetched_at: Instant,
}

/// The configured provider.
pub(crate) struct Provider {
    pub(crate) cfg: config::Oidc,
    /// `public_origin + "/bff/callback"`.
    pub(crate) redirect_uri: String,
    /// `public_origin + post_logout_redirect`.
    pub(crate) post_logout_uri: String,
    http: reqwest::Client,
    metadata: RwLock<Option<Arc<Metadata>>>,
    jwks: RwLock<Option<Arc<Jwks>>>,
    refetch: tokio::sync::Mutex<()>,
    last_error: Mutex<Option<String>>,
    metrics: Arc<Metrics>,
}

impl Provider {
    /// Builds the client (no network yet).
    pub(crate) fn new(
        cfg: &config::Oidc,
        public_origin: &str,
        metrics: Arc<Metrics>,
    ) -> Result<Provider, TlsError> {
        let tls = tls::client_config(
            tls::root_store("oidc.ca", cfg.ca.as_deref())?,
            &[b"http/1.1"],
        )?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("coatcheck/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| TlsError::File {
                key: "oidc.ca",
                path: Default::default(),
                reason: e.to_string(),
            })?;
        Ok(Provider {
            cfg: cfg.clone(),
            redirect_uri: format!("{public_origin}/bff/callback"),
            post_logout_uri: format!("{public_origin}{}", cfg.post_logout_redirect),
            http,
            metadata: RwLock::new(None),
            jwks: RwLock::new(None),
            refetch: tokio::sync::Mutex::new(()),
            last_error: Mutex::new(Some("discovery has not completed yet".into())),
            metrics,
        })
    }

    /// The metadata, or 503 `idp_unavailable` while discovery has not succeeded.
    pub(crate) fn metadata(&self) -> Result<Arc<Metadata>, Error> {
        self.metadata
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(Error::IdpUnavailable {
                source: None,
                retry_after: 5,
            })
    }

    /// Whether discovery and the JWKS are loaded; the reason otherwise.
    pub(crate) fn ready(&self) -> Result<(), String> {
        if self
            .metadata
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
            && self
                .jwks
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .is_some()
        {
            return Ok(());
        }
        Err(self
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| "identity provider not loaded".into()))
    }

    /// Runs discovery until it succeeds (exponential backoff), then re-reads discovery and the
    /// JWKS every `oidc.metadata_refresh`, so rotated keys and moved endpoints are picked up
    /// without waiting for an unknown `kid`. A failed refresh keeps the last good metadata.
    pub(crate) async fn discover_and_refresh(self: Arc<Self>) {
        self.clone().discover_until_ready().await;
        loop {
            tokio::time::sleep(self.cfg.metadata_refresh).await;
            match self.discover().await {
                Ok(()) => {
                    tracing::debug!(issuer = %self.cfg.issuer, "identity provider metadata refreshed")
                }
                Err(e) => {
                    tracing::warn!(issuer = %self.cfg.issuer, error = %e, "identity provider metadata refresh failed; keeping the last good metadata")
                }
            }
        }
    }

    /// Runs discovery until it succeeds (exponential backoff), then returns.
    pub(crate) async fn discover_until_ready(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(500);
        loop {
            match self.discover().await {
                Ok(()) => {
                    tracing::info!(issuer = %self.cfg.issuer, "identity provider metadata loaded");
                    *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    return;
                }
                Err(e) => {
                    tracing::warn!(issuer = %self.cfg.issuer, error = %e, retry_in_s = backoff.as_secs_f64(), "identity provider discovery failed");
                    *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(format!("identity provider discovery failed: {e}"));
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(DISCOVERY_MAX_BACKOFF);
        }
    }

    /// Fetches the discovery document and the JWKS once.
    pub(crate) async fn discover(&self) -> Result<(), OidcError> {
        let issuer = self.cfg.issuer.as_str().trim_end_matches('/');
        let url = format!("{issuer}/.well-known/openid-configuration");
        let meta: Metadata = self.get_json(IdpEndpoint::Discovery, &url).await?;
        // OpenID Connect Discovery §4.3: the document's issuer must be exactly the configured one,
        // byte for byte (no trailing-slash or case folding).
        if meta.issuer != self.cfg.issuer_id {
            return Err(OidcError::Invalid(format!(
                "discovery says issuer {:?}, configured {:?}",
                meta.issuer, self.cfg.issuer_id
            )));
        }
        for (name, u) in [
            ("authorization_endpoint", Some(&meta.authorization_endpoint)),
            ("token_endpoint", Some(&meta.token_endpoint)),
            ("jwks_uri", Some(&meta.jwks_uri)),
        ]
        .into_iter()
        .chain([
            ("end_session_endpoint", meta.end_session_endpoint.as_ref()),
            ("revocation_endpoint", meta.revocation_endpoint.as_ref()),
        ]) {
            if let Some(u) = u
                && u.scheme() != "https"
                && !config::is_loopback_http(u)
            {
                return Err(OidcError::Invalid(format!("{name} {u} is not https")));
            }
        }
        if !meta.code_challenge_methods_supported.is_empty()
            && !meta
                .code_challenge_methods_supported
                .iter()
                .any(|m| m == "S256")
        {
            return Err(OidcError::Invalid(
                "the provider does not support PKCE S256".into(),
            ));
        }
        let jwks = self.fetch_jwks(&meta.jwks_uri).await?;
        *self.jwks.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(jwks));
        *self.metadata.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(meta));
        Ok(())
    }

    async fn fetch_jwks(&self, url: &Url) -> Result<Jwks, OidcError> {
        let set: JwkSet = self.get_json(IdpEndpoint::Jwks, url.as_str()).await?;
        let mut keys = HashMap::new();
        let mut anonymous = Vec::new();
        for jwk in set.keys {
            let Ok(key) = DecodingKey::from_jwk(&jwk) else {
                continue;
            };
            match jwk.common.key_id.clone() {
                Some(kid) => {
                    keys.insert(kid, (jwk, Arc::new(key)));
                }
                None => anonymous.push((jwk, Arc::new(key))),
            }
        }
        Ok(Jwks {
            keys,
            anonymous,
            fetched_at: Instant::now(),
        })
    }

    /// The verification key for a token header (`kid` and the algorithm already checked against
    /// `allowed_algs`). An unknown `kid` refetches the JWKS at most once per interval.
    pub(crate) async fn key_for(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Arc<DecodingKey>, Error> {
        let lookup = |jwks: &Jwks| -> Option<Arc<DecodingKey>> {
            let usable = |jwk: &Jwk| {
                jwk.common
                    .key_algorithm
                    .is_none_or(|ka| ka.to_string() == format!("{alg:?}"))
            };
            match kid {
                Some(kid) => jwks
                    .keys
                    .get(kid)
                    .filter(|(j, _)| usable(j))
                    .map(|(_, k)| k.clone()),
                None => {
                    let mut candidates = jwks
                        .anonymous
                        .iter()
                        .chain(jwks.keys.values())
                        .filter(|(j, _)| usable(j));
                    let first = candidates.next()?;
                    // Without a kid, only an unambiguous key set is acceptable.
                    candidates.next().is_none().then(|| first.1.clone())
                }
            }
        };
        let current = self.jwks.read().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(k) = current.as_deref().and_then(lookup) {
            return Ok(k);
        }
        let _one_at_a_time = self.refetch.lock().await;
        let current = self.jwks.read().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(jwks) = current.as_deref() {
            if let Some(k) = lookup(jwks) {
                return Ok(k);
            }
            if jwks.fetched_at.elapsed() < JWKS_REFETCH_INTERVAL {
                return Err(Error::BadRequest(
                    "the token is signed with an unknown key".into(),
                ));
            }
        }
        let meta = self.metadata()?;
        let fresh = Arc::new(
            self.fetch_jwks(&meta.jwks_uri)
                .await
                .map_err(OidcError::into_unavailable)?,
        );
        *self.jwks.write().unwrap_or_else(|p| p.into_inner()) = Some(fresh.clone());
        lookup(&fresh)
            .ok_or_else(|| Error::BadRequest("the token is signed with an unknown key".into()))
    }

    /// The authorization request URL (code flow, PKCE S256).
    pub(crate) fn authorize_url(
        &self,
        state: &str,
        nonce: &str,
        code_challenge: &str,
    ) -> Result<String, Error> {
        let meta = self.metadata()?;
        let mut url = meta.authorization_endpoint.clone();
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", &self.cfg.client_id)
            .append_pair("redirect_uri", &self.redirect_uri)
            .append_pair("scope", &self.cfg.scopes.join(" "))
            .append_pair("state", state)
            .append_pair("nonce", nonce)
            .append_pair("code_challenge", code_challenge)
            .append_pair("code_challenge_method", "S256");
        Ok(url.into())
    }

    /// Exchanges an authorization code (RFC 6749 §4.1.3, RFC 7636 §4.5).
    pub(crate) async fn exchange_code(
        &self,
        code: &Secret,
        verifier: &Secret,
    ) -> Result<TokenResponse, OidcError> {
        let meta = self
            .metadata()
            .map_err(|e| OidcError::Unavailable(Box::new(e)))?;
        let form = vec![
            ("grant_type", "authorization_code".to_owned()),
            ("code", code.expose().clone()),
            ("redirect_uri", self.redirect_uri.clone()),
            ("code_verifier", verifier.expose().clone()),
        ];
        self.token_request(&meta.token_endpoint, form).await
    }

    /// Spends a refresh token (RFC 6749 §6).
    pub(crate) async fn refresh(&self, refresh_token: &Secret) -> Result<TokenResponse, OidcError> {
        let meta = self
            .metadata()
            .map_err(|e| OidcError::Unavailable(Box::new(e)))?;
        let form = vec![
            ("grant_type", "refresh_token".to_owned()),
            ("refresh_token", refresh_token.expose().clone()),
        ];
        self.token_request(&meta.token_endpoint, form).await
    }

    /// Obtains a token for coatcheck itself (RFC 6749 §4.4), authenticated like the code exchange.
    /// `audience` goes out both as the RFC 8707 `resource` indicator and as the `audience`
    /// parameter some providers use instead; providers ignore the one they do not know.
    pub(crate) async fn client_credentials(
        &self,
        scopes: &[String],
        audience: Option<&str>,
    ) -> Result<TokenResponse, OidcError> {
        let meta = self
            .metadata()
            .map_err(|e| OidcError::Unavailable(Box::new(e)))?;
        let mut form = vec![("grant_type", "client_credentials".to_owned())];
        if !scopes.is_empty() {
            form.push(("scope", scopes.join(" ")));
        }
        if let Some(a) = audience {
            form.push(("resource", a.to_owned()));
            form.push(("audience", a.to_owned()));
        }
        self.token_request(&meta.token_endpoint, form).await
    }

    /// Revokes a refresh token (RFC 7009), if the provider has a revocation endpoint.
    pub(crate) async fn revoke(&self, refresh_token: &Secret) -> Result<(), OidcError> {
        let meta = self
            .metadata()
            .map_err(|e| OidcError::Unavailable(Box::new(e)))?;
        let Some(endpoint) = &meta.revocation_endpoint else {
            return Ok(());
        };
        let form = vec![
            ("token", refresh_token.expose().clone()),
            ("token_type_hint", "refresh_token".to_owned()),
        ];
        let start = Instant::now();
        let mut span = trace::idp("idp.revocation", endpoint.as_str());
        let r = self.revoke_call(endpoint, form, &mut span).await;
        self.record(IdpEndpoint::Revocation, start, &r);
        r
    }

    async fn revoke_call(
        &self,
        endpoint: &Url,
        form: Vec<(&'static str, String)>,
        span: &mut ChildSpan,
    ) -> Result<(), OidcError> {
        let res = trace::traced(self.authenticated_post(endpoint, form), span)
            .send()
            .await
            .map_err(|e| OidcError::Unavailable(Box::new(e)))?;
        span.set(
            "http.response.status_code",
            i64::from(res.status().as_u16()),
        );
        if res.status().is_success() {
            Ok(())
        } else if res.status().is_server_error() {
            Err(OidcError::Unavailable(
                format!("revocation answered {}", res.status()).into(),
            ))
        } else {
            Err(OidcError::Rejected {
                error: format!("revocation answered {}", res.status()),
                status: res.status().as_u16(),
            })
        }
    }

    /// Counts one provider call: its latency, and a failure unless the provider answered (an
    /// OAuth error is an answer).
    fn record<T>(&self, endpoint: IdpEndpoint, start: Instant, r: &Result<T, OidcError>) {
        let failed = matches!(r, Err(OidcError::Unavailable(_) | OidcError::Invalid(_)));

        self.metrics.idp_call(endpoint, start.elapsed(), failed);
    }

    /// The RP-initiated logout URL (OpenID Connect RP-Initiated Logout 1.0 §2), if supported.
    pub(crate) fn end_session_url(&self, id_token: Option<&Secret>, state: &str) -> Option<String> {
        let meta = self.metadata().ok()?;
        let mut url = meta.end_session_endpoint.clone()?;
        if let Some(t) = id_token {
            url.query_pairs_mut()
                .append_pair("id_token_hint", t.expose());
        }
        url.query_pairs_mut()
            .append_pair("client_id", &self.cfg.client_id)
            .append_pair("post_logout_redirect_uri", &self.post_logout_uri)
            .append_pair("state", state);
        Some(url.into())
    }

    fn authenticated_post(
        &self,
        url: &Url,
        mut form: Vec<(&'static str, String)>,
    ) -> reqwest::RequestBuilder {
        let req = self
            .http
            .post(url.clone())
            .header(http::header::ACCEPT, "application/json");
        match self.cfg.client_auth {
            ClientAuth::Basic => {
                // RFC 6749 §2.3.1: client id and secret are form-urlencoded before Basic encoding.
                let enc = |s: &str| {
                    url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>()
                };
                let creds = format!(
                    "{}:{}",
                    enc(&self.cfg.client_id),
                    enc(self.cfg.client_secret.expose())
                );
                let mut value = http::HeaderValue::from_str(&format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(creds)
                ))
                .unwrap_or(http::HeaderValue::from_static("Basic"));
                value.set_sensitive(true);
                req.header(http::header::AUTHORIZATION, value).form(&form)
            }
            ClientAuth::Post => {
                form.push(("client_id", self.cfg.client_id.clone()));
                form.push(("client_secret", self.cfg.client_secret.expose().clone()));
                req.form(&form)
            }
        }
    }

    async fn token_request(
        &self,
        endpoint: &Url,
        form: Vec<(&'static str, String)>,
    ) -> Result<TokenResponse, OidcError> {
        let start = Instant::now();
        let mut span = trace::idp("idp.token", endpoint.as_str());
        let r = self.token_call(endpoint, form, &mut span).await;
        if r.is_err() {
            span.fail("idp_error");
        }
        self.record(IdpEndpoint::Token, start, &r);
        r
    }

    async fn token_call(
        &self,
        endpoint: &Url,
        form: Vec<(&'static str, String)>,
        span: &mut ChildSpan,
    ) -> Result<TokenResponse, OidcError> {
        let res = trace::traced(self.authenticated_post(endpoint, form), span)
            .send()
            .await
            .map_err(|e| OidcError::Unavailable(Box::new(e)))?;
        let status = res.status();
        span.set("http.response.status_code", i64::from(status.as_u16()));
        let body = read_limited(res).await?;
        if status.is_server_error() {
            return Err(OidcError::Unavailable(
                format!("token endpoint answered {status}").into(),
            ));
        }
        if !status.is_success() {
            let error = serde_json::from_slice::<OAuthError>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| format!("http_{}", status.as_u16()));
            return Err(OidcError::Rejected {
                error,
                status: status.as_u16(),
            });
        }
        let raw: RawTokenResponse = serde_json::from_slice(&body)
            .map_err(|e| OidcError::Invalid(format!("token response is not JSON: {e}")))?;
        validate_token_response(raw)
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        endpoint: IdpEndpoint,
        url: &str,
    ) -> Result<T, OidcError> {
        let start = Instant::now();
        let name = match endpoint {
            IdpEndpoint::Discovery => "idp.discovery",
            IdpEndpoint::Jwks => "idp.jwks",
            IdpEndpoint::Token => "idp.token",
            IdpEndpoint::Revocation => "idp.revocation",
        };
        let mut span = trace::idp(name, url);
        let r = self.get_json_call(url, &mut span).await;
        if r.is_err() {
            span.fail("idp_error");
        }
        self.record(endpoint, start, &r);
        r
    }

    async fn get_json_call<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        span: &mut ChildSpan,
    ) -> Result<T, OidcError> {
        let req = self
            .http
            .get(url)
            .header(http::header::ACCEPT, "application/json");
        let res = trace::traced(req, span)
            .send()
            .await
            .map_err(|e| OidcError::Unavailable(Box::new(e)))?;
        let status = res.status();
        span.set("http.response.status_code", i64::from(status.as_u16()));
        if !status.is_success() {
            return Err(OidcError::Unavailable(
                format!("{url} answered {status}").into(),
            ));
        }
        let body = read_limited(res).await?;
        serde_json::from_slice(&body).map_err(|e| OidcError::Invalid(format!("{url}: {e}")))
    }
}

async fn read_limited(mut res: reqwest::Response) -> Result<Vec<u8>, OidcError> {
    let mut body = Vec::new();
    while let Some(chunk) = res
        .chunk()
        .await
        .map_err(|e| OidcError::Unavailable(Box::new(e)))?
    {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(OidcError::Invalid(format!(
                "response larger than {MAX_RESPONSE_BYTES} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn validate_token_response(raw: RawTokenResponse) -> Result<TokenResponse, OidcError> {
    let access_token = raw
        .access_token
        .filter(|t| !t.expose().is_empty())
        .ok_or_else(|| OidcError::Invalid("no access_token".into()))?;
    if !raw
        .token_type
        .as_deref()
        .is_some_and(|t| t.eq_ignore_ascii_case("bearer"))
    {
        return Err(OidcError::Invalid(format!(
            "token_type {:?} is not Bearer",
            raw.token_type
        )));
    }
    if http::HeaderValue::from_str(&format!("Bearer {}", access_token.expose())).is_err() {
        return Err(OidcError::Invalid(
            "access_token is not a valid header value".into(),
        ));
    }
    let now = crate::session::now();
    let expires_in = match raw.expires_in {
        Some(serde_json::Value::Number(n)) => n.as_u64(),
        Some(serde_json::Value::String(s)) => s.parse().ok(),
        _ => None,
    };
    let lifetime = expires_in
        .unwrap_or(DEFAULT_ACCESS_TOKEN_LIFETIME)
        .min(MAX_ACCESS_TOKEN_LIFETIME);
    let mut expires_at = now.saturating_add(lifetime);
    // A JWT access token's own `exp` wins when earlier (read only; the upstream verifies it).
    if let Some(exp) = jwt_exp(access_token.expose()) {
        expires_at = expires_at.min(exp);
    }
    Ok(TokenResponse {
        access_token,
        access_expires_at: expires_at,
        refresh_token: raw.refresh_token.filter(|t| !t.expose().is_empty()),
        id_token: raw.id_token.filter(|t| !t.expose().is_empty()),
    })
}

/// The `exp` claim of a JWT, read without verification (for scheduling only).
fn jwt_exp(token: &str) -> Option<u64> {
    #[derive(Deserialize)]
    struct Exp {
        exp: Option<u64>,
    }
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    serde_json::from_slice::<Exp>(&bytes).ok()?.exp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(v: serde_json::Value) -> RawTokenResponse {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn token_responses_are_validated() {
        assert!(
            validate_token_response(raw(
                serde_json::json!({"access_token": "", "token_type": "Bearer"})
            ))
            .is_err()
        );
        assert!(
            validate_token_response(raw(
                serde_json::json!({"access_token": "a", "token_type": "mac"})
            ))
            .is_err()
        );
        let ok = validate_token_response(raw(
            serde_json::json!({"access_token": "a", "token_type": "bearer", "expires_in": 10}),
        ))
        .unwrap();
        assert!(ok.access_expires_at <= crate::session::now() + 10);
        let defaulted = validate_token_response(raw(
            serde_json::json!({"access_token": "a", "token_type": "Bearer"}),
        ))
        .unwrap();
        assert!(
            defaulted.access_expires_at > crate::session::now() + DEFAULT_ACCESS_TOKEN_LIFETIME - 5
        );
    }

    #[test]
    fn an_earlier_jwt_exp_wins_over_expires_in() {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!("{{\"exp\":{}}}", crate::session::now() + 5));
        let token = format!("h.{payload}.s");
        let r = validate_token_response(raw(
            serde_json::json!({"access_token": token, "token_type": "Bearer", "expires_in": 3600}),
        ))
        .unwrap();
        assert!(r.access_expires_at <= crate::session::now() + 5);
    }

    #[test]
    fn a_huge_expires_in_is_capped_and_cannot_overflow() {
        let now = crate::session::now();
        for e in [
            serde_json::json!(u64::MAX),
            serde_json::json!("18446744073709551615"),
            serde_json::json!(1e300),
            serde_json::json!(-1),
            serde_json::json!("99999999999999999999999"),
        ] {
            let t = validate_token_response(raw(
                serde_json::json!({"access_token": "a", "token_type": "Bearer", "expires_in": e}),
            ))
            .unwrap();
            assert!(
                t.access_expires_at <= now + MAX_ACCESS_TOKEN_LIFETIME + 1,
                "{e}"
            );
            assert!(t.access_expires_at >= now, "{e}");
        }
    }

    #[test]
    fn only_grant_errors_end_a_session() {
        assert!(
            OidcError::Rejected {
                error: "invalid_grant".into(),
                status: 400
            }
            .ends_session()
        );
        assert!(!OidcError::Unavailable("timeout".into()).ends_session());
        assert!(
            !OidcError::Rejected {
                error: "slow_down".into(),
                status: 400
            }
            .ends_session()
        );
    }
}
