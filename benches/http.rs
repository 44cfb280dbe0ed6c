//! Getting one stored run three ways, side by side in one run on the same runs:
//! - HTTP: `GET /api/rmos/runs/{run_id}` on the worker (`rmos-runs serve`, keep-alive, one
//!   connection per client);
//! - NATS: `rmos.runs.get` request-reply to the same worker, through nats-server;
//! - the peer: the original FastAPI service's lookup rebuilt from its description
//!   (scripts/fastapi_peer.py: `<dir>/<run_id>.json` read and returned), under uvicorn with
//!   uvloop and httptools, from .tools/peer-venv (installed on first use by
//!   `scripts/install-deps.sh --peer`), keep-alive, one connection per client.
//!
//! Each cell runs `BENCH_SECONDS` (4) per way and round, the ways interleaved over `ROUNDS`
//! rounds so that the machine's noise falls on all three alike; it prints requests/s, p50 and
//! p99 latency, the ratio to the peer, and the CPU the serving processes used.
//!
//!     cargo bench --locked --bench http            (or: make bench)
//!     BENCH_CLIENTS=1,16,64 BENCH_SECONDS=8 PEER_WORKERS=2 cargo bench --locked --bench http

#[path = "../tests/support/mod.rs"]
mod support;

mod common;
use common::record;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use serde_json::json;
use support::worker::Worker;

/// Runs stored and read (each client walks them from its own offset).
const RUNS: usize = 200;
/// Rounds over which the three ways are interleaved.
const ROUNDS: usize = 2;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// CPU seconds a process (and its direct children: uvicorn's workers) has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let ticks = |stat: &str| {
        // Fields after the command name: ppid is the 2nd, utime the 12th, stime the 13th.
        let f: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, r)| r)
            .split_whitespace()
            .collect();
        let n = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        (n(1) as u32, n(11) + n(12))
    };
    let mut total = 0.0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let own = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok());
        let (ppid, t) = ticks(&stat);
        if own == Some(pid) || ppid == pid {
            total += t;
        }
    }
    // SAFETY: sysconf has no preconditions.
    total / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx].as_secs_f64() * 1000.0
}

/// One way of getting a run.
#[derive(Clone, Copy, PartialEq)]
enum Way {
    Http(u16),
    Nats,
    Peer(u16),
}

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::Http(_) => "HTTP  GET /api/rmos/runs/{id} (rmos-runs)",
            Way::Nats => "NATS  rmos.runs.get (rmos-runs)",
            Way::Peer(_) => "HTTP  FastAPI + uvicorn (original's lookup)",
        }
    }
    fn key(self) -> &'static str {
        match self {
            Way::Http(_) => "http",
            Way::Nats => "nats",
            Way::Peer(_) => "fastapi",
        }
    }
}

/// A keep-alive HTTP/1.1 connection.
struct Conn {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    host: String,
}

impl Conn {
    async fn open(port: u16) -> Conn {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap_or_else(|e| panic!("connect 127.0.0.1:{port}: {e}"));
        stream.set_nodelay(true).expect("nodelay");
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        Conn {
            sender,
            host: format!("127.0.0.1:{port}"),
        }
    }

    /// `GET path` → (status, body).
    async fn get(&mut self, path: &str) -> (u16, Bytes) {
        self.sender.ready().await.expect("connection ready");
        let req = hyper::Request::get(path)
            .header("host", &self.host)
            .body(Empty::new())
            .expect("request");
        let resp = self.sender.send_request(req).await.expect("response");
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, body)
    }
}

/// `clients` clients getting the runs for `secs`: (requests, elapsed, latencies).
async fn measure(
    way: Way,
    nats: &async_nats::Client,
    ids: &Arc<Vec<String>>,
    clients: usize,
    secs: f64,
) -> (usize, f64, Vec<Duration>) {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        let (ids, nats) = (ids.clone(), nats.clone());
        tasks.spawn(async move {
            let mut conn = match way {
                Way::Http(port) | Way::Peer(port) => Some(Conn::open(port).await),
                Way::Nats => None,
            };
            let mut lat = Vec::new();
            let mut i = c * ids.len() / clients.max(1);
            while Instant::now() < deadline {
                let id = &ids[i % ids.len()];
                i += 1;
                let t = Instant::now();
                let len = match conn.as_mut() {
                    Some(conn) => {
                        let (status, body) = conn.get(&format!("/api/rmos/runs/{id}")).await;
                        assert_eq!(status, 200, "{}: {}", way.name(), id);
                        body.len()
                    }
                    None => nats
                        .request("rmos.runs.get", Bytes::from(id.clone()))
                        .await
                        .expect("get reply")
                        .payload
                        .len(),
                };
                lat.push(t.elapsed());
                assert!(len > 1000, "{}: short answer for {id}", way.name());
            }
            lat
        });
    }
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r.expect("client task"));
    }
    (all.len(), start.elapsed().as_secs_f64(), all)
}

