//! Identifier types. `parse` (or serde, which calls it) is the only way to get one, so an id
//! that reaches the store is always safe to build an object key from.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::Rejection;

fn is_prefixed_hex12(s: &str, prefix: &str) -> bool {
    s.len() == prefix.len() + 12
        && s.starts_with(prefix)
        && s.as_bytes()[prefix.len()..]
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
}

/// Derives the 12 lower-hex digits of an id from arbitrary seed bytes (SHA-256 prefix).
fn derive_hex12(seed: &[u8]) -> String {
    let digest = Sha256::digest(seed);
    hex::encode(&digest[..6])
}

macro_rules! hex_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// The literal prefix every id of this kind starts with.
            pub const PREFIX: &'static str = $prefix;

            /// Parses `run_`/`adv_` followed by exactly 12 lower-case hex digits.
            pub fn parse(s: &str) -> Result<Self, Rejection> {
                if is_prefixed_hex12(s, $prefix) {
                    Ok(Self(s.to_owned()))
                } else {
                    Err(Rejection::invalid(format!(
                        concat!("invalid ", $what, " {:?}: expected ", $prefix, " followed by 12 lower-case hex digits"),
                        truncate_for_message(s)
                    )))
                }
            }

            /// Derives an id deterministically from seed bytes, so that the same input
            /// (for example a redelivered message) always maps to the same id.
            pub fn derive(seed: &[u8]) -> Self {
                Self(format!(concat!($prefix, "{}"), derive_hex12(seed)))
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = Rejection;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                Self::parse(&s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = Rejection;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }
    };
}

hex_id!(
    /// A run id: `run_` + 12 lower-case hex digits (`run_0123456789ab`).
    RunId,
    "run_",
    "run_id"
);
hex_id!(
    /// An advisory id: `adv_` + 12 lower-case hex digits.
    AdvisoryId,
    "adv_",
    "advisory_id"
);

/// Keeps rejection messages short and printable when the offending input is huge or binary.
pub(crate) fn truncate_for_message(s: &str) -> String {
    const MAX: usize = 80;
    if s.chars().count() <= MAX {
        s.to_owned()
    } else {
        let head: String = s.chars().take(MAX).collect();
        format!("{head}…")
    }
}

macro_rules! bounded_text {
    ($(#[$doc:meta])* $name:ident, $field:literal, $max:expr, $ok:expr, $accepts:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Parses the text, rejecting empty, over-long or disallowed characters.
            pub fn parse(s: &str) -> Result<Self, Rejection> {
                let ok: fn(char) -> bool = $ok;
                if !s.is_empty() && s.len() <= $max && s.chars().all(ok) {
                    Ok(Self(s.to_owned()))
                } else {
                    Err(Rejection::invalid(format!(
                        concat!("invalid ", $field, " {:?}: expected 1 to {} characters of ", $accepts),
                        truncate_for_message(s),
                        $max
                    )))
                }
            }

            /// The value as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = Rejection;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                Self::parse(&s)
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = Rejection;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '/')
}

bounded_text!(
    /// The run's mode (`cam`, `saw`, ...): a short token chosen by the feasibility engine.
    Mode,
    "mode",
    64,
    is_token_char,
    "[A-Za-z0-9_.:/-]"
);
bounded_text!(
    /// The tool id (`T102`).
    ToolId,
    "tool_id",
    128,
    is_token_char,
    "[A-Za-z0-9_.:/-]"
);
bounded_text!(
    /// A correlation id from `X-Request-Id` (or generated); printable ASCII, no spaces.
    RequestId,
    "request id",
    128,
    |c: char| c.is_ascii_graphic(),
    "printable ASCII"
);
bounded_text!(
    /// The identity of one command message, used to make redelivery a no-op (`Nats-Msg-Id`,
    /// or the stream sequence).
    CommandId,
    "command id",
    256,
    |c: char| c.is_ascii_graphic(),
    "printable ASCII"
);

bounded_text!(
    /// Who sent a command, as its publisher says (`Rmos-Actor`): printable ASCII, no spaces.
    /// The broker does not vouch for it; see the README on trusting it.
    Actor,
    "actor",
    128,
    |c: char| c.is_ascii_graphic(),
    "printable ASCII"
);

impl RequestId {
    /// A fresh random request id (for commands that arrive without `X-Request-Id`).
    pub fn generate() -> Self {
        let n: u128 = rand::random();
        Self(format!("req_{n:032x}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_id_accepts_only_the_canonical_form() {
        assert!(RunId::parse("run_0123456789ab").is_ok());
        for bad in [
            "run_0123456789AB",
            "run_0123456789a",
            "run_0123456789abc",
            "adv_0123456789ab",
            "run_../../etc/pw",
            "",
            "run_0123456789ag",
            "RUN_0123456789ab",
            "run_0123456789a\u{e9}",
        ] {
            assert!(RunId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn derived_ids_are_stable_and_valid() {
        let a = RunId::derive(b"hello");
        assert_eq!(a, RunId::derive(b"hello"));
        assert_ne!(a, RunId::derive(b"hello!"));
        assert!(RunId::parse(a.as_str()).is_ok());
        assert!(AdvisoryId::parse(AdvisoryId::derive(b"x").as_str()).is_ok());
    }

    #[test]
    fn serde_goes_through_parse() {
        let ok: RunId = serde_json::from_str("\"run_aaaaaaaaaaaa\"").unwrap();
        assert_eq!(ok.as_str(), "run_aaaaaaaaaaaa");
        assert!(serde_json::from_str::<RunId>("\"run_x\"").is_err());
        assert!(serde_json::from_str::<Mode>("\"\"").is_err());
        assert!(serde_json::from_str::<ToolId>("\"T 1\"").is_err());
    }
}
