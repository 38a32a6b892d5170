//! The command line: `run` (default), `check-config`, `dev-cert`, `sessions`.

mod sessions;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{Config, ConfigError, LogFormat};
use crate::{app, telemetry, tls};

/// Exit status for a configuration error (EX_CONFIG would be 78; sysexits' EX_USAGE, 64, is what
/// operators and the issue tracker expect here).
pub(crate) const EXIT_CONFIG: u8 = 64;

/// coatcheck: a backend-for-frontend proxy that keeps OAuth/OIDC tokens server-side and hands the
/// browser only an HttpOnly session cookie.
#[derive(Debug, Parser)]
#[command(name = "coatcheck", version, about, long_about = None, after_help = "Start here: coatcheck dev-cert, then coatcheck run --config config.toml. Docs: README.md and docs/.")]
pub(crate) struct Cli {
    /// Log format (overrides `[log] format`).
    #[arg(long, global = true, value_enum)]
    pub(crate) log_format: Option<CliLogFormat>,
    /// Configuration file for `run` when no command is given (`coatcheck --config FILE`).
    #[arg(long, short, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    #[command(subcommand)]
    pub(crate) command: Option<Command>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum CliLogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the proxy (the default when no command is given).
    Run {
        /// Configuration file.
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
    },
    /// Validate a configuration file without starting anything; exit 64 listing every problem.
    CheckConfig {
        /// Configuration file.
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
    },
    /// Create a local development CA and a server certificate signed by it.
    DevCert {
        /// Output directory.
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// Names and addresses the certificate is valid for.
        #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1,::1")]
        hosts: Vec<String>,
    },
    /// List or end users' sessions through the admin API of a running coatcheck (`[admin]`).
    Sessions(sessions::SessionsArgs),
}

/// Entry point used by `main`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run {
        config: cli.config.unwrap_or_else(|| PathBuf::from("config.toml")),
    }) {
        Command::Run { config } => run(&config, cli.log_format),
        Command::CheckConfig { config } => check_config(&config),
        Command::DevCert { out, hosts } => dev_cert(&out, &hosts),
        Command::Sessions(args) => sessions::run(args),
    }
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    let report = |e: ConfigError| {
        eprintln!("error: invalid configuration {e}");
        ExitCode::from(EXIT_CONFIG)
    };
    let config = Config::load(path).map_err(report)?;
    let problems = app::check(&config);
    if !problems.is_empty() {
        return Err(report(ConfigError {
            file: path.display().to_string(),
            problems,
        }));
    }
    Ok(config)
}

fn check_config(path: &std::path::Path) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    println!("{}: ok", path.display());
    println!(
        "  listen          https://{} (public origin {})",
        config.server.listen, config.server.public_origin
    );
    if let Some(r) = config.server.http_redirect_listen {
        println!("  redirect        http://{r} -> https");
    }
    if let Some(o) = &config.oidc {
        println!(
            "  oidc            issuer {} client {}",
            o.issuer, o.client_id
        );
    }
    if let Some(c) = &config.capture {
        println!(
            "  capture         login {} refresh {} (route {})",
            c.login_path, c.refresh_path, config.routes[c.route].path
        );
    }
    if config.needs_sessions() {
        println!("  session store   {:?}", config.session.store);
    }
    for r in &config.routes {
        println!(
            "  route {:<10} -> {} (auth {:?})",
            r.path, r.upstream, r.auth
        );
    }
    ExitCode::SUCCESS
}

fn dev_cert(out: &std::path::Path, hosts: &[String]) -> ExitCode {
    match tls::generate_dev_certs(out, hosts) {
        Ok(files) => {
            println!(
                "wrote {} (CA), {} and {}",
                files.ca_cert.display(),
                files.cert.display(),
                files.key.display()
            );
            println!("trust the CA to avoid browser warnings: see certs/README.md");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(path: &std::path::Path, log_format: Option<CliLogFormat>) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let format = match log_format {
        Some(CliLogFormat::Json) => LogFormat::Json,
        Some(CliLogFormat::Text) => LogFormat::Text,
        None => config.log.format,
    };
    telemetry::init(&config.log.level, format);
    let runtime = match runtime(tokio::runtime::Builder::new_multi_thread()) {
        Ok(r) => r,
        Err(code) => return code,
    };
    runtime.block_on(async move {
        // Before anything listens: a SIGHUP that came earlier would end the process (its default).
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
        let running = match app::start(config).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                return ExitCode::FAILURE;
            }
        };
        let token = running.shutdown_token();
        match hangup {
            Ok(hup) => drop(tokio::spawn(reload_on_hangup(
                hup,
                running.reloader(),
                token.clone(),
            ))),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; reloading needs a restart")
            }
        }
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown signal received; draining");
            token.cancel();
        });
        running.wait().await;
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
}

/// `SIGHUP` (`kill -HUP`): reload the configuration file and the certificate, one at a time.
async fn reload_on_hangup(
    mut hup: tokio::signal::unix::Signal,
    reloader: app::ReloadHandle,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            Some(()) = hup.recv() => {}
            _ = shutdown.cancelled() => return,
        }
        tracing::info!("SIGHUP received; reloading the configuration");
        let reloader = reloader.clone();
        // File reads and key parsing: off the request threads.
        if let Err(e) = tokio::task::spawn_blocking(move || reloader.reload()).await {
            tracing::error!(error = %e, "reload failed");
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// A tokio runtime with I/O and timers, or the reason it could not start (exit status 1).
fn runtime(mut builder: tokio::runtime::Builder) -> Result<tokio::runtime::Runtime, ExitCode> {
    builder.enable_all().build().map_err(|e| {
        eprintln!("error: cannot start the runtime: {e}");
        ExitCode::FAILURE
    })
}
