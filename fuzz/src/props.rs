//! The properties the fuzz targets check, shared verbatim by the cargo-fuzz crate (`fuzz/`) and
//! by the proptest suite of the main crate (`tests/fuzz_props.rs` includes this file with
//! `#[path]`), so a crash the fuzzer finds replays as an ordinary `cargo test`.
//!
//! Every `check_*` function takes the raw fuzz input, never panics on input the code under test
//! is allowed to reject, and panics (with the offending value in the message) when a property
//! is violated. Depends only on `rmos_runs` and `serde_json`.

#![allow(dead_code)] // each user (a fuzz target, the test file) calls a subset

use rmos_runs::domain::artifact::{StoredRecord, Timestamp};
use rmos_runs::domain::command::{
    Command, CommandKind, Context, Decision, Limits, StreamPosition, merge_patch,
};
use rmos_runs::domain::hashing::{canonical_json, sha256_bytes, sha256_json};
use rmos_runs::domain::ids::{AdvisoryId, CommandId, Mode, RequestId, RunId, ToolId};
use serde_json::Value;
use std::sync::OnceLock;

/// The message ids each command body is decoded with.
const MESSAGE_IDS: [Option<&str>; 2] = [None, Some("fuzz-msg-1")];

/// A fixed decision context: fixed clock and ids, and a blob threshold small enough that fuzz
/// inputs reach the blob paths.
pub fn fuzz_context() -> Context {
    Context {
        now: Timestamp::parse("2026-01-02T03:04:05.678Z").expect("fixed timestamp"),
        request_id: RequestId::parse("req_fuzz").expect("fixed request id"),
        command_id: Some(CommandId::parse("cmd-fuzz-1").expect("fixed command id")),
        stream: Some(StreamPosition {
            seq: 7,
            acked_through: 3,
        }),
        actor: None,
        limits: Limits {
            blob_threshold: 64,
            ..Limits::default()
        },
        redelivered: false,
    }
}

/// A stored live record with blobs, an advisory and meta, to decide commands against.
pub fn base_live_record() -> StoredRecord {
    let body = serde_json::json!({
        "run_id": "run_0123456789ab", "mode": "cam", "tool_id": "T102", "status": "OK",
        "created_at_utc": "2025-01-02T03:04:05Z",
        "feasibility": {"ok": true, "margin": 1.5},
        "outputs": {"gcode_text": "G1 X1 Y1\n".repeat(16), "opplan_json": {"ops": [1, 2, 3]}},
        "meta": {"operator": "ann", "nested": {"a": 1, "b": [1, null]}}
    });
    let cmd = Command::decode(CommandKind::Create, body.to_string().as_bytes(), None)
        .expect("base create decodes");
    let Ok(Decision::Write { record, .. }) = cmd.decide(None, &fuzz_context()) else {
        panic!("base create is written")
    };
    let adv = serde_json::json!({"run_id": "run_0123456789ab", "advisory_id": "adv_0123456789ab",
        "kind": "explanation", "body": {"text": "why"}});
    let cmd = Command::decode(CommandKind::Advisory, adv.to_string().as_bytes(), None)
        .expect("base advisory decodes");
    let Ok(Decision::Write { record, .. }) = cmd.decide(Some(&record), &fuzz_context()) else {
        panic!("base advisory is written")
    };
    record
}

/// The tombstone that deleting [`base_live_record`] leaves.
pub fn base_tombstone() -> StoredRecord {
    let cmd = Command::decode(
        CommandKind::Delete,
        br#"{"run_id": "run_0123456789ab", "reason": "retention"}"#,
        None,
    )
    .expect("base delete decodes");
    let Ok(Decision::Write { record, .. }) = cmd.decide(Some(&base_live_record()), &fuzz_context())
    else {
        panic!("base delete is written")
    };
    record
}

/// A record the worker is about to store must load back as itself: otherwise the run it
/// belongs to becomes `corrupt_artifact` on its next read.
pub fn assert_stored_round_trip(record: &StoredRecord, what: &str) {
    let bytes = record.encode();
    match StoredRecord::decode(&bytes) {
        Ok(again) => assert_eq!(
            &again,
            record,
            "{what}: stored record changes on reload\n{}",
            String::from_utf8_lossy(&bytes)
        ),
        Err(e) => panic!(
            "{what}: a record the worker writes does not load back: {e}\n{}",
            String::from_utf8_lossy(&bytes)
        ),
    }
}

