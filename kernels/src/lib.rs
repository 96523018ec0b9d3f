pub mod cpu;
pub mod device;
pub mod quant;
pub mod tmap;
pub mod xfrag;
