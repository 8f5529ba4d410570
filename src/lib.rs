//! cobbyd: keeps Magento shops connected and their catalogs mirrored.
//!
//! See ARCHITECTURE.md for the map of modules and how data flows.

pub mod magento;
pub mod secret;
pub mod shop;
pub mod sim;
