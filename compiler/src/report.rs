//! `mimoc compile --report`: the bytes one decode step (1 token, batch 1) must read, by weight class, and the
//! memory-bandwidth time floor they imply.
//!
//! Decode at batch 1 is bandwidth-bound: every weight an instruction of the target program uses is streamed once
//! per token, except that
//! - an `Embed` reads one row of its table (one token);
//! - a `Moe` reads only the `top_k` experts the router picked, i.e. `bytes x top_k / n_experts` of its weights;
//! - the KV cache is read at the given context: per layer `min(context, window)` positions x kv heads x
//!   (k_dim + v_dim) values, 4 bytes each (the CPU cache stores f32; a bf16 cache would be half).
//!
//! A weight read by two instructions (tied embeddings: the lookup and the LM head) is counted for each. Activations
//! (a few KB) are ignored.

use crate::passes::{run_pipeline, PassOptions};
use anyhow::Result;
use mimo_ir::plan::{expected_bytes, Instr, KvDesc, Plan, WeightDesc};
use mimo_ir::{DType, Op, WeightClass};
use mimo_models::build::{build_graph, BuildOptions};
use mimo_models::config::ModelConfig;
use std::collections::BTreeSet;
use std::fmt::Write as _;

/// H100 SXM HBM3 bandwidth, the datasheet figure (3.35 TB/s); sustained bandwidth is lower.
pub const H100_HBM_BYTES_PER_S: f64 = 3.35e12;

/// Row names, in table order.
pub const ROWS: [&str; 9] = [
    "experts",
    "attention",
    "dense-mlp",
    "router",
    "norms",
    "embedding",
    "lm-head",
    "draft",
    "kv-cache",
];

fn class_row(c: WeightClass) -> &'static str {
    match c {
        WeightClass::Experts => "experts",
        WeightClass::Attention => "attention",
        WeightClass::DenseMlp => "dense-mlp",
        WeightClass::Router => "router",
        WeightClass::Norm => "norms",
        WeightClass::Embedding => "embedding",
        WeightClass::LmHead => "lm-head",
        WeightClass::Draft => "draft",
    }
}

/// One row of the table with what it is made of.
#[derive(Clone, Debug, Default)]
struct Row {
    bytes: u128,
    /// Elements those bytes encode (for bits / element).
    elems: u128,
    formats: BTreeSet<&'static str>,
}

/// Per-row bytes (u128 to keep fractions of huge tensors exact), in [`ROWS`] order.
fn tally(plan: &Plan, context: usize) -> Vec<Row> {
    let mut rows = vec![Row::default(); ROWS.len()];
    let at = |name: &str| ROWS.iter().position(|r| *r == name).expect("known row");
    let prog = plan
        .program("target")
        .or(plan.programs.first())
        .map(|p| p.instrs.as_slice())
        .unwrap_or(&[]);
    // Add `num / den` of weight `w` to `row`.
    let mut add = |row: &str, w: u32, num: u128, den: u128| {
        let d: &WeightDesc = &plan.weights[w as usize];
        let r = &mut rows[at(row)];
        r.bytes += d.total_bytes() as u128 * num / den;
        r.elems += d.elems() as u128 * num / den;
        r.formats.insert(d.dtype.name());
    };
    let class = |w: u32| class_row(plan.weights[w as usize].class);
    for ins in prog {
        match ins {
            Instr::Embed { table, .. } => {
                let rows_n = plan.weights[*table as usize].dims[0].max(1) as u128;
                add("embedding", *table, 1, rows_n);
            }
            Instr::RmsNorm { w, .. } => add(class(*w), *w, 1, 1),
            Instr::MatMul { w, bias, norm, .. } => {
                for x in std::iter::once(*w).chain(*bias).chain(norm.map(|n| n.0)) {
                    add(class(x), x, 1, 1);
                }
            }
            Instr::Attention { sinks, .. } => {
                if let Some(s) = sinks {
                    add(class(*s), *s, 1, 1);
                }
            }
            Instr::Router { w, bias, norm, .. } => {
                for x in std::iter::once(*w).chain(*bias).chain(norm.map(|n| n.0)) {
                    add(class(x), x, 1, 1);
                }
            }
            Instr::Moe {
                gate_up,
                down,
                norm,
                top_k,
                ..
            } => {
                for x in [*gate_up, *down] {
                    let n_experts = plan.weights[x as usize].dims[0].max(1) as u128;
                    add("experts", x, (*top_k as u128).min(n_experts), n_experts);
                }
                if let Some((n, _)) = norm {
                    add(class(*n), *n, 1, 1);
                }
            }
            Instr::LmHead { w, norm, .. } => {
                add("lm-head", *w, 1, 1);
                if let Some((n, _)) = norm {
                    add(class(*n), *n, 1, 1);
                }
            }
            Instr::HeadRmsNorm { w, .. } => add(class(*w), *w, 1, 1),
            Instr::Rope { .. }
            | Instr::LoadInput { .. }
            | Instr::BlockAttention { .. }
            | Instr::KvWrite { .. }
            | Instr::SwiGlu { .. }
            | Instr::Scale { .. }
            | Instr::Add { .. } => {}
        }
    }
    let kv = &mut rows[at("kv-cache")];
    for k in &plan.kv {
        let elems = kv_positions(k, context) as u128 * (k.heads * (k.k_dim + k.v_dim)) as u128;
        kv.elems += elems;
        kv.bytes += 4 * elems;
    }
    if !plan.kv.is_empty() {
        kv.formats.insert(DType::F32.name());
    }
    rows
}

