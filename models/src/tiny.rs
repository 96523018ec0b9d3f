//! The tiny checkpoint maker: writes a complete, loadable Hugging Face style checkpoint directory
//! (config, sharded safetensors + index, a trained byte-level BPE tokenizer, tokenizer config with a ChatML
//! chat template, generation config) with small seeded random weights, for tests and demos.

use crate::checkpoint::{e4m3_encode, expected_tensors, fp8_eligible, ExpertLayout};
use crate::config::{Arch, ModelConfig};
use anyhow::{anyhow, bail, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
};
use tokenizers::{Tokenizer, TokenizerImpl};

/// Text the tiny tokenizer is trained on.
pub const CORPUS: &str = include_str!("corpus.txt");

pub const TINY_VOCAB: usize = 512;
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Qwen-style ChatML chat template.
pub const CHAT_TEMPLATE: &str = "{%- for message in messages %}\
{%- if loop.first and message['role'] != 'system' %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}\
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\
{%- endfor %}\
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

#[derive(Clone, Debug)]
pub struct TinyOptions {
    pub arch: Arch,
    pub seed: u64,
    pub fp8: bool,
    /// Write MoE experts in the fused 3-D layout instead of one tensor per expert.
    pub fused_experts: bool,
}

impl Default for TinyOptions {
    fn default() -> Self {
        TinyOptions {
            arch: Arch::MimoV2Flash,
            seed: 0,
            fp8: false,
            fused_experts: false,
        }
    }
}

/// `config.json` of the tiny model (transformers field names). `eos_token_id` is the id of `<|im_end|>` (2).
pub fn tiny_config_json(arch: Arch, fp8: bool) -> Value {
    let mut v = match arch {
        Arch::MimoV2Flash => json!({
            "architectures": ["MiMoV2FlashForCausalLM"],
            "model_type": "mimo_v2_flash",
            "vocab_size": TINY_VOCAB,
            "hidden_size": 64,
            "num_hidden_layers": 4,
            "layer_types": ["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
            "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"],
            "sliding_window": 8,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "v_head_dim": 16,
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": 5000000.0, "partial_rotary_factor": 0.334},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.334}
            },
            "attention_value_scale": 0.707,
            "intermediate_size": 96,
            "moe_intermediate_size": 32,
            "n_routed_experts": 8,
            "num_experts_per_tok": 2,
            "n_group": 2,
            "topk_group": 1,
            "norm_topk_prob": true,
            "routed_scaling_factor": 1.0,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": false,
            "max_position_embeddings": 4096,
            "hidden_act": "silu",
            "attention_bias": false,
            "torch_dtype": "bfloat16",
            "bos_token_id": null,
            "eos_token_id": 2
        }),
        Arch::Mimo => json!({
            "architectures": ["MiMoForCausalLM"],
            "model_type": "mimo",
            "vocab_size": TINY_VOCAB,
            "hidden_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 128,
            "rope_theta": 640000.0,
            "rms_norm_eps": 1e-5,
            "num_nextn_predict_layers": 1,
            "tie_word_embeddings": false,
            "max_position_embeddings": 4096,
            "hidden_act": "silu",
            "use_sliding_window": false,
            "torch_dtype": "bfloat16",
            "bos_token_id": null,
            "eos_token_id": 2
        }),
    };
    if fp8 {
        v["quantization_config"] = json!({
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128]
        });
    }
    v
}

/// Train the tiny byte-level BPE tokenizer on [`CORPUS`]; returns the serialized `tokenizer.json`.
pub fn train_tiny_tokenizer() -> Result<String> {
    let mut tk: TokenizerImpl<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    > = TokenizerImpl::new(BPE::default());
    tk.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tk.with_decoder(Some(ByteLevelDecoder::default()));
    let mut trainer = BpeTrainer::builder()
        .vocab_size(TINY_VOCAB)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(
            SPECIAL_TOKENS
                .iter()
                .map(|s| AddedToken::from(s.to_string(), true))
                .collect(),
        )
        .build();
    tk.train(
        &mut trainer,
        CORPUS
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| format!("{l}\n")),
    )
    .map_err(|e| anyhow!("training the tiny tokenizer: {e}"))?;
    let tk: Tokenizer = tk.into();
    tk.to_string(false)
        .map_err(|e| anyhow!("serializing the tiny tokenizer: {e}"))
}

