//! TMA tensor maps of the weights the megakernel's ring streams (`MK_TMAP` in megakernel.cu).
//!
//! The ring's producer fills a chunk (32 weight rows x one 1 KB K segment) with one bulk copy per row segment;
//! on an H200 that streams ~17 GB/s per SM, where 1-4 large copies per chunk reach ~28 (s9r2). A tensor map lets
//! one TMA instruction copy a 16-row half of a chunk (16 KB) into a 128-byte-swizzled layout the consumers read
//! without bank conflicts. This module computes, per device instruction, the maps' geometry; the CUDA runtime
//! encodes them with the driver (`cuTensorMapEncodeTiled`) and the kernel falls back to row copies for any
//! instruction (or chunk) they do not cover.

use crate::device::fmt::{BF16 as FMT_BF16, F8 as FMT_F8, MXFP4 as FMT_MXFP4};
use crate::device::{op, DInstr};

/// Map slots per instruction (the kernel indexes `tmaps + (instr * 3 + slot) * 128`).
pub const MAPS_PER_INSTR: usize = 3;
/// Bytes of one encoded map (`CUtensorMap`).
pub const MAP_BYTES: usize = 128;

/// Shared-memory swizzle of a map's boxes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Swizzle {
    /// 16-byte units of each 128-byte line XOR-ed with the line's index mod 8.
    B128,
    /// 16-byte units (address bits 4-5) XOR-ed with address bits 7-8.
    B64,
}

/// The geometry of one tiled tensor map over the weights buffer (element = one byte; dimensions innermost first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    /// Byte offset of the map's origin in the weights buffer.
    pub offset: u64,
    pub rank: u32,
    pub dims: [u64; 3],
    /// Byte strides of dimensions 1.. (dimension 0 is contiguous).
    pub strides: [u64; 2],
    pub boxdim: [u32; 3],
    pub swizzle: Swizzle,
}

/// Rows and row length (elements) of the weight matrix an instruction streams, experts flattened into rows.
fn matrix(d: &DInstr) -> Option<(u64, u64)> {
    let (rows, k) = match d.op {
        op::MATMUL => (d.n as i64, d.k as i64),
        op::MOE_UP => (d.e as i64 * 2 * d.inter as i64, d.k as i64),
        op::MOE_DOWN => (d.e as i64 * d.n as i64, d.inter as i64),
        _ => return None,
    };
    (rows > 0 && k > 0 && rows < i32::MAX as i64).then_some((rows as u64, k as u64))
}

/// The maps of one instruction: [weights as [kunit][row][128 B] (3-D), weights as [row][K bytes] (2-D), MXFP4
/// scales as [row][K / 32]]; None where the instruction does not stream through the ring or the shapes do not
/// allow a map (rows not 128-byte multiples, unaligned origins, MXFP4 K not a multiple of 512, FP8 expert rows
/// not a multiple of 8).
pub fn instr_maps(d: &DInstr) -> [Option<MapSpec>; MAPS_PER_INSTR] {
    let mut out = [None; MAPS_PER_INSTR];
    let Some((rows, k)) = matrix(d) else {
        return out;
    };
    let rowbytes = match d.fmt {
        FMT_BF16 => 2 * k,
        FMT_F8 => k,
        FMT_MXFP4 => k / 2,
        _ => return out,
    };
    if d.w < 0 || d.w % 16 != 0 || rowbytes % 128 != 0 {
        return out;
    }
    // FP8 block scales are per 128 rows of an expert: the kernel's row permutation needs 8-row-aligned halves.
    let per_expert = if d.op == op::MOE_UP {
        2 * d.inter as u64
    } else if d.op == op::MOE_DOWN {
        d.n as u64
    } else {
        rows
    };
    if d.fmt == FMT_F8 && per_expert % 8 != 0 {
        return out;
    }
    out[0] = Some(MapSpec {
        offset: d.w as u64,
        rank: 3,
        dims: [128, rows, rowbytes / 128],
        strides: [rowbytes, 128],
        boxdim: [128, 16, 8],
        swizzle: Swizzle::B128,
    });
    out[1] = Some(MapSpec {
        offset: d.w as u64,
        rank: 2,
        dims: [rowbytes, rows, 1],
        strides: [rowbytes, 0],
        boxdim: [128, 16, 1],
        swizzle: Swizzle::B128,
    });
    if d.fmt == FMT_MXFP4 && k % 512 == 0 && d.ws >= 0 && d.ws % 16 == 0 {
        out[2] = Some(MapSpec {
            offset: d.ws as u64,
            rank: 2,
            dims: [k / 32, rows, 1],
            strides: [k / 32, 0],
            boxdim: [64, 16, 1],
            swizzle: Swizzle::B64,
        });
    }
    out
}

