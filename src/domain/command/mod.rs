//! Commands: one file per command, each with its payload type and the function that turns the
//! current stored record into the next one, or into a rejection. Pure: no I/O, no clock.

pub mod advisory;
pub mod create;
pub mod delete;
pub mod patch_meta;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::artifact::{AppliedCommand, JsonMap, Sha256Hex, StoredRecord};
use super::error::Rejection;
use super::hashing::sha256_json;
use super::ids::{Actor, CommandId, RequestId, RunId};

pub use advisory::{AdvisoryBody, AttachAdvisory};
pub use create::CreateRun;
pub use delete::DeleteRun;
pub use patch_meta::{PatchMeta, merge_patch};

use super::artifact::Timestamp;

/// Which command a message carries; the subject suffix names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CommandKind {
    /// `<prefix>.create`
    Create,
    /// `<prefix>.patch_meta`
    PatchMeta,
    /// `<prefix>.advisory`
    Advisory,
    /// `<prefix>.delete`
    Delete,
}

impl CommandKind {
    /// Every command, in protocol order.
    pub const ALL: [CommandKind; 4] = [
        CommandKind::Create,
        CommandKind::PatchMeta,
        CommandKind::Advisory,
        CommandKind::Delete,
    ];

    /// The subject suffix (`create`, `patch_meta`, `advisory`, `delete`).
    pub fn suffix(self) -> &'static str {
        match self {
            CommandKind::Create => "create",
            CommandKind::PatchMeta => "patch_meta",
            CommandKind::Advisory => "advisory",
            CommandKind::Delete => "delete",
        }
    }

    /// The command for a subject suffix.
    pub fn from_suffix(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.suffix() == s)
    }
}

/// A decoded, valid command.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// Record a new run.
    Create(Box<CreateRun>),
    /// Merge-patch a run's `meta`.
    PatchMeta(PatchMeta),
    /// Attach an advisory.
    Advisory(Box<AttachAdvisory>),
    /// Delete a run, leaving a tombstone.
    Delete(DeleteRun),
}

impl Command {
    /// Decodes a message body with the default [`Limits`]. See [`Command::decode_with`].
    pub fn decode(
        kind: CommandKind,
        body: &[u8],
        message_id: Option<&str>,
    ) -> Result<Command, Rejection> {
        Self::decode_with(kind, body, message_id, &Limits::default())
    }

    /// Decodes a message body. `message_id` (`Nats-Msg-Id`), when present, seeds the ids the
    /// worker derives, otherwise they come from the content, so a redelivery of the same
    /// message always maps to the same run and advisory. Payload size and nesting depth are
    /// checked against `limits` (`too_large`).
    pub fn decode_with(
        kind: CommandKind,
        body: &[u8],
        message_id: Option<&str>,
        limits: &Limits,
    ) -> Result<Command, Rejection> {
        if body.len() > limits.max_payload_bytes {
            return Err(Rejection::too_large(format!(
                "payload is {} bytes, over the limit of {} (max_payload_bytes)",
                body.len(),
                limits.max_payload_bytes
            )));
        }
        let raw: Value = serde_json::from_slice(body)
            .map_err(|e| Rejection::invalid(format!("payload is not valid JSON: {e}")))?;
        let depth = json_depth(&raw);
        if depth > limits.max_json_depth {
            return Err(Rejection::too_large(format!(
                "payload is nested {depth} levels deep, over the limit of {} (max_json_depth)",
                limits.max_json_depth
            )));
        }
        if !raw.is_object() {
            return Err(Rejection::invalid(
                "payload must be a JSON object".to_string(),
            ));
        }
        let cmd = match kind {
            CommandKind::Create => {
                Command::Create(Box::new(CreateRun::from_value(raw, message_id)?))
            }
            CommandKind::PatchMeta => Command::PatchMeta(typed(raw)?),
            CommandKind::Advisory => {
                Command::Advisory(Box::new(AttachAdvisory::from_value(raw, message_id)?))
            }
            CommandKind::Delete => Command::Delete(typed(raw)?),
        };
        // Inline only: a staged body never passes through one message, and is streamed.
        if let Command::Advisory(a) = &cmd
            && let AdvisoryBody::Inline(body) = &a.body
            && body.len() > limits.max_advisory_body_bytes
        {
            return Err(Rejection::too_large(format!(
                "advisory body is {} bytes, over the limit of {} (max_advisory_body_bytes; \
                 a larger one goes by claim check, body_ref)",
                body.len(),
                limits.max_advisory_body_bytes
            )));
        }
        Ok(cmd)
    }

