//! See fuzz/README.md. Properties: `cobbyd::fuzzing::check_m2`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cobbyd::fuzzing::check_m2(data);
});
