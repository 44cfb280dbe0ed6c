//! Configuration: a TOML file (`--config` / `RMOS_CONFIG`) < environment < flags, resolved
//! once into [`Config`]. A bad value is a one-line error naming the key and what it accepts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::Deserialize;

use crate::store::{StoreError, StoreUrl};

/// How commands reach the worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IngestMode {
    /// Durable JetStream pull consumer (default).
    JetStream,
    /// Core NATS queue subscriptions (no durability while no worker runs).
    Core,
}

/// Settings given on the command line or in the environment (flags win over environment).
#[derive(Args, Clone, Debug, Default)]
pub struct Overrides {
    /// TOML configuration file.
    #[arg(long = "config", env = "RMOS_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// NATS URL(s), comma-separated.
    #[arg(long, env = "NATS_URL", global = true)]
    pub nats_url: Option<String>,
    /// NATS user.
    #[arg(long, env = "NATS_USER", global = true, hide_env_values = true)]
    pub nats_user: Option<String>,
    /// NATS password.
    #[arg(long, env = "NATS_PASSWORD", global = true, hide_env_values = true)]
    pub nats_password: Option<String>,
    /// NATS token.
    #[arg(long, env = "NATS_TOKEN", global = true, hide_env_values = true)]
    pub nats_token: Option<String>,
    /// NATS credentials file (JWT + seed).
    #[arg(long, env = "NATS_CREDS", global = true)]
    pub nats_creds: Option<PathBuf>,
    /// NATS nkey seed file.
    #[arg(long, env = "NATS_NKEY", global = true)]
    pub nats_nkey: Option<PathBuf>,
    /// CA bundle for the broker's TLS certificate.
    /// nkey seed file whose key signs every revision's hash (history); off when unset.
    #[arg(long, env = "RMOS_SIGNING_KEY", global = true)]
    pub signing_key: Option<PathBuf>,
    #[arg(long, env = "NATS_CA", global = true)]
    pub nats_ca: Option<PathBuf>,
    /// Client certificate for TLS.
    #[arg(long, env = "NATS_CERT", global = true)]
    pub nats_cert: Option<PathBuf>,
    /// Client key for TLS.
    #[arg(long, env = "NATS_KEY", global = true)]
    pub nats_key: Option<PathBuf>,
    /// Store URL: file:///abs/dir or s3://bucket[/prefix].
    #[arg(long, env = "RMOS_STORE_URL", global = true)]
    pub store_url: Option<String>,
    /// Local directory used when no store URL is set.
    #[arg(long, env = "RMOS_RUNS_DIR", global = true)]
    pub runs_dir: Option<PathBuf>,
    /// Subject prefix.
    #[arg(long, env = "RMOS_SUBJECT_PREFIX", global = true)]
    pub subject_prefix: Option<String>,
    /// Inbox prefix for replies and PubAcks (default `_INBOX.<NATS_USER>`, else `_INBOX`).
    #[arg(long, env = "RMOS_INBOX_PREFIX", global = true)]
    pub inbox_prefix: Option<String>,
    /// Ingest mode: jetstream or core.
    #[arg(long, env = "RMOS_INGEST", global = true)]
    pub ingest: Option<String>,
    /// JetStream stream name.
    #[arg(long, env = "RMOS_STREAM", global = true)]
    pub stream: Option<String>,
    /// JetStream Object Store bucket of claim-checked bodies (created by the worker).
    #[arg(long, env = "RMOS_STAGING_BUCKET", global = true)]
    pub staging_bucket: Option<String>,
    /// Durable consumer name.
    #[arg(long, env = "RMOS_CONSUMER", global = true)]
    pub consumer: Option<String>,
    /// Commands processed at once.
    #[arg(long, env = "RMOS_CONCURRENCY", global = true)]
    pub concurrency: Option<usize>,
    /// Log format: pretty or json.
    #[arg(long, env = "RMOS_LOG_FORMAT", global = true)]
    pub log_format: Option<String>,
    /// Metrics and health endpoint, host:port ("off" or empty: none).
    #[arg(long, env = "RMOS_METRICS_ADDR", global = true)]
    pub metrics_addr: Option<String>,
    /// HTTP API and web view, host:port (default 127.0.0.1:8000; "off": none).
    #[arg(long, env = "RMOS_HTTP_ADDR", global = true)]
    pub http_addr: Option<String>,
}

