//! Reload without restart (DESIGN §3, docs/operations.md "Reload"): `SIGHUP` re-reads the
//! configuration file and the TLS certificate and key; new requests and handshakes get them, open
//! connections keep working; a bad file changes nothing; keys that need a restart are reported.

#[path = "support/bff.rs"]
mod bff;
mod support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use coatcheck::app::{ReloadOutcome, Running};
use coatcheck::config::Config;
use support::upstream::Upstream;
use support::{ProxyProcess, RawConn, TempDir, WAIT, http1_client, http2_client, proxy_config};

fn route(upstream: &Upstream) -> String {
    format!(
        "[[route]]\npath = \"/api/\"\nupstream = \"{}\"\nauth = \"none\"\n",
        upstream.url()
    )
}

/// Starts coatcheck in-process from a real file (a reload re-reads it).
async fn start_from(path: &Path) -> Running {
    support::init_tracing();
    let config = Config::load(path).unwrap_or_else(|e| panic!("{e}"));
    tokio::time::timeout(WAIT, coatcheck::app::start(config))
        .await
        .expect("started in time")
        .expect("started")
}

async fn get_ok(client: &reqwest::Client, url: &str) {
    let res = client.get(url).send().await.expect("request");
    assert_eq!(res.status(), 200, "{url}");
    res.bytes().await.expect("body");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_swapped_under_load_by_sighup_loses_no_request() {
    let (a, b) = (Upstream::start().await, Upstream::start().await);
    let proc = ProxyProcess::start(&proxy_config("", &route(&a))).await;
    let url = format!("https://localhost:{}/api/load", proc.addr.port());
    let reloaded = Arc::new(AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for i in 0..4 {
        // Keep-alive connections, HTTP/1.1 and HTTP/2, opened before the reload.
        let client = if i % 2 == 0 {
            http1_client(proc.addr)
        } else {
            http2_client(proc.addr)
        };
        let (url, reloaded) = (url.clone(), reloaded.clone());
        load.spawn(async move {
            let mut after = 0;
            for _ in 0..2000 {
                get_ok(&client, &url).await;
                if reloaded.load(Ordering::Acquire) {
                    after += 1;
                    if after == 20 {
                        return;
                    }
                }
            }
            panic!("the reload never happened");
        });
    }
    assert!(
        a.wait_for(WAIT, |s| s.seen.lock().unwrap().len() >= 20)
            .await
    );
    std::fs::write(proc.config_path(), proxy_config("", &route(&b))).unwrap();
    proc.signal("HUP");
    assert!(
        proc.wait_for_log("configuration reloaded").await,
        "{}",
        proc.logs()
    );
    reloaded.store(true, Ordering::Release);
    while let Some(r) = load.join_next().await {
        r.expect("every request of the load answered 200");
    }
    let (before_a, before_b) = (a.seen().len(), b.seen().len());
    assert!(
        before_b > 0,
        "requests after the reload reach the new upstream"
    );
    get_ok(&http1_client(proc.addr), &url).await;
    assert_eq!((a.seen().len(), b.seen().len()), (before_a, before_b + 1));
}

/// A client that trusts `cas` and reports the certificate the server presented.
async fn peer_certificate(addr: std::net::SocketAddr, cas: &[&Path]) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        for c in coatcheck::tls::load_certs("ca", ca).unwrap() {
            roots.add(c).unwrap();
        }
    }
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio::time::timeout(
        WAIT,
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp),
    )
    .await
    .expect("handshake in time")
    .expect("handshake");
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn leaf(cert: &Path) -> Vec<u8> {
    coatcheck::tls::load_certs("cert", cert).unwrap()[0].to_vec()
}

