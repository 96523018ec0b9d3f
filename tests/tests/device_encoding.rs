//! The megakernel's device encoding of a compiled tiny MoE plan: routing spread over blocks (router partial logits
//! finished by the MoE instructions), LM-head sampling candidates, and a scratch layout whose regions do not
//! overlap. Runs without a GPU: it checks the descriptors the kernel will read.

use mimo_ir::plan::{Instr, Plan};
use mimo_kernels::device::{encode, moe_down_cols, op, stage_floats, DInstr, ATTN_SPLITS};
use mimo_models::config::Arch;
use mimo_tests::util::{compile_bf16, tiny};

fn plan(max_tokens: usize) -> (tempfile::TempDir, Plan) {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let out = dir.path().join("plan");
    tiny(&ck, Arch::MimoV2Flash, 11, false);
    compile_bf16(&ck, &out, max_tokens);
    let (plan, _w) = mimo_ir::plan::read_plan_dir(&out, false).expect("read plan");
    (dir, plan)
}

fn of(ins: &[DInstr], code: i32) -> Vec<(usize, DInstr)> {
    ins.iter()
        .copied()
        .enumerate()
        .filter(|(_, d)| d.op == code)
        .collect()
}

#[test]
fn routing_and_sampling_scratch_regions_are_disjoint_and_wired() {
    for mt in [1usize, 4, 16] {
        let (_d, plan) = plan(mt);
        let prog = &plan.programs[0];
        let enc = encode(&plan, prog, 256, true).expect("encode");
        let ins = &enc.instrs;
        let routers = of(ins, op::ROUTER);
        let ups = of(ins, op::MOE_UP);
        let downs = of(ins, op::MOE_DOWN);
        let n_moe = prog
            .instrs
            .iter()
            .filter(|i| matches!(i, Instr::Moe { .. }))
            .count();
        assert!(n_moe > 0);
        assert_eq!(
            (routers.len(), ups.len(), downs.len()),
            (n_moe, n_moe, n_moe)
        );
        let moe_len = ups
            .iter()
            .map(|(_, u)| mt * u.topk as usize * u.inter as usize)
            .max()
            .unwrap();
        for ((ri, r), ((ui, u), (di, dn))) in routers.iter().zip(ups.iter().zip(&downs)) {
            assert!(ri < ui && ui < di);
            // Router tiles cover every (row tile, K split); the splits cover K.
            let nks = r.ws2 as i32;
            // The tiny router (hidden 64) is split too, so GPU checks on tiny plans run the split path.
            assert!(nks >= 2);
            assert!(nks >= 1 && r.n * nks >= r.k && r.n * (nks - 1) < r.k);
            assert_eq!(r.ntiles, ((r.e + r.tile_rows - 1) / r.tile_rows) * nks);
            // Both MoE halves route from the router's partials with its spec.
            for m in [u, dn] {
                assert_eq!((m.w2, m.ws2, m.e), (r.w2, r.ws2, r.e));
                assert!(m.topk > 0 && m.rscale > 0.0);
            }
            // The router partials sit after the MoE activations, and MoE up waits for its router.
            assert!(r.w2 as usize >= moe_len);
            assert!(u.deps[..u.ndeps as usize].contains(&(*ri as i32)));
            let part_end = r.w2 as usize + nks as usize * mt * r.e as usize;
            // LM head candidates come after the router partials and fit the scratch.
            let lm = ins
                .iter()
                .find(|d| d.op == op::MATMUL && d.aux >= 0)
                .expect("LM head with candidates");
            // MoE down's expert-major mode: per-pair outputs (pairs x hidden) then one arrival counter per
            // column block, after the attention partials and before the LM-head candidates; a routed expert's
            // members times a column block fit the tile stage.
            let (y, ctr, wc) = (dn.kv_k as usize, dn.kv_v as usize, dn.window as usize);
            assert_eq!(wc, moe_down_cols(mt));
            assert!(wc % 32 == 0 && mt * wc <= stage_floats(mt));
            // Attention split counters (one per token x head, just below the partials) and partials come
            // after the router partials and before the expert-major outputs and the LM-head candidates.
            for (_, at) in of(ins, op::ATTN) {
                let heads = mt * at.nh as usize;
                assert!(at.aux as usize >= part_end + heads);
                let parts = heads * ATTN_SPLITS * (at.vd as usize + 2);
                assert!(at.aux as usize + parts <= lm.aux as usize);
                assert!(y >= at.aux as usize + parts);
            }
            assert!(y >= part_end && ctr >= y + mt * dn.topk as usize * dn.n as usize);
            assert!(ctr + (dn.n as usize).div_ceil(wc) <= lm.aux as usize);
            assert_eq!(dn.heads, 0, "expert-major forced without the test knob");
            assert!(lm.aux as usize >= part_end);
            // The kernel reads the candidates as float2 pairs.
            assert_eq!(lm.aux % 4, 0);
            assert!(lm.aux as usize + 2 * mt * lm.ntiles as usize <= enc.scratch_len);
            let am = of(ins, op::ARGMAX);
            assert_eq!(am.len(), 1);
            assert_eq!((am[0].1.aux, am[0].1.n), (lm.aux, lm.ntiles));
        }
        // Dependencies point backwards.
        for (i, d) in ins.iter().enumerate() {
            assert!(d.deps[..d.ndeps as usize].iter().all(|&j| (j as usize) < i));
        }
        // Without in-kernel sampling no LM-head candidates are written.
        let enc = encode(&plan, prog, 256, false).expect("encode");
        assert!(enc
            .instrs
            .iter()
            .all(|d| d.op != op::ARGMAX && !(d.op == op::MATMUL && d.aux >= 0)));
    }
}

/// The kernel stages K / V rows in 16-byte pieces and gives each tile one kv head's query heads: a plan that
/// breaks either gets an encoding error naming it, never a descriptor the kernel would misread.
#[test]
fn attention_the_kernel_cannot_tile_is_an_encoding_error() {
    let (_d, plan) = plan(4);
    let prog = &plan.programs[0];
    assert!(encode(&plan, prog, 132, true).is_ok());
    type Edit = fn(&mut mimo_ir::graph::AttnSpec);
    let cases: [(Edit, &str); 3] = [
        (|s| s.head_dim -= 2, "multiples of 4"),
        (|s| s.v_head_dim += 2, "multiples of 4"),
        (|s| s.n_kv_heads = 3, "kv heads"),
    ];
    for (edit, want) in cases {
        let mut p = prog.clone();
        let a = p
            .instrs
            .iter_mut()
            .find_map(|i| match i {
                Instr::Attention { spec, .. } => Some(spec),
                _ => None,
            })
            .expect("an attention instruction");
        edit(a);
        let err = match encode(&plan, &p, 132, true) {
            Ok(_) => panic!("must be rejected: {want}"),
            Err(e) => e,
        };
        assert!(err.contains(want), "{err}");
    }
}
