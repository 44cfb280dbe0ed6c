//! The listing index: run summaries kept as empty objects whose **names** sort the way people
//! ask for runs, so that a key-ordered listing answers a page without reading a record.
//!
//! ```text
//! index/time/<L1>/<L2>/<L3>/<L4>/<entry>   every live run, newest first in key order
//! index/by-tool/<tool>/<T1>/<T2>/<entry>   the same, one tree per tool
//! index/by-id/<I1>/<entry>                 every live run, in run id order
//! ```
//!
//! The time levels are the hex digits of the **inverted** creation time in milliseconds (since
//! the year 0, 13 digits): `L1` = digits 0-4 (one directory per ~50 days), `L2`..`L4` two digits
//! each, and the entry name starts with the last two: a leaf holds the runs of 256 ms.
//! Ascending key order is newest first; oldest first is the same tree walked backwards. A
//! tool's tree is coarser: `T1` = digits 0-5 (~3 days), `T2` = digits 6-7, and the entry starts
//! with the last five, so a leaf holds one tool's runs of ~17 minutes. The id tree has one
//! level, run id hex digits 0-2 (4,096 leaves); the entry starts with digits 3-5.
//!
//! On the local store, `serve` does not write these entries on a command's path: it journals
//! them and folds them into the trees in the background ([`super::journal`]); readers merge
//! the journal over the trees.
//!
//! Why these sizes: every directory an entry needs must be made durable with it (on the local
//! store, by a `syncfs`), and a new directory costs several scattered block
//! writes where a new name in an existing one costs a share of one. The time tree makes a new
//! leaf every 256 ms whatever the rate; a tool's tree one per ~17 minutes; the id tree's 4,096
//! leaves all exist once a store holds some tens of thousands of runs. A page still reads only
//! a handful of directories of bounded size: the time leaf holds what the store takes in 256 ms,
//! a tool leaf what one tool takes in 17 minutes, an id leaf 1/4096 of the runs (244 at 10^6).
//!
//! Layout version 1 (until this layout) kept tool trees of four levels under `index/tool/` and
//! a two-level id tree under `index/id/`; see [`LAYOUT_VERSION`] and [`LEGACY_ROOTS`].
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
/// Root of the tool trees (one directory per tool).
pub const TOOLS_ROOT: &str = "index/by-tool";
/// Root of the id tree.
pub const ID_ROOT: &str = "index/by-id";
/// Written once a complete build of the index has finished (`rmos-runs reindex`, or the
/// worker's first start on a store that had none), holding the [`LAYOUT_VERSION`] it was built
/// with. Until it names the current layout a listing says it is partial.
pub const BUILT_MARKER: &str = "index/_built";
/// Version of the key layout, written in [`BUILT_MARKER`]. A store whose index was built with
/// an earlier layout is rebuilt (online, by `reindex`) and its old trees are removed.
pub const LAYOUT_VERSION: u32 = 2;
/// Roots of trees earlier layouts kept, relative to the store prefix: `reindex` removes them.
pub const LEGACY_ROOTS: [&str; 2] = ["index/tool", "index/id"];

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
            Tree::Tool(t) => format!("{TOOLS_ROOT}/{}", tool_dir(t)),
            Tree::ToolDir(d) => format!("{TOOLS_ROOT}/{d}"),
            Tree::Id => ID_ROOT.to_owned(),
        }
    }

    /// Directory levels between the root and the entries.
    pub fn depth(&self) -> usize {
        self.cuts().len() - 1
    }

    /// Where the key's digits (inverted time, or run id hex) are cut into directory levels:
    /// level `i` is `digits[cuts[i]..cuts[i + 1]]`, and the entry's lead digits run from the
    /// last cut to [`Tree::lead_end`].
    fn cuts(&self) -> &'static [usize] {
        match self {
            Tree::Time => &[0, 5, 7, 9, 11],
            Tree::Tool(_) | Tree::ToolDir(_) => &[0, 6, 8],
            Tree::Id => &[0, 3],
        }
    }

    /// End of the entry's lead digits.
    fn lead_end(&self) -> usize {
        match self {
            Tree::Time | Tree::Tool(_) | Tree::ToolDir(_) => 13,
            Tree::Id => 6,
        }
    }

    /// The directory levels and the lead digits of `digits` in this tree.
    fn split<'a>(&self, digits: &'a str) -> (Vec<&'a str>, &'a str) {
        let cuts = self.cuts();
        let dirs = cuts.windows(2).map(|w| &digits[w[0]..w[1]]).collect();
        let last = cuts[cuts.len() - 1];
        (dirs, &digits[last..self.lead_end()])
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

/// An entry's name after its lead digits, the same in every tree: the fixed fields
/// (`.<run_id>.<revision>...`), and the mode and tool (`.<mode>.<tool>`) when a name of
/// `lead` digits has room for them, else `.+.+`.
struct EntryTail {
    fixed: String,
    text: String,
}

impl EntryTail {
    fn of(s: &RunSummary) -> Self {
        let fixed = format!(
            ".{}.{}.{}.{}.{}.{}.{}",
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
        let text = format!(
            ".{}.{}",
            escape(s.mode.as_str()),
            escape(s.tool_id.as_str())
        );
        Self { fixed, text }
    }

    /// The entry name with lead digits `lead`.
    fn name(&self, lead: &str) -> String {
        let text = if lead.len() + self.fixed.len() + self.text.len() <= MAX_NAME {
            self.text.as_str()
        } else {
            ".+.+"
        };
        format!("{lead}{}{text}", self.fixed)
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

/// Every index key (relative to the store prefix) of a run with this summary: time, tool, id.
pub fn entry_keys(s: &RunSummary) -> Vec<String> {
    let tail = EntryTail::of(s);
    let time = inverted_hex(time_ms(&s.created_at_utc));
    [Tree::Time, Tree::Tool(s.tool_id.clone()), Tree::Id]
        .iter()
        .map(|tree| {
            let digits = match tree {
                Tree::Id => &s.run_id.as_str()[4..],
                _ => time.as_str(),
            };
            let (dirs, lead) = tree.split(digits);
            format!("{}/{}/{}", tree.root(), dirs.join("/"), tail.name(lead))
        })
        .collect()
}

/// The id tree's leaf directory and the name prefix shared by every entry of `run` there.
pub fn id_leaf(run: &RunId) -> (String, String) {
    let (dirs, lead) = Tree::Id.split(&run.as_str()[4..]);
    (
        format!("{}/{}", Tree::Id.root(), dirs.join("/")),
        format!("{lead}.{run}."),
    )
}

/// The directory levels and lead digits of `run` in the id tree.
pub fn id_position(run: &RunId) -> (Vec<String>, String) {
    let (dirs, lead) = Tree::Id.split(&run.as_str()[4..]);
    (
        dirs.into_iter().map(str::to_owned).collect(),
        lead.to_owned(),
    )
}

/// Every key (relative to the store prefix) an entry found under `name` in the id tree
/// stands for, in all three trees.
pub fn keys_of_id_entry(name: &str) -> Option<Vec<String>> {
    let e = parse_entry(name)?;
    let rest = name.split_once('.')?.1;
    let inv = inverted_hex(time_ms(&e.created_at_utc));
    let (id_dir, _) = id_leaf(&e.run_id);
    let in_time_tree = |tree: &Tree| {
        let (dirs, lead) = tree.split(&inv);
        format!("{}/{}/{lead}.{rest}", tree.root(), dirs.join("/"))
    };
    let mut keys = vec![in_time_tree(&Tree::Time), format!("{id_dir}/{name}")];
    if let Some(tool) = &e.tool_id {
        keys.push(in_time_tree(&Tree::Tool(tool.clone())));
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

    /// Where a walk of a time tree (`tree`: the time tree or a tool's) starts for runs created
    /// before `until` (newest first) or at or after `since` (oldest first): a position no
    /// matching entry is on the far side of.
    pub fn time_start(tree: &Tree, t: &Timestamp, descending: bool) -> Self {
        let inv = inverted_hex(time_ms(t));
        let (dirs, lead) = tree.split(&inv);
        let mut parts: Vec<String> = dirs.iter().map(|d| (*d).to_owned()).collect();
        // Entry names are `<lead>.<...>`: `<lead>` sorts before all of them, `<lead>/` after.
        parts.push(if descending {
            format!("{lead}/")
        } else {
            lead.to_owned()
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
    fn keys_have_the_layout_s_depths_and_leaf_spans() {
        let s = summary("2026-11-25T02:04:55.123Z", "T102");
        let keys = entry_keys(&s);
        let depth = |k: &str, root: &str| k.strip_prefix(root).map(|r| r.split('/').count() - 1);
        assert_eq!(depth(&keys[0], "index/time/"), Some(4), "{}", keys[0]);
        assert_eq!(
            depth(&keys[1], "index/by-tool/T102/"),
            Some(2),
            "{}",
            keys[1]
        );
        assert_eq!(depth(&keys[2], "index/by-id/"), Some(1), "{}", keys[2]);
        assert!(keys[2].starts_with("index/by-id/012/345.run_0123456789ab."));
        let (leaf, lead) = id_leaf(&s.run_id);
        assert_eq!(leaf, "index/by-id/012");
        assert_eq!(lead, "345.run_0123456789ab.");
        // A tool leaf spans 2^20 ms (~17.5 min): runs a minute apart share it, and the time
        // tree's leaves (256 ms) do not.
        let later = summary("2026-11-25T02:05:55.123Z", "T102");
        let leaf_of = |k: &str| k.rsplit_once('/').map(|(d, _)| d.to_owned());
        let later_keys = entry_keys(&later);
        assert_eq!(leaf_of(&keys[1]), leaf_of(&later_keys[1]));
        assert_ne!(leaf_of(&keys[0]), leaf_of(&later_keys[0]));
        // Every key an id entry stands for is one of the run's keys.
        let id_name = keys[2].rsplit('/').next().unwrap();
        let mut from_id = keys_of_id_entry(id_name).unwrap();
        from_id.sort();
        let mut all = keys.clone();
        all.sort();
        assert_eq!(from_id, all);
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
