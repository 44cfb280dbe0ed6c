//! End-to-end benchmark over a real broker: a `rmos-runs serve` process, a `nats-server` with
//! JetStream, and the local store (fsync on). Prints a table, the command that produced it,
//! and a `BENCH_JSON` line.
//!
//!     cargo bench --bench e2e            (or: make bench)
//!
//! Figures:
//! - creates/s: JetStream publish of 2-5 KB run records -> `rmos.runs.stored` received, with
//!   1, 16 and 256 publishes in flight;
//! - get latency p50/p99/p99.9 and requests/s with 1, 16 and 64 concurrent requesters;
//! - the broker's own ceilings for the same shapes: JetStream publish+consume+ack with no
//!   storage, and raw request-reply to a trivial responder.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use serde_json::json;

const CREATES: usize = 2000;
const GET_SECONDS: u64 = 4;

fn record(i: usize) -> Vec<u8> {
    // 2-5 KB: a run record with a feasibility report and a short G-code program.
    let lines = 40 + (i % 100);
    let gcode: String = (0..lines)
        .map(|n| {
            format!(
                "N{n} G1 X{:.3} Y{:.3} F1200\n",
                n as f64 * 1.5,
                (i % 97) as f64
            )
        })
        .collect();
    json!({"mode": "cam", "tool_id": format!("T{}", i % 20), "status": "OK",
           "feasibility": {"max_depth_mm": 3.5, "passes": i % 7, "material": "maple"},
           "decision": {"risk_level": "GREEN", "score": 87.5, "warnings": []},
           "request": {"geometry": {"w": 120, "h": 80}, "bench_index": i},
           "outputs": {"gcode_text": gcode}})
    .to_string()
    .into_bytes()
}

struct Worker(Child);
impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx].as_secs_f64() * 1000.0
}

async fn creates(client: &async_nats::Client, in_flight: usize, offset: usize) -> f64 {
    let js = jetstream::new(client.clone());
    let mut stored = client.subscribe("rmos.runs.stored").await.unwrap();
    let start = Instant::now();
    let waiter = tokio::spawn(async move {
        let mut seen = HashSet::new();
        while seen.len() < CREATES {
            let m = stored.next().await.unwrap();
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            seen.insert(v["run_id"].as_str().unwrap_or("").to_owned());
        }
    });
    futures::stream::iter(0..CREATES)
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
    tokio::time::timeout(Duration::from_secs(300), waiter)
        .await
        .unwrap()
        .unwrap();
    CREATES as f64 / start.elapsed().as_secs_f64()
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

async fn broker_ceiling_js(client: &async_nats::Client, in_flight: usize) -> f64 {
    let js = jetstream::new(client.clone());
    let name = format!("CEIL_{in_flight}");
    let subject = format!("ceiling.{in_flight}");
    let stream = js
        .get_or_create_stream(jetstream::stream::Config {
            name: name.clone(),
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
    futures::stream::iter(0..CREATES)
        .for_each_concurrent(in_flight, |i| {
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
        .await;
    consume.await.unwrap();
    CREATES as f64 / start.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let nats = support::NatsServer::start().await;
    // Not under /tmp (may be tmpfs) and never a just-deleted tree: a fresh dir in target/.
    let base = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-tmp");
    std::fs::create_dir_all(&base).unwrap();
    let dir = tempfile::tempdir_in(&base).unwrap();
    let _worker = Worker(
        Command::new(env!("CARGO_BIN_EXE_rmos-runs"))
            .arg("serve")
            .env("NATS_URL", nats.url())
            .env("RMOS_RUNS_DIR", dir.path())
            .env("RUST_LOG", "error")
            .env("RMOS_CONCURRENCY", "256")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start worker"),
    );
    let client = async_nats::connect(nats.url()).await.unwrap();
    let ready = Instant::now();
    while client
        .request("rmos.runs.get", "run_000000000000".into())
        .await
        .is_err()
    {
        assert!(
            ready.elapsed() < Duration::from_secs(30),
            "worker did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A trivial responder for the raw request-reply ceiling.
    let echo = client
        .queue_subscribe("ceiling.echo", "q".into())
        .await
        .unwrap();
    let echo_client = client.clone();
    tokio::spawn(async move {
        echo.for_each_concurrent(64, |m| {
            let c = echo_client.clone();
            async move {
                if let Some(r) = m.reply {
                    let _ = c.publish(r, m.payload).await;
                }
            }
        })
        .await;
    });

    let mut results = serde_json::Map::new();
    println!(
        "rmos-runs end-to-end benchmark (cargo bench --bench e2e), {CREATES} creates per cell"
    );
    println!(
        "{:<44} {:>12} {:>12} {:>8}",
        "case", "rate/s", "ceiling/s", "ratio"
    );
    let mut offset = 0;
    for in_flight in [1usize, 16, 256] {
        let rate = creates(&client, in_flight, offset).await;
        offset += CREATES;
        let ceiling = broker_ceiling_js(&client, in_flight).await;
        println!(
            "{:<44} {:>12.0} {:>12.0} {:>7.1}%",
            format!("creates, local store fsync, {in_flight} in flight"),
            rate,
            ceiling,
            100.0 * rate / ceiling
        );
        results.insert(format!("creates_per_s_{in_flight}"), json!(rate));
        results.insert(format!("broker_js_per_s_{in_flight}"), json!(ceiling));
    }
    let page = client
        .request("rmos.runs.list", r#"{"limit": 1}"#.into())
        .await
        .unwrap();
    let page: serde_json::Value = serde_json::from_slice(&page.payload).unwrap();
    let run_id: &'static str = Box::leak(
        page["runs"][0]["run_id"]
            .as_str()
            .expect("a stored run")
            .to_owned()
            .into_boxed_str(),
    );
    let arc_client = Arc::new(client.clone());
    for c in [1usize, 16, 64] {
        let (rps, p50, p99, p999) = requests(&arc_client, "rmos.runs.get", run_id, c).await;
        let (raw_rps, raw_p50, raw_p99, _) =
            requests(&arc_client, "ceiling.echo", "run_000000000001", c).await;
        println!(
            "{:<44} {:>12.0} {:>12.0} {:>7.1}%   p50 {p50:.2} ms  p99 {p99:.2} ms  p99.9 {p999:.2} ms  (raw p50 {raw_p50:.2} p99 {raw_p99:.2})",
            format!("get (stored run), {c} requesters"),
            rps,
            raw_rps,
            100.0 * rps / raw_rps
        );
        results.insert(format!("get_rps_{c}"), json!(rps));
        results.insert(format!("get_p50_ms_{c}"), json!(p50));
        results.insert(format!("get_p99_ms_{c}"), json!(p99));
        results.insert(format!("get_p999_ms_{c}"), json!(p999));
        results.insert(format!("raw_rps_{c}"), json!(raw_rps));
        results.insert(format!("raw_p99_ms_{c}"), json!(raw_p99));
    }
    println!("BENCH_JSON {}", serde_json::Value::Object(results));
}