    /// The command's kind.
    pub fn kind(&self) -> CommandKind {
        match self {
            Command::Create(_) => CommandKind::Create,
            Command::PatchMeta(_) => CommandKind::PatchMeta,
            Command::Advisory(_) => CommandKind::Advisory,
            Command::Delete(_) => CommandKind::Delete,
        }
    }

    /// The run the command is about.
    pub fn run_id(&self) -> &RunId {
        match self {
            Command::Create(c) => &c.run_id,
            Command::PatchMeta(c) => &c.run_id,
            Command::Advisory(c) => &c.run_id,
            Command::Delete(c) => &c.run_id,
        }
    }

    /// The bodies the command names by claim check, for the transport to claim (stream into
    /// the store, checked) before the command is decided.
    pub fn staged_bodies(&self) -> Vec<StagedClaim<'_>> {
        let mut out = Vec::new();
        match self {
            Command::Create(c) => {
                if let Some(r) = &c.outputs.gcode_ref {
                    out.push(StagedClaim {
                        field: "outputs.gcode_ref",
                        body: r,
                        format: StagedFormat::Bytes,
                    });
                }
                if let Some(r) = &c.outputs.opplan_ref {
                    out.push(StagedClaim {
                        field: "outputs.opplan_ref",
                        body: r,
                        format: StagedFormat::CanonicalJsonObject,
                    });
                }
            }
            Command::Advisory(a) => {
                if let AdvisoryBody::Staged(r) = &a.body {
                    out.push(StagedClaim {
                        field: "body_ref",
                        body: r,
                        format: StagedFormat::CanonicalJson,
                    });
                }
            }
            Command::PatchMeta(_) | Command::Delete(_) => {}
        }
        out
    }

    /// Decides what the command does to the current record.
    pub fn decide(
        &self,
        current: Option<&StoredRecord>,
        ctx: &Context,
    ) -> Result<Decision, Rejection> {
        match self {
            Command::Create(c) => c.decide(current, ctx),
            Command::PatchMeta(c) => c.decide(current, ctx),
            Command::Advisory(c) => c.decide(current, ctx),
            Command::Delete(c) => c.decide(current, ctx),
        }
    }
}

/// What the bytes of a staged body must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StagedFormat {
    /// Any bytes, stored exactly as staged (G-code).
    Bytes,
    /// RFC 8785 canonical JSON (an advisory body): see [`crate::domain::canonical`].
    CanonicalJson,
    /// RFC 8785 canonical JSON of an object (an op plan).
    CanonicalJsonObject,
}

/// A body a command names by claim check.
#[derive(Clone, Copy, Debug)]
pub struct StagedClaim<'a> {
    /// The field naming it (`outputs.gcode_ref`, `outputs.opplan_ref`, `body_ref`).
    pub field: &'static str,
    /// Where it is staged, its SHA-256 and size.
    pub body: &'a create::StagedBody,
    /// What its bytes must be.
    pub format: StagedFormat,
}

/// Decodes a strict payload type, turning serde's message into a rejection.
pub(crate) fn typed<T: DeserializeOwned>(raw: Value) -> Result<T, Rejection> {
    serde_json::from_value(raw).map_err(|e| Rejection::invalid(format!("schema violation: {e}")))
}

