//! cobbyd: keeps Magento shops connected and their catalogs mirrored.
//!
//! See ARCHITECTURE.md for the map of modules and how data flows.

pub mod bounded;
pub mod check;
pub mod cli;
pub mod commands;
pub mod config;
pub mod control_client;
pub mod daemon;
pub mod demo;
pub mod export;
#[doc(hidden)]
pub mod fuzzing;
pub mod health;
pub mod lifecycle;
pub mod logging;
pub mod magento;
pub mod metrics;
pub mod mirror;
pub mod notify;
pub mod probe;
pub mod queue;
pub mod registry;
pub mod routes;
pub mod scheduler;
pub mod secret;
pub mod server;
pub mod shop;
pub mod sim;
pub mod spread;
pub mod store;
pub mod sync;
pub mod tls;
