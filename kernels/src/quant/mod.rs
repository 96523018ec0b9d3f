//! Numeric formats used by MiMo / gpt-oss style checkpoints.
//!
//! * [`mxfp4`]: OCP Microscaling MXFP4 (E2M1 elements, one E8M0 scale per
//!   32 elements along the reduction axis).
//! * [`fp8`]: OCP FP8 E4M3 ("e4m3fn", as `torch.float8_e4m3fn`) with
//!   DeepSeek/MiMo style 2-D block scales (`weight_scale_inv`).
//!
//! All quantizers validate their input and return [`QuantError`] instead of
//! panicking on bad data (non-finite values, inconsistent shapes).

use thiserror::Error;

pub mod fp8;
pub mod mxfp4;

pub use fp8::{e4m3_decode, e4m3_encode, quantize_fp8_blocked, Fp8Matrix, E4M3_LUT, E4M3_MAX};
pub use mxfp4::{
    e2m1_decode, e2m1_encode, e8m0_decode, quantize_mxfp4, Mxfp4Matrix, E2M1_LUT, MXFP4_BLOCK,
};

/// Errors produced while quantizing data or assembling quantized matrices
/// from raw parts.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum QuantError {
    /// A NaN was found in the input; `index` is the flat (row-major) element index.
    #[error("NaN input at flat element index {index}")]
    NaN { index: usize },
    /// A ±infinity was found in the input; `index` is the flat element index.
    #[error("{}infinity input at flat element index {index}", if *.negative { "-" } else { "+" })]
    Infinite { index: usize, negative: bool },
    /// The length along the blocked (K) axis is not a multiple of the block size.
    #[error("length {len} along the reduction axis is not a multiple of the block size {block}")]
    BadBlockLength { len: usize, block: usize },
    /// The flat data length does not match `rows * cols`.
    #[error("data has {got} elements but shape [{rows}, {cols}] needs {expected}")]
    ShapeMismatch {
        rows: usize,
        cols: usize,
        expected: usize,
        got: usize,
    },
    /// `rows * cols` overflows `usize`.
    #[error("shape [{rows}, {cols}] overflows usize")]
    ShapeOverflow { rows: usize, cols: usize },
    /// A raw buffer passed to a `from_parts` constructor has the wrong length.
    #[error("{what} buffer has {got} entries, expected {expected}")]
    BufferLength {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    /// A block shape with a zero dimension was requested.
    #[error("invalid block shape ({0}, {1}): both dimensions must be non-zero")]
    InvalidBlockShape(usize, usize),
    /// A scale loaded through `from_parts` is NaN / infinite (E8M0 0xFF or a
    /// non-finite f32 `scale_inv`); `index` is the flat index into the scale buffer.
    #[error("non-finite scale at flat scale index {index}")]
    NonFiniteScale { index: usize },
}

/// Returns an error for the first non-finite value in `data`, if any.
pub(crate) fn check_finite(data: &[f32]) -> Result<(), QuantError> {
    match data.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(index) => {
            let v = data[index];
            if v.is_nan() {
                Err(QuantError::NaN { index })
            } else {
                Err(QuantError::Infinite {
                    index,
                    negative: v < 0.0,
                })
            }
        }
    }
}

/// `rows * cols`, checked for overflow.
pub(crate) fn checked_numel(rows: usize, cols: usize) -> Result<usize, QuantError> {
    rows.checked_mul(cols)
        .ok_or(QuantError::ShapeOverflow { rows, cols })
}

/// Validates that `data.len() == rows * cols` and returns that product.
pub(crate) fn check_shape(data_len: usize, rows: usize, cols: usize) -> Result<usize, QuantError> {
    let expected = checked_numel(rows, cols)?;
    if data_len != expected {
        return Err(QuantError::ShapeMismatch {
            rows,
            cols,
            expected,
            got: data_len,
        });
    }
    Ok(expected)
}
