//! A real `redis-server` (and `redis-sentinel`) on free loopback ports, each with its own
//! temporary directory and config file; killed when dropped. Every wait is bounded.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::TempDir;

const SERVER: &str = "/usr/bin/redis-server";
const SENTINEL: &str = "/usr/bin/redis-sentinel";
/// Upper bound for a server to answer after it was started.
const START_WAIT: Duration = Duration::from_secs(15);

pub use super::free_port;

/// How to start a server.
#[derive(Clone, Default)]
pub struct Options {
    /// An ACL user `(name, password)` with every permission; the default user is disabled.
    pub acl_user: Option<(String, String)>,
    /// Serve TLS only (`--port 0`), with the test certificates; clients need not present one.
    pub tls: bool,
    /// `replicaof 127.0.0.1 <port>`.
    pub replica_of: Option<u16>,
}

/// One `redis-server` process with append-only persistence (`appendfsync always`).
pub struct RedisServer {
    pub port: u16,
    pub opts: Options,
    dir: TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// A plain server without a password.
    pub fn start() -> RedisServer {
        RedisServer::start_with(Options::default())
    }

    pub fn start_with(opts: Options) -> RedisServer {
        let mut s = RedisServer {
            port: free_port(),
            opts,
            dir: TempDir::new("redis"),
            child: None,
        };
        s.write_config();
        s.start_again();
        s
    }

    fn write_config(&self) {
        let mut conf = format!(
            "bind 127.0.0.1\nprotected-mode no\ndir {}\nsave \"\"\nappendonly yes\nappendfsync always\nlogfile redis.log\n",
            self.dir.path().display()
        );
        if self.opts.tls {
            let c = super::certs();
            conf += &format!(
                "port 0\ntls-port {}\ntls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\ntls-auth-clients no\n",
                self.port,
                c.cert.display(),
                c.key.display(),
                c.ca.display()
            );
        } else {
            conf += &format!("port {}\n", self.port);
        }
        if let Some((user, pass)) = &self.opts.acl_user {
            conf += &format!("user default off\nuser {user} on >{pass} ~* &* +@all\n");
        }
        if let Some(master) = self.opts.replica_of {
            conf += &format!("replicaof 127.0.0.1 {master}\n");
        }
        std::fs::write(self.config_path(), conf).unwrap();
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("redis.conf")
    }

    /// The URL coatcheck is given (`redis://` or `rediss://`, with the ACL user if any).
    pub fn url(&self) -> String {
        let scheme = if self.opts.tls { "rediss" } else { "redis" };
        match &self.opts.acl_user {
            Some((u, p)) => format!("{scheme}://{u}:{p}@127.0.0.1:{}/0", self.port),
            None => format!("{scheme}://127.0.0.1:{}/0", self.port),
        }
    }

    /// (Re)starts the process on the same port with the same directory (and so the same
    /// append-only file) and waits until it answers.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new(SERVER)
            .arg(self.config_path())
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + START_WAIT;
        loop {
            if self.cli(&["PING"]).is_ok_and(|o| o.trim() == "PONG") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer PING; log:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Shuts the server down cleanly (SIGTERM) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            wait_exit(&mut child);
        }
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes (`SIGSTOP`) or thaws (`SIGCONT`) the process: a server that accepts nothing and
    /// answers nothing, without closing connections.
    pub fn freeze(&self, frozen: bool) {
        let child = self.child.as_ref().expect("running");
        let sig = if frozen { "-STOP" } else { "-CONT" };
        let ok = Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} failed");
    }

    /// Runs `redis-cli` against this server; its stdout.
    pub fn cli(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new("/usr/bin/redis-cli");
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        if self.opts.tls {
            cmd.arg("--tls")
                .arg("--cacert")
                .arg(&super::certs().ca)
                .args(["--sni", "localhost"]);
        }
        if let Some((u, p)) = &self.opts.acl_user {
            cmd.args(["--user", u, "--pass", p, "--no-auth-warning"]);
        }
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success()
            && !stdout.starts_with("ERR")
            && !stdout.contains("Could not connect")
        {
            Ok(stdout)
        } else {
            Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
        }
    }

    /// The server's log file.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.freeze(false);
        }
        self.kill9();
    }
}

