//! Dead-code elimination: drop nodes no graph output depends on.

use super::{Pass, PassOptions};
use anyhow::Result;
use mimo_ir::Graph;

pub struct Dce;

impl Pass for Dce {
    fn name(&self) -> &'static str {
        "dce"
    }
    fn run(&self, g: &mut Graph, _: &PassOptions) -> Result<String> {
        let n = g.dead_code_elim();
        Ok(format!("removed {n} nodes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mimo_ir::*;

    #[test]
    fn removes_only_dead_nodes() {
        let mut g = Graph::new();
        let t = g.add(
            "a",
            Op::Input {
                name: "tokens".into(),
            },
            TensorType::new(DType::I32, vec![Dim::T]),
            &[],
        );
        let w = g.add(
            "w",
            Op::Weight {
                name: "w".into(),
                source: WeightSource::Tensor("w".into()),
                class: WeightClass::Embedding,
            },
            TensorType::fixed(DType::BF16, &[5, 4]),
            &[],
        );
        let e = g.add("e", Op::Embedding, TensorType::act(4), &[t, w]);
        g.add("dead", Op::Scale { factor: 3.0 }, TensorType::act(4), &[e]);
        g.add(
            "out",
            Op::Output {
                name: "logits".into(),
            },
            TensorType::act(4),
            &[e],
        );
        let msg = Dce.run(&mut g, &PassOptions::default()).unwrap();
        assert_eq!(msg, "removed 1 nodes");
        assert_eq!(g.g.node_count(), 4);
    }
}