/// Stores `RUNS` runs through the stream and returns their ids once all are stored.
async fn store_runs(client: &async_nats::Client) -> Vec<String> {
    let js = jetstream::new(client.clone());
    let mut stored = client.subscribe("rmos.runs.stored").await.expect("sub");
    client.flush().await.expect("flush");
    futures::stream::iter(0..RUNS)
        .for_each_concurrent(16, |i| {
            let js = js.clone();
            async move {
                js.publish("rmos.runs.create", record(i).into())
                    .await
                    .expect("publish")
                    .await
                    .expect("ack");
            }
        })
        .await;
    let mut ids = HashSet::new();
    while ids.len() < RUNS {
        let m = tokio::time::timeout(Duration::from_secs(120), stored.next())
            .await
            .expect("stored events within 120 s")
            .expect("stored event");
        let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("event");
        ids.insert(v["run_id"].as_str().expect("run_id").to_owned());
    }
    let mut ids: Vec<String> = ids.into_iter().collect();
    ids.sort();
    ids
}

/// Starts the FastAPI peer on `port` serving `dir` (installing its venv first if missing);
/// it dies with the benchmark.
async fn start_peer(dir: &std::path::Path, port: u16, workers: usize) -> std::process::Child {
    let root = support::repo_root();
    let uvicorn = root.join(".tools/peer-venv/bin/uvicorn");
    if !uvicorn.exists() {
        println!("installing the FastAPI peer (scripts/install-deps.sh --peer)");
        let ok = std::process::Command::new("bash")
            .arg(root.join("scripts/install-deps.sh"))
            .arg("--peer")
            .status()
            .expect("run scripts/install-deps.sh --peer");
        assert!(ok.success(), "scripts/install-deps.sh --peer failed");
    }
    let log = dir.with_extension("peer.log");
    let out = std::fs::File::create(&log).expect("peer log");
    let mut command = std::process::Command::new(&uvicorn);
    command
        .args([
            "--app-dir",
            "scripts",
            "fastapi_peer:app",
            "--host",
            "127.0.0.1",
        ])
        .args([
            "--port",
            &port.to_string(),
            "--log-level",
            "warning",
            "--no-access-log",
        ])
        .args(["--workers", &workers.to_string()])
        .current_dir(&root)
        .env("RMOS_PEER_DIR", dir)
        .stdout(out.try_clone().expect("log"))
        .stderr(out);
    // SAFETY: prctl is async-signal-safe; the peer dies with the benchmark, even on a panic.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            Ok(())
        });
    }
    let mut child = command.spawn().expect("start uvicorn");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            drop(s);
            return child;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "FastAPI peer exited ({status}): {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "FastAPI peer not up in 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let clients: Vec<usize> = std::env::var("BENCH_CLIENTS")
        .unwrap_or_else(|_| "1,16".into())
        .split(',')
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    let secs: f64 = env_or("BENCH_SECONDS", 4.0);
    let peer_workers: usize = env_or("PEER_WORKERS", 1);

    let nats = support::NatsServer::start().await;
    let base = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-tmp");
    std::fs::create_dir_all(&base).expect("bench dir");
    // Kept afterwards, as the other benchmarks' (docs/benchmarks.md: deleting files slows
    // creating them on this disk, which the next run would measure).
    let dir = tempfile::Builder::new()
        .prefix("http-")
        .tempdir_in(&base)
        .expect("tempdir")
        .keep();
    let runs_dir = dir.join("runs");
    let peer_dir = dir.join("peer");
    std::fs::create_dir_all(&runs_dir).expect("runs dir");
    std::fs::create_dir_all(&peer_dir).expect("peer dir");
    let http_port = support::free_port();
    let env: Vec<(String, String)> = [
        ("RUST_LOG", "error".to_owned()),
        ("RMOS_METRICS_ADDR", "off".to_owned()),
        ("RMOS_HTTP_ADDR", format!("127.0.0.1:{http_port}")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let worker = Worker::start_with(&nats, &runs_dir, "bench-http", &env).await;
    let client = async_nats::connect(nats.url()).await.expect("connect");

    // The same runs for all three: stored by the worker, then each one's stored JSON written
    // to the peer's data directory as the original service kept it (`<run_id>.json`).
    let ids = store_runs(&client).await;
    let mut sizes = Vec::new();
    for id in &ids {
        let reply = client
            .request("rmos.runs.get", Bytes::from(id.clone()))
            .await
            .expect("get");
        sizes.push(reply.payload.len());
        std::fs::write(peer_dir.join(format!("{id}.json")), &reply.payload).expect("peer file");
    }
    sizes.sort();
    let peer_port = support::free_port();
    let mut peer = start_peer(&peer_dir, peer_port, peer_workers).await;
    let ids = Arc::new(ids);

    // All three answer the same record.
    let probe = &ids[0];
    let via_nats: serde_json::Value = serde_json::from_slice(
        &client
            .request("rmos.runs.get", Bytes::from(probe.clone()))
            .await
            .expect("get")
            .payload,
    )
    .expect("json");
    for port in [http_port, peer_port] {
        let (status, body) = Conn::open(port)
            .await
            .get(&format!("/api/rmos/runs/{probe}"))
            .await;
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v, via_nats, "port {port} answers another record");
    }

    let command = "cargo bench --locked --bench http";
    println!("rmos-runs HTTP get benchmark: {command}");
    println!(
        "{} runs of {}-{} bytes (stored JSON), each way {secs} s x {ROUNDS} rounds per cell, \
         interleaved; FastAPI peer: uvicorn {} worker(s), uvloop + httptools; \
         2 CPUs shared by broker, worker, peer and load generator",
        ids.len(),
        sizes.first().copied().unwrap_or(0),
        sizes.last().copied().unwrap_or(0),
        peer_workers,
    );
    println!(
        "{:<45} {:>7} {:>9} {:>8} {:>8} {:>9} {:>12}",
        "way", "clients", "req/s", "p50 ms", "p99 ms", "x FastAPI", "server cores"
    );
    let ways = [Way::Http(http_port), Way::Nats, Way::Peer(peer_port)];
    let worker_pid = worker.pid() as u32;
    let broker_pid = nats.pid().unwrap_or(0);
    let peer_pid = peer.id();
    let mut results = serde_json::Map::new();
    for &c in &clients {
        // Per way: requests, seconds, latencies, server CPU seconds.
        let mut acc: Vec<(usize, f64, Vec<Duration>, f64)> =
            ways.iter().map(|_| (0, 0.0, Vec::new(), 0.0)).collect();
        for _ in 0..ROUNDS {
            for (k, &way) in ways.iter().enumerate() {
                let serving = || match way {
                    Way::Http(_) => cpu_seconds(worker_pid),
                    Way::Nats => cpu_seconds(worker_pid) + cpu_seconds(broker_pid),
                    Way::Peer(_) => cpu_seconds(peer_pid),
                };
                let cpu0 = serving();
                let (n, s, lat) = measure(way, &client, &ids, c, secs).await;
                acc[k].3 += serving() - cpu0;
                acc[k].0 += n;
                acc[k].1 += s;
                acc[k].2.extend(lat);
            }
        }
        let peer_rps = acc[2].0 as f64 / acc[2].1;
        for (k, &way) in ways.iter().enumerate() {
            let (n, s, lat, cpu) = &mut acc[k];
            lat.sort();
            let rps = *n as f64 / *s;
            let (p50, p99) = (percentile(lat, 0.50), percentile(lat, 0.99));
            let cores = *cpu / *s;
            println!(
                "{:<45} {c:>7} {rps:>9.0} {p50:>8.2} {p99:>8.2} {:>9.2} {cores:>12.2}",
                way.name(),
                rps / peer_rps
            );
            results.insert(
                format!("{}_{c}", way.key()),
                json!({"clients": c, "rps": rps, "p50_ms": p50, "p99_ms": p99,
                       "vs_fastapi": rps / peer_rps, "server_cores": cores}),
            );
        }
    }
    println!(
        "(server cores: CPU used by the serving processes over the cell: the worker for HTTP, worker + nats-server for NATS, uvicorn for FastAPI)"
    );
    println!("command: {command}");
    println!("BENCH_JSON {}", serde_json::Value::Object(results));
    let _ = peer.kill();
    let _ = peer.wait();
    drop(worker);
}
