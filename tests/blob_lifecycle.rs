//! Blob lifecycle under concurrency: deletes (the path retention takes too) racing creates of
//! other runs with the same body, on the local store and on the S3 test server. No live run
//! may end up referencing a missing blob, and `verify` passes on every live run.
//!
//! The store is wrapped in [`Jitter`], which holds every listing's answer and every delete
//! for a random few milliseconds: the real backend still does all the work, the windows
//! between a release's check and its removal just get wide enough for the creates to land in
//! them (without it the race shows up about once in thousands of rounds).

mod support;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};
use rmos_runs::domain::command::{Command, CommandKind, Context};
use rmos_runs::domain::ids::RunId;
use rmos_runs::store::local::LocalStore;
use rmos_runs::store::{OpenOptions, RunStore, StoreError, StoreUrl};
use serde_json::json;

/// Delays listing answers by up to 4 ms and deletes by up to 30 ms (see the module docs).
#[derive(Debug)]
struct Jitter(Arc<dyn ObjectStore>);

impl std::fmt::Display for Jitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Jitter({})", self.0)
    }
}

fn pause(max_ms: u64) -> Duration {
    Duration::from_micros(rand::random_range(0..max_ms * 1000))
}

#[async_trait]
impl ObjectStore for Jitter {
    async fn put_opts(&self, l: &Path, p: PutPayload, o: PutOptions) -> Result<PutResult> {
        self.0.put_opts(l, p, o).await
    }
    async fn put_multipart_opts(
        &self,
        l: &Path,
        o: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.0.put_multipart_opts(l, o).await
    }
    async fn get_opts(&self, l: &Path, o: GetOptions) -> Result<GetResult> {
        self.0.get_opts(l, o).await
    }
    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let inner = self.0.clone();
        locations
            .then(move |l| {
                let inner = inner.clone();
                async move {
                    tokio::time::sleep(pause(30)).await;
                    let l = l?;
                    inner
                        .delete_stream(futures::stream::once(async move { Ok(l) }).boxed())
                        .next()
                        .await
                        .unwrap_or_else(|| {
                            Err(object_store::Error::Generic {
                                store: "Jitter",
                                source: "delete answered nothing".into(),
                            })
                        })
                }
            })
            .boxed()
    }
    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        let listed = self.0.list(prefix);
        futures::stream::once(async move {
            let all: Vec<_> = listed.collect().await;
            tokio::time::sleep(pause(4)).await;
            futures::stream::iter(all)
        })
        .flatten()
        .boxed()
    }
    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.0.list_with_offset(prefix, offset)
    }
    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.0.list_with_delimiter(prefix).await
    }
    async fn copy_opts(&self, from: &Path, to: &Path, o: CopyOptions) -> Result<()> {
        self.0.copy_opts(from, to, o).await
    }
}

fn run_id(n: u32) -> RunId {
    RunId::parse(&format!("run_{n:012x}")).unwrap()
}

/// A program over the blob threshold, different for every `n`.
fn program(n: u32) -> String {
    format!("(program {n})\n{}", "G1 X10 Y10 F1200\n".repeat(5000))
}

async fn create(store: &RunStore, id: &RunId, gcode: &str) -> Result<(), StoreError> {
    let body = json!({"mode": "cam", "tool_id": "T1", "status": "OK", "run_id": id.as_str(),
                      "outputs": {"gcode_text": gcode}});
    let cmd = Command::decode(CommandKind::Create, body.to_string().as_bytes(), None).unwrap();
    store.execute(&cmd, &Context::now()).await.map(|_| ())
}

/// A create starting up to 30 ms late: sometimes while the delete it races is releasing.
async fn late_create(store: &RunStore, id: &RunId, gcode: &str) -> Result<(), StoreError> {
    tokio::time::sleep(pause(30)).await;
    create(store, id, gcode).await
}

async fn delete(store: &RunStore, id: &RunId) -> Result<(), StoreError> {
    let body = json!({"run_id": id.as_str(), "reason": "retention"});
    let cmd = Command::decode(CommandKind::Delete, body.to_string().as_bytes(), None).unwrap();
    store.execute(&cmd, &Context::now()).await.map(|_| ())
}

/// Checks every live run among `ids`: its blob exists and `verify` passes.
async fn check_live(store: &RunStore, ids: &[RunId], round: u32) {
    for id in ids {
        let Ok(a) = store.get(id).await else {
            continue;
        };
        let sha = a.outputs.gcode_blob.as_ref().unwrap().sha256.clone();
        // Read the object itself: `blob_exists` would put a parked copy back.
        let key = store.blob_key(&sha);
        let present = store.object_store().head(&key).await.is_ok();
        assert!(
            present,
            "round {round}: live run {id} references missing blob {sha}"
        );
        let report = store.verify(id).await.unwrap();
        assert!(report.ok, "round {round}: verify {id}: {report:?}");
    }
}

