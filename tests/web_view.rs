//! The web view in a real browser: a worker (real broker, HTTP on a free port) holds runs
//! created over NATS; `tests/browser/web_view.mjs` drives Debian's headless chromium through
//! playwright-core (both installed by `make deps`): the table lists the runs, a filter chosen
//! in the form narrows it, pages of two walk the cursor, a click opens a run (risk badge, advisory text), the G-code view
//! draws a program whose extent and lengths are known here, and the history shows a diff.
//! Screenshots are left in `target/test-output/web_view/`.

mod support;

use std::f64::consts::PI;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::worker::{EVENT_TIMEOUT, Env, Events, Worker, bytes_of, rid};

/// A rectangle with a half circle on top and a full circle beside it. By hand, starting at
/// X0 Y0 Z0 (see the parsing rules in app.js):
/// - X: 0 (the start) to 100 (the circle around X90 Y25, radius 10, reaches X100);
/// - Y: 0 (the start) to 65 (the half circle around X35 Y40, radius 25, tops out at Y65,
///   which is no end point of any move: the extent must come from the arc itself);
/// - cut: plunge 6 + 50 + 30 + half circle 25π + 30 + plunge 6 + full circle 20π = 122 + 45π;
/// - rapid: 5 + √(10²+10²) + 6 + √(70²+15²) + 6 + √(80²+25²);
/// - 13 moves (6 rapid, 7 cutting).
const PROGRAM: &str = "%
(web view test: rectangle, half circle, circle)
G21 G90 G17
G0 Z5
G0 X10 Y10
G1 Z-1 F300
G1 X60
G1 Y40
G3 X10 Y40 I-25 J0 ; half circle over the rectangle
G1 Y10
G0 Z5
G0 X80 Y25
G1 Z-1
G2 X80 Y25 I10 J0 ; full circle
G0 Z5
G0 X0 Y0
M30
%
";

const KNOWN: &str = "run_a1b2c3d4e5f6";
const RED: &str = "run_bad0bad0bad0";
const GREEN: &str = "run_600d600d600d";
const ADVICE: &str = "Feed rate reduced from 2400 to 1800 mm/min on the arcs: the chipload at full feed exceeds the limit for maple.";

fn out_dir() -> PathBuf {
    // target/tmp's parent is the target directory, wherever CARGO_TARGET_DIR puts it.
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("test-output")
        .join("web_view")
}

/// The browser and playwright-core must be there (`make deps`); the test fails, naming the
/// fix, rather than skipping.
fn prerequisites() -> PathBuf {
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "/usr/bin/chromium is missing: run `make deps` as root, or \
         `apt-get install --no-install-recommends chromium`"
    );
    let dir = support::repo_root().join("tests/browser");
    assert!(
        dir.join("node_modules/playwright-core/package.json")
            .exists(),
        "playwright-core is not installed in tests/browser/node_modules: run `make deps`"
    );
    dir
}

fn create(run_id: &str, tool: &str, status: &str, risk: &str, warnings: &[&str]) -> Value {
    json!({
        "run_id": run_id, "mode": "cam", "tool_id": tool, "status": status,
        "request_summary": {"material": "maple", "thickness_mm": 18},
        "feasibility": {"ok": status == "OK", "max_depth_mm": 1.0},
        "decision": {"risk_level": risk, "score": 71.5, "warnings": warnings,
                     "details": {"engine": "feasibility-3", "max_chipload_mm": 0.12}},
        "outputs": {"gcode_text": PROGRAM, "opplan_json": {"ops": ["profile", "circle"]}},
        "meta": {}
    })
}

/// Publishes a command and waits until the worker stored it.
async fn stored(env: &Env, events: &Events, worker: &Worker, kind: &str, payload: &Value) {
    let id = rid(kind);
    env.publish(kind, &id, bytes_of(payload)).await;
    let e = events.one(&id, EVENT_TIMEOUT, worker).await;
    assert_eq!(e.kind, "stored", "{kind} {payload}: {}", e.body);
}

async fn wait_http(port: u16, worker: &Worker) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "HTTP not listening on {port}; worker log:\n{}",
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn num(obs: &Value, path: &str) -> f64 {
    obs.pointer(path)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("no number at {path} in {obs}"))
}

