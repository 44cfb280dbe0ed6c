//! The CLI's client side: requests to the NATS API (`get`, `list`, `verify`, `history`, `diff`)
//! and commands published through the stream (`create`, `patch-meta`, `attach-advisory`,
//! `delete`), each with its output and exit code. `main.rs` parses the arguments and calls these.

use std::io::Read;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use rmos_runs::config::{Config, IngestMode};
use rmos_runs::domain::command::CommandKind;
use rmos_runs::domain::ids::RequestId;
use rmos_runs::transport::claim_check;
use rmos_runs::transport::outcomes::{Commander, Outcome, SendError};
use rmos_runs::transport::{REQUEST_ID_HEADER, Subjects, connect};

use crate::{
    EXIT_NOT_FOUND, EXIT_REJECTED, EXIT_UNREACHABLE, EXIT_VERIFY_FAILED, Failure, PayloadArgs,
};

/// Prints a maintenance report; exit 1 when it records failures.
pub(crate) fn print_report<R>(r: &R, ok: bool, json: bool, what: &str) -> Result<(), Failure>
where
    R: serde::Serialize + std::fmt::Display,
{
    if json {
        println!("{}", serde_json::to_string(r).unwrap_or_default());
    } else {
        print!("{r}");
    }
    if ok {
        Ok(())
    } else {
        Err(Failure {
            code: 1,
            message: format!("{what}: finished with failures (see the report)"),
        })
    }
}

/// Publishes a command whose JSON payload comes from `--file` or stdin.
pub(crate) async fn publish_payload(
    cfg: &Config,
    kind: CommandKind,
    a: PayloadArgs,
    timeout: Duration,
    json: bool,
) -> Result<(), Failure> {
    let mut payload = read_payload(&a)?;
    if matches!(kind, CommandKind::Create | CommandKind::Advisory)
        && cfg.ingest == IngestMode::JetStream
    {
        // Too large for one message: the bodies go through the staging bucket.
        let client = client_connect(cfg).await?;
        let max = client.server_info().max_payload;
        let js = async_nats::jetstream::new(client);
        payload = claim_check::stage_large_payload(&js, &cfg.staging_bucket, kind, payload, max)
            .await
            .map_err(|e| Failure {
                code: EXIT_UNREACHABLE,
                message: e.to_string(),
            })?;
    }
    publish(cfg, kind, payload, a.msg_id, timeout, json).await
}

/// `get --output`: writes one output body to stdout exactly as stored, fetching it from the
/// staging bucket when the worker staged it (checked as it passes).
pub(crate) async fn get_output(
    cfg: &Config,
    run_id: &str,
    output: &str,
    timeout: Duration,
) -> Result<(), Failure> {
    let body = serde_json::json!({"run_id": run_id, "output": output}).to_string();
    let text = ask_once(cfg, "get", body, timeout, false).await?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| anyhow!("get reply is not JSON: {e}"))?;
    use std::io::Write as _;
    let mut out = std::io::BufWriter::new(std::io::stdout());
    match (&v["inline"], &v["staged"]) {
        (serde_json::Value::String(t), _) => {
            out.write_all(t.as_bytes()).context("stdout")?;
        }
        (serde_json::Value::Object(_), _) => {
            let plan = serde_json::to_vec(&v["inline"]).unwrap_or_default();
            out.write_all(&plan).context("stdout")?;
        }
        (_, staged @ serde_json::Value::Object(_)) => {
            let staged: rmos_runs::domain::command::create::StagedBody =
                serde_json::from_value(staged.clone())
                    .map_err(|e| anyhow!("get reply: staged: {e}"))?;
            let client = client_connect(cfg).await?;
            let js = async_nats::jetstream::new(client);
            claim_check::fetch_staged(&js, &staged, &mut out)
                .await
                .map_err(|e| Failure {
                    code: EXIT_VERIFY_FAILED,
                    message: e.to_string(),
                })?;
        }
        _ => return Err(anyhow!("get reply names no body: {text}").into()),
    }
    out.flush().context("stdout")?;
    Ok(())
}

pub(crate) fn read_payload(a: &PayloadArgs) -> Result<Vec<u8>, Failure> {
    let mut buf = Vec::new();
    match a.file.as_deref() {
        None | Some("-") => {
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("reading stdin")?;
        }
        Some(path) => {
            buf = std::fs::read(path).with_context(|| format!("reading {path}"))?;
        }
    }
    Ok(buf)
}

