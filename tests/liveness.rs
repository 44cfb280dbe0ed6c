//! A worker that knows when it has stopped working, over a real broker and a real worker
//! process: each supervised task (ingest, requests, retention) is made to die through the
//! test-only fault hook (`RMOS_TEST_FAULTS=1`, see `src/supervisor.rs`), which must fail
//! `/readyz` at once, restart the task and keep the worker useful; a task that keeps dying
//! stops the process non-zero; a stalled consumer fails `/readyz`; and a broker that loses
//! the stream and the consumer (deleted through the JetStream API, or its store wiped under
//! a running worker) gets them back from the worker, which then stores the next create (and
//! re-creates the staging bucket, so a claim-checked create works too).

mod support;

use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use serde_json::Value;
use support::worker::*;
use support::{ensure, eventually, http, scrape};

/// A worker with the fault hook and the metrics endpoint on `port`, configured by `toml`.
async fn worker(env: &Env, name: &str, port: u16, toml: &str) -> Worker {
    let config = env.tmp.path().join(format!("{name}.toml"));
    std::fs::write(&config, toml).expect("write config");
    let vars = [
        ("RMOS_CONFIG".to_owned(), config.display().to_string()),
        ("RMOS_METRICS_ADDR".to_owned(), format!("127.0.0.1:{port}")),
        ("RMOS_TEST_FAULTS".to_owned(), "1".to_owned()),
    ];
    Worker::start_with(&env.nats, &env.runs_dir(), name, &vars).await
}

/// Stages `<fault> <task>` in the worker through the hook.
async fn stage(env: &Env, fault: &str) {
    let reply = env
        .client
        .request(format!("{PREFIX}._test.fault"), fault.to_owned().into())
        .await
        .expect("fault hook answers (is RMOS_TEST_FAULTS=1 set?)");
    assert_eq!(&reply.payload[..], b"ok", "{fault}");
}

async fn ready(port: u16, worker: &Worker) {
    eventually(Duration::from_secs(30), async || {
        let (status, body) = http(port, "GET", "/readyz").await;
        ensure(status == 200, || {
            format!("/readyz {status}: {body}; log:\n{}", worker.log())
        })
    })
    .await;
}

/// Waits until `/readyz` fails with a line starting with `prefix`; returns the body.
async fn not_ready(port: u16, prefix: &str, within: Duration) -> String {
    let mut last = String::new();
    eventually(within, async || {
        let (status, body) = http(port, "GET", "/readyz").await;
        last = body.clone();
        ensure(
            status == 503 && body.lines().any(|l| l.starts_with(prefix)),
            || format!("/readyz {status} without a line {prefix:?}: {body}"),
        )
    })
    .await;
    last
}

fn series(m: &std::collections::HashMap<String, f64>, s: &str) -> f64 {
    m.get(s).copied().unwrap_or_else(|| panic!("{s} missing"))
}

