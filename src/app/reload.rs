//! Reload without restart (DESIGN §3): `SIGHUP` re-reads the configuration file and the TLS
//! certificate and key.
//!
//! What a reload changes takes effect for new requests and new TLS handshakes; open connections
//! and requests in flight finish on what they started with. Two swap points hold it: the router
//! (`ArcSwap<Router>`, loaded once per request by the listener) and the certificate
//! ([`tls::ServerCert`], read per handshake). The log level is the subscriber's own reload handle.
//!
//! A file that does not validate changes nothing. Keys that need a restart ([`keep_running`]) keep
//! their running value and are reported.

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::auth::Auth;
use crate::config::{AuthMode, Capture, Config, Problem, Server, Session};
use crate::metrics::{Metrics, ReloadResult};
use crate::router::Router;
use crate::secret::Secret;
use crate::telemetry::{self, LevelChange};
use crate::tls;

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The new file is in force, except these keys: they changed but need a restart, so they
    /// keep their running value.
    Applied { needs_restart: Vec<&'static str> },
    /// Nothing changed: the file has these problems (`key.path: reason`, as `check-config`).
    Rejected(Vec<Problem>),
}

/// Reloads so far, by result: what `coatcheck_config_reloads_total{result}` counts.
#[derive(Debug, Clone, Copy)]
pub struct ReloadCounts {
    ok: u64,
    error: u64,
}

impl ReloadCounts {
    /// Reloads that applied the file (possibly with keys that need a restart).
    pub fn ok(&self) -> u64 {
        self.ok
    }

    /// Reloads refused because the file did not validate.
    pub fn error(&self) -> u64 {
        self.error
    }
}

/// Re-reads the configuration and swaps what may change at run time.
pub(crate) struct Reloader {
    /// The running configuration and authentication; the lock also makes reloads one at a time.
    running: Mutex<(Config, Option<Arc<Auth>>)>,
    routers: Arc<ArcSwap<Router>>,
    cert: Arc<tls::ServerCert>,
    /// `coatcheck_config_reloads_total{result}`, and the routers' request metrics.
    metrics: Arc<Metrics>,
}

impl Reloader {
    pub(crate) fn new(
        config: Config,
        auth: Option<Arc<Auth>>,
        routers: Arc<ArcSwap<Router>>,
        cert: Arc<tls::ServerCert>,
        metrics: Arc<Metrics>,
    ) -> Reloader {
        Reloader {
            running: Mutex::new((config, auth)),
            routers,
            cert,
            metrics,
        }
    }

    /// Reloads so far, read from the metrics that count them.
    pub(crate) fn counts(&self) -> ReloadCounts {
        let count = |r: ReloadResult| self.metrics.config_reloads.at(r as usize).get();
        ReloadCounts {
            ok: count(ReloadResult::Ok),
            error: count(ReloadResult::Error),
        }
    }

    /// Reads `config.source` again and applies it, or logs why not and changes nothing.
    pub(crate) fn reload(&self) -> ReloadOutcome {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let file = running.0.source.display().to_string();
        match self.apply(&mut running) {
            Ok(needs_restart) => {
                self.metrics.config_reload(ReloadResult::Ok);
                for key in &needs_restart {
                    tracing::warn!(
                        key,
                        "reload: {key} changed but needs a restart; it keeps its running value"
                    );
                }
                tracing::info!(
                    file,
                    routes = running.0.routes.len(),
                    "configuration reloaded"
                );
                ReloadOutcome::Applied { needs_restart }
            }
            Err(problems) => {
                self.metrics.config_reload(ReloadResult::Error);
                for p in &problems {
                    tracing::error!(file, key = %p.key, "{p}");
                }
                tracing::error!(
                    file,
                    problems = problems.len(),
                    "reload refused; the running configuration stays"
                );
                ReloadOutcome::Rejected(problems)
            }
        }
    }

