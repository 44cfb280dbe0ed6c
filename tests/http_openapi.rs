//! The OpenAPI document (`src/transport/http/openapi.json`, served at `/openapi.json`) against
//! what the server does:
//! - it parses as OpenAPI 3.1 and every `$ref` in it resolves;
//! - its (method, path) pairs are exactly the routes the router is built from
//!   (`served_routes()`), and each path's template parameters are declared;
//! - against a real worker and broker with one credential per role: each operation answers
//!   401 without credentials (unless it declares no security), 403 for every role it does not
//!   list, and not 401/403 for the roles it lists; every status seen is one it documents; and
//!   each JSON body (run, page, history, report, diff, event, error) matches its schema.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use rmos_runs::transport::http::{OPENAPI_JSON, served_routes};
use serde_json::{Value, json};
use support::worker::Worker;

const METHODS: [&str; 4] = ["get", "post", "patch", "delete"];
const ROLES: [&str; 4] = ["engine", "advisor", "reader", "operator"];

fn doc() -> Value {
    serde_json::from_str(OPENAPI_JSON).expect("openapi.json is JSON")
}

/// `#/components/...` → the value it names.
fn resolve<'a>(doc: &'a Value, reference: &str) -> &'a Value {
    let pointer = reference
        .strip_prefix('#')
        .unwrap_or_else(|| panic!("only local references: {reference}"));
    doc.pointer(pointer)
        .unwrap_or_else(|| panic!("$ref {reference} does not resolve"))
}

/// Follows `$ref` (a component may refer to another).
fn deref<'a>(doc: &'a Value, mut v: &'a Value) -> &'a Value {
    while let Some(r) = v.get("$ref").and_then(Value::as_str) {
        v = resolve(doc, r);
    }
    v
}

fn every_ref(doc: &Value, v: &Value) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == "$ref" {
                    resolve(doc, x.as_str().expect("$ref is a string"));
                } else {
                    every_ref(doc, x);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| every_ref(doc, x)),
        _ => {}
    }
}

/// `(METHOD, path)` → its operation object.
fn operations(doc: &Value) -> BTreeMap<(String, String), Value> {
    let mut out = BTreeMap::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for m in METHODS {
            if let Some(op) = item.get(m) {
                out.insert((m.to_uppercase(), path.clone()), op.clone());
            }
        }
        for key in item.as_object().expect("path item").keys() {
            assert!(
                METHODS.contains(&key.as_str()) || key == "parameters",
                "{path}: unexpected key {key} (a method the server does not use?)"
            );
        }
    }
    out
}

#[test]
fn the_document_describes_exactly_the_routes_served() {
    let doc = doc();
    assert_eq!(doc["openapi"], "3.1.0");
    every_ref(&doc, &doc);
    let documented: BTreeSet<(String, String)> = operations(&doc).into_keys().collect();
    let served: BTreeSet<(String, String)> = served_routes()
        .into_iter()
        .map(|(m, p)| (m.as_str().to_owned(), p.to_owned()))
        .collect();
    let missing: Vec<_> = served.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&served).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "served but not in openapi.json: {missing:?}; in openapi.json but not served: {extra:?}"
    );
}

