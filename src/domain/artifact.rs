//! The stored run artifact and its parts, compatible with files written by the original service's Python
//! store (the same fields without `schema_version`, `revision` and `updated_at_utc`).

use std::fmt;

use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use super::error::Rejection;
use super::ids::{AdvisoryId, CommandId, Mode, RunId, ToolId};

/// The schema version this build writes. The original service's files have none and load as version 0.
pub const SCHEMA_VERSION: u32 = 1;

/// A JSON object (`{...}`), as used for free-form parts of the artifact.
pub type JsonMap = Map<String, Value>;

/// A UTC instant, written as RFC 3339 with a `Z` (`2026-11-25T02:04:55.123Z`). Reading also
/// accepts offsets (`+00:00`) and the offset-less form Python's `isoformat()` can produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub DateTime<Utc>);

impl Timestamp {
    /// Parses RFC 3339, or a naive ISO 8601 date-time taken as UTC. The instant must fall in
    /// the years 0000-9999 (in UTC), the range RFC 3339 can write back.
    pub fn parse(s: &str) -> Result<Self, Rejection> {
        let shown = super::ids::truncate_for_message(s);
        let bad = || Rejection::invalid(format!("invalid timestamp {shown:?}: expected RFC 3339"));
        let t = if let Ok(t) = DateTime::parse_from_rfc3339(s) {
            t.with_timezone(&Utc)
        } else {
            NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
                .map_err(|_| bad())?
                .and_utc()
        };
        if !(0..=9999).contains(&chrono::Datelike::year(&t)) {
            return Err(Rejection::invalid(format!(
                "invalid timestamp {shown:?}: outside the years 0000-9999"
            )));
        }
        Ok(Self(t))
    }
    /// The current time, truncated to milliseconds so that it prints as the protocol shows.
    pub fn now() -> Self {
        let now = Utc::now();
        let ms = now.timestamp_millis();
        Self(DateTime::from_timestamp_millis(ms).unwrap_or(now))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.to_rfc3339_opts(SecondsFormat::AutoSi, true))
    }
}

impl std::str::FromStr for Timestamp {
    type Err = Rejection;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Timestamp::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A lower-case hex SHA-256 digest.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Sha256Hex(String);

impl Sha256Hex {
    /// Parses exactly 64 lower-case hex digits.
    pub fn parse(s: &str) -> Result<Self, Rejection> {
        if s.len() == 64
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            Ok(Self(s.to_owned()))
        } else {
            Err(Rejection::invalid(format!(
                "invalid sha256 {:?}: expected 64 lower-case hex digits",
                super::ids::truncate_for_message(s)
            )))
        }
    }
    /// Wraps a digest this crate computed itself (always well-formed).
    pub(crate) fn from_computed(hex: String) -> Self {
        debug_assert_eq!(hex.len(), 64);
        Self(hex)
    }
    /// The digest as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Sha256Hex {
    type Error = Rejection;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}
impl From<Sha256Hex> for String {
    fn from(h: Sha256Hex) -> String {
        h.0
    }
}
impl fmt::Display for Sha256Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! wire_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
        pub enum $name {
            $($(#[$vdoc])* #[serde(rename = $text)] $variant,)+
        }
        impl $name {
            /// Every value, in protocol order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            /// The protocol's spelling.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text,)+ }
            }
            /// Parses the protocol's spelling (exact, case-sensitive).
            pub fn parse(s: &str) -> Result<Self, Rejection> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(Rejection::invalid(format!(
                        concat!("invalid ", stringify!($name), " {:?}: expected one of {}"),
                        super::ids::truncate_for_message(s),
                        [$($text),+].join(", ")
                    ))),
                }
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }
        impl std::str::FromStr for $name {
            type Err = Rejection;
            fn from_str(s: &str) -> Result<Self, Self::Err> { Self::parse(s) }
        }
    };
}

