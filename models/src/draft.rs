//! The DFlash block-diffusion draft: its `config.json` in the public layout, its weights, the tiny random draft,
//! and the IR graphs of its two programs.
//!
//! # What a DFlash draft is
//!
//! A small stack of Qwen3-style decoder layers (q_norm / k_norm per head, SwiGLU MLP, no biases) that fills a
//! whole block of masked positions in ONE forward, conditioned on hidden states of the target:
//!
//! - the target's output hidden states of `target_layer_ids` are concatenated per token (`[T, n * H]`),
//!   projected by `fc` (`[H, n * H]`, no bias) and normalized by `hidden_norm`: the *context features*;
//! - in every draft layer the context features are projected by that layer's own `k_proj` / `v_proj` (then
//!   `k_norm` and RoPE at the context tokens' positions): they are extra keys / values of the layer, never
//!   queries, and they do not flow through the layer stack;
//! - the block is `[last accepted token, mask, mask, ...]` at positions `s .. s+B`, embedded with the TARGET's
//!   embedding table (shared, frozen); its queries attend to the context keys and to all block keys without a
//!   causal mask (bidirectional inside the block);
//! - after the final `norm`, the TARGET's LM head gives logits; block position `i >= 1` predicts the token AT
//!   position `s+i` (the first block position is known and is not predicted).
//!
//! # Our deviation: sliding-window context
//!
//! The draft attends only to the last `window` context positions before the block (default 64), so its KV cache
//! is a ring of `window + max_tokens` slots and its cost per round is constant in the context length.
//!
//! # Program structure
//!
//! Two entry points of the plan (the megakernel runs one program per launch, so the draft forward and the target
//! verify forward are two entry points of one kernel rather than one fused round: the round's control flow —
//! sampling the guesses, comparing them with the target, choosing how many tokens to keep — sits between the
//! draft and the verify and between the verify and the next context update, and it is cheap on the host):
//!
//! - `draft_ctx`: input `hidden_in` (`[T, n * H]`: the target features of T newly accepted tokens at positions
//!   `p .. p+T`) -> `fc` -> `hidden_norm` -> per draft layer `k_norm(k_proj(.))` + RoPE and `v_proj(.)`, written
//!   into the draft layer's KV cache at those positions. No logits: the program's only effect is the cache.
//! - `draft_block`: tokens `[last, mask, ...]` at positions `s .. s+B` -> shared embedding -> draft layers whose
//!   `BlockAttention` sees the cached context window `[s - window, s)` plus all block positions -> `norm` ->
//!   shared LM head -> logits `[B, V]`. The block's own K/V rows land in the cache at positions `>= s`; they
//!   are never read as context: the next `draft_ctx` overwrites them with the accepted tokens' features before
//!   the next block reads them.
//!
//! Splitting context and block lets each accepted token's features enter the cache exactly once (the block
//! program's cost depends only on B and the window), and keeps every program's rows one kind of token.

use crate::config::ModelConfig;
use anyhow::{anyhow, bail, Context, Result};
use memmap2::Mmap;
use mimo_ir::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Default sliding window of the draft's context attention (ours; published drafts attend to all context).
pub const DEFAULT_WINDOW: usize = 64;

/// Prefix of weight sources that name a tensor of the draft checkpoint (not the target's).
pub const DRAFT_SOURCE_PREFIX: &str = "draft:";

/// A DFlash draft's `config.json`, normalised.
#[derive(Clone, Debug, PartialEq)]
pub struct DraftConfig {
    pub hidden: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub inter: usize,
    pub block_size: usize,
    pub mask_token: u32,
    pub target_layers: Vec<usize>,
    pub window: usize,
    pub rope_theta: f32,
    pub eps: f32,
    pub vocab: Option<usize>,
}

fn get<'a>(v: &'a Value, k: &str) -> Option<&'a Value> {
    // `dflash_config.k` wins over a top-level `k`, as the reference loader reads them.
    v.get("dflash_config")
        .and_then(|d| d.get(k))
        .filter(|x| !x.is_null())
        .or_else(|| v.get(k).filter(|x| !x.is_null()))
}

