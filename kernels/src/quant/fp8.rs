//! FP8 E4M3 (OCP 8-bit floating point "E4M3", a.k.a. `torch.float8_e4m3fn`)
//! and DeepSeek/MiMo style 2-D block-scaled FP8 matrices.
//!
//! # E4M3 ("fn" variant)
//!
//! Code `s eeee mmm`, exponent bias 7, no infinities. Exponent field 0 is
//! subnormal (`m/8 * 2^-6`, smallest `2^-9`); otherwise the value is
//! `(1 + m/8) * 2^(e-7)`. `0x7F` / `0xFF` (e = 15, m = 7) are NaN, so the
//! largest finite magnitude is `0x7E` = 1.75 * 2^8 = 448.
//!
//! # Block-scaled matrices
//!
//! Checkpoints store `weight: [rows, cols]` as E4M3 bytes (row-major) and
//! `weight_scale_inv: [ceil(rows/br), ceil(cols/bc)]` as f32 (row-major),
//! typically with `(br, bc) = (128, 128)`. The real value of element
//! `(r, c)` is `e4m3_decode(weight[r][c]) * scale_inv[r / br][c / bc]`.

use rayon::prelude::*;

use super::{check_finite, check_shape, checked_numel, QuantError};

/// Largest finite E4M3 magnitude.
pub const E4M3_MAX: f32 = 448.0;

/// Smallest normal E4M3 magnitude, 2^-6.
const E4M3_MIN_NORMAL: f32 = 0.015625;

/// Default DeepSeek/MiMo weight block shape.
pub const FP8_DEFAULT_BLOCK: (usize, usize) = (128, 128);

const fn e4m3_decode_const(b: u8) -> f32 {
    let sign = ((b as u32) & 0x80) << 24;
    let e = ((b >> 3) & 0xF) as u32;
    let m = (b & 0x7) as u32;
    if e == 15 && m == 7 {
        return f32::NAN;
    }
    let bits = if e == 0 {
        if m == 0 {
            0
        } else {
            // m * 2^-9 = 1.f * 2^(p - 9) with p = floor(log2(m)).
            let p = 31 - m.leading_zeros();
            let exp = p as i32 - 9 + 127;
            let mant = (m - (1 << p)) << (23 - p);
            ((exp as u32) << 23) | mant
        }
    } else {
        ((e + 120) << 23) | (m << 20)
    };
    f32::from_bits(sign | bits)
}

/// All 256 E4M3 values indexed by code (NaN at `0x7F` and `0xFF`).
pub const E4M3_LUT: [f32; 256] = {
    let mut t = [0.0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = e4m3_decode_const(i as u8);
        i += 1;
    }
    t
};

/// Decodes an E4M3 byte (NaN for `0x7F` / `0xFF`).
#[inline]
pub fn e4m3_decode(b: u8) -> f32 {
    E4M3_LUT[b as usize]
}

/// Encodes an f32 to E4M3 with round-to-nearest-even, saturating to ±448
/// (±Inf also saturates). Total: NaN maps to `0x7F`. The sign of zero is
/// preserved.
#[inline]
pub fn e4m3_encode(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7F;
    }
    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    let abs_bits = bits & 0x7FFF_FFFF;
    let a = f32::from_bits(abs_bits);
    let mag = if a < E4M3_MIN_NORMAL {
        // Subnormal range: a * 2^9 is exact and < 8; RNE to an integer
        // (8 lands exactly on the smallest normal, code 0x08).
        (a * 512.0).round_ties_even() as u8
    } else {
        // Round the 23-bit f32 mantissa to 3 bits (RNE); a carry propagates
        // into the exponent naturally. Then rebias 127 -> 7.
        let r = (abs_bits + 0x7_FFFF + ((abs_bits >> 20) & 1)) >> 20;
        let code = r - (120 << 3);
        code.min(0x7E) as u8
    };
    sign | mag
}

/// A block-scaled FP8 E4M3 matrix (DeepSeek/MiMo checkpoint layout).
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8Matrix {
    pub rows: usize,
    pub cols: usize,
    /// Scale block shape `(block_rows, block_cols)`, usually `(128, 128)`.
    pub block: (usize, usize),
    /// E4M3 codes, row-major `[rows, cols]`.
    pub data: Vec<u8>,
    /// Row-major `[ceil(rows/block.0), ceil(cols/block.1)]` dequant multipliers.
    pub scale_inv: Vec<f32>,
}

fn scale_grid(
    rows: usize,
    cols: usize,
    block: (usize, usize),
) -> Result<(usize, usize), QuantError> {
    if block.0 == 0 || block.1 == 0 {
        return Err(QuantError::InvalidBlockShape(block.0, block.1));
    }
    Ok((rows.div_ceil(block.0), cols.div_ceil(block.1)))
}

