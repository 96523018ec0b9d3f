//! The typed tensor graph: models build it, passes rewrite it, lowering consumes it.
//!
//! Every node carries one [`Op`] (one op per concept) and the [`TensorType`] of its single output. Shapes use
//! [`Dim::T`] for the number of tokens processed by one forward (1 for plain decode, up to the plan's block size for
//! a verify block or a prefill chunk); every other dimension is a fixed size baked in at compile time.

use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use serde::{Deserialize, Serialize};
use std::fmt::{self, Write as _};

/// Element types of graph values and weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    F32,
    BF16,
    F16,
    /// FP8 E4M3 with one f32 scale per 128x128 block (DeepSeek / MiMo checkpoint layout).
    F8E4M3,
    /// OCP MXFP4: E2M1 elements, one E8M0 scale per 32 elements along K.
    MXFP4,
    I32,
    /// Router output: per token, top-k (expert index, weight) pairs.
    Routing,
    /// A handle on a layer's KV-cache after a write (ordering token, no data of its own).
    Cache,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::F8E4M3 => "f8e4m3",
            DType::MXFP4 => "mxfp4",
            DType::I32 => "i32",
            DType::Routing => "routing",
            DType::Cache => "cache",
        }
    }
    /// Is this a storage format for weights (as opposed to an activation type)?
    pub fn is_weight_format(self) -> bool {
        matches!(
            self,
            DType::F32 | DType::BF16 | DType::F16 | DType::F8E4M3 | DType::MXFP4
        )
    }
}

/// One dimension of a shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Dim {
    /// Tokens in this forward (symbolic).
    T,
    N(usize),
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::T => write!(f, "T"),
            Dim::N(n) => write!(f, "{n}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Vec<Dim>,
}

impl TensorType {
    pub fn new(dtype: DType, shape: Vec<Dim>) -> Self {
        TensorType { dtype, shape }
    }
    /// `[T, n]` activations in f32.
    pub fn act(n: usize) -> Self {
        TensorType::new(DType::F32, vec![Dim::T, Dim::N(n)])
    }
    pub fn fixed(dtype: DType, dims: &[usize]) -> Self {
        TensorType::new(dtype, dims.iter().map(|&d| Dim::N(d)).collect())
    }
    /// Width of the last dimension (0 for a scalar).
    pub fn last(&self) -> usize {
        match self.shape.last() {
            Some(Dim::N(n)) => *n,
            _ => 0,
        }
    }
    /// Product of fixed dims (T counts as 1).
    pub fn fixed_elems(&self) -> usize {
        self.shape
            .iter()
            .map(|d| match d {
                Dim::T => 1,
                Dim::N(n) => *n,
            })
            .product()
    }
    pub fn fixed_dims(&self) -> Option<Vec<usize>> {
        self.shape
            .iter()
            .map(|d| match d {
                Dim::T => None,
                Dim::N(n) => Some(*n),
            })
            .collect()
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[", self.dtype.name())?;
        for (i, d) in self.shape.iter().enumerate() {
            if i > 0 {
                write!(f, ",")?;
            }
            write!(f, "{d}")?;
        }
        write!(f, "]")
    }
}

/// Where a weight's values come from: checkpoint tensors, possibly combined at compile time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum WeightSource {
    /// One checkpoint tensor, as stored.
    Tensor(String),
    /// Checkpoint tensors concatenated along the first (output) axis, in order.
    ConcatRows(Vec<String>),
    /// Per-expert matrices stacked into `[E, rows, cols]`; each entry is the list of tensors concatenated along rows
    /// for that expert (e.g. `[gate, up]`). `slice_rows` takes a row range of a fused `[E, rows, cols]` tensor instead.
    StackExperts(Vec<Vec<String>>),
    /// A fused 3-D checkpoint tensor `[E, rows, cols]` (transformers' `experts.gate_up_proj` / `down_proj`).
    Fused3d(String),
    /// Experts already in MXFP4 (gpt-oss layout): `*_blocks` `[E, rows, cols/32, 16]` u8 and `*_scales`
    /// `[E, rows, cols/32]` u8, taken as they are.
    Mxfp4 { blocks: String, scales: String },
}

impl WeightSource {
    pub fn describe(&self) -> String {
        match self {
            WeightSource::Tensor(n) => n.clone(),
            WeightSource::ConcatRows(v) => format!("concat({})", v.join(", ")),
            WeightSource::StackExperts(v) => {
                let first = v.first().map(|e| e.join("+")).unwrap_or_default();
                format!("stack[{}]({} ...)", v.len(), first)
            }
            WeightSource::Fused3d(n) => n.clone(),
            WeightSource::Mxfp4 { blocks, scales } => format!("mxfp4({blocks}, {scales})"),
        }
    }
}

/// Rough class of a weight, for byte accounting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
pub enum WeightClass {
    Embedding,
    Attention,
    DenseMlp,
    Experts,
    Router,
    Norm,
    LmHead,
    Draft,
}