fn uint(v: &Value, k: &str) -> Result<Option<usize>> {
    match get(v, k) {
        None => Ok(None),
        Some(x) => {
            let n = x.as_u64().ok_or_else(|| {
                anyhow!("draft config field `{k}`: expected a non-negative integer, got {x}")
            })?;
            if n == 0 {
                bail!("draft config field `{k}` must be positive, got 0");
            }
            Ok(Some(usize::try_from(n).map_err(|_| {
                anyhow!("draft config field `{k}`: {n} is too large")
            })?))
        }
    }
}

fn need(v: &Value, k: &str) -> Result<usize> {
    uint(v, k)?.ok_or_else(|| anyhow!("draft config field `{k}` is missing"))
}

fn num(v: &Value, k: &str) -> Result<Option<f64>> {
    match get(v, k) {
        None => Ok(None),
        Some(x) => {
            let f = x
                .as_f64()
                .filter(|f| f.is_finite())
                .ok_or_else(|| anyhow!("draft config field `{k}`: expected a number, got {x}"))?;
            Ok(Some(f))
        }
    }
}

impl DraftConfig {
    pub fn from_file(path: &Path) -> Result<DraftConfig> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_json_str(&text).with_context(|| format!("in {}", path.display()))
    }

    pub fn from_json_str(text: &str) -> Result<DraftConfig> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| anyhow!("draft config.json is not valid JSON: {e}"))?;
        if !v.is_object() {
            bail!("draft config.json must be a JSON object");
        }
        if let Some(a) = v.get("architectures").and_then(|a| a.as_array()) {
            if a.iter().any(|x| x.as_str() == Some("DFlash2DraftModel")) {
                bail!("draft config field `architectures`: DFlash2DraftModel (convolutions, candidate selector) is not supported; only DFlashDraftModel drafts are");
            }
        }
        for k in [
            "output_multiplier",
            "input_embedding_scale",
            "final_logit_softcapping",
        ] {
            if let Some(x) = num(&v, k)? {
                let scale = k != "final_logit_softcapping";
                if (scale && x != 1.0) || (!scale && x > 0.0) {
                    bail!("draft config field `{k}` = {x} is not supported");
                }
            }
        }
        if let Some(act) = v.get("hidden_act").and_then(|x| x.as_str()) {
            if act != "silu" {
                bail!("draft config field `hidden_act`: only \"silu\" is supported, got {act:?}");
            }
        }
        if v.get("attention_bias").and_then(|x| x.as_bool()) == Some(true) {
            bail!("draft config field `attention_bias`: true is not supported (DFlash drafts have no biases)");
        }
        let hidden = need(&v, "hidden_size")?;
        let n_heads = need(&v, "num_attention_heads")?;
        let n_kv_heads = uint(&v, "num_key_value_heads")?.unwrap_or(n_heads);
        if n_heads % n_kv_heads != 0 {
            bail!("draft config fields `num_attention_heads` {n_heads} must be a multiple of `num_key_value_heads` {n_kv_heads}");
        }
        let head_dim = match uint(&v, "head_dim")? {
            Some(d) => d,
            None if hidden % n_heads == 0 => hidden / n_heads,
            None => bail!("draft config field `head_dim` is missing and hidden_size {hidden} is not a multiple of num_attention_heads {n_heads}"),
        };
        if head_dim % 2 != 0 {
            bail!("draft config field `head_dim` must be even (RoPE), got {head_dim}");
        }
        let mask = need(&v, "mask_token_id")?;
        let mask_token = u32::try_from(mask)
            .map_err(|_| anyhow!("draft config field `mask_token_id`: {mask} is too large"))?;
        let target_layers: Vec<usize> = match get(&v, "target_layer_ids") {
            Some(Value::Array(a)) if !a.is_empty() => a
                .iter()
                .map(|x| {
                    x.as_u64().map(|n| n as usize).ok_or_else(|| {
                        anyhow!("draft config field `target_layer_ids`: bad layer id {x}")
                    })
                })
                .collect::<Result<_>>()?,
            Some(x) => bail!("draft config field `target_layer_ids`: expected a non-empty list of layer ids, got {x}"),
            None => bail!("draft config field `target_layer_ids` (in `dflash_config`) is missing"),
        };
        let rope_theta = match num(&v, "rope_theta")? {
            Some(t) => t,
            None => v
                .get("rope_parameters")
                .and_then(|r| r.get("rope_theta"))
                .and_then(|t| t.as_f64())
                .unwrap_or(1_000_000.0),
        };
        let window = match get(&v, "sliding_window") {
            Some(x) if x.is_u64() => need(&v, "sliding_window")?,
            Some(x) => bail!(
                "draft config field `sliding_window`: expected a positive integer or null, got {x}"
            ),
            None => DEFAULT_WINDOW,
        };
        Ok(DraftConfig {
            hidden,
            n_layers: need(&v, "num_hidden_layers")?,
            n_heads,
            n_kv_heads,
            head_dim,
            inter: need(&v, "intermediate_size")?,
            block_size: uint(&v, "block_size")?.unwrap_or(16),
            mask_token,
            target_layers,
            window,
            rope_theta: rope_theta as f32,
            eps: num(&v, "rms_norm_eps")?.unwrap_or(1e-6) as f32,
            vocab: uint(&v, "vocab_size")?,
        })
    }

    /// Check the draft against the target it is paired with.
    pub fn check_against(&self, target: &ModelConfig) -> Result<()> {
        if self.hidden != target.hidden {
            bail!(
                "draft hidden_size {} != the target's hidden_size {}",
                self.hidden,
                target.hidden
            );
        }
        if let Some(v) = self.vocab {
            if v != target.vocab {
                bail!(
                    "draft vocab_size {v} != the target's vocab_size {}",
                    target.vocab
                );
            }
        }
        if self.mask_token as usize >= target.vocab {
            bail!(
                "draft mask_token_id {} is outside the target's vocabulary ({})",
                self.mask_token,
                target.vocab
            );
        }
        for &l in &self.target_layers {
            if l >= target.n_layers() {
                bail!(
                    "draft target_layer_ids has layer {l}, the target has {} layers",
                    target.n_layers()
                );
            }
        }
        Ok(())
    }

    /// Every tensor of the draft checkpoint, with its shape (public DFlash layout).
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden;
        let (q, kv) = (
            self.n_heads * self.head_dim,
            self.n_kv_heads * self.head_dim,
        );
        let mut out = vec![
            (
                "fc.weight".to_string(),
                vec![h, self.target_layers.len() * h],
            ),
            ("hidden_norm.weight".to_string(), vec![h]),
        ];
        for i in 0..self.n_layers {
            let p = format!("layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
            out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
            out.push((format!("{p}.self_attn.q_norm.weight"), vec![self.head_dim]));
            out.push((format!("{p}.self_attn.k_norm.weight"), vec![self.head_dim]));
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![self.inter, h]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![self.inter, h]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, self.inter]));
        }
        out.push(("norm.weight".to_string(), vec![h]));
        out
    }
}

