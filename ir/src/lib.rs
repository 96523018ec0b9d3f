//! mimo IR: the typed tensor graph (`graph`) and the lowered plan / instruction stream (`plan`).
pub mod graph;
pub mod plan;

pub use graph::*;
