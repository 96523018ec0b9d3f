//! v18 pre-tiled weights: a second copy of every FP8 / MXFP4 matrix the megakernel streams through its weight
//! ring, laid out so that each 16-row half of a ring chunk is one contiguous block exactly as the ring slot holds
//! it (rows at the slot's padded pitch). The producer warp then fills a chunk with one or two bulk copies instead of
//! one per row (s16r1, H100: issuing a chunk's 32 row copies took ~1.3 us, the three chunks an instruction
//! prefetches at its start ~4 us). `mimo_tile` in kernels/cuda/megakernel.cu builds the copy on the device; this
//! module decides what to tile, where it goes and what the kernel reads per instruction, and holds the layout's
//! host reference.
//!
//! Layout of a matrix of `rows` rows of `rb` bytes: `[block pair p][segment s][block b & 1][row r < 16][pitch
//! bytes]` (block b = 16-row block of rows 16 b .. 16 b + 15, pair p = b / 2), where segment s of a row is its
//! bytes `[s seg, s seg + seg)` (`seg = min(RING_SEG, rb)`), the rest of each pitch and the rows past `rows` zero.
//! MXFP4 scales the same way with `seg / 16` scale bytes a segment at the scale pitch. A 32-row ring chunk of
//! segment s is then one contiguous block pair, and a row group's whole K range one contiguous run (s16r3, H100:
//! the segment-major order `[s][b]` put a row group's segments megabytes apart and slowed the q projection ~10 %).
//! A chunk takes half h (tensor rows 16 b .. 16 b + 15) from byte [`block_offset`].

use crate::device::{fmt, op, DInstr};
use mimo_ir::plan::WeightDesc;
use mimo_ir::DType;

/// Bytes of K a ring chunk covers per row (`RING_SEG` in the kernel).
pub const RING_SEG: usize = 1024;
/// v23 (kernels built with `MK_V23`, which carry the `mimo_v23_marker` entry): MXFP4 ring chunks are 64 rows x
/// `V23_SEG` bytes of K, and the MXFP4 weights' tiled copy is step-major: `[16-row block quad q][segment s][block
/// b & 3][32-element step st][row r < 16][16 bytes]`, scales `[q][s][b & 3][st][r]` (one byte each), so that a
/// chunk of four consecutive aligned blocks is one contiguous run and the consumers' fragment loads of 8 rows are
/// one 128-byte wavefront. FP8 keeps the v18 layout.
pub const V23_SEG: usize = 512;
/// Pitch of a row's MXFP4 scales in a ring slot (`RING_SSTR`).
pub const RING_SSTR: usize = 80;

/// Row pitch of a ring slot for weight format `f` (`RingFmt<FMT>::PITCH`).
pub fn ring_pitch(f: i32) -> usize {
    RING_SEG
        + match f {
            fmt::MXFP4 => 16,
            fmt::F8 => 32,
            _ => 64,
        }
}

/// One `mimo_tile` launch: a matrix (or its MXFP4 scales) at byte `src` of the weights, tiled to byte `dst` of the
/// tiled buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TileJob {
    pub name: String,
    pub src: u64,
    pub dst: u64,
    pub rows: u64,
    pub rb: u32,
    pub seg: u32,
    /// Row pitch of the v18 layout; `-U` for v23's step-major layout in `U`-byte units (see [`V23_SEG`]).
    pub pitch: i32,
    pub nsg: u32,
    pub nb: u64,
}

impl TileJob {
    /// Bytes of the tiled copy (whole block pairs).
    pub fn bytes(&self) -> u64 {
        if self.pitch < 0 {
            return self.nsg as u64 * self.nb.div_ceil(4) * 4 * 16 * self.seg as u64;
        }
        self.nsg as u64 * self.nb.div_ceil(2) * 2 * 16 * self.pitch as u64
    }
}

/// What to tile for a program, the tiled buffer's size, and per instruction the kernel's `tinfo` triple: tiled
/// weights' byte offset (-1: none), tiled MXFP4 scales' byte offset (-1: none), the 16-row block count.
#[derive(Clone, Debug, Default)]
pub struct TilePlan {
    pub jobs: Vec<TileJob>,
    pub tinfo: Vec<i64>,
    pub bytes: u64,
}

