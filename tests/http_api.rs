//! The HTTP API of a real worker process over a real broker: every endpoint of the original
//! FastAPI service and the read side beside it, with bad input and each error status; commands
//! taking the same stream as NATS publishers'; credentials per role; the refusal to serve
//! beyond loopback without them; and slow clients that cannot starve `/healthz`.

mod support;

use std::time::{Duration, Instant};

use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};
use support::free_port;
use support::worker::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A worker with its HTTP API on a free port (and `config` as its configuration file).
async fn worker_with_http(env: &Env, name: &str, config: &str) -> (Worker, String) {
    let port = free_port();
    let cfg = env.tmp.path().join(format!("{name}.toml"));
    std::fs::write(&cfg, config).expect("write config");
    let vars = [
        ("RMOS_HTTP_ADDR".to_owned(), format!("127.0.0.1:{port}")),
        ("RMOS_CONFIG".to_owned(), cfg.display().to_string()),
    ];
    let w = Worker::start_with(&env.nats, &env.runs_dir(), name, &vars).await;
    (w, format!("http://127.0.0.1:{port}"))
}

struct Api {
    http: Client,
    base: String,
    auth: Option<String>,
}

/// One answer: status, headers we check, body as JSON (or as text under `"text"`).
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    request_id: Option<String>,
    location: Option<String>,
    www_authenticate: bool,
    body: Value,
}

impl Answer {
    /// The protocol error code of an error answer.
    fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

impl Api {
    fn new(base: &str) -> Api {
        Api {
            http: Client::new(),
            base: base.to_owned(),
            auth: None,
        }
    }

