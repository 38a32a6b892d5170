//! coatcheck: a backend-for-frontend reverse proxy. The browser gets an opaque `HttpOnly` session
//! cookie; the OAuth/OIDC tokens stay here, and every API request leaves with
//! `Authorization: Bearer` injected.
//!
//! # Layout
//!
//! ```text
//! listener ─▶ tls ─▶ router ─▶ auth (session, oidc, csrf, policy, refresh) ─▶ proxy ─▶ upstream
//! admin (plain HTTP) ─▶ router (readiness), auth (session admin API)
//! ```
//!
//! A module uses the ones to its right and the leaves; it never reaches back left.
//!
//! - [`cli`]: the command line (`run`, `check-config`, `dev-cert`).
//! - [`app`]: the composition root; wires every module, starts, reloads (`SIGHUP`) and stops.
//! - [`listener`]: accepts connections, terminates TLS, serves HTTP/1.1 + HTTP/2, drains on shutdown.
//! - [`tls`]: rustls server/client configuration and development certificates.
//! - [`router`]: path normalization, route choice, coatcheck's own endpoints, errors → responses.
//! - [`auth`]: the orchestrator — token issuers (OIDC, session capture, client credentials), CSRF,
//!   per-route policy, single-flight refresh, the `/bff/*` endpoints (including `/bff/events`).
//! - [`session`]: the session ticket (cookie), its cache (told by the store's event channel) and
//!   the store kinds (`memory`, `embedded`, `redis`), each with a once-set, a lease and events.
//! - [`proxy`]: rewrites a request for its upstream and streams the answer back.
//! - [`upstream`]: pooled HTTP/1.1 + HTTP/2 clients per upstream.
//! - [`admin`]: the operator listener (plain HTTP): `/metrics`, health, the session admin API.
//!
//! Leaves: [`config`] (file shape and validated truth), [`error`] (taxonomy → status),
//! [`secret`] (values that never print), [`body`] (shared body types), [`telemetry`] (logs),
//! [`metrics`] (counters and histograms, pre-resolved per route; Prometheus exposition),
//! [`trace`] (W3C trace-context propagation and optional OTLP span export), `wake` (the waker a
//! timer or signal holds, so an unchanged one is not polled again).

pub mod admin;
pub mod app;
pub mod auth;
pub mod body;
pub mod cli;
pub mod config;
pub mod error;
pub mod listener;
pub mod metrics;
pub mod proxy;
pub mod router;
pub mod secret;
pub mod session;
pub mod telemetry;
pub mod tls;
pub mod trace;
pub mod upstream;
mod wake;