pub(crate) async fn client_connect(cfg: &Config) -> Result<async_nats::Client, Failure> {
    let mut cfg = cfg.clone();
    cfg.connect_timeout = cfg.connect_timeout.min(Duration::from_secs(5));
    connect::connect(&cfg, "rmos-runs cli")
        .await
        .map_err(|e| Failure {
            code: EXIT_UNREACHABLE,
            message: e.to_string(),
        })
}

pub(crate) fn code_for(status: &str) -> u8 {
    if status == "404" {
        EXIT_NOT_FOUND
    } else {
        EXIT_REJECTED
    }
}

/// Sends one request; the reply's text, or its error reply as a failure (with `--json`, the
/// error body is printed first, for scripts).
pub(crate) async fn ask(
    client: &async_nats::Client,
    subjects: &Subjects,
    endpoint: &str,
    body: String,
    timeout: Duration,
    json: bool,
) -> Result<String, Failure> {
    let rid = RequestId::generate();
    let mut h = async_nats::HeaderMap::new();
    h.insert(REQUEST_ID_HEADER, rid.as_str());
    let req = async_nats::Request::new()
        .payload(body.into())
        .headers(h)
        .timeout(Some(timeout));
    let reply = client
        .send_request(subjects.sub(endpoint), req)
        .await
        .map_err(|e| Failure {
            code: EXIT_UNREACHABLE,
            message: format!("{endpoint}: {e}"),
        })?;
    let text = String::from_utf8_lossy(&reply.payload).into_owned();
    if let Some(status) = reply
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Service-Error-Code"))
    {
        let message = reply
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Service-Error"))
            .map(|v| v.to_string())
            .unwrap_or_default();
        if json {
            println!("{text}");
        }
        return Err(Failure {
            code: code_for(status.as_str()),
            message,
        });
    }
    Ok(text)
}

/// One request, its reply printed (pretty JSON, or as received with `--json`).
pub(crate) async fn request(
    cfg: &Config,
    endpoint: &str,
    body: String,
    timeout: Duration,
    json: bool,
) -> Result<(), Failure> {
    let text = ask_once(cfg, endpoint, body, timeout, json).await?;
    print_value(&text, json);
    Ok(())
}

pub(crate) async fn ask_once(
    cfg: &Config,
    endpoint: &str,
    body: String,
    timeout: Duration,
    json: bool,
) -> Result<String, Failure> {
    let client = client_connect(cfg).await?;
    let subjects = Subjects::new(cfg.subject_prefix.clone());
    ask(&client, &subjects, endpoint, body, timeout, json).await
}

/// `verify`: the report, and exit 5 when any check or the hash chain fails.
pub(crate) async fn verify_run(
    cfg: &Config,
    run_id: String,
    timeout: Duration,
    json: bool,
) -> Result<(), Failure> {
    let body = serde_json::json!({"run_id": run_id}).to_string();
    let text = ask_once(cfg, "verify", body, timeout, json).await?;
    print_value(&text, json);
    let report: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| anyhow!("verify reply: {e}"))?;
    if report["ok"] == serde_json::Value::Bool(true) {
        return Ok(());
    }
    let reason = match report["chain"]["broken"].as_object() {
        Some(b) => format!(
            "revision {}: {} ({})",
            b.get("revision").unwrap_or(&serde_json::Value::Null),
            b.get("reason").and_then(|r| r.as_str()).unwrap_or("?"),
            b.get("detail").and_then(|r| r.as_str()).unwrap_or("")
        ),
        None => "a content hash does not match (see checks)".to_owned(),
    };
    Err(Failure {
        code: EXIT_VERIFY_FAILED,
        message: format!("run {run_id} failed verification: {reason}"),
    })
}

/// Asks `endpoint` once; with `--json` prints the reply as received and gives `None`,
/// otherwise gives the decoded reply for the caller to print as a table.
async fn ask_for_table(
    cfg: &Config,
    endpoint: &str,
    body: String,
    timeout: Duration,
    json: bool,
) -> Result<Option<serde_json::Value>, Failure> {
    let text = ask_once(cfg, endpoint, body, timeout, json).await?;
    if json {
        println!("{text}");
        return Ok(None);
    }
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| anyhow!("{endpoint} reply: {e}").into())
}

