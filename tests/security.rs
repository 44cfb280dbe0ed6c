//! Security of a deployment, against real nats-server processes configured from files:
//!
//! - roles: the shipped `deploy/nats/nats-server.conf` (+ `permissions.conf`), with the worker
//!   logged in as `worker` and each role as an async-nats client; what a role may not do is
//!   refused by the broker and never takes effect;
//! - private inboxes: each role reads only replies under `_INBOX.<role>` (no role can read
//!   another's answers or PubAcks; the CLI's prefix follows `NATS_USER`), on one node and on the
//!   shipped 3-node cluster;
//! - bounded replies: the worker's credential publishes only the one reply it owes per request
//!   (`allow_responses`), reaches only its own stream and consumer on the JetStream API, and the
//!   worker refuses reply subjects that would make its answer an API call or a command;
//! - every credential kind the worker reads from its environment: user/password, token, nkey
//!   seed file (the shipped `nats-server-nkeys.conf`), a creds file (JWT) against a server in
//!   operator mode, TLS with a private CA and a client certificate (keys, JWTs and certificates
//!   made with the `openssl` CLI at test time);
//! - a wrong password is a quick one-line start-up failure, not a 30 s retry;
//! - secrets appear neither in `rmos-runs config` nor in the worker's log.
//!
//! Needs `nats-server` (like every broker test) and `openssl` on PATH.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, context::ContextBuilder};
use async_nats::{Client, ConnectOptions, HeaderMap};
use bytes::Bytes;
use serde_json::{Value, json};
use support::worker::*;
use support::{ConfiguredNatsServer, repo_root};