fn check_decision(
    cmd: &Command,
    current: Option<&StoredRecord>,
    ctx: &Context,
    what: &str,
) -> Option<StoredRecord> {
    match cmd.decide(current, ctx) {
        Ok(Decision::Write {
            record,
            blobs,
            event: _,
            released: _,
        }) => {
            for b in &blobs {
                assert_eq!(
                    b.sha256.as_str(),
                    sha256_bytes(&b.bytes),
                    "{what}: blob named by the wrong hash"
                );
            }
            assert!(
                record.revision() >= 1,
                "{what}: revision {}",
                record.revision()
            );
            if let Some(cur) = current {
                assert_eq!(
                    record.revision(),
                    cur.revision() + 1,
                    "{what}: a write must bump the revision by one"
                );
            }
            assert_stored_round_trip(&record, what);
            Some(record)
        }
        Ok(Decision::Unchanged { .. }) | Err(_) => None,
    }
}

/// `decode_command`: any bytes, decoded as every command kind (with and without a message id),
/// never panic. A decoded command:
/// - decodes identically from the same bytes again (decoding is deterministic);
/// - has the kind it was decoded as;
/// - decodes again from the RFC 8785 canonical form of its own body, to the same run id (and,
///   for a create, the same content hashes and identity, which are defined on that form);
/// - can be decided against nothing, a live run and a tombstone without panicking, and every
///   record it would write loads back from storage as itself.
pub fn check_decode_command(data: &[u8]) {
    static BASE: OnceLock<(StoredRecord, StoredRecord)> = OnceLock::new();
    let (live, tomb) = BASE.get_or_init(|| (base_live_record(), base_tombstone()));
    let ctx = fuzz_context();
    for kind in CommandKind::ALL {
        for msg in MESSAGE_IDS {
            let Ok(cmd) = Command::decode(kind, data, msg) else {
                continue;
            };
            let again = Command::decode(kind, data, msg).expect("second decode of the same bytes");
            assert_eq!(cmd, again, "decode is not deterministic");
            assert_eq!(cmd.kind(), kind);

            let raw: Value = serde_json::from_slice(data).expect("decoded, so it is JSON");
            let canonical = canonical_json(&raw);
            match Command::decode(kind, &canonical, msg) {
                Ok(re) => {
                    assert_eq!(
                        re.run_id(),
                        cmd.run_id(),
                        "run id changes when the body is canonicalized"
                    );
                    if let (Command::Create(a), Command::Create(b)) = (&cmd, &re) {
                        assert_eq!(a.source_sha256, b.source_sha256);
                        assert_eq!(a.hashes, b.hashes);
                    }
                    if let (Command::Advisory(a), Command::Advisory(b)) = (&cmd, &re) {
                        assert_eq!(a.advisory_id, b.advisory_id);
                        assert_eq!(a.body, b.body);
                    }
                }
                // Create and advisory identities are defined on the canonical form, so it
                // must decode; a patch's `expected_revision` near 2^64 legitimately does not
                // survive JCS (numbers are doubles), so other kinds may reject it.
                Err(_) if matches!(kind, CommandKind::PatchMeta | CommandKind::Delete) => {}
                Err(e) => panic!(
                    "{kind:?} decodes from {:?} but not from its canonical form {:?}: {e}",
                    String::from_utf8_lossy(data),
                    String::from_utf8_lossy(&canonical)
                ),
            }

            let created = check_decision(&cmd, None, &ctx, "decide(None)");
            if let Some(rec) = created {
                // The run just written: a redelivery of the same create must be a no-op.
                assert!(
                    matches!(cmd.decide(Some(&rec), &ctx), Ok(Decision::Unchanged { .. })),
                    "a redelivered create is not a no-op"
                );
            }
            check_decision(&cmd, Some(live), &ctx, "decide(live)");
            check_decision(&cmd, Some(tomb), &ctx, "decide(tombstone)");
        }
    }
}

fn hex12_grammar(s: &str, prefix: &str) -> bool {
    match s.strip_prefix(prefix) {
        Some(rest) => {
            rest.len() == 12
                && rest
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        }
        None => false,
    }
}

fn token_grammar(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '/'))
}

