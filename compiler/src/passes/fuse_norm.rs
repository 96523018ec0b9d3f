//! fuse-norm: an RMSNorm whose every consumer is a matmul without a prologue is folded into those matmuls as an
//! RMSNorm prologue (each matmul normalizes its activation rows while loading them), so the normalized activation
//! is never written out. The matmuls take the norm's input `x` and its weight; the RmsNorm node disappears.
//!
//! RMSNorms that feed anything else (the MoE router + experts, the LM head) are left alone: they are read by ops
//! that have no prologue.

use super::{nodes_where, MatMulParts, Pass, PassOptions};
use anyhow::Result;
use mimo_ir::{Graph, Op};

pub struct FuseNorm;

impl Pass for FuseNorm {
    fn name(&self) -> &'static str {
        "fuse-norm"
    }

    fn run(&self, g: &mut Graph, opts: &PassOptions) -> Result<String> {
        if !opts.fuse {
            return Ok("skipped (--no-fuse)".into());
        }
        let (mut norms, mut matmuls, mut kept) = (0usize, 0usize, 0usize);
        for n in nodes_where(g, |op| matches!(op, Op::RmsNorm { .. })) {
            let Op::RmsNorm { eps } = g.node(n).op else {
                unreachable!("filtered on RmsNorm")
            };
            let users = g.users(n);
            let parts: Option<Vec<MatMulParts>> = users
                .iter()
                .map(|&u| {
                    MatMulParts::read(g, u)
                        // The normalized value must be the matmul's activation, not another of its inputs.
                        .filter(|p| {
                            p.norm_eps.is_none()
                                && p.x == n
                                && g.inputs(u)[1..].iter().all(|&i| i != n)
                        })
                })
                .collect();
            let Some(parts) = parts.filter(|p| !p.is_empty()) else {
                kept += 1;
                continue;
            };
            let ins = g.inputs(n);
            let (x, w) = (ins[0], ins[1]);
            for (&u, mut p) in users.iter().zip(parts) {
                p.norm_eps = Some(eps);
                p.norm = Some(w);
                p.x = x;
                p.write(g, u);
                matmuls += 1;
            }
            g.remove(n);
            norms += 1;
        }
        Ok(format!(
            "fused {norms} rmsnorms into {matmuls} matmuls ({kept} rmsnorms kept: they feed non-matmul ops)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{count, line, Tb};
    use super::*;
    use mimo_ir::*;

    /// x -> norm -> {q, k}; x -> norm2 -> {matmul, lm_head}.
    fn graph() -> Graph {
        let mut t = Tb::new(8);
        let x = t.x;
        let hn = t.norm("attn_norm", x);
        let q = t.matmul("q", hn, 8);
        let k = t.matmul("k", hn, 4);
        let k8 = t.matmul("k_up", k, 8);
        let s = t.op("sum", Op::Add, TensorType::act(8), &[q, k8]);
        let r = t.op("res", Op::Add, TensorType::act(8), &[x, s]);
        let fn_ = t.norm("final_norm", r);
        let m = t.matmul("side", fn_, 8);
        let hw = t.weight("head", WeightClass::LmHead, DType::BF16, &[16, 8]);
        let lg = t.op("lm_head", Op::LmHead, TensorType::act(16), &[fn_, hw]);
        let both = t.op("both", Op::Add, TensorType::act(8), &[m, m]);
        t.op(
            "hidden",
            Op::Output {
                name: "hidden.0".into(),
            },
            TensorType::act(8),
            &[both],
        );
        t.output(lg);
        t.g
    }

    #[test]
    fn folds_norm_into_all_matmul_users() {
        let mut g = graph();
        g.verify().unwrap();
        let msg = FuseNorm.run(&mut g, &PassOptions::default()).unwrap();
        assert_eq!(
            msg,
            "fused 1 rmsnorms into 2 matmuls (1 rmsnorms kept: they feed non-matmul ops)"
        );
        g.verify().unwrap();
        let text = g.to_text();
        // q and k now read the embedding directly, with the norm weight as their third input.
        let q = line(&text, "q");
        assert!(
            q.starts_with("%") && q.contains("matmul{prologue=rmsnorm(eps=0.00001)}(%3, %5, %4)"),
            "{text}"
        );
        assert!(line(&text, "k").contains("prologue=rmsnorm"), "{text}");
        assert!(!line(&text, "k_up").contains("prologue"), "{text}");
        // The final norm also feeds the LM head: kept.
        assert!(line(&text, "final_norm").contains("rmsnorm{eps"), "{text}");
        assert!(!line(&text, "side").contains("prologue"), "{text}");
        assert_eq!(count(&g, "rmsnorm"), 1);
        assert!(!text.contains("; attn_norm\n"));
    }

    #[test]
    fn no_fuse_is_identity() {
        let mut g = graph();
        let before = g.to_text();
        let opts = PassOptions {
            fuse: false,
            ..Default::default()
        };
        FuseNorm.run(&mut g, &opts).unwrap();
        assert_eq!(g.to_text(), before);
    }

    #[test]
    fn keeps_norm_of_matmul_with_prologue() {
        let mut g = graph();
        FuseNorm.run(&mut g, &PassOptions::default()).unwrap();
        // Running again changes nothing: the remaining norm feeds the LM head.
        let before = g.to_text();
        let msg = FuseNorm.run(&mut g, &PassOptions::default()).unwrap();
        assert!(msg.starts_with("fused 0 rmsnorms"), "{msg}");
        assert_eq!(g.to_text(), before);
        g.verify().unwrap();
    }
}
