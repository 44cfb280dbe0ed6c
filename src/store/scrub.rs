//! The background scrub of `serve`: every run checked again and again at a configured pace,
//! as `verify --all` checks them once ([`RunStore::check_run`]: content hashes, blobs, the hash
//! chain and its signatures), so that a record or revision changed behind the worker's back is
//! found without anyone asking.
//!
//! The scrub walks the index in run id order, one run per tick of `1 / rate` seconds, and
//! starts again `every` after a pass ends. What it finds goes to a [`ScrubObserver`] (the
//! transport's metrics) and to the log: each broken run at error level, with its reason. Its
//! position outlives a restart of the task (the supervisor's), not of the process: a new
//! process starts a new pass.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

use super::history::RunCheck;
use super::{ListQuery, MAX_PAGE, Order, RunStore, StoreError};
use crate::domain::ids::RunId;

/// The highest pace accepted: faster than this is a full `verify --all`, not a scrub.
pub const MAX_RATE: f64 = 10_000.0;

/// How fast and how often the store is scrubbed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScrubSchedule {
    /// Runs checked per second.
    pub rate: f64,
    /// Pause between the end of a pass and the start of the next.
    pub every: Duration,
}

impl ScrubSchedule {
    /// Checks a pace (`scrub_rate`): above zero, at most [`MAX_RATE`].
    pub fn new(rate: f64, every: Duration) -> Result<Self, String> {
        if !rate.is_finite() || rate <= 0.0 || rate > MAX_RATE {
            return Err(format!(
                "{rate} runs per second is not above 0 and at most {MAX_RATE}"
            ));
        }
        Ok(Self { rate, every })
    }

    fn tick(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.rate)
    }
}

/// Hears what the scrub finds (implemented by the transport's metrics).
pub trait ScrubObserver: Send + Sync {
    /// One run was checked.
    fn checked(&self, check: &RunCheck);
    /// A pass ended: `checked` runs, of which `broken` failed.
    fn pass_done(&self, checked: u64, broken: u64);
}

/// Where a scrub is in its pass; kept by the caller so that a restarted task resumes.
#[derive(Debug, Default)]
pub struct ScrubPosition {
    inner: Mutex<PassState>,
}

#[derive(Debug, Default, Clone)]
struct PassState {
    after: Option<RunId>,
    checked: u64,
    broken: u64,
}

impl ScrubPosition {
    /// A scrub at the start of a pass.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn get(&self) -> PassState {
        self.inner.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn set(&self, state: PassState) {
        if let Ok(mut s) = self.inner.lock() {
            *s = state;
        }
    }
}

/// Scrubs `store` on `schedule` until `stop` turns true (or its sender is dropped). Returns
/// `Err` only when the index cannot be read (the supervisor restarts the task, which resumes
/// where it was).
pub async fn scrub_loop(
    store: RunStore,
    schedule: ScrubSchedule,
    position: Arc<ScrubPosition>,
    observer: Arc<dyn ScrubObserver>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), StoreError> {
    let mut ticks = tokio::time::interval(schedule.tick());
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let mut state = position.get();
        if state.after.is_none() {
            tracing::info!(rate = schedule.rate, "scrub pass starting");
        }
        let q = ListQuery {
            limit: Some(MAX_PAGE),
            order: Some(Order::Id),
            cursor: state.after.as_ref().map(ToString::to_string),
            ..Default::default()
        };
        let page = store.list(&q).await?;
        for summary in &page.runs {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = stop.wait_for(|s| *s) => return Ok(()),
            }
            let id = &summary.run_id;
            let checked = match store.check_run(id).await {
                // A record or revision that no longer decodes is a finding, not an outage.
                Err(e @ StoreError::Corrupt { .. }) => Ok(RunCheck {
                    run_id: id.clone(),
                    ok: false,
                    legacy: false,
                    reason: Some(e.to_string()),
                }),
                other => other,
            };
            match checked {
                Ok(check) => {
                    state.checked += 1;
                    if !check.ok {
                        state.broken += 1;
                        tracing::error!(run_id = %id, reason = check.reason.as_deref().unwrap_or("?"),
                            "scrub: run fails verification");
                    }
                    observer.checked(&check);
                }
                // Deleted or retained away since the page was listed.
                Err(StoreError::NotFound(_)) => {}
                // Not a verdict on the run: the store could not be read. Said, and the pass
                // goes on (the run is checked again next pass).
                Err(e) => tracing::warn!(run_id = %id, error = %e, "scrub: could not check run"),
            }
            state.after = Some(id.clone());
            position.set(state.clone());
        }
        if page.next_cursor.is_some() && !page.runs.is_empty() {
            continue;
        }
        tracing::info!(
            checked = state.checked,
            broken = state.broken,
            "scrub pass done"
        );
        observer.pass_done(state.checked, state.broken);
        position.set(PassState::default());
        tokio::select! {
            _ = tokio::time::sleep(schedule.every) => {}
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
    }
}
