//! Every revision of a run, kept: the audit trail and its hash chain.
//!
//! ```text
//! history/<run_id>/<revision, 20 digits>.json    one immutable object per applied command
//! ```
//!
//! A revision holds the record it produced and what is known of the command (event, time,
//! request id, command id, stream sequence), with `artifact_sha256` (RFC 8785 SHA-256 of the
//! record) and `prev_sha256` (the previous revision's): the revisions form a hash chain, and the
//! record itself carries `prev_sha256` too, so the current record is the chain's head.
//!
//! **History first.** A change claims its revision with a create-if-absent put *before* it
//! writes the record: the claim decides which of two racing writers makes revision N. A
//! writer that finds revision N claimed by another and the record still at N-1 *rolls it
//! forward* (writes that revision's record itself), since a claimed revision is a decided
//! change whose writer may have died; the dead writer's command, redelivered, then finds itself
//! applied. So no record exists without its revision, and no revision stays unapplied once any
//! command reaches the run. On the local store the claim is written without a barrier of its
//! own: the record's group commit makes it durable first. A claim torn by a power cut before
//! that barrier (the only way to get one) is replaced conditionally on its torn bytes.

use futures::StreamExt;
use object_store::path::Path;
use object_store::{GetOptions, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{RunStore, StoreError, Versioned, listing, local, record_sha256};
use crate::domain::artifact::{Sha256Hex, StoredRecord, Timestamp};
use crate::domain::hashing::sha256_json;
use crate::domain::ids::RunId;

/// Largest history page.
pub const MAX_HISTORY_PAGE: usize = 1000;

/// One revision as stored under `history/<run>/`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revision {
    /// The run.
    pub run_id: RunId,
    /// The revision this command produced.
    pub revision: u64,
    /// `created`, `meta_patched`, `advisory_attached`, `deleted`, or `imported`.
    pub event: String,
    /// When it was applied.
    pub at: Timestamp,
    /// The command's correlation id.
    pub request_id: Option<String>,
    /// The command's identity (`Nats-Msg-Id`, or `js:<stream>:<sequence>`).
    pub command_id: Option<String>,
    /// The stream sequence of the message that carried it.
    pub stream_seq: Option<u64>,
    /// Who sent the command, as its publisher said (`Rmos-Actor`); not vouched for by the
    /// broker (see the README).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// RFC 8785 SHA-256 of `record`.
    pub artifact_sha256: String,
    /// The previous revision's `artifact_sha256` (none for revision 1).
    pub prev_sha256: Option<String>,
    /// The record as this revision stored it.
    pub record: Value,
    /// The worker's signature of [`Revision::signed_text`], when a signing key is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<RevisionSignature>,
}

/// An ed25519 signature (nkeys) of a revision's hash and place in its chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevisionSignature {
    /// The signer's public nkey.
    pub key: String,
    /// The signature, hex.
    pub sig: String,
}

/// The worker's signing key and the keys `verify` trusts (the signing key's own included).
#[derive(Default)]
pub struct Signing {
    key: Option<nkeys::KeyPair>,
    trusted: Vec<String>,
}

impl std::fmt::Debug for Signing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the seed.
        f.debug_struct("Signing")
            .field("key", &self.key.as_ref().map(nkeys::KeyPair::public_key))
            .field("trusted", &self.trusted)
            .finish()
    }
}

impl Signing {
    /// Signs with `key` (when given) and trusts it and `trusted` (public nkeys).
    pub fn new(key: Option<nkeys::KeyPair>, mut trusted: Vec<String>) -> Self {
        if let Some(k) = &key {
            trusted.push(k.public_key());
        }
        trusted.sort();
        trusted.dedup();
        Self { key, trusted }
    }