/// The TOML file's shape (every key optional; see `config/rmos-runs.toml`).
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    nats_url: Option<String>,
    nats_user: Option<String>,
    nats_password: Option<String>,
    nats_token: Option<String>,
    nats_creds: Option<PathBuf>,
    nats_nkey: Option<PathBuf>,
    nats_ca: Option<PathBuf>,
    nats_cert: Option<PathBuf>,
    nats_key: Option<PathBuf>,
    store_url: Option<String>,
    runs_dir: Option<PathBuf>,
    subject_prefix: Option<String>,
    inbox_prefix: Option<String>,
    ingest: Option<String>,
    stream: Option<String>,
    consumer: Option<String>,
    concurrency: Option<usize>,
    log_format: Option<String>,
    metrics_addr: Option<String>,
    http_addr: Option<String>,
    http: Option<HttpFile>,
    stream_replicas: Option<usize>,
    stream_max_age: Option<String>,
    staging_bucket: Option<String>,
    staging_max_age: Option<String>,
    ack_wait: Option<String>,
    max_deliver: Option<i64>,
    forget_acked_after: Option<String>,
    blob_threshold: Option<usize>,
    max_payload_bytes: Option<usize>,
    max_json_depth: Option<usize>,
    max_meta_keys: Option<usize>,
    max_meta_bytes: Option<usize>,
    max_advisory_body_bytes: Option<usize>,
    max_advisories: Option<usize>,
    fsync: Option<bool>,
    s3_sse: Option<String>,
    s3_sse_kms_key_id: Option<String>,
    s3_sse_bucket_key: Option<bool>,
    connect_timeout: Option<String>,
    retention: Option<String>,
    scrub_rate: Option<f64>,
    scrub_every: Option<String>,
    stall_after: Option<String>,
    task_restarts: Option<u32>,
    signing_key: Option<PathBuf>,
    trusted_keys: Option<Vec<String>>,
}

/// The `[http]` table.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct HttpFile {
    command_timeout: Option<String>,
    max_body_bytes: Option<usize>,
    header_timeout: Option<String>,
    idle_timeout: Option<String>,
    max_connections: Option<usize>,
    max_connections_per_client: Option<usize>,
    #[serde(default)]
    credentials: Vec<crate::transport::http::auth::CredentialConfig>,
}

/// HTTP settings.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// The API and web view listen here (`None`: off).
    pub addr: Option<String>,
    /// `http_addr` was given (a bind failure then stops `serve`).
    pub addr_explicit: bool,
    /// How long an HTTP command waits for its outcome before answering 504.
    pub command_timeout: Duration,
    /// Largest create or advisory request body: one over the broker's `max_payload` is staged
    /// by claim check, and is held in memory once while it is (bodies of other commands go as
    /// one message and are limited by it).
    pub max_body_bytes: usize,
    /// Connection limits (both HTTP listeners).
    pub limits: crate::transport::http::server::ConnLimits,
    /// Credentials (none: open access, loopback only).
    pub credentials: Vec<crate::transport::http::auth::Credential>,
}

/// A configuration error: one line naming the key.
#[derive(Debug, thiserror::Error)]
#[error("config: {0}")]
pub struct ConfigError(pub String);

