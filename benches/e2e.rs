//! End-to-end benchmark over a real broker, with the ceilings it is judged against measured in
//! the same run. Prints a table, the command that produced it, and a `BENCH_JSON` line that
//! `scripts/bench_chart.py` turns into `docs/benchmarks.svg`.
//!
//!     cargo bench --bench e2e            (or: make bench)
//!     BENCH_ONLY=gets cargo bench --bench e2e     (parts: creates,patches,gets,soak,s3)
//!
//! Figures:
//! - creates/s: JetStream publish of 2-5 KB run records -> `rmos.runs.stored` received, with 1,
//!   16 and 256 publishes in flight, on the local store (fsync on) and on S3 (moto, 16);
//! - ceilings: the broker's own rate for the same shape (JetStream publish + consume + ack with
//!   no storage, same in-flight count; and consume + ack of pre-published messages), and the
//!   store's own rate (conditional creates through `RunStore`, no broker, same concurrency);
//! - get latency p50/p99/p99.9 and requests/s at 1, 16, 64 requesters vs raw request-reply
//!   (a responder in a process of its own answering with the bytes of a real get reply);
//! - contended patches/s on one run from 32 publishers, and the count of lost updates;
//! - worker peak RSS and CPU seconds per 1,000 commands.

#[path = "../tests/support/mod.rs"]
mod support;

mod common;
use common::record;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use rmos_runs::domain::command::{Command as DomainCommand, CommandKind, Context};
use rmos_runs::store::{OpenOptions, RunStore, StoreUrl};
use serde_json::json;
use support::worker::Worker;

const CREATES: usize = 2000;
const S3_CREATES: usize = 300;
const GET_SECONDS: u64 = 4;

/// A `VmRSS` / `VmHWM` style field of /proc/<pid>/status, in MiB (0 when unreadable).
fn proc_status_mib(pid: libc::pid_t, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// (peak RSS in MiB, CPU seconds so far) of a process, from /proc.
fn usage(pid: libc::pid_t) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name: utime is the 14th field, stime the 15th overall.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (proc_status_mib(pid, "VmHWM:"), (ticks(11) + ticks(12)) / hz)
}

/// `rmos-runs serve` for the benchmark (quiet logs, 256 in flight, no metrics endpoint),
/// through the test harness's worker; returns once it answers `get`.
async fn start_worker(
    nats: &support::NatsServer,
    dir: &std::path::Path,
    extra: &[(String, String)],
) -> Worker {
    let mut env: Vec<(String, String)> = [
        ("RUST_LOG", "error"),
        ("RMOS_CONCURRENCY", "256"),
        ("RMOS_METRICS_ADDR", "off"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    env.extend(extra.iter().cloned());
    Worker::start_with(nats, dir, "bench", &env).await
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx].as_secs_f64() * 1000.0
}

/// Publishes `n` creates with `in_flight` awaiting PubAck, and waits for `n` distinct stored
/// events. Returns creates/s.
async fn creates(client: &async_nats::Client, n: usize, in_flight: usize, offset: usize) -> f64 {
    let js = jetstream::new(client.clone());
    let mut stored = client.subscribe("rmos.runs.stored").await.unwrap();
    let start = Instant::now();
    let waiter = tokio::spawn(async move {
        let mut seen = HashSet::new();
        while seen.len() < n {
            let m = stored.next().await.unwrap();
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            seen.insert(v["run_id"].as_str().unwrap_or("").to_owned());
        }
    });
    futures::stream::iter(0..n)
        .for_each_concurrent(in_flight, |i| {
            let js = js.clone();
            async move {
                let ack = js
                    .publish("rmos.runs.create", record(offset + i).into())
                    .await
                    .unwrap();
                ack.await.unwrap();
            }
        })
        .await;
    tokio::time::timeout(Duration::from_secs(600), waiter)
        .await
        .unwrap()
        .unwrap();
    n as f64 / start.elapsed().as_secs_f64()
}

/// Creates one 3-4 KB run and waits for its `stored` event; returns its id.
async fn one_run(client: &async_nats::Client) -> String {
    let mut stored = client.subscribe("rmos.runs.stored").await.unwrap();
    let body = record(1_000_050);
    let js = jetstream::new(client.clone());
    js.publish("rmos.runs.create", body.into())
        .await
        .unwrap()
        .await
        .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(30), stored.next())
        .await
        .unwrap()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
    v["run_id"].as_str().unwrap().to_owned()
}

