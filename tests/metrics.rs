//! The metrics / health endpoint of a real worker process over a real broker: `/healthz`,
//! `/readyz` through a broker outage, `/metrics` counters after a create, a rejected command
//! and requests, `$SRV.STATS` agreeing with them, the HTTP API's requests by route, method and
//! status, and `RMOS_METRICS_ADDR=off`.

mod support;

use support::{ensure, eventually, http, scrape};

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::Value;
use support::worker::*;

fn get(m: &HashMap<String, f64>, series: &str) -> f64 {
    *m.get(series)
        .unwrap_or_else(|| panic!("{series} not exposed; have: {:?}", m.keys()))
}

/// Sum of every series of `name` whose labels contain `label`.
fn sum(m: &HashMap<String, f64>, name: &str, label: &str, exclude: Option<&str>) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with(&format!("{name}{{")) && k.contains(label))
        .filter(|(k, _)| exclude.is_none_or(|x| !k.contains(x)))
        .map(|(_, v)| *v)
        .sum()
}

/// TCP ports the process `pid` listens on (Linux: its socket fds matched against
/// `/proc/<pid>/net/tcp{,6}` entries in state LISTEN).
fn listening_ports(pid: libc::pid_t) -> Vec<u16> {
    let inodes: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read fds")
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && f[3] == "0A" && inodes.contains(f[9]) {
                let port = f[1].rsplit(':').next().unwrap_or("0");
                ports.push(u16::from_str_radix(port, 16).expect("hex port"));
            }
        }
    }
    ports.sort_unstable();
    ports
}

