//! Property: redelivering any command of a sequence (any number of times, anywhere later in
//! the sequence) leaves the final record exactly as the sequence without redeliveries.

use proptest::prelude::*;
use serde_json::json;

use super::artifact::{StoredRecord, Timestamp};
use super::command::{Command, CommandKind, Context, Decision, Limits};
use super::ids::{CommandId, RequestId};

#[derive(Clone, Debug)]
enum Step {
    Patch(u8, Option<i32>),
    Advisory(u8),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0u8..4, prop::option::of(any::<i32>())).prop_map(|(k, v)| Step::Patch(k, v)),
        (0u8..3).prop_map(Step::Advisory),
    ]
}

const RUN: &str = "run_00000000abcd";

fn command(i: usize, s: &Step) -> (Command, CommandId) {
    let (kind, body) = match s {
        Step::Patch(k, v) => (
            CommandKind::PatchMeta,
            json!({"run_id": RUN, "meta_updates": {format!("k{k}"): v}}),
        ),
        Step::Advisory(a) => (
            CommandKind::Advisory,
            json!({"run_id": RUN, "advisory_id": format!("adv_00000000000{a}"),
                   "kind": "note", "body": {"n": a}}),
        ),
    };
    let id = CommandId::parse(&format!("msg-{i}")).unwrap();
    let cmd = Command::decode(kind, body.to_string().as_bytes(), Some(id.as_str())).unwrap();
    (cmd, id)
}

fn apply(current: Option<StoredRecord>, cmd: &Command, id: &CommandId) -> Option<StoredRecord> {
    let ctx = Context {
        now: Timestamp::parse("2026-01-01T00:00:00Z").unwrap(),
        request_id: RequestId::parse("req-1").unwrap(),
        command_id: Some(id.clone()),
        stream: None,
        actor: None,
        limits: Limits::default(),
        redelivered: false,
    };
    match cmd.decide(current.as_ref(), &ctx) {
        Ok(Decision::Write { record, .. }) => Some(record),
        Ok(Decision::Unchanged { .. }) => current,
        Err(e) => panic!("unexpected rejection {e}"),
    }
}

proptest! {
    #[test]
    fn redelivery_changes_nothing(
        steps in prop::collection::vec(step(), 1..12),
        dups in prop::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>()), 0..8),
    ) {
        let create = Command::decode(
            CommandKind::Create,
            json!({"mode": "cam", "tool_id": "T1", "status": "OK", "run_id": RUN}).to_string().as_bytes(),
            None,
        ).unwrap();
        let create_id = CommandId::parse("create").unwrap();
        let cmds: Vec<(Command, CommandId)> =
            steps.iter().enumerate().map(|(i, s)| command(i, s)).collect();

        // Without redeliveries.
        let mut clean = apply(None, &create, &create_id);
        for (c, id) in &cmds {
            clean = apply(clean, c, id);
        }

        // With redeliveries: after position p, redeliver an earlier (or the same) command.
        let mut order: Vec<usize> = (0..cmds.len()).collect();
        for (at, which) in &dups {
            let p = at.index(order.len());
            let original = order[which.index(p + 1)];
            order.insert(p + 1, original);
        }
        let mut dirty = apply(None, &create, &create_id);
        dirty = apply(dirty, &create, &create_id);
        for i in order {
            let (c, id) = &cmds[i];
            dirty = apply(dirty, c, id);
        }
        prop_assert_eq!(clean, dirty);
    }
}

/// A run forgets the patches whose messages the stream has acknowledged, keeps the others,
/// and still recognises a redelivery of any of those it keeps.
#[test]
fn acknowledged_patches_are_forgotten_the_others_kept() {
    use super::command::StreamPosition;
    let create = Command::decode(
        CommandKind::Create,
        json!({"mode": "cam", "tool_id": "T1", "status": "OK", "run_id": RUN})
            .to_string()
            .as_bytes(),
        None,
    )
    .unwrap();
    let decide = |current: Option<StoredRecord>, n: u64, acked_through: u64| {
        let id = CommandId::parse(&format!("js:RMOS_RUNS:{n}")).unwrap();
        let patch = Command::decode(
            CommandKind::PatchMeta,
            json!({"run_id": RUN, "meta_updates": {"n": n}})
                .to_string()
                .as_bytes(),
            None,
        )
        .unwrap();
        let ctx = Context {
            command_id: Some(id),
            stream: Some(StreamPosition {
                seq: n,
                acked_through,
            }),
            ..Context::now()
        };
        patch.decide(current.as_ref(), &ctx).unwrap()
    };
    let write = |d: Decision| match d {
        Decision::Write { record, .. } => Some(record),
        Decision::Unchanged { .. } => panic!("expected a write"),
    };
    let mut rec = match create.decide(None, &Context::now()).unwrap() {
        Decision::Write { record, .. } => Some(record),
        Decision::Unchanged { .. } => unreachable!(),
    };
    for n in 1..=10 {
        rec = write(decide(rec, n, 0));
    }
    let seqs = |r: &Option<StoredRecord>| match r {
        Some(StoredRecord::Live(a)) => a.applied_commands.iter().filter_map(|c| c.seq).collect(),
        _ => Vec::new(),
    };
    assert_eq!(seqs(&rec), (1..=10).collect::<Vec<u64>>());
    // The floor reaches 8: 1-8 are forgotten, 9 and 10 kept, 11 added.
    rec = write(decide(rec, 11, 8));
    assert_eq!(seqs(&rec), vec![9, 10, 11]);
    // A redelivery of 10 (not yet acknowledged) changes nothing.
    assert!(matches!(
        decide(rec.clone(), 10, 8),
        Decision::Unchanged { .. }
    ));
    // Stored as {"id", "seq"}; ids stored bare by earlier versions still load.
    let Some(StoredRecord::Live(a)) = &rec else {
        panic!("live")
    };
    let v = serde_json::to_value(&a.applied_commands).unwrap();
    assert_eq!(v[0], json!({"id": "js:RMOS_RUNS:9", "seq": 9}));
    let old: Vec<super::artifact::AppliedCommand> =
        serde_json::from_value(json!(["msg-1", {"id": "msg-2", "seq": 2}])).unwrap();
    assert_eq!(old[0].seq, None);
    assert_eq!(old[1].seq, Some(2));
}

/// A patch for a run that never existed and one for a deleted run are both `not_found`, told
/// apart by kind (the transport waits for the first's create, never for the second).
#[test]
fn missing_and_deleted_runs_are_told_apart_by_kind() {
    use super::error::{RejectCode, RejectKind};
    let create = Command::decode(
        CommandKind::Create,
        json!({"mode": "cam", "tool_id": "T1", "status": "OK", "run_id": RUN})
            .to_string()
            .as_bytes(),
        None,
    )
    .unwrap();
    let delete = Command::decode(
        CommandKind::Delete,
        json!({"run_id": RUN, "reason": "retention"})
            .to_string()
            .as_bytes(),
        None,
    )
    .unwrap();
    let (patch, id) = command(0, &Step::Patch(1, Some(1)));
    let ctx = Context::now();
    let e = patch.decide(None, &ctx).unwrap_err();
    assert_eq!(
        (e.code, e.kind),
        (RejectCode::NotFound, RejectKind::Missing)
    );
    let live = apply(None, &create, &id);
    let dead = apply(live, &delete, &CommandId::parse("del-1").unwrap());
    let e = patch.decide(dead.as_ref(), &ctx).unwrap_err();
    assert_eq!(
        (e.code, e.kind),
        (RejectCode::NotFound, RejectKind::Deleted)
    );
}
