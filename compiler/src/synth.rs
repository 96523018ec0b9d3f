//! Benchmark models: a plan compiled from a config alone, with random weights generated directly in their packed
//! formats (MXFP4 codes and scales, FP8 bytes and block scales, bf16 values). Per-token bytes are those of the
//! real model; values are random but well-scaled (no NaN/Inf, activations stay O(1)).

use crate::pack::WeightProvider;
use crate::{lower, passes, CompileOptions};
use anyhow::{bail, Result};
use half::bf16;
use mimo_ir::plan::Plan;
use mimo_ir::{DType, WeightSource};
use mimo_models::build::{build_graph, BuildOptions};
use mimo_models::config::ModelConfig;
use rayon::prelude::*;
use std::path::Path;

/// Random packed weights; a weight's values depend only on its name and the seed.
pub struct Synthetic {
    pub seed: u64,
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fill `out` with random bytes from `f(u64 random) -> u8`, in parallel chunks seeded from `seed`.
fn fill<T: Send + Copy>(out: &mut [T], seed: u64, f: impl Fn(u64) -> T + Sync) {
    out.par_chunks_mut(1 << 16)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut s = splitmix(seed ^ (c as u64).wrapping_mul(0xA24B_AED4_963E_E407));
            for v in chunk.iter_mut() {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                *v = f(s);
            }
        });
}

impl WeightProvider for Synthetic {
    fn encode(
        &self,
        src: &WeightSource,
        dtype: DType,
        dims: &[usize],
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        let n: usize = dims.iter().product();
        let k = *dims.last().unwrap_or(&1);
        let seed = self.seed ^ xxhash_rust::xxh3::xxh3_64(src.describe().as_bytes());
        let name = src.describe();
        let is_norm = name.contains("layernorm") || name.contains("model.norm");
        // Target std of each element: 1/sqrt(K) for matrices, ~1 for norms / sinks / embeddings.
        let std = if dims.len() == 1 {
            if is_norm {
                0.0
            } else {
                0.1
            }
        } else if name.contains("embed_tokens") {
            1.0
        } else {
            1.0 / (k as f32).sqrt()
        };
        let base = if is_norm { 1.0 } else { 0.0 };
        let uni = move |r: u64| -> f32 {
            // Uniform in [-sqrt(3), sqrt(3)) * std (+ base): the given std.
            let u = (r >> 40) as f32 / (1u64 << 24) as f32;
            base + (2.0 * u - 1.0) * 1.732_050_8 * std.max(if is_norm { 0.1 } else { 0.0 })
        };
        Ok(match dtype {
            DType::F32 => {
                let mut v = vec![0f32; n];
                fill(&mut v, seed, uni);
                (v.iter().flat_map(|x| x.to_le_bytes()).collect(), vec![])
            }
            DType::BF16 => {
                let mut v = vec![0u16; n];
                fill(&mut v, seed, |r| bf16::from_f32(uni(r)).to_bits());
                (v.iter().flat_map(|x| x.to_le_bytes()).collect(), vec![])
            }
            DType::F8E4M3 => {
                // Random e4m3 codes with |exponent| in a narrow band (no NaN), scale so that std ~ 1/sqrt(K).
                let mut data = vec![0u8; n];
                fill(&mut data, seed, |r| {
                    let sign = ((r >> 63) as u8) << 7;
                    let e = 5 + ((r >> 40) % 5) as u8; // exponents 5..9 (values ~ 2^-2 .. 2^2)
                    let m = ((r >> 20) & 7) as u8;
                    sign | (e << 3) | m
                });
                let (rows, cols) = (dims[dims.len() - 2], k);
                let lead = n / (rows * cols);
                let blocks = lead * rows.div_ceil(128) * cols.div_ceil(128);
                let sc = std / 1.5;
                let scales: Vec<u8> = (0..blocks).flat_map(|_| sc.to_le_bytes()).collect();
                (data, scales)
            }
            DType::MXFP4 => {
                let mut data = vec![0u8; n / 2];
                fill(&mut data, seed, |r| (r >> 32) as u8);
                // E2M1 codes have rms ~3.2; scale 2^e so that std ~ 1/sqrt(K).
                let e = (127.0 + (std / 3.2).log2().round()) as u8;
                let scales = vec![e; n / 32];
                (data, scales)
            }
            other => bail!(
                "synthetic weights of dtype {} are not supported",
                other.name()
            ),
        })
    }
}

/// Compile a benchmark plan for `cfg` with synthetic weights into `out`.
pub fn compile_synthetic(
    cfg: &ModelConfig,
    out: &Path,
    opts: &CompileOptions,
    seed: u64,
) -> Result<Plan> {
    let b = BuildOptions {
        capture_layers: opts.capture_layers.clone(),
        ..Default::default()
    };
    let mut g = build_graph(cfg, &b);
    g.verify()?;
    let log = passes::run_pipeline(&mut g, &opts.passes, None)?;
    let lowered = lower::lower(&g, "target", opts.max_tokens)?;
    std::fs::create_dir_all(out)?;
    let (weights, weights_len, weights_hash) = crate::pack::pack_weights(
        &Synthetic { seed },
        &[(&g, &lowered.weights)],
        out,
        opts.progress,
    )?;
    let plan = Plan {
        model: crate::model_info(cfg),
        max_tokens: opts.max_tokens,
        arena_len: lowered.arena_len,
        buffers: lowered.buffers,
        weights,
        kv: lowered.kv,
        programs: vec![lowered.program],
        passes: log,
        tokenizer_json: mimo_models::tiny::train_tiny_tokenizer()?,
        chat_template: None,
        weights_len,
        draft: None,
    };
    plan.validate()?;
    mimo_ir::plan::write_plan_file(out, &plan, weights_hash)?;
    crate::codegen::emit(&plan, out)?;
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mimo_ir::plan::Instr;
    use mimo_models::config::Arch;

    /// The bench plan goes through the same passes as `compile`: router, experts and LM head carry the RMSNorm
    /// prologue and the experts the residual, so no standalone norm or add is left in a MoE model's plan.
    #[test]
    fn bench_plan_uses_the_fused_forms() {
        let v = mimo_models::tiny::tiny_config_json(Arch::MimoV2Flash, false);
        let cfg = ModelConfig::from_json_str(&v.to_string()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let opts = CompileOptions {
            max_tokens: 4,
            ..Default::default()
        };
        let plan = compile_synthetic(&cfg, &dir.path().join("bench"), &opts, 7).unwrap();
        let instrs = &plan.programs[0].instrs;
        let count = |f: &dyn Fn(&Instr) -> bool| instrs.iter().filter(|i| f(i)).count();
        let moe = count(&|i| matches!(i, Instr::Moe { .. }));
        assert!(moe > 0);
        assert_eq!(
            count(&|i| matches!(
                i,
                Instr::Moe {
                    norm: Some(_),
                    residual: Some(_),
                    ..
                }
            )),
            moe
        );
        assert_eq!(
            count(&|i| matches!(i, Instr::Router { norm: Some(_), .. })),
            moe
        );
        assert_eq!(
            count(&|i| matches!(i, Instr::LmHead { norm: Some(_), .. })),
            1
        );
        assert_eq!(
            count(&|i| matches!(i, Instr::RmsNorm { .. } | Instr::Add { .. })),
            0
        );
    }
}
