//! The listing index: run summaries kept as empty objects whose **names** sort the way people
//! ask for runs, so that a key-ordered listing answers a page without reading a record.
//!
//! ```text
//! index/time/<L1>/<L2>/<L3>/<L4>/<entry>        every live run, newest first in key order
//! index/tool/<tool>/<L1>/<L2>/<L3>/<L4>/<entry> the same, one tree per tool
//! index/id/<I1>/<I2>/<entry>                    every live run, in run id order
//! ```
//!
//! The time levels are the hex digits of the **inverted** creation time in milliseconds (since
//! the year 0, 13 digits): `L1` = digits 0-4 (one directory per ~50 days), `L2`..`L4` two digits
//! each, and the entry name starts with the last two. Ascending key order is newest first;
//! oldest first is the same tree walked backwards. The id levels are run id hex digits 0-1 and
//! 2-3; the entry starts with digits 4-5. Every directory holds at most 256 subdirectories, and
//! a leaf holds the runs of 256 ms (time) or 1/65536 of the id space (id), so a page reads a
//! handful of small directories whatever the store's size.
//!
//! An entry's name is its run's summary:
//!
//! ```text
//! <lead>.<run_id>.<revision>.<created>.<updated>.<status>.<risk>.<explanation>.<mode>.<tool>
//! ```
//!
//! Times are hex milliseconds since the year 0 (`r<nanos>` appended when finer), `-` for none;
//! mode and tool escape every byte outside `[A-Za-z0-9_-]` as `=XX`; a mode or tool too long for
//! a file name is written `+`, and a page reads that one run's record instead. All entries of
//! one run sit next to each other (they share `<lead>.<run_id>.`), so a page sees every entry
//! of a run at once and keeps the highest revision: a change writes the new entry before the
//! record and removes the old one after it, and a reader never sees a run vanish mid-change.

use std::fmt;

use object_store::path::Path;
use serde::{Deserialize, Serialize};

use crate::domain::artifact::{ExplanationStatus, RiskLevel, RunArtifact, RunStatus, Timestamp};
use crate::domain::ids::{Mode, RunId, ToolId};

/// Top-level directory of the index under the store's prefix.
pub const INDEX_DIR: &str = "index";
/// Written once a complete build of the index has finished (`rmos-runs reindex`, or the
/// worker's first start on a store that had none). Until then a listing says it is partial.
pub const BUILT_MARKER: &str = "index/_built";

/// Milliseconds from 0000-01-01T00:00:00Z to the Unix epoch.
const YEAR0_MS: i64 = 62_167_219_200_000;
/// Largest value of the 13-digit time field.
const TIME_MAX: u64 = (1 << 52) - 1;
/// Longest entry name written (ext4 and most file systems allow 255 bytes).
const MAX_NAME: usize = 240;

/// In which order a listing returns runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// By creation time, newest first (the default).
    #[default]
    Newest,
    /// By creation time, oldest first.
    Oldest,
    /// By run id.
    Id,
}

impl Order {
    /// The protocol's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Order::Newest => "newest",
            Order::Oldest => "oldest",
            Order::Id => "id",
        }
    }
}

impl fmt::Display for Order {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One of the index trees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tree {
    /// All runs by creation time.
    Time,
    /// One tool's runs by creation time.
    Tool(ToolId),
    /// A tool's tree found by its directory name (repairs walk every tool's tree).
    ToolDir(String),
    /// All runs by id.
    Id,
}

impl Tree {
    /// Path of the tree's root, relative to the store prefix.
    pub fn root(&self) -> String {
        match self {
            Tree::Time => format!("{INDEX_DIR}/time"),
            Tree::Tool(t) => format!("{INDEX_DIR}/tool/{}", tool_dir(t)),
            Tree::ToolDir(d) => format!("{INDEX_DIR}/tool/{d}"),
            Tree::Id => format!("{INDEX_DIR}/id"),
        }
    }

    /// Directory levels between the root and the entries.
    pub fn depth(&self) -> usize {
        match self {
            Tree::Time | Tree::Tool(_) | Tree::ToolDir(_) => 4,
            Tree::Id => 2,
        }
    }