    fn as_(&self, authorization: &str) -> Api {
        Api {
            http: self.http.clone(),
            base: self.base.clone(),
            auth: Some(authorization.to_owned()),
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(a) = &self.auth {
            req = req.header("Authorization", a);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.header("Content-Type", "application/json").body(b);
        }
        let r = req.send().await.unwrap_or_else(|e| panic!("{path}: {e}"));
        let status = r.status();
        let h = |k: &str| {
            r.headers()
                .get(k)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let request_id = h("x-request-id");
        let location = h("location");
        let www_authenticate = r.headers().contains_key("www-authenticate");
        let text = r.text().await.expect("body");
        let body = serde_json::from_str(&text).unwrap_or_else(|_| json!({ "text": text }));
        Answer {
            status,
            request_id,
            location,
            www_authenticate,
            body,
        }
    }

    async fn get(&self, path: &str) -> Answer {
        self.call(Method::GET, path, None, &[]).await
    }

    async fn send(&self, method: Method, path: &str, body: &Value) -> Answer {
        self.call(method, path, Some(serde_json::to_vec(body).unwrap()), &[])
            .await
    }
}

fn assert_error(a: &Answer, status: u16, code: &str, mentions: &str) {
    assert_eq!(a.status.as_u16(), status, "{a:?}");
    assert_eq!(a.code(), code, "{a:?}");
    let message = a.body["error"]["message"].as_str().unwrap_or("");
    assert!(
        message.to_lowercase().contains(&mentions.to_lowercase()),
        "message {message:?} should mention {mentions:?}"
    );
    assert_eq!(
        a.body["error"]["request_id"].as_str(),
        a.request_id.as_deref(),
        "the error body and the header carry the same request id"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_answers_like_the_nats_api() {
    let env = Env::new().await;
    // Creates and advisories over one broker message are staged (tests/large_programs.rs);
    // over this they are refused.
    let (worker, base) = worker_with_http(&env, "http", "[http]\nmax_body_bytes = 8388608\n").await;
    let api = Api::new(&base);

    // create: 201, Location, the stored record, the caller's request id echoed.
    let mut payload = create_payload(Some("run_0000000000a1"), "T102");
    payload["outputs"]["gcode_text"] = json!("G21\nG90\nG0 X0 Y0\nG1 X10 Y0 F300\nG1 X10 Y5\n");
    payload["decision"]["risk_level"] = json!("RED");
    let a = api
        .call(
            Method::POST,
            "/api/rmos/runs",
            Some(serde_json::to_vec(&payload).unwrap()),
            &[("X-Request-Id", "req-http-create-1")],
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{a:?}\n{}", worker.log());
    assert_eq!(a.request_id.as_deref(), Some("req-http-create-1"));
    assert_eq!(
        a.location.as_deref(),
        Some("/api/rmos/runs/run_0000000000a1")
    );
    assert_eq!(a.body["run_id"], "run_0000000000a1");
    assert_eq!(a.body["revision"], 1);
    assert_eq!(a.body["meta"]["request_id"], "req-http-create-1");

    // The same create again: already applied, 200, nothing changed.
    let again = api.send(Method::POST, "/api/rmos/runs", &payload).await;
    assert_eq!(again.status, StatusCode::OK, "{again:?}");
    assert_eq!(again.body["revision"], 1);
    // Different content under the same run id: 409 conflict.
    let mut other = payload.clone();
    other["tool_id"] = json!("T999");
    let c = api.send(Method::POST, "/api/rmos/runs", &other).await;
    assert_error(&c, 409, "conflict", "run_0000000000a1");

    // get: the same record as NATS gives.
    let g = api.get("/api/rmos/runs/run_0000000000a1").await;
    assert_eq!(g.status, StatusCode::OK);
    let over_nats = env.get_ok("run_0000000000a1").await;
    assert_eq!(g.body, over_nats);
    assert!(g.request_id.is_some());

    // A second run, created over NATS, shows up in the list: newest first, filters.
    let events = env.events().await;
    let r = rid("nats-create");
    env.publish(
        "create",
        &r,
        bytes_of(&create_payload(Some("run_0000000000b2"), "T7")),
    )
    .await;
    events.one(&r, EVENT_TIMEOUT, &worker).await;
    let l = api.get("/api/rmos/runs").await;
    assert_eq!(l.status, StatusCode::OK, "{l:?}");
    let ids: Vec<&str> = l.body["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["run_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["run_0000000000b2", "run_0000000000a1"]);
    let red = api.get("/api/rmos/runs?risk_level=RED&limit=10").await;
    assert_eq!(red.body["runs"].as_array().unwrap().len(), 1, "{red:?}");
    assert_eq!(red.body["runs"][0]["run_id"], "run_0000000000a1");
    let t7 = api.get("/api/rmos/runs?tool_id=T7&order=oldest").await;
    assert_eq!(t7.body["runs"][0]["run_id"], "run_0000000000b2", "{t7:?}");
    let paged = api.get("/api/rmos/runs?limit=1").await;
    let cursor = paged.body["next_cursor"].as_str().expect("a next page");
    let page2 = api
        .get(&format!("/api/rmos/runs?limit=1&cursor={cursor}"))
        .await;
    assert_eq!(page2.body["runs"][0]["run_id"], "run_0000000000a1");

    // patch meta: the body of the original service, the run as it stands after.
    let p = api
        .send(
            Method::PATCH,
            "/api/rmos/runs/run_0000000000a1/meta",
            &json!({"meta_updates": {"operator": "kim", "verified": true}}),
        )
        .await;
    assert_eq!(p.status, StatusCode::OK, "{p:?}");
    assert_eq!(p.body["revision"], 2);
    assert_eq!(p.body["meta"]["operator"], "kim");

    // advisory, then its body.
    let adv = api
        .send(
            Method::POST,
            "/api/rmos/runs/run_0000000000a1/advisory",
            &json!({"advisory_id": "adv_0000000000c3", "kind": "explanation",
                    "body": {"text": "Feed reduced: thin wall"},
                    "explanation_status": "READY", "explanation_summary": "Feed reduced"}),
        )
        .await;
    assert_eq!(adv.status, StatusCode::OK, "{adv:?}");
    assert_eq!(adv.body["revision"], 3);
    assert_eq!(adv.body["explanation_status"], "READY");
    let body = api
        .get("/api/rmos/runs/run_0000000000a1/advisories/adv_0000000000c3")
        .await;
    assert_eq!(body.status, StatusCode::OK, "{body:?}");
    assert_eq!(body.body["text"], "Feed reduced: thin wall");

    // outputs: the G-code exactly as published.
    let gcode = api
        .get("/api/rmos/runs/run_0000000000a1/outputs/gcode")
        .await;
    assert_eq!(gcode.status, StatusCode::OK);
    assert_eq!(
        gcode.body["text"],
        "G21\nG90\nG0 X0 Y0\nG1 X10 Y0 F300\nG1 X10 Y5\n"
    );
    let plan = api
        .get("/api/rmos/runs/run_0000000000a1/outputs/opplan")
        .await;
    assert_eq!(plan.body, json!({"ops": [1, 2]}));

    // history, a past revision, diff, hashes.
    let h = api.get("/api/rmos/runs/run_0000000000a1/history").await;
    assert_eq!(h.status, StatusCode::OK, "{h:?}");
    let events_seen: Vec<&str> = h.body["revisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        events_seen,
        ["created", "meta_patched", "advisory_attached"]
    );
    let first = api.get("/api/rmos/runs/run_0000000000a1?revision=1").await;
    assert_eq!(first.body["revision"], 1);
    assert!(first.body["meta"].get("operator").is_none());
    let d = api
        .get("/api/rmos/runs/run_0000000000a1/diff?from=1&to=2")
        .await;
    assert_eq!(d.status, StatusCode::OK, "{d:?}");
    let paths: Vec<&str> = d.body["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["path"].as_str().unwrap())
        .collect();
    assert!(paths.iter().any(|p| p.contains("operator")), "{paths:?}");
    let v = api.get("/api/rmos/runs/run_0000000000a1/hashes").await;
    assert_eq!(v.status, StatusCode::OK);
    assert_eq!(v.body["ok"], true, "{v:?}");

    // delete: the stored event; the run is gone.
    let del = api
        .send(
            Method::DELETE,
            "/api/rmos/runs/run_0000000000b2",
            &json!({"reason": "test"}),
        )
        .await;
    assert_eq!(del.status, StatusCode::OK, "{del:?}");
    assert_eq!(del.body["event"], "deleted");
    let gone = api.get("/api/rmos/runs/run_0000000000b2").await;
    assert_error(&gone, 404, "not_found", "run_0000000000b2");
    // A delete without a body works too (the original service took none).
    let del2 = api
        .call(Method::DELETE, "/api/rmos/runs/run_0000000000a1", None, &[])
        .await;
    assert_eq!(del2.status, StatusCode::OK, "{del2:?}");

    // Bad input: each rejection names its reason, with the protocol's status and code.
    let bad_id = api.get("/api/rmos/runs/run_NOPE").await;
    assert_error(&bad_id, 400, "invalid_request", "run_NOPE");
    let not_json = api
        .call(
            Method::POST,
            "/api/rmos/runs",
            Some(b"{not json".to_vec()),
            &[],
        )
        .await;
    assert_error(&not_json, 400, "invalid_request", "json");
    let mut unknown_field = create_payload(None, "T1");
    unknown_field["colour"] = json!("red");
    let u = api
        .send(Method::POST, "/api/rmos/runs", &unknown_field)
        .await;
    assert_error(&u, 400, "invalid_request", "colour");
    let missing = api
        .send(
            Method::PATCH,
            "/api/rmos/runs/run_00000000dead/meta",
            &json!({"meta_updates": {"a": 1}}),
        )
        .await;
    assert_error(&missing, 404, "not_found", "run_00000000dead");
    let mismatch = api
        .send(
            Method::PATCH,
            "/api/rmos/runs/run_00000000dead/meta",
            &json!({"run_id": "run_00000000beef", "meta_updates": {}}),
        )
        .await;
    assert_error(&mismatch, 400, "invalid_request", "differs");
    let q = api.get("/api/rmos/runs?limit=lots").await;
    assert_error(&q, 400, "invalid_request", "limit");
    let q = api.get("/api/rmos/runs?risk_level=PURPLE").await;
    assert_error(&q, 400, "invalid_request", "risk_level");
    let q = api.get("/api/rmos/runs?colour=red").await;
    assert_error(&q, 400, "invalid_request", "colour");
    let q = api.get("/api/rmos/runs?limit=1&limit=2").await;
    assert_error(&q, 400, "invalid_request", "twice");
    let q = api.get("/api/rmos/runs/run_0000000000a1?include=1").await;
    assert_error(&q, 400, "invalid_request", "include");
    let none = api.get("/api/rmos/nothing").await;
    assert_error(&none, 404, "not_found", "openapi");
    let method = api.call(Method::PUT, "/api/rmos/runs", None, &[]).await;
    assert_error(&method, 405, "method_not_allowed", "method");
    let huge = vec![b' '; 9 * 1024 * 1024];
    let big = api
        .call(Method::POST, "/api/rmos/runs", Some(huge), &[])
        .await;
    assert_error(&big, 413, "too_large", "http.max_body_bytes");
    let no_output = api
        .get("/api/rmos/runs/run_0000000000a1/outputs/toolpath")
        .await;
    assert_error(&no_output, 404, "not_found", "outputs are");

    // The web view and the OpenAPI document are there.
    let page = api.get("/").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        page.body["text"].as_str().unwrap_or("").contains("<html")
            || page.body["text"]
                .as_str()
                .unwrap_or("")
                .contains("<!doctype")
    );
    let doc = api.get("/openapi.json").await;
    assert_eq!(doc.body["openapi"].as_str().map(|v| &v[..2]), Some("3."));
}

/// Credentials from the configuration, each mapped to roles: every endpoint checked per role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_and_roles() {
    let env = Env::new().await;
    let reader_token = "reader-token-a8f3k2m9q7";
    let engine_token = "engine-token-z7x1c4v8b2";
    let config = format!(
        r#"
[[http.credentials]]
name = "dashboard"
roles = ["reader"]
token = "{reader_token}"

[[http.credentials]]
name = "engine"
roles = ["engine"]
token_sha256 = "{engine_sha}"

[[http.credentials]]
name = "explainer"
roles = ["advisor"]
user = "explainer"
password = "advisor-password-1"

[[http.credentials]]
name = "kim"
roles = ["operator"]
user = "kim"
password = "operator-password-1"
"#,
        engine_sha = hex_sha256(engine_token)
    );
    let (worker, base) = worker_with_http(&env, "auth", &config).await;
    let anon = Api::new(&base);
    let reader = anon.as_(&format!("Bearer {reader_token}"));
    let engine = anon.as_(&format!("Bearer {engine_token}"));
    let advisor = anon.as_(&basic("explainer", "advisor-password-1"));
    let operator = anon.as_(&basic("kim", "operator-password-1"));
    let wrong = anon.as_(&basic("kim", "not-the-password"));

    // No credentials, wrong ones: 401 with a challenge (the browser asks for basic auth).
    let a = anon.get("/api/rmos/runs").await;
    assert_error(&a, 401, "unauthorized", "authentication required");
    assert!(a.www_authenticate);
    assert_error(
        &wrong.get("/api/rmos/runs").await,
        401,
        "unauthorized",
        "not recognised",
    );
    assert_error(&anon.get("/").await, 401, "unauthorized", "authentication");
    // Probes need none.
    assert_eq!(anon.get("/healthz").await.status, StatusCode::OK);

    // Engine creates; cannot read, patch or delete.
    let created = engine
        .send(
            Method::POST,
            "/api/rmos/runs",
            &create_payload(Some("run_0000000000e1"), "T1"),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    assert_error(
        &engine.get("/api/rmos/runs/run_0000000000e1").await,
        403,
        "forbidden",
        "reader or operator",
    );
    // Reader reads; cannot create, patch, delete or attach.
    assert_eq!(
        reader.get("/api/rmos/runs/run_0000000000e1").await.status,
        StatusCode::OK
    );
    assert_eq!(reader.get("/").await.status, StatusCode::OK);
    for (method, path, body) in [
        (Method::POST, "/api/rmos/runs", create_payload(None, "T1")),
        (
            Method::PATCH,
            "/api/rmos/runs/run_0000000000e1/meta",
            json!({"meta_updates": {"x": 1}}),
        ),
        (Method::DELETE, "/api/rmos/runs/run_0000000000e1", json!({})),
        (
            Method::POST,
            "/api/rmos/runs/run_0000000000e1/advisory",
            json!({"kind": "note", "body": {"text": "x"}}),
        ),
    ] {
        let a = reader.send(method.clone(), path, &body).await;
        assert_error(&a, 403, "forbidden", "dashboard");
    }
    // Advisor attaches; cannot patch.
    let adv = advisor
        .send(
            Method::POST,
            "/api/rmos/runs/run_0000000000e1/advisory",
            &json!({"kind": "note", "body": {"text": "checked"}}),
        )
        .await;
    assert_eq!(adv.status, StatusCode::OK, "{adv:?}");
    assert_error(
        &advisor
            .send(
                Method::PATCH,
                "/api/rmos/runs/run_0000000000e1/meta",
                &json!({"meta_updates": {"x": 1}}),
            )
            .await,
        403,
        "forbidden",
        "operator",
    );
    // Operator reads, patches and deletes; cannot create.
    assert_eq!(
        operator
            .send(
                Method::PATCH,
                "/api/rmos/runs/run_0000000000e1/meta",
                &json!({"meta_updates": {"checked_by": "kim"}}),
            )
            .await
            .status,
        StatusCode::OK
    );
    // The credential's name is the actor of its commands, kept in the revision.
    let h = operator
        .get("/api/rmos/runs/run_0000000000e1/history")
        .await;
    let actors: Vec<&str> = h.body["revisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["actor"].as_str().unwrap_or("-"))
        .collect();
    assert_eq!(actors, ["engine", "explainer", "kim"], "{h:?}");
    assert_error(
        &operator
            .send(Method::POST, "/api/rmos/runs", &create_payload(None, "T1"))
            .await,
        403,
        "forbidden",
        "engine",
    );
    assert_eq!(
        operator
            .send(
                Method::DELETE,
                "/api/rmos/runs/run_0000000000e1",
                &json!({})
            )
            .await
            .status,
        StatusCode::OK
    );
    // No secret in the worker's log.
    let log = worker.full_log();
    for secret in [
        reader_token,
        engine_token,
        "advisor-password-1",
        "operator-password-1",
    ] {
        assert!(!log.contains(secret), "{secret} in the worker's log");
    }
}

fn hex_sha256(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// Bound beyond loopback without credentials, `serve` refuses to start, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_credentials_no_serving_beyond_loopback() {
    let env = Env::new().await;
    let port = free_port();
    let mut w = Worker::spawn(
        &env.nats.url(),
        &env.runs_dir(),
        "open",
        &[("RMOS_HTTP_ADDR".to_owned(), format!("0.0.0.0:{port}"))],
    );
    let status = w.wait(Duration::from_secs(20)).await;
    assert!(!status.success());
    let log = w.full_log();
    assert!(
        log.contains("not a loopback address") && log.contains("http.credentials"),
        "{log}"
    );
}

/// Opens `n` connections from `source` that each send half a request head and then nothing.
async fn half_sent(source: &str, port: u16, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut socks = Vec::with_capacity(n);
    for _ in 0..n {
        let s = tokio::net::TcpSocket::new_v4().expect("socket");
        s.bind(format!("{source}:0").parse().unwrap())
            .expect("bind source");
        let mut c = s
            .connect(format!("127.0.0.1:{port}").parse().unwrap())
            .await
            .expect("connect");
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("half a head");
        socks.push(c);
    }
    socks
}

/// Whether the server has closed `sock` (EOF or reset), looking for up to `within`.
async fn closed(sock: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 256];
    match tokio::time::timeout(within, sock.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => false,
        Err(_) => false,
    }
}

/// `/healthz` on a fresh connection from 127.0.0.1, timed.
async fn healthz(port: u16) -> (u16, Duration) {
    let started = Instant::now();
    let (status, _) = tokio::time::timeout(
        Duration::from_secs(5),
        support::http(port, "GET", "/healthz"),
    )
    .await
    .expect("healthz answered");
    (status, started.elapsed())
}

/// 1,000 idle half-sent requests do not starve `/healthz`, on both listeners; one client
/// cannot take every slot; a request head that does not arrive in time is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_cannot_starve_healthz() {
    let env = Env::new().await;
    let metrics_port = free_port();
    let config = "[http]\nheader_timeout = \"4s\"\nmax_connections_per_client = 200\n";
    let cfg = env.tmp.path().join("slow.toml");
    std::fs::write(&cfg, config).expect("config");
    let api_port = free_port();
    let _w = Worker::start_with(
        &env.nats,
        &env.runs_dir(),
        "slow",
        &[
            ("RMOS_HTTP_ADDR".to_owned(), format!("127.0.0.1:{api_port}")),
            (
                "RMOS_METRICS_ADDR".to_owned(),
                format!("127.0.0.1:{metrics_port}"),
            ),
            ("RMOS_CONFIG".to_owned(), cfg.display().to_string()),
        ],
    )
    .await;

    for port in [api_port, metrics_port] {
        // 1,000 half-sent requests from five other loopback addresses, all held open.
        let mut held = Vec::new();
        for i in 2..7 {
            held.extend(half_sent(&format!("127.0.0.{i}"), port, 200).await);
        }
        assert_eq!(held.len(), 1000);
        let (status, took) = healthz(port).await;
        assert_eq!(status, 200);
        assert!(took < Duration::from_secs(1), "/healthz took {took:?}");
        // They are still open (none was dropped to make room)...
        let mut open = 0;
        for s in held.iter_mut().step_by(50) {
            if !closed(s, Duration::from_millis(10)).await {
                open += 1;
            }
        }
        assert_eq!(
            open, 20,
            "the held connections stay open until their timeout"
        );
        // ...until the header timeout closes them.
        tokio::time::sleep(Duration::from_secs(4)).await;
        for s in held.iter_mut().step_by(50) {
            assert!(
                closed(s, Duration::from_secs(3)).await,
                "a half-sent request outlived the header timeout"
            );
        }
    }

    // One client over its cap: the extra connections are closed at once; others get in.
    let mut greedy = half_sent("127.0.0.9", api_port, 260).await;
    let mut refused = 0;
    for s in greedy.iter_mut().skip(200) {
        if closed(s, Duration::from_millis(500)).await {
            refused += 1;
        }
    }
    assert_eq!(
        refused, 60,
        "connections over the per-client cap are closed"
    );
    let (status, took) = healthz(api_port).await;
    assert_eq!(status, 200);
    assert!(took < Duration::from_secs(1), "/healthz took {took:?}");
}