/// Byte offset of tiled block `b` of segment `s` in a tiled matrix of `nsg` segments a row (the kernel's
/// `(((b >> 1) * nsg + s) * 2 + (b & 1)) * HW`, HW = 16 pitch).
pub fn block_offset(s: u64, nsg: u64, b: u64, pitch: usize) -> u64 {
    (((b >> 1) * nsg + s) * 2 + (b & 1)) * 16 * pitch as u64
}

/// Byte offset of v23 step-major block `b` of segment `s` (blocks of `16 seg` bytes, `seg` per segment).
pub fn v23_block_offset(s: u64, nsg: u64, b: u64, seg: usize) -> u64 {
    (((b >> 2) * nsg + s) * 4 + (b & 3)) * 16 * seg as u64
}

/// The tiling of `instrs` (encoded from a plan with `weights`): every ring-streamed FP8 / MXFP4 matrix of a matmul or MoE
/// instruction, once per weight (instructions sharing a weight share its copy).
pub fn tile_plan(weights: &[WeightDesc], instrs: &[DInstr]) -> TilePlan {
    tile_plan_for(weights, instrs, false)
}

/// [`tile_plan`] for a kernel with (`v23`) or without the v23 MXFP4 ring.
pub fn tile_plan_for(weights: &[WeightDesc], instrs: &[DInstr], v23: bool) -> TilePlan {
    let mut out = TilePlan {
        tinfo: [-1, -1, 0].repeat(instrs.len()),
        ..Default::default()
    };
    let mut done: std::collections::HashMap<u64, [i64; 3]> = Default::default();
    for (i, d) in instrs.iter().enumerate() {
        if !matches!(d.op, op::MATMUL | op::MOE_UP | op::MOE_DOWN)
            || !matches!(d.fmt, fmt::F8 | fmt::MXFP4)
        {
            continue;
        }
        if let Some(t) = done.get(&(d.w as u64)) {
            out.tinfo[3 * i..3 * i + 3].copy_from_slice(t);
            continue;
        }
        let want = if d.fmt == fmt::F8 {
            DType::F8E4M3
        } else {
            DType::MXFP4
        };
        let Some(w) = weights
            .iter()
            .find(|w| w.offset == d.w as u64 && w.dtype == want && w.dims.len() >= 2)
        else {
            continue;
        };
        let k = *w.dims.last().unwrap_or(&0);
        let rows: usize = w.dims[..w.dims.len() - 1].iter().product();
        let rb = if d.fmt == fmt::F8 { k } else { k / 2 };
        if rows == 0 || rb == 0 || rb % 16 != 0 || w.nbytes != (rows * rb) as u64 {
            continue;
        }
        let v23 = v23 && d.fmt == fmt::MXFP4;
        let seg = rb.min(if v23 { V23_SEG } else { RING_SEG });
        let nsg = rb.div_ceil(seg);
        let nb = rows.div_ceil(16) as u64;
        let mut job = |name: String, src: u64, rb: usize, seg: usize, pitch: i32| {
            let j = TileJob {
                name,
                src,
                dst: out.bytes.next_multiple_of(256),
                rows: rows as u64,
                rb: rb as u32,
                seg: seg as u32,
                pitch,
                nsg: nsg as u32,
                nb,
            };
            out.bytes = j.dst + j.bytes();
            let at = j.dst as i64;
            out.jobs.push(j);
            at
        };
        let wt = job(
            w.name.clone(),
            w.offset,
            rb,
            seg,
            if v23 { -16 } else { ring_pitch(d.fmt) as i32 },
        );
        let st = if d.fmt == fmt::MXFP4 && w.scale_nbytes == (rows * (k / 32)) as u64 {
            job(
                format!("{} scales", w.name),
                w.scale_offset,
                k / 32,
                seg / 16,
                if v23 { -1 } else { RING_SSTR as i32 },
            )
        } else {
            -1
        };
        let t = [wt, st, nb as i64];
        done.insert(d.w as u64, t);
        out.tinfo[3 * i..3 * i + 3].copy_from_slice(&t);
    }
    out
}

