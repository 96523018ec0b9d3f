//! TMA tensor maps of the weights the megakernel's ring streams (`MK_TMAP` in megakernel.cu).
//!
//! The ring's producer fills a chunk (32 weight rows x one 1 KB K segment) with one bulk copy per row segment;
//! on an H200 that streams ~17 GB/s per SM, where 1-4 large copies per chunk reach ~28 (s9r2). A tensor map lets
//! one TMA instruction copy a 16-row half of a chunk (16 KB) into a 128-byte-swizzled layout the consumers read
//! without bank conflicts. This module computes, per device instruction, the maps' geometry; the CUDA runtime
//! encodes them with the driver (`cuTensorMapEncodeTiled`) and the kernel falls back to row copies for any
//! instruction (or chunk) they do not cover.

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

/// Device format codes (`enum Fmt` in megakernel.cu).
const FMT_BF16: i32 = 1;
const FMT_F8: i32 = 3;
const FMT_MXFP4: i32 = 4;

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
}
