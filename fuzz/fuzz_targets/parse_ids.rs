#![no_main]
//! Fuzz target `parse_ids`: see `fuzz_props::props::check_parse_ids` for the properties checked.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fuzz_props::props::check_parse_ids(data);
});