/// Host reference of `mimo_tile`: the tiled copy of `job`'s matrix, read from `src` (the job's source bytes).
pub fn tile_host(src: &[u8], job: &TileJob) -> Vec<u8> {
    let (rb, seg) = (job.rb as usize, job.seg as usize);
    let mut out = vec![0u8; job.bytes() as usize];
    if job.pitch < 0 {
        let u = job.pitch.unsigned_abs() as usize;
        for s in 0..job.nsg as usize {
            for b in 0..job.nb as usize {
                let base = v23_block_offset(s as u64, job.nsg as u64, b as u64, seg) as usize;
                for r in 0..16 {
                    let row = b * 16 + r;
                    if row as u64 >= job.rows {
                        continue;
                    }
                    let (lo, hi) = (s * seg, ((s + 1) * seg).min(rb));
                    for (i, x) in src[row * rb + lo..row * rb + hi].iter().enumerate() {
                        out[base + (i / u) * 16 * u + r * u + i % u] = *x;
                    }
                }
            }
        }
        return out;
    }
    let pitch = job.pitch as usize;
    for s in 0..job.nsg as usize {
        for b in 0..job.nb as usize {
            for r in 0..16 {
                let row = b * 16 + r;
                if row as u64 >= job.rows {
                    continue;
                }
                let at =
                    block_offset(s as u64, job.nsg as u64, b as u64, pitch) as usize + r * pitch;
                let (lo, hi) = (s * seg, ((s + 1) * seg).min(rb));
                out[at..at + hi - lo].copy_from_slice(&src[row * rb + lo..row * rb + hi]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{cu_define, MEGAKERNEL_CU};

    /// A tiling job of a `rows` x `rb`-byte matrix at offset 0, `seg`-byte segments, layout `pitch`.
    fn job0(rows: usize, rb: usize, seg: usize, pitch: i32) -> TileJob {
        TileJob {
            name: "w".into(),
            src: 0,
            dst: 0,
            rows: rows as u64,
            rb: rb as u32,
            seg: seg as u32,
            pitch,
            nsg: rb.div_ceil(seg) as u32,
            nb: rows.div_ceil(16) as u64,
        }
    }

    /// A xorshift64 stream of non-zero bytes (so that every zero in a tiled copy is padding).
    fn nonzero_bytes(mut seed: u64) -> impl FnMut(usize) -> Vec<u8> {
        move |n| {
            (0..n)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    (seed % 251 + 1) as u8
                })
                .collect()
        }
    }

    #[test]
    fn constants_match_the_kernel() {
        assert_eq!(cu_define("RING_SEG"), RING_SEG);
        assert_eq!(cu_define("RING_SSTR"), RING_SSTR);
        // The pitches of RingFmt: the kernel's expression, checked against ours.
        assert!(MEGAKERNEL_CU
            .contains("PITCH = RING_SEG + (FMT == FMT_MXFP4 ? 16 : FMT == FMT_F8 ? 32 : 64);"));
        assert_eq!(ring_pitch(fmt::MXFP4), 1040);
        assert_eq!(ring_pitch(fmt::F8), 1056);
        // The producer reads block b of segment s where block_offset puts it, HW = 16 PITCH bytes a block.
        assert!(
            MEGAKERNEL_CU.contains("const long long at = (((b >> 1) * nsg + sgg) * 2 + (b & 1));")
        );
        assert!(MEGAKERNEL_CU.contains("tw + at * HW"));
        assert!(MEGAKERNEL_CU.contains(
            "const long long row = (2 * (long long)pr + b2) * 16 + r, col = (long long)u * w"
        ));
    }

    /// Every ring chunk the kernel could take from the tiled copy (segment s, a 16-aligned half) holds, at the
    /// slot's pitch, exactly the bytes the row copies would put there; padding and rows past the end are zero.
    #[test]
    fn tiled_blocks_hold_what_row_copies_would() {
        let mut bytes = nonzero_bytes(0x9e3779b97f4a7c15);
        // (rows, row bytes): several segments with a partial last one, a short row, rows not a multiple of 16.
        for &(rows, rb) in &[(40usize, 2560usize), (33, 1024), (16, 48), (7, 2048)] {
            let src = bytes(rows * rb);
            let seg = rb.min(RING_SEG);
            let job = job0(rows, rb, seg, 1056i32);
            let t = tile_host(&src, &job);
            assert_eq!(t.len() as u64, job.bytes());
            for s in 0..job.nsg as usize {
                let bytes = seg.min(rb - s * seg);
                for b in 0..job.nb {
                    let base = block_offset(s as u64, job.nsg as u64, b, 1056) as usize;
                    for r in 0..16usize {
                        let row = b as usize * 16 + r;
                        let got = &t[base + r * 1056..base + (r + 1) * 1056];
                        if row < rows {
                            let want = &src[row * rb + s * seg..row * rb + s * seg + bytes];
                            assert_eq!(&got[..bytes], want, "rows {rows} rb {rb} s {s} row {row}");
                            assert!(got[bytes..].iter().all(|&x| x == 0));
                        } else {
                            assert!(
                                got.iter().all(|&x| x == 0),
                                "row {row} past the end is zero"
                            );
                        }
                    }
                }
            }
        }
    }

    /// v23's step-major copy: byte i of row r's segment s, 16-byte step st = i / 16, sits at its block's
    /// `st * 256 + (r % 16) * 16 + i % 16` (scales: `st * 16 + r % 16`), exactly where the kernel's consumers read
    /// it; the rest of every block (steps past the row, rows past the end) is zero.
    #[test]
    fn v23_blocks_are_step_major() {
        assert_eq!(cu_define("V23_SEG"), V23_SEG);
        // The default build is v22 (v23 is a knob until it is timed); a v23 build says so by its marker entry,
        // which is what makes the runtime tile MXFP4 step-major.
        assert_eq!(cu_define("MK_V23"), 0);
        assert_eq!(cu_define("MK_V23F8"), 0);
        assert!(MEGAKERNEL_CU.contains("extern \"C\" __global__ void mimo_v23_marker() {}"));
        assert!(MEGAKERNEL_CU.contains("return ((b >> 2) * nsg + sgg) * 4 + (b & 3);"));
        assert!(MEGAKERNEL_CU.contains("base + tile * 16 * seg + gq * 16 + tq * 4"));
        assert!(MEGAKERNEL_CU.contains("base + V23_TSCALE_OFF + tile * seg + gq"));
        // Tiled strides: a step 256 bytes (16 rows x 16), row + 8 at 128; scales a step 16, row + 8 at 8.
        assert!(MEGAKERNEL_CU.contains(
            "constexpr unsigned int WR8 = TL ? 128u : 8u * V23_PITCH, WST = TL ? 256u : 16u;"
        ));
        assert!(MEGAKERNEL_CU.contains(
            "constexpr unsigned int SR8 = TL ? 8u : 8u * V23_SSTR, SST = TL ? 16u : 1u;"
        ));
        let mut bytes = nonzero_bytes(0x2545f4914f6cdd1d);
        for &(rows, rb, unit) in &[
            (72usize, 1536usize, 16usize),
            (40, 256, 16),
            (72, 96, 1),
            (16, 32, 1),
        ] {
            let src = bytes(rows * rb);
            let seg = rb.min(if unit == 16 { V23_SEG } else { V23_SEG / 16 });
            let job = job0(rows, rb, seg, -(unit as i32));
            let t = tile_host(&src, &job);
            assert_eq!(t.len() as u64, job.bytes());
            let mut seen = 0usize;
            for row in 0..rows {
                for k in 0..rb {
                    let (s, i) = (k / seg, k % seg);
                    let at = v23_block_offset(s as u64, job.nsg as u64, (row / 16) as u64, seg)
                        as usize
                        + (i / unit) * 16 * unit
                        + (row % 16) * unit
                        + i % unit;
                    assert_eq!(
                        t[at],
                        src[row * rb + k],
                        "rows {rows} rb {rb} row {row} k {k}"
                    );
                    seen += 1;
                }
            }
            // Everything else is zero (the source bytes are all non-zero).
            assert_eq!(t.iter().filter(|&&x| x != 0).count(), seen);
        }
    }

    /// ring_produce23's tiled chunk, replayed on the host: tiles whose 16-row blocks are consecutive inside one
    /// 4-block quad are copied as one run (`(n - 1) 16 tseg + 16 bytes` weight bytes from `v23_block`, scales
    /// likewise) to the slot at `t0 16 tseg`; every consumer's reads (`tile t: t 16 seg + st 256 + r 16 + x`,
    /// scales `V23_TSCALE_OFF + t seg + st 16 + r`) then see rows `16 b_t + r` of the matrix. Blocks from several
    /// quads, gaps, full and partial last segments.
    #[test]
    fn v23_chunk_runs_land_where_consumers_read() {
        assert!(MEGAKERNEL_CU
            .contains("while (t1 < 4 && tb[t1] == tb[t1 - 1] + 1 && (tb[t1] & 3) != 0) t1++;"));
        assert!(MEGAKERNEL_CU.contains(
            "const unsigned int wbytes = (n - 1) * 16u * tseg + 16u * bytes, sb = (n - 1) * tseg + bytes;"
        ));
        assert!(MEGAKERNEL_CU.contains(
            "bulk_g2s(dst + t0 * 16 * tseg, tw + blk * 16 * tseg, wbytes, full + slot);"
        ));
        assert!(MEGAKERNEL_CU.contains(
            "bulk_g2s(dst + V23_TSCALE_OFF + t0 * tseg, tsc + blk * tseg, sb, full + slot);"
        ));
        let tscale_off = 4 * 16 * V23_SEG;
        let mut bytes = nonzero_bytes(0x9e3779b97f4a7c15);
        // (rows, row bytes): 3 segments of 512; 2 full and a 256-byte last one.
        for &(rows, rb) in &[(160usize, 1536usize), (160, 1280)] {
            let k = rb * 2;
            let w = bytes(rows * rb);
            let sc = bytes(rows * (k / 32));
            let tseg = rb.min(V23_SEG);
            let nsg = rb.div_ceil(tseg);
            let (jw, js) = (job0(rows, rb, tseg, -16), job0(rows, k / 32, tseg / 16, -1));
            assert_eq!(
                (jw.nsg as usize, js.nsg as usize),
                (nsg, nsg),
                "weights and scales segment alike"
            );
            let tw = tile_host(&w, &jw);
            let ts = tile_host(&sc, &js);
            // Tile -> block assignments of a chunk (-1: no rows).
            let chunks: [[i64; 4]; 6] = [
                [0, 1, 2, 3],
                [4, 5, 6, 7],
                [2, 3, 4, 5],
                [8, 9, -1, -1],
                [1, -1, 6, 7],
                [9, 3, 2, 8],
            ];
            for tb in chunks {
                for sg in 0..nsg {
                    let bytes = tseg.min(rb - sg * tseg);
                    let mut slot = vec![0u8; tscale_off + 4 * V23_SEG];
                    let mut t0 = 0;
                    while t0 < 4 {
                        if tb[t0] < 0 {
                            t0 += 1;
                            continue;
                        }
                        let mut t1 = t0 + 1;
                        while t1 < 4 && tb[t1] == tb[t1 - 1] + 1 && (tb[t1] & 3) != 0 {
                            t1 += 1;
                        }
                        let n = t1 - t0;
                        let (wbytes, sbytes) =
                            ((n - 1) * 16 * tseg + 16 * bytes, (n - 1) * tseg + bytes);
                        let blk = (v23_block_offset(sg as u64, nsg as u64, tb[t0] as u64, tseg)
                            / (16 * tseg as u64)) as usize;
                        slot[t0 * 16 * tseg..t0 * 16 * tseg + wbytes]
                            .copy_from_slice(&tw[blk * 16 * tseg..blk * 16 * tseg + wbytes]);
                        let so = tscale_off + t0 * tseg;
                        slot[so..so + sbytes].copy_from_slice(&ts[blk * tseg..blk * tseg + sbytes]);
                        t0 = t1;
                    }
                    for (t, &b) in tb.iter().enumerate() {
                        if b < 0 {
                            continue;
                        }
                        for r in 0..16 {
                            let row = b as usize * 16 + r;
                            for st in 0..bytes / 16 {
                                for x in 0..16 {
                                    let got = slot[t * 16 * tseg + st * 256 + r * 16 + x];
                                    assert_eq!(
                                        got,
                                        w[row * rb + sg * tseg + st * 16 + x],
                                        "rb {rb} tiles {tb:?} sg {sg} t {t} r {r} st {st}"
                                    );
                                }
                                let got = slot[tscale_off + t * tseg + st * 16 + r];
                                assert_eq!(
                                    got,
                                    sc[row * (k / 32) + sg * (tseg / 16) + st],
                                    "scale rb {rb} tiles {tb:?} sg {sg} t {t} r {r} st {st}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn tile_plan_covers_ring_matrices_once() {
        use mimo_ir::graph::WeightClass;
        let wd = |name: &str, dtype, dims: Vec<usize>, offset, nbytes, so, sn| WeightDesc {
            name: name.into(),
            dtype,
            dims,
            class: WeightClass::Attention,
            offset,
            nbytes,
            scale_offset: so,
            scale_nbytes: sn,
        };
        let weights = vec![
            wd(
                "q",
                DType::F8E4M3,
                vec![96, 4096],
                0,
                96 * 4096,
                1 << 20,
                96 * 32 * 4,
            ),
            wd(
                "up",
                DType::MXFP4,
                vec![4, 64, 4096],
                2 << 20,
                4 * 64 * 2048,
                4 << 20,
                4 * 64 * 128,
            ),
            wd("head", DType::BF16, vec![8, 4096], 8 << 20, 8 * 8192, 0, 0),
        ];
        let ins = |op, fmt, w| DInstr {
            op,
            fmt,
            w,
            ..Default::default()
        };
        let instrs = vec![
            ins(op::MATMUL, fmt::F8, 0),
            ins(op::MOE_UP, fmt::MXFP4, 2 << 20),
            ins(op::MATMUL, fmt::BF16, 8 << 20),
            ins(op::MATMUL, fmt::F8, 0),
            ins(op::ATTN, -1, 0),
        ];
        let tp = tile_plan(&weights, &instrs);
        assert_eq!(tp.jobs.len(), 3, "q, up, up's scales");
        assert_eq!(tp.tinfo.len(), 15);
        assert_eq!(&tp.tinfo[0..3], &[0, -1, 6]);
        assert_eq!(
            &tp.tinfo[9..12],
            &tp.tinfo[0..3],
            "shared weight, shared copy"
        );
        assert_eq!(&tp.tinfo[6..9], &[-1, -1, 0], "bf16 is not tiled");
        assert_eq!(&tp.tinfo[12..15], &[-1, -1, 0]);
        let (up, sc) = (&tp.jobs[1], &tp.jobs[2]);
        assert_eq!(
            (up.rows, up.rb, up.seg, up.nsg, up.nb),
            (256, 2048, 1024, 2, 16)
        );
        assert_eq!((sc.rb, sc.seg, sc.pitch), (128, 64, 80));
        assert_eq!(tp.tinfo[3..6], [up.dst as i64, sc.dst as i64, 16]);
        assert!(tp.jobs.iter().all(|j| j.dst % 256 == 0));
        assert_eq!(tp.bytes, sc.dst + sc.bytes());
        // Copies never overlap.
        for w in tp.jobs.windows(2) {
            assert!(w[0].dst + w[0].bytes() <= w[1].dst);
        }
        // v23: MXFP4 step-major in 512-byte segments, FP8 unchanged.
        let t23 = tile_plan_for(&weights, &instrs, true);
        assert_eq!(t23.jobs[0], tp.jobs[0]);
        let (up, sc) = (&t23.jobs[1], &t23.jobs[2]);
        assert_eq!(
            (up.rb, up.seg, up.nsg, up.nb, up.pitch),
            (2048, 512, 4, 16, -16)
        );
        assert_eq!((sc.rb, sc.seg, sc.nsg, sc.pitch), (128, 32, 4, -1));
        assert_eq!(up.bytes(), 256 * 2048);
        assert_eq!(sc.bytes(), 256 * 128);
        assert_eq!(t23.bytes, sc.dst + sc.bytes());
    }
}
