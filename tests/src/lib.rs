//! Cross-crate tests of mimo: an independent reference forward pass and helpers for the integration tests.

pub mod reference;
pub mod util;
