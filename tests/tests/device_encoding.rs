//! The megakernel's device encoding of a compiled tiny MoE plan: routing spread over blocks (router partial logits
//! finished by the MoE instructions, or computed by the output projection's epilogue when the router is fused),
//! LM-head sampling candidates, and a scratch layout whose regions do not overlap. Runs without a GPU: it checks
//! the descriptors the kernel will read.

use mimo_ir::plan::{Instr, Plan};
use mimo_kernels::device::{
    encode_with, fused_routers, moe_down_cols, op, stage_floats, threads, xs_floats, DInstr,
    EncodeOptions, ATTN_SPLITS, MATMUL_ROWS,
};
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

const SEPARATE: EncodeOptions = EncodeOptions {
    fuse_routers: false,
    split_kv: true,
};
const FUSED: EncodeOptions = EncodeOptions {
    fuse_routers: true,
    split_kv: true,
};

fn encode(
    plan: &Plan,
    prog: &mimo_ir::plan::Program,
    ctx: usize,
    argmax: bool,
) -> Result<Vec<DInstr>, String> {
    encode_with(plan, prog, ctx, argmax, SEPARATE).map(|e| e.instrs)
}

/// MoE instructions of a program.
fn moe_count(prog: &mimo_ir::plan::Program) -> usize {
    prog.instrs
        .iter()
        .filter(|i| matches!(i, Instr::Moe { .. }))
        .count()
}

