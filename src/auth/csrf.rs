//! CSRF defence (DESIGN §3).
//!
//! Three layers, cheapest first, all before any session or upstream is touched:
//! 1. `Sec-Fetch-Site: cross-site` is refused (Fetch Metadata; browsers set it, attackers cannot
//!    remove it from a browser request).
//! 2. An `Origin` other than `public_origin` is refused (including `null`).
//! 3. The configured header (default `X-CSRF`) must be present and non-empty: a cross-site form or
//!    `<img>` cannot add a custom header, and a cross-origin `fetch` that does needs a CORS
//!    preflight that coatcheck never grants. WebSocket upgrades cannot carry it: they need an
//!    `Origin` equal to `public_origin` instead.

use http::{HeaderMap, HeaderName, Method, header};

use crate::config::CsrfMode;
use crate::error::Error;
use crate::proxy::headers::FieldScan;

static SEC_FETCH_SITE: HeaderName = HeaderName::from_static("sec-fetch-site");

/// The CSRF rules for one request.
pub(crate) struct Check<'a> {
    pub(crate) header: &'a HeaderName,
    pub(crate) public_origin: &'a str,
}

impl Check<'_> {
    /// Checks a request to a route (or `/bff/*` JSON endpoint) with the given mode. `scan` says
    /// which of the fields looked at the head holds ([`FieldScan::UNKNOWN`]: look them all up).
    pub(crate) fn check(
        &self,
        headers: &HeaderMap,
        scan: FieldScan,
        method: &Method,
        mode: CsrfMode,
        upgrade: bool,
    ) -> Result<(), Error> {
        if mode == CsrfMode::Off {
            return Ok(());
        }
        // Every value counts: a duplicated header must not hide a refusal behind a first value.
        if scan.has(FieldScan::SEC_FETCH_SITE)
            && headers
                .get_all(&SEC_FETCH_SITE)
                .iter()
                .any(|v| v.as_bytes().eq_ignore_ascii_case(b"cross-site"))
        {
            return Err(Error::Csrf("cross-site requests are refused".into()));
        }
        let has_origin = scan.has(FieldScan::ORIGIN) && {
            let origins = headers.get_all(header::ORIGIN);
            if origins
                .iter()
                .any(|o| o.as_bytes() != self.public_origin.as_bytes())
            {
                return Err(Error::Csrf("the request's Origin is not this site".into()));
            }
            origins.iter().next().is_some()
        };
        if upgrade {
            if !has_origin {
                return Err(Error::Csrf(
                    "a WebSocket upgrade needs an Origin header".into(),
                ));
            }
            return Ok(());
        }
        if mode == CsrfMode::UnsafeMethods
            && matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
        {
            return Ok(());
        }
        match headers.get(self.header) {
            Some(v) if !v.is_empty() => Ok(()),
            _ => Err(Error::Csrf(format!(
                "the {} header is required",
                self.header
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn h(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        m
    }

    const HDR: HeaderName = HeaderName::from_static("x-csrf");

    fn check(
        headers: &HeaderMap,
        method: Method,
        mode: CsrfMode,
        upgrade: bool,
    ) -> Result<(), u16> {
        let rules = Check {
            header: &HDR,
            public_origin: "https://app.test",
        };
        // The scan of the head and no scan at all decide alike.
        let scanned = rules.check(headers, FieldScan::of(headers), &method, mode, upgrade);
        let looked_up = rules.check(headers, FieldScan::UNKNOWN, &method, mode, upgrade);
        assert_eq!(
            scanned.as_ref().map_err(|e| e.status()),
            looked_up.as_ref().map_err(|e| e.status())
        );
        scanned.map_err(|e| e.status().as_u16())
    }

    #[test]
    fn the_header_is_required_on_every_method_by_default() {
        assert_eq!(check(&h(&[]), Method::GET, CsrfMode::All, false), Err(403));
        assert_eq!(
            check(&h(&[("x-csrf", "1")]), Method::GET, CsrfMode::All, false),
            Ok(())
        );
        assert_eq!(
            check(&h(&[("x-csrf", "")]), Method::POST, CsrfMode::All, false),
            Err(403)
        );
    }

    #[test]
    fn unsafe_methods_mode_lets_safe_methods_through() {
        assert_eq!(
            check(&h(&[]), Method::GET, CsrfMode::UnsafeMethods, false),
            Ok(())
        );
        assert_eq!(
            check(&h(&[]), Method::POST, CsrfMode::UnsafeMethods, false),
            Err(403)
        );
    }

    #[test]
    fn foreign_origins_and_cross_site_fetches_are_refused_even_with_the_header() {
        assert_eq!(
            check(
                &h(&[("x-csrf", "1"), ("origin", "https://evil.test")]),
                Method::POST,
                CsrfMode::All,
                false
            ),
            Err(403)
        );
        assert_eq!(
            check(
                &h(&[("x-csrf", "1"), ("origin", "null")]),
                Method::POST,
                CsrfMode::All,
                false
            ),
            Err(403)
        );
        assert_eq!(
            check(
                &h(&[("x-csrf", "1"), ("sec-fetch-site", "cross-site")]),
                Method::GET,
                CsrfMode::All,
                false
            ),
            Err(403)
        );
        assert_eq!(
            check(
                &h(&[
                    ("x-csrf", "1"),
                    ("origin", "https://app.test"),
                    ("sec-fetch-site", "same-origin")
                ]),
                Method::POST,
                CsrfMode::All,
                false
            ),
            Ok(())
        );
    }

    #[test]
    fn a_duplicated_fetch_metadata_header_cannot_hide_a_cross_site_value() {
        let mut m = h(&[("x-csrf", "1")]);
        m.append("sec-fetch-site", HeaderValue::from_static("same-origin"));
        m.append("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert_eq!(check(&m, Method::GET, CsrfMode::All, false), Err(403));
    }

    #[test]
    fn websocket_upgrades_are_checked_by_origin() {
        assert_eq!(
            check(
                &h(&[("origin", "https://app.test")]),
                Method::GET,
                CsrfMode::All,
                true
            ),
            Ok(())
        );
        assert_eq!(check(&h(&[]), Method::GET, CsrfMode::All, true), Err(403));
        assert_eq!(
            check(
                &h(&[("origin", "https://evil.test")]),
                Method::GET,
                CsrfMode::All,
                true
            ),
            Err(403)
        );
    }
}