#[test]
fn every_operation_declares_its_parameters_security_and_errors() {
    let doc = doc();
    let mut ids = BTreeSet::new();
    for ((method, path), op) in operations(&doc) {
        let at = format!("{method} {path}");
        assert!(
            ids.insert(
                op["operationId"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{at}: operationId"))
                    .to_owned()
            ),
            "{at}: operationId repeated"
        );
        // Path template parameters, declared on the path or the operation.
        let template: BTreeSet<String> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(str::to_owned)
            .collect();
        let declared: BTreeSet<String> = doc["paths"][&path]["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(op["parameters"].as_array().into_iter().flatten())
            .map(|p| deref(&doc, p))
            .filter(|p| p["in"] == "path")
            .map(|p| p["name"].as_str().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(template, declared, "{at}: path parameters");
        // Roles: the security alternatives name exactly x-rmos-roles, for both schemes.
        let roles: BTreeSet<&str> = op["x-rmos-roles"]
            .as_array()
            .unwrap_or_else(|| panic!("{at}: x-rmos-roles"))
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let security = op.get("security").unwrap_or(&doc["security"]);
        let mut in_security = BTreeSet::new();
        for alt in security.as_array().expect("security list") {
            for (scheme, needs) in alt.as_object().expect("requirement") {
                assert!(
                    doc["components"]["securitySchemes"].get(scheme).is_some(),
                    "{at}: scheme {scheme}"
                );
                in_security.extend(
                    needs
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str),
                );
            }
        }
        assert_eq!(roles, in_security, "{at}: security vs x-rmos-roles");
        // Errors: every secured operation documents 401 and 403 with the error body.
        let responses = op["responses"].as_object().expect("responses");
        if !roles.is_empty() {
            for status in ["401", "403"] {
                let r = deref(&doc, &responses[status]);
                assert_eq!(
                    deref(&doc, &r["content"]["application/json"]["schema"]),
                    &doc["components"]["schemas"]["Error"],
                    "{at}: {status}"
                );
            }
        }
        if path.starts_with("/api/") {
            for (status, r) in responses {
                let r = deref(&doc, r);
                assert!(
                    r["headers"].get("X-Request-Id").is_some(),
                    "{at}: {status} without X-Request-Id"
                );
            }
        }
    }
}

// ---- against a real worker ----------------------------------------------------------------

/// One keep-alive HTTP/1.1 connection, opened again after an answer that closes it (an error
/// to a request with a body says `Connection: close`).
struct Conn {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    host: String,
    port: u16,
}

impl Conn {
    async fn open(port: u16) -> Conn {
        let mut last = String::new();
        for _ in 0..100 {
            match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                Ok(s) => {
                    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
                        .await
                        .expect("handshake");
                    tokio::spawn(conn);
                    return Conn {
                        sender,
                        host: format!("127.0.0.1:{port}"),
                        port,
                    };
                }
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("HTTP listener on {port} not reachable: {last}");
    }

    async fn send(
        &mut self,
        method: &str,
        path: &str,
        auth: Option<&str>,
        body: Option<&Value>,
    ) -> (u16, hyper::HeaderMap, Bytes) {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host);
        if let Some(a) = auth {
            req = req.header("authorization", format!("Bearer {a}"));
        }
        let body = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Full::new(Bytes::from(b.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        self.sender.ready().await.expect("connection ready");
        let resp = tokio::time::timeout(
            Duration::from_secs(60),
            self.sender.send_request(req.body(body).expect("request")),
        )
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no answer in 60 s"))
        .expect("response");
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.expect("body").to_bytes();
        if parts
            .headers
            .get("connection")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"))
        {
            *self = Conn::open(self.port).await;
        }
        (parts.status.as_u16(), parts.headers, bytes)
    }
}

fn token(role: &str) -> String {
    format!("{role}-token-0123456789abcdef")
}

/// Checks `v` against `schema` (the subset of JSON Schema the document uses, patterns aside).
fn conforms(doc: &Value, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    let s = deref(doc, schema);
    if let Some(c) = s.get("const")
        && c != v
    {
        return Err(format!("{at}: {v} is not {c}"));
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array)
        && !e.contains(v)
    {
        return Err(format!("{at}: {v} not in {e:?}"));
    }
    if let Some(alts) = s.get("oneOf").and_then(Value::as_array) {
        let ok = alts
            .iter()
            .filter(|a| conforms(doc, a, v, at).is_ok())
            .count();
        if ok != 1 {
            return Err(format!("{at}: {v} matches {ok} of oneOf"));
        }
    }
    if let Some(t) = s.get("type") {
        let types: Vec<&str> = match t {
            Value::String(t) => vec![t.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => return Err(format!("{at}: bad type in schema")),
        };
        let is = |t: &str| match t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "integer" => v.is_u64() || v.is_i64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            "null" => v.is_null(),
            _ => false,
        };
        if !types.iter().any(|t| is(t)) {
            return Err(format!("{at}: {v} is not {types:?}"));
        }
    }
    if let Some(min) = s.get("minimum").and_then(Value::as_f64)
        && v.as_f64().is_some_and(|n| n < min)
    {
        return Err(format!("{at}: {v} below {min}"));
    }
    if let Value::Object(m) = v {
        for r in s
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let r = r.as_str().unwrap_or_default();
            if !m.contains_key(r) {
                return Err(format!("{at}: missing required {r}"));
            }
        }
        let props = s.get("properties").and_then(Value::as_object);
        for (k, x) in m {
            match props.and_then(|p| p.get(k)) {
                Some(ps) => conforms(doc, ps, x, &format!("{at}.{k}"))?,
                None if s.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    return Err(format!("{at}: undocumented field {k}"));
                }
                None => {}
            }
        }
    }
    if let (Value::Array(a), Some(items)) = (v, s.get("items")) {
        for (i, x) in a.iter().enumerate() {
            conforms(doc, items, x, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

/// The status is documented for the operation and, for JSON, the body matches its schema.
fn documented(doc: &Value, method: &str, path: &str, status: u16, body: &[u8]) {
    let at = format!("{method} {path} -> {status}");
    let op = &doc["paths"][path][method.to_lowercase()];
    let r = op["responses"].get(status.to_string()).unwrap_or_else(|| {
        panic!(
            "{at}: status not documented; body {}",
            String::from_utf8_lossy(body)
        )
    });
    let r = deref(doc, r);
    if let Some(schema) = r["content"].get("application/json").map(|c| &c["schema"])
        && let Ok(v) = serde_json::from_slice::<Value>(body)
    {
        conforms(doc, schema, &v, &at).unwrap_or_else(|e| panic!("{e}\nbody: {v:#}"));
    }
}

/// A request as `role`: the answer carries `X-Request-Id` and is as documented.
async fn call(
    c: &mut Conn,
    doc: &Value,
    method: &str,
    template: &str,
    real: &str,
    role: &str,
    body: Option<&Value>,
) -> (u16, Bytes) {
    let (status, headers, bytes) = c.send(method, real, Some(&token(role)), body).await;
    assert!(headers.contains_key("x-request-id"), "{method} {real}");
    documented(doc, method, template, status, &bytes);
    (status, bytes)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_answers_as_documented() {
    let env = support::worker::Env::new().await;
    let port = support::free_port();
    let mut toml = String::new();
    for role in ROLES {
        toml.push_str(&format!(
            "[[http.credentials]]\nname = \"{role}\"\nroles = [\"{role}\"]\ntoken = \"{}\"\n\n",
            token(role)
        ));
    }
    let config = env.tmp.path().join("http.toml");
    std::fs::write(&config, toml).expect("config");
    let _worker = Worker::start_with(
        &env.nats,
        &env.runs_dir(),
        "http",
        &[
            ("RMOS_CONFIG".into(), config.display().to_string()),
            ("RMOS_HTTP_ADDR".into(), format!("127.0.0.1:{port}")),
            ("RMOS_METRICS_ADDR".into(), "off".into()),
        ],
    )
    .await;
    let doc = doc();
    let mut c = Conn::open(port).await;

    // The document served is the file.
    let (status, _, body) = c
        .send("GET", "/openapi.json", Some(&token("reader")), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(body, OPENAPI_JSON.as_bytes());

    // A run with every part: created (engine), patched (operator), advised (advisor).
    let create = json!({"mode": "cam", "tool_id": "T102", "status": "OK",
        "request": {"geometry": {"w": 120, "h": 80}},
        "feasibility": {"max_depth_mm": 3.5},
        "decision": {"risk_level": "GREEN", "score": 87.5, "warnings": ["tight corner"]},
        "outputs": {"gcode_text": "G21\nG90\nG0 X0 Y0\nG1 X10 Y10 F1200\n",
                    "opplan_json": {"ops": [1, 2]}},
        "meta": {"shift": "night"}});
    let (status, body) = call(
        &mut c,
        &doc,
        "POST",
        "/api/rmos/runs",
        "/api/rmos/runs",
        "engine",
        Some(&create),
    )
    .await;
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    let run: Value = serde_json::from_slice(&body).expect("run");
    let id = run["run_id"].as_str().expect("run_id").to_owned();
    let (status, _) = call(
        &mut c,
        &doc,
        "POST",
        "/api/rmos/runs",
        "/api/rmos/runs",
        "engine",
        Some(&create),
    )
    .await;
    assert_eq!(status, 200, "the same create again is a no-op");
    let p = format!("/api/rmos/runs/{id}");
    let (status, _) = call(
        &mut c,
        &doc,
        "PATCH",
        "/api/rmos/runs/{run_id}/meta",
        &format!("{p}/meta"),
        "operator",
        Some(&json!({"meta_updates": {"verified": true}, "expected_revision": 1})),
    )
    .await;
    assert_eq!(status, 200);
    let adv = json!({"advisory_id": "adv_0123456789ab", "kind": "explanation",
        "engine_id": "explainer", "engine_version": "2.1.0", "body": {"text": "Feed reduced"},
        "explanation_status": "READY", "explanation_summary": "Feed reduced"});
    let (status, _) = call(
        &mut c,
        &doc,
        "POST",
        "/api/rmos/runs/{run_id}/advisory",
        &format!("{p}/advisory"),
        "advisor",
        Some(&adv),
    )
    .await;
    assert_eq!(status, 200);

    // Every read, with its parameters, by a reader.
    for (template, real) in [
        ("/api/rmos/runs", "/api/rmos/runs?limit=5&order=oldest&mode=cam&tool_id=T102&status=OK&risk_level=GREEN&explanation_status=READY&since=2000-01-01T00:00:00Z&until=2999-01-01T00:00:00Z".to_owned()),
        ("/api/rmos/runs/{run_id}", p.clone()),
        ("/api/rmos/runs/{run_id}", format!("{p}?include_outputs=true&revision=2")),
        ("/api/rmos/runs/{run_id}/hashes", format!("{p}/hashes")),
        ("/api/rmos/runs/{run_id}/history", format!("{p}/history?limit=2")),
        ("/api/rmos/runs/{run_id}/diff", format!("{p}/diff?from=1&to=3")),
        ("/api/rmos/runs/{run_id}/outputs/{which}", format!("{p}/outputs/gcode")),
        ("/api/rmos/runs/{run_id}/advisories/{advisory_id}", format!("{p}/advisories/adv_0123456789ab")),
    ] {
        let (status, body) = call(&mut c, &doc, "GET", template, &real, "reader", None).await;
        assert_eq!(status, 200, "{real}: {}", String::from_utf8_lossy(&body));
    }
    let (_, body) = call(
        &mut c,
        &doc,
        "GET",
        "/api/rmos/runs",
        "/api/rmos/runs?order=oldest",
        "reader",
        None,
    )
    .await;
    let page: Value = serde_json::from_slice(&body).expect("page");
    assert_eq!(page["runs"][0]["run_id"], id.as_str());
    // Errors the document promises, with their body.
    for (method, template, real, role, b, want) in [
        (
            "GET",
            "/api/rmos/runs",
            "/api/rmos/runs?order=sideways".to_owned(),
            "reader",
            None,
            400,
        ),
        (
            "GET",
            "/api/rmos/runs",
            "/api/rmos/runs?colour=red".to_owned(),
            "reader",
            None,
            400,
        ),
        (
            "GET",
            "/api/rmos/runs/{run_id}",
            "/api/rmos/runs/nope".to_owned(),
            "reader",
            None,
            400,
        ),
        (
            "GET",
            "/api/rmos/runs/{run_id}",
            "/api/rmos/runs/run_00000000dead".to_owned(),
            "reader",
            None,
            404,
        ),
        (
            "GET",
            "/api/rmos/runs/{run_id}/history",
            format!("{p}/history?limit=0"),
            "reader",
            None,
            400,
        ),
        (
            "POST",
            "/api/rmos/runs",
            "/api/rmos/runs".to_owned(),
            "engine",
            Some(json!({"mode": "cam"})),
            400,
        ),
        (
            "PATCH",
            "/api/rmos/runs/{run_id}/meta",
            format!("{p}/meta"),
            "operator",
            Some(json!({"meta_updates": {}, "expected_revision": 1})),
            409,
        ),
    ] {
        let (status, body) = call(&mut c, &doc, method, template, &real, role, b.as_ref()).await;
        assert_eq!(
            status,
            want,
            "{method} {real}: {}",
            String::from_utf8_lossy(&body)
        );
    }

    // Roles: every operation, every role, and no credentials.
    let fill = |path: &str| {
        path.replace("{run_id}", &id)
            .replace("{which}", "gcode")
            .replace("{advisory_id}", "adv_0123456789ab")
            .replace("{file}", "app.js")
    };
    for ((method, template), op) in operations(&doc) {
        let real = fill(&template);
        let roles: BTreeSet<&str> = op["x-rmos-roles"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let (status, _, body) = c.send(&method, &real, None, None).await;
        documented(&doc, &method, &template, status, &body);
        assert_eq!(
            status == 401,
            !roles.is_empty(),
            "{method} {template} without credentials: {status}"
        );
        for role in ROLES {
            if roles.contains(role) && method != "GET" {
                continue; // commands by their role were sent above
            }
            let (status, _, body) = c.send(&method, &real, Some(&token(role)), None).await;
            documented(&doc, &method, &template, status, &body);
            if roles.is_empty() || roles.contains(role) {
                assert!(
                    status != 401 && status != 403,
                    "{method} {template} as {role}: {status}"
                );
            } else {
                assert_eq!(status, 403, "{method} {template} as {role}");
            }
        }
    }

    // Delete last: its answer is the stored event.
    let (status, body) = call(
        &mut c,
        &doc,
        "DELETE",
        "/api/rmos/runs/{run_id}",
        &p,
        "operator",
        Some(&json!({"reason": "retention"})),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let (status, _) = call(
        &mut c,
        &doc,
        "GET",
        "/api/rmos/runs/{run_id}",
        &p,
        "reader",
        None,
    )
    .await;
    assert_eq!(status, 404);
}
