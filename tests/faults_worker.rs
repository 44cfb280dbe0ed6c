//! Model-based crash test of the worker: a seeded stream of creates, meta patches and advisories
//! over a few dozen runs, the worker SIGKILLed at seeded points and restarted, and the store
//! compared at the end with the model computed from what was published (exactly-once effect).

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use support::worker::*;

/// Commands per seed.
const COMMANDS: usize = 600;
/// Runs per seed.
const RUNS: usize = 40;

/// One published command.
#[derive(Clone, Debug)]
enum Cmd {
    Create {
        run: String,
    },
    Patch {
        run: String,
        key: String,
        value: u64,
    },
    Advisory {
        run: String,
        adv: String,
    },
}

impl Cmd {
    fn subject(&self) -> &'static str {
        match self {
            Cmd::Create { .. } => "rmos.runs.create",
            Cmd::Patch { .. } => "rmos.runs.patch_meta",
            Cmd::Advisory { .. } => "rmos.runs.advisory",
        }
    }

    fn payload(&self) -> Value {
        match self {
            Cmd::Create { run } => create_payload(Some(run), "T7"),
            Cmd::Patch { run, key, value } => {
                json!({"run_id": run, "meta_updates": {key.as_str(): value}})
            }
            Cmd::Advisory { run, adv } => json!({
                "run_id": run, "advisory_id": adv, "kind": "note",
                "engine_id": "faults", "engine_version": "1.0.0",
                "body": {"text": format!("advisory {adv} for {run}")}
            }),
        }
    }
}

/// What the store must hold for one run.
#[derive(Debug, Default)]
struct RunModel {
    create_rid: String,
    meta: Map<String, Value>,
    advisories: BTreeSet<String>,
    /// Applied changes after the create (patches + distinct advisories).
    changes: u64,
}

/// A seeded command stream: each run's create is published before anything else for it; a few
/// advisories repeat an earlier advisory id (same body, new message id), which must change
/// nothing.
fn generate(seed: u64) -> Vec<Cmd> {
    let mut rng = StdRng::seed_from_u64(seed);
    let runs: Vec<String> = (0..RUNS)
        .map(|i| format!("run_{:04x}{:08x}", seed & 0xffff, i))
        .collect();
    let mut created = 0usize;
    let mut advisories: Vec<(String, String)> = Vec::new();
    let mut cmds = Vec::with_capacity(COMMANDS);
    while cmds.len() < COMMANDS {
        let remaining = COMMANDS - cmds.len();
        let must_create = RUNS - created >= remaining;
        if created < RUNS && (created == 0 || must_create || rng.random_bool(0.12)) {
            cmds.push(Cmd::Create {
                run: runs[created].clone(),
            });
            created += 1;
            continue;
        }
        let run = runs[rng.random_range(0..created)].clone();
        let i = cmds.len();
        let roll: f64 = rng.random();
        if roll < 0.72 {
            cmds.push(Cmd::Patch {
                run,
                key: format!("k{i:04}"),
                value: rng.random_range(0..1_000_000),
            });
        } else if roll < 0.95 || advisories.is_empty() {
            let adv = format!("adv_{:04x}{:08x}", seed & 0xffff, i);
            advisories.push((run.clone(), adv.clone()));
            cmds.push(Cmd::Advisory { run, adv });
        } else {
            let (run, adv) = advisories[rng.random_range(0..advisories.len())].clone();
            cmds.push(Cmd::Advisory { run, adv });
        }
    }
    cmds
}

fn rid_of(seed: u64, i: usize) -> String {
    format!("faults-w{seed}-c{i:04}")
}

fn model_of(seed: u64, cmds: &[Cmd]) -> BTreeMap<String, RunModel> {
    let mut model: BTreeMap<String, RunModel> = BTreeMap::new();
    for (i, c) in cmds.iter().enumerate() {
        match c {
            Cmd::Create { run } => {
                let m = model.entry(run.clone()).or_default();
                m.create_rid = rid_of(seed, i);
                m.meta
                    .insert("request_id".into(), Value::String(rid_of(seed, i)));
            }
            Cmd::Patch { run, key, value } => {
                let m = model.get_mut(run).expect("create first");
                m.meta.insert(key.clone(), json!(value));
                m.changes += 1;
            }
            Cmd::Advisory { run, adv } => {
                let m = model.get_mut(run).expect("create first");
                if m.advisories.insert(adv.clone()) {
                    m.changes += 1;
                }
            }
        }
    }
    model
}

/// Every `run_*.json` record in `dir`, by run id.
fn records(dir: &Path) -> BTreeMap<String, Value> {
    std::fs::read_dir(dir)
        .expect("runs dir")
        .filter_map(Result::ok)
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let run = n.strip_prefix("run_")?.strip_suffix(".json")?.to_owned();
            let v: Value = serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
            Some((format!("run_{run}"), v))
        })
        .collect()
}

