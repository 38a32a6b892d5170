//! Metrics: every counter, gauge and histogram coatcheck keeps, and their Prometheus exposition
//! (OpenMetrics text through `prometheus-client`; the admin listener serves it).
//!
//! Cheap on the hot path: every handle a request touches is resolved when coatcheck starts — one
//! slot per configured route, per status code, per fixed result — so recording is a few relaxed
//! atomic additions: no lock, no allocation, no label lookup. Label sets are bounded: `route` is a
//! configured route path (or `/bff/`, or `-` for coatcheck's own answers outside any route), never
//! the request path; `status` is the response code; `result`, `endpoint` and `op` come from the fixed
//! lists below. No label ever holds a token, a cookie value or a secret.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// `Content-Type` of the exposition (OpenMetrics 1.0 text, which Prometheus negotiates).
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Histogram bucket upper bounds for request and upstream-facing latencies, in seconds.
pub(crate) const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Histogram bucket upper bounds for session store calls, in seconds (a store answers in
/// microseconds to milliseconds; its timeout is 500 ms by default).
pub(crate) const STORE_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// The `route` label of a request coatcheck answered itself under `/bff/`.
pub(crate) const BFF_ROUTE: &str = "/bff/";
/// The `route` label of a request that matched no route (`/healthz`, 404, refused before routing).
pub(crate) const NO_ROUTE: &str = "-";
/// Lowest and highest status code counted; anything else is counted as 599 (never happens with
/// hyper, which only sends valid codes).
const FIRST_STATUS: u16 = 100;
const STATUSES: usize = 500;

macro_rules! label_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $label:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub(crate) enum $name { $($(#[$vdoc])* $variant),+ }
        impl $name {
            /// Every value, in label order.
            pub(crate) const ALL: &'static [$name] = &[$($name::$variant),+];
            /// The label value.
            pub(crate) fn label(self) -> &'static str {
                match self { $($name::$variant => $label),+ }
            }
            /// Every label value, in order.
            fn labels() -> Vec<String> {
                Self::ALL.iter().map(|v| v.label().to_owned()).collect()
            }
        }
    };
}

label_enum! {
    /// `coatcheck_logins_total{result}`: how a login (callback or capture) ended.
    LoginResult {
        /// A session was created.
        Ok => "ok",
        /// The provider answered the authorization request with an error (user cancelled, consent denied).
        Denied => "denied",
        /// The callback did not belong to a login of this browser (state, login cookie, replay, expired).
        InvalidRequest => "invalid_request",
        /// The provider refused the authorization code.
        InvalidGrant => "invalid_grant",
        /// The ID token was missing or did not validate.
        InvalidToken => "invalid_token",
        /// The provider could not be reached or answered garbage.
        IdpUnavailable => "idp_unavailable",
        /// The provider did not answer in time.
        Timeout => "timeout",
        /// The session store could not record the login.
        StoreUnavailable => "store_unavailable",
    }
}

label_enum! {
    /// `coatcheck_refresh_total{result}`: how a token refresh ended.
    RefreshResult {
        /// This instance refreshed the tokens.
        Ok => "ok",
        /// Another request (here or on another instance) refreshed them; its result was used.
        Shared => "shared",
        /// The issuer refused the refresh token: the session ended.
        InvalidGrant => "invalid_grant",
        /// The session had no refresh token and its access token expired: the session ended.
        NoRefreshToken => "no_refresh_token",
        /// The issuer could not be reached or answered garbage (the session is kept).
        IdpUnavailable => "idp_unavailable",
        /// The issuer did not answer in time (the session is kept).
        Timeout => "timeout",
        /// The store could not coordinate the refresh (the session is kept).
        StoreUnavailable => "store_unavailable",
        /// Waiting behind another refresh took longer than `oidc.refresh_wait`.
        WaitTimeout => "wait_timeout",
    }
}

label_enum! {
    /// `coatcheck_backchannel_logout_total{result}`.
    BackchannelResult {
        /// The logout token was valid; the named sessions ended (possibly none).
        Ok => "ok",
        /// The request had no readable `logout_token`.
        BadRequest => "bad_request",
        /// The logout token did not validate.
        InvalidToken => "invalid_token",
        /// The logout token was already used.
        Replayed => "replayed",
        /// The provider's keys could not be fetched.
        IdpUnavailable => "idp_unavailable",
        /// The store could not end the sessions.
        StoreUnavailable => "store_unavailable",
    }
}

label_enum! {
    /// `coatcheck_config_reloads_total{result}`.
    ReloadResult {
        /// The new configuration took effect.
        Ok => "ok",
        /// The file did not validate; the running configuration stayed.
        Error => "error",
    }
}

label_enum! {
    /// `endpoint` of the identity provider call metrics.
    IdpEndpoint {
        /// `/.well-known/openid-configuration`.
        Discovery => "discovery",
        /// `jwks_uri`.
        Jwks => "jwks",
        /// `token_endpoint` (code exchange and refresh).
        Token => "token",
        /// `revocation_endpoint`.
        Revocation => "revocation",
    }
}

label_enum! {
    /// `op` of the session store call metrics (one per store operation).
    StoreOp {
        Create => "create",
        Load => "load",
        Save => "save",
        Touch => "touch",
        Delete => "delete",
        DeleteIdpSession => "delete_idp_session",
        DeleteSubject => "delete_subject",
        ListSubject => "list_subject",
        Sweep => "sweep",
        Ping => "ping",
        FirstUse => "first_use",
        Forget => "forget",
        Acquire => "acquire",
        Release => "release",
        Publish => "publish",
    }
}

/// A histogram made of atomics (`prometheus-client`'s own takes a mutex per observation).
/// Buckets are stored non-cumulative; the encoder accumulates them.
pub(crate) struct AtomicHistogram {
    bounds: &'static [f64],
    /// One per bound, plus `+Inf`.
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl AtomicHistogram {
    /// A histogram with these bucket upper bounds (seconds, ascending; `+Inf` is added).
    pub(crate) fn new(bounds: &'static [f64]) -> Self {
        AtomicHistogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// Records one duration: three relaxed atomic additions.
    pub(crate) fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.count.fetch_add(1, Relaxed);
        self.sum_nanos
            .fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    /// Observations so far.
    pub(crate) fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }
}

impl fmt::Debug for AtomicHistogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AtomicHistogram")
            .field("count", &self.count())
            .finish()
    }
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        let buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(self.buckets.iter().map(|b| b.load(Relaxed)))
            .collect();
        // The count is the buckets' sum, so that a scrape racing an observation stays consistent.
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.sum_nanos.load(Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// One metric per value of one label (`route`, `result`, `endpoint`, `op`), resolved up front:
/// the hot path indexes, never hashes.
pub(crate) struct ByLabel<M> {
    key: &'static str,
    /// Shared with the registry's copy.
    entries: Arc<[(String, M)]>,
}

impl<M> Clone for ByLabel<M> {
    fn clone(&self) -> Self {
        ByLabel {
            key: self.key,
            entries: self.entries.clone(),
        }
    }
}

impl<M> ByLabel<M> {
    fn new(
        key: &'static str,
        values: impl IntoIterator<Item = String>,
        make: impl Fn() -> M,
    ) -> Self {
        ByLabel {
            key,
            entries: values.into_iter().map(|v| (v, make())).collect(),
        }
    }

    /// The metric of the `i`th label value.
    pub(crate) fn at(&self, i: usize) -> &M {
        &self.entries[i.min(self.entries.len() - 1)].1
    }

    /// The metric whose label value is `value`.
    pub(crate) fn get(&self, value: &str) -> Option<&M> {
        self.entries
            .iter()
            .find(|(v, _)| v == value)
            .map(|(_, m)| m)
    }
}

impl<M> fmt::Debug for ByLabel<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ByLabel")
            .field("key", &self.key)
            .field("values", &self.entries.len())
            .finish()
    }
}

