//! Per-client-address token buckets (`server.limits.login_requests_per_minute`): a client that
//! floods `/bff/login` or `/bff/callback` gets 429 `too_many_requests` with `Retry-After`.
//!
//! Memory is bounded: at most [`MAX_TRACKED_CLIENTS`] buckets, each forgotten after
//! [`BUCKET_IDLE`] without a request (a forgotten bucket is a full one, which is what it would have
//! refilled to by then anyway).

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::Error;

/// Client addresses tracked at once; the least recently used are evicted beyond this.
pub(crate) const MAX_TRACKED_CLIENTS: u64 = 100_000;
/// A bucket without requests for this long is dropped (it has refilled by then).
pub(crate) const BUCKET_IDLE: Duration = Duration::from_secs(120);

/// Token buckets keyed by client address.
pub(crate) struct RateLimiter {
    /// Tokens per second.
    rate: f64,
    /// Bucket size (the burst a client may send at once).
    burst: f64,
    buckets: moka::sync::Cache<IpAddr, Arc<Mutex<Bucket>>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    /// `per_minute` requests a minute, refilled evenly; bursts up to a fifth of it (at least 1).
    pub(crate) fn per_minute(per_minute: u32) -> RateLimiter {
        let per_minute = f64::from(per_minute.max(1));
        RateLimiter {
            rate: per_minute / 60.0,
            burst: (per_minute / 5.0).max(1.0),
            buckets: moka::sync::Cache::builder()
                .max_capacity(MAX_TRACKED_CLIENTS)
                .time_to_idle(BUCKET_IDLE)
                .build(),
        }
    }

    /// Takes one token for `client`, or says how many seconds until one is available.
    pub(crate) fn check(&self, client: IpAddr) -> Result<(), Error> {
        self.take(client.to_canonical(), Instant::now())
            .map_err(|retry_after| Error::TooManyRequests { retry_after })
    }

    fn take(&self, client: IpAddr, now: Instant) -> Result<(), u64> {
        let burst = self.burst;
        let bucket = self.buckets.get_with(client, || {
            Arc::new(Mutex::new(Bucket {
                tokens: burst,
                at: now,
            }))
        });
        let mut b = bucket.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - b.tokens) / self.rate).ceil().max(1.0) as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_gets_its_burst_then_waits_while_others_are_unaffected() {
        let l = RateLimiter::per_minute(60);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let t = Instant::now();
        for _ in 0..12 {
            assert_eq!(l.take(a, t), Ok(()));
        }
        assert_eq!(l.take(a, t), Err(1));
        assert_eq!(l.take(b, t), Ok(()));
        assert_eq!(l.take(a, t + Duration::from_secs(1)), Ok(()));
    }
}
