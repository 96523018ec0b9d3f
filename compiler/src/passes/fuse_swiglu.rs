//! fuse-swiglu: a `[gate | up]` matmul whose only consumer is a SwiGlu computes `silu(gate) * up` in its epilogue
//! (`Epilogue::SwiGlu`): the output width halves and the 2I-wide intermediate is never written.

use super::{nodes_where, only_user, MatMulParts, Pass, PassOptions};
use anyhow::Result;
use mimo_ir::{Epilogue, Graph, Op};

pub struct FuseSwiGlu;

impl Pass for FuseSwiGlu {
    fn name(&self) -> &'static str {
        "fuse-swiglu"
    }

    fn run(&self, g: &mut Graph, opts: &PassOptions) -> Result<String> {
        if !opts.fuse {
            return Ok("skipped (--no-fuse)".into());
        }
        let mut n = 0usize;
        for s in nodes_where(g, |op| matches!(op, Op::SwiGlu)) {
            let mm = g.inputs(s)[0];
            let Some(mut p) = MatMulParts::read(g, mm) else {
                continue;
            };
            if p.ends_in_kv_write() || only_user(g, mm) != Some(s) {
                continue;
            }
            p.epilogue.push(Epilogue::SwiGlu);
            let ty = g.node(s).ty.clone();
            p.write(g, mm);
            g.node_mut(mm).ty = ty;
            g.replace_uses(s, mm);
            g.remove(s);
            n += 1;
        }
        Ok(format!("fused {n} swiglus into matmul epilogues"))
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
        let gu = t.matmul_class("gate_up", x, 12, WeightClass::DenseMlp);
        let s = t.op("swiglu", Op::SwiGlu, TensorType::act(6), &[gu]);
        let d = t.matmul_class("down", s, 8, WeightClass::DenseMlp);
        // A [gate | up] that is also read elsewhere keeps its SwiGlu node.
        let gu2 = t.matmul_class("gate_up2", d, 16, WeightClass::DenseMlp);
        let s2 = t.op("swiglu2", Op::SwiGlu, TensorType::act(8), &[gu2]);
        let h = t.matmul_class("half", gu2, 8, WeightClass::DenseMlp);
        let sum = t.op("sum", Op::Add, TensorType::act(8), &[s2, h]);
        t.output(sum);
        t.g
    }

    #[test]
    fn fuses_swiglu_and_halves_width() {
        let mut g = graph();
        g.verify().unwrap();
        let msg = FuseSwiGlu.run(&mut g, &PassOptions::default()).unwrap();
        assert_eq!(msg, "fused 1 swiglus into matmul epilogues");
        g.verify().unwrap();
        let text = g.to_text();
        assert!(
            line(&text, "gate_up")
                .contains("matmul{epilogue=[swiglu]}(%3, %4) : f32[T,6]  ; gate_up"),
            "{text}"
        );
        assert_eq!(count(&g, "swiglu"), 1);
        assert!(!line(&text, "gate_up2").contains("epilogue"), "{text}");
        // down now reads the matmul directly.
        let down =
            g.g.node_indices()
                .find(|&n| g.node(n).name == "down")
                .unwrap();
        assert_eq!(g.node(g.inputs(down)[0]).name, "gate_up");
    }

    #[test]
    fn no_fuse_is_identity() {
        let mut g = graph();
        let before = g.to_text();
        let opts = PassOptions {
            fuse: false,
            ..Default::default()
        };
        FuseSwiGlu.run(&mut g, &opts).unwrap();
        assert_eq!(g.to_text(), before);
    }
}
