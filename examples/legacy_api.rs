//! The legacy API of the session-capture demo: an existing API with its own JSON login
//! (`POST /auth/login`, `/auth/refresh`, `/auth/logout`) and HS256 bearer tokens on `/api/*`.
//! The integration tests start the very same code (`tests/support/legacy_api.rs`, included below);
//! its module documentation lists every endpoint.
//!
//! ```text
//! cargo run --example legacy_api                      # http://127.0.0.1:9001, access tokens of 300 s
//! LEGACY_API_LISTEN=127.0.0.1:9100 LEGACY_API_ACCESS_TTL=4 cargo run --example legacy_api
//! ```
//!
//! Users: `alice` / `alice-pw`, `bob` / `bob-pw`.

#[path = "../tests/support/legacy_api.rs"]
mod legacy_api;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use legacy_api::{LegacyApi, LegacyOptions, USERS};

/// Where the demo expects the legacy API.
const DEFAULT_LISTEN: &str = "127.0.0.1:9001";
/// Access-token lifetime of the demo, in seconds: long enough to click around.
const DEFAULT_ACCESS_TTL_SECS: u64 = 300;

fn setting<T: std::str::FromStr>(name: &str, default: &str) -> Result<T, String> {
    let raw = std::env::var(name).unwrap_or_else(|_| default.to_owned());
    raw.parse()
        .map_err(|_| format!("{name}={raw:?} is not a valid value"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let settings = setting::<SocketAddr>("LEGACY_API_LISTEN", DEFAULT_LISTEN).and_then(|addr| {
        setting::<u64>(
            "LEGACY_API_ACCESS_TTL",
            &DEFAULT_ACCESS_TTL_SECS.to_string(),
        )
        .map(|ttl| (addr, ttl))
    });
    let (addr, ttl) = match settings {
        Ok(s) => s,
        Err(e) => {
            eprintln!("legacy_api: {e}");
            return ExitCode::from(64);
        }
    };
    let api = LegacyApi::start_with(LegacyOptions {
        addr,
        access_ttl: Duration::from_secs(ttl),
        ..LegacyOptions::default()
    })
    .await;
    let users: Vec<String> = USERS
        .iter()
        .map(|u| format!("{} / {}", u.id, u.password))
        .collect();
    println!(
        "legacy API on {} (access tokens live {ttl} s; users: {})",
        api.url(),
        users.join(", ")
    );
    let _ = tokio::signal::ctrl_c().await;
    let c = api.counts();
    println!(
        "stopping: {} logins, {} refreshes, {} logouts, {} API calls",
        c.logins, c.refreshes, c.logouts, c.api_calls
    );
    ExitCode::SUCCESS
}
