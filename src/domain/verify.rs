//! Integrity check of a stored run: every hash recomputed from the content it covers.

use std::collections::HashMap;

use serde::Serialize;
use serde_json::Value;

use super::artifact::{BlobRef, JsonMap, RunArtifact, Sha256Hex};
use super::command::create::{OutputsPayload, StagedBody};
use super::hashing::{sha256_bytes, sha256_json, sha256_text};
use super::ids::RunId;

/// How one check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckStatus {
    /// The recorded hash matches the content.
    Ok,
    /// The content hashes to something else.
    Mismatch,
    /// The hash or the content it covers is missing.
    Missing,
}

/// One recomputed hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HashCheck {
    /// What was checked (`hashes.gcode_sha256`, `blob:<sha>`, `advisory:<id>`...).
    pub name: String,
    /// The outcome.
    pub status: CheckStatus,
    /// The recorded hash.
    pub expected: Option<String>,
    /// The hash of the content as stored now.
    pub actual: Option<String>,
}

/// The integrity report of one run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// The run.
    pub run_id: RunId,
    /// Its revision.
    pub revision: u64,
    /// True when every check is `ok`.
    pub ok: bool,
    /// Each check.
    pub checks: Vec<HashCheck>,
}

/// A blob's content as [`verify`] sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlobContent {
    /// The object is missing.
    Missing,
    /// Its bytes: bodies small enough to hold (one published inline fits one broker message).
    Bytes(Vec<u8>),
    /// Only the SHA-256 of its bytes, computed as they streamed past: large bodies are never
    /// held whole. G-code blobs are the program's bytes and op plan blobs its RFC 8785 bytes,
    /// so their content hashes are this digest; the toolpaths hash of a body this large can
    /// only have been taken over its staged reference (a claim check).
    Digest(String),
}

/// Blob contents by hash.
pub type BlobContents = HashMap<Sha256Hex, BlobContent>;

/// A body as verify has it.
#[derive(Clone)]
enum Body<T> {
    Held(T),
    Digest(String),
    Missing,
}

impl<T> Body<T> {
    fn held(self) -> Option<T> {
        match self {
            Body::Held(t) => Some(t),
            _ => None,
        }
    }
}

fn check(
    name: impl Into<String>,
    expected: Option<&Sha256Hex>,
    actual: Option<String>,
) -> HashCheck {
    let status = match (expected, &actual) {
        (Some(e), Some(a)) if e.as_str() == a => CheckStatus::Ok,
        (Some(_), Some(_)) => CheckStatus::Mismatch,
        _ => CheckStatus::Missing,
    };
    HashCheck {
        name: name.into(),
        status,
        expected: expected.map(|e| e.to_string()),
        actual,
    }
}

fn blob_body<T>(blobs: &BlobContents, r: &BlobRef, decode: impl Fn(&[u8]) -> Option<T>) -> Body<T> {
    match blobs.get(&r.sha256) {
        Some(BlobContent::Bytes(b)) => decode(b).map_or(Body::Missing, Body::Held),
        Some(BlobContent::Digest(d)) => Body::Digest(d.clone()),
        Some(BlobContent::Missing) | None => Body::Missing,
    }
}

