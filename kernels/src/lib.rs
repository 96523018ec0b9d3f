pub mod cpu;
pub mod quant;