    /// Short tag used in cursors.
    fn tag(&self) -> &'static str {
        match self {
            Tree::Time => "t",
            Tree::Tool(_) | Tree::ToolDir(_) => "o",
            Tree::Id => "i",
        }
    }
}

/// What a listing shows of a run; everything here is in the run's index entries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// Run id.
    pub run_id: RunId,
    /// Creation time.
    pub created_at_utc: Timestamp,
    /// Last change.
    pub updated_at_utc: Option<Timestamp>,
    /// Revision.
    pub revision: u64,
    /// Mode.
    pub mode: Mode,
    /// Tool.
    pub tool_id: ToolId,
    /// Status.
    pub status: RunStatus,
    /// Risk level.
    pub risk_level: Option<RiskLevel>,
    /// Explanation status.
    pub explanation_status: ExplanationStatus,
}

impl From<&RunArtifact> for RunSummary {
    fn from(a: &RunArtifact) -> Self {
        Self {
            run_id: a.run_id.clone(),
            created_at_utc: a.created_at_utc,
            updated_at_utc: a.updated_at_utc,
            revision: a.revision,
            mode: a.mode.clone(),
            tool_id: a.tool_id.clone(),
            status: a.status,
            risk_level: a.decision.risk_level,
            explanation_status: a.explanation_status,
        }
    }
}

/// An index entry read back from its name. `mode` / `tool_id` are `None` when they were too
/// long for the name (the record has them).
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// Run id.
    pub run_id: RunId,
    /// Revision.
    pub revision: u64,
    /// Creation time.
    pub created_at_utc: Timestamp,
    /// Last change.
    pub updated_at_utc: Option<Timestamp>,
    /// Status.
    pub status: RunStatus,
    /// Risk level.
    pub risk_level: Option<RiskLevel>,
    /// Explanation status.
    pub explanation_status: ExplanationStatus,
    /// Mode, unless too long for the name.
    pub mode: Option<Mode>,
    /// Tool, unless too long for the name.
    pub tool_id: Option<ToolId>,
}

impl Entry {
    /// The summary, when the name carried all of it.
    pub fn summary(&self) -> Option<RunSummary> {
        Some(RunSummary {
            run_id: self.run_id.clone(),
            created_at_utc: self.created_at_utc,
            updated_at_utc: self.updated_at_utc,
            revision: self.revision,
            mode: self.mode.clone()?,
            tool_id: self.tool_id.clone()?,
            status: self.status,
            risk_level: self.risk_level,
            explanation_status: self.explanation_status,
        })
    }
}

/// Milliseconds since the year 0 (the creation time's sort key), clamped to the field.
fn time_ms(t: &Timestamp) -> u64 {
    let ms = t.0.timestamp_millis().saturating_add(YEAR0_MS);
    u64::try_from(ms).unwrap_or(0).min(TIME_MAX)
}

fn inverted_hex(ms: u64) -> String {
    format!("{:013x}", TIME_MAX - ms)
}

fn time_dirs(inv: &str) -> [&str; 4] {
    [&inv[0..5], &inv[5..7], &inv[7..9], &inv[9..11]]
}

/// A tool's directory name: its escaped id, or for an id too long for a file name `=h` and a
/// digest (`escape` never writes `=h`).
fn tool_dir(t: &ToolId) -> String {
    let e = escape(t.as_str());
    if e.len() <= 200 {
        e
    } else {
        use sha2::Digest;
        format!(
            "=h{}",
            hex::encode(&sha2::Sha256::digest(t.as_str().as_bytes())[..16])
        )
    }
}

/// `<hex ms since year 0>[r<nanos within the ms>]`.
fn encode_time(t: &Timestamp) -> String {
    let ms = time_ms(t);
    let nanos = t.0.timestamp_subsec_nanos() % 1_000_000;
    if nanos == 0 {
        format!("{ms:x}")
    } else {
        format!("{ms:x}r{nanos}")
    }
}

