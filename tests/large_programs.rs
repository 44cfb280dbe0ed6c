//! Large programs through NATS by claim check, with a real worker on a broker that keeps the
//! default 1 MB `max_payload`: a 3 MB program (80,000 lines) goes in through
//! `rmos-runs create --file`, comes back byte for byte through `get --output gcode`, `verify`
//! passes, the staged object is gone; a staged body whose bytes are not the claimed ones is
//! rejected with its reason; `get` with `include_outputs` answers where to fetch the body.

mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::object_store::InfoErrorKind;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use support::ConfiguredNatsServer;
use support::worker::Worker;

const BROKER: &str = r#"
listen: 127.0.0.1:{{PORT}}
max_payload: 1MB
jetstream { store_dir: "{{STORE_DIR}}" }
"#;

const BUCKET: &str = "rmos-runs-staging";

fn cli(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rmos-runs"))
        .args(args)
        .env("NATS_URL", url)
        .env_remove("RMOS_CONFIG")
        .env_remove("RMOS_SUBJECT_PREFIX")
        .env_remove("RMOS_INGEST")
        .env_remove("RMOS_STAGING_BUCKET")
        .stdin(Stdio::null())
        .output()
        .expect("run cli")
}

/// A 3D finishing program: `lines` distinct lines.
fn program(lines: u32) -> String {
    let mut s = String::with_capacity(lines as usize * 40);
    s.push_str("G21\nG90\n");
    for i in 0..lines {
        let (x, y, z) = (i % 1000, i / 1000, i % 37);
        s.push_str(&format!(
            "G1 X{x}.{:03} Y{y}.{:03} Z-{z}.1250 F1800 ; p{i}\n",
            i % 997,
            i % 991
        ));
    }
    s.push_str("M30\n");
    s
}

fn sha256(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn write_json(dir: &Path, name: &str, v: &Value) -> String {
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_vec(v).unwrap()).unwrap();
    p.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_3mb_program_goes_through_a_1mb_broker_and_back() {
    let nats = ConfiguredNatsServer::start(BROKER, &[], &[]).await;
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    std::fs::create_dir(&runs).unwrap();
    let _worker = Worker::start_at(&nats.url(), &runs, "a", &[]).await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    assert_eq!(client.server_info().max_payload, 1024 * 1024);
    let js = jetstream::new(client.clone());

    let gcode = program(80_000);
    assert!(gcode.len() > 3_000_000, "{} bytes", gcode.len());
    let run = "run_00000000b16a";
    let create = json!({"mode": "cam", "tool_id": "T7", "status": "OK", "run_id": run,
                        "outputs": {"gcode_text": gcode}});
    let file = write_json(tmp.path(), "big.json", &create);
    let out = cli(&nats.url(), &["create", "--file", &file, "--json"]);
    assert!(
        out.status.success(),
        "create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ev: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ev["event"], "created", "{ev}");

    // Back byte for byte.
    let out = cli(&nats.url(), &["get", run, "--output", "gcode"]);
    assert!(
        out.status.success(),
        "get --output: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len(), gcode.len());
    assert!(out.stdout == gcode.as_bytes(), "G-code differs");

    let out = cli(&nats.url(), &["verify", run, "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], true, "{report}");

    // The staged object was removed once the run was stored.
    let bucket = js.get_object_store(BUCKET).await.unwrap();
    let sha = sha256(gcode.as_bytes());
    match bucket.info(format!("in/{sha}")).await {
        Err(e) if e.kind() == InfoErrorKind::NotFound => {}
        Ok(info) if info.deleted && info.size == 0 => {}
        other => panic!("staged object still there: {other:?}"),
    }

    // NATS get with include_outputs: where to fetch, not too_large.
    let reply = client
        .request(
            "rmos.runs.get",
            json!({"run_id": run, "include_outputs": true})
                .to_string()
                .into(),
        )
        .await
        .unwrap();
    let status = reply
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Service-Error-Code"))
        .map(|v| v.to_string());
    assert_eq!(status, None, "{}", String::from_utf8_lossy(&reply.payload));
    let a: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(a["fetch"]["gcode"]["sha256"], sha.as_str(), "{a}");
    assert_eq!(a["fetch"]["gcode"]["bucket"], BUCKET);
    assert_eq!(a["fetch"]["gcode"]["size_bytes"], gcode.len() as u64);

    // A staged body whose bytes are not the claimed ones is rejected, naming why.
    let tampered = gcode.replacen("G1 X5.005", "G1 X5.006", 1);
    assert_ne!(tampered, gcode);
    let name = "in/tampered";
    bucket
        .put(name, &mut tampered.as_bytes())
        .await
        .expect("stage tampered");
    let claim = json!({"mode": "cam", "tool_id": "T7", "status": "OK",
                       "run_id": "run_00000000b16b",
                       "outputs": {"gcode_ref": {"bucket": BUCKET, "name": name,
                                                 "sha256": sha, "size_bytes": gcode.len()}}});
    let file = write_json(tmp.path(), "tampered.json", &claim);
    let out = cli(&nats.url(), &["create", "--file", &file]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("invalid_request") && stderr.contains("hash"),
        "{stderr}"
    );
    // Nothing stored for it.
    let out = cli(&nats.url(), &["get", "run_00000000b16b"]);
    assert_eq!(out.status.code(), Some(2));

    // A wrong size is rejected too.
    let claim = json!({"mode": "cam", "tool_id": "T7", "status": "OK",
                       "run_id": "run_00000000b16c",
                       "outputs": {"gcode_ref": {"bucket": BUCKET, "name": name,
                                                 "sha256": sha256(tampered.as_bytes()),
                                                 "size_bytes": 10}}});
    let file = write_json(tmp.path(), "short.json", &claim);
    let out = cli(&nats.url(), &["create", "--file", &file]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("claimed 10"), "{stderr}");

    // A second run with the same program shares its blob, and is byte-identical too.
    let again = json!({"mode": "cam", "tool_id": "T7", "status": "OK",
                       "run_id": "run_00000000b16d", "outputs": {"gcode_text": gcode}});
    let file = write_json(tmp.path(), "again.json", &again);
    let out = cli(&nats.url(), &["create", "--file", &file]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    let out = cli(
        &nats.url(),
        &["get", "run_00000000b16d", "--output", "gcode"],
    );
    assert!(
        out.stdout == gcode.as_bytes(),
        "second run's G-code differs"
    );
}
