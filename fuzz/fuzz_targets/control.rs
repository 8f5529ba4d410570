//! See fuzz/README.md. Raw bytes of an HTTP request into the control
//! socket's connection code and router (in-memory connection, store in a
//! temp dir). Properties: `cobbyd::fuzzing::check_control`.
#![no_main]

use std::sync::OnceLock;

static HARNESS: OnceLock<cobbyd::fuzzing::ControlHarness> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let h = HARNESS
        .get_or_init(|| cobbyd::fuzzing::ControlHarness::new().expect("a harness in a temp dir"));
    cobbyd::fuzzing::check_control(h, data);
});