struct Entry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// An opened, validated draft checkpoint directory (`config.json` + `model.safetensors` or an index + shards).
pub struct DraftCheckpoint {
    pub dir: PathBuf,
    pub config: DraftConfig,
    maps: Vec<Mmap>,
    tensors: HashMap<String, Entry>,
}

impl DraftCheckpoint {
    pub fn open(dir: &Path) -> Result<DraftCheckpoint> {
        if !dir.is_dir() {
            bail!(
                "draft directory {} does not exist or is not a directory",
                dir.display()
            );
        }
        let config = DraftConfig::from_file(&dir.join("config.json"))?;
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<String> = if index.is_file() {
            let v: Value = serde_json::from_str(
                &std::fs::read_to_string(&index)
                    .with_context(|| format!("reading {}", index.display()))?,
            )
            .map_err(|e| anyhow!("{} is not valid JSON: {e}", index.display()))?;
            let mut f: Vec<String> = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| anyhow!("{} has no `weight_map` object", index.display()))?
                .values()
                .filter_map(|x| x.as_str().map(String::from))
                .collect();
            f.sort();
            f.dedup();
            if f.iter().any(|x| x.contains('/') || x.contains("..")) {
                bail!(
                    "{}: weight_map names a file outside the draft directory",
                    index.display()
                );
            }
            f
        } else {
            vec!["model.safetensors".into()]
        };
        let mut maps = vec![];
        let mut tensors = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            let path = dir.join(f);
            let file = std::fs::File::open(&path)
                .with_context(|| format!("opening draft weights {}", path.display()))?;
            // SAFETY: read-only map of a checkpoint file that is not modified while loaded.
            let mmap = unsafe { Mmap::map(&file) }
                .with_context(|| format!("memory-mapping {}", path.display()))?;
            let (n, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| {
                anyhow!(
                    "{} is not a valid safetensors file (truncated or corrupt): {e}",
                    path.display()
                )
            })?;
            for (name, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                tensors.insert(
                    name,
                    Entry {
                        shard: i,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start: 8 + n + s,
                        end: 8 + n + e,
                    },
                );
            }
            maps.push(mmap);
        }
        let ck = DraftCheckpoint {
            dir: dir.to_path_buf(),
            config,
            maps,
            tensors,
        };
        for (name, shape) in ck.config.expected_tensors() {
            let Some(e) = ck.tensors.get(&name) else {
                bail!("draft tensor {name} is missing from {}", dir.display());
            };
            if e.shape != shape {
                bail!(
                    "draft tensor {name}: shape {:?} expected {:?}",
                    e.shape,
                    shape
                );
            }
            if !matches!(e.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
                bail!(
                    "draft tensor {name}: unsupported dtype {} (expected BF16, F16 or F32)",
                    e.dtype
                );
            }
        }
        Ok(ck)
    }

    /// A tensor's values as f32.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let e = self
            .tensors
            .get(name)
            .ok_or_else(|| anyhow!("draft tensor {name} is not in the checkpoint"))?;
        let b = self.maps[e.shard]
            .get(e.start..e.end)
            .ok_or_else(|| anyhow!("draft tensor {name}: byte range outside its file"))?;
        Ok(match e.dtype {
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|x| f32::from_le_bytes([x[0], x[1], x[2], x[3]]))
                .collect(),
            Dtype::BF16 => b
                .chunks_exact(2)
                .map(|x| half::bf16::from_le_bytes([x[0], x[1]]).to_f32())
                .collect(),
            Dtype::F16 => b
                .chunks_exact(2)
                .map(|x| half::f16::from_le_bytes([x[0], x[1]]).to_f32())
                .collect(),
            other => bail!("draft tensor {name}: unsupported dtype {other}"),
        })
    }
}

