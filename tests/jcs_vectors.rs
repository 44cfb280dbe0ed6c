//! RFC 8785 canonicalization checked against vectors produced by an independent implementation
//! (Python's `rfc8785` package, `scripts/gen_jcs_fixtures.py`), including the RFC's own examples.

use rmos_runs::domain::hashing::{canonical_json, sha256_json};

#[derive(serde::Deserialize)]
struct Vector {
    name: String,
    input: String,
    canonical: String,
    sha256: String,
}

#[test]
fn canonical_form_and_hash_match_the_independent_implementation() {
    let text = include_str!("fixtures/jcs_vectors.json");
    let vectors: Vec<Vector> = serde_json::from_str(text).expect("fixture parses");
    assert!(vectors.len() >= 40, "only {} vectors", vectors.len());
    let mut failures = Vec::new();
    for v in &vectors {
        let value: serde_json::Value = serde_json::from_str(&v.input).expect("input parses");
        let got = String::from_utf8(canonical_json(&value)).expect("utf-8");
        if got != v.canonical || sha256_json(&value) != v.sha256 {
            failures.push(format!("{}: got {got:?}, want {:?}", v.name, v.canonical));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
