//! MXFP4: OCP Microscaling FP4 (E2M1 elements with a shared E8M0 scale).
//!
//! Reference: *OCP Microscaling Formats (MX) Specification, Version 1.0*
//! (Open Compute Project, Sept. 2023): section 5 "Microscaling (MX) Formats"
//! (the concrete format MXFP4, the FP4 E2M1 element type and the E8M0 scale
//! type) and section 6.3 "Conversion from scalar format to MX format"
//! (Algorithm 1, which this module implements).
//!
//! # Number formats
//!
//! * **E2M1** element: 1 sign bit, 2 exponent bits (bias 1), 1 mantissa bit.
//!   Code `s ee m`; magnitudes for codes `0..=7` are
//!   `0, 0.5, 1, 1.5, 2, 3, 4, 6`; bit 3 is the sign (`0x8` is `-0.0`).
//!   There is no Inf/NaN.
//! * **E8M0** scale: unsigned 8-bit exponent, bias 127, value `2^(e-127)`;
//!   `0xFF` is NaN. Byte 0 is `2^-127` (an f32 subnormal, still exact).
//!
//! # Quantization (spec Algorithm 1)
//!
//! For each block of [`MXFP4_BLOCK`] = 32 consecutive elements along the
//! reduction (last, K) axis:
//! `shared_exp = floor(log2(max|x|)) - 2` (2 = exponent of E2M1's largest
//! normal, 6 = 1.5 * 2^2), clamped to `[-127, 127]`; an all-zero block gets
//! `shared_exp = -127` (byte 0). Every element `x / 2^shared_exp` is then
//! rounded to E2M1 with round-to-nearest-even, saturating to ±6.
//! NaN/±Inf inputs are rejected with a [`QuantError`].
//!
//! # Memory layout (what the GPU kernel loads)
//!
//! A `[rows, cols]` row-major matrix (K = `cols`, `cols % 32 == 0`) is stored
//! as two separate, row-contiguous arrays (the gpt-oss `*_blocks` /
//! `*_scales` layout):
//!
//! * `blocks: [rows][cols / 2]` bytes. Byte `i` of row `r` holds elements
//!   `2i` (LOW nibble, bits 0..4) and `2i + 1` (HIGH nibble, bits 4..8) of
//!   that row. Hence block `b` of row `r` occupies bytes
//!   `r * cols/2 + 16*b .. r * cols/2 + 16*b + 16`.
//! * `scales: [rows][cols / 32]` bytes, E8M0; scale `b` of row `r` (at
//!   `r * cols/32 + b`) applies to elements `32b .. 32b + 32` of that row.
//!
//! Dequantized value: `E2M1_LUT[code] * e8m0_decode(scale)`.

use rayon::prelude::*;

use super::{check_finite, check_shape, checked_numel, QuantError};

/// Number of elements sharing one E8M0 scale.
pub const MXFP4_BLOCK: usize = 32;

/// Exponent of the largest normal E2M1 value (6 = 1.5 * 2^2).
const E2M1_EMAX: i32 = 2;

/// The 16 E2M1 values, indexed by 4-bit code (bit 3 = sign).
pub const E2M1_LUT: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// Decodes a 4-bit E2M1 code (only the low nibble of `code` is used).
#[inline]
pub fn e2m1_decode(code: u8) -> f32 {
    E2M1_LUT[(code & 0xF) as usize]
}

/// Encodes an (already scaled) f32 to an E2M1 code with round-to-nearest-even,
/// saturating to ±6. The sign is preserved (negative values that round to zero
/// give `-0`, code `0x8`). NaN, which E2M1 cannot represent, maps to `+0`.
#[inline]
pub fn e2m1_encode(x: f32) -> u8 {
    if x.is_nan() {
        return 0;
    }
    let sign = if x.is_sign_negative() { 0x8 } else { 0x0 };
    let a = x.abs();
    // Midpoints between adjacent representable magnitudes. On a tie the code
    // with an even mantissa bit (even code) wins: ties at 0.25, 1.25, 2.5, 5.0
    // round down; ties at 0.75, 1.75, 3.5 round up.
    let mag = if a <= 0.25 {
        0
    } else if a < 0.75 {
        1
    } else if a <= 1.25 {
        2
    } else if a < 1.75 {
        3
    } else if a <= 2.5 {
        4
    } else if a < 3.5 {
        5
    } else if a <= 5.0 {
        6
    } else {
        7
    };
    sign | mag
}

