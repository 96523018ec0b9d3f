//! `config.json` of the MiMo family, normalised into [`ModelConfig`].
//!
//! - MoE generation: `model_type = "mimo_v2_flash"` (`MiMoV2FlashForCausalLM`), field for field as transformers'
//!   `MiMoV2FlashConfig` reads them.
//! - Dense generation: `model_type = "mimo"` (`MiMoForCausalLM`, MiMo-7B): Qwen2-style attention with q/k/v bias,
//!   full RoPE, SwiGLU MLP, plus `num_nextn_predict_layers` MTP layers.
//!
//! Unknown architectures and unsupported values are errors that name the field.

use anyhow::{anyhow, bail, Context, Result};
use mimo_ir::RopeSpec;
use serde_json::Value;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// MiMo-V2-Flash style MoE (`mimo_v2_flash`).
    MimoV2Flash,
    /// MiMo-7B style dense (`mimo`).
    Mimo,
}

impl Arch {
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::MimoV2Flash => "mimo_v2_flash",
            Arch::Mimo => "mimo",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct AttnLayer {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub v_head_dim: usize,
    pub window: Option<usize>,
    pub sinks: bool,
    pub rope: RopeSpec,
    pub qkv_bias: bool,
    /// Multiplier on v (MiMo-V2: `attention_value_scale`).
    pub v_scale: Option<f32>,
    pub scale: f32,
}

#[derive(Clone, Debug, PartialEq)]
pub enum MlpLayer {
    Dense { inter: usize },
    Moe(MoeLayer),
}

#[derive(Clone, Debug, PartialEq)]
pub struct MoeLayer {
    pub n_experts: usize,
    pub top_k: usize,
    pub inter: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub norm_topk_prob: bool,
    pub scaling: f32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LayerSpec {
    pub attn: AttnLayer,
    pub mlp: MlpLayer,
}

/// FP8 block quantization as MiMo / DeepSeek FP8 checkpoints declare it.
#[derive(Clone, Debug, PartialEq)]
pub struct Fp8Quant {
    pub block: (usize, usize),
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab: usize,
    pub hidden: usize,
    pub eps: f32,
    pub tie_embeddings: bool,
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
    pub max_position: usize,
    pub layers: Vec<LayerSpec>,
    /// MTP layers (dense MiMo): present in the checkpoint, not used by the main forward.
    pub mtp_layers: usize,
    pub fp8: Option<Fp8Quant>,
    /// `torch_dtype` / `dtype` as declared.
    pub dtype: String,
}

impl ModelConfig {
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_json_str(&text).with_context(|| format!("in {}", path.display()))
    }

    pub fn from_json_str(text: &str) -> Result<ModelConfig> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| anyhow!("config.json is not valid JSON: {e}"))?;
        if !v.is_object() {
            bail!("config.json must be a JSON object");
        }
        let model_type = str_field(&v, "model_type")?;
        match model_type.as_str() {
            "mimo_v2_flash" => parse_moe(&v),
            "mimo" => parse_dense(&v),
            other => bail!(
                "config field `model_type`: unsupported architecture {other:?} (supported: \"mimo_v2_flash\", \"mimo\")"
            ),
        }
    }
}

fn field<'a>(v: &'a Value, k: &str) -> Option<&'a Value> {
    v.get(k).filter(|x| !x.is_null())
}

fn str_field(v: &Value, k: &str) -> Result<String> {
    match field(v, k) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => bail!("config field `{k}`: expected a string, got {other}"),
        None => bail!("config field `{k}` is missing"),
    }
}

fn usize_field(v: &Value, k: &str) -> Result<usize> {
    match field(v, k) {
        Some(x) => {
            let n = x.as_u64().ok_or_else(|| {
                anyhow!("config field `{k}`: expected a non-negative integer, got {x}")
            })?;
            if n == 0 {
                bail!("config field `{k}` must be positive, got 0");
            }
            usize::try_from(n).map_err(|_| anyhow!("config field `{k}`: {n} is too large"))
        }
        None => bail!("config field `{k}` is missing"),
    }
}