/// Quantizes a row-major `[rows, cols]` f32 matrix to block-scaled E4M3.
/// Per block: `scale_inv = amax / 448` (1.0 for an all-zero block), codes =
/// `e4m3_encode(x / scale_inv)`.
///
/// Errors: zero block dimension, `data.len() != rows * cols`, or NaN/±Inf
/// (reported with its flat index).
pub fn quantize_fp8_blocked(
    data: &[f32],
    rows: usize,
    cols: usize,
    block: (usize, usize),
) -> Result<Fp8Matrix, QuantError> {
    let (srows, scols) = scale_grid(rows, cols, block)?;
    let n = check_shape(data.len(), rows, cols)?;
    check_finite(data)?;
    let mut codes = vec![0u8; n];
    let mut scale_inv = vec![1.0f32; srows * scols];
    if n > 0 {
        let (br, bc) = block;
        let chunk = br.saturating_mul(cols);
        codes
            .par_chunks_mut(chunk)
            .zip(data.par_chunks(chunk))
            .zip(scale_inv.par_chunks_mut(scols))
            .for_each(|((qrows, xrows), srow)| {
                for (cb, s) in srow.iter_mut().enumerate() {
                    let c0 = cb * bc;
                    let c1 = (c0 + bc).min(cols);
                    let amax = xrows
                        .chunks_exact(cols)
                        .flat_map(|row| row[c0..c1].iter())
                        .fold(0.0f32, |m, v| m.max(v.abs()));
                    let si = if amax == 0.0 {
                        1.0
                    } else {
                        // Guard against underflow to 0 for tiny subnormal blocks.
                        (amax / E4M3_MAX).max(f32::from_bits(1))
                    };
                    *s = si;
                    for (q, x) in qrows.chunks_exact_mut(cols).zip(xrows.chunks_exact(cols)) {
                        for (qc, &xc) in q[c0..c1].iter_mut().zip(&x[c0..c1]) {
                            *qc = e4m3_encode(xc / si);
                        }
                    }
                }
            });
    }
    Ok(Fp8Matrix {
        rows,
        cols,
        block,
        data: codes,
        scale_inv,
    })
}

impl Fp8Matrix {
    /// Assembles a matrix from checkpoint buffers `weight` (E4M3 bytes) and
    /// `weight_scale_inv` (f32). Validates the block shape, both lengths, and
    /// that every scale is finite.
    pub fn from_parts(
        rows: usize,
        cols: usize,
        block: (usize, usize),
        data: Vec<u8>,
        scale_inv: Vec<f32>,
    ) -> Result<Self, QuantError> {
        let (srows, scols) = scale_grid(rows, cols, block)?;
        let n = checked_numel(rows, cols)?;
        if data.len() != n {
            return Err(QuantError::BufferLength {
                what: "fp8 weight",
                expected: n,
                got: data.len(),
            });
        }
        let ns = srows * scols;
        if scale_inv.len() != ns {
            return Err(QuantError::BufferLength {
                what: "fp8 weight_scale_inv",
                expected: ns,
                got: scale_inv.len(),
            });
        }
        if let Some(index) = scale_inv.iter().position(|s| !s.is_finite()) {
            return Err(QuantError::NonFiniteScale { index });
        }
        Ok(Self {
            rows,
            cols,
            block,
            data,
            scale_inv,
        })
    }

    /// Number of scale blocks along `cols`.
    #[inline]
    pub fn scale_cols(&self) -> usize {
        self.cols.div_ceil(self.block.1)
    }

    /// Scales applying to row `r` (one per column block).
    #[inline]
    fn row_scales(&self, r: usize) -> &[f32] {
        let sc = self.scale_cols();
        let sr = r / self.block.0;
        &self.scale_inv[sr * sc..(sr + 1) * sc]
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
        let codes = &self.data[r * self.cols..(r + 1) * self.cols];
        for ((ob, qb), &s) in out
            .chunks_mut(self.block.1)
            .zip(codes.chunks(self.block.1))
            .zip(self.row_scales(r))
        {
            for (o, &q) in ob.iter_mut().zip(qb) {
                *o = E4M3_LUT[q as usize] * s;
            }
        }
    }