/// Decodes an E8M0 scale byte: `2^(b - 127)`, NaN for `0xFF`. Exact for every
/// byte (byte 0 is the f32 subnormal `2^-127`).
#[inline]
pub fn e8m0_decode(b: u8) -> f32 {
    match b {
        0xFF => f32::NAN,
        0 => f32::from_bits(0x0040_0000),
        _ => f32::from_bits((b as u32) << 23),
    }
}

/// `2^e` as f32 for `e` in `[-127, 127]`, exact.
#[inline]
fn pow2(e: i32) -> f32 {
    debug_assert!((-127..=127).contains(&e));
    e8m0_decode((e + 127) as u8)
}

/// `floor(log2(a))` for a finite, strictly positive f32 (subnormals included).
#[inline]
fn floor_log2(a: f32) -> i32 {
    let bits = a.to_bits() & 0x7FFF_FFFF;
    let exp = (bits >> 23) as i32;
    if exp != 0 {
        exp - 127
    } else {
        // Subnormal: a = m * 2^-149.
        let m = bits & 0x007F_FFFF;
        -149 + (31 - m.leading_zeros() as i32)
    }
}

/// Shared exponent (spec Algorithm 1) for a block with absolute max `amax`.
#[inline]
fn shared_exp(amax: f32) -> i32 {
    if amax == 0.0 {
        -127
    } else {
        (floor_log2(amax) - E2M1_EMAX).clamp(-127, 127)
    }
}

/// Quantizes one block of 32 finite values into 16 packed bytes; returns the
/// E8M0 scale byte.
#[inline]
fn quantize_block(src: &[f32], dst: &mut [u8]) -> u8 {
    debug_assert_eq!(src.len(), MXFP4_BLOCK);
    debug_assert_eq!(dst.len(), MXFP4_BLOCK / 2);
    let amax = src.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let e = shared_exp(amax);
    // x / 2^e == x * 2^-e exactly (both power-of-two scalings; -e is in range).
    let inv = pow2(-e);
    for (pair, out) in src.chunks_exact(2).zip(dst.iter_mut()) {
        let lo = e2m1_encode(pair[0] * inv);
        let hi = e2m1_encode(pair[1] * inv);
        *out = lo | (hi << 4);
    }
    (e + 127) as u8
}

/// An MXFP4-quantized `[rows, cols]` matrix, blocked along `cols`.
/// See the module docs for the exact layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mxfp4Matrix {
    pub rows: usize,
    pub cols: usize,
    /// Packed E2M1 codes, `rows * cols / 2` bytes (low nibble = even element).
    pub blocks: Vec<u8>,
    /// E8M0 scales, `rows * cols / 32` bytes.
    pub scales: Vec<u8>,
}

/// Quantizes a row-major `[rows, cols]` f32 matrix to MXFP4 with 32-element
/// blocks along `cols`.
///
/// Errors: `data.len() != rows * cols`, `cols % 32 != 0`, or any NaN/±Inf
/// (reported with its flat index).
pub fn quantize_mxfp4(data: &[f32], rows: usize, cols: usize) -> Result<Mxfp4Matrix, QuantError> {
    if !cols.is_multiple_of(MXFP4_BLOCK) {
        return Err(QuantError::BadBlockLength {
            len: cols,
            block: MXFP4_BLOCK,
        });
    }
    let n = check_shape(data.len(), rows, cols)?;
    check_finite(data)?;
    let mut blocks = vec![0u8; n / 2];
    let mut scales = vec![0u8; n / MXFP4_BLOCK];
    if n > 0 {
        blocks
            .par_chunks_mut(cols / 2)
            .zip(scales.par_chunks_mut(cols / MXFP4_BLOCK))
            .zip(data.par_chunks(cols))
            .for_each(|((brow, srow), xrow)| {
                for ((xb, bb), s) in xrow
                    .chunks_exact(MXFP4_BLOCK)
                    .zip(brow.chunks_exact_mut(MXFP4_BLOCK / 2))
                    .zip(srow.iter_mut())
                {
                    *s = quantize_block(xb, bb);
                }
            });
    }
    Ok(Mxfp4Matrix {
        rows,
        cols,
        blocks,
        scales,
    })
}