wire_enum!(
    /// The run's outcome as the feasibility engine reported it.
    RunStatus { #[default] Ok = "OK", Blocked = "BLOCKED", Error = "ERROR" }
);
wire_enum!(
    /// What an attached advisory is.
    AdvisoryKind { Explanation = "explanation", Advisory = "advisory", Note = "note", #[default] Unknown = "unknown" }
);
wire_enum!(
    /// Where the run's explanation stands.
    ExplanationStatus { #[default] None = "NONE", Pending = "PENDING", Ready = "READY", Error = "ERROR" }
);
wire_enum!(
    /// The decision's risk level.
    RiskLevel { Green = "GREEN", Yellow = "YELLOW", Red = "RED", #[default] Unknown = "UNKNOWN", Error = "ERROR" }
);

/// Content hashes the worker computes (never trusted from a publisher).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hashes {
    /// RFC 8785 SHA-256 of `feasibility`.
    #[serde(default)]
    pub feasibility_sha256: Option<Sha256Hex>,
    /// RFC 8785 SHA-256 of the run's outputs object (bodies inline, blob references resolved).
    #[serde(default)]
    pub toolpaths_sha256: Option<Sha256Hex>,
    /// SHA-256 of the G-code text's UTF-8 bytes.
    #[serde(default)]
    pub gcode_sha256: Option<Sha256Hex>,
    /// RFC 8785 SHA-256 of the operation plan.
    #[serde(default)]
    pub opplan_sha256: Option<Sha256Hex>,
}

/// The feasibility decision summary.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunDecision {
    /// GREEN / YELLOW / RED / UNKNOWN / ERROR.
    #[serde(default)]
    pub risk_level: Option<RiskLevel>,
    /// The engine's score.
    #[serde(default)]
    pub score: Option<f64>,
    /// Why the run was blocked, when it was.
    #[serde(default)]
    pub block_reason: Option<String>,
    /// Warnings raised by the engine.
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Engine-specific details.
    #[serde(default)]
    pub details: JsonMap,
}

/// A body stored as its own content-addressed object (`blobs/<sha256>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobRef {
    /// SHA-256 of the stored bytes; also the object's name.
    pub sha256: Sha256Hex,
    /// Size of the stored bytes.
    pub size_bytes: u64,
    /// `text/plain; charset=utf-8` or `application/json`.
    pub media_type: String,
}

/// Generated outputs. Bodies over the blob threshold are moved to blobs: the inline field is
/// then `null` and the matching `*_blob` reference names the object.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunOutputs {
    /// G-code, inline when small.
    #[serde(default)]
    pub gcode_text: Option<String>,
    /// Operation plan, inline when small.
    #[serde(default)]
    pub opplan_json: Option<JsonMap>,
    /// Field of the original service: a path the engine wrote G-code to.
    #[serde(default)]
    pub gcode_path: Option<String>,
    /// Field of the original service: a path the engine wrote the op plan to.
    #[serde(default)]
    pub opplan_path: Option<String>,
    /// Field of the original service: a path to a preview SVG.
    #[serde(default)]
    pub preview_svg_path: Option<String>,
    /// The G-code's blob, when it was too large to keep inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gcode_blob: Option<BlobRef>,
    /// The op plan's blob, when it was too large to keep inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opplan_blob: Option<BlobRef>,
    /// Fields written by other producers; kept as they are.
    #[serde(flatten)]
    pub extra: JsonMap,
}

/// An attached advisory (append-only).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdvisoryInputRef {
    /// The advisory's id; attachment is idempotent by it.
    pub advisory_id: AdvisoryId,
    /// What the advisory is.
    #[serde(default)]
    pub kind: AdvisoryKind,
    /// When it was attached.
    pub created_at_utc: Timestamp,
    /// The request id of the command that attached it.
    #[serde(default)]
    pub request_id: Option<String>,
    /// The producing engine.
    #[serde(default)]
    pub engine_id: Option<String>,
    /// The producing engine's version.
    #[serde(default)]
    pub engine_version: Option<String>,
    /// The body's object (`blobs/<sha256>`, canonical JSON); absent in the original service's files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<BlobRef>,
    /// Fields written by other producers; kept as they are.
    #[serde(flatten)]
    pub extra: JsonMap,
}