/// Cached positions one decode query of a layer attends to at `context`.
fn kv_positions(k: &KvDesc, context: usize) -> usize {
    k.window.map_or(context, |w| w.min(context))
}

/// Bytes one decode step (1 token, batch 1) reads at `context` tokens of context, by row: `experts` (top_k of
/// n_experts per MoE layer), `attention`, `dense-mlp`, `router`, `norms`, `embedding` (one row), `lm-head`, `draft`,
/// and `kv-cache` (f32 as the CPU cache stores it). The rows sum to the total (there is no total row).
pub fn decode_bytes(plan: &Plan, context: usize) -> Vec<(String, u64)> {
    ROWS.iter()
        .zip(tally(plan, context))
        .map(|(n, r)| (n.to_string(), r.bytes as u64))
        .collect()
}

/// The report table of [`decode_bytes`] as text.
pub fn decode_report(plan: &Plan, context: usize) -> String {
    let rows = tally(plan, context);
    let total: u128 = rows.iter().map(|r| r.bytes).sum();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "decode step (1 token, batch 1) at context {context}: bytes read ({})",
        plan.model.arch
    );
    let _ = writeln!(
        s,
        "  {:<10} {:>16} {:>12} {:>7}  format",
        "class", "bytes", "MB", "share"
    );
    for (name, r) in ROWS.iter().zip(&rows) {
        if r.bytes == 0 && matches!(*name, "draft") {
            continue;
        }
        let fmt = if r.elems > 0 {
            format!(
                "{} ({:.2} bits/elem incl. scales)",
                r.formats.iter().copied().collect::<Vec<_>>().join("+"),
                r.bytes as f64 * 8.0 / r.elems as f64
            )
        } else {
            "-".into()
        };
        let note = match *name {
            "experts" => {
                let (k, n) = moe_facts(plan);
                if n > 0 {
                    format!("; top_{k} of {n} experts per MoE layer")
                } else {
                    String::new()
                }
            }
            "embedding" => "; one row per token".into(),
            "kv-cache" => format!(
                "; min(ctx, window) positions; a bf16 cache would read {:.3} MB",
                r.bytes as f64 / 2.0 / 1e6
            ),
            _ => String::new(),
        };
        let _ = writeln!(
            s,
            "  {:<10} {:>16} {:>12.3} {:>6.1}%  {fmt}{note}",
            name,
            r.bytes,
            r.bytes as f64 / 1e6,
            if total > 0 {
                100.0 * r.bytes as f64 / total as f64
            } else {
                0.0
            }
        );
    }
    let _ = writeln!(
        s,
        "  {:<10} {:>16} {:>12.3} {:>6.1}%",
        "total",
        total,
        total as f64 / 1e6,
        100.0
    );
    let floor = total as f64 / H100_HBM_BYTES_PER_S;
    let _ = writeln!(
        s,
        "time floor at 3.35 TB/s (H100 SXM HBM3 datasheet figure): {:.3} us per token ({:.0} tokens/s at most)",
        floor * 1e6,
        if floor > 0.0 { 1.0 / floor } else { 0.0 }
    );
    s
}

/// (top_k, n_experts) of the first MoE instruction of the target program, (0, 0) for a dense model.
fn moe_facts(plan: &Plan) -> (usize, usize) {
    let prog = plan.program("target").or(plan.programs.first());
    for ins in prog.map(|p| p.instrs.as_slice()).unwrap_or(&[]) {
        if let Instr::Router { spec, .. } = ins {
            return (spec.top_k, spec.n_experts);
        }
        if let Instr::Moe { gate_up, top_k, .. } = ins {
            return (*top_k, plan.weights[*gate_up as usize].dims[0]);
        }
    }
    (0, 0)
}