/// `history`: one page, as a table (or the reply with `--json`).
pub(crate) async fn history(
    cfg: &Config,
    body: String,
    timeout: Duration,
    json: bool,
) -> Result<(), Failure> {
    let Some(page) = ask_for_table(cfg, "history", body, timeout, json).await? else {
        return Ok(());
    };
    println!(
        "{:>4}  {:<18}  {:<24}  {:<16}  {:<36}  request",
        "rev", "event", "at", "artifact_sha256", "command"
    );
    for r in page["revisions"].as_array().into_iter().flatten() {
        let text = |k: &str| r[k].as_str().unwrap_or("-").to_owned();
        let sha = text("artifact_sha256");
        println!(
            "{:>4}  {:<18}  {:<24}  {:<16}  {:<36}  {}",
            r["revision"],
            text("event"),
            text("at"),
            &sha[..sha.len().min(16)],
            text("command_id"),
            text("request_id")
        );
    }
    if let Some(c) = page["next_cursor"].as_str() {
        println!("more: --cursor {c}");
    }
    Ok(())
}

/// `diff`: one line per changed path (or the reply with `--json`).
pub(crate) async fn diff(
    cfg: &Config,
    body: String,
    timeout: Duration,
    json: bool,
) -> Result<(), Failure> {
    let Some(d) = ask_for_table(cfg, "diff", body, timeout, json).await? else {
        return Ok(());
    };
    let side = |v: &serde_json::Value| {
        format!(
            "{} revision {}",
            v["run_id"].as_str().unwrap_or("?"),
            v["revision"]
        )
    };
    println!("--- {}\n+++ {}", side(&d["from"]), side(&d["to"]));
    let shown = |v: Option<&serde_json::Value>| v.map_or("(absent)".to_owned(), |v| v.to_string());
    for c in d["changes"].as_array().into_iter().flatten() {
        println!(
            "{}: {} -> {}",
            c["path"].as_str().unwrap_or("?"),
            shown(c.get("before")),
            shown(c.get("after"))
        );
    }
    Ok(())
}

/// `list --all`: follows `next_cursor` to the end, printing one summary per line as it goes
/// (memory stays one page, whatever the store's size).
pub(crate) async fn list_all(
    cfg: &Config,
    mut q: serde_json::Map<String, serde_json::Value>,
    timeout: Duration,
) -> Result<(), Failure> {
    use std::io::Write;
    let client = client_connect(cfg).await?;
    let subjects = Subjects::new(cfg.subject_prefix.clone());
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    loop {
        let body = serde_json::Value::Object(q.clone()).to_string();
        let text = ask(&client, &subjects, "list", body, timeout, false).await?;
        let page: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| anyhow!("list reply: {e}"))?;
        for run in page["runs"].as_array().into_iter().flatten() {
            writeln!(out, "{run}").map_err(|e| anyhow!("stdout: {e}"))?;
        }
        match page["next_cursor"].as_str() {
            Some(c) => {
                q.insert("cursor".into(), c.into());
            }
            None => break,
        }
    }
    out.flush().map_err(|e| anyhow!("stdout: {e}"))?;
    Ok(())
}

pub(crate) fn print_value(text: &str, json: bool) {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(v) if !json => println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()),
        _ => println!("{text}"),
    }
}

/// Publishes a command (JetStream, or core in core mode) and prints its `stored` event, or
/// fails with its rejection; the same path as the HTTP server's commands ([`Commander`]).
pub(crate) async fn publish(
    cfg: &Config,
    kind: CommandKind,
    payload: Vec<u8>,
    msg_id: Option<String>,
    timeout: Duration,
    json: bool,
) -> Result<(), Failure> {
    let client = client_connect(cfg).await?;
    let commander = Commander::start(
        client,
        Subjects::new(cfg.subject_prefix.clone()),
        cfg.ingest == IngestMode::JetStream,
    )
    .await
    .map_err(|e| anyhow!(e))?;
    let rid = RequestId::generate();
    let sent = commander
        .send(kind, payload.into(), &rid, msg_id.as_deref(), None, timeout)
        .await;
    match sent {
        Ok(Outcome::Stored(event)) => {
            print_value(&String::from_utf8_lossy(&event), json);
            Ok(())
        }
        Ok(Outcome::Rejected(body)) => {
            let text = String::from_utf8_lossy(&body).into_owned();
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            if json {
                println!("{text}");
            }
            let code = v["code"].as_str().unwrap_or("rejected");
            Err(Failure {
                code: if code == "not_found" {
                    EXIT_NOT_FOUND
                } else {
                    EXIT_REJECTED
                },
                message: format!("{code}: {}", v["message"].as_str().unwrap_or("")),
            })
        }
        Err(e @ (SendError::NotAccepted(_) | SendError::RequestIdInUse(_))) => Err(Failure {
            code: EXIT_UNREACHABLE,
            message: format!("{e}: is the stream there?"),
        }),
        Err(e @ SendError::NoOutcome { .. }) => Err(Failure {
            code: EXIT_UNREACHABLE,
            message: format!("{e} (is a worker running?)"),
        }),
    }
}