/// The effective configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Broker URLs.
    pub nats_urls: Vec<String>,
    /// Broker user.
    pub nats_user: Option<String>,
    /// Broker password.
    pub nats_password: Option<String>,
    /// Broker token.
    pub nats_token: Option<String>,
    /// Credentials file.
    pub nats_creds: Option<PathBuf>,
    /// Nkey seed file.
    pub nats_nkey: Option<PathBuf>,
    /// TLS CA bundle.
    pub nats_ca: Option<PathBuf>,
    /// TLS client certificate.
    pub nats_cert: Option<PathBuf>,
    /// TLS client key.
    pub nats_key: Option<PathBuf>,
    /// Where runs are stored.
    pub store_url: StoreUrl,
    /// Subject prefix (`rmos.runs`).
    pub subject_prefix: String,
    /// Prefix of this client's reply subjects (request replies, PubAcks, pulled messages); see
    /// [`default_inbox_prefix`].
    pub inbox_prefix: String,
    /// Ingest mode.
    pub ingest: IngestMode,
    /// Stream name.
    pub stream: String,
    /// Consumer name.
    pub consumer: String,
    /// Commands processed at once.
    pub concurrency: usize,
    /// `pretty` or `json`.
    pub log_json: bool,
    /// `/metrics`, `/healthz`, `/readyz` listen here (`None`: off).
    pub metrics_addr: Option<String>,
    /// `metrics_addr` was given (not the default): failing to bind it stops `serve`.
    pub metrics_addr_explicit: bool,
    /// The HTTP API.
    pub http: HttpConfig,
    /// Stream replicas (1, or 3 on a cluster).
    pub stream_replicas: usize,
    /// Stream max age (zero: keep until acked).
    pub stream_max_age: Duration,
    /// JetStream Object Store bucket for bodies too large for one message (claim checks).
    pub staging_bucket: String,
    /// Age after which an unclaimed staged body expires.
    pub staging_max_age: Duration,
    /// How long a delivered command may stay unacked before redelivery.
    pub ack_wait: Duration,
    /// Deliveries before the broker gives up on a message (-1: never).
    pub max_deliver: i64,
    /// How long after the consumer acknowledged a command a run still remembers its id.
    pub forget_acked_after: Duration,
    /// Domain limits (blob threshold, payload size, depth, meta, advisory body).
    pub limits: crate::domain::command::Limits,
    /// fsync local writes.
    pub fsync: bool,
    /// S3 server-side encryption settings, passed to `object_store` (`aws_server_side_encryption`,
    /// `aws_sse_kms_key_id`, `aws_sse_bucket_key_enabled`).
    pub s3_sse: Vec<(String, String)>,
    /// How long to keep trying to reach the broker at start-up.
    pub connect_timeout: Duration,
    /// `serve` deletes runs older than this, hourly (`None`: off, the default).
    pub retention: Option<Duration>,
    /// `serve` checks every run again in the background at this pace (`None`: off, the
    /// default).
    pub scrub: Option<crate::store::scrub::ScrubSchedule>,
    /// `/readyz` fails when ingest has consumed nothing for this long while the consumer has
    /// undelivered commands.
    pub stall_after: Duration,
    /// Consecutive failures of a supervised task after which `serve` exits non-zero.
    pub task_restarts: u32,
    /// nkey seed file signing every revision (`None`: revisions are not signed).
    pub signing_key: Option<PathBuf>,
    /// Public nkeys whose revision signatures `verify` accepts (besides the signing key's).
    pub trusted_keys: Vec<String>,
}

/// Parses `500ms`, `30s`, `2m`, `12h`, `90d` (a bare number is seconds).
pub fn parse_duration(key: &str, s: &str) -> Result<Duration, ConfigError> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        ConfigError(format!(
            "{key}: {s:?} is not a duration; use e.g. 500ms, 30s, 2m, 12h, 90d"
        ))
    })?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        "d" => Duration::from_secs(n * 86_400),
        _ => {
            return Err(ConfigError(format!(
                "{key}: unit {unit:?} not understood; use ms, s, m, h or d"
            )));
        }
    };
    Ok(d)
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| {
        ConfigError(format!(
            "{}: {}",
            path.display(),
            e.to_string().replace('\n', " ")
        ))
    })
}

fn check_token(key: &str, v: &str) -> Result<(), ConfigError> {
    if !v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        && !v.starts_with('.')
        && !v.ends_with('.')
    {
        Ok(())
    } else {
        Err(ConfigError(format!(
            "{key}: {v:?} must be letters, digits, '_', '-' or '.'"
        )))
    }
}

