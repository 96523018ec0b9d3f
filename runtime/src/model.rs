//! A loaded plan: the checked plan, the memory-mapped weights, and typed views on them.

use anyhow::{bail, Context, Result};
use mimo_ir::plan::{memmap2_shim::Weights, read_plan_dir, Plan, WeightDesc, WeightId};
use mimo_ir::DType;
use mimo_kernels::cpu::WeightView;
use std::path::Path;
use std::sync::Arc;

pub struct Model {
    pub plan: Plan,
    weights: Weights,
    /// f32 copies of 1-D / router weights (norms, biases, sinks): small, read often.
    small: Vec<Option<Vec<f32>>>,
    pub tokenizer: tokenizers::Tokenizer,
}

impl Model {
    /// Load and check a plan directory. `verify_weights` hashes weights.bin against the header.
    pub fn load(dir: &Path, verify_weights: bool) -> Result<Arc<Model>> {
        if !dir.is_dir() {
            bail!("plan directory {} does not exist", dir.display());
        }
        let (plan, weights) = read_plan_dir(dir, verify_weights)?;
        let tokenizer = tokenizers::Tokenizer::from_bytes(plan.tokenizer_json.as_bytes())
            .map_err(|e| anyhow::anyhow!("plan's tokenizer does not load: {e}"))?;
        let mut m = Model {
            plan,
            weights,
            small: vec![],
            tokenizer,
        };
        let small: Vec<Option<Vec<f32>>> = m
            .plan
            .weights
            .iter()
            .map(|w| {
                if w.dims.len() == 1 || (w.dtype == DType::F32 && w.elems() <= 1 << 20) {
                    let v = m.view_desc(w);
                    let (r, c) = (v.rows(), v.cols());
                    let mut out = vec![0f32; r * c];
                    for (i, row) in out.chunks_mut(c).enumerate() {
                        v.row_into(i, row);
                    }
                    Some(out)
                } else {
                    None
                }
            })
            .collect();
        m.small = small;
        Ok(Arc::new(m))
    }

    pub fn from_parts(plan: Plan, weights: Weights) -> Result<Model> {
        let tokenizer = tokenizers::Tokenizer::from_bytes(plan.tokenizer_json.as_bytes())
            .map_err(|e| anyhow::anyhow!("plan's tokenizer does not load: {e}"))
            .context("loading tokenizer")?;
        Ok(Model {
            plan,
            weights,
            small: vec![],
            tokenizer,
        })
    }

    pub fn weights_bytes(&self) -> &[u8] {
        self.weights.bytes()
    }

    fn view_desc(&self, w: &WeightDesc) -> WeightView<'_> {
        let b = self.weights.bytes();
        let data = &b[w.offset as usize..(w.offset + w.nbytes) as usize];
        let scales = &b[w.scale_offset as usize..(w.scale_offset + w.scale_nbytes) as usize];
        let cols = *w.dims.last().unwrap_or(&1);
        let rows = w.elems() / cols.max(1);
        match w.dtype {
            DType::F32 => WeightView::F32 { data, rows, cols },
            DType::BF16 => WeightView::BF16 { data, rows, cols },
            DType::F16 => WeightView::F16 { data, rows, cols },
            DType::F8E4M3 => WeightView::F8 {
                data,
                scales,
                rows,
                cols,
            },
            DType::MXFP4 => WeightView::Mxfp4 {
                data,
                scales,
                rows,
                cols,
            },
            other => unreachable!("plan validation rejects weights of dtype {}", other.name()),
        }
    }

    /// 2-D view of a weight (3-D expert weights flatten their first two dims).
    pub fn view(&self, w: WeightId) -> WeightView<'_> {
        self.view_desc(&self.plan.weights[w as usize])
    }

    /// View of expert `e` of a 3-D `[E, rows, cols]` weight.
    pub fn expert(&self, w: WeightId, e: usize) -> WeightView<'_> {
        let d = &self.plan.weights[w as usize];
        let rows = d.dims[d.dims.len() - 2];
        let cols = d.dims[d.dims.len() - 1];
        let b = self.weights.bytes();
        match d.dtype {
            // FP8 blocks restart at every expert: slice data and the expert's scale grid.
            DType::F8E4M3 => {
                let per = rows * cols;
                let grid = rows.div_ceil(128) * cols.div_ceil(128) * 4;
                let o = d.offset as usize + e * per;
                let so = d.scale_offset as usize + e * grid;
                WeightView::F8 {
                    data: &b[o..o + per],
                    scales: &b[so..so + grid],
                    rows,
                    cols,
                }
            }
            _ => self.view(w).rows_range(e * rows, rows),
        }
    }

    /// f32 values of a small weight (norm, bias, sinks, router).
    pub fn small(&self, w: WeightId) -> &[f32] {
        self.small[w as usize]
            .as_deref()
            .expect("small weights are decoded at load")
    }
}
