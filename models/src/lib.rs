//! mimo models: MiMo config parsing, checkpoint loading, the tiny checkpoint maker, and the IR builder.
pub mod config;

pub use config::*;
pub mod build;
pub mod checkpoint;
pub mod draft;
pub mod tiny;
