use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use mimo_compiler::{compile, ir_after, CompileOptions};
use mimo_ir::DType;
use mimo_models::checkpoint::Checkpoint;
use mimo_models::config::Arch;
use mimo_models::tiny::{make_tiny, TinyOptions};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "mimoc",
    about = "mimo ahead-of-time compiler for MiMo MoE models",
    version
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum ArchArg {
    Moe,
    Dense,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum ExpertsArg {
    Mxfp4,
    Bf16,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum DenseArg {
    Bf16,
    Fp8,
}

#[derive(clap::Args, Clone)]
struct PassArgs {
    /// Packed format of MoE expert weights.
    #[arg(long, value_enum, default_value = "mxfp4")]
    experts: ExpertsArg,
    /// Packed format of attention / dense-MLP weights.
    #[arg(long, value_enum, default_value = "bf16")]
    dense: DenseArg,
    /// Skip the fusion passes.
    #[arg(long)]
    no_fuse: bool,
    /// Most tokens per forward (DFlash verify block / prefill chunk).
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
}

impl PassArgs {
    fn options(&self) -> CompileOptions {
        let mut o = CompileOptions::default();
        o.passes.fuse = !self.no_fuse;
        o.passes.experts = if self.experts == ExpertsArg::Mxfp4 {
            DType::MXFP4
        } else {
            DType::BF16
        };
        o.passes.dense = if self.dense == DenseArg::Fp8 {
            DType::F8E4M3
        } else {
            DType::BF16
        };
        o.max_tokens = self.max_tokens;
        o
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Write a small random-weight checkpoint in the Hugging Face format.
    MakeTiny {
        dir: PathBuf,
        #[arg(long, value_enum, default_value = "moe")]
        arch: ArchArg,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Store projections as block-scaled FP8 (as MiMo's FP8 checkpoints do).
        #[arg(long)]
        fp8: bool,
        /// Also write a random DFlash draft (public layout) into `<dir>/draft/`.
        #[arg(long)]
        draft: bool,
    },
    /// Compile a checkpoint into a plan directory.
    Compile {
        checkpoint: PathBuf,
        #[arg(short, long)]
        out: PathBuf,
        #[command(flatten)]
        passes: PassArgs,
        /// Print the bytes one decode step reads, by weight class, and the bandwidth time floor.
        #[arg(long)]
        report: bool,
        /// Context length (tokens) at which `--report` counts KV-cache reads.
        #[arg(long, default_value_t = 4096)]
        context: usize,
        /// DFlash draft checkpoint to compile into the plan (default: `<checkpoint>/draft` if present).
        #[arg(long)]
        draft: Option<PathBuf>,
        /// Do not compile a draft even if `<checkpoint>/draft` exists.
        #[arg(long, conflicts_with = "draft")]
        no_draft: bool,
    },
    /// Compile a benchmark plan from a config alone, with random weights generated in their packed formats.
    /// Default config: MiMo-V2-Flash with the expert count cut to `--experts` (per-token bytes unchanged).
    MakeBench {
        #[arg(short, long)]
        out: PathBuf,
        /// A config.json to use instead of the MiMo-V2-Flash defaults.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Number of routed experts (the real model has 256; per-token bytes do not depend on it).
        #[arg(long = "n-experts", default_value_t = 16)]
        n_experts: usize,
        /// Keep only the first N layers (smoke tests).
        #[arg(long)]
        layers: Option<usize>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[command(flatten)]
        passes: PassArgs,
    },
    /// Print the IR as text after a pass (`build` = before any pass; default: after all passes).
    DumpIr {
        checkpoint: PathBuf,
        #[arg(long)]
        after: Option<String>,
        #[command(flatten)]
        passes: PassArgs,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("mimoc: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::MakeTiny {
            dir,
            arch,
            seed,
            fp8,
            draft,
        } => {
            let arch = match arch {
                ArchArg::Moe => Arch::MimoV2Flash,
                ArchArg::Dense => Arch::Mimo,
            };
            make_tiny(
                &dir,
                &TinyOptions {
                    arch,
                    seed,
                    fp8,
                    fused_experts: false,
                },
            )?;
            println!(
                "wrote tiny {} checkpoint to {}",
                arch.model_type(),
                dir.display()
            );
            if draft {
                let d = mimo_models::draft::make_tiny_draft(&dir, seed)?;
                println!("wrote tiny DFlash draft to {}", d.display());
            }
        }
        Cmd::Compile {
            checkpoint,
            out,
            passes,
            report,
            context,
            draft,
            no_draft,
        } => {
            let mut o = passes.options();
            o.progress = true;
            o.draft = draft;
            o.no_draft = no_draft;
            let r = compile(&checkpoint, &out, &o)?;
            for l in &r.pass_log {
                println!("pass {l}");
            }
            let wbytes: u64 = r.plan.weights.iter().map(|w| w.total_bytes()).sum();
            println!(
                "compiled {} -> {}: {} instructions, {} weights ({:.2} MB), arena {} floats",
                checkpoint.display(),
                out.display(),
                r.instr_count,
                r.plan.weights.len(),
                wbytes as f64 / 1e6,
                r.plan.arena_len
            );
            if let Some(d) = &r.plan.draft {
                println!(
                    "DFlash draft: {} layers (KV layers {:?}), reads target layers {:?}, block size {}, window {}, mask token {}",
                    d.kv_layers.len(),
                    d.kv_layers,
                    d.target_layers,
                    d.block_size,
                    d.window,
                    d.mask_token
                );
            }
            if report {
                print!("{}", mimo_compiler::report::decode_report(&r.plan, context));
            }
        }
        Cmd::MakeBench {
            out,
            config,
            n_experts: experts,
            layers,
            seed,
            passes,
        } => {
            let mut cfg = match &config {
                Some(p) => mimo_models::config::ModelConfig::from_file(p)?,
                None => mimo_models::config::ModelConfig::from_json_str(
                    r#"{"model_type":"mimo_v2_flash"}"#,
                )?,
            };
            for l in cfg.layers.iter_mut() {
                if let mimo_models::config::MlpLayer::Moe(m) = &mut l.mlp {
                    if experts < m.top_k || experts % m.n_group != 0 {
                        anyhow::bail!(
                            "--experts {experts} must be >= top_k {} and divisible by n_group",
                            m.top_k
                        );
                    }
                    m.n_experts = experts;
                }
            }
            if let Some(n) = layers {
                if n == 0 || n > cfg.layers.len() {
                    anyhow::bail!("--layers must be in 1..={}", cfg.layers.len());
                }
                cfg.layers.truncate(n);
            }
            let mut o = passes.options();
            o.progress = true;
            let plan = mimo_compiler::synth::compile_synthetic(&cfg, &out, &o, seed)?;
            let wbytes: u64 = plan.weights.iter().map(|w| w.total_bytes()).sum();
            println!(
                "bench plan -> {}: {} layers, {} experts, {} instructions, {:.2} GB weights",
                out.display(),
                cfg.layers.len(),
                experts,
                plan.programs[0].instrs.len(),
                wbytes as f64 / 1e9
            );
        }
        Cmd::DumpIr {
            checkpoint,
            after,
            passes,
        } => {
            let ck = Checkpoint::open(&checkpoint)?;
            let (g, log) = ir_after(&ck, &passes.options(), after.as_deref())?;
            for l in log {
                println!("# pass {l}");
            }
            print!("{}", g.to_text());
        }
    }
    Ok(())
}
