//! Helpers for building small graphs in the passes' unit tests.

use mimo_ir::*;

/// A graph under construction with `tokens` and `positions` inputs and an embedded `x` of width `h`.
pub struct Tb {
    pub g: Graph,
    pub pos: NodeId,
    pub x: NodeId,
    pub h: usize,
}

impl Tb {
    pub fn new(h: usize) -> Tb {
        let mut g = Graph::new();
        let i32t = TensorType::new(DType::I32, vec![Dim::T]);
        let tokens = g.add(
            "tokens",
            Op::Input {
                name: "tokens".into(),
            },
            i32t.clone(),
            &[],
        );
        let pos = g.add(
            "positions",
            Op::Input {
                name: "positions".into(),
            },
            i32t,
            &[],
        );
        let mut tb = Tb {
            g,
            pos,
            x: tokens,
            h,
        };
        let emb = tb.weight("embed", WeightClass::Embedding, DType::BF16, &[16, h]);
        tb.x =
            tb.g.add("embed", Op::Embedding, TensorType::act(h), &[tokens, emb]);
        tb
    }

    pub fn weight(
        &mut self,
        name: &str,
        class: WeightClass,
        dtype: DType,
        dims: &[usize],
    ) -> NodeId {
        self.g.add(
            name,
            Op::Weight {
                name: name.into(),
                source: WeightSource::Tensor(name.into()),
                class,
            },
            TensorType::fixed(dtype, dims),
            &[],
        )
    }

    pub fn norm(&mut self, name: &str, x: NodeId) -> NodeId {
        let w = self.weight(
            &format!("{name}.w"),
            WeightClass::Norm,
            DType::F32,
            &[self.h],
        );
        self.g.add(
            name,
            Op::RmsNorm { eps: 1e-5 },
            TensorType::act(self.h),
            &[x, w],
        )
    }

    /// A plain matmul `x W^T` with W `[n, k]` of class Attention (bf16).
    pub fn matmul(&mut self, name: &str, x: NodeId, n: usize) -> NodeId {
        self.matmul_class(name, x, n, WeightClass::Attention)
    }

    pub fn matmul_class(&mut self, name: &str, x: NodeId, n: usize, class: WeightClass) -> NodeId {
        let k = self.g.node(x).ty.last();
        let w = self.weight(&format!("{name}.w"), class, DType::BF16, &[n, k]);
        self.g.add(
            name,
            Op::MatMul {
                has_bias: false,
                norm_eps: None,
                epilogue: vec![],
            },
            TensorType::act(n),
            &[x, w],
        )
    }

    /// A sigmoid top-`top_k` router over 4 experts reading `x` (f32 weight `{name}.w`, and `{name}.b` with
    /// `bias`), without a prologue.
    pub fn router(&mut self, name: &str, x: NodeId, top_k: usize, bias: bool) -> NodeId {
        let h = self.g.node(x).ty.last();
        let mut ins = vec![
            x,
            self.weight(
                &format!("{name}.w"),
                WeightClass::Router,
                DType::F32,
                &[4, h],
            ),
        ];
        if bias {
            ins.push(self.weight(&format!("{name}.b"), WeightClass::Router, DType::F32, &[4]));
        }
        let op = Op::Router {
            spec: RouterSpec::sigmoid_top_k(4, top_k, bias),
            norm_eps: None,
        };
        let ty = TensorType::new(DType::Routing, vec![Dim::T, Dim::N(top_k)]);
        self.g.add(name, op, ty, &ins)
    }

    pub fn op(&mut self, name: &str, op: Op, ty: TensorType, ins: &[NodeId]) -> NodeId {
        self.g.add(name, op, ty, ins)
    }

    pub fn output(&mut self, x: NodeId) -> NodeId {
        let ty = self.g.node(x).ty.clone();
        self.g.add(
            "logits",
            Op::Output {
                name: "logits".into(),
            },
            ty,
            &[x],
        )
    }
}

/// Number of nodes with mnemonic `m` in `g`.
pub fn count(g: &Graph, m: &str) -> usize {
    g.g.node_indices()
        .filter(|&n| g.node(n).op.mnemonic() == m)
        .count()
}

/// The text line of the node named `name` (panics if absent).
pub fn line<'a>(text: &'a str, name: &str) -> &'a str {
    let suffix = format!("  ; {name}");
    text.lines()
        .find(|l| l.ends_with(&suffix))
        .unwrap_or_else(|| panic!("no node {name} in\n{text}"))
}

/// Names of the inputs of the node named `name`, in order (panics if absent).
pub fn input_names(g: &Graph, name: &str) -> Vec<String> {
    let n =
        g.g.node_indices()
            .find(|&n| g.node(n).name == name)
            .unwrap_or_else(|| panic!("no node {name}"));
    g.inputs(n)
        .iter()
        .map(|&i| g.node(i).name.clone())
        .collect()
}