impl Mxfp4Matrix {
    /// Assembles a matrix from raw gpt-oss style `*_blocks` / `*_scales`
    /// buffers (already flattened to `[rows, cols/2]` and `[rows, cols/32]`).
    ///
    /// Validates `cols % 32 == 0`, both buffer lengths, and rejects NaN
    /// scale bytes (`0xFF`).
    pub fn from_parts(
        rows: usize,
        cols: usize,
        blocks: Vec<u8>,
        scales: Vec<u8>,
    ) -> Result<Self, QuantError> {
        if !cols.is_multiple_of(MXFP4_BLOCK) {
            return Err(QuantError::BadBlockLength {
                len: cols,
                block: MXFP4_BLOCK,
            });
        }
        let n = checked_numel(rows, cols)?;
        if blocks.len() != n / 2 {
            return Err(QuantError::BufferLength {
                what: "mxfp4 blocks",
                expected: n / 2,
                got: blocks.len(),
            });
        }
        if scales.len() != n / MXFP4_BLOCK {
            return Err(QuantError::BufferLength {
                what: "mxfp4 scales",
                expected: n / MXFP4_BLOCK,
                got: scales.len(),
            });
        }
        if let Some(index) = scales.iter().position(|&s| s == 0xFF) {
            return Err(QuantError::NonFiniteScale { index });
        }
        Ok(Self {
            rows,
            cols,
            blocks,
            scales,
        })
    }

    /// Packed code bytes of row `r` (`cols / 2` bytes).
    #[inline]
    pub fn row_blocks(&self, r: usize) -> &[u8] {
        let w = self.cols / 2;
        &self.blocks[r * w..(r + 1) * w]
    }

    /// Scale bytes of row `r` (`cols / 32` bytes).
    #[inline]
    pub fn row_scales(&self, r: usize) -> &[u8] {
        let w = self.cols / MXFP4_BLOCK;
        &self.scales[r * w..(r + 1) * w]
    }

