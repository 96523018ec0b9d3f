//! An independent reference forward pass of the MiMo family, written straight from the config.
//!
//! It uses only [`ModelConfig`] and [`Checkpoint::read_f32`]: no IR, no plan, no compiler, no runtime kernels.
//! Everything is plain loops in f64 over the checkpoint's f32 values, recomputing the whole sequence on every
//! call (no KV cache), so it is slow but obviously correct.

use mimo_models::checkpoint::{Checkpoint, ExpertLayout};
use mimo_models::config::{AttnLayer, MlpLayer, ModelConfig, MoeLayer};

/// A row-major matrix `[rows, cols]`.
struct Mat {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
}

impl Mat {
    fn new(rows: usize, cols: usize, data: Vec<f32>) -> Mat {
        assert_eq!(data.len(), rows * cols, "matrix data length");
        Mat { rows, cols, data }
    }

    fn load(ck: &Checkpoint, name: &str) -> Mat {
        let shape = ck
            .shape(name)
            .unwrap_or_else(|| panic!("reference: tensor {name} missing"));
        assert_eq!(shape.len(), 2, "{name}: expected 2-D, got {shape:?}");
        let data = ck.read_f32(name).expect("read_f32");
        Mat::new(shape[0], shape[1], data)
    }

    fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }

    /// `W x` (+ bias).
    fn apply(&self, x: &[f64], bias: Option<&[f32]>) -> Vec<f64> {
        assert_eq!(x.len(), self.cols, "matvec width");
        (0..self.rows)
            .map(|r| {
                let mut s = 0f64;
                for (w, v) in self.row(r).iter().zip(x) {
                    s += *w as f64 * v;
                }
                s + bias.map(|b| b[r] as f64).unwrap_or(0.0)
            })
            .collect()
    }
}

struct Attn {
    spec: AttnLayer,
    q: Mat,
    k: Mat,
    v: Mat,
    o: Mat,
    q_bias: Option<Vec<f32>>,
    k_bias: Option<Vec<f32>>,
    v_bias: Option<Vec<f32>>,
    sinks: Option<Vec<f32>>,
}

struct Expert {
    gate: Mat,
    up: Mat,
    down: Mat,
}

enum Mlp {
    Dense(Expert),
    Moe {
        spec: MoeLayer,
        router: Mat,
        bias: Vec<f32>,
        experts: Vec<Expert>,
    },
}

struct Layer {
    input_norm: Vec<f32>,
    post_norm: Vec<f32>,
    attn: Attn,
    mlp: Mlp,
}

/// The reference model: all weights as f32.
pub struct Reference {
    pub config: ModelConfig,
    embed: Mat,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: Mat,
}

fn vec_of(ck: &Checkpoint, name: &str) -> Vec<f32> {
    ck.read_f32(name)
        .unwrap_or_else(|e| panic!("reference: reading {name}: {e:#}"))
}

fn rmsnorm(x: &[f64], w: &[f32], eps: f32) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps as f64).sqrt();
    x.iter().zip(w).map(|(v, g)| v * r * *g as f64).collect()
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Rotate-half RoPE on the first `rotary_dim` dims of each `head_dim` head; the rest pass through.
fn rope(x: &mut [f64], pos: usize, theta: f64, head_dim: usize, rotary_dim: usize) {
    let half = rotary_dim / 2;
    for head in x.chunks_mut(head_dim) {
        for i in 0..half {
            let inv_freq = theta.powf(-(2.0 * i as f64) / rotary_dim as f64);
            let ang = pos as f64 * inv_freq;
            let (s, c) = ang.sin_cos();
            let (a, b) = (head[i], head[i + half]);
            head[i] = a * c - b * s;
            head[i + half] = b * c + a * s;
        }
    }
}

impl Expert {
    fn apply(&self, x: &[f64]) -> Vec<f64> {
        let g = self.gate.apply(x, None);
        let u = self.up.apply(x, None);
        let h: Vec<f64> = g.iter().zip(&u).map(|(a, b)| silu(*a) * b).collect();
        self.down.apply(&h, None)
    }
}

