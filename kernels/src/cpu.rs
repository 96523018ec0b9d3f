//! CPU kernels over packed weights: row dot products for every packed format, and the small math ops.
//! f32 accumulation throughout.

use crate::quant::{E2M1_LUT, E4M3_LUT};

/// A read-only view of a packed 2-D weight `[rows, cols]` (or one expert of a 3-D one).
#[derive(Clone, Copy, Debug)]
pub enum WeightView<'a> {
    F32 {
        data: &'a [u8],
        rows: usize,
        cols: usize,
    },
    BF16 {
        data: &'a [u8],
        rows: usize,
        cols: usize,
    },
    F16 {
        data: &'a [u8],
        rows: usize,
        cols: usize,
    },
    /// e4m3 bytes + f32 scale_inv per 128x128 block (little-endian bytes).
    F8 {
        data: &'a [u8],
        scales: &'a [u8],
        rows: usize,
        cols: usize,
    },
    /// E2M1 codes (2 per byte, low nibble first) + one E8M0 byte per 32 elements.
    Mxfp4 {
        data: &'a [u8],
        scales: &'a [u8],
        rows: usize,
        cols: usize,
    },
}

#[inline]
fn bf16_to_f32(lo: u8, hi: u8) -> f32 {
    f32::from_bits(((hi as u32) << 24) | ((lo as u32) << 16))
}

#[inline]
fn e8m0(b: u8) -> f32 {
    if b == 0 {
        // 2^-127 is subnormal in f32.
        f32::from_bits(0x0040_0000)
    } else {
        f32::from_bits((b as u32) << 23)
    }
}

impl<'a> WeightView<'a> {
    pub fn rows(&self) -> usize {
        match *self {
            WeightView::F32 { rows, .. }
            | WeightView::BF16 { rows, .. }
            | WeightView::F16 { rows, .. }
            | WeightView::F8 { rows, .. }
            | WeightView::Mxfp4 { rows, .. } => rows,
        }
    }
    pub fn cols(&self) -> usize {
        match *self {
            WeightView::F32 { cols, .. }
            | WeightView::BF16 { cols, .. }
            | WeightView::F16 { cols, .. }
            | WeightView::F8 { cols, .. }
            | WeightView::Mxfp4 { cols, .. } => cols,
        }
    }

