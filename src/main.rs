//! `rmos-runs`: the worker (`serve`) and the operator CLI (clients of the NATS API).
//! This file only parses the command line and wires the layers together.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

mod cli;

use anyhow::anyhow;
use backon::{ExponentialBuilder, Retryable};
use clap::{Parser, Subcommand};
use futures::StreamExt;
use rmos_runs::config::{Config, IngestMode, Overrides};
use rmos_runs::domain::command::CommandKind;
use rmos_runs::store::history::Signing;
use rmos_runs::store::journal;
use rmos_runs::store::maintenance::{self, GcOptions, RetentionSchedule, TransferOptions};
use rmos_runs::store::scrub::{self, ScrubObserver, ScrubPosition};
use rmos_runs::store::{RunStore, StoreUrl};
use rmos_runs::supervisor::{FaultHook, Supervisor, TaskBoard, TaskFuture};
use rmos_runs::transport::api::Api;
use rmos_runs::transport::claim_check::Staging;
use rmos_runs::transport::health::{Health, JetStreamCheck};
use rmos_runs::transport::http::auth::Auth;
use rmos_runs::transport::http::{self, AppState, HttpSettings};
use rmos_runs::transport::ingest::{Ingest, IngestSettings};
use rmos_runs::transport::metrics::Metrics;
use rmos_runs::transport::outcomes::Commander;
use rmos_runs::transport::reads::Reads;
use rmos_runs::transport::{Subjects, connect};
use tokio::sync::watch;

