//! `/api/rmos/runs...`: the original FastAPI service's endpoints and the read side beside them.
//! Reads go to the same handlers as NATS requests ([`Reads`]); commands are published through
//! the same stream as a NATS publisher's ([`Commander`]) and answered once stored or rejected.

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::{StreamExt as _, TryStreamExt as _};
use serde_json::{Map, Value};

use super::auth::{Access, AuthError, Caller};
use super::error::{HttpError, status_of_code};
use super::routes::Route;
use super::{AppState, MSG_ID_HTTP_HEADER};
use crate::domain::artifact::{BlobRef, RunArtifact};
use crate::domain::command::CommandKind;
use crate::domain::ids::{RequestId, RunId};
use crate::transport::claim_check;
use crate::transport::outcomes::{Outcome, SendError};
use crate::transport::{REQUEST_ID_HEADER, WireError};

/// The routes under `/api/rmos/runs`, as a table (see [`super::routes`]).
pub fn table() -> Vec<Route<Arc<AppState>>> {
    vec![
        Route::get("/api/rmos/runs", list),
        Route::post("/api/rmos/runs", create),
        Route::get("/api/rmos/runs/{run_id}", get_run),
        Route::delete("/api/rmos/runs/{run_id}", delete),
        Route::patch("/api/rmos/runs/{run_id}/meta", patch_meta),
        Route::post("/api/rmos/runs/{run_id}/advisory", advisory),
        Route::get("/api/rmos/runs/{run_id}/hashes", hashes),
        Route::get("/api/rmos/runs/{run_id}/history", history),
        Route::get("/api/rmos/runs/{run_id}/diff", diff),
        Route::get("/api/rmos/runs/{run_id}/outputs/{which}", output),
        Route::get(
            "/api/rmos/runs/{run_id}/advisories/{advisory_id}",
            advisory_body,
        ),
    ]
}

/// The routes under `/api/rmos/runs`.
pub fn routes() -> Router<Arc<AppState>> {
    super::routes::build(table())
}

/// What every handler starts from: the request id and the caller's credentials.
pub struct Ctx {
    /// `X-Request-Id` when valid, else a new one.
    pub request_id: RequestId,
    authorization: Option<String>,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Ctx {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Ctx::from_headers(&parts.headers))
    }
}

impl Ctx {
    /// From a request's headers.
    pub fn from_headers(h: &HeaderMap) -> Self {
        let request_id = h
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| RequestId::parse(v).ok())
            .unwrap_or_else(RequestId::generate);
        Self {
            request_id,
            authorization: h
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        }
    }

    /// The caller, if allowed `access`.
    pub fn allow(&self, state: &AppState, access: Access) -> Result<Caller, HttpError> {
        state
            .auth
            .authorize(self.authorization.as_deref(), access)
            .map_err(|e| match e {
                AuthError::Unauthenticated(m) => HttpError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    m,
                    &self.request_id,
                ),
                AuthError::Forbidden(m) => {
                    HttpError::new(StatusCode::FORBIDDEN, "forbidden", m, &self.request_id)
                }
            })
    }

    fn wire(&self, e: WireError) -> HttpError {
        HttpError::wire(e, &self.request_id)
    }

    fn run_id(&self, raw: &str) -> Result<RunId, HttpError> {
        RunId::parse(raw).map_err(|r| self.wire(WireError::from(&r)))
    }

    /// A JSON answer.
    fn json(&self, status: StatusCode, body: impl Into<Body>) -> Response {
        let mut r = (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            body.into(),
        )
            .into_response();
        self.stamp(&mut r);
        r
    }

    fn stamp(&self, r: &mut Response) {
        if let Ok(v) = HeaderValue::from_str(self.request_id.as_str()) {
            r.headers_mut().insert(REQUEST_ID_HEADER, v);
        }
    }
}

