//! The composition root: the one place that knows every module and wires them together.
//!
//! [`check`] validates what can be validated offline (for `check-config`); [`start`] binds the
//! listeners and returns a [`Running`] handle that tests and `main` use alike.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::auth::Auth;
use crate::config::{Config, Problem};
use crate::router::Router;
use crate::session::Sessions;
use crate::{listener, tls};

/// Expired sessions are swept from the store this often.
pub const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(300);

async fn sweep_expired(sessions: Arc<Sessions>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => match sessions.sweep().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(removed = n, cached = sessions.cached(), "expired sessions swept"),
                Err(e) => tracing::warn!(error = %e, "session sweep failed"),
            },
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Why coatcheck could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("{0}")]
    Bind(String),
    #[error("{0}")]
    Setup(String),
}

/// Checks everything that needs no network beyond what [`Config::load`] did: certificates and keys
/// parse and match, CA files hold certificates.
pub fn check(config: &Config) -> Vec<Problem> {
    tls::install_provider();
    let mut problems = Vec::new();
    if let Err(e) = tls::server_config(&config.server.tls.cert, &config.server.tls.key) {
        problems.push(Problem {
            key: "server.tls".into(),
            reason: e.to_string(),
        });
    }
    for r in &config.routes {
        if let Some(ca) = &r.ca
            && let Err(e) = tls::root_store("ca", Some(ca))
        {
            problems.push(Problem {
                key: format!("route[{}].ca", r.index),
                reason: e.to_string(),
            });
        }
    }
    if let Some(ca) = config.oidc.as_ref().and_then(|o| o.ca.as_ref())
        && let Err(e) = tls::root_store("oidc.ca", Some(ca))
    {
        problems.push(Problem {
            key: "oidc.ca".into(),
            reason: e.to_string(),
        });
    }
    problems
}

/// A running coatcheck.
pub struct Running {
    /// The bound HTTPS address (useful with port 0).
    pub addr: SocketAddr,
    /// The bound plain-HTTP redirect address, if configured.
    pub redirect_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl Running {
    /// Starts a graceful shutdown: stop accepting, let in-flight requests finish within the grace.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// A token that starts the shutdown when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until every listener has stopped and drained.
    pub async fn wait(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Builds every part and binds the listeners.
pub async fn start(config: Config) -> Result<Running, StartError> {
    tls::install_provider();
    let config = Arc::new(config);
    let server_tls = tls::server_config(&config.server.tls.cert, &config.server.tls.key)?;
    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let auth = match &config.oidc {
        Some(_) => {
            let auth = Arc::new(Auth::new(&config).map_err(StartError::Setup)?);
            // Discovery retries in the background: coatcheck serves `auth = "none"` routes and
            // reports not-ready until the provider answers; then it is refreshed periodically.
            let provider = auth.provider.clone();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = provider.discover_and_refresh() => {}
                    _ = stop.cancelled() => {}
                }
            });
            tokio::spawn(sweep_expired(auth.sessions.clone(), shutdown.clone()));
            Some(auth)
        }
        None => None,
    };
    let router = Arc::new(Router::new(&config, auth)?);

    let https = listener::bind("server.listen", config.server.listen)
        .await
        .map_err(StartError::Bind)?;
    let addr = https
        .local_addr()
        .map_err(|e| StartError::Bind(e.to_string()))?;
    let redirect = match config.server.http_redirect_listen {
        Some(a) => Some(
            listener::bind("server.http_redirect_listen", a)
                .await
                .map_err(StartError::Bind)?,
        ),
        None => None,
    };
    let redirect_addr = redirect.as_ref().and_then(|l| l.local_addr().ok());

    tasks.spawn(listener::serve_tls(
        https,
        server_tls,
        router,
        config.server.limits.clone(),
        shutdown.clone(),
    ));
    if let Some(l) = redirect {
        tasks.spawn(listener::serve_redirect(
            l,
            config.server.public_origin.clone(),
            config.server.limits.clone(),
            shutdown.clone(),
        ));
    }
    tracing::info!(%addr, routes = config.routes.len(), "coatcheck listening");
    Ok(Running {
        addr,
        redirect_addr,
        shutdown,
        tasks,
    })
}
