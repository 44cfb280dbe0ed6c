//! Content hashing (RFC 8785 JSON canonicalization + SHA-256) and redaction of secrets.
//!
//! Hashes are lower-case hex SHA-256: of the UTF-8 bytes for text, of the RFC 8785 (JCS)
//! canonical form for JSON values. Numbers are serialized as ECMAScript does (`ryu-js`),
//! object members are sorted by their UTF-16 code units, as the RFC requires.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// SHA-256 of the UTF-8 bytes of `text`, lower-case hex.
pub fn sha256_text(text: &str) -> String {
    sha256_bytes(text.as_bytes())
}

/// SHA-256 of raw bytes, lower-case hex.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// SHA-256 of the RFC 8785 canonical form of `value`, lower-case hex.
pub fn sha256_json(value: &Value) -> String {
    sha256_bytes(&canonical_json(value))
}

/// The RFC 8785 (JCS) canonical serialization of `value`.
pub fn canonical_json(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => write_number(n, out),
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            // RFC 8785 §3.2.3: sort by UTF-16 code units, not by UTF-8 bytes or chars.
            entries.sort_by(|(a, _), (b, _)| a.encode_utf16().cmp(b.encode_utf16()));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(k, out);
                out.push(b':');
                write_canonical(v, out);
            }
            out.push(b'}');
        }
    }
}

fn write_number(n: &serde_json::Number, out: &mut Vec<u8>) {
    // JCS works on IEEE-754 doubles: integers beyond 2^53 are rounded like JSON.parse would.
    let f = if let Some(i) = n.as_i64() {
        i as f64
    } else if let Some(u) = n.as_u64() {
        u as f64
    } else {
        n.as_f64().unwrap_or(0.0)
    };
    push_number(f, out);
}

fn push_number(f: f64, out: &mut Vec<u8>) {
    if f == 0.0 {
        // Covers -0, which ECMAScript prints as "0".
        out.push(b'0');
        return;
    }
    let mut buf = ryu_js::Buffer::new();
    out.extend_from_slice(buf.format_finite(f).as_bytes());
}

/// Calls `k` with how RFC 8785 writes the finite number `f` (without allocating).
pub fn with_canonical_number<R>(f: f64, k: impl FnOnce(&str) -> R) -> R {
    if f == 0.0 {
        return k("0");
    }
    let mut buf = ryu_js::Buffer::new();
    k(buf.format_finite(f))
}