/// The query string as a JSON object: `limit`, `revision`, `from` and `to` as numbers,
/// `include_outputs` as a boolean, the rest as strings. A repeated parameter is refused.
fn query_object(ctx: &Ctx, raw: Option<&str>) -> Result<Map<String, Value>, HttpError> {
    let mut out = Map::new();
    for (k, v) in url::form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        let value = match k.as_ref() {
            "limit" | "revision" | "from" | "to" => match v.parse::<u64>() {
                Ok(n) => Value::from(n),
                Err(_) => {
                    return Err(HttpError::invalid(
                        format!("query parameter {k}: {v:?} is not a whole number"),
                        &ctx.request_id,
                    ));
                }
            },
            "include_outputs" => match v.as_ref() {
                "true" | "1" => Value::Bool(true),
                "false" | "0" => Value::Bool(false),
                _ => {
                    return Err(HttpError::invalid(
                        format!("query parameter include_outputs: {v:?} is not true or false"),
                        &ctx.request_id,
                    ));
                }
            },
            _ => Value::String(v.clone().into_owned()),
        };
        if out.insert(k.clone().into_owned(), value).is_some() {
            return Err(HttpError::invalid(
                format!("query parameter {k} given twice"),
                &ctx.request_id,
            ));
        }
    }
    Ok(out)
}

/// Only the query parameters in `allowed` (a misspelt one must not be silently ignored).
fn only(ctx: &Ctx, q: &Map<String, Value>, allowed: &[&str]) -> Result<(), HttpError> {
    match q.keys().find(|k| !allowed.contains(&k.as_str())) {
        None => Ok(()),
        Some(k) => Err(HttpError::invalid(
            format!(
                "unknown query parameter {k:?}; this endpoint takes: {}",
                if allowed.is_empty() {
                    "none".to_owned()
                } else {
                    allowed.join(", ")
                }
            ),
            &ctx.request_id,
        )),
    }
}

async fn list(
    State(s): State<Arc<AppState>>,
    ctx: Ctx,
    RawQuery(q): RawQuery,
) -> Result<Response, HttpError> {
    ctx.allow(&s, Access::Read)?;
    let q = query_object(&ctx, q.as_deref())?;
    let body = Value::Object(q).to_string();
    let page = s
        .reads
        .list(body.as_bytes())
        .await
        .map_err(|e| ctx.wire(e))?;
    Ok(ctx.json(StatusCode::OK, page))
}