    /// Validates the file, builds everything new, then swaps; any problem before the swap leaves
    /// everything as it was.
    fn apply(
        &self,
        running: &mut (Config, Option<Arc<Auth>>),
    ) -> Result<Vec<&'static str>, Vec<Problem>> {
        let (config, auth) = running;
        let mut next = Config::load(&config.source).map_err(|e| e.problems)?;
        let problems = super::check(&next);
        if !problems.is_empty() {
            return Err(problems);
        }
        // On the file as written (its `capture.route` indexes its routes), then on what will run.
        if let Some(p) = capture_moved(config, &next) {
            return Err(vec![p]);
        }
        let needs_restart = keep_running(config, &mut next);
        if let Some(p) = unservable(&next, auth.is_some()) {
            return Err(vec![p]);
        }
        let problem = |key: &str, e: tls::TlsError| {
            vec![Problem {
                key: key.into(),
                reason: e.to_string(),
            }]
        };
        let next_auth = auth.as_ref().map(|a| Arc::new(a.reconfigured(&next)));
        // Routes added by a reload are counted under the `-` route label until a restart (the
        // metric label set is fixed at start-up, so it stays bounded).
        let router = Router::new(&next, next_auth.clone(), self.metrics.clone())
            .map_err(|e| problem("route", e))?
            .keeping_login_limit_of(&self.routers.load());
        let tls = &next.server.tls;
        let cert =
            tls::ServerCert::load(&tls.cert, &tls.key).map_err(|e| problem("server.tls", e))?;
        // Past this point nothing fails: the file is in force.
        self.cert.replace_with(cert);
        self.routers.store(Arc::new(router));
        if next.log.level != config.log.level {
            apply_level(&next.log.level);
        }
        if let Some(auth) = &next_auth
            && next.session.keys != config.session.keys
        {
            rotate_keys(auth, &config.session.keys, &next.session.keys);
        }
        *config = next;
        *auth = next_auth;
        Ok(needs_restart)
    }
}

/// A route the running process cannot serve because what it needs (`[oidc]`, or any login) was not
/// configured at start-up and needs a restart to add.
fn unservable(next: &Config, has_auth: bool) -> Option<Problem> {
    next.routes.iter().find_map(|r| {
        let needs = match r.auth {
            AuthMode::None => return None,
            AuthMode::Client | AuthMode::Bearer if next.oidc.is_none() => "[oidc]",
            _ if !has_auth => "[oidc] or [capture]",
            _ => return None,
        };
        Some(Problem {
            key: format!("route[{}].auth", r.index),
            reason: format!(
                "needs {needs}, which the running process was started without; adding it needs a restart"
            ),
        })
    })
}

/// The capture issuer refreshes and logs out against the upstream of its route as it was at
/// start-up, and the router guards that upstream's refresh endpoint: a reload may not point the
/// route elsewhere (the refresh endpoint of the new upstream would be open).
fn capture_moved(running: &Config, next: &Config) -> Option<Problem> {
    let upstream = |c: &Config| {
        let cap = c.capture.as_ref()?;
        c.routes
            .get(cap.route)
            .map(|r| (r.index, r.upstream.clone()))
    };
    let (Some((_, was)), Some((index, now))) = (upstream(running), upstream(next)) else {
        return None;
    };
    (was != now).then(|| Problem {
        key: format!("route[{index}].upstream"),
        reason: format!(
            "{now} is the [capture] route's upstream ({was} at start-up): changing it needs a restart"
        ),
    })
}

/// Puts a new `session.keys` in force and says what it means for the cookies already out.
fn rotate_keys(auth: &Auth, was: &[Secret<Vec<u8>>], now: &[Secret<Vec<u8>>]) {
    auth.set_session_keys(now);
    let retired = was.iter().filter(|k| !now.contains(k)).count();
    let current_changed = was.first() != now.first();
    tracing::info!(
        keys = now.len(),
        current_changed,
        "session.keys changed: new tickets and login cookies are signed with the first key"
    );
    if retired > 0 {
        tracing::warn!(
            retired,
            "session.keys: cookies signed with a key no longer listed stop verifying (those users log in again)"
        );
    }
}

fn apply_level(level: &str) {
    match telemetry::set_level(level) {
        Ok(LevelChange::Applied) => tracing::info!(level, "log level changed"),
        Ok(LevelChange::Overridden) => {
            tracing::warn!(
                level,
                "log.level changed but RUST_LOG is set; RUST_LOG stays in force"
            )
        }
        Err(e) => tracing::warn!(level, error = %e, "log.level could not be applied"),
    }
}

