//! A streaming check that bytes are RFC 8785 (JCS) canonical JSON, fed chunk by chunk.
//!
//! A JSON body staged by claim check (an advisory's `body_ref`, a create's `opplan_ref`) is
//! stored as its bytes, exactly as staged, and named by their SHA-256. Inline, the worker
//! canonicalizes such a body before hashing it; a staged body may be far larger than the
//! worker should hold, so instead the publisher stages the canonical form and the worker checks,
//! as the bytes pass, that they are it. Then the stored blob, its SHA-256 and `verify` mean the
//! same whichever way the body came in. Memory is bounded by the nesting depth and the longest
//! object key, never by the body's size.
//!
//! Canonical here means what [`super::hashing::canonical_json`] writes: no whitespace outside
//! strings, object members sorted by the UTF-16 code units of their keys (no duplicates),
//! strings with only the escapes JCS uses (`\"`, `\\`, `\b`, `\t`, `\n`, `\f`, `\r` and
//! `\u00xx` in lower case for the other control characters) and valid UTF-8, numbers as
//! ECMAScript prints them.

use std::cmp::Ordering;

/// Longest object key a checked body may hold (keys are kept to check their order).
pub const MAX_KEY_BYTES: usize = 64 * 1024;
/// Longest number a canonical body can hold (ECMAScript's longest is 24 characters).
const MAX_NUMBER_BYTES: usize = 32;

/// Why bytes are not canonical JSON: the reason and where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not RFC 8785 canonical JSON at byte {offset}: {reason}")]
pub struct NotCanonical {
    /// Offset of the offending byte from the start of the body.
    pub offset: u64,
    /// What is wrong there.
    pub reason: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// A value must start here (top level, after `:`, after `,` in an array).
    Value,
    /// After `[`: a value or `]`.
    ValueOrEnd,
    /// After `{`: a key or `}`.
    KeyOrEnd,
    /// After `,` in an object: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// After a value inside a container: `,` or its closing bracket.
    After,
    /// Inside a string.
    Str,
    /// Inside a number.
    Number,
    /// Inside `true`, `false` or `null`.
    Literal,
    /// The top-level value is complete.
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Escape {
    None,
    /// After a backslash.
    Backslash,
    /// After `\u` and this many hex digits with this value so far.
    Unicode(u8, u32),
}

enum Frame {
    /// The previous key's bytes (valid UTF-8), or `None` before the first.
    Object {
        prev_key: Option<Vec<u8>>,
    },
    Array,
}

/// The checker: feed it the body's bytes in order ([`CanonicalCheck::feed`]), then
/// [`CanonicalCheck::finish`].
pub struct CanonicalCheck {
    state: State,
    stack: Vec<Frame>,
    max_depth: usize,
    object_only: bool,
    offset: u64,
    escape: Escape,
    /// UTF-8 continuation bytes still expected, and the range the next one must be in.
    utf8_left: u8,
    utf8_range: (u8, u8),
    in_key: bool,
    key: Vec<u8>,
    number: Vec<u8>,
    literal: &'static [u8],
    literal_at: usize,
    /// Key buffers of closed objects, reused (a body of many small objects would otherwise
    /// allocate one per key).
    spare: Vec<Vec<u8>>,
}

impl CanonicalCheck {
    /// A checker of one JSON value nested at most `max_depth` levels (`{}` and `[]` count one);
    /// `object_only`: the value must be an object.
    pub fn new(max_depth: usize, object_only: bool) -> Self {
        Self {
            state: State::Value,
            stack: Vec::new(),
            max_depth,
            object_only,
            offset: 0,
            escape: Escape::None,
            utf8_left: 0,
            utf8_range: (0x80, 0xbf),
            in_key: false,
            key: Vec::new(),
            number: Vec::new(),
            literal: b"",
            literal_at: 0,
            spare: Vec::new(),
        }
    }

    fn fail(&self, reason: impl Into<String>) -> NotCanonical {
        NotCanonical {
            offset: self.offset,
            reason: reason.into(),
        }
    }

    /// Checks the next bytes of the body.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), NotCanonical> {
        let mut i = 0;
        while i < bytes.len() {
            if self.state == State::Str
                && self.escape == Escape::None
                && self.utf8_left == 0
                && !self.in_key
            {
                // Most of a large body is string text: a run of printable ASCII needs no
                // state, only a look for where it ends.
                let run = bytes[i..]
                    .iter()
                    .position(|&b| b == b'"' || b == b'\\' || !(0x20..0x80).contains(&b))
                    .unwrap_or(bytes.len() - i);
                i += run;
                self.offset += run as u64;
                if i == bytes.len() {
                    break;
                }
            }
            self.byte(bytes[i])?;
            self.offset += 1;
            i += 1;
        }
        Ok(())
    }