async fn get_run(
    State(s): State<Arc<AppState>>,
    ctx: Ctx,
    Path(run_id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, HttpError> {
    ctx.allow(&s, Access::Read)?;
    let run = ctx.run_id(&run_id)?;
    let mut q = query_object(&ctx, q.as_deref())?;
    only(&ctx, &q, &["include_outputs", "revision"])?;
    q.insert("run_id".into(), Value::String(run.to_string()));
    let body = Value::Object(q).to_string();
    let bytes = s
        .reads
        .get(body.as_bytes())
        .await
        .map_err(|e| ctx.wire(e))?;
    Ok(ctx.json(StatusCode::OK, bytes))
}

/// A read endpoint taking the run id from the path and `allowed` query parameters.
async fn read_with(
    s: &AppState,
    ctx: &Ctx,
    run_id: &str,
    raw: Option<&str>,
    allowed: &[&str],
) -> Result<Vec<u8>, HttpError> {
    ctx.allow(s, Access::Read)?;
    let run = ctx.run_id(run_id)?;
    let mut q = query_object(ctx, raw)?;
    only(ctx, &q, allowed)?;
    q.insert("run_id".into(), Value::String(run.to_string()));
    Ok(Value::Object(q).to_string().into_bytes())
}

async fn hashes(
    State(s): State<Arc<AppState>>,
    ctx: Ctx,
    Path(run_id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, HttpError> {
    let body = read_with(&s, &ctx, &run_id, q.as_deref(), &[]).await?;
    let report = s.reads.verify(&body).await.map_err(|e| ctx.wire(e))?;
    Ok(ctx.json(StatusCode::OK, report))
}

async fn history(
    State(s): State<Arc<AppState>>,
    ctx: Ctx,
    Path(run_id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, HttpError> {
    let body = read_with(&s, &ctx, &run_id, q.as_deref(), &["limit", "cursor"]).await?;
    let page = s.reads.history(&body).await.map_err(|e| ctx.wire(e))?;
    Ok(ctx.json(StatusCode::OK, page))
}

async fn diff(
    State(s): State<Arc<AppState>>,
    ctx: Ctx,
    Path(run_id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, HttpError> {
    let body = read_with(&s, &ctx, &run_id, q.as_deref(), &["from", "to"]).await?;
    let d = s.reads.diff(&body).await.map_err(|e| ctx.wire(e))?;
    Ok(ctx.json(StatusCode::OK, d))
}

/// The current live record, or `not_found` (a deleted run is not found).
async fn live(s: &AppState, ctx: &Ctx, run: &RunId) -> Result<RunArtifact, HttpError> {
    s.reads
        .store()
        .get(run)
        .await
        .map_err(|e| ctx.wire(WireError::from(&e)))
}

/// A blob's bytes, streamed from the store (a body of any size goes out in constant memory).
async fn stream_blob(
    s: &AppState,
    ctx: &Ctx,
    run: &RunId,
    blob: &BlobRef,
    content_type: &'static str,
) -> Result<Response, HttpError> {
    let store = s.reads.store();
    let got = store
        .blob_stream(&blob.sha256)
        .await
        .map_err(|e| ctx.wire(WireError::from(&e)))?
        .ok_or_else(|| {
            let e = crate::store::StoreError::Corrupt {
                key: store.blob_key(&blob.sha256).to_string(),
                reason: format!("run {run}: a blob it references is missing"),
            };
            ctx.wire(WireError::from(&e))
        })?;
    let len = got.size;
    let stream = got.bytes.map_err(|e| std::io::Error::other(e.to_string()));
    let mut r = (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CONTENT_LENGTH, HeaderValue::from(len)),
        ],
        Body::from_stream(stream),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", blob.sha256.as_str())) {
        r.headers_mut().insert(header::ETAG, v);
    }
    ctx.stamp(&mut r);
    Ok(r)
}

async fn output(
    State(s): State<Arc<AppState>>,
    ctx: Ctx,
    Path((run_id, which)): Path<(String, String)>,
) -> Result<Response, HttpError> {
    ctx.allow(&s, Access::Read)?;
    let run = ctx.run_id(&run_id)?;
    if which != "gcode" && which != "opplan" {
        return Err(HttpError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no output {which:?}: outputs are gcode and opplan"),
            &ctx.request_id,
        ));
    }
    let a = live(&s, &ctx, &run).await?;
    let missing = |what: &str| {
        HttpError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("run {run} has no {what}"),
            &ctx.request_id,
        )
    };
    match which.as_str() {
        "gcode" => match (&a.outputs.gcode_blob, &a.outputs.gcode_text) {
            (Some(b), _) => stream_blob(&s, &ctx, &run, b, "text/plain; charset=utf-8").await,
            (None, Some(text)) => {
                let mut r = (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                    text.clone(),
                )
                    .into_response();
                ctx.stamp(&mut r);
                Ok(r)
            }
            (None, None) => Err(missing("G-code")),
        },
        "opplan" => match (&a.outputs.opplan_blob, &a.outputs.opplan_json) {
            (Some(b), _) => stream_blob(&s, &ctx, &run, b, "application/json").await,
            (None, Some(plan)) => {
                Ok(ctx.json(StatusCode::OK, serde_json::to_vec(plan).unwrap_or_default()))
            }
            (None, None) => Err(missing("op plan")),
        },
        _ => Err(missing("such output")),
    }
}

async fn advisory_body(
    State(s): State<Arc<AppState>>,
    ctx: Ctx,
    Path((run_id, advisory_id)): Path<(String, String)>,
) -> Result<Response, HttpError> {
    ctx.allow(&s, Access::Read)?;
    let run = ctx.run_id(&run_id)?;
    let a = live(&s, &ctx, &run).await?;
    let found = a
        .advisory_inputs
        .iter()
        .find(|adv| adv.advisory_id.as_str() == advisory_id)
        .ok_or_else(|| {
            HttpError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("run {run} has no advisory {advisory_id:?}"),
                &ctx.request_id,
            )
        })?;
    match &found.body {
        Some(b) => stream_blob(&s, &ctx, &run, b, "application/json").await,
        None => Ok(ctx.json(StatusCode::OK, "null")),
    }
}

/// A command's JSON body, as an object; `run_id` from the path put in (or checked against the
/// body's).
fn command_body(
    ctx: &Ctx,
    s: &AppState,
    body: Result<Bytes, BytesRejection>,
    run: Option<&RunId>,
    optional: bool,
) -> Result<Bytes, HttpError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ctx.wire(WireError::from(
                &crate::domain::error::Rejection::too_large(format!(
                    "request body over {} bytes (the largest command the broker takes)",
                    s.max_body
                )),
            ))
        } else {
            HttpError::invalid(format!("request body: {e}"), &ctx.request_id)
        }
    })?;
    if body.iter().all(u8::is_ascii_whitespace) && optional {
        let mut m = Map::new();
        if let Some(r) = run {
            m.insert("run_id".into(), Value::String(r.to_string()));
        }
        return Ok(Bytes::from(Value::Object(m).to_string()));
    }
    let Some(run) = run else {
        return Ok(body);
    };
    let mut obj: Map<String, Value> = serde_json::from_slice(&body).map_err(|e| {
        HttpError::invalid(
            format!("request body is not a JSON object: {e}"),
            &ctx.request_id,
        )
    })?;
    put_run_id(ctx, &mut obj, run)?;
    Ok(Bytes::from(Value::Object(obj).to_string()))
}

