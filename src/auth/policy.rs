//! Per-route authorization and the 401-or-redirect decision.

use http::{HeaderMap, HeaderName, header};
use serde_json::{Map, Value};

use crate::config::Route;
use crate::error::Error;

static SEC_FETCH_MODE: HeaderName = HeaderName::from_static("sec-fetch-mode");

/// The roles a set of claims grants: the `roles` claim, an array of strings or one string of
/// space-separated names.
pub(crate) fn roles(claims: &Map<String, Value>) -> Vec<Box<str>> {
    match claims.get("roles") {
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).map(Box::from).collect(),
        Some(Value::String(s)) => s.split_whitespace().map(Box::from).collect(),
        _ => Vec::new(),
    }
}

/// The roles a session or token has, asked one at a time: a token's [`roles`], or a session's
/// (`Claims::roles`, which keeps them as positions in its encoded claims).
pub(crate) trait RoleSet {
    /// Whether `role` is one of them.
    fn has(&self, role: &str) -> bool;
}

impl<T: AsRef<[Box<str>]> + ?Sized> RoleSet for &T {
    fn has(&self, role: &str) -> bool {
        self.as_ref().iter().any(|h| **h == *role)
    }
}

/// Checks the route's `roles` against the roles a session or token has ([`RoleSet`]). No roles
/// configured: any session passes. Otherwise one match is needed, else 403.
pub(crate) fn check_roles(route: &Route, has: impl RoleSet) -> Result<(), Error> {
    if route.roles.is_empty() || route.roles.iter().any(|r| has.has(r)) {
        return Ok(());
    }
    Err(Error::Forbidden(format!(
        "this route needs one of the roles: {}",
        route.roles.join(", ")
    )))
}

/// Whether the request is a browser's top-level navigation (DESIGN §3): `Sec-Fetch-Mode: navigate`,
/// or, from browsers that do not send Fetch Metadata, `Accept: text/html`.
pub(crate) fn is_navigation(headers: &HeaderMap) -> bool {
    match headers.get(&SEC_FETCH_MODE) {
        Some(mode) => mode.as_bytes() == b"navigate",
        None => headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("text/html")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn route(roles: &[&str]) -> Route {
        let c = crate::config::Config::from_toml(
            &format!(
                "[server]\nlisten=\"127.0.0.1:0\"\npublic_origin=\"https://a.test\"\n[server.tls]\ncert=\"Cargo.toml\"\nkey=\"Cargo.toml\"\n[oidc]\nissuer=\"http://127.0.0.1:1\"\nclient_id=\"c\"\nclient_secret=\"s\"\n[session]\nkeys=[\"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"]\nstore.kind=\"memory\"\n[[route]]\npath=\"/\"\nupstream=\"http://127.0.0.1:1\"\nroles={roles:?}\n"
            ),
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        c.routes[0].clone()
    }

    #[test]
    fn roles_need_one_match_and_a_missing_claim_is_forbidden() {
        let claims: Map<String, Value> =
            serde_json::from_str(r#"{"roles":["user","admin"]}"#).unwrap();
        let claims = roles(&claims);
        assert!(check_roles(&route(&["admin"]), &claims).is_ok());
        assert!(check_roles(&route(&[]), &[]).is_ok());
        assert_eq!(
            check_roles(&route(&["auditor"]), &claims)
                .unwrap_err()
                .status(),
            403
        );
        assert_eq!(
            check_roles(&route(&["admin"]), &[]).unwrap_err().status(),
            403
        );
    }

    #[test]
    fn navigations_are_recognised_by_fetch_metadata_or_accept() {
        let mut h = HeaderMap::new();
        h.insert("sec-fetch-mode", HeaderValue::from_static("navigate"));
        assert!(is_navigation(&h));
        h.insert("sec-fetch-mode", HeaderValue::from_static("cors"));
        h.insert("accept", HeaderValue::from_static("text/html"));
        assert!(!is_navigation(&h), "fetch metadata wins over Accept");
        let mut h = HeaderMap::new();
        h.insert(
            "accept",
            HeaderValue::from_static("text/html,application/xhtml+xml"),
        );
        assert!(is_navigation(&h));
    }
}
