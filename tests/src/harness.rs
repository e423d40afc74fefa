//! Real etcd and redis-server instances for tests, plus the location of the
//! built redmesh binaries.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{free_port, Child};

/// Polls `ready` every 20 ms until it holds; panics after `timeout`
/// naming `what` (`ready` itself panics with details on fatal conditions).
pub fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        if Instant::now() > deadline {
            panic!("{what} not ready after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What one poll of [`eventually`] found: a value, or why not yet
/// (`Option` for checks with nothing to say).
pub trait Polled<T> {
    /// The value, or the reason to keep waiting.
    fn into_result(self) -> Result<T, String>;
}

impl<T> Polled<T> for Option<T> {
    fn into_result(self) -> Result<T, String> {
        self.ok_or_else(|| "not yet".to_owned())
    }
}

impl<T> Polled<T> for Result<T, String> {
    fn into_result(self) -> Result<T, String> {
        self
    }
}

/// Polls the async `check` every 50 ms until it yields a value; after
/// `timeout` fails the test naming `what` and the last reason `check` gave.
pub async fn eventually<T, P, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    P: Polled<T>,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = P>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await.into_result() {
            Ok(v) => return v,
            Err(why) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}: {why}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Sends raw bytes on a fresh connection and returns what comes back: reads
/// until the reply ends with CRLF and nothing more arrives for 50 ms, or 2 s
/// pass (so a slow, loaded machine does not truncate replies).
pub fn raw_exchange(addr: &str, request: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr)?;
    s.write_all(request)?;
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let settled = out.ends_with(b"\r\n");
        let wait = if settled {
            Duration::from_millis(50)
        } else {
            deadline.saturating_duration_since(Instant::now())
        };
        if wait.is_zero() {
            return Ok(out);
        }
        s.set_read_timeout(Some(wait))?;
        match s.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if settled || out.is_empty() && Instant::now() >= deadline {
                    return Ok(out);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !out.is_empty() => {
                return Ok(out)
            }
            Err(e) => return Err(e),
        }
    }
}

/// Directory holding the built redmesh binaries: `$REDMESH_BIN_DIR`, else
/// the cargo target directory of this test binary.
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("REDMESH_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // target/<profile>/deps/<test-binary>
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(|deps| deps.parent())
        .map(PathBuf::from)
        .expect("test binary lives in target/<profile>/deps")
}

/// Path of a built binary; panics with a hint if it has not been built.
pub fn bin_path(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is not built; run `cargo build --workspace --bins` first (./tests/run.sh does)",
        p.display()
    );
    p
}

/// The value of environment variable `name`, or `default` when it is unset;
/// a value that does not parse fails the test, naming it (a typo must not
/// silently run the default).
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} cannot be parsed")),
        Err(_) => default,
    }
}

/// A single-node etcd on free ports with its data in a temp dir.
pub struct Etcd {
    /// Client URL, `http://127.0.0.1:PORT` (`https://` with TLS).
    pub endpoint: String,
    client: u16,
    peer: u16,
    tls: Option<EtcdTls>,
    child: Child,
    dir: tempfile::TempDir,
}

/// TLS for a test etcd: it serves `cert` and requires client
/// certificates signed by `ca` (`--client-cert-auth`); `etcdctl` calls
/// present `cert` as theirs.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    /// Certificate chain (good for serving and as a client).
    pub cert: std::path::PathBuf,
    /// Its key.
    pub key: std::path::PathBuf,
    /// The CA.
    pub ca: std::path::PathBuf,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

impl Etcd {
    /// Starts etcd and waits until it reports healthy.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// Starts etcd serving clients over mutual TLS.
    pub fn start_tls(tls: EtcdTls) -> Self {
        Self::start_with(Some(tls))
    }