    /// The body ended: checks that it held one complete value.
    pub fn finish(&mut self) -> Result<(), NotCanonical> {
        if self.state == State::Number && self.stack.is_empty() {
            self.end_number()?;
        }
        match self.state {
            State::Done => Ok(()),
            _ => Err(self.fail("the body ends before its JSON value does")),
        }
    }

    fn byte(&mut self, b: u8) -> Result<(), NotCanonical> {
        match self.state {
            State::Str => return self.string_byte(b),
            State::Literal => {
                if self.literal.get(self.literal_at) != Some(&b) {
                    return Err(self.fail(format!(
                        "expected {:?}",
                        String::from_utf8_lossy(self.literal)
                    )));
                }
                self.literal_at += 1;
                if self.literal_at == self.literal.len() {
                    self.value_done();
                }
                return Ok(());
            }
            State::Number => {
                if matches!(b, b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-') {
                    if self.number.len() >= MAX_NUMBER_BYTES {
                        return Err(self.fail("a number longer than ECMAScript prints any"));
                    }
                    self.number.push(b);
                    return Ok(());
                }
                self.end_number()?;
                // The byte that ended the number is read in the state after it.
            }
            _ => {}
        }
        if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            return Err(self.fail("whitespace outside a string"));
        }
        match self.state {
            State::Value | State::ValueOrEnd => {
                if self.state == State::ValueOrEnd && b == b']' {
                    return self.close(b);
                }
                self.start_value(b)
            }
            State::KeyOrEnd | State::Key => {
                if self.state == State::KeyOrEnd && b == b'}' {
                    return self.close(b);
                }
                if b != b'"' {
                    return Err(self.fail("expected an object key"));
                }
                self.in_key = true;
                self.key.clear();
                self.state = State::Str;
                Ok(())
            }
            State::Colon => {
                if b != b':' {
                    return Err(self.fail("expected ':' after an object key"));
                }
                self.state = State::Value;
                Ok(())
            }
            State::After => match (b, self.stack.last()) {
                (b',', Some(Frame::Object { .. })) => {
                    self.state = State::Key;
                    Ok(())
                }
                (b',', Some(Frame::Array)) => {
                    self.state = State::Value;
                    Ok(())
                }
                (b'}' | b']', _) => self.close(b),
                _ => Err(self.fail("expected ',' or the end of the object or array")),
            },
            State::Done => Err(self.fail("more after the JSON value")),
            State::Str | State::Literal | State::Number => {
                Err(self.fail("internal: unexpected state"))
            }
        }
    }

    fn start_value(&mut self, b: u8) -> Result<(), NotCanonical> {
        if self.object_only && self.offset == 0 && b != b'{' {
            return Err(self.fail("expected a JSON object"));
        }
        match b {
            b'{' | b'[' => {
                if self.stack.len() >= self.max_depth {
                    return Err(self.fail(format!(
                        "nested deeper than {} levels (max_json_depth)",
                        self.max_depth
                    )));
                }
                if b == b'{' {
                    self.stack.push(Frame::Object { prev_key: None });
                    self.state = State::KeyOrEnd;
                } else {
                    self.stack.push(Frame::Array);
                    self.state = State::ValueOrEnd;
                }
            }
            b'"' => {
                self.in_key = false;
                self.state = State::Str;
            }
            b'-' | b'0'..=b'9' => {
                self.number.clear();
                self.number.push(b);
                self.state = State::Number;
            }
            b't' | b'f' | b'n' => {
                self.literal = match b {
                    b't' => b"true",
                    b'f' => b"false",
                    _ => b"null",
                };
                self.literal_at = 1;
                self.state = State::Literal;
            }
            _ => return Err(self.fail("expected a JSON value")),
        }
        Ok(())
    }

    fn close(&mut self, b: u8) -> Result<(), NotCanonical> {
        let ok = matches!(
            (b, self.stack.last()),
            (b'}', Some(Frame::Object { .. })) | (b']', Some(Frame::Array))
        );
        if !ok {
            return Err(self.fail(format!("unexpected '{}'", b as char)));
        }
        if let Some(Frame::Object {
            prev_key: Some(mut k),
        }) = self.stack.pop()
        {
            k.clear();
            self.spare.push(k);
        }
        self.value_done();
        Ok(())
    }

    fn value_done(&mut self) {
        self.state = if self.stack.is_empty() {
            State::Done
        } else {
            State::After
        };
    }

    fn end_number(&mut self) -> Result<(), NotCanonical> {
        let text = std::str::from_utf8(&self.number).unwrap_or("");
        // Most numbers are small integers, canonical when written plainly (below 2^53 a double
        // holds them exactly and ECMAScript prints every digit): no float parse needed.
        let digits = text.strip_prefix('-').unwrap_or(text);
        let plain_integer = !digits.is_empty()
            && digits.len() <= 15
            && digits.bytes().all(|b| b.is_ascii_digit())
            && (digits == "0" && text == "0" || !digits.starts_with('0'));
        if !plain_integer {
            let parsed = text.parse::<f64>().ok().filter(|f| f.is_finite());
            let ok =
                parsed.is_some_and(|f| super::hashing::with_canonical_number(f, |c| c == text));
            if !ok {
                return Err(NotCanonical {
                    offset: self.offset - self.number.len() as u64,
                    reason: match parsed {
                        Some(f) => format!(
                            "the number {text} is written {} in canonical form",
                            super::hashing::canonical_number(f)
                        ),
                        None => format!("{text:?} is not a JSON number"),
                    },
                });
            }
        }
        self.value_done();
        Ok(())
    }

    fn string_byte(&mut self, b: u8) -> Result<(), NotCanonical> {
        if self.utf8_left > 0 {
            let (lo, hi) = self.utf8_range;
            if b < lo || b > hi {
                return Err(self.fail("invalid UTF-8"));
            }
            self.utf8_left -= 1;
            self.utf8_range = (0x80, 0xbf);
            return self.key_byte(b);
        }
        match self.escape {
            Escape::Backslash => {
                let decoded = match b {
                    b'"' => b'"',
                    b'\\' => b'\\',
                    b'b' => 0x08,
                    b't' => 0x09,
                    b'n' => 0x0a,
                    b'f' => 0x0c,
                    b'r' => 0x0d,
                    b'u' => {
                        self.escape = Escape::Unicode(0, 0);
                        return Ok(());
                    }
                    _ => {
                        return Err(self.fail(format!(
                            "the escape \\{} is not canonical (or not JSON)",
                            b as char
                        )));
                    }
                };
                self.escape = Escape::None;
                return self.key_byte(decoded);
            }
            Escape::Unicode(n, v) => {
                let digit = match b {
                    b'0'..=b'9' => b - b'0',
                    b'a'..=b'f' => b - b'a' + 10,
                    _ => {
                        return Err(self.fail(
                            "a \\u escape takes four lower-case hex digits in canonical form",
                        ));
                    }
                };
                let v = v * 16 + u32::from(digit);
                if n < 3 {
                    self.escape = Escape::Unicode(n + 1, v);
                    return Ok(());
                }
                self.escape = Escape::None;
                // Only the control characters without a short escape are written \u00xx.
                let short = matches!(v, 0x08 | 0x09 | 0x0a | 0x0c | 0x0d);
                if v >= 0x20 || short {
                    return Err(self.fail(format!(
                        "\\u{v:04x} is written {} in canonical form",
                        if short {
                            "with its short escape"
                        } else {
                            "as the character itself"
                        }
                    )));
                }
                return self.key_byte(v as u8);
            }
            Escape::None => {}
        }
        match b {
            b'"' => {
                if self.in_key {
                    self.end_key()?;
                    self.state = State::Colon;
                } else {
                    self.value_done();
                }
                Ok(())
            }
            b'\\' => {
                self.escape = Escape::Backslash;
                Ok(())
            }
            0x00..=0x1f => Err(self.fail("a control character not escaped in a string")),
            0x20..=0x7f => self.key_byte(b),
            _ => {
                let (left, range) = match b {
                    0xc2..=0xdf => (1, (0x80, 0xbf)),
                    0xe0 => (2, (0xa0, 0xbf)),
                    0xe1..=0xec | 0xee..=0xef => (2, (0x80, 0xbf)),
                    0xed => (2, (0x80, 0x9f)),
                    0xf0 => (3, (0x90, 0xbf)),
                    0xf1..=0xf3 => (3, (0x80, 0xbf)),
                    0xf4 => (3, (0x80, 0x8f)),
                    _ => return Err(self.fail("invalid UTF-8")),
                };
                self.utf8_left = left;
                self.utf8_range = range;
                self.key_byte(b)
            }
        }
    }

    /// Keeps a byte of the key being read (string values are not kept).
    fn key_byte(&mut self, b: u8) -> Result<(), NotCanonical> {
        if self.in_key {
            if self.key.len() >= MAX_KEY_BYTES {
                return Err(self.fail(format!(
                    "an object key longer than {MAX_KEY_BYTES} bytes (the most a staged body may use)"
                )));
            }
            self.key.push(b);
        }
        Ok(())
    }

    fn end_key(&mut self) -> Result<(), NotCanonical> {
        self.in_key = false;
        let offset = self.offset;
        let Some(Frame::Object { prev_key }) = self.stack.last_mut() else {
            return Err(self.fail("internal: a key outside an object"));
        };
        if let Some(prev) = prev_key.as_ref() {
            match utf16_cmp(prev, &self.key) {
                Ordering::Less => {}
                Ordering::Equal => {
                    return Err(NotCanonical {
                        offset,
                        reason: format!(
                            "the key {:?} appears twice in one object",
                            String::from_utf8_lossy(&self.key)
                        ),
                    });
                }
                Ordering::Greater => {
                    return Err(NotCanonical {
                        offset,
                        reason: format!(
                            "the key {:?} comes after {:?}: members are sorted by their keys' \
                             UTF-16 code units",
                            String::from_utf8_lossy(&self.key),
                            String::from_utf8_lossy(prev)
                        ),
                    });
                }
            }
        }
        // The key becomes the previous one; its old buffer (or a spare) takes the next key.
        let next = match prev_key.take() {
            Some(old) => old,
            None => self.spare.pop().unwrap_or_default(),
        };
        *prev_key = Some(std::mem::replace(&mut self.key, next));
        self.key.clear();
        Ok(())
    }
}

