//! fuse-residual: `Add(a, b)` where one side is a matmul or a MoE experts node whose only consumer is this add
//! absorbs the add: a matmul gets an `Epilogue::ResidualAdd` stage, MoE experts get `residual: true` (the
//! residual added after the expert sum), each with the other side as its residual input; the Add disappears.
//! Matmuls that end in a KV-cache write (no activation output) or already add a residual are not candidates, nor
//! is a node that is also a graph output (its only user would then not be the add). When both sides qualify, the
//! second (`b`, the branch output by the builder's `x + f(x)` convention) is fused.

use super::{nodes_where, only_user, MatMulParts, Pass, PassOptions};
use anyhow::Result;
use mimo_ir::{Epilogue, Graph, NodeId, Op};

pub struct FuseResidual;

/// A node that can absorb an add.
enum Candidate {
    MatMul(MatMulParts),
    Moe,
}

fn candidate(g: &Graph, n: NodeId, add: NodeId) -> Option<Candidate> {
    if only_user(g, n) != Some(add) {
        return None;
    }
    match &g.node(n).op {
        Op::MatMul { .. } => {
            let p = MatMulParts::read(g, n)?;
            (!p.ends_in_kv_write() && !p.epilogue.contains(&Epilogue::ResidualAdd))
                .then_some(Candidate::MatMul(p))
        }
        Op::MoeExperts {
            residual: false, ..
        } if g.inputs(n).len() == g.node(n).op.arity() => Some(Candidate::Moe),
        _ => None,
    }
}