#[tokio::test]
async fn a_reloaded_certificate_serves_new_handshakes_while_an_open_connection_keeps_working() {
    let upstream = Upstream::start().await;
    let dir = TempDir::new("reload-cert");
    let hosts = ["localhost".to_owned(), "127.0.0.1".to_owned()];
    let next = coatcheck::tls::generate_dev_certs(&dir.join("next"), &hosts).unwrap();
    let first = support::certs();
    let (cert, key) = (dir.join("live.crt"), dir.join("live.key"));
    std::fs::copy(&first.cert, &cert).unwrap();
    std::fs::copy(&first.key, &key).unwrap();
    let text = proxy_config("", &route(&upstream))
        .replace(
            &format!("{:?}", first.cert.display().to_string()),
            &format!("{:?}", cert.display().to_string()),
        )
        .replace(
            &format!("{:?}", first.key.display().to_string()),
            &format!("{:?}", key.display().to_string()),
        );
    let path = dir.join("config.toml");
    std::fs::write(&path, &text).unwrap();
    let running = start_from(&path).await;
    let cas = [first.ca.as_path(), next.ca_cert.as_path()];
    assert_eq!(
        peer_certificate(running.addr, &cas).await,
        leaf(&first.cert)
    );

    let mut open = RawConn::connect(running.addr).await;
    let req = format!(
        "GET /api/keep HTTP/1.1\r\nHost: localhost:{}\r\n\r\n",
        running.addr.port()
    );
    open.send(req.as_bytes()).await;
    assert_eq!(open.read_response().await.status, 200);

    std::fs::copy(&next.cert, &cert).unwrap();
    std::fs::copy(&next.key, &key).unwrap();
    let reloader = running.reloader();
    assert_eq!(
        reloader.reload(),
        ReloadOutcome::Applied {
            needs_restart: vec![]
        }
    );
    assert_eq!(peer_certificate(running.addr, &cas).await, leaf(&next.cert));

    open.send(req.as_bytes()).await;
    assert_eq!(
        open.read_response().await.status,
        200,
        "the open connection keeps working"
    );
    assert_eq!(upstream.seen().len(), 2);
    assert_eq!(reloader.counts().ok(), 1);
    running.shutdown();
}

#[tokio::test]
async fn a_file_that_does_not_validate_changes_nothing_and_counts_as_an_error() {
    let (a, b) = (Upstream::start().await, Upstream::start().await);
    let dir = TempDir::new("reload-bad");
    let path = dir.join("config.toml");
    std::fs::write(&path, proxy_config("", &route(&a))).unwrap();
    let running = start_from(&path).await;
    let reloader = running.reloader();
    let client = http1_client(running.addr);
    let url = format!("https://localhost:{}/api/x", running.addr.port());

    std::fs::write(
        &path,
        format!("{}\n[[route]\n", proxy_config("", &route(&b))),
    )
    .unwrap();
    let ReloadOutcome::Rejected(problems) = reloader.reload() else {
        panic!("a syntax error is refused");
    };
    assert_eq!(problems[0].key, "(syntax)", "{problems:?}");

    let semantic = proxy_config("", &route(&b))
        .replace(&b.url(), "ftp://nowhere")
        .replace(
            "[server.tls]",
            "[csrf]\nheader = \"bad header\"\n[server.tls]",
        );
    std::fs::write(&path, semantic).unwrap();
    let ReloadOutcome::Rejected(problems) = reloader.reload() else {
        panic!("a semantic error is refused");
    };
    let keys: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
    assert!(keys.contains(&"route[0].upstream"), "{problems:?}");
    assert!(keys.contains(&"csrf.header"), "{problems:?}");
    assert_eq!((reloader.counts().ok(), reloader.counts().error()), (0, 2));

    get_ok(&client, &url).await;
    assert_eq!(
        (a.seen().len(), b.seen().len()),
        (1, 0),
        "the running routes stay"
    );
    running.shutdown();
}

#[tokio::test]
async fn a_sighup_with_a_broken_file_logs_every_problem_with_its_key() {
    let upstream = Upstream::start().await;
    let proc = ProxyProcess::start(&proxy_config("", &route(&upstream))).await;
    let broken = proxy_config("", &route(&upstream)).replace(&upstream.url(), "ftp://nowhere");
    std::fs::write(proc.config_path(), broken).unwrap();
    proc.signal("HUP");
    assert!(proc.wait_for_log("reload refused").await, "{}", proc.logs());
    assert_eq!(
        proc.count_logs("\"message\":\"route[0].upstream: "),
        1,
        "{}",
        proc.logs()
    );
    get_ok(
        &http1_client(proc.addr),
        &format!("https://localhost:{}/api/x", proc.addr.port()),
    )
    .await;
    assert_eq!(
        upstream.seen().len(),
        1,
        "still serving the running configuration"
    );
}

