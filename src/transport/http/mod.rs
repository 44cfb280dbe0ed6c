//! The HTTP transport (axum over hyper): the original FastAPI service's endpoints and the read
//! side beside them, the web view, the OpenAPI document, and `/metrics`, `/healthz`,
//! `/readyz`. Thin, like the NATS transport: reads call the same handlers ([`Reads`]),
//! commands go through the same stream ([`Commander`]).
//!
//! Two listeners may serve it: the main address (`http_addr`, everything) and the metrics
//! address (`metrics_addr`, only `/metrics`, `/healthz`, `/readyz`, without authentication, for
//! probes and scrapers on a private interface). Both run on the same connection layer
//! ([`server`]), with its timeouts and connection caps.

pub mod auth;
pub mod error;
pub mod routes;
pub mod runs;
pub mod server;
/// The web view's files (src/transport/http/web/), embedded.
pub mod web;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use self::auth::{Access, Auth};
use self::error::HttpError;
use self::routes::Route;
use self::runs::Ctx;
use self::server::ConnLimits;
use super::health::Health;
use super::metrics::Metrics;
use super::outcomes::Commander;
use super::reads::Reads;

/// The HTTP header whose value becomes a command's `Nats-Msg-Id` (the stream's
/// de-duplication key): a client retrying a command sends the same key.
pub const MSG_ID_HTTP_HEADER: &str = "Idempotency-Key";

/// The OpenAPI document served at `/openapi.json`.
pub const OPENAPI_JSON: &str = include_str!("openapi.json");

/// What the handlers share.
pub struct AppState {
    /// The read handlers.
    pub reads: Reads,
    /// Publishes commands (`None`: commands are refused with 503).
    pub commander: Option<Arc<Commander>>,
    /// Credentials and roles.
    pub auth: Auth,
    /// Metrics (also served at `/metrics`).
    pub metrics: Arc<Metrics>,
    /// Readiness checks.
    pub health: Arc<Health>,
    /// How long a command waits for its outcome before answering 504.
    pub command_timeout: Duration,
    /// Largest command that goes as one broker message (the smaller of `max_payload_bytes`
    /// and the broker's `max_payload`): the request body limit of patches and deletes, and
    /// the size over which a create's or advisory's bodies are staged.
    pub max_body: usize,
    /// The staging bucket (claim checks; `None` in core ingest mode: then a create or
    /// advisory is limited to `max_body` too).
    pub staging: Option<super::claim_check::Staging>,
    /// Largest create or advisory request body when it can be staged (`[http]
    /// max_body_bytes`).
    pub max_staged_body: usize,
    /// Requests whose body is over one broker message take a permit while it is read and
    /// staged ([`LARGE_BODIES_AT_ONCE`]): each holds its parsed body in memory, so their
    /// number, not only their size, must be bounded.
    pub large_bodies: tokio::sync::Semaphore,
}

/// How many create or advisory requests larger than one broker message are read and staged at
/// once; more wait (reading nothing meanwhile), so the memory they take stays near this many
/// times `[http] max_body_bytes` at worst.
pub const LARGE_BODIES_AT_ONCE: usize = 2;

/// Where and how to serve.
#[derive(Clone, Debug)]
pub struct HttpSettings {
    /// The configuration key of the address (`http_addr`, `metrics_addr`), named in a bind
    /// failure so that the operator knows what to change.
    pub key: &'static str,
    /// `host:port`; `None`: disabled.
    pub addr: Option<String>,
    /// Set explicitly (a bind failure then stops start-up; for the default address it only
    /// disables the listener with a warning).
    pub required: bool,
    /// Connection limits.
    pub limits: ConnLimits,
}

/// `/metrics`, `/healthz`, `/readyz`.
fn ops_table() -> Vec<Route<Arc<AppState>>> {
    vec![
        Route::get("/metrics", metrics),
        Route::get("/healthz", || async { "ok\n" }),
        Route::get("/readyz", readyz),
    ]
}

/// Every route of the main address: API, web view, OpenAPI, ops.
fn app_table() -> Vec<Route<Arc<AppState>>> {
    let mut t = runs::table();
    t.extend([
        Route::get("/", web_index),
        Route::get("/assets/{file}", web_asset),
        Route::get("/openapi.json", openapi),
    ]);
    t.extend(ops_table());
    t
}

