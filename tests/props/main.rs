//! Property tests for the parsers that read untrusted input (issue 6,
//! "Bad input"): each module feeds generated and hostile input to the real
//! parser through `cobbyd::fuzzing`, the same entry points the cargo-fuzz
//! targets in `fuzz/` use.

mod config;
mod control;
mod m2;
mod oauth;
mod xmlrpc;