/// The config of the tiny random draft paired with a tiny target of `target` (same hidden size and vocabulary).
pub fn tiny_draft_config_json(target: &ModelConfig) -> Value {
    let n = target.n_layers();
    let k = n.min(2);
    let layers: Vec<usize> = (0..k).map(|i| (i + 1) * n / (k + 1)).collect();
    json!({
        "architectures": ["DFlashDraftModel"],
        "model_type": "qwen3",
        "hidden_size": target.hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 2 * target.hidden,
        "hidden_act": "silu",
        "attention_bias": false,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "vocab_size": target.vocab,
        "num_target_layers": n,
        "block_size": 16,
        "sliding_window": 16,
        "use_sliding_window": true,
        "tie_word_embeddings": false,
        "torch_dtype": "bfloat16",
        "dflash_config": {
            "mask_token_id": target.vocab - 1,
            "target_layer_ids": layers
        }
    })
}

/// Write a random tiny draft in the public layout into `<target_dir>/draft/` (config.json + model.safetensors).
pub fn make_tiny_draft(target_dir: &Path, seed: u64) -> Result<PathBuf> {
    let target = ModelConfig::from_file(&target_dir.join("config.json"))?;
    let dir = target_dir.join("draft");
    if dir.exists() {
        bail!("{} already exists", dir.display());
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let cfg_json = tiny_draft_config_json(&target);
    let cfg = DraftConfig::from_json_str(&cfg_json.to_string())?;
    cfg.check_against(&target)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xD4AF7);
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = cfg
        .expected_tensors()
        .into_iter()
        .map(|(name, shape)| {
            let (mean, std) = if name.ends_with("norm.weight") {
                (1.0f32, 0.1f32)
            } else {
                (0.0, 0.8 / (*shape.last().unwrap_or(&1) as f32).sqrt())
            };
            let n: usize = shape.iter().product();
            let bytes: Vec<u8> = (0..n)
                .flat_map(|_| {
                    let z: f32 = rng.sample(StandardNormal);
                    half::bf16::from_f32(mean + std * z).to_le_bytes()
                })
                .collect();
            (name, shape, bytes)
        })
        .collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| {
            TensorView::new(Dtype::BF16, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| anyhow!("tensor {n}: {e}"))
        })
        .collect::<Result<_>>()?;
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let bytes = safetensors::serialize(views.iter().map(|(n, v)| (n.as_str(), v)), Some(meta))
        .map_err(|e| anyhow!("serializing the draft: {e}"))?;
    std::fs::write(dir.join("model.safetensors"), bytes)
        .with_context(|| format!("writing {}", dir.display()))?;
    let mut text = serde_json::to_string_pretty(&cfg_json)?;
    text.push('\n');
    std::fs::write(dir.join("config.json"), text)
        .with_context(|| format!("writing {}", dir.display()))?;
    Ok(dir)
}