fn decode_time(s: &str) -> Option<Timestamp> {
    let (ms, nanos) = match s.split_once('r') {
        Some((ms, n)) => (ms, n.parse::<u32>().ok().filter(|n| *n < 1_000_000)?),
        None => (s, 0),
    };
    let ms = i64::try_from(u64::from_str_radix(ms, 16).ok()?).ok()? - YEAR0_MS;
    let t = chrono::DateTime::from_timestamp_millis(ms)?;
    let t = t.checked_add_signed(chrono::Duration::nanoseconds(i64::from(nanos)))?;
    Some(Timestamp(t))
}

/// Keeps `[A-Za-z0-9_-]`, writes every other byte as `=XX`: no `.` (the field separator), no
/// `/`, nothing `object_store` would percent-encode.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("={b:02X}"));
        }
    }
    out
}

fn unescape(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'=' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The entry name of a run in the tree whose lead digits are `lead`.
fn entry_name(lead: &str, s: &RunSummary) -> String {
    let fixed = format!(
        "{lead}.{}.{}.{}.{}.{}.{}.{}",
        s.run_id,
        s.revision,
        encode_time(&s.created_at_utc),
        s.updated_at_utc
            .as_ref()
            .map_or("-".to_owned(), encode_time),
        s.status.as_str(),
        s.risk_level.map_or("-", RiskLevel::as_str),
        s.explanation_status.as_str(),
    );
    let mode = escape(s.mode.as_str());
    let tool = escape(s.tool_id.as_str());
    if fixed.len() + mode.len() + tool.len() + 2 <= MAX_NAME {
        format!("{fixed}.{mode}.{tool}")
    } else {
        format!("{fixed}.+.+")
    }
}

/// Parses an entry name; `None` for anything that is not one (a stray or staged file).
pub fn parse_entry(name: &str) -> Option<Entry> {
    let parts: Vec<&str> = name.split('.').collect();
    let [
        _,
        run,
        rev,
        created,
        updated,
        status,
        risk,
        expl,
        mode,
        tool,
    ] = parts[..]
    else {
        return None;
    };
    let opt_text = |s: &str| (s != "+").then(|| unescape(s)).flatten();
    Some(Entry {
        run_id: RunId::parse(run).ok()?,
        revision: rev.parse().ok()?,
        created_at_utc: decode_time(created)?,
        updated_at_utc: match updated {
            "-" => None,
            u => Some(decode_time(u)?),
        },
        status: RunStatus::parse(status).ok()?,
        risk_level: match risk {
            "-" => None,
            r => Some(RiskLevel::parse(r).ok()?),
        },
        explanation_status: ExplanationStatus::parse(expl).ok()?,
        mode: match mode {
            "+" => None,
            m => Some(Mode::parse(&opt_text(m)?).ok()?),
        },
        tool_id: match tool {
            "+" => None,
            t => Some(ToolId::parse(&opt_text(t)?).ok()?),
        },
    })
}

/// Every index key (relative to the store prefix) of a run with this summary.
pub fn entry_keys(s: &RunSummary) -> Vec<String> {
    let inv = inverted_hex(time_ms(&s.created_at_utc));
    let id_hex = &s.run_id.as_str()[4..];
    let time_name = entry_name(&inv[11..13], s);
    let dirs = time_dirs(&inv).join("/");
    vec![
        format!("{}/{dirs}/{time_name}", Tree::Time.root()),
        format!(
            "{}/{dirs}/{time_name}",
            Tree::Tool(s.tool_id.clone()).root()
        ),
        format!(
            "{}/{}/{}/{}",
            Tree::Id.root(),
            &id_hex[0..2],
            &id_hex[2..4],
            entry_name(&id_hex[4..6], s)
        ),
    ]
}

/// The id tree's leaf directory and the name prefix shared by every entry of `run` there.
pub fn id_leaf(run: &RunId) -> (String, String) {
    let h = &run.as_str()[4..];
    (
        format!("{}/{}/{}", Tree::Id.root(), &h[0..2], &h[2..4]),
        format!("{}.{run}.", &h[4..6]),
    )
}

/// Every key (relative to the store prefix) an entry found under `name` in the id tree
/// stands for, in all three trees.
pub fn keys_of_id_entry(name: &str) -> Option<Vec<String>> {
    let e = parse_entry(name)?;
    let rest = name.split_once('.')?.1;
    let inv = inverted_hex(time_ms(&e.created_at_utc));
    let dirs = time_dirs(&inv).join("/");
    let (id_dir, _) = id_leaf(&e.run_id);
    let mut keys = vec![
        format!("{}/{dirs}/{}.{rest}", Tree::Time.root(), &inv[11..13]),
        format!("{id_dir}/{name}"),
    ];
    if let Some(tool) = &e.tool_id {
        keys.push(format!(
            "{}/{dirs}/{}.{rest}",
            Tree::Tool(tool.clone()).root(),
            &inv[11..13]
        ));
    }
    Some(keys)
}

/// An exclusive position in a tree: its directory components and the entry-name bound.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bound(pub Vec<String>);

impl Bound {
    /// Just past every entry of `run` (in the walk's direction) in the leaf `dir` (relative
    /// to the tree root) with lead digits `lead`.
    pub fn after_run(dirs: &[&str], lead: &str, run: &RunId, descending: bool) -> Self {
        let mut parts: Vec<String> = dirs.iter().map(|d| (*d).to_owned()).collect();
        // A revision always follows `<run>.` and starts with a digit: `:` sorts after every
        // digit, so `<lead>.<run>.:` is past all of the run's entries and before the next run's.
        parts.push(if descending {
            format!("{lead}.{run}.")
        } else {
            format!("{lead}.{run}.:")
        });
        Bound(parts)
    }

    /// Where a walk of a time tree starts for runs created before `until` (newest first) or at
    /// or after `since` (oldest first): a position no matching entry is on the far side of.
    pub fn time_start(t: &Timestamp, descending: bool) -> Self {
        let inv = inverted_hex(time_ms(t));
        let mut parts: Vec<String> = time_dirs(&inv).iter().map(|d| (*d).to_owned()).collect();
        // Entry names are `<lead>.<...>`: `<lead>` sorts before all of them, `<lead>/` after.
        parts.push(if descending {
            format!("{}/", &inv[11..13])
        } else {
            inv[11..13].to_owned()
        });
        Bound(parts)
    }

    /// The position of an entry key relative to its tree root, as a bound that excludes the
    /// entry's whole run.
    pub fn past_entry(tree: &Tree, rel_key: &str, run: &RunId, descending: bool) -> Option<Self> {
        let parts: Vec<&str> = rel_key.split('/').collect();
        if parts.len() != tree.depth() + 1 {
            return None;
        }
        let (dirs, leaf) = parts.split_at(tree.depth());
        let lead = leaf[0].split_once('.')?.0;
        Some(Self::after_run(dirs, lead, run, descending))
    }
}

/// The opaque `next_cursor` of a listing: which tree, where in it, and a digest of the
/// query it belongs to (a cursor used with other filters or another order is refused).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    /// Order of the listing.
    pub order: Order,
    /// Digest of the filters.
    pub query: u64,
    /// Exclusive position.
    pub bound: Bound,
}

