//! The start-up probe against real S3 semantics: it accepts the moto server, refuses the same
//! server behind a proxy that drops `If-Match` / `If-None-Match` (an S3-compatible store that
//! ignores conditional writes), and fails promptly, with a clear error, when nothing listens.

mod support;

use std::time::{Duration, Instant};

use futures::TryStreamExt;
use object_store::path::Path;
use rmos_runs::store::{RunStore, StoreError, StoreUrl};
use support::{S3Server, StripConditionalProxy};

/// `OpenOptions` for an S3 endpoint with the moto test credentials.
fn s3_url(bucket: &str) -> StoreUrl {
    StoreUrl::S3 {
        bucket: bucket.to_owned(),
        prefix: "runs".to_owned(),
    }
}

/// Objects left under the probe's key space (`runs/_probe/`), read directly from the server.
async fn probe_leftovers(server: &S3Server, bucket: &str) -> Vec<String> {
    let direct = RunStore::open(&s3_url(bucket), &support::s3_options(&server.endpoint())).unwrap();
    direct
        .object_store()
        .list(Some(&Path::from("runs/_probe")))
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap()
}

#[tokio::test]
async fn probe_accepts_real_s3() {
    support::init_tracing();
    let server = S3Server::shared();
    let bucket = support::unique_bucket();
    server.create_bucket(&bucket).await;
    let store = RunStore::open(&s3_url(&bucket), &support::s3_options(&server.endpoint())).unwrap();
    store
        .probe()
        .await
        .expect("moto honours conditional writes; the probe must accept it");
    assert!(
        probe_leftovers(server, &bucket).await.is_empty(),
        "probe left objects behind"
    );
}

#[tokio::test]
async fn probe_refuses_s3_that_ignores_conditional_writes() {
    support::init_tracing();
    let server = S3Server::shared();
    let bucket = support::unique_bucket();
    server.create_bucket(&bucket).await;
    let proxy = StripConditionalProxy::start(&format!("127.0.0.1:{}", server.port())).await;
    let store = RunStore::open(&s3_url(&bucket), &support::s3_options(&proxy.endpoint())).unwrap();
    match store.probe().await {
        Err(StoreError::Unusable(msg)) => {
            assert!(
                msg.contains("ignores conditional writes"),
                "unexpected message: {msg}"
            );
            assert!(
                msg.contains(&format!("s3://{bucket}/runs")),
                "message does not name the store: {msg}"
            );
            println!("refused as expected: {msg}");
        }
        other => {
            panic!("a store that ignores If-None-Match/If-Match must be refused, got {other:?}")
        }
    }
    assert!(
        probe_leftovers(server, &bucket).await.is_empty(),
        "probe left objects behind"
    );
}

#[tokio::test]
async fn probe_of_unreachable_s3_fails_promptly_with_a_clear_error() {
    support::init_tracing();
    // A free port with nothing listening: every connection is refused at once.
    let endpoint = format!("http://127.0.0.1:{}", support::free_port());
    let store = RunStore::open(&s3_url("nowhere"), &support::s3_options(&endpoint)).unwrap();
    let started = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(120), store.probe()).await;
    let elapsed = started.elapsed();
    println!("unreachable endpoint: probe returned after {elapsed:.2?}: {outcome:?}");
    let err = outcome
        .unwrap_or_else(|_| {
            panic!("probe of an unreachable endpoint still running after {elapsed:?}")
        })
        .expect_err("probe of an unreachable endpoint must fail");
    assert!(
        !matches!(err, StoreError::Rejected(_) | StoreError::NotFound(_)),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("probe"),
        "error does not say what failed: {text}"
    );
    assert!(
        text.contains(&endpoint) || text.contains("127.0.0.1"),
        "error does not name the endpoint: {text}"
    );
}

/// Accepts TCP connections and never answers (a hung or black-holed S3 front end).
async fn silent_listener() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (endpoint, task)
}

/// A server that accepts but never answers is bounded only by the HTTP request timeout
/// (object_store default 30 s; conditional PUTs are not retried on timeout). `aws_timeout`
/// passed through `OpenOptions::s3` bounds the probe.
#[tokio::test]
async fn probe_of_silent_s3_is_bounded_by_the_request_timeout() {
    support::init_tracing();
    let (endpoint, task) = silent_listener().await;
    let mut opts = support::s3_options(&endpoint);
    opts.s3.insert("aws_timeout".to_owned(), "2s".to_owned());
    let store = RunStore::open(&s3_url("silent"), &opts).unwrap();
    let started = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(60), store.probe()).await;
    let elapsed = started.elapsed();
    task.abort();
    println!("silent endpoint: probe returned after {elapsed:.2?}: {outcome:?}");
    let err = outcome
        .unwrap_or_else(|_| panic!("probe of a silent endpoint still running after {elapsed:?}"))
        .expect_err("probe of a silent endpoint must fail");
    assert!(err.to_string().contains("probe"), "{err}");
    assert!(
        elapsed < Duration::from_secs(20),
        "aws_timeout=2s not honoured: {elapsed:?}"
    );
}