#[derive(Parser)]
#[command(
    name = "rmos-runs",
    version,
    about = "Persistent, tamper-evident record of CNC manufacturing runs"
)]
struct Cli {
    #[command(flatten)]
    settings: Overrides,
    /// Print machine-readable JSON instead of human output.
    #[arg(long, global = true)]
    json: bool,
    /// How long a client command waits for its answer.
    #[arg(long, global = true, default_value = "30s")]
    timeout: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the worker.
    Serve,
    /// Print the effective configuration (secrets masked).
    Config,
    /// Show a run.
    Get {
        /// Run id.
        run_id: String,
        /// Put large outputs back inline.
        #[arg(long)]
        include_outputs: bool,
        /// A past revision (the record as that revision stored it).
        #[arg(long)]
        revision: Option<u64>,
        /// Write one output body (gcode or opplan) to stdout, exactly as stored, instead.
        #[arg(long, value_parser = ["gcode", "opplan"])]
        output: Option<String>,
    },
    /// Show a run's revisions, oldest first.
    History {
        /// Run id.
        run_id: String,
        /// Revisions per page (default 100).
        #[arg(long)]
        limit: Option<usize>,
        /// Continue from a previous page's cursor.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Show what changed between two revisions of a run (default: the last change), or
    /// between the latest revisions of two runs (--a, --b).
    Diff {
        /// Run id (two revisions of it).
        #[arg(conflicts_with_all = ["a", "b"], required_unless_present_all = ["a", "b"])]
        run_id: Option<String>,
        /// The older revision (default: the one before --to).
        #[arg(long)]
        from: Option<u64>,
        /// The newer revision (default: the latest).
        #[arg(long)]
        to: Option<u64>,
        /// First run.
        #[arg(long, requires = "b")]
        a: Option<String>,
        /// Second run.
        #[arg(long, requires = "a")]
        b: Option<String>,
    },
    /// List runs (newest first unless told otherwise).
    List {
        /// Page size (with --all: runs fetched per request, default 1000).
        #[arg(long)]
        limit: Option<usize>,
        /// Oldest first.
        #[arg(long, conflicts_with_all = ["newest", "order"])]
        oldest: bool,
        /// Newest first (the default).
        #[arg(long, conflicts_with = "order")]
        newest: bool,
        /// Order: newest, oldest or id.
        #[arg(long, value_parser = ["newest", "oldest", "id"])]
        order: Option<String>,
        /// Only this risk level (GREEN, YELLOW, RED, UNKNOWN, ERROR).
        #[arg(long)]
        risk_level: Option<String>,
        /// Only this explanation status (NONE, PENDING, READY, ERROR).
        #[arg(long)]
        explanation_status: Option<String>,
        /// Every page, one run summary per line (JSON lines), for exports.
        #[arg(long, conflicts_with = "cursor")]
        all: bool,
        /// Continue from a previous page's cursor.
        #[arg(long)]
        cursor: Option<String>,
        /// Only this mode.
        #[arg(long)]
        mode: Option<String>,
        /// Only this tool.
        #[arg(long)]
        tool_id: Option<String>,
        /// Only this status.
        #[arg(long)]
        status: Option<String>,
        /// Created at or after (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Created before (RFC 3339).
        #[arg(long)]
        until: Option<String>,
    },
    /// Recompute a run's hashes and check its history's hash chain (exit 5 when anything
    /// fails).
    Verify {
        /// Run id.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        run_id: Option<String>,
        /// Sweep every live run, directly on the configured store (in run id order, from the
        /// index): list every one that fails, with its reason; exit 5 if any does.
        #[arg(long)]
        all: bool,
        /// With --all: start after this run (resume an interrupted sweep).
        #[arg(long, requires = "all")]
        after: Option<String>,
        /// With --all: runs checked at once.
        #[arg(long, default_value_t = 8, requires = "all")]
        concurrency: usize,
    },
    /// Publish a create command (JSON from --file or stdin) and wait for its outcome.
    Create(PayloadArgs),
    /// Publish a patch_meta command and wait for its outcome.
    PatchMeta(PayloadArgs),
    /// Publish an advisory command and wait for its outcome.
    AttachAdvisory(PayloadArgs),
    /// Delete a run (leaves a tombstone).
    Delete {
        /// Run id.
        run_id: String,
        /// Why.
        #[arg(long, default_value = "operator")]
        reason: String,
    },
    /// Delete runs older than an age (retention), directly on the configured store.
    Gc {
        /// Age, e.g. 90d (default: the configured `retention`; at least 1h).
        #[arg(long)]
        older_than: Option<String>,
        /// Only report what would be deleted.
        #[arg(long)]
        dry_run: bool,
        /// Read every record instead of taking the runs created before the cutoff from the
        /// index (also counts tombstones and reports corrupt records).
        #[arg(long)]
        full_scan: bool,
    },
    /// Copy the configured store to another store (incremental, verified, resumable).
    Backup {
        /// Destination: file:///abs/dir or s3://bucket[/prefix].
        #[arg(long)]
        to: String,
        /// Replace destination objects that differ instead of reporting conflicts.
        #[arg(long)]
        overwrite: bool,
    },
    /// Copy another store into the configured store (a backup in the other direction).
    Restore {
        /// Source: file:///abs/dir or s3://bucket[/prefix].
        #[arg(long)]
        from: String,
        /// Replace objects that differ instead of reporting conflicts.
        #[arg(long)]
        overwrite: bool,
    },
    /// Rebuild the listing index from the records (online, idempotent), or check it.
    Reindex {
        /// Only report drift between the index and the records (exit 1 when there is any).
        #[arg(long)]
        check: bool,
    },
    /// Import a JSON data directory of the original FastAPI service.
    Import {
        /// The directory of <run_id>.json files.
        #[arg(long)]
        from_dir: std::path::PathBuf,
    },
}

#[derive(clap::Args)]
struct PayloadArgs {
    /// JSON payload file ("-" or absent: stdin).
    #[arg(long)]
    file: Option<String>,
    /// Publisher idempotency key (Nats-Msg-Id).
    #[arg(long)]
    msg_id: Option<String>,
}

/// Exit codes a script can tell apart.
const EXIT_NOT_FOUND: u8 = 2;
const EXIT_REJECTED: u8 = 3;
const EXIT_UNREACHABLE: u8 = 4;
const EXIT_VERIFY_FAILED: u8 = 5;

struct Failure {
    code: u8,
    message: String,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure {
            code: 1,
            message: format!("{:#}", e.into()),
        }
    }
}