impl WeightClass {
    pub fn name(self) -> &'static str {
        match self {
            WeightClass::Embedding => "embedding",
            WeightClass::Attention => "attention",
            WeightClass::DenseMlp => "dense-mlp",
            WeightClass::Experts => "experts",
            WeightClass::Router => "router",
            WeightClass::Norm => "norm",
            WeightClass::LmHead => "lm-head",
            WeightClass::Draft => "draft",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KvKind {
    K,
    V,
}

/// RoPE parameters (rotate-half convention on the first `rotary_dim` dims of each head).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RopeSpec {
    pub theta: f32,
    pub head_dim: usize,
    pub rotary_dim: usize,
}

/// A stage applied to a matmul's output while it is still in registers (added by the fusion pass).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Epilogue {
    /// Multiply by a constant.
    Scale(f32),
    /// Rotate heads (reads the positions input).
    Rope(RopeSpec),
    /// Write rows into the KV cache slot of each token's position (reads the positions input). As the last stage,
    /// the matmul produces only the cache handle (no activation buffer).
    KvWrite {
        layer: usize,
        kind: KvKind,
        heads: usize,
        head_dim: usize,
    },
    /// `silu(gate) * up` over a `[gate | up]` output: halves the width.
    SwiGlu,
    /// Add the residual input.
    ResidualAdd,
}

impl Epilogue {
    fn text(&self) -> String {
        match self {
            Epilogue::Scale(s) => format!("scale({s})"),
            Epilogue::Rope(r) => format!(
                "rope(theta={}, rot={}/{})",
                r.theta, r.rotary_dim, r.head_dim
            ),
            Epilogue::KvWrite { layer, kind, .. } => format!("kv_write(L{layer}.{kind:?})"),
            Epilogue::SwiGlu => "swiglu".into(),
            Epilogue::ResidualAdd => "residual_add".into(),
        }
    }
}

/// Attention parameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttnSpec {
    pub layer: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub v_head_dim: usize,
    /// Sliding window (keys with `q_pos - k_pos < window` are visible), `None` for global attention.
    pub window: Option<usize>,
    pub scale: f32,
    pub sinks: bool,
}

/// Router parameters (DeepSeek-V3 style sigmoid top-k with a choice-only bias).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouterSpec {
    pub n_experts: usize,
    pub top_k: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub norm_topk_prob: bool,
    pub scaling: f32,
    /// `sigmoid` (MiMo-V2) or `softmax`.
    pub sigmoid: bool,
    pub has_bias: bool,
}

impl RouterSpec {
    /// Sigmoid scores, plain top-k over `n_experts` (one group), weights normalized, scale 1: the MiMo-V2 router
    /// without its group limit.
    pub fn sigmoid_top_k(n_experts: usize, top_k: usize, has_bias: bool) -> RouterSpec {
        RouterSpec {
            n_experts,
            top_k,
            n_group: 1,
            topk_group: 1,
            norm_topk_prob: true,
            scaling: 1.0,
            sigmoid: true,
            has_bias,
        }
    }
}

/// The operations of the graph. Input conventions are documented per op; [`Op::arity`] checks them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// A runtime input: `tokens` (i32[T]) or `positions` (i32[T]).
    Input { name: String },
    /// A weight, packed into the plan in the node's dtype.
    Weight {
        name: String,
        source: WeightSource,
        class: WeightClass,
    },
    /// `(ids, table)` -> f32[T, H].
    Embedding,
    /// `(x, w)` -> x / rms(x) * w.
    RmsNorm { eps: f32 },
    /// `(x, w, [bias], [norm_w], [positions], [residual])` -> x W^T (+ bias), with an optional RMSNorm prologue on x
    /// and epilogue stages. The optional inputs are present iff `has_bias`, `norm_eps.is_some()`, an epilogue needs
    /// positions (Rope / KvWrite), an epilogue has ResidualAdd — in that order.
    MatMul {
        has_bias: bool,
        norm_eps: Option<f32>,
        epilogue: Vec<Epilogue>,
    },
    /// `(x, positions)` -> x with each head rotated.
    Rope { spec: RopeSpec },
    /// `(x, positions)` -> cache handle: writes rows `[T, heads*head_dim]` into the layer's cache.
    KvWrite {
        layer: usize,
        kind: KvKind,
        heads: usize,
        head_dim: usize,
    },
    /// `(q, k_cache, v_cache, [sinks])` -> f32[T, heads*v_head_dim]. Causal over the cache, windowed if set.
    Attention { spec: AttnSpec },
    /// `(x, w, [bias], [norm_w])` -> routing[T, k], with an optional RMSNorm prologue on x (norm_w present iff
    /// `norm_eps.is_some()`).
    Router {
        spec: RouterSpec,
        norm_eps: Option<f32>,
    },
    /// `(x, routing, gate_up[E, 2I, H], down[E, H, I], [norm_w], [residual])` -> f32[T, H]:
    /// `residual + sum_k w_k * down_e(swiglu(gate_up_e norm?(x)))`. norm_w is present iff `norm_eps.is_some()`
    /// (an RMSNorm prologue on x), residual iff `residual` (added after the expert sum), in that order.
    MoeExperts {
        n_experts: usize,
        top_k: usize,
        inter: usize,
        norm_eps: Option<f32>,
        residual: bool,
    },
    /// `([gate | up])` -> silu(gate) * up.
    SwiGlu,
    /// `(x)` -> x * factor.
    Scale { factor: f32 },
    /// `(a, b)` -> a + b (residual add).
    Add,
    /// `(x, w, [norm_w])` -> f32 logits [T, V] (norm?(x) W^T), norm_w present iff `norm_eps.is_some()`.
    LmHead { norm_eps: Option<f32> },
    /// `(x)`: marks a graph output (`logits`, or a captured hidden state `hidden.L`). A cache handle may be an
    /// output too: it keeps a program whose only effect is writing the KV cache (the DFlash `draft_ctx`) alive.
    Output { name: String },
    /// `(x, w[head_dim])` -> each `head_dim` group of x's row normalized: x / rms(x_head) * w (Qwen3 q_norm /
    /// k_norm, used by the DFlash draft).
    HeadRmsNorm { eps: f32, head_dim: usize },
    /// `(q, k_cache, v_cache)` -> f32[T, heads*v_head_dim]: DFlash block attention. The T tokens of the forward
    /// form one block at positions `s..s+T`; every query sees the cached context positions `[s - window, s)`
    /// (all of `[0, s)` when `window` is None) and ALL block positions, bidirectionally (no causal mask inside
    /// the block). No sinks.
    BlockAttention { spec: AttnSpec },
}