/// The persistent record of one run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunArtifact {
    /// Schema version; 0 for files written by the original FastAPI service.
    #[serde(default)]
    pub schema_version: u32,
    /// The run id.
    pub run_id: RunId,
    /// When the run was recorded.
    pub created_at_utc: Timestamp,
    /// When the last change was applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at_utc: Option<Timestamp>,
    /// 1 on create, +1 per applied change. The original service's files load as 1.
    #[serde(default = "one")]
    pub revision: u64,
    /// The run's mode.
    pub mode: Mode,
    /// The tool used.
    pub tool_id: ToolId,
    /// OK / BLOCKED / ERROR.
    pub status: RunStatus,
    /// The design request, summarized and redacted.
    #[serde(default)]
    pub request_summary: JsonMap,
    /// The feasibility result.
    #[serde(default)]
    pub feasibility: JsonMap,
    /// The decision.
    #[serde(default)]
    pub decision: RunDecision,
    /// Content hashes, computed by the worker.
    #[serde(default)]
    pub hashes: Hashes,
    /// Generated outputs.
    #[serde(default)]
    pub outputs: RunOutputs,
    /// Attached advisories, in attachment order.
    #[serde(default)]
    pub advisory_inputs: Vec<AdvisoryInputRef>,
    /// Where the explanation stands.
    #[serde(default)]
    pub explanation_status: ExplanationStatus,
    /// A short explanation.
    #[serde(default)]
    pub explanation_summary: Option<String>,
    /// Free-form metadata (`meta.request_id` holds the creating request's id).
    #[serde(default)]
    pub meta: JsonMap,
    /// RFC 8785 SHA-256 of the create payload that made this run: a redelivered create with
    /// the same content is a no-op, a different one a conflict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_sha256: Option<Sha256Hex>,
    /// Commands applied recently enough that their message could still be delivered again,
    /// so a redelivery changes nothing twice (see `command::remember`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub applied_commands: Vec<AppliedCommand>,
    /// `artifact_sha256` of the previous revision (none for revision 1): each record is the
    /// head of its run's hash chain (see `store::history`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_sha256: Option<Sha256Hex>,
    /// Fields written by other producers that this version does not know; kept as they are.
    #[serde(flatten)]
    pub extra: JsonMap,
}

fn one() -> u64 {
    1
}

/// A command applied to a run, remembered so that a redelivery of it changes nothing.
///
/// Stored as the bare id, or as `{"id": ..., "seq": ...}` when it came from the stream: the
/// sequence lets the run forget it once the consumer has acknowledged every message up to
/// it, since an acknowledged message is never delivered again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedCommand {
    /// The command's identity (`Nats-Msg-Id`, or `js:<stream>:<sequence>`).
    pub id: CommandId,
    /// The stream sequence of the message that carried it (none in core mode).
    pub seq: Option<u64>,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum AppliedRepr<Id> {
    Bare(Id),
    Stream { id: Id, seq: u64 },
}

impl Serialize for AppliedCommand {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.seq {
            None => AppliedRepr::Bare(&self.id),
            Some(seq) => AppliedRepr::Stream { id: &self.id, seq },
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for AppliedCommand {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(match AppliedRepr::<CommandId>::deserialize(deserializer)? {
            AppliedRepr::Bare(id) => Self { id, seq: None },
            AppliedRepr::Stream { id, seq } => Self { id, seq: Some(seq) },
        })
    }
}

/// What remains of a deleted run, so that a late redelivery of its create cannot bring it back.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tombstone {
    /// Always `true`; marks the object as a tombstone.
    pub tombstone: bool,
    /// Schema version.
    pub schema_version: u32,
    /// The deleted run.
    pub run_id: RunId,
    /// The revision the deletion produced.
    pub revision: u64,
    /// When the run was created.
    pub created_at_utc: Timestamp,
    /// When it was deleted.
    pub deleted_at_utc: Timestamp,
    /// Why (`retention`, an operator's note, ...).
    pub reason: String,
    /// The request id of the delete command.
    #[serde(default)]
    pub request_id: Option<String>,
    /// The create payload's hash, so a redelivered create is recognised as already handled.
    #[serde(default)]
    pub source_sha256: Option<Sha256Hex>,
    /// Blobs the run referenced (for cleanup).
    #[serde(default)]
    pub blobs: Vec<Sha256Hex>,
    /// `artifact_sha256` of the last live revision: the deletion keeps the chain's head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_sha256: Option<Sha256Hex>,
}