fn main() -> ExitCode {
    // Both rustls crypto providers are in the dependency tree (ring: async-nats; aws-lc-rs: the
    // S3 client), so rustls cannot pick one itself: choose before the first TLS connection.
    let _ = async_nats::rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("rmos-runs: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("rmos-runs: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let cfg = Config::resolve(&cli.settings)?;
    let timeout = rmos_runs::config::parse_duration("timeout", &cli.timeout)?;
    match cli.command {
        Cmd::Serve => serve(cfg).await,
        Cmd::Config => {
            print_config(&cfg);
            Ok(())
        }
        Cmd::Get {
            run_id,
            output: Some(output),
            ..
        } => cli::get_output(&cfg, &run_id, &output, timeout).await,
        Cmd::Get {
            run_id,
            include_outputs,
            revision,
            output: None,
        } => {
            let mut body =
                serde_json::json!({"run_id": run_id, "include_outputs": include_outputs});
            if let Some(r) = revision {
                body["revision"] = r.into();
            }
            cli::request(&cfg, "get", body.to_string(), timeout, cli.json).await
        }
        Cmd::History {
            run_id,
            limit,
            cursor,
        } => {
            let mut body = serde_json::json!({"run_id": run_id});
            if let Some(l) = limit {
                body["limit"] = l.into();
            }
            if let Some(c) = cursor {
                body["cursor"] = c.into();
            }
            cli::history(&cfg, body.to_string(), timeout, cli.json).await
        }
        Cmd::Diff {
            run_id,
            from,
            to,
            a,
            b,
        } => {
            let mut body = serde_json::Map::new();
            for (k, v) in [("run_id", run_id), ("a", a), ("b", b)] {
                if let Some(v) = v {
                    body.insert(k.into(), v.into());
                }
            }
            for (k, v) in [("from", from), ("to", to)] {
                if let Some(v) = v {
                    body.insert(k.into(), v.into());
                }
            }
            cli::diff(
                &cfg,
                serde_json::Value::Object(body).to_string(),
                timeout,
                cli.json,
            )
            .await
        }
        Cmd::List {
            limit,
            oldest,
            newest,
            order,
            risk_level,
            explanation_status,
            all,
            cursor,
            mode,
            tool_id,
            status,
            since,
            until,
        } => {
            let order = match (oldest, newest) {
                (true, _) => Some("oldest".to_owned()),
                (_, true) => Some("newest".to_owned()),
                _ => order,
            };
            let mut q = serde_json::Map::new();
            let mut put = |k: &str, v: Option<String>| {
                if let Some(v) = v {
                    q.insert(k.to_owned(), v.into());
                }
            };
            put("cursor", cursor);
            put("order", order);
            put("mode", mode);
            put("tool_id", tool_id);
            put("status", status);
            put("risk_level", risk_level);
            put("explanation_status", explanation_status);
            put("since", since);
            put("until", until);
            if all {
                q.insert("limit".into(), limit.unwrap_or(1000).into());
                cli::list_all(&cfg, q, timeout).await
            } else {
                if let Some(limit) = limit {
                    q.insert("limit".into(), limit.into());
                }
                cli::request(
                    &cfg,
                    "list",
                    serde_json::Value::Object(q).to_string(),
                    timeout,
                    cli.json,
                )
                .await
            }
        }
        Cmd::Verify {
            run_id: Some(run_id),
            ..
        } => cli::verify_run(&cfg, run_id, timeout, cli.json).await,
        Cmd::Verify {
            after, concurrency, ..
        } => {
            let store = open_store(&cfg.store_url, &cfg, false).await?;
            let after = after
                .map(|a| rmos_runs::domain::ids::RunId::parse(&a))
                .transpose()
                .map_err(|r| anyhow!("--after: {}", r.message))?;
            let r = store
                .sweep(after, concurrency, |r| {
                    if let Some(last) = &r.last {
                        eprintln!("verify --all: {} runs checked, through {last}", r.checked);
                    }
                })
                .await
                .map_err(|e| anyhow!(e))?;
            if cli.json {
                println!("{}", serde_json::to_string(&r).unwrap_or_default());
            } else {
                print!("{r}");
            }
            if r.failed.is_empty() {
                Ok(())
            } else {
                Err(Failure {
                    code: EXIT_VERIFY_FAILED,
                    message: format!("{} runs failed verification", r.failed.len()),
                })
            }
        }
        Cmd::Create(a) => {
            cli::publish_payload(&cfg, CommandKind::Create, a, timeout, cli.json).await
        }
        Cmd::PatchMeta(a) => {
            cli::publish_payload(&cfg, CommandKind::PatchMeta, a, timeout, cli.json).await
        }
        Cmd::AttachAdvisory(a) => {
            cli::publish_payload(&cfg, CommandKind::Advisory, a, timeout, cli.json).await
        }
        Cmd::Delete { run_id, reason } => {
            let body = serde_json::json!({"run_id": run_id, "reason": reason}).to_string();
            cli::publish(
                &cfg,
                CommandKind::Delete,
                body.into_bytes(),
                None,
                timeout,
                cli.json,
            )
            .await
        }
        Cmd::Gc {
            older_than,
            dry_run,
            full_scan,
        } => {
            let age = match older_than {
                Some(s) => rmos_runs::config::parse_duration("--older-than", &s)?,
                None => cfg
                    .retention
                    .ok_or_else(|| anyhow!("gc: give --older-than (e.g. 90d) or set retention"))?,
            };
            maintenance::check_retention(age).map_err(|e| anyhow!("--older-than: {e}"))?;
            let store = open_store(&cfg.store_url, &cfg, !dry_run).await?;
            let opts = GcOptions {
                full_scan,
                ..GcOptions::older_than(age, dry_run)
            };
            let r = maintenance::gc(&store, &opts, None).await?;
            cli::print_report(&r, r.ok(), cli.json, "gc")
        }
        Cmd::Backup { to, overwrite } => {
            let src = open_store(&cfg.store_url, &cfg, false).await?;
            let dst = open_store(&StoreUrl::parse(&to)?, &cfg, true).await?;
            let r = maintenance::transfer(&src, &dst, &TransferOptions { overwrite }).await?;
            cli::print_report(&r, r.ok(), cli.json, "backup")
        }
        Cmd::Restore { from, overwrite } => {
            let src = open_store(&StoreUrl::parse(&from)?, &cfg, false).await?;
            let dst = open_store(&cfg.store_url, &cfg, true).await?;
            let r = maintenance::transfer(&src, &dst, &TransferOptions { overwrite }).await?;
            cli::print_report(&r, r.ok(), cli.json, "restore")
        }
        Cmd::Reindex { check } => {
            let store = open_store(&cfg.store_url, &cfg, !check).await?;
            if check {
                let r = store.reindex(true).await.map_err(|e| anyhow!(e))?;
                return cli::print_report(&r, r.consistent(), cli.json, "reindex");
            }
            // A repair journals its changes as a worker's commands do (local store), so that
            // a worker's unfolded add of an entry the repair removes cannot bring it back at
            // the worker's next fold (across journals a removal wins); folded every second
            // as `serve` folds, so readers never hold more than a second of it.
            let store = store.with_index_journal().map_err(|e| anyhow!(e))?;
            let (stop, stopped) = watch::channel(false);
            let folds = tokio::spawn(fold_loop(store.clone(), stopped));
            let r = store.reindex(false).await;
            let _ = stop.send(true);
            folds
                .await
                .map_err(|e| anyhow!(e))?
                .map_err(|e| anyhow!(e))?;
            store.close_index_journal().await.map_err(|e| anyhow!(e))?;
            let r = r.map_err(|e| anyhow!(e))?;
            cli::print_report(&r, true, cli.json, "reindex")
        }
        Cmd::Import { from_dir } => {
            let store = open_store(&cfg.store_url, &cfg, true).await?;
            let r = maintenance::import_dir(&store, &from_dir).await?;
            cli::print_report(&r, r.ok(), cli.json, "import")
        }
    }
}

/// The revision signing key (from `signing_key`) and the trusted keys.
fn signing(cfg: &Config) -> Result<Signing, Failure> {
    let key = match &cfg.signing_key {
        Some(path) => Some(Signing::load_seed(path).map_err(|e| anyhow!(e))?),
        None => None,
    };
    Ok(Signing::new(key, cfg.trusted_keys.clone()))
}

/// Test-only: `RMOS_TEST_CRASH_AFTER_REVISION=<run_id>:<revision>` (with `RMOS_TEST_FAULTS=1`)
/// makes `serve` abort right after claiming that revision (`RunStore::crash_after_revision`).
fn test_crash_point(store: RunStore) -> Result<RunStore, Failure> {
    const VAR: &str = "RMOS_TEST_CRASH_AFTER_REVISION";
    if std::env::var(rmos_runs::supervisor::FAULTS_ENV).as_deref() != Ok("1") {
        return Ok(store);
    }
    let Ok(spec) = std::env::var(VAR) else {
        return Ok(store);
    };
    let bad = |why: String| anyhow!("{VAR}={spec:?}: {why}");
    let (run, rev) = spec
        .split_once(':')
        .ok_or_else(|| bad("expected <run_id>:<revision>".into()))?;
    let run = rmos_runs::domain::ids::RunId::parse(run).map_err(|e| bad(e.to_string()))?;
    let rev = rev.parse::<u64>().map_err(|e| bad(e.to_string()))?;
    tracing::warn!(%run, rev, "{VAR}: the worker aborts after claiming this revision");
    Ok(store.crash_after_revision(run, rev))
}

/// Runs a start-up step on the broker, retrying (250 ms doubling to 2 s) until
/// `connect_timeout` has passed since the step began: a cluster still forming answers "no
/// suitable peers" for a replicated stream for a moment, which must not stop the worker. The
/// last error is returned when the time is up.
async fn while_starting<T, E, F, Fut>(cfg: &Config, what: &str, step: F) -> Result<T, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let started = std::time::Instant::now();
    step.retry(
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(250))
            .with_max_delay(Duration::from_secs(2))
            .without_max_times(),
    )
    .adjust(|_, delay| delay.filter(|d| started.elapsed() + *d <= cfg.connect_timeout))
    .notify(|e, _| tracing::warn!(error = %e, "setting up {what} on the broker failed; retrying"))
    .await
}

