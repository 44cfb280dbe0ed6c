//! Faults and the other transports, over a real broker and real worker processes: kill -9 of
//! the worker mid-stream, a broker restart during a burst, core ingest mode, service
//! discovery, and the error codes that need a broken store.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;
use serde_json::{Value, json};
use support::worker::*;
use support::{ensure, eventually};

/// Every `run_*.json` record under the store directory, parsed.
fn records(env: &Env) -> Vec<Value> {
    std::fs::read_dir(env.runs_dir())
        .expect("runs dir")
        .filter_map(Result::ok)
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with("run_") && n.ends_with(".json")
        })
        .map(|e| serde_json::from_slice(&std::fs::read(e.path()).expect("read")).expect("json"))
        .collect()
}

/// A create with no run id: the worker derives it, so a redelivery must map to the same run.
fn indexed_create(i: usize) -> Bytes {
    Bytes::from(
        json!({"mode": "cam", "tool_id": "T1", "status": "OK",
               "request": {"index": i}, "feasibility": {"i": i}})
        .to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_2000_creates_then_restart_stores_each_exactly_once() {
    const N: usize = 2000;
    let env = Env::new().await;
    let mut worker = env.worker("a").await;
    let js = env.js.clone();
    let publisher = tokio::spawn(async move {
        let mut acks = Vec::with_capacity(N);
        for i in 0..N {
            acks.push(
                js.publish("rmos.runs.create", indexed_create(i))
                    .await
                    .expect("publish"),
            );
        }
        for a in acks {
            a.await.expect("PubAck");
        }
    });
    // Kill the worker once a part of the stream is stored, while it is writing.
    eventually(Duration::from_secs(60), async || {
        ensure(env.run_files() >= 300, || "some runs stored".to_owned())
    })
    .await;
    worker.kill9();
    let at_kill = env.run_files();
    publisher.await.expect("every create PubAck'd");
    assert!(
        at_kill < N,
        "worker finished before the kill; test proves nothing"
    );

    let _second = env.worker("b").await;
    eventually(Duration::from_secs(120), async || {
        ensure(env.run_files() >= N, || "all runs stored".to_owned())
    })
    .await;
    // Redeliveries of anything in flight at the kill are settled too: none added a run.
    env.consumer_settled(Duration::from_secs(60)).await;
    let recs = records(&env);
    assert_eq!(recs.len(), N, "runs stored != creates published");
    let indexes: HashSet<u64> = recs
        .iter()
        .map(|r| r["request_summary"]["index"].as_u64().expect("index"))
        .collect();
    assert_eq!(indexes.len(), N, "some create stored twice or lost");
    assert!(
        recs.iter().all(|r| r["revision"] == 1),
        "a create applied twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_during_burst_loses_nothing_acked() {
    const N: usize = 600;
    let mut env = Env::new().await;
    let _worker = env.worker("a").await;
    let url = env.nats.url();
    let acked = std::sync::Arc::new(std::sync::Mutex::new(HashSet::new()));
    let acked2 = acked.clone();
    let publisher = tokio::spawn(async move {
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(url)
            .await
            .expect("connect");
        let js = jetstream::new(client);
        for i in 0..N {
            let run_id = format!("run_{:012x}", 0xb000 + i);
            let body = create_payload(Some(&run_id), "T1").to_string();
            // A publish that gets no PubAck (broker down) is not counted: only acked work
            // must survive.
            let ack = match js.publish("rmos.runs.create", body.into()).await {
                Ok(a) => a,
                Err(_) => continue,
            };
            if tokio::time::timeout(Duration::from_secs(5), ack)
                .await
                .is_ok_and(|r| r.is_ok())
            {
                acked2.lock().expect("lock").insert(run_id);
            }
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    });
    eventually(Duration::from_secs(30), async || {
        ensure(env.run_files() >= 100, || "burst under way".to_owned())
    })
    .await;
    env.nats.restart().await;
    publisher.await.expect("publisher");
    let acked: HashSet<String> = acked.lock().expect("lock").clone();
    assert!(
        acked.len() > 200,
        "too few creates acked ({}) to prove anything",
        acked.len()
    );
    let dir = env.runs_dir();
    eventually(Duration::from_secs(90), async || {
        ensure(
            acked
                .iter()
                .all(|id| dir.join(format!("{id}.json")).exists()),
            || "every acked create stored".to_owned(),
        )
    })
    .await;
    // The same worker process still serves requests after the restart.
    let some = acked.iter().next().expect("one").clone();
    assert_eq!(env.get_ok(&some).await["run_id"], json!(some));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_mode_replies_with_the_outcome() {
    let env = Env::new().await;
    let _worker = Worker::start_with(
        &env.nats,
        &env.runs_dir(),
        "core",
        &[("RMOS_INGEST".into(), "core".into())],
    )
    .await;
    let body = create_payload(Some("run_00000000c0de"), "T1").to_string();
    let reply = env
        .client
        .request("rmos.runs.create", body.into())
        .await
        .expect("reply");
    assert!(
        reply
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Service-Error-Code"))
            .is_none()
    );
    let v: Value = serde_json::from_slice(&reply.payload).expect("json");
    assert_eq!(v["event"], "created");
    assert_eq!(v["run_id"], "run_00000000c0de");
    assert_eq!(env.get_ok("run_00000000c0de").await["revision"], 1);

    let reply = env
        .client
        .request("rmos.runs.create", "{\"mode\": 1}".into())
        .await
        .expect("reply");
    let code = reply
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Service-Error-Code"));
    assert_eq!(code.map(|c| c.to_string()), Some("400".to_owned()));
    let v: Value = serde_json::from_slice(&reply.payload).expect("json");
    assert_eq!(v["error"]["code"], "invalid_request");
}

/// Core NATS gives a message no identity of its own: a patch published again with the same
/// payload is a new command, not a redelivery. A, B, then A again leaves meta at A, each
/// answered `changed: true`; with a `Nats-Msg-Id` the same publish twice applies once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_mode_never_drops_a_distinct_patch() {
    let env = Env::new().await;
    let _worker = Worker::start_with(
        &env.nats,
        &env.runs_dir(),
        "core",
        &[("RMOS_INGEST".into(), "core".into())],
    )
    .await;
    let run = "run_00000000ab0a";
    let request = |subject: &'static str, body: Value, msg_id: Option<&'static str>| {
        let client = env.client.clone();
        async move {
            let mut h = HeaderMap::new();
            if let Some(m) = msg_id {
                h.insert("Nats-Msg-Id", m);
            }
            let reply = client
                .request_with_headers(subject, h, body.to_string().into())
                .await
                .expect("reply");
            let v: Value = serde_json::from_slice(&reply.payload).expect("json");
            assert!(
                reply
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Nats-Service-Error-Code"))
                    .is_none(),
                "{v}"
            );
            v
        }
    };
    request("rmos.runs.create", create_payload(Some(run), "T1"), None).await;
    let a = json!({"run_id": run, "meta_updates": {"state": "A"}});
    let b = json!({"run_id": run, "meta_updates": {"state": "B"}});
    for (patch, revision) in [(&a, 2), (&b, 3), (&a, 4)] {
        let v = request("rmos.runs.patch_meta", patch.clone(), None).await;
        assert_eq!(v["changed"], true, "{v}");
        assert_eq!(v["revision"], revision, "{v}");
    }
    let stored = env.get_ok(run).await;
    assert_eq!(stored["meta"]["state"], "A", "{stored}");
    assert_eq!(stored["revision"], 4);

    // With the publisher's id, a repeated publish is recognised.
    for changed in [true, false] {
        let v = request("rmos.runs.patch_meta", b.clone(), Some("toggle-b-1")).await;
        assert_eq!(v["changed"], changed, "{v}");
    }
    assert_eq!(env.get_ok(run).await["meta"]["state"], "B");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_is_discoverable() {
    let env = Env::new().await;
    let _worker = env.worker("a").await;
    let reply = env
        .client
        .request("$SRV.INFO.rmos-runs", Bytes::new())
        .await
        .expect("service info");
    let info: Value = serde_json::from_slice(&reply.payload).expect("json");
    assert_eq!(info["name"], "rmos-runs");
    let subjects: HashSet<String> = info["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .map(|e| e["subject"].as_str().unwrap_or("").to_owned())
        .collect();
    for s in ["rmos.runs.get", "rmos.runs.list", "rmos.runs.verify"] {
        assert!(subjects.contains(s), "{s} missing from {info}");
    }
    let reply = env
        .client
        .request("$SRV.STATS.rmos-runs", Bytes::new())
        .await
        .expect("stats");
    let stats: Value = serde_json::from_slice(&reply.payload).expect("json");
    assert!(stats["endpoints"].is_array());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_artifact_is_422_and_never_overwritten() {
    let env = Env::new().await;
    let _worker = env.worker("a").await;
    let path = env.runs_dir().join("run_0000000000cc.json");
    std::fs::write(&path, b"{\"run_id\": \"run_0000000000cc\", oops").expect("write");
    let (status, body) = env
        .request("get", &rid("corrupt"), "run_0000000000cc")
        .await;
    assert_eq!(status.as_deref(), Some("422"), "{body}");
    assert_eq!(body["error"]["code"], "corrupt_artifact");
    // A patch for it is rejected (kept as a dead letter) and the file is untouched.
    let events = env.events().await;
    let r = rid("patch-corrupt");
    let mut h = HeaderMap::new();
    h.insert("X-Request-Id", r.as_str());
    env.js
        .publish_with_headers(
            "rmos.runs.patch_meta",
            h,
            json!({"run_id": "run_0000000000cc", "meta_updates": {"a": 1}})
                .to_string()
                .into(),
        )
        .await
        .expect("publish")
        .await
        .expect("PubAck");
    let ev = events.one(&r, EVENT_TIMEOUT, &_worker).await;
    assert_eq!(ev.kind, "rejected");
    assert_eq!(ev.body["code"], "corrupt_artifact");
    assert!(std::fs::read(&path).expect("read").ends_with(b"oops"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_outage_is_503_not_a_rejection() {
    let env = Env::new().await;
    let s3 = support::S3Server::start().await;
    let bucket = support::unique_bucket();
    s3.create_bucket(&bucket).await;
    let mut vars: Vec<(String, String)> = s3.env_for(&bucket);
    vars.push(("RMOS_STORE_URL".into(), format!("s3://{bucket}/runs")));
    let worker = Worker::start_with(&env.nats, &env.runs_dir(), "s3", &vars).await;
    let events = env.events().await;
    let r = rid("s3-create");
    env.publish(
        "create",
        &r,
        create_payload(Some("run_0000000005e3"), "T1").to_string(),
    )
    .await;
    assert_eq!(events.one(&r, EVENT_TIMEOUT, &worker).await.kind, "stored");
    assert_eq!(env.get_ok("run_0000000005e3").await["revision"], 1);

    drop(s3); // the store goes away
    let (status, body) = env.request("get", &rid("outage"), "run_0000000005e3").await;
    assert_eq!(status.as_deref(), Some("503"), "{body}");
    assert_eq!(body["error"]["code"], "storage_unavailable");
    // A command during the outage is redelivered, not rejected.
    let r = rid("s3-during-outage");
    env.publish(
        "create",
        &r,
        create_payload(Some("run_0000000005e4"), "T1").to_string(),
    )
    .await;
    // The worker has tried it and given it back for redelivery (at least twice delivered),
    // and it has no outcome.
    support::eventually(Duration::from_secs(30), async || {
        let info = env.consumer_info().await;
        support::ensure(info.num_redelivered >= 1, || {
            format!("not redelivered yet: {info:?}; log:\n{}", worker.log())
        })
    })
    .await;
    assert!(
        events.snapshot().iter().all(|e| e.rid != r),
        "a command was given an outcome while the store was down"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_a_limit_is_rejected_too_large_naming_the_limit() {
    let env = Env::new().await;
    let worker = env.worker("a").await;
    let events = env.events().await;
    let mut nested = json!(1);
    for _ in 0..40 {
        nested = json!({ "n": nested });
    }
    let mut body = create_payload(Some("run_0000000001ef"), "T1");
    body["meta"] = json!({ "deep": nested });
    let r = rid("too-deep");
    env.publish("create", &r, body.to_string()).await;
    let ev = events.one(&r, EVENT_TIMEOUT, &worker).await;
    assert_eq!(ev.kind, "rejected");
    assert_eq!(ev.body["code"], "too_large");
    assert!(
        ev.body["message"]
            .as_str()
            .is_some_and(|m| m.contains("max_json_depth")),
        "{}",
        ev.body
    );
    let (status, _) = env.request("get", &rid("get"), "run_0000000001ef").await;
    assert_eq!(status.as_deref(), Some("404"));
}
