//! The command line, run as the real binary: `check-config` against every `tests/fixtures/bad_*.toml`
//! (each names the key path it must be refused for on its `# expect:` line), a valid config, the
//! shipped `config.toml`, `dev-cert`, `--version` and `--help`.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use rustls::client::danger::ServerCertVerifier as _;
use support::{TempDir, binary};

const EXIT_CONFIG: i32 = 64;

/// Runs the binary with `args` in `cwd`, bounded by 60 s.
fn coatcheck(args: &[&str], cwd: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(binary());
    cmd.args(args)
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        .env_remove("COATCHECK_SESSION_KEY")
        .env_remove("COATCHECK_CLIENT_SECRET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn coatcheck");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(out) => out.expect("wait for coatcheck"),
        Err(_) => {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
            panic!("coatcheck {args:?} did not finish within 60 s");
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A working directory holding `certs/` made by `coatcheck dev-cert` (the fixtures refer to
/// `certs/localhost.crt` and `certs/localhost.key` relative to it).
fn workdir_with_certs() -> TempDir {
    let dir = TempDir::new("cli");
    let out = coatcheck(&["dev-cert", "--out", "certs"], dir.path(), &[]);
    assert!(
        out.status.success(),
        "dev-cert failed: {}",
        text(&out.stderr)
    );
    dir
}

fn fixtures() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with("bad_") && name.ends_with(".toml")
        })
        .collect();
    v.sort();
    v
}