/// A plan skeleton of `cfg` compiled with `passes` (no checkpoint needed: weights get their packed sizes but no
/// data). For byte accounting of configs whose weights are not at hand.
pub fn plan_from_config(cfg: &ModelConfig, passes: &PassOptions) -> Result<Plan> {
    let b = BuildOptions {
        fp8_checkpoint: cfg.fp8.is_some(),
        ..Default::default()
    };
    let mut g = build_graph(cfg, &b);
    g.verify()?;
    let log = run_pipeline(&mut g, passes, None)?;
    let lowered = crate::lower::lower(&g, "target", 1)?;
    let mut weights = vec![];
    for &n in &lowered.weights {
        let node = g.node(n);
        let Op::Weight { name, class, .. } = &node.op else {
            anyhow::bail!("node {} is not a weight", node.name)
        };
        let dims = node.ty.fixed_dims().expect("weights have fixed dims");
        let (nbytes, scale_nbytes) = expected_bytes(node.ty.dtype, &dims)
            .ok_or_else(|| anyhow::anyhow!("weight {name}: no packed size for {}", node.ty))?;
        weights.push(WeightDesc {
            name: name.clone(),
            dtype: node.ty.dtype,
            dims,
            class: *class,
            offset: 0,
            nbytes,
            scale_offset: 0,
            scale_nbytes,
        });
    }
    Ok(Plan {
        model: crate::model_info(cfg),
        max_tokens: 1,
        arena_len: lowered.arena_len,
        buffers: lowered.buffers,
        weights,
        kv: lowered.kv,
        programs: vec![lowered.program],
        passes: log,
        tokenizer_json: String::new(),
        chat_template: None,
        weights_len: 0,
        draft: None,
    })
}