fn assert_near(got: f64, want: f64, what: &str) {
    assert!(
        (got - want).abs() <= 1e-6,
        "{what}: the page shows {got}, the program's is {want}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_view_in_chromium() {
    support::init_tracing();
    let browser_dir = prerequisites();
    let env = Env::new().await;
    let port = support::free_port();
    let addr = format!("127.0.0.1:{port}");
    let worker = Worker::start_with(
        &env.nats,
        &env.runs_dir(),
        "web",
        &[("RMOS_HTTP_ADDR".to_owned(), addr.clone())],
    )
    .await;
    wait_http(port, &worker).await;
    let events = env.events().await;

    // Oldest first, so the known run is the newest.
    stored(
        &env,
        &events,
        &worker,
        "create",
        &create(GREEN, "T7", "OK", "GREEN", &[]),
    )
    .await;
    let red = create(
        RED,
        "T102",
        "BLOCKED",
        "RED",
        &["Tool deflection above limit"],
    );
    stored(&env, &events, &worker, "create", &red).await;
    let known = create(
        KNOWN,
        "T102",
        "OK",
        "YELLOW",
        &["Feed rate reduced on tight arcs"],
    );
    stored(&env, &events, &worker, "create", &known).await;
    let patch = json!({"run_id": KNOWN, "meta_updates": {"operator": "alice", "verified": true}});
    stored(&env, &events, &worker, "patch_meta", &patch).await;
    let advisory = json!({
        "run_id": KNOWN, "advisory_id": "adv_0123456789ab", "kind": "explanation",
        "engine_id": "explainer", "engine_version": "2.1.0",
        "body": {"text": ADVICE, "confidence": 0.82},
        "explanation_status": "READY", "explanation_summary": "Feed rate reduced on the arcs"
    });
    stored(&env, &events, &worker, "advisory", &advisory).await;

    let (x_min, x_max, y_min, y_max) = (0.0, 100.0, 0.0, 65.0);
    let cut = 122.0 + 45.0 * PI;
    let rapid = 17.0 + 200f64.sqrt() + 5125f64.sqrt() + 7025f64.sqrt();
    let expectations = json!({
        "run_id": KNOWN,
        "filter": {"field": "risk_level", "value": "RED"},
        "filtered_in": [RED], "filtered_out": [KNOWN, GREEN],
        "risk_level": "YELLOW", "advisory_text": ADVICE,
        "extent": {"x_min": x_min, "x_max": x_max, "y_min": y_min, "y_max": y_max},
        "cut_length": cut, "rapid_length": rapid, "moves": 13, "tolerance": 1e-6,
        "min_revisions": 3, "page_size": 2
    });

    let out = out_dir();
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).expect("create the screenshot directory");
    let mut child = Command::new("node")
        .arg(browser_dir.join("web_view.mjs"))
        .arg(format!("http://{addr}"))
        .arg(&out)
        .arg(expectations.to_string())
        .current_dir(&browser_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run node (Node.js 20 or later is needed: `make deps` checks it)");
    // The script bounds each of its waits; this only stops a browser that hangs outright.
    let deadline = Instant::now() + Duration::from_secs(300);
    while child.try_wait().expect("wait for node").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "web_view.mjs still running after 300 s; worker log:\n{}",
                worker.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let output = child.wait_with_output().expect("node output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "web_view.mjs failed ({}): {stderr}\nobservations: {stdout}\nscreenshots: {}\nworker log:\n{}",
        output.status,
        out.display(),
        worker.log()
    );
    let obs: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("web_view.mjs printed no JSON ({e}): {stdout}\n{stderr}"));

    // The table: every run, newest first; the filter kept only the RED one.
    let listed: Vec<&str> = obs["listed"]
        .as_array()
        .expect("listed")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(listed, [KNOWN, RED, GREEN], "{obs}");
    assert_eq!(
        obs["paging"]["pages"],
        json!([[KNOWN, RED], [GREEN]]),
        "{obs}"
    );
    assert_eq!(obs["filtered"]["listed"], json!([RED]), "{obs}");
    assert_eq!(obs["filtered"]["hash"], "#/?risk_level=RED", "{obs}");

    // The run page.
    assert_eq!(obs["run"]["risk_level"], "YELLOW", "{obs}");
    assert_eq!(
        obs["run"]["warnings"],
        json!(["Feed rate reduced on tight arcs"])
    );
    assert_eq!(obs["run"]["advisory_texts"], json!([ADVICE]), "{obs}");
    let checks = obs["run"]["hash_checks"].as_object().expect("hash checks");
    for name in ["feasibility_sha256", "gcode_sha256", "opplan_sha256"] {
        assert_eq!(checks.get(name), Some(&json!("ok")), "{name}: {obs}");
    }

    // The G-code view: the drawing's extent and lengths are the program's.
    assert_near(num(&obs, "/gcode/x_min"), x_min, "x_min");
    assert_near(num(&obs, "/gcode/x_max"), x_max, "x_max");
    assert_near(num(&obs, "/gcode/y_min"), y_min, "y_min");
    assert_near(num(&obs, "/gcode/y_max"), y_max, "y_max");
    assert_near(num(&obs, "/gcode/z_min"), -1.0, "z_min");
    assert_near(num(&obs, "/gcode/z_max"), 5.0, "z_max");
    assert_near(num(&obs, "/gcode/cut_length"), cut, "cut length");
    assert_near(num(&obs, "/gcode/rapid_length"), rapid, "rapid length");
    assert_eq!(obs["gcode"]["moves"], json!(13), "{obs}");
    assert_eq!(obs["gcode"]["units"], "mm", "{obs}");
    assert!(num(&obs, "/gcode/painted/cut_pixels") > 50.0, "{obs}");
    assert!(num(&obs, "/gcode/painted/rapid_pixels") > 10.0, "{obs}");

    // History: created, patched, advisory; the diff from the first to the last shows the patch.
    let events_seen: Vec<&str> = obs["history"]["revisions"]
        .as_array()
        .expect("revisions")
        .iter()
        .filter_map(|r| r["event"].as_str())
        .collect();
    assert_eq!(
        events_seen,
        ["created", "meta_patched", "advisory_attached"],
        "{obs}"
    );
    let paths: Vec<&str> = obs["history"]["diff"]["paths"]
        .as_array()
        .expect("diff paths")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for p in ["/meta/operator", "/meta/verified", "/explanation_status"] {
        assert!(paths.contains(&p), "diff 1 → 3 lacks {p}: {paths:?}");
    }

    // An unknown run shows the API's error.
    assert!(
        obs["error_state"]
            .as_str()
            .is_some_and(|s| s.contains("not_found")),
        "{obs}"
    );
    // The screenshots are there, as PNG.
    for name in [
        "01-runs",
        "02-filtered",
        "03-run",
        "04-gcode",
        "05-history",
        "06-error",
    ] {
        let bytes = std::fs::read(out.join(format!("{name}.png")))
            .unwrap_or_else(|e| panic!("screenshot {name}: {e}"));
        assert!(bytes.starts_with(b"\x89PNG"), "{name}.png is not a PNG");
    }
    println!("screenshots in {}", out.display());
}