/// Limits the domain applies while decoding and deciding; each has a safe default and a
/// `too_large` rejection that names it.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Bodies larger than this many bytes are stored as their own blob.
    pub blob_threshold: usize,
    /// How many recent command ids a run remembers for redelivery detection.
    pub remembered_commands: usize,
    /// Largest command payload, in bytes.
    pub max_payload_bytes: usize,
    /// Deepest JSON nesting in a payload.
    pub max_json_depth: usize,
    /// Most keys at the top of a run's `meta`.
    pub max_meta_keys: usize,
    /// Largest `meta`, in bytes of canonical JSON.
    pub max_meta_bytes: usize,
    /// Largest advisory body, in bytes of canonical JSON.
    pub max_advisory_body_bytes: usize,
    /// Most advisories one run keeps: each adds about 400 bytes to its record, and a record
    /// must stay small enough to fetch in one message and cheap to rewrite.
    pub max_advisories: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            blob_threshold: 64 * 1024,
            remembered_commands: 1000,
            max_payload_bytes: 8 * 1024 * 1024,
            max_json_depth: 32,
            max_meta_keys: 1024,
            max_meta_bytes: 256 * 1024,
            max_advisory_body_bytes: 1024 * 1024,
            max_advisories: 500,
        }
    }
}

impl Limits {
    /// Checks a run's `meta` against the limits.
    pub fn check_meta(&self, meta: &JsonMap) -> Result<(), Rejection> {
        if meta.len() > self.max_meta_keys {
            return Err(Rejection::too_large(format!(
                "meta would have {} keys, over the limit of {} (max_meta_keys)",
                meta.len(),
                self.max_meta_keys
            )));
        }
        let bytes = super::hashing::canonical_json(&Value::Object(meta.clone())).len();
        if bytes > self.max_meta_bytes {
            return Err(Rejection::too_large(format!(
                "meta would be {bytes} bytes, over the limit of {} (max_meta_bytes)",
                self.max_meta_bytes
            )));
        }
        Ok(())
    }
}

/// Nesting depth of a JSON value (a scalar is 0, `[]` and `{}` are 1).
fn json_depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(json_depth).max().unwrap_or(0),
        Value::Object(m) => 1 + m.values().map(json_depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Everything a decision needs from outside the command: the time, the ids, the limits.
#[derive(Clone, Debug)]
pub struct Context {
    /// The time to stamp on the change.
    pub now: Timestamp,
    /// The correlation id (from `X-Request-Id`, or generated).
    pub request_id: RequestId,
    /// The identity of the message, for redelivery detection of patches.
    pub command_id: Option<CommandId>,
    /// Where the message sits in the stream (JetStream ingest only).
    pub stream: Option<StreamPosition>,
    /// Who sent it, as the publisher says (`Rmos-Actor`), kept in the revision.
    pub actor: Option<Actor>,
    /// Limits.
    pub limits: Limits,
    /// The message may have been processed before (a JetStream redelivery): the store then
    /// reconciles the run's index entries with its record after applying it.
    pub redelivered: bool,
}

impl Context {
    /// A context stamped now with a fresh request id and default limits.
    pub fn now() -> Self {
        Self {
            now: Timestamp::now(),
            request_id: RequestId::generate(),
            command_id: None,
            stream: None,
            actor: None,
            limits: Limits::default(),
            redelivered: false,
        }
    }
}

/// A command message's place in the stream, and how far the stream is known to be done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamPosition {
    /// The stream sequence of the message carrying the command.
    pub seq: u64,
    /// Every message up to this sequence was acknowledged long enough ago that none of them
    /// can still be delivered (0: nothing known). Applied commands at or below it are
    /// forgotten.
    pub acked_through: u64,
}

/// A body to be stored as its own object before the record that references it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewBlob {
    /// SHA-256 of `bytes`: the object's name.
    pub sha256: Sha256Hex,
    /// The bytes.
    pub bytes: Vec<u8>,
}

/// The event a command produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A run was recorded.
    Created,
    /// A run's meta was patched.
    MetaPatched,
    /// An advisory was attached.
    AdvisoryAttached,
    /// A run was deleted.
    Deleted,
}

impl EventKind {
    /// The protocol's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Created => "created",
            EventKind::MetaPatched => "meta_patched",
            EventKind::AdvisoryAttached => "advisory_attached",
            EventKind::Deleted => "deleted",
        }
    }
}

