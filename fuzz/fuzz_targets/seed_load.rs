#![no_main]
//! Fuzz target `seed_load`: see `fuzz_props::props::check_seed_load` for the properties checked.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fuzz_props::props::check_seed_load(data);
});