/// What is stored under a run's key: a live artifact or a tombstone.
#[derive(Clone, Debug, PartialEq)]
pub enum StoredRecord {
    /// A live run.
    Live(Box<RunArtifact>),
    /// A deleted run.
    Deleted(Tombstone),
}

impl StoredRecord {
    /// Decodes a stored object. Errors carry the reason the object is corrupt.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        // One parse for the common case: a live artifact. A tombstone lacks the artifact's
        // required fields and fails that parse; one that did not would still show its
        // `tombstone` key among the unknown fields, so it can never pass for a live run.
        match serde_json::from_slice::<RunArtifact>(bytes) {
            Ok(a) if !a.extra.contains_key("tombstone") => Ok(StoredRecord::Live(Box::new(a))),
            Ok(_) => serde_json::from_slice::<Tombstone>(bytes)
                .map(StoredRecord::Deleted)
                .map_err(|e| format!("bad tombstone: {e}")),
            Err(e) => {
                // Say precisely why: not JSON at all, a bad tombstone, or a bad artifact.
                let value: Value =
                    serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
                if value.get("tombstone").and_then(Value::as_bool) == Some(true) {
                    serde_json::from_value::<Tombstone>(value)
                        .map(StoredRecord::Deleted)
                        .map_err(|e| format!("bad tombstone: {e}"))
                } else {
                    Err(format!("bad artifact: {e}"))
                }
            }
        }
    }

    /// Encodes for storage (pretty JSON, like the original service's files, ending in a newline).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = match self {
            StoredRecord::Live(a) => serde_json::to_vec_pretty(a),
            StoredRecord::Deleted(t) => serde_json::to_vec_pretty(t),
        }
        .unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// The record's revision.
    pub fn revision(&self) -> u64 {
        match self {
            StoredRecord::Live(a) => a.revision,
            StoredRecord::Deleted(t) => t.revision,
        }
    }

    /// The run id.
    pub fn run_id(&self) -> &RunId {
        match self {
            StoredRecord::Live(a) => &a.run_id,
            StoredRecord::Deleted(t) => &t.run_id,
        }
    }

    /// The previous revision's `artifact_sha256`, as the record carries it.
    pub fn prev_sha256(&self) -> Option<&Sha256Hex> {
        match self {
            StoredRecord::Live(a) => a.prev_sha256.as_ref(),
            StoredRecord::Deleted(t) => t.prev_sha256.as_ref(),
        }
    }

    /// Links the record to the revision before it.
    pub fn set_prev_sha256(&mut self, prev: Option<Sha256Hex>) {
        match self {
            StoredRecord::Live(a) => a.prev_sha256 = prev,
            StoredRecord::Deleted(t) => t.prev_sha256 = prev,
        }
    }
}

/// The few fields of a stored object that say what it is, read without decoding the rest (a
/// scan of the bytes with no allocation beyond the id): enough to serve a stored artifact
/// as it is.
#[derive(Debug, Deserialize)]
pub struct RecordHead {
    /// The run the object belongs to.
    pub run_id: RunId,
    /// `true` for a tombstone.
    #[serde(default)]
    pub tombstone: bool,
    /// The schema version it was written at (0 for the original service's files).
    #[serde(default)]
    pub schema_version: u32,
}

impl RecordHead {
    /// Reads the head of a stored object; the error says why it is not one.
    pub fn peek(bytes: &[u8]) -> Result<Self, String> {
        if let Some(head) = Self::as_written(bytes) {
            return Ok(head);
        }
        serde_json::from_slice(bytes).map_err(|e| format!("not a stored run: {e}"))
    }