/// The metrics address, and no API listener (its default port is fixed, so workers of
/// concurrent tests would compete for it); a test that wants one sets `RMOS_HTTP_ADDR` after.
fn metrics_env(addr: &str) -> Vec<(String, String)> {
    vec![
        ("RMOS_METRICS_ADDR".to_owned(), addr.to_owned()),
        ("RMOS_HTTP_ADDR".to_owned(), "off".to_owned()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_readiness_through_a_broker_outage() {
    let mut env = Env::new().await;
    let port = support::free_port();
    let api_port = support::free_port();
    let mut vars = metrics_env(&format!("127.0.0.1:{port}"));
    vars.push(("RMOS_HTTP_ADDR".to_owned(), format!("127.0.0.1:{api_port}")));
    let worker = Worker::start_with(&env.nats, &env.runs_dir(), "metrics", &vars).await;
    let mut ports = vec![port, api_port];
    ports.sort_unstable();
    assert_eq!(listening_ports(worker.pid()), ports);

    assert_eq!(http(port, "GET", "/healthz").await, (200, "ok\n".into()));
    let (status, body) = http(port, "GET", "/readyz").await;
    assert_eq!(status, 200, "{body}; log:\n{}", worker.log());
    assert_eq!(http(port, "GET", "/nope").await.0, 404);
    assert_eq!(http(port, "POST", "/metrics").await.0, 405);
    let (status, head_body) = http(port, "HEAD", "/healthz").await;
    assert_eq!((status, head_body.as_str()), (200, ""));

    // The start-up wait already sent `get`s: compare differences, not absolute values.
    let before = scrape(port).await;
    assert_eq!(
        get(
            &before,
            &format!(
                "rmos_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );
    let events = env.events().await;

    let create_rid = rid("create");
    env.publish(
        "create",
        &create_rid,
        bytes_of(&create_payload(Some("run_00000000000a"), "T1")),
    )
    .await;
    let ev = events.one(&create_rid, EVENT_TIMEOUT, &worker).await;
    assert_eq!(ev.kind, "stored", "{:?}", ev.body);

    let bad_rid = rid("bad");
    env.publish("patch_meta", &bad_rid, "{ not json").await;
    let ev = events.one(&bad_rid, EVENT_TIMEOUT, &worker).await;
    assert_eq!(ev.kind, "rejected", "{:?}", ev.body);
    assert_eq!(ev.body["code"], "invalid_request");

    env.get_ok("run_00000000000a").await;
    let (status, _) = env
        .request("get", &rid("missing"), "run_00000000000b")
        .await;
    assert_eq!(status.as_deref(), Some("404"));

    let expected: [(&str, f64); 11] = [
        (
            r#"rmos_commands_total{subject="create",outcome="stored"}"#,
            1.0,
        ),
        (
            r#"rmos_commands_total{subject="create",outcome="rejected"}"#,
            0.0,
        ),
        (
            r#"rmos_commands_total{subject="patch_meta",outcome="rejected"}"#,
            1.0,
        ),
        (
            r#"rmos_commands_total{subject="patch_meta",outcome="retried"}"#,
            0.0,
        ),
        (
            r#"rmos_command_duration_seconds_count{subject="create"}"#,
            1.0,
        ),
        (r#"rmos_dead_letters_total{code="invalid_request"}"#, 1.0),
        (r#"rmos_requests_total{endpoint="get",code="ok"}"#, 1.0),
        (
            r#"rmos_requests_total{endpoint="get",code="not_found"}"#,
            1.0,
        ),
        (
            r#"rmos_request_duration_seconds_count{endpoint="get"}"#,
            2.0,
        ),
        ("rmos_redeliveries_total", 0.0),
        (r#"rmos_store_errors_total{kind="unavailable"}"#, 0.0),
    ];
    // Counters move right after the ack / reply, which may trail the event the test saw.
    eventually(Duration::from_secs(10), async || {
        let after = scrape(port).await;
        for (series, delta) in expected {
            let d = get(&after, series) - get(&before, series);
            if d != delta {
                return Err(format!("{series}: +{d}, expected +{delta}"));
            }
        }
        match get(&after, "rmos_in_flight_commands") {
            0.0 => Ok(()),
            n => Err(format!("{n} commands in flight")),
        }
    })
    .await;

    // The HTTP API's requests, by route pattern (not the path), method and status; the
    // API address had no request before these.
    assert_eq!(
        http(api_port, "GET", "/api/rmos/runs/run_00000000000a")
            .await
            .0,
        200
    );
    assert_eq!(
        http(api_port, "GET", "/api/rmos/runs/run_00000000000b")
            .await
            .0,
        404
    );
    assert_eq!(http(api_port, "GET", "/no/such/path").await.0, 404);
    let run_route = r#"route="/api/rmos/runs/{run_id}""#;
    let http_expected = [
        (
            format!(r#"rmos_http_requests_total{{{run_route},method="GET",status="200"}}"#),
            1.0,
        ),
        (
            format!(r#"rmos_http_requests_total{{{run_route},method="GET",status="404"}}"#),
            1.0,
        ),
        (
            r#"rmos_http_requests_total{route="unmatched",method="GET",status="404"}"#.to_owned(),
            1.0,
        ),
        (
            format!("rmos_http_request_duration_seconds_count{{{run_route}}}"),
            2.0,
        ),
        (
            r#"rmos_http_request_duration_seconds_count{route="unmatched"}"#.to_owned(),
            1.0,
        ),
    ];
    eventually(Duration::from_secs(10), async || {
        let m = scrape(port).await;
        for (series, n) in &http_expected {
            match m.get(series) {
                Some(v) if v == n => {}
                other => return Err(format!("{series}: {other:?}, expected {n}")),
            }
        }
        let raw_paths: Vec<&String> = m.keys().filter(|k| k.contains("run_00000000000")).collect();
        ensure(raw_paths.is_empty(), || {
            format!("a raw path became a label: {raw_paths:?}")
        })
    })
    .await;

    // `nats micro stats` agrees with the metrics, error replies included.
    eventually(Duration::from_secs(10), async || {
        let reply = env
            .client
            .request("$SRV.STATS.rmos-runs", "".into())
            .await
            .map_err(|e| e.to_string())?;
        let stats: Value = serde_json::from_slice(&reply.payload).map_err(|e| e.to_string())?;
        let m = scrape(port).await;
        for name in ["get", "list", "verify"] {
            let ep = stats["endpoints"]
                .as_array()
                .and_then(|a| a.iter().find(|e| e["name"] == name))
                .ok_or(format!("no endpoint {name} in {stats}"))?;
            let label = format!("endpoint=\"{name}\"");
            let requests = sum(&m, "rmos_requests_total", &label, None);
            let errors = sum(&m, "rmos_requests_total", &label, Some("code=\"ok\""));
            if ep["num_requests"].as_f64() != Some(requests)
                || ep["num_errors"].as_f64() != Some(errors)
            {
                return Err(format!(
                    "{name}: $SRV.STATS {ep} vs metrics {requests} requests, {errors} errors"
                ));
            }
        }
        let get_ep = stats["endpoints"]
            .as_array()
            .and_then(|a| a.iter().find(|e| e["name"] == "get"))
            .expect("get endpoint");
        assert_eq!(get_ep["last_error"], "404:not_found", "{get_ep}");
        assert_eq!(
            get_ep["data"]["errors_by_code"]["not_found"].as_f64(),
            Some(get(
                &m,
                r#"rmos_requests_total{endpoint="get",code="not_found"}"#
            )),
            "{get_ep}"
        );
        Ok(())
    })
    .await;

    // Broker gone: not ready, naming the broker; still alive.
    env.nats.stop().await;
    eventually(Duration::from_secs(15), async || {
        match http(port, "GET", "/readyz").await {
            (503, body) if body.lines().any(|l| l.starts_with("broker:")) => Ok(()),
            other => Err(format!("/readyz with the broker down: {other:?}")),
        }
    })
    .await;
    assert_eq!(http(port, "GET", "/healthz").await.0, 200);

    // Broker back: ready again once the client has reconnected.
    env.nats.restart().await;
    eventually(Duration::from_secs(30), async || {
        match http(port, "GET", "/readyz").await {
            (200, _) => Ok(()),
            other => Err(format!(
                "/readyz after the broker came back: {other:?}; log:\n{}",
                worker.log()
            )),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_off_starts_no_listener() {
    let env = Env::new().await;
    let worker = Worker::start_with(&env.nats, &env.runs_dir(), "off", &metrics_env("off")).await;
    assert_eq!(listening_ports(worker.pid()), Vec::<u16>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_metrics_addr_in_use_stops_start_up() {
    let env = Env::new().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_rmos-runs"))
        .arg("serve")
        .env("NATS_URL", env.nats.url())
        .env("RMOS_RUNS_DIR", env.runs_dir())
        .env("RMOS_METRICS_ADDR", &addr)
        .env("RMOS_HTTP_ADDR", "off")
        .env("RUST_LOG", "warn")
        .env_remove("RMOS_STORE_URL")
        .env_remove("RMOS_CONFIG")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .expect("worker exits")
        .expect("run worker");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("metrics_addr {addr}")),
        "the reason names the key and address: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_outage_shows_in_readiness_and_store_errors() {
    let env = Env::new().await;
    let s3 = support::S3Server::start().await;
    let bucket = support::unique_bucket();
    s3.create_bucket(&bucket).await;
    let port = support::free_port();
    let mut vars = s3.env_for(&bucket);
    vars.push(("RMOS_STORE_URL".into(), format!("s3://{bucket}/runs")));
    vars.extend(metrics_env(&format!("127.0.0.1:{port}")));
    let worker = Worker::start_with(&env.nats, &env.runs_dir(), "s3", &vars).await;
    let (status, body) = http(port, "GET", "/readyz").await;
    assert_eq!(status, 200, "{body}; log:\n{}", worker.log());
    let before = scrape(port).await;

    drop(s3); // the store goes away
    eventually(Duration::from_secs(20), async || {
        match http(port, "GET", "/readyz").await {
            (503, body) if body.lines().any(|l| l.starts_with("store ")) => Ok(()),
            other => Err(format!("/readyz with the store down: {other:?}")),
        }
    })
    .await;
    let (status, _) = env.request("get", &rid("outage"), "run_0000000005e3").await;
    assert_eq!(status.as_deref(), Some("503"));
    env.publish(
        "create",
        &rid("during-outage"),
        create_payload(Some("run_0000000005e4"), "T1").to_string(),
    )
    .await;
    eventually(Duration::from_secs(60), async || {
        let m = scrape(port).await;
        let d = |s: &str| get(&m, s) - get(&before, s);
        let unavailable = d(r#"rmos_requests_total{endpoint="get",code="storage_unavailable"}"#);
        let retried = d(r#"rmos_commands_total{subject="create",outcome="retried"}"#);
        let store_errors = d(r#"rmos_store_errors_total{kind="unavailable"}"#);
        let rejected = d(r#"rmos_commands_total{subject="create",outcome="rejected"}"#);
        if unavailable == 1.0 && retried >= 1.0 && store_errors >= 2.0 && rejected == 0.0 {
            Ok(())
        } else {
            Err(format!(
                "get 503s +{unavailable}, create retried +{retried}, rejected +{rejected}, \
                 store errors +{store_errors}"
            ))
        }
    })
    .await;
}