impl Op {
    pub fn mnemonic(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Weight { .. } => "weight",
            Op::Embedding => "embedding",
            Op::RmsNorm { .. } => "rmsnorm",
            Op::MatMul { .. } => "matmul",
            Op::Rope { .. } => "rope",
            Op::KvWrite { .. } => "kv_write",
            Op::Attention { .. } => "attention",
            Op::Router { .. } => "router",
            Op::MoeExperts { .. } => "moe_experts",
            Op::SwiGlu => "swiglu",
            Op::Scale { .. } => "scale",
            Op::Add => "add",
            Op::LmHead { .. } => "lm_head",
            Op::Output { .. } => "output",
            Op::HeadRmsNorm { .. } => "head_rmsnorm",
            Op::BlockAttention { .. } => "block_attention",
        }
    }

    /// Expected number of inputs.
    pub fn arity(&self) -> usize {
        match self {
            Op::Input { .. } | Op::Weight { .. } => 0,
            Op::Embedding | Op::RmsNorm { .. } | Op::Add | Op::HeadRmsNorm { .. } => 2,
            Op::LmHead { norm_eps } => 2 + usize::from(norm_eps.is_some()),
            Op::BlockAttention { .. } => 3,
            Op::MatMul {
                has_bias,
                norm_eps,
                epilogue,
            } => {
                2 + usize::from(*has_bias)
                    + usize::from(norm_eps.is_some())
                    + usize::from(epilogue_needs_positions(epilogue))
                    + usize::from(epilogue.contains(&Epilogue::ResidualAdd))
            }
            Op::Rope { .. } | Op::KvWrite { .. } => 2,
            Op::Attention { spec } => 3 + usize::from(spec.sinks),
            Op::Router { spec, norm_eps } => {
                2 + usize::from(spec.has_bias) + usize::from(norm_eps.is_some())
            }
            Op::MoeExperts {
                norm_eps, residual, ..
            } => 4 + usize::from(norm_eps.is_some()) + usize::from(*residual),
            Op::SwiGlu | Op::Scale { .. } | Op::Output { .. } => 1,
        }
    }
}

impl Op {
    /// The RMSNorm prologue's eps, for the ops that can have one (matmul, router, MoE experts, LM head).
    pub fn norm_eps(&self) -> Option<f32> {
        match self {
            Op::MatMul { norm_eps, .. }
            | Op::Router { norm_eps, .. }
            | Op::MoeExperts { norm_eps, .. }
            | Op::LmHead { norm_eps } => *norm_eps,
            _ => None,
        }
    }

    /// Input slot of the RMSNorm prologue's weight: where it is (when the op has a prologue) or would go (when it
    /// could take one). `None` for ops that take no prologue.
    pub fn norm_slot(&self) -> Option<usize> {
        match self {
            Op::MatMul { has_bias, .. } => Some(2 + usize::from(*has_bias)),
            Op::Router { spec, .. } => Some(2 + usize::from(spec.has_bias)),
            Op::MoeExperts { .. } => Some(4),
            Op::LmHead { .. } => Some(2),
            _ => None,
        }
    }

    /// Input slot of a MoE experts node's residual, if it has one.
    pub fn moe_residual_slot(&self) -> Option<usize> {
        match self {
            Op::MoeExperts {
                norm_eps,
                residual: true,
                ..
            } => Some(4 + usize::from(norm_eps.is_some())),
            _ => None,
        }
    }
}

pub fn epilogue_needs_positions(epi: &[Epilogue]) -> bool {
    epi.iter()
        .any(|e| matches!(e, Epilogue::Rope(_) | Epilogue::KvWrite { .. }))
}

