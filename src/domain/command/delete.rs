//! `delete`: replace a run by a tombstone, releasing its blobs.

use serde::Deserialize;

use super::{Context, Decision, EventKind, live};
use crate::domain::artifact::{SCHEMA_VERSION, StoredRecord, Tombstone};
use crate::domain::error::Rejection;
use crate::domain::ids::RunId;

/// A decoded delete command.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteRun {
    /// The run to delete.
    pub run_id: RunId,
    /// Why (`retention`, an operator's note).
    pub reason: String,
}

impl DeleteRun {
    /// Decides the deletion against what is stored. Deleting a deleted run is a no-op.
    pub fn decide(
        &self,
        current: Option<&StoredRecord>,
        ctx: &Context,
    ) -> Result<Decision, Rejection> {
        if let Some(StoredRecord::Deleted(_)) = current {
            return Ok(Decision::Unchanged {
                event: EventKind::Deleted,
            });
        }
        if self.reason.trim().is_empty() {
            return Err(Rejection::invalid("delete needs a non-empty reason"));
        }
        let artifact = live(current, &self.run_id)?;
        let released: Vec<_> = artifact
            .blob_refs()
            .into_iter()
            .map(|b| b.sha256.clone())
            .collect();
        Ok(Decision::Write {
            record: StoredRecord::Deleted(Tombstone {
                tombstone: true,
                schema_version: SCHEMA_VERSION,
                run_id: self.run_id.clone(),
                revision: artifact.revision + 1,
                created_at_utc: artifact.created_at_utc,
                deleted_at_utc: ctx.now,
                reason: self.reason.clone(),
                request_id: Some(ctx.request_id.to_string()),
                source_sha256: artifact.source_sha256.clone(),
                blobs: released.clone(),
                prev_sha256: None,
            }),
            blobs: Vec::new(),
            event: EventKind::Deleted,
            released,
        })
    }
}