impl Config {
    /// Resolves the configuration from file, environment and flags.
    pub fn resolve(o: &Overrides) -> Result<Config, ConfigError> {
        let mut f = match &o.config {
            Some(p) => read_file(p)?,
            None => FileConfig::default(),
        };
        let limits = limits_from(&f)?;
        let s3_sse = sse_from(&f)?;
        let nats_url = o
            .nats_url
            .clone()
            .or(f.nats_url)
            .unwrap_or_else(|| "nats://127.0.0.1:4222".to_owned());
        let nats_urls: Vec<String> = nats_url
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        if nats_urls.is_empty() {
            return Err(ConfigError("nats_url: no broker URL given".into()));
        }
        let store_url = match o.store_url.clone().or(f.store_url) {
            Some(u) => StoreUrl::parse(&u)
                .map_err(|e: StoreError| ConfigError(format!("store_url: {e}")))?,
            None => {
                let dir = o
                    .runs_dir
                    .clone()
                    .or(f.runs_dir)
                    .unwrap_or_else(|| PathBuf::from("data/rmos_runs"));
                StoreUrl::from_dir(dir).map_err(|e| ConfigError(format!("runs_dir: {e}")))?
            }
        };
        let subject_prefix = o
            .subject_prefix
            .clone()
            .or(f.subject_prefix)
            .unwrap_or_else(|| "rmos.runs".to_owned());
        check_token("subject_prefix", &subject_prefix)?;
        let nats_user = o.nats_user.clone().or(f.nats_user);
        let inbox_prefix = match o.inbox_prefix.clone().or(f.inbox_prefix) {
            Some(p) => {
                check_token("inbox_prefix", &p)?;
                p
            }
            None => default_inbox_prefix(nats_user.as_deref()),
        };
        let ingest = match o.ingest.clone().or(f.ingest).as_deref() {
            None | Some("jetstream") => IngestMode::JetStream,
            Some("core") => IngestMode::Core,
            Some(other) => {
                return Err(ConfigError(format!(
                    "ingest: {other:?} is not one of jetstream, core"
                )));
            }
        };
        let stream = o
            .stream
            .clone()
            .or(f.stream)
            .unwrap_or_else(|| "RMOS_RUNS".to_owned());
        check_token("stream", &stream)?;
        let consumer = o
            .consumer
            .clone()
            .or(f.consumer)
            .unwrap_or_else(|| "rmos-runs-worker".to_owned());
        check_token("consumer", &consumer)?;
        let staging_bucket = o
            .staging_bucket
            .clone()
            .or(f.staging_bucket)
            .unwrap_or_else(|| crate::transport::claim_check::DEFAULT_BUCKET.to_owned());
        if staging_bucket.is_empty()
            || !staging_bucket
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(ConfigError(format!(
                "staging_bucket: {staging_bucket:?} must be letters, digits, - and _"
            )));
        }
        let concurrency = o.concurrency.or(f.concurrency).unwrap_or(64);
        if !(1..=4096).contains(&concurrency) {
            return Err(ConfigError(format!(
                "concurrency: {concurrency} must be between 1 and 4096"
            )));
        }
        let log_json = match o.log_format.clone().or(f.log_format).as_deref() {
            None | Some("pretty") => false,
            Some("json") => true,
            Some(other) => {
                return Err(ConfigError(format!(
                    "log_format: {other:?} is not one of pretty, json"
                )));
            }
        };
        let metrics_addr_explicit = o.metrics_addr.is_some() || f.metrics_addr.is_some();
        let metrics_addr = metrics_addr_from(o.metrics_addr.clone().or(f.metrics_addr))?;
        let http = http_from(o.http_addr.clone().or(f.http_addr.clone()), f.http.take())?;
        let stream_replicas = f.stream_replicas.unwrap_or(1);
        if !(1..=5).contains(&stream_replicas) {
            return Err(ConfigError(
                "stream_replicas: must be between 1 and 5".into(),
            ));
        }
        let dur = |key: &str, v: Option<String>, default: Duration| match v {
            Some(s) => parse_duration(key, &s),
            None => Ok(default),
        };
        let max_deliver = f.max_deliver.unwrap_or(-1);
        if max_deliver == 0 || max_deliver < -1 {
            return Err(ConfigError(
                "max_deliver: must be -1 (unlimited) or positive".into(),
            ));
        }
        Ok(Config {
            nats_urls,
            nats_user,
            nats_password: o.nats_password.clone().or(f.nats_password),
            nats_token: o.nats_token.clone().or(f.nats_token),
            nats_creds: o.nats_creds.clone().or(f.nats_creds),
            nats_nkey: o.nats_nkey.clone().or(f.nats_nkey),
            nats_ca: o.nats_ca.clone().or(f.nats_ca),
            nats_cert: o.nats_cert.clone().or(f.nats_cert),
            nats_key: o.nats_key.clone().or(f.nats_key),
            store_url,
            subject_prefix,
            inbox_prefix,
            ingest,
            stream,
            consumer,
            concurrency,
            log_json,
            metrics_addr,
            metrics_addr_explicit,
            http,
            stream_replicas,
            stream_max_age: dur("stream_max_age", f.stream_max_age, Duration::ZERO)?,
            staging_bucket,
            staging_max_age: match dur(
                "staging_max_age",
                f.staging_max_age,
                crate::transport::claim_check::DEFAULT_MAX_AGE,
            )? {
                d if d.is_zero() => {
                    return Err(ConfigError(
                        "staging_max_age: must be above zero (unclaimed bodies must expire)".into(),
                    ));
                }
                d => d,
            },
            ack_wait: dur("ack_wait", f.ack_wait, Duration::from_secs(30))?,
            max_deliver,
            forget_acked_after: dur(
                "forget_acked_after",
                f.forget_acked_after,
                Duration::from_secs(120),
            )?,
            limits,
            fsync: f.fsync.unwrap_or(true),
            s3_sse,
            connect_timeout: dur(
                "connect_timeout",
                f.connect_timeout,
                Duration::from_secs(30),
            )?,
            retention: retention_from(f.retention.as_deref())?,
            scrub: match f.scrub_rate {
                None => None,
                Some(0.0) => None,
                Some(rate) => Some(
                    crate::store::scrub::ScrubSchedule::new(
                        rate,
                        dur("scrub_every", f.scrub_every, Duration::from_secs(3600))?,
                    )
                    .map_err(|e| ConfigError(format!("scrub_rate: {e}")))?,
                ),
            },
            stall_after: match dur("stall_after", f.stall_after, Duration::from_secs(60))? {
                d if d.is_zero() => {
                    return Err(ConfigError("stall_after: must be above zero".into()));
                }
                d => d,
            },
            task_restarts: match f.task_restarts.unwrap_or(5) {
                0 => return Err(ConfigError("task_restarts: must be at least 1".into())),
                n => n,
            },
            signing_key: o.signing_key.clone().or(f.signing_key),
            trusted_keys: trusted_keys_from(f.trusted_keys.unwrap_or_default())?,
        })
    }
}

