//! mimoc: checkpoint -> IR -> passes -> plan (+ CUDA megakernel source).

pub mod codegen;
pub mod draft;
pub mod lower;
pub mod pack;
pub mod passes;
pub mod report;
pub mod synth;

use anyhow::{bail, Context, Result};
use mimo_ir::plan::{ModelInfo, Plan};
use mimo_ir::Graph;
use mimo_models::build::{build_graph, BuildOptions};
use mimo_models::checkpoint::Checkpoint;
use passes::PassOptions;
use std::path::{Path, PathBuf};

/// Options of `mimoc compile`.
#[derive(Clone, Debug)]
pub struct CompileOptions {
    pub passes: PassOptions,
    /// Most tokens per forward (verify block / prefill chunk).
    pub max_tokens: usize,
    pub progress: bool,
    /// Target layers whose hidden states are plan outputs (for the DFlash draft).
    pub capture_layers: Vec<usize>,
    /// DFlash draft checkpoint to compile into the plan; `None`: `<checkpoint>/draft` when it exists.
    pub draft: Option<PathBuf>,
    /// Compile no draft even if `<checkpoint>/draft` exists.
    pub no_draft: bool,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            passes: PassOptions::default(),
            max_tokens: 16,
            progress: false,
            capture_layers: vec![],
            draft: None,
            no_draft: false,
        }
    }
}

/// Build the unfused IR of a checkpoint.
pub fn build_ir(ck: &Checkpoint, opts: &CompileOptions) -> Graph {
    let b = BuildOptions {
        expert_layout: ck.expert_layout,
        fp8_checkpoint: ck.config.fp8.is_some(),
        capture_layers: opts.capture_layers.clone(),
        ..Default::default()
    };
    build_graph(&ck.config, &b)
}

/// The IR after the pipeline has run up to `after` (`build` = before any pass; None = all passes).
pub fn ir_after(
    ck: &Checkpoint,
    opts: &CompileOptions,
    after: Option<&str>,
) -> Result<(Graph, Vec<String>)> {
    let mut g = build_ir(ck, opts);
    g.verify()?;
    let log = passes::run_pipeline(&mut g, &opts.passes, after)?;
    Ok((g, log))
}

/// What `compile` did.
pub struct CompileReport {
    pub plan: Plan,
    pub pass_log: Vec<String>,
    pub instr_count: usize,
    /// Whether nvcc compiled the megakernel (else the runtime compiles its source with NVRTC).
    pub cubin: bool,
}

/// Compile the checkpoint at `ckpt_dir` into a plan directory `out`. The plan is built in a sibling temporary
/// directory and swapped in only when complete, so a failure never damages an existing plan at `out`.
pub fn compile(ckpt_dir: &Path, out: &Path, opts: &CompileOptions) -> Result<CompileReport> {
    if opts.max_tokens == 0 || opts.max_tokens > 256 {
        bail!("--max-tokens must be in 1..=256, got {}", opts.max_tokens);
    }
    let ck = Checkpoint::open(ckpt_dir)?;
    let draft_dir = match &opts.draft {
        _ if opts.no_draft => None,
        Some(d) => Some(d.clone()),
        None => Some(ckpt_dir.join("draft")).filter(|d| d.join("config.json").is_file()),
    };
    let draft_ck = draft_dir
        .map(|d| {
            mimo_models::draft::DraftCheckpoint::open(&d)
                .with_context(|| format!("loading the DFlash draft {}", d.display()))
        })
        .transpose()?;
    let mut opts = opts.clone();
    if let Some(d) = &draft_ck {
        // The target exposes the hidden states the draft reads.
        for &l in &d.config.target_layers {
            if !opts.capture_layers.contains(&l) {
                opts.capture_layers.push(l);
            }
        }
    }
    let opts = &opts;
    let (g, pass_log) = ir_after(&ck, opts, None)?;
    let lowered = lower::lower(&g, "target", opts.max_tokens)?;
    let lowered_draft = draft_ck
        .as_ref()
        .map(|d| draft::lower_draft(&ck.config, d, &opts.passes, opts.max_tokens))
        .transpose()?;
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".mimoc-")
        .tempdir_in(parent)
        .with_context(|| format!("creating a temporary directory in {}", parent.display()))?;
    let target_weights = lowered.weights.clone();
    let (merged, draft_info) = match (&lowered_draft, &draft_ck) {
        (Some(ld), Some(_)) => (draft::merge(&g, lowered, ld)?, Some(ld.info.clone())),
        _ => (
            draft::Merged {
                buffers: lowered.buffers,
                arena_len: lowered.arena_len,
                kv: lowered.kv,
                programs: vec![lowered.program],
                ctx_weights: vec![],
                block_weights: vec![],
            },
            None,
        ),
    };
    let (weights, weights_len, weights_hash) = match (&lowered_draft, &draft_ck) {
        (Some(ld), Some(dck)) => pack::pack_weights(
            &draft::WithDraft {
                target: &ck,
                draft: dck,
            },
            &[
                (&g, &target_weights),
                (&ld.ctx.0, &merged.ctx_weights),
                (&ld.block.0, &merged.block_weights),
            ],
            tmp.path(),
            opts.progress,
        )?,
        _ => pack::pack_weights(&ck, &[(&g, &target_weights)], tmp.path(), opts.progress)?,
    };
    let cfg = &ck.config;
    let plan = Plan {
        model: crate::model_info(cfg),
        max_tokens: opts.max_tokens,
        arena_len: merged.arena_len,
        buffers: merged.buffers,
        weights,
        kv: merged.kv,
        programs: merged.programs,
        passes: pass_log.clone(),
        tokenizer_json: ck.tokenizer_json()?,
        chat_template: ck.chat_template(),
        weights_len,
        draft: draft_info,
    };
    plan.validate()?;
    mimo_ir::plan::write_plan_file(tmp.path(), &plan, weights_hash)?;
    let cubin = codegen::emit(&plan, tmp.path())?;
    swap_in(tmp, out)?;
    let instr_count = plan.programs.iter().map(|p| p.instrs.len()).sum();
    Ok(CompileReport {
        plan,
        pass_log,
        instr_count,
        cubin,
    })
}

/// Replace `out` with the finished temporary directory.
fn swap_in(tmp: tempfile::TempDir, out: &Path) -> Result<()> {
    let old: Option<PathBuf> = if out.exists() {
        if !out.is_dir() {
            bail!("{} exists and is not a directory", out.display());
        }
        let o = out.with_extension(format!("old-{}", std::process::id()));
        std::fs::rename(out, &o)
            .with_context(|| format!("moving the old plan {} aside", out.display()))?;
        Some(o)
    } else {
        None
    };
    let t = tmp.keep();
    if let Err(e) = std::fs::rename(&t, out) {
        if let Some(o) = &old {
            let _ = std::fs::rename(o, out);
        }
        return Err(e).with_context(|| format!("moving the new plan into {}", out.display()));
    }
    if let Some(o) = old {
        let _ = std::fs::remove_dir_all(o);
    }
    Ok(())
}

/// The model facts a plan carries, from the config.
pub fn model_info(cfg: &mimo_models::config::ModelConfig) -> ModelInfo {
    ModelInfo {
        arch: cfg.arch.model_type().to_string(),
        vocab: cfg.vocab,
        hidden: cfg.hidden,
        n_layers: cfg.n_layers(),
        bos: cfg.bos,
        eos: cfg.eos.clone(),
        max_position: cfg.max_position,
    }
}
