//! Lowering a MiMo model (its config + the checkpoint's weight layout) to the unfused IR graph.
//!
//! The graph is the plain textbook forward: each concept one node. Fusion and quantization are passes.

use crate::checkpoint::ExpertLayout;
use crate::config::{MlpLayer, ModelConfig};
use mimo_ir::*;

/// Options of the builder.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    pub expert_layout: ExpertLayout,
    /// Packed dtype of weights that come as bf16/f16/f32 (before passes): bf16.
    pub base_dtype: DType,
    /// Projection weights are stored as FP8 in the checkpoint: keep them FP8.
    pub fp8_checkpoint: bool,
    /// Layers whose output hidden state is a graph output `hidden.{i}` (the DFlash draft reads them).
    pub capture_layers: Vec<usize>,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            expert_layout: ExpertLayout::PerExpert,
            base_dtype: DType::BF16,
            fp8_checkpoint: false,
            capture_layers: vec![],
        }
    }
}

struct B<'a> {
    g: Graph,
    opts: &'a BuildOptions,
}

impl B<'_> {
    fn weight(
        &mut self,
        name: &str,
        source: WeightSource,
        class: WeightClass,
        dims: &[usize],
    ) -> NodeId {
        let proj = matches!(
            class,
            WeightClass::Attention | WeightClass::DenseMlp | WeightClass::Experts
        ) && dims.len() >= 2;
        let dtype = match &source {
            WeightSource::Mxfp4 { .. } => DType::MXFP4,
            _ if proj && self.opts.fp8_checkpoint => DType::F8E4M3,
            _ => self.opts.base_dtype,
        };
        let op = Op::Weight {
            name: name.to_string(),
            source,
            class,
        };
        self.g.add(name, op, TensorType::fixed(dtype, dims), &[])
    }

    fn tensor(&mut self, name: &str, class: WeightClass, dims: &[usize]) -> NodeId {
        self.weight(name, WeightSource::Tensor(name.to_string()), class, dims)
    }

    /// Small f32-kept tensors (norms, sinks, router bias) are packed as f32: precision matters, bytes do not.
    fn small(&mut self, name: &str, class: WeightClass, dims: &[usize]) -> NodeId {
        let op = Op::Weight {
            name: name.to_string(),
            source: WeightSource::Tensor(name.to_string()),
            class,
        };
        self.g
            .add(name, op, TensorType::fixed(DType::F32, dims), &[])
    }

    fn matmul(
        &mut self,
        name: &str,
        x: NodeId,
        w: NodeId,
        bias: Option<NodeId>,
        n: usize,
    ) -> NodeId {
        let mut ins = vec![x, w];
        ins.extend(bias);
        let op = Op::MatMul {
            has_bias: bias.is_some(),
            norm_eps: None,
            epilogue: vec![],
        };
        self.g.add(name, op, TensorType::act(n), &ins)
    }
}