    /// Dequantizes the whole matrix to a row-major f32 vector.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.rows * self.cols];
        if self.cols > 0 {
            out.par_chunks_mut(self.cols)
                .enumerate()
                .for_each(|(r, row)| self.dequant_row_into(r, row));
        }
        out
    }

    /// Dequantizes row `r` into `out`.
    ///
    /// # Panics
    /// If `r >= rows` or `out.len() != cols`.
    pub fn dequant_row_into(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.rows, "row {r} out of range ({} rows)", self.rows);
        assert_eq!(out.len(), self.cols, "output length must equal cols");
        for ((ob, bb), &s) in out
            .chunks_exact_mut(MXFP4_BLOCK)
            .zip(self.row_blocks(r).chunks_exact(MXFP4_BLOCK / 2))
            .zip(self.row_scales(r))
        {
            let scale = e8m0_decode(s);
            for (o, &b) in ob.chunks_exact_mut(2).zip(bb) {
                o[0] = E2M1_LUT[(b & 0xF) as usize] * scale;
                o[1] = E2M1_LUT[(b >> 4) as usize] * scale;
            }
        }
    }

    /// Fused dequantize + dot product of row `r` with `x` (f32 accumulate).
    /// Each block's partial sum is computed on the unscaled E2M1 values and
    /// multiplied by the block scale once.
    ///
    /// # Panics
    /// If `r >= rows` or `x.len() != cols`.
    pub fn dot_row(&self, r: usize, x: &[f32]) -> f32 {
        assert!(r < self.rows, "row {r} out of range ({} rows)", self.rows);
        assert_eq!(x.len(), self.cols, "x length must equal cols");
        let mut total = 0.0f32;
        for ((xb, bb), &s) in x
            .chunks_exact(MXFP4_BLOCK)
            .zip(self.row_blocks(r).chunks_exact(MXFP4_BLOCK / 2))
            .zip(self.row_scales(r))
        {
            let mut w = [0.0f32; MXFP4_BLOCK];
            for (wp, &b) in w.chunks_exact_mut(2).zip(bb) {
                wp[0] = E2M1_LUT[(b & 0xF) as usize];
                wp[1] = E2M1_LUT[(b >> 4) as usize];
            }
            // 8 independent lanes so the compiler can vectorize.
            let mut acc = [0.0f32; 8];
            for (wc, xc) in w.chunks_exact(8).zip(xb.chunks_exact(8)) {
                for k in 0..8 {
                    acc[k] += wc[k] * xc[k];
                }
            }
            let partial =
                ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
            total += partial * e8m0_decode(s);
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Standard normal samples via Box-Muller.
    fn randn(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u1: f64 = rng.random::<f64>().max(1e-300);
                let u2: f64 = rng.random::<f64>();
                ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
            })
            .collect()
    }

    fn quant_one_block(v: &[f32; 32]) -> Mxfp4Matrix {
        quantize_mxfp4(v, 1, 32).unwrap()
    }

    fn code_at(m: &Mxfp4Matrix, i: usize) -> u8 {
        let b = m.blocks[i / 2];
        if i.is_multiple_of(2) {
            b & 0xF
        } else {
            b >> 4
        }
    }

    #[test]
    fn e2m1_all_codes_round_trip_bit_exact() {
        let expected = [
            0.0f32, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0,
            -6.0,
        ];
        for code in 0u8..16 {
            let v = e2m1_decode(code);
            assert_eq!(
                v.to_bits(),
                expected[code as usize].to_bits(),
                "code {code}"
            );
            assert_eq!(e2m1_encode(v), code, "value {v}");
        }
        assert!(e2m1_decode(0x8).is_sign_negative());
        assert_eq!(e2m1_decode(0x8), 0.0);
    }

    #[test]
    fn e2m1_rne_ties() {
        let cases = [
            (0.25f32, 0.0f32),
            (0.75, 1.0),
            (1.25, 1.0),
            (1.75, 2.0),
            (2.5, 2.0),
            (3.5, 4.0),
            (5.0, 4.0),
            // Non-ties.
            (0.26, 0.5),
            (0.74, 0.5),
            (1.3, 1.5),
            (2.6, 3.0),
            (5.01, 6.0),
            (0.1, 0.0),
        ];
        for (x, want) in cases {
            assert_eq!(e2m1_decode(e2m1_encode(x)), want, "x={x}");
            assert_eq!(e2m1_decode(e2m1_encode(-x)), -want, "x=-{x}");
        }
        assert_eq!(e2m1_encode(-0.1), 0x8);
    }

    #[test]
    fn e2m1_saturates() {
        for x in [6.0f32, 6.5, 7.0, 100.0, 1e30, f32::MAX, f32::INFINITY] {
            assert_eq!(e2m1_encode(x), 0x7, "x={x}");
            assert_eq!(e2m1_encode(-x), 0xF, "x=-{x}");
        }
    }

    #[test]
    fn e8m0_edges() {
        assert_eq!(e8m0_decode(0), 2f32.powi(-127));
        assert_eq!(e8m0_decode(0).to_bits(), 0x0040_0000);
        assert_eq!(e8m0_decode(1), 2f32.powi(-126));
        assert_eq!(e8m0_decode(127), 1.0);
        assert_eq!(e8m0_decode(128), 2.0);
        assert_eq!(e8m0_decode(126), 0.5);
        assert_eq!(e8m0_decode(254), 2f32.powi(127));
        assert!(e8m0_decode(255).is_nan());
        for b in 0u8..255 {
            assert_eq!(e8m0_decode(b) as f64, 2f64.powi(b as i32 - 127), "b={b}");
        }
    }

    #[test]
    fn scale_block_max_six_is_one() {
        let mut v = [0.0f32; 32];
        v[3] = 6.0;
        v[4] = -1.5;
        v[5] = 0.5;
        let m = quant_one_block(&v);
        assert_eq!(m.scales[0], 127);
        assert_eq!(m.dequantize(), v.to_vec());
    }

    #[test]
    fn scale_block_max_one_is_quarter() {
        let mut v = [0.0f32; 32];
        v[0] = 1.0;
        v[1] = -0.25;
        v[2] = 0.125;
        let m = quant_one_block(&v);
        assert_eq!(m.scales[0], 127 - 2);
        assert_eq!(e8m0_decode(m.scales[0]), 0.25);
        assert_eq!(code_at(&m, 0), 0x6); // 1.0 / 0.25 = 4
        assert_eq!(code_at(&m, 1), 0x8 | 0x2); // -1
        assert_eq!(code_at(&m, 2), 0x1); // 0.5
        assert_eq!(m.dequantize(), v.to_vec());
        // Max in [4, 8) after scaling: 7.9 -> saturates at 6, 4.9 -> 4.
        let mut w = [0.0f32; 32];
        w[0] = 1.9;
        w[1] = 1.2;
        let m = quant_one_block(&w);
        assert_eq!(m.scales[0], 127 - 2);
        assert_eq!(code_at(&m, 0), 0x7);
        assert_eq!(code_at(&m, 1), 0x6);
    }

    #[test]
    fn zero_block() {
        let v = [0.0f32; 32];
        let m = quant_one_block(&v);
        assert_eq!(m.scales, vec![0]);
        assert!(m.blocks.iter().all(|&b| b == 0));
        assert!(m.dequantize().iter().all(|&x| x == 0.0));
    }

    #[test]
    fn huge_and_tiny_values_flush() {
        let mut v = [1e-3f32; 32];
        v[7] = 3.0e4;
        v[8] = -2.0e-3;
        let m = quant_one_block(&v);
        // floor(log2(3e4)) = 14 -> shared_exp 12.
        assert_eq!(m.scales[0], 127 + 12);
        let d = m.dequantize();
        // 3e4 / 4096 = 7.32 -> saturates to 6 -> 24576.
        assert_eq!(d[7], 24576.0);
        for (i, &x) in d.iter().enumerate() {
            if i != 7 {
                assert_eq!(x, 0.0, "i={i}");
            }
        }
        assert_eq!(code_at(&m, 8), 0x8); // -0
    }

    #[test]
    fn subnormal_inputs() {
        // Only subnormals: floor(log2) far below -129 -> clamped to -127.
        let mut v = [0.0f32; 32];
        v[0] = f32::from_bits(1); // 2^-149
        v[1] = -f32::from_bits(0x0000_0400); // -2^-139
        let m = quant_one_block(&v);
        assert_eq!(m.scales[0], 0);
        assert!(m.dequantize().iter().all(|&x| x == 0.0));

        // Max is the smallest normal * 1.5 -> floor(log2) = -126 ->
        // shared_exp -128 -> clamped to -127 (byte 0).
        let mut v = [0.0f32; 32];
        v[0] = 1.5 * f32::MIN_POSITIVE; // 1.5 * 2^-126, scaled: 3
        v[1] = f32::from_bits(0x0010_0000); // 2^-129 subnormal, scaled: 0.25 -> 0 (tie)
        v[2] = f32::from_bits(0x0020_0000); // 2^-128, scaled: 0.5
        v[3] = -f32::from_bits(0x0030_0000); // -1.5 * 2^-128, scaled: -0.75 -> -1
        let m = quant_one_block(&v);
        assert_eq!(m.scales[0], 0);
        assert_eq!(code_at(&m, 0), 0x5);
        assert_eq!(code_at(&m, 1), 0x0);
        assert_eq!(code_at(&m, 2), 0x1);
        assert_eq!(code_at(&m, 3), 0x8 | 0x2);
        let d = m.dequantize();
        assert_eq!(d[0], v[0]);
        assert_eq!(d[2], v[2]);
        assert_eq!(d[3], -f32::from_bits(0x0040_0000));

        // Largest subnormal: floor(log2) = -127 -> shared_exp clamped to -127.
        let mut v = [0.0f32; 32];
        v[5] = f32::from_bits(0x007F_FFFF);
        let m = quant_one_block(&v);
        assert_eq!(m.scales[0], 0);
        // scaled = (2^23 - 1) * 2^-22 ~= 1.9999999 -> rounds to 2.0 (code 4).
        assert_eq!(code_at(&m, 5), 0x4);
    }

    #[test]
    fn extreme_magnitudes_do_not_overflow() {
        let mut v = [0.0f32; 32];
        v[0] = f32::MAX;
        v[1] = -f32::MAX;
        v[2] = 1.0;
        let m = quant_one_block(&v);
        assert_eq!(m.scales[0], 127 + 125);
        let d = m.dequantize();
        assert_eq!(d[0], 6.0 * 2f32.powi(125));
        assert_eq!(d[1], -6.0 * 2f32.powi(125));
        assert_eq!(d[2], 0.0);
    }

    #[test]
    fn non_finite_rejected_with_index() {
        let mut v = vec![1.0f32; 64];
        v[37] = f32::NAN;
        assert_eq!(
            quantize_mxfp4(&v, 2, 32),
            Err(QuantError::NaN { index: 37 })
        );
        v[37] = f32::INFINITY;
        assert_eq!(
            quantize_mxfp4(&v, 2, 32),
            Err(QuantError::Infinite {
                index: 37,
                negative: false
            })
        );
        v[37] = 1.0;
        v[5] = f32::NEG_INFINITY;
        let err = quantize_mxfp4(&v, 2, 32).unwrap_err();
        assert_eq!(
            err,
            QuantError::Infinite {
                index: 5,
                negative: true
            }
        );
        assert!(err.to_string().contains('5'));
    }

    #[test]
    fn bad_shapes_rejected() {
        let v = vec![0.0f32; 48];
        assert_eq!(
            quantize_mxfp4(&v, 1, 48),
            Err(QuantError::BadBlockLength { len: 48, block: 32 })
        );
        assert!(quantize_mxfp4(&v, 2, 32).is_err());
        assert!(Mxfp4Matrix::from_parts(1, 32, vec![0; 15], vec![0; 1]).is_err());
        assert!(Mxfp4Matrix::from_parts(1, 32, vec![0; 16], vec![0; 2]).is_err());
        assert!(Mxfp4Matrix::from_parts(1, 40, vec![0; 20], vec![0; 1]).is_err());
        assert_eq!(
            Mxfp4Matrix::from_parts(1, 32, vec![0; 16], vec![0xFF]),
            Err(QuantError::NonFiniteScale { index: 0 })
        );
        let m = Mxfp4Matrix::from_parts(2, 64, vec![0x21; 64], vec![127; 4]).unwrap();
        let d = m.dequantize();
        assert_eq!(&d[..4], &[0.5, 1.0, 0.5, 1.0]);
        let empty = quantize_mxfp4(&[], 0, 64).unwrap();
        assert!(empty.blocks.is_empty() && empty.dequantize().is_empty());
    }

    #[test]
    fn packing_low_nibble_first() {
        let mut v = [0.0f32; 32];
        v[0] = 0.5; // code 1
        v[1] = -6.0; // code 0xF
        v[30] = 3.0; // code 5
        v[31] = 1.0; // code 2
        let m = quant_one_block(&v);
        assert_eq!(m.scales[0], 127);
        assert_eq!(m.blocks[0], 0xF1);
        assert_eq!(m.blocks[15], 0x25);
    }

    #[test]
    fn random_normal_error_bound() {
        let mut rng = ChaCha8Rng::seed_from_u64(0x5EED_0001);
        let (rows, cols) = (64, 1024);
        let data = randn(&mut rng, rows * cols);
        assert!(data.iter().any(|&x| x != 0.0));
        let m = quantize_mxfp4(&data, rows, cols).unwrap();
        let d = m.dequantize();
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for (&a, &b) in data.iter().zip(&d) {
            num += ((a - b) as f64).powi(2);
            den += (a as f64).powi(2);
        }
        let rel = (num / den).sqrt();
        eprintln!("mxfp4 relative Frobenius error on N(0,1): {rel:.5}");
        assert!(rel > 0.01, "suspiciously small error {rel}");
        assert!(rel < 0.12, "relative error {rel}");
    }

    #[test]
    fn dot_row_matches_dequant() {
        let mut rng = ChaCha8Rng::seed_from_u64(42);
        let (rows, cols) = (8, 512);
        let mut data = randn(&mut rng, rows * cols);
        // Vary magnitudes per block to exercise different scales.
        for (i, v) in data.iter_mut().enumerate() {
            *v *= 2f32.powi(((i / 32) % 11) as i32 - 5);
        }
        let m = quantize_mxfp4(&data, rows, cols).unwrap();
        let x = randn(&mut rng, cols);
        let mut row = vec![0.0f32; cols];
        for r in 0..rows {
            m.dequant_row_into(r, &mut row);
            let reference: f64 = row.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
            let mag: f64 = row
                .iter()
                .zip(&x)
                .map(|(&a, &b)| (a as f64 * b as f64).abs())
                .sum();
            let got = m.dot_row(r, &x) as f64;
            assert!(
                (got - reference).abs() <= 1e-5 * mag.max(reference.abs()),
                "row {r}: {got} vs {reference}"
            );
        }
    }
}
