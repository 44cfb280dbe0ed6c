//! The supervisor of `serve`'s long-running tasks (ingest, the request handlers, retention, scrub).
//!
//! A task that ends or panics while the worker is not stopping is noticed at once: the
//! [`TaskBoard`] marks it down, which `/readyz` reports, and it is started again after a
//! backoff (1 s doubling to 30 s, [`backon`]). A task that fails `max_failures` times in a row
//! (a run of at least [`HEALTHY_AFTER`] starts the count again) makes the supervisor give up:
//! `serve` then exits non-zero so that systemd or Kubernetes restarts the whole process.
//!
//! [`FaultHook`] is a test-only hook, off unless `RMOS_TEST_FAULTS=1` is set in the worker's
//! environment: it lets the integration tests make a named task panic, end or hang, to prove
//! the above from outside. Never set it in production.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::StreamExt;
use tokio::sync::{Notify, watch};

use crate::transport::metrics::Metrics;

/// A task that has run this long counts as healthy: its failure count starts again.
pub const HEALTHY_AFTER: Duration = Duration::from_secs(60);

/// A boxed task future; `Err` carries the reason it stopped.
pub type TaskFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// The state of every supervised task, read by `/readyz`.
#[derive(Debug, Default)]
pub struct TaskBoard {
    down: Mutex<BTreeMap<&'static str, String>>,
}

impl TaskBoard {
    /// An empty board.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn set_down(&self, task: &'static str, why: String) {
        if let Ok(mut m) = self.down.lock() {
            m.insert(task, why);
        }
    }

    fn set_running(&self, task: &'static str) {
        if let Ok(mut m) = self.down.lock() {
            m.remove(task);
        }
    }

    /// One line per task that is not running; empty when all run.
    pub fn not_ready(&self) -> Vec<String> {
        match self.down.lock() {
            Ok(m) => m
                .iter()
                .map(|(t, why)| format!("task {t}: {why}"))
                .collect(),
            Err(_) => vec!["tasks: state unavailable".to_owned()],
        }
    }
}

/// Why the supervisor gave up on a task.
#[derive(Debug, thiserror::Error)]
#[error("task {task} failed {failures} times in a row; last: {reason}")]
pub struct GaveUp {
    /// The task.
    pub task: &'static str,
    /// Its consecutive failures.
    pub failures: u32,
    /// The last reason.
    pub reason: String,
}

/// Supervision settings shared by every task.
#[derive(Clone)]
pub struct Supervisor {
    /// Where task states are shown.
    pub board: Arc<TaskBoard>,
    /// `rmos_task_restarts_total`.
    pub metrics: Arc<Metrics>,
    /// Turns true when the worker stops.
    pub shutdown: watch::Receiver<bool>,
    /// Consecutive failures before giving up.
    pub max_failures: u32,
    /// The test-only fault hook, when enabled.
    pub faults: Option<Arc<FaultHook>>,
}

impl Supervisor {
    /// Runs `make()`'s task until the worker stops, restarting it as described in the module
    /// documentation. `Err` when it gave up.
    pub async fn supervise(
        &self,
        task: &'static str,
        make: impl Fn() -> TaskFuture,
    ) -> Result<(), GaveUp> {
        let delays = || {
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_secs(1))
                .with_max_delay(Duration::from_secs(30))
                .with_jitter()
                .without_max_times()
                .build()
        };
        let mut backoff = delays();
        let mut failures = 0u32;
        let mut shutdown = self.shutdown.clone();
        loop {
            self.board.set_running(task);
            let started = Instant::now();
            let fut = make();
            let faults = self.faults.clone();
            let result = tokio::spawn(async move {
                match faults {
                    Some(hook) => hook.guard(task, fut).await,
                    None => fut.await,
                }
            })
            .await;
            if *shutdown.borrow() {
                return Ok(());
            }
            let reason = match result {
                Ok(Ok(())) => "ended".to_owned(),
                Ok(Err(e)) => format!("failed: {e}"),
                Err(e) if e.is_panic() => format!("panicked: {}", panic_text(e.into_panic())),
                Err(e) => format!("cancelled: {e}"),
            };
            if started.elapsed() >= HEALTHY_AFTER {
                failures = 0;
                backoff = delays();
            }
            failures += 1;
            self.metrics.task_restarted(task);
            if failures >= self.max_failures {
                let why = format!("{reason}; gave up after {failures} failures in a row");
                self.board.set_down(task, why);
                tracing::error!(task, failures, %reason, "task keeps failing; giving up");
                return Err(GaveUp {
                    task,
                    failures,
                    reason,
                });
            }
            let delay = backoff.next().unwrap_or(Duration::from_secs(30));
            self.board.set_down(
                task,
                format!(
                    "{reason}; restarting in {}ms (failure {failures} of {})",
                    delay.as_millis(),
                    self.max_failures
                ),
            );
            tracing::error!(task, failures, %reason, ?delay, "task stopped; restarting");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.wait_for(|s| *s) => return Ok(()),
            }
        }
    }
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}

