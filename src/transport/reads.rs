//! The read side shared by every transport: `get`, `list`, `verify`, `history` and `diff`,
//! each taking the request's body as NATS carries it and answering JSON bytes or a
//! [`WireError`]. The NATS API and the HTTP server both call these, so a request means the
//! same thing and fails with the same error whichever way it comes.

use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;

use super::WireError;
use super::metrics::Metrics;
use crate::domain::artifact::{RunArtifact, StoredRecord};
use crate::domain::error::Rejection;
use crate::domain::ids::RunId;
use crate::store::{ListQuery, RunStore, StoreError};

/// A `get` request.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetRequest {
    /// The run.
    pub run_id: RunId,
    /// Large bodies put back inline.
    #[serde(default)]
    pub include_outputs: bool,
    /// A past revision (its record as it was stored then).
    #[serde(default)]
    pub revision: Option<u64>,
    /// One output body alone (NATS: inline when small, else staged in the staging bucket;
    /// HTTP serves bodies at their own paths instead).
    #[serde(default)]
    pub output: Option<OutputName>,
}

impl GetRequest {
    /// Parses a `get` body: a bare run id or a JSON object.
    pub fn parse(body: &[u8]) -> Result<Self, WireError> {
        parse_id_or_json(body, |run_id| GetRequest {
            run_id,
            include_outputs: false,
            revision: None,
            output: None,
        })
        .map_err(|r| WireError::from(&r))
    }
}

/// The output bodies `get` can return alone.
#[derive(Clone, Copy, Debug, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OutputName {
    /// The G-code text.
    Gcode,
    /// The op plan (RFC 8785 JSON when stored as a blob).
    Opplan,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryRequest {
    run_id: RunId,
    #[serde(default)]
    limit: Option<usize>,
    /// The previous page's `next_cursor`.
    #[serde(default)]
    cursor: Option<String>,
}

/// Two revisions of one run (`from` defaults to the one before `to`, `to` to the latest), or
/// the latest revisions of two runs.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DiffRequest {
    #[serde(default)]
    run_id: Option<RunId>,
    #[serde(default)]
    from: Option<u64>,
    #[serde(default)]
    to: Option<u64>,
    #[serde(default)]
    a: Option<RunId>,
    #[serde(default)]
    b: Option<RunId>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyRequest {
    run_id: RunId,
}

/// Parses a body that is either a bare run id or a JSON object.
fn parse_id_or_json<T: for<'de> Deserialize<'de>>(
    body: &[u8],
    from_id: impl FnOnce(RunId) -> T,
) -> Result<T, Rejection> {
    let text = std::str::from_utf8(body)
        .map_err(|_| Rejection::invalid("request body is not UTF-8"))?
        .trim();
    if text.starts_with('{') {
        serde_json::from_str(text).map_err(|e| Rejection::invalid(format!("schema violation: {e}")))
    } else if text.is_empty() {
        Err(Rejection::invalid(
            "request body is empty: send a run id or {\"run_id\": ...}",
        ))
    } else {
        RunId::parse(text).map(from_id)
    }
}

/// The read handlers over one store.
#[derive(Clone)]
pub struct Reads {
    store: RunStore,
    metrics: Arc<Metrics>,
}

impl Reads {
    /// Reads of `store`, counting store failures in `metrics`.
    pub fn new(store: RunStore, metrics: Arc<Metrics>) -> Self {
        Self { store, metrics }
    }

    /// The store read.
    pub fn store(&self) -> &RunStore {
        &self.store
    }

    /// Counts a store failure in the metrics, then maps it to the wire.
    fn store_err(&self, e: StoreError) -> WireError {
        self.metrics.store_error(&e);
        WireError::from(&e)
    }

    /// `get`: a run id as text or `{"run_id", "include_outputs"?, "revision"?}` → the record
    /// as stored (or that revision, or with its outputs inlined).
    pub async fn get(&self, body: &[u8]) -> Result<Bytes, WireError> {
        let q = GetRequest::parse(body)?;
        if q.output.is_some() {
            return Err(WireError::invalid(
                "output is not served here: fetch /api/rmos/runs/{run_id}/outputs/{gcode|opplan}",
            ));
        }
        self.get_parsed(&q).await
    }

    /// `get` of a parsed request (its `output` is not looked at).
    pub async fn get_parsed(&self, q: &GetRequest) -> Result<Bytes, WireError> {
        let bytes = if let Some(revision) = q.revision {
            let value = self
                .store
                .get_revision(&q.run_id, revision)
                .await
                .map_err(|e| self.store_err(e))?;
            let value = if q.include_outputs {
                let bytes = serde_json::to_vec(&value).unwrap_or_default();
                match StoredRecord::decode(&bytes) {
                    Ok(StoredRecord::Live(a)) => {
                        let a = self
                            .store
                            .inline_outputs(*a)
                            .await
                            .map_err(|e| self.store_err(e))?;
                        serde_json::to_value(&a).unwrap_or(value)
                    }
                    _ => value,
                }
            } else {
                value
            };
            Bytes::from(serde_json::to_vec_pretty(&value).unwrap_or_default())
        } else if q.include_outputs {
            let artifact = self
                .store
                .get(&q.run_id)
                .await
                .map_err(|e| self.store_err(e))?;
            self.with_outputs(artifact).await?
        } else {
            self.store
                .get_bytes(&q.run_id)
                .await
                .map_err(|e| self.store_err(e))?
        };
        Ok(bytes)
    }

