//! The composition root: the one place that knows every module and wires them together.
//!
//! `check` validates what can be validated offline (for `check-config`); [`start`] binds the
//! listeners and returns a [`Running`] handle that tests and `main` use alike.
//!
//! - `reload`: `SIGHUP` re-reads the configuration and the certificate ([`ReloadHandle::reload`]).
//!
//! Requests are served on one current-thread runtime per core (thread per core, as nginx runs one
//! worker process per core), each accepting on its own `SO_REUSEPORT` socket: a connection, its
//! requests and their upstream connections stay on one thread, with no cross-thread wake-ups.
//! Everything else (admin, the redirect listener, background work, signals) runs on the caller's
//! runtime.

pub(crate) mod reload;

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Admin};
use crate::auth::Auth;
use crate::config::{Config, Problem};
use crate::metrics::Metrics;
use crate::router::Router;
use crate::{listener, tls};
use reload::Reloader;
pub use reload::{ReloadCounts, ReloadOutcome};

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
pub(crate) fn check(config: &Config) -> Vec<Problem> {
    tls::install_provider();
    let mut problems = Vec::new();
    if let Err(e) = tls::ServerCert::load(&config.server.tls.cert, &config.server.tls.key) {
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
    /// The bound plain-HTTP admin address (`[admin] listen`), if configured.
    pub admin_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
    reloader: Arc<Reloader>,
}

/// A dropped handle stops the serving runtimes (gracefully), as it aborts its other tasks.
impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Reloads a running coatcheck; outlives [`Running::wait`] (the `SIGHUP` handler holds one).
#[derive(Clone)]
pub struct ReloadHandle(Arc<Reloader>);

impl ReloadHandle {
    /// Re-reads the configuration file and the TLS certificate and key, and applies what may
    /// change at run time (see `reload`); a file that does not validate changes nothing.
    /// Blocks on file reads: a server calls it from `spawn_blocking` (as the `SIGHUP` handler does).
    pub fn reload(&self) -> ReloadOutcome {
        self.0.reload()
    }

    /// Reloads so far, by result.
    pub fn counts(&self) -> ReloadCounts {
        self.0.counts()
    }
}

impl Running {
    /// A handle that reloads the configuration ([`ReloadHandle::reload`]).
    pub fn reloader(&self) -> ReloadHandle {
        ReloadHandle(self.reloader.clone())
    }

    /// Starts a graceful shutdown: stop accepting, let in-flight requests finish within the grace.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// A token that starts the shutdown when cancelled.
    pub(crate) fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until every listener has stopped and drained.
    pub async fn wait(mut self) {
        while self.tasks.join_next().await.is_some() {}
        // Spans of the last requests are still queued: export them before the process ends.
        crate::trace::shutdown().await;
    }
}

/// How many serving runtimes: `TOKIO_WORKER_THREADS` when set (tokio's own knob, which the
/// default runtime also reads), else one per core.
fn serving_runtimes() -> usize {
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Starts serving runtime `index` (a current-thread runtime on its own thread) on its copy of the
/// HTTPS socket; the receiver resolves when it has stopped and drained.
fn spawn_serving_runtime(
    index: usize,
    socket: std::net::TcpListener,
    server: Arc<listener::TlsServer>,
    shutdown: CancellationToken,
) -> Result<tokio::sync::oneshot::Receiver<()>, StartError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| StartError::Setup(format!("cannot start a serving runtime: {e}")))?;
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("coatcheck-serve-{index}"))
        .spawn(move || {
            crate::upstream::set_worker(index);
            runtime.block_on(async move {
                match tokio::net::TcpListener::from_std(socket) {
                    Ok(l) => server.serve(l, shutdown).await,
                    Err(e) => tracing::error!(error = %e, "cannot serve on the listening socket"),
                }
            });
            let _ = done_tx.send(());
        })
        .map_err(|e| StartError::Setup(format!("cannot start a serving thread: {e}")))?;
    Ok(done_rx)
}

/// Span export is optional: a collector that cannot be set up never stops the proxy.
fn start_span_export(config: &Config) {
    match crate::trace::init(config.telemetry.export_settings().as_ref()) {
        Ok(true) => tracing::info!("exporting spans over OTLP/HTTP"),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "span export is off"),
    }
}

/// The `SO_REUSEPORT` sockets of `server.listen` (one per serving runtime) and their address.
fn bind_https(
    config: &Config,
) -> Result<(Vec<std::net::TcpListener>, std::net::SocketAddr), StartError> {
    let https = listener::bind_serving("server.listen", config.server.listen, serving_runtimes())
        .map_err(StartError::Bind)?;
    let addr = match https.first().map(std::net::TcpListener::local_addr) {
        Some(Ok(a)) => a,
        Some(Err(e)) => return Err(StartError::Bind(e.to_string())),
        None => return Err(StartError::Bind("server.listen: no socket".into())),
    };
    Ok((https, addr))
}

