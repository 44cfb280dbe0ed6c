//! End-to-end tests of the `rmos-runs serve` worker as a real OS process, driven over NATS
//! (a real `nats-server -js`) with `async_nats` as the client: commands on the JetStream
//! stream, `stored` / `rejected` events, and the `get` / `list` / `verify` request-reply API.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use bytes::Bytes;
use serde_json::{Value, json};
use support::worker::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_get_list_verify() {
    let env = Env::new().await;
    let worker = env.worker("a").await;
    let events = env.events().await;

    let run_id = "run_0123456789ab";
    let r = rid("create");
    env.publish(
        "create",
        &r,
        bytes_of(&create_payload(Some(run_id), "T102")),
    )
    .await;
    let ev = events.one(&r, EVENT_TIMEOUT, &worker).await;
    assert_eq!(ev.kind, "stored", "{:?}", ev.body);
    assert_eq!(ev.body["event"], "created");
    assert_eq!(ev.body["run_id"], run_id);
    assert_eq!(ev.body["revision"], 1);
    assert_eq!(ev.body["request_id"], r.as_str());

    // get: plain-text id and JSON body.
    for body in [
        Bytes::from(run_id),
        bytes_of(&json!({"run_id": run_id})),
        bytes_of(&json!({"run_id": run_id, "include_outputs": true})),
    ] {
        let (status, a) = env.request("get", &rid("get"), body).await;
        assert_eq!(status, None, "{a}");
        assert_eq!(a["run_id"], run_id);
        assert_eq!(a["revision"], 1);
        assert_eq!(a["tool_id"], "T102");
        assert_eq!(a["status"], "OK");
        assert_eq!(a["meta"]["request_id"], r.as_str(), "{a}");
    }

    // list sees it.
    let (status, page) = env.request("list", &rid("list"), "{}").await;
    assert_eq!(status, None, "{page}");
    assert_eq!(page["runs"].as_array().unwrap().len(), 1, "{page}");
    assert_eq!(page["runs"][0]["run_id"], run_id);

    // verify: all ok.
    let (status, rep) = env
        .request(
            "verify",
            &rid("verify"),
            bytes_of(&json!({"run_id": run_id})),
        )
        .await;
    assert_eq!(status, None, "{rep}");
    assert_eq!(rep["ok"], true, "{rep}");

    // unknown run → 404 not_found.
    let r404 = rid("get404");
    let (status, body) = env.request("get", &r404, "run_ffffffffffff").await;
    assert_eq!(status.as_deref(), Some("404"), "{body}");
    assert_eq!(body["error"]["code"], "not_found", "{body}");
    assert_eq!(body["error"]["request_id"], r404.as_str(), "{body}");

    // malformed id → 400 invalid_request.
    for bad in [
        bytes_of(&json!({"run_id": "nope"})),
        Bytes::from_static(b"nope"),
        Bytes::from_static(b"{\"run_id\": \"run_0123456789ab\", \"extra\": 1}"),
    ] {
        let (status, body) = env.request("get", &rid("get400"), bad).await;
        assert_eq!(status.as_deref(), Some("400"), "{body}");
        assert_eq!(body["error"]["code"], "invalid_request", "{body}");
    }
    drop(worker);
}

/// Lists until the page says the index is complete (the field is left out when it is).
async fn wait_index_complete(env: &Env, worker: &Worker) {
    support::eventually(Duration::from_secs(60), async || {
        let (status, page) = env.request("list", &rid("list"), "{}").await;
        assert_eq!(status, None, "{page}");
        support::ensure(page.get("index_complete").is_none(), || {
            format!("index never complete; log:\n{}", worker.log())
        })
    })
    .await;
}