    fn start_with(tls: Option<EtcdTls>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (client, peer) = (free_port(), free_port());
        let scheme = if tls.is_some() { "https" } else { "http" };
        let endpoint = format!("{scheme}://127.0.0.1:{client}");
        let child = Self::spawn(dir.path(), client, peer, tls.as_ref());
        Self {
            endpoint,
            client,
            peer,
            tls,
            child,
            dir,
        }
    }

    /// Runs `etcdctl` against this etcd (with the TLS identity, if any).
    pub fn etcdctl(&self, args: &[&str]) -> std::process::Output {
        etcdctl_command(&self.endpoint, self.tls.as_ref(), "2s")
            .args(args)
            .output()
            .expect("etcdctl runs")
    }

    /// Turns on etcd authentication: a `root` user, and `user` allowed to
    /// read and write keys under `prefix` only.
    pub fn enable_auth(&self, user: &str, password: &str, prefix: &str) {
        let end = prefix_end(prefix);
        for args in [
            vec!["user", "add", "root", "--new-user-password", "root-secret"],
            vec!["user", "grant-role", "root", "root"],
            vec!["role", "add", "redmesh"],
            vec![
                "role",
                "grant-permission",
                "redmesh",
                "readwrite",
                prefix,
                &end,
            ],
            vec!["user", "add", user, "--new-user-password", password],
            vec!["user", "grant-role", user, "redmesh"],
            vec!["auth", "enable"],
        ] {
            let out = self.etcdctl(&args);
            assert!(
                out.status.success(),
                "etcdctl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Runs etcd on `client`/`peer` with its data under `dir` (kept across
    /// restarts) and waits until it reports healthy.
    fn spawn(dir: &std::path::Path, client: u16, peer: u16, tls: Option<&EtcdTls>) -> Child {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let endpoint = format!("{scheme}://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", "n1", "--data-dir"])
            .arg(dir.join("data"))
            .args([
                "--listen-client-urls",
                &endpoint,
                "--advertise-client-urls",
                &endpoint,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args([
                "--initial-cluster",
                &format!("n1={peer_url}"),
                "--initial-cluster-state",
                "new",
            ])
            .args([
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",
                "--log-level",
                "warn",
            ]);
        if let Some(t) = tls {
            cmd.arg("--cert-file")
                .arg(&t.cert)
                .arg("--key-file")
                .arg(&t.key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        let mut child = Child::spawn("etcd", cmd, &dir.join("etcd.log"));
        let addr = format!("127.0.0.1:{client}");
        wait_until("etcd", Duration::from_secs(20), || {
            assert!(!child.exited(), "etcd exited:\n{}", child.log_tail());
            match tls {
                // The health endpoint wants a client certificate: ask the
                // way clients do, once the port is open.
                Some(t) => {
                    std::net::TcpStream::connect(&addr).is_ok()
                        && etcdctl_command(&endpoint, Some(t), "1s")
                            .args(["endpoint", "health"])
                            .output()
                            .is_ok_and(|o| o.status.success())
                }
                None => raw_exchange(&addr, b"GET /health HTTP/1.0\r\n\r\n")
                    .map(|r| String::from_utf8_lossy(&r).contains("\"health\":\"true\""))
                    .unwrap_or(false),
            }
        });
        child
    }

    /// Starts a killed etcd again on the same ports and data (an etcd
    /// restart as operators see it).
    pub fn restart(&mut self) {
        self.child.kill();
        self.child = Self::spawn(self.dir.path(), self.client, self.peer, self.tls.as_ref());
    }

    /// Kills etcd (SIGKILL).
    pub fn kill(&mut self) {
        self.child.kill();
    }
}

/// A tiny seeded generator (xorshift64): tests that draw random requests
/// draw the same ones on every run.
pub struct Rng(pub u64);

impl Rng {
    /// A number below `n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// `redis-cli -p port args…` against a Redis node, its output trimmed.
pub fn redis_cli<S: AsRef<std::ffi::OsStr>>(port: u16, args: &[S]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `GET path` on `addr` (HTTP/1.0, so the body ends with the connection).
pub fn http_get(addr: &str, path: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP header")?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(format!("{}: {body}", head.lines().next().unwrap_or("")));
    }
    Ok(body.to_owned())
}

/// The port of a `host:port` address.
pub fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr}"))
}

/// A plain redis-server (no persistence) on a free port.
pub struct Redis {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// The port.
    pub port: u16,
    child: Child,
    args: Vec<String>,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis").field("addr", &self.addr).finish()
    }
}

impl Redis {
    /// Starts redis-server with extra `args` and waits for PONG.
    pub fn start_with(args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let child = Self::spawn(port, dir.path(), &args);
        Self {
            addr: format!("127.0.0.1:{port}"),
            port,
            child,
            args,
            _dir: dir,
        }
    }

    /// Starts a killed server again on the same port, empty (nothing is
    /// persisted): a machine that came back without its data.
    pub fn restart(&mut self) {
        self.child.kill();
        self.child = Self::spawn(self.port, self._dir.path(), &self.args);
    }

    fn spawn(port: u16, dir: &std::path::Path, args: &[String]) -> Child {
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(dir)
        .args(args);
        let mut child = Child::spawn("redis-server", cmd, &dir.join("redis.log"));
        let addr = format!("127.0.0.1:{port}");
        wait_until("redis-server", Duration::from_secs(10), || {
            assert!(
                !child.exited(),
                "redis-server exited:\n{}",
                child.log_tail()
            );
            raw_exchange(&addr, b"PING\r\n")
                .map(|r| r.starts_with(b"+PONG"))
                .unwrap_or(false)
        });
        child
    }

    /// Starts a plain redis-server.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Kills the server (SIGKILL).
    pub fn kill(&mut self) {
        self.child.kill();
    }

    /// The underlying process.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }
}

/// The Python with redis-py that tests/run.sh prepares.
pub fn python() -> String {
    std::env::var("REDMESH_PYTHON").unwrap_or_else(|_| {
        let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/pyenv/bin/python");
        assert!(
            std::path::Path::new(venv).exists(),
            "redis-py is not set up: run ./tests/run.sh once, or set REDMESH_PYTHON to a python with redis-py"
        );
        venv.to_owned()
    })
}

/// Runs tests/clients/redis_py_cluster.py (redis-py's RedisCluster, RESP3
/// and RESP2) entering at `entry`, with the cluster `password` ("" for
/// none) and, over TLS, trusting `ca`. Fails the test if the script does;
/// returns what it printed (the nodes it found).
pub fn redis_py_cluster(entry: &str, password: &str, ca: Option<&std::path::Path>) -> String {
    let (host, port) = entry.rsplit_once(':').expect("host:port");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/redis_py_cluster.py");
    let mut cmd = Command::new(python());
    cmd.args([script, host, port, password]);
    if let Some(ca) = ca {
        cmd.arg(ca);
    }
    let out = cmd.output().expect("python runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "redis-py failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// etcdctl (API v3) against `endpoint`, presenting `tls`'s certificate if
/// given, giving up on a connection after `dial`.
fn etcdctl_command(endpoint: &str, tls: Option<&EtcdTls>, dial: &str) -> Command {
    let mut cmd = Command::new("etcdctl");
    cmd.env("ETCDCTL_API", "3")
        .args(["--endpoints", endpoint, "--dial-timeout", dial]);
    if let Some(t) = tls {
        cmd.arg("--cacert")
            .arg(&t.ca)
            .arg("--cert")
            .arg(&t.cert)
            .arg("--key")
            .arg(&t.key);
    }
    cmd
}

/// The key just past every key starting with `prefix` (etcd's range end
/// for a prefix).
fn prefix_end(prefix: &str) -> String {
    let mut bytes = prefix.as_bytes().to_vec();
    if let Some(last) = bytes.last_mut() {
        *last += 1;
    }
    String::from_utf8(bytes).expect("an ASCII prefix")
}