/// The inbox prefix used when none is configured: `_INBOX.<user>` for a user/password login
/// whose name is one subject token (letters, digits, `_`, `-`), else the NATS default `_INBOX`.
///
/// The shipped broker permissions (`deploy/nats/permissions.conf`) let each role subscribe only
/// to `_INBOX.<role>.>`, so that no client can read another's replies or PubAcks; with the
/// shipped user names this default is the right prefix for every role. Logins without a user
/// name (nkey, creds file, token) set `inbox_prefix` / `RMOS_INBOX_PREFIX` themselves.
pub fn default_inbox_prefix(nats_user: Option<&str>) -> String {
    match nats_user {
        Some(u)
            if !u.is_empty()
                && u.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-')) =>
        {
            format!("_INBOX.{u}")
        }
        _ => "_INBOX".to_owned(),
    }
}

/// `trusted_keys`: each a public nkey (`U...`, `A...`, `O...`, `S`eeds refused: never a secret).
fn trusted_keys_from(keys: Vec<String>) -> Result<Vec<String>, ConfigError> {
    for k in &keys {
        nkeys::KeyPair::from_public_key(k)
            .map_err(|e| ConfigError(format!("trusted_keys: {k:?} is not a public nkey ({e})")))?;
    }
    Ok(keys)
}