/// The draft's two graphs.
pub struct DraftGraphs {
    pub ctx: Graph,
    pub block: Graph,
}

struct Db<'a> {
    g: Graph,
    cfg: &'a DraftConfig,
    base: DType,
    pos: NodeId,
}

impl Db<'_> {
    fn new<'a>(cfg: &'a DraftConfig, base: DType) -> Db<'a> {
        let mut g = Graph::new();
        let pos = g.add(
            "positions",
            Op::Input {
                name: "positions".into(),
            },
            TensorType::new(DType::I32, vec![Dim::T]),
            &[],
        );
        Db { g, cfg, base, pos }
    }

    /// A weight of the draft checkpoint (`draft.` in the plan, `draft:` as a source).
    fn w(&mut self, tensor: &str, dims: &[usize]) -> NodeId {
        let dtype = if dims.len() == 1 {
            DType::F32
        } else {
            self.base
        };
        let name = format!("draft.{tensor}");
        let op = Op::Weight {
            name: name.clone(),
            source: WeightSource::Tensor(format!("{DRAFT_SOURCE_PREFIX}{tensor}")),
            class: WeightClass::Draft,
        };
        self.g.add(name, op, TensorType::fixed(dtype, dims), &[])
    }

    fn mm(&mut self, name: String, x: NodeId, w: NodeId, n: usize) -> NodeId {
        let op = Op::MatMul {
            has_bias: false,
            norm_eps: None,
            epilogue: vec![],
        };
        self.g.add(name, op, TensorType::act(n), &[x, w])
    }

    fn norm(&mut self, name: String, x: NodeId, w: NodeId, width: usize) -> NodeId {
        let op = Op::RmsNorm { eps: self.cfg.eps };
        self.g.add(name, op, TensorType::act(width), &[x, w])
    }

    fn rope(&self) -> RopeSpec {
        RopeSpec {
            theta: self.cfg.rope_theta,
            head_dim: self.cfg.head_dim,
            rotary_dim: self.cfg.head_dim,
        }
    }

    /// `k_norm(k_proj(x))` + RoPE and `v_proj(x)` of layer `i`, written into cache layer `layer`.
    fn kv(&mut self, i: usize, layer: usize, x: NodeId) -> (NodeId, NodeId) {
        let c = self.cfg;
        let h = c.hidden;
        let kn = c.n_kv_heads * c.head_dim;
        let p = format!("layers.{i}.self_attn");
        let kw = self.w(&format!("{p}.k_proj.weight"), &[kn, h]);
        let k = self.mm(format!("D{i}.k"), x, kw, kn);
        let knw = self.w(&format!("{p}.k_norm.weight"), &[c.head_dim]);
        let k = self.g.add(
            format!("D{i}.k_norm"),
            Op::HeadRmsNorm {
                eps: c.eps,
                head_dim: c.head_dim,
            },
            TensorType::act(kn),
            &[k, knw],
        );
        let spec = self.rope();
        let pos = self.pos;
        let k = self.g.add(
            format!("D{i}.k_rope"),
            Op::Rope { spec },
            TensorType::act(kn),
            &[k, pos],
        );
        let vw = self.w(&format!("{p}.v_proj.weight"), &[kn, h]);
        let v = self.mm(format!("D{i}.v"), x, vw, kn);
        let cache = TensorType::fixed(DType::Cache, &[c.n_kv_heads, c.head_dim]);
        let kv = |kind| Op::KvWrite {
            layer,
            kind,
            heads: c.n_kv_heads,
            head_dim: c.head_dim,
        };
        let kc = self.g.add(
            format!("D{i}.k_cache"),
            kv(KvKind::K),
            cache.clone(),
            &[k, pos],
        );
        let vc = self
            .g
            .add(format!("D{i}.v_cache"), kv(KvKind::V), cache, &[v, pos]);
        (kc, vc)
    }
}