/// `(method, path)` of every route the main address serves (what /openapi.json describes).
pub fn served_routes() -> Vec<(axum::http::Method, &'static str)> {
    routes::listed(&app_table())
}

/// The whole application: API, web view, OpenAPI, ops.
pub fn app(state: Arc<AppState>) -> Router {
    let max_body = state.max_body;
    routes::build(app_table())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Only the ops routes (the metrics address).
pub fn ops_app(state: Arc<AppState>) -> Router {
    routes::build(ops_table())
        .fallback(|ctx: Ctx| async move {
            HttpError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "not found: this address serves /metrics, /healthz and /readyz",
                &ctx.request_id,
            )
        })
        .with_state(state)
}

/// Counts every request by route and status, and logs refusals.
async fn observe(State(s): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let method = req.method().clone();
    let has_body = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .is_some_and(|v| v.as_bytes() != b"0")
        || req.headers().contains_key(header::TRANSFER_ENCODING);
    let mut response = next.run(req).await;
    // A refusal may come before the request body was read to its end (over a limit, bad JSON
    // early on): the connection cannot carry another request, so say so, or a client reusing
    // it would see its next request fail.
    if has_body && (response.status().is_client_error() || response.status().is_server_error()) {
        response.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    s.metrics.http_request(
        route.as_deref().unwrap_or("unmatched"),
        method.as_str(),
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

async fn not_found(ctx: Ctx) -> HttpError {
    HttpError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint: see /openapi.json",
        &ctx.request_id,
    )
}

async fn method_not_allowed(ctx: Ctx) -> HttpError {
    HttpError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this path: see /openapi.json",
        &ctx.request_id,
    )
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

async fn readyz(State(s): State<Arc<AppState>>) -> Response {
    let reasons = s.health.not_ready().await;
    if reasons.is_empty() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        let mut body = reasons.join("\n");
        body.push('\n');
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

async fn openapi(State(s): State<Arc<AppState>>, ctx: Ctx) -> Result<Response, HttpError> {
    ctx.allow(&s, Access::Read)?;
    Ok(([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON).into_response())
}

/// Headers of every web view file: no framing by other sites, no inline script from elsewhere.
fn page(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data: blob:; worker-src 'self' blob:; \
                 style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
            ),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn web_index(State(s): State<Arc<AppState>>, ctx: Ctx) -> Result<Response, HttpError> {
    ctx.allow(&s, Access::Read)?;
    Ok(page("text/html; charset=utf-8", web::INDEX_HTML))
}

async fn web_asset(
    State(s): State<Arc<AppState>>,
    ctx: Ctx,
    axum::extract::Path(file): axum::extract::Path<String>,
) -> Result<Response, HttpError> {
    ctx.allow(&s, Access::Read)?;
    match file.as_str() {
        "app.js" => Ok(page("text/javascript; charset=utf-8", web::APP_JS)),
        "app.css" => Ok(page("text/css; charset=utf-8", web::APP_CSS)),
        _ => Err(not_found(ctx).await),
    }
}

/// Binds `settings.addr` and serves `router` there until `shutdown` turns true. `Ok(None)`
/// when disabled, or when the default address is taken. `check` may refuse the bound address
/// (authentication required off loopback).
pub async fn start(
    what: &'static str,
    settings: &HttpSettings,
    router: Router,
    check: impl FnOnce(&std::net::SocketAddr) -> Result<(), String>,
    shutdown: watch::Receiver<bool>,
) -> Result<Option<(std::net::SocketAddr, JoinHandle<()>)>, String> {
    let Some(addr) = settings.addr.as_deref() else {
        tracing::info!("{what} disabled");
        return Ok(None);
    };
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) if settings.required => {
            return Err(format!("{what}: {} {addr}: {e}", settings.key));
        }
        Err(e) => {
            tracing::warn!(addr, error = %e, "{what} not started (set its address to another one, or off)");
            return Ok(None);
        }
    };
    let local = listener
        .local_addr()
        .map_err(|e| format!("{what} {addr}: {e}"))?;
    check(&local)?;
    tracing::info!(addr = %local, "{what} listening");
    let limits = settings.limits.clone();
    Ok(Some((
        local,
        tokio::spawn(server::serve(listener, router, limits, shutdown)),
    )))
}