/// Compares two valid UTF-8 strings by their UTF-16 code units (RFC 8785's member order).
/// UTF-8 byte order is code point order, which differs from UTF-16's only between a
/// supplementary character (4 bytes in UTF-8, a surrogate pair in UTF-16) and one of
/// U+E000..U+FFFF: byte order is used unless that can be the case.
fn utf16_cmp(a: &[u8], b: &[u8]) -> Ordering {
    let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) else {
        return a.len().cmp(&b.len());
    };
    // The first differing byte; where a character starts there: its lead byte (both
    // characters share their bytes before `i`, so `i` lies in the same position of each).
    let start = (0..=i).rev().find(|&j| a[j] & 0xc0 != 0x80).unwrap_or(0);
    let (x, y) = (a[start], b[start]);
    let supplementary = |lead: u8| lead >= 0xf0;
    let high_bmp = |lead: u8| lead == 0xee || lead == 0xef;
    if (supplementary(x) && high_bmp(y)) || (high_bmp(x) && supplementary(y)) {
        let (sa, sb) = (
            std::str::from_utf8(&a[start..]).unwrap_or(""),
            std::str::from_utf8(&b[start..]).unwrap_or(""),
        );
        return sa.encode_utf16().cmp(sb.encode_utf16());
    }
    a[i].cmp(&b[i])
}

