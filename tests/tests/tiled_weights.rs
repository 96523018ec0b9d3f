//! The v18 pre-tiled ring weights (`mimo_kernels::tiled`) on the `bench/mid_config.json` plan that `bench/gpu.sh`
//! verifies and sanitizes on the device: every FP8 / MXFP4 matmul and MoE instruction gets a tiled copy of its
//! weights (MXFP4: and of its scales) sized to the weight it covers, instructions sharing a weight share the copy,
//! and the tiled bytes of a real weight hold exactly what the ring's row copies would put in each slot half. Runs
//! without a GPU (the host reference of `mimo_tile`).

use mimo_kernels::device::{fmt, op};
use mimo_kernels::tiled::{block_offset, ring_pitch, tile_host, tile_plan, RING_SEG, RING_SSTR};
use mimo_tests::util::mid_plan;

#[test]
fn every_fp8_and_mxfp4_ring_instruction_of_the_mid_plan_gets_a_tiled_copy() {
    let dir = tempfile::tempdir().unwrap();
    let plan_dir = dir.path().join("mid");
    let (plan, enc) = mid_plan(&plan_dir);
    let tp = tile_plan(&plan.weights, &enc.instrs);
    assert_eq!(tp.tinfo.len(), 3 * enc.instrs.len());
    let (mut fp8, mut fp4) = (0, 0);
    for (i, d) in enc.instrs.iter().enumerate() {
        let t = &tp.tinfo[3 * i..3 * i + 3];
        let ring = [op::MATMUL, op::MOE_UP, op::MOE_DOWN].contains(&d.op);
        if !ring || ![fmt::F8, fmt::MXFP4].contains(&d.fmt) {
            assert_eq!(
                t,
                [-1, -1, 0],
                "instr {i} (op {}, fmt {}) is not tiled",
                d.op,
                d.fmt
            );
            continue;
        }
        let w = plan
            .weights
            .iter()
            .find(|w| w.offset == d.w as u64)
            .unwrap_or_else(|| panic!("instr {i}: no weight at its offset"));
        let k = *w.dims.last().unwrap();
        let rows: usize = w.dims[..w.dims.len() - 1].iter().product();
        let job = tp
            .jobs
            .iter()
            .find(|j| j.dst as i64 == t[0])
            .unwrap_or_else(|| panic!("instr {i}: tinfo names no job"));
        let rb = if d.fmt == fmt::F8 { k } else { k / 2 };
        assert_eq!(
            (job.src, job.rows, job.rb as usize),
            (w.offset, rows as u64, rb)
        );
        assert_eq!(job.pitch as usize, ring_pitch(d.fmt));
        assert_eq!(job.seg as usize, rb.min(RING_SEG));
        assert_eq!(t[2] as u64, rows.div_ceil(16) as u64);
        if d.fmt == fmt::MXFP4 {
            let sj = tp
                .jobs
                .iter()
                .find(|j| j.dst as i64 == t[1])
                .expect("MXFP4 scales tiled");
            assert_eq!(
                (sj.src, sj.rb as usize, sj.pitch as usize),
                (w.scale_offset, k / 32, RING_SSTR)
            );
            assert_eq!(sj.seg as usize, job.seg as usize / 16);
            fp4 += 1;
        } else {
            assert_eq!(t[1], -1);
            fp8 += 1;
        }
        assert!(job.dst + job.bytes() <= tp.bytes);
    }
    assert!(
        fp8 > 0 && fp4 > 0,
        "the mid plan tiles both formats ({fp8} FP8, {fp4} MXFP4)"
    );
    // One real weight (the one with the most K segments), tiled by the host reference: each block of each segment
    // holds its rows' segment bytes.
    let bytes = std::fs::read(plan_dir.join("weights.bin")).expect("weights");
    let j = tp
        .jobs
        .iter()
        .filter(|j| j.rows > 17)
        .max_by_key(|j| j.nsg)
        .expect("a tiled weight of more than 17 rows");
    let src = &bytes[j.src as usize..(j.src + j.rows * j.rb as u64) as usize];
    let t = tile_host(src, j);
    let (rb, seg, pitch) = (j.rb as usize, j.seg as usize, j.pitch as usize);
    for s in 0..j.nsg as usize {
        for row in [0usize, 17, j.rows as usize - 1] {
            let at = block_offset(s as u64, j.nsg as u64, (row / 16) as u64, pitch) as usize
                + (row % 16) * pitch;
            let n = seg.min(rb - s * seg);
            assert_eq!(
                &t[at..at + n],
                &src[row * rb + s * seg..row * rb + s * seg + n],
                "{} s {s} row {row}",
                j.name
            );
        }
    }
}
