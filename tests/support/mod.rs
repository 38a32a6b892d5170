//! Shared harness for the integration tests: test certificates, temporary directories, coatcheck
//! started in-process or as the real binary, HTTP clients that trust the test CA, and a raw TLS
//! client for byte-level control.
//!
//! Everything listens on `127.0.0.1:0`; every wait is bounded.
#![allow(dead_code)]

pub mod e2e;
pub mod idp;
pub mod legacy_api;
pub mod otlp;
pub mod redis;
pub mod upstream;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use coatcheck::app::Running;
use coatcheck::config::Config;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A free loopback port for a server that must know its port before it listens (bound and
/// released). Picked below Linux's ephemeral range (32768–60999), so that no outgoing connection of
/// any test can be holding it as its local port by the time the server binds it.
pub fn free_port() -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    const LOW: usize = 20_000;
    const SPAN: usize = 12_000;
    // Spread concurrent test processes apart; walk from there until a port binds.
    let seed = std::process::id() as usize * 7919
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() as usize);
    for _ in 0..SPAN {
        let port = (LOW + (seed + NEXT.fetch_add(1, Ordering::Relaxed) * 7) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {LOW}..{}", LOW + SPAN)
}

/// Upper bound for any single network wait in a test.
pub const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Temporary directories and certificates
// ---------------------------------------------------------------------------------------------

/// A directory under the system temp dir, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir = std::env::temp_dir().join(format!(
            "coatcheck-{label}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The test CA and a server certificate for `localhost` and `127.0.0.1`, made once per process.
pub struct TestCerts {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca_pem: Vec<u8>,
}

const CERTS_PREFIX: &str = "coatcheck-test-certs-";

/// The process's test certificates (created on first use). Directories left behind by test
/// processes that have exited are swept at the same time.
pub fn certs() -> &'static TestCerts {
    static CERTS: OnceLock<TestCerts> = OnceLock::new();
    CERTS.get_or_init(|| {
        sweep_stale_cert_dirs();
        coatcheck::tls::install_provider();
        let dir = std::env::temp_dir().join(format!("{CERTS_PREFIX}{}", std::process::id()));
        let files = coatcheck::tls::generate_dev_certs(
            &dir,
            &["localhost".to_owned(), "127.0.0.1".to_owned()],
        )
        .expect("generating test certificates");
        TestCerts {
            ca_pem: std::fs::read(&files.ca_cert).unwrap(),
            dir,
            ca: files.ca_cert,
            cert: files.cert,
            key: files.key,
        }
    })
}

fn sweep_stale_cert_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(CERTS_PREFIX) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Logs from the in-process proxy go to the test's captured output (`RUST_LOG`, default `warn`).
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

// ---------------------------------------------------------------------------------------------
// coatcheck in-process
// ---------------------------------------------------------------------------------------------

/// Configuration text: `[server]` on `127.0.0.1:0` (plus `server_extra` keys), `[server.tls]` with
/// the test certificates, then `extra` (routes, limits, …).
pub fn proxy_config(server_extra: &str, extra: &str) -> String {
    let c = certs();
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\npublic_origin = \"https://localhost:8443\"\n{server_extra}\n\
         [server.tls]\ncert = {:?}\nkey = {:?}\n\n{extra}\n",
        c.cert.display().to_string(),
        c.key.display().to_string(),
    )
}

/// A coatcheck started in-process.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub redirect_addr: Option<SocketAddr>,
    /// The plain-HTTP admin listener, with `[admin]` in the config.
    pub admin_addr: Option<SocketAddr>,
    pub running: Option<Running>,
}

/// Starts coatcheck in-process with `extra` appended to the generated config.
pub async fn start_proxy(extra: &str) -> TestProxy {
    start_proxy_with("", extra).await
}