/// Puts the path's run id in a command body, or checks the body's against it.
fn put_run_id(ctx: &Ctx, obj: &mut Map<String, Value>, run: &RunId) -> Result<(), HttpError> {
    match obj.get("run_id") {
        None => {
            obj.insert("run_id".into(), Value::String(run.to_string()));
            Ok(())
        }
        Some(Value::String(r)) if r == run.as_str() => Ok(()),
        Some(other) => Err(HttpError::invalid(
            format!("body run_id {other} differs from the path's {run}"),
            &ctx.request_id,
        )),
    }
}

/// Publishes a command and answers with its outcome: the run as stored by it (create, patch,
/// advisory) or the `stored` event (delete); a rejection with its code's status.
async fn command(
    s: &AppState,
    ctx: &Ctx,
    caller: &Caller,
    headers: &HeaderMap,
    kind: CommandKind,
    payload: Bytes,
) -> Result<Response, HttpError> {
    let Some(commander) = &s.commander else {
        return Err(HttpError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "commands are not accepted over HTTP by this worker",
            &ctx.request_id,
        ));
    };
    let msg_id = headers
        .get(MSG_ID_HTTP_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty());
    tracing::info!(request_id = %ctx.request_id, command = kind.suffix(),
        caller = caller.name().unwrap_or("-"), "http command");
    let outcome = commander
        .send(
            kind,
            payload,
            &ctx.request_id,
            msg_id,
            caller.actor(),
            s.command_timeout,
        )
        .await
        .map_err(|e| {
            let (status, code) = match &e {
                SendError::NotAccepted(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
                SendError::NoOutcome { .. } => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
                SendError::RequestIdInUse(_) => (StatusCode::CONFLICT, "conflict"),
            };
            HttpError::new(status, code, e.to_string(), &ctx.request_id)
        })?;
    let event = match outcome {
        Outcome::Stored(event) => event,
        Outcome::Rejected(body) => {
            let v: Value = serde_json::from_slice(&body).unwrap_or_default();
            let (code, status) = status_of_code(v["code"].as_str().unwrap_or(""));
            return Err(HttpError::new(
                status,
                code,
                v["message"].as_str().unwrap_or("rejected").to_owned(),
                &ctx.request_id,
            ));
        }
    };
    let ev: Value = serde_json::from_slice(&event).unwrap_or_default();
    if kind == CommandKind::Delete {
        return Ok(ctx.json(StatusCode::OK, event));
    }
    // The run as this command left it: that revision, not whatever is current by now.
    let (Some(run), Some(revision)) = (ev["run_id"].as_str(), ev["revision"].as_u64()) else {
        return Ok(ctx.json(StatusCode::OK, event));
    };
    let q = serde_json::json!({"run_id": run, "revision": revision}).to_string();
    let record = match s.reads.get(q.as_bytes()).await {
        Ok(b) => b,
        Err(e) => return Err(ctx.wire(e)),
    };
    let status = if kind == CommandKind::Create && ev["event"] == "created" && ev["changed"] == true
    {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut r = ctx.json(status, record);
    if kind == CommandKind::Create
        && let Ok(v) = HeaderValue::from_str(&format!("/api/rmos/runs/{run}"))
    {
        r.headers_mut().insert(header::LOCATION, v);
    }
    Ok(r)
}

async fn create(
    State(s): State<Arc<AppState>>,
    ctx: Ctx,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, HttpError> {
    let caller = ctx.allow(&s, Access::Create)?;
    let payload = staged_command_body(&ctx, &s, body, None, CommandKind::Create).await?;
    command(&s, &ctx, &caller, &headers, CommandKind::Create, payload).await
}

/// The body of a create or advisory, which may be larger than one broker message: read as
/// it arrives into one parsed JSON value (the raw bytes are never held whole), then, when
/// the command does not fit one message, its bodies are staged in the staging bucket and the
/// command names them instead (the same claim check a NATS publisher uses). Over
/// `max_staged_body` (or, without a staging bucket, over one message) is 413 naming the limit.
async fn staged_command_body(
    ctx: &Ctx,
    s: &AppState,
    body: Body,
    run: Option<&RunId>,
    kind: CommandKind,
) -> Result<Bytes, HttpError> {
    let (limit, limit_name) = match &s.staging {
        Some(_) => (s.max_staged_body, "http.max_body_bytes"),
        None => (
            s.max_body,
            "the largest command the broker takes; no staging bucket in core ingest",
        ),
    };
    let too_large = |what: String| {
        ctx.wire(WireError::from(
            &crate::domain::error::Rejection::too_large(what),
        ))
    };
    let (v, _large) = read_json(ctx, s, body, limit).await?;
    let mut v =
        v.map_err(|()| too_large(format!("request body over {limit} bytes ({limit_name})")))?;
    let Value::Object(obj) = &mut v else {
        return Err(HttpError::invalid(
            "request body is not a JSON object",
            &ctx.request_id,
        ));
    };
    if let Some(run) = run {
        put_run_id(ctx, obj, run)?;
    }
    if !claim_check::fits(claim_check::json_len(&v), s.max_body)
        && let Some(staging) = &s.staging
    {
        staging
            .stage_bodies(kind, &mut v, s.max_body)
            .await
            .map_err(|e| {
                HttpError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    format!("staging the body: {e}"),
                    &ctx.request_id,
                )
            })?;
    }
    let len = claim_check::json_len(&v);
    if !claim_check::fits(len, s.max_body) {
        return Err(too_large(format!(
            "the command is {len} bytes{}, over the {} a broker message takes",
            if s.staging.is_some() {
                " without its staged bodies"
            } else {
                ""
            },
            s.max_body
        )));
    }
    serde_json::to_vec(&v)
        .map(Bytes::from)
        .map_err(|e| HttpError::invalid(format!("request body: {e}"), &ctx.request_id))
}

/// Parses a request body as one JSON value as it arrives (in a blocking task fed chunk by
/// chunk: the value is the only copy held). `Err(())` inside when the body is over `limit`
/// bytes. A body over one broker message first takes a permit of `large_bodies`, returned
/// with the value: the caller holds it until the body is staged.
async fn read_json<'a>(
    ctx: &Ctx,
    s: &'a AppState,
    body: Body,
    limit: usize,
) -> Result<(Result<Value, ()>, Option<tokio::sync::SemaphorePermit<'a>>), HttpError> {
    let mut permit = None;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let parse = tokio::task::spawn_blocking(move || {
        let reader = std::io::BufReader::with_capacity(
            64 * 1024,
            ChannelReader {
                rx,
                chunk: Bytes::new(),
            },
        );
        serde_json::from_reader::<_, Value>(reader)
    });
    let mut frames = body.into_data_stream();
    let (mut seen, mut over, mut failed) = (0usize, false, None);
    while let Some(frame) = frames.next().await {
        match frame {
            Ok(chunk) => {
                seen = seen.saturating_add(chunk.len());
                if seen > limit {
                    over = true;
                    break;
                }
                if seen > s.max_body && permit.is_none() {
                    // Closed never: the semaphore lives as long as the state.
                    permit = s.large_bodies.acquire().await.ok();
                }
                // The parser stopped (bad JSON): it says why below.
                if tx.send(chunk).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                failed = Some(e.to_string());
                break;
            }
        }
    }
    drop(tx);
    let parsed = parse.await.map_err(|e| {
        HttpError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("reading the request body: {e}"),
            &ctx.request_id,
        )
    })?;
    if over {
        return Ok((Err(()), None));
    }
    if let Some(e) = failed {
        return Err(HttpError::invalid(
            format!("request body: {e}"),
            &ctx.request_id,
        ));
    }
    match parsed {
        Ok(v) => Ok((Ok(v), permit)),
        Err(e) => Err(HttpError::invalid(
            format!("request body is not valid JSON: {e}"),
            &ctx.request_id,
        )),
    }
}

