pub mod cpu;
pub mod device;
pub mod quant;
pub mod tiled;
pub mod tmap;
pub mod xfrag;