/// The store's own rate: the same creates through `RunStore::execute`, no broker, driven by
/// `concurrency` tokio tasks (so decoding and hashing spread over the cores, as in the worker).
async fn store_ceiling(store: &RunStore, n: usize, concurrency: usize, offset: usize) -> f64 {
    let store = Arc::new(store.clone());
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (store, next) = (store.clone(), next.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let cmd =
                    DomainCommand::decode(CommandKind::Create, &record(offset + i), None).unwrap();
                store.execute(&cmd, &Context::now()).await.unwrap();
            }
        });
    }
    tasks.join_all().await;
    n as f64 / start.elapsed().as_secs_f64()
}

async fn requests(
    client: &async_nats::Client,
    subject: &'static str,
    body: &'static str,
    concurrency: usize,
) -> (f64, f64, f64, f64) {
    let deadline = Instant::now() + Duration::from_secs(GET_SECONDS);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                client.request(subject, body.into()).await.unwrap();
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let secs = start.elapsed().as_secs_f64();
    all.sort();
    (
        all.len() as f64 / secs,
        percentile(&all, 0.50),
        percentile(&all, 0.99),
        percentile(&all, 0.999),
    )
}

/// The broker's own rate for the same shape: JetStream publish (PubAck) + consume + ack, no
/// storage. With `prepublish`, the messages are published first and only consume + ack is timed.
async fn broker_ceiling(client: &async_nats::Client, in_flight: usize, prepublish: bool) -> f64 {
    let js = jetstream::new(client.clone());
    let tag = format!("{in_flight}_{prepublish}");
    let subject = format!("ceiling.{tag}");
    let stream = js
        .get_or_create_stream(jetstream::stream::Config {
            name: format!("CEIL_{tag}"),
            subjects: vec![subject.clone()],
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .unwrap();
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("c".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let publish = || {
        futures::stream::iter(0..CREATES).for_each_concurrent(in_flight, |i| {
            let js = js.clone();
            let subject = subject.clone();
            async move {
                js.publish(subject, record(i).into())
                    .await
                    .unwrap()
                    .await
                    .unwrap();
            }
        })
    };
    if prepublish {
        publish().await;
    }
    let start = Instant::now();
    let consume = tokio::spawn(async move {
        let mut msgs = consumer.messages().await.unwrap();
        let mut n = 0;
        while n < CREATES {
            let m = msgs.next().await.unwrap().unwrap();
            m.ack().await.unwrap();
            n += 1;
        }
    });
    if !prepublish {
        publish().await;
    }
    consume.await.unwrap();
    CREATES as f64 / start.elapsed().as_secs_f64()
}

/// 32 publishers x 20 patches on one run. Returns (patches/s, lost updates).
async fn contended_patches(client: &async_nats::Client) -> (f64, u64) {
    const PUBLISHERS: usize = 32;
    const EACH: usize = 20;
    let js = jetstream::new(client.clone());
    let run = "run_00000000face";
    let body = json!({"mode": "cam", "tool_id": "T1", "status": "OK", "run_id": run});
    js.publish("rmos.runs.create", body.to_string().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let mut stored = client.subscribe("rmos.runs.stored").await.unwrap();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let js = js.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..EACH {
                let patch = json!({"run_id": run, "meta_updates": {format!("p{p}_{i}"): i}});
                js.publish("rmos.runs.patch_meta", patch.to_string().into())
                    .await
                    .unwrap()
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut patched = 0;
    while patched < PUBLISHERS * EACH {
        let m = tokio::time::timeout(Duration::from_secs(120), stored.next())
            .await
            .unwrap()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        if v["run_id"] == run && v["event"] == "meta_patched" {
            patched += 1;
        }
    }
    let rate = (PUBLISHERS * EACH) as f64 / start.elapsed().as_secs_f64();
    let got = client.request("rmos.runs.get", run.into()).await.unwrap();
    let a: serde_json::Value = serde_json::from_slice(&got.payload).unwrap();
    let revision = a["revision"].as_u64().unwrap_or(0);
    let lost = (1 + (PUBLISHERS * EACH) as u64).saturating_sub(revision);
    (rate, lost)
}

fn fresh_dir(tag: &str) -> std::path::PathBuf {
    // Never /tmp if it is tmpfs, never a just-deleted tree: a fresh dir under target/. It is
    // kept afterwards: deleting thousands of files slows file creation on this machine's
    // ext4 for minutes, which would then be measured by the next run (`cargo clean` frees it).
    let base = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-tmp");
    std::fs::create_dir_all(&base).unwrap();
    tempfile::Builder::new()
        .prefix(tag)
        .tempdir_in(&base)
        .unwrap()
        .keep()
}

fn row(
    results: &mut serde_json::Map<String, serde_json::Value>,
    key: &str,
    case: &str,
    rate: f64,
    ceiling: f64,
) {
    println!(
        "{case:<52} {rate:>10.0} {ceiling:>10.0} {:>7.1}%",
        100.0 * rate / ceiling
    );
    results.insert(
        key.to_owned(),
        json!({"case": case, "rate": rate, "ceiling": ceiling}),
    );
}

/// The raw request-reply ceiling's responder: a process of its own (as the worker is), on its
/// own connection, answering every request on `ceiling.echo` with the bytes of a real get
/// reply, so the broker moves the same message shape as for a get and nothing else is done.
async fn echo_responder(url: String, body_file: String) {
    let body = bytes::Bytes::from(std::fs::read(body_file).unwrap());
    let client = async_nats::connect(url).await.unwrap();
    let mut requests = client
        .queue_subscribe("ceiling.echo", "q".into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    println!("ready");
    while let Some(m) = requests.next().await {
        if let Some(reply) = m.reply {
            let _ = client.publish(reply, body.clone()).await;
        }
    }
}

/// Starts `echo_responder` in a child process (this binary, re-executed) and waits until it
/// is subscribed.
fn spawn_echo(
    nats: &support::NatsServer,
    body: &[u8],
    dir: &std::path::Path,
) -> std::process::Child {
    use std::io::BufRead;
    let body_file = dir.join("echo-body.json");
    std::fs::write(&body_file, body).unwrap();
    let mut command = std::process::Command::new(std::env::current_exe().unwrap());
    command
        .env("RMOS_BENCH_ECHO_URL", nats.url())
        .env("RMOS_BENCH_ECHO_BODY", &body_file)
        .stdout(std::process::Stdio::piped());
    // SAFETY: prctl is async-signal-safe; the responder dies with the benchmark, even on a
    // panic that skips the kill below.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            Ok(())
        });
    }
    let mut child = command.spawn().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready", "echo responder did not start");
    child
}

/// Which parts to run: `BENCH_ONLY=creates,patches,gets,soak,s3` (default: all; the soak also
/// needs SOAK_SECONDS).
fn wanted(part: &str) -> bool {
    match std::env::var("BENCH_ONLY") {
        Ok(list) if !list.trim().is_empty() => list.split(',').any(|p| p.trim() == part),
        _ => true,
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    if let (Ok(url), Ok(body)) = (
        std::env::var("RMOS_BENCH_ECHO_URL"),
        std::env::var("RMOS_BENCH_ECHO_BODY"),
    ) {
        return echo_responder(url, body).await;
    }
    let nats = support::NatsServer::start().await;
    let dir = fresh_dir("e2e-local-");
    let worker = start_worker(&nats, &dir, &[]).await;
    let client = async_nats::connect(nats.url()).await.unwrap();

    let mut results = serde_json::Map::new();
    let (rss0, cpu0) = usage(worker.pid());
    println!("rmos-runs end-to-end benchmark: cargo bench --bench e2e");
    println!(
        "{} creates per local cell, {S3_CREATES} on S3; 2 CPUs shared by broker, worker, store and load",
        CREATES
    );
    println!(
        "{:<52} {:>10} {:>10} {:>8}",
        "case", "rate/s", "ceiling/s", "ratio"
    );
    let mut offset = 0;
    let mut commands = 0usize;
    if wanted("creates") {
        for in_flight in [1usize, 16, 256] {
            // CPU seconds of each process over the cell, to show where the cores went.
            let pids = [
                worker.pid(),
                nats.pid().map_or(0, |p| p as libc::pid_t),
                std::process::id() as libc::pid_t,
            ];
            let cpu_before = pids.map(|p| usage(p).1);
            let started = Instant::now();
            let rate = creates(&client, CREATES, in_flight, offset).await;
            let secs = started.elapsed().as_secs_f64();
            let cores = [0, 1, 2].map(|i| (usage(pids[i]).1 - cpu_before[i]) / secs);
            println!(
                "{:<52} worker {:.2}, broker {:.2}, load generator {:.2} cores",
                format!("  CPU while {in_flight} in flight:"),
                cores[0],
                cores[1],
                cores[2]
            );
            results.insert(
                format!("cpu_cores_creates_{in_flight}"),
                json!({"worker": cores[0], "broker": cores[1], "load_generator": cores[2]}),
            );
            offset += CREATES;
            commands += CREATES;
            let broker = broker_ceiling(&client, in_flight, false).await;
            let store_dir = fresh_dir("e2e-store-");
            let store =
                RunStore::open(&StoreUrl::Local(store_dir.clone()), &OpenOptions::default())
                    .unwrap();
            let store_rate = store_ceiling(&store, CREATES, in_flight, 0).await;
            row(
                &mut results,
                &format!("local_vs_broker_{in_flight}"),
                &format!("creates, local fsync, {in_flight} in flight / broker"),
                rate,
                broker,
            );
            row(
                &mut results,
                &format!("local_vs_store_{in_flight}"),
                &format!("creates, local fsync, {in_flight} in flight / store"),
                rate,
                store_rate,
            );
        }
        let consume_only = broker_ceiling(&client, 256, true).await;
        println!(
            "{:<52} {:>10.0}",
            "broker: consume + ack of pre-published (reference)", consume_only
        );
        results.insert("broker_consume_only".into(), json!(consume_only));
    }
    if wanted("patches") {
        let (patch_rate, lost) = contended_patches(&client).await;
        commands += 641;
        println!(
            "{:<52} {:>10.0}   lost updates: {lost}",
            "contended patches, 32 publishers x 20, one run", patch_rate
        );
        results.insert(
            "contended_patches".into(),
            json!({"rate": patch_rate, "lost_updates": lost}),
        );
    }
    // CPU per command over the creates and patches (gets are requests, not commands).
    let (_, cpu_commands) = usage(worker.pid());
    if wanted("gets") {
        let run_id: &'static str = Box::leak(one_run(&client).await.into_boxed_str());
        let reply = client
            .request("rmos.runs.get", run_id.into())
            .await
            .unwrap();
        let mut echo = spawn_echo(&nats, &reply.payload, &dir);
        let arc_client = Arc::new(client.clone());
        for c in [1usize, 16, 64] {
            let (rps, p50, p99, p999) = requests(&arc_client, "rmos.runs.get", run_id, c).await;
            let (raw_rps, raw_p50, raw_p99, _) =
                requests(&arc_client, "ceiling.echo", run_id, c).await;
            row(
                &mut results,
                &format!("get_{c}"),
                &format!("get, {c} requesters / raw request-reply"),
                rps,
                raw_rps,
            );
            println!(
                "{:<52} p50 {p50:.2} ms  p99 {p99:.2} ms  p99.9 {p999:.2} ms  (raw p50 {raw_p50:.2}, p99 {raw_p99:.2})",
                ""
            );
            results.insert(
                format!("get_latency_{c}"),
                json!({"p50_ms": p50, "p99_ms": p99, "p999_ms": p999,
                "raw_p50_ms": raw_p50, "raw_p99_ms": raw_p99}),
            );
        }
        let _ = echo.kill();
        let _ = echo.wait();
    }
    let (rss, _) = usage(worker.pid());
    let cpu_per_1000 = (cpu_commands - cpu0) / commands.max(1) as f64 * 1000.0;
    // Optional soak: SOAK_SECONDS of patches with 256 in flight over 1,000 runs (patches, so the
    // store does not grow without bound), resident set sampled every 30 s
    // (SOAK_SECONDS=600 cargo bench --bench e2e for the 10-minute soak).
    let soak: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if soak > 0 && wanted("soak") {
        println!(
            "soak: {soak} s of patches over 1,000 runs, 256 in flight; resident set every 30 s"
        );
        let js = jetstream::new(client.clone());
        for k in 0..1000usize {
            let body = json!({"mode": "cam", "tool_id": "T1", "status": "OK",
                              "run_id": format!("run_50a{k:09x}")});
            js.publish("rmos.runs.create", body.to_string().into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
        let mut samples = Vec::new();
        let soak_start = Instant::now();
        let mut sent = 0usize;
        let mut next_sample = Duration::ZERO;
        let mut stored = client.subscribe("rmos.runs.stored").await.unwrap();
        while soak_start.elapsed() < Duration::from_secs(soak) {
            if soak_start.elapsed() >= next_sample {
                let r = proc_status_mib(worker.pid(), "VmRSS:");
                println!(
                    "  t={:>4} s  rss {r:.1} MiB  patches {sent}",
                    soak_start.elapsed().as_secs()
                );
                samples.push(
                    json!({"t_s": soak_start.elapsed().as_secs(), "rss_mib": r, "patches": sent}),
                );
                next_sample += Duration::from_secs(30);
            }
            futures::stream::iter(sent..sent + 2000)
                .for_each_concurrent(256, |i| {
                    let js = js.clone();
                    async move {
                        let patch = json!({"run_id": format!("run_50a{:09x}", i % 1000),
                                           "meta_updates": {"soak": i}});
                        js.publish("rmos.runs.patch_meta", patch.to_string().into())
                            .await
                            .unwrap()
                            .await
                            .unwrap();
                    }
                })
                .await;
            sent += 2000;
            // Keep the broker's backlog bounded: wait until the worker has caught up.
            let mut done = 0;
            while done < 2000 {
                let m = tokio::time::timeout(Duration::from_secs(120), stored.next())
                    .await
                    .unwrap()
                    .unwrap();
                let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
                if v["event"] == "meta_patched" {
                    done += 1;
                }
            }
        }
        let r = proc_status_mib(worker.pid(), "VmRSS:");
        println!(
            "  t={:>4} s  rss {r:.1} MiB  patches {sent} (end)",
            soak_start.elapsed().as_secs()
        );
        samples.push(json!({"t_s": soak_start.elapsed().as_secs(), "rss_mib": r, "patches": sent}));
        results.insert(
            "soak".into(),
            json!({"seconds": soak, "patches": sent, "samples": samples}),
        );
    }
    println!(
        "worker peak RSS {rss:.1} MiB (at start {rss0:.1}); CPU {cpu_per_1000:.3} s per 1,000 \
         commands (creates and patches; 0 when they were not run)"
    );
    results.insert(
        "worker".into(),
        json!({"peak_rss_mib": rss, "cpu_s_per_1000_commands": cpu_per_1000}),
    );
    drop(worker);

    // S3 (moto, single-threaded: a strict test server, not a fast one).
    if wanted("s3") {
        let s3 = support::S3Server::start().await;
        let bucket = support::unique_bucket();
        s3.create_bucket(&bucket).await;
        let nats2 = support::NatsServer::start().await;
        let mut env = s3.env_for(&bucket);
        env.push(("RMOS_STORE_URL".into(), format!("s3://{bucket}/runs")));
        let s3_dir = fresh_dir("e2e-s3-");
        let _s3_worker = start_worker(&nats2, &s3_dir, &env).await;
        let client2 = async_nats::connect(nats2.url()).await.unwrap();
        let rate = creates(&client2, S3_CREATES, 16, 0).await;
        let opts = support::s3_options(&s3.endpoint());
        let store = RunStore::open(
            &StoreUrl::S3 {
                bucket: bucket.clone(),
                prefix: "ceiling".into(),
            },
            &opts,
        )
        .unwrap();
        let store_rate = store_ceiling(&store, S3_CREATES, 16, 0).await;
        row(
            &mut results,
            "s3_vs_store_16",
            "creates, S3 (moto), 16 in flight / store",
            rate,
            store_rate,
        );
    }
    println!("BENCH_JSON {}", serde_json::Value::Object(results));
}