/// A blocking reader over the chunks of a request body, for `serde_json::from_reader`.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    chunk: Bytes,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                Some(c) => self.chunk = c,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}

/// A command on the run named in the path: `access` checked, `run_id` put in the body (a
/// delete's body is optional, and gets a reason when it has none).
async fn on_run(
    s: &AppState,
    ctx: &Ctx,
    headers: &HeaderMap,
    run_id: &str,
    body: Result<Bytes, BytesRejection>,
    access: Access,
    kind: CommandKind,
) -> Result<Response, HttpError> {
    let caller = ctx.allow(s, access)?;
    let run = ctx.run_id(run_id)?;
    let delete = kind == CommandKind::Delete;
    let mut payload = command_body(ctx, s, body, Some(&run), delete)?;
    if delete {
        // The original service's DELETE took no body: a reason is recorded all the same.
        let mut obj: Map<String, Value> = serde_json::from_slice(&payload).unwrap_or_default();
        if !obj.contains_key("reason") {
            let reason = match caller.name() {
                Some(name) => format!("deleted over HTTP by {name}"),
                None => "deleted over HTTP".to_owned(),
            };
            obj.insert("reason".into(), Value::String(reason));
        }
        payload = Bytes::from(Value::Object(obj).to_string());
    }
    command(s, ctx, &caller, headers, kind, payload).await
}

async fn patch_meta(
    State(s): State<Arc<AppState>>,
    ctx: Ctx,
    headers: HeaderMap,
    Path(run_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    let kind = CommandKind::PatchMeta;
    on_run(&s, &ctx, &headers, &run_id, body, Access::Operate, kind).await
}

async fn advisory(
    State(s): State<Arc<AppState>>,
    ctx: Ctx,
    headers: HeaderMap,
    Path(run_id): Path<String>,
    body: Body,
) -> Result<Response, HttpError> {
    let kind = CommandKind::Advisory;
    let caller = ctx.allow(&s, Access::Advise)?;
    let run = ctx.run_id(&run_id)?;
    let payload = staged_command_body(&ctx, &s, body, Some(&run), kind).await?;
    command(&s, &ctx, &caller, &headers, kind, payload).await
}

async fn delete(
    State(s): State<Arc<AppState>>,
    ctx: Ctx,
    headers: HeaderMap,
    Path(run_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    let kind = CommandKind::Delete;
    on_run(&s, &ctx, &headers, &run_id, body, Access::Operate, kind).await
}
