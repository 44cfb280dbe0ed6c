#![no_main]
//! Fuzz target `decode_command`: see `fuzz_props::props::check_decode_command` for the properties checked.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fuzz_props::props::check_decode_command(data);
});
