//! The pass pipeline. Each pass is one file; `mimoc dump-ir --after <pass>` prints the graph after it.

use anyhow::Result;
use mimo_ir::{matmul_inputs, DType, Epilogue, Graph, NodeId, Op};

pub mod dce;
pub mod fuse_norm;
pub mod fuse_residual;
pub mod fuse_rope_kv;
pub mod fuse_swiglu;
pub mod quantize_dense;
pub mod quantize_experts;

/// What the passes may depend on.
#[derive(Clone, Debug)]
pub struct PassOptions {
    /// Run the fusion passes.
    pub fuse: bool,
    /// Packed dtype of MoE experts: MXFP4 (default) or bf16.
    pub experts: DType,
    /// Packed dtype of attention / dense projections: bf16 (default) or FP8.
    pub dense: DType,
}

impl Default for PassOptions {
    fn default() -> Self {
        PassOptions {
            fuse: true,
            experts: DType::MXFP4,
            dense: DType::BF16,
        }
    }
}

pub trait Pass {
    fn name(&self) -> &'static str;
    /// Rewrite the graph; returns a one-line summary of what changed.
    fn run(&self, g: &mut Graph, opts: &PassOptions) -> Result<String>;
}

/// The passes, in pipeline order.
pub fn pipeline() -> Vec<Box<dyn Pass>> {
    vec![
        Box::new(dce::Dce),
        Box::new(fuse_norm::FuseNorm),
        Box::new(fuse_rope_kv::FuseRopeKv),
        Box::new(fuse_swiglu::FuseSwiGlu),
        Box::new(fuse_residual::FuseResidual),
        Box::new(quantize_experts::QuantizeExperts),
        Box::new(quantize_dense::QuantizeDense),
    ]
}

/// Names of the passes, in order.
pub fn pass_names() -> Vec<&'static str> {
    pipeline().iter().map(|p| p.name()).collect()
}

/// Run the pipeline up to and including `stop_after` (all when None). Verifies after every pass.
/// Returns the summary line of each pass that ran.
pub fn run_pipeline(
    g: &mut Graph,
    opts: &PassOptions,
    stop_after: Option<&str>,
) -> Result<Vec<String>> {
    if let Some(s) = stop_after {
        if s != "build" && !pass_names().contains(&s) {
            anyhow::bail!(
                "unknown pass {s:?}; passes are: build, {}",
                pass_names().join(", ")
            );
        }
        if s == "build" {
            return Ok(vec![]);
        }
    }
    let mut log = vec![];
    for p in pipeline() {
        let msg = p.run(g, opts)?;
        g.verify()
            .map_err(|e| anyhow::anyhow!("after pass {}: {e}", p.name()))?;
        log.push(format!("{}: {msg}", p.name()));
        if Some(p.name()) == stop_after {
            break;
        }
    }
    Ok(log)
}

/// A `MatMul` node taken apart: its attributes and its inputs by role.
#[derive(Clone, Debug)]
pub(crate) struct MatMulParts {
    pub has_bias: bool,
    pub norm_eps: Option<f32>,
    pub epilogue: Vec<Epilogue>,
    pub x: NodeId,
    pub w: NodeId,
    pub bias: Option<NodeId>,
    pub norm: Option<NodeId>,
    pub positions: Option<NodeId>,
    pub residual: Option<NodeId>,
}

impl MatMulParts {
    /// Take a `MatMul` node apart (None for any other op or a node with the wrong arity).
    pub fn read(g: &Graph, id: NodeId) -> Option<MatMulParts> {
        let Op::MatMul {
            has_bias,
            norm_eps,
            epilogue,
        } = &g.node(id).op
        else {
            return None;
        };
        let ins = g.inputs(id);
        if ins.len() != g.node(id).op.arity() {
            return None;
        }
        let idx = matmul_inputs(*has_bias, norm_eps.is_some(), epilogue);
        Some(MatMulParts {
            has_bias: *has_bias,
            norm_eps: *norm_eps,
            epilogue: epilogue.clone(),
            x: ins[0],
            w: ins[1],
            bias: idx.bias.map(|i| ins[i]),
            norm: idx.norm.map(|i| ins[i]),
            positions: idx.positions.map(|i| ins[i]),
            residual: idx.residual.map(|i| ins[i]),
        })
    }

    /// Does the epilogue end in a KV-cache write (the matmul then produces only a cache handle)?
    pub fn ends_in_kv_write(&self) -> bool {
        matches!(self.epilogue.last(), Some(Epilogue::KvWrite { .. }))
    }

    /// Write these parts back into node `id`: its op and its inputs, in the order `matmul_inputs` gives.
    /// The node's output type is left to the caller.
    pub fn write(&self, g: &mut Graph, id: NodeId) {
        let idx = matmul_inputs(self.has_bias, self.norm_eps.is_some(), &self.epilogue);
        let mut ins = vec![self.x, self.w];
        let mut put = |slot: Option<usize>, node: Option<NodeId>, what: &str| match (slot, node) {
            (Some(s), Some(n)) => {
                debug_assert_eq!(s, ins.len());
                ins.push(n)
            }
            (None, _) => {}
            (Some(_), None) => panic!("matmul {}: {what} input missing", g.node(id).name),
        };
        put(idx.bias, self.bias, "bias");
        put(idx.norm, self.norm, "norm weight");
        put(idx.positions, self.positions, "positions");
        put(idx.residual, self.residual, "residual");
        g.node_mut(id).op = Op::MatMul {
            has_bias: self.has_bias,
            norm_eps: self.norm_eps,
            epilogue: self.epilogue.clone(),
        };
        g.set_inputs(id, &ins);
    }
}

/// The single consumer of `id`, if it has exactly one use.
pub(crate) fn only_user(g: &Graph, id: NodeId) -> Option<NodeId> {
    match g.users(id).as_slice() {
        [u] => Some(*u),
        _ => None,
    }
}

/// Graph nodes in topological order whose op matches `pred` (a snapshot: rewriting is safe while iterating).
pub(crate) fn nodes_where(g: &Graph, pred: impl Fn(&Op) -> bool) -> Vec<NodeId> {
    g.topo()
        .into_iter()
        .filter(|&n| pred(&g.node(n).op))
        .collect()
}

#[cfg(test)]
pub(crate) mod testutil;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipeline_order() {
        assert_eq!(
            pass_names(),
            [
                "dce",
                "fuse-norm",
                "fuse-rope-kv",
                "fuse-swiglu",
                "fuse-residual",
                "quantize-experts",
                "quantize-dense"
            ]
        );
    }
}