/// One generated tensor ready for serialization.
struct Tensor {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
        .collect()
}

/// Quantize `vals` (shape [.., rows, cols]) to E4M3 with one f32 scale per 128x128 block (amax / 448).
fn quantize_fp8(vals: &[f32], shape: &[usize]) -> (Vec<u8>, Vec<f32>, Vec<usize>) {
    const B: usize = 128;
    let n = shape.len();
    let (rows, cols) = (shape[n - 2], shape[n - 1]);
    let lead: usize = shape[..n - 2].iter().product();
    let (sr, sc) = (rows.div_ceil(B), cols.div_ceil(B));
    let mut scales = vec![0f32; lead * sr * sc];
    for x in 0..lead {
        for r in 0..rows {
            for c in 0..cols {
                let s = &mut scales[(x * sr + r / B) * sc + c / B];
                *s = s.max(vals[(x * rows + r) * cols + c].abs());
            }
        }
    }
    for s in scales.iter_mut() {
        *s = if *s > 0.0 { *s / 448.0 } else { 1.0 };
    }
    let mut q = Vec::with_capacity(vals.len());
    for x in 0..lead {
        for r in 0..rows {
            for c in 0..cols {
                let s = scales[(x * sr + r / B) * sc + c / B];
                q.push(e4m3_encode(vals[(x * rows + r) * cols + c] / s));
            }
        }
    }
    let mut sshape = shape.to_vec();
    sshape[n - 2] = sr;
    sshape[n - 1] = sc;
    (q, scales, sshape)
}

/// Standard deviation of the initial values of a tensor, or `(mean, std)` for norms.
fn init_of(name: &str, shape: &[usize], hidden: usize) -> (f32, f32) {
    let fan_in = *shape.last().unwrap_or(&1) as f32;
    if name == "model.embed_tokens.weight" {
        (0.0, 1.0)
    } else if name == "lm_head.weight" {
        (0.0, 1.0 / (hidden as f32).sqrt())
    } else if name.ends_with("norm.weight") {
        (1.0, 0.1)
    } else if name.ends_with(".bias") || name.ends_with("e_score_correction_bias") {
        (0.0, 0.1)
    } else if name.ends_with(".sinks") || name.ends_with(".attention_sink_bias") {
        (0.0, 1.0)
    } else {
        (0.0, 0.8 / fan_in.sqrt())
    }
}

/// The bf16-rounded f32 values of every tensor of the tiny checkpoint (before any FP8 quantization), in order.
fn generate(
    cfg: &ModelConfig,
    layout: ExpertLayout,
    seed: u64,
) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    expected_tensors(cfg, layout)
        .into_iter()
        .map(|(name, shape)| {
            // Written under the Hub / save_pretrained name of the sinks.
            let name = match name.strip_suffix(".self_attn.sinks") {
                Some(p) => format!("{p}.self_attn.attention_sink_bias"),
                None => name,
            };
            let (mean, std) = init_of(&name, &shape, cfg.hidden);
            let n: usize = shape.iter().product();
            let vals: Vec<f32> = (0..n)
                .map(|_| {
                    let z: f32 = rng.sample(StandardNormal);
                    let mut v = half::bf16::from_f32(mean + std * z).to_f32();
                    if v == 0.0 {
                        v = half::bf16::from_f32(std.max(1e-3) * 0.01).to_f32();
                    }
                    v
                })
                .collect();
            (name, shape, vals)
        })
        .collect()
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("bad path {}", path.display()))?;
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

