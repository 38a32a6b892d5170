//! `coatcheck sessions`: the session admin API (`[admin]`, docs/operations.md) from the command
//! line. It is a client of the running process's admin listener, so it acts on every instance
//! that shares the store, exactly as `curl` against `/sessions` would.
//!
//! Where to call: `--admin URL`, else `http://<admin.listen>` of `--config`. The token:
//! `COATCHECK_ADMIN_TOKEN`, else `admin.token` of `--config`. The token is never printed.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::Value;

use crate::config::Config;

/// Exit status when the admin API could not be reached or refused the request.
const EXIT_FAILED: u8 = 1;
/// Exit status for a usage problem (no admin address or token to use).
const EXIT_USAGE: u8 = 64;

#[derive(Debug, Args)]
pub(crate) struct SessionsArgs {
    /// The admin listener's base URL, e.g. http://127.0.0.1:9100 (default: `admin.listen` of --config).
    #[arg(long, value_name = "URL")]
    admin: Option<url::Url>,
    /// Configuration file to read `admin.listen` and `admin.token` from.
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the API's JSON answer instead of a table.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, Subcommand)]
enum Action {
    /// List a user's sessions (`GET /sessions?sub=…`).
    List {
        #[command(flatten)]
        user: User,
    },
    /// End one session (`DELETE /sessions/{id}`) or all of a user's (`DELETE /sessions?sub=…`),
    /// on every instance.
    End {
        /// The session id (as `list` shows it).
        #[arg(long, conflicts_with_all = ["sub", "iss"], required_unless_present = "sub")]
        id: Option<String>,
        #[command(flatten)]
        user: OptionalUser,
    },
}

#[derive(Debug, Args)]
struct User {
    /// The user's subject (`sub` claim).
    #[arg(long)]
    sub: String,
    /// The issuer (default: the configured `[oidc] issuer`).
    #[arg(long)]
    iss: Option<String>,
}

#[derive(Debug, Args)]
struct OptionalUser {
    /// End every session of this subject (`sub` claim).
    #[arg(long)]
    sub: Option<String>,
    /// The issuer (default: the configured `[oidc] issuer`).
    #[arg(long)]
    iss: Option<String>,
}

/// Where to send the request, and with which token.
struct Target {
    base: url::Url,
    token: String,
}

/// Runs `coatcheck sessions …`.
pub(crate) fn run(args: SessionsArgs) -> ExitCode {
    let target = match target(&args) {
        Ok(t) => t,
        Err(why) => {
            eprintln!("error: {why}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let (method, url) = request(&target.base, &args.action);
    let runtime = match super::runtime(tokio::runtime::Builder::new_current_thread()) {
        Ok(r) => r,
        Err(code) => return code,
    };
    match runtime.block_on(call(method, url, &target.token)) {
        Ok(answer) => {
            print_answer(&args, &answer);
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("error: {why}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

fn target(args: &SessionsArgs) -> Result<Target, String> {
    let config = match &args.config {
        Some(path) => Some(Config::load(path).map_err(|e| e.to_string())?),
        None => None,
    };
    let admin = config.as_ref().and_then(|c| c.admin.as_ref());
    let base = match (&args.admin, admin) {
        (Some(url), _) => url.clone(),
        (None, Some(a)) => {
            // A wildcard listen address is reached on loopback.
            let mut addr = a.listen;
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            url::Url::parse(&format!("http://{addr}")).map_err(|e| e.to_string())?
        }
        (None, None) => {
            return Err("where is the admin listener? give --admin URL, or --config FILE with [admin] listen".into());
        }
    };
    let token = match std::env::var("COATCHECK_ADMIN_TOKEN") {
        Ok(t) if !t.is_empty() => t,
        _ => admin
            .and_then(|a| a.token.as_ref())
            .map(|t| t.expose().to_owned())
            .ok_or(
                "no admin token: set COATCHECK_ADMIN_TOKEN, or give --config FILE with admin.token",
            )?,
    };
    Ok(Target { base, token })
}

/// The admin API request an action makes.
fn request(base: &url::Url, action: &Action) -> (reqwest::Method, url::Url) {
    let mut url = base.clone();
    let subject = |url: &mut url::Url, sub: &str, iss: Option<&String>| {
        url.set_path("/sessions");
        let mut q = url.query_pairs_mut();
        q.clear().append_pair("sub", sub);
        if let Some(iss) = iss {
            q.append_pair("iss", iss);
        }
    };
    match action {
        Action::List { user } => {
            subject(&mut url, &user.sub, user.iss.as_ref());
            (reqwest::Method::GET, url)
        }
        Action::End { id: Some(id), .. } => {
            if let Ok(mut segments) = url.path_segments_mut() {
                segments.clear().push("sessions").push(id);
            }
            (reqwest::Method::DELETE, url)
        }
        Action::End { id: None, user } => {
            subject(
                &mut url,
                user.sub.as_deref().unwrap_or(""),
                user.iss.as_ref(),
            );
            (reqwest::Method::DELETE, url)
        }
    }
}

async fn call(method: reqwest::Method, url: url::Url, token: &str) -> Result<Value, String> {
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    let shown = format!("{method} {}", url.as_str());
    let res = client
        .request(method, url)
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| format!("{shown}: {e}"))?;
    let status = res.status();
    let body: Value = res.json().await.unwrap_or(Value::Null);
    if status.is_success() {
        return Ok(body);
    }
    let message = body["message"].as_str().unwrap_or("no message");
    let error = body["error"].as_str().unwrap_or("error");
    Err(format!("{shown}: {status}: {error}: {message}"))
}

fn print_answer(args: &SessionsArgs, answer: &Value) {
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(answer).unwrap_or_default()
        );
        return;
    }
    match (&args.action, answer) {
        (Action::List { .. }, _) => print_table(answer["sessions"].as_array()),
        (Action::End { id: Some(id), .. }, _) => println!("ended session {id}"),
        (Action::End { .. }, _) => println!(
            "ended {} session(s) on every instance",
            answer["revoked"].as_u64().unwrap_or(0)
        ),
    }
}

fn print_table(sessions: Option<&Vec<Value>>) {
    let sessions = sessions.map(Vec::as_slice).unwrap_or_default();
    if sessions.is_empty() {
        println!("no sessions");
        return;
    }
    println!(
        "{:<32}  {:<20}  {:<20}  {:<20}  user agent",
        "id", "created", "last seen", "expires"
    );
    for s in sessions {
        let field = |k: &str| s[k].as_str().unwrap_or("-").to_owned();
        println!(
            "{:<32}  {:<20}  {:<20}  {:<20}  {}",
            field("id"),
            field("created_at"),
            field("last_seen"),
            field("expires_at"),
            field("user_agent"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    fn parse(args: &[&str]) -> Result<crate::cli::Cli, clap::Error> {
        crate::cli::Cli::try_parse_from(std::iter::once("coatcheck").chain(args.iter().copied()))
    }

    fn action(args: &[&str]) -> (reqwest::Method, String) {
        let cli = parse(args).unwrap_or_else(|e| panic!("{e}"));
        let Some(crate::cli::Command::Sessions(s)) = cli.command else {
            panic!("not sessions")
        };
        let base = s.admin.clone().expect("--admin");
        let (m, u) = request(&base, &s.action);
        (m, u.to_string())
    }

    #[test]
    fn each_action_names_its_admin_api_request() {
        let admin = ["sessions", "--admin", "http://127.0.0.1:9100"];
        let with = |rest: &[&str]| action(&[&admin[..], rest].concat());
        assert_eq!(
            with(&["list", "--sub", "alice smith"]),
            (
                reqwest::Method::GET,
                "http://127.0.0.1:9100/sessions?sub=alice+smith".into()
            )
        );
        assert_eq!(
            with(&["end", "--sub", "bob", "--iss", "https://idp.example/"]),
            (
                reqwest::Method::DELETE,
                "http://127.0.0.1:9100/sessions?sub=bob&iss=https%3A%2F%2Fidp.example%2F".into()
            )
        );
        assert_eq!(
            with(&["end", "--id", "0123456789abcdef0123456789abcdef"]),
            (
                reqwest::Method::DELETE,
                "http://127.0.0.1:9100/sessions/0123456789abcdef0123456789abcdef".into()
            )
        );
    }

    #[test]
    fn end_needs_an_id_or_a_subject_but_not_both() {
        let admin = ["sessions", "--admin", "http://127.0.0.1:9100", "end"];
        assert!(parse(&admin).is_err());
        assert!(parse(&[&admin[..], &["--id", "x", "--sub", "y"]].concat()).is_err());
    }

    #[test]
    fn the_admin_address_and_token_come_from_the_config_file() {
        let dir = std::env::temp_dir().join(format!("coatcheck-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.toml");
        for pem in ["c.pem", "k.pem"] {
            std::fs::write(dir.join(pem), "").unwrap();
        }
        std::fs::write(
            &path,
            format!(
                "[server]\nlisten = \"127.0.0.1:8443\"\npublic_origin = \"https://localhost:8443\"\n\
             [server.tls]\ncert = {:?}\nkey = {:?}\n\
             [admin]\nlisten = \"0.0.0.0:9100\"\ntoken = \"0123456789abcdef-admin\"\n\
             [[route]]\npath = \"/\"\nupstream = \"http://127.0.0.1:9000\"\nauth = \"none\"\n",
                dir.join("c.pem"),
                dir.join("k.pem")
            ),
        )
        .unwrap();
        let config = path.to_str().unwrap();
        let cli = parse(&["sessions", "--config", config, "list", "--sub", "a"]).unwrap();
        let Some(crate::cli::Command::Sessions(s)) = cli.command else {
            panic!("not sessions")
        };
        let t = target(&s).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            t.base.as_str(),
            "http://127.0.0.1:9100/",
            "a wildcard is reached on loopback"
        );
        if std::env::var_os("COATCHECK_ADMIN_TOKEN").is_none() {
            assert_eq!(t.token, "0123456789abcdef-admin");
        }
        let cli = parse(&["sessions", "list", "--sub", "a"]).unwrap();
        let Some(crate::cli::Command::Sessions(s)) = cli.command else {
            panic!("not sessions")
        };
        assert!(target(&s).is_err_and(|e| e.contains("--admin")));
        std::fs::remove_dir_all(&dir).ok();
    }
}