/// A worker on a new store marks the index complete without a warning; on a store that holds
/// runs but no complete index, it warns that listings are partial while it builds one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_build_warns_only_on_a_store_with_runs() {
    const WARNING: &str = "the listing index is incomplete";
    let env = Env::new().await;
    let worker = env.worker("new").await;
    wait_index_complete(&env, &worker).await;
    assert!(
        !worker.log().contains(WARNING),
        "a new store warned; log:\n{}",
        worker.log()
    );
    let events = env.events().await;
    let r = rid("create");
    env.publish("create", &r, bytes_of(&create_payload(None, "T1")))
        .await;
    assert_eq!(events.one(&r, EVENT_TIMEOUT, &worker).await.kind, "stored");
    drop(worker);

    // As a store written before the index existed: runs, no marker.
    std::fs::remove_file(env.runs_dir().join("index/_built")).expect("remove the marker");
    let worker = env.worker("old").await;
    wait_index_complete(&env, &worker).await;
    assert!(
        worker.log().contains(WARNING),
        "no warning while building; log:\n{}",
        worker.log()
    );
    let (_, page) = env.request("list", &rid("list"), "{}").await;
    assert_eq!(page["runs"].as_array().map(Vec::len), Some(1), "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_over_120_runs() {
    let env = Env::new().await;
    let worker = env.worker("a").await;
    let events = env.events().await;

    const N: usize = 120;
    let mut acks = Vec::new();
    let mut expected = HashSet::new();
    for i in 0..N {
        let run_id = format!("run_{:012x}", 0xa000 + i);
        let tool = if i % 3 == 0 { "T3" } else { "T1" };
        expected.insert(run_id.clone());
        let mut h = HeaderMap::new();
        h.insert("X-Request-Id", rid(&format!("c{i}")).as_str());
        acks.push(
            env.js
                .publish_with_headers(
                    format!("{PREFIX}.create"),
                    h,
                    bytes_of(&create_payload(Some(&run_id), tool)),
                )
                .await
                .expect("publish"),
        );
    }
    for ack in
        futures::future::join_all(acks.into_iter().map(std::future::IntoFuture::into_future)).await
    {
        ack.expect("PubAck");
    }
    events
        .stored(N, Duration::from_secs(60), || worker.log())
        .await;

    // Every order pages through all runs once: by id, newest first (the default) and oldest
    // first, which are exact reverses of each other.
    let mut walks: Vec<Vec<String>> = Vec::new();
    for order in ["id", "newest", "oldest"] {
        let mut seen = Vec::new();
        let mut cursor = Value::Null;
        let mut pages = 0;
        loop {
            let (status, page) = env
                .request(
                    "list",
                    &rid("list"),
                    bytes_of(&json!({"limit": 25, "cursor": cursor, "order": order})),
                )
                .await;
            assert_eq!(status, None, "{page}");
            let runs = page["runs"].as_array().unwrap();
            assert!(runs.len() <= 25, "{page}");
            seen.extend(
                runs.iter()
                    .map(|r| r["run_id"].as_str().unwrap().to_owned()),
            );
            pages += 1;
            assert!(pages <= 10, "too many pages");
            cursor = page["next_cursor"].clone();
            if cursor.is_null() {
                break;
            }
        }
        let distinct: HashSet<String> = seen.iter().cloned().collect();
        assert_eq!(seen.len(), N, "{order}: duplicates across pages");
        assert_eq!(distinct, expected, "{order}");
        walks.push(seen);
    }
    let mut sorted = walks[0].clone();
    sorted.sort();
    assert_eq!(walks[0], sorted, "order id is run id order");
    let mut reversed = walks[2].clone();
    reversed.reverse();
    assert_eq!(walks[1], reversed, "newest first is oldest first reversed");
    let (_, default) = env
        .request("list", &rid("list"), bytes_of(&json!({"limit": 5})))
        .await;
    let firsts: Vec<&str> = default["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["run_id"].as_str().unwrap())
        .collect();
    assert_eq!(firsts, walks[1][..5], "the default order is newest first");

    // Filter by tool: every third run is T3.
    let (status, page) = env
        .request(
            "list",
            &rid("list"),
            bytes_of(&json!({"limit": 1000, "tool_id": "T3"})),
        )
        .await;
    assert_eq!(status, None, "{page}");
    let runs = page["runs"].as_array().unwrap();
    assert_eq!(runs.len(), N / 3, "{page}");
    assert!(runs.iter().all(|r| r["tool_id"] == "T3"));
    assert!(page["next_cursor"].is_null());

    // A bad list query is a 400.
    let (status, body) = env
        .request("list", &rid("list"), bytes_of(&json!({"limit": 0})))
        .await;
    assert_eq!(status.as_deref(), Some("400"), "{body}");
    assert_eq!(body["error"]["code"], "invalid_request");
    // A page over the largest allowed is a 413 naming the limit.
    let (status, body) = env
        .request("list", &rid("list"), bytes_of(&json!({"limit": 5000})))
        .await;
    assert_eq!(status.as_deref(), Some("413"), "{body}");
    assert_eq!(body["error"]["code"], "too_large");
    // A body that is not UTF-8 is refused, not read as an empty query.
    let (status, body) = env
        .request(
            "list",
            &rid("list"),
            Bytes::from_static(b"{\"limit\": \xff}"),
        )
        .await;
    assert_eq!(status.as_deref(), Some("400"), "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("not UTF-8")),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_detects_flipped_byte() {
    let env = Env::new().await;
    let worker = env.worker("a").await;
    let events = env.events().await;

    let run_id = "run_00000000b10b";
    let gcode: String = (0..9000).map(|i| format!("G1 X{i} Y1\n")).collect();
    assert!(gcode.len() > 64 * 1024);
    let mut payload = create_payload(Some(run_id), "T102");
    payload["outputs"] = json!({"gcode_text": gcode});
    let r = rid("big");
    env.publish("create", &r, bytes_of(&payload)).await;
    let ev = events.one(&r, EVENT_TIMEOUT, &worker).await;
    assert_eq!(ev.kind, "stored", "{:?}", ev.body);

    let blobs = files_under(&env.runs_dir().join("blobs"));
    assert_eq!(blobs.len(), 1, "one blob expected: {blobs:?}");
    let blob = &blobs[0];
    assert_eq!(std::fs::metadata(blob).unwrap().len() as usize, gcode.len());

    let verify = || async {
        env.request(
            "verify",
            &rid("verify"),
            bytes_of(&json!({"run_id": run_id})),
        )
        .await
    };
    let (status, rep) = verify().await;
    assert_eq!(status, None, "{rep}");
    assert_eq!(rep["ok"], true, "{rep}");

    // Flip one byte of the blob on disk.
    let mut bytes = std::fs::read(blob).unwrap();
    bytes[1000] ^= 0x01;
    let mut perms = std::fs::metadata(blob).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(blob, perms).unwrap();
    std::fs::write(blob, &bytes).unwrap();

    let (status, rep) = verify().await;
    assert_eq!(status, None, "{rep}");
    assert_eq!(rep["ok"], false, "{rep}");
    let checks = rep["checks"].as_array().unwrap();
    assert!(
        checks.iter().any(|c| c["status"] == "mismatch"),
        "no mismatch check: {rep}"
    );
    assert!(
        checks
            .iter()
            .filter(|c| c["status"] != "ok")
            .all(|c| c["status"] == "mismatch"),
        "{rep}"
    );

    // get without outputs still works (refers to the blob), unknown verify is 404.
    let a = env.get_ok(run_id).await;
    assert!(
        a["outputs"]["gcode_text"].is_null(),
        "gcode should be a blob ref"
    );
    let (status, body) = env
        .request("verify", &rid("v404"), "run_ffffffffffff")
        .await;
    assert_eq!(status.as_deref(), Some("404"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_and_worker_keeps_serving() {
    let env = Env::new().await;
    let worker = env.worker("a").await;
    let events = env.events().await;

    // A run that exists, for the conflict cases.
    let existing = "run_0000000000e1";
    let r = rid("setup");
    env.publish(
        "create",
        &r,
        bytes_of(&create_payload(Some(existing), "T1")),
    )
    .await;
    assert_eq!(events.one(&r, EVENT_TIMEOUT, &worker).await.kind, "stored");

    // Published first: retried with backoff before its rejection (~15 s).
    let slow = rid("patch-unknown");
    env.publish(
        "patch_meta",
        &slow,
        bytes_of(&json!({"run_id": "run_00000000dead", "meta_updates": {"a": 1}})),
    )
    .await;

    let mut extra_field = create_payload(None, "T1");
    extra_field["colour"] = json!("red");
    let mut bad_status = create_payload(None, "T1");
    bad_status["status"] = json!("MAYBE");
    let mut bad_hash = create_payload(None, "T1");
    bad_hash["hashes"] = json!({"gcode_sha256": "0".repeat(64)});
    let cases: Vec<(&str, &str, Bytes, &str)> = vec![
        (
            "invalid-json",
            "create",
            Bytes::from_static(b"{not json"),
            "invalid_request",
        ),
        (
            "array",
            "create",
            Bytes::from_static(b"[1, 2, 3]"),
            "invalid_request",
        ),
        (
            "unknown-field",
            "create",
            bytes_of(&extra_field),
            "invalid_request",
        ),
        (
            "bad-run-id",
            "create",
            bytes_of(&create_payload(Some("run_NOTHEX"), "T1")),
            "invalid_request",
        ),
        (
            "bad-status",
            "create",
            bytes_of(&bad_status),
            "invalid_request",
        ),
        ("bad-hash", "create", bytes_of(&bad_hash), "invalid_request"),
        (
            "conflict",
            "create",
            bytes_of(&create_payload(Some(existing), "T2")),
            "conflict",
        ),
        (
            "stale-revision",
            "patch_meta",
            bytes_of(
                &json!({"run_id": existing, "meta_updates": {"x": 1}, "expected_revision": 7}),
            ),
            "conflict",
        ),
        (
            "delete-unknown",
            "delete",
            bytes_of(&json!({"run_id": "run_00000000beef", "reason": "test"})),
            "not_found",
        ),
    ];
    let mut rids = Vec::new();
    for (tag, kind, payload, code) in &cases {
        let r = rid(tag);
        env.publish(kind, &r, payload.clone()).await;
        rids.push((tag, r, *code));
    }
    for (tag, r, code) in &rids {
        let ev = events.one(r, EVENT_TIMEOUT, &worker).await;
        assert_eq!(ev.kind, "rejected", "{tag}: {:?}", ev.body);
        assert_eq!(ev.body["code"], *code, "{tag}: {:?}", ev.body);
        assert_eq!(ev.body["request_id"], r.as_str(), "{tag}");
        let dl = ev.body["dead_letter"].as_str().unwrap_or_default();
        assert!(!dl.is_empty(), "{tag}: no dead_letter in {:?}", ev.body);
    }

    // The worker still serves: a valid create succeeds, the run is unchanged by the rejects.
    let ok = rid("ok");
    env.publish(
        "create",
        &ok,
        bytes_of(&create_payload(Some("run_0000000000f2"), "T9")),
    )
    .await;
    let ev = events.one(&ok, EVENT_TIMEOUT, &worker).await;
    assert_eq!(ev.kind, "stored", "{:?}", ev.body);
    let a = env.get_ok(existing).await;
    assert_eq!(a["revision"], 1);
    assert_eq!(a["tool_id"], "T1");

    // The patch for an unknown run is rejected after its retries.
    let ev = events.one(&slow, Duration::from_secs(45), &worker).await;
    assert_eq!(ev.kind, "rejected", "{:?}", ev.body);
    assert_eq!(ev.body["code"], "not_found", "{:?}", ev.body);

    // One dead letter per rejected command, each holding its request id.
    let letters = files_under(&env.runs_dir().join("dead_letters"));
    assert_eq!(letters.len(), cases.len() + 1, "{letters:?}");
    let texts: Vec<String> = letters
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    for (tag, r, _) in &rids {
        assert!(
            texts.iter().any(|t| t.contains(r.as_str())),
            "{tag}: no dead letter mentions {r}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_create_is_not_stored_twice() {
    let env = Env::new().await;
    let worker = env.worker("a").await;
    let events = env.events().await;

    let payload = bytes_of(&create_payload(None, "T7"));
    let first = rid("first");
    env.publish("create", &first, payload.clone()).await;
    let e1 = events.one(&first, EVENT_TIMEOUT, &worker).await;
    assert_eq!(e1.kind, "stored", "{:?}", e1.body);
    assert_eq!(e1.body["changed"], true, "{:?}", e1.body);
    let second = rid("second");
    env.publish("create", &second, payload).await;
    let e2 = events.one(&second, EVENT_TIMEOUT, &worker).await;
    assert_eq!(e2.kind, "stored", "{:?}", e2.body);
    assert_eq!(e1.body["run_id"], e2.body["run_id"]);
    assert_eq!(e2.body["changed"], false, "{:?}", e2.body);
    assert_eq!(e2.body["revision"], 1);
    assert_eq!(env.run_files(), 1);
    let a = env.get_ok(e1.body["run_id"].as_str().unwrap()).await;
    assert_eq!(a["revision"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_concurrent_patches_all_apply() {
    let env = Env::new().await;
    let w1 = env.worker("a").await;
    let w2 = env.worker("b").await;
    let events = env.events().await;

    let run_id = "run_000000000c0c";
    let r = rid("create");
    env.publish("create", &r, bytes_of(&create_payload(Some(run_id), "T1")))
        .await;
    assert_eq!(events.one(&r, EVENT_TIMEOUT, &w1).await.kind, "stored");

    const TASKS: usize = 32;
    const PER_TASK: usize = 20;
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let js = env.js.clone();
        handles.push(tokio::spawn(async move {
            for i in 0..PER_TASK {
                let mut h = HeaderMap::new();
                h.insert("X-Request-Id", format!("patch-{t}-{i}").as_str());
                let body = json!({"run_id": run_id, "meta_updates": {format!("p{t}_{i}"): i}});
                js.publish_with_headers(format!("{PREFIX}.patch_meta"), h, bytes_of(&body))
                    .await
                    .expect("publish")
                    .await
                    .expect("PubAck");
            }
        }));
    }
    for h in handles {
        h.await.expect("publisher task");
    }
    let stored = events
        .stored(TASKS * PER_TASK + 1, Duration::from_secs(120), || {
            format!("--- a ---\n{}\n--- b ---\n{}", w1.log(), w2.log())
        })
        .await;
    let revisions: HashSet<u64> = stored
        .values()
        .map(|v| v["revision"].as_u64().unwrap())
        .collect();
    assert_eq!(
        revisions.len(),
        TASKS * PER_TASK + 1,
        "each change its own revision"
    );

    let a = env.get_ok(run_id).await;
    assert_eq!(a["revision"], (TASKS * PER_TASK + 1) as u64);
    let meta = a["meta"].as_object().unwrap();
    let missing: Vec<String> = (0..TASKS)
        .flat_map(|t| (0..PER_TASK).map(move |i| format!("p{t}_{i}")))
        .filter(|k| !meta.contains_key(k))
        .collect();
    assert!(missing.is_empty(), "lost patches: {missing:?}");

    // The history of those 32 publishers' patches, paged over NATS: every revision once, in
    // order, each patch's request id once, and the chain verifies end to end.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut q = json!({"run_id": run_id, "limit": 100});
        if let Some(c) = &cursor {
            q["cursor"] = json!(c);
        }
        let (status, page) = env.request("history", &rid("h"), bytes_of(&q)).await;
        assert_eq!(status, None, "{page}");
        seen.extend(page["revisions"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let numbers: Vec<u64> = seen
        .iter()
        .map(|r| r["revision"].as_u64().unwrap())
        .collect();
    assert_eq!(
        numbers,
        (1..=(TASKS * PER_TASK + 1) as u64).collect::<Vec<_>>()
    );
    let rids: HashSet<&str> = seen
        .iter()
        .skip(1)
        .map(|r| r["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(rids.len(), TASKS * PER_TASK, "each patch its own revision");
    for w in seen.windows(2) {
        assert_eq!(w[1]["prev_sha256"], w[0]["artifact_sha256"], "{w:?}");
    }
    let (_, report) = env.request("verify", &rid("v"), run_id.to_owned()).await;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["chain"]["revisions"], (TASKS * PER_TASK + 1) as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_zero_and_loses_nothing() {
    let env = Env::new().await;
    // A backlog first, so the worker is busy with commands when the signal comes (a first
    // worker only sets up the stream and consumer).
    env.worker("setup").await.kill9();
    const N: usize = 300;
    for i in 0..N {
        let run_id = format!("run_{:012x}", 0x5000 + i);
        env.publish(
            "create",
            &format!("term-{i}"),
            bytes_of(&create_payload(Some(&run_id), "T1")),
        )
        .await;
    }
    let vars = [
        ("RUST_LOG".to_owned(), "info".to_owned()),
        ("RMOS_LOG_FORMAT".to_owned(), "json".to_owned()),
    ];
    let mut worker = Worker::start_with(&env.nats, &env.runs_dir(), "a", &vars).await;
    support::eventually(Duration::from_secs(30), async || {
        support::ensure(env.run_files() >= 20, || "creates under way".to_owned())
    })
    .await;
    let before = env.run_files();
    worker.sigterm();
    let status = worker.wait(Duration::from_secs(30)).await;
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status}; log:\n{}",
        worker.log()
    );
    let at_stop = env.run_files();
    assert!(
        before < N,
        "the backlog was done before the signal: proves nothing"
    );
    // The worker held commands when it was told to stop, and finished them.
    let log = worker.full_log();
    let in_flight = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["fields"]["message"] == "shutting down: finishing in-flight commands")
        .and_then(|v| v["fields"]["in_flight"].as_i64())
        .unwrap_or_else(|| panic!("no in-flight count logged at shutdown:\n{}", worker.log()));
    assert!(
        in_flight > 0,
        "nothing in flight at SIGTERM: the test proves nothing\n{}",
        worker.log()
    );
    acks_settle(&env, &worker).await;
    eprintln!("run files: {before} at SIGTERM ({in_flight} in flight), {at_stop} after exit");

    let started = Instant::now();
    let w2 = env.worker("b").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = env.run_files();
        if n == N {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{n} of {N} runs stored after 60 s; log:\n{}",
            w2.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "second worker finished the backlog in {:?}",
        started.elapsed()
    );
    // The stream (work queue) drains: nothing left behind.
    let mut stream = env.js.get_stream("RMOS_RUNS").await.expect("stream");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info = stream.info().await.expect("stream info");
        if info.state.messages == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stream still holds {} messages",
            info.state.messages
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(env.run_files(), N);
}

/// Waits until the broker has applied the acks of a worker that exited: it received them
/// before the worker's final flush, but nats-server 2.11+ applies acks asynchronously, so
/// `consumer info` may lag by a moment. Fails if any delivered message stays unacked, well
/// within `ack_wait` (30 s), so no expiry is involved.
async fn acks_settle(env: &Env, worker: &Worker) {
    support::eventually(Duration::from_secs(5), async || {
        let pending = env.consumer_info().await.num_ack_pending;
        support::ensure(pending == 0, || {
            format!(
                "{pending} messages left awaiting an ack after a graceful stop; log:\n{}",
                worker.log()
            )
        })
    })
    .await;
}

/// The protocol: on SIGTERM the worker "finishes and acks what it holds". Messages it pulled
/// but never started must not stay pending until `ack_wait` (30 s) expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn sigterm_leaves_nothing_pending_ack() {
    let env = Env::new().await;
    let mut worker = env.worker("a").await;
    let mut acks = Vec::new();
    for i in 0..300 {
        let run_id = format!("run_{:012x}", 0x6000 + i);
        acks.push(
            env.js
                .publish(
                    format!("{PREFIX}.create"),
                    bytes_of(&create_payload(Some(&run_id), "T1")),
                )
                .await
                .expect("publish"),
        );
    }
    for ack in
        futures::future::join_all(acks.into_iter().map(std::future::IntoFuture::into_future)).await
    {
        ack.expect("PubAck");
    }
    worker.sigterm();
    let status = worker.wait(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "{}", worker.log());
    let stored = env.run_files();
    assert!(
        stored < 300,
        "worker finished everything before SIGTERM; test proves nothing"
    );
    eprintln!("{stored} of 300 stored at exit");
    acks_settle(&env, &worker).await;
}

/// A run forgets the ids of patches once the consumer's ack floor has passed them (plus
/// `forget_acked_after`), so a run patched again and again keeps a small record; redelivery
/// protection for what is not yet acknowledged stays (the domain tests cover that part).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_patch_ids_are_forgotten() {
    let env = Env::new().await;
    let worker = env
        .worker_with_config("a", "forget_acked_after = \"1s\"\n")
        .await;
    let events = env.events().await;

    let run_id = "run_00000000f0f0";
    let r = rid("create");
    env.publish("create", &r, bytes_of(&create_payload(Some(run_id), "T1")))
        .await;
    assert_eq!(events.one(&r, EVENT_TIMEOUT, &worker).await.kind, "stored");
    let env = &env;
    let patch = move |i: usize| async move {
        let r = rid(&format!("patch-{i}"));
        let body = json!({"run_id": run_id, "meta_updates": {format!("k{i}"): i}});
        env.publish("patch_meta", &r, bytes_of(&body)).await;
        r
    };
    for i in 0..30 {
        let r = patch(i).await;
        assert_eq!(events.one(&r, EVENT_TIMEOUT, &worker).await.kind, "stored");
    }
    let a = env.get_ok(run_id).await;
    assert_eq!(a["revision"], 31);
    let before = a["applied_commands"].as_array().map_or(0, Vec::len);
    assert!(
        before >= 20,
        "the floor is not known yet, so ids are kept: {a}"
    );

    // Once the floor (read every second) is a second old, the next patch drops the rest. A
    // patch keeps the ids of those acknowledged in the last 1-2 s (plus the ack's own delay):
    // patches 2.5 s apart leave it at most its own and the one before, however slow the
    // machine (500 ms apart, a loaded machine kept three for 30 s on the oldest broker).
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut i = 30;
    loop {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let r = patch(i).await;
        assert_eq!(events.one(&r, EVENT_TIMEOUT, &worker).await.kind, "stored");
        i += 1;
        let a = env.get_ok(run_id).await;
        let kept = a["applied_commands"].as_array().map_or(0, Vec::len);
        if kept <= 2 {
            assert_eq!(a["revision"], 1 + i as u64, "{a}");
            assert!(a["applied_commands"][0]["seq"].as_u64().is_some(), "{a}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still {kept} ids after 60 s: {a}\n{}",
            worker.log()
        );
    }
}

/// History, a past revision, diff and the chain in verify, over NATS; and the CLI's `verify`
/// exit code once the record is edited behind the worker's back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_revision_diff_and_chain_over_nats() {
    let env = Env::new().await;
    let worker = env.worker("a").await;
    let events = env.events().await;
    let run_id = "run_00000000a157";
    let r = rid("create");
    env.publish("create", &r, bytes_of(&create_payload(Some(run_id), "T5")))
        .await;
    let created = events.one(&r, EVENT_TIMEOUT, &worker).await;
    let mut stored = vec![created.body.clone()];
    for n in 1..=2 {
        let r = rid("patch");
        let patch = json!({"run_id": run_id, "meta_updates": {"n": n}});
        env.publish("patch_meta", &r, bytes_of(&patch)).await;
        stored.push(events.one(&r, EVENT_TIMEOUT, &worker).await.body);
    }

    let (status, h) = env
        .request(
            "history",
            &rid("h"),
            bytes_of(&json!({"run_id": run_id, "limit": 2})),
        )
        .await;
    assert_eq!(status, None, "{h}");
    assert_eq!(h["revisions"].as_array().unwrap().len(), 2, "{h}");
    let (_, h2) = env
        .request(
            "history",
            &rid("h"),
            bytes_of(&json!({"run_id": run_id, "cursor": h["next_cursor"]})),
        )
        .await;
    assert!(h2["next_cursor"].is_null(), "{h2}");
    let revs: Vec<Value> = h["revisions"]
        .as_array()
        .unwrap()
        .iter()
        .chain(h2["revisions"].as_array().unwrap())
        .cloned()
        .collect();
    assert_eq!(revs.len(), 3);
    for (rev, ev) in revs.iter().zip(&stored) {
        // The broker's stored events are a second witness of the chain.
        assert_eq!(rev["artifact_sha256"], ev["artifact_sha256"], "{rev} {ev}");
        assert_eq!(rev["request_id"], ev["request_id"]);
        assert_eq!(rev["revision"], ev["revision"]);
    }
    assert_eq!(revs[1]["prev_sha256"], revs[0]["artifact_sha256"]);
    assert!(revs[1]["stream_seq"].is_u64(), "{}", revs[1]);

    let (status, old) = env
        .request(
            "get",
            &rid("g"),
            bytes_of(&json!({"run_id": run_id, "revision": 2})),
        )
        .await;
    assert_eq!(status, None, "{old}");
    assert_eq!(old["meta"]["n"], 1);
    let (status, body) = env
        .request(
            "get",
            &rid("g"),
            bytes_of(&json!({"run_id": run_id, "revision": 9})),
        )
        .await;
    assert_eq!(status.as_deref(), Some("404"), "{body}");

    let (status, d) = env
        .request("diff", &rid("d"), bytes_of(&json!({"run_id": run_id})))
        .await;
    assert_eq!(status, None, "{d}");
    assert_eq!(d["from"]["revision"], 2);
    assert_eq!(d["to"]["revision"], 3);
    let n = d["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["path"] == "/meta/n")
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        (n["before"].clone(), n["after"].clone()),
        (json!(1), json!(2)),
        "{d}"
    );
    let (status, body) = env
        .request("diff", &rid("d"), bytes_of(&json!({"a": run_id})))
        .await;
    assert_eq!(status.as_deref(), Some("400"), "{body}");

    let (_, rep) = env.request("verify", &rid("v"), run_id).await;
    assert_eq!(rep["ok"], true, "{rep}");
    assert_eq!(rep["chain"]["revisions"], 3, "{rep}");

    // Edit the record on disk, hashes and all: the chain says so, and the CLI exits 5.
    let path = env.runs_dir().join(format!("{run_id}.json"));
    let mut v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    v["meta"]["n"] = json!(7);
    std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    let (_, rep) = env.request("verify", &rid("v"), run_id).await;
    assert_eq!(rep["ok"], false, "{rep}");
    assert_eq!(rep["chain"]["broken"]["reason"], "content_changed", "{rep}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rmos-runs"))
        .args(["verify", run_id])
        .env("NATS_URL", env.nats.url())
        .env_remove("RMOS_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("content_changed"),
        "{out:?}"
    );
}

/// A command's `Rmos-Actor` is kept in the revision it produced and shown by history; an actor
/// that is not one (a space in it) rejects the command with the reason, nothing stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publishers_actor_is_kept_in_the_revision() {
    let env = Env::new().await;
    let worker = env.worker("a").await;
    let events = env.events().await;
    let run_id = "run_00000000ac70";
    let publish_as = |rid: String, actor: &'static str, body: Value| {
        let js = env.js.clone();
        async move {
            let mut h = async_nats::HeaderMap::new();
            h.insert("X-Request-Id", rid.as_str());
            h.insert("Rmos-Actor", actor);
            js.publish_with_headers("rmos.runs.patch_meta", h, bytes_of(&body))
                .await
                .expect("publish")
                .await
                .expect("PubAck");
        }
    };
    let r = rid("create");
    env.publish("create", &r, bytes_of(&create_payload(Some(run_id), "T5")))
        .await;
    assert_eq!(events.one(&r, EVENT_TIMEOUT, &worker).await.kind, "stored");
    let r = rid("patch");
    publish_as(
        r.clone(),
        "jane@cell-3",
        json!({"run_id": run_id, "meta_updates": {"n": 1}}),
    )
    .await;
    assert_eq!(events.one(&r, EVENT_TIMEOUT, &worker).await.kind, "stored");
    let bad = rid("patch");
    publish_as(
        bad.clone(),
        "jane doe",
        json!({"run_id": run_id, "meta_updates": {"n": 2}}),
    )
    .await;
    let e = events.one(&bad, EVENT_TIMEOUT, &worker).await;
    assert_eq!(e.kind, "rejected", "{:?}", e.body);
    assert!(
        e.body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("Rmos-Actor"),
        "{}",
        e.body
    );

    let (status, h) = env
        .request("history", &rid("h"), bytes_of(&json!({"run_id": run_id})))
        .await;
    assert_eq!(status, None, "{h}");
    let revs = h["revisions"].as_array().unwrap();
    assert_eq!(revs.len(), 2, "the rejected patch made no revision: {h}");
    assert!(revs[0].get("actor").is_none(), "no header, no actor: {h}");
    assert_eq!(revs[1]["actor"], "jane@cell-3", "{h}");
}
