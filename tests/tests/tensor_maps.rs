//! The TMA tensor maps (`mimo_kernels::tmap`) on the `bench/mid_config.json` plan that `bench/gpu.sh` verifies and
//! sanitizes on the device: real formats (FP8 attention, MXFP4 experts with ring scales) at rows long enough for
//! tensor copies, so the device checks exercise the tensor-copied ring path that tiny plans never reach. Runs
//! without a GPU: it checks the maps' geometry against the weights they cover.

use mimo_kernels::device::{fmt, op};
use mimo_kernels::tmap::{instr_maps, Swizzle};
use mimo_tests::util::mid_plan;

#[test]
fn every_ring_instruction_of_the_mid_plan_gets_tensor_maps_inside_its_weights() {
    let dir = tempfile::tempdir().unwrap();
    let (plan, enc) = mid_plan(&dir.path().join("mid"));
    let (mut ring, mut fp4_scales, mut fp8) = (0, 0, 0);
    for (i, d) in enc.instrs.iter().enumerate() {
        if ![op::MATMUL, op::MOE_UP, op::MOE_DOWN].contains(&d.op) {
            assert!(instr_maps(d).iter().all(Option::is_none), "instr {i}");
            continue;
        }
        ring += 1;
        let m = instr_maps(d);
        let w3 = m[0].unwrap_or_else(|| panic!("instr {i} (op {}) has no 3-D weight map", d.op));
        let w2 = m[1].expect("2-D weight map");
        // The 3-D view covers exactly rows x row bytes of the 2-D view, starting at the instruction's weights,
        // which lie inside the plan's packed weights.
        let (rows, rowbytes) = (w2.dims[1], w2.dims[0]);
        assert_eq!(w3.dims, [128, rows, rowbytes / 128]);
        assert_eq!(w3.strides, [rowbytes, 128]);
        assert_eq!((w3.offset, w3.swizzle), (d.w as u64, Swizzle::B128));
        assert!(w3.offset.is_multiple_of(16) && w3.offset + rows * rowbytes <= plan.weights_len);
        match d.fmt {
            fmt::MXFP4 => {
                let s = m[2].expect("MXFP4 scale map");
                assert_eq!((s.dims[0], s.dims[1]), (rowbytes / 16, rows));
                assert!(s.offset + rows * s.dims[0] <= plan.weights_len);
                fp4_scales += 1;
            }
            fmt::F8 => {
                assert!(m[2].is_none());
                fp8 += 1;
            }
            fmt::BF16 => assert!(m[2].is_none(), "bf16 (the LM head) has no scales"),
            f => panic!("instr {i}: ring format {f}"),
        }
    }
    // q / k / v / o projections of 4 layers, a dense MLP, MoE up / down of 3 MoE layers, the LM head.
    assert!(ring >= 20, "{ring} ring instructions");
    assert_eq!(fp4_scales, 6, "MoE up and down of each of the 3 MoE layers");
    assert!(fp8 >= 14, "{fp8} FP8 instructions");
}
