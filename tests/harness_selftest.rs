//! Self-test of the integration-test harness (`tests/support`): the real dependencies start on
//! free loopback ports and behave the way the other integration tests rely on.

mod support;

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use support::{NatsServer, S3Server, StripConditionalProxy};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;

/// Connect to a NATS port and return the `INFO {...}` payload the server sends on connect.
async fn read_info(port: u16) -> serde_json::Value {
    let stream = tokio::time::timeout(
        Duration::from_secs(5),
        TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    .expect("connect timed out")
    .expect("connect");
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(5),
        BufReader::new(stream).read_line(&mut line),
    )
    .await
    .expect("INFO timed out")
    .expect("read INFO");
    let json = line
        .strip_prefix("INFO ")
        .unwrap_or_else(|| panic!("expected an INFO line, got {line:?}"));
    serde_json::from_str(json.trim_end()).expect("INFO payload is JSON")
}

fn s3_store(endpoint: &str, bucket: &str) -> Arc<dyn ObjectStore> {
    Arc::new(
        AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_endpoint(endpoint)
            .with_allow_http(true)
            .with_access_key_id("test")
            .with_secret_access_key("test")
            .with_region("us-east-1")
            .with_virtual_hosted_style_request(false)
            .build()
            .expect("build S3 store"),
    )
}

fn create() -> PutOptions {
    PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    }
}

fn update(e_tag: Option<String>) -> PutOptions {
    PutOptions {
        mode: PutMode::Update(UpdateVersion {
            e_tag,
            version: None,
        }),
        ..Default::default()
    }
}

#[test]
fn free_ports_are_bindable_and_buckets_unique() {
    let port = support::free_port();
    assert_ne!(port, 0);
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("free port can be bound");

    let (a, b) = (support::unique_bucket(), support::unique_bucket());
    assert_ne!(a, b);
    for name in [&a, &b] {
        assert!(name.starts_with("rmos-test-"), "{name}");
        assert!((3..=63).contains(&name.len()), "{name}");
        assert!(
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
            "{name}"
        );
    }
    support::init_tracing();
    support::init_tracing(); // idempotent
}

#[test]
fn proxy_head_rewrite_drops_conditionals_and_forces_close() {
    let head = "PUT /b/k HTTP/1.1\r\nhost: x\r\nIf-None-Match: *\r\nif-match: \"abc\"\r\n\
                connection: keep-alive\r\nContent-Length: 3\r\nX-If-Match-Not: kept";
    let out = support::rewrite_head(head);
    assert_eq!(
        out,
        "PUT /b/k HTTP/1.1\r\nhost: x\r\nContent-Length: 3\r\nX-If-Match-Not: kept\r\n\
         Connection: close\r\n\r\n"
    );
}

#[tokio::test]
async fn nats_starts_answers_info_and_restarts_on_the_same_port_and_store() {
    support::init_tracing();
    let mut nats = NatsServer::start().await;
    let port = nats.port();
    assert_eq!(nats.url(), format!("nats://127.0.0.1:{port}"));
    assert!(nats.store_dir().is_dir());

    let info = read_info(port).await;
    assert_eq!(info["port"], port, "{info}");
    assert_eq!(info["jetstream"], true, "{info}");

    // Put something in JetStream (file storage) so the restarts can prove the store survives.
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "SELFTEST".into(),
        subjects: vec!["selftest.>".into()],
        ..Default::default()
    })
    .await
    .expect("create stream");
    js.publish("selftest.a", "one".into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    drop(js);

    // Graceful stop: the port goes away.
    nats.stop().await;
    assert!(!nats.is_running());
    assert!(
        TcpStream::connect(("127.0.0.1", port)).await.is_err(),
        "port still accepting after stop"
    );

    // Restart: same port, same store.
    nats.restart().await;
    assert_eq!(nats.port(), port);
    assert_eq!(read_info(port).await["port"], port);
    let messages = stream_messages(&nats, "SELFTEST").await;
    assert_eq!(messages, 1, "stream lost across graceful restart");

    // Crash (SIGKILL) and restart: still the same port and store.
    nats.kill();
    assert!(!nats.is_running());
    nats.restart().await;
    assert_eq!(read_info(port).await["port"], port);
    assert_eq!(stream_messages(&nats, "SELFTEST").await, 1, "after kill -9");

    // restart() while running stops first.
    nats.restart().await;
    assert!(nats.is_running());
    assert_eq!(read_info(port).await["port"], port);
}

async fn stream_messages(nats: &NatsServer, name: &str) -> u64 {
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let mut stream = js
        .get_stream(name)
        .await
        .unwrap_or_else(|e| panic!("get_stream({name}): {e}\nlog:\n{}", nats.log()));
    stream.info().await.expect("stream info").state.messages
}