/// How RFC 8785 writes a finite number: as ECMAScript's `Number.prototype.toString` does.
pub fn canonical_number(f: f64) -> String {
    let mut out = Vec::with_capacity(24);
    push_number(f, &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn write_string(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    // Copy runs of bytes that need no escape in one go: only `"`, backslash and controls do, and
    // those are ASCII, so a run never splits a UTF-8 sequence.
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            0x09 => b"\\t",
            0x0a => b"\\n",
            0x0c => b"\\f",
            0x0d => b"\\r",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if escape.is_empty() {
            out.extend_from_slice(format!("\\u{b:04x}").as_bytes());
        } else {
            out.extend_from_slice(escape);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// The marker that replaces a redacted value.
pub const REDACTED: &str = "[REDACTED]";

/// At most this many keys of a request are kept in its summary.
pub const SUMMARY_MAX_KEYS: usize = 50;

/// Strings longer than this (in characters) are shortened in a summary.
pub const SUMMARY_MAX_STRING: usize = 512;

/// Substrings that make a key sensitive, compared after lower-casing and dropping `-`/`_`,
/// so `access_token`, `X-Api-Key`, `clientSecret` and `Authorization` are all caught.
const SENSITIVE: &[&str] = &[
    "password",
    "passwd",
    "token",
    "secret",
    "apikey",
    "credential",
    "authorization",
    "privatekey",
];

/// True when a key names a secret (case-insensitive, ignoring `-`, `_` and spaces).
pub fn is_sensitive_key(key: &str) -> bool {
    let norm: String = key
        .chars()
        .filter(|c| !matches!(c, '-' | '_' | ' ' | '.'))
        .flat_map(char::to_lowercase)
        .collect();
    SENSITIVE.iter().any(|s| norm.contains(s))
}

/// Replaces the value of every sensitive key, at any depth, with [`REDACTED`].
pub fn redact(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                if is_sensitive_key(k) {
                    *v = Value::String(REDACTED.to_owned());
                } else {
                    redact(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

/// Redacts a JSON object in place (convenience for `meta` and friends).
pub fn redact_map(map: &mut Map<String, Value>) {
    for (k, v) in map.iter_mut() {
        if is_sensitive_key(k) {
            *v = Value::String(REDACTED.to_owned());
        } else {
            redact(v);
        }
    }
}

fn shorten_strings(value: &mut Value) {
    match value {
        Value::String(s) => {
            let n = s.chars().count();
            if n > SUMMARY_MAX_STRING {
                let head: String = s.chars().take(SUMMARY_MAX_STRING).collect();
                *s = format!("{head}…(+{} chars)", n - SUMMARY_MAX_STRING);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(shorten_strings),
        Value::Object(map) => map.values_mut().for_each(shorten_strings),
        _ => {}
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Summarizes a raw design request for storage: secrets redacted at any depth, at most
/// [`SUMMARY_MAX_KEYS`] top-level keys in key order (the rest counted in `_truncated_keys`), long strings
/// shortened. A non-object request becomes `{"_type": ..., "_length"?: ...}` and never carries
/// its value, since a bare string could itself be a secret.
pub fn summarize_request(request: &Value) -> Map<String, Value> {
    let mut summary = Map::new();
    match request {
        Value::Object(map) => {
            // Sorted, so the summary does not depend on the publisher's key order (the create's
            // identity, an RFC 8785 hash, does not either).
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            for (k, v) in keys
                .into_iter()
                .take(SUMMARY_MAX_KEYS)
                .filter_map(|k| map.get_key_value(k))
            {
                let mut v = if is_sensitive_key(k) {
                    Value::String(REDACTED.to_owned())
                } else {
                    let mut v = v.clone();
                    redact(&mut v);
                    v
                };
                shorten_strings(&mut v);
                summary.insert(k.clone(), v);
            }
            if map.len() > SUMMARY_MAX_KEYS {
                summary.insert(
                    "_truncated_keys".to_owned(),
                    Value::from(map.len() - SUMMARY_MAX_KEYS),
                );
            }
        }
        other => {
            summary.insert("_type".to_owned(), Value::from(type_name(other)));
            match other {
                Value::Array(items) => {
                    summary.insert("_length".to_owned(), Value::from(items.len()));
                }
                Value::String(s) => {
                    summary.insert("_length".to_owned(), Value::from(s.chars().count()));
                }
                _ => {}
            }
        }
    }
    summary
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_sorts_by_utf16_and_formats_numbers_like_ecmascript() {
        let v: Value =
            serde_json::from_str(r#"{"b":1.0,"a":[1e21,1e-7,-0.0,4.50,"\u0001é"]}"#).unwrap();
        assert_eq!(
            String::from_utf8(canonical_json(&v)).unwrap(),
            "{\"a\":[1e+21,1e-7,0,4.5,\"\\u0001é\"],\"b\":1}"
        );
    }

    #[test]
    fn sensitive_keys_are_caught_in_any_spelling() {
        for k in [
            "password",
            "PASSWORD",
            "access_token",
            "X-Api-Key",
            "api_key",
            "clientSecret",
            "Authorization",
            "aws_credentials",
            "private_key",
        ] {
            assert!(is_sensitive_key(k), "{k}");
        }
        for k in ["tool_id", "feed_rate", "author", "operator"] {
            assert!(!is_sensitive_key(k), "{k}");
        }
    }

    #[test]
    fn summary_redacts_at_depth_and_caps_keys() {
        let mut req =
            json!({"a": {"b": [{"Password": "hunter2", "ok": 1}]}, "api_token": {"x": 1}});
        for i in 0..60 {
            req[format!("k{i:02}")] = json!(i);
        }
        let s = summarize_request(&req);
        let text = serde_json::to_string(&s).unwrap();
        assert!(!text.contains("hunter2"));
        assert_eq!(s["a"]["b"][0]["Password"], json!(REDACTED));
        assert_eq!(s["a"]["b"][0]["ok"], json!(1));
        assert_eq!(s["api_token"], json!(REDACTED));
        assert_eq!(s["_truncated_keys"], json!(62 - SUMMARY_MAX_KEYS));
        assert_eq!(s.len(), SUMMARY_MAX_KEYS + 1);
        // The kept keys are the first 50 in key order, whatever order the publisher used.
        assert!(s.contains_key("k47") && !s.contains_key("k48"));
    }

    #[test]
    fn summary_of_non_objects_never_keeps_the_value() {
        let s = summarize_request(&json!("sk-live-secret"));
        assert_eq!(
            s,
            json!({"_type": "string", "_length": 14})
                .as_object()
                .unwrap()
                .clone()
        );
        let s = summarize_request(&json!([1, 2, 3]));
        assert_eq!(s["_length"], json!(3));
        assert_eq!(summarize_request(&json!(null))["_type"], json!("null"));
    }
}