fn usize_or(v: &Value, k: &str, d: usize) -> Result<usize> {
    if field(v, k).is_some() {
        usize_field(v, k)
    } else {
        Ok(d)
    }
}

fn f64_or(v: &Value, k: &str, d: f64) -> Result<f64> {
    match field(v, k) {
        Some(x) => {
            let f = x
                .as_f64()
                .ok_or_else(|| anyhow!("config field `{k}`: expected a number, got {x}"))?;
            if !f.is_finite() {
                bail!("config field `{k}` must be finite");
            }
            Ok(f)
        }
        None => Ok(d),
    }
}

fn bool_or(v: &Value, k: &str, d: bool) -> Result<bool> {
    match field(v, k) {
        Some(Value::Bool(b)) => Ok(*b),
        Some(x) => bail!("config field `{k}`: expected true/false, got {x}"),
        None => Ok(d),
    }
}

fn token_ids(v: &Value, k: &str) -> Result<Vec<u32>> {
    match field(v, k) {
        None => Ok(vec![]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| anyhow!("config field `{k}`: bad id {x}"))
            })
            .collect(),
        Some(x) => Ok(vec![x
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| anyhow!("config field `{k}`: bad token id {x}"))?]),
    }
}

fn check_act(v: &Value) -> Result<()> {
    let act = field(v, "hidden_act")
        .and_then(|x| x.as_str())
        .unwrap_or("silu");
    if act != "silu" {
        bail!("config field `hidden_act`: unsupported activation {act:?} (only \"silu\")");
    }
    Ok(())
}

fn dtype_of(v: &Value) -> Result<String> {
    let d = field(v, "torch_dtype")
        .or_else(|| field(v, "dtype"))
        .and_then(|x| x.as_str())
        .unwrap_or("bfloat16");
    match d {
        "bfloat16" | "float16" | "float32" => Ok(d.to_string()),
        other => bail!("config field `torch_dtype`: unsupported dtype {other:?}"),
    }
}

fn fp8_of(v: &Value) -> Result<Option<Fp8Quant>> {
    let Some(q) = field(v, "quantization_config") else {
        return Ok(None);
    };
    let method = q.get("quant_method").and_then(|m| m.as_str()).unwrap_or("");
    if method != "fp8" {
        bail!("config field `quantization_config.quant_method`: unsupported {method:?} (only \"fp8\")");
    }
    if let Some(fmt) = q.get("fmt").and_then(|f| f.as_str()) {
        if fmt != "e4m3" {
            bail!("config field `quantization_config.fmt`: unsupported {fmt:?} (only \"e4m3\")");
        }
    }
    let block = match q.get("weight_block_size") {
        Some(Value::Array(a)) if a.len() == 2 => {
            let b: Vec<usize> = a.iter().filter_map(|x| x.as_u64()).map(|x| x as usize).collect();
            if b.len() != 2 || b[0] == 0 || b[1] == 0 {
                bail!("config field `quantization_config.weight_block_size` must be two positive integers");
            }
            (b[0], b[1])
        }
        None => bail!("config field `quantization_config.weight_block_size` is missing (per-tensor FP8 is unsupported)"),
        Some(x) => bail!("config field `quantization_config.weight_block_size`: expected [rows, cols], got {x}"),
    };
    if block != (128, 128) {
        bail!("config field `quantization_config.weight_block_size`: only [128, 128] is supported, got {block:?}");
    }
    Ok(Some(Fp8Quant { block }))
}