/// One serving runtime (thread) per HTTPS socket; `tasks` ends when they have stopped.
fn serve_https(
    sockets: Vec<std::net::TcpListener>,
    server: &Arc<listener::TlsServer>,
    shutdown: &CancellationToken,
    tasks: &mut JoinSet<()>,
) -> Result<(), StartError> {
    for (i, socket) in sockets.into_iter().enumerate() {
        let done = spawn_serving_runtime(i + 1, socket, server.clone(), shutdown.clone())?;
        tasks.spawn(async move {
            // An error means the thread ended without a word: it stopped all the same.
            let _ = done.await;
        });
    }
    Ok(())
}

/// The route label set of the metrics: the configured route paths, in file order.
fn metrics_for(config: &Config) -> Arc<Metrics> {
    Arc::new(Metrics::new(
        &config
            .routes
            .iter()
            .map(|r| r.path.as_str())
            .collect::<Vec<_>>(),
    ))
}

/// Authentication when anything logs in (`[oidc]` or `[capture]`), its background work started.
fn start_auth(
    config: &Config,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) -> Result<Option<Arc<Auth>>, StartError> {
    if config.oidc.is_none() && config.capture.is_none() {
        return Ok(None);
    }
    let auth = Arc::new(Auth::new(config, metrics.clone()).map_err(StartError::Setup)?);
    auth.spawn_background(shutdown);
    Ok(Some(auth))
}

/// The plain-HTTP redirect listener (`server.http_redirect_listen`), if configured.
async fn bind_redirect(config: &Config) -> Result<Option<tokio::net::TcpListener>, StartError> {
    match config.server.http_redirect_listen {
        Some(a) => Ok(Some(
            listener::bind("server.http_redirect_listen", a)
                .await
                .map_err(StartError::Bind)?,
        )),
        None => Ok(None),
    }
}

/// The admin listener (`[admin] listen`) and what it serves, if configured.
async fn bind_admin(
    config: &Config,
    metrics: &Arc<Metrics>,
    routers: &Arc<ArcSwap<Router>>,
    auth: &Option<Arc<Auth>>,
) -> Result<Option<(tokio::net::TcpListener, Arc<Admin>)>, StartError> {
    let Some(a) = &config.admin else {
        return Ok(None);
    };
    let l = listener::bind("admin.listen", a.listen)
        .await
        .map_err(StartError::Bind)?;
    let admin = Admin::new(a, metrics.clone(), routers.clone(), auth.clone());
    Ok(Some((l, Arc::new(admin))))
}

/// Builds every part and binds the listeners.
pub async fn start(config: Config) -> Result<Running, StartError> {
    tls::install_provider();
    start_span_export(&config);
    let cert = Arc::new(tls::ServerCert::load(
        &config.server.tls.cert,
        &config.server.tls.key,
    )?);
    let server_tls = tls::server_config(cert.clone())?;
    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let metrics = metrics_for(&config);
    let auth = start_auth(&config, &metrics, &shutdown)?;
    let routers = Arc::new(ArcSwap::from_pointee(Router::new(
        &config,
        auth.clone(),
        metrics.clone(),
    )?));

    let (https, addr) = bind_https(&config)?;
    let redirect = bind_redirect(&config).await?;
    let redirect_addr = redirect.as_ref().and_then(|l| l.local_addr().ok());
    let admin = bind_admin(&config, &metrics, &routers, &auth).await?;
    let admin_addr = admin.as_ref().and_then(|(l, _)| l.local_addr().ok());

    let server = listener::TlsServer::new(
        server_tls,
        routers.clone(),
        config.server.limits.clone(),
        metrics.clone(),
    );
    serve_https(https, &server, &shutdown, &mut tasks)?;
    if let Some((l, a)) = admin {
        tasks.spawn(admin::serve(l, a, shutdown.clone()));
    }
    if let Some(l) = redirect {
        tasks.spawn(listener::serve_redirect(
            l,
            config.server.public_origin.clone(),
            config.server.limits.clone(),
            shutdown.clone(),
        ));
    }
    tracing::info!(%addr, admin = ?admin_addr, routes = config.routes.len(), "coatcheck listening");
    Ok(Running {
        addr,
        redirect_addr,
        admin_addr,
        shutdown,
        tasks,
        reloader: Arc::new(Reloader::new(config, auth, routers, cert, metrics)),
    })
}