#[tokio::test]
async fn s3_conditional_puts_are_enforced_by_moto() {
    support::init_tracing();
    let s3 = S3Server::shared();
    let bucket = support::unique_bucket();
    s3.create_bucket(&bucket).await;
    let store = s3_store(&s3.endpoint(), &bucket);
    let path = Path::from("runs/r1.json");

    let first = store
        .put_opts(&path, PutPayload::from_static(b"v1"), create())
        .await
        .expect("first create");
    let etag = first.e_tag.clone().expect("moto returns an ETag");
    assert!(
        etag.starts_with('"') && etag.ends_with('"'),
        "ETag {etag:?} (object_store passes the header through, quotes included)"
    );

    let second = store
        .put_opts(&path, PutPayload::from_static(b"v2"), create())
        .await
        .expect_err("second create must fail");
    assert!(
        matches!(second, object_store::Error::AlreadyExists { .. }),
        "second create: {second:?}"
    );

    // Compare-and-swap: a stale ETag is refused, the current one accepted.
    let stale = store
        .put_opts(
            &path,
            PutPayload::from_static(b"x"),
            update(Some("\"00000000000000000000000000000000\"".into())),
        )
        .await
        .expect_err("stale If-Match must fail");
    assert!(
        matches!(stale, object_store::Error::Precondition { .. }),
        "stale update: {stale:?}"
    );
    let swapped = store
        .put_opts(
            &path,
            PutPayload::from_static(b"v2"),
            update(Some(etag.clone())),
        )
        .await
        .expect("update with current ETag");
    assert_ne!(swapped.e_tag.as_deref(), Some(etag.as_str()));

    // If-Match on a missing object: Precondition too (object_store maps S3's 404).
    let missing = store
        .put_opts(
            &Path::from("runs/missing.json"),
            PutPayload::from_static(b"x"),
            update(Some(etag.clone())),
        )
        .await
        .expect_err("If-Match on a missing object must fail");
    assert!(
        matches!(missing, object_store::Error::Precondition { .. }),
        "update of missing object: {missing:?}"
    );

    let got = store
        .get(&path)
        .await
        .expect("get")
        .bytes()
        .await
        .expect("body");
    assert_eq!(&got[..], b"v2");
    let meta = store.head(&path).await.expect("head");
    assert_eq!(meta.e_tag, swapped.e_tag);
}

#[tokio::test]
async fn strip_conditional_proxy_makes_conditional_puts_silently_succeed() {
    support::init_tracing();
    let s3 = S3Server::shared();
    let bucket = support::unique_bucket();
    s3.create_bucket(&bucket).await;
    let proxy = StripConditionalProxy::start(&format!("127.0.0.1:{}", s3.port())).await;
    assert_ne!(proxy.endpoint(), s3.endpoint());
    let lax = s3_store(&proxy.endpoint(), &bucket);
    let path = Path::from("runs/r1.json");

    lax.put_opts(&path, PutPayload::from_static(b"v1"), create())
        .await
        .expect("first create through proxy");
    lax.put_opts(&path, PutPayload::from_static(b"v2"), create())
        .await
        .expect("second create through proxy: the lax store must NOT refuse it");
    lax.put_opts(
        &path,
        PutPayload::from_static(b"v3"),
        update(Some("\"00000000000000000000000000000000\"".into())),
    )
    .await
    .expect("stale If-Match through proxy: the lax store must NOT refuse it");

    // Reads work through the proxy, and the direct view agrees: the last write won.
    let via_proxy = lax
        .get(&path)
        .await
        .expect("get via proxy")
        .bytes()
        .await
        .unwrap();
    assert_eq!(&via_proxy[..], b"v3");
    let direct = s3_store(&s3.endpoint(), &bucket);
    let direct_bytes = direct
        .get(&path)
        .await
        .expect("get direct")
        .bytes()
        .await
        .unwrap();
    assert_eq!(&direct_bytes[..], b"v3");

    // Dropping the proxy stops it.
    let port = proxy.port();
    drop(proxy);
    support::eventually(Duration::from_secs(5), async || {
        support::ensure(
            TcpStream::connect(("127.0.0.1", port)).await.is_err(),
            || "proxy still accepting after drop".to_owned(),
        )
    })
    .await;
}

#[tokio::test]
async fn s3_server_instances_are_independent_and_env_is_complete() {
    let s3 = S3Server::start().await;
    let bucket = support::unique_bucket();
    s3.create_bucket(&bucket).await;
    let env: std::collections::HashMap<_, _> = s3.env_for(&bucket).into_iter().collect();
    for (key, want) in [
        ("AWS_ACCESS_KEY_ID", "test".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "test".to_string()),
        ("AWS_REGION", "us-east-1".to_string()),
        ("AWS_ENDPOINT_URL", s3.endpoint()),
        ("AWS_ALLOW_HTTP", "true".to_string()),
        ("AWS_BUCKET_NAME", bucket.clone()),
    ] {
        assert_eq!(env.get(key), Some(&want), "{key}");
    }
    // The env is enough for object_store's own configuration path.
    let mut builder = AmazonS3Builder::new();
    for (k, v) in &env {
        builder = builder.with_config(k.to_ascii_lowercase().parse().expect(k), v);
    }
    let store = builder.build().expect("build from env_for");
    store
        .put(&Path::from("hello"), PutPayload::from_static(b"hi"))
        .await
        .expect("put via env_for config");

    // A bucket on this server is not on the shared one.
    let port = s3.port();
    assert_ne!(port, S3Server::shared().port());
    drop(s3);
    support::eventually(Duration::from_secs(5), async || {
        support::ensure(
            TcpStream::connect(("127.0.0.1", port)).await.is_err(),
            || "S3 server still accepting after drop".to_owned(),
        )
    })
    .await;
}