/// Opens a store for the maintenance commands; probes it when they will write to it.
async fn open_store(url: &StoreUrl, cfg: &Config, write: bool) -> Result<RunStore, Failure> {
    let store = RunStore::open(url, &cfg.store_options())?.with_signing(signing(cfg)?);
    if write {
        store
            .probe()
            .await
            .map_err(|e| anyhow!("store {url}: {e}"))?;
    }
    Ok(store)
}

fn print_config(cfg: &Config) {
    let mask = |s: &Option<String>| s.as_ref().map(|_| "****".to_owned());
    let v = serde_json::json!({
        "nats_url": cfg.nats_urls.join(","),
        "nats_user": cfg.nats_user,
        "nats_password": mask(&cfg.nats_password),
        "nats_token": mask(&cfg.nats_token),
        "nats_creds": cfg.nats_creds,
        "nats_nkey": cfg.nats_nkey,
        "nats_ca": cfg.nats_ca, "nats_cert": cfg.nats_cert, "nats_key": cfg.nats_key,
        "store_url": cfg.store_url.to_string(),
        "subject_prefix": cfg.subject_prefix,
        "inbox_prefix": cfg.inbox_prefix,
        "ingest": match cfg.ingest { IngestMode::JetStream => "jetstream", IngestMode::Core => "core" },
        "stream": cfg.stream, "consumer": cfg.consumer,
        "concurrency": cfg.concurrency,
        "stream_replicas": cfg.stream_replicas,
        "stream_max_age_s": cfg.stream_max_age.as_secs(),
        "staging_bucket": cfg.staging_bucket,
        "staging_max_age_s": cfg.staging_max_age.as_secs(),
        "ack_wait_s": cfg.ack_wait.as_secs(),
        "max_deliver": cfg.max_deliver,
        "forget_acked_after_s": cfg.forget_acked_after.as_secs(),
        "limits": format!("{:?}", cfg.limits),
        "fsync": cfg.fsync,
        "s3_sse": cfg.s3_sse.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        "connect_timeout_s": cfg.connect_timeout.as_secs(),
        "metrics_addr": cfg.metrics_addr.as_deref().unwrap_or("off"),
        "retention_s": cfg.retention.map(|d| d.as_secs()),
        "scrub_rate": cfg.scrub.map(|s| s.rate),
        "scrub_every_s": cfg.scrub.map(|s| s.every.as_secs()),
        "stall_after_s": cfg.stall_after.as_secs(),
        "task_restarts": cfg.task_restarts,
        "signing_key": cfg.signing_key,
        "trusted_keys": cfg.trusted_keys,
        "aws_secret_access_key": std::env::var("AWS_SECRET_ACCESS_KEY").ok().map(|_| "****"),
    });
    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
}

