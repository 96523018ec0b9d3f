//! Compiling a DFlash draft into the target's plan: the `draft_ctx` and `draft_block` programs (see
//! `mimo_models::draft` for the design), merged with the target program into one plan.
//!
//! Merging: each program is lowered on its own (buffer and weight ids from 0), then renumbered into the plan's
//! tables. Draft buffers live after the target's region of the arena, so the target's outputs (logits, captured
//! hidden states) survive a draft forward. Weights are deduplicated by name: the draft's embedding and LM head
//! are the target's nodes (same name, source, dtype and shape), so the plan holds one copy that both programs
//! read; draft weights shared by the two draft programs (K/V projections, k_norm) are likewise stored once.

use crate::lower::{lower, Lowered};
use crate::pack::{encode_weight, WeightProvider};
use crate::passes::{run_pipeline, PassOptions};
use anyhow::{bail, Result};
use half::{bf16, f16};
use mimo_ir::plan::{BufId, BufferDesc, DraftInfo, KvDesc, Program, WeightId};
use mimo_ir::*;
use mimo_models::checkpoint::Checkpoint;
use mimo_models::config::ModelConfig;
use mimo_models::draft::{build_draft_graphs, DraftBuild, DraftCheckpoint, DRAFT_SOURCE_PREFIX};
use std::collections::HashMap;

/// The draft's graphs after the passes, lowered.
pub struct LoweredDraft {
    pub ctx: (Graph, Lowered),
    pub block: (Graph, Lowered),
    pub info: DraftInfo,
}

/// Build, optimise and lower the draft programs.
pub fn lower_draft(
    target: &ModelConfig,
    draft: &DraftCheckpoint,
    passes: &PassOptions,
    max_tokens: usize,
) -> Result<LoweredDraft> {
    let cfg = &draft.config;
    cfg.check_against(target)?;
    let kv_base = target.n_layers();
    let gs = build_draft_graphs(
        cfg,
        target,
        &DraftBuild {
            kv_base,
            base_dtype: DType::BF16,
        },
    );
    let mut out = vec![];
    for (name, mut g) in [("draft_ctx", gs.ctx), ("draft_block", gs.block)] {
        g.verify()?;
        run_pipeline(&mut g, passes, None)?;
        let l = lower(&g, name, max_tokens)?;
        out.push((g, l));
    }
    let block = out.pop().expect("two programs");
    let ctx = out.pop().expect("two programs");
    Ok(LoweredDraft {
        ctx,
        block,
        info: DraftInfo {
            block_size: cfg.block_size,
            mask_token: cfg.mask_token,
            target_layers: cfg.target_layers.clone(),
            window: cfg.window,
            kv_layers: (kv_base..kv_base + cfg.n_layers).collect(),
        },
    })
}

/// The plan tables of the target and draft programs together.
pub struct Merged {
    pub buffers: Vec<BufferDesc>,
    pub arena_len: usize,
    pub kv: Vec<KvDesc>,
    pub programs: Vec<Program>,
    /// Weight nodes to pack for the draft graphs (new ones only, in plan order after the target's).
    pub ctx_weights: Vec<NodeId>,
    pub block_weights: Vec<NodeId>,
}

fn weight_key(g: &Graph, n: NodeId) -> (String, String, TensorType) {
    let node = g.node(n);
    match &node.op {
        Op::Weight { name, source, .. } => (name.clone(), source.describe(), node.ty.clone()),
        _ => unreachable!("lowering lists weight nodes"),
    }
}

