//! Large programs through a real broker and worker: a 200 MB program in by claim check and out
//! again, with the worker's peak resident set against the 100 MiB ceiling, and the broker's
//! own Object Store rates for the same bytes (no worker) as the peer measured in the same run.
//!
//!     cargo bench --bench blobs
//!     BLOB_MB=50 BENCH_STORE=s3 cargo bench --bench blobs    (size; local or s3 store)
//!
//! In: the publisher puts the program into the staging bucket (as a Python or Go publisher
//! would) and publishes a create naming it; timed until `rmos.runs.stored`. The worker streams
//! the object into the run store, hashing it as it passes. Out: a `get` with
//! `"output": "gcode"` (the worker stages the blob) and the reader's fetch of the staged
//! object, hashed and compared. Then an advisory whose body (canonical JSON of the same size)
//! goes in by claim check (`body_ref`): the worker also checks, as the bytes pass, that they
//! are RFC 8785 canonical, and its claim rate is compared with the G-code claim's (the peer
//! without that check, same run). Peak RSS is `VmHWM` of the worker process.

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::Write;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use support::worker::Worker;
use tokio::io::AsyncReadExt;

const RSS_CEILING_MIB: f64 = 100.0;
const BUCKET: &str = "rmos-runs-staging";

fn vm_hwm_mib(pid: libc::pid_t) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// Writes a program of about `mb` MB of distinct G-code lines; returns (size, sha256).
fn write_program(path: &std::path::Path, mb: u64) -> (u64, String) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut h = Sha256::new();
    let mut size = 0u64;
    let mut i = 0u64;
    while size < mb * 1_000_000 {
        let line = format!(
            "G1 X{}.{:03} Y{}.{:03} Z-{}.125 F1800\n",
            i % 1000,
            i % 997,
            i / 1000 % 1000,
            i % 991,
            i % 37
        );
        f.write_all(line.as_bytes()).unwrap();
        h.update(line.as_bytes());
        size += line.len() as u64;
        i += 1;
    }
    f.flush().unwrap();
    (size, hex::encode(h.finalize()))
}