/// `s3_sse` ("AES256", "aws:kms", "aws:kms:dsse"), with a KMS key id and bucket key for KMS.
fn sse_from(f: &FileConfig) -> Result<Vec<(String, String)>, ConfigError> {
    let mut out = Vec::new();
    match f.s3_sse.as_deref() {
        None => {
            if f.s3_sse_kms_key_id.is_some() || f.s3_sse_bucket_key.is_some() {
                return Err(ConfigError(
                    "s3_sse_kms_key_id / s3_sse_bucket_key: need s3_sse = \"aws:kms\" or \"aws:kms:dsse\"".into(),
                ));
            }
        }
        Some(mode @ ("AES256" | "aws:kms" | "aws:kms:dsse")) => {
            out.push(("aws_server_side_encryption".to_owned(), mode.to_owned()));
            let kms = mode != "AES256";
            if let Some(key) = &f.s3_sse_kms_key_id {
                if !kms {
                    return Err(ConfigError(
                        "s3_sse_kms_key_id: only with s3_sse = \"aws:kms\" or \"aws:kms:dsse\""
                            .into(),
                    ));
                }
                out.push(("aws_sse_kms_key_id".to_owned(), key.clone()));
            }
            if let Some(b) = f.s3_sse_bucket_key {
                if !kms {
                    return Err(ConfigError(
                        "s3_sse_bucket_key: only with s3_sse = \"aws:kms\" or \"aws:kms:dsse\""
                            .into(),
                    ));
                }
                out.push(("aws_sse_bucket_key_enabled".to_owned(), b.to_string()));
            }
        }
        Some(other) => {
            return Err(ConfigError(format!(
                "s3_sse: {other:?} is not one of AES256, aws:kms, aws:kms:dsse"
            )));
        }
    }
    Ok(out)
}

impl Config {
    /// How to open the configured store (fsync, S3 encryption).
    pub fn store_options(&self) -> crate::store::OpenOptions {
        let mut o = crate::store::OpenOptions {
            fsync: self.fsync,
            ..Default::default()
        };
        o.s3.extend(self.s3_sse.iter().cloned());
        o
    }
}

fn limits_from(f: &FileConfig) -> Result<crate::domain::command::Limits, ConfigError> {
    let d = crate::domain::command::Limits::default();
    let positive = |key: &str, v: Option<usize>, default: usize| match v {
        Some(0) => Err(ConfigError(format!("{key}: must be a positive number"))),
        Some(n) => Ok(n),
        None => Ok(default),
    };
    Ok(crate::domain::command::Limits {
        blob_threshold: positive("blob_threshold", f.blob_threshold, d.blob_threshold)?,
        remembered_commands: d.remembered_commands,
        max_payload_bytes: positive(
            "max_payload_bytes",
            f.max_payload_bytes,
            d.max_payload_bytes,
        )?,
        max_json_depth: positive("max_json_depth", f.max_json_depth, d.max_json_depth)?,
        max_meta_keys: positive("max_meta_keys", f.max_meta_keys, d.max_meta_keys)?,
        max_meta_bytes: positive("max_meta_bytes", f.max_meta_bytes, d.max_meta_bytes)?,
        max_advisory_body_bytes: positive(
            "max_advisory_body_bytes",
            f.max_advisory_body_bytes,
            d.max_advisory_body_bytes,
        )?,
        max_advisories: positive("max_advisories", f.max_advisories, d.max_advisories)?,
    })
}

/// `retention`: absent, `"off"` or `"0"` is off; otherwise a duration of at least 1h.
fn retention_from(v: Option<&str>) -> Result<Option<Duration>, ConfigError> {
    match v.map(str::trim) {
        None | Some("off") | Some("0") => Ok(None),
        Some(s) => {
            let d = parse_duration("retention", s)?;
            crate::store::maintenance::check_retention(d)
                .map_err(|e| ConfigError(format!("retention: {e}")))?;
            Ok(Some(d))
        }
    }
}

/// `metrics_addr`: `host:port` (default `127.0.0.1:9464`); empty or `off` disables it.
fn metrics_addr_from(v: Option<String>) -> Result<Option<String>, ConfigError> {
    listen_addr("metrics_addr", v, "127.0.0.1:9464")
}

/// A listen address: `host:port`, or empty / `off` for none.
fn listen_addr(key: &str, v: Option<String>, default: &str) -> Result<Option<String>, ConfigError> {
    let v = v.unwrap_or_else(|| default.to_owned());
    let v = v.trim();
    if v.is_empty() || v.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    match v.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
            Ok(Some(v.to_owned()))
        }
        _ => Err(ConfigError(format!(
            "{key}: {v:?} is not host:port (e.g. {default}, 0.0.0.0:{}) or off",
            default.rsplit_once(':').map_or("", |(_, p)| p)
        ))),
    }
}

