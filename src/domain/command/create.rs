//! `create`: record a new run. Idempotent: the same content again is a no-op, different
//! content for the same run id is a conflict, and a tombstone is never brought back.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Context, Decision, EventKind, NewBlob, hash_of, typed};
use crate::domain::artifact::{
    BlobRef, ExplanationStatus, Hashes, JsonMap, RunArtifact, RunDecision, RunOutputs, RunStatus,
    SCHEMA_VERSION, Sha256Hex, StoredRecord, Timestamp,
};
use crate::domain::error::Rejection;
use crate::domain::hashing::{
    canonical_json, redact_map, sha256_bytes, sha256_json, sha256_text, summarize_request,
};
use crate::domain::ids::{Mode, RunId, ToolId};

/// Media type of G-code blobs.
pub const GCODE_MEDIA_TYPE: &str = "text/plain; charset=utf-8";
/// Media type of JSON blobs (canonical RFC 8785 bytes).
pub const JSON_MEDIA_TYPE: &str = "application/json";

/// The outputs a publisher may send (the original service's fields; blob references are the worker's).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputsPayload {
    /// G-code text.
    #[serde(default)]
    pub gcode_text: Option<String>,
    /// Operation plan.
    #[serde(default)]
    pub opplan_json: Option<JsonMap>,
    /// Path the engine wrote G-code to.
    #[serde(default)]
    pub gcode_path: Option<String>,
    /// Path the engine wrote the op plan to.
    #[serde(default)]
    pub opplan_path: Option<String>,
    /// Path to a preview SVG.
    #[serde(default)]
    pub preview_svg_path: Option<String>,
    /// G-code too large for one broker message, staged in a JetStream Object Store bucket
    /// instead of `gcode_text` (a claim check; README, "Large programs").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gcode_ref: Option<StagedBody>,
    /// The op plan staged instead of `opplan_json`, as its RFC 8785 canonical JSON bytes
    /// (checked as they are claimed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opplan_ref: Option<StagedBody>,
}

/// A body staged in a JetStream Object Store bucket, named in a command in place of the body:
/// the worker streams it into the store, checks its SHA-256 and size, then removes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StagedBody {
    /// The Object Store bucket.
    pub bucket: String,
    /// The object's name in the bucket.
    pub name: String,
    /// SHA-256 of the body's bytes (lower-case hex).
    pub sha256: Sha256Hex,
    /// The body's size in bytes.
    pub size_bytes: u64,
}

impl StagedBody {
    pub(crate) fn check(&self, field: &str) -> Result<(), Rejection> {
        if self.bucket.is_empty() || self.name.is_empty() {
            return Err(Rejection::invalid(format!(
                "{field}: bucket and name must not be empty"
            )));
        }
        Ok(())
    }
}

impl OutputsPayload {
    fn is_empty(&self) -> bool {
        *self == OutputsPayload::default()
    }

