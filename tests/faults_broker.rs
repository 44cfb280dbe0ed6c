//! Broker crashes under load: a single JetStream server SIGKILLed during a burst, and one node of
//! a 3-node cluster (R3 stream) SIGKILLed, or frozen with SIGSTOP and thawed, during a burst. In
//! each, every create the broker PubAck'd must end up stored exactly once, by the same worker
//! process (never restarted).

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream;
use serde_json::Value;
use support::worker::*;
use support::{NatsCluster, NatsServer, ensure, eventually};

/// A publisher of creates with explicit run ids that keeps going through broker trouble and
/// records which creates were PubAck'd.
struct Burst {
    acked: Arc<Mutex<Vec<String>>>,
    failed: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Burst {
    fn start(urls: Vec<String>, tag: u16, max: usize) -> Burst {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let (acked, failed, stop) = (acked.clone(), failed.clone(), stop.clone());
            async move {
                let client = async_nats::ConnectOptions::new()
                    .retry_on_initial_connect()
                    .connect(urls)
                    .await
                    .expect("connect publisher");
                let js = jetstream::new(client);
                for i in 0..max {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let run_id = format!("run_{tag:04x}{i:08x}");
                    let mut h = HeaderMap::new();
                    h.insert("Nats-Msg-Id", format!("burst-{tag}-{i}").as_str());
                    h.insert("X-Request-Id", format!("burst-{tag}-{i}").as_str());
                    let body = bytes_of(&create_payload(Some(&run_id), "T9"));
                    let ok = match js.publish_with_headers("rmos.runs.create", h, body).await {
                        Ok(ack) => tokio::time::timeout(Duration::from_secs(5), ack)
                            .await
                            .is_ok_and(|r| r.is_ok()),
                        Err(_) => false,
                    };
                    if ok {
                        acked.lock().expect("lock").push(run_id);
                    } else {
                        // Broker (or stream leader) down: not counted; back off a little.
                        failed.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        Burst {
            acked,
            failed,
            stop,
            task,
        }
    }

    fn acked(&self) -> usize {
        self.acked.lock().expect("lock").len()
    }

    /// Stops publishing; returns the PubAck'd run ids.
    async fn finish(self) -> (BTreeSet<String>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("publisher stopped")
            .expect("publisher task");
        let acked = self.acked.lock().expect("lock").iter().cloned().collect();
        (acked, self.failed.load(Ordering::Relaxed))
    }
}

/// Waits until `n` more creates are PubAck'd than `base`.
async fn wait_acked(burst: &Burst, n: usize, timeout: Duration) {
    let base = burst.acked();
    eventually(timeout, async || {
        ensure(burst.acked() >= base + n, || {
            format!("{n} more PubAcks after {base} (have {})", burst.acked())
        })
    })
    .await;
}

fn stored_runs(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .expect("runs dir")
        .filter_map(Result::ok)
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_suffix(".json")
                .filter(|s| s.starts_with("run_"))
                .map(str::to_owned)
        })
        .collect()
}

/// Every acked run is stored, once (revision 1), and nothing was dead-lettered.
async fn assert_all_stored(dir: &Path, acked: &BTreeSet<String>, worker: &Worker) {
    eventually(Duration::from_secs(120), async || {
        let stored = stored_runs(dir);
        ensure(stored.is_superset(acked), || {
            let missing: Vec<_> = acked.difference(&stored).take(10).collect();
            format!(
                "{} of {} PubAck'd creates stored; first missing {missing:?}; worker log:\n{}",
                acked.intersection(&stored).count(),
                acked.len(),
                worker.log()
            )
        })
    })
    .await;
    for run in acked {
        let rec: Value = serde_json::from_slice(
            &std::fs::read(dir.join(format!("{run}.json"))).expect("read record"),
        )
        .expect("record is JSON");
        assert_eq!(rec["revision"], 1, "{run} changed after its create: {rec}");
    }
    let letters = files_under(&dir.join("dead_letters"));
    assert!(letters.is_empty(), "dead letters: {letters:?}");
}

/// After a broker fault under load: the fault hit while PubAck'd creates were still waiting
/// (`stored_at_fault < acked_before`, else the test proves nothing), every PubAck'd create is
/// stored exactly once, and the same worker process (`pid`) is still running.
async fn assert_survived(
    dir: &Path,
    acked: &BTreeSet<String>,
    worker: &mut Worker,
    pid: libc::pid_t,
    (stored_at_fault, acked_before): (usize, usize),
    fault: &str,
) {
    assert!(
        stored_at_fault < acked_before,
        "the worker had drained the stream before the {fault}; the test proves nothing"
    );
    assert_all_stored(dir, acked, worker).await;
    assert!(
        worker.is_running(),
        "the worker exited; log:\n{}",
        worker.log()
    );
    assert_eq!(worker.pid(), pid);
}

fn config_file(dir: &Path, text: &str) -> Vec<(String, String)> {
    let path = dir.join("rmos.toml");
    std::fs::write(&path, text).expect("write config");
    vec![
        ("RMOS_CONFIG".into(), path.display().to_string()),
        ("RMOS_METRICS_ADDR".into(), "off".into()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_sigkill_during_burst_loses_nothing_acked() {
    let started = Instant::now();
    let mut nats = NatsServer::start().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("runs");
    std::fs::create_dir(&dir).expect("runs dir");
    let vars = config_file(tmp.path(), "ack_wait = \"10s\"\n");
    let mut worker = Worker::start_with(&nats, &dir, "bk", &vars).await;
    let pid = worker.pid();

    let burst = Burst::start(vec![nats.url()], 0xb1, 20_000);
    wait_acked(&burst, 300, Duration::from_secs(60)).await;
    eventually(Duration::from_secs(60), async || {
        ensure(stored_runs(&dir).len() >= 100, || {
            format!("some runs stored; log:\n{}", worker.log())
        })
    })
    .await;
    let acked_before = burst.acked();
    nats.kill(); // SIGKILL: no flush, no goodbye
    let stored_at_kill = stored_runs(&dir).len();
    nats.restart().await; // same port, same JetStream store dir
    wait_acked(&burst, 300, Duration::from_secs(90)).await;
    let (acked, failed) = burst.finish().await;

    assert_survived(
        &dir,
        &acked,
        &mut worker,
        pid,
        (stored_at_kill, acked_before),
        "kill",
    )
    .await;
    eprintln!(
        "broker SIGKILL: {} acked ({acked_before} before the kill, {stored_at_kill} stored at \
         the kill), {failed} publishes failed, all stored in {:.1}s",
        acked.len(),
        started.elapsed().as_secs_f64()
    );
}

/// Name of the node leading the stream's Raft group.
async fn stream_leader(client: &async_nats::Client) -> Option<String> {
    let req = async_nats::Request::new()
        .payload(bytes::Bytes::new())
        .timeout(Some(Duration::from_secs(2)));
    let reply = client
        .send_request("$JS.API.STREAM.INFO.RMOS_RUNS", req)
        .await
        .ok()?;
    let v: Value = serde_json::from_slice(&reply.payload).ok()?;
    v["cluster"]["leader"].as_str().map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_node_sigkill_during_burst_loses_nothing_acked() {
    let started = Instant::now();
    let mut cluster = NatsCluster::start(3).await;
    let urls = cluster.urls();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("runs");
    std::fs::create_dir(&dir).expect("runs dir");
    let vars = config_file(tmp.path(), "stream_replicas = 3\nack_wait = \"10s\"\n");
    let mut worker = Worker::start_at(&urls, &dir, "cl", &vars).await;
    let pid = worker.pid();

    let client = async_nats::ConnectOptions::new()
        .connect(cluster.url_list())
        .await
        .expect("connect");
    let info: Value = {
        let reply = client
            .request("$JS.API.STREAM.INFO.RMOS_RUNS", bytes::Bytes::new())
            .await
            .expect("stream info");
        serde_json::from_slice(&reply.payload).expect("json")
    };
    assert_eq!(
        info["config"]["num_replicas"], 3,
        "stream is not R3: {info}"
    );

    let burst = Burst::start(cluster.url_list(), 0xc1, 20_000);
    wait_acked(&burst, 200, Duration::from_secs(60)).await;
    eventually(Duration::from_secs(60), async || {
        ensure(stored_runs(&dir).len() >= 50, || {
            format!("some runs stored; log:\n{}", worker.log())
        })
    })
    .await;
    let leader = stream_leader(&client).await.expect("stream has a leader");
    let victim = cluster.index_of(&leader).expect("leader is a node");
    let acked_before = burst.acked();
    cluster.kill(victim);
    let stored_at_kill = stored_runs(&dir).len();
    // The load goes on with two nodes: a new leader is elected and PubAcks resume.
    wait_acked(&burst, 150, Duration::from_secs(90)).await;
    let new_leader = stream_leader(&client).await;
    cluster.restart(victim).await;
    wait_acked(&burst, 150, Duration::from_secs(90)).await;
    let (acked, failed) = burst.finish().await;

    assert_ne!(new_leader.as_deref(), Some(leader.as_str()), "no failover");
    assert_survived(
        &dir,
        &acked,
        &mut worker,
        pid,
        (stored_at_kill, acked_before),
        "kill",
    )
    .await;
    // The restarted node caught up: the stream reports all three replicas current again.
    wait_replicas_current(&client, &cluster).await;
    eprintln!(
        "cluster: killed stream leader {leader} (new leader {new_leader:?}); {} acked \
         ({acked_before} before the kill, {stored_at_kill} stored at the kill), {failed} \
         publishes failed, all stored in {:.1}s",
        acked.len(),
        started.elapsed().as_secs_f64()
    );
}

/// Waits until the stream reports its two followers current and online (a node that was down
/// or paused has caught up).
async fn wait_replicas_current(client: &async_nats::Client, cluster: &NatsCluster) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let reply = client
            .request("$JS.API.STREAM.INFO.RMOS_RUNS", bytes::Bytes::new())
            .await;
        let info: Value = reply
            .ok()
            .and_then(|r| serde_json::from_slice(&r.payload).ok())
            .unwrap_or_default();
        let replicas = info["cluster"]["replicas"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if replicas.len() == 2
            && replicas
                .iter()
                .all(|r| r["current"] == Value::Bool(true) && r["offline"] != Value::Bool(true))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replicas not current again: {}; logs:\n{}",
            info["cluster"],
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A node of the R3 cluster frozen (SIGSTOP: its connections stay open, it answers nothing,
/// as a paused VM does) under load, then thawed: the two others elect a new stream leader and
/// keep taking creates; the frozen node catches up; every PubAck'd create is stored exactly
/// once (revision 1, nothing dead-lettered), and the worker never restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_node_paused_during_burst_loses_nothing_acked() {
    let started = Instant::now();
    let mut cluster = NatsCluster::start(3).await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("runs");
    std::fs::create_dir(&dir).expect("runs dir");
    let vars = config_file(tmp.path(), "stream_replicas = 3\nack_wait = \"10s\"\n");
    let mut worker = Worker::start_at(&cluster.urls(), &dir, "cp", &vars).await;
    let pid = worker.pid();

    // The victim is the stream's leader; the publisher and this observer use the other two
    // nodes, so the load goes on while it is frozen (the worker may be on any node).
    let any = async_nats::ConnectOptions::new()
        .connect(cluster.url_list())
        .await
        .expect("connect");
    let leader = stream_leader(&any).await.expect("stream has a leader");
    let victim = cluster.index_of(&leader).expect("leader is a node");
    let others: Vec<String> = (0..cluster.len())
        .filter(|i| *i != victim)
        .map(|i| cluster.url(i))
        .collect();
    drop(any);
    let client = async_nats::ConnectOptions::new()
        .connect(others.clone())
        .await
        .expect("connect to the other nodes");

    let burst = Burst::start(others, 0xc2, 20_000);
    wait_acked(&burst, 200, Duration::from_secs(60)).await;
    eventually(Duration::from_secs(60), async || {
        ensure(stored_runs(&dir).len() >= 50, || {
            format!("some runs stored; log:\n{}", worker.log())
        })
    })
    .await;
    let acked_before = burst.acked();
    cluster.pause(victim);
    let stored_at_pause = stored_runs(&dir).len();
    // The two others elect a new leader and PubAcks go on.
    let mut new_leader = None;
    eventually(Duration::from_secs(60), async || {
        new_leader = stream_leader(&client).await;
        ensure(new_leader.as_deref().is_some_and(|l| l != leader), || {
            format!("no new leader while {leader} is frozen ({new_leader:?})")
        })
    })
    .await;
    wait_acked(&burst, 150, Duration::from_secs(90)).await;
    cluster.resume(victim);
    wait_acked(&burst, 150, Duration::from_secs(90)).await;
    let (acked, failed) = burst.finish().await;

    assert_survived(
        &dir,
        &acked,
        &mut worker,
        pid,
        (stored_at_pause, acked_before),
        "pause",
    )
    .await;
    wait_replicas_current(&client, &cluster).await;
    eprintln!(
        "cluster: froze stream leader {leader} (new leader {new_leader:?}); {} acked \
         ({acked_before} before the pause, {stored_at_pause} stored at the pause), {failed} \
         publishes failed, all stored in {:.1}s",
        acked.len(),
        started.elapsed().as_secs_f64()
    );
}