    /// Reads an nkey seed file (the first line starting with `S`, as `nk -gen` and `nsc` write
    /// them; a creds file's seed line works too).
    pub fn load_seed(path: &std::path::Path) -> Result<nkeys::KeyPair, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("signing key {}: {e}", path.display()))?;
        let seed = text
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with('S') && l.len() > 50)
            .ok_or_else(|| format!("signing key {}: no nkey seed in it", path.display()))?;
        nkeys::KeyPair::from_seed(seed).map_err(|e| format!("signing key {}: {e}", path.display()))
    }

    /// Whether revisions are checked against trusted keys.
    pub fn checks(&self) -> bool {
        !self.trusted.is_empty()
    }

    fn sign(&self, rev: &mut Revision) -> Result<(), StoreError> {
        if let Some(k) = &self.key {
            let sig = k
                .sign(rev.signed_text().as_bytes())
                .map_err(|e| StoreError::Unusable(format!("signing a revision: {e}")))?;
            rev.signature = Some(RevisionSignature {
                key: k.public_key(),
                sig: hex::encode(sig),
            });
        }
        Ok(())
    }

    /// Why a revision's signature does not hold, if it does not.
    fn check(&self, rev: &Revision) -> Option<String> {
        let Some(s) = &rev.signature else {
            return Some("unsigned".into());
        };
        if !self.trusted.contains(&s.key) {
            return Some(format!("signed by {}, which is not a trusted key", s.key));
        }
        let Ok(sig) = hex::decode(&s.sig) else {
            return Some("the signature is not hex".into());
        };
        match nkeys::KeyPair::from_public_key(&s.key)
            .and_then(|k| k.verify(rev.signed_text().as_bytes(), &sig))
        {
            Ok(()) => None,
            Err(_) => Some(format!("the signature by {} does not match", s.key)),
        }
    }
}

impl Revision {
    /// A revision for `record`, which must already carry its `prev_sha256`.
    pub fn new(
        record: &StoredRecord,
        event: &str,
        at: Timestamp,
        request_id: Option<String>,
        command_id: Option<String>,
        stream_seq: Option<u64>,
    ) -> Self {
        let value = match record {
            StoredRecord::Live(a) => serde_json::to_value(a),
            StoredRecord::Deleted(t) => serde_json::to_value(t),
        }
        .unwrap_or(Value::Null);
        Self {
            run_id: record.run_id().clone(),
            revision: record.revision(),
            event: event.to_owned(),
            at,
            request_id,
            command_id,
            stream_seq,
            actor: None,
            artifact_sha256: sha256_json(&value),
            prev_sha256: record.prev_sha256().map(ToString::to_string),
            record: value,
            signature: None,
        }
    }

    /// The same revision, naming who sent the command.
    pub fn with_actor(mut self, actor: Option<String>) -> Self {
        self.actor = actor;
        self
    }

    /// What a signature covers: the revision's place (run, number, previous hash) and its
    /// content hash, so a signature cannot be moved to another revision or chain.
    pub fn signed_text(&self) -> String {
        format!(
            "rmos-runs revision v1\n{}\n{}\n{}\n{}\n",
            self.run_id,
            self.revision,
            self.artifact_sha256,
            self.prev_sha256.as_deref().unwrap_or("-")
        )
    }

    /// The record this revision stored.
    pub fn decode_record(&self) -> Result<StoredRecord, String> {
        let bytes = serde_json::to_vec(&self.record).map_err(|e| e.to_string())?;
        StoredRecord::decode(&bytes)
    }

    /// What `rmos.runs.history` shows of it (everything but the record).
    pub fn summary(&self) -> RevisionSummary {
        RevisionSummary {
            revision: self.revision,
            event: self.event.clone(),
            at: self.at,
            request_id: self.request_id.clone(),
            command_id: self.command_id.clone(),
            stream_seq: self.stream_seq,
            actor: self.actor.clone(),
            artifact_sha256: self.artifact_sha256.clone(),
            prev_sha256: self.prev_sha256.clone(),
        }
    }
}

/// One line of a run's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevisionSummary {
    /// Revision.
    pub revision: u64,
    /// Event.
    pub event: String,
    /// When.
    pub at: Timestamp,
    /// Correlation id.
    pub request_id: Option<String>,
    /// Command id.
    pub command_id: Option<String>,
    /// Stream sequence.
    pub stream_seq: Option<u64>,
    /// Who sent the command, as its publisher said (`Rmos-Actor`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// Hash of the record this revision stored.
    pub artifact_sha256: String,
    /// Hash of the previous revision's record.
    pub prev_sha256: Option<String>,
}

/// A page of `rmos.runs.history`, oldest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryPage {
    /// The run.
    pub run_id: RunId,
    /// Revisions, oldest first.
    pub revisions: Vec<RevisionSummary>,
    /// Pass as `cursor` to continue; `null` at the end.
    pub next_cursor: Option<String>,
}