impl<M: EncodeMetric> EncodeMetric for ByLabel<M> {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        for (value, m) in self.entries.iter() {
            let labels = [(self.key, value.as_str())];
            m.encode(encoder.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        self.entries
            .first()
            .map_or(MetricType::Unknown, |(_, m)| m.metric_type())
    }
}

/// `coatcheck_requests_total{route,status}`: one atomic per route and status code; only codes
/// that occurred are exposed.
#[derive(Clone)]
pub(crate) struct RequestCounts {
    routes: Arc<[String]>,
    /// Shared with the registry's copy.
    counts: Arc<[AtomicU64]>,
}

impl RequestCounts {
    fn new(routes: &[String]) -> Self {
        RequestCounts {
            routes: routes.into(),
            counts: (0..routes.len() * STATUSES)
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    fn slot(&self, route: usize, status: u16) -> &AtomicU64 {
        let route = route.min(self.routes.len() - 1);
        let s = usize::from(status.saturating_sub(FIRST_STATUS)).min(STATUSES - 1);
        &self.counts[route * STATUSES + s]
    }

    fn inc(&self, route: usize, status: u16) {
        self.slot(route, status).fetch_add(1, Relaxed);
    }
}

impl fmt::Debug for RequestCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestCounts")
            .field("routes", &self.routes)
            .finish()
    }
}

impl EncodeMetric for RequestCounts {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        for (r, route) in self.routes.iter().enumerate() {
            for s in 0..STATUSES {
                let n = self.counts[r * STATUSES + s].load(Relaxed);
                if n == 0 {
                    continue;
                }
                let status = (FIRST_STATUS as usize + s).to_string();
                let labels = [("route", route.as_str()), ("status", status.as_str())];
                encoder
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
            }
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

/// Every metric coatcheck keeps. Built once at start-up; shared as an `Arc`.
pub struct Metrics {
    registry: Registry,
    /// `route` label values: the configured routes in file order, then `/bff/`, then `-`.
    routes: Vec<String>,
    /// `coatcheck_requests_total{route,status}`.
    pub(crate) requests: RequestCounts,
    /// `coatcheck_request_duration_seconds{route}`.
    pub(crate) request_duration: ByLabel<AtomicHistogram>,
    /// `coatcheck_sessions_active`: set at scrape time from the session cache.
    pub(crate) sessions_active: Gauge,
    /// `coatcheck_logins_total{result}`, indexed by [`LoginResult`].
    pub(crate) logins: ByLabel<Counter>,
    /// `coatcheck_refresh_total{result}`, indexed by [`RefreshResult`].
    pub(crate) refreshes: ByLabel<Counter>,
    /// `coatcheck_refresh_waiters`.
    pub(crate) refresh_waiters: Gauge,
    /// `coatcheck_session_cache_hits_total`.
    pub cache_hits: Counter,
    /// `coatcheck_session_cache_misses_total`.
    pub(crate) cache_misses: Counter,
    /// `coatcheck_store_errors_total`.
    pub(crate) store_errors: Counter,
    /// `coatcheck_store_call_duration_seconds{op}`, indexed by [`StoreOp`].
    pub(crate) store_duration: ByLabel<AtomicHistogram>,
    /// `coatcheck_backchannel_logout_total{result}`, indexed by [`BackchannelResult`].
    pub(crate) backchannel_logouts: ByLabel<Counter>,
    /// `coatcheck_config_reloads_total{result}`, indexed by [`ReloadResult`].
    pub(crate) config_reloads: ByLabel<Counter>,
    /// `coatcheck_idp_request_duration_seconds{endpoint}`, indexed by [`IdpEndpoint`].
    pub(crate) idp_duration: ByLabel<AtomicHistogram>,
    /// `coatcheck_idp_errors_total{endpoint}`, indexed by [`IdpEndpoint`].
    pub(crate) idp_errors: ByLabel<Counter>,
    /// `coatcheck_connections_open`.
    pub(crate) connections_open: Gauge,
    /// `coatcheck_connections_total`.
    pub(crate) connections_total: Counter,
    /// `coatcheck_upgrades_total`.
    pub(crate) upgrades_total: Counter,
    /// `coatcheck_upgrades_open`.
    pub(crate) upgrades_open: Gauge,
    /// `coatcheck_admin_actions_total{action}` ([`ADMIN_ACTIONS`]).
    pub(crate) admin_actions: ByLabel<Counter>,
}

/// `action` of `coatcheck_admin_actions_total`.
pub(crate) const ADMIN_ACTIONS: &[&str] =
    &["list_sessions", "end_subject", "end_session", "refused"];

fn labels(values: &[impl AsRef<str>]) -> Vec<String> {
    values.iter().map(|v| v.as_ref().to_owned()).collect()
}

impl Metrics {
    /// Builds and registers every metric; `routes` are the configured route paths in file order.
    pub fn new<S: AsRef<str>>(routes: &[S]) -> Metrics {
        let mut names: Vec<String> = labels(routes);
        for extra in [BFF_ROUTE, NO_ROUTE] {
            if !names.iter().any(|n| n == extra) {
                names.push(extra.to_owned());
            }
        }
        let counters = |key, values: Vec<String>| ByLabel::new(key, values, Counter::default);
        let histograms = |key, values: Vec<String>, bounds: &'static [f64]| {
            ByLabel::new(key, values, || AtomicHistogram::new(bounds))
        };
        let m = Metrics {
            registry: Registry::default(),
            requests: RequestCounts::new(&names),
            request_duration: histograms("route", names.clone(), LATENCY_BUCKETS),
            routes: names,
            sessions_active: Gauge::default(),
            logins: counters("result", LoginResult::labels()),
            refreshes: counters("result", RefreshResult::labels()),
            refresh_waiters: Gauge::default(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            store_errors: Counter::default(),
            store_duration: histograms("op", StoreOp::labels(), STORE_BUCKETS),
            backchannel_logouts: counters("result", BackchannelResult::labels()),
            config_reloads: counters("result", ReloadResult::labels()),
            idp_duration: histograms("endpoint", IdpEndpoint::labels(), LATENCY_BUCKETS),
            idp_errors: counters("endpoint", IdpEndpoint::labels()),
            connections_open: Gauge::default(),
            connections_total: Counter::default(),
            upgrades_total: Counter::default(),
            upgrades_open: Gauge::default(),
            admin_actions: counters("action", labels(ADMIN_ACTIONS)),
        };
        m.register()
    }