    /// Fused dequantize + dot product of row `r` with `x` (f32 accumulate);
    /// each column block's partial sum is scaled once.
    ///
    /// # Panics
    /// If `r >= rows` or `x.len() != cols`.
    pub fn dot_row(&self, r: usize, x: &[f32]) -> f32 {
        assert!(r < self.rows, "row {r} out of range ({} rows)", self.rows);
        assert_eq!(x.len(), self.cols, "x length must equal cols");
        let codes = &self.data[r * self.cols..(r + 1) * self.cols];
        let mut total = 0.0f32;
        for ((xb, qb), &s) in x
            .chunks(self.block.1)
            .zip(codes.chunks(self.block.1))
            .zip(self.row_scales(r))
        {
            let mut acc = [0.0f32; 8];
            let xc = xb.chunks_exact(8);
            let qc = qb.chunks_exact(8);
            let (xr, qr) = (xc.remainder(), qc.remainder());
            for (xs, qs) in xc.zip(qc) {
                for k in 0..8 {
                    acc[k] += E4M3_LUT[qs[k] as usize] * xs[k];
                }
            }
            for (k, (&xv, &qv)) in xr.iter().zip(qr).enumerate() {
                acc[k] += E4M3_LUT[qv as usize] * xv;
            }
            let partial =
                ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
            total += partial * s;
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn randn(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u1: f64 = rng.random::<f64>().max(1e-300);
                let u2: f64 = rng.random::<f64>();
                ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
            })
            .collect()
    }

    /// Independent reference decode in f64.
    fn ref_decode(b: u8) -> f64 {
        let s = if b & 0x80 != 0 { -1.0 } else { 1.0 };
        let e = ((b >> 3) & 0xF) as i32;
        let m = (b & 7) as f64;
        if e == 15 && m == 7.0 {
            return f64::NAN;
        }
        if e == 0 {
            s * m / 8.0 * 2f64.powi(-6)
        } else {
            s * (1.0 + m / 8.0) * 2f64.powi(e - 7)
        }
    }

