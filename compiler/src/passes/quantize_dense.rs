//! quantize-dense: choose the packed format of the attention and dense-MLP projections.
//!
//! - `--dense fp8`: 2-D `Attention` / `DenseMlp` weights in bf16 / f16 / f32 become FP8 E4M3 with one f32 scale
//!   per 128x128 block (the DeepSeek / MiMo FP8 checkpoint layout); packing quantizes them. Weights that are
//!   already F8E4M3 (an FP8 checkpoint) are left as they are and pass through packing unchanged.
//! - `--dense bf16` (default): nothing changes. In particular, an FP8 checkpoint's projections stay FP8: they
//!   carry no more information in bf16, and keeping them halves the bytes a decode step reads. The summary says
//!   how many were kept.
//!
//! Biases, sinks and other 1-D tensors are never quantized; neither are embeddings, norms, routers or the LM head.

use super::{Pass, PassOptions};
use anyhow::{bail, Result};
use mimo_ir::{DType, Graph, Op, WeightClass};

pub struct QuantizeDense;

impl Pass for QuantizeDense {
    fn name(&self) -> &'static str {
        "quantize-dense"
    }

    fn run(&self, g: &mut Graph, opts: &PassOptions) -> Result<String> {
        let target = opts.dense;
        if !matches!(target, DType::F8E4M3 | DType::BF16) {
            bail!(
                "dense weights can be packed as f8e4m3 or bf16, not {}",
                target.name()
            );
        }
        let dense: Vec<_> =
            g.g.node_indices()
                .filter(|&n| {
                    let node = g.node(n);
                    matches!(
                        node.op,
                        Op::Weight {
                            class: WeightClass::Attention | WeightClass::DenseMlp,
                            ..
                        }
                    ) && node.ty.shape.len() == 2
                })
                .collect();
        let (mut changed, mut kept_fp8) = (0usize, 0usize);
        for n in dense {
            match (target, g.node(n).ty.dtype) {
                (_, DType::F8E4M3) => kept_fp8 += 1,
                (DType::F8E4M3, DType::BF16 | DType::F16 | DType::F32) => {
                    g.node_mut(n).ty.dtype = DType::F8E4M3;
                    changed += 1;
                }
                _ => {}
            }
        }
        let mut msg = format!("{changed} attention/dense-mlp weights -> {}", target.name());
        if kept_fp8 > 0 {
            msg += &format!("; kept {kept_fp8} FP8 checkpoint weights as FP8");
        }
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::Tb;
    use super::*;
    use mimo_ir::*;

    fn graph(q_dtype: DType) -> Graph {
        let mut t = Tb::new(64);
        let x = t.x;
        let qw = t.weight("q.w", WeightClass::Attention, q_dtype, &[64, 64]);
        let qb = t.weight("q.b", WeightClass::Attention, DType::F32, &[64]);
        let q = t.op(
            "q",
            Op::MatMul {
                has_bias: true,
                norm_eps: None,
                epilogue: vec![],
            },
            TensorType::act(64),
            &[x, qw, qb],
        );
        let gu = t.matmul_class("gate_up", q, 256, WeightClass::DenseMlp);
        let hw = t.weight("head", WeightClass::LmHead, DType::BF16, &[16, 256]);
        let lg = t.op(
            "lm_head",
            Op::LmHead { norm_eps: None },
            TensorType::act(16),
            &[gu, hw],
        );
        t.output(lg);
        t.g
    }

    #[test]
    fn projections_become_fp8() {
        let opts = PassOptions {
            dense: DType::F8E4M3,
            ..Default::default()
        };
        let mut g = graph(DType::BF16);
        let msg = QuantizeDense.run(&mut g, &opts).unwrap();
        assert_eq!(msg, "2 attention/dense-mlp weights -> f8e4m3");
        g.verify().unwrap();
        let text = g.to_text();
        assert!(text.contains(": f8e4m3[64,64]  ; q.w"), "{text}");
        assert!(text.contains(": f8e4m3[256,64]  ; gate_up.w"), "{text}");
        assert!(text.contains(": f32[64]  ; q.b"), "{text}");
        assert!(text.contains(": bf16[16,256]  ; head"), "{text}");
        assert!(text.contains(": bf16[16,64]  ; embed"), "{text}");
    }

    #[test]
    fn fp8_checkpoint_weights_stay_fp8() {
        for dense in [DType::F8E4M3, DType::BF16] {
            let opts = PassOptions {
                dense,
                ..Default::default()
            };
            let mut g = graph(DType::F8E4M3);
            let msg = QuantizeDense.run(&mut g, &opts).unwrap();
            assert!(
                msg.ends_with("; kept 1 FP8 checkpoint weights as FP8"),
                "{msg}"
            );
            let text = g.to_text();
            assert!(text.contains(": f8e4m3[64,64]  ; q.w"), "{text}");
        }
    }

    #[test]
    fn bf16_changes_nothing() {
        let mut g = graph(DType::BF16);
        let before = g.to_text();
        let msg = QuantizeDense.run(&mut g, &PassOptions::default()).unwrap();
        assert_eq!(msg, "0 attention/dense-mlp weights -> bf16");
        assert_eq!(g.to_text(), before);
    }
}