/// How long a refused JetStream publish waits for the PubAck that never comes.
const REFUSED_ACK_TIMEOUT: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn deploy_file(name: &str) -> String {
    let p = repo_root().join("deploy/nats").join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// A shipped single-node config turned into a test template: loopback, free ports, private
/// store. Every replaced line must exist, so an edit of the shipped file cannot silently make
/// this test run something else. The broker settings (`sync_interval: always`, limits) stay
/// as shipped.
fn shipped_template(name: &str) -> String {
    let mut text = deploy_file(name);
    for (from, to) in [
        ("host: 0.0.0.0", "host: 127.0.0.1"),
        ("port: 4222", "port: {{PORT}}"),
        ("http_port: 8222", "http_port: {{HTTP_PORT}}"),
        (
            "store_dir: \"/data/jetstream\"",
            "store_dir: \"{{STORE_DIR}}\"",
        ),
        ("max_file_store: 20GB", "max_file_store: 1GB"),
    ] {
        assert!(text.contains(from), "{name} no longer contains {from:?}");
        text = text.replacen(from, to, 1);
    }
    assert!(
        text.contains("sync_interval: always"),
        "{name}: sync_interval"
    );
    text
}

/// Spawns `rmos-runs serve` with `env` (no inherited broker settings), without waiting; logs
/// at debug so the secret checks see everything the worker could print.
fn spawn_worker(url: &str, dir: &Path, name: &str, env: &[(&str, &str)]) -> Worker {
    let mut vars: Vec<(String, String)> = vec![("RUST_LOG".into(), "debug".into())];
    vars.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    Worker::spawn(url, dir, name, &vars)
}

/// A client plus every asynchronous server error it was sent (permission violations).
struct RoleClient {
    client: Client,
    js: jetstream::Context,
    errors: Arc<Mutex<Vec<String>>>,
}

impl RoleClient {
    async fn connect(url: &str, opts: ConnectOptions) -> RoleClient {
        let errors = Arc::new(Mutex::new(Vec::new()));
        let sink = errors.clone();
        let client = opts
            .event_callback(move |event| {
                let sink = sink.clone();
                async move {
                    if let async_nats::Event::ServerError(e) = event {
                        sink.lock().unwrap().push(e.to_string());
                    }
                }
            })
            .connect(url)
            .await
            .unwrap_or_else(|e| panic!("connect {url}: {e}"));
        let js = ContextBuilder::new()
            .timeout(REFUSED_ACK_TIMEOUT)
            .build(client.clone());
        RoleClient { client, js, errors }
    }

    /// Logs in as `user` with the inbox prefix the shipped permissions give that role.
    async fn user(url: &str, user: &str, password: &str) -> RoleClient {
        Self::connect(
            url,
            ConnectOptions::with_user_and_password(user.into(), password.into())
                .custom_inbox_prefix(format!("_INBOX.{user}")),
        )
        .await
    }

    /// JetStream publish with a request id; the PubAck or the error.
    async fn publish(&self, kind: &str, rid: &str, payload: &Value) -> Result<(), String> {
        let mut h = HeaderMap::new();
        h.insert("X-Request-Id", rid);
        let ack = self
            .js
            .publish_with_headers(format!("{PREFIX}.{kind}"), h, bytes_of(payload))
            .await
            .map_err(|e| e.to_string())?;
        ack.await.map(|_| ()).map_err(|e| e.to_string())
    }

    /// A request; `Ok((error code header, body))` or the transport error.
    async fn request(&self, endpoint: &str, body: &str) -> Result<(Option<String>, Value), String> {
        self.request_within(endpoint, body, Duration::from_secs(10))
            .await
    }

    async fn request_within(
        &self,
        endpoint: &str,
        body: &str,
        timeout: Duration,
    ) -> Result<(Option<String>, Value), String> {
        let req = async_nats::Request::new()
            .payload(Bytes::from(body.to_owned()))
            .timeout(Some(timeout));
        let reply = self
            .client
            .send_request(format!("{PREFIX}.{endpoint}"), req)
            .await
            .map_err(|e| e.to_string())?;
        let code = reply
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Service-Error-Code"))
            .map(|v| v.to_string());
        let body = serde_json::from_slice(&reply.payload).unwrap_or(Value::Null);
        Ok((code, body))
    }

    /// Waits until the server reported a permissions violation naming `subject`.
    async fn violation(&self, subject: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let errors = self.errors.lock().unwrap().clone();
            if errors
                .iter()
                .any(|e| e.contains("Permissions Violation") && e.contains(subject))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no permissions violation for {subject}; server errors: {errors:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A publish that the broker must refuse: no PubAck, and a permissions violation.
    async fn refused_publish(&self, kind: &str, payload: &Value) {
        let subject = format!("{PREFIX}.{kind}");
        let r = self.publish(kind, &rid("refused"), payload).await;
        assert!(r.is_err(), "publish to {subject} was accepted");
        self.violation(&subject).await;
    }

    /// A request that the broker must refuse: no answer, and a permissions violation.
    async fn refused_request(&self, endpoint: &str, body: &str) {
        let subject = format!("{PREFIX}.{endpoint}");
        let r = self
            .request_within(endpoint, body, REFUSED_ACK_TIMEOUT)
            .await;
        assert!(r.is_err(), "request to {subject} was answered: {r:?}");
        self.violation(&subject).await;
    }
}

/// Runs `rmos-runs config` with `env`; (exit ok, stdout + stderr).
fn rmos_config(env: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rmos-runs"))
        .arg("config")
        .env_remove("RMOS_CONFIG")
        .envs(env.iter().copied())
        .output()
        .expect("rmos-runs config");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn assert_not_in_log(worker: &Worker, secret: &str, what: &str) {
    let log = std::fs::read_to_string(&worker.log).expect("worker log");
    assert!(!log.is_empty(), "worker log is empty");
    assert!(
        !log.contains(secret),
        "the {what} appears in the worker log:\n{log}"
    );
}

fn tempdir(tag: &str) -> tempfile::TempDir {
    let t = tempfile::Builder::new()
        .prefix(&format!("rmos-security-{tag}-"))
        .tempdir()
        .expect("tempdir");
    std::fs::create_dir(t.path().join("runs")).expect("runs dir");
    t
}

fn secret(tag: &str) -> String {
    format!(
        "{tag}-{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    )
}

/// Publishes a create as `who`, waits for its `stored` event (seen by `events`).
async fn create_ok(who: &RoleClient, events: &Events, worker: &Worker, run_id: &str) -> Value {
    let r = rid("create");
    who.publish("create", &r, &create_payload(Some(run_id), "T102"))
        .await
        .expect("create PubAck");
    let ev = events.one(&r, EVENT_TIMEOUT, worker).await;
    assert_eq!(ev.kind, "stored", "{:?}", ev.body);
    assert_eq!(ev.body["event"], "created");
    ev.body
}

/// The staging bucket of claim checks on the shipped permissions: the engine puts a body and
/// names it in a create, the worker (its own credential) claims and removes it, a reader
/// fetches the body the worker staged for it; the engine may not read the bucket, the reader
/// may not write it. The engine's and the advisor's CLIs stage bodies over the shipped
/// max_payload by themselves.
/// `rmos-runs <command> --file <file>` as the broker user `user`, with no other settings.
fn cli_as(
    url: &str,
    user: &str,
    password: &str,
    command: &str,
    file: &Path,
) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rmos-runs"))
        .args([command, "--file", &file.display().to_string()])
        .env("NATS_URL", url)
        .env("NATS_USER", user)
        .env("NATS_PASSWORD", password)
        .env_remove("RMOS_CONFIG")
        .env_remove("RMOS_INBOX_PREFIX")
        .env_remove("RMOS_STAGING_BUCKET")
        .output()
        .expect("run the CLI")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_staging_bucket_lets_publishers_put_and_readers_read() {
    let pw: Vec<(String, String)> = ["worker", "engine", "reader", "advisor"]
        .iter()
        .map(|r| (r.to_string(), secret(&format!("pw-{r}"))))
        .collect();
    let pass = |role: &str| pw.iter().find(|(r, _)| r == role).unwrap().1.clone();
    let mut env_names: Vec<(String, String)> = pw
        .iter()
        .map(|(r, p)| (format!("RMOS_{}_PASSWORD", r.to_uppercase()), p.clone()))
        .collect();
    env_names.push(("RMOS_OPERATOR_PASSWORD".to_owned(), secret("operator")));
    let server_env: Vec<(&str, &str)> = env_names
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let permissions = deploy_file("permissions.conf");
    let nats = ConfiguredNatsServer::start(
        &shipped_template("nats-server.conf"),
        &[("permissions.conf", &permissions)],
        &server_env,
    )
    .await;
    let url = nats.url();
    let tmp = tempdir("staging");
    let worker_pw = pass("worker");
    let mut worker = spawn_worker(
        &url,
        &tmp.path().join("runs"),
        "staging",
        &[("NATS_USER", "worker"), ("NATS_PASSWORD", &worker_pw)],
    );
    let engine = RoleClient::user(&url, "engine", &pass("engine")).await;
    let reader = RoleClient::user(&url, "reader", &pass("reader")).await;
    worker.wait_ready_with(&reader.client).await;
    let events = Events::subscribe(&engine.client).await;

    // engine: put, then a create naming it.
    let body = "G1 X1 Y2 F300\n".repeat(20_000);
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(body.as_bytes()));
    let name = format!("in/{sha}");
    let bucket = engine
        .js
        .get_object_store("rmos-runs-staging")
        .await
        .expect("engine opens the staging bucket");
    bucket
        .put(name.as_str(), &mut body.as_bytes())
        .await
        .expect("engine puts a staged body");
    let run = "run_00000000e5a1";
    let r = rid("staged");
    engine
        .publish(
            "create",
            &r,
            &json!({"mode": "cam", "tool_id": "T1", "status": "OK", "run_id": run,
                    "outputs": {"gcode_ref": {"bucket": "rmos-runs-staging", "name": name,
                                              "sha256": sha, "size_bytes": body.len()}}}),
        )
        .await
        .expect("create PubAck");
    let ev = events.one(&r, EVENT_TIMEOUT, &worker).await;
    assert_eq!(ev.kind, "stored", "{:?}", ev.body);
    // The worker removed the claimed object (a deletion marker is all that is left).
    let info = bucket.info(name.as_str()).await;
    assert!(
        info.as_ref().map_or(true, |i| i.deleted),
        "claimed object left: {info:?}"
    );
    // engine: no reading the bucket.
    bucket
        .put("in/other", &mut "G0".as_bytes())
        .await
        .expect("engine puts a second body");
    // Opening only reads the object's metadata; reading its chunks needs a consumer.
    let read = async {
        let mut object = bucket.get("in/other").await.map_err(|e| e.to_string())?;
        let mut v = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut object, &mut v)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<Vec<u8>, String>(v)
    };
    let read = tokio::time::timeout(Duration::from_secs(5), read).await;
    assert!(!matches!(read, Ok(Ok(_))), "the engine read a staged body");

    // reader: the worker stages the body on request, the reader reads it; no writing.
    let (code, reply) = reader
        .request(
            "get",
            &json!({"run_id": run, "output": "gcode"}).to_string(),
        )
        .await
        .unwrap();
    assert_eq!(code, None, "{reply}");
    let staged_name = reply["staged"]["name"].as_str().expect("staged").to_owned();
    let rbucket = reader
        .js
        .get_object_store("rmos-runs-staging")
        .await
        .expect("reader opens the staging bucket");
    let mut object = rbucket
        .get(staged_name.as_str())
        .await
        .expect("reader gets the staged body");
    let mut got = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut object, &mut got)
        .await
        .expect("reader reads the staged body");
    assert!(got == body.as_bytes(), "staged body differs");
    assert!(
        rbucket
            .put("in/reader", &mut "G0".as_bytes())
            .await
            .is_err(),
        "the reader put into the staging bucket"
    );

    // The CLI as the engine, over the shipped max_payload: it stages by itself, twice with the
    // same program (the second put lands on the first one's deletion marker, which the engine
    // may not purge), and both runs are stored.
    let big = "G1 X10.000 Y20.000 Z-1.000 F1500\n".repeat(300_000);
    let engine_pw = pass("engine");
    for run in ["run_00000000e5b1", "run_00000000e5b2"] {
        let file = tmp.path().join(format!("{run}.json"));
        std::fs::write(
            &file,
            json!({"mode": "cam", "tool_id": "T1", "status": "OK", "run_id": run,
                   "outputs": {"gcode_text": big}})
            .to_string(),
        )
        .unwrap();
        let out = cli_as(&url, "engine", &engine_pw, "create", &file);
        assert!(
            out.status.success(),
            "engine CLI create {run}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (code, reply) = reader
            .request("verify", &json!({"run_id": run}).to_string())
            .await
            .unwrap();
        assert_eq!((code, &reply["ok"]), (None, &json!(true)), "{reply}");
    }

    // The CLI as the advisor: an advisory body over the shipped max_payload is staged as its
    // canonical JSON, claimed by the worker, and attached.
    let text = "Feed rate reduced because the wall is thin. ".repeat(220_000);
    let file = tmp.path().join("advisory.json");
    std::fs::write(
        &file,
        json!({"run_id": "run_00000000e5b1", "advisory_id": "adv_00000000e5b1",
               "kind": "explanation", "body": {"text": text}})
        .to_string(),
    )
    .unwrap();
    let out = cli_as(&url, "advisor", &pass("advisor"), "attach-advisory", &file);
    assert!(
        out.status.success(),
        "advisor CLI attach-advisory: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, a) = reader
        .request("get", &json!({"run_id": "run_00000000e5b1"}).to_string())
        .await
        .unwrap();
    assert_eq!(code, None, "{a}");
    let canonical = rmos_runs::domain::hashing::canonical_json(&json!({"text": text}));
    assert!(
        canonical.len() > 8 * 1024 * 1024,
        "over the shipped max_payload"
    );
    assert_eq!(
        a["advisory_inputs"][0]["body"]["size_bytes"],
        canonical.len() as u64,
        "{a}"
    );
    assert_worker_never_refused(&worker);
}

// ---------------------------------------------------------------------------------------------
// Roles (shipped config, user/password)
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_from_the_shipped_config_allow_only_their_subjects() {
    let pw: Vec<(String, String)> = ["worker", "engine", "advisor", "reader", "operator"]
        .iter()
        .map(|r| (r.to_string(), secret(&format!("pw-{r}"))))
        .collect();
    let pass = |role: &str| pw.iter().find(|(r, _)| r == role).unwrap().1.clone();
    let env_names: Vec<(String, String)> = pw
        .iter()
        .map(|(r, p)| (format!("RMOS_{}_PASSWORD", r.to_uppercase()), p.clone()))
        .collect();
    let server_env: Vec<(&str, &str)> = env_names
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let permissions = deploy_file("permissions.conf");
    let nats = ConfiguredNatsServer::start(
        &shipped_template("nats-server.conf"),
        &[("permissions.conf", &permissions)],
        &server_env,
    )
    .await;
    let url = nats.url();

    // No credentials, or a wrong password: refused at connect.
    let anon = async_nats::connect(&url).await;
    assert!(anon.is_err(), "anonymous connection accepted");
    let wrong = ConnectOptions::with_user_and_password("engine".into(), "nope".into())
        .connect(&url)
        .await;
    assert!(wrong.is_err(), "wrong password accepted");

    let tmp = tempdir("roles");
    let worker_pw = pass("worker");
    let mut worker = spawn_worker(
        &url,
        &tmp.path().join("runs"),
        "roles",
        &[("NATS_USER", "worker"), ("NATS_PASSWORD", &worker_pw)],
    );
    let engine = RoleClient::user(&url, "engine", &pass("engine")).await;
    let reader = RoleClient::user(&url, "reader", &pass("reader")).await;
    let advisor = RoleClient::user(&url, "advisor", &pass("advisor")).await;
    let operator = RoleClient::user(&url, "operator", &pass("operator")).await;
    worker.wait_ready_with(&reader.client).await;
    // The engine may watch the outcome events of what it publishes.
    let events = Events::subscribe(&engine.client).await;

    // engine: create yes (PubAck + stored event) ...
    let run = "run_00000000e001";
    let created = create_ok(&engine, &events, &worker, run).await;
    assert_eq!(created["source"]["stream_seq"], 1, "{created}");
    // ... delete, patch_meta, advisory and requests no.
    engine
        .refused_publish("delete", &json!({"run_id": run, "reason": "engine"}))
        .await;
    engine
        .refused_publish(
            "patch_meta",
            &json!({"run_id": run, "meta_updates": {"by": "engine"}}),
        )
        .await;
    engine.refused_request("get", run).await;

    // reader: get yes; create, patch_meta, delete no.
    let (code, got) = reader.request("get", run).await.expect("reader get");
    assert_eq!(code, None, "{got}");
    assert_eq!(got["run_id"], run);
    assert_eq!(got["revision"], 1);
    let (code, listed) = reader.request("list", "{}").await.expect("reader list");
    assert_eq!(code, None, "{listed}");
    reader
        .refused_publish("create", &create_payload(Some("run_00000000e002"), "T1"))
        .await;
    reader
        .refused_publish(
            "patch_meta",
            &json!({"run_id": run, "meta_updates": {"by": "reader"}}),
        )
        .await;
    reader
        .refused_publish("delete", &json!({"run_id": run, "reason": "reader"}))
        .await;
    // The reader may not listen to the events either.
    let sub = reader.client.subscribe(format!("{PREFIX}.stored")).await;
    drop(sub);
    reader.violation(&format!("{PREFIX}.stored")).await;

    // advisor: advisory yes; create, delete, get no.
    let r = rid("advisory");
    advisor
        .publish(
            "advisory",
            &r,
            &json!({"run_id": run, "kind": "explanation", "body": {"text": "why"},
                    "explanation_status": "READY"}),
        )
        .await
        .expect("advisory PubAck");
    let ev = events.one(&r, EVENT_TIMEOUT, &worker).await;
    assert_eq!(ev.body["event"], "advisory_attached", "{:?}", ev.body);
    assert_eq!(ev.body["source"]["stream_seq"], 2, "{:?}", ev.body);
    advisor
        .refused_publish("create", &create_payload(Some("run_00000000e003"), "T1"))
        .await;
    advisor
        .refused_publish("delete", &json!({"run_id": run, "reason": "advisor"}))
        .await;
    advisor.refused_request("get", run).await;

    // operator: the refused commands never took effect (revision 2 = create + advisory, no
    // meta from anyone, nothing else in the stream: the next command is stream_seq 3).
    let (code, got) = operator.request("get", run).await.expect("operator get");
    assert_eq!(code, None, "{got}");
    assert_eq!(got["revision"], 2, "{got}");
    assert!(got["meta"].get("by").is_none(), "{got}");
    let (code, report) = operator
        .request("verify", &json!({"run_id": run}).to_string())
        .await
        .expect("operator verify");
    assert_eq!(code, None, "{report}");
    let r = rid("patch");
    operator
        .publish(
            "patch_meta",
            &r,
            &json!({"run_id": run, "meta_updates": {"verified": true}}),
        )
        .await
        .expect("patch PubAck");
    let ev = events.one(&r, EVENT_TIMEOUT, &worker).await;
    assert_eq!(ev.body["event"], "meta_patched", "{:?}", ev.body);
    assert_eq!(ev.body["source"]["stream_seq"], 3, "{:?}", ev.body);
    // operator: delete yes; the run is gone.
    let r = rid("delete");
    operator
        .publish("delete", &r, &json!({"run_id": run, "reason": "retention"}))
        .await
        .expect("delete PubAck");
    let ev = events.one(&r, EVENT_TIMEOUT, &worker).await;
    assert_eq!(ev.body["event"], "deleted", "{:?}", ev.body);
    assert_eq!(ev.body["source"]["stream_seq"], 4, "{:?}", ev.body);
    let (code, _) = reader.request("get", run).await.expect("get after delete");
    assert_eq!(code.as_deref(), Some("404"));
    // operator may not create.
    operator
        .refused_publish("create", &create_payload(Some("run_00000000e004"), "T1"))
        .await;
    assert!(
        events.snapshot().iter().all(|e| e.kind == "stored"),
        "{:?}",
        events.snapshot()
    );

    // The worker did all of that within its rights.
    assert_worker_never_refused(&worker);

    // Secrets: masked by `rmos-runs config`, absent from the (debug-level) worker log.
    let (ok, shown) = rmos_config(&[("NATS_USER", "worker"), ("NATS_PASSWORD", &worker_pw)]);
    assert!(ok, "{shown}");
    assert!(
        !shown.contains(&worker_pw),
        "config shows the password:\n{shown}"
    );
    assert!(shown.contains("****"), "{shown}");
    worker.sigterm();
    let status = worker.wait(Duration::from_secs(20)).await;
    assert!(status.success(), "{status}; log:\n{}", worker.log());
    assert_not_in_log(&worker, &worker_pw, "worker password");
}

// ---------------------------------------------------------------------------------------------
// Private inboxes and bounded replies (shipped config, user/password)
// ---------------------------------------------------------------------------------------------

const ROLES: [&str; 5] = ["worker", "engine", "advisor", "reader", "operator"];

/// The shipped single-node configuration with a random password per role, and a worker
/// logged in as `worker` (its inbox prefix derived from the user name, as shipped).
struct ShippedBroker {
    nats: ConfiguredNatsServer,
    passwords: Vec<(String, String)>,
    worker: Worker,
    _tmp: tempfile::TempDir,
}

impl ShippedBroker {
    async fn start(tag: &str) -> ShippedBroker {
        Self::start_with(tag, &[]).await
    }

    /// Like [`ShippedBroker::start`], with more environment for the worker.
    async fn start_with(tag: &str, worker_env: &[(&str, &str)]) -> ShippedBroker {
        let passwords: Vec<(String, String)> = ROLES
            .iter()
            .map(|r| (r.to_string(), secret(&format!("pw-{r}"))))
            .collect();
        let env: Vec<(String, String)> = passwords
            .iter()
            .map(|(r, p)| (format!("RMOS_{}_PASSWORD", r.to_uppercase()), p.clone()))
            .collect();
        let env_refs: Vec<(&str, &str)> =
            env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let nats = ConfiguredNatsServer::start(
            &shipped_template("nats-server.conf"),
            &[("permissions.conf", &deploy_file("permissions.conf"))],
            &env_refs,
        )
        .await;
        let tmp = tempdir(tag);
        let worker_pw = passwords[0].1.clone();
        let mut env = vec![
            ("NATS_USER", "worker"),
            ("NATS_PASSWORD", worker_pw.as_str()),
        ];
        env.extend_from_slice(worker_env);
        let worker = spawn_worker(&nats.url(), &tmp.path().join("runs"), tag, &env);
        ShippedBroker {
            nats,
            passwords,
            worker,
            _tmp: tmp,
        }
    }

    fn password(&self, role: &str) -> String {
        self.passwords
            .iter()
            .find(|(r, _)| r == role)
            .map(|(_, p)| p.clone())
            .unwrap_or_else(|| panic!("no role {role}"))
    }

    /// A client of `role` on the inbox prefix the shipped permissions give it.
    async fn client(&self, role: &str) -> RoleClient {
        RoleClient::user(&self.nats.url(), role, &self.password(role)).await
    }

    /// A client of `role` on an inbox prefix of the caller's choosing.
    async fn client_with_inbox(&self, role: &str, prefix: &str) -> RoleClient {
        RoleClient::connect(
            &self.nats.url(),
            ConnectOptions::with_user_and_password(role.into(), self.password(role))
                .custom_inbox_prefix(prefix),
        )
        .await
    }

    /// `rmos-runs <args>` as `role` with only the user and password set (so the inbox prefix
    /// is the CLI's default for that user), plus `env`; (exit code, stdout, stderr).
    fn cli(&self, role: &str, args: &[&str], stdin: &[u8], env: &[(&str, &str)]) -> Output {
        use std::io::Write;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rmos-runs"));
        for var in [
            "RMOS_CONFIG",
            "RMOS_INBOX_PREFIX",
            "RMOS_SUBJECT_PREFIX",
            "RMOS_INGEST",
            "NATS_TOKEN",
            "NATS_CREDS",
            "NATS_NKEY",
        ] {
            cmd.env_remove(var);
        }
        let mut child = cmd
            .args(["--json", "--timeout", "5s"])
            .args(args)
            .env("NATS_URL", self.nats.url())
            .env("NATS_USER", role)
            .env("NATS_PASSWORD", self.password(role))
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn rmos-runs");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin)
            .expect("write stdin");
        let out = child.wait_with_output().expect("rmos-runs output");
        Output {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// What a CLI run printed, and how it exited.
struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Asserts that the broker refused the worker nothing: every stream, consumer, pull, ack, event,
/// reply and services subscription it used was within its rights (async-nats logs each server
/// error at debug level, which these workers run at).
fn assert_worker_never_refused(worker: &Worker) {
    let log = std::fs::read_to_string(&worker.log).expect("worker log");
    assert!(
        log.contains("DEBUG"),
        "the worker does not log at debug level:\n{log}"
    );
    assert!(
        !log.contains("Permissions Violation"),
        "the broker refused the worker something:\n{log}"
    );
}

/// Asserts that `sub` receives nothing within `within` (it was refused, or nobody may send
/// there).
/// `spy` subscribes to `subject`: the broker refuses it (the violation comes back); the
/// subscription is returned so the caller can show it receives nothing.
async fn refused_subscription(spy: &RoleClient, subject: &str) -> async_nats::Subscriber {
    let sub = spy
        .client
        .subscribe(subject.to_owned())
        .await
        .expect("subscribe is sent");
    spy.violation(&format!("Subscription to \"{subject}\""))
        .await;
    sub
}

/// `spy` cannot listen to the reader's inbox: refused, and a reader's `get` answered meanwhile
/// never reaches it.
async fn reader_inbox_closed_to(spy: &RoleClient, reader: &RoleClient, run: &str, what: &str) {
    let mut sub = refused_subscription(spy, "_INBOX.reader.>").await;
    let (code, _) = reader.request("get", run).await.expect("reader get");
    assert_eq!(code, None);
    receives_nothing(&mut sub, Duration::from_millis(500), what).await;
}

async fn receives_nothing(sub: &mut async_nats::Subscriber, within: Duration, what: &str) {
    use futures::StreamExt;
    if let Ok(Some(m)) = tokio::time::timeout(within, sub.next()).await {
        panic!(
            "{what}: received a message on {}: {:?}",
            m.subject,
            String::from_utf8_lossy(&m.payload)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inboxes_are_private_to_their_role() {
    let mut b = ShippedBroker::start("inboxes").await;
    let engine = b.client("engine").await;
    let reader = b.client("reader").await;
    let operator = b.client("operator").await;
    b.worker.wait_ready_with(&reader.client).await;
    assert!(reader.client.new_inbox().starts_with("_INBOX.reader."));
    let events = Events::subscribe(&engine.client).await;
    let run = "run_00000000b001";
    create_ok(&engine, &events, &b.worker, run).await;

    // The engine tries to listen where the reader's answers arrive: every such subscription is
    // refused by the broker, so the reader's `get` reply (which does arrive, below) never
    // reaches it.
    let mut spies = Vec::new();
    for subject in ["_INBOX.reader.>", "_INBOX.>", "_INBOX.*.>", ">"] {
        spies.push(refused_subscription(&engine, subject).await);
    }
    let (code, got) = reader.request("get", run).await.expect("reader get");
    assert_eq!(code, None, "{got}");
    assert_eq!(got["run_id"], run, "the reply carries the run");
    for spy in &mut spies {
        receives_nothing(
            spy,
            Duration::from_millis(500),
            "engine spying on the reader",
        )
        .await;
    }

    // The reader tries to listen to the engine's PubAcks: refused, and the engine's next
    // create (PubAck and stored event, so the PubAck was sent) is not seen by it.
    let mut spies = Vec::new();
    for subject in ["_INBOX.engine.>", "_INBOX.>"] {
        spies.push(refused_subscription(&reader, subject).await);
    }
    create_ok(&engine, &events, &b.worker, "run_00000000b002").await;
    for spy in &mut spies {
        receives_nothing(
            spy,
            Duration::from_millis(500),
            "reader spying on the engine",
        )
        .await;
    }

    // Nor may the operator (who reads runs itself) listen to the reader's inbox.
    reader_inbox_closed_to(&operator, &reader, run, "operator spying on the reader").await;

    // No client may forge the worker's events, or touch the stream through the JetStream API.
    engine
        .client
        .publish(format!("{PREFIX}.stored"), Bytes::from_static(b"{}"))
        .await
        .expect("publish is sent");
    engine.violation(&format!("{PREFIX}.stored")).await;
    for who in [&engine, &reader, &operator] {
        let req = async_nats::Request::new()
            .payload(Bytes::new())
            .timeout(Some(REFUSED_ACK_TIMEOUT));
        let r = who
            .client
            .send_request("$JS.API.STREAM.PURGE.RMOS_RUNS".to_owned(), req)
            .await;
        assert!(r.is_err(), "purge answered: {r:?}");
        who.violation("$JS.API.STREAM.PURGE.RMOS_RUNS").await;
    }
    assert!(
        events.snapshot().iter().all(|e| e.body != json!({})),
        "a forged event arrived: {:?}",
        events.snapshot()
    );

    // A reader on the NATS default prefix is refused its reply subscription: it gets no
    // answer, which is why every client must set its role's prefix.
    let stray = b.client_with_inbox("reader", "_INBOX").await;
    let r = stray
        .request_within("get", run, Duration::from_secs(2))
        .await;
    assert!(r.is_err(), "a reader on _INBOX got an answer: {r:?}");
    stray.violation("Subscription to \"_INBOX.").await;

    // The CLI derives the prefix from NATS_USER: each role's commands work as shipped ...
    let out = b.cli("reader", &["get", run], b"", &[]);
    assert_eq!(out.code, Some(0), "{out}");
    let v: Value = serde_json::from_str(out.stdout.trim()).expect("get output is JSON");
    assert_eq!(v["run_id"], run, "{out}");
    let out = b.cli(
        "engine",
        &["create"],
        &bytes_of(&create_payload(Some("run_00000000b003"), "T7")),
        &[],
    );
    assert_eq!(out.code, Some(0), "{out}");
    let v: Value = serde_json::from_str(out.stdout.trim()).expect("create output is JSON");
    assert_eq!(v["event"], "created", "{out}");
    let out = b.cli(
        "operator",
        &["patch-meta"],
        &bytes_of(&json!({"run_id": run, "meta_updates": {"checked": true}})),
        &[],
    );
    assert_eq!(out.code, Some(0), "{out}");
    let out = b.cli("operator", &["verify", run], b"", &[]);
    assert_eq!(out.code, Some(0), "{out}");
    // The reader's history and diff of the patched run come back on its own inbox too.
    let (code, history) = reader
        .request("history", &json!({"run_id": run}).to_string())
        .await
        .expect("reader history");
    assert_eq!(code, None, "{history}");
    assert_eq!(
        history["revisions"].as_array().map(Vec::len),
        Some(2),
        "{history}"
    );
    let (code, diff) = reader
        .request(
            "diff",
            &json!({"run_id": run, "from": 1, "to": 2}).to_string(),
        )
        .await
        .expect("reader diff");
    assert_eq!(code, None, "{diff}");
    // ... and a prefix outside the role's own gets no answer (exit 4, broker reachable).
    let out = b.cli(
        "reader",
        &["get", run],
        b"",
        &[("RMOS_INBOX_PREFIX", "_INBOX.engine")],
    );
    assert_eq!(out.code, Some(4), "{out}");
    // A role's clients share its prefix: isolation is between roles, not between two
    // connections of one role (docs/security.md).
    let engine2 = b.client("engine").await;
    let _same_role = engine2
        .client
        .subscribe("_INBOX.engine.>".to_owned())
        .await
        .expect("subscribe");
    engine2.client.flush().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        engine2.errors.lock().unwrap().is_empty(),
        "{:?}",
        engine2.errors.lock().unwrap()
    );
    assert_worker_never_refused(&b.worker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_credential_publishes_only_replies_it_owes() {
    let mut b = ShippedBroker::start("replies").await;
    let reader = b.client("reader").await;
    let operator = b.client("operator").await;
    b.worker.wait_ready_with(&reader.client).await;
    // A second connection with the worker's credential: what a stolen or compromised worker
    // could do.
    let rogue = b.client("worker").await;

    // A reply subject in the reader's inbox that nobody asked the rogue to answer.
    let mut inbox = reader
        .client
        .subscribe("_INBOX.reader.probe.1".to_owned())
        .await
        .expect("reader subscribes to its own inbox");
    reader.client.flush().await.expect("flush");
    rogue
        .client
        .publish("_INBOX.reader.probe.1", Bytes::from_static(b"unsolicited"))
        .await
        .expect("publish is sent");
    rogue.violation("_INBOX.reader.probe.1").await;
    receives_nothing(
        &mut inbox,
        Duration::from_millis(500),
        "an unsolicited reply",
    )
    .await;

    // A request the rogue did receive (it may subscribe to the request subjects): it may answer
    // once, not twice. The real worker answers too (not_found); the reader tells the answers
    // apart by their bodies.
    let mut requests = rogue
        .client
        .subscribe(format!("{PREFIX}.get"))
        .await
        .expect("worker may subscribe to get");
    rogue.client.flush().await.expect("flush");
    let mut owed = reader
        .client
        .subscribe("_INBOX.reader.owed.1".to_owned())
        .await
        .expect("subscribe");
    reader.client.flush().await.expect("flush");
    // (Sent again if the rogue's copy does not come: once, on 2.12.0, a fresh subscription
    // missed the first request.)
    let mut req = None;
    for _ in 0..3 {
        reader
            .client
            .publish_with_reply(
                format!("{PREFIX}.get"),
                "_INBOX.reader.owed.1",
                Bytes::from_static(b"run_000000000000"),
            )
            .await
            .expect("request sent");
        if let Ok(Some(m)) = tokio::time::timeout(
            Duration::from_secs(2),
            futures::StreamExt::next(&mut requests),
        )
        .await
        {
            req = Some(m);
            break;
        }
    }
    let req = req.expect("the rogue's copy of the request never came");
    let reply_to = req.reply.expect("the request has a reply subject");
    assert_eq!(reply_to.as_str(), "_INBOX.reader.owed.1");
    for body in ["first", "second"] {
        rogue
            .client
            .publish(reply_to.clone(), Bytes::from(body))
            .await
            .expect("publish is sent");
    }
    rogue.client.flush().await.expect("flush");
    let mut bodies = Vec::new();
    while let Ok(Some(m)) =
        tokio::time::timeout(Duration::from_secs(1), futures::StreamExt::next(&mut owed)).await
    {
        bodies.push(String::from_utf8_lossy(&m.payload).into_owned());
    }
    assert!(
        bodies.iter().any(|b| b == "first"),
        "the owed reply was refused: {bodies:?}"
    );
    assert!(
        !bodies.iter().any(|b| b == "second"),
        "a second reply to one request got through: {bodies:?}"
    );
    assert!(
        bodies.iter().any(|b| b.contains("not_found")),
        "the real worker's answer is missing: {bodies:?}"
    );
    rogue.violation("_INBOX.reader.owed.1").await;

    // Commands and the JetStream API beyond the worker's own stream and consumer: refused.
    // (It may publish commands: that is how commands received over HTTP reach the stream.)
    for subject in [
        "$JS.API.STREAM.PURGE.RMOS_RUNS",
        "$JS.API.STREAM.DELETE.RMOS_RUNS",
        "$JS.API.STREAM.UPDATE.RMOS_RUNS",
        "$JS.API.STREAM.CREATE.OTHER",
        "$JS.API.CONSUMER.DELETE.RMOS_RUNS.rmos-runs-worker",
        "$JS.API.CONSUMER.CREATE.RMOS_RUNS.other",
        "$JS.API.CONSUMER.MSG.NEXT.OTHER.rmos-runs-worker",
        "$JS.API.INFO",
        "$JS.ACK.OTHER.c.1.1.1.1.0",
    ] {
        let req = async_nats::Request::new()
            .payload(Bytes::new())
            .timeout(Some(REFUSED_ACK_TIMEOUT));
        let r = rogue.client.send_request(subject.to_owned(), req).await;
        assert!(r.is_err(), "{subject} answered: {r:?}");
        rogue.violation(subject).await;
    }
    // What it needs still works: the stream is there, untouched.
    let js = jetstream::new(rogue.client.clone());
    let mut stream = js.get_stream("RMOS_RUNS").await.expect("stream info");
    let info = stream.info().await.expect("stream info");
    assert_eq!(info.config.name, "RMOS_RUNS");

    // A reader cannot turn the worker's answer into a JetStream API call: a get whose reply
    // subject is the stream's purge API is not answered there, and a command waiting in the
    // stream survives it. (The patch names an unknown run, so the worker holds it back for a
    // few seconds before rejecting it.)
    let r = rid("held");
    operator
        .publish(
            "patch_meta",
            &r,
            &json!({"run_id": "run_00000000dead", "meta_updates": {"x": 1}}),
        )
        .await
        .expect("patch PubAck");
    let before = stream.info().await.expect("info").state.clone();
    assert_eq!(before.messages, 1, "the held command is in the stream");
    // A purge moves the stream's first sequence past the held command; acks of later
    // commands do not.
    let held_seq = before.last_sequence;
    reader
        .client
        .publish_with_reply(
            format!("{PREFIX}.get"),
            "$JS.API.STREAM.PURGE.RMOS_RUNS",
            Bytes::from_static(b"run_000000000000"),
        )
        .await
        .expect("request sent");
    reader.client.flush().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = stream.info().await.expect("info");
    assert!(
        after.state.first_sequence <= held_seq,
        "the stream was purged through the worker's reply: {:?}; worker log:\n{}",
        after.state,
        b.worker.log()
    );
    let log = std::fs::read_to_string(&b.worker.log).expect("worker log");
    assert!(
        log.contains("$JS.API.STREAM.PURGE.RMOS_RUNS"),
        "the refused reply is not logged:\n{log}"
    );
    // Nor can a publisher aim the stream's own PubAck at the API.
    let engine = b.client("engine").await;
    engine
        .client
        .publish_with_reply(
            format!("{PREFIX}.create"),
            "$JS.API.STREAM.PURGE.RMOS_RUNS",
            bytes_of(&create_payload(Some("run_00000000c002"), "T1")),
        )
        .await
        .expect("create sent");
    engine.client.flush().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let info = stream.info().await.expect("info");
    let (major, minor) = support::NatsServer::version();
    let purged = info.state.first_sequence > held_seq;
    if (major, minor) >= (2, 12) {
        assert!(
            !purged,
            "nats-server {major}.{minor} let a publisher purge the stream through its PubAck: {:?}",
            info.state
        );
    } else {
        // Before 2.12 the server acts on a PubAck aimed at its API: any publisher can purge
        // the pending commands (docs/security.md, row 7b). That is why the worker warns and the
        // deployment docs ask for 2.12; this pins the claim on the oldest supported server.
        assert!(
            purged,
            "nats-server {major}.{minor} no longer acts on a PubAck aimed at the API: update \
             docs/security.md (row 7b) and connect::MIN_SAFE_SERVER ({:?})",
            info.state
        );
    }
    // The worker warns at start-up on a broker with that flaw, and only then.
    let full_log = std::fs::read_to_string(&b.worker.log).expect("worker log");
    let warned = full_log.contains("upgrade the broker to 2.12");
    assert_eq!(
        warned,
        (major, minor) < (2, 12),
        "start-up warning on nats-server {major}.{minor}; worker log:\n{full_log}"
    );
    assert_worker_never_refused(&b.worker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_mode_replies_through_allow_responses_on_the_shipped_config() {
    let mut b = ShippedBroker::start_with("core", &[("RMOS_INGEST", "core")]).await;
    let engine = b.client("engine").await;
    let reader = b.client("reader").await;
    b.worker.wait_ready_with(&reader.client).await;
    let events = Events::subscribe(&engine.client).await;
    // The outcome comes back on the engine's own inbox, sent through allow_responses.
    let reply = engine
        .client
        .request(
            format!("{PREFIX}.create"),
            bytes_of(&create_payload(Some("run_00000000d001"), "T1")),
        )
        .await
        .expect("core-mode reply");
    let v: Value = serde_json::from_slice(&reply.payload).expect("json");
    assert_eq!(v["event"], "created", "{v}");
    // A command whose reply subject is one of the service's own subjects is handled and
    // announced, but the outcome is not published there.
    let r = rid("core-own-subject");
    let mut h = HeaderMap::new();
    h.insert("X-Request-Id", r.as_str());
    engine
        .client
        .publish_with_reply_and_headers(
            format!("{PREFIX}.create"),
            format!("{PREFIX}.delete"),
            h,
            bytes_of(&create_payload(Some("run_00000000d002"), "T1")),
        )
        .await
        .expect("publish");
    let ev = events.one(&r, EVENT_TIMEOUT, &b.worker).await;
    assert_eq!(ev.body["event"], "created", "{:?}", ev.body);
    // The reply step follows the event: give it a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = std::fs::read_to_string(&b.worker.log).expect("worker log");
        if log.contains("outcome not sent as a reply") && log.contains("rmos.runs.delete") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the worker did not refuse to reply to {PREFIX}.delete:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_worker_never_refused(&b.worker);
}

/// `deploy/nats/cluster/nats-<i+1>.conf` as a test template: loopback, free ports, private
/// store, `permissions.conf` beside it (the routes come from the environment).
fn shipped_cluster_template(i: usize, cluster_ports: &[u16; 3]) -> String {
    let name = format!("cluster/nats-{}.conf", i + 1);
    let mut text = deploy_file(&name);
    for j in 1..=3 {
        assert!(
            text.contains(&format!("$RMOS_CLUSTER_ROUTE_{j}")),
            "{name}: routes"
        );
    }
    let mut replace = |from: String, to: String| {
        assert!(text.contains(&from), "{name} no longer contains {from:?}");
        text = text.replace(&from, &to);
    };
    replace("port: 6222".into(), format!("port: {}", cluster_ports[i]));
    replace("host: 0.0.0.0".into(), "host: 127.0.0.1".into());
    replace("port: 4222".into(), "port: {{PORT}}".into());
    replace("http_port: 8222".into(), "http_port: {{HTTP_PORT}}".into());
    replace(
        "store_dir: \"/data/jetstream\"".into(),
        "store_dir: \"{{STORE_DIR}}\"".into(),
    );
    replace("max_file_store: 20GB".into(), "max_file_store: 1GB".into());
    replace(
        "include \"../permissions.conf\"".into(),
        "include \"permissions.conf\"".into(),
    );
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_and_inboxes_hold_across_the_shipped_cluster() {
    let passwords: Vec<(String, String)> = ROLES
        .iter()
        .map(|r| (r.to_string(), secret(&format!("pw-{r}"))))
        .collect();
    let password = |role: &str| {
        passwords
            .iter()
            .find(|(r, _)| r == role)
            .map(|(_, p)| p.clone())
            .unwrap_or_default()
    };
    let mut env: Vec<(String, String)> = passwords
        .iter()
        .map(|(r, p)| (format!("RMOS_{}_PASSWORD", r.to_uppercase()), p.clone()))
        .collect();
    let route_password = secret("route");
    env.push(("RMOS_CLUSTER_PASSWORD".into(), route_password.clone()));
    let cluster_ports = [
        support::free_port(),
        support::free_port(),
        support::free_port(),
    ];
    for (j, port) in cluster_ports.iter().enumerate() {
        env.push((
            format!("RMOS_CLUSTER_ROUTE_{}", j + 1),
            format!("nats-route://route:{route_password}@127.0.0.1:{port}"),
        ));
    }
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let permissions = deploy_file("permissions.conf");
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(
            ConfiguredNatsServer::start(
                &shipped_cluster_template(i, &cluster_ports),
                &[("permissions.conf", &permissions)],
                &env_refs,
            )
            .await,
        );
    }
    let urls: Vec<String> = nodes.iter().map(|n| n.url()).collect();
    let logs = || {
        nodes
            .iter()
            .map(|n| n.log())
            .collect::<Vec<_>>()
            .join("\n----\n")
    };

    // JetStream answers once the three nodes have elected a meta leader: until then the
    // worker could not create its R3 stream. (Asked as the worker: its own stream's info.)
    let probe = RoleClient::user(&urls[0], "worker", &password("worker")).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let req = async_nats::Request::new()
            .payload(Bytes::new())
            .timeout(Some(Duration::from_secs(2)));
        let r = probe
            .client
            .send_request("$JS.API.STREAM.INFO.RMOS_RUNS".to_owned(), req)
            .await;
        let v: Value = r
            .as_ref()
            .map(|m| serde_json::from_slice(&m.payload).unwrap_or(Value::Null))
            .unwrap_or(Value::Null);
        if v["error"]["err_code"] == 10059 {
            break; // stream not found: JetStream is up
        }
        assert!(
            Instant::now() < deadline,
            "JetStream cluster not up: last answer {r:?} {v}; logs:\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let tmp = tempdir("cluster");
    let toml = tmp.path().join("rmos-runs.toml");
    std::fs::write(&toml, "stream_replicas = 3\n").expect("worker config");
    let worker_pw = password("worker");
    let mut worker = spawn_worker(
        &urls.join(","),
        &tmp.path().join("runs"),
        "cluster",
        &[
            ("NATS_USER", "worker"),
            ("NATS_PASSWORD", &worker_pw),
            ("RMOS_CONFIG", &toml.display().to_string()),
        ],
    );
    // Each client on another node than the next, so answers and PubAcks cross routes.
    let engine = RoleClient::user(&urls[1], "engine", &password("engine")).await;
    let reader = RoleClient::user(&urls[2], "reader", &password("reader")).await;
    worker.wait_ready_with(&reader.client).await;
    let events = Events::subscribe(&engine.client).await;
    let run = "run_00000000e0c1";
    create_ok(&engine, &events, &worker, run).await;
    let (code, got) = reader.request("get", run).await.expect("reader get");
    assert_eq!(code, None, "{got}");
    assert_eq!(got["run_id"], run);
    let js = jetstream::new(probe.client.clone());
    let info = js
        .get_stream("RMOS_RUNS")
        .await
        .expect("stream")
        .info()
        .await
        .expect("stream info")
        .clone();
    assert_eq!(info.config.num_replicas, 3, "{:?}", info.config);
    // The engine cannot listen to the reader's inbox on its node either.
    reader_inbox_closed_to(&engine, &reader, run, "engine spying across nodes").await;
    assert_worker_never_refused(&worker);
}

// ---------------------------------------------------------------------------------------------
// Credential kinds
// ---------------------------------------------------------------------------------------------

/// A broker that only needs the given authorization block, JetStream on.
fn minimal_template(authorization: &str) -> String {
    format!(
        "host: 127.0.0.1\nport: {{{{PORT}}}}\njetstream {{ store_dir: \"{{{{STORE_DIR}}}}\" }}\n{authorization}\n"
    )
}

/// Starts a worker with `worker_env`, waits until `ready` (a client allowed to request `get`)
/// gets an answer, then stores one run through it as `client`.
async fn worker_stores_a_run(
    nats: &ConfiguredNatsServer,
    tag: &str,
    worker_env: &[(&str, &str)],
    ready: &Client,
    client: &RoleClient,
) -> (tempfile::TempDir, Worker) {
    let tmp = tempdir(tag);
    let mut worker = spawn_worker(&nats.url(), &tmp.path().join("runs"), tag, worker_env);
    worker.wait_ready_with(ready).await;
    let events = Events::subscribe(&client.client).await;
    create_ok(client, &events, &worker, "run_00000000a001").await;
    (tmp, worker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_auth() {
    let token = secret("tok");
    let nats = ConfiguredNatsServer::start(
        &minimal_template("authorization { token: $RMOS_TEST_TOKEN }"),
        &[],
        &[("RMOS_TEST_TOKEN", &token)],
    )
    .await;
    assert!(async_nats::connect(nats.url()).await.is_err());
    let client = RoleClient::connect(&nats.url(), ConnectOptions::with_token(token.clone())).await;
    let (_tmp, worker) = worker_stores_a_run(
        &nats,
        "token",
        &[("NATS_TOKEN", &token)],
        &client.client,
        &client,
    )
    .await;
    let (ok, shown) = rmos_config(&[("NATS_TOKEN", &token)]);
    assert!(
        ok && !shown.contains(&token) && shown.contains("****"),
        "{shown}"
    );
    drop(client);
    assert_not_in_log(&worker, &token, "token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_a_quick_one_line_start_up_error() {
    let good = secret("pw");
    let nats = ConfiguredNatsServer::start(
        &minimal_template(
            "authorization { users: [ { user: worker, password: $RMOS_WORKER_PASSWORD } ] }",
        ),
        &[],
        &[("RMOS_WORKER_PASSWORD", &good)],
    )
    .await;
    let tmp = tempdir("wrongpw");
    let wrong = secret("wrong");
    let started = Instant::now();
    let mut worker = spawn_worker(
        &nats.url(),
        &tmp.path().join("runs"),
        "wrongpw",
        &[("NATS_USER", "worker"), ("NATS_PASSWORD", &wrong)],
    );
    let status = worker.wait(Duration::from_secs(25)).await;
    let took = started.elapsed();
    assert!(!status.success(), "worker started with a wrong password");
    assert!(
        took < Duration::from_secs(10),
        "took {took:?}: retried instead of failing on bad credentials; log:\n{}",
        worker.log()
    );
    let log = std::fs::read_to_string(&worker.log).unwrap();
    let last = log
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    assert!(
        last.to_lowercase().contains("authorization") || last.contains("credentials"),
        "last line does not say why: {last:?}; log:\n{log}"
    );
    assert!(
        !log.contains(&wrong),
        "the password appears in the log:\n{log}"
    );
    println!("wrong password: {status} after {took:?}: {last}");
}

// --- nkeys: pairs made with openssl (ed25519) and encoded as NATS nkeys here -----------------

fn run_openssl(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("openssl {args:?}: {e} (is openssl installed?)"));
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// CRC-16/XMODEM, little-endian, as nkeys append it.
fn nkey_crc16(data: &[u8]) -> [u8; 2] {
    let mut crc: u16 = 0;
    for b in data {
        crc ^= (*b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc.to_le_bytes()
}

/// RFC 4648 base32, no padding (what nkeys use).
fn base32_nopad(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let (mut buf, mut bits) = (0u32, 0u32);
    for b in data {
        buf = (buf << 8) | *b as u32;
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buf >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buf << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// A user nkey pair: (seed `SU...`, public key `U...`).
fn user_nkey(dir: &Path, name: &str) -> (String, String) {
    const PREFIX_USER: u8 = 20 << 3;
    const PREFIX_SEED: u8 = 18 << 3;
    let pem = format!("{name}.ed25519.pem");
    run_openssl(dir, &["genpkey", "-algorithm", "ed25519", "-out", &pem]);
    // DER ends with the raw 32-byte key (private: the seed; public: the point).
    let private = run_openssl(dir, &["pkey", "-in", &pem, "-outform", "DER"]);
    let public = run_openssl(dir, &["pkey", "-in", &pem, "-pubout", "-outform", "DER"]);
    let raw_seed = &private[private.len() - 32..];
    let raw_public = &public[public.len() - 32..];
    let mut seed = vec![PREFIX_SEED | (PREFIX_USER >> 5), (PREFIX_USER & 31) << 3];
    seed.extend_from_slice(raw_seed);
    let crc = nkey_crc16(&seed);
    seed.extend_from_slice(&crc);
    let mut pk = vec![PREFIX_USER];
    pk.extend_from_slice(raw_public);
    let crc = nkey_crc16(&pk);
    pk.extend_from_slice(&crc);
    (base32_nopad(&seed), base32_nopad(&pk))
}

#[test]
fn nkey_encoding_matches_the_reference_vector_shape() {
    // A seed has 58 characters starting "SU", a public user key 56 starting "U".
    let tmp = tempdir("nkeyshape");
    let (seed, public) = user_nkey(tmp.path(), "x");
    assert_eq!(seed.len(), 58, "{seed}");
    assert!(seed.starts_with("SU"), "{seed}");
    assert_eq!(public.len(), 56, "{public}");
    assert!(public.starts_with('U'), "{public}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nkey_seed_file_with_the_shipped_nkeys_config() {
    let tmp = tempdir("nkeys");
    let roles = ["worker", "engine", "advisor", "reader", "operator"];
    let pairs: Vec<(String, (String, String))> = roles
        .iter()
        .map(|r| (r.to_string(), user_nkey(tmp.path(), r)))
        .collect();
    let seed_of = |role: &str| pairs.iter().find(|(r, _)| r == role).unwrap().1.0.clone();
    let env: Vec<(String, String)> = pairs
        .iter()
        .map(|(r, (_, public))| (format!("RMOS_{}_NKEY", r.to_uppercase()), public.clone()))
        .collect();
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let permissions = deploy_file("permissions.conf");
    let nats = ConfiguredNatsServer::start(
        &shipped_template("nats-server-nkeys.conf"),
        &[("permissions.conf", &permissions)],
        &env_refs,
    )
    .await;
    // The worker's seed lives in a 0600 file; NATS_NKEY points at it.
    let seed_file: PathBuf = tmp.path().join("worker.nk");
    std::fs::write(&seed_file, format!("{}\n", seed_of("worker"))).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&seed_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    // An nkey login has no user name to derive the inbox prefix from: each client sets its
    // role's prefix (the worker through RMOS_INBOX_PREFIX).
    let engine = RoleClient::connect(
        &nats.url(),
        ConnectOptions::with_nkey(seed_of("engine")).custom_inbox_prefix("_INBOX.engine"),
    )
    .await;
    let reader = RoleClient::connect(
        &nats.url(),
        ConnectOptions::with_nkey(seed_of("reader")).custom_inbox_prefix("_INBOX.reader"),
    )
    .await;
    let seed_path = seed_file.display().to_string();
    let (_runs, worker) = worker_stores_a_run(
        &nats,
        "nkey",
        &[
            ("NATS_NKEY", &seed_path),
            ("RMOS_INBOX_PREFIX", "_INBOX.worker"),
        ],
        &reader.client,
        &engine,
    )
    .await;
    // The role still applies with nkeys.
    engine
        .refused_publish(
            "delete",
            &json!({"run_id": "run_00000000a001", "reason": "x"}),
        )
        .await;
    // A pair the server does not know is refused.
    let (stranger, _) = user_nkey(tmp.path(), "stranger");
    assert!(
        ConnectOptions::with_nkey(stranger.clone())
            .connect(nats.url())
            .await
            .is_err()
    );
    assert_not_in_log(&worker, &seed_of("worker"), "nkey seed");
}

// --- TLS with a private CA and client certificates --------------------------------------------

/// CA, server certificate for 127.0.0.1/localhost, client certificate; all signed by the CA.
fn make_pki(dir: &Path) {
    run_openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=rmos test CA",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca.pem",
        ],
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, cn) in [("server", "localhost"), ("client", "rmos-worker")] {
        run_openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                &format!("{name}-key.pem"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        run_openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.pem"),
            ],
        );
    }
}

/// TLS with a private CA and a client certificate. Both ring and aws-lc-rs are in the
/// dependency tree, so the worker installs ring as the rustls provider at start-up (without it,
/// the first TLS connection panicked: this test found that).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_private_ca_and_client_certificate() {
    // rustls is built with both the ring and the aws-lc-rs providers in this dependency tree,
    // so it cannot pick one by itself: a process must install one before its first TLS
    // connection (the test client here; the worker binary likewise, see deploy/README.md).
    let _ = async_nats::rustls::crypto::ring::default_provider().install_default();
    let pki = tempdir("pki");
    let d = pki.path();
    make_pki(d);
    let p = |f: &str| d.join(f).display().to_string();
    let tls = format!(
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n  timeout: 5\n}}",
        p("server.pem"),
        p("server-key.pem"),
        p("ca.pem")
    );
    let nats = ConfiguredNatsServer::start(&minimal_template(&tls), &[], &[]).await;

    // Without a client certificate the server refuses the connection.
    let no_cert = ConnectOptions::new()
        .add_root_certificates(d.join("ca.pem"))
        .require_tls(true)
        .connect(nats.url())
        .await;
    assert!(
        no_cert.is_err(),
        "TLS without a client certificate accepted"
    );

    let client = RoleClient::connect(
        &nats.url(),
        ConnectOptions::new()
            .add_root_certificates(d.join("ca.pem"))
            .add_client_certificate(d.join("client.pem"), d.join("client-key.pem"))
            .require_tls(true),
    )
    .await;
    let (ca, cert, key) = (p("ca.pem"), p("client.pem"), p("client-key.pem"));
    let (_tmp, worker) = worker_stores_a_run(
        &nats,
        "tls",
        &[("NATS_CA", &ca), ("NATS_CERT", &cert), ("NATS_KEY", &key)],
        &client.client,
        &client,
    )
    .await;
    let key_pem = std::fs::read_to_string(d.join("client-key.pem")).unwrap();
    let key_body = key_pem.lines().nth(1).unwrap_or("no key line");
    assert_not_in_log(&worker, key_body, "client key");
}

// --- creds files: a broker in operator mode, JWTs made and signed with openssl here ----------

/// nkey prefix bytes (the first base32 character: O, A, U).
const NKEY_OPERATOR: u8 = 14 << 3;
const NKEY_ACCOUNT: u8 = 0;
const NKEY_USER: u8 = 20 << 3;

/// An nkey pair of any kind plus the openssl key file that signs for it.
struct NkeyPair {
    seed: String,
    public: String,
    pem: PathBuf,
}

/// An ed25519 pair made by openssl, encoded as an nkey of kind `prefix` (seed `S?...`).
fn nkey_pair(dir: &Path, name: &str, prefix: u8) -> NkeyPair {
    const PREFIX_SEED: u8 = 18 << 3;
    let pem = format!("{name}.ed25519.pem");
    run_openssl(dir, &["genpkey", "-algorithm", "ed25519", "-out", &pem]);
    let private = run_openssl(dir, &["pkey", "-in", &pem, "-outform", "DER"]);
    let public = run_openssl(dir, &["pkey", "-in", &pem, "-pubout", "-outform", "DER"]);
    let mut seed = vec![PREFIX_SEED | (prefix >> 5), (prefix & 31) << 3];
    seed.extend_from_slice(&private[private.len() - 32..]);
    let crc = nkey_crc16(&seed);
    seed.extend_from_slice(&crc);
    let mut pk = vec![prefix];
    pk.extend_from_slice(&public[public.len() - 32..]);
    let crc = nkey_crc16(&pk);
    pk.extend_from_slice(&crc);
    NkeyPair {
        seed: base32_nopad(&seed),
        public: base32_nopad(&pk),
        pem: dir.join(pem),
    }
}

/// RFC 4648 base64url, no padding (what JWTs use).
fn base64url_nopad(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let n = (b(0) << 16) | (b(1) << 8) | b(2);
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

/// A NATS JWT (v2) for `subject` with `nats` claims, issued at `iat` and signed by `signer`
/// (whose public key is named as the issuer unless `issuer` says otherwise: a forgery).
fn nats_jwt(
    dir: &Path,
    signer: &NkeyPair,
    issuer: Option<&str>,
    subject: &str,
    name: &str,
    iat: i64,
    nats: Value,
) -> String {
    let mut claims = json!({
        "jti": "",
        "iat": iat,
        "iss": issuer.unwrap_or(&signer.public),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    // jti: the hash of the claims without it, as the jwt library computes it.
    use sha2::Digest;
    let hash = sha2::Sha256::digest(serde_json::to_vec(&claims).unwrap());
    claims["jti"] = Value::String(base32_nopad(&hash));
    let header = base64url_nopad(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let body = base64url_nopad(&serde_json::to_vec(&claims).unwrap());
    let signing_input = format!("{header}.{body}");
    let file = format!("jwt-{}.in", rand::random::<u32>());
    std::fs::write(dir.join(&file), &signing_input).unwrap();
    let pem = signer.pem.display().to_string();
    let sig = run_openssl(
        dir,
        &["pkeyutl", "-sign", "-rawin", "-inkey", &pem, "-in", &file],
    );
    assert_eq!(sig.len(), 64, "ed25519 signature");
    format!("{signing_input}.{}", base64url_nopad(&sig))
}

/// Account claims; JetStream unlimited when `jetstream`, `revoked` users refused.
fn account_claims(jetstream: bool, revoked: &[(&str, i64)]) -> Value {
    let mut limits = json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
    });
    if jetstream {
        for k in ["mem_storage", "disk_storage", "streams", "consumer"] {
            limits[k] = json!(-1);
        }
    }
    let mut nats = json!({
        "limits": limits,
        "default_permissions": {"pub": {}, "sub": {}},
        "type": "account",
        "version": 2,
    });
    if !revoked.is_empty() {
        nats["revocations"] = revoked
            .iter()
            .map(|(k, t)| (k.to_string(), json!(t)))
            .collect();
    }
    nats
}

fn user_claims() -> Value {
    json!({
        "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
        "type": "user", "version": 2,
    })
}

/// A creds file (user JWT + seed) as `nsc` writes it, mode 0600; its path.
fn write_creds(dir: &Path, name: &str, jwt: &str, seed: &str) -> String {
    let text = format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    );
    let path = dir.join(format!("{name}.creds"));
    std::fs::write(&path, text).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path.display().to_string()
}

/// An operator-mode deployment: operator, system account, the application account (JetStream
/// on) preloaded into a memory resolver, and users of the application account. The server
/// logs at debug level, so each refusal can be checked for its reason.
struct Operated {
    keys: tempfile::TempDir,
    nats: ConfiguredNatsServer,
    app: NkeyPair,
    /// A user revoked in the application account JWT.
    revoked: NkeyPair,
}

impl Operated {
    async fn start() -> Operated {
        let keys = tempdir("operator");
        let d = keys.path();
        let now = unix_now();
        let operator = nkey_pair(d, "operator", NKEY_OPERATOR);
        let system = nkey_pair(d, "system", NKEY_ACCOUNT);
        let app = nkey_pair(d, "app", NKEY_ACCOUNT);
        let revoked = nkey_pair(d, "revoked", NKEY_USER);
        let operator_jwt = nats_jwt(
            d,
            &operator,
            None,
            &operator.public,
            "rmos-test-operator",
            now,
            json!({"system_account": system.public, "type": "operator", "version": 2}),
        );
        let system_jwt = nats_jwt(
            d,
            &operator,
            None,
            &system.public,
            "SYS",
            now,
            account_claims(false, &[]),
        );
        let app_jwt = nats_jwt(
            d,
            &operator,
            None,
            &app.public,
            "RMOS",
            now,
            account_claims(true, &[(&revoked.public, now)]),
        );
        let operator_file = d.join("operator.jwt");
        std::fs::write(&operator_file, &operator_jwt).unwrap();
        let template = format!(
            "debug: true\nhost: 127.0.0.1\nport: {{{{PORT}}}}\n\
             jetstream {{ store_dir: \"{{{{STORE_DIR}}}}\" }}\n\
             operator: \"{}\"\nsystem_account: {}\nresolver: MEMORY\n\
             resolver_preload: {{\n  {}: \"{system_jwt}\"\n  {}: \"{app_jwt}\"\n}}\n",
            operator_file.display(),
            system.public,
            system.public,
            app.public,
        );
        let nats = ConfiguredNatsServer::start(&template, &[], &[]).await;
        Operated {
            keys,
            nats,
            app,
            revoked,
        }
    }

    fn dir(&self) -> &Path {
        self.keys.path()
    }

    /// A new user of the application account: (creds file path, seed).
    fn user(&self, name: &str) -> (String, String) {
        let user = nkey_pair(self.dir(), name, NKEY_USER);
        let jwt = nats_jwt(
            self.dir(),
            &self.app,
            None,
            &user.public,
            name,
            unix_now(),
            user_claims(),
        );
        (write_creds(self.dir(), name, &jwt, &user.seed), user.seed)
    }
}

/// A client logged in with a creds file.
async fn creds_client(url: &str, creds: &str) -> RoleClient {
    let opts = ConnectOptions::with_credentials_file(PathBuf::from(creds))
        .await
        .unwrap_or_else(|e| panic!("read {creds}: {e}"));
    RoleClient::connect(url, opts).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creds_file_in_operator_mode() {
    let op = Operated::start().await;
    let url = op.nats.url();
    // Operator mode: no anonymous access; a user JWT of the account gets in.
    assert!(
        async_nats::connect(&url).await.is_err(),
        "anonymous connection accepted"
    );
    let (engine_creds, _) = op.user("engine");
    let engine = creds_client(&url, &engine_creds).await;
    let (worker_creds, worker_seed) = op.user("worker");
    let (_runs, worker) = worker_stores_a_run(
        &op.nats,
        "creds",
        &[("NATS_CREDS", &worker_creds)],
        &engine.client,
        &engine,
    )
    .await;
    // The stream the worker made lives in the application account (JetStream from its JWT).
    let info = engine
        .client
        .request("$JS.API.INFO", Bytes::new())
        .await
        .expect("account info");
    let info: Value = serde_json::from_slice(&info.payload).unwrap();
    assert!(
        info["streams"].as_u64().unwrap_or(0) >= 1,
        "no stream in the account: {info}"
    );
    drop(engine);
    assert_not_in_log(&worker, &worker_seed, "creds seed");
}

/// Starts a worker with `NATS_CREDS=creds` and expects a quick failure whose last log line says
/// `broker credentials:` (and, if any are given, the server's debug log naming one of
/// `server_reasons`: the wording differs between server versions); returns that line.
async fn creds_refused_at_start_up(
    op: &Operated,
    tag: &str,
    creds: &str,
    server_reason: Option<&[&str]>,
) -> String {
    let tmp = tempdir(tag);
    let started = Instant::now();
    let mut worker = spawn_worker(
        &op.nats.url(),
        &tmp.path().join("runs"),
        tag,
        &[("NATS_CREDS", creds)],
    );
    let status = worker.wait(Duration::from_secs(25)).await;
    let took = started.elapsed();
    let log = std::fs::read_to_string(&worker.log).unwrap();
    assert!(!status.success(), "{tag}: worker started; log:\n{log}");
    assert!(
        took < Duration::from_secs(10),
        "{tag}: took {took:?}: retried instead of failing on bad credentials; log:\n{log}"
    );
    let last = log
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .to_owned();
    assert!(
        last.contains("broker credentials:"),
        "{tag}: last line does not say why: {last:?}; log:\n{log}"
    );
    // The index of the new store is built only once the worker is ready: a build started
    // before the broker refused could report its own failure after the reason, at exit.
    assert!(
        !log.contains("listing index"),
        "{tag}: an index build started before the broker connection; log:\n{log}"
    );
    assert!(
        !log.contains("retrying"),
        "{tag}: the worker retried; log:\n{log}"
    );
    if let Some(reasons) = server_reason {
        let deadline = Instant::now() + Duration::from_secs(2);
        while !reasons.iter().any(|r| op.nats.log().contains(r)) {
            assert!(
                Instant::now() < deadline,
                "{tag}: the server says none of {reasons:?}; server log:\n{}",
                op.nats.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    println!("{tag}: {status} after {took:?}: {last}");
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_creds_files_are_quick_one_line_start_up_errors() {
    let op = Operated::start().await;
    let url = op.nats.url();
    let d = op.dir();
    // The deployment itself is fine: a user of the account gets in.
    let (good, _) = op.user("good");
    drop(creds_client(&url, &good).await);

    // A user of an account the operator never issued (not in the resolver).
    let stranger_account = nkey_pair(d, "stranger-account", NKEY_ACCOUNT);
    let user = nkey_pair(d, "stray", NKEY_USER);
    let jwt = nats_jwt(
        d,
        &stranger_account,
        None,
        &user.public,
        "stray",
        unix_now(),
        user_claims(),
    );
    let wrong_account = write_creds(d, "wrong-account", &jwt, &user.seed);
    assert!(
        ConnectOptions::with_credentials_file(PathBuf::from(&wrong_account))
            .await
            .unwrap()
            .connect(&url)
            .await
            .is_err(),
        "user of an unknown account accepted"
    );
    creds_refused_at_start_up(
        &op,
        "wrong-account",
        &wrong_account,
        Some(&["account missing"]),
    )
    .await;

    // A user JWT naming the application account as issuer but signed by another account.
    let user = nkey_pair(d, "forged", NKEY_USER);
    let jwt = nats_jwt(
        d,
        &stranger_account,
        Some(&op.app.public),
        &user.public,
        "forged",
        unix_now(),
        user_claims(),
    );
    let forged = write_creds(d, "forged", &jwt, &user.seed);
    creds_refused_at_start_up(
        &op,
        "forged-signature",
        &forged,
        // 2.10 checks the signature first; 2.15 looks the signing account up first and finds
        // it unknown to the operator.
        Some(&["signature verification", "account missing"]),
    )
    .await;

    // A user the account JWT revokes (issued before the revocation).
    let jwt = nats_jwt(
        d,
        &op.app,
        None,
        &op.revoked.public,
        "revoked",
        unix_now() - 60,
        user_claims(),
    );
    let revoked = write_creds(d, "revoked", &jwt, &op.revoked.seed);
    creds_refused_at_start_up(&op, "revoked", &revoked, Some(&["authentication revoked"])).await;

    // Not a creds file at all: refused before any connection.
    let garbage = d.join("garbage.creds");
    std::fs::write(&garbage, "this is not a creds file\n").unwrap();
    let last =
        creds_refused_at_start_up(&op, "garbage", &garbage.display().to_string(), None).await;
    assert!(last.contains("garbage.creds"), "{last}");
}
