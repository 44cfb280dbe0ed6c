//! Store faults under load: an S3 outage with the server's state intact (a TCP proxy cut and
//! restored), a full local filesystem (a 2 MiB tmpfs), and two worker processes racing on one
//! local store directory.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use support::worker::*;
use support::{S3Server, TmpfsMount, ToggleProxy};

/// Publishes with an `X-Request-Id` and a `Nats-Msg-Id`; waits for the PubAck.
async fn publish(env: &Env, kind: &str, rid: &str, payload: &Value) {
    let mut h = HeaderMap::new();
    h.insert("X-Request-Id", rid);
    h.insert("Nats-Msg-Id", format!("mid-{rid}").as_str());
    env.js
        .publish_with_headers(format!("{PREFIX}.{kind}"), h, bytes_of(payload))
        .await
        .expect("publish")
        .await
        .expect("PubAck");
}

/// Waits until every request id in `rids` has an event; panics on any `rejected` event.
async fn wait_all(events: &Events, rids: &[String], timeout: Duration, log: impl Fn() -> String) {
    let deadline = Instant::now() + timeout;
    loop {
        let snap = events.snapshot();
        let rejected: Vec<&Event> = snap.iter().filter(|e| e.kind == "rejected").collect();
        assert!(rejected.is_empty(), "rejections: {rejected:#?}");
        let seen: HashSet<&str> = snap.iter().map(|e| e.rid.as_str()).collect();
        let missing: Vec<&String> = rids.iter().filter(|r| !seen.contains(r.as_str())).collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} commands without an outcome after {timeout:?} (first {:?}); log:\n{}",
            missing.len(),
            rids.len(),
            &missing[..missing.len().min(5)],
            log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn record(dir: &Path, run: &str) -> Value {
    let bytes = std::fs::read(dir.join(format!("{run}.json")))
        .unwrap_or_else(|e| panic!("read {run}: {e}"));
    serde_json::from_slice(&bytes).expect("record is JSON")
}

/// A moto S3 server with a bucket, a [`ToggleProxy`] in front of it, and the worker
/// environment that reaches the bucket through the proxy.
async fn s3_behind_proxy() -> (S3Server, String, ToggleProxy, Vec<(String, String)>) {
    let s3 = S3Server::start().await;
    let bucket = support::unique_bucket();
    s3.create_bucket(&bucket).await;
    let proxy = ToggleProxy::start(&format!("127.0.0.1:{}", s3.port())).await;
    let mut vars: Vec<(String, String)> = s3
        .env_for(&bucket)
        .into_iter()
        .filter(|(k, _)| k != "AWS_ENDPOINT_URL")
        .collect();
    vars.push(("AWS_ENDPOINT_URL".into(), proxy.endpoint()));
    vars.push(("RMOS_STORE_URL".into(), format!("s3://{bucket}/runs")));
    vars.push(("RMOS_METRICS_ADDR".into(), "off".into()));
    (s3, bucket, proxy, vars)
}

// ---------------------------------------------------------------------------------------------
// (a) S3 outage, server state kept
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_outage_behind_proxy_then_every_command_lands() {
    const RUNS: usize = 40;
    let started = Instant::now();
    let env = Env::new().await;
    let (_s3, _bucket, proxy, vars) = s3_behind_proxy().await;
    let events = env.events().await;
    let worker = Worker::start_with(&env.nats, &env.runs_dir(), "s3p", &vars).await;

    let run = |i: usize| format!("run_5305{i:08x}");
    let mut rids = Vec::new();
    // Phase 1 (store up): half the creates.
    for i in 0..RUNS / 2 {
        let rid = format!("s3p-create-{i}");
        publish(&env, "create", &rid, &create_payload(Some(&run(i)), "T3")).await;
        rids.push(rid);
    }
    wait_all(&events, &rids, Duration::from_secs(60), || worker.log()).await;

    // Outage: every connection to the store is cut and new ones reset, for ~5 s, while the
    // rest of the load arrives: the other creates, and two patches for each stored run.
    proxy.cut();
    let cut_at = Instant::now();
    let before_cut = events.snapshot().len();
    for i in RUNS / 2..RUNS {
        let rid = format!("s3p-create-{i}");
        publish(&env, "create", &rid, &create_payload(Some(&run(i)), "T3")).await;
        rids.push(rid);
    }
    for p in 0..2 {
        for i in 0..RUNS / 2 {
            let rid = format!("s3p-patch-{i}-{p}");
            let patch = json!({"run_id": run(i), "meta_updates": {format!("p{p}"): i}});
            publish(&env, "patch_meta", &rid, &patch).await;
            rids.push(rid);
        }
    }
    let outage = Duration::from_secs(5);
    tokio::time::sleep(outage.saturating_sub(cut_at.elapsed())).await;
    let during = events.snapshot().len() - before_cut;
    let refused = proxy.refused();
    proxy.restore();

    wait_all(&events, &rids, Duration::from_secs(120), || worker.log()).await;
    assert!(
        refused > 0,
        "the worker never touched the store during the outage; the test proves nothing"
    );
    assert_eq!(
        during, 0,
        "commands got an outcome while the store was unreachable"
    );
    for i in 0..RUNS {
        let a = env.get_ok(&run(i)).await;
        let want = if i < RUNS / 2 { 3 } else { 1 };
        assert_eq!(a["revision"], want, "{}: {a}", run(i));
        if i < RUNS / 2 {
            assert_eq!(a["meta"]["p0"], json!(i));
            assert_eq!(a["meta"]["p1"], json!(i));
        }
    }
    let retried = worker
        .full_log()
        .lines()
        .filter(|l| l.contains("transient failure"))
        .count();
    eprintln!(
        "s3 outage: {} commands, {refused} connections reset during a {outage:?} cut, \
         {retried} transient failures logged, all landed in {:.1}s",
        rids.len(),
        started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------
// (b) Full local filesystem
// ---------------------------------------------------------------------------------------------

/// A distinct G-code program of about `len` bytes.
fn gcode(i: usize, len: usize) -> String {
    let mut s = String::with_capacity(len + 64);
    s.push_str("G21\nG90\n");
    let mut n = 0usize;
    while s.len() < len {
        s.push_str(&format!("G1 X{i}.{n:06} Y{n} F1200\n"));
        n += 1;
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_naks_then_lands_when_space_is_freed() {
    full_disk_scenario(false).await;
}

/// The same scenario, also requiring that failed writes leave no staged (`#`) file behind
/// (each failed attempt would otherwise leak an inode and up to a body's worth of bytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_leaves_no_staged_files_behind() {
    full_disk_scenario(true).await;
}

async fn full_disk_scenario(strict: bool) {
    const CREATES: usize = 8;
    const BODY: usize = 120 * 1024;
    let started = Instant::now();
    // No skipping: a run that cannot stage the full disk proves nothing and must say so
    // (CI runs as root, where the mount works).
    let mount = TmpfsMount::try_mount("2m").unwrap_or_else(|e| {
        panic!("cannot stage a full disk: a 2 MiB tmpfs is needed (run as root): {e}")
    });
    let env = Env::new().await;
    // The store is the tmpfs root; the worker log goes to its parent (not on the tmpfs).
    let dir = mount.path().to_path_buf();
    let vars = vec![
        ("RMOS_METRICS_ADDR".to_string(), "off".to_string()),
        ("RMOS_CONCURRENCY".to_string(), "4".to_string()),
    ];
    let worker = Worker::start_with(&env.nats, &dir, "full", &vars).await;
    let worker_log = worker.log.clone();

    // Leave room for about three of the creates.
    let filler = dir.join("filler.bin");
    let free = mount.available();
    let keep_free = 3 * BODY as u64 + 40 * 1024;
    assert!(
        free > keep_free + 256 * 1024,
        "tmpfs too small: {free} bytes free"
    );
    std::fs::write(&filler, vec![0u8; (free - keep_free) as usize]).expect("write filler");

    let events = env.events().await;
    let run = |i: usize| format!("run_d15cf0{i:06x}");
    let bodies: Vec<String> = (0..CREATES).map(|i| gcode(i, BODY)).collect();
    let mut rids = Vec::new();
    for (i, body) in bodies.iter().enumerate() {
        let mut payload = create_payload(Some(&run(i)), "T5");
        payload["outputs"]["gcode_text"] = json!(body);
        let rid = format!("full-create-{i}");
        publish(&env, "create", &rid, &payload).await;
        rids.push(rid);
    }

    // The disk fills: the worker reports insufficient storage and holds the rest.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !worker.full_log().contains("insufficient_storage") {
        assert!(
            Instant::now() < deadline,
            "no insufficient_storage within 60 s; log:\n{}",
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stored_while_full = events.snapshot().len();
    assert!(
        stored_while_full < CREATES,
        "every create landed on a full disk"
    );
    assert!(
        events.snapshot().iter().all(|e| e.kind == "stored"),
        "a command was rejected because the disk was full: {:#?}",
        events.snapshot()
    );
    // Let it retry against the full disk (two more refused writes), then free the space.
    let refusals = || {
        worker
            .full_log()
            .lines()
            .filter(|l| l.contains("insufficient_storage"))
            .count()
    };
    let seen = refusals();
    support::eventually(Duration::from_secs(60), async || {
        support::ensure(refusals() >= seen + 2, || {
            format!("no retry against the full disk; log:\n{}", worker.log())
        })
    })
    .await;
    assert!(events.snapshot().iter().all(|e| e.kind == "stored"));
    std::fs::remove_file(&filler).expect("remove filler");

    wait_all(&events, &rids, Duration::from_secs(120), || worker.log()).await;
    for (i, body) in bodies.iter().enumerate() {
        let rec = record(&dir, &run(i));
        assert_eq!(rec["revision"], 1);
        let blob = &rec["outputs"]["gcode_blob"];
        assert_eq!(blob["size_bytes"], json!(body.len()), "{}: {rec}", run(i));
        let sha = blob["sha256"].as_str().expect("blob sha");
        let stored = std::fs::read(dir.join("blobs").join(sha)).expect("blob file");
        assert!(stored == body.as_bytes(), "{}: blob is torn", run(i));
    }
    // Staged (`#`) files left behind by writes that failed on the full disk.
    let leftovers: Vec<_> = files_under(&dir)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains('#'))
        .collect();
    let leftover_bytes: u64 = leftovers
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    let naks = std::fs::read_to_string(&worker_log)
        .unwrap_or_default()
        .matches("insufficient_storage")
        .count();
    eprintln!(
        "full disk: {stored_while_full} of {CREATES} creates stored when the disk was full, \
         {naks} insufficient_storage log lines, all landed after freeing in {:.1}s; \
         {} staged files left behind ({leftover_bytes} bytes)",
        started.elapsed().as_secs_f64(),
        leftovers.len()
    );
    drop(worker);
    let _ = std::fs::remove_file(&worker_log);
    if strict {
        assert!(
            leftovers.is_empty(),
            "{} staged files ({leftover_bytes} bytes) left behind: {leftovers:?}",
            leftovers.len()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// (c) Two workers, one local store
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_one_dir_hot_runs_no_lost_update_gap_free_revisions() {
    const HOT: usize = 10;
    const PUBLISHERS: usize = 8;
    const PER_PUBLISHER: usize = 50;
    let started = Instant::now();
    let env = Env::new().await;
    let dir = env.runs_dir();
    let vars = vec![
        ("RMOS_CONCURRENCY".to_string(), "16".to_string()),
        ("RMOS_METRICS_ADDR".to_string(), "off".to_string()),
        ("RUST_LOG".to_string(), "info".to_string()),
        ("RMOS_LOG_FORMAT".to_string(), "json".to_string()),
    ];
    let a = Worker::start_with(&env.nats, &dir, "hot-a", &vars).await;
    let b = Worker::start_with(&env.nats, &dir, "hot-b", &vars).await;
    let events = env.events().await;
    let run = |i: usize| format!("run_4070{i:08x}");
    let logs = || format!("worker a:\n{}\nworker b:\n{}", a.log(), b.log());

    let mut creates = Vec::new();
    for i in 0..HOT {
        let rid = format!("hot-create-{i}");
        publish(&env, "create", &rid, &create_payload(Some(&run(i)), "T4")).await;
        creates.push(rid);
    }
    wait_all(&events, &creates, Duration::from_secs(60), logs).await;

    // Many publishers, random hot runs, a distinct key per patch.
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let js = env.js.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(0x4070 + p as u64);
            let mut sent = Vec::new();
            let mut acks = Vec::new();
            for j in 0..PER_PUBLISHER {
                let target = rng.random_range(0..HOT);
                let key = format!("p{p}_{j}");
                let rid = format!("hot-patch-{p}-{j}");
                let mut h = HeaderMap::new();
                h.insert("X-Request-Id", rid.as_str());
                h.insert("Nats-Msg-Id", format!("mid-{rid}").as_str());
                let body = json!({"run_id": format!("run_4070{target:08x}"),
                                  "meta_updates": {key.as_str(): j}});
                acks.push(
                    js.publish_with_headers(format!("{PREFIX}.patch_meta"), h, bytes_of(&body))
                        .await
                        .expect("publish"),
                );
                sent.push((target, key, rid));
            }
            for ack in acks {
                ack.await.expect("PubAck");
            }
            sent
        }));
    }
    let mut by_run: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    let mut rids = Vec::new();
    for t in tasks {
        for (target, key, rid) in t.await.expect("publisher") {
            by_run.entry(target).or_default().push(key);
            rids.push(rid);
        }
    }
    wait_all(&events, &rids, Duration::from_secs(180), logs).await;

    // Announced revisions: every applied patch of a run carries a distinct revision, and
    // together they are exactly 2..=n.
    let snap = events.snapshot();
    let mut announced: HashMap<String, Vec<u64>> = HashMap::new();
    for e in &snap {
        if e.body["event"] == "meta_patched" && e.body["changed"] == json!(true) {
            announced
                .entry(e.body["run_id"].as_str().expect("run_id").to_owned())
                .or_default()
                .push(e.body["revision"].as_u64().expect("revision"));
        }
    }
    for i in 0..HOT {
        let keys = by_run.get(&i).cloned().unwrap_or_default();
        let rec = record(&dir, &run(i));
        let n = 1 + keys.len() as u64;
        assert_eq!(rec["revision"], n, "{}: revision", run(i));
        let meta = rec["meta"].as_object().expect("meta");
        let lost: Vec<&String> = keys.iter().filter(|k| !meta.contains_key(*k)).collect();
        assert!(lost.is_empty(), "{}: lost updates {lost:?}", run(i));
        assert_eq!(
            meta.len(),
            keys.len() + 1,
            "{}: unexpected meta keys",
            run(i)
        );
        let mut revs = announced.remove(&run(i)).unwrap_or_default();
        revs.sort_unstable();
        let want: Vec<u64> = (2..=n).collect();
        assert_eq!(revs, want, "{}: announced revisions not 2..={n}", run(i));
    }
    // Per worker: (patches it stored, lost races it retried), from its JSON log.
    let per_worker = |w: &Worker| {
        w.full_log()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["fields"]["message"] == "stored" && v.to_string().contains("patch_meta"))
            .fold((0u64, 0u64), |(n, c), v| {
                (n + 1, c + v["fields"]["conflicts"].as_u64().unwrap_or(0))
            })
    };
    let ((pa, ca), (pb, cb)) = (per_worker(&a), per_worker(&b));
    assert!(
        pa > 0 && pb > 0,
        "one worker did all the work (a {pa}, b {pb}); no cross-process race was tested"
    );
    let conflicts = ca + cb;
    eprintln!(
        "two workers: {} patches on {HOT} runs (a stored {pa}, b stored {pb}), {conflicts} lost \
         races retried, {:.1}s",
        rids.len(),
        started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------
// (d) The not-found retry budget and a store outage
// ---------------------------------------------------------------------------------------------

/// A patch published 3 s before its run's create, during a store outage: without the outage
/// the patch's not-found retries (0.5 + 1 + 2 + 4 + 8 s) easily cover 3 s. The outage must not
/// use up that budget: once the store is back, the create lands and the patch must apply
/// (only "run not found yet" results count against `not_found_retries`, not deliveries that
/// failed because the store was down).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_does_not_use_up_the_not_found_retries_of_a_patch() {
    let env = Env::new().await;
    let (_s3, _bucket, proxy, mut vars) = s3_behind_proxy().await;
    // At `warn` the info-level command span (with the request id) is filtered out.
    vars.push(("RUST_LOG".into(), "info".into()));
    let events = env.events().await;
    let worker = Worker::start_with(&env.nats, &env.runs_dir(), "nf", &vars).await;
    let run = "run_0b0d9e7000a1";

    proxy.cut();
    let patch = json!({"run_id": run, "meta_updates": {"late": true}});
    publish(&env, "patch_meta", "nf-patch", &patch).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    publish(
        &env,
        "create",
        "nf-create",
        &create_payload(Some(run), "T6"),
    )
    .await;
    // Keep the store down until the patch has failed (transiently) five times.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let failures = worker
            .full_log()
            .lines()
            .filter(|l| l.contains("nf-patch") && l.contains("transient failure"))
            .count();
        if failures >= 5 {
            break;
        }
        assert!(Instant::now() < deadline, "log:\n{}", worker.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    proxy.restore();

    let rids = ["nf-create".to_string(), "nf-patch".to_string()];
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let snap = events.snapshot();
        if let Some(e) = snap.iter().find(|e| e.kind == "rejected") {
            panic!(
                "{} rejected after the outage although its create was published 3 s after \
                 it: {}",
                e.rid, e.body
            );
        }
        if rids.iter().all(|r| snap.iter().any(|e| &e.rid == r)) {
            break;
        }
        assert!(Instant::now() < deadline, "log:\n{}", worker.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(env.get_ok(run).await["revision"], 2);
}

/// A store slower than `ack_wait`: another process holds every key lock of the local store
/// for four times `ack_wait` while a patch is in hand. The worker tells the broker the command
/// is still being worked on, so it is not delivered a second time: one `stored` event, from
/// the first delivery. (Without the in-progress signal the broker redelivers it after
/// `ack_wait` and a second, unchanged outcome follows.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_store_does_not_get_a_command_redelivered() {
    let env = Env::new().await;
    let dir = env.runs_dir();
    let worker = env.worker_with_config("slow", "ack_wait = \"1s\"\n").await;
    let events = env.events().await;

    let run = "run_00000000510e";
    publish(
        &env,
        "create",
        "slow-create",
        &create_payload(Some(run), "T1"),
    )
    .await;
    wait_all(
        &events,
        &["slow-create".into()],
        Duration::from_secs(30),
        || worker.log(),
    )
    .await;

    // Hold every stripe of the store's key locks, as a second process would.
    let locks: Vec<std::fs::File> = (0..1024u32)
        .map(|stripe| {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(dir.join(".locks").join(format!("{stripe:03x}.lock")))
                .expect("open lock file");
            f.lock().expect("take lock");
            f
        })
        .collect();
    publish(
        &env,
        "patch_meta",
        "slow-patch",
        &json!({"run_id": run, "meta_updates": {"slow": true}}),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        events.snapshot().iter().all(|e| e.rid != "slow-patch"),
        "the patch finished while the store was held"
    );
    drop(locks);

    wait_all(
        &events,
        &["slow-patch".into()],
        Duration::from_secs(30),
        || worker.log(),
    )
    .await;
    // Every delivery is settled (a redelivered copy would have had its outcome), then count.
    env.consumer_settled(Duration::from_secs(30)).await;
    let outcomes: Vec<Event> = events
        .snapshot()
        .into_iter()
        .filter(|e| e.rid == "slow-patch")
        .collect();
    assert_eq!(outcomes.len(), 1, "{outcomes:#?}\n{}", worker.log());
    assert_eq!(outcomes[0].kind, "stored");
    assert_eq!(outcomes[0].body["changed"], true);
    assert_eq!(
        outcomes[0].body["source"]["delivered"], 1,
        "{:?}",
        outcomes[0].body
    );
    assert_eq!(record(&dir, run)["revision"], 2);
}

/// Messages pulled in a batch but waiting for a free slot behind a slow store are told in
/// progress too. Worker A (one slot, so pulls of two) holds two patches while the store is held
/// for 4 s with `ack_wait` 1 s: one being worked on, one waiting. Worker B, started meanwhile,
/// keeps a pull request open. Each patch gets exactly one outcome, from its first delivery.
/// (Without the beat the waiting patch expires, B receives it again, and once the store is
/// free both copies run: a second, unchanged outcome.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_messages_are_not_redelivered_behind_a_slow_store() {
    let env = Env::new().await;
    let dir = env.runs_dir();
    let config = "ack_wait = \"1s\"\nconcurrency = 1\n";
    let a = env.worker_with_config("slow-wait-a", config).await;
    let events = env.events().await;
    let runs: Vec<String> = (0..2).map(|i| format!("run_0000000051{i:02x}")).collect();
    let creates: Vec<String> = runs.iter().map(|r| format!("create-{r}")).collect();
    for (run, rid) in runs.iter().zip(&creates) {
        publish(&env, "create", rid, &create_payload(Some(run), "T1")).await;
    }
    wait_all(&events, &creates, Duration::from_secs(30), || a.log()).await;

    let locks: Vec<std::fs::File> = (0..1024u32)
        .map(|stripe| {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(dir.join(".locks").join(format!("{stripe:03x}.lock")))
                .expect("open lock file");
            f.lock().expect("take lock");
            f
        })
        .collect();
    let patches: Vec<String> = runs.iter().map(|r| format!("patch-{r}")).collect();
    for (run, rid) in runs.iter().zip(&patches) {
        publish(
            &env,
            "patch_meta",
            rid,
            &json!({"run_id": run, "meta_updates": {"slow": true}}),
        )
        .await;
    }
    // A holds both before B exists.
    support::eventually(Duration::from_secs(10), async || {
        let info = env.consumer_info().await;
        support::ensure(info.num_ack_pending == 2, || format!("{info:?}"))
    })
    .await;
    let b = env.worker_with_config("slow-wait-b", config).await;
    // The store stays held for four times ack_wait (the fault itself, not a wait for an
    // outcome).
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        events.snapshot().iter().all(|e| !patches.contains(&e.rid)),
        "a patch finished while the store was held"
    );
    drop(locks);

    wait_all(&events, &patches, Duration::from_secs(60), || a.log()).await;
    env.consumer_settled(Duration::from_secs(30)).await;
    for rid in &patches {
        let outcomes: Vec<Event> = events
            .snapshot()
            .into_iter()
            .filter(|e| &e.rid == rid)
            .collect();
        assert_eq!(
            outcomes.len(),
            1,
            "{outcomes:#?}\nA:\n{}\nB:\n{}",
            a.log(),
            b.log()
        );
        assert_eq!(
            outcomes[0].body["source"]["delivered"], 1,
            "{:?}",
            outcomes[0].body
        );
        assert_eq!(outcomes[0].body["changed"], true);
    }
    for run in &runs {
        assert_eq!(record(&dir, run)["revision"], 2);
    }
}