async fn serve(cfg: Config) -> Result<(), Failure> {
    init_tracing(cfg.log_json);
    raise_open_files_limit();
    let store = test_crash_point(
        RunStore::open(&cfg.store_url, &cfg.store_options())?
            .with_signing(signing(&cfg)?)
            .with_index_journal()?,
    )?;
    store
        .probe()
        .await
        .map_err(|e| anyhow!("store {}: {e}", cfg.store_url))?;
    // Checked before the broker, so a store error is the first reported; built only once the
    // worker is ready, so a start-up that fails later leaves no build behind to report on.
    let build_index = index_build_needed(&store).await?;
    let client = connect::connect(&cfg, "rmos-runs worker")
        .await
        .map_err(|e| Failure {
            code: EXIT_UNREACHABLE,
            message: e.to_string(),
        })?;
    if cfg.ingest == IngestMode::JetStream
        && let Some(warning) = connect::server_version_warning(&client.server_info().version)
    {
        tracing::warn!("{warning}");
    }
    let subjects = Subjects::new(cfg.subject_prefix.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    let metrics = Metrics::new();
    let board = TaskBoard::new();

    // The staging bucket of claim-checked bodies (JetStream only: core brokers have none).
    let staging = if cfg.ingest == IngestMode::JetStream {
        let js = async_nats::jetstream::new(client.clone());
        Some(
            while_starting(&cfg, "the staging bucket", || {
                Staging::ensure(
                    &js,
                    &cfg.staging_bucket,
                    cfg.staging_max_age,
                    cfg.stream_replicas,
                )
            })
            .await
            .map_err(|e| anyhow!(e))?,
        )
    } else {
        None
    };
    let ingest = Ingest::new(
        client.clone(),
        store.clone(),
        subjects.clone(),
        IngestSettings {
            stream: cfg.stream.clone(),
            consumer: cfg.consumer.clone(),
            concurrency: cfg.concurrency,
            replicas: cfg.stream_replicas,
            max_age: cfg.stream_max_age,
            ack_wait: cfg.ack_wait,
            max_deliver: cfg.max_deliver,
            forget_acked_after: cfg.forget_acked_after,
            limits: cfg.limits.clone(),
            not_found_retries: 6,
            staging: staging.clone(),
        },
        metrics.clone(),
    );
    // Set up once here so that a broker without JetStream, or a stream that cannot be made,
    // stops start-up with its reason; the ingest task ensures them again on each start.
    if cfg.ingest == IngestMode::JetStream {
        while_starting(&cfg, "the stream and the consumer", || {
            ingest.ensure_stream()
        })
        .await?;
    }
    let health = Arc::new(Health::new(
        client.clone(),
        store.clone(),
        (cfg.ingest == IngestMode::JetStream).then(|| JetStreamCheck {
            stream: cfg.stream.clone(),
            consumer: cfg.consumer.clone(),
            progress: ingest.progress(),
            stall_after: cfg.stall_after,
        }),
        board.clone(),
    ));
    let http = start_http(
        &cfg,
        &client,
        &store,
        &metrics,
        health,
        staging.clone(),
        stop_rx.clone(),
    )
    .await?;
    let faults = FaultHook::from_env(&client, &cfg.subject_prefix)
        .await
        .map_err(|e| anyhow!("fault hook: {e}"))?;
    let supervisor = Supervisor {
        board,
        metrics: metrics.clone(),
        shutdown: stop_rx.clone(),
        max_failures: cfg.task_restarts,
        faults,
    };

    let api = Api::new(
        client.clone(),
        store.clone(),
        cfg.concurrency,
        metrics.clone(),
        staging.clone(),
    );
    let mode = cfg.ingest;
    let mut tasks: Vec<TaskFuture> = Vec::new();
    tasks.push(Box::pin({
        let supervisor = supervisor.clone();
        let stop = stop_rx.clone();
        async move {
            supervisor
                .supervise("ingest", || {
                    let ingest = ingest.clone();
                    let stop = stop.clone();
                    Box::pin(async move {
                        match mode {
                            IngestMode::JetStream => ingest.run_jetstream(stop).await,
                            IngestMode::Core => ingest.run_core(stop).await,
                        }
                        .map_err(|e| e.to_string())
                    })
                })
                .await
                .map_err(|e| e.to_string())
        }
    }));
    tasks.push(Box::pin({
        let supervisor = supervisor.clone();
        let stop = stop_rx.clone();
        async move {
            supervisor
                .supervise("requests", || {
                    Box::pin(api.clone().run(subjects.clone(), stop.clone()))
                })
                .await
                .map_err(|e| e.to_string())
        }
    }));
    if let Some(age) = cfg.retention {
        let supervisor = supervisor.clone();
        let stop = stop_rx.clone();
        let store = store.clone();
        tasks.push(Box::pin(async move {
            supervisor
                .supervise("retention", || {
                    let schedule = RetentionSchedule::hourly(age);
                    let (store, stop) = (store.clone(), stop.clone());
                    Box::pin(async move {
                        maintenance::retention_loop(store, schedule, stop).await;
                        Ok(())
                    })
                })
                .await
                .map_err(|e| e.to_string())
        }));
    }
    tasks.push(Box::pin({
        let supervisor = supervisor.clone();
        let stop = stop_rx.clone();
        let store = store.clone();
        async move {
            supervisor
                .supervise("index-fold", || {
                    let (store, stop) = (store.clone(), stop.clone());
                    Box::pin(async move { fold_loop(store, stop).await })
                })
                .await
                .map_err(|e| e.to_string())
        }
    }));
    if let Some(schedule) = cfg.scrub {
        let supervisor = supervisor.clone();
        let stop = stop_rx.clone();
        let store = store.clone();
        let position = ScrubPosition::new();
        let observer: Arc<dyn ScrubObserver> = metrics.clone();
        tasks.push(Box::pin(async move {
            supervisor
                .supervise("scrub", || {
                    let (store, stop) = (store.clone(), stop.clone());
                    let (position, observer) = (position.clone(), observer.clone());
                    Box::pin(async move {
                        scrub::scrub_loop(store, schedule, position, observer, stop)
                            .await
                            .map_err(|e| e.to_string())
                    })
                })
                .await
                .map_err(|e| e.to_string())
        }));
    }
    let mut tasks: futures::stream::FuturesUnordered<_> = tasks.into_iter().collect();
    let index_build = build_index.then(|| spawn_index_build(store.clone(), stop_rx.clone()));
    tracing::info!(store = %cfg.store_url, nats = %cfg.nats_urls.join(","), prefix = %cfg.subject_prefix, inbox = %cfg.inbox_prefix,
        ingest = ?cfg.ingest, "rmos-runs worker ready");

    let gave_up = tokio::select! {
        _ = shutdown_signal() => None,
        Some(Err(e)) = async {
            // The first supervisor that gives up; one that returns Ok only does so on shutdown.
            loop {
                match tasks.next().await {
                    Some(Ok(())) => continue,
                    other => return other,
                }
            }
        } => Some(e),
    };
    match &gave_up {
        None => tracing::info!(
            in_flight = metrics.in_flight(),
            "shutting down: finishing in-flight commands"
        ),
        Some(e) => tracing::error!(error = %e, "a task keeps failing; stopping the worker"),
    }
    let _ = stop_tx.send(true);
    while let Some(r) = tasks.next().await {
        if let Err(e) = r {
            tracing::error!(error = %e, "task stopped with an error");
        }
    }
    for task in http {
        let _ = task.await;
    }
    if let Some(build) = index_build {
        let _ = build.await;
    }
    client.flush().await.ok();
    client.drain().await.ok();
    // What the last commands journaled, into the trees (a process killed instead leaves it
    // to the next worker or `reindex`).
    if let Err(e) = store.fold_index_journal().await {
        tracing::error!(error = %e, "folding the index journal at shutdown failed");
    }
    if let Some(e) = gave_up {
        return Err(Failure {
            code: 1,
            message: e,
        });
    }
    tracing::info!("stopped");
    Ok(())
}

/// Folds the index journal into the trees every [`journal::FOLD_EVERY`] until shutdown.
async fn fold_loop(store: RunStore, mut stop: watch::Receiver<bool>) -> Result<(), String> {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(journal::FOLD_EVERY) => {}
            _ = stop.changed() => return Ok(()),
        }
        if *stop.borrow() {
            return Ok(());
        }
        match store.fold_index_journal().await {
            Ok(f) if f.files > 0 => {
                tracing::debug!(
                    files = f.files,
                    added = f.added,
                    removed = f.removed,
                    "folded the index journal"
                );
            }
            Ok(_) => {}
            Err(e) => return Err(format!("folding the index journal: {e}")),
        }
    }
}