    #[test]
    fn all_codes_round_trip() {
        for c in 0u16..256 {
            let c = c as u8;
            let v = e4m3_decode(c);
            let r = ref_decode(c);
            if c & 0x7F == 0x7F {
                assert!(v.is_nan(), "code {c:#04x}");
                assert!(r.is_nan());
                continue;
            }
            assert_eq!(v as f64, r, "code {c:#04x}");
            assert_eq!(v.is_sign_negative(), c & 0x80 != 0, "sign of {c:#04x}");
            assert_eq!(e4m3_encode(v), c, "value {v} code {c:#04x}");
        }
        assert_eq!(e4m3_decode(0x80).to_bits(), (-0.0f32).to_bits());
        assert_eq!(e4m3_decode(0x7E), 448.0);
        assert_eq!(e4m3_decode(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_decode(0x08), 2f32.powi(-6));
        assert_eq!(e4m3_decode(0x38), 1.0);
        assert_eq!(e4m3_encode(f32::NAN), 0x7F);
        assert_eq!(e4m3_encode(-f32::NAN), 0x7F);
    }

    #[test]
    fn rne_ties() {
        let sub = 2f32.powi(-9);
        let cases = [
            // Normals: 1.0 (m=0), 1.125 (m=1), 1.25 (m=2).
            (1.0625f32, 1.0f32),
            (1.0625 + 1e-6, 1.125),
            (1.1875, 1.25),
            (1.1875 - 1e-6, 1.125),
            (432.0, 448.0), // between 416 (m=5) and 448 (m=6)
            (424.0, 416.0),
            (17.0, 16.0), // between 16 (m=0) and 18 (m=1)
            (19.0, 20.0), // between 18 (m=1) and 20 (m=2)
            // Subnormals (units of 2^-9).
            (0.5 * sub, 0.0),
            (0.5 * sub * 1.001, sub),
            (1.5 * sub, 2.0 * sub),
            (2.5 * sub, 2.0 * sub),
            (3.5 * sub, 4.0 * sub),
            (6.5 * sub, 6.0 * sub),
            (7.5 * sub, 8.0 * sub), // rounds up into the smallest normal
            (0.25 * sub, 0.0),
            // Normal/subnormal boundary region: 2^-6 + half ulp tie -> even.
            (2f32.powi(-6) * 1.0625, 2f32.powi(-6)),
            (f32::from_bits(1), 0.0),
        ];
        for (x, want) in cases {
            assert_eq!(e4m3_decode(e4m3_encode(x)), want, "x={x:e}");
            assert_eq!(e4m3_decode(e4m3_encode(-x)), -want, "x=-{x:e}");
        }
        assert_eq!(e4m3_encode(7.5 * sub), 0x08);
        assert_eq!(e4m3_encode(-0.0), 0x80);
    }

    #[test]
    fn saturation() {
        for x in [
            448.0f32,
            449.0,
            463.9,
            464.0,
            480.0,
            500.0,
            1e10,
            f32::MAX,
            f32::INFINITY,
        ] {
            assert_eq!(e4m3_encode(x), 0x7E, "x={x}");
            assert_eq!(e4m3_encode(-x), 0xFE, "x=-{x}");
        }
    }

    fn rel_frob(a: &[f32], b: &[f32]) -> f64 {
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for (&x, &y) in a.iter().zip(b) {
            num += ((x - y) as f64).powi(2);
            den += (x as f64).powi(2);
        }
        (num / den).sqrt()
    }

    #[test]
    fn random_blocked_error_bound() {
        let mut rng = ChaCha8Rng::seed_from_u64(0x5EED_0002);
        // Non-multiples of 128 exercise partial edge blocks.
        let (rows, cols) = (300, 260);
        let data = randn(&mut rng, rows * cols);
        let m = quantize_fp8_blocked(&data, rows, cols, FP8_DEFAULT_BLOCK).unwrap();
        assert_eq!(m.scale_inv.len(), 3 * 3);
        let rel = rel_frob(&data, &m.dequantize());
        eprintln!("fp8 e4m3 (128x128 blocks) relative Frobenius error on N(0,1): {rel:.5}");
        assert!(rel > 0.005, "suspiciously small error {rel}");
        assert!(rel < 0.03, "relative error {rel}");
    }

    #[test]
    fn scales_and_zero_block() {
        // 2x2 blocks over a 3x4 matrix -> scale grid 2x2.
        #[rustfmt::skip]
        let data = [
            1.0f32, -896.0, 0.0, 0.0,
            2.0,     3.0,   0.0, 0.0,
            0.5,     0.25,  5.0, -10.0,
        ];
        let m = quantize_fp8_blocked(&data, 3, 4, (2, 2)).unwrap();
        assert_eq!(m.scale_inv, vec![2.0, 1.0, 0.5 / 448.0, 10.0 / 448.0]);
        assert_eq!(m.data[1], 0xFE); // -896 / 2 = -448
        assert_eq!(m.data[11], 0xFE); // -10 / (10/448)
        let d = m.dequantize();
        assert_eq!(d[1], -896.0);
        assert_eq!(d[0], 1.0);
        assert_eq!(&d[2..4], &[0.0, 0.0]);
        assert!((d[11] + 10.0).abs() < 1e-5);
    }

    #[test]
    fn non_finite_rejected() {
        let mut v = vec![1.0f32; 256];
        v[200] = f32::NAN;
        assert_eq!(
            quantize_fp8_blocked(&v, 2, 128, FP8_DEFAULT_BLOCK),
            Err(QuantError::NaN { index: 200 })
        );
        v[200] = 0.0;
        v[3] = f32::NEG_INFINITY;
        assert_eq!(
            quantize_fp8_blocked(&v, 2, 128, FP8_DEFAULT_BLOCK),
            Err(QuantError::Infinite {
                index: 3,
                negative: true
            })
        );
        assert_eq!(
            quantize_fp8_blocked(&v, 2, 128, (0, 128)),
            Err(QuantError::InvalidBlockShape(0, 128))
        );
        assert!(quantize_fp8_blocked(&v, 3, 128, FP8_DEFAULT_BLOCK).is_err());
    }

    #[test]
    fn from_parts_validates() {
        assert!(Fp8Matrix::from_parts(130, 10, (128, 128), vec![0; 1300], vec![1.0; 2]).is_ok());
        assert!(Fp8Matrix::from_parts(130, 10, (128, 128), vec![0; 1300], vec![1.0; 1]).is_err());
        assert!(Fp8Matrix::from_parts(130, 10, (128, 128), vec![0; 1299], vec![1.0; 2]).is_err());
        assert_eq!(
            Fp8Matrix::from_parts(130, 10, (128, 128), vec![0; 1300], vec![1.0, f32::NAN]),
            Err(QuantError::NonFiniteScale { index: 1 })
        );
        let m =
            Fp8Matrix::from_parts(2, 3, (1, 2), vec![0x38; 6], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!(m.dequantize(), vec![1.0, 1.0, 2.0, 3.0, 3.0, 4.0]);
        let empty = quantize_fp8_blocked(&[], 0, 0, FP8_DEFAULT_BLOCK).unwrap();
        assert!(empty.data.is_empty() && empty.scale_inv.is_empty());
    }

    #[test]
    fn dot_row_matches_dequant() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let (rows, cols) = (200, 333);
        let mut data = randn(&mut rng, rows * cols);
        for (i, v) in data.iter_mut().enumerate() {
            *v *= 2f32.powi(((i % cols) / 64) as i32 * 3 - 6);
        }
        let m = quantize_fp8_blocked(&data, rows, cols, FP8_DEFAULT_BLOCK).unwrap();
        let d = m.dequantize();
        let x = randn(&mut rng, cols);
        for r in 0..rows {
            let row = &d[r * cols..(r + 1) * cols];
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
