//! Integration tests: the real `cobbyd` binary, its real socket, and
//! simulated shops over real HTTP on 127.0.0.1. One test binary (one link)
//! with a module per area.

mod harness;

mod daemon;
mod disk;
mod faults;
mod listing;
mod m1_safety;
mod operate;
mod ops;
mod runs;
mod security;
mod shops;
mod soak;
mod sync;
mod sync_util;
mod tls;