/// Why a chain does not hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChainFault {
    /// A revision's (or the current record's) content no longer hashes to what was recorded.
    ContentChanged,
    /// A revision is missing.
    RevisionMissing,
    /// A revision does not point at the one before it (or sits under another number).
    ChainBroken,
    /// A revision is unsigned, signed by an untrusted key, or its signature does not match.
    SignatureInvalid,
}

/// The first link of a chain that does not hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BrokenLink {
    /// The revision at fault.
    pub revision: u64,
    /// Why.
    pub reason: ChainFault,
    /// In words.
    pub detail: String,
}

/// The hash chain of one run, checked end to end.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChainReport {
    /// True when every link holds.
    pub ok: bool,
    /// Revisions in the history.
    pub revisions: u64,
    /// The first revision kept (above 1 for a run recorded before history was kept).
    pub starts_at: Option<u64>,
    /// A revision claimed but not yet applied to the record (an interrupted write; the
    /// command's redelivery completes it). Not a failure.
    pub pending: Option<u64>,
    /// Whether signatures were checked (a trusted key is configured).
    pub signatures_checked: bool,
    /// The first broken link.
    pub broken: Option<BrokenLink>,
}

/// One run's full check (`verify --all`): content hashes and the hash chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RunCheck {
    /// The run.
    pub run_id: RunId,
    /// True when every check passed.
    pub ok: bool,
    /// A record without recorded hashes (imported from the original service): reported
    /// apart, not as a failure.
    pub legacy: bool,
    /// Why it failed.
    pub reason: Option<String>,
}

/// What a sweep of the whole store found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SweepReport {
    /// Runs checked.
    pub checked: usize,
    /// Runs that failed, with their reasons.
    pub failed: Vec<RunCheck>,
    /// Runs whose record carries no hashes (legacy imports).
    pub legacy: Vec<RunId>,
    /// The last run checked (pass it as `--after` to resume).
    pub last: Option<RunId>,
}

impl std::fmt::Display for SweepReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "verify --all: {} runs checked, {} failed, {} legacy (no recorded hashes)",
            self.checked,
            self.failed.len(),
            self.legacy.len()
        )?;
        for c in &self.failed {
            writeln!(
                f,
                "  FAILED {}: {}",
                c.run_id,
                c.reason.as_deref().unwrap_or("?")
            )?;
        }
        for id in &self.legacy {
            writeln!(f, "  legacy {id}")?;
        }
        Ok(())
    }
}

/// What claiming a revision found.
enum Claim {
    /// The revision is ours (written now, or by an earlier attempt of the same change).
    Ours,
    /// Another change holds it.
    Theirs(Box<Revision>),
    /// The object there does not decode (torn by a power cut before its barrier).
    Torn(UpdateVersion),
}

fn history_name(revision: u64) -> String {
    format!("{revision:020}.json")
}

fn revision_of(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".json")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

impl RunStore {
    /// `<prefix>/history/<run>/<revision>.json`
    pub fn history_key(&self, id: &RunId, revision: u64) -> Path {
        self.key(&format!("history/{id}/{}", history_name(revision)))
    }

    /// Signs a revision with the worker's key, when one is configured.
    pub(super) fn sign_revision(&self, rev: &mut Revision) -> Result<(), StoreError> {
        self.signing.sign(rev)
    }

    /// Claims `rev` for its run (create-if-absent). Loops over torn objects it replaces.
    async fn claim(&self, rev: &Revision) -> Result<Claim, StoreError> {
        let key = self.history_key(&rev.run_id, rev.revision);
        let bytes = serde_json::to_vec(rev)
            .map_err(|e| StoreError::Unusable(format!("encode {key}: {e}")))?;
        let mut opts = PutOptions::from(PutMode::Create);
        opts.extensions.insert(local::DeferredSync);
        match self
            .store
            .put_opts(&key, PutPayload::from(bytes), opts)
            .await
        {
            Ok(_) => return Ok(Claim::Ours),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => {}
            Err(e) => return Err(self.os_err(e, &format!("write {key}"))),
        }
        let Some((version, existing)) = self.read_raw(&key, GetOptions::default()).await? else {
            // Removed meanwhile (retention): let the caller start over.
            return Ok(Claim::Torn(UpdateVersion {
                e_tag: None,
                version: None,
            }));
        };
        match serde_json::from_slice::<Revision>(&existing) {
            Ok(theirs) if theirs.artifact_sha256 == rev.artifact_sha256 => Ok(Claim::Ours),
            Ok(theirs) => Ok(Claim::Theirs(Box::new(theirs))),
            Err(_) => Ok(Claim::Torn(version)),
        }
    }