/// The HTTP listeners: the API and web view on `http_addr`, the ops routes on `metrics_addr`.
async fn start_http(
    cfg: &Config,
    client: &async_nats::Client,
    store: &RunStore,
    metrics: &Arc<Metrics>,
    health: Arc<Health>,
    staging: Option<Staging>,
    stop: watch::Receiver<bool>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, Failure> {
    let commander = match cfg.http.addr {
        Some(_) => Some(
            Commander::start(
                client.clone(),
                Subjects::new(cfg.subject_prefix.clone()),
                cfg.ingest == IngestMode::JetStream,
            )
            .await
            .map_err(|e| anyhow!("http commands: {e}"))?,
        ),
        None => None,
    };
    let auth = Auth::new(cfg.http.credentials.clone());
    let state = Arc::new(AppState {
        reads: Reads::new(store.clone(), metrics.clone()),
        commander,
        auth: auth.clone(),
        metrics: metrics.clone(),
        health,
        command_timeout: cfg.http.command_timeout,
        // A command body goes out as one NATS message.
        max_body: cfg
            .limits
            .max_payload_bytes
            .min(client.server_info().max_payload),
        staging,
        max_staged_body: cfg.http.max_body_bytes,
        large_bodies: tokio::sync::Semaphore::new(http::LARGE_BODIES_AT_ONCE),
    });
    let mut tasks = Vec::new();
    let api = HttpSettings {
        key: "http_addr",
        addr: cfg.http.addr.clone(),
        required: cfg.http.addr_explicit,
        limits: cfg.http.limits.clone(),
    };
    if let Some((_, t)) = http::start(
        "http api",
        &api,
        http::app(state.clone()),
        |a| auth.check_bind(a),
        stop.clone(),
    )
    .await
    .map_err(|e| anyhow!(e))?
    {
        tasks.push(t);
    }
    let ops = HttpSettings {
        key: "metrics_addr",
        addr: cfg.metrics_addr.clone(),
        required: cfg.metrics_addr_explicit,
        limits: cfg.http.limits.clone(),
    };
    if let Some((_, t)) = http::start(
        "metrics endpoint",
        &ops,
        http::ops_app(state),
        |_| Ok(()),
        stop,
    )
    .await
    .map_err(|e| anyhow!(e))?
    {
        tasks.push(t);
    }
    Ok(tasks)
}

/// Raises the soft limit on open files to the hard one: HTTP connections and store files are
/// file descriptors, and the usual soft limit (1,024) is below what `http.max_connections`
/// allows.
fn raise_open_files_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::warn!("could not raise the open files limit");
            }
        }
    }
}