/// Checks a whole body held in memory (tests, small bodies).
pub fn check_canonical(
    bytes: &[u8],
    max_depth: usize,
    object_only: bool,
) -> Result<(), NotCanonical> {
    let mut c = CanonicalCheck::new(max_depth, object_only);
    c.feed(bytes)?;
    c.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::hashing::canonical_json;
    use serde_json::{Value, json};

    fn ok(text: &str) {
        check_canonical(text.as_bytes(), 32, false).unwrap_or_else(|e| panic!("{text}: {e}"));
    }

    fn bad(text: &[u8], why: &str) {
        let e = check_canonical(text, 32, false).expect_err(&String::from_utf8_lossy(text));
        assert!(
            e.reason.contains(why),
            "{}: {e}",
            String::from_utf8_lossy(text)
        );
    }

    #[test]
    fn what_the_canonicalizer_writes_passes_in_any_chunking() {
        let values = [
            json!({"text": "Feed rate reduced", "n": [1, 2.5, -0.0, 1e21, 1e-7, 123456789012u64],
                   "b": true, "z": null, "e": {}, "a": [], "\u{20ac}": "\u{1f600}\t\"\\\u{1}",
                   "\u{e000}": 1, "\u{1f600}": 2, "deep": {"x": [[{"y": false}]]}}),
            json!("just a string"),
            json!(12),
            json!({"long": "plain text that runs on ".repeat(50), "k": ["é".repeat(9)]}),
            json!([]),
            json!(null),
        ];
        for v in values {
            let bytes = canonical_json(&v);
            for chunk in [1, 2, 3, 7, 4096] {
                let mut c = CanonicalCheck::new(32, false);
                for part in bytes.chunks(chunk) {
                    c.feed(part)
                        .unwrap_or_else(|e| panic!("{}: {e}", String::from_utf8_lossy(&bytes)));
                }
                c.finish().unwrap();
            }
        }
        ok(r#"{"a":1,"b":2}"#);
    }

    #[test]
    fn other_spellings_of_the_same_value_fail_naming_why() {
        bad(br#"{"a": 1}"#, "whitespace");
        bad(br#"{"b":1,"a":2}"#, "sorted");
        bad(br#"{"a":1,"a":2}"#, "twice");
        bad(br#"{"a":1.0}"#, "written 1 in canonical form");
        bad(br#"[1E3]"#, "written 1000");
        bad(br#"[-0]"#, "written 0");
        bad(br#"["\u0041"]"#, "as the character itself");
        bad(br#"["\u000A"]"#, "lower-case");
        bad(br#"["\u000a"]"#, "short escape");
        bad(br#"["\/"]"#, "not canonical");
        bad(b"[\"\x01\"]", "control character");
        bad(b"[\"\xff\"]", "UTF-8");
        bad(b"[\"\xed\xa0\x80\"]", "UTF-8"); // a surrogate
        bad(br#"{"a":1}x"#, "more after");
        bad(br#"{"a":"#, "ends before");
        bad(br#"[1,]"#, "expected a JSON value");
        bad(br#"[tru]"#, "expected \"true\"");
        bad(br#"{"a"1}"#, "expected ':'");
        bad(br#"[1}"#, "unexpected '}'");
        bad(b"", "ends before");
        let e = check_canonical(b"[1]", 32, true).unwrap_err();
        assert!(e.reason.contains("object"), "{e}");
        let deep = format!("{}{}", "[".repeat(5), "]".repeat(5));
        let e = check_canonical(deep.as_bytes(), 4, false).unwrap_err();
        assert!(e.reason.contains("max_json_depth"), "{e}");
        check_canonical(deep.as_bytes(), 5, false).unwrap();
    }

    #[test]
    fn keys_sort_by_utf16_not_utf8() {
        // U+1F600 sorts after U+E000 in UTF-8 but before it in UTF-16 (a surrogate pair,
        // 0xD83D 0xDE00).
        let v = json!({"\u{e000}": 1, "\u{1f600}": 2});
        let bytes = canonical_json(&v);
        assert!(String::from_utf8_lossy(&bytes).starts_with("{\"\u{1f600}\""));
        check_canonical(&bytes, 32, true).unwrap();
        bad("{\"\u{e000}\":1,\"\u{1f600}\":2}".as_bytes(), "sorted");
    }

    #[test]
    fn key_order_is_utf16_order_for_every_pair() {
        let keys = [
            "",
            "a",
            "ab",
            "b",
            "z",
            "\u{7f}",
            "\u{e9}",
            "\u{7ff}",
            "\u{800}",
            "\u{d7ff}",
            "\u{e000}",
            "\u{fb33}",
            "\u{ffff}",
            "\u{10000}",
            "\u{1f600}",
            "a\u{1f600}",
            "a\u{e000}",
            "a\u{1f600}b",
            "\u{e000}\u{1f600}",
        ];
        for a in keys {
            for b in keys {
                assert_eq!(
                    utf16_cmp(a.as_bytes(), b.as_bytes()),
                    a.encode_utf16().cmp(b.encode_utf16()),
                    "{a:?} vs {b:?}"
                );
            }
        }
    }

    #[test]
    fn offsets_point_at_the_fault() {
        let e = check_canonical(br#"{"a":1, "b":2}"#, 32, false).unwrap_err();
        assert_eq!(e.offset, 7);
        let v: Value = serde_json::from_str(r#"{"a":[1,2]}"#).unwrap();
        check_canonical(&canonical_json(&v), 32, true).unwrap();
    }
}
