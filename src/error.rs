//! The error taxonomy every request-facing failure ends in, and its one mapping to HTTP.
//!
//! Module errors convert into [`Error`]; `router` is the one place that turns an [`Error`] into a
//! response (DESIGN §5: `{"error": code, "message": text}`). Which side failed decides the status:
//! the client (4xx), the upstream (502/504), the identity provider or the store (503), or us (500).

use std::time::Duration;

/// Boxed error used for sources we only log.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A failure that ends a request with an answer from coatcheck itself.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed (bad path encoding, bad parameter…). The text is shown to the client.
    #[error("{0}")]
    BadRequest(String),
    /// No valid session for a route or endpoint that needs one.
    #[error("no valid session")]
    Unauthenticated {
        /// Where the browser should go to log in.
        login_url: String,
    },
    /// An admin API request without the right `admin.token` (`Authorization: Bearer`).
    #[error("a valid admin token is required (Authorization: Bearer <admin.token>)")]
    AdminUnauthorized,
    /// The session existed but has ended (timeout, refresh token rejected by the provider).
    #[error("the session has ended; log in again")]
    SessionExpired {
        /// Where the browser should go to log in.
        login_url: String,
        /// Whether the response must clear the session cookie.
        clear_cookie: bool,
    },
    /// Authenticated, but not allowed.
    #[error("{0}")]
    Forbidden(String),
    /// CSRF defence refused the request.
    #[error("{0}")]
    Csrf(String),
    /// Nothing is routed at this path.
    #[error("no route for this path")]
    NotFound,
    /// The route does not allow this method.
    #[error("method not allowed on this route")]
    MethodNotAllowed {
        /// Value of the `Allow` header.
        allow: String,
    },
    /// The request body exceeds the route's limit.
    #[error("request body exceeds the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// The client stopped sending its request body for `server.limits.body_idle_timeout`.
    #[error("the request body stalled for {0:?}")]
    RequestTimeout(Duration),
    /// The client sent too many requests of a rate-limited kind (`/bff/login`, `/bff/callback`).
    #[error("too many requests; retry in {retry_after} s")]
    TooManyRequests {
        /// Seconds for `Retry-After`.
        retry_after: u64,
    },
    /// The request line and headers exceed `server.limits.max_header_bytes`.
    #[error("request headers exceed the limit of {limit} bytes")]
    HeadersTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The upstream could not be reached or broke the exchange.
    #[error("the upstream could not be reached")]
    BadGateway(#[source] BoxError),
    /// The upstream did not answer within the route's timeout.
    #[error("the upstream did not answer within {0:?}")]
    GatewayTimeout(Duration),
    /// The identity provider is unreachable or failing.
    #[error("the identity provider is unavailable")]
    IdpUnavailable {
        /// Why (logged, not shown).
        #[source]
        source: Option<BoxError>,
        /// Seconds for `Retry-After`.
        retry_after: u64,
    },
    /// The session store is unreachable or failing.
    #[error("the session store is unavailable")]
    StoreUnavailable(#[source] BoxError),
    /// A bug or an unexpected local failure.
    #[error("internal error")]
    Internal(#[source] BoxError),
}

impl Error {
    /// The `error` code of the JSON body (DESIGN §5).
    pub(crate) fn code(&self) -> &'static str {
        match self {
            Error::BadRequest(_) => "bad_request",
            Error::Unauthenticated { .. } | Error::AdminUnauthorized => "unauthenticated",
            Error::SessionExpired { .. } => "session_expired",
            Error::Forbidden(_) => "forbidden",
            Error::Csrf(_) => "csrf",
            Error::NotFound => "not_found",
            Error::MethodNotAllowed { .. } => "method_not_allowed",
            Error::PayloadTooLarge { .. } => "payload_too_large",
            Error::HeadersTooLarge { .. } => "request_header_fields_too_large",
            Error::RequestTimeout(_) => "request_timeout",
            Error::TooManyRequests { .. } => "too_many_requests",
            Error::BadGateway(_) => "bad_gateway",
            Error::GatewayTimeout(_) => "gateway_timeout",
            Error::IdpUnavailable { .. } => "idp_unavailable",
            Error::StoreUnavailable(_) => "store_unavailable",
            Error::Internal(_) => "internal",
        }
    }

    /// The HTTP status.
    pub(crate) fn status(&self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            Error::BadRequest(_) => S::BAD_REQUEST,
            Error::Unauthenticated { .. }
            | Error::SessionExpired { .. }
            | Error::AdminUnauthorized => S::UNAUTHORIZED,
            Error::Forbidden(_) | Error::Csrf(_) => S::FORBIDDEN,
            Error::NotFound => S::NOT_FOUND,
            Error::MethodNotAllowed { .. } => S::METHOD_NOT_ALLOWED,
            Error::PayloadTooLarge { .. } => S::PAYLOAD_TOO_LARGE,
            Error::HeadersTooLarge { .. } => S::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Error::RequestTimeout(_) => S::REQUEST_TIMEOUT,
            Error::TooManyRequests { .. } => S::TOO_MANY_REQUESTS,
            Error::BadGateway(_) => S::BAD_GATEWAY,
            Error::GatewayTimeout(_) => S::GATEWAY_TIMEOUT,
            Error::IdpUnavailable { .. } | Error::StoreUnavailable(_) => S::SERVICE_UNAVAILABLE,
            Error::Internal(_) => S::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `message` of the JSON body: safe to show, never an internal detail.
    pub(crate) fn public_message(&self) -> String {
        match self {
            Error::BadGateway(_) => "the upstream could not be reached".to_owned(),
            Error::StoreUnavailable(_) => "the session store is unavailable".to_owned(),
            Error::Internal(_) => "internal error".to_owned(),
            other => other.to_string(),
        }
    }

    /// Whether the failure is the client's (logged at a lower level).
    pub(crate) fn is_client_error(&self) -> bool {
        self.status().is_client_error()
    }

    /// Shorthand for an internal error from any source.
    pub(crate) fn internal(e: impl Into<BoxError>) -> Self {
        Error::Internal(e.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_maps_to_the_status_of_design_section_5() {
        let io = || -> BoxError { "x".into() };
        let cases: Vec<(Error, u16, &str)> = vec![
            (Error::BadRequest("x".into()), 400, "bad_request"),
            (
                Error::Unauthenticated {
                    login_url: "/".into(),
                },
                401,
                "unauthenticated",
            ),
            (
                Error::SessionExpired {
                    login_url: "/".into(),
                    clear_cookie: true,
                },
                401,
                "session_expired",
            ),
            (Error::AdminUnauthorized, 401, "unauthenticated"),
            (Error::Forbidden("x".into()), 403, "forbidden"),
            (Error::Csrf("x".into()), 403, "csrf"),
            (Error::NotFound, 404, "not_found"),
            (
                Error::MethodNotAllowed {
                    allow: "GET".into(),
                },
                405,
                "method_not_allowed",
            ),
            (
                Error::PayloadTooLarge { limit: 1 },
                413,
                "payload_too_large",
            ),
            (
                Error::HeadersTooLarge { limit: 1 },
                431,
                "request_header_fields_too_large",
            ),
            (
                Error::RequestTimeout(Duration::from_secs(1)),
                408,
                "request_timeout",
            ),
            (
                Error::TooManyRequests { retry_after: 1 },
                429,
                "too_many_requests",
            ),
            (Error::BadGateway(io()), 502, "bad_gateway"),
            (
                Error::GatewayTimeout(Duration::from_secs(1)),
                504,
                "gateway_timeout",
            ),
            (
                Error::IdpUnavailable {
                    source: None,
                    retry_after: 5,
                },
                503,
                "idp_unavailable",
            ),
            (Error::StoreUnavailable(io()), 503, "store_unavailable"),
            (Error::Internal(io()), 500, "internal"),
        ];
        for (e, status, code) in cases {
            assert_eq!(e.status().as_u16(), status, "{code}");
            assert_eq!(e.code(), code);
        }
    }

    #[test]
    fn internal_details_never_reach_the_message() {
        let e = Error::Internal("database password is hunter2".into());
        assert_eq!(e.public_message(), "internal error");
    }
}