/// The kernel's per-instruction validity bits for the maps that encoded (`tmok`: 1, 2, 4 for the three slots).
pub fn flags(ok: &[bool; MAPS_PER_INSTR]) -> u32 {
    ok.iter()
        .enumerate()
        .map(|(i, &b)| if b { 1u32 << i } else { 0 })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instr(op: i32, fmt: i32, n: i32, k: i32) -> DInstr {
        DInstr {
            op,
            fmt,
            n,
            k,
            w: 4096,
            ws: 1 << 20,
            ..Default::default()
        }
    }

    #[test]
    fn fp8_projection_gets_both_weight_views_and_no_scale_map() {
        let m = instr_maps(&instr(op::MATMUL, FMT_F8, 12288, 4096));
        let w3 = m[0].expect("3-D view");
        assert_eq!(w3.dims, [128, 12288, 32]);
        assert_eq!(w3.strides, [4096, 128]);
        assert_eq!(w3.boxdim, [128, 16, 8]);
        let w2 = m[1].expect("2-D view");
        assert_eq!((w2.dims[0], w2.dims[1], w2.strides[0]), (4096, 12288, 4096));
        assert!(
            m[2].is_none(),
            "FP8 block scales are read from global memory"
        );
    }

    #[test]
    fn mxfp4_experts_flatten_rows_and_map_their_scales() {
        let mut d = instr(op::MOE_UP, FMT_MXFP4, 0, 4096);
        d.e = 16;
        d.inter = 2048;
        let m = instr_maps(&d);
        let w3 = m[0].expect("weights");
        assert_eq!(w3.dims, [128, 16 * 4096, 16]);
        let s = m[2].expect("scales");
        assert_eq!((s.offset, s.dims[0], s.dims[1]), (1 << 20, 128, 16 * 4096));
        assert_eq!((s.boxdim[0], s.swizzle), (64, Swizzle::B64));
        let mut down = instr(op::MOE_DOWN, FMT_MXFP4, 4096, 0);
        down.e = 16;
        down.inter = 2048;
        let m = instr_maps(&down);
        assert_eq!(m[0].expect("down").dims, [128, 16 * 4096, 8]);
    }

    #[test]
    fn shapes_a_map_cannot_cover_fall_back() {
        // Rows shorter than one 128-byte line (tiny models), misaligned origins, non-ring ops and formats.
        assert!(instr_maps(&instr(op::MATMUL, FMT_MXFP4, 64, 64))[0].is_none());
        let mut d = instr(op::MATMUL, FMT_F8, 256, 4096);
        d.w = 8;
        assert!(instr_maps(&d)[0].is_none());
        assert!(instr_maps(&instr(op::ATTN, FMT_F8, 256, 4096))[0].is_none());
        assert!(instr_maps(&instr(op::MATMUL, 0, 256, 4096))[0].is_none());
        // MXFP4 with K not a multiple of 512: weights mapped, scales not (the kernel reads them from global).
        let m = instr_maps(&instr(op::MATMUL, FMT_MXFP4, 256, 256));
        assert!(m[0].is_some() && m[2].is_none());
        // FP8 experts whose per-expert rows are not a multiple of 8.
        let mut d = instr(op::MOE_DOWN, FMT_F8, 12, 4096);
        d.e = 4;
        d.inter = 4096;
        assert!(instr_maps(&d)[0].is_none());
    }

    #[test]
    fn flags_set_one_bit_per_encoded_slot() {
        assert_eq!(flags(&[true, false, true]), 5);
        assert_eq!(flags(&[false, true, false]), 2);
        assert_eq!(flags(&[false; 3]), 0);
    }

    // ---- The kernel's tensor-copied slot layout, emulated: what TMA writes (box order, then the swizzle) and
    // what `step_weights<FMT, SRING, true>` / `ring_consume` read back (megakernel.cu), for every lane, K step and
    // row tile. A change to either side that the other does not follow fails here.

    use rand::{RngCore, SeedableRng};

    /// Byte offset of box-linear offset `l` after the shared-memory swizzle (16-byte unit bits 4.. XOR the
    /// address bits from 7; the slot is 1 KB aligned).
    fn swz(l: usize, sw: Swizzle) -> usize {
        match sw {
            Swizzle::B128 => l ^ (((l >> 7) & 7) << 4),
            Swizzle::B64 => l ^ (((l >> 7) & 3) << 4),
        }
    }

    const SLOT: usize = 37888; // RING_SLOT
    const TSCALE: usize = 32768; // RING_TSCALE_OFF

    struct Fill {
        w: Vec<u8>,
        s: Vec<u8>,
        rowbytes: usize,
        nsc: usize,
        slot: Vec<u8>,
    }

    /// A weight matrix `rows x rowbytes` (MXFP4 scales `rows x rowbytes / 16`) of random bytes, and one slot
    /// filled as the producer does for halves starting at rows `r0` and byte offset `boff` (3-D box per half,
    /// 2-D scale box; out-of-range bytes zero).
    fn fill(rows: usize, rowbytes: usize, r0: [usize; 2], boff: usize, scales: bool) -> Fill {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(rows as u64 * 31 + rowbytes as u64);
        let mut w = vec![0u8; rows * rowbytes];
        rng.fill_bytes(&mut w);
        let nsc = rowbytes / 16;
        let mut s = vec![0u8; rows * nsc];
        rng.fill_bytes(&mut s);
        let mut slot = vec![0xEEu8; SLOT];
        for (h, &rh) in r0.iter().enumerate() {
            for kun in 0..8 {
                for row in 0..16 {
                    for b in 0..128 {
                        let (r, c) = (rh + row, boff + kun * 128 + b);
                        let v = if r < rows && c < rowbytes {
                            w[r * rowbytes + c]
                        } else {
                            0
                        };
                        slot[h * 16384 + swz(kun * 2048 + row * 128 + b, Swizzle::B128)] = v;
                    }
                }
            }
            if scales {
                for row in 0..16 {
                    for b in 0..64 {
                        let (r, c) = (rh + row, boff / 16 + b);
                        let v = if r < rows && c < nsc {
                            s[r * nsc + c]
                        } else {
                            0
                        };
                        slot[TSCALE + h * 1024 + swz(row * 64 + b, Swizzle::B64)] = v;
                    }
                }
            }
        }
        Fill {
            w,
            s,
            rowbytes,
            nsc,
            slot,
        }
    }

    /// The consumer's addresses (megakernel.cu `ring_consume` / `step_weights`, TL = true) for lane (gq, tq),
    /// K step u, row tile rt: (weight bytes of row pr, of row pr + 8, their slot row pr, bytes per load).
    fn consumer(
        fmt: i32,
        gq: usize,
        tq: usize,
        u: usize,
        rt: usize,
    ) -> (usize, usize, usize, usize) {
        let pr = match fmt {
            FMT_F8 => ((gq & 3) << 1) | (gq >> 2),
            FMT_BF16 => ((gq & 1) << 2) | (gq >> 1),
            _ => gq,
        };
        let tsel = match fmt {
            FMT_F8 => tq >> 1,
            FMT_BF16 => tq,
            _ => 0,
        };
        let wo = match fmt {
            FMT_F8 => 8 * (tq & 1),
            FMT_MXFP4 => 4 * tq,
            _ => 0,
        };
        let (kun, unit, width) = match fmt {
            FMT_MXFP4 => (u >> 3, u & 7, 4),
            FMT_F8 => (u >> 2, ((u & 3) << 1) | tsel, 8),
            _ => (u >> 1, ((u & 1) << 2) | tsel, 16),
        };
        let wa = pr * 128 + wo + rt * 16384 + kun * 2048 + ((unit ^ pr) << 4);
        (wa, wa + 1024, pr, width)
    }

    fn check_format(fmt: i32, k: usize) {
        let rowbytes = match fmt {
            FMT_MXFP4 => k / 2,
            FMT_F8 => k,
            _ => 2 * k,
        };
        let sb = match fmt {
            FMT_MXFP4 => 16,
            FMT_F8 => 32,
            _ => 64,
        };
        let rows = 80;
        // Second half running past the last row: zero fill there, never read as another row's data.
        for (r0, boff) in [([0, 16], 0), ([40, 72], rowbytes - 1024.min(rowbytes))] {
            let f = fill(rows, rowbytes, r0, boff, fmt == FMT_MXFP4);
            let nks = 1024.min(f.rowbytes - boff) / sb;
            for u in 0..nks {
                for (rt, &rbase) in r0.iter().enumerate() {
                    // Loads of one instruction, split in wavefronts of 128 bytes: no two lanes of one wavefront
                    // touch different 4-byte words of the same bank.
                    for plus8 in [false, true] {
                        let mut words = std::collections::BTreeMap::new();
                        for lane in 0..32 {
                            let (a, b, _, width) = consumer(fmt, lane >> 2, lane & 3, u, rt);
                            let addr = if plus8 { b } else { a };
                            let phase = lane / (32 * 4 / width);
                            for wd in 0..width / 4 {
                                let word = addr / 4 + wd;
                                let prev = words.insert((phase, word % 32), word);
                                assert!(
                                    prev.is_none() || prev == Some(word),
                                    "fmt {fmt}: bank conflict at step {u} tile {rt} lane {lane}"
                                );
                            }
                        }
                    }
                    for lane in 0..32 {
                        let (gq, tq) = (lane >> 2, lane & 3);
                        let (a, b, pr, width) = consumer(fmt, gq, tq, u, rt);
                        for (addr, row) in [(a, pr), (b, pr + 8)] {
                            let r = rbase + row;
                            let c = boff + u * sb + tq * width;
                            let want: Vec<u8> = (0..width)
                                .map(|j| {
                                    if r < rows {
                                        f.w[r * f.rowbytes + c + j]
                                    } else {
                                        0
                                    }
                                })
                                .collect();
                            assert_eq!(
                                &f.slot[addr..addr + width],
                                &want[..],
                                "fmt {fmt} step {u} tile {rt} lane {lane} row {row}"
                            );
                        }
                        if fmt == FMT_MXFP4 {
                            // sr = sb + rt * 1024 + (((u >> 4) ^ ((pr >> 1) & 3)) << 4 | (u & 15)), row + 8 at +512.
                            let sr = TSCALE
                                + pr * 64
                                + rt * 1024
                                + ((((u >> 4) ^ ((pr >> 1) & 3)) << 4) | (u & 15));
                            for (addr, row) in [(sr, pr), (sr + 512, pr + 8)] {
                                let r = rbase + row;
                                let want = if r < rows {
                                    f.s[r * f.nsc + boff / 16 + u]
                                } else {
                                    0
                                };
                                assert_eq!(
                                    f.slot[addr], want,
                                    "scale step {u} tile {rt} row {row}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn consumers_read_back_exactly_what_the_tensor_copies_wrote_without_bank_conflicts() {
        check_format(FMT_MXFP4, 4096);
        check_format(FMT_F8, 4096);
        check_format(FMT_BF16, 1024);
    }

    #[test]
    fn mxfp4_scale_loads_of_the_eight_rows_fall_in_eight_banks() {
        for u in 0..64 {
            let banks: std::collections::BTreeSet<usize> = (0..8)
                .map(|pr| {
                    (TSCALE + pr * 64 + ((((u >> 4) ^ ((pr >> 1) & 3)) << 4) | (u & 15))) / 4 % 32
                })
                .collect();
            assert_eq!(banks.len(), 8, "step {u}");
        }
    }
}