/// `http_addr` (default `127.0.0.1:8000`, the original FastAPI service's port) and `[http]`.
fn http_from(addr: Option<String>, f: Option<HttpFile>) -> Result<HttpConfig, ConfigError> {
    let addr_explicit = addr.is_some();
    let addr = listen_addr("http_addr", addr, "127.0.0.1:8000")?;
    let f = f.unwrap_or_default();
    let dur = |key: &str, v: &Option<String>, default: Duration| match v {
        Some(s) => match parse_duration(key, s)? {
            d if d.is_zero() => Err(ConfigError(format!("{key}: must be above zero"))),
            d => Ok(d),
        },
        None => Ok(default),
    };
    let defaults = crate::transport::http::server::ConnLimits::default();
    let count = |key: &str, v: Option<usize>, default: usize| match v {
        Some(0) => Err(ConfigError(format!("{key}: must be at least 1"))),
        Some(n) => Ok(n),
        None => Ok(default),
    };
    let limits = crate::transport::http::server::ConnLimits {
        header_timeout: dur(
            "http.header_timeout",
            &f.header_timeout,
            defaults.header_timeout,
        )?,
        idle_timeout: dur("http.idle_timeout", &f.idle_timeout, defaults.idle_timeout)?,
        max_connections: count(
            "http.max_connections",
            f.max_connections,
            defaults.max_connections,
        )?,
        max_connections_per_client: count(
            "http.max_connections_per_client",
            f.max_connections_per_client,
            defaults.max_connections_per_client,
        )?,
        grace: defaults.grace,
    };
    let credentials = f
        .credentials
        .iter()
        .map(|c| c.parse().map_err(ConfigError))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(HttpConfig {
        addr,
        addr_explicit,
        command_timeout: dur(
            "http.command_timeout",
            &f.command_timeout,
            Duration::from_secs(30),
        )?,
        max_body_bytes: count(
            "http.max_body_bytes",
            f.max_body_bytes,
            DEFAULT_HTTP_MAX_BODY,
        )?,
        limits,
        credentials,
    })
}