fn printable_grammar(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.chars().all(|c| c.is_ascii_graphic())
}

/// An id that names an object key must never be able to leave its directory.
fn assert_path_safe(s: &str, what: &str) {
    assert!(
        !s.contains('/') && !s.contains('\\') && !s.contains('.') && s != ".." && !s.is_empty(),
        "{what} {s:?} is not safe in an object key"
    );
}

macro_rules! check_parse {
    ($ty:ty, $s:expr, $grammar:expr) => {{
        let s: &str = $s;
        let parsed = <$ty>::parse(s);
        assert_eq!(
            parsed.is_ok(),
            $grammar,
            "{}::parse({s:?}) = {parsed:?} disagrees with the documented grammar",
            stringify!($ty)
        );
        let via_serde = serde_json::from_value::<$ty>(Value::String(s.to_owned()));
        assert_eq!(
            via_serde.is_ok(),
            parsed.is_ok(),
            "serde and parse disagree on {s:?}"
        );
        let via_fromstr = s.parse::<$ty>();
        assert_eq!(via_fromstr.is_ok(), parsed.is_ok());
        if let Ok(id) = &parsed {
            assert_eq!(id.as_str(), s);
            assert_eq!(id.to_string(), s);
            assert_eq!(
                serde_json::to_value(id).unwrap(),
                Value::String(s.to_owned())
            );
        }
        parsed
    }};
}

fn check_ids_str(s: &str) {
    if let Ok(id) = check_parse!(RunId, s, hex12_grammar(s, "run_")) {
        assert_path_safe(id.as_str(), "RunId");
    }
    if let Ok(id) = check_parse!(AdvisoryId, s, hex12_grammar(s, "adv_")) {
        assert_path_safe(id.as_str(), "AdvisoryId");
    }
    // Mode and ToolId are query filters, never object keys: their grammar allows '/' and '.'.
    let _ = check_parse!(Mode, s, token_grammar(s, 64));
    let _ = check_parse!(ToolId, s, token_grammar(s, 128));
    let _ = check_parse!(RequestId, s, printable_grammar(s, 128));
    let _ = check_parse!(CommandId, s, printable_grammar(s, 256));
    // Derived ids are always accepted by their own parser.
    let r = RunId::derive(s.as_bytes());
    assert!(RunId::parse(r.as_str()).is_ok(), "derived {r} rejected");
    let a = AdvisoryId::derive(s.as_bytes());
    assert!(
        AdvisoryId::parse(a.as_str()).is_ok(),
        "derived {a} rejected"
    );
}

/// `parse_ids`: any text is accepted by `RunId`/`AdvisoryId`/`Mode`/`ToolId` (and the request
/// and command ids) exactly when it matches the documented grammar; serde, `FromStr` and
/// `parse` agree; accepted values print as themselves; accepted run and advisory ids contain
/// no '/', '\\' or '.' (so never '..'). Bytes that are not UTF-8 are checked lossily.
pub fn check_parse_ids(data: &[u8]) {
    match std::str::from_utf8(data) {
        Ok(s) => check_ids_str(s),
        Err(_) => check_ids_str(&String::from_utf8_lossy(data)),
    }
}

/// Splits the input into the first two JSON values it holds (`<target> <patch>`, any
/// whitespace between).
pub fn two_json_values(data: &[u8]) -> Option<(Value, Value)> {
    let mut it = serde_json::Deserializer::from_slice(data).into_iter::<Value>();
    let a = it.next()?.ok()?;
    let b = it.next()?.ok()?;
    Some((a, b))
}

/// Checks the RFC 7396 postconditions of `result = merge_patch(target, patch)`.
fn check_merge_result(target: &Value, patch: &Value, result: &Value) {
    let Value::Object(p) = patch else {
        assert_eq!(result, patch, "a non-object patch replaces the target");
        return;
    };
    let Value::Object(r) = result else {
        panic!("an object patch must give an object, got {result}")
    };
    let t = target.as_object();
    for (k, v) in p {
        if v.is_null() {
            assert!(!r.contains_key(k), "null member {k:?} was not removed");
        } else if v.is_object() {
            let sub_target = t.and_then(|t| t.get(k)).cloned().unwrap_or(Value::Null);
            check_merge_result(&sub_target, v, &r[k]);
        } else {
            assert_eq!(&r[k], v, "patch member {k:?} does not win");
        }
    }
    // Keys the patch does not mention keep their values; no other key appears.
    for (k, v) in r {
        if !p.contains_key(k) {
            let orig = t.and_then(|t| t.get(k));
            assert_eq!(Some(v), orig, "key {k:?} appeared or changed");
        }
    }
    if let Some(t) = t {
        for (k, v) in t {
            if !p.contains_key(k) {
                assert_eq!(r.get(k), Some(v), "untouched key {k:?} lost");
            }
        }
    }
}