impl Pass for FuseResidual {
    fn name(&self) -> &'static str {
        "fuse-residual"
    }

    fn run(&self, g: &mut Graph, opts: &PassOptions) -> Result<String> {
        if !opts.fuse {
            return Ok("skipped (--no-fuse)".into());
        }
        let (mut fused, mut moe, mut kept) = (0usize, 0usize, 0usize);
        for add in nodes_where(g, |op| matches!(op, Op::Add)) {
            let ins = g.inputs(add);
            let (a, b) = (ins[0], ins[1]);
            let (n, other, c) = if let Some(c) = candidate(g, b, add) {
                (b, a, c)
            } else if let Some(c) = candidate(g, a, add) {
                (a, b, c)
            } else {
                kept += 1;
                continue;
            };
            match c {
                Candidate::MatMul(mut p) => {
                    p.epilogue.push(Epilogue::ResidualAdd);
                    p.residual = Some(other);
                    p.write(g, n);
                    fused += 1;
                }
                Candidate::Moe => {
                    if let Op::MoeExperts { residual, .. } = &mut g.node_mut(n).op {
                        *residual = true;
                    }
                    // The residual is the last input.
                    let mut ins = g.inputs(n);
                    ins.push(other);
                    g.set_inputs(n, &ins);
                    moe += 1;
                }
            }
            g.replace_uses(add, n);
            g.remove(add);
        }
        Ok(format!(
            "fused {fused} residual adds into matmul epilogues and {moe} into moe experts ({kept} adds kept)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{count, input_names, line, Tb};
    use super::*;
    use mimo_ir::*;

    fn graph() -> Graph {
        let mut t = Tb::new(8);
        let x = t.x;
        let o = t.matmul("o", x, 8);
        let r1 = t.op("attn_residual", Op::Add, TensorType::act(8), &[x, o]);
        // Matmul on the left-hand side.
        let d = t.matmul("down", r1, 8);
        let r2 = t.op("mlp_residual", Op::Add, TensorType::act(8), &[d, r1]);
        // A matmul with a second user: the add stays.
        let m = t.matmul("shared", r2, 8);
        let r3 = t.op("kept", Op::Add, TensorType::act(8), &[r2, m]);
        let s = t.op("sum", Op::Add, TensorType::act(8), &[r3, m]);
        t.output(s);
        t.g
    }

    #[test]
    fn fuses_either_side() {
        let mut g = graph();
        g.verify().unwrap();
        let msg = FuseResidual.run(&mut g, &PassOptions::default()).unwrap();
        assert_eq!(
            msg,
            "fused 2 residual adds into matmul epilogues and 0 into moe experts (2 adds kept)"
        );
        g.verify().unwrap();
        let text = g.to_text();
        assert!(
            line(&text, "o")
                .contains("matmul{epilogue=[residual_add]}(%3, %4, %3) : f32[T,8]  ; o"),
            "{text}"
        );
        assert!(
            line(&text, "down").contains("epilogue=[residual_add]"),
            "{text}"
        );
        assert!(!line(&text, "shared").contains("epilogue"), "{text}");
        assert_eq!(count(&g, "add"), 2);
        // down reads o (the fused attention residual) twice: as activation and as residual.
        let names = input_names(&g, "down");
        assert_eq!(names, ["o", "down.w", "o"]);
    }

    #[test]
    fn skips_cache_writing_matmul() {
        let mut t = Tb::new(8);
        let (x, pos) = (t.x, t.pos);
        let w = t.weight("k.w", WeightClass::Attention, DType::BF16, &[8, 8]);
        let k = t.op(
            "k",
            Op::MatMul {
                has_bias: false,
                norm_eps: None,
                epilogue: vec![Epilogue::KvWrite {
                    layer: 0,
                    kind: KvKind::K,
                    heads: 1,
                    head_dim: 8,
                }],
            },
            TensorType::fixed(DType::Cache, &[1, 8]),
            &[x, w, pos],
        );
        let _ = k;
        let o = t.matmul("o", x, 8);
        let two = t.op("two", Op::Add, TensorType::act(8), &[o, o]);
        t.output(two);
        let mut g = t.g;
        g.verify().unwrap();
        let msg = FuseResidual.run(&mut g, &PassOptions::default()).unwrap();
        assert_eq!(
            msg,
            "fused 0 residual adds into matmul epilogues and 0 into moe experts (1 adds kept)"
        );
    }

    /// A MoE block `x + moe(x)`; with `second_user` the moe output also feeds another add (or, with
    /// `as_output`, is a graph output).
    fn moe_graph(swap: bool, second_user: bool, as_output: bool) -> Graph {
        let mut t = Tb::new(32);
        let x = t.x;
        let r = t.router("router", x, 2, false);
        let gu = t.weight("gate_up", WeightClass::Experts, DType::BF16, &[4, 64, 32]);
        let d = t.weight("down", WeightClass::Experts, DType::BF16, &[4, 32, 32]);
        let nw = t.weight("norm.w", WeightClass::Norm, DType::F32, &[32]);
        let moe = Op::MoeExperts {
            n_experts: 4,
            top_k: 2,
            inter: 32,
            norm_eps: Some(1e-6),
            residual: false,
        };
        let m = t.op("moe", moe, TensorType::act(32), &[x, r, gu, d, nw]);
        let ins = if swap { [m, x] } else { [x, m] };
        let mut y = t.op("mlp_residual", Op::Add, TensorType::act(32), &ins);
        if second_user {
            y = t.op("again", Op::Add, TensorType::act(32), &[y, m]);
        }
        if as_output {
            t.op(
                "hidden",
                Op::Output {
                    name: "hidden.0".into(),
                },
                TensorType::act(32),
                &[m],
            );
        }
        t.output(y);
        t.g
    }

    #[test]
    fn fuses_moe_residual_either_side() {
        for swap in [false, true] {
            let mut g = moe_graph(swap, false, false);
            g.verify().unwrap();
            let nodes = g.g.node_count();
            let msg = FuseResidual.run(&mut g, &PassOptions::default()).unwrap();
            assert_eq!(
                msg,
                "fused 0 residual adds into matmul epilogues and 1 into moe experts (0 adds kept)"
            );
            g.verify().unwrap();
            assert_eq!(g.g.node_count(), nodes - 1);
            assert_eq!(count(&g, "add"), 0);
            let text = g.to_text();
            // x (%3) is both the activation and the residual; the norm weight (%8) comes before the residual.
            assert!(
                line(&text, "moe").contains(
                    "moe_experts{experts=4, top_k=2, inter=32, prologue=rmsnorm(eps=0.000001), \
                     epilogue=[residual_add]}(%3, %5, %6, %7, %8, %3) : f32[T,32]  ; moe"
                ),
                "{text}"
            );
            // The logits output now reads the moe node.
            assert!(text.contains("= output{logits}(%9)"), "{text}");
        }
    }

    #[test]
    fn keeps_moe_residual_when_moe_has_another_user() {
        for (second, output) in [(true, false), (false, true)] {
            let mut g = moe_graph(false, second, output);
            g.verify().unwrap();
            let before = g.to_text();
            let msg = FuseResidual.run(&mut g, &PassOptions::default()).unwrap();
            assert!(
                msg.starts_with(
                    "fused 0 residual adds into matmul epilogues and 0 into moe experts"
                ),
                "{msg}"
            );
            assert_eq!(g.to_text(), before);
            assert!(!before.contains("residual_add"));
        }
    }

    #[test]
    fn no_fuse_is_identity() {
        let mut g = graph();
        let before = g.to_text();
        let opts = PassOptions {
            fuse: false,
            ..Default::default()
        };
        FuseResidual.run(&mut g, &opts).unwrap();
        assert_eq!(g.to_text(), before);
    }
}