/// Like [`start_proxy`], with extra keys for the `[server]` table (e.g. `http_redirect_listen`).
pub async fn start_proxy_with(server_extra: &str, extra: &str) -> TestProxy {
    init_tracing();
    let text = proxy_config(server_extra, extra);
    let config = Config::from_toml(&text, Path::new("test.toml"))
        .unwrap_or_else(|e| panic!("test config is invalid: {e}\n{text}"));
    let running = tokio::time::timeout(WAIT, coatcheck::app::start(config))
        .await
        .expect("coatcheck started in time")
        .unwrap_or_else(|e| panic!("coatcheck did not start: {e}"));
    TestProxy {
        addr: running.addr,
        redirect_addr: running.redirect_addr,
        admin_addr: running.admin_addr,
        running: Some(running),
    }
}

impl TestProxy {
    /// `https://localhost:PORT` (clients resolve `localhost` to the bound address).
    pub fn base_url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    /// `https://localhost:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url())
    }

    /// An HTTP/1.1-only client.
    pub fn http1(&self) -> reqwest::Client {
        http1_client(self.addr)
    }

    /// A client that offers `h2` by ALPN (and gets it from coatcheck).
    pub fn http2(&self) -> reqwest::Client {
        http2_client(self.addr)
    }

    /// Starts a graceful shutdown and waits (bounded) until coatcheck has stopped.
    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown();
            tokio::time::timeout(WAIT, r.wait())
                .await
                .expect("coatcheck stopped in time");
        }
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(r) = &self.running {
            r.shutdown();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP clients
// ---------------------------------------------------------------------------------------------

/// A reqwest builder that trusts only the test CA, uses no proxy, follows no redirect and sends
/// `localhost` to `addr`.
pub fn client_builder(addr: SocketAddr) -> reqwest::ClientBuilder {
    coatcheck::tls::install_provider();
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .tls_certs_only([reqwest::Certificate::from_pem(&certs().ca_pem).unwrap()])
        .resolve("localhost", addr)
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
}

pub fn http1_client(addr: SocketAddr) -> reqwest::Client {
    client_builder(addr).http1_only().build().unwrap()
}

pub fn http2_client(addr: SocketAddr) -> reqwest::Client {
    client_builder(addr).build().unwrap()
}

/// Polls coatcheck's `/readyz` at `addr` until it answers 200 (bounded by [`WAIT`]).
pub async fn wait_ready(addr: SocketAddr) {
    let client = http1_client(addr);
    let url = format!("https://localhost:{}/readyz", addr.port());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(r) = client.get(&url).send().await
            && r.status() == 200
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "coatcheck at {addr} never became ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads a coatcheck JSON error and checks its status and `error` code; returns the body.
pub async fn expect_json_error(
    res: reqwest::Response,
    status: u16,
    code: &str,
) -> serde_json::Value {
    assert_eq!(res.status().as_u16(), status, "status of {}", res.url());
    let ct = res
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(ct.as_deref(), Some("application/json"));
    assert!(
        res.headers().contains_key("x-request-id"),
        "error answers carry X-Request-Id"
    );
    let body: serde_json::Value = res.json().await.expect("JSON error body");
    assert_eq!(body["error"], code, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    body
}

// ---------------------------------------------------------------------------------------------
// Raw TLS client
// ---------------------------------------------------------------------------------------------

/// A rustls client configuration that trusts the test CA and offers `alpn`.
pub fn client_tls(alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    coatcheck::tls::install_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(
            coatcheck::tls::load_certs("test", &certs().ca)
                .unwrap()
                .remove(0),
        )
        .unwrap();
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

/// Opens TCP and completes a TLS handshake for `localhost` (bounded by [`WAIT`]).
pub async fn tls_connect(addr: SocketAddr, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
    tokio::time::timeout(WAIT, try_tls_connect(addr, alpn))
        .await
        .expect("TLS handshake in time")
        .expect("TLS handshake")
}

/// Opens TCP and tries a TLS handshake (unbounded: wrap it in a timeout).
pub async fn try_tls_connect(
    addr: SocketAddr,
    alpn: &[&[u8]],
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let connector = tokio_rustls::TlsConnector::from(client_tls(alpn));
    connector
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
}

/// A parsed HTTP/1.1 response.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// Header names lowercased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// An HTTP/1.1 conversation over TLS, byte by byte.
pub struct RawConn {
    pub stream: TlsStream<TcpStream>,
    buf: Vec<u8>,
}

impl RawConn {
    /// Connects with ALPN `http/1.1`.
    pub async fn connect(addr: SocketAddr) -> RawConn {
        RawConn::over(tls_connect(addr, &[b"http/1.1"]).await)
    }

    /// A connection made elsewhere (e.g. by [`try_tls_connect`]).
    pub fn over(stream: TlsStream<TcpStream>) -> RawConn {
        RawConn {
            stream,
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        tokio::time::timeout(WAIT, async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        })
        .await
        .expect("write in time")
        .expect("write");
    }

    /// Reads more bytes into the buffer; `false` at end of stream (or a reset).
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
            .await
            .expect("read in time")
        {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// Reads a response head.
    pub async fn read_head(&mut self) -> (u16, Vec<(String, String)>) {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.drain(..end + 4);
                let mut lines = head.split("\r\n");
                let status_line = lines.next().unwrap();
                let status = status_line
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
                let headers = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
                    .collect();
                return (status, headers);
            }
            assert!(
                self.fill().await,
                "connection closed before a response head; got {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        }
    }

    /// Reads a whole response (Content-Length, chunked, or until the connection closes).
    pub async fn read_response(&mut self) -> RawResponse {
        let (status, headers) = self.read_head().await;
        let get = |n: &str| {
            headers
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.to_ascii_lowercase())
        };
        let body = if status == 101 || status == 204 || status == 304 {
            Vec::new()
        } else if let Some(len) = get("content-length") {
            let len: usize = len.parse().unwrap();
            while self.buf.len() < len {
                assert!(self.fill().await, "connection closed inside the body");
            }
            self.buf.drain(..len).collect()
        } else if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            self.read_chunked().await
        } else {
            while self.fill().await {}
            std::mem::take(&mut self.buf)
        };
        RawResponse {
            status,
            headers,
            body,
        }
    }

    async fn read_chunked(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = find(&self.buf, b"\r\n") {
                    break i;
                }
                assert!(self.fill().await, "connection closed inside a chunk size");
            };
            let size_line = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
            self.buf.drain(..line_end + 2);
            let size = usize::from_str_radix(size_line.split(';').next().unwrap().trim(), 16)
                .unwrap_or_else(|_| panic!("bad chunk size {size_line:?}"));
            if size == 0 {
                // Trailers (if any) end with an empty line.
                loop {
                    if let Some(i) = find(&self.buf, b"\r\n") {
                        let empty = i == 0;
                        self.buf.drain(..i + 2);
                        if empty {
                            return body;
                        }
                    } else {
                        assert!(self.fill().await, "connection closed inside trailers");
                    }
                }
            }
            while self.buf.len() < size + 2 {
                assert!(self.fill().await, "connection closed inside a chunk");
            }
            body.extend(self.buf.drain(..size));
            self.buf.drain(..2);
        }
    }

    /// Reads exactly `n` bytes (after whatever is already buffered).
    pub async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(
                self.fill().await,
                "connection closed after {} of {n} bytes",
                self.buf.len()
            );
        }
        self.buf.drain(..n).collect()
    }

    /// Waits up to `within` for the peer to close; returns how long that took, or `None`.
    /// Whatever arrives meanwhile is kept in the buffer.
    pub async fn closed_within(&mut self, within: Duration) -> Option<Duration> {
        let start = Instant::now();
        let mut chunk = [0u8; 4096];
        loop {
            let left = within.checked_sub(start.elapsed())?;
            match tokio::time::timeout(left, self.stream.read(&mut chunk)).await {
                Err(_) => return None,
                Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Bytes received but not consumed yet.
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Sends one request on a fresh connection and reads the response.
pub async fn raw_request(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut c = RawConn::connect(addr).await;
    c.send(request).await;
    c.read_response().await
}

/// `GET {path}` with `Connection: close` and the given extra header lines.
pub async fn raw_get(addr: SocketAddr, path: &str, extra_headers: &str) -> RawResponse {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost:{}\r\n{extra_headers}Connection: close\r\n\r\n",
        addr.port()
    );
    raw_request(addr, req.as_bytes()).await
}

// ---------------------------------------------------------------------------------------------
// coatcheck as a process
// ---------------------------------------------------------------------------------------------

/// Path of the built binary.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_coatcheck")
}

/// The real `coatcheck` binary running `run --config` with JSON logs.
pub struct ProxyProcess {
    pub child: tokio::process::Child,
    pub pid: u32,
    pub addr: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
    _dir: TempDir,
}

impl ProxyProcess {
    /// Writes `config_text` to a temporary file, starts the binary and waits (bounded) for its
    /// "listening" log line.
    pub async fn start(config_text: &str) -> ProxyProcess {
        Self::start_with_env(config_text, &[]).await
    }

    /// Like [`ProxyProcess::start`], with extra environment variables for the process.
    pub async fn start_with_env(config_text: &str, env: &[(&str, &str)]) -> ProxyProcess {
        let dir = TempDir::new("proc");
        let config = dir.join("config.toml");
        std::fs::write(&config, config_text).unwrap();
        let mut child = tokio::process::Command::new(binary())
            .args(["--log-format", "json", "run", "--config"])
            .arg(&config)
            .current_dir(dir.path())
            .env_remove("RUST_LOG")
            // Span export only where a test asks for it, whatever the developer's shell says.
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn coatcheck");
        let pid = child.id().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let stderr = child.stderr.take().unwrap();
        let lines = logs.clone();
        tokio::spawn(async move {
            let mut tx = Some(tx);
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && v["message"] == "coatcheck listening"
                    && let Some(addr) = v["addr"].as_str().and_then(|a| a.parse().ok())
                    && let Some(tx) = tx.take()
                {
                    let _: Result<(), SocketAddr> = tx.send(addr);
                }
                lines.lock().unwrap().push(line);
            }
        });
        let addr = match tokio::time::timeout(Duration::from_secs(30), rx).await {
            Ok(Ok(a)) => a,
            _ => panic!(
                "coatcheck did not report its address; logs:\n{}",
                logs.lock().unwrap().join("\n")
            ),
        };
        ProxyProcess {
            child,
            pid,
            addr,
            logs,
            _dir: dir,
        }
    }

    /// Resident set size in KiB (`VmRSS` of /proc/PID/status).
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid).unwrap_or(0)
    }

    /// Sends a signal by name (`TERM`, `INT`, `HUP`).
    pub fn signal(&self, name: &str) {
        let ok = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid.to_string())
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -{name} {} failed", self.pid);
    }

    /// Waits (bounded) for the process to exit.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(within, self.child.wait())
            .await
            .ok()
            .map(|r| r.expect("wait for coatcheck"))
    }

    /// The configuration file the process was started with (rewrite it, then `signal("HUP")`).
    pub fn config_path(&self) -> PathBuf {
        self._dir.join("config.toml")
    }

    /// Waits (bounded by [`WAIT`]) until a log line contains `needle`; `false` if none did.
    pub async fn wait_for_log(&self, needle: &str) -> bool {
        let deadline = tokio::time::Instant::now() + WAIT;
        while tokio::time::Instant::now() < deadline {
            if self.logs.lock().unwrap().iter().any(|l| l.contains(needle)) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// How many log lines contain `needle`.
    pub fn count_logs(&self, needle: &str) -> usize {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Everything the process logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }
}

/// `VmRSS` of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}