    /// Registers every metric; the order of registration is the order of `/metrics`.
    fn register(mut self) -> Metrics {
        self.register_requests();
        self.register_store();
        self.register_idp_and_reloads();
        self.register_connections();
        self
    }

    /// Requests and the sessions and logins behind them.
    fn register_requests(&mut self) {
        let r = &mut self.registry;
        r.register(
            "coatcheck_requests",
            "Requests answered, by route (configured path, /bff/ or -) and status code",
            self.requests.clone(),
        );
        r.register(
            "coatcheck_request_duration_seconds",
            "Time from a request's arrival to its response head, by route",
            self.request_duration.clone(),
        );
        r.register(
            "coatcheck_sessions_active",
            "Sessions this instance holds in its cache (used within the cache TTL plus the outage grace)",
            self.sessions_active.clone(),
        );
        r.register(
            "coatcheck_logins",
            "Completed login attempts (callbacks and captured logins), by result",
            self.logins.clone(),
        );
        r.register(
            "coatcheck_refresh",
            "Token refreshes, by result",
            self.refreshes.clone(),
        );
        r.register(
            "coatcheck_refresh_waiters",
            "Requests currently waiting for another request's token refresh",
            self.refresh_waiters.clone(),
        );
    }

    /// The session cache and the session store.
    fn register_store(&mut self) {
        let r = &mut self.registry;
        r.register(
            "coatcheck_session_cache_hits",
            "Session lookups served from this instance's cache",
            self.cache_hits.clone(),
        );
        r.register(
            "coatcheck_session_cache_misses",
            "Session lookups that read the session store",
            self.cache_misses.clone(),
        );
        r.register(
            "coatcheck_store_errors",
            "Session store calls that failed (store unreachable or failing)",
            self.store_errors.clone(),
        );
        r.register(
            "coatcheck_store_call_duration_seconds",
            "Session store call latency, by operation",
            self.store_duration.clone(),
        );
    }

