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

/// Blob contents by hash; `None` when the object is missing.
pub type BlobContents = HashMap<Sha256Hex, Option<Vec<u8>>>;

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

fn blob_bytes<'a>(blobs: &'a BlobContents, r: &BlobRef) -> Option<&'a [u8]> {
    blobs.get(&r.sha256).and_then(|b| b.as_deref())
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
        checks.push(check(
            format!("blob:{}", r.sha256),
            Some(&r.sha256),
            blob_bytes(blobs, r).map(sha256_bytes),
        ));
    }

    let o = &artifact.outputs;
    let gcode: Option<Option<String>> = match (&o.gcode_text, &o.gcode_blob) {
        (Some(t), _) => Some(Some(t.clone())),
        (None, Some(r)) => {
            Some(blob_bytes(blobs, r).map(|b| String::from_utf8_lossy(b).into_owned()))
        }
        (None, None) => None,
    };
    let opplan: Option<Option<JsonMap>> = match (&o.opplan_json, &o.opplan_blob) {
        (Some(p), _) => Some(Some(p.clone())),
        (None, Some(r)) => {
            Some(blob_bytes(blobs, r).and_then(|b| serde_json::from_slice::<JsonMap>(b).ok()))
        }
        (None, None) => None,
    };
    if gcode.is_some() || h.gcode_sha256.is_some() {
        checks.push(check(
            "hashes.gcode_sha256",
            h.gcode_sha256.as_ref(),
            gcode.clone().flatten().map(|t| sha256_text(&t)),
        ));
    }
    if opplan.is_some() || h.opplan_sha256.is_some() {
        checks.push(check(
            "hashes.opplan_sha256",
            h.opplan_sha256.as_ref(),
            opplan
                .clone()
                .flatten()
                .map(|p| sha256_json(&Value::Object(p))),
        ));
    }
    let body_missing = matches!(gcode, Some(None)) || matches!(opplan, Some(None));
    let gcode_checked = gcode.is_some();
    let opplan_checked = opplan.is_some();
    let published = OutputsPayload {
        gcode_text: gcode.flatten(),
        opplan_json: opplan.flatten(),
        gcode_path: o.gcode_path.clone(),
        opplan_path: o.opplan_path.clone(),
        preview_svg_path: o.preview_svg_path.clone(),
        gcode_ref: None,
        opplan_ref: None,
    };
    if h.toolpaths_sha256.is_some() || published != OutputsPayload::default() {
        let mut actual = if body_missing {
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
                if (g && gcode_ref.is_none()) || (p && opplan_ref.is_none()) {
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