    /// The head of an artifact as this crate writes it, read from its first bytes:
    /// `schema_version` and `run_id` are its first two keys (a tombstone starts with
    /// `tombstone`). `None` when the object starts any other way; it is then scanned whole.
    /// (A file made by hand to start this way and carry a `tombstone` key further on is read
    /// as live here; every other path decodes it whole and reports it corrupt.)
    fn as_written(bytes: &[u8]) -> Option<Self> {
        fn token<'a>(bytes: &'a [u8], token: &[u8]) -> Option<&'a [u8]> {
            bytes.trim_ascii_start().strip_prefix(token)
        }
        let rest = token(bytes, b"{")?;
        let rest = token(rest, b"\"schema_version\"")?;
        let rest = token(rest, b":")?.trim_ascii_start();
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        let schema_version = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
        let rest = token(&rest[digits..], b",")?;
        let rest = token(rest, b"\"run_id\"")?;
        let rest = token(token(rest, b":")?, b"\"")?;
        let end = rest.iter().position(|&b| b == b'"')?;
        // A run id has no escapes; anything else fails to parse and takes the long way.
        let run_id = RunId::parse(std::str::from_utf8(&rest[..end]).ok()?).ok()?;
        Some(Self {
            run_id,
            tombstone: false,
            schema_version,
        })
    }
}

impl RunArtifact {
    /// Every blob this artifact references.
    pub fn blob_refs(&self) -> Vec<&BlobRef> {
        let mut refs: Vec<&BlobRef> = Vec::new();
        refs.extend(self.outputs.gcode_blob.iter());
        refs.extend(self.outputs.opplan_blob.iter());
        refs.extend(self.advisory_inputs.iter().filter_map(|a| a.body.as_ref()));
        refs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = r#"{
      "run_id": "run_0123456789ab",
      "created_at_utc": "2025-01-02T03:04:05.678901Z",
      "mode": "cam", "tool_id": "T102", "status": "OK",
      "request_summary": {"a": 1}, "feasibility": {"x": 1.5},
      "decision": {"risk_level": "GREEN", "score": 87.5, "block_reason": null, "warnings": [], "details": {}},
      "hashes": {"feasibility_sha256": "0000000000000000000000000000000000000000000000000000000000000000",
                 "toolpaths_sha256": null, "gcode_sha256": null, "opplan_sha256": null},
      "outputs": {"gcode_text": "G21", "opplan_json": null, "gcode_path": null, "opplan_path": null, "preview_svg_path": null},
      "advisory_inputs": [{"advisory_id": "adv_0123456789ab", "kind": "explanation",
        "created_at_utc": "2025-01-02T03:04:06+00:00", "request_id": null, "engine_id": "x", "engine_version": "1"}],
      "explanation_status": "READY", "explanation_summary": "ok", "meta": {"k": "v"}
    }"#;