/// A fault the test-only hook can stage in a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The task panics.
    Panic,
    /// The task returns as if its work had ended.
    End,
    /// The task stops working but neither ends nor panics (it hangs).
    Hang,
}

/// Test-only: stages [`Fault`]s in supervised tasks on request. Enabled by
/// `RMOS_TEST_FAULTS=1`; it then answers requests on `<prefix>._test.fault` whose body is
/// `<fault> <task>` (`panic ingest`, `end requests`, `hang ingest`, ...) with `ok`, and the
/// named task's current run suffers the fault at once. Each request stages one fault; a
/// task restarted afterwards runs normally.
#[derive(Debug, Default)]
pub struct FaultHook {
    staged: Mutex<BTreeMap<String, Fault>>,
    changed: Notify,
}

/// The environment variable that enables the hook.
pub const FAULTS_ENV: &str = "RMOS_TEST_FAULTS";

impl FaultHook {
    /// The hook when `RMOS_TEST_FAULTS=1`, listening on `<prefix>._test.fault`.
    pub async fn from_env(
        client: &async_nats::Client,
        prefix: &str,
    ) -> Result<Option<Arc<Self>>, String> {
        if std::env::var(FAULTS_ENV).as_deref() != Ok("1") {
            return Ok(None);
        }
        let subject = format!("{prefix}._test.fault");
        let mut sub = client
            .subscribe(subject.clone())
            .await
            .map_err(|e| format!("{subject}: {e}"))?;
        tracing::warn!(%subject, "{FAULTS_ENV}=1: the test-only fault hook is enabled");
        let hook = Arc::new(Self::default());
        let this = hook.clone();
        let client = client.clone();
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let text = String::from_utf8_lossy(&msg.payload).into_owned();
                let answer = match this.stage(&text) {
                    Ok(()) => "ok".to_owned(),
                    Err(e) => e,
                };
                if let Some(reply) = msg.reply {
                    let _ = client.publish(reply, answer.into()).await;
                }
            }
        });
        Ok(Some(hook))
    }

    /// Stages `<fault> <task>`.
    pub fn stage(&self, text: &str) -> Result<(), String> {
        let mut words = text.split_whitespace();
        let fault = match words.next() {
            Some("panic") => Fault::Panic,
            Some("end") => Fault::End,
            Some("hang") => Fault::Hang,
            _ => return Err(format!("unknown fault {text:?}: use panic|end|hang <task>")),
        };
        let task = words
            .next()
            .ok_or_else(|| "name the task".to_owned())?
            .to_owned();
        self.staged
            .lock()
            .map_err(|_| "fault hook poisoned".to_owned())?
            .insert(task, fault);
        self.changed.notify_waiters();
        Ok(())
    }

    async fn next_fault(&self, task: &str) -> Fault {
        loop {
            // Registered before the check, so a fault staged in between is not missed.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(f) = self.staged.lock().ok().and_then(|mut m| m.remove(task)) {
                return f;
            }
            changed.await;
        }
    }

    /// Runs `fut` until it finishes or a fault is staged for `task`.
    async fn guard(&self, task: &'static str, fut: TaskFuture) -> Result<(), String> {
        tokio::select! {
            r = fut => r,
            fault = self.next_fault(task) => match fault {
                Fault::Panic => panic!("test fault: {task} panics"),
                Fault::End => Ok(()),
                Fault::Hang => futures::future::pending().await,
            },
        }
    }
}