impl Cursor {
    /// The wire form: `c1` and the hex of `<order>|<tree tag>|<query digest>|<bound>`.
    pub fn encode(&self, tree: &Tree) -> String {
        let text = format!(
            "{}|{}|{:016x}|{}",
            self.order.as_str(),
            tree.tag(),
            self.query,
            self.bound.0.join("/")
        );
        format!("c1{}", hex::encode(text))
    }

    /// Parses a cursor made by [`Cursor::encode`] for `tree`; `Err` names what is wrong.
    pub fn decode(s: &str, tree: &Tree) -> Result<Self, String> {
        let bad = || format!("cursor {:?} is not one this service issued", truncate(s));
        let raw = s.strip_prefix("c1").ok_or_else(bad)?;
        let text = String::from_utf8(hex::decode(raw).map_err(|_| bad())?).map_err(|_| bad())?;
        let mut it = text.splitn(4, '|');
        let (Some(order), Some(tag), Some(q), Some(bound)) =
            (it.next(), it.next(), it.next(), it.next())
        else {
            return Err(bad());
        };
        let order = match order {
            "newest" => Order::Newest,
            "oldest" => Order::Oldest,
            "id" => Order::Id,
            _ => return Err(bad()),
        };
        if tag != tree.tag() {
            return Err("cursor belongs to a listing with other filters or another order".into());
        }
        let query = u64::from_str_radix(q, 16).map_err(|_| bad())?;
        let parts: Vec<String> = bound.split('/').map(str::to_owned).collect();
        let valid = parts.len() == tree.depth() + 1
            && parts.iter().all(|p| {
                !p.is_empty()
                    && p.len() <= 256
                    && p.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-=:+".contains(&b))
            });
        if !valid {
            return Err(bad());
        }
        Ok(Self {
            order,
            query,
            bound: Bound(parts),
        })
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

/// FNV-1a over the text: a stable digest for cursors (not a security boundary).
pub fn digest(text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// `<prefix>/<rel>` as an object path.
pub fn under(prefix: &Path, rel: &str) -> Path {
    let mut parts: Vec<object_store::path::PathPart<'_>> = prefix.parts().collect();
    parts.extend(rel.split('/').map(object_store::path::PathPart::from));
    Path::from_iter(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(created: &str, tool: &str) -> RunSummary {
        RunSummary {
            run_id: RunId::parse("run_0123456789ab").unwrap(),
            created_at_utc: Timestamp::parse(created).unwrap(),
            updated_at_utc: Some(Timestamp::parse("2026-11-25T02:04:55.123456Z").unwrap()),
            revision: 3,
            mode: Mode::parse("cam").unwrap(),
            tool_id: ToolId::parse(tool).unwrap(),
            status: RunStatus::Ok,
            risk_level: Some(RiskLevel::Red),
            explanation_status: ExplanationStatus::Ready,
        }
    }

    #[test]
    fn entry_names_round_trip() {
        for (created, tool) in [
            ("2026-11-25T02:04:55.123Z", "T102"),
            ("0001-01-01T00:00:00Z", "a.b:c/d-e_f"),
            ("9999-12-31T23:59:59.999999Z", "T"),
        ] {
            let s = summary(created, tool);
            for key in entry_keys(&s) {
                let name = key.rsplit('/').next().unwrap();
                let e = parse_entry(name).unwrap_or_else(|| panic!("{name}"));
                assert_eq!(e.summary().as_ref(), Some(&s), "{name}");
                assert!(!name.contains('~') && name.len() <= MAX_NAME);
                let p = Path::from(key.as_str());
                assert_eq!(p.as_ref(), key, "object_store keeps the key as written");
            }
        }
    }

    #[test]
    fn long_tools_leave_the_record_to_tell() {
        let s = summary("2026-11-25T02:04:55.123Z", &"x.".repeat(64));
        let name = entry_keys(&s)[0].rsplit('/').next().unwrap().to_owned();
        let e = parse_entry(&name).unwrap();
        assert_eq!(e.tool_id, None);
        assert_eq!(e.summary(), None);
    }

    #[test]
    fn newer_sorts_first_and_bounds_fall_between_runs() {
        let a = entry_keys(&summary("2026-11-25T02:04:55.124Z", "T"))[0].clone();
        let b = entry_keys(&summary("2026-11-25T02:04:55.123Z", "T"))[0].clone();
        assert!(a < b);
        let rel = b.strip_prefix("index/time/").unwrap();
        let run = RunId::parse("run_0123456789ab").unwrap();
        let asc = Bound::past_entry(&Tree::Time, rel, &run, false).unwrap();
        let desc = Bound::past_entry(&Tree::Time, rel, &run, true).unwrap();
        assert!(asc.0.join("/").as_str() > rel);
        assert!(desc.0.join("/").as_str() < rel);
        let next_run = rel.replace("run_0123456789ab", "run_0123456789ac");
        assert!(asc.0.join("/") < next_run);
    }

    #[test]
    fn cursors_round_trip_and_refuse_other_trees() {
        let c = Cursor {
            order: Order::Newest,
            query: 42,
            bound: Bound(vec![
                "a".into(),
                "b".into(),
                "c".into(),
                "d".into(),
                "e.:".into(),
            ]),
        };
        let s = c.encode(&Tree::Time);
        assert_eq!(Cursor::decode(&s, &Tree::Time), Ok(c));
        assert!(Cursor::decode(&s, &Tree::Id).is_err());
        assert!(Cursor::decode("run_0123456789ab", &Tree::Time).is_err());
    }
}
