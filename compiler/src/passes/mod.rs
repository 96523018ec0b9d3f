//! The pass pipeline. Each pass is one file; `mimoc dump-ir --after <pass>` prints the graph after it.

use anyhow::Result;
use mimo_ir::{DType, Graph};

pub mod dce;

/// What the passes may depend on.
#[derive(Clone, Debug)]
pub struct PassOptions {
    /// Run the fusion passes.
    pub fuse: bool,
    /// Packed dtype of MoE experts: MXFP4 (default) or bf16.
    pub experts: DType,
    /// Packed dtype of attention / dense projections: bf16 (default) or FP8.
    pub dense: DType,
}

impl Default for PassOptions {
    fn default() -> Self {
        PassOptions {
            fuse: true,
            experts: DType::MXFP4,
            dense: DType::BF16,
        }
    }
}

pub trait Pass {
    fn name(&self) -> &'static str;
    /// Rewrite the graph; returns a one-line summary of what changed.
    fn run(&self, g: &mut Graph, opts: &PassOptions) -> Result<String>;
}

/// The passes, in pipeline order.
pub fn pipeline() -> Vec<Box<dyn Pass>> {
    vec![Box::new(dce::Dce)]
}

/// Names of the passes, in order.
pub fn pass_names() -> Vec<&'static str> {
    pipeline().iter().map(|p| p.name()).collect()
}

/// Run the pipeline up to and including `stop_after` (all when None). Verifies after every pass.
/// Returns the summary line of each pass that ran.
pub fn run_pipeline(
    g: &mut Graph,
    opts: &PassOptions,
    stop_after: Option<&str>,
) -> Result<Vec<String>> {
    if let Some(s) = stop_after {
        if s != "build" && !pass_names().contains(&s) {
            anyhow::bail!(
                "unknown pass {s:?}; passes are: build, {}",
                pass_names().join(", ")
            );
        }
        if s == "build" {
            return Ok(vec![]);
        }
    }
    let mut log = vec![];
    for p in pipeline() {
        let msg = p.run(g, opts)?;
        g.verify()
            .map_err(|e| anyhow::anyhow!("after pass {}: {e}", p.name()))?;
        log.push(format!("{}: {msg}", p.name()));
        if Some(p.name()) == stop_after {
            break;
        }
    }
    Ok(log)
}