/// Puts the running value back into `next` for every key that needs a restart, and names the ones
/// that changed. Everything else (routes, policies, upstreams, CSRF, `server.trusted_proxies`,
/// `server.underscore_headers`, `server.hsts`, `log.level`, `session.cache.ttl`, the TLS files)
/// takes `next`'s value.
pub(crate) fn keep_running(running: &Config, next: &mut Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let mut keep = |key: &'static str, same: bool| {
        if !same {
            changed.push(key);
        }
    };
    keep_server(&running.server, &mut next.server, &mut keep);

    keep("log.format", running.log.format == next.log.format);
    next.log.format = running.log.format;
    // The export pipeline is built once at start-up.
    keep("telemetry", running.telemetry == next.telemetry);
    next.telemetry = running.telemetry.clone();

    keep_session(&running.session, &mut next.session, &mut keep);

    keep("oidc", running.oidc == next.oidc);
    next.oidc.clone_from(&running.oidc);
    keep_capture(&running.capture, &mut next.capture, &mut keep);
    changed
}

/// [`keep_running`] for `[server]`: the listeners and their limits are bound at start-up.
fn keep_server(s: &Server, n: &mut Server, keep: &mut impl FnMut(&'static str, bool)) {
    keep("server.listen", s.listen == n.listen);
    keep(
        "server.http_redirect_listen",
        s.http_redirect_listen == n.http_redirect_listen,
    );
    keep("server.public_origin", s.public_origin == n.public_origin);
    keep("server.limits", s.limits == n.limits);
    n.listen = s.listen;
    n.http_redirect_listen = s.http_redirect_listen;
    n.public_origin.clone_from(&s.public_origin);
    n.limits = s.limits.clone();
}

/// [`keep_running`] for `[session]`: all of it but `keys` (once sessions exist) and `cache.ttl`.
fn keep_session(s: &Session, n: &mut Session, keep: &mut impl FnMut(&'static str, bool)) {
    keep("session.cookie_name", s.cookie_name == n.cookie_name);
    keep("session.same_site", s.same_site == n.same_site);
    keep("session.idle_timeout", s.idle_timeout == n.idle_timeout);
    keep(
        "session.absolute_timeout",
        s.absolute_timeout == n.absolute_timeout,
    );
    keep("session.persistent", s.persistent == n.persistent);
    keep(
        "session.touch_interval",
        s.touch_interval == n.touch_interval,
    );
    // Keys rotate by reload once sessions exist (the first signs, the rest still verify); a
    // process started without any needs a restart to start using sessions.
    let keys_reload = !s.keys.is_empty() && !n.keys.is_empty();
    keep("session.keys", keys_reload || s.keys == n.keys);
    keep("session.store", s.store == n.store);
    keep("session.record_key", s.record_key == n.record_key);
    keep(
        "session.cache.capacity",
        s.cache_capacity == n.cache_capacity,
    );
    let cache_ttl = n.cache_ttl;
    let keys = std::mem::take(&mut n.keys);
    *n = s.clone();
    n.cache_ttl = cache_ttl;
    if keys_reload {
        n.keys = keys;
    }
}

/// [`keep_running`] for `[capture]`: all of it but `route`, an index into the routes (a route
/// moving in the file is not a change).
fn keep_capture(
    running: &Option<Capture>,
    next: &mut Option<Capture>,
    keep: &mut impl FnMut(&'static str, bool),
) {
    let same_capture = match (running, &*next) {
        (Some(r), Some(n)) => {
            r.clone()
                == Capture {
                    route: r.route,
                    ..n.clone()
                }
        }
        (r, n) => r.is_none() && n.is_none(),
    };
    keep("capture", same_capture);
    match (next, running) {
        (Some(n), Some(r)) => {
            *n = Capture {
                route: n.route,
                ..r.clone()
            }
        }
        (n, r) => n.clone_from(r),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// A configuration; `server` holds more `[server]` keys (a `listen` there replaces the default).
    fn config(server: &str, rest: &str) -> Config {
        let listen = if server.starts_with("listen") {
            ""
        } else {
            "listen = \"127.0.0.1:8443\"\n"
        };
        let text = format!(
            "[server]\n{listen}public_origin = \"https://localhost:8443\"\n{server}\n\
             [server.tls]\ncert = \"Cargo.toml\"\nkey = \"Cargo.toml\"\n{rest}\n"
        );
        Config::from_toml(&text, Path::new("test.toml")).unwrap_or_else(|e| panic!("{e}"))
    }

    const ROUTE: &str =
        "[[route]]\npath = \"/api/\"\nupstream = \"http://127.0.0.1:9001\"\nauth = \"none\"\n";

    #[test]
    fn routes_log_level_and_csrf_reload_without_a_restart() {
        let running = config("", ROUTE);
        let mut next = config(
            "hsts = \"off\"\ntrusted_proxies = [\"10.0.0.0/8\"]",
            "[log]\nlevel = \"debug\"\n[csrf]\nheader = \"x-other\"\n\
             [[route]]\npath = \"/v2/\"\nupstream = \"http://127.0.0.1:9002\"\nauth = \"none\"\n",
        );
        assert_eq!(keep_running(&running, &mut next), Vec::<&str>::new());
        assert_eq!(next.routes[0].path, "/v2/");
        assert_eq!(next.log.level, "debug");
        assert_eq!(next.csrf.header.as_str(), "x-other");
        assert!(next.server.hsts.is_none());
        assert_eq!(next.server.trusted_proxies.len(), 1);
    }

    #[test]
    fn listen_addresses_limits_and_log_format_need_a_restart_and_keep_their_value() {
        let running = config("", ROUTE);
        let mut next = config(
            "listen = \"127.0.0.1:9443\"\nhttp_redirect_listen = \"127.0.0.1:8080\"\n\
             [server.limits]\nmax_connections = 5",
            &format!("[log]\nformat = \"json\"\n{ROUTE}"),
        );
        assert_eq!(
            keep_running(&running, &mut next),
            [
                "server.listen",
                "server.http_redirect_listen",
                "server.limits",
                "log.format"
            ]
        );
        assert_eq!(next.server.listen, running.server.listen);
        assert_eq!(next.server.http_redirect_listen, None);
        assert_eq!(next.server.limits, running.server.limits);
        assert_eq!(next.log.format, running.log.format);
    }

    const SESSIONS: &str = "[oidc]\nissuer = \"https://idp.example\"\nclient_id = \"a\"\n\
        client_secret = \"s\"\n[session]\nkeys = [\"MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\"]\n";

    #[test]
    fn the_store_and_oidc_need_a_restart_but_session_keys_and_the_cache_ttl_reload() {
        let running = config("", &format!("{SESSIONS}{ROUTE}"));
        let text = SESSIONS
            .replace("client_id = \"a\"", "client_id = \"b\"")
            .replace("MDEy", "QUJD")
            .replace(
                "[session]\n",
                "[session]\nstore = { kind = \"memory\" }\ncache = { ttl = \"5s\" }\nrecord_key = \"hkdf\"\n",
            );
        let mut next = config("", &format!("{text}{ROUTE}"));
        assert_eq!(
            keep_running(&running, &mut next),
            ["session.store", "session.record_key", "oidc"]
        );
        assert_eq!(next.session.record_key, running.session.record_key);
        assert_eq!(next.oidc, running.oidc);
        assert!(next.session.keys != running.session.keys);
        assert_eq!(next.session.keys.len(), 1);
        assert_eq!(next.session.store, running.session.store);
        assert_eq!(next.session.cache_ttl, std::time::Duration::from_secs(5));
    }

    #[test]
    fn a_route_that_needs_a_login_the_process_was_started_without_is_refused() {
        let running = config("", ROUTE);
        let mut next = config(
            "",
            &format!("{SESSIONS}{}", ROUTE.replace("none", "bearer")),
        );
        assert_eq!(keep_running(&running, &mut next), ["session.keys", "oidc"]);
        let refused = unservable(&next, false).expect("refused");
        assert_eq!(refused.key, "route[0].auth");
        assert!(refused.reason.contains("[oidc]"), "{refused}");
        assert!(unservable(&config("", ROUTE), false).is_none());
    }
}