/// Indices of the optional inputs of a `MatMul` node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MatMulInputs {
    pub bias: Option<usize>,
    pub norm: Option<usize>,
    pub positions: Option<usize>,
    pub residual: Option<usize>,
}

pub fn matmul_inputs(has_bias: bool, norm: bool, epilogue: &[Epilogue]) -> MatMulInputs {
    let mut i = 2;
    let mut take = |present: bool| {
        if present {
            i += 1;
            Some(i - 1)
        } else {
            None
        }
    };
    MatMulInputs {
        bias: take(has_bias),
        norm: take(norm),
        positions: take(epilogue_needs_positions(epilogue)),
        residual: take(epilogue.contains(&Epilogue::ResidualAdd)),
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub op: Op,
    pub ty: TensorType,
    /// Human-readable name (e.g. `L3.attn.q`).
    pub name: String,
}

pub type NodeId = NodeIndex<u32>;

/// The graph. Edges carry the input slot index; a node's inputs are its incoming edges ordered by slot.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub g: StableDiGraph<Node, u32>,
    /// Free-form model facts carried to the plan (vocab, eos, layer types ...), printed in the text form header.
    pub meta: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("IR verification failed at node %{node} ({name}, {op}): {msg}")]
pub struct VerifyError {
    pub node: usize,
    pub name: String,
    pub op: String,
    pub msg: String,
}