fn rope_of(rp: &Value, which: &str, head_dim: usize) -> Result<RopeSpec> {
    let Some(p) = rp.get(which).filter(|x| !x.is_null()) else {
        bail!("config field `rope_parameters.{which}` is missing");
    };
    let ty = p
        .get("rope_type")
        .and_then(|x| x.as_str())
        .unwrap_or("default");
    if ty != "default" {
        bail!("config field `rope_parameters.{which}.rope_type`: unsupported {ty:?} (only \"default\")");
    }
    let theta = p
        .get("rope_theta")
        .and_then(|x| x.as_f64())
        .ok_or_else(|| {
            anyhow!("config field `rope_parameters.{which}.rope_theta` is missing or not a number")
        })?;
    let factor = p
        .get("partial_rotary_factor")
        .and_then(|x| x.as_f64())
        .unwrap_or(0.334);
    if !(factor > 0.0 && factor <= 1.0) {
        bail!("config field `rope_parameters.{which}.partial_rotary_factor` must be in (0, 1], got {factor}");
    }
    let rotary_dim = (head_dim as f64 * factor) as usize;
    if !rotary_dim.is_multiple_of(2) || rotary_dim == 0 {
        bail!("config field `rope_parameters.{which}.partial_rotary_factor`: rotary dim {rotary_dim} must be even");
    }
    Ok(RopeSpec {
        theta: theta as f32,
        head_dim,
        rotary_dim,
    })
}

fn parse_moe(v: &Value) -> Result<ModelConfig> {
    check_act(v)?;
    let hidden = usize_or(v, "hidden_size", 4096)?;
    let n_layers = usize_or(v, "num_hidden_layers", 48)?;
    let n_heads = usize_or(v, "num_attention_heads", 64)?;
    let n_kv = usize_or(v, "num_key_value_heads", 4)?;
    let head_dim = usize_or(v, "head_dim", 192)?;
    let v_head_dim = usize_or(v, "v_head_dim", 128)?;
    let window = usize_or(v, "sliding_window", 128)?;
    let inter = usize_or(v, "intermediate_size", 16384)?;
    let moe_inter = usize_or(v, "moe_intermediate_size", 2048)?;
    let n_experts = usize_or(v, "n_routed_experts", 256)?;
    let top_k = usize_or(v, "num_experts_per_tok", 8)?;
    let n_group = usize_or(v, "n_group", 1)?;
    let topk_group = usize_or(v, "topk_group", 1)?;
    if top_k > n_experts {
        bail!("config field `num_experts_per_tok`: {top_k} > n_routed_experts {n_experts}");
    }
    if n_experts % n_group != 0 || topk_group > n_group {
        bail!("config fields `n_group`/`topk_group`: {n_group}/{topk_group} do not divide {n_experts} experts");
    }
    if n_group > 1 && (n_experts / n_group) < 2 {
        bail!("config field `n_group`: each group needs at least 2 experts");
    }
    let scaling = f64_or(v, "routed_scaling_factor", 1.0)? as f32;
    let norm_topk_prob = bool_or(v, "norm_topk_prob", true)?;
    let attention_bias = bool_or(v, "attention_bias", false)?;
    let v_scale = match field(v, "attention_value_scale") {
        None => None,
        Some(_) => Some(f64_or(v, "attention_value_scale", 0.707)? as f32),
    };
    // transformers' default when the field is absent is 0.707; null means "no scaling".
    let v_scale = if v.get("attention_value_scale").is_none() {
        Some(0.707)
    } else {
        v_scale
    };
    if n_heads % n_kv != 0 || n_heads % (2 * n_kv) != 0 {
        bail!(
            "config field `num_key_value_heads`: {n_kv} (and {} for sliding layers) must divide num_attention_heads {n_heads}",
            2 * n_kv
        );
    }
    let layer_types: Vec<String> = match field(v, "layer_types") {
        None => (0..n_layers)
            .map(|i| {
                if i == 0 || (i + 1) % 6 == 0 {
                    "full_attention"
                } else {
                    "sliding_attention"
                }
                .to_string()
            })
            .collect(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(String::from)
                    .ok_or_else(|| anyhow!("config field `layer_types`: bad entry {x}"))
            })
            .collect::<Result<_>>()?,
        Some(x) => bail!("config field `layer_types`: expected a list, got {x}"),
    };
    if layer_types.len() != n_layers {
        bail!(
            "config field `layer_types` has {} entries, num_hidden_layers is {n_layers}",
            layer_types.len()
        );
    }
    let mlp_types: Vec<String> = match field(v, "mlp_layer_types") {
        None => (0..n_layers)
            .map(|i| if i == 0 { "dense" } else { "sparse" }.to_string())
            .collect(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(String::from)
                    .ok_or_else(|| anyhow!("config field `mlp_layer_types`: bad entry {x}"))
            })
            .collect::<Result<_>>()?,
        Some(x) => bail!("config field `mlp_layer_types`: expected a list, got {x}"),
    };
    if mlp_types.len() != n_layers {
        bail!(
            "config field `mlp_layer_types` has {} entries, num_hidden_layers is {n_layers}",
            mlp_types.len()
        );
    }
    let default_rope = serde_json::json!({
        "full_attention": {"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.334},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.334},
    });
    let rp = field(v, "rope_parameters").unwrap_or(&default_rope);
    let mut layers = Vec::with_capacity(n_layers);
    for i in 0..n_layers {
        let swa = match layer_types[i].as_str() {
            "sliding_attention" => true,
            "full_attention" => false,
            other => bail!("config field `layer_types[{i}]`: unknown layer type {other:?}"),
        };
        let rope = rope_of(rp, &layer_types[i], head_dim)?;
        let attn = AttnLayer {
            n_heads,
            n_kv_heads: if swa { 2 * n_kv } else { n_kv },
            head_dim,
            v_head_dim,
            window: swa.then_some(window),
            sinks: swa,
            rope,
            qkv_bias: attention_bias,
            v_scale,
            scale: (head_dim as f32).powf(-0.5),
        };
        let mlp = match mlp_types[i].as_str() {
            "dense" => MlpLayer::Dense { inter },
            "sparse" => MlpLayer::Moe(MoeLayer {
                n_experts,
                top_k,
                inter: moe_inter,
                n_group,
                topk_group,
                norm_topk_prob,
                scaling,
            }),
            other => bail!("config field `mlp_layer_types[{i}]`: unknown MLP type {other:?}"),
        };
        layers.push(LayerSpec { attn, mlp });
    }
    Ok(ModelConfig {
        arch: Arch::MimoV2Flash,
        vocab: usize_or(v, "vocab_size", 152576)?,
        hidden,
        eps: f64_or(v, "rms_norm_eps", 1e-5)? as f32,
        tie_embeddings: bool_or(v, "tie_word_embeddings", false)?,
        bos: token_ids(v, "bos_token_id")?.first().copied(),
        eos: token_ids(v, "eos_token_id")?,
        max_position: usize_or(v, "max_position_embeddings", 131072)?,
        layers,
        mtp_layers: 0,
        fp8: fp8_of(v)?,
        dtype: dtype_of(v)?,
    })
}

