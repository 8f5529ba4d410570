//! cobbyd: keeps Magento shops connected and their catalogs mirrored.
//!
//! See ARCHITECTURE.md for the map of modules and how data flows.

pub mod cli;
pub mod config;
pub mod health;
pub mod logging;
pub mod magento;
pub mod notify;
pub mod queue;
pub mod secret;
pub mod shop;
pub mod store;