/// DeepSeek-V3-style routing: returns `(expert, weight)` pairs.
fn route(spec: &MoeLayer, router: &Mat, bias: &[f32], x: &[f64]) -> Vec<(usize, f64)> {
    let e = spec.n_experts;
    // router logits in f32 as the model does (inputs are already the f32-valued activations)
    let logits = router.apply(x, None);
    let scores: Vec<f64> = logits.iter().map(|l| sigmoid(*l)).collect();
    let choice: Vec<f64> = scores
        .iter()
        .zip(bias)
        .map(|(s, b)| s + *b as f64)
        .collect();
    let per = e / spec.n_group;
    let mut group_scores: Vec<(f64, usize)> = (0..spec.n_group)
        .map(|g| {
            let mut v: Vec<f64> = choice[g * per..(g + 1) * per].to_vec();
            v.sort_by(|a, b| b.total_cmp(a));
            (v.iter().take(2).sum(), g)
        })
        .collect();
    group_scores.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let kept: Vec<usize> = group_scores
        .iter()
        .take(spec.topk_group)
        .map(|g| g.1)
        .collect();
    let mut cand: Vec<usize> = (0..e).filter(|i| kept.contains(&(i / per))).collect();
    cand.sort_by(|&a, &b| choice[b].total_cmp(&choice[a]).then(a.cmp(&b)));
    let chosen = &cand[..spec.top_k];
    let mut w: Vec<f64> = chosen.iter().map(|&i| scores[i]).collect();
    if spec.norm_topk_prob {
        let s: f64 = w.iter().sum::<f64>() + 1e-20;
        w.iter_mut().for_each(|v| *v /= s);
    }
    w.iter_mut().for_each(|v| *v *= spec.scaling as f64);
    chosen.iter().copied().zip(w).collect()
}

impl Reference {
    pub fn new(ck: &Checkpoint) -> Reference {
        let cfg = ck.config.clone();
        let embed = Mat::load(ck, "model.embed_tokens.weight");
        let lm_head = if cfg.tie_embeddings {
            Mat::load(ck, "model.embed_tokens.weight")
        } else {
            Mat::load(ck, "lm_head.weight")
        };
        let mut layers = Vec::new();
        for (i, spec) in cfg.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &spec.attn;
            let bias = |w: &str| {
                a.qkv_bias
                    .then(|| vec_of(ck, &format!("{p}.self_attn.{w}_proj.bias")))
            };
            let attn = Attn {
                spec: a.clone(),
                q: Mat::load(ck, &format!("{p}.self_attn.q_proj.weight")),
                k: Mat::load(ck, &format!("{p}.self_attn.k_proj.weight")),
                v: Mat::load(ck, &format!("{p}.self_attn.v_proj.weight")),
                o: Mat::load(ck, &format!("{p}.self_attn.o_proj.weight")),
                q_bias: bias("q"),
                k_bias: bias("k"),
                v_bias: bias("v"),
                sinks: a.sinks.then(|| vec_of(ck, &format!("{p}.self_attn.sinks"))),
            };
            let mlp = match &spec.mlp {
                MlpLayer::Dense { .. } => Mlp::Dense(Expert {
                    gate: Mat::load(ck, &format!("{p}.mlp.gate_proj.weight")),
                    up: Mat::load(ck, &format!("{p}.mlp.up_proj.weight")),
                    down: Mat::load(ck, &format!("{p}.mlp.down_proj.weight")),
                }),
                MlpLayer::Moe(m) => {
                    let x = format!("{p}.mlp.experts");
                    let (h, inter) = (cfg.hidden, m.inter);
                    let experts: Vec<Expert> = match ck.expert_layout {
                        ExpertLayout::PerExpert => (0..m.n_experts)
                            .map(|e| Expert {
                                gate: Mat::load(ck, &format!("{x}.{e}.gate_proj.weight")),
                                up: Mat::load(ck, &format!("{x}.{e}.up_proj.weight")),
                                down: Mat::load(ck, &format!("{x}.{e}.down_proj.weight")),
                            })
                            .collect(),
                        ExpertLayout::Fused => {
                            let gu = vec_of(ck, &format!("{x}.gate_up_proj"));
                            let dn = vec_of(ck, &format!("{x}.down_proj"));
                            assert_eq!(gu.len(), m.n_experts * 2 * inter * h);
                            assert_eq!(dn.len(), m.n_experts * h * inter);
                            (0..m.n_experts)
                                .map(|e| {
                                    let base = &gu[e * 2 * inter * h..(e + 1) * 2 * inter * h];
                                    Expert {
                                        gate: Mat::new(inter, h, base[..inter * h].to_vec()),
                                        up: Mat::new(inter, h, base[inter * h..].to_vec()),
                                        down: Mat::new(
                                            h,
                                            inter,
                                            dn[e * h * inter..(e + 1) * h * inter].to_vec(),
                                        ),
                                    }
                                })
                                .collect()
                        }
                        ExpertLayout::Mxfp4 => {
                            panic!("reference: MXFP4 checkpoints are not supported")
                        }
                    };
                    Mlp::Moe {
                        spec: m.clone(),
                        router: Mat::load(ck, &format!("{p}.mlp.gate.weight")),
                        bias: vec_of(ck, &format!("{p}.mlp.gate.e_score_correction_bias")),
                        experts,
                    }
                }
            };
            layers.push(Layer {
                input_norm: vec_of(ck, &format!("{p}.input_layernorm.weight")),
                post_norm: vec_of(ck, &format!("{p}.post_attention_layernorm.weight")),
                attn,
                mlp,
            });
        }
        Reference {
            embed,
            layers,
            norm: vec_of(ck, "model.norm.weight"),
            lm_head,
            config: cfg,
        }
    }

    /// Logits of every position of `tokens` (positions `0..n`), computed from scratch.
    pub fn forward(&mut self, tokens: &[u32]) -> Vec<Vec<f32>> {
        let eps = self.config.eps;
        let mut hs: Vec<Vec<f64>> = tokens
            .iter()
            .map(|&t| {
                self.embed
                    .row(t as usize)
                    .iter()
                    .map(|v| *v as f64)
                    .collect()
            })
            .collect();
        for layer in &self.layers {
            let normed: Vec<Vec<f64>> = hs
                .iter()
                .map(|h| rmsnorm(h, &layer.input_norm, eps))
                .collect();
            let attn_out = attention(&layer.attn, &normed);
            for (h, a) in hs.iter_mut().zip(&attn_out) {
                h.iter_mut().zip(a).for_each(|(x, y)| *x += y);
            }
            for h in hs.iter_mut() {
                let x = rmsnorm(h, &layer.post_norm, eps);
                let y = match &layer.mlp {
                    Mlp::Dense(d) => d.apply(&x),
                    Mlp::Moe {
                        spec,
                        router,
                        bias,
                        experts,
                    } => {
                        let mut acc = vec![0f64; x.len()];
                        for (e, w) in route(spec, router, bias, &x) {
                            let o = experts[e].apply(&x);
                            acc.iter_mut().zip(&o).for_each(|(a, b)| *a += w * b);
                        }
                        acc
                    }
                };
                h.iter_mut().zip(&y).for_each(|(a, b)| *a += b);
            }
        }
        hs.iter()
            .map(|h| {
                let x = rmsnorm(h, &self.norm, eps);
                self.lm_head
                    .apply(&x, None)
                    .into_iter()
                    .map(|v| v as f32)
                    .collect()
            })
            .collect()
    }
}