/// True when no object member, at any depth reached through objects, is `null`.
fn no_null_members(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.values().all(|x| !x.is_null() && no_null_members(x)),
        _ => true,
    }
}

/// `merge_patch`: for any two JSON values, applying the patch is idempotent, removes every key
/// the patch sets to null, lets every other patch member win, keeps untouched keys, and a patch
/// applied to nothing leaves no null members (outside arrays, which are replaced whole).
pub fn check_merge_patch_values(target: &Value, patch: &Value) {
    let mut once = target.clone();
    merge_patch(&mut once, patch);
    let mut twice = once.clone();
    merge_patch(&mut twice, patch);
    assert_eq!(
        once, twice,
        "merge_patch is not idempotent: {target} + {patch}"
    );
    check_merge_result(target, patch, &once);

    let mut from_nothing = Value::Null;
    merge_patch(&mut from_nothing, patch);
    if patch.is_object() {
        assert!(
            no_null_members(&from_nothing),
            "null members survive a patch of nothing: {from_nothing}"
        );
    }
    // Canonical form, the form meta is hashed in, is also stable under re-application.
    assert_eq!(canonical_json(&once), canonical_json(&twice));
}

/// `merge_patch` fuzz entry: two JSON values from the bytes; anything else is ignored.
pub fn check_merge_patch(data: &[u8]) {
    if let Some((target, patch)) = two_json_values(data) {
        check_merge_patch_values(&target, &patch);
    }
}

/// JSON equality with every number compared as the IEEE-754 double JSON.parse would give.
pub fn json_eq_f64(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => as_f64(x) == as_f64(y),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_eq_f64(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq_f64(v, w)))
        }
        _ => a == b,
    }
}

fn as_f64(n: &serde_json::Number) -> f64 {
    if let Some(i) = n.as_i64() {
        i as f64
    } else if let Some(u) = n.as_u64() {
        u as f64
    } else {
        n.as_f64().expect("finite JSON number")
    }
}

/// `canonical_json` on a parsed value: the canonical form is UTF-8 JSON that parses back to an
/// equal value (numbers as f64), canonicalizing it again is a fixed point, it has no
/// insignificant whitespace, and `sha256_json` is the hash of exactly those bytes.
pub fn check_canonical_value(v: &Value) {
    let c = canonical_json(v);
    let text = std::str::from_utf8(&c).expect("canonical form is UTF-8");
    let back: Value = match serde_json::from_str(text) {
        Ok(b) => b,
        Err(e) => panic!("canonical form {text:?} of {v} does not parse: {e}"),
    };
    assert!(
        json_eq_f64(v, &back),
        "canonical form {text:?} parses to {back}, not {v}"
    );
    let c2 = canonical_json(&back);
    assert_eq!(
        text,
        String::from_utf8_lossy(&c2),
        "canonicalization is not a fixed point"
    );
    assert_eq!(sha256_json(v), sha256_bytes(&c));
    assert_eq!(sha256_json(&back), sha256_bytes(&c));
}

/// `canonical_json` fuzz entry: any bytes that are JSON.
pub fn check_canonical_json(data: &[u8]) {
    if let Ok(v) = serde_json::from_slice::<Value>(data) {
        check_canonical_value(&v);
    }
}

/// `seed_load`: any bytes given to `StoredRecord::decode` never panic; a decoded record encodes
/// to bytes that decode to the same record, and encoding is then stable.
pub fn check_seed_load(data: &[u8]) {
    let Ok(record) = StoredRecord::decode(data) else {
        return;
    };
    assert_stored_round_trip(&record, "seed_load");
    let bytes = record.encode();
    let again = StoredRecord::decode(&bytes).expect("checked above");
    assert_eq!(again.encode(), bytes, "encoding is not stable");
}