fn parse_dense(v: &Value) -> Result<ModelConfig> {
    check_act(v)?;
    let hidden = usize_field(v, "hidden_size")?;
    let n_layers = usize_field(v, "num_hidden_layers")?;
    let n_heads = usize_field(v, "num_attention_heads")?;
    let n_kv = usize_or(v, "num_key_value_heads", n_heads)?;
    if hidden % n_heads != 0 {
        bail!("config field `num_attention_heads`: {n_heads} does not divide hidden_size {hidden}");
    }
    if n_heads % n_kv != 0 {
        bail!("config field `num_key_value_heads`: {n_kv} does not divide num_attention_heads {n_heads}");
    }
    let head_dim = usize_or(v, "head_dim", hidden / n_heads)?;
    if bool_or(v, "use_sliding_window", false)? {
        bail!("config field `use_sliding_window`: true is unsupported for the dense MiMo architecture");
    }
    if let Some(rs) = field(v, "rope_scaling") {
        bail!("config field `rope_scaling`: unsupported value {rs}");
    }
    let theta = f64_or(v, "rope_theta", 10000.0)? as f32;
    let inter = usize_field(v, "intermediate_size")?;
    let layer = LayerSpec {
        attn: AttnLayer {
            n_heads,
            n_kv_heads: n_kv,
            head_dim,
            v_head_dim: head_dim,
            window: None,
            sinks: false,
            rope: RopeSpec {
                theta,
                head_dim,
                rotary_dim: head_dim,
            },
            qkv_bias: true,
            v_scale: None,
            scale: (head_dim as f32).powf(-0.5),
        },
        mlp: MlpLayer::Dense { inter },
    };
    Ok(ModelConfig {
        arch: Arch::Mimo,
        vocab: usize_field(v, "vocab_size")?,
        hidden,
        eps: f64_or(v, "rms_norm_eps", 1e-6)? as f32,
        tie_embeddings: bool_or(v, "tie_word_embeddings", false)?,
        bos: token_ids(v, "bos_token_id")?.first().copied(),
        eos: token_ids(v, "eos_token_id")?,
        max_position: usize_or(v, "max_position_embeddings", 32768)?,
        layers: vec![layer; n_layers],
        mtp_layers: match field(v, "num_nextn_predict_layers") {
            None => 0,
            Some(x) => x
                .as_u64()
                .ok_or_else(|| anyhow!("config field `num_nextn_predict_layers`: bad value {x}"))?
                as usize,
        },
        fp8: fp8_of(v)?,
        dtype: dtype_of(v)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_moe_matches_reference_facts() {
        let c = ModelConfig::from_json_str(r#"{"model_type":"mimo_v2_flash"}"#).unwrap();
        assert_eq!(c.n_layers(), 48);
        let full: Vec<usize> = (0..48)
            .filter(|&i| c.layers[i].attn.window.is_none())
            .collect();
        assert_eq!(full, vec![0, 5, 11, 17, 23, 29, 35, 41, 47]);
        assert_eq!(c.layers[1].attn.n_kv_heads, 8);
        assert_eq!(c.layers[0].attn.n_kv_heads, 4);
        assert_eq!(c.layers[1].attn.rope.rotary_dim, 64);
        assert_eq!(c.layers[0].attn.rope.theta, 5e6);
        assert!(c.layers[1].attn.sinks && !c.layers[0].attn.sinks);
        assert!(matches!(c.layers[0].mlp, MlpLayer::Dense { inter: 16384 }));
        assert!(matches!(&c.layers[3].mlp, MlpLayer::Moe(m) if m.n_experts == 256 && m.top_k == 8));
        assert_eq!(c.layers[2].attn.v_scale, Some(0.707));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (r#"{"model_type":"llama"}"#, "model_type"),
            (
                r#"{"model_type":"mimo_v2_flash","hidden_act":"gelu"}"#,
                "hidden_act",
            ),
            (
                r#"{"model_type":"mimo_v2_flash","num_hidden_layers":2,"layer_types":["full_attention"]}"#,
                "layer_types",
            ),
            (
                r#"{"model_type":"mimo_v2_flash","num_hidden_layers":1,"layer_types":["chunked"],"mlp_layer_types":["dense"]}"#,
                "layer_types[0]",
            ),
            (
                r#"{"model_type":"mimo_v2_flash","hidden_size":"big"}"#,
                "hidden_size",
            ),
            (
                r#"{"model_type":"mimo_v2_flash","num_experts_per_tok":300}"#,
                "num_experts_per_tok",
            ),
            (
                r#"{"model_type":"mimo","hidden_size":64}"#,
                "num_hidden_layers",
            ),
            (
                r#"{"model_type":"mimo_v2_flash","quantization_config":{"quant_method":"awq"}}"#,
                "quant_method",
            ),
            (r#"[1,2]"#, "JSON object"),
            (r#"{"model_type":"#, "not valid JSON"),
        ];
        for (json, needle) in cases {
            let e = format!("{:#}", ModelConfig::from_json_str(json).unwrap_err());
            assert!(e.contains(needle), "{json}: {e}");
        }
    }

    #[test]
    fn dense_mimo() {
        let c = ModelConfig::from_json_str(
            r#"{"model_type":"mimo","hidden_size":64,"num_hidden_layers":2,"num_attention_heads":4,
            "num_key_value_heads":2,"intermediate_size":128,"vocab_size":100,"rope_theta":640000,
            "num_nextn_predict_layers":1}"#,
        )
        .unwrap();
        assert_eq!(c.layers[0].attn.head_dim, 16);
        assert!(c.layers[0].attn.qkv_bias);
        assert_eq!(c.layers[0].attn.rope.rotary_dim, 16);
        assert_eq!(c.mtp_layers, 1);
    }
}