/// Whether the store needs its index built: one written before the index existed, the JSON
/// data directory of the original FastAPI service, a new store (whose build finds nothing and
/// ends at once), or one not yet flagged as having every live run's blob references marked
/// (until then deletes keep the blobs they would release).
async fn index_build_needed(store: &RunStore) -> Result<bool, Failure> {
    let complete = async {
        Ok::<bool, rmos_runs::store::StoreError>(
            store.index_complete().await? && store.blob_refs_complete().await?,
        )
    };
    Ok(!complete
        .await
        .map_err(|e| anyhow!("store {}: {e}", store.url()))?)
}

/// Builds the index (and marks blob references) in the background; listings say
/// `index_complete: false` until then. Stops at shutdown: a build is idempotent, and the
/// next start runs it again.
fn spawn_index_build(
    store: RunStore,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // A store with runs lists them partially until the build is done: worth a warning. A
        // new store has nothing to build; its index is marked complete at once.
        match store.holds_runs().await {
            Ok(false) => {
                tracing::info!(store = %store.url(), "new store: marking the listing index complete")
            }
            Ok(true) => {
                tracing::warn!(store = %store.url(), "the listing index is incomplete: building it")
            }
            Err(e) => tracing::warn!(
                store = %store.url(),
                error = %e,
                "the listing index is incomplete: building it"
            ),
        }
        tokio::select! {
            r = store.reindex(false) => match r {
                Ok(r) => tracing::info!(
                    records = r.records,
                    live = r.live,
                    written = r.missing,
                    removed = r.stale,
                    "listing index built"
                ),
                Err(e) => {
                    tracing::error!(error = %e, "building the listing index failed; run `rmos-runs reindex`")
                }
            },
            _ = stop.wait_for(|stopped| *stopped) => tracing::info!(
                "building the listing index stopped at shutdown; the next start builds it again"
            ),
        }
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => futures::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = futures::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