    /// Calls to the identity provider, its back-channel logouts, and configuration reloads.
    fn register_idp_and_reloads(&mut self) {
        let r = &mut self.registry;
        r.register(
            "coatcheck_backchannel_logout",
            "Back-channel logout requests from the identity provider, by result",
            self.backchannel_logouts.clone(),
        );
        r.register(
            "coatcheck_config_reloads",
            "Configuration reloads, by result",
            self.config_reloads.clone(),
        );
        r.register(
            "coatcheck_idp_request_duration_seconds",
            "Identity provider call latency, by endpoint",
            self.idp_duration.clone(),
        );
        r.register(
            "coatcheck_idp_errors",
            "Identity provider calls that failed (unreachable, timed out, 5xx or garbage), by endpoint",
            self.idp_errors.clone(),
        );
    }

    /// Connections, upgraded tunnels and the session admin API.
    fn register_connections(&mut self) {
        let r = &mut self.registry;
        r.register(
            "coatcheck_connections_open",
            "Client connections currently open on the public listener (upgraded tunnels included)",
            self.connections_open.clone(),
        );
        r.register(
            "coatcheck_connections",
            "Client connections accepted on the public listener",
            self.connections_total.clone(),
        );
        r.register(
            "coatcheck_upgrades",
            "Protocol upgrades (WebSocket) tunnelled to an upstream",
            self.upgrades_total.clone(),
        );
        r.register(
            "coatcheck_upgrades_open",
            "Upgraded tunnels currently open",
            self.upgrades_open.clone(),
        );
        r.register(
            "coatcheck_admin_actions",
            "Session admin API requests, by action (refused: missing or wrong token)",
            self.admin_actions.clone(),
        );
    }

    /// The `route` label index of a configured route path (`/bff/` and `-` included).
    pub fn route_index(&self, route: &str) -> usize {
        self.routes
            .iter()
            .position(|r| r == route)
            .unwrap_or(self.routes.len() - 1)
    }