    #[test]
    fn a_tombstone_never_decodes_as_a_live_run() {
        // Even one carrying every field an artifact requires.
        let t = r#"{"tombstone": true, "schema_version": 1, "run_id": "run_0123456789ab",
            "revision": 3, "created_at_utc": "2025-01-02T03:04:05Z",
            "deleted_at_utc": "2025-01-03T03:04:05Z", "reason": "retention"}"#;
        assert!(matches!(
            StoredRecord::decode(t.as_bytes()),
            Ok(StoredRecord::Deleted(_))
        ));
        let with_artifact_fields = t.replacen(
            "\"revision\": 3,",
            "\"revision\": 3, \"mode\": \"cam\", \"tool_id\": \"T1\", \"status\": \"OK\",",
            1,
        );
        let err = StoredRecord::decode(with_artifact_fields.as_bytes()).unwrap_err();
        assert!(err.starts_with("bad tombstone"), "{err}");
        let head = RecordHead::peek(t.as_bytes()).unwrap();
        assert!(head.tombstone);
        assert_eq!(head.run_id.as_str(), "run_0123456789ab");
        let seed = RecordHead::peek(SEED.as_bytes()).unwrap();
        assert!(!seed.tombstone);
        assert_eq!(seed.schema_version, 0);
        assert!(RecordHead::peek(b"[1, 2]").is_err());
    }

    #[test]
    fn the_head_of_a_written_artifact_is_read_from_its_start() {
        let StoredRecord::Live(mut a) = StoredRecord::decode(SEED.as_bytes()).unwrap() else {
            panic!("expected a live record")
        };
        a.schema_version = SCHEMA_VERSION;
        let written = StoredRecord::Live(a.clone()).encode();
        let head = RecordHead::as_written(&written).expect("read from the start");
        assert_eq!(head.run_id, a.run_id);
        assert_eq!(head.schema_version, SCHEMA_VERSION);
        assert!(!head.tombstone);
        let compact = serde_json::to_vec(&a).unwrap();
        assert!(RecordHead::as_written(&compact).is_some());
        // Anything else takes the long way, with the same answer.
        for other in [
            SEED.as_bytes(),
            br#"{"run_id": "run_0123456789ab", "schema_version": 1}"#,
            br#"{"schema_version": 1.5, "run_id": "run_0123456789ab"}"#,
            br#"{"schema_version": 1, "run_id": "run_0123456789a\u0062"}"#,
            br#"{"tombstone": true, "schema_version": 1, "run_id": "run_0123456789ab"}"#,
        ] {
            assert!(RecordHead::as_written(other).is_none());
        }
        let escaped =
            RecordHead::peek(br#"{"schema_version": 1, "run_id": "run_0123456789a\u0062"}"#);
        assert_eq!(escaped.unwrap().run_id.as_str(), "run_0123456789ab");
        assert!(RecordHead::peek(br#"{"schema_version": 1.5, "run_id": "x"}"#).is_err());
    }

    #[test]
    fn seed_files_load_with_defaults() {
        let StoredRecord::Live(a) = StoredRecord::decode(SEED.as_bytes()).unwrap() else {
            panic!("expected a live record")
        };
        assert_eq!(a.schema_version, 0);
        assert_eq!(a.revision, 1);
        assert_eq!(a.status, RunStatus::Ok);
        assert_eq!(a.decision.risk_level, Some(RiskLevel::Green));
        assert_eq!(a.advisory_inputs[0].kind, AdvisoryKind::Explanation);
        assert_eq!(a.created_at_utc.to_string(), "2025-01-02T03:04:05.678901Z");
        // Round trip keeps everything.
        let again = StoredRecord::decode(&StoredRecord::Live(a.clone()).encode()).unwrap();
        assert_eq!(again, StoredRecord::Live(a));
    }

    #[test]
    fn unknown_fields_of_other_writers_are_kept() {
        let text = SEED.replacen("\"meta\"", "\"lineage\": {\"parent\": 1}, \"meta\"", 1);
        let StoredRecord::Live(a) = StoredRecord::decode(text.as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(a.extra["lineage"]["parent"], 1);
        let out = String::from_utf8(StoredRecord::Live(a).encode()).unwrap();
        assert!(out.contains("lineage"));
        // Nested parts keep theirs too.
        let text = SEED
            .replacen(
                "\"preview_svg_path\": null",
                "\"preview_svg_path\": null, \"nc_path\": \"x.nc\"",
                1,
            )
            .replacen(
                "\"engine_version\": \"1\"",
                "\"engine_version\": \"1\", \"rating\": 4",
                1,
            );
        let StoredRecord::Live(a) = StoredRecord::decode(text.as_bytes()).unwrap() else {
            panic!()
        };
        let out = String::from_utf8(StoredRecord::Live(a).encode()).unwrap();
        assert!(out.contains("nc_path") && out.contains("rating"), "{out}");
    }

    #[test]
    fn corrupt_objects_say_why() {
        assert!(
            StoredRecord::decode(b"{")
                .unwrap_err()
                .starts_with("not JSON")
        );
        assert!(
            StoredRecord::decode(b"{\"run_id\": \"nope\"}")
                .unwrap_err()
                .starts_with("bad artifact")
        );
    }

    #[test]
    fn enums_parse_exactly() {
        assert_eq!(RunStatus::parse("BLOCKED").unwrap(), RunStatus::Blocked);
        assert!(RunStatus::parse("ok").is_err());
        assert!(
            ExplanationStatus::parse("DONE")
                .unwrap_err()
                .message
                .contains("NONE, PENDING, READY, ERROR")
        );
    }
}
