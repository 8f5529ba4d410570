//! See fuzz/README.md. Properties: `cobbyd::fuzzing::check_xmlrpc`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cobbyd::fuzzing::check_xmlrpc(data);
});
