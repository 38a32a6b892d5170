//! JWT validation for ID tokens (OpenID Connect Core §3.1.3.7), logout tokens (Back-Channel
//! Logout 1.0 §2.6) and, on `auth = "bearer"` routes, access tokens — every rule switched on
//! explicitly.
//!
//! The algorithm comes from `oidc.allowed_algs`, never from the token: a header naming anything
//! else (`none`, HMAC, an unconfigured algorithm) is refused before a key is looked up, and the key
//! comes only from the provider's JWKS (`jku`, `x5u`, `jwk` and `x5c` headers are never followed).
//! jsonwebtoken checks the signature, `exp`, `nbf`, `iss` and `aud` (its defaults do not: each is
//! set here); `iat`, `azp`, `sub`, `nonce` and the logout-token rules are checked below.

use jsonwebtoken::{Validation, decode, decode_header};
use serde_json::{Map, Value};

use super::oidc::Provider;
use crate::error::Error;
use crate::secret;

/// Why a token was refused (logged or shown on the login error page; carries no token material).
#[derive(Debug, thiserror::Error)]
#[error("invalid token: {0}")]
pub(crate) struct TokenError(pub String);

/// A back-channel logout token older than this (by `iat`, seconds) is refused.
pub(crate) const LOGOUT_TOKEN_MAX_AGE: u64 = 300;

/// What the caller expects of an ID token.
pub(crate) struct Expected<'a> {
    /// The nonce of the login (required at login; `None` for ID tokens from a refresh).
    pub(crate) nonce: Option<&'a str>,
}

/// A validation outcome: `Err(Ok(_))` is a refused token; `Err(Err(_))` means the keys could not be
/// fetched (provider unavailable).
pub(crate) type Outcome = Result<Map<String, Value>, Result<TokenError, Error>>;

fn refuse(s: impl Into<String>) -> Outcome {
    Err(Ok(TokenError(s.into())))
}

/// Signature, `alg`, `exp`, `nbf`, `iss`, `iat` and (when given) `aud`.
async fn verify(
    provider: &Provider,
    token: &str,
    audience: Option<&str>,
    required: &[&str],
) -> Outcome {
    let header = match decode_header(token) {
        Ok(h) => h,
        Err(e) => return refuse(format!("unreadable header ({e})")),
    };
    if let Some(problem) = header_problem(token) {
        return refuse(problem);
    }
    if !provider.cfg.allowed_algs.contains(&header.alg) {
        return refuse(format!(
            "algorithm {:?} is not in oidc.allowed_algs",
            header.alg
        ));
    }
    let meta = provider.metadata().map_err(Err)?;
    let key = match provider.key_for(header.kid.as_deref(), header.alg).await {
        Ok(k) => k,
        Err(Error::BadRequest(m)) => return refuse(m),
        Err(e) => return Err(Err(e)),
    };
    let mut v = Validation::new(header.alg);
    v.algorithms = vec![header.alg];
    v.leeway = provider.cfg.clock_skew.as_secs();
    v.validate_exp = required.contains(&"exp");
    v.validate_nbf = true;
    match audience {
        Some(aud) => {
            v.validate_aud = true;
            v.set_audience(&[aud]);
        }
        None => v.validate_aud = false,
    }
    v.set_issuer(&[&meta.issuer]);
    v.set_required_spec_claims(required);
    let claims: Map<String, Value> = match decode(token, &key, &v) {
        Ok(data) => data.claims,
        Err(e) => return refuse(format!("{e}")),
    };
    match claims.get("iat").and_then(Value::as_u64) {
        Some(iat) if iat <= crate::session::now() + provider.cfg.clock_skew.as_secs() => {}
        Some(_) => return refuse("iat is in the future"),
        None if required.contains(&"iat") => return refuse("iat is missing or not a number"),
        None => {}
    }
    Ok(claims)
}

/// The JOSE header as JSON, read without verification (jsonwebtoken's `Header` drops what it
/// does not know, such as `crit`).
fn raw_header(token: &str) -> Option<Map<String, Value>> {
    use base64::Engine as _;
    let first = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(first)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// What is wrong with a token's header regardless of its signature: RFC 7515 §4.1.11 says a
/// `crit` header names extensions the recipient must understand; coatcheck understands none, so
/// any `crit` is refused. A header that is not a JSON object is refused as well.
fn header_problem(token: &str) -> Option<&'static str> {
    match raw_header(token) {
        None => Some("the header is not a JSON object"),
        Some(h) if h.contains_key("crit") => Some("the header has a crit parameter"),
        Some(_) => None,
    }
}

/// Whether a `typ` header names a JWT access token (RFC 9068 §2.1).
pub(crate) fn is_access_token_typ(typ: &str) -> bool {
    matches!(
        typ.to_ascii_lowercase().as_str(),
        "at+jwt" | "application/at+jwt"
    )
}

