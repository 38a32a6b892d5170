//! Authentication and authorization (interface only; filled in by the OIDC/session work).

use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;

use crate::body::Body;
use crate::config::Route;
use crate::error::Error;
use crate::proxy::Forward;
use crate::upstream::Upstream;

/// Whether `path` (normalized) is one of coatcheck's own `/bff/*` endpoints.
pub fn is_bff_path(path: &str) -> bool {
    path == "/bff" || path.starts_with("/bff/")
}

/// Sessions, login and per-route policy.
pub struct Auth {
    cookie_names: Vec<String>,
}

impl Auth {
    pub async fn ready(&self) -> Result<(), String> {
        Err("not built".into())
    }
    pub fn cookie_names(&self) -> &[String] {
        &self.cookie_names
    }
    pub async fn handle_bff(
        &self,
        _req: Request<Incoming>,
        _path: &str,
    ) -> Result<Response<Body>, Error> {
        Err(Error::NotFound)
    }
    pub async fn forward(
        &self,
        _u: &Upstream,
        _r: &Route,
        _req: Request<Incoming>,
        _f: Forward<'_>,
    ) -> Result<Response<Body>, Error> {
        Err(Error::NotFound)
    }
    pub fn clear_session_cookie(&self) -> HeaderValue {
        HeaderValue::from_static("")
    }
}
