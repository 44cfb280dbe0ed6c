//! Large programs through NATS by claim check, with a real worker on a broker that keeps the
//! default 1 MB `max_payload`: a 3 MB program (80,000 lines) goes in through
//! `rmos-runs create --file`, comes back byte for byte through `get --output gcode`, `verify`
//! passes, the staged object is gone (and a 50 MB program the same way, on the local store and
//! on S3); a staged body whose bytes are not the claimed ones is
//! rejected with its reason; `get` with `include_outputs` answers where to fetch the body.
//! JSON bodies the same way: a multi-MB advisory body and op plan go in through the CLI
//! (staged as their RFC 8785 canonical bytes) and come back identical; a tampered or
//! non-canonical staged body is rejected with its reason; the claims are counted. Over HTTP, a
//! create and an advisory larger than one broker message are staged by the worker itself.

mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::object_store::InfoErrorKind;
use rmos_runs::domain::hashing::canonical_json;
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

/// POSTs `body` to `url`; the status and the JSON answer.
async fn post(
    http: &reqwest::Client,
    url: String,
    body: impl Into<reqwest::Body>,
) -> (reqwest::StatusCode, Value) {
    let r = http
        .post(url)
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await
        .expect("POST");
    let status = r.status();
    // A refusal may come before the body was read to its end: the server closes the
    // connection and says so, so that it is not reused for the next request.
    if !status.is_success() {
        assert_eq!(
            r.headers().get("connection").map(|v| v.as_bytes()),
            Some(&b"close"[..]),
            "{status} without Connection: close"
        );
    }
    let answer = serde_json::from_slice(&r.bytes().await.expect("body")).expect("JSON answer");
    (status, answer)
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

fn cli_ok(url: &str, args: &[&str]) -> Value {
    let out = cli(url, args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// An advisory body of about `steps` x 90 bytes, written with its keys out of canonical
/// order, non-ASCII text and numbers that JCS spells differently (`1.50`, `2e3`).
fn advisory_body_text(steps: u32) -> String {
    let mut s = String::from(
        r#"{"text": "Feed rate reduced \u00e9 \u2603 \ud83d\ude00 because","steps": ["#,
    );
    for i in 0..steps {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&format!(
            r#"{{"z": {i}, "feed": 1.50, "rpm": 2e3, "note": "step {i}: pass \"{}\" at\tX{}.{:03}"}}"#,
            i % 7,
            i % 1000,
            i % 997
        ));
    }
    s.push_str(r#"], "a": null, "ok": true}"#);
    s
}

/// Reads the worker's `/metrics` on `port` as series -> value.
async fn metric(port: u16, series: &str) -> f64 {
    let m = support::scrape(port).await;
    *m.get(series)
        .unwrap_or_else(|| panic!("{series} missing: {:?}", m.keys()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_mb_advisory_and_op_plan_go_through_a_1mb_broker_and_back() {
    let nats = ConfiguredNatsServer::start(BROKER, &[], &[]).await;
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    std::fs::create_dir(&runs).unwrap();
    let port = support::free_port();
    let env = [("RMOS_HTTP_ADDR".to_owned(), format!("127.0.0.1:{port}"))];
    let _worker = Worker::start_at(&nats.url(), &runs, "a", &env).await;
    let url = nats.url();
    let client = async_nats::connect(&url).await.unwrap();
    assert_eq!(client.server_info().max_payload, 1024 * 1024);
    let js = jetstream::new(client.clone());
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");

    // A create whose G-code and op plan are each over max_payload: both staged by the CLI.
    let gcode = program(40_000);
    let plan: Value = json!({"ops": (0..40_000).map(|i| json!({"op": "contour", "i": i,
        "depth": 0.25 * f64::from(i % 9), "tool": "T7"})).collect::<Vec<_>>(),
        "name": "finish \u{2603}"});
    let plan_canonical = canonical_json(&plan);
    assert!(gcode.len() > 1_500_000 && plan_canonical.len() > 1_500_000);
    let run = "run_00000000ad01";
    let create = json!({"mode": "cam", "tool_id": "T7", "status": "OK", "run_id": run,
                        "outputs": {"gcode_text": gcode, "opplan_json": plan}});
    let file = write_json(tmp.path(), "both.json", &create);
    let ev = cli_ok(&url, &["create", "--file", &file, "--json"]);
    assert_eq!(ev["event"], "created", "{ev}");
    let out = cli(&url, &["get", run, "--output", "opplan"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == plan_canonical, "op plan differs");
    let out = cli(&url, &["get", run, "--output", "gcode"]);
    assert!(out.stdout == gcode.as_bytes(), "G-code differs");
    let report = cli_ok(&url, &["verify", run, "--json"]);
    assert_eq!(report["ok"], true, "{report}");
    let a = cli_ok(&url, &["get", run]);
    assert_eq!(
        a["hashes"]["opplan_sha256"],
        rmos_runs::domain::hashing::sha256_json(&plan),
        "the op plan's hash is the one an inline plan gets"
    );

    // An advisory with a 3 MB body, written non-canonically: the CLI stages its canonical form.
    let text = advisory_body_text(40_000);
    assert!(text.len() > 3_000_000, "{}", text.len());
    let body: Value = serde_json::from_str(&text).unwrap();
    let canonical = canonical_json(&body);
    let adv = format!(
        r#"{{"run_id": "{run}", "advisory_id": "adv_00000000ad01", "kind": "explanation",
            "engine_id": "explainer", "body": {text}, "explanation_status": "READY"}}"#
    );
    let file = tmp.path().join("adv.json");
    std::fs::write(&file, &adv).unwrap();
    let ev = cli_ok(
        &url,
        &[
            "attach-advisory",
            "--file",
            &file.display().to_string(),
            "--json",
        ],
    );
    assert_eq!(ev["event"], "advisory_attached", "{ev}");
    let a = cli_ok(&url, &["get", run]);
    let stored = &a["advisory_inputs"][0]["body"];
    let sha = sha256(&canonical);
    assert_eq!(stored["sha256"], sha.as_str(), "{a}");
    assert_eq!(stored["size_bytes"], canonical.len() as u64);
    // Back identical: the canonical bytes, the same value.
    let got = http
        .get(format!(
            "{base}/api/rmos/runs/{run}/advisories/adv_00000000ad01"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    let got = got.bytes().await.unwrap();
    assert!(got[..] == canonical[..], "advisory body differs");
    // The same value (numbers compare as JCS reads them: `2e3` and `2000` are one number).
    let back: Value = serde_json::from_slice(&got).unwrap();
    assert!(canonical_json(&back) == canonical, "not the same value");
    let report = cli_ok(&url, &["verify", run, "--json"]);
    assert_eq!(report["ok"], true, "{report}");
    // The staged objects were removed once stored.
    let bucket = js.get_object_store(BUCKET).await.unwrap();
    for sha in [
        sha.clone(),
        sha256(&plan_canonical),
        sha256(gcode.as_bytes()),
    ] {
        match bucket.info(format!("in/{sha}")).await {
            Err(e) if e.kind() == InfoErrorKind::NotFound => {}
            Ok(info) if info.deleted => {}
            other => panic!("staged object in/{sha} still there: {other:?}"),
        }
    }

    // A tampered staged body (still canonical JSON) is rejected naming the hash.
    let tampered = String::from_utf8(canonical.clone())
        .unwrap()
        .replacen("step 5:", "step 6:", 1);
    assert_ne!(tampered.as_bytes(), &canonical[..]);
    bucket
        .put("in/tampered-adv", &mut tampered.as_bytes())
        .await
        .unwrap();
    let claim = json!({"run_id": run, "advisory_id": "adv_00000000ad02", "kind": "note",
        "body_ref": {"bucket": BUCKET, "name": "in/tampered-adv", "sha256": sha,
                     "size_bytes": canonical.len()}});
    let file = write_json(tmp.path(), "tampered-adv.json", &claim);
    let out = cli(&url, &["attach-advisory", "--file", &file]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("invalid_request")
            && stderr.contains("body_ref")
            && stderr.contains("hash"),
        "{stderr}"
    );

    // A body staged as it was written (not canonical), under its own correct hash: rejected,
    // naming the canonical form and where it departs from it.
    bucket
        .put("in/pretty-adv", &mut text.as_bytes())
        .await
        .unwrap();
    let claim = json!({"run_id": run, "advisory_id": "adv_00000000ad03", "kind": "note",
        "body_ref": {"bucket": BUCKET, "name": "in/pretty-adv",
                     "sha256": sha256(text.as_bytes()), "size_bytes": text.len()}});
    let file = write_json(tmp.path(), "pretty-adv.json", &claim);
    let out = cli(&url, &["attach-advisory", "--file", &file]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("canonical") && stderr.contains("at byte"),
        "{stderr}"
    );
    // Both and neither of body / body_ref are refused.
    let both = json!({"run_id": run, "body": {}, "body_ref": claim["body_ref"]});
    let file = write_json(tmp.path(), "both-adv.json", &both);
    let out = cli(&url, &["attach-advisory", "--file", &file]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not both"));
    // Nothing of the rejected ones was attached.
    let a = cli_ok(&url, &["get", run]);
    assert_eq!(a["advisory_inputs"].as_array().unwrap().len(), 1, "{a}");

    // Counted: three bodies claimed (G-code, op plan, advisory), two rejected.
    let claimed = |body: &str| format!(r#"rmos_claims_total{{body="{body}",outcome="claimed"}}"#);
    assert_eq!(metric(port, &claimed("gcode")).await, 1.0);
    assert_eq!(metric(port, &claimed("opplan")).await, 1.0);
    assert_eq!(metric(port, &claimed("advisory")).await, 1.0);
    assert_eq!(
        metric(
            port,
            r#"rmos_claims_total{body="advisory",outcome="rejected"}"#
        )
        .await,
        2.0
    );
    assert_eq!(
        metric(port, r#"rmos_claimed_bytes_total{body="advisory"}"#).await,
        canonical.len() as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_creates_and_advisories_over_max_payload_are_staged_by_the_worker() {
    let nats = ConfiguredNatsServer::start(BROKER, &[], &[]).await;
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    std::fs::create_dir(&runs).unwrap();
    let port = support::free_port();
    let config = tmp.path().join("w.toml");
    // 6 MB: over the broker's 1 MB, under what this test sends as too large.
    std::fs::write(&config, "[http]\nmax_body_bytes = 6000000\n").unwrap();
    let env = [
        ("RMOS_HTTP_ADDR".to_owned(), format!("127.0.0.1:{port}")),
        ("RMOS_CONFIG".to_owned(), config.display().to_string()),
    ];
    let worker = Worker::start_at(&nats.url(), &runs, "h", &env).await;
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");

    let gcode = program(80_000);
    assert!(gcode.len() > 3_000_000);
    let run = "run_00000000ab01";
    let create = json!({"mode": "cam", "tool_id": "T7", "status": "OK", "run_id": run,
                        "outputs": {"gcode_text": gcode}});
    let (status, a) = post(
        &http,
        format!("{base}/api/rmos/runs"),
        serde_json::to_vec(&create).unwrap(),
    )
    .await;
    assert_eq!(status, 201, "{a}; log:\n{}", worker.log());
    assert_eq!(
        a["outputs"]["gcode_blob"]["sha256"],
        sha256(gcode.as_bytes())
    );
    let got = http
        .get(format!("{base}/api/rmos/runs/{run}/outputs/gcode"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(got[..] == *gcode.as_bytes(), "G-code differs");

    // An advisory with a 2 MB body, to the run in the path.
    let text = advisory_body_text(20_000);
    let body: Value = serde_json::from_str(&text).unwrap();
    let (status, a) = post(
        &http,
        format!("{base}/api/rmos/runs/{run}/advisory"),
        format!(r#"{{"advisory_id": "adv_00000000ab01", "kind": "note", "body": {text}}}"#),
    )
    .await;
    assert_eq!(status, 200, "{a}");
    assert_eq!(
        a["advisory_inputs"][0]["body"]["sha256"],
        sha256(&canonical_json(&body))
    );
    let got = http
        .get(format!(
            "{base}/api/rmos/runs/{run}/advisories/adv_00000000ab01"
        ))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(
        got[..] == canonical_json(&body)[..],
        "advisory body differs"
    );

    // Over the HTTP limit: 413 naming it (the body is not read to its end).
    let huge = json!({"mode": "cam", "tool_id": "T7", "status": "OK",
                      "outputs": {"gcode_text": "G1 X1\n".repeat(1_200_000)}});
    let (status, e) = post(
        &http,
        format!("{base}/api/rmos/runs"),
        serde_json::to_vec(&huge).unwrap(),
    )
    .await;
    assert_eq!(status, 413, "{e}");
    assert_eq!(e["error"]["code"], "too_large");
    let m = e["error"]["message"].as_str().unwrap();
    assert!(
        m.contains("6000000") && m.contains("http.max_body_bytes"),
        "{m}"
    );
    // Bad JSON in a large body is 400 naming why, not 413 or 500.
    let (status, e) = post(
        &http,
        format!("{base}/api/rmos/runs"),
        format!("{{\"mode\": \"cam\", \"x\": \"{}", "a".repeat(2_000_000)),
    )
    .await;
    assert_eq!(status, 400, "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("JSON"),
        "{e}"
    );
    // A command whose other parts alone are over one message cannot be staged: 413.
    let meta = json!({"mode": "cam", "tool_id": "T7", "status": "OK",
                      "meta": {"notes": "n".repeat(1_100_000)}});
    let (status, e) = post(
        &http,
        format!("{base}/api/rmos/runs"),
        serde_json::to_vec(&meta).unwrap(),
    )
    .await;
    assert_eq!(status, 413, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("without its staged bodies"),
        "{e}"
    );
}

/// A 50 MB program through the CLI on a broker with the default 1 MB `max_payload`, on the
/// store `s3` names (the local filesystem, or the S3 test server): stored, read back byte for
/// byte through `get --output gcode`, and `verify` passes (its blob hashed as it streams).
async fn fifty_mb_program_round_trip(s3: bool) {
    let nats = ConfiguredNatsServer::start(BROKER, &[], &[]).await;
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    std::fs::create_dir(&runs).unwrap();
    let mut vars = Vec::new();
    if s3 {
        let server = support::S3Server::shared();
        let bucket = support::unique_bucket();
        server.create_bucket(&bucket).await;
        vars = server.env_for(&bucket);
        vars.push(("RMOS_STORE_URL".into(), format!("s3://{bucket}/runs")));
    }
    let worker = Worker::start_at(&nats.url(), &runs, "fifty", &vars).await;

    let gcode = program(1_350_000);
    assert!(gcode.len() > 50_000_000, "{} bytes", gcode.len());
    let run = "run_00000000b50a";
    let create = json!({"mode": "cam", "tool_id": "T7", "status": "OK", "run_id": run,
                        "outputs": {"gcode_text": gcode}});
    let file = write_json(tmp.path(), "fifty.json", &create);
    let out = cli(&nats.url(), &["create", "--file", &file, "--json"]);
    assert!(
        out.status.success(),
        "create: {}; worker log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        worker.log()
    );
    let ev: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ev["event"], "created", "{ev}");

    let out = cli(&nats.url(), &["get", run, "--output", "gcode"]);
    assert!(
        out.status.success(),
        "get --output: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len(), gcode.len());
    assert!(out.stdout == gcode.as_bytes(), "G-code differs");

    let out = cli(&nats.url(), &["verify", run, "--json"]);
    assert!(out.status.success(), "{out:?}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], true, "{report}");
    let sha = sha256(gcode.as_bytes());
    assert!(
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == format!("blob:{sha}") && c["status"] == "ok"),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50mb_program_through_the_cli_on_the_local_store() {
    fifty_mb_program_round_trip(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50mb_program_through_the_cli_on_s3() {
    fifty_mb_program_round_trip(true).await;
}
