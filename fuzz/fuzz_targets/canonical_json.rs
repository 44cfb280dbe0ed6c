#![no_main]
//! Fuzz target `canonical_json`: see `fuzz_props::props::check_canonical_json` for the properties checked.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fuzz_props::props::check_canonical_json(data);
});