/// What a command does to a run.
#[derive(Clone, Debug, PartialEq)]
#[allow(clippy::large_enum_variant)] // one per command, moved once: boxing buys nothing
pub enum Decision {
    /// Store `record` (after `blobs`), announce `event`; `released` blobs may then be removed
    /// when no other run references them.
    Write {
        /// The next record.
        record: StoredRecord,
        /// Blobs to store first.
        blobs: Vec<NewBlob>,
        /// The event to announce.
        event: EventKind,
        /// Blobs the run no longer references.
        released: Vec<Sha256Hex>,
    },
    /// The command was already applied (a redelivery): nothing changes.
    Unchanged {
        /// The event the original application announced.
        event: EventKind,
    },
}

/// RFC 8785 SHA-256 of a serializable value.
pub(crate) fn hash_of<T: serde::Serialize>(value: &T) -> Sha256Hex {
    let v = serde_json::to_value(value).unwrap_or(Value::Null);
    Sha256Hex::from_computed(sha256_json(&v))
}

/// Remembers an applied command in an oldest-first list, and forgets the ones that can no
/// longer come back: those whose message the stream has acknowledged (at or below
/// `acked_through`). At most `cap` are kept in any case (commands from core NATS, which has no
/// sequence, are only ever dropped by the cap).
pub(crate) fn remember(
    list: &mut Vec<AppliedCommand>,
    id: &CommandId,
    stream: Option<StreamPosition>,
    cap: usize,
) {
    if let Some(pos) = stream {
        list.retain(|c| c.seq.is_none_or(|seq| seq > pos.acked_through));
    }
    list.push(AppliedCommand {
        id: id.clone(),
        seq: stream.map(|pos| pos.seq),
    });
    if list.len() > cap {
        let excess = list.len() - cap;
        list.drain(..excess);
    }
}

/// The live artifact, or the reason there is none.
pub(crate) fn live<'a>(
    current: Option<&'a StoredRecord>,
    run_id: &RunId,
) -> Result<&'a super::artifact::RunArtifact, Rejection> {
    match current {
        Some(StoredRecord::Live(a)) => Ok(a),
        Some(StoredRecord::Deleted(t)) => Err(Rejection::deleted(format!(
            "run {run_id} was deleted at {} ({})",
            t.deleted_at_utc, t.reason
        ))),
        None => Err(Rejection::missing(format!("run {run_id} does not exist"))),
    }
}

#[cfg(test)]
mod limit_tests {
    use super::*;
    use crate::domain::error::RejectCode;
    use serde_json::json;

    #[test]
    fn each_limit_names_itself() {
        let limits = Limits {
            max_payload_bytes: 200,
            max_json_depth: 4,
            max_meta_keys: 2,
            max_advisory_body_bytes: 10,
            ..Limits::default()
        };
        let big = json!({"run_id": "run_000000000001", "meta_updates": {"a": "x".repeat(300)}});
        let e = Command::decode_with(
            CommandKind::PatchMeta,
            big.to_string().as_bytes(),
            None,
            &limits,
        )
        .unwrap_err();
        assert_eq!(e.code, RejectCode::TooLarge);
        assert!(e.message.contains("max_payload_bytes"), "{e}");

        let deep =
            json!({"run_id": "run_000000000001", "meta_updates": {"a": {"b": {"c": {"d": 1}}}}});
        let e = Command::decode_with(
            CommandKind::PatchMeta,
            deep.to_string().as_bytes(),
            None,
            &limits,
        )
        .unwrap_err();
        assert!(e.message.contains("max_json_depth"), "{e}");

        let adv = json!({"run_id": "run_000000000001", "body": {"text": "far too long"}});
        let e = Command::decode_with(
            CommandKind::Advisory,
            adv.to_string().as_bytes(),
            None,
            &limits,
        )
        .unwrap_err();
        assert!(e.message.contains("max_advisory_body_bytes"), "{e}");

        let create = Command::decode(
            CommandKind::Create,
            json!({"mode": "cam", "tool_id": "T1", "status": "OK",
                   "meta": {"a": 1, "b": 2, "c": 3}})
            .to_string()
            .as_bytes(),
            None,
        )
        .unwrap();
        let ctx = Context {
            limits: limits.clone(),
            ..Context::now()
        };
        let e = create.decide(None, &ctx).unwrap_err();
        assert!(e.message.contains("max_meta_keys"), "{e}");
    }
}