/// Causal (optionally sliding-window, optionally sink) GQA attention over the whole sequence, then o_proj.
fn attention(a: &Attn, xs: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let s = &a.spec;
    let (hd, vd) = (s.head_dim, s.v_head_dim);
    let theta = s.rope.theta as f64;
    let rd = s.rope.rotary_dim;
    let mut qs = Vec::new();
    let mut ks = Vec::new();
    let mut vs = Vec::new();
    for (pos, x) in xs.iter().enumerate() {
        let mut q = a.q.apply(x, a.q_bias.as_deref());
        let mut k = a.k.apply(x, a.k_bias.as_deref());
        let mut v = a.v.apply(x, a.v_bias.as_deref());
        assert_eq!(q.len(), s.n_heads * hd);
        assert_eq!(k.len(), s.n_kv_heads * hd);
        assert_eq!(v.len(), s.n_kv_heads * vd);
        if let Some(vs) = s.v_scale {
            v.iter_mut().for_each(|x| *x *= vs as f64);
        }
        rope(&mut q, pos, theta, hd, rd);
        rope(&mut k, pos, theta, hd, rd);
        qs.push(q);
        ks.push(k);
        vs.push(v);
    }
    let group = s.n_heads / s.n_kv_heads;
    let scale = (hd as f64).powf(-0.5);
    (0..xs.len())
        .map(|p| {
            let mut out = vec![0f64; s.n_heads * vd];
            for h in 0..s.n_heads {
                let kvh = h / group;
                let qh = &qs[p][h * hd..(h + 1) * hd];
                let visible: Vec<usize> = (0..=p)
                    .filter(|&j| s.window.is_none_or(|w| p - j < w))
                    .collect();
                let mut logits: Vec<f64> = visible
                    .iter()
                    .map(|&j| {
                        let kh = &ks[j][kvh * hd..(kvh + 1) * hd];
                        qh.iter().zip(kh).map(|(x, y)| x * y).sum::<f64>() * scale
                    })
                    .collect();
                if let Some(sk) = &a.sinks {
                    logits.push(sk[h] as f64);
                }
                let mx = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let ex: Vec<f64> = logits.iter().map(|l| (l - mx).exp()).collect();
                let den: f64 = ex.iter().sum();
                // the sink column (if any) is the last one and is dropped
                for (i, &j) in visible.iter().enumerate() {
                    let pj = ex[i] / den;
                    let vh = &vs[j][kvh * vd..(kvh + 1) * vd];
                    for (o, v) in out[h * vd..(h + 1) * vd].iter_mut().zip(vh) {
                        *o += pj * v;
                    }
                }
            }
            a.o.apply(&out, None)
        })
        .collect()
}