    /// A live record with its large bodies put back inline, encoded as `get` answers it.
    pub async fn with_outputs(&self, artifact: RunArtifact) -> Result<Bytes, WireError> {
        let artifact = self
            .store
            .inline_outputs(artifact)
            .await
            .map_err(|e| self.store_err(e))?;
        Ok(Bytes::from(StoredRecord::Live(Box::new(artifact)).encode()))
    }

    /// `list`: a [`ListQuery`] as JSON (empty: the first page, newest first) → a page.
    pub async fn list(&self, body: &[u8]) -> Result<Bytes, WireError> {
        let text = std::str::from_utf8(body)
            .map_err(|e| WireError::invalid(format!("list request body is not UTF-8: {e}")))?
            .trim();
        let q: ListQuery = if text.is_empty() {
            ListQuery::default()
        } else {
            ListQuery::parse(text).map_err(|r| WireError::from(&r))?
        };
        let page = self.store.list(&q).await.map_err(|e| self.store_err(e))?;
        Ok(Bytes::from(serde_json::to_vec(&page).unwrap_or_default()))
    }

    /// `verify`: a run id or `{"run_id"}` → the content checks and the hash chain's.
    pub async fn verify(&self, body: &[u8]) -> Result<Bytes, WireError> {
        let q: VerifyRequest = parse_id_or_json(body, |run_id| VerifyRequest { run_id })
            .map_err(|r| WireError::from(&r))?;
        let report = self
            .store
            .verify(&q.run_id)
            .await
            .map_err(|e| self.store_err(e))?;
        let chain = self
            .store
            .verify_chain(&q.run_id)
            .await
            .map_err(|e| self.store_err(e))?;
        let mut value = serde_json::to_value(&report).unwrap_or_default();
        value["ok"] = serde_json::Value::Bool(report.ok && chain.ok);
        value["chain"] = serde_json::to_value(&chain).unwrap_or_default();
        Ok(Bytes::from(serde_json::to_vec(&value).unwrap_or_default()))
    }

    /// `history`: a run id or `{"run_id", "limit"?, "cursor"?}` → a page of revisions.
    pub async fn history(&self, body: &[u8]) -> Result<Bytes, WireError> {
        let q: HistoryRequest = parse_id_or_json(body, |run_id| HistoryRequest {
            run_id,
            limit: None,
            cursor: None,
        })
        .map_err(|r| WireError::from(&r))?;
        let after = match &q.cursor {
            None => None,
            Some(c) => Some(c.parse::<u64>().map_err(|_| {
                WireError::invalid(format!("cursor {c:?} is not one this service issued"))
            })?),
        };
        let limit = q.limit.unwrap_or(100);
        if limit == 0 || limit > crate::store::history::MAX_HISTORY_PAGE {
            return Err(WireError::invalid(format!(
                "limit must be 1 to {}",
                crate::store::history::MAX_HISTORY_PAGE
            )));
        }
        let page = self
            .store
            .history(&q.run_id, after, limit)
            .await
            .map_err(|e| self.store_err(e))?;
        Ok(Bytes::from(serde_json::to_vec(&page).unwrap_or_default()))
    }

    /// `diff`: `{"run_id", "from"?, "to"?}` or `{"a", "b"}` → the changed paths.
    pub async fn diff(&self, body: &[u8]) -> Result<Bytes, WireError> {
        let q: DiffRequest = parse_id_or_json(body, |run_id| DiffRequest {
            run_id: Some(run_id),
            from: None,
            to: None,
            a: None,
            b: None,
        })
        .map_err(|r| WireError::from(&r))?;
        let latest = |id: RunId| async move {
            let rev = self
                .store
                .load(&id)
                .await
                .map_err(|e| self.store_err(e))?
                .map(|v| v.value.revision())
                .ok_or_else(|| WireError::from(&StoreError::NotFound(id.clone())))?;
            Ok::<_, WireError>((id, rev))
        };
        let (left, right) = match (q.run_id, q.a, q.b) {
            (Some(run), None, None) => {
                let to = match q.to {
                    Some(t) => t,
                    None => latest(run.clone()).await?.1,
                };
                let from = q.from.unwrap_or(to.saturating_sub(1));
                ((run.clone(), from), (run, to))
            }
            (None, Some(a), Some(b)) if q.from.is_none() && q.to.is_none() => {
                (latest(a).await?, latest(b).await?)
            }
            _ => {
                return Err(WireError::invalid(
                    "diff takes {\"run_id\", \"from\"?, \"to\"?} or {\"a\": run_id, \"b\": run_id}",
                ));
            }
        };
        let before = self
            .store
            .get_revision(&left.0, left.1)
            .await
            .map_err(|e| self.store_err(e))?;
        let after = self
            .store
            .get_revision(&right.0, right.1)
            .await
            .map_err(|e| self.store_err(e))?;
        let changes = crate::domain::diff::diff(&before, &after);
        let reply = serde_json::json!({
            "from": {"run_id": left.0, "revision": left.1},
            "to": {"run_id": right.0, "revision": right.1},
            "changes": changes,
        });
        Ok(Bytes::from(serde_json::to_vec(&reply).unwrap_or_default()))
    }
}