    /// Counts one answered request and its time to the response head.
    #[inline]
    pub fn request(&self, route: usize, status: u16, elapsed: Duration) {
        self.requests.inc(route, status);
        self.request_duration.at(route).observe(elapsed);
    }

    /// Counts one login by its result.
    pub(crate) fn login(&self, result: LoginResult) {
        self.logins.at(result as usize).inc();
    }

    /// Counts one refresh by its result.
    pub(crate) fn refresh(&self, result: RefreshResult) {
        self.refreshes.at(result as usize).inc();
    }

    /// Counts one back-channel logout request by its result.
    pub(crate) fn backchannel_logout(&self, result: BackchannelResult) {
        self.backchannel_logouts.at(result as usize).inc();
    }

    /// Counts one configuration reload by its result.
    pub(crate) fn config_reload(&self, result: ReloadResult) {
        self.config_reloads.at(result as usize).inc();
    }

    /// Records one identity provider call.
    pub(crate) fn idp_call(&self, endpoint: IdpEndpoint, elapsed: Duration, failed: bool) {
        self.idp_duration.at(endpoint as usize).observe(elapsed);
        if failed {
            self.idp_errors.at(endpoint as usize).inc();
        }
    }

    /// Records one session store call.
    pub(crate) fn store_call(&self, op: StoreOp, elapsed: Duration, failed: bool) {
        self.store_duration.at(op as usize).observe(elapsed);
        if failed {
            self.store_errors.inc();
        }
    }

    /// Counts one admin API request (`action` from [`ADMIN_ACTIONS`]).
    pub(crate) fn admin_action(&self, action: &str) {
        if let Some(c) = self.admin_actions.get(action) {
            c.inc();
        }
    }

    /// The exposition, OpenMetrics text.
    pub(crate) fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    /// Metrics for a configuration without routes (library users, benchmarks).
    fn default() -> Self {
        Metrics::new::<&str>(&[])
    }
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("routes", &self.routes)
            .finish()
    }
}

/// A gauge held up while something is open (a connection, a tunnel, a waiter).
pub(crate) struct Open(Gauge);

impl Open {
    /// Raises `gauge` by one until the returned guard is dropped.
    pub(crate) fn new(gauge: &Gauge) -> Open {
        gauge.inc();
        Open(gauge.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_every_series_with_bounded_labels() {
        let m = Metrics::new(&["/api/", "/"]);
        m.request(m.route_index("/api/"), 200, Duration::from_millis(3));
        m.request(m.route_index("/nope/"), 404, Duration::from_millis(1));
        m.login(LoginResult::Ok);
        m.refresh(RefreshResult::InvalidGrant);
        m.cache_hits.inc();
        let text = m.encode();
        for want in [
            "coatcheck_requests_total{route=\"/api/\",status=\"200\"} 1",
            "coatcheck_requests_total{route=\"-\",status=\"404\"} 1",
            "coatcheck_request_duration_seconds_bucket{le=\"0.005\",route=\"/api/\"} 1",
            "coatcheck_request_duration_seconds_count{route=\"/\"} 0",
            "coatcheck_logins_total{result=\"ok\"} 1",
            "coatcheck_logins_total{result=\"idp_unavailable\"} 0",
            "coatcheck_refresh_total{result=\"invalid_grant\"} 1",
            "coatcheck_session_cache_hits_total 1",
            "coatcheck_session_cache_misses_total 0",
            "coatcheck_store_errors_total 0",
            "coatcheck_sessions_active 0",
            "coatcheck_backchannel_logout_total{result=\"ok\"} 0",
            "coatcheck_config_reloads_total{result=\"error\"} 0",
            "coatcheck_idp_request_duration_seconds_count{endpoint=\"token\"} 0",
            "coatcheck_store_call_duration_seconds_count{op=\"load\"} 0",
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_the_sum_is_in_seconds() {
        let m = Metrics::new(&["/"]);
        let i = m.route_index("/");
        m.request(i, 200, Duration::from_millis(2));
        m.request(i, 200, Duration::from_secs(60));
        let text = m.encode();
        assert!(
            text.contains("coatcheck_request_duration_seconds_bucket{le=\"0.0025\",route=\"/\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("coatcheck_request_duration_seconds_bucket{le=\"30.0\",route=\"/\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("coatcheck_request_duration_seconds_bucket{le=\"+Inf\",route=\"/\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("coatcheck_request_duration_seconds_sum{route=\"/\"} 60.002"),
            "{text}"
        );
    }
}