/// [`decode_bytes`] of a model known only by its config (e.g. the default MiMo-V2-Flash), compiled with `passes`.
pub fn decode_bytes_from_config(
    cfg: &ModelConfig,
    passes: &PassOptions,
    context: usize,
) -> Result<Vec<(String, u64)>> {
    Ok(decode_bytes(&plan_from_config(cfg, passes)?, context))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mimo_ir::plan::{ModelInfo, Program};
    use mimo_ir::RouterSpec;

    fn w(name: &str, dtype: DType, dims: &[usize], class: WeightClass) -> WeightDesc {
        let (nbytes, scale_nbytes) = expected_bytes(dtype, dims).unwrap();
        WeightDesc {
            name: name.into(),
            dtype,
            dims: dims.to_vec(),
            class,
            offset: 0,
            nbytes,
            scale_offset: 0,
            scale_nbytes,
        }
    }

    /// embed, one attention layer (norm-fused q/k/v + o), norm-fused router + 8 MXFP4 experts (top 2, residual
    /// fused), a standalone norm, an LM head with a norm prologue.
    fn tiny_plan() -> Plan {
        use WeightClass::*;
        let weights = vec![
            w("embed", DType::BF16, &[100, 64], Embedding),    // 0
            w("norm", DType::F32, &[64], Norm),                // 1
            w("qkv", DType::BF16, &[96, 64], Attention),       // 2
            w("o", DType::BF16, &[64, 32], Attention),         // 3
            w("sinks", DType::F32, &[2], Attention),           // 4
            w("router", DType::F32, &[8, 64], Router),         // 5
            w("gate_up", DType::MXFP4, &[8, 64, 64], Experts), // 6
            w("down", DType::MXFP4, &[8, 64, 32], Experts),    // 7
            w("head", DType::BF16, &[100, 64], LmHead),        // 8
        ];
        let spec = RouterSpec::sigmoid_top_k(8, 2, false);
        let attn = mimo_ir::AttnSpec {
            layer: 0,
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 16,
            v_head_dim: 16,
            window: Some(128),
            scale: 0.25,
            sinks: true,
        };
        let instrs = vec![
            Instr::Embed { table: 0, out: 0 },
            Instr::MatMul {
                x: 0,
                w: 2,
                bias: None,
                norm: Some((1, 1e-5)),
                residual: None,
                epilogue: vec![],
                out: 1,
            },
            Instr::Attention {
                q: 1,
                sinks: Some(4),
                out: 1,
                spec: attn,
            },
            Instr::MatMul {
                x: 1,
                w: 3,
                bias: None,
                norm: None,
                residual: Some(0),
                epilogue: vec![],
                out: 0,
            },
            Instr::Router {
                x: 0,
                w: 5,
                bias: None,
                norm: Some((1, 1e-5)),
                out: 2,
                spec,
            },
            Instr::Moe {
                x: 0,
                routing: 2,
                gate_up: 6,
                down: 7,
                norm: Some((1, 1e-5)),
                residual: Some(0),
                out: 1,
                top_k: 2,
                inter: 32,
            },
            Instr::RmsNorm {
                x: 1,
                w: 1,
                out: 0,
                eps: 1e-5,
            },
            Instr::LmHead {
                x: 1,
                w: 8,
                norm: Some((1, 1e-5)),
                out: 0,
            },
        ];
        Plan {
            model: ModelInfo {
                arch: "test".into(),
                vocab: 100,
                hidden: 64,
                n_layers: 2,
                bos: None,
                eos: vec![],
                max_position: 8192,
            },
            max_tokens: 1,
            arena_len: 0,
            buffers: vec![],
            weights,
            kv: vec![
                KvDesc {
                    layer: 0,
                    heads: 1,
                    k_dim: 16,
                    v_dim: 16,
                    window: Some(128),
                },
                KvDesc {
                    layer: 1,
                    heads: 2,
                    k_dim: 32,
                    v_dim: 16,
                    window: None,
                },
            ],
            programs: vec![Program {
                name: "target".into(),
                instrs,
                outputs: vec![],
            }],
            passes: vec![],
            tokenizer_json: String::new(),
            chat_template: None,
            weights_len: 0,
            draft: None,
        }
    }

    #[test]
    fn decode_bytes_of_tiny_plan() {
        let p = tiny_plan();
        let rows = decode_bytes(&p, 4096);
        let get = |n: &str| rows.iter().find(|(r, _)| r == n).unwrap().1;
        // Experts: MXFP4 is 4.25 bits/elem; 2 of 8 experts: (8*64*64 + 8*64*32) * 4.25/8 * 2/8.
        assert_eq!(get("experts"), (8 * 64 * 64 + 8 * 64 * 32) * 17 / 32 / 4);
        assert_eq!(get("attention"), 2 * 96 * 64 + 2 * 64 * 32 + 4 * 2);
        assert_eq!(get("router"), 4 * 8 * 64);
        // The norm weight is read by every instruction that uses it: the q/k/v, router, experts and LM head
        // prologues and the standalone norm.
        assert_eq!(get("norms"), 5 * 4 * 64);
        assert_eq!(get("embedding"), 2 * 64);
        assert_eq!(get("lm-head"), 2 * 100 * 64);
        assert_eq!(get("dense-mlp"), 0);
        // KV: a 128-window layer (1 head x (16+16)) and a global layer at 4096 (2 heads x (32+16)), f32.
        assert_eq!(get("kv-cache"), 4 * (128 * 32 + 4096 * 2 * 48));
        // Short context: the window is not full.
        let short = decode_bytes(&p, 100);
        assert_eq!(short[8], ("kv-cache".into(), 4 * (100 * 32 + 100 * 96)));
        let text = decode_report(&p, 4096);
        assert!(
            text.contains("mxfp4 (4.25 bits/elem incl. scales); top_2 of 8 experts"),
            "{text}"
        );
        assert!(
            text.contains("3.35 TB/s (H100 SXM HBM3 datasheet figure)"),
            "{text}"
        );
        let total: u64 = rows.iter().map(|r| r.1).sum();
        assert!(
            text.contains(&format!("{:<10} {:>16}", "total", total)),
            "{text}"
        );
    }

    #[test]
    fn default_flash_config_table() {
        let cfg = ModelConfig::from_json_str(r#"{"model_type":"mimo_v2_flash"}"#).unwrap();
        let opts = PassOptions::default();
        let rows = decode_bytes_from_config(&cfg, &opts, 4096).unwrap();
        let get = |n: &str| rows.iter().find(|(r, _)| r == n).unwrap().1;
        // 47 MoE layers x 256 experts x (2*2048*4096 + 4096*2048) elements at 4.25 bits, 8 of 256 read.
        let per_layer = 256u64 * 3 * 2048 * 4096 * 17 / 32;
        assert_eq!(get("experts"), 47 * per_layer * 8 / 256);
        assert!(get("kv-cache") > 0 && get("attention") > 0 && get("dense-mlp") > 0);
        println!(
            "{}",
            decode_report(&plan_from_config(&cfg, &opts).unwrap(), 4096)
        );
        // FP8 projections halve the attention / dense-MLP rows.
        let fp8 = PassOptions {
            dense: DType::F8E4M3,
            ..Default::default()
        };
        let rows8 = decode_bytes_from_config(&cfg, &fp8, 4096).unwrap();
        let get8 = |n: &str| rows8.iter().find(|(r, _)| r == n).unwrap().1;
        assert!(get8("attention") < get("attention") * 51 / 100);
        println!(
            "{}",
            decode_report(&plan_from_config(&cfg, &fp8).unwrap(), 4096)
        );
    }
}