/// Publishes a create through JetStream, retrying until the stream is there to PubAck it.
async fn publish_until_acked(env: &Env, rid: &str, run_id: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let mut h = HeaderMap::new();
        h.insert("X-Request-Id", rid);
        let body = bytes_of(&create_payload(Some(run_id), "T1"));
        let acked = match env
            .js
            .publish_with_headers(format!("{PREFIX}.create"), h, body)
            .await
        {
            Ok(ack) => ack.await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match acked {
            Ok(_) => return,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "no PubAck within {within:?}: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_task_that_dies_fails_readiness_and_is_restarted() {
    let env = Env::new().await;
    let port = support::free_port();
    let w = worker(&env, "tasks", port, "retention = \"1h\"\n").await;
    let events = env.events().await;
    ready(port, &w).await;

    let cases = [
        ("panic ingest", "task ingest: panicked"),
        ("end requests", "task requests: ended"),
        ("panic retention", "task retention: panicked"),
        ("end ingest", "task ingest: ended"),
    ];
    for (i, (fault, line)) in cases.iter().enumerate() {
        stage(&env, fault).await;
        // Noticed at once: the first restart waits at least a second, and /readyz says so
        // within that second.
        let body = not_ready(port, line, Duration::from_secs(1)).await;
        assert!(body.contains("restarting in"), "{body}");
        ready(port, &w).await;

        // The restarted task works: a create is stored, a get answered.
        let run_id = format!("run_00000000a1{i:02x}");
        let r = rid(&format!("after-{i}"));
        env.publish("create", &r, bytes_of(&create_payload(Some(&run_id), "T1")))
            .await;
        assert_eq!(events.one(&r, EVENT_TIMEOUT, &w).await.kind, "stored");
        assert_eq!(env.get_ok(&run_id).await["revision"], 1);
    }
    let m = scrape(port).await;
    assert_eq!(
        series(&m, r#"rmos_task_restarts_total{task="ingest"}"#),
        2.0
    );
    assert_eq!(
        series(&m, r#"rmos_task_restarts_total{task="requests"}"#),
        1.0
    );
    assert_eq!(
        series(&m, r#"rmos_task_restarts_total{task="retention"}"#),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_keeps_dying_stops_the_worker_non_zero() {
    let env = Env::new().await;
    let port = support::free_port();
    let mut w = worker(&env, "gives-up", port, "task_restarts = 2\n").await;
    ready(port, &w).await;
    stage(&env, "panic requests").await;
    not_ready(port, "task requests: panicked", Duration::from_secs(1)).await;
    ready(port, &w).await;
    stage(&env, "panic requests").await;
    let status = w.wait(Duration::from_secs(30)).await;
    assert!(!status.success(), "{status}; log:\n{}", w.log());
    assert!(
        w.log()
            .contains("task requests failed 2 times in a row; last: panicked"),
        "the reason is logged:\n{}",
        w.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_consumer_fails_readiness() {
    let env = Env::new().await;
    let port = support::free_port();
    let w = worker(&env, "stall", port, "stall_after = \"2s\"\n").await;
    ready(port, &w).await;
    // Ingest stops consuming without ending: the supervisor cannot see it, /readyz must.
    stage(&env, "hang ingest").await;
    env.publish(
        "create",
        &rid("stuck"),
        bytes_of(&create_payload(Some("run_0000000057a1"), "T1")),
    )
    .await;
    let body = not_ready(
        port,
        "ingest: nothing consumed for",
        Duration::from_secs(20),
    )
    .await;
    assert!(
        !body.contains("task ingest"),
        "a hang is not an ended task: {body}"
    );
    assert!(env.consumer_info().await.num_pending >= 1);
    // Idle with nothing waiting is not a stall.
    let (status, body) = http(port, "GET", "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_is_ready() {
    let env = Env::new().await;
    let port = support::free_port();
    let w = worker(&env, "idle", port, "stall_after = \"1s\"\n").await;
    ready(port, &w).await;
    // Well past stall_after with nothing to consume: still ready.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        let (status, body) = http(port, "GET", "/readyz").await;
        assert_eq!(status, 200, "{body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `nats stream rm` under a running worker: the worker notices, re-creates the stream and
/// the consumer, says so, and the next create is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_stream_is_recreated_and_consumed() {
    let env = Env::new().await;
    let port = support::free_port();
    let w = worker(&env, "stream-rm", port, "").await;
    let events = env.events().await;
    let r = rid("before");
    env.publish(
        "create",
        &r,
        bytes_of(&create_payload(Some("run_0000000d0001"), "T1")),
    )
    .await;
    assert_eq!(events.one(&r, EVENT_TIMEOUT, &w).await.kind, "stored");

    assert!(
        env.js
            .delete_stream("RMOS_RUNS")
            .await
            .expect("delete")
            .success
    );
    let r = rid("after");
    publish_until_acked(&env, &r, "run_0000000d0002", Duration::from_secs(30)).await;
    assert_eq!(events.one(&r, EVENT_TIMEOUT, &w).await.kind, "stored");
    assert_eq!(env.get_ok("run_0000000d0002").await["revision"], 1);
    let m = scrape(port).await;
    assert!(series(&m, "rmos_broker_state_recreated_total") >= 1.0);
    assert!(
        w.log().contains("re-created them as at start-up"),
        "a warning says so:\n{}",
        w.log()
    );
    ready(port, &w).await;
}

/// The broker's store is wiped under a running worker (stopped, store dir removed, restarted
/// on the same port): the worker re-creates what it needs and the next create is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_broker_store_is_recreated_and_consumed() {
    let mut env = Env::new().await;
    let port = support::free_port();
    let w = worker(&env, "wiped", port, "").await;
    let events = env.events().await;
    let r = rid("before");
    env.publish(
        "create",
        &r,
        bytes_of(&create_payload(Some("run_0000000e0001"), "T1")),
    )
    .await;
    assert_eq!(events.one(&r, EVENT_TIMEOUT, &w).await.kind, "stored");

    env.nats.stop().await;
    let store = env.nats.store_dir();
    std::fs::remove_dir_all(&store).expect("wipe the broker's store");
    std::fs::create_dir(&store).expect("empty store dir");
    env.nats.restart().await;

    let r = rid("after");
    publish_until_acked(&env, &r, "run_0000000e0002", Duration::from_secs(60)).await;
    assert_eq!(events.one(&r, EVENT_TIMEOUT, &w).await.kind, "stored");
    let m = scrape(port).await;
    assert!(series(&m, "rmos_broker_state_recreated_total") >= 1.0);
    let stored: Value = env.get_ok("run_0000000e0002").await;
    assert_eq!(stored["revision"], 1);
    ready(port, &w).await;

    // The staging bucket (a stream of the same broker) was lost too, and is back: a create
    // too large for one message goes in by claim check, as a publisher's CLI sends it.
    let max = env.client.server_info().max_payload;
    let gcode = "G1 X1.000 Y2.000 Z-0.500 F1800\n".repeat(max / 16);
    let mut create = create_payload(Some("run_0000000e0003"), "T1");
    create["outputs"] = serde_json::json!({"gcode_text": gcode});
    let payload = rmos_runs::transport::claim_check::stage_large_payload(
        &env.js,
        "rmos-runs-staging",
        rmos_runs::domain::command::CommandKind::Create,
        serde_json::to_vec(&create).unwrap(),
        max,
    )
    .await
    .expect("the worker re-created the staging bucket");
    let sent: Value = serde_json::from_slice(&payload).unwrap();
    assert!(sent["outputs"]["gcode_ref"].is_object(), "staged: {sent}");
    let r = rid("claimed");
    env.publish("create", &r, payload).await;
    assert_eq!(events.one(&r, EVENT_TIMEOUT, &w).await.kind, "stored");
    let stored: Value = env.get_ok("run_0000000e0003").await;
    assert_eq!(
        stored["outputs"]["gcode_blob"]["size_bytes"],
        gcode.len() as u64
    );
    assert!(
        w.log()
            .contains("the broker lost the staging bucket; re-created it"),
        "a warning says so:\n{}",
        w.log()
    );
}

/// The background scrub (`scrub_rate`) finds a run edited on disk behind the worker's back and
/// one whose record no longer decodes: the error log names the edited one with its reason,
/// `rmos_scrub_broken_runs` counts both, and after the edits are undone the next pass counts
/// none. The scrub is supervised: made to panic, it is
/// restarted and goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_scrub_finds_a_tampered_run() {
    let env = Env::new().await;
    let port = support::free_port();
    let w = worker(
        &env,
        "scrub",
        port,
        "scrub_rate = 200.0\nscrub_every = \"200ms\"\n",
    )
    .await;
    let events = env.events().await;
    ready(port, &w).await;
    let ids: Vec<String> = (0..5).map(|i| format!("run_00000000b0{i:02x}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let r = rid(&format!("scrub-{i}"));
        env.publish("create", &r, bytes_of(&create_payload(Some(id), "T1")))
            .await;
        assert_eq!(events.one(&r, EVENT_TIMEOUT, &w).await.kind, "stored");
    }
    // Passes over five sound runs find nothing broken.
    eventually(Duration::from_secs(30), async || {
        let m = scrape(port).await;
        ensure(
            series(&m, "rmos_scrub_passes_total") >= 2.0
                && series(&m, "rmos_scrub_runs_checked_total") >= 10.0,
            || format!("scrub has not made two passes: {m:?}"),
        )
    })
    .await;
    let m = scrape(port).await;
    assert_eq!(series(&m, "rmos_scrub_broken_runs"), 0.0);
    assert_eq!(series(&m, "rmos_scrub_runs_failed_total"), 0.0);

    // Run 2's record edited on disk (a meta value; its stored hashes left as they were).
    let path = env.runs_dir().join(format!("{}.json", ids[2]));
    let original = std::fs::read(&path).expect("read record");
    let mut v: Value = serde_json::from_slice(&original).expect("record is JSON");
    v["meta"]["edited"] = "behind the worker's back".into();
    std::fs::write(&path, serde_json::to_vec_pretty(&v).expect("encode")).expect("write");
    // Run 4's record made unreadable: a finding too, not an outage.
    let garbled = env.runs_dir().join(format!("{}.json", ids[4]));
    let garbled_original = std::fs::read(&garbled).expect("read record");
    std::fs::write(&garbled, b"{\"not a record").expect("write");
    eventually(Duration::from_secs(30), async || {
        let m = scrape(port).await;
        ensure(series(&m, "rmos_scrub_broken_runs") == 2.0, || {
            format!("the scrub has not counted the two runs: {m:?}")
        })
    })
    .await;
    let log = w.log();
    let line = log
        .lines()
        .find(|l| l.contains("scrub: run fails verification") && l.contains(ids[2].as_str()))
        .unwrap_or_else(|| panic!("no error line names {}:\n{log}", ids[2]));
    assert!(line.contains("content_changed"), "{line}");

    // Supervised: a panic restarts it, and it keeps scrubbing.
    stage(&env, "panic scrub").await;
    not_ready(port, "task scrub: panicked", Duration::from_secs(1)).await;
    ready(port, &w).await;
    let before = series(&scrape(port).await, "rmos_scrub_runs_checked_total");

    // Undone: the next complete pass finds nothing broken.
    std::fs::write(&path, &original).expect("restore the record");
    std::fs::write(&garbled, &garbled_original).expect("restore the record");
    eventually(Duration::from_secs(30), async || {
        let m = scrape(port).await;
        ensure(
            series(&m, "rmos_scrub_broken_runs") == 0.0
                && series(&m, "rmos_scrub_runs_checked_total") > before + 5.0,
            || format!("the scrub still counts a broken run: {m:?}"),
        )
    })
    .await;
    assert_eq!(
        series(
            &scrape(port).await,
            r#"rmos_task_restarts_total{task="scrub"}"#
        ),
        1.0
    );
}

/// A broker that cannot place the worker's replicated streams yet (a cluster still forming;
/// here R3 on a single node, which never can) does not stop the worker at once: it retries
/// the set-up, saying why each time, until the next attempt would start after
/// `connect_timeout`, then exits non-zero with the broker's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_setup_is_retried_until_connect_timeout() {
    let env = Env::new().await;
    let config = env.tmp.path().join("r3.toml");
    std::fs::write(&config, "stream_replicas = 3\nconnect_timeout = \"3s\"\n")
        .expect("write config");
    let vars = [("RMOS_CONFIG".to_owned(), config.display().to_string())];
    let started = Instant::now();
    let mut w = Worker::spawn(&env.nats.url(), &env.runs_dir(), "r3", &vars);
    let status = w.wait(Duration::from_secs(60)).await;
    let log = w.log();
    assert!(!status.success(), "{status}; log:\n{log}");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "gave up after {:?}, long before connect_timeout; log:\n{log}",
        started.elapsed()
    );
    let retries = log
        .lines()
        .filter(|l| l.contains("setting up the staging bucket on the broker failed; retrying"))
        .count();
    assert!(retries >= 3, "{retries} retries; log:\n{log}");
    assert!(log.contains("staging bucket"), "{log}");
}