/// Differences between the store and the model (empty when they agree).
fn diff(model: &BTreeMap<String, RunModel>, store: &BTreeMap<String, Value>) -> Vec<String> {
    let mut out = Vec::new();
    for (run, m) in model {
        let Some(rec) = store.get(run) else {
            out.push(format!("{run}: missing"));
            continue;
        };
        let meta = rec["meta"].as_object().cloned().unwrap_or_default();
        if meta != m.meta {
            let want: BTreeSet<&String> = m.meta.keys().collect();
            let have: BTreeSet<&String> = meta.keys().collect();
            out.push(format!(
                "{run}: meta differs; missing {:?}, unexpected {:?}, or values differ",
                want.difference(&have).collect::<Vec<_>>(),
                have.difference(&want).collect::<Vec<_>>()
            ));
        }
        let advs: BTreeSet<String> = rec["advisory_inputs"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x["advisory_id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let adv_count = rec["advisory_inputs"].as_array().map_or(0, Vec::len);
        if advs != m.advisories || adv_count != m.advisories.len() {
            out.push(format!(
                "{run}: advisories {advs:?} (x{adv_count}) != model {:?}",
                m.advisories
            ));
        }
        let want_rev = 1 + m.changes;
        if rec["revision"].as_u64() != Some(want_rev) {
            out.push(format!(
                "{run}: revision {} != model {want_rev}",
                rec["revision"]
            ));
        }
    }
    for run in store.keys() {
        if !model.contains_key(run) {
            out.push(format!("{run}: in the store but never created"));
        }
    }
    out
}

fn worker_env(config: &Path) -> Vec<(String, String)> {
    vec![
        ("RMOS_CONFIG".into(), config.display().to_string()),
        ("RMOS_CONCURRENCY".into(), "16".into()),
        ("RMOS_METRICS_ADDR".into(), "off".into()),
    ]
}

/// Request ids with at least one outcome event.
fn outcomes(events: &Events) -> HashSet<String> {
    events.snapshot().into_iter().map(|e| e.rid).collect()
}

async fn wait_outcomes(events: &Events, n: usize, timeout: Duration, worker: &Worker) {
    let deadline = Instant::now() + timeout;
    loop {
        let have = outcomes(events).len();
        if have >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {have} of {n} commands had an outcome within {timeout:?}; worker log:\n{}",
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn model_based_kill9(seed: u64) {
    let started = Instant::now();
    let env = Env::new().await;
    // A short ack_wait, so what a killed worker held comes back in seconds, not 30 s.
    let config = env.tmp.path().join("rmos.toml");
    std::fs::write(&config, "ack_wait = \"5s\"\n").expect("write config");
    let vars = worker_env(&config);
    let dir = env.runs_dir();

    let cmds = generate(seed);
    let model = model_of(seed, &cmds);
    let mut rng = StdRng::seed_from_u64(seed ^ 0x005e_ed0f_c0ff_ee00);
    let kills = rng.random_range(2..=3usize);
    // Kill points: numbers of commands with an outcome, spread over the stream.
    let mut points: Vec<usize> = Vec::new();
    for k in 0..kills {
        let lo = 60 + k * (480 / kills);
        let hi = lo + 480 / kills - 40;
        points.push(rng.random_range(lo..hi));
    }

    let events = env.events().await;
    let mut worker = Worker::start_with(&env.nats, &dir, &format!("s{seed}-0"), &vars).await;

    let js = env.js.clone();
    let published = Arc::new(cmds.clone());
    let publisher = tokio::spawn(async move {
        let mut acks = Vec::with_capacity(published.len());
        for (i, c) in published.iter().enumerate() {
            let mut h = HeaderMap::new();
            h.insert("X-Request-Id", rid_of(seed, i).as_str());
            h.insert("Nats-Msg-Id", format!("faults-w{seed}-m{i:04}").as_str());
            let body = bytes_of(&c.payload());
            acks.push(
                js.publish_with_headers(c.subject(), h, body)
                    .await
                    .expect("publish"),
            );
        }
        for a in acks {
            let ack = a.await.expect("PubAck");
            assert!(
                !ack.duplicate,
                "a unique message id was seen as a duplicate"
            );
        }
    });

    let mut at_kill = Vec::new();
    for (k, point) in points.iter().enumerate() {
        wait_outcomes(&events, *point, Duration::from_secs(120), &worker).await;
        worker.kill9();
        at_kill.push(outcomes(&events).len());
        worker = Worker::start_with(&env.nats, &dir, &format!("s{seed}-{}", k + 1), &vars).await;
    }
    tokio::time::timeout(Duration::from_secs(60), publisher)
        .await
        .expect("publisher finished")
        .expect("every command PubAck'd");
    assert!(
        at_kill.iter().all(|n| *n < COMMANDS),
        "the worker finished before a kill ({at_kill:?}); the test proves nothing"
    );

    // Quiescent: every command has an outcome, and the consumer holds nothing.
    wait_outcomes(&events, COMMANDS, Duration::from_secs(180), &worker).await;
    let stream = env.js.get_stream("RMOS_RUNS").await.expect("stream exists");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info = stream
            .consumer_info("rmos-runs-worker")
            .await
            .expect("consumer info");
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "consumer not drained: {} pending, {} unacked",
            info.num_pending,
            info.num_ack_pending
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let snap = events.snapshot();
    let rejected: Vec<&Event> = snap.iter().filter(|e| e.kind == "rejected").collect();
    assert!(rejected.is_empty(), "rejections: {rejected:#?}");

    // Exactly-once effect, as the events tell it: each command changed the store at most once,
    // and no two changes of a run carry the same revision.
    let mut changed_by_rid: HashMap<&str, usize> = HashMap::new();
    let mut revisions: HashSet<(String, u64)> = HashSet::new();
    for e in snap.iter().filter(|e| e.body["changed"] == json!(true)) {
        *changed_by_rid.entry(e.rid.as_str()).or_default() += 1;
        let key = (
            e.body["run_id"].as_str().unwrap_or_default().to_owned(),
            e.body["revision"].as_u64().unwrap_or_default(),
        );
        assert!(
            revisions.insert(key.clone()),
            "two changes announced the same revision {key:?}"
        );
    }
    let twice: Vec<_> = changed_by_rid.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "commands applied twice: {twice:?}");

    let store = records(&dir);
    let problems = diff(&model, &store);
    assert!(
        problems.is_empty(),
        "seed {seed}: store differs from the model in {} ways:\n{}",
        problems.len(),
        problems.join("\n")
    );
    // Every create's request id is the one kept in meta (also covered by the diff), and every
    // advisory body survived the crashes whole: `blobs/<sha256>` exists and hashes to its name.
    let mut blobs_checked = 0;
    for (run, m) in &model {
        assert_eq!(store[run]["meta"]["request_id"], json!(m.create_rid));
        for input in store[run]["advisory_inputs"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let sha = input["body"]["sha256"]
                .as_str()
                .expect("advisory body blob");
            let bytes = std::fs::read(dir.join("blobs").join(sha))
                .unwrap_or_else(|e| panic!("{run}: advisory blob {sha} missing: {e}"));
            assert_eq!(hex::encode(Sha256::digest(&bytes)), sha, "{run}: torn blob");
            assert_eq!(input["body"]["size_bytes"], json!(bytes.len()));
            blobs_checked += 1;
        }
    }
    assert!(blobs_checked > 0, "no advisory was attached");

    // The listing index survived the kills too: the redeliveries of what the killed workers
    // held reconciled it, so a full check finds no drift and a listing shows every run once,
    // at the revision of its record.
    let runs = rmos_runs::store::RunStore::open(
        &rmos_runs::store::StoreUrl::Local(dir.clone()),
        &rmos_runs::store::OpenOptions::default(),
    )
    .expect("open store");
    let report = runs.reindex(true).await.expect("index check");
    assert!(
        report.consistent(),
        "seed {seed}: index drift after kill -9: {report}"
    );
    // The killed workers' index journals (the last one's too, killed now) are folded by
    // whoever comes next (here: a repair), leaving the trees alone to hold the same index.
    worker.kill9();
    let fixed = runs.reindex(false).await.expect("reindex");
    assert!(
        fixed.consistent(),
        "seed {seed}: a repair had to change the index after kill -9: {fixed}"
    );
    let journal_dir = dir.join(rmos_runs::store::journal::JOURNAL_DIR);
    let left: Vec<_> = std::fs::read_dir(&journal_dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "seed {seed}: journals left unfolded: {left:?}"
    );
    assert_eq!(runs.reindex(true).await.expect("check").journaled, 0);
    let mut q = rmos_runs::store::ListQuery {
        limit: Some(17),
        ..Default::default()
    };
    let mut listed: BTreeMap<String, u64> = BTreeMap::new();
    loop {
        let page = runs.list(&q).await.expect("list");
        for r in page.runs {
            assert!(
                listed.insert(r.run_id.to_string(), r.revision).is_none(),
                "seed {seed}: {} listed twice",
                r.run_id
            );
        }
        match page.next_cursor {
            Some(c) => q.cursor = Some(c),
            None => break,
        }
    }
    let stored: BTreeMap<String, u64> = store
        .iter()
        .map(|(run, v)| (run.clone(), v["revision"].as_u64().unwrap_or(0)))
        .collect();
    assert_eq!(
        listed, stored,
        "seed {seed}: the listing differs from the records"
    );

    let patches = cmds
        .iter()
        .filter(|c| matches!(c, Cmd::Patch { .. }))
        .count();
    let redelivered = snap
        .iter()
        .filter(|e| e.body["changed"] == json!(false))
        .count();
    eprintln!(
        "seed {seed}: {} commands ({patches} patches) over {} runs, {kills} kills at {at_kill:?} \
         outcomes, {redelivered} unchanged redeliveries, {:.1}s",
        cmds.len(),
        model.len(),
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_based_kill9_seed_1() {
    model_based_kill9(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_based_kill9_seed_2() {
    model_based_kill9(0x2bad_f00d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_based_kill9_seed_3() {
    model_based_kill9(0x7e57_5eed_0003).await;
}

/// A worker that dies exactly between writing a patch's revision and its record (the
/// test-only crash point aborts the process there, as a kill -9 would end it): the revision is
/// claimed, the record still one behind. The restarted worker gets the patch redelivered and
/// applies that revision once: no gap, no orphan revision, no second revision for the same
/// command, the chain verifies, and the command's `stored` event names the revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_between_revision_and_record() {
    let env = Env::new().await;
    let config = env.tmp.path().join("rmos.toml");
    std::fs::write(&config, "ack_wait = \"2s\"\n").expect("write config");
    let dir = env.runs_dir();
    let run = "run_00000000c001";
    let mut crashing = worker_env(&config);
    crashing.push(("RMOS_TEST_FAULTS".into(), "1".into()));
    crashing.push(("RMOS_TEST_CRASH_AFTER_REVISION".into(), format!("{run}:3")));
    let events = env.events().await;
    let mut worker = Worker::start_with(&env.nats, &dir, "crash-0", &crashing).await;

    let patch = |n: u64| bytes_of(&json!({"run_id": run, "meta_updates": {"n": n}}));
    env.publish("create", "c-1", bytes_of(&create_payload(Some(run), "T1")))
        .await;
    assert_eq!(
        events.one("c-1", EVENT_TIMEOUT, &worker).await.kind,
        "stored"
    );
    env.publish("patch_meta", "p-2", patch(2)).await;
    assert_eq!(
        events.one("p-2", EVENT_TIMEOUT, &worker).await.kind,
        "stored"
    );
    env.publish("patch_meta", "p-3", patch(3)).await;
    let status = worker.wait(Duration::from_secs(30)).await;
    assert!(
        !status.success(),
        "the worker should have aborted at the crash point ({status}); log:\n{}",
        worker.log()
    );
    // The state the crash left: revision 3 claimed, the record at revision 2.
    let revision_3 = dir
        .join("history")
        .join(run)
        .join(format!("{:020}.json", 3));
    assert!(
        revision_3.exists(),
        "the crash point was not reached after the revision; log:\n{}",
        worker.log()
    );
    let record: Value =
        serde_json::from_slice(&std::fs::read(dir.join(format!("{run}.json"))).expect("record"))
            .expect("record JSON");
    assert_eq!(record["revision"], 2, "the record moved before the crash");
    assert!(
        events.snapshot().iter().all(|e| e.rid != "p-3"),
        "an outcome was announced before the record was written"
    );

    let worker = Worker::start_with(&env.nats, &dir, "crash-1", &worker_env(&config)).await;
    let ev = events.one("p-3", Duration::from_secs(60), &worker).await;
    assert_eq!(ev.kind, "stored", "{:?}", ev.body);
    assert_eq!(ev.body["revision"], 3, "{:?}", ev.body);
    let got = env.get_ok(run).await;
    assert_eq!(got["revision"], 3);
    assert_eq!(got["meta"]["n"], 3);

    let (status, page) = env
        .request("history", "h", bytes_of(&json!({"run_id": run})))
        .await;
    assert_eq!(status, None, "{page}");
    let revs = page["revisions"].as_array().expect("revisions");
    assert_eq!(
        revs.iter()
            .map(|r| r["revision"].clone())
            .collect::<Vec<_>>(),
        [json!(1), json!(2), json!(3)],
        "{page}"
    );
    assert_eq!(revs[2]["request_id"], "p-3", "{page}");
    assert_eq!(
        revs[2]["artifact_sha256"], ev.body["artifact_sha256"],
        "{page}"
    );
    let (_, report) = env.request("verify", "v", run.to_owned()).await;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["chain"]["revisions"], 3, "{report}");
    assert!(report["chain"]["pending"].is_null(), "{report}");

    // And the run goes on: the next patch is revision 4.
    env.publish("patch_meta", "p-4", patch(4)).await;
    let ev = events.one("p-4", EVENT_TIMEOUT, &worker).await;
    assert_eq!(ev.body["revision"], 4, "{:?}", ev.body);
}