    /// The hash `toolpaths_sha256` covers: the outputs object as published, bodies inline; a
    /// staged body counts as `{"sha256", "size_bytes"}` (where it was staged is not content).
    pub fn toolpaths_sha256(&self) -> Option<Sha256Hex> {
        if self.is_empty() {
            return None;
        }
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        for field in ["gcode_ref", "opplan_ref"] {
            if let Some(r) = v.get_mut(field).and_then(Value::as_object_mut) {
                r.remove("bucket");
                r.remove("name");
            }
        }
        Some(hash_of(&v))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreatePayload {
    mode: Mode,
    tool_id: ToolId,
    status: RunStatus,
    #[serde(default)]
    run_id: Option<RunId>,
    #[serde(default)]
    created_at_utc: Option<Timestamp>,
    #[serde(default)]
    request: Option<Value>,
    #[serde(default)]
    request_summary: Option<Value>,
    #[serde(default)]
    feasibility: JsonMap,
    #[serde(default)]
    decision: RunDecision,
    #[serde(default)]
    hashes: Option<Hashes>,
    #[serde(default)]
    outputs: OutputsPayload,
    #[serde(default)]
    explanation_status: ExplanationStatus,
    #[serde(default)]
    explanation_summary: Option<String>,
    #[serde(default)]
    meta: JsonMap,
}

/// A decoded create command: ids resolved, hashes computed, request summarized and redacted.
#[derive(Clone, Debug, PartialEq)]
pub struct CreateRun {
    /// The run id (given, or derived from the message).
    pub run_id: RunId,
    /// Mode.
    pub mode: Mode,
    /// Tool.
    pub tool_id: ToolId,
    /// Status.
    pub status: RunStatus,
    /// The publisher's timestamp, if it sent one.
    pub created_at_utc: Option<Timestamp>,
    /// Summary of the request (redacted).
    pub request_summary: JsonMap,
    /// Feasibility result.
    pub feasibility: JsonMap,
    /// Decision.
    pub decision: RunDecision,
    /// Outputs as published.
    pub outputs: OutputsPayload,
    /// Explanation status.
    pub explanation_status: ExplanationStatus,
    /// Explanation summary.
    pub explanation_summary: Option<String>,
    /// Meta (redacted).
    pub meta: JsonMap,
    /// Hashes computed from the content.
    pub hashes: Hashes,
    /// RFC 8785 SHA-256 of the whole payload: the create's identity.
    pub source_sha256: Sha256Hex,
}

fn check_hash(
    field: &str,
    supplied: &Option<Sha256Hex>,
    computed: &Option<Sha256Hex>,
) -> Result<(), Rejection> {
    match (supplied, computed) {
        (None, _) => Ok(()),
        (Some(s), Some(c)) if s == c => Ok(()),
        (Some(s), Some(c)) => Err(Rejection::invalid(format!(
            "hashes.{field} {s} does not match the content (computed {c})"
        ))),
        (Some(s), None) => Err(Rejection::invalid(format!(
            "hashes.{field} {s} given but there is no content to hash"
        ))),
    }
}

impl CreateRun {
    /// Builds the command from a JSON object. The run id, when absent, is derived from
    /// `message_id` if given, else from the payload's content hash.
    pub fn from_value(raw: Value, message_id: Option<&str>) -> Result<Self, Rejection> {
        let source_sha256 = Sha256Hex::from_computed(sha256_json(&raw));
        let p: CreatePayload = typed(raw)?;
        if p.request.is_some() && p.request_summary.is_some() {
            return Err(Rejection::invalid(
                "send either request (summarized by the worker) or request_summary, not both",
            ));
        }
        if let Some(score) = p.decision.score
            && !score.is_finite()
        {
            return Err(Rejection::invalid("decision.score must be a finite number"));
        }
        let hashes = Hashes {
            feasibility_sha256: Some(Sha256Hex::from_computed(sha256_json(&Value::Object(
                p.feasibility.clone(),
            )))),
            toolpaths_sha256: p.outputs.toolpaths_sha256(),
            gcode_sha256: match (&p.outputs.gcode_text, &p.outputs.gcode_ref) {
                (Some(_), Some(_)) => {
                    return Err(Rejection::invalid(
                        "outputs: send either gcode_text or gcode_ref, not both",
                    ));
                }
                (Some(t), None) => Some(Sha256Hex::from_computed(sha256_text(t))),
                // Checked against the bytes when the worker claims the staged body.
                (None, Some(r)) => {
                    r.check("outputs.gcode_ref")?;
                    Some(r.sha256.clone())
                }
                (None, None) => None,
            },
            opplan_sha256: match (&p.outputs.opplan_json, &p.outputs.opplan_ref) {
                (Some(_), Some(_)) => {
                    return Err(Rejection::invalid(
                        "outputs: send either opplan_json or opplan_ref, not both",
                    ));
                }
                (Some(o), None) => Some(Sha256Hex::from_computed(sha256_json(&Value::Object(
                    o.clone(),
                )))),
                // Staged as its canonical bytes: their SHA-256 is the op plan's hash (checked
                // when the worker claims them).
                (None, Some(r)) => {
                    r.check("outputs.opplan_ref")?;
                    Some(r.sha256.clone())
                }
                (None, None) => None,
            },
        };
        if let Some(given) = &p.hashes {
            check_hash(
                "feasibility_sha256",
                &given.feasibility_sha256,
                &hashes.feasibility_sha256,
            )?;
            check_hash(
                "toolpaths_sha256",
                &given.toolpaths_sha256,
                &hashes.toolpaths_sha256,
            )?;
            check_hash("gcode_sha256", &given.gcode_sha256, &hashes.gcode_sha256)?;
            check_hash("opplan_sha256", &given.opplan_sha256, &hashes.opplan_sha256)?;
        }
        let run_id = match p.run_id {
            Some(id) => id,
            None => match message_id {
                Some(m) => RunId::derive(format!("msg:{m}").as_bytes()),
                None => RunId::derive(format!("sha:{source_sha256}").as_bytes()),
            },
        };
        let request_summary = match (&p.request, p.request_summary) {
            (Some(req), _) => summarize_request(req),
            (None, Some(summary)) => summarize_request(&summary),
            (None, None) => JsonMap::new(),
        };
        let mut meta = p.meta;
        redact_map(&mut meta);
        Ok(CreateRun {
            run_id,
            mode: p.mode,
            tool_id: p.tool_id,
            status: p.status,
            created_at_utc: p.created_at_utc,
            request_summary,
            feasibility: p.feasibility,
            decision: p.decision,
            outputs: p.outputs,
            explanation_status: p.explanation_status,
            explanation_summary: p.explanation_summary,
            meta,
            hashes,
            source_sha256,
        })
    }

    /// Decides the create against what is stored.
    pub fn decide(
        &self,
        current: Option<&StoredRecord>,
        ctx: &Context,
    ) -> Result<Decision, Rejection> {
        match current {
            None => {}
            Some(StoredRecord::Live(a)) => {
                return if a.source_sha256.as_ref() == Some(&self.source_sha256) {
                    Ok(Decision::Unchanged {
                        event: EventKind::Created,
                    })
                } else {
                    Err(Rejection::conflict(format!(
                        "run {} already exists with different content",
                        self.run_id
                    )))
                };
            }
            Some(StoredRecord::Deleted(t)) => {
                return if t.source_sha256.as_ref() == Some(&self.source_sha256) {
                    Ok(Decision::Unchanged {
                        event: EventKind::Created,
                    })
                } else {
                    Err(Rejection::conflict(format!(
                        "run {} was deleted at {} and cannot be created again",
                        self.run_id, t.deleted_at_utc
                    )))
                };
            }
        }

        let threshold = ctx.limits.blob_threshold;
        let mut blobs = Vec::new();
        let mut outputs = RunOutputs {
            gcode_text: self.outputs.gcode_text.clone(),
            opplan_json: self.outputs.opplan_json.clone(),
            gcode_path: self.outputs.gcode_path.clone(),
            opplan_path: self.outputs.opplan_path.clone(),
            preview_svg_path: self.outputs.preview_svg_path.clone(),
            gcode_blob: None,
            opplan_blob: None,
            extra: Default::default(),
        };
        // A staged body is already in the store (the transport claimed it, checked): the
        // record references it like any other blob, whatever its size.
        if let Some(r) = &self.outputs.gcode_ref {
            outputs.gcode_blob = Some(BlobRef {
                sha256: r.sha256.clone(),
                size_bytes: r.size_bytes,
                media_type: GCODE_MEDIA_TYPE.to_owned(),
            });
        }
        if let Some(r) = &self.outputs.opplan_ref {
            outputs.opplan_blob = Some(BlobRef {
                sha256: r.sha256.clone(),
                size_bytes: r.size_bytes,
                media_type: JSON_MEDIA_TYPE.to_owned(),
            });
        }
        if let Some(text) = &self.outputs.gcode_text
            && text.len() > threshold
        {
            let bytes = text.as_bytes().to_vec();
            let sha = Sha256Hex::from_computed(sha256_bytes(&bytes));
            outputs.gcode_blob = Some(BlobRef {
                sha256: sha.clone(),
                size_bytes: bytes.len() as u64,
                media_type: GCODE_MEDIA_TYPE.to_owned(),
            });
            outputs.gcode_text = None;
            blobs.push(NewBlob { sha256: sha, bytes });
        }
        if let Some(plan) = &self.outputs.opplan_json {
            let bytes = canonical_json(&Value::Object(plan.clone()));
            if bytes.len() > threshold {
                let sha = Sha256Hex::from_computed(sha256_bytes(&bytes));
                outputs.opplan_blob = Some(BlobRef {
                    sha256: sha.clone(),
                    size_bytes: bytes.len() as u64,
                    media_type: JSON_MEDIA_TYPE.to_owned(),
                });
                outputs.opplan_json = None;
                blobs.push(NewBlob { sha256: sha, bytes });
            }
        }

        ctx.limits.check_meta(&self.meta)?;
        let mut meta = self.meta.clone();
        meta.insert(
            "request_id".to_owned(),
            Value::String(ctx.request_id.to_string()),
        );
        let artifact = RunArtifact {
            schema_version: SCHEMA_VERSION,
            run_id: self.run_id.clone(),
            created_at_utc: self.created_at_utc.unwrap_or(ctx.now),
            updated_at_utc: Some(ctx.now),
            revision: 1,
            mode: self.mode.clone(),
            tool_id: self.tool_id.clone(),
            status: self.status,
            request_summary: self.request_summary.clone(),
            feasibility: self.feasibility.clone(),
            decision: self.decision.clone(),
            hashes: self.hashes.clone(),
            outputs,
            advisory_inputs: Vec::new(),
            explanation_status: self.explanation_status,
            explanation_summary: self.explanation_summary.clone(),
            meta,
            source_sha256: Some(self.source_sha256.clone()),
            applied_commands: Vec::new(),
            prev_sha256: None,
            extra: JsonMap::new(),
        };
        Ok(Decision::Write {
            record: StoredRecord::Live(Box::new(artifact)),
            blobs,
            event: EventKind::Created,
            released: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::command::{Command, CommandKind, Limits};
    use serde_json::json;

    fn ctx() -> Context {
        Context::now()
    }

    fn create(body: Value) -> Result<Command, Rejection> {
        Command::decode(CommandKind::Create, body.to_string().as_bytes(), None)
    }

    #[test]
    fn create_computes_hashes_and_redacts() {
        let Command::Create(c) = create(json!({
            "mode": "cam", "tool_id": "T102", "status": "OK",
            "request": {"geometry": {"w": 1}, "api_key": "sk-123"},
            "feasibility": {"ok": true},
            "outputs": {"gcode_text": "G21\n", "opplan_json": {"ops": []}},
            "meta": {"operator": "ann", "auth": {"Authorization": "Bearer x"}}
        }))
        .unwrap() else {
            panic!()
        };
        assert_eq!(
            c.hashes.gcode_sha256.as_ref().unwrap().as_str(),
            sha256_text("G21\n")
        );
        assert!(c.hashes.toolpaths_sha256.is_some());
        assert_eq!(c.request_summary["api_key"], json!("[REDACTED]"));
        assert_eq!(c.meta["auth"]["Authorization"], json!("[REDACTED]"));
    }

    #[test]
    fn wrong_supplied_hash_is_rejected_with_field_name() {
        let err = create(json!({"mode": "cam", "tool_id": "T1", "status": "OK",
            "outputs": {"gcode_text": "G0"},
            "hashes": {"gcode_sha256": "0".repeat(64)}}))
        .unwrap_err();
        assert!(err.message.contains("hashes.gcode_sha256"), "{err}");
    }

    #[test]
    fn unknown_fields_and_bad_values_name_their_reason() {
        let e =
            create(json!({"mode": "cam", "tool_id": "T1", "status": "OK", "tool": 1})).unwrap_err();
        assert!(e.message.contains("unknown field `tool`"), "{e}");
        let e = create(json!({"mode": "cam", "tool_id": "T1", "status": "FINE"})).unwrap_err();
        assert!(e.message.contains("FINE"), "{e}");
        let e =
            create(json!({"mode": "cam", "tool_id": "T1", "status": "OK", "run_id": "run_../x"}))
                .unwrap_err();
        assert!(e.message.contains("run_id"), "{e}");
        let e = Command::decode(CommandKind::Create, b"[1]", None).unwrap_err();
        assert!(e.message.contains("JSON object"));
        let e = Command::decode(CommandKind::Create, b"{not json", None).unwrap_err();
        assert!(e.message.contains("not valid JSON"));
    }

    #[test]
    fn same_message_same_run_and_idempotent() {
        let body = json!({"mode": "cam", "tool_id": "T1", "status": "OK"});
        let a = create(body.clone()).unwrap();
        let b = create(body).unwrap();
        assert_eq!(a.run_id(), b.run_id());
        let Decision::Write { record, .. } = a.decide(None, &ctx()).unwrap() else {
            panic!()
        };
        assert_eq!(record.revision(), 1);
        assert!(matches!(
            b.decide(Some(&record), &ctx()).unwrap(),
            Decision::Unchanged { .. }
        ));
        let other = create(json!({"mode": "cam", "tool_id": "T2", "status": "OK",
            "run_id": record.run_id().as_str()}))
        .unwrap();
        assert_eq!(
            other.decide(Some(&record), &ctx()).unwrap_err().code,
            crate::domain::error::RejectCode::Conflict
        );
    }

    #[test]
    fn message_id_seeds_the_run_id() {
        let body = json!({"mode": "cam", "tool_id": "T1", "status": "OK"}).to_string();
        let a = Command::decode(CommandKind::Create, body.as_bytes(), Some("m1")).unwrap();
        let b = Command::decode(CommandKind::Create, body.as_bytes(), Some("m2")).unwrap();
        assert_ne!(a.run_id(), b.run_id());
    }

    #[test]
    fn a_staged_op_plan_is_referenced_with_its_claimed_hash() {
        let sha = "cd".repeat(32);
        let r = json!({"bucket": "b", "name": "in/x", "sha256": sha, "size_bytes": 42});
        let Command::Create(c) = create(json!({"mode": "cam", "tool_id": "T1", "status": "OK",
            "outputs": {"opplan_ref": r}}))
        .unwrap() else {
            panic!()
        };
        assert_eq!(c.hashes.opplan_sha256.as_ref().unwrap().as_str(), sha);
        // Where it was staged is not content: another bucket, the same toolpaths hash.
        let Command::Create(other) = create(json!({"mode": "cam", "tool_id": "T1", "status": "OK",
            "outputs": {"opplan_ref": {"bucket": "c", "name": "in/y", "sha256": sha,
                                       "size_bytes": 42}}}))
        .unwrap() else {
            panic!()
        };
        assert_eq!(c.hashes.toolpaths_sha256, other.hashes.toolpaths_sha256);
        let Decision::Write {
            record: StoredRecord::Live(a),
            blobs,
            ..
        } = c.decide(None, &ctx()).unwrap()
        else {
            panic!()
        };
        assert!(blobs.is_empty());
        let blob = a.outputs.opplan_blob.as_ref().unwrap();
        assert_eq!((blob.sha256.as_str(), blob.size_bytes), (sha.as_str(), 42));
        assert_eq!(blob.media_type, JSON_MEDIA_TYPE);
        let e = create(json!({"mode": "cam", "tool_id": "T1", "status": "OK",
            "outputs": {"opplan_ref": r, "opplan_json": {}}}))
        .unwrap_err();
        assert!(e.message.contains("not both"), "{e}");
    }

    #[test]
    fn large_bodies_become_blobs() {
        let big = "G1 X1 Y1\n".repeat(10_000);
        let cmd = create(json!({"mode": "cam", "tool_id": "T1", "status": "OK",
            "outputs": {"gcode_text": big}}))
        .unwrap();
        let mut c = ctx();
        c.limits = Limits {
            blob_threshold: 1024,
            ..Limits::default()
        };
        let Decision::Write {
            record: StoredRecord::Live(a),
            blobs,
            ..
        } = cmd.decide(None, &c).unwrap()
        else {
            panic!()
        };
        assert!(a.outputs.gcode_text.is_none());
        let blob = a.outputs.gcode_blob.as_ref().unwrap();
        assert_eq!(&blob.sha256, a.hashes.gcode_sha256.as_ref().unwrap());
        assert_eq!(blobs.len(), 1);
        assert_eq!(blobs[0].bytes.len() as u64, blob.size_bytes);
    }
}