    /// Writes the history entry of a change about to be applied to `current`. `Ok(true)` when
    /// the caller may write its record; `Ok(false)` when it must reload and decide again
    /// (another change held the revision, and was rolled forward here if it had not landed).
    pub(super) async fn claim_revision(
        &self,
        rev: &Revision,
        current: Option<&Versioned<StoredRecord>>,
    ) -> Result<bool, StoreError> {
        match self.claim(rev).await? {
            Claim::Ours => Ok(true),
            Claim::Theirs(theirs) => {
                self.roll_forward(current, &theirs).await?;
                Ok(false)
            }
            Claim::Torn(version) => {
                let key = self.history_key(&rev.run_id, rev.revision);
                if version.e_tag.is_some() || version.version.is_some() {
                    // Replace it only as it is: a racing writer may be doing the same.
                    let bytes = serde_json::to_vec(rev)
                        .map_err(|e| StoreError::Unusable(format!("encode {key}: {e}")))?;
                    match self
                        .store
                        .put_opts(
                            &key,
                            PutPayload::from(bytes),
                            PutOptions::from(PutMode::Update(version)),
                        )
                        .await
                    {
                        Ok(_) => {
                            tracing::warn!(%key, "replaced a torn, never-applied revision");
                            return Ok(true);
                        }
                        Err(e) if super::is_race(&e) => {}
                        Err(e) => return Err(self.os_err(e, &format!("write {key}"))),
                    }
                }
                Ok(false)
            }
        }
    }

    /// Applies a revision another change claimed but did not (yet) write: its record replaces
    /// `current` if `current` is still the revision before it. Losing that race is fine (the
    /// record moved on).
    async fn roll_forward(
        &self,
        current: Option<&Versioned<StoredRecord>>,
        theirs: &Revision,
    ) -> Result<(), StoreError> {
        let key = self.history_key(&theirs.run_id, theirs.revision);
        let current_rev = current.map_or(0, |c| c.value.revision());
        if current_rev + 1 != theirs.revision {
            return Ok(());
        }
        let record = theirs
            .decode_record()
            .map_err(|reason| StoreError::Corrupt {
                key: key.to_string(),
                reason,
            })?;
        if record_sha256(&record) != theirs.artifact_sha256 || record.run_id() != &theirs.run_id {
            return Err(StoreError::Corrupt {
                key: key.to_string(),
                reason: "its record does not hash to its artifact_sha256".into(),
            });
        }
        let old = current
            .map(|c| listing::entries_of(&c.value))
            .unwrap_or_default();
        let new = listing::entries_of(&record);
        let added: Vec<String> = new.iter().filter(|k| !old.contains(k)).cloned().collect();
        let gone: Vec<String> = old.iter().filter(|k| !new.contains(k)).cloned().collect();
        self.put_entries(&added).await?;
        let mode = match current {
            None => PutMode::Create,
            Some(v) => PutMode::Update(v.version.clone()),
        };
        let record_key = self.artifact_key(&theirs.run_id);
        match self
            .store
            .put_opts(
                &record_key,
                PutPayload::from(record.encode()),
                PutOptions::from(mode),
            )
            .await
        {
            Ok(_) => {
                tracing::warn!(run_id = %theirs.run_id, revision = theirs.revision,
                    "rolled forward a revision whose writer had not applied it");
                self.remove_entries(&gone).await
            }
            Err(e) if super::is_race(&e) => Ok(()),
            Err(e) => Err(self.os_err(e, &format!("write {record_key}"))),
        }
    }