impl Graph {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(
        &mut self,
        name: impl Into<String>,
        op: Op,
        ty: TensorType,
        inputs: &[NodeId],
    ) -> NodeId {
        let id = self.g.add_node(Node {
            op,
            ty,
            name: name.into(),
        });
        for (slot, &src) in inputs.iter().enumerate() {
            self.g.add_edge(src, id, slot as u32);
        }
        id
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.g[id]
    }

    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.g[id]
    }

    /// Inputs of a node in slot order.
    pub fn inputs(&self, id: NodeId) -> Vec<NodeId> {
        let mut v: Vec<(u32, NodeId)> = self
            .g
            .edges_directed(id, Direction::Incoming)
            .map(|e| (*e.weight(), e.source()))
            .collect();
        v.sort_by_key(|(s, _)| *s);
        v.into_iter().map(|(_, n)| n).collect()
    }

    /// Consumers of a node (each once per use).
    pub fn users(&self, id: NodeId) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = self
            .g
            .edges_directed(id, Direction::Outgoing)
            .map(|e| e.target())
            .collect();
        v.sort();
        v
    }

    /// Replace all inputs of `id` with `inputs` (slot order).
    pub fn set_inputs(&mut self, id: NodeId, inputs: &[NodeId]) {
        let old: Vec<_> = self
            .g
            .edges_directed(id, Direction::Incoming)
            .map(|e| e.id())
            .collect();
        for e in old {
            self.g.remove_edge(e);
        }
        for (slot, &src) in inputs.iter().enumerate() {
            self.g.add_edge(src, id, slot as u32);
        }
    }

    /// Redirect every use of `old` to `new`.
    pub fn replace_uses(&mut self, old: NodeId, new: NodeId) {
        let uses: Vec<_> = self
            .g
            .edges_directed(old, Direction::Outgoing)
            .map(|e| (e.id(), e.target(), *e.weight()))
            .collect();
        for (e, dst, slot) in uses {
            self.g.remove_edge(e);
            self.g.add_edge(new, dst, slot);
        }
    }

    pub fn remove(&mut self, id: NodeId) {
        self.g.remove_node(id);
    }

    /// Remove nodes that no `Output` depends on.
    pub fn dead_code_elim(&mut self) -> usize {
        let mut live = std::collections::HashSet::new();
        let mut stack: Vec<NodeId> = self
            .g
            .node_indices()
            .filter(|&n| matches!(self.g[n].op, Op::Output { .. }))
            .collect();
        while let Some(n) = stack.pop() {
            if live.insert(n) {
                stack.extend(self.inputs(n));
            }
        }
        let dead: Vec<_> = self
            .g
            .node_indices()
            .filter(|n| !live.contains(n))
            .collect();
        for &n in &dead {
            self.g.remove_node(n);
        }
        dead.len()
    }

    /// Nodes in a deterministic topological order (ties broken by node index, i.e. creation order).
    pub fn topo(&self) -> Vec<NodeId> {
        let mut indeg: std::collections::HashMap<NodeId, usize> = self
            .g
            .node_indices()
            .map(|n| (n, self.g.edges_directed(n, Direction::Incoming).count()))
            .collect();
        let mut ready: std::collections::BTreeSet<NodeId> = indeg
            .iter()
            .filter(|(_, &d)| d == 0)
            .map(|(&n, _)| n)
            .collect();
        let mut out = Vec::with_capacity(indeg.len());
        while let Some(n) = ready.pop_first() {
            out.push(n);
            for e in self.g.edges_directed(n, Direction::Outgoing) {
                let d = indeg.get_mut(&e.target()).expect("edge target exists");
                *d -= 1;
                if *d == 0 {
                    ready.insert(e.target());
                }
            }
        }
        out
    }

    pub fn find_output(&self, name: &str) -> Option<NodeId> {
        self.g
            .node_indices()
            .find(|&n| matches!(&self.g[n].op, Op::Output { name: o } if o == name))
    }

    pub fn count_compute(&self) -> usize {
        self.g
            .node_indices()
            .filter(|&n| !matches!(self.g[n].op, Op::Weight { .. } | Op::Input { .. }))
            .count()
    }

    /// Check arity, types and shapes of every node; the error names the node.
    pub fn verify(&self) -> Result<(), VerifyError> {
        let order = self.topo();
        if order.len() != self.g.node_count() {
            let n = self
                .g
                .node_indices()
                .find(|n| !order.contains(n))
                .expect("a node outside the order");
            return Err(self.err(n, "node is part of a cycle".into()));
        }
        for &n in &order {
            self.verify_node(n).map_err(|m| self.err(n, m))?;
        }
        Ok(())
    }

    fn err(&self, n: NodeId, msg: String) -> VerifyError {
        let node = &self.g[n];
        VerifyError {
            node: n.index(),
            name: node.name.clone(),
            op: node.op.mnemonic().into(),
            msg,
        }
    }

    fn verify_node(&self, n: NodeId) -> Result<(), String> {
        let node = &self.g[n];
        let ins = self.inputs(n);
        if ins.len() != node.op.arity() {
            return Err(format!(
                "expects {} inputs, has {}",
                node.op.arity(),
                ins.len()
            ));
        }
        let t = |i: usize| &self.g[ins[i]].ty;
        let want_act = |i: usize, what: &str| -> Result<usize, String> {
            let ty = t(i);
            if ty.dtype != DType::F32 || ty.shape.len() != 2 || ty.shape[0] != Dim::T {
                return Err(format!("input {i} ({what}) must be f32[T,n], got {ty}"));
            }
            Ok(ty.last())
        };
        let want_ids = |i: usize, what: &str| -> Result<(), String> {
            let ty = t(i);
            if ty.dtype != DType::I32 || ty.shape != vec![Dim::T] {
                return Err(format!("input {i} ({what}) must be i32[T], got {ty}"));
            }
            Ok(())
        };
        let want_weight = |i: usize, what: &str, dims: &[usize]| -> Result<(), String> {
            let ty = t(i);
            if !ty.dtype.is_weight_format() || ty.fixed_dims().as_deref() != Some(dims) {
                return Err(format!(
                    "input {i} ({what}) must be a weight {dims:?}, got {ty}"
                ));
            }
            Ok(())
        };
        let out = &node.ty;
        let want_out = |ty: TensorType| -> Result<(), String> {
            if *out != ty {
                return Err(format!("output type must be {ty}, declared {out}"));
            }
            Ok(())
        };
        match &node.op {
            Op::Input { name } => match name.as_str() {
                "tokens" | "positions" => want_out(TensorType::new(DType::I32, vec![Dim::T])),
                _ => want_out(out.clone()),
            },
            Op::Weight { .. } => {
                if !out.dtype.is_weight_format() || out.fixed_dims().is_none() {
                    return Err(format!(
                        "weight must have a weight dtype and fixed shape, got {out}"
                    ));
                }
                if out.dtype == DType::MXFP4 && !out.last().is_multiple_of(32) {
                    return Err(format!("mxfp4 weight needs K % 32 == 0, got {out}"));
                }
                Ok(())
            }
            Op::Embedding => {
                want_ids(0, "ids")?;
                let dims = t(1).fixed_dims().ok_or("table must be fixed")?;
                if dims.len() != 2 {
                    return Err(format!("table must be 2-D, got {}", t(1)));
                }
                want_out(TensorType::act(dims[1]))
            }
            Op::RmsNorm { .. } => {
                let h = want_act(0, "x")?;
                want_weight(1, "norm weight", &[h])?;
                want_out(TensorType::act(h))
            }
            Op::MatMul {
                has_bias,
                norm_eps,
                epilogue,
            } => {
                let k = want_act(0, "x")?;
                let wd = t(1).fixed_dims().ok_or("weight must be fixed")?;
                if wd.len() != 2 || wd[1] != k {
                    return Err(format!("weight must be [n, {k}], got {}", t(1)));
                }
                let mut n_out = wd[0];
                let idx = matmul_inputs(*has_bias, norm_eps.is_some(), epilogue);
                if let Some(b) = idx.bias {
                    want_weight(b, "bias", &[wd[0]])?;
                }
                if let Some(nw) = idx.norm {
                    want_weight(nw, "norm weight", &[k])?;
                }
                if let Some(p) = idx.positions {
                    want_ids(p, "positions")?;
                }
                for e in epilogue {
                    match e {
                        Epilogue::SwiGlu => {
                            if n_out % 2 != 0 {
                                return Err(format!(
                                    "swiglu epilogue needs an even width, got {n_out}"
                                ));
                            }
                            n_out /= 2
                        }
                        Epilogue::Rope(r) => check_rope(r, n_out)?,
                        Epilogue::KvWrite {
                            heads, head_dim, ..
                        } => {
                            if heads * head_dim != n_out {
                                return Err(format!(
                                    "kv_write of {heads}x{head_dim} on width {n_out}"
                                ));
                            }
                        }
                        Epilogue::Scale(_) | Epilogue::ResidualAdd => {}
                    }
                }
                if let Some(r) = idx.residual {
                    let rw = want_act(r, "residual")?;
                    if rw != n_out {
                        return Err(format!("residual width {rw} != output width {n_out}"));
                    }
                }
                // A matmul whose last stage writes the KV cache produces only the cache handle.
                match epilogue.last() {
                    Some(Epilogue::KvWrite {
                        heads, head_dim, ..
                    }) => want_out(TensorType::fixed(DType::Cache, &[*heads, *head_dim])),
                    _ => want_out(TensorType::act(n_out)),
                }
            }
            Op::Rope { spec } => {
                let w = want_act(0, "x")?;
                want_ids(1, "positions")?;
                check_rope(spec, w)?;
                want_out(TensorType::act(w))
            }
            Op::KvWrite {
                heads, head_dim, ..
            } => {
                let w = want_act(0, "x")?;
                want_ids(1, "positions")?;
                if heads * head_dim != w {
                    return Err(format!("kv_write of {heads}x{head_dim} on width {w}"));
                }
                want_out(TensorType::fixed(DType::Cache, &[*heads, *head_dim]))
            }
            Op::Attention { spec } => {
                let w = want_act(0, "q")?;
                if w != spec.n_heads * spec.head_dim {
                    return Err(format!(
                        "q width {w} != {} heads x {}",
                        spec.n_heads, spec.head_dim
                    ));
                }
                if spec.n_kv_heads == 0 || spec.n_heads % spec.n_kv_heads != 0 {
                    return Err(format!(
                        "{} heads not a multiple of {} kv heads",
                        spec.n_heads, spec.n_kv_heads
                    ));
                }
                let kc = TensorType::fixed(DType::Cache, &[spec.n_kv_heads, spec.head_dim]);
                let vc = TensorType::fixed(DType::Cache, &[spec.n_kv_heads, spec.v_head_dim]);
                if *t(1) != kc || *t(2) != vc {
                    return Err(format!(
                        "caches must be {kc} and {vc}, got {} and {}",
                        t(1),
                        t(2)
                    ));
                }
                if spec.sinks {
                    want_weight(3, "sinks", &[spec.n_heads])?;
                }
                want_out(TensorType::act(spec.n_heads * spec.v_head_dim))
            }
            Op::Router { spec, norm_eps } => {
                let h = want_act(0, "x")?;
                want_weight(1, "router weight", &[spec.n_experts, h])?;
                if spec.has_bias {
                    want_weight(2, "score bias", &[spec.n_experts])?;
                }
                if norm_eps.is_some() {
                    want_weight(2 + usize::from(spec.has_bias), "norm weight", &[h])?;
                }
                if spec.top_k == 0 || spec.top_k > spec.n_experts {
                    return Err(format!(
                        "top_k {} out of range 1..={}",
                        spec.top_k, spec.n_experts
                    ));
                }
                if spec.n_group == 0
                    || spec.n_experts % spec.n_group != 0
                    || spec.topk_group > spec.n_group
                {
                    return Err(format!(
                        "bad grouping n_group={} topk_group={}",
                        spec.n_group, spec.topk_group
                    ));
                }
                want_out(TensorType::new(
                    DType::Routing,
                    vec![Dim::T, Dim::N(spec.top_k)],
                ))
            }
            Op::MoeExperts {
                n_experts,
                top_k,
                inter,
                norm_eps,
                residual,
            } => {
                let h = want_act(0, "x")?;
                if *t(1) != TensorType::new(DType::Routing, vec![Dim::T, Dim::N(*top_k)]) {
                    return Err(format!("input 1 must be routing[T,{top_k}], got {}", t(1)));
                }
                want_weight(2, "gate_up", &[*n_experts, 2 * inter, h])?;
                want_weight(3, "down", &[*n_experts, h, *inter])?;
                if norm_eps.is_some() {
                    want_weight(4, "norm weight", &[h])?;
                }
                if *residual {
                    let r = 4 + usize::from(norm_eps.is_some());
                    let rw = want_act(r, "residual")?;
                    if rw != h {
                        return Err(format!("residual width {rw} != output width {h}"));
                    }
                }
                want_out(TensorType::act(h))
            }
            Op::SwiGlu => {
                let w = want_act(0, "x")?;
                if w % 2 != 0 {
                    return Err(format!("swiglu needs an even width, got {w}"));
                }
                want_out(TensorType::act(w / 2))
            }
            Op::Scale { .. } => {
                let w = want_act(0, "x")?;
                want_out(TensorType::act(w))
            }
            Op::Add => {
                let a = want_act(0, "a")?;
                let b = want_act(1, "b")?;
                if a != b {
                    return Err(format!("add of widths {a} and {b}"));
                }
                want_out(TensorType::act(a))
            }
            Op::LmHead { norm_eps } => {
                let h = want_act(0, "x")?;
                let wd = t(1).fixed_dims().ok_or("weight must be fixed")?;
                if wd.len() != 2 || wd[1] != h {
                    return Err(format!("lm head weight must be [V, {h}], got {}", t(1)));
                }
                if norm_eps.is_some() {
                    want_weight(2, "norm weight", &[h])?;
                }
                want_out(TensorType::act(wd[0]))
            }
            Op::Output { .. } => {
                if t(0).dtype != DType::Cache {
                    want_act(0, "x")?;
                }
                want_out(t(0).clone())
            }
            Op::HeadRmsNorm { head_dim, .. } => {
                let w = want_act(0, "x")?;
                if *head_dim == 0 || !w.is_multiple_of(*head_dim) {
                    return Err(format!("head_dim {head_dim} does not divide width {w}"));
                }
                want_weight(1, "norm weight", &[*head_dim])?;
                want_out(TensorType::act(w))
            }
            Op::BlockAttention { spec } => {
                let w = want_act(0, "q")?;
                if w != spec.n_heads * spec.head_dim {
                    return Err(format!(
                        "q width {w} != {} heads x {}",
                        spec.n_heads, spec.head_dim
                    ));
                }
                if spec.n_kv_heads == 0 || spec.n_heads % spec.n_kv_heads != 0 {
                    return Err(format!(
                        "{} heads not a multiple of {} kv heads",
                        spec.n_heads, spec.n_kv_heads
                    ));
                }
                if spec.sinks {
                    return Err("block attention has no sinks".into());
                }
                let kc = TensorType::fixed(DType::Cache, &[spec.n_kv_heads, spec.head_dim]);
                let vc = TensorType::fixed(DType::Cache, &[spec.n_kv_heads, spec.v_head_dim]);
                if *t(1) != kc || *t(2) != vc {
                    return Err(format!(
                        "caches must be {kc} and {vc}, got {} and {}",
                        t(1),
                        t(2)
                    ));
                }
                want_out(TensorType::act(spec.n_heads * spec.v_head_dim))
            }
        }
    }

    /// The stable text form: one line per node in topological order, `%id = op{attrs}(inputs) : type  ; name`.
    pub fn to_text(&self) -> String {
        let order = self.topo();
        let num: std::collections::HashMap<NodeId, usize> =
            order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
        let mut s = String::new();
        for (k, v) in &self.meta {
            let _ = writeln!(s, "# {k} = {v}");
        }
        let _ = writeln!(
            s,
            "# nodes = {}, compute nodes = {}",
            self.g.node_count(),
            self.count_compute()
        );
        for &n in &order {
            let node = &self.g[n];
            let ins: Vec<String> = self
                .inputs(n)
                .iter()
                .map(|i| format!("%{}", num[i]))
                .collect();
            let attrs = attr_text(&node.op);
            let _ = writeln!(
                s,
                "%{} = {}{}({}) : {}  ; {}",
                num[&n],
                node.op.mnemonic(),
                attrs,
                ins.join(", "),
                node.ty,
                node.name
            );
        }
        s
    }
}

