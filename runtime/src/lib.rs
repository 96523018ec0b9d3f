//! mimort: loads a plan and runs it (CPU interpreter; CUDA megakernel where a GPU is present).

pub mod cpu;
pub mod cuda;
pub mod generate;
pub mod kv;
pub mod model;
pub mod sampling;
pub mod server;
pub mod spec;
pub mod tools;