/// Recomputes every hash of `artifact`, reading blob bodies from `blobs`.
pub fn verify(artifact: &RunArtifact, blobs: &BlobContents) -> VerifyReport {
    let mut checks = Vec::new();
    let h = &artifact.hashes;

    checks.push(check(
        "hashes.feasibility_sha256",
        h.feasibility_sha256.as_ref(),
        Some(sha256_json(&Value::Object(artifact.feasibility.clone()))),
    ));

    // Every blob the run references must exist and hash to its name.
    for r in artifact.blob_refs() {
        let actual = match blobs.get(&r.sha256) {
            Some(BlobContent::Bytes(b)) => Some(sha256_bytes(b)),
            Some(BlobContent::Digest(d)) => Some(d.clone()),
            Some(BlobContent::Missing) | None => None,
        };
        checks.push(check(format!("blob:{}", r.sha256), Some(&r.sha256), actual));
    }

    let o = &artifact.outputs;
    let gcode: Option<Body<String>> = match (&o.gcode_text, &o.gcode_blob) {
        (Some(t), _) => Some(Body::Held(t.clone())),
        (None, Some(r)) => Some(blob_body(blobs, r, |b| {
            Some(String::from_utf8_lossy(b).into_owned())
        })),
        (None, None) => None,
    };
    let opplan: Option<Body<JsonMap>> = match (&o.opplan_json, &o.opplan_blob) {
        (Some(p), _) => Some(Body::Held(p.clone())),
        (None, Some(r)) => Some(blob_body(blobs, r, |b| {
            serde_json::from_slice::<JsonMap>(b).ok()
        })),
        (None, None) => None,
    };
    if gcode.is_some() || h.gcode_sha256.is_some() {
        let actual = match &gcode {
            Some(Body::Held(t)) => Some(sha256_text(t)),
            Some(Body::Digest(d)) => Some(d.clone()),
            Some(Body::Missing) | None => None,
        };
        checks.push(check(
            "hashes.gcode_sha256",
            h.gcode_sha256.as_ref(),
            actual,
        ));
    }
    if opplan.is_some() || h.opplan_sha256.is_some() {
        let actual = match &opplan {
            Some(Body::Held(p)) => Some(sha256_json(&Value::Object(p.clone()))),
            Some(Body::Digest(d)) => Some(d.clone()),
            Some(Body::Missing) | None => None,
        };
        checks.push(check(
            "hashes.opplan_sha256",
            h.opplan_sha256.as_ref(),
            actual,
        ));
    }
    let body_missing =
        matches!(gcode, Some(Body::Missing)) || matches!(opplan, Some(Body::Missing));
    // A body known by its digest only was necessarily staged: only its reference can count.
    let gcode_staged = matches!(gcode, Some(Body::Digest(_)));
    let opplan_staged = matches!(opplan, Some(Body::Digest(_)));
    let gcode_checked = gcode.is_some();
    let opplan_checked = opplan.is_some();
    let published = OutputsPayload {
        gcode_text: gcode.and_then(Body::held),
        opplan_json: opplan.and_then(Body::held),
        gcode_path: o.gcode_path.clone(),
        opplan_path: o.opplan_path.clone(),
        preview_svg_path: o.preview_svg_path.clone(),
        gcode_ref: None,
        opplan_ref: None,
    };
    if h.toolpaths_sha256.is_some()
        || published != OutputsPayload::default()
        || gcode_staged
        || opplan_staged
    {
        let mut actual = if body_missing || gcode_staged || opplan_staged {
            None
        } else {
            published.toolpaths_sha256().map(|s| s.to_string())
        };
        // A body published as a staged body (a claim check) was hashed as its reference; the
        // reference's hash is checked against the bytes above. The record does not say which
        // bodies came staged, so each combination of the blobs it has is tried.
        let recorded = h.toolpaths_sha256.as_ref().map(|s| s.as_str().to_owned());
        let as_ref = |r: &crate::domain::artifact::BlobRef| StagedBody {
            bucket: String::new(),
            name: String::new(),
            sha256: r.sha256.clone(),
            size_bytes: r.size_bytes,
        };
        let gcode_ref = o.gcode_blob.as_ref().filter(|_| gcode_checked).map(as_ref);
        let opplan_ref = o
            .opplan_blob
            .as_ref()
            .filter(|_| opplan_checked)
            .map(as_ref);
        if actual != recorded && !body_missing {
            for (g, p) in [(true, false), (false, true), (true, true)] {
                if (g && gcode_ref.is_none())
                    || (p && opplan_ref.is_none())
                    || (gcode_staged && !g)
                    || (opplan_staged && !p)
                {
                    continue;
                }
                let mut staged = published.clone();
                if g {
                    staged.gcode_text = None;
                    staged.gcode_ref = gcode_ref.clone();
                }
                if p {
                    staged.opplan_json = None;
                    staged.opplan_ref = opplan_ref.clone();
                }
                let alt = staged.toolpaths_sha256().map(|s| s.to_string());
                if alt == recorded {
                    actual = alt;
                    break;
                }
            }
        }
        checks.push(check(
            "hashes.toolpaths_sha256",
            h.toolpaths_sha256.as_ref(),
            actual,
        ));
    }

    let ok = checks.iter().all(|c| c.status == CheckStatus::Ok);
    VerifyReport {
        run_id: artifact.run_id.clone(),
        revision: artifact.revision,
        ok,
        checks,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::domain::command::{Command, CommandKind, Context, Decision};
    use crate::domain::hashing::sha256_bytes;

    /// A run created with `outputs`, and the blobs the create stored.
    fn created(outputs: Value) -> (RunArtifact, Vec<(Sha256Hex, Vec<u8>)>) {
        let body = json!({"mode": "cam", "tool_id": "T1", "status": "OK",
                          "run_id": "run_0000000000f1", "outputs": outputs});
        let cmd = Command::decode(CommandKind::Create, body.to_string().as_bytes(), None).unwrap();
        let Ok(Decision::Write { record, blobs, .. }) = cmd.decide(None, &Context::now()) else {
            panic!("create")
        };
        let crate::domain::artifact::StoredRecord::Live(a) = record else {
            panic!("live")
        };
        (*a, blobs.into_iter().map(|b| (b.sha256, b.bytes)).collect())
    }

    fn statuses(r: &VerifyReport) -> Vec<(String, CheckStatus)> {
        r.checks
            .iter()
            .map(|c| (c.name.clone(), c.status))
            .collect()
    }

    /// A claim-checked program known by its streamed digest only verifies exactly as its held
    /// bytes do; a digest that differs fails the blob and the G-code hash, and a missing blob
    /// is reported missing.
    #[test]
    fn a_large_blob_is_checked_by_its_streamed_digest() {
        let program = b"G0 X0 Y0\nG1 X10 Y5 F300\n".repeat(10);
        let sha = Sha256Hex::from_computed(sha256_bytes(&program));
        let (a, _) = created(json!({"gcode_ref": {"bucket": "b", "name": "n",
            "sha256": sha.as_str(), "size_bytes": program.len()}}));
        let held = verify(
            &a,
            &BlobContents::from([(sha.clone(), BlobContent::Bytes(program.clone()))]),
        );
        assert!(held.ok, "{held:?}");
        let streamed = verify(
            &a,
            &BlobContents::from([(sha.clone(), BlobContent::Digest(sha.to_string()))]),
        );
        assert!(streamed.ok, "{streamed:?}");
        assert_eq!(statuses(&held), statuses(&streamed));

        let other = sha256_bytes(b"tampered");
        let bad = verify(
            &a,
            &BlobContents::from([(sha.clone(), BlobContent::Digest(other))]),
        );
        assert!(!bad.ok);
        let failed: Vec<String> = bad
            .checks
            .iter()
            .filter(|c| c.status == CheckStatus::Mismatch)
            .map(|c| c.name.clone())
            .collect();
        assert_eq!(
            failed,
            [format!("blob:{sha}"), "hashes.gcode_sha256".to_owned()]
        );
        let gone = verify(&a, &BlobContents::from([(sha, BlobContent::Missing)]));
        assert!(!gone.ok);
        assert!(
            gone.checks
                .iter()
                .any(|c| c.name == "hashes.toolpaths_sha256" && c.status == CheckStatus::Missing),
            "{gone:?}"
        );
    }

    /// A body published inline (its toolpaths hash covers the text) cannot be checked from a
    /// digest: the toolpaths check says so, which is the store's cue to read it whole.
    #[test]
    fn an_inline_body_needs_its_bytes_for_the_toolpaths_hash() {
        let text = "G1 X1\n".repeat(20_000);
        let (a, blobs) = created(json!({"gcode_text": text}));
        let (sha, bytes) = blobs.into_iter().next().expect("stored as a blob");
        let held = verify(
            &a,
            &BlobContents::from([(sha.clone(), BlobContent::Bytes(bytes))]),
        );
        assert!(held.ok, "{held:?}");
        let streamed = verify(
            &a,
            &BlobContents::from([(sha.clone(), BlobContent::Digest(sha.to_string()))]),
        );
        let toolpaths = streamed
            .checks
            .iter()
            .find(|c| c.name == "hashes.toolpaths_sha256")
            .expect("toolpaths checked");
        assert_ne!(toolpaths.status, CheckStatus::Ok);
        assert!(
            streamed
                .checks
                .iter()
                .filter(|c| c.name != "hashes.toolpaths_sha256")
                .all(|c| c.status == CheckStatus::Ok),
            "{streamed:?}"
        );
    }
}
