//! quantize-experts: choose the packed format of the MoE expert weights.
//!
//! - `--experts mxfp4` (default): every `Experts` weight in a float format (f32 / bf16 / f16, or FP8 from an FP8
//!   checkpoint) becomes MXFP4 (E2M1 values, one E8M0 scale per 32 elements along K: 4.25 bits per element). K
//!   (the last dim) must be a multiple of 32; the error names the weight otherwise. Packing quantizes the values.
//! - `--experts bf16`: f32 / f16 experts become bf16. Experts the checkpoint already stores as MXFP4
//!   (`WeightSource::Mxfp4`, gpt-oss layout) stay MXFP4 — expanding them would only add bytes, not precision —
//!   and FP8 checkpoint experts stay FP8 for the same reason; the summary says how many were kept.

use super::{Pass, PassOptions};
use anyhow::{bail, Result};
use mimo_ir::{DType, Graph, Op, WeightClass, WeightSource};

pub struct QuantizeExperts;

impl Pass for QuantizeExperts {
    fn name(&self) -> &'static str {
        "quantize-experts"
    }

    fn run(&self, g: &mut Graph, opts: &PassOptions) -> Result<String> {
        let target = opts.experts;
        if !matches!(target, DType::MXFP4 | DType::BF16) {
            bail!(
                "experts can be packed as mxfp4 or bf16, not {}",
                target.name()
            );
        }
        let experts: Vec<_> =
            g.g.node_indices()
                .filter(|&n| {
                    matches!(
                        g.node(n).op,
                        Op::Weight {
                            class: WeightClass::Experts,
                            ..
                        }
                    )
                })
                .collect();
        let (mut changed, mut kept_mxfp4, mut kept_fp8) = (0usize, 0usize, 0usize);
        for n in experts {
            let node = g.node(n);
            let Op::Weight { name, source, .. } = &node.op else {
                unreachable!("filtered on weights")
            };
            let from = node.ty.dtype;
            let to = match (target, from) {
                (DType::MXFP4, DType::MXFP4) => continue,
                (_, DType::MXFP4) => {
                    // Only a checkpoint's own MXFP4 experts can be MXFP4 before this pass.
                    debug_assert!(matches!(source, WeightSource::Mxfp4 { .. }));
                    kept_mxfp4 += 1;
                    continue;
                }
                (DType::MXFP4, DType::F32 | DType::BF16 | DType::F16 | DType::F8E4M3) => {
                    let k = node.ty.last();
                    if !k.is_multiple_of(32) {
                        bail!(
                            "cannot quantize expert weight {name} ({}) to MXFP4: its K dim {k} is not a multiple of 32 \
                             (use --experts bf16)",
                            node.ty
                        );
                    }
                    DType::MXFP4
                }
                (DType::BF16, DType::F8E4M3) => {
                    kept_fp8 += 1;
                    continue;
                }
                (DType::BF16, DType::F32 | DType::F16) => DType::BF16,
                _ => continue,
            };
            g.node_mut(n).ty.dtype = to;
            changed += 1;
        }
        let mut msg = format!("{changed} expert weights -> {}", target.name());
        if kept_mxfp4 > 0 {
            msg += &format!(
                "; kept {kept_mxfp4} expert weights as MXFP4 (the checkpoint stores them as MXFP4)"
            );
        }
        if kept_fp8 > 0 {
            msg += &format!(
                "; kept {kept_fp8} expert weights as FP8 (the checkpoint stores them as FP8)"
            );
        }
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::Tb;
    use super::*;
    use mimo_ir::*;

    /// A MoE block whose experts have hidden `h` and intermediate `inter`, with the given expert sources.
    fn graph(h: usize, inter: usize, mxfp4_source: bool) -> Graph {
        let mut t = Tb::new(h);
        let x = t.x;
        let r = t.router("router", x, 2, false);
        let (src_gu, src_d, dt) = if mxfp4_source {
            (
                WeightSource::Mxfp4 {
                    blocks: "gu_blocks".into(),
                    scales: "gu_scales".into(),
                },
                WeightSource::Mxfp4 {
                    blocks: "d_blocks".into(),
                    scales: "d_scales".into(),
                },
                DType::MXFP4,
            )
        } else {
            (
                WeightSource::Fused3d("gu".into()),
                WeightSource::Fused3d("d".into()),
                DType::BF16,
            )
        };
        let w = |t: &mut Tb, name: &str, src, dims: &[usize]| {
            t.op(
                name,
                Op::Weight {
                    name: name.into(),
                    source: src,
                    class: WeightClass::Experts,
                },
                TensorType::fixed(dt, dims),
                &[],
            )
        };
        let gu = w(&mut t, "experts.gate_up", src_gu, &[4, 2 * inter, h]);
        let d = w(&mut t, "experts.down", src_d, &[4, h, inter]);
        let m = t.op(
            "moe",
            Op::MoeExperts {
                n_experts: 4,
                top_k: 2,
                inter,
                norm_eps: None,
                residual: false,
            },
            TensorType::act(h),
            &[x, r, gu, d],
        );
        t.output(m);
        t.g
    }

    fn dtypes(g: &Graph) -> Vec<String> {
        let mut v: Vec<String> =
            g.g.node_indices()
                .filter(|&n| matches!(g.node(n).op, Op::Weight { .. }))
                .map(|n| format!("{}:{}", g.node(n).name, g.node(n).ty))
                .collect();
        v.sort();
        v
    }

    #[test]
    fn experts_become_mxfp4() {
        let mut g = graph(64, 32, false);
        let msg = QuantizeExperts
            .run(&mut g, &PassOptions::default())
            .unwrap();
        assert_eq!(msg, "2 expert weights -> mxfp4");
        g.verify().unwrap();
        let text = g.to_text();
        assert!(
            text.contains(": mxfp4[4,64,64]  ; experts.gate_up"),
            "{text}"
        );
        assert!(text.contains(": mxfp4[4,64,32]  ; experts.down"), "{text}");
        // Nothing else changes.
        assert!(text.contains(": f32[4,64]  ; router"), "{text}");
        assert!(text.contains(": bf16[16,64]  ; embed"), "{text}");
    }

    #[test]
    fn k_not_multiple_of_32_names_the_weight() {
        let mut g = graph(64, 24, false);
        let e = QuantizeExperts
            .run(&mut g, &PassOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("experts.down") && e.contains("K dim 24 is not a multiple of 32"),
            "{e}"
        );
    }

    #[test]
    fn bf16_keeps_checkpoint_mxfp4() {
        let opts = PassOptions {
            experts: DType::BF16,
            ..Default::default()
        };
        let mut g = graph(64, 32, true);
        let before = dtypes(&g);
        let msg = QuantizeExperts.run(&mut g, &opts).unwrap();
        assert_eq!(
            msg,
            "0 expert weights -> bf16; kept 2 expert weights as MXFP4 (the checkpoint stores them as MXFP4)"
        );
        assert_eq!(dtypes(&g), before);
        g.verify().unwrap();
        // bf16 experts stay bf16.
        let mut g = graph(64, 24, false);
        let before = dtypes(&g);
        assert_eq!(
            QuantizeExperts.run(&mut g, &opts).unwrap(),
            "0 expert weights -> bf16"
        );
        assert_eq!(dtypes(&g), before);
    }
}
