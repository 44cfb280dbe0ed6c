//! What changed between two stored records: the JSON paths whose values differ, with the value
//! before and after. Pure: no I/O.

use serde::Serialize;
use serde_json::{Map, Value};

use super::hashing::{sha256_json, sha256_text};

/// Strings longer than this are shown by hash and size, not inline (G-code, long texts).
pub const INLINE_MAX: usize = 1024;

/// One changed path.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Change {
    /// RFC 6901 JSON Pointer of the value (`/meta/operator`).
    pub path: String,
    /// The value before (absent when the path was added).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before: Option<Value>,
    /// The value after (absent when the path was removed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<Value>,
}

/// The paths where `a` and `b` differ, in document order. Objects are compared key by key;
/// arrays element by element (a longer array adds paths, a shorter one removes them); any
/// other difference is one change at that path. Large strings and large subtrees are shown
/// by hash (see [`shown`]).
pub fn diff(a: &Value, b: &Value) -> Vec<Change> {
    let mut out = Vec::new();
    walk("", Some(a), Some(b), &mut out);
    out
}

fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

fn walk(path: &str, a: Option<&Value>, b: Option<&Value>, out: &mut Vec<Change>) {
    match (a, b) {
        (Some(x), Some(y)) if x == y => {}
        (Some(Value::Object(x)), Some(Value::Object(y))) => {
            let mut keys: Vec<&String> = x.keys().collect();
            keys.extend(y.keys().filter(|k| !x.contains_key(*k)));
            for k in keys {
                walk(&format!("{path}/{}", escape(k)), x.get(k), y.get(k), out);
            }
        }
        (Some(Value::Array(x)), Some(Value::Array(y))) => {
            for i in 0..x.len().max(y.len()) {
                walk(&format!("{path}/{i}"), x.get(i), y.get(i), out);
            }
        }
        (None, None) => {}
        (x, y) => out.push(Change {
            path: if path.is_empty() {
                "/".into()
            } else {
                path.into()
            },
            before: x.map(shown),
            after: y.map(shown),
        }),
    }
}

/// A value as a diff shows it: as it is, or for a string over [`INLINE_MAX`] bytes (or a
/// structure whose JSON is larger) `{"sha256": ..., "size_bytes": ...}`.
pub fn shown(v: &Value) -> Value {
    let summary = |sha: String, size: usize| {
        let mut m = Map::new();
        m.insert("sha256".into(), Value::String(sha));
        m.insert("size_bytes".into(), Value::from(size));
        Value::Object(m)
    };
    match v {
        Value::String(s) if s.len() > INLINE_MAX => summary(sha256_text(s), s.len()),
        Value::Object(_) | Value::Array(_) => {
            let size = serde_json::to_vec(v).map_or(0, |b| b.len());
            if size > INLINE_MAX {
                summary(sha256_json(v), size)
            } else {
                v.clone()
            }
        }
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths_before_and_after() {
        let a = json!({"meta": {"x": 1, "gone": true}, "list": [1, 2], "same": "s", "a/b": 1});
        let b = json!({"meta": {"x": 2, "new": null}, "list": [1], "same": "s", "a/b": 2});
        let d = diff(&a, &b);
        let paths: Vec<&str> = d.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(
            paths,
            ["/meta/x", "/meta/gone", "/meta/new", "/list/1", "/a~1b"]
        );
        assert_eq!(d[0].before, Some(json!(1)));
        assert_eq!(d[0].after, Some(json!(2)));
        assert_eq!(d[1].after, None);
        assert_eq!(d[2].before, None);
        assert_eq!(d[2].after, Some(Value::Null));
        assert!(diff(&a, &a).is_empty());
    }

    #[test]
    fn large_bodies_by_hash() {
        let big = "G1 X1\n".repeat(1000);
        let d = diff(&json!({"g": big}), &json!({"g": "G0"}));
        assert_eq!(
            d[0].before,
            Some(json!({"sha256": sha256_text(&big), "size_bytes": big.len()}))
        );
        assert_eq!(d[0].after, Some(json!("G0")));
    }
}
