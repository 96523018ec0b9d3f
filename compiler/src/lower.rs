//! Lowering: the (optimised) IR graph -> a flat instruction stream with an activation-arena layout.
//!
//! Every f32 / routing value gets a buffer of `max_tokens` rows. Buffers are placed in one arena by a linear scan
//! over the topological order: a buffer's space is reused once its last consumer has run (first fit, lowest
//! offset). Graph outputs live to the end.

use anyhow::{anyhow, bail, Result};
use mimo_ir::plan::{BufId, BufferDesc, Instr, KvDesc, Program, WeightId};
use mimo_ir::*;
use std::collections::HashMap;

/// The result of lowering one graph (one program of the plan).
pub struct Lowered {
    pub program: Program,
    pub buffers: Vec<BufferDesc>,
    pub arena_len: usize,
    /// Weight nodes in the order of their `WeightId`.
    pub weights: Vec<NodeId>,
    pub kv: Vec<KvDesc>,
}

fn width_of(ty: &TensorType) -> usize {
    match ty.dtype {
        DType::Routing => 2 * ty.last(),
        _ => ty.last(),
    }
}

/// Lower `g` into program `name`. Weight ids are assigned from `weight_base` on, buffer ids from 0.
pub fn lower(g: &Graph, name: &str, max_tokens: usize) -> Result<Lowered> {
    g.verify()?;
    let order = g.topo();
    // Last use position of every node.
    let pos_of: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let mut last_use: HashMap<NodeId, usize> = HashMap::new();
    for &n in &order {
        for i in g.inputs(n) {
            let e = last_use.entry(i).or_insert(0);
            *e = (*e).max(pos_of[&n]);
        }
        if matches!(g.node(n).op, Op::Output { .. }) {
            for i in g.inputs(n) {
                last_use.insert(i, usize::MAX);
            }
        }
    }
    let mut weights: Vec<NodeId> = vec![];
    let mut wid: HashMap<NodeId, WeightId> = HashMap::new();
    let mut bufs: Vec<BufferDesc> = vec![];
    let mut bid: HashMap<NodeId, BufId> = HashMap::new();
    // Free list of (offset, len) in floats.
    let mut free: Vec<(usize, usize)> = vec![];
    let mut arena_len = 0usize;
    let mut live: Vec<(usize, NodeId)> = vec![]; // (last use, node) of allocated buffers
    let mut instrs = vec![];
    let mut outputs = vec![];
    let mut kv: Vec<KvDesc> = vec![];

    let alloc = |len: usize, free: &mut Vec<(usize, usize)>, arena_len: &mut usize| -> usize {
        free.sort();
        if let Some(i) = free.iter().position(|&(_, l)| l >= len) {
            let (o, l) = free[i];
            if l == len {
                free.remove(i);
            } else {
                free[i] = (o + len, l - len);
            }
            return o;
        }
        // Extend the arena (merging a trailing free block).
        if let Some(i) = free.iter().position(|&(o, l)| o + l == *arena_len) {
            let (o, l) = free.remove(i);
            *arena_len += len - l;
            return o;
        }
        let o = *arena_len;
        *arena_len += len;
        o
    };

    for (step, &n) in order.iter().enumerate() {
        // Release buffers whose last use is before this step.
        live.retain(|&(lu, node)| {
            if lu < step {
                let b = &bufs[bid[&node] as usize];
                free.push((b.offset, b.width * max_tokens));
                false
            } else {
                true
            }
        });
        // Coalesce adjacent free blocks.
        free.sort();
        let mut merged: Vec<(usize, usize)> = vec![];
        for (o, l) in free.drain(..) {
            match merged.last_mut() {
                Some((mo, ml)) if *mo + *ml == o => *ml += l,
                _ => merged.push((o, l)),
            }
        }
        free = merged;

        let node = g.node(n);
        let ins = g.inputs(n);
        if let Op::Weight { .. } = node.op {
            wid.insert(n, weights.len() as WeightId);
            weights.push(n);
            continue;
        }
        // `tokens` / `positions` are implicit in every instruction; other (f32) inputs are loaded into a buffer.
        if matches!(node.op, Op::Input { .. }) && node.ty.dtype != DType::F32 {
            continue;
        }
        if let Op::Output { name } = &node.op {
            let src = ins[0];
            // A cache handle output only keeps its KV writes alive; it has no buffer.
            if g.node(src).ty.dtype == DType::Cache {
                continue;
            }
            outputs.push((
                name.clone(),
                *bid.get(&src)
                    .ok_or_else(|| anyhow!("output {name} has no buffer"))?,
            ));
            continue;
        }
        // Allocate the output buffer (cache handles have none).
        let out = if node.ty.dtype == DType::Cache {
            None
        } else {
            let w = width_of(&node.ty);
            let off = alloc(w * max_tokens, &mut free, &mut arena_len);
            let id = bufs.len() as BufId;
            bufs.push(BufferDesc {
                name: node.name.clone(),
                width: w,
                offset: off,
            });
            bid.insert(n, id);
            live.push((last_use.get(&n).copied().unwrap_or(step), n));
            Some(id)
        };
        let b = |i: usize| -> Result<BufId> {
            bid.get(&ins[i])
                .copied()
                .ok_or_else(|| anyhow!("node {}: input {i} has no buffer", node.name))
        };
        let w = |i: usize| -> Result<WeightId> {
            wid.get(&ins[i])
                .copied()
                .ok_or_else(|| anyhow!("node {}: input {i} is not a weight", node.name))
        };
        let o = || out.ok_or_else(|| anyhow!("node {} has no output buffer", node.name));
        // The RMSNorm prologue of a router / MoE / LM head: its weight and eps.
        let prologue = || -> Result<Option<(WeightId, f32)>> {
            match (node.op.norm_eps(), node.op.norm_slot()) {
                (Some(e), Some(i)) => Ok(Some((w(i)?, e))),
                _ => Ok(None),
            }
        };
        let mut note_kv =
            |layer: usize, kind: KvKind, heads: usize, d: usize, window: Option<usize>| {
                let e = match kv.iter().position(|k| k.layer == layer) {
                    Some(i) => &mut kv[i],
                    None => {
                        kv.push(KvDesc {
                            layer,
                            heads,
                            k_dim: 0,
                            v_dim: 0,
                            window,
                        });
                        kv.last_mut().expect("just pushed")
                    }
                };
                match kind {
                    KvKind::K => e.k_dim = d,
                    KvKind::V => e.v_dim = d,
                }
            };
        let ins_ = match &node.op {
            Op::Input { name } => Instr::LoadInput {
                name: name.clone(),
                out: o()?,
            },
            Op::HeadRmsNorm { eps, head_dim } => Instr::HeadRmsNorm {
                x: b(0)?,
                w: w(1)?,
                out: o()?,
                eps: *eps,
                head_dim: *head_dim,
            },
            Op::BlockAttention { spec } => {
                if let Some(k) = kv.iter_mut().find(|k| k.layer == spec.layer) {
                    k.window = spec.window;
                } else {
                    bail!(
                        "block attention of layer {} reads a cache nothing writes",
                        spec.layer
                    );
                }
                Instr::BlockAttention {
                    q: b(0)?,
                    out: o()?,
                    spec: *spec,
                }
            }
            Op::Embedding => Instr::Embed {
                table: w(1)?,
                out: o()?,
            },
            Op::RmsNorm { eps } => Instr::RmsNorm {
                x: b(0)?,
                w: w(1)?,
                out: o()?,
                eps: *eps,
            },
            Op::MatMul {
                has_bias,
                norm_eps,
                epilogue,
            } => {
                let idx = matmul_inputs(*has_bias, norm_eps.is_some(), epilogue);
                for e in epilogue {
                    if let Epilogue::KvWrite {
                        layer,
                        kind,
                        heads,
                        head_dim,
                    } = e
                    {
                        note_kv(*layer, *kind, *heads, *head_dim, None);
                    }
                }
                let out = match out {
                    Some(o) => o,
                    // A cache-only matmul still needs scratch rows for its epilogue; give it a private buffer.
                    None => {
                        let wd = g.node(ins[1]).ty.fixed_dims().expect("weight dims")[0];
                        let off = alloc(wd * max_tokens, &mut free, &mut arena_len);
                        let id = bufs.len() as BufId;
                        bufs.push(BufferDesc {
                            name: format!("{}.scratch", node.name),
                            width: wd,
                            offset: off,
                        });
                        free.push((off, wd * max_tokens));
                        id
                    }
                };
                Instr::MatMul {
                    x: b(0)?,
                    w: w(1)?,
                    bias: idx.bias.map(w).transpose()?,
                    norm: match (idx.norm, norm_eps) {
                        (Some(i), Some(e)) => Some((w(i)?, *e)),
                        _ => None,
                    },
                    residual: idx.residual.map(b).transpose()?,
                    epilogue: epilogue.clone(),
                    out,
                }
            }
            Op::Rope { spec } => Instr::Rope {
                x: b(0)?,
                out: o()?,
                spec: *spec,
            },
            Op::KvWrite {
                layer,
                kind,
                heads,
                head_dim,
            } => {
                note_kv(*layer, *kind, *heads, *head_dim, None);
                Instr::KvWrite {
                    x: b(0)?,
                    layer: *layer,
                    kind: *kind,
                }
            }
            Op::Attention { spec } => {
                if let Some(k) = kv.iter_mut().find(|k| k.layer == spec.layer) {
                    k.window = spec.window;
                } else {
                    bail!(
                        "attention of layer {} reads a cache nothing writes",
                        spec.layer
                    );
                }
                let sinks = if spec.sinks { Some(w(3)?) } else { None };
                Instr::Attention {
                    q: b(0)?,
                    sinks,
                    out: o()?,
                    spec: *spec,
                }
            }
            Op::Router { spec, .. } => Instr::Router {
                x: b(0)?,
                w: w(1)?,
                bias: if spec.has_bias { Some(w(2)?) } else { None },
                norm: prologue()?,
                out: o()?,
                spec: *spec,
            },
            Op::MoeExperts { top_k, inter, .. } => Instr::Moe {
                x: b(0)?,
                routing: b(1)?,
                gate_up: w(2)?,
                down: w(3)?,
                norm: prologue()?,
                residual: node.op.moe_residual_slot().map(b).transpose()?,
                out: o()?,
                top_k: *top_k,
                inter: *inter,
            },
            Op::SwiGlu => Instr::SwiGlu {
                x: b(0)?,
                out: o()?,
            },
            Op::Scale { factor } => Instr::Scale {
                x: b(0)?,
                out: o()?,
                factor: *factor,
            },
            Op::Add => Instr::Add {
                a: b(0)?,
                b: b(1)?,
                out: o()?,
            },
            Op::LmHead { .. } => Instr::LmHead {
                x: b(0)?,
                w: w(1)?,
                norm: prologue()?,
                out: o()?,
            },
            Op::Weight { .. } | Op::Output { .. } => {
                unreachable!("handled above")
            }
        };
        instrs.push(ins_);
    }
    kv.sort_by_key(|k| k.layer);
    for k in &kv {
        if k.k_dim == 0 || k.v_dim == 0 {
            bail!("layer {} writes only one of K and V", k.layer);
        }
    }
    // `draft_ctx` only writes the draft's KV cache (its outputs are cache handles).
    if name != "draft_ctx" && !outputs.iter().any(|(n, _)| n == "logits") {
        bail!("graph has no `logits` output");
    }
    Ok(Lowered {
        program: Program {
            name: name.to_string(),
            instrs,
            outputs,
        },
        buffers: bufs,
        arena_len,
        weights,
        kv,
    })
}