    /// Revision numbers kept for a run, ascending.
    async fn revisions(&self, id: &RunId) -> Result<Vec<u64>, StoreError> {
        let dir = self.key(&format!("history/{id}"));
        let names: Vec<String> = if let Some(local) = &self.local {
            local
                .read_dir_names(&dir)
                .map_err(|e| self.os_err(e, &format!("list {dir}")))?
                .into_iter()
                .filter(|(_, is_dir)| !is_dir)
                .map(|(n, _)| n)
                .collect()
        } else {
            self.store
                .list_with_delimiter(Some(&dir))
                .await
                .map_err(|e| self.os_err(e, &format!("list {dir}")))?
                .objects
                .iter()
                .filter_map(|m| m.location.filename().map(str::to_owned))
                .collect()
        };
        let mut revs: Vec<u64> = names.iter().filter_map(|n| revision_of(n)).collect();
        revs.sort_unstable();
        Ok(revs)
    }

    /// Reads one revision; `None` when it is not kept.
    pub async fn revision(
        &self,
        id: &RunId,
        revision: u64,
    ) -> Result<Option<Revision>, StoreError> {
        let key = self.history_key(id, revision);
        let Some((_, bytes)) = self.read_raw(&key, super::read_only()).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                key: key.to_string(),
                reason: e.to_string(),
            })
    }

    /// A run as it was at `revision` (its record then, tombstone included), as stored JSON.
    /// A run recorded before history was kept answers its current revision only.
    pub async fn get_revision(&self, id: &RunId, revision: u64) -> Result<Value, StoreError> {
        if let Some(rev) = self.revision(id, revision).await? {
            return Ok(rev.record);
        }
        match self.load(id).await? {
            Some(v) if v.value.revision() == revision => match &v.value {
                StoredRecord::Live(a) => serde_json::to_value(a),
                StoredRecord::Deleted(t) => serde_json::to_value(t),
            }
            .map_err(|e| StoreError::Unusable(e.to_string())),
            Some(_) => Err(StoreError::Rejected(
                crate::domain::error::Rejection::not_found(format!(
                    "run {id} has no revision {revision} in its history"
                )),
            )),
            None => Err(StoreError::NotFound(id.clone())),
        }
    }

    /// One page of a run's history, oldest first, after revision `after`.
    ///
    /// Revisions are numbered without gaps, so a page reads exactly its own revisions (and the
    /// record, for where the history ends): its cost does not grow with the run's history. Only
    /// the first page of a run recorded before history was kept lists the run's history, to
    /// find where it starts.
    pub async fn history(
        &self,
        id: &RunId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<HistoryPage, StoreError> {
        let limit = limit.clamp(1, MAX_HISTORY_PAGE);
        let current = match self.load(id).await {
            Ok(c) => c.map_or(0, |c| c.value.revision()),
            // An unreadable record (tampered with, torn): its history is the evidence, so it
            // stays readable, up to the last revision kept.
            Err(StoreError::Corrupt { .. }) => {
                self.revisions(id).await?.last().copied().unwrap_or(0)
            }
            Err(e) => return Err(e),
        };
        let start = match after {
            Some(a) => a.saturating_add(1),
            None if current <= 1 || self.revision(id, 1).await?.is_some() => 1,
            None => match self.revisions(id).await?.first() {
                Some(first) => *first,
                None => current,
            },
        };
        // A revision one past the record's is a claimed one not yet applied: shown, as it is
        // in the history (its command's redelivery applies it).
        let last = current + 1;
        let wanted: Vec<u64> = (start..=last).take(limit + 1).collect();
        let mut read = futures::stream::iter(wanted.iter().copied())
            .map(|r| async move { (r, self.revision(id, r).await) })
            .buffered(16);
        let mut revisions = Vec::new();
        let mut more = false;
        while let Some((r, got)) = read.next().await {
            match got? {
                Some(_) if revisions.len() == limit => {
                    more = true;
                    break;
                }
                Some(rev) => revisions.push(rev.summary()),
                None if r > current => break,
                // Before history was kept (legacy records answer their current revision only).
                None if after.is_none() && r == current && revisions.is_empty() => break,
                None => {
                    return Err(StoreError::Corrupt {
                        key: self.history_key(id, r).to_string(),
                        reason: format!(
                            "revision {r} is missing from the history (the record is at {current}; \
                             `rmos-runs verify {id}` tells more)"
                        ),
                    });
                }
            }
        }
        if current == 0 && revisions.is_empty() {
            return Err(StoreError::NotFound(id.clone()));
        }
        Ok(HistoryPage {
            run_id: id.clone(),
            next_cursor: more
                .then(|| revisions.last().map(|r| r.revision.to_string()))
                .flatten(),
            revisions,
        })
    }

    /// Checks a run's hash chain end to end: every revision hashes to what it recorded, points
    /// at the one before it, none is missing, and the current record is the last one.
    pub async fn verify_chain(&self, id: &RunId) -> Result<ChainReport, StoreError> {
        let revs = self.revisions(id).await?;
        let current = self.load(id).await?;
        if revs.is_empty() && current.is_none() {
            return Err(StoreError::NotFound(id.clone()));
        }
        let mut report = ChainReport {
            ok: true,
            revisions: revs.len() as u64,
            starts_at: revs.first().copied(),
            pending: None,
            signatures_checked: self.signing.checks(),
            broken: None,
        };
        let fail = |report: &mut ChainReport, revision, reason, detail: String| {
            if report.broken.is_none() {
                report.ok = false;
                report.broken = Some(BrokenLink {
                    revision,
                    reason,
                    detail,
                });
            }
        };
        let mut prev: Option<(u64, String)> = None;
        for r in &revs {
            if let Some((p, _)) = &prev
                && *r != p + 1
            {
                fail(
                    &mut report,
                    p + 1,
                    ChainFault::RevisionMissing,
                    format!("revision {} is missing from the history", p + 1),
                );
                break;
            }
            let rev = match self.revision(id, *r).await {
                Ok(Some(rev)) => rev,
                Ok(None) => {
                    fail(
                        &mut report,
                        *r,
                        ChainFault::RevisionMissing,
                        format!("revision {r} vanished while being checked"),
                    );
                    break;
                }
                Err(e) => {
                    fail(
                        &mut report,
                        *r,
                        ChainFault::ContentChanged,
                        format!("revision {r} is unreadable: {e}"),
                    );
                    break;
                }
            };
            if rev.revision != *r || rev.run_id != *id {
                fail(
                    &mut report,
                    *r,
                    ChainFault::ChainBroken,
                    format!(
                        "the object of revision {r} holds revision {} of {} (moved or reordered)",
                        rev.revision, rev.run_id
                    ),
                );
                break;
            }
            let actual = sha256_json(&rev.record);
            if actual != rev.artifact_sha256 {
                fail(
                    &mut report,
                    *r,
                    ChainFault::ContentChanged,
                    format!(
                        "revision {r}'s record hashes to {actual}, recorded {}",
                        rev.artifact_sha256
                    ),
                );
                break;
            }
            let record_prev = rev.record.get("prev_sha256").and_then(Value::as_str);
            let expected_prev = prev.as_ref().map(|(_, sha)| sha.as_str());
            let linked = match (r, expected_prev) {
                (1, _) => rev.prev_sha256.is_none(),
                (_, Some(e)) => rev.prev_sha256.as_deref() == Some(e),
                // The first revision kept of a run recorded before history was.
                (_, None) => true,
            };
            if !linked || record_prev != rev.prev_sha256.as_deref() {
                fail(
                    &mut report,
                    *r,
                    ChainFault::ChainBroken,
                    format!(
                        "revision {r} points at {:?}, the revision before it is {:?}",
                        rev.prev_sha256, expected_prev
                    ),
                );
                break;
            }
            if self.signing.checks()
                && let Some(why) = self.signing.check(&rev)
            {
                fail(
                    &mut report,
                    *r,
                    ChainFault::SignatureInvalid,
                    format!("revision {r}: {why}"),
                );
                break;
            }
            prev = Some((*r, rev.artifact_sha256));
        }
        if report.ok
            && let (Some(cur), Some((last, last_sha))) = (&current, &prev)
        {
            let cur_rev = cur.value.revision();
            if cur_rev + 1 == *last {
                report.pending = Some(*last);
            } else if cur_rev != *last {
                fail(
                    &mut report,
                    (*last + 1).min(cur_rev),
                    ChainFault::RevisionMissing,
                    format!("the record is at revision {cur_rev}, the history ends at {last}"),
                );
            } else {
                let actual = record_sha256(&cur.value);
                if &actual != last_sha {
                    fail(
                        &mut report,
                        cur_rev,
                        ChainFault::ContentChanged,
                        format!(
                            "the current record hashes to {actual}, its revision recorded {last_sha}"
                        ),
                    );
                }
            }
        }
        Ok(report)
    }

    /// Every check of one run: its content hashes (blobs included) and its hash chain.
    pub async fn check_run(&self, id: &RunId) -> Result<RunCheck, StoreError> {
        let report = self.verify(id).await?;
        let chain = self.verify_chain(id).await?;
        use crate::domain::verify::CheckStatus;
        let bad: Vec<String> = report
            .checks
            .iter()
            .filter(|c| {
                c.status == CheckStatus::Mismatch
                    || (c.status == CheckStatus::Missing && c.expected.is_some())
            })
            .map(|c| format!("{} {:?}", c.name, c.status).to_lowercase())
            .collect();
        let legacy = report
            .checks
            .iter()
            .any(|c| c.status == CheckStatus::Missing && c.expected.is_none());
        let reason = match (&chain.broken, bad.is_empty()) {
            (Some(b), _) => Some(format!(
                "revision {}: {} ({})",
                b.revision,
                serde_json::to_value(b.reason)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                b.detail
            )),
            (None, false) => Some(bad.join(", ")),
            (None, true) => None,
        };
        Ok(RunCheck {
            run_id: id.clone(),
            ok: reason.is_none(),
            legacy: legacy && reason.is_none(),
            reason,
        })
    }

    /// Checks every live run after `after`, in run id order (from the index), `concurrency`
    /// at a time; `progress` hears of each page. Resumable: pass the report's `last` again.
    pub async fn sweep(
        &self,
        after: Option<RunId>,
        concurrency: usize,
        mut progress: impl FnMut(&SweepReport),
    ) -> Result<SweepReport, StoreError> {
        let mut report = SweepReport::default();
        let mut q = super::ListQuery {
            limit: Some(super::MAX_PAGE),
            order: Some(super::Order::Id),
            cursor: after.map(|a| a.to_string()),
            ..Default::default()
        };
        loop {
            let page = self.list(&q).await?;
            let mut checks = futures::stream::iter(page.runs.iter().map(|r| r.run_id.clone()))
                .map(|id| async move {
                    let got = self.check_run(&id).await;
                    (id, got)
                })
                .buffered(concurrency.max(1));
            while let Some((id, got)) = checks.next().await {
                report.checked += 1;
                match got {
                    Ok(c) if !c.ok => report.failed.push(c),
                    Ok(c) if c.legacy => report.legacy.push(id.clone()),
                    Ok(_) | Err(StoreError::NotFound(_)) => {}
                    Err(e) => report.failed.push(RunCheck {
                        run_id: id.clone(),
                        ok: false,
                        legacy: false,
                        reason: Some(e.to_string()),
                    }),
                }
                report.last = Some(id);
            }
            progress(&report);
            match page.next_cursor {
                Some(c) => q.cursor = Some(c),
                None => return Ok(report),
            }
        }
    }

    /// Removes a run's whole history (retention). Returns how many revisions went.
    pub async fn remove_history(&self, id: &RunId) -> Result<usize, StoreError> {
        let revs = self.revisions(id).await?;
        for r in &revs {
            let key = self.history_key(id, *r);
            match self.store.delete(&key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.os_err(e, &format!("delete {key}"))),
            }
        }
        if let Some(local) = &self.local {
            local.prune_empty_dirs(&self.history_key(id, 0), &self.key("history"));
        }
        Ok(revs.len())
    }

    /// Writes a revision as it is (import), signed when a key is configured: create-if-absent,
    /// an identical one is fine.
    pub async fn put_revision(&self, rev: &Revision) -> Result<(), StoreError> {
        let mut rev = rev.clone();
        self.signing.sign(&mut rev)?;
        match self.claim(&rev).await? {
            Claim::Ours => Ok(()),
            _ => Err(StoreError::Rejected(
                crate::domain::error::Rejection::conflict(format!(
                    "run {} already has a different revision {} in its history",
                    rev.run_id, rev.revision
                )),
            )),
        }
    }
}

/// For a record about to replace `current`: links it to `current` (its hash) and returns it.
pub(super) fn link(record: &mut StoredRecord, current: Option<&StoredRecord>) {
    record.set_prev_sha256(current.map(|c| Sha256Hex::from_computed(record_sha256(c))));
}