    /// Sub-view of rows `[r0, r0 + n)`; for F8 the start must be a multiple of 128.
    pub fn rows_range(&self, r0: usize, n: usize) -> WeightView<'a> {
        match *self {
            WeightView::F32 { data, cols, .. } => WeightView::F32 {
                data: &data[r0 * cols * 4..(r0 + n) * cols * 4],
                rows: n,
                cols,
            },
            WeightView::BF16 { data, cols, .. } => WeightView::BF16 {
                data: &data[r0 * cols * 2..(r0 + n) * cols * 2],
                rows: n,
                cols,
            },
            WeightView::F16 { data, cols, .. } => WeightView::F16 {
                data: &data[r0 * cols * 2..(r0 + n) * cols * 2],
                rows: n,
                cols,
            },
            WeightView::F8 {
                data, scales, cols, ..
            } => {
                assert!(
                    r0.is_multiple_of(128),
                    "fp8 row range must start on a block"
                );
                let cb = cols.div_ceil(128);
                let b0 = r0 / 128;
                let b1 = (r0 + n).div_ceil(128);
                WeightView::F8 {
                    data: &data[r0 * cols..(r0 + n) * cols],
                    scales: &scales[b0 * cb * 4..b1 * cb * 4],
                    rows: n,
                    cols,
                }
            }
            WeightView::Mxfp4 {
                data, scales, cols, ..
            } => WeightView::Mxfp4 {
                data: &data[r0 * cols / 2..(r0 + n) * cols / 2],
                scales: &scales[r0 * cols / 32..(r0 + n) * cols / 32],
                rows: n,
                cols,
            },
        }
    }

    /// `sum_c W[r, c] * x[c]`.
    pub fn dot_row(&self, r: usize, x: &[f32]) -> f32 {
        match *self {
            WeightView::F32 { data, cols, .. } => {
                let row = &data[r * cols * 4..(r + 1) * cols * 4];
                let mut acc = [0f32; 4];
                for (i, (c, xv)) in row.chunks_exact(4).zip(x).enumerate() {
                    acc[i & 3] += f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * xv;
                }
                acc.iter().sum()
            }
            WeightView::BF16 { data, cols, .. } => {
                let row = &data[r * cols * 2..(r + 1) * cols * 2];
                let mut acc = [0f32; 8];
                let mut ch = row.chunks_exact(16).zip(x.chunks_exact(8));
                for (c, xv) in &mut ch {
                    for j in 0..8 {
                        acc[j] += bf16_to_f32(c[2 * j], c[2 * j + 1]) * xv[j];
                    }
                }
                let done = cols / 8 * 8;
                let mut s: f32 = acc.iter().sum();
                for c in done..cols {
                    s += bf16_to_f32(row[2 * c], row[2 * c + 1]) * x[c];
                }
                s
            }
            WeightView::F16 { data, cols, .. } => {
                let row = &data[r * cols * 2..(r + 1) * cols * 2];
                row.chunks_exact(2)
                    .zip(x)
                    .map(|(c, xv)| half::f16::from_le_bytes([c[0], c[1]]).to_f32() * xv)
                    .sum()
            }
            WeightView::F8 {
                data, scales, cols, ..
            } => {
                let row = &data[r * cols..(r + 1) * cols];
                let cb = cols.div_ceil(128);
                let srow = &scales[(r / 128) * cb * 4..(r / 128 + 1) * cb * 4];
                let mut s = 0f32;
                for (b, (wc, xc)) in row.chunks(128).zip(x.chunks(128)).enumerate() {
                    let mut acc = 0f32;
                    for (w, xv) in wc.iter().zip(xc) {
                        acc += E4M3_LUT[*w as usize] * xv;
                    }
                    let sc = f32::from_le_bytes([
                        srow[4 * b],
                        srow[4 * b + 1],
                        srow[4 * b + 2],
                        srow[4 * b + 3],
                    ]);
                    s += acc * sc;
                }
                s
            }
            WeightView::Mxfp4 {
                data, scales, cols, ..
            } => {
                let row = &data[r * cols / 2..(r + 1) * cols / 2];
                let srow = &scales[r * cols / 32..(r + 1) * cols / 32];
                let mut s = 0f32;
                for (b, (wc, xc)) in row.chunks_exact(16).zip(x.chunks_exact(32)).enumerate() {
                    let mut acc = [0f32; 2];
                    for j in 0..16 {
                        let byte = wc[j];
                        acc[0] += E2M1_LUT[(byte & 15) as usize] * xc[2 * j];
                        acc[1] += E2M1_LUT[(byte >> 4) as usize] * xc[2 * j + 1];
                    }
                    s += (acc[0] + acc[1]) * e8m0(srow[b]);
                }
                s
            }
        }
    }

    /// Row `r` as f32.
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let cols = self.cols();
        match *self {
            WeightView::F32 { data, .. } => {
                for (o, c) in out.iter_mut().zip(data[r * cols * 4..].chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            WeightView::BF16 { data, .. } => {
                for (o, c) in out
                    .iter_mut()
                    .zip(data[r * cols * 2..(r + 1) * cols * 2].chunks_exact(2))
                {
                    *o = bf16_to_f32(c[0], c[1]);
                }
            }
            WeightView::F16 { data, .. } => {
                for (o, c) in out
                    .iter_mut()
                    .zip(data[r * cols * 2..(r + 1) * cols * 2].chunks_exact(2))
                {
                    *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            WeightView::F8 { data, scales, .. } => {
                let cb = cols.div_ceil(128);
                for c in 0..cols {
                    let si = ((r / 128) * cb + c / 128) * 4;
                    let sc = f32::from_le_bytes([
                        scales[si],
                        scales[si + 1],
                        scales[si + 2],
                        scales[si + 3],
                    ]);
                    out[c] = E4M3_LUT[data[r * cols + c] as usize] * sc;
                }
            }
            WeightView::Mxfp4 { data, scales, .. } => {
                for c in 0..cols {
                    let byte = data[(r * cols + c) / 2];
                    let code = if c % 2 == 0 { byte & 15 } else { byte >> 4 };
                    out[c] = E2M1_LUT[code as usize] * e8m0(scales[(r * cols + c) / 32]);
                }
            }
        }
    }
}

/// `out[t] = x[t] / rms(x[t]) * w` for each row of width `w.len()`.
pub fn rmsnorm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    for ((o, v), g) in out.iter_mut().zip(x).zip(w) {
        *o = v * inv * g;
    }
}

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Rotate-half RoPE on the first `rotary_dim` dims of each `head_dim`-wide head of `x`, at position `pos`.
pub fn rope_row(x: &mut [f32], pos: u32, theta: f32, head_dim: usize, rotary_dim: usize) {
    let half = rotary_dim / 2;
    for head in x.chunks_exact_mut(head_dim) {
        for i in 0..half {
            let inv_freq = 1.0 / (theta as f64).powf(2.0 * i as f64 / rotary_dim as f64);
            let ang = pos as f64 * inv_freq;
            let (s, c) = (ang.sin() as f32, ang.cos() as f32);
            let a = head[i];
            let b = head[i + half];
            head[i] = a * c - b * s;
            head[i + half] = b * c + a * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{quantize_fp8_blocked, quantize_mxfp4};
    use rand::{Rng, SeedableRng};

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect()
    }

    #[test]
    fn dot_rows_match_dequantized() {
        let (rows, cols) = (130, 160);
        let w = rand_vec(rows * cols, 1);
        let x = rand_vec(cols, 2);
        let f32b: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        let bfb: Vec<u8> = w
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        let m = quantize_mxfp4(&w, rows, cols).unwrap();
        let f = quantize_fp8_blocked(&w, rows, cols, (128, 128)).unwrap();
        let fs: Vec<u8> = f.scale_inv.iter().flat_map(|v| v.to_le_bytes()).collect();
        let views = [
            WeightView::F32 {
                data: &f32b,
                rows,
                cols,
            },
            WeightView::BF16 {
                data: &bfb,
                rows,
                cols,
            },
            WeightView::Mxfp4 {
                data: &m.blocks,
                scales: &m.scales,
                rows,
                cols,
            },
            WeightView::F8 {
                data: &f.data,
                scales: &fs,
                rows,
                cols,
            },
        ];
        for v in views {
            let mut row = vec![0f32; cols];
            for r in [0, 7, 128, 129] {
                v.row_into(r, &mut row);
                let want: f32 = row.iter().zip(&x).map(|(a, b)| a * b).sum();
                let got = v.dot_row(r, &x);
                assert!(
                    (want - got).abs() < 1e-4 * (1.0 + want.abs()),
                    "{v:?} row {r}: {want} vs {got}"
                );
                let exact: f32 = w[r * cols..(r + 1) * cols]
                    .iter()
                    .zip(&x)
                    .map(|(a, b)| a * b)
                    .sum();
                assert!(
                    (exact - got).abs() < 0.5 + 0.2 * exact.abs(),
                    "{exact} vs {got}"
                );
            }
        }
        // Sub-views address the same rows.
        let sub = views[2].rows_range(128, 2);
        assert_eq!(sub.dot_row(1, &x), views[2].dot_row(129, &x));
    }

    #[test]
    fn rope_is_a_rotation() {
        let mut x = rand_vec(64, 3);
        let n0: f32 = x.iter().map(|v| v * v).sum();
        let tail = x[20..32].to_vec();
        rope_row(&mut x, 17, 10000.0, 32, 20);
        let n1: f32 = x.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-4);
        assert_eq!(&x[20..32], &tail[..]); // pass-through dims untouched
        let mut y = vec![1.0, 0.0, 0.0, 0.0];
        rope_row(&mut y, 1, 10000.0, 4, 4);
        assert!((y[0] - 1f32.cos()).abs() < 1e-6 && (y[2] - 1f32.sin()).abs() < 1e-6);
    }
}