fn check_rope(r: &RopeSpec, width: usize) -> Result<(), String> {
    if r.head_dim == 0 || !width.is_multiple_of(r.head_dim) {
        return Err(format!(
            "rope head_dim {} does not divide width {width}",
            r.head_dim
        ));
    }
    if !r.rotary_dim.is_multiple_of(2) || r.rotary_dim > r.head_dim {
        return Err(format!(
            "rotary_dim {} must be even and <= head_dim {}",
            r.rotary_dim, r.head_dim
        ));
    }
    Ok(())
}

fn attr_text(op: &Op) -> String {
    match op {
        Op::Input { name } => format!("{{{name}}}"),
        Op::Weight { source, class, .. } => {
            format!("{{{}, src={}}}", class.name(), source.describe())
        }
        Op::RmsNorm { eps } => format!("{{eps={eps}}}"),
        Op::MatMul {
            has_bias,
            norm_eps,
            epilogue,
        } => {
            let mut parts = vec![];
            if let Some(e) = norm_eps {
                parts.push(format!("prologue=rmsnorm(eps={e})"));
            }
            if *has_bias {
                parts.push("bias".into());
            }
            if !epilogue.is_empty() {
                parts.push(format!(
                    "epilogue=[{}]",
                    epilogue
                        .iter()
                        .map(|e| e.text())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            if parts.is_empty() {
                String::new()
            } else {
                format!("{{{}}}", parts.join(", "))
            }
        }
        Op::Rope { spec } => format!(
            "{{theta={}, rot={}/{}}}",
            spec.theta, spec.rotary_dim, spec.head_dim
        ),
        Op::KvWrite {
            layer,
            kind,
            heads,
            head_dim,
        } => format!("{{L{layer}.{kind:?}, {heads}x{head_dim}}}"),
        Op::Attention { spec } => format!(
            "{{L{}, heads={}/{}, dims={}/{}, window={}, scale={:.6}, sinks={}}}",
            spec.layer,
            spec.n_heads,
            spec.n_kv_heads,
            spec.head_dim,
            spec.v_head_dim,
            spec.window
                .map(|w| w.to_string())
                .unwrap_or_else(|| "global".into()),
            spec.scale,
            spec.sinks
        ),
        Op::Router { spec, norm_eps } => format!(
            "{{experts={}, top_k={}, groups={}/{}, {}, norm={}, scale={}{}}}",
            spec.n_experts,
            spec.top_k,
            spec.topk_group,
            spec.n_group,
            if spec.sigmoid { "sigmoid" } else { "softmax" },
            spec.norm_topk_prob,
            spec.scaling,
            prologue_text(*norm_eps)
        ),
        Op::MoeExperts {
            n_experts,
            top_k,
            inter,
            norm_eps,
            residual,
        } => format!(
            "{{experts={n_experts}, top_k={top_k}, inter={inter}{}{}}}",
            prologue_text(*norm_eps),
            if *residual {
                ", epilogue=[residual_add]"
            } else {
                ""
            }
        ),
        Op::LmHead { norm_eps: Some(e) } => format!("{{prologue=rmsnorm(eps={e})}}"),
        Op::Scale { factor } => format!("{{{factor}}}"),
        Op::Output { name } => format!("{{{name}}}"),
        Op::HeadRmsNorm { eps, head_dim } => format!("{{eps={eps}, head_dim={head_dim}}}"),
        Op::BlockAttention { spec } => format!(
            "{{L{}, heads={}/{}, dims={}/{}, window={}, scale={:.6}, bidirectional-block}}",
            spec.layer,
            spec.n_heads,
            spec.n_kv_heads,
            spec.head_dim,
            spec.v_head_dim,
            spec.window
                .map(|w| w.to_string())
                .unwrap_or_else(|| "global".into()),
            spec.scale
        ),
        Op::Embedding | Op::SwiGlu | Op::Add | Op::LmHead { norm_eps: None } => String::new(),
    }
}

/// `, prologue=rmsnorm(eps=..)` when there is one (the attribute list of an op that has others).
fn prologue_text(norm_eps: Option<f32>) -> String {
    norm_eps
        .map(|e| format!(", prologue=rmsnorm(eps={e})"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> (Graph, NodeId, NodeId) {
        let mut g = Graph::new();
        let ids = g.add(
            "tokens",
            Op::Input {
                name: "tokens".into(),
            },
            TensorType::new(DType::I32, vec![Dim::T]),
            &[],
        );
        let tab = g.add(
            "embed",
            Op::Weight {
                name: "embed".into(),
                source: WeightSource::Tensor("e".into()),
                class: WeightClass::Embedding,
            },
            TensorType::fixed(DType::BF16, &[10, 8]),
            &[],
        );
        let x = g.add("x", Op::Embedding, TensorType::act(8), &[ids, tab]);
        let nw = g.add(
            "norm",
            Op::Weight {
                name: "norm".into(),
                source: WeightSource::Tensor("n".into()),
                class: WeightClass::Norm,
            },
            TensorType::fixed(DType::BF16, &[8]),
            &[],
        );
        let y = g.add("y", Op::RmsNorm { eps: 1e-5 }, TensorType::act(8), &[x, nw]);
        g.add(
            "out",
            Op::Output {
                name: "logits".into(),
            },
            TensorType::act(8),
            &[y],
        );
        (g, x, y)
    }

    #[test]
    fn verifies_and_prints() {
        let (g, _, _) = small();
        g.verify().unwrap();
        let t = g.to_text();
        assert!(
            t.contains("%4 = rmsnorm{eps=0.00001}(%2, %3) : f32[T,8]  ; y"),
            "{t}"
        );
        // Stable: printing twice gives the same text.
        assert_eq!(t, g.to_text());
    }

    #[test]
    fn rejects_wrong_shape_naming_node() {
        let (mut g, _, y) = small();
        g.node_mut(y).ty = TensorType::act(9);
        let e = g.verify().unwrap_err();
        assert_eq!(e.name, "y");
        assert!(
            e.to_string().contains("output type must be f32[T,8]"),
            "{e}"
        );
    }

    #[test]
    fn rejects_wrong_arity() {
        let (mut g, x, y) = small();
        g.set_inputs(y, &[x]);
        let e = g.verify().unwrap_err();
        assert!(e.msg.contains("expects 2 inputs, has 1"), "{e}");
    }

    #[test]
    fn dce_removes_unused() {
        let (mut g, x, _) = small();
        g.add("dead", Op::Scale { factor: 2.0 }, TensorType::act(8), &[x]);
        assert_eq!(g.dead_code_elim(), 1);
        g.verify().unwrap();
    }

    #[test]
    fn matmul_optional_inputs_order() {
        let idx = matmul_inputs(
            true,
            true,
            &[Epilogue::Rope(RopeSpec {
                theta: 1.0,
                head_dim: 4,
                rotary_dim: 2,
            })],
        );
        assert_eq!(
            idx,
            MatMulInputs {
                bias: Some(2),
                norm: Some(3),
                positions: Some(4),
                residual: None
            }
        );
        let idx = matmul_inputs(false, false, &[Epilogue::ResidualAdd]);
        assert_eq!(idx.residual, Some(2));
    }
}