/// Default of `[http] max_body_bytes`: 256 MiB.
pub const DEFAULT_HTTP_MAX_BODY: usize = 256 * 1024 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_addr_values() {
        assert_eq!(
            metrics_addr_from(None).unwrap().as_deref(),
            Some("127.0.0.1:9464")
        );
        assert_eq!(metrics_addr_from(Some("off".into())).unwrap(), None);
        assert_eq!(metrics_addr_from(Some(" ".into())).unwrap(), None);
        assert_eq!(
            metrics_addr_from(Some("[::1]:9100".into()))
                .unwrap()
                .as_deref(),
            Some("[::1]:9100")
        );
        assert!(
            metrics_addr_from(Some("9464".into()))
                .unwrap_err()
                .0
                .starts_with("metrics_addr:")
        );
    }

    #[test]
    fn inbox_prefix_follows_the_user_unless_set() {
        assert_eq!(default_inbox_prefix(Some("engine")), "_INBOX.engine");
        assert_eq!(
            default_inbox_prefix(Some("rmos-worker")),
            "_INBOX.rmos-worker"
        );
        assert_eq!(default_inbox_prefix(None), "_INBOX");
        // Not one subject token: the NATS default, never a malformed subject.
        assert_eq!(default_inbox_prefix(Some("a.b")), "_INBOX");
        assert_eq!(default_inbox_prefix(Some("x>")), "_INBOX");
        assert_eq!(default_inbox_prefix(Some("")), "_INBOX");
        let c = Config::resolve(&Overrides {
            nats_user: Some("reader".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.inbox_prefix, "_INBOX.reader");
        let c = Config::resolve(&Overrides {
            nats_user: Some("reader".into()),
            inbox_prefix: Some("_INBOX.dashboards".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.inbox_prefix, "_INBOX.dashboards");
        for bad in ["_INBOX.>", "_INBOX.*", "_INBOX.", "a b", ""] {
            let e = Config::resolve(&Overrides {
                inbox_prefix: Some(bad.into()),
                ..Default::default()
            })
            .unwrap_err();
            assert!(e.0.starts_with("inbox_prefix:"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("k", "90d").unwrap(),
            Duration::from_secs(90 * 86_400)
        );
        assert_eq!(
            parse_duration("k", "250ms").unwrap(),
            Duration::from_millis(250)
        );
        assert!(
            parse_duration("k", "3 weeks")
                .unwrap_err()
                .0
                .starts_with("k:")
        );
    }

    #[test]
    fn defaults_and_bad_values() {
        let c = Config::resolve(&Overrides::default()).unwrap();
        assert_eq!(c.subject_prefix, "rmos.runs");
        assert_eq!(c.stream, "RMOS_RUNS");
        assert_eq!(c.ingest, IngestMode::JetStream);
        let bad = Overrides {
            ingest: Some("kafka".into()),
            ..Default::default()
        };
        assert!(
            Config::resolve(&bad)
                .unwrap_err()
                .0
                .contains("jetstream, core")
        );
    }
}

#[cfg(test)]
mod file_tests {
    use super::*;

    #[test]
    fn sse_settings_reach_the_store_options() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "s3_sse = \"aws:kms\"\ns3_sse_kms_key_id = \"k-1\"\n").unwrap();
        let c = Config::resolve(&Overrides {
            config: Some(p.clone()),
            ..Default::default()
        })
        .unwrap();
        let o = c.store_options();
        assert_eq!(
            o.s3.get("aws_server_side_encryption").map(String::as_str),
            Some("aws:kms")
        );
        assert_eq!(
            o.s3.get("aws_sse_kms_key_id").map(String::as_str),
            Some("k-1")
        );
        std::fs::write(&p, "s3_sse = \"AES256\"\ns3_sse_kms_key_id = \"k-1\"\n").unwrap();
        let e = Config::resolve(&Overrides {
            config: Some(p.clone()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.0.starts_with("s3_sse_kms_key_id"), "{e}");
        std::fs::write(&p, "s3_sse = \"rot13\"\n").unwrap();
        let e = Config::resolve(&Overrides {
            config: Some(p),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.0.contains("AES256, aws:kms, aws:kms:dsse"), "{e}");
    }

    /// The shipped example file parses and its values are the defaults.
    #[test]
    fn shipped_config_file_is_the_defaults() {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/rmos-runs.toml");
        let from_file = Config::resolve(&Overrides {
            config: Some(path),
            ..Default::default()
        })
        .unwrap();
        let defaults = Config::resolve(&Overrides::default()).unwrap();
        assert_eq!(format!("{from_file:?}"), format!("{defaults:?}"));
    }

    #[test]
    fn scrub_settings() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        let resolve = |toml: &str| {
            std::fs::write(&p, toml).unwrap();
            Config::resolve(&Overrides {
                config: Some(p.clone()),
                ..Default::default()
            })
        };
        assert_eq!(resolve("").unwrap().scrub, None);
        assert_eq!(resolve("scrub_rate = 0\n").unwrap().scrub, None);
        let s = resolve("scrub_rate = 2.5\nscrub_every = \"10m\"\n")
            .unwrap()
            .scrub
            .unwrap();
        assert_eq!((s.rate, s.every), (2.5, Duration::from_secs(600)));
        assert_eq!(
            resolve("scrub_rate = 1.0\n").unwrap().scrub.unwrap().every,
            Duration::from_secs(3600)
        );
        for bad in ["scrub_rate = -1.0\n", "scrub_rate = 20000.0\n"] {
            let e = resolve(bad).unwrap_err();
            assert!(e.0.starts_with("scrub_rate"), "{bad}: {e}");
        }
        let e = resolve("scrub_rate = 1.0\nscrub_every = \"soon\"\n").unwrap_err();
        assert!(e.0.contains("scrub_every"), "{e}");
    }

    #[test]
    fn unknown_file_keys_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "concurency = 3\n").unwrap();
        let e = Config::resolve(&Overrides {
            config: Some(p),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.0.contains("concurency"), "{e}");
    }
}