/// Writes an advisory body of about `mb` MB as canonical JSON (members in key order, no
/// whitespace, ECMAScript numbers); returns (size, sha256).
fn write_advisory_body(path: &std::path::Path, mb: u64) -> (u64, String) {
    struct Out {
        f: std::io::BufWriter<std::fs::File>,
        h: Sha256,
        size: u64,
    }
    impl Out {
        fn put(&mut self, b: &[u8]) {
            self.f.write_all(b).unwrap();
            self.h.update(b);
            self.size += b.len() as u64;
        }
    }
    let mut o = Out {
        f: std::io::BufWriter::new(std::fs::File::create(path).unwrap()),
        h: Sha256::new(),
        size: 0,
    };
    o.put(br#"{"steps":["#);
    let mut i = 0u64;
    while o.size < mb * 1_000_000 {
        if i > 0 {
            o.put(b",");
        }
        let step = format!(
            r#"{{"feed":{}.5,"note":"pass {i}: depth \"{}\" é\tok","z":{i}}}"#,
            i % 3000,
            i % 37
        );
        o.put(step.as_bytes());
        i += 1;
    }
    o.put(br#"],"text":"Feed rate reduced"}"#);
    o.f.flush().unwrap();
    (o.size, hex::encode(o.h.finalize()))
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

/// Reads a staged object whole through a sink, hashing; (bytes, sha256).
/// Publishes `body` on `rmos.runs.<kind>` and waits for its outcome (panics on a rejection).
async fn command(
    js: &async_nats::jetstream::Context,
    stored: &mut async_nats::Subscriber,
    rejected: &mut async_nats::Subscriber,
    kind: &str,
    body: &Value,
) {
    js.publish(format!("rmos.runs.{kind}"), body.to_string().into())
        .await
        .unwrap()
        .await
        .unwrap();
    tokio::select! {
        Some(_) = stored.next() => {}
        Some(m) = rejected.next() => panic!("rejected: {}", String::from_utf8_lossy(&m.payload)),
        _ = tokio::time::sleep(Duration::from_secs(600)) => panic!("no outcome in 10 min"),
    }
}

async fn fetch(bucket: &jetstream::object_store::ObjectStore, name: &str) -> (u64, String) {
    let mut object = bucket.get(name).await.expect("get staged object");
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0u64;
    loop {
        let k = object.read(&mut buf).await.expect("read staged object");
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    (n, hex::encode(h.finalize()))
}

#[tokio::main]
async fn main() {
    let mb: u64 = std::env::var("BLOB_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let on_s3 = std::env::var("BENCH_STORE").as_deref() == Ok("s3");
    println!(
        "rmos-runs large-program benchmark: {}cargo bench --bench blobs",
        match (mb, on_s3) {
            (200, false) => String::new(),
            _ => format!(
                "BLOB_MB={mb}{} ",
                if on_s3 { " BENCH_STORE=s3" } else { "" }
            ),
        }
    );
    let nats = support::NatsServer::start().await;
    let tmp = tempfile::Builder::new()
        .prefix("rmos-bench-blobs-")
        .tempdir()
        .unwrap();
    let runs = tmp.path().join("runs");
    std::fs::create_dir(&runs).unwrap();
    let program = tmp.path().join("program.nc");
    let (size, sha) = write_program(&program, mb);
    println!(
        "program: {:.1} MB, sha256 {}…",
        size as f64 / 1e6,
        &sha[..12]
    );

    let mut env: Vec<(String, String)> = vec![("RUST_LOG".into(), "warn".into())];
    let _s3 = if on_s3 {
        let s3 = support::S3Server::start().await;
        let bucket = support::unique_bucket();
        s3.create_bucket(&bucket).await;
        env.extend(s3.env_for(&bucket));
        env.push(("RMOS_STORE_URL".into(), format!("s3://{bucket}/runs")));
        Some(s3)
    } else {
        None
    };
    let worker = Worker::start_at(&nats.url(), &runs, "blobs", &env).await;
    let pid = worker.pid();
    let idle = vm_hwm_mib(pid);
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    let bucket = js.get_object_store(BUCKET).await.expect("staging bucket");

    // Peer: the broker's own Object Store, put and get of the same bytes, no worker.
    let t = Instant::now();
    let mut f = tokio::fs::File::open(&program).await.unwrap();
    bucket.put("peer", &mut f).await.unwrap();
    let peer_put = t.elapsed();
    let t = Instant::now();
    let (n, got) = fetch(&bucket, "peer").await;
    let peer_get = t.elapsed();
    assert_eq!((n, got.as_str()), (size, sha.as_str()));
    bucket.delete("peer").await.unwrap();

    // In: stage, publish the create, wait for `stored`.
    let mut stored = client.subscribe("rmos.runs.stored").await.unwrap();
    let mut rejected = client.subscribe("rmos.runs.rejected").await.unwrap();
    let run = "run_00000000b100";
    let name = format!("in/{sha}");
    let t = Instant::now();
    let mut f = tokio::fs::File::open(&program).await.unwrap();
    bucket.put(name.as_str(), &mut f).await.unwrap();
    let staged = t.elapsed();
    let create = json!({"mode": "cam", "tool_id": "T1", "status": "OK", "run_id": run,
                        "outputs": {"gcode_ref": {"bucket": BUCKET, "name": name,
                                                  "sha256": sha, "size_bytes": size}}});
    command(&js, &mut stored, &mut rejected, "create", &create).await;
    let total_in = t.elapsed();
    let claim = total_in - staged;
    let after_in = vm_hwm_mib(pid);

    // Out: get with output (the worker stages the blob), then the reader's fetch.
    let t = Instant::now();
    let reply = client
        .request(
            "rmos.runs.get",
            json!({"run_id": run, "output": "gcode"}).to_string().into(),
        )
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&reply.payload).unwrap();
    let staged_out = t.elapsed();
    let out_name = v["staged"]["name"]
        .as_str()
        .expect("staged reply")
        .to_owned();
    let (n, got) = fetch(&bucket, &out_name).await;
    let total_out = t.elapsed();
    assert_eq!(n, size, "size out");
    assert_eq!(got, sha, "bytes out differ");
    let after_out = vm_hwm_mib(pid);

    // In: an advisory body of the same size, staged canonical, attached by `body_ref`.
    let body_path = tmp.path().join("advisory.json");
    let (adv_size, adv_sha) = write_advisory_body(&body_path, mb);
    let adv_name = format!("in/{adv_sha}");
    let mut f = tokio::fs::File::open(&body_path).await.unwrap();
    bucket.put(adv_name.as_str(), &mut f).await.unwrap();
    let advisory = json!({"run_id": run, "advisory_id": "adv_00000000b100", "kind": "note",
                          "body_ref": {"bucket": BUCKET, "name": adv_name,
                                       "sha256": adv_sha, "size_bytes": adv_size}});
    let t = Instant::now();
    command(&js, &mut stored, &mut rejected, "advisory", &advisory).await;
    let adv_claim = t.elapsed();
    let after_advisory = vm_hwm_mib(pid);

    // Verify: both 200 MB blobs re-hashed as they stream from the store, never held whole.
    let t = Instant::now();
    let reply = client
        .request("rmos.runs.verify", run.to_owned().into())
        .await
        .unwrap();
    let verify_time = t.elapsed();
    let report: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(report["ok"], true, "verify: {report}");
    let peak = vm_hwm_mib(pid);

    let store = if on_s3 {
        "S3 (moto, multipart)"
    } else {
        "local (fsync)"
    };
    println!(
        "store: {store}; broker max_payload {} bytes",
        client.server_info().max_payload
    );
    println!("| step | seconds | MB/s |");
    println!("|---|---:|---:|");
    let row = |what: &str, d: Duration| {
        println!("| {what} | {:.2} | {:.1} |", d.as_secs_f64(), mbps(size, d));
    };
    row("peer: Object Store put (no worker)", peer_put);
    row("peer: Object Store get (no worker)", peer_get);
    row("in: publisher stages the program", staged);
    row(
        "in: worker claims it into the store (create -> stored)",
        claim,
    );
    row("in: total", total_in);
    row("out: worker stages the blob (get output)", staged_out);
    row("out: total, fetched and hashed", total_out);
    println!(
        "| in: worker claims a {:.1} MB canonical-JSON advisory body (advisory -> stored) | {:.2} | {:.1} |",
        adv_size as f64 / 1e6,
        adv_claim.as_secs_f64(),
        mbps(adv_size, adv_claim)
    );
    println!(
        "| verify: the run's {:.1} MB of blobs re-hashed as they stream | {:.2} | {:.1} |",
        (size + adv_size) as f64 / 1e6,
        verify_time.as_secs_f64(),
        mbps(size + adv_size, verify_time)
    );
    let adv_ratio = mbps(adv_size, adv_claim) / mbps(size, claim);
    println!(
        "advisory claim (with the canonical check) / G-code claim (without): {adv_ratio:.2} of the rate"
    );
    println!(
        "worker peak RSS (VmHWM): idle {idle:.1} MiB, after in {after_in:.1} MiB, after out \
         {after_out:.1} MiB, after the advisory {after_advisory:.1} MiB, after verify {peak:.1} MiB; ceiling {RSS_CEILING_MIB} MiB: {}",
        if peak < RSS_CEILING_MIB {
            "under"
        } else {
            "OVER"
        }
    );
    println!(
        "BENCH_JSON {}",
        json!({"blob_mb": size as f64 / 1e6, "store": store,
               "in_mb_s": mbps(size, total_in), "out_mb_s": mbps(size, total_out),
               "peer_put_mb_s": mbps(size, peer_put), "peer_get_mb_s": mbps(size, peer_get),
               "advisory_claim_mb_s": mbps(adv_size, adv_claim),
               "gcode_claim_mb_s": mbps(size, claim), "advisory_to_gcode_claim": adv_ratio,
               "verify_mb_s": mbps(size + adv_size, verify_time), "worker_peak_rss_mib": peak, "ceiling_mib": RSS_CEILING_MIB})
    );
    drop(worker);
}