/// Validates an ID token and returns its claims.
pub(crate) async fn validate(provider: &Provider, token: &str, expected: Expected<'_>) -> Outcome {
    // RFC 9068 §4 / RFC 8725 §3.11: an access token must not pass for an ID token.
    if decode_header(token)
        .ok()
        .and_then(|h| h.typ)
        .is_some_and(|t| is_access_token_typ(&t))
    {
        return refuse("typ says this is an access token, not an ID token");
    }
    let claims = verify(
        provider,
        token,
        Some(&provider.cfg.client_id),
        &["exp", "iat", "iss", "aud", "sub"],
    )
    .await?;
    if claims
        .get("sub")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        return refuse("sub is missing or empty");
    }
    // §3.1.3.7 items 4–5: with several audiences azp is required; when present it must be us.
    let several = matches!(claims.get("aud"), Some(Value::Array(a)) if a.len() > 1);
    match claims.get("azp").and_then(Value::as_str) {
        Some(azp) if azp != provider.cfg.client_id => return refuse("azp is not this client"),
        None if several => return refuse("several audiences but no azp"),
        _ => {}
    }
    if let Some(expected) = expected.nonce {
        match claims.get("nonce").and_then(Value::as_str) {
            Some(n) if secret::constant_time_eq(n.as_bytes(), expected.as_bytes()) => {}
            Some(_) => return refuse("nonce does not match the login"),
            None => return refuse("nonce is missing"),
        }
    }
    Ok(claims)
}

/// Validates a back-channel logout token (Back-Channel Logout 1.0 §2.6).
pub(crate) async fn validate_logout_token(provider: &Provider, token: &str) -> Outcome {
    let claims = verify(
        provider,
        token,
        Some(&provider.cfg.client_id),
        &["exp", "iat", "iss", "aud"],
    )
    .await?;
    // §2.4 requires exp (checked by `verify`); iat bounds how old a token may be however far away
    // its exp is.
    let iat = claims.get("iat").and_then(Value::as_u64).unwrap_or(0);
    if crate::session::now().saturating_sub(iat)
        > LOGOUT_TOKEN_MAX_AGE + provider.cfg.clock_skew.as_secs()
    {
        return refuse("the logout token is too old (iat)");
    }
    let event = claims
        .get("events")
        .and_then(Value::as_object)
        .and_then(|e| e.get("http://schemas.openid.net/event/backchannel-logout"));
    if !matches!(event, Some(Value::Object(_))) {
        return refuse("events claim lacks the back-channel logout event");
    }
    if claims.contains_key("nonce") {
        return refuse("a logout token must not carry a nonce");
    }
    if !claims.get("jti").is_some_and(Value::is_string) {
        return refuse("jti is missing");
    }
    if claims.get("sub").and_then(Value::as_str).is_none()
        && claims.get("sid").and_then(Value::as_str).is_none()
    {
        return refuse("neither sub nor sid");
    }
    Ok(claims)
}

/// Validates an access token presented by a non-browser client on an `auth = "bearer"` route:
/// the provider's signature, issuer and expiry, `typ: at+jwt` (RFC 9068 §4, so an ID token cannot
/// pass for an access token), and the route's `audience` when one is configured.
pub(crate) async fn validate_access_token(
    provider: &Provider,
    token: &str,
    audience: Option<&str>,
) -> Outcome {
    let typ = decode_header(token)
        .ok()
        .and_then(|h| h.typ)
        .unwrap_or_default();
    if !is_access_token_typ(&typ) {
        return refuse("not a JWT access token (typ must be at+jwt, RFC 9068)");
    }
    verify(provider, token, audience, &["exp", "iss", "sub"]).await
}

#[cfg(test)]
mod properties {
    use base64::Engine as _;
    use proptest::prelude::*;

    use super::*;

    fn encode(header: &Map<String, Value>) -> String {
        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.{}",
            b.encode(serde_json::to_vec(header).unwrap()),
            b.encode(b"{}"),
            b.encode(b"sig")
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn a_header_with_crit_is_always_refused_and_one_without_never_for_that(
            keys in prop::collection::btree_set(
                prop::sample::select(vec!["alg", "typ", "kid", "crit", "cty", "jku", "b64", "x"]),
                0..6,
            ),
            values in prop::collection::vec(
                prop::sample::select(vec![
                    json_value("ES256"), json_value("at+jwt"), Value::Array(vec![]),
                    serde_json::json!(["exp"]), Value::Null, serde_json::json!(1),
                ]),
                6,
            ),
        ) {
            let header: Map<String, Value> = keys
                .iter()
                .zip(values)
                .map(|(k, v)| ((*k).to_owned(), v))
                .collect();
            let problem = header_problem(&encode(&header));
            prop_assert_eq!(problem.is_some(), header.contains_key("crit"), "{:?}", header);
        }

        #[test]
        fn any_token_text_is_judged_without_panicking(token in "[A-Za-z0-9_.=+/-]{0,80}") {
            let _ = header_problem(&token);
            let _ = decode_header(&token);
        }

        #[test]
        fn access_token_types_are_recognised_in_any_case(
            upper in prop::collection::vec(any::<bool>(), 18),
            prefix in any::<bool>(),
        ) {
            let base = if prefix { "application/at+jwt" } else { "at+jwt" };
            let typ: String = base
                .chars()
                .zip(upper)
                .map(|(c, u)| if u { c.to_ascii_uppercase() } else { c })
                .collect();
            prop_assert!(is_access_token_typ(&typ));
            let longer = format!("{typ}x");
            prop_assert!(!is_access_token_typ(&longer));
        }
    }

    fn json_value(s: &str) -> Value {
        Value::String(s.to_owned())
    }
}