#[tokio::test]
async fn a_listen_address_change_needs_a_restart_and_the_rest_applies() {
    let (a, b) = (Upstream::start().await, Upstream::start().await);
    let proc = ProxyProcess::start(&proxy_config("", &route(&a))).await;
    let port = support::free_port();
    let next = proxy_config("", &route(&b)).replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
    );
    std::fs::write(proc.config_path(), next).unwrap();
    proc.signal("HUP");
    assert!(
        proc.wait_for_log("configuration reloaded").await,
        "{}",
        proc.logs()
    );
    assert_eq!(
        proc.count_logs("server.listen changed but needs a restart"),
        1,
        "{}",
        proc.logs()
    );
    get_ok(
        &http1_client(proc.addr),
        &format!("https://localhost:{}/api/x", proc.addr.port()),
    )
    .await;
    assert_eq!(
        (a.seen().len(), b.seen().len()),
        (0, 1),
        "the route change applied"
    );
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err(),
        "nothing listens on the new address"
    );
}

#[tokio::test]
async fn a_reloaded_log_level_takes_effect() {
    let upstream = Upstream::start().await;
    let proc = ProxyProcess::start(&proxy_config("", &route(&upstream))).await;
    let client = http1_client(proc.addr);
    let url = format!("https://localhost:{}/api/logged", proc.addr.port());
    get_ok(&client, &url).await;
    assert!(
        proc.wait_for_log("/api/logged").await,
        "info: the access line is written"
    );

    // Access lines are `info` on target coatcheck::access: `warn` drops them.
    let quiet = proxy_config(
        "",
        &format!(
            "[log]\nlevel = \"warn,coatcheck::app=info\"\n{}",
            route(&upstream)
        ),
    );
    std::fs::write(proc.config_path(), quiet).unwrap();
    proc.signal("HUP");
    assert!(
        proc.wait_for_log("configuration reloaded").await,
        "{}",
        proc.logs()
    );
    get_ok(
        &client,
        &format!("https://localhost:{}/api/quiet", proc.addr.port()),
    )
    .await;
    // An access line is written when the body ends, before the client has it all; a line logged
    // after the answer (a refused reload, at `error`) comes behind it in the pipe.
    std::fs::write(proc.config_path(), "[server\n").unwrap();
    proc.signal("HUP");
    assert!(proc.wait_for_log("reload refused").await, "{}", proc.logs());
    assert_eq!(proc.count_logs("/api/quiet"), 0, "{}", proc.logs());
    assert_eq!(upstream.seen().len(), 2);
}

/// `[oidc]` (a provider nobody answers for: no request here needs it) and one `required` route.
fn with_login(csrf_header: &str, upstream: &Upstream) -> String {
    proxy_config(
        "",
        &format!(
            "[oidc]\nissuer = \"http://127.0.0.1:1\"\nclient_id = \"coatcheck\"\nclient_secret = \"s\"\n\
             [session]\nkeys = [\"MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\"]\n\
             store = {{ kind = \"memory\" }}\n[csrf]\nheader = \"{csrf_header}\"\n\
             [[route]]\npath = \"/app/\"\nupstream = \"{}\"\n",
            upstream.url()
        ),
    )
}

#[tokio::test]
async fn a_reloaded_csrf_header_applies_to_routes_with_a_login() {
    let upstream = Upstream::start().await;
    let dir = TempDir::new("reload-csrf");
    let path = dir.join("config.toml");
    std::fs::write(&path, with_login("x-csrf", &upstream)).unwrap();
    let running = start_from(&path).await;
    let client = http1_client(running.addr);
    let url = format!("https://localhost:{}/app/x", running.addr.port());
    let status = |header: &'static str| {
        let req = client.get(&url).header(header, "1");
        async move { req.send().await.unwrap().status().as_u16() }
    };
    // Past the CSRF check a request without a session is 401; stopped by it, 403.
    assert_eq!(
        (status("x-csrf").await, status("x-other").await),
        (401, 403)
    );

    std::fs::write(&path, with_login("x-other", &upstream)).unwrap();
    assert_eq!(
        running.reloader().reload(),
        ReloadOutcome::Applied {
            needs_restart: vec![]
        }
    );
    assert_eq!(
        (status("x-csrf").await, status("x-other").await),
        (403, 401)
    );
    assert!(upstream.seen().is_empty());
    running.shutdown();
}

