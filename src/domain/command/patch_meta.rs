//! `patch_meta`: apply an RFC 7396 JSON Merge Patch to a run's `meta`.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::{Context, Decision, EventKind, live, remember};
use crate::domain::artifact::{JsonMap, StoredRecord};
use crate::domain::error::Rejection;
use crate::domain::hashing::redact_map;
use crate::domain::ids::RunId;

/// A decoded patch_meta command.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchMeta {
    /// The run to patch.
    pub run_id: RunId,
    /// The merge patch (`null` removes a key).
    pub meta_updates: JsonMap,
    /// When given, the patch applies only to this revision.
    #[serde(default)]
    pub expected_revision: Option<u64>,
}

/// RFC 7396: merges `patch` into `target`.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

impl PatchMeta {
    /// Decides the patch against what is stored.
    pub fn decide(
        &self,
        current: Option<&StoredRecord>,
        ctx: &Context,
    ) -> Result<Decision, Rejection> {
        let artifact = live(current, &self.run_id)?;
        if let Some(id) = &ctx.command_id
            && artifact.applied_commands.iter().any(|c| &c.id == id)
        {
            return Ok(Decision::Unchanged {
                event: EventKind::MetaPatched,
            });
        }
        if let Some(expected) = self.expected_revision
            && expected != artifact.revision
        {
            return Err(Rejection::conflict(format!(
                "run {} is at revision {}, not the expected {expected}",
                self.run_id, artifact.revision
            )));
        }
        let mut next = artifact.clone();
        let mut meta = Value::Object(std::mem::take(&mut next.meta));
        merge_patch(&mut meta, &Value::Object(self.meta_updates.clone()));
        next.meta = match meta {
            Value::Object(m) => m,
            _ => JsonMap::new(),
        };
        redact_map(&mut next.meta);
        ctx.limits.check_meta(&next.meta)?;
        next.revision += 1;
        next.updated_at_utc = Some(ctx.now);
        next.schema_version = crate::domain::artifact::SCHEMA_VERSION;
        if let Some(id) = &ctx.command_id {
            remember(
                &mut next.applied_commands,
                id,
                ctx.stream,
                ctx.limits.remembered_commands,
            );
        }
        Ok(Decision::Write {
            record: StoredRecord::Live(Box::new(next)),
            blobs: Vec::new(),
            event: EventKind::MetaPatched,
            released: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn rfc7396_examples() {
        // The test cases of RFC 7396 Appendix A.
        let cases = [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (
                json!({"a":"b","b":"c"}),
                json!({"a":null}),
                json!({"b":"c"}),
            ),
            (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
            (
                json!({"a":{"b":"c"}}),
                json!({"a":{"b":"d","c":null}}),
                json!({"a":{"b":"d"}}),
            ),
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a":"b"}), json!(["c"]), json!(["c"])),
            (json!({"a":"foo"}), json!(null), json!(null)),
            (json!({"a":"foo"}), json!("bar"), json!("bar")),
            (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
            (json!([1, 2]), json!({"a":"b","c":null}), json!({"a":"b"})),
            (
                json!({}),
                json!({"a":{"bb":{"ccc":null}}}),
                json!({"a":{"bb":{}}}),
            ),
        ];
        for (target, patch, expected) in cases {
            let mut t = target.clone();
            merge_patch(&mut t, &patch);
            assert_eq!(t, expected, "{target} + {patch}");
        }
    }

    fn json_leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i32>().prop_map(|i| json!(i)),
            "[a-z]{0,4}".prop_map(Value::String),
        ]
    }

    fn json_value() -> impl Strategy<Value = Value> {
        json_leaf().prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
                prop::collection::btree_map("[a-c]", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn has_null_member(v: &Value) -> bool {
        match v {
            Value::Object(m) => m.values().any(|x| x.is_null() || has_null_member(x)),
            Value::Array(a) => a.iter().any(has_null_member),
            _ => false,
        }
    }

    proptest! {
        /// Applying the same patch twice gives the same result as applying it once.
        #[test]
        fn merge_patch_is_idempotent(target in json_value(), patch in json_value()) {
            let mut once = target.clone();
            merge_patch(&mut once, &patch);
            let mut twice = once.clone();
            merge_patch(&mut twice, &patch);
            prop_assert_eq!(once, twice);
        }

        /// A patch with no nulls, applied to anything, yields the patch's own keys and values.
        #[test]
        fn patch_values_win(target in json_value(), patch in json_value()) {
            prop_assume!(patch.is_object() && !has_null_member(&patch));
            let mut t = target.clone();
            merge_patch(&mut t, &patch);
            let mut from_nothing = Value::Null;
            merge_patch(&mut from_nothing, &patch);
            for (k, v) in patch.as_object().unwrap() {
                if !v.is_object() {
                    prop_assert_eq!(&t[k], v);
                } else {
                    prop_assert!(t[k].is_object());
                }
            }
            prop_assert!(from_nothing.is_object());
        }

        /// A null member always removes the key.
        #[test]
        fn null_removes(target in json_value(), key in "[a-c]") {
            let mut t = target.clone();
            merge_patch(&mut t, &json!({ key.clone(): null }));
            prop_assert!(t.get(&key).is_none());
        }
    }
}
