#![no_main]
//! Fuzz target `merge_patch`: see `fuzz_props::props::check_merge_patch` for the properties checked.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fuzz_props::props::check_merge_patch(data);
});