/// `rounds` rounds of `pairs` concurrent pairs: run A holding program P is deleted while run B
/// with the same program P is created; then B is deleted while C (P again) is created.
async fn deletes_race_same_body_creates(store: RunStore, parked: Path, rounds: u32, pairs: u32) {
    let mut next = 1u32;
    let mut all: Vec<RunId> = Vec::new();
    for round in 0..rounds {
        let mut tasks = Vec::new();
        for p in 0..pairs {
            let (a, b, c) = (run_id(next), run_id(next + 1), run_id(next + 2));
            next += 3;
            all.extend([a.clone(), b.clone(), c.clone()]);
            let gcode = program(round * pairs + p);
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                create(&store, &a, &gcode).await.unwrap();
                let (d, cr) = tokio::join!(delete(&store, &a), late_create(&store, &b, &gcode));
                d.unwrap();
                cr.unwrap();
                let (d, cr) = tokio::join!(delete(&store, &b), late_create(&store, &c, &gcode));
                d.unwrap();
                cr.unwrap();
                [a, b, c]
            }));
        }
        let mut ids = Vec::new();
        for t in tasks {
            ids.extend(t.await.unwrap());
        }
        check_live(&store, &ids, round).await;
    }
    // Everything settled: no release is in progress, so nothing is left parked.
    let parked: Vec<_> = store.object_store().list(Some(&parked)).collect().await;
    assert!(parked.is_empty(), "parked copies left: {parked:?}");
    // Releases still release: deleting the last holders removes every program.
    let mut shas = Vec::new();
    for id in &all {
        if let Ok(a) = store.get(id).await {
            shas.push(a.outputs.gcode_blob.unwrap().sha256);
            delete(&store, id).await.unwrap();
        }
    }
    assert_eq!(
        shas.len() as u32,
        rounds * pairs,
        "one live run per program"
    );
    for sha in shas {
        assert!(
            !store.blob_exists(&sha).await.unwrap(),
            "blob {sha} left behind"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_deletes_race_same_body_creates() {
    let dir = tempfile::tempdir().unwrap();
    let local = LocalStore::new(dir.path(), true).unwrap();
    let store =
        RunStore::from_object_store(Arc::new(Jitter(Arc::new(local))), Path::default(), false);
    deletes_race_same_body_creates(store, Path::from("parked"), 40, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_deletes_race_same_body_creates() {
    let server = support::S3Server::start().await;
    let bucket = support::unique_bucket();
    server.create_bucket(&bucket).await;
    let url = StoreUrl::S3 {
        bucket,
        prefix: "runs".to_owned(),
    };
    let s3 = RunStore::open(&url, &support::s3_options(&server.endpoint())).unwrap();
    let store = RunStore::from_object_store(
        Arc::new(Jitter(s3.object_store().clone())),
        Path::from("runs"),
        true,
    );
    deletes_race_same_body_creates(store, Path::from("runs/parked"), 10, 4).await;
}

/// A store whose runs reference blobs without markers (written by hand, restored from a
/// partial copy) keeps every blob on delete until a reindex has marked the references.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn references_without_markers_keep_their_blob_until_reindexed() {
    let dir = tempfile::tempdir().unwrap();
    let url = StoreUrl::Local(dir.path().to_path_buf());
    let store = RunStore::open(&url, &OpenOptions::default()).unwrap();
    let gcode = program(0);
    let (a, b) = (run_id(1), run_id(2));
    create(&store, &a, &gcode).await.unwrap();
    create(&store, &b, &gcode).await.unwrap();
    let sha = store
        .get(&a)
        .await
        .unwrap()
        .outputs
        .gcode_blob
        .unwrap()
        .sha256;
    // What such a store looks like: markers and the flag gone.
    std::fs::remove_dir_all(dir.path().join("blobrefs")).unwrap();
    let store = RunStore::open(&url, &OpenOptions::default()).unwrap();
    assert!(!store.blob_refs_complete().await.unwrap());
    delete(&store, &a).await.unwrap();
    assert!(
        store.blob_exists(&sha).await.unwrap(),
        "a blob run {b} references without a marker was removed"
    );
    assert!(store.verify(&b).await.unwrap().ok);
    // A reindex marks b's reference; from then on the last release removes the blob.
    store.reindex(false).await.unwrap();
    assert!(store.blob_refs_complete().await.unwrap());
    assert!(dir.path().join(format!("blobrefs/{sha}/{b}")).exists());
    delete(&store, &b).await.unwrap();
    assert!(
        !store.blob_exists(&sha).await.unwrap(),
        "unreferenced blob left"
    );
}
