//! `cobbyd demo` (written with the simulator).
pub fn run(_args: crate::cli::DemoArgs) -> u8 {
    eprintln!("cobbyd demo: not available yet");
    1
}
