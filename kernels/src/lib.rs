
pub mod quant;
