//! Token issuers: where a session's tokens come from — how they are refreshed, revoked and ended,
//! where the session's claims come from, and whether the issuer is ready.
//!
//! The refresher, logout and readiness talk to an `Issuer`, never to the OpenID provider
//! directly, so that other ways of obtaining tokens (an existing API's own JSON login, client
//! credentials) are implementations beside `oidc::Provider`. Each
//! session remembers which issuer made it ([`IssuerKind`], inside the sealed record).
//!
//! Tokens that belong to no user and no session (client credentials, `auth = "client"` routes)
//! come from a `ClientGrant`; `client::ClientTokens` caches them.

use std::future::Future;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::id_token::{self, Expected};
use super::oidc::{OidcError, Provider, TokenResponse};
use super::refresh::login_claims;
use crate::error::BoxError;
use crate::secret::Secret;
use crate::session::SessionData;

/// Which issuer made a session. Records written before issuers existed are OIDC sessions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IssuerKind {
    /// OpenID Connect code + PKCE (`[oidc]`).
    #[default]
    Oidc,
    /// An existing API's own JSON login (`[capture]`).
    Capture,
}

/// The issuers this configuration has; a session is refreshed and ended by the one that made it.
pub(crate) struct Issuers {
    pub(crate) oidc: Option<std::sync::Arc<Provider>>,
    pub(crate) capture: Option<std::sync::Arc<super::capture::Capture>>,
}

/// One of the configured issuers (static dispatch).
pub(crate) enum AnyIssuer<'a> {
    Oidc(&'a Provider),
    Capture(&'a super::capture::Capture),
}

impl Issuers {
    /// The issuer of `kind`; an error if this configuration has none (a record written under
    /// another configuration).
    pub(crate) fn get(&self, kind: IssuerKind) -> Result<AnyIssuer<'_>, IssuerError> {
        match kind {
            IssuerKind::Oidc => self.oidc.as_deref().map(AnyIssuer::Oidc),
            IssuerKind::Capture => self.capture.as_deref().map(AnyIssuer::Capture),
        }
        .ok_or_else(|| IssuerError::Refused(format!("no {kind:?} issuer is configured")))
    }

    /// `refresh_before_expiry` for sessions of `kind`.
    pub(crate) fn refresh_before(&self, kind: IssuerKind) -> std::time::Duration {
        match kind {
            IssuerKind::Oidc => self.oidc.as_ref().map(|p| p.cfg.refresh_before_expiry),
            IssuerKind::Capture => self.capture.as_ref().map(|c| c.refresh_before()),
        }
        .unwrap_or_default()
    }

    /// Ready when every configured issuer is.
    pub(crate) fn ready(&self) -> Result<(), String> {
        if let Some(p) = &self.oidc {
            Issuer::ready(p.as_ref())?;
        }
        Ok(())
    }
}

impl Issuer for AnyIssuer<'_> {
    async fn refresh(
        &self,
        current: &SessionData,
        refresh_token: &Secret,
        now: u64,
    ) -> Result<SessionData, IssuerError> {
        match self {
            AnyIssuer::Oidc(p) => Issuer::refresh(*p, current, refresh_token, now).await,
            AnyIssuer::Capture(c) => c.refresh(current, refresh_token, now).await,
        }
    }
    async fn revoke(&self, refresh_token: &Secret) -> Result<(), IssuerError> {
        match self {
            AnyIssuer::Oidc(p) => Issuer::revoke(*p, refresh_token).await,
            AnyIssuer::Capture(c) => c.revoke(refresh_token).await,
        }
    }
    fn logout_url(&self, data: &SessionData, state: &str) -> String {
        match self {
            AnyIssuer::Oidc(p) => p.logout_url(data, state),
            AnyIssuer::Capture(c) => c.logout_url(data, state),
        }
    }
    fn ready(&self) -> Result<(), String> {
        match self {
            AnyIssuer::Oidc(p) => Issuer::ready(*p),
            AnyIssuer::Capture(c) => c.ready(),
        }
    }
}