/// Floats of the MoE up -> down activations (scratch's first region): the widest MoE's max_tokens x top_k x inter.
fn moe_len(ups: &[(usize, DInstr)], mt: usize) -> usize {
    ups.iter()
        .map(|(_, u)| mt * u.topk as usize * u.inter as usize)
        .max()
        .unwrap()
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
        let enc = encode_with(&plan, prog, 256, true, SEPARATE).expect("encode");
        let ins = &enc.instrs;
        let routers = of(ins, op::ROUTER);
        let ups = of(ins, op::MOE_UP);
        let downs = of(ins, op::MOE_DOWN);
        let n_moe = moe_count(prog);
        assert!(n_moe > 0);
        assert_eq!(
            (routers.len(), ups.len(), downs.len()),
            (n_moe, n_moe, n_moe)
        );
        let moe_len = moe_len(&ups, mt);
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
            // Expert-major items: 32-column tiles (a ring row group), 64 per K pass of the members.
            assert_eq!((wc, dn.vd), (32, 64));
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

/// A router right after the output projection that writes its input is computed by that matmul's epilogue:
/// no router instruction, the matmul carries the router weight / norm / partial region, both MoE halves read
/// -(tiles) splits with the router's K and eps, the partials (tiles x T x experts, then tiles x T sums of
/// squares) fit between the MoE activations and the attention counters, and MoE up waits for the matmul.
#[test]
fn fused_router_is_computed_by_the_output_projection() {
    for mt in [1usize, 4, 16] {
        let (_d, plan) = plan(mt);
        let prog = &plan.programs[0];
        let fr = fused_routers(&plan, prog, mt);
        let n_moe = moe_count(prog);
        assert_eq!(fr.len(), n_moe, "every tiny MoE layer's router fuses");
        let sep = encode(&plan, prog, 256, true).expect("encode");
        let enc = encode_with(&plan, prog, 256, true, FUSED).expect("encode");
        let ins = &enc.instrs;
        assert_eq!(ins.len() + n_moe, sep.len());
        assert!(of(ins, op::ROUTER).is_empty());
        let ups = of(ins, op::MOE_UP);
        let downs = of(ins, op::MOE_DOWN);
        let mms: Vec<(usize, DInstr)> = of(ins, op::MATMUL)
            .into_iter()
            .filter(|(_, d)| d.e > 0)
            .collect();
        assert_eq!((ups.len(), downs.len(), mms.len()), (n_moe, n_moe, n_moe));
        let moe_len = moe_len(&ups, mt);
        for ((mi, m), ((_, u), (_, dn))) in mms.iter().zip(ups.iter().zip(&downs)) {
            let (rw, rnorm, reps, rk) = prog
                .instrs
                .iter()
                .find_map(|i| match i {
                    Instr::Router {
                        w,
                        norm: Some((nw, eps)),
                        ..
                    } if plan.weights[*w as usize].offset as i64 == m.w2 => Some((
                        &plan.weights[*w as usize],
                        plan.weights[*nw as usize].offset as i64,
                        *eps,
                        plan.weights[*w as usize].dims[1],
                    )),
                    _ => None,
                })
                .expect("the fused matmul carries a router weight");
            assert_eq!(rw.dtype, mimo_ir::DType::BF16);
            assert_eq!(
                (m.e as usize, m.sinks, m.n as usize),
                (rw.dims[0], rnorm, rk)
            );
            assert_eq!(m.tile_rows as usize, MATMUL_ROWS);
            assert_eq!(m.ntiles as usize, rk.div_ceil(MATMUL_ROWS));
            assert!(m.res >= 0, "the output projection adds the residual");
            for d in [u, dn] {
                assert_eq!(d.w2, m.ws2);
                assert_eq!(d.ws2, -(m.ntiles as i64));
                assert_eq!((d.qd as usize, d.theta, d.e), (rk, reps, m.e));
            }
            assert_eq!(u.eps, reps);
            assert!(u.deps[..u.ndeps as usize].contains(&(*mi as i32)));
            let part = m.ws2 as usize;
            let part_end = part + m.ntiles as usize * mt * (m.e as usize + 1);
            assert!(part >= moe_len);
            for (_, at) in of(ins, op::ATTN) {
                assert!(at.aux as usize >= part_end + mt * at.nh as usize);
            }
            assert!(part_end <= dn.kv_k as usize && part_end <= enc.scratch_len);
            // The projection's stage plus the router slice (pitch 33) fit the tile stage.
            assert!(mt * 2 * MATMUL_ROWS + m.e as usize * (MATMUL_ROWS + 1) <= stage_floats(mt));
        }
        for (i, d) in ins.iter().enumerate() {
            assert!(d.deps[..d.ndeps as usize].iter().all(|&j| (j as usize) < i));
        }
    }
}

/// Routers the epilogue cannot take stay instructions: one whose input is not the previous matmul's output
/// (here: the MoE normalizes with another norm than the router), or whose partials would be too many.
#[test]
fn routers_the_epilogue_cannot_take_stay_instructions() {
    let (_d, plan) = plan(4);
    let prog = &plan.programs[0];
    let n = fused_routers(&plan, prog, 4).len();
    assert!(n > 0);
    // A MoE whose norm differs from its router's: no fusion for that layer.
    let mut p = prog.clone();
    let moe = p
        .instrs
        .iter_mut()
        .find_map(|i| match i {
            Instr::Moe { norm: Some(nm), .. } => Some(nm),
            _ => None,
        })
        .expect("a MoE with a norm prologue");
    moe.1 *= 2.0;
    assert_eq!(fused_routers(&plan, &p, 4).len(), n - 1);
    let enc = encode_with(&plan, &p, 256, true, FUSED).expect("encode");
    assert_eq!(of(&enc.instrs, op::ROUTER).len(), 1);
    // Too many partials for every MoE block to read: none fuse.
    assert_eq!(fused_routers(&plan, prog, 100_000).len(), 0);
}

/// A layer's k and v projections write separate cache regions, so neither waits for the other (the v projection
/// used to wait for every block to finish the k one); attention waits for both, and for q.
#[test]
fn k_and_v_projections_are_independent_and_attention_waits_for_both() {
    let (_d, plan) = plan(4);
    let prog = &plan.programs[0];
    for split_kv in [true, false] {
        let opts = EncodeOptions {
            split_kv,
            ..SEPARATE
        };
        let ins = encode_with(&plan, prog, 256, true, opts)
            .expect("encode")
            .instrs;
        check_kv_deps(&ins, split_kv);
    }
}

/// Attention waits for both KV writers; v waits for k exactly when K and V are one resource (`split_kv` off).
fn check_kv_deps(ins: &[DInstr], split_kv: bool) {
    let anc = |i: usize| -> std::collections::BTreeSet<usize> {
        let mut seen = std::collections::BTreeSet::new();
        let mut stack = vec![i];
        while let Some(j) = stack.pop() {
            for &d in &ins[j].deps[..ins[j].ndeps as usize] {
                if seen.insert(d as usize) {
                    stack.push(d as usize);
                }
            }
        }
        seen
    };
    let mut checked = 0;
    for (ai, at) in of(ins, op::ATTN) {
        let writer = |kind: i32| {
            ins[..ai]
                .iter()
                .rposition(|d| {
                    d.op == op::MATMUL
                        && d.nepi > 0
                        && d.layer == at.layer
                        && d.kvkind == kind
                        && d.kv_k >= 0
                        && d.out < 0
                })
                .expect("a KV-writing projection")
        };
        let (k, v) = (writer(0), writer(1));
        assert!(k < v, "k before v in the stream");
        assert_eq!(
            anc(v).contains(&k),
            !split_kv,
            "v waits for k iff K / V are one resource (layer {})",
            at.layer
        );
        let a = anc(ai);
        assert!(a.contains(&k) && a.contains(&v));
        checked += 1;
    }
    assert!(checked >= 2);
}

/// The generated kernel's header carries the layout the runtime's encoder assumes: block size (`MIMO_THREADS`),
/// max tokens, activation buffer and stage sizes.
#[test]
fn generated_header_matches_the_encoder_layout() {
    for mt in [4, 16] {
        let (dir, plan) = plan(mt);
        assert_eq!(plan.max_tokens, mt);
        let src =
            std::fs::read_to_string(dir.path().join("plan/megakernel.cu")).expect("megakernel.cu");
        for line in [
            format!("#define MK_THREADS {}\n", threads()),
            format!("#define MK_MAX_T {mt}\n"),
            format!("#define MK_XS {}\n", xs_floats(mt)),
            format!("#define MK_STAGE {}\n", stage_floats(mt)),
        ] {
            assert!(src.contains(&line), "mt {mt}: header lacks {line:?}");
        }
    }
}