fn wait_exit(child: &mut Child) {
    let deadline = Instant::now() + START_WAIT;
    while Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// One master, one replica and `n` Sentinels monitoring them as `mymaster` (quorum 1, down after
/// 1 s, failover timeout 3 s).
pub struct SentinelSetup {
    pub master: RedisServer,
    pub replica: RedisServer,
    pub sentinel_ports: Vec<u16>,
    sentinels: Vec<Child>,
    _dir: TempDir,
}

/// The master name every Sentinel of [`SentinelSetup`] monitors.
pub const MASTER_NAME: &str = "mymaster";

impl SentinelSetup {
    pub fn start(n: usize) -> SentinelSetup {
        let master = RedisServer::start();
        let replica = RedisServer::start_with(Options {
            replica_of: Some(master.port),
            ..Options::default()
        });
        wait_for(
            || {
                replica
                    .cli(&["INFO", "replication"])
                    .is_ok_and(|i| i.contains("master_link_status:up"))
            },
            "the replica to sync",
        );
        let dir = TempDir::new("sentinel");
        let mut sentinels = Vec::new();
        let mut sentinel_ports = Vec::new();
        for i in 0..n {
            let port = free_port();
            let conf = dir.join(format!("sentinel-{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {dir}\nlogfile sentinel-{i}.log\n\
                     sentinel monitor {MASTER_NAME} 127.0.0.1 {m} 1\n\
                     sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                     sentinel failover-timeout {MASTER_NAME} 3000\n",
                    dir = dir.path().display(),
                    m = master.port,
                ),
            )
            .unwrap();
            let child = Command::new(SENTINEL)
                .arg(&conf)
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn redis-sentinel");
            sentinels.push(child);
            sentinel_ports.push(port);
        }
        let setup = SentinelSetup {
            master,
            replica,
            sentinel_ports,
            sentinels,
            _dir: dir,
        };
        for port in &setup.sentinel_ports {
            wait_for(
                || {
                    sentinel_cli(*port, &["SENTINEL", "replicas", MASTER_NAME])
                        .is_ok_and(|o| o.contains(&setup.replica.port.to_string()))
                },
                "the sentinel to see the replica",
            );
        }
        setup
    }

    /// `["127.0.0.1:PORT", ...]` for `session.store.sentinels`.
    pub fn addrs(&self) -> Vec<String> {
        self.sentinel_ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect()
    }

    /// The port the Sentinels currently name as master.
    pub fn master_port(&self) -> Option<u16> {
        let out = sentinel_cli(
            self.sentinel_ports[0],
            &["SENTINEL", "get-master-addr-by-name", MASTER_NAME],
        )
        .ok()?;
        out.lines().nth(1)?.trim().parse().ok()
    }

    /// Kills the master (SIGKILL) and waits (bounded) until the Sentinels name the replica.
    pub fn fail_over(&mut self) {
        self.master.kill9();
        let replica = self.replica.port;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.master_port() != Some(replica) {
            assert!(Instant::now() < deadline, "no failover within 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        wait_for(
            || {
                self.replica
                    .cli(&["ROLE"])
                    .is_ok_and(|r| r.starts_with("master"))
            },
            "the replica to become master",
        );
    }
}

impl Drop for SentinelSetup {
    fn drop(&mut self) {
        for c in &mut self.sentinels {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn sentinel_cli(port: u16, args: &[&str]) -> Result<String, String> {
    let out = Command::new("/usr/bin/redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Polls `ok` every 50 ms for at most [`START_WAIT`].
pub fn wait_for(mut ok: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + START_WAIT;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