/// Why an issuer could not refresh or revoke.
#[derive(Debug, thiserror::Error)]
pub(crate) enum IssuerError {
    /// The grant is gone for good (OAuth `invalid_grant` and its kind, or refreshed tokens that
    /// belong to someone else): the session ends.
    #[error("the issuer refused: {0}")]
    Refused(String),
    /// The issuer is unreachable, slow or answered nonsense: a blip, the session is kept.
    #[error("the issuer is unavailable: {0}")]
    Unavailable(#[source] BoxError),
}

/// What every token issuer offers.
pub(crate) trait Issuer: Send + Sync {
    /// Spends `refresh_token` and returns the session's data with the new tokens (and claims).
    /// A rotated refresh token replaces the old one; without one the old one is kept.
    fn refresh(
        &self,
        current: &SessionData,
        refresh_token: &Secret,
        now: u64,
    ) -> impl Future<Output = Result<SessionData, IssuerError>> + Send;
    /// Revokes a refresh token at logout.
    fn revoke(
        &self,
        refresh_token: &Secret,
    ) -> impl Future<Output = Result<(), IssuerError>> + Send;
    /// Where the browser goes after its session ended (`state` for the issuer's redirect).
    fn logout_url(&self, data: &SessionData, state: &str) -> String;
    /// `Ok` when the issuer can serve logins and refreshes.
    fn ready(&self) -> Result<(), String>;
}

/// An issuer of tokens for coatcheck itself: no user, no session, no refresh token.
pub(crate) trait ClientGrant: Send + Sync {
    /// Runs the client-credentials grant (RFC 6749 §4.4) for `scopes` (none: the issuer's default)
    /// and, if given, one audience (resource indicator, RFC 8707).
    fn client_credentials(
        &self,
        scopes: &[String],
        audience: Option<&str>,
    ) -> impl Future<Output = Result<TokenResponse, IssuerError>> + Send;
}

impl ClientGrant for Provider {
    async fn client_credentials(
        &self,
        scopes: &[String],
        audience: Option<&str>,
    ) -> Result<TokenResponse, IssuerError> {
        Ok(Provider::client_credentials(self, scopes, audience).await?)
    }
}

impl From<OidcError> for IssuerError {
    fn from(e: OidcError) -> IssuerError {
        if e.ends_session() {
            IssuerError::Refused(e.to_string())
        } else {
            IssuerError::Unavailable(Box::new(e))
        }
    }
}

impl Issuer for Provider {
    async fn refresh(
        &self,
        current: &SessionData,
        refresh_token: &Secret,
        now: u64,
    ) -> Result<SessionData, IssuerError> {
        let tokens = Provider::refresh(self, refresh_token).await?;
        let mut data = SessionData {
            access_token: tokens.access_token,
            access_expires_at: tokens.access_expires_at,
            access_issued_at: now,
            refresh_token: tokens
                .refresh_token
                .or_else(|| current.refresh_token.clone()),
            ..current.clone()
        };
        let Some(id_token) = tokens.id_token else {
            return Ok(data);
        };
        match id_token::validate(self, id_token.expose(), Expected { nonce: None }).await {
            Ok(claims) => {
                // OpenID Connect Core §12.2: same iss, sub and aud, or the session ends.
                let same = claims.get("sub").and_then(Value::as_str) == Some(data.sub.as_str())
                    && claims.get("iss").and_then(Value::as_str) == Some(data.iss.as_str())
                    && claims.get("aud") == current.claims.get("aud").as_ref();
                if !same {
                    return Err(IssuerError::Refused(
                        "refreshed ID token names another subject, issuer or audience".into(),
                    ));
                }
                data.claims = login_claims(claims);
                data.id_token = Some(id_token);
                Ok(data)
            }
            Err(Ok(e)) => Err(IssuerError::Refused(e.to_string())),
            Err(Err(e)) => Err(IssuerError::Unavailable(Box::new(e))),
        }
    }

    async fn revoke(&self, refresh_token: &Secret) -> Result<(), IssuerError> {
        Ok(Provider::revoke(self, refresh_token).await?)
    }

    fn logout_url(&self, data: &SessionData, state: &str) -> String {
        self.end_session_url(data.id_token.as_ref(), state)
            .unwrap_or_else(|| self.cfg.post_logout_redirect.clone())
    }

    fn ready(&self) -> Result<(), String> {
        Provider::ready(self)
    }
}