fn json_bytes(v: &Value) -> Result<Vec<u8>> {
    let mut b = serde_json::to_vec_pretty(v)?;
    b.push(b'\n');
    Ok(b)
}

/// Write a tiny checkpoint of `opts.arch` into `dir` (created; must not exist or be empty).
pub fn make_tiny(dir: &Path, opts: &TinyOptions) -> Result<()> {
    if dir.exists() {
        if !dir.is_dir() {
            bail!("{} exists and is not a directory", dir.display());
        }
        let mut it =
            std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
        if it.next().is_some() {
            bail!(
                "refusing to write a tiny checkpoint into non-empty directory {}",
                dir.display()
            );
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;

    // tokenizer first: the config needs the id of <|im_end|>
    let tok_json = train_tiny_tokenizer()?;
    let tok: Tokenizer = tok_json
        .parse()
        .map_err(|e| anyhow!("re-reading the tiny tokenizer: {e}"))?;
    let eos = tok
        .token_to_id("<|im_end|>")
        .ok_or_else(|| anyhow!("tiny tokenizer lacks <|im_end|>"))?;
    let pad = tok
        .token_to_id("<|endoftext|>")
        .ok_or_else(|| anyhow!("tiny tokenizer lacks <|endoftext|>"))?;
    let n_tok = tok.get_vocab_size(true);
    if n_tok > TINY_VOCAB {
        bail!("tiny tokenizer has {n_tok} tokens, more than vocab_size {TINY_VOCAB}");
    }

    let mut cfg_json = tiny_config_json(opts.arch, opts.fp8);
    cfg_json["eos_token_id"] = json!(eos);
    let cfg =
        ModelConfig::from_json_str(&cfg_json.to_string()).context("tiny config does not parse")?;
    let layout = if opts.fused_experts {
        ExpertLayout::Fused
    } else {
        ExpertLayout::PerExpert
    };

    let mut tensors = Vec::new();
    for (name, shape, vals) in generate(&cfg, layout, opts.seed) {
        if opts.fp8 && fp8_eligible(&name) && shape.len() >= 2 {
            let (q, scales, sshape) = quantize_fp8(&vals, &shape);
            tensors.push(Tensor {
                name: format!("{name}_scale_inv"),
                dtype: Dtype::F32,
                shape: sshape,
                data: f32_bytes(&scales),
            });
            tensors.push(Tensor {
                name,
                dtype: Dtype::F8_E4M3,
                shape,
                data: q,
            });
        } else {
            tensors.push(Tensor {
                name,
                dtype: Dtype::BF16,
                shape,
                data: bf16_bytes(&vals),
            });
        }
    }

    // split into shards by bytes, each tensor whole in one shard
    let n_shards = if opts.arch == Arch::MimoV2Flash { 3 } else { 2 };
    let total: usize = tensors.iter().map(|t| t.data.len()).sum();
    let mut groups: Vec<Vec<&Tensor>> = vec![Vec::new(); n_shards];
    let mut acc = 0usize;
    for (i, t) in tensors.iter().enumerate() {
        // keep the last tensors for the last shards so every shard is non-empty
        let by_bytes = acc * n_shards / total.max(1);
        let min_left = n_shards.saturating_sub(tensors.len() - i);
        groups[by_bytes.max(min_left).min(n_shards - 1)].push(t);
        acc += t.data.len();
    }
    let mut weight_map = BTreeMap::new();
    for (k, group) in groups.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", k + 1, n_shards);
        let views: Vec<(String, TensorView)> = group
            .iter()
            .map(|t| {
                let view = TensorView::new(t.dtype, t.shape.clone(), &t.data)
                    .map_err(|e| anyhow!("tensor {}: {e}", t.name))?;
                weight_map.insert(t.name.clone(), file.clone());
                Ok((t.name.clone(), view))
            })
            .collect::<Result<_>>()?;
        let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        let bytes = safetensors::serialize(views.iter().map(|(n, v)| (n.as_str(), v)), Some(meta))
            .map_err(|e| anyhow!("serializing {file}: {e}"))?;
        write_atomic(&dir.join(&file), &bytes)?;
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    write_atomic(
        &dir.join("model.safetensors.index.json"),
        &json_bytes(&index)?,
    )?;

    write_atomic(&dir.join("tokenizer.json"), tok_json.as_bytes())?;
    let tok_cfg = json!({
        "tokenizer_class": "Qwen2Tokenizer",
        "add_bos_token": false,
        "bos_token": null,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": null,
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    });
    write_atomic(&dir.join("tokenizer_config.json"), &json_bytes(&tok_cfg)?)?;
    let gen =
        json!({"bos_token_id": null, "eos_token_id": eos, "pad_token_id": pad, "do_sample": false});
    write_atomic(&dir.join("generation_config.json"), &json_bytes(&gen)?)?;
    // config.json last: a directory without it is visibly incomplete
    write_atomic(&dir.join("config.json"), &json_bytes(&cfg_json)?)?;
    Ok(())
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{Checkpoint, StoredDType};

    fn opts(arch: Arch) -> TinyOptions {
        TinyOptions {
            arch,
            seed: 7,
            fp8: false,
            fused_experts: false,
        }
    }

    fn check_values(ck: &Checkpoint, seed: u64, layout: ExpertLayout) {
        for (name, _shape, vals) in generate(&ck.config, layout, seed) {
            let got = ck.read_f32(&name).unwrap();
            assert_eq!(got, vals, "{name}");
            assert!(
                got.iter().all(|v| *v != 0.0 && v.is_finite()),
                "{name} has zeros"
            );
        }
    }

    #[test]
    fn tiny_moe_roundtrip() {
        let td = tempfile::tempdir().unwrap();
        let dir = td.path().join("moe");
        make_tiny(&dir, &opts(Arch::MimoV2Flash)).unwrap();
        let ck = Checkpoint::open(&dir).unwrap();
        assert_eq!(ck.config.arch, Arch::MimoV2Flash);
        assert_eq!(ck.config.vocab, TINY_VOCAB);
        assert_eq!(ck.expert_layout, ExpertLayout::PerExpert);
        assert_eq!(ck.config.eos, vec![2]);
        assert_eq!(ck.dtype("model.norm.weight"), Some(StoredDType::BF16));
        assert_eq!(
            ck.shape("model.layers.1.self_attn.k_proj.weight"),
            Some(vec![64, 64])
        );
        assert!(
            ck.has("model.layers.1.self_attn.sinks") && !ck.has("model.layers.0.self_attn.sinks")
        );
        let norm = ck
            .read_f32("model.layers.2.input_layernorm.weight")
            .unwrap();
        let mean = norm.iter().sum::<f32>() / norm.len() as f32;
        assert!((mean - 1.0).abs() < 0.1, "{mean}");
        check_values(&ck, 7, ExpertLayout::PerExpert);
        let shards: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
            .collect();
        assert!(shards.len() >= 2);
        assert!(ck.chat_template().unwrap().contains("<|im_start|>"));

        let tok: Tokenizer = ck.tokenizer_json().unwrap().parse().unwrap();
        let text = "def hello(): return 42";
        let enc = tok.encode(text, false).unwrap();
        assert!(
            enc.get_ids().len() < text.len(),
            "BPE merges should shorten the text"
        );
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
        assert_eq!(tok.token_to_id("<|endoftext|>"), Some(0));
        assert!(tok.get_vocab_size(true) <= TINY_VOCAB);
        let chat = tok.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap();
        assert_eq!(chat.get_ids()[0], tok.token_to_id("<|im_start|>").unwrap());
    }

    #[test]
    fn tiny_dense_and_fused_roundtrip() {
        let td = tempfile::tempdir().unwrap();
        let dense = td.path().join("dense");
        make_tiny(&dense, &opts(Arch::Mimo)).unwrap();
        let ck = Checkpoint::open(&dense).unwrap();
        assert_eq!(ck.config.arch, Arch::Mimo);
        assert_eq!(ck.config.mtp_layers, 1);
        assert!(ck.has("model.mtp_layers.0.input_proj.weight"));
        assert!(ck.has("model.layers.0.self_attn.q_proj.bias"));
        check_values(&ck, 7, ExpertLayout::PerExpert);

        let fused = td.path().join("fused");
        make_tiny(
            &fused,
            &TinyOptions {
                fused_experts: true,
                ..opts(Arch::MimoV2Flash)
            },
        )
        .unwrap();
        let ck = Checkpoint::open(&fused).unwrap();
        assert_eq!(ck.expert_layout, ExpertLayout::Fused);
        assert_eq!(
            ck.shape("model.layers.1.mlp.experts.gate_up_proj"),
            Some(vec![8, 64, 64])
        );
        check_values(&ck, 7, ExpertLayout::Fused);
    }

    #[test]
    fn fp8_dequant_matches_bf16() {
        let td = tempfile::tempdir().unwrap();
        for (arch, fused) in [
            (Arch::MimoV2Flash, false),
            (Arch::MimoV2Flash, true),
            (Arch::Mimo, false),
        ] {
            let base = TinyOptions {
                arch,
                seed: 3,
                fp8: false,
                fused_experts: fused,
            };
            let a = td.path().join(format!("{arch:?}{fused}bf16"));
            let b = td.path().join(format!("{arch:?}{fused}fp8"));
            make_tiny(&a, &base).unwrap();
            make_tiny(&b, &TinyOptions { fp8: true, ..base }).unwrap();
            let (ca, cb) = (Checkpoint::open(&a).unwrap(), Checkpoint::open(&b).unwrap());
            assert!(cb.config.fp8.is_some());
            let mut n_fp8 = 0;
            for name in ca.names() {
                let (x, y) = (ca.read_f32(&name).unwrap(), cb.read_f32(&name).unwrap());
                if cb.dtype(&name) != Some(StoredDType::F8E4M3) {
                    assert_eq!(x, y, "{name}");
                    continue;
                }
                n_fp8 += 1;
                assert!(cb.has(&format!("{name}_scale_inv")));
                let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                let (mut num, mut den) = (0f64, 0f64);
                for (u, v) in x.iter().zip(&y) {
                    let err = (u - v).abs();
                    assert!(
                        err <= 0.08 * u.abs() + amax / 448.0 * 2f32.powi(-9),
                        "{name}: {u} vs {v}"
                    );
                    num += (err as f64).powi(2);
                    den += (*u as f64).powi(2);
                }
                assert!((num / den).sqrt() < 0.08, "{name}");
            }
            assert!(n_fp8 > 0);
            assert_eq!(
                cb.dtype("model.embed_tokens.weight"),
                Some(StoredDType::BF16)
            );
            assert_eq!(cb.dtype("model.norm.weight"), Some(StoredDType::BF16));
        }
    }

    #[test]
    fn refuses_non_empty_dir() {
        let td = tempfile::tempdir().unwrap();
        std::fs::write(td.path().join("keep.txt"), "precious").unwrap();
        let e = make_tiny(td.path(), &opts(Arch::Mimo)).unwrap_err();
        assert!(format!("{e:#}").contains("non-empty"), "{e:#}");
        let names: Vec<_> = std::fs::read_dir(td.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1);
        assert_eq!(
            std::fs::read_to_string(td.path().join("keep.txt")).unwrap(),
            "precious"
        );
    }

    #[test]
    fn config_json_parses() {
        for arch in [Arch::MimoV2Flash, Arch::Mimo] {
            for fp8 in [false, true] {
                let c =
                    ModelConfig::from_json_str(&tiny_config_json(arch, fp8).to_string()).unwrap();
                assert_eq!(c.vocab, TINY_VOCAB);
                assert_eq!(c.fp8.is_some(), fp8);
            }
        }
    }
}
