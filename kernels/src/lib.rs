pub mod cpu;
pub mod quant;
pub mod device;
