//! See fuzz/README.md. Properties: `cobbyd::fuzzing::check_config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cobbyd::fuzzing::check_config(data);
});