/// The values of the fixture's `# {tag}: a, b, c` header line.
fn header_list(fixture: &str, tag: &str) -> Vec<String> {
    fixture
        .lines()
        .take_while(|l| l.starts_with('#'))
        .filter_map(|l| l.strip_prefix(&format!("# {tag}:")))
        .flat_map(|l| l.split(','))
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

#[test]
fn every_bad_fixture_fails_check_config_naming_its_key() {
    let dir = workdir_with_certs();
    let fixtures = fixtures();
    assert!(
        fixtures.len() >= 8,
        "only {} bad_*.toml fixtures",
        fixtures.len()
    );
    let mut failures = Vec::new();
    for path in &fixtures {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let source = std::fs::read_to_string(path).unwrap();
        let expect = header_list(&source, "expect");
        assert!(!expect.is_empty(), "{name} has no '# expect: key' line");
        let mentions = header_list(&source, "mentions");
        let out = coatcheck(
            &["check-config", "--config", &path.display().to_string()],
            dir.path(),
            &[],
        );
        let stderr = text(&out.stderr);
        if out.status.code() != Some(EXIT_CONFIG) {
            failures.push(format!(
                "{name}: exit {:?}, want {EXIT_CONFIG}\n{stderr}",
                out.status.code()
            ));
            continue;
        }
        // Problems are listed one per line as "  key: reason".
        let problem_lines: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("  "))
            .map(str::trim)
            .collect();
        for key in &expect {
            if !problem_lines
                .iter()
                .any(|l| l.starts_with(&format!("{key}: ")) || l.starts_with(&format!("{key}.")))
            {
                failures.push(format!("{name}: no problem names {key}\n{stderr}"));
            }
        }
        for m in &mentions {
            if !stderr.contains(m.as_str()) {
                failures.push(format!(
                    "{name}: the message does not mention {m}\n{stderr}"
                ));
            }
        }
        if problem_lines.len() != expect.len() {
            failures.push(format!(
                "{name}: {} problem(s) reported, {} expected (a fixture tests one thing)\n{stderr}",
                problem_lines.len(),
                expect.len()
            ));
        }
        if !out.stdout.is_empty() {
            failures.push(format!(
                "{name}: printed a summary on failure: {}",
                text(&out.stdout)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn a_fixture_with_several_problems_lists_them_all() {
    let dir = workdir_with_certs();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bad_many_problems.toml");
    let expect = header_list(&std::fs::read_to_string(&path).unwrap(), "expect");
    assert!(expect.len() >= 5, "{expect:?}");
    let out = coatcheck(
        &["check-config", "--config", &path.display().to_string()],
        dir.path(),
        &[],
    );
    assert_eq!(out.status.code(), Some(EXIT_CONFIG));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("{} problem(s)", expect.len())),
        "{stderr}"
    );
    for key in expect {
        assert!(
            stderr.contains(&format!("  {key}: ")),
            "{key} missing:\n{stderr}"
        );
    }
}

const VALID: &str = r#"
[server]
listen = "127.0.0.1:0"
public_origin = "https://localhost:8443"
http_redirect_listen = "127.0.0.1:0"

[server.tls]
cert = "certs/localhost.crt"
key = "certs/localhost.key"

[server.limits]
max_header_bytes = 8192
header_read_timeout = "5s"
idle_timeout = "30s"
max_connections = 100
shutdown_grace = "5s"

[[route]]
path = "/api/"
upstream = "https://127.0.0.1:9443/v1/"
auth = "none"
strip_prefix = true
timeout = "10s"
max_body_bytes = 1048576
methods = ["GET", "POST"]
preserve_host = true
ca = "certs/ca.crt"

[[route]]
path = "/"
upstream = "http://127.0.0.1:9000"
auth = "none"
"#;

#[test]
fn a_valid_config_passes_check_config() {
    let dir = workdir_with_certs();
    std::fs::write(dir.join("ok.toml"), VALID).unwrap();
    let out = coatcheck(&["check-config", "--config", "ok.toml"], dir.path(), &[]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("ok.toml: ok"), "{stdout}");
    assert!(
        stdout.contains("/api/") && stdout.contains("127.0.0.1:9443"),
        "{stdout}"
    );
    // The default path is config.toml in the working directory.
    std::fs::write(dir.join("config.toml"), VALID).unwrap();
    let out = coatcheck(&["check-config"], dir.path(), &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn a_missing_config_file_is_a_config_error() {
    let dir = TempDir::new("cli");
    let out = coatcheck(&["check-config", "--config", "nope.toml"], dir.path(), &[]);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG));
    assert!(
        text(&out.stderr).contains("nope.toml"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn run_with_a_bad_config_exits_64_before_listening() {
    let dir = workdir_with_certs();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bad_duration.toml");
    let out = coatcheck(
        &["run", "--config", &fixture.display().to_string()],
        dir.path(),
        &[],
    );
    assert_eq!(
        out.status.code(),
        Some(EXIT_CONFIG),
        "{}",
        text(&out.stderr)
    );
    assert!(text(&out.stderr).contains("server.limits.header_read_timeout"));
}

#[test]
fn the_config_option_works_without_the_word_run() {
    let dir = workdir_with_certs();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bad_duration.toml");
    let out = coatcheck(
        &["--config", &fixture.display().to_string()],
        dir.path(),
        &[],
    );
    assert_eq!(
        out.status.code(),
        Some(EXIT_CONFIG),
        "run is the default command and reads the named file: {}",
        text(&out.stderr)
    );
    assert!(text(&out.stderr).contains("server.limits.header_read_timeout"));
}

fn random_key() -> String {
    use base64::Engine as _;
    let mut key = [0u8; 32];
    aws_lc_rs::rand::fill(&mut key).unwrap();
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// A temporary copy of the shipped config.toml with certificates made by `dev-cert` next to it
/// (it names `certs/localhost.crt` relative to the working directory).
fn shipped_config_workdir() -> TempDir {
    let dir = workdir_with_certs();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml"),
        dir.join("config.toml"),
    )
    .unwrap();
    dir
}

#[test]
fn the_shipped_config_passes_check_config() {
    let dir = shipped_config_workdir();
    let key = random_key();
    let out = coatcheck(
        &["check-config", "--config", "config.toml"],
        dir.path(),
        &[
            ("COATCHECK_SESSION_KEY", &key),
            ("COATCHECK_CLIENT_SECRET", "demo-secret"),
        ],
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("config.toml: ok"), "{stdout}");
    assert!(
        !stdout.contains(&key) && !stderr.contains(&key),
        "the key was printed"
    );
    assert!(!stdout.contains("demo-secret") && !stderr.contains("demo-secret"));
    assert!(
        !dir.join("data").exists(),
        "check-config must not create the session store"
    );
}

#[test]
fn the_shipped_config_names_its_missing_secrets() {
    let dir = shipped_config_workdir();
    let out = coatcheck(
        &["check-config", "--config", "config.toml"],
        dir.path(),
        &[],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{stderr}");
    assert!(
        stderr.contains("session.keys[0]") && stderr.contains("COATCHECK_SESSION_KEY"),
        "{stderr}"
    );
    assert!(
        stderr.contains("oidc.client_secret") && stderr.contains("COATCHECK_CLIENT_SECRET"),
        "{stderr}"
    );
}

#[test]
fn version_and_help_work() {
    let dir = TempDir::new("cli");
    let out = coatcheck(&["--version"], dir.path(), &[]);
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout).trim(),
        format!("coatcheck {}", env!("CARGO_PKG_VERSION"))
    );
    let out = coatcheck(&["--help"], dir.path(), &[]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for word in [
        "run",
        "check-config",
        "dev-cert",
        "--log-format",
        "--version",
    ] {
        assert!(
            help.contains(word),
            "--help does not mention {word}:\n{help}"
        );
    }
    for sub in ["run", "check-config", "dev-cert"] {
        let out = coatcheck(&[sub, "--help"], dir.path(), &[]);
        assert!(out.status.success(), "{sub} --help");
        let help = text(&out.stdout);
        let flag = if sub == "dev-cert" {
            "--out"
        } else {
            "--config"
        };
        assert!(help.contains(flag), "{sub} --help lacks {flag}:\n{help}");
    }
    // A wrong command line is a usage error, not a crash.
    let out = coatcheck(&["frobnicate"], dir.path(), &[]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn dev_cert_writes_a_ca_and_a_server_certificate() {
    let dir = TempDir::new("cli");
    let out = coatcheck(
        &[
            "dev-cert",
            "--out",
            "out/certs",
            "--hosts",
            "localhost,127.0.0.1,::1,app.test",
        ],
        dir.path(),
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let certs = dir.join("out/certs");
    for f in ["ca.crt", "ca.key", "localhost.crt", "localhost.key"] {
        let meta = std::fs::metadata(certs.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(meta.len() > 0, "{f} is empty");
        if f.ends_with(".key") {
            use std::os::unix::fs::PermissionsExt as _;
            assert_eq!(
                meta.permissions().mode() & 0o077,
                0,
                "{f} is readable by others"
            );
        }
    }
    // The files make a working server configuration, and the chain holds leaf + CA.
    coatcheck::tls::install_provider();
    coatcheck::tls::ServerCert::load(&certs.join("localhost.crt"), &certs.join("localhost.key"))
        .expect("dev-cert output loads");
    assert_eq!(
        coatcheck::tls::load_certs("t", &certs.join("localhost.crt"))
            .unwrap()
            .len(),
        2
    );
    // The CA verifies the server certificate for each requested name.
    let roots = coatcheck::tls::root_store("t", Some(&certs.join("ca.crt"))).unwrap();
    let chain = coatcheck::tls::load_certs("t", &certs.join("localhost.crt")).unwrap();
    let verifier = rustls::client::WebPkiServerVerifier::builder(std::sync::Arc::new(roots))
        .build()
        .unwrap();
    for host in ["localhost", "127.0.0.1", "::1", "app.test"] {
        let name = rustls_pki_types::ServerName::try_from(host).unwrap();
        verifier
            .verify_server_cert(
                &chain[0],
                &chain[1..],
                &name,
                &[],
                rustls_pki_types::UnixTime::now(),
            )
            .unwrap_or_else(|e| panic!("{host}: {e}"));
    }
    let name = rustls_pki_types::ServerName::try_from("other.test").unwrap();
    assert!(
        verifier
            .verify_server_cert(
                &chain[0],
                &chain[1..],
                &name,
                &[],
                rustls_pki_types::UnixTime::now()
            )
            .is_err()
    );
}

#[test]
fn a_redis_store_config_passes_check_config_without_showing_its_password() {
    let dir = workdir_with_certs();
    let store = "[session.store]\nkind = \"redis\"\nurl = \"env:REDIS_URL\"\nkey_prefix = \"app1:\"\nca = \"certs/ca.crt\"\nsentinels = [\"127.0.0.1:26379\", \"[::1]:26380\"]\nsentinel_master = \"mymaster\"\ntimeout = \"250ms\"\n";
    let ok = format!("{VALID}\n{store}");
    std::fs::write(dir.join("ok.toml"), &ok).unwrap();
    let env = [(
        "REDIS_URL",
        "rediss://coatcheck:pw-Secr3t@redis.internal:6380/2",
    )];
    let out = coatcheck(&["check-config", "--config", "ok.toml"], dir.path(), &env);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(!format!("{stdout}{stderr}").contains("pw-Secr3t"));

    // A bad URL is refused without quoting it.
    let env = [("REDIS_URL", "redis://coatcheck:pw-Secr3t@host/notadb")];
    let out = coatcheck(&["check-config", "--config", "ok.toml"], dir.path(), &env);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{stderr}");
    assert!(stderr.contains("session.store.url: "), "{stderr}");
    assert!(!stderr.contains("pw-Secr3t"), "{stderr}");
}
