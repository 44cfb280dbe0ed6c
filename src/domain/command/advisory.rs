//! `advisory`: append a reference to an advisory (explanation, note, ...) and store its body as
//! its own object. Idempotent by advisory id.

use serde::Deserialize;
use serde_json::Value;

use super::{Context, Decision, EventKind, NewBlob, live, typed};
use crate::domain::artifact::{
    AdvisoryInputRef, AdvisoryKind, BlobRef, ExplanationStatus, SCHEMA_VERSION, Sha256Hex,
    StoredRecord,
};
use crate::domain::error::Rejection;
use crate::domain::hashing::{canonical_json, sha256_bytes, sha256_json};
use crate::domain::ids::{AdvisoryId, RunId};

use super::create::{JSON_MEDIA_TYPE, StagedBody};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdvisoryPayload {
    run_id: RunId,
    #[serde(default)]
    advisory_id: Option<AdvisoryId>,
    #[serde(default)]
    kind: AdvisoryKind,
    #[serde(default)]
    engine_id: Option<String>,
    #[serde(default)]
    engine_version: Option<String>,
    /// `Some` whenever the field is present, `null` included (a valid body).
    #[serde(default, deserialize_with = "present")]
    body: Option<Value>,
    #[serde(default)]
    body_ref: Option<StagedBody>,
    #[serde(default)]
    explanation_status: Option<ExplanationStatus>,
    #[serde(default)]
    explanation_summary: Option<String>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// An advisory's body: inline (canonicalized by the worker), or staged by claim check.
#[derive(Clone, Debug, PartialEq)]
pub enum AdvisoryBody {
    /// The body's RFC 8785 canonical JSON bytes, stored as a blob.
    Inline(Vec<u8>),
    /// Staged in the staging bucket as its canonical JSON bytes (`body_ref`), checked as the
    /// transport claims it into the store.
    Staged(StagedBody),
}

/// A decoded advisory command.
#[derive(Clone, Debug, PartialEq)]
pub struct AttachAdvisory {
    /// The run.
    pub run_id: RunId,
    /// The advisory id (given, or derived from the message).
    pub advisory_id: AdvisoryId,
    /// What it is.
    pub kind: AdvisoryKind,
    /// Producing engine.
    pub engine_id: Option<String>,
    /// Producing engine version.
    pub engine_version: Option<String>,
    /// The body, stored as a blob.
    pub body: AdvisoryBody,
    /// New explanation status for the run, if any.
    pub explanation_status: Option<ExplanationStatus>,
    /// New explanation summary for the run, if any.
    pub explanation_summary: Option<String>,
}

impl AttachAdvisory {
    /// Builds the command from a JSON object; derives the advisory id from `message_id` or the
    /// content when the publisher gives none.
    pub fn from_value(raw: Value, message_id: Option<&str>) -> Result<Self, Rejection> {
        let source = sha256_json(&raw);
        let p: AdvisoryPayload = typed(raw)?;
        let advisory_id = match p.advisory_id {
            Some(id) => id,
            None => match message_id {
                Some(m) => AdvisoryId::derive(format!("msg:{m}").as_bytes()),
                None => AdvisoryId::derive(format!("sha:{source}").as_bytes()),
            },
        };
        let body = match (p.body, p.body_ref) {
            (Some(b), None) => AdvisoryBody::Inline(canonical_json(&b)),
            (None, Some(r)) => {
                r.check("body_ref")?;
                AdvisoryBody::Staged(r)
            }
            (Some(_), Some(_)) => {
                return Err(Rejection::invalid("send either body or body_ref, not both"));
            }
            (None, None) => {
                return Err(Rejection::invalid(
                    "schema violation: missing field `body` (or `body_ref`, a staged body)",
                ));
            }
        };
        Ok(Self {
            run_id: p.run_id,
            advisory_id,
            kind: p.kind,
            engine_id: p.engine_id,
            engine_version: p.engine_version,
            body,
            explanation_status: p.explanation_status,
            explanation_summary: p.explanation_summary,
        })
    }

    /// Decides the attachment against what is stored.
    pub fn decide(
        &self,
        current: Option<&StoredRecord>,
        ctx: &Context,
    ) -> Result<Decision, Rejection> {
        let artifact = live(current, &self.run_id)?;
        if artifact
            .advisory_inputs
            .iter()
            .any(|a| a.advisory_id == self.advisory_id)
        {
            return Ok(Decision::Unchanged {
                event: EventKind::AdvisoryAttached,
            });
        }
        if artifact.advisory_inputs.len() >= ctx.limits.max_advisories {
            return Err(Rejection::too_large(format!(
                "run {} already has {} advisories, the most a run keeps (max_advisories)",
                self.run_id,
                artifact.advisory_inputs.len()
            )));
        }
        // A staged body is already in the store (the transport claimed it, checked).
        let (sha, size, blobs) = match &self.body {
            AdvisoryBody::Inline(bytes) => {
                let sha = Sha256Hex::from_computed(sha256_bytes(bytes));
                let blob = NewBlob {
                    sha256: sha.clone(),
                    bytes: bytes.clone(),
                };
                (sha, bytes.len() as u64, vec![blob])
            }
            AdvisoryBody::Staged(r) => (r.sha256.clone(), r.size_bytes, Vec::new()),
        };
        let mut next = artifact.clone();
        next.advisory_inputs.push(AdvisoryInputRef {
            advisory_id: self.advisory_id.clone(),
            kind: self.kind,
            created_at_utc: ctx.now,
            request_id: Some(ctx.request_id.to_string()),
            engine_id: self.engine_id.clone(),
            engine_version: self.engine_version.clone(),
            body: Some(BlobRef {
                sha256: sha,
                size_bytes: size,
                media_type: JSON_MEDIA_TYPE.to_owned(),
            }),
            extra: Default::default(),
        });
        if let Some(s) = self.explanation_status {
            next.explanation_status = s;
        }
        if let Some(s) = &self.explanation_summary {
            next.explanation_summary = Some(s.clone());
        }
        next.revision += 1;
        next.updated_at_utc = Some(ctx.now);
        next.schema_version = SCHEMA_VERSION;
        Ok(Decision::Write {
            record: StoredRecord::Live(Box::new(next)),
            blobs,
            event: EventKind::AdvisoryAttached,
            released: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::domain::command::{Command, CommandKind, Context, Decision, Limits};
    use crate::domain::error::RejectCode;

    fn decode(kind: CommandKind, v: serde_json::Value) -> Command {
        Command::decode(kind, v.to_string().as_bytes(), None).unwrap()
    }

    fn a_run() -> crate::domain::artifact::StoredRecord {
        let create = decode(
            CommandKind::Create,
            json!({"mode": "cam", "tool_id": "T1", "status": "OK", "run_id": "run_0000000000a1"}),
        );
        let Ok(Decision::Write { record, .. }) = create.decide(None, &Context::now()) else {
            panic!("create")
        };
        record
    }

    #[test]
    fn a_body_inline_or_staged_never_both_nor_neither() {
        use crate::domain::command::AdvisoryBody;
        let sha = "ab".repeat(32);
        let staged = json!({"bucket": "rmos-runs-staging", "name": format!("in/{sha}"),
                            "sha256": sha, "size_bytes": 5_000_000});
        // `null` is a body like any other (inline, canonical "null").
        let Command::Advisory(a) = decode(
            CommandKind::Advisory,
            json!({"run_id": "run_0000000000a1", "body": null}),
        ) else {
            panic!()
        };
        assert_eq!(a.body, AdvisoryBody::Inline(b"null".to_vec()));
        // Staged: over max_advisory_body_bytes is fine (it never passes through a message).
        let cmd = decode(
            CommandKind::Advisory,
            json!({"run_id": "run_0000000000a1", "advisory_id": "adv_0000000000b1",
                   "body_ref": staged}),
        );
        assert_eq!(cmd.staged_bodies().len(), 1);
        assert_eq!(cmd.staged_bodies()[0].field, "body_ref");
        let Ok(Decision::Write { record, blobs, .. }) = cmd.decide(Some(&a_run()), &Context::now())
        else {
            panic!("attach")
        };
        assert!(
            blobs.is_empty(),
            "a staged body is claimed by the transport"
        );
        let crate::domain::artifact::StoredRecord::Live(art) = record else {
            panic!()
        };
        let body = art.advisory_inputs[0].body.as_ref().unwrap();
        assert_eq!(body.sha256.as_str(), sha);
        assert_eq!(body.size_bytes, 5_000_000);
        assert_eq!(body.media_type, "application/json");

        let both = json!({"run_id": "run_0000000000a1", "body": {}, "body_ref": staged});
        let e =
            Command::decode(CommandKind::Advisory, both.to_string().as_bytes(), None).unwrap_err();
        assert!(e.message.contains("not both"), "{e}");
        let neither = json!({"run_id": "run_0000000000a1"});
        let e = Command::decode(CommandKind::Advisory, neither.to_string().as_bytes(), None)
            .unwrap_err();
        assert!(e.message.contains("body_ref"), "{e}");
        let empty = json!({"run_id": "run_0000000000a1",
                           "body_ref": {"bucket": "", "name": "x", "sha256": sha, "size_bytes": 1}});
        let e =
            Command::decode(CommandKind::Advisory, empty.to_string().as_bytes(), None).unwrap_err();
        assert!(e.message.contains("body_ref: bucket and name"), "{e}");
    }

    #[test]
    fn a_run_keeps_at_most_max_advisories() {
        let ctx = Context {
            limits: Limits {
                max_advisories: 3,
                ..Limits::default()
            },
            ..Context::now()
        };
        let create = decode(
            CommandKind::Create,
            json!({"mode": "cam", "tool_id": "T1", "status": "OK", "run_id": "run_0000000000a1"}),
        );
        let Ok(Decision::Write { mut record, .. }) = create.decide(None, &ctx) else {
            panic!("create")
        };
        for n in 0..4 {
            let adv = decode(
                CommandKind::Advisory,
                json!({"run_id": "run_0000000000a1", "advisory_id": format!("adv_00000000000{n}"),
                       "kind": "note", "body": {"n": n}}),
            );
            match adv.decide(Some(&record), &ctx) {
                Ok(Decision::Write { record: next, .. }) if n < 3 => record = next,
                Err(r) if n == 3 => {
                    assert_eq!(r.code, RejectCode::TooLarge);
                    assert!(r.message.contains("max_advisories"), "{r}");
                }
                other => panic!("advisory {n}: {other:?}"),
            }
        }
    }
}
