//! fuse-residual: `Add(a, b)` where one side is a matmul whose only consumer is this add becomes an
//! `Epilogue::ResidualAdd` stage of that matmul, with the other side as its residual input; the Add disappears.
//! Matmuls that end in a KV-cache write (no activation output) or already add a residual are not candidates.
//! When both sides qualify, the second (`b`, the branch output by the builder's `x + f(x)` convention) is fused.

use super::{nodes_where, only_user, MatMulParts, Pass, PassOptions};
use anyhow::Result;
use mimo_ir::{Epilogue, Graph, NodeId, Op};

pub struct FuseResidual;

fn candidate(g: &Graph, mm: NodeId, add: NodeId) -> Option<MatMulParts> {
    let p = MatMulParts::read(g, mm)?;
    (!p.ends_in_kv_write()
        && !p.epilogue.contains(&Epilogue::ResidualAdd)
        && only_user(g, mm) == Some(add))
    .then_some(p)
}

impl Pass for FuseResidual {
    fn name(&self) -> &'static str {
        "fuse-residual"
    }

    fn run(&self, g: &mut Graph, opts: &PassOptions) -> Result<String> {
        if !opts.fuse {
            return Ok("skipped (--no-fuse)".into());
        }
        let (mut fused, mut kept) = (0usize, 0usize);
        for add in nodes_where(g, |op| matches!(op, Op::Add)) {
            let ins = g.inputs(add);
            let (a, b) = (ins[0], ins[1]);
            let (mm, other, mut p) = if let Some(p) = candidate(g, b, add) {
                (b, a, p)
            } else if let Some(p) = candidate(g, a, add) {
                (a, b, p)
            } else {
                kept += 1;
                continue;
            };
            p.epilogue.push(Epilogue::ResidualAdd);
            p.residual = Some(other);
            p.write(g, mm);
            g.replace_uses(add, mm);
            g.remove(add);
            fused += 1;
        }
        Ok(format!(
            "fused {fused} residual adds into matmul epilogues ({kept} adds kept)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{count, line, Tb};
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
            "fused 2 residual adds into matmul epilogues (2 adds kept)"
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
        let down =
            g.g.node_indices()
                .find(|&n| g.node(n).name == "down")
                .unwrap();
        let names: Vec<String> = g
            .inputs(down)
            .iter()
            .map(|&i| g.node(i).name.clone())
            .collect();
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
            "fused 0 residual adds into matmul epilogues (1 adds kept)"
        );
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