/// Options of the draft builder.
#[derive(Clone, Debug)]
pub struct DraftBuild {
    /// KV-cache layer id of draft layer 0 (the target's layer count: draft caches come after the target's).
    pub kv_base: usize,
    /// Packed dtype of the draft's projections (bf16).
    pub base_dtype: DType,
}

/// Build the `draft_ctx` and `draft_block` graphs of a draft paired with `target`.
pub fn build_draft_graphs(
    cfg: &DraftConfig,
    target: &ModelConfig,
    opts: &DraftBuild,
) -> DraftGraphs {
    let h = cfg.hidden;
    let nsel = cfg.target_layers.len();

    // draft_ctx: hidden_in -> fc -> hidden_norm -> per layer K/V into the cache.
    let mut b = Db::new(cfg, opts.base_dtype);
    let hin = b.g.add(
        "hidden_in",
        Op::Input {
            name: "hidden_in".into(),
        },
        TensorType::act(nsel * h),
        &[],
    );
    let fcw = b.w("fc.weight", &[h, nsel * h]);
    let f = b.mm("fc".into(), hin, fcw, h);
    let hnw = b.w("hidden_norm.weight", &[h]);
    let ctx = b.norm("hidden_norm".into(), f, hnw, h);
    for i in 0..cfg.n_layers {
        let (kc, vc) = b.kv(i, opts.kv_base + i, ctx);
        for (c, kind) in [(kc, "k"), (vc, "v")] {
            let ty = b.g.node(c).ty.clone();
            b.g.add(
                format!("ctx.D{i}.{kind}"),
                Op::Output {
                    name: format!("kv.D{i}.{kind}"),
                },
                ty,
                &[c],
            );
        }
    }
    b.g.meta = vec![
        ("program".into(), "draft_ctx".into()),
        ("draft_layers".into(), cfg.n_layers.to_string()),
        ("target_layers".into(), format!("{:?}", cfg.target_layers)),
    ];
    let ctx_g = b.g;

    // draft_block: shared embedding -> draft layers (block attention) -> norm -> shared LM head.
    let mut b = Db::new(cfg, opts.base_dtype);
    let tokens = b.g.add(
        "tokens",
        Op::Input {
            name: "tokens".into(),
        },
        TensorType::new(DType::I32, vec![Dim::T]),
        &[],
    );
    // The target's own weight nodes (same name, source, class and dtype): packing stores them once.
    let shared = |b: &mut Db, name: &str, class| {
        let op = Op::Weight {
            name: name.to_string(),
            source: WeightSource::Tensor(name.to_string()),
            class,
        };
        b.g.add(
            name,
            op,
            TensorType::fixed(opts.base_dtype, &[target.vocab, h]),
            &[],
        )
    };
    let emb = shared(&mut b, "model.embed_tokens.weight", WeightClass::Embedding);
    let mut x =
        b.g.add("embed", Op::Embedding, TensorType::act(h), &[tokens, emb]);
    let qn = cfg.n_heads * cfg.head_dim;
    for i in 0..cfg.n_layers {
        let p = format!("layers.{i}");
        let nw = b.w(&format!("{p}.input_layernorm.weight"), &[h]);
        let hn = b.norm(format!("D{i}.attn_norm"), x, nw, h);
        let qw = b.w(&format!("{p}.self_attn.q_proj.weight"), &[qn, h]);
        let q = b.mm(format!("D{i}.q"), hn, qw, qn);
        let qnw = b.w(&format!("{p}.self_attn.q_norm.weight"), &[cfg.head_dim]);
        let q = b.g.add(
            format!("D{i}.q_norm"),
            Op::HeadRmsNorm {
                eps: cfg.eps,
                head_dim: cfg.head_dim,
            },
            TensorType::act(qn),
            &[q, qnw],
        );
        let spec = b.rope();
        let pos = b.pos;
        let q = b.g.add(
            format!("D{i}.q_rope"),
            Op::Rope { spec },
            TensorType::act(qn),
            &[q, pos],
        );
        let (kc, vc) = b.kv(i, opts.kv_base + i, hn);
        let spec = AttnSpec {
            layer: opts.kv_base + i,
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
            v_head_dim: cfg.head_dim,
            window: Some(cfg.window),
            scale: 1.0 / (cfg.head_dim as f32).sqrt(),
            sinks: false,
        };
        let a = b.g.add(
            format!("D{i}.attn"),
            Op::BlockAttention { spec },
            TensorType::act(qn),
            &[q, kc, vc],
        );
        let ow = b.w(&format!("{p}.self_attn.o_proj.weight"), &[h, qn]);
        let o = b.mm(format!("D{i}.o"), a, ow, h);
        x = b.g.add(
            format!("D{i}.attn_residual"),
            Op::Add,
            TensorType::act(h),
            &[x, o],
        );
        let nw = b.w(&format!("{p}.post_attention_layernorm.weight"), &[h]);
        let hn = b.norm(format!("D{i}.mlp_norm"), x, nw, h);
        let name = format!("draft.{p}.mlp.gate_up");
        let gu_op = Op::Weight {
            name: name.clone(),
            source: WeightSource::ConcatRows(vec![
                format!("{DRAFT_SOURCE_PREFIX}{p}.mlp.gate_proj.weight"),
                format!("{DRAFT_SOURCE_PREFIX}{p}.mlp.up_proj.weight"),
            ]),
            class: WeightClass::Draft,
        };
        let guw = b.g.add(
            name,
            gu_op,
            TensorType::fixed(opts.base_dtype, &[2 * cfg.inter, h]),
            &[],
        );
        let gu = b.mm(format!("D{i}.gate_up"), hn, guw, 2 * cfg.inter);
        let s = b.g.add(
            format!("D{i}.swiglu"),
            Op::SwiGlu,
            TensorType::act(cfg.inter),
            &[gu],
        );
        let dw = b.w(&format!("{p}.mlp.down_proj.weight"), &[h, cfg.inter]);
        let d = b.mm(format!("D{i}.down"), s, dw, h);
        x = b.g.add(
            format!("D{i}.mlp_residual"),
            Op::Add,
            TensorType::act(h),
            &[x, d],
        );
    }
    let nw = b.w("norm.weight", &[h]);
    let xn = b.norm("final_norm".into(), x, nw, h);
    let head = if target.tie_embeddings {
        emb
    } else {
        shared(&mut b, "lm_head.weight", WeightClass::LmHead)
    };
    let logits = b.g.add(
        "lm_head",
        Op::LmHead { norm_eps: None },
        TensorType::act(target.vocab),
        &[xn, head],
    );
    b.g.add(
        "logits",
        Op::Output {
            name: "logits".into(),
        },
        TensorType::act(target.vocab),
        &[logits],
    );
    b.g.meta = vec![
        ("program".into(), "draft_block".into()),
        ("draft_layers".into(), cfg.n_layers.to_string()),
        ("window".into(), cfg.window.to_string()),
    ];
    DraftGraphs {
        ctx: ctx_g,
        block: b.g,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PUBLIC: &str = r#"{
      "architectures": ["DFlashDraftModel"], "model_type": "qwen3", "block_size": 16,
      "dflash_config": {"mask_token_id": 151669, "target_layer_ids": [1, 9, 17, 25, 33]},
      "hidden_size": 4096, "num_hidden_layers": 5, "num_attention_heads": 32, "num_key_value_heads": 8,
      "head_dim": 128, "intermediate_size": 12288, "rms_norm_eps": 1e-6, "rope_theta": 1000000,
      "vocab_size": 151936, "sliding_window": null, "use_sliding_window": false, "hidden_act": "silu"
    }"#;

    #[test]
    fn parses_public_layout() {
        let c = DraftConfig::from_json_str(PUBLIC).unwrap();
        assert_eq!(c.target_layers, vec![1, 9, 17, 25, 33]);
        assert_eq!(
            (c.mask_token, c.block_size, c.window),
            (151669, 16, DEFAULT_WINDOW)
        );
        assert_eq!((c.n_heads, c.n_kv_heads, c.head_dim), (32, 8, 128));
        let t = c.expected_tensors();
        assert_eq!(t[0], ("fc.weight".into(), vec![4096, 5 * 4096]));
        assert!(t
            .iter()
            .any(|(n, s)| n == "layers.4.self_attn.k_norm.weight" && s == &[128]));
        assert_eq!(t.len(), 2 + 5 * 11 + 1);
    }

    #[test]
    fn errors_name_the_field() {
        let e = DraftConfig::from_json_str(&PUBLIC.replace("\"mask_token_id\": 151669,", ""))
            .unwrap_err();
        assert!(e.to_string().contains("mask_token_id"), "{e}");
        let e =
            DraftConfig::from_json_str(&PUBLIC.replace("[1, 9, 17, 25, 33]", "[]")).unwrap_err();
        assert!(e.to_string().contains("target_layer_ids"), "{e}");
        let e = DraftConfig::from_json_str(
            &PUBLIC.replace("\"num_key_value_heads\": 8", "\"num_key_value_heads\": 5"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("num_key_value_heads"), "{e}");
        let e =
            DraftConfig::from_json_str(&PUBLIC.replace("DFlashDraftModel", "DFlash2DraftModel"))
                .unwrap_err();
        assert!(e.to_string().contains("architectures"), "{e}");
    }

    #[test]
    fn tiny_draft_graphs_verify() {
        let td = tempfile::tempdir().unwrap();
        let dir = td.path().join("t");
        crate::tiny::make_tiny(&dir, &crate::tiny::TinyOptions::default()).unwrap();
        let d = make_tiny_draft(&dir, 1).unwrap();
        let ck = DraftCheckpoint::open(&d).unwrap();
        let target = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        ck.config.check_against(&target).unwrap();
        let g = build_draft_graphs(
            &ck.config,
            &target,
            &DraftBuild {
                kv_base: target.n_layers(),
                base_dtype: DType::BF16,
            },
        );
        g.ctx.verify().unwrap();
        g.block.verify().unwrap();
        assert!(g.block.to_text().contains("block_attention{L4"));
        assert_eq!(ck.read_f32("norm.weight").unwrap().len(), 64);
    }
}