#[tokio::test]
async fn reloads_are_counted_in_the_metrics_by_result() {
    let a = Upstream::start().await;
    let dir = TempDir::new("reload-metrics");
    let path = dir.join("config.toml");
    let admin = "[admin]\nlisten = \"127.0.0.1:0\"\n";
    std::fs::write(&path, proxy_config("", &format!("{}{admin}", route(&a)))).unwrap();
    let running = start_from(&path).await;
    let reloader = running.reloader();
    assert!(matches!(reloader.reload(), ReloadOutcome::Applied { .. }));
    std::fs::write(&path, "[[route]\n").unwrap();
    assert!(matches!(reloader.reload(), ReloadOutcome::Rejected(_)));
    let admin_addr = running.admin_addr.expect("the admin listener is bound");
    let text = reqwest::get(format!("http://{admin_addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for series in [
        "coatcheck_config_reloads_total{result=\"ok\"} 1",
        "coatcheck_config_reloads_total{result=\"error\"} 1",
    ] {
        assert!(text.contains(series), "{series} in:\n{text}");
    }
}

/// `[oidc]` at the real provider, a memory store, `keys` as `session.keys` and one required route.
fn with_keys(keys: &[&str], idp: &support::idp::Idp, upstream: &Upstream) -> String {
    let keys = keys.iter().map(|k| format!("{k:?}")).collect::<Vec<_>>();
    proxy_config(
        "",
        &format!(
            "[oidc]\nissuer = \"{}\"\nclient_id = \"coatcheck\"\nclient_secret = \"coatcheck-secret\"\n\
             [session]\nkeys = [{}]\nstore = {{ kind = \"memory\" }}\n\
             [[route]]\npath = \"/api/\"\nupstream = \"{}\"\nauth = \"required\"\n",
            idp.issuer,
            keys.join(", "),
            upstream.url()
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_key_added_by_reload_signs_new_sessions_and_the_old_one_keeps_verifying() {
    const OLD: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    const NEW: &str = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWY=";
    let idp = support::idp::Idp::start(support::idp::IdpOptions::default()).await;
    let upstream = Upstream::start().await;
    let dir = TempDir::new("reload-keys");
    let path = dir.join("config.toml");
    std::fs::write(&path, with_keys(&[OLD], &idp, &upstream)).unwrap();
    let running = start_from(&path).await;
    support::wait_ready(running.addr).await;
    let login = |name: &'static str| async move {
        let mut b = bff::Browser::new(running.addr);
        let r = b.login(name, &format!("{name}-pw")).await;
        assert_eq!(r.status(), 200, "login as {name}");
        b
    };
    let status = |b: &bff::Browser| {
        let req = b.api(reqwest::Method::GET, "/api/me");
        async move { req.send().await.unwrap().status().as_u16() }
    };
    let before = login("alice").await;
    assert_eq!(status(&before).await, 200);

    // Rotation step 1: the new key first, the old one still listed.
    std::fs::write(&path, with_keys(&[NEW, OLD], &idp, &upstream)).unwrap();
    assert_eq!(
        running.reloader().reload(),
        ReloadOutcome::Applied {
            needs_restart: vec![]
        }
    );
    assert_eq!(status(&before).await, 200, "the old key still verifies");
    let after = login("bob").await;
    assert_eq!(status(&after).await, 200);

    // Step 2: the old key retired. Only a ticket signed with the new key still verifies, which
    // proves that the login after the first reload was signed with it.
    std::fs::write(&path, with_keys(&[NEW], &idp, &upstream)).unwrap();
    assert!(matches!(
        running.reloader().reload(),
        ReloadOutcome::Applied { .. }
    ));
    assert_eq!(status(&before).await, 401, "signed with the retired key");
    assert_eq!(
        status(&after).await,
        200,
        "signed with the key added by reload"
    );
    running.shutdown();
}