/// Merge the lowered target program with the draft programs.
pub fn merge(tg: &Graph, target: Lowered, d: &LoweredDraft) -> Result<Merged> {
    let mut buffers = target.buffers;
    let mut arena_len = target.arena_len;
    let mut kv = target.kv;
    let mut programs = vec![target.program];
    let mut by_name: HashMap<String, (WeightId, String, TensorType)> = HashMap::new();
    for (i, &n) in target.weights.iter().enumerate() {
        let (name, src, ty) = weight_key(tg, n);
        by_name.insert(name, (i as WeightId, src, ty));
    }
    let mut next = target.weights.len() as WeightId;
    let mut new_lists: Vec<Vec<NodeId>> = vec![];
    for (g, l) in [&d.ctx, &d.block] {
        // Weights: reuse by name, else append.
        let mut wmap: Vec<WeightId> = vec![];
        let mut fresh = vec![];
        for &n in &l.weights {
            let (name, src, ty) = weight_key(g, n);
            match by_name.get(&name) {
                Some((id, s, t)) => {
                    if *s != src || *t != ty {
                        bail!(
                            "weight {name} is {ty} from {src} in program {}, but {t} from {s} elsewhere in the plan",
                            l.program.name
                        );
                    }
                    wmap.push(*id);
                }
                None => {
                    by_name.insert(name, (next, src, ty));
                    wmap.push(next);
                    fresh.push(n);
                    next += 1;
                }
            }
        }
        new_lists.push(fresh);
        // Buffers: appended, in their own region of the arena.
        let bbase = buffers.len() as BufId;
        for b in &l.buffers {
            buffers.push(BufferDesc {
                name: format!("{}.{}", l.program.name, b.name),
                width: b.width,
                offset: b.offset + arena_len,
            });
        }
        arena_len += l.arena_len;
        let mut p = l.program.clone();
        for ins in p.instrs.iter_mut() {
            ins.map_ids(|b| b + bbase, |w| wmap[w as usize]);
        }
        for o in p.outputs.iter_mut() {
            o.1 += bbase;
        }
        programs.push(p);
        for k in &l.kv {
            match kv.iter_mut().find(|e| e.layer == k.layer) {
                Some(e) => {
                    if (e.heads, e.k_dim, e.v_dim) != (k.heads, k.k_dim, k.v_dim) {
                        bail!(
                            "KV cache of layer {} has different shapes in two programs",
                            k.layer
                        );
                    }
                    e.window = e.window.or(k.window);
                }
                None => kv.push(k.clone()),
            }
        }
    }
    kv.sort_by_key(|k| k.layer);
    let block_weights = new_lists.pop().expect("two lists");
    let ctx_weights = new_lists.pop().expect("two lists");
    Ok(Merged {
        buffers,
        arena_len,
        kv,
        programs,
        ctx_weights,
        block_weights,
    })
}

/// Weights from the target checkpoint, or (sources prefixed `draft:`) from the draft checkpoint.
pub struct WithDraft<'a> {
    pub target: &'a Checkpoint,
    pub draft: &'a DraftCheckpoint,
}

impl WeightProvider for WithDraft<'_> {
    fn encode(
        &self,
        src: &WeightSource,
        dtype: DType,
        dims: &[usize],
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        let names: Vec<&String> = match src {
            WeightSource::Tensor(n) => vec![n],
            WeightSource::ConcatRows(v) => v.iter().collect(),
            _ => vec![],
        };
        let drafted: Vec<&str> = names
            .iter()
            .filter_map(|n| n.strip_prefix(DRAFT_SOURCE_PREFIX))
            .collect();
        if drafted.is_empty() {
            return encode_weight(self.target, src, dtype, dims);
        }
        if drafted.len() != names.len() {
            bail!("weight {} mixes draft and target tensors", src.describe());
        }
        let mut v = vec![];
        for n in drafted {
            v.extend(self.draft.read_f32(n)?);
        }
        if v.len() != dims.iter().product::<usize>() {
            bail!(
                "draft weight {}: {} values for shape {dims:?}",
                src.describe(),
                v.len()
            );
        }
        Ok(match dtype {
            DType::F32 => (v.iter().flat_map(|x| x.to_le_bytes()).collect(), vec![]),
            DType::BF16 => (
                v.iter()
                    .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
                    .collect(),
                vec![],
            ),
            DType::F16 => (
                v.iter()
                    .flat_map(|&x| f16::from_f32(x).to_le_bytes())
                    .collect(),
                vec![],
            ),
            other => bail!(
                "draft weight {}: cannot pack as {}",
                src.describe(),
                other.name()
            ),
        })
    }
}