/// Build the unfused forward graph of the target model.
pub fn build_graph(cfg: &ModelConfig, opts: &BuildOptions) -> Graph {
    let mut b = B {
        g: Graph::new(),
        opts,
    };
    let h = cfg.hidden;
    let i32t = TensorType::new(DType::I32, vec![Dim::T]);
    let tokens = b.g.add(
        "tokens",
        Op::Input {
            name: "tokens".into(),
        },
        i32t.clone(),
        &[],
    );
    let pos = b.g.add(
        "positions",
        Op::Input {
            name: "positions".into(),
        },
        i32t,
        &[],
    );
    let emb = b.tensor(
        "model.embed_tokens.weight",
        WeightClass::Embedding,
        &[cfg.vocab, h],
    );
    let mut x =
        b.g.add("embed", Op::Embedding, TensorType::act(h), &[tokens, emb]);
    for (i, layer) in cfg.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        let a = &layer.attn;
        // Attention block.
        let nw = b.small(
            &format!("{p}.input_layernorm.weight"),
            WeightClass::Norm,
            &[h],
        );
        let hn = b.g.add(
            format!("L{i}.attn_norm"),
            Op::RmsNorm { eps: cfg.eps },
            TensorType::act(h),
            &[x, nw],
        );
        let qn = a.n_heads * a.head_dim;
        let kn = a.n_kv_heads * a.head_dim;
        let vn = a.n_kv_heads * a.v_head_dim;
        let proj = |b: &mut B, which: &str, n: usize| {
            let w = b.tensor(
                &format!("{p}.self_attn.{which}_proj.weight"),
                WeightClass::Attention,
                &[n, h],
            );
            let bias = a.qkv_bias.then(|| {
                b.small(
                    &format!("{p}.self_attn.{which}_proj.bias"),
                    WeightClass::Attention,
                    &[n],
                )
            });
            b.matmul(&format!("L{i}.{which}"), hn, w, bias, n)
        };
        let q = proj(&mut b, "q", qn);
        let k = proj(&mut b, "k", kn);
        let v = proj(&mut b, "v", vn);
        let rope = Op::Rope { spec: a.rope };
        let q = b.g.add(
            format!("L{i}.q_rope"),
            rope.clone(),
            TensorType::act(qn),
            &[q, pos],
        );
        let k =
            b.g.add(format!("L{i}.k_rope"), rope, TensorType::act(kn), &[k, pos]);
        let v = match a.v_scale {
            Some(s) => b.g.add(
                format!("L{i}.v_scale"),
                Op::Scale { factor: s },
                TensorType::act(vn),
                &[v],
            ),
            None => v,
        };
        let kv = |kind, heads, d| Op::KvWrite {
            layer: i,
            kind,
            heads,
            head_dim: d,
        };
        let kc = b.g.add(
            format!("L{i}.k_cache"),
            kv(KvKind::K, a.n_kv_heads, a.head_dim),
            TensorType::fixed(DType::Cache, &[a.n_kv_heads, a.head_dim]),
            &[k, pos],
        );
        let vc = b.g.add(
            format!("L{i}.v_cache"),
            kv(KvKind::V, a.n_kv_heads, a.v_head_dim),
            TensorType::fixed(DType::Cache, &[a.n_kv_heads, a.v_head_dim]),
            &[v, pos],
        );
        let mut ains = vec![q, kc, vc];
        if a.sinks {
            ains.push(b.small(
                &format!("{p}.self_attn.sinks"),
                WeightClass::Attention,
                &[a.n_heads],
            ));
        }
        let spec = AttnSpec {
            layer: i,
            n_heads: a.n_heads,
            n_kv_heads: a.n_kv_heads,
            head_dim: a.head_dim,
            v_head_dim: a.v_head_dim,
            window: a.window,
            scale: a.scale,
            sinks: a.sinks,
        };
        let att = b.g.add(
            format!("L{i}.attn"),
            Op::Attention { spec },
            TensorType::act(a.n_heads * a.v_head_dim),
            &ains,
        );
        let ow = b.tensor(
            &format!("{p}.self_attn.o_proj.weight"),
            WeightClass::Attention,
            &[h, a.n_heads * a.v_head_dim],
        );
        let o = b.matmul(&format!("L{i}.o"), att, ow, None, h);
        x = b.g.add(
            format!("L{i}.attn_residual"),
            Op::Add,
            TensorType::act(h),
            &[x, o],
        );
        // MLP block.
        let nw = b.small(
            &format!("{p}.post_attention_layernorm.weight"),
            WeightClass::Norm,
            &[h],
        );
        let hn = b.g.add(
            format!("L{i}.mlp_norm"),
            Op::RmsNorm { eps: cfg.eps },
            TensorType::act(h),
            &[x, nw],
        );
        let m = match &layer.mlp {
            MlpLayer::Dense { inter } => {
                let gu = b.weight(
                    &format!("{p}.mlp.gate_up"),
                    WeightSource::ConcatRows(vec![
                        format!("{p}.mlp.gate_proj.weight"),
                        format!("{p}.mlp.up_proj.weight"),
                    ]),
                    WeightClass::DenseMlp,
                    &[2 * inter, h],
                );
                let gu = b.matmul(&format!("L{i}.gate_up"), hn, gu, None, 2 * inter);
                let s = b.g.add(
                    format!("L{i}.swiglu"),
                    Op::SwiGlu,
                    TensorType::act(*inter),
                    &[gu],
                );
                let dw = b.tensor(
                    &format!("{p}.mlp.down_proj.weight"),
                    WeightClass::DenseMlp,
                    &[h, *inter],
                );
                b.matmul(&format!("L{i}.down"), s, dw, None, h)
            }
            MlpLayer::Moe(moe) => {
                let e = moe.n_experts;
                // bf16 as stored in the checkpoint; routing computes in f32 as transformers does.
                let rw = b.tensor(
                    &format!("{p}.mlp.gate.weight"),
                    WeightClass::Router,
                    &[e, h],
                );
                let rb = b.small(
                    &format!("{p}.mlp.gate.e_score_correction_bias"),
                    WeightClass::Router,
                    &[e],
                );
                let spec = RouterSpec {
                    n_experts: e,
                    top_k: moe.top_k,
                    n_group: moe.n_group,
                    topk_group: moe.topk_group,
                    norm_topk_prob: moe.norm_topk_prob,
                    scaling: moe.scaling,
                    sigmoid: true,
                    has_bias: true,
                };
                let r = b.g.add(
                    format!("L{i}.router"),
                    Op::Router {
                        spec,
                        norm_eps: None,
                    },
                    TensorType::new(DType::Routing, vec![Dim::T, Dim::N(moe.top_k)]),
                    &[hn, rw, rb],
                );
                let ex = format!("{p}.mlp.experts");
                let (gu_src, d_src) = match b.opts.expert_layout {
                    ExpertLayout::PerExpert => (
                        WeightSource::StackExperts(
                            (0..e)
                                .map(|j| {
                                    vec![
                                        format!("{ex}.{j}.gate_proj.weight"),
                                        format!("{ex}.{j}.up_proj.weight"),
                                    ]
                                })
                                .collect(),
                        ),
                        WeightSource::StackExperts(
                            (0..e)
                                .map(|j| vec![format!("{ex}.{j}.down_proj.weight")])
                                .collect(),
                        ),
                    ),
                    ExpertLayout::Fused => (
                        WeightSource::Fused3d(format!("{ex}.gate_up_proj")),
                        WeightSource::Fused3d(format!("{ex}.down_proj")),
                    ),
                    ExpertLayout::Mxfp4 => (
                        WeightSource::Mxfp4 {
                            blocks: format!("{ex}.gate_up_proj_blocks"),
                            scales: format!("{ex}.gate_up_proj_scales"),
                        },
                        WeightSource::Mxfp4 {
                            blocks: format!("{ex}.down_proj_blocks"),
                            scales: format!("{ex}.down_proj_scales"),
                        },
                    ),
                };
                let gu = b.weight(
                    &format!("{ex}.gate_up"),
                    gu_src,
                    WeightClass::Experts,
                    &[e, 2 * moe.inter, h],
                );
                let dw = b.weight(
                    &format!("{ex}.down"),
                    d_src,
                    WeightClass::Experts,
                    &[e, h, moe.inter],
                );
                let op = Op::MoeExperts {
                    n_experts: e,
                    top_k: moe.top_k,
                    inter: moe.inter,
                    norm_eps: None,
                    residual: false,
                };
                b.g.add(
                    format!("L{i}.moe"),
                    op,
                    TensorType::act(h),
                    &[hn, r, gu, dw],
                )
            }
        };
        x = b.g.add(
            format!("L{i}.mlp_residual"),
            Op::Add,
            TensorType::act(h),
            &[x, m],
        );
        if opts.capture_layers.contains(&i) {
            b.g.add(
                format!("hidden.{i}"),
                Op::Output {
                    name: format!("hidden.{i}"),
                },
                TensorType::act(h),
                &[x],
            );
        }
    }
    let nw = b.small("model.norm.weight", WeightClass::Norm, &[h]);
    let xn = b.g.add(
        "final_norm",
        Op::RmsNorm { eps: cfg.eps },
        TensorType::act(h),
        &[x, nw],
    );
    let head = if cfg.tie_embeddings {
        emb
    } else {
        b.tensor("lm_head.weight", WeightClass::LmHead, &[cfg.vocab, h])
    };
    let logits = b.g.add(
        "lm_head",
        Op::LmHead { norm_eps: None },
        TensorType::act(cfg.vocab),
        &[xn, head],
    );
    b.g.add(
        "logits",
        Op::Output {
            name: "logits".into(),
        },
        TensorType::act(cfg.vocab),
        &[logits],
    );
    let meta = vec![
        ("arch".to_string(), cfg.arch.model_type().to_string()),
        ("layers".to_string(), cfg.n_layers().to_string()),
        ("hidden".to_string(), h.to_string()),
        ("vocab".to_string(), cfg.vocab.to_string()),
    ];
    b.g.meta = meta;
    b.g
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_flash_graph_verifies() {
        let cfg =
            ModelConfig::from_json_str(r#"{"model_type":"mimo_v2_flash","num_hidden_layers":6}"#)
                .unwrap();
        let g = build_graph(&cfg, &BuildOptions::default());
        g.verify().unwrap();
        let t = g.to_text();
        assert!(
            t.contains("attention{L1, heads=64/8, dims=192/128, window=128"),
            "{}",
            &t[..2000]
        );
        assert!(t.contains("router{experts=256, top_k=8"));
    }

    #[test]
    fn dense_graph_verifies() {
        let cfg = ModelConfig::from_json_str(
            r#"{"model_type":"mimo","hidden_size":64,"num_hidden_layers":2,"num_attention_heads":4,
            "num_key_value_heads":2,"intermediate_size":128,"vocab_size":100}"#,
        )
        .unwrap();
        let g = build_graph(
            &cfg,
            &BuildOptions {
                capture_layers: vec![0],
                ..Default::default()
            },
        );
        g.verify().unwrap();
        assert!(g.find_output("hidden.0").is_some());
    }
}
