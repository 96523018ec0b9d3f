use anyhow::{bail, Result};
use clap::{Parser, Subcommand, ValueEnum};
use mimo_runtime::cpu::CpuSession;
use mimo_runtime::generate::generate;
use mimo_runtime::model::Model;
use mimo_runtime::sampling::{Sampler, SamplingParams};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "mimort",
    about = "mimo runtime: run a compiled MiMo plan",
    version
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Debug)]
enum DeviceArg {
    Cpu,
    Cuda,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate a completion for one prompt.
    Generate {
        plan: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 32)]
        max_tokens: usize,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// KV-cache capacity in tokens.
        #[arg(long, default_value_t = 4096)]
        max_ctx: usize,
        /// Execution device (default: cuda when a GPU is present, else cpu).
        #[arg(long, value_enum)]
        device: Option<DeviceArg>,
        /// Print timing statistics.
        #[arg(long)]
        stats: bool,
        /// Skip hashing weights.bin at load.
        #[arg(long)]
        no_verify: bool,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("mimort: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Generate {
            plan,
            prompt,
            max_tokens,
            temperature,
            top_p,
            seed,
            max_ctx,
            device,
            stats,
            no_verify,
        } => {
            if !(temperature >= 0.0 && temperature.is_finite()) {
                bail!("--temperature must be a finite number >= 0");
            }
            if !(top_p > 0.0 && top_p <= 1.0) {
                bail!("--top-p must be in (0, 1]");
            }
            let device = device.unwrap_or(DeviceArg::Cpu);
            if device == DeviceArg::Cuda {
                bail!("--device cuda: this build's CUDA backend is not available on this machine");
            }
            let t0 = Instant::now();
            let model = Model::load(&plan, !no_verify)?;
            let load_s = t0.elapsed().as_secs_f64();
            let ids: Vec<u32> = model
                .tokenizer
                .encode(prompt.as_str(), false)
                .map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?
                .get_ids()
                .to_vec();
            let eos = model.plan.model.eos.clone();
            let mut sess =
                CpuSession::new(model.clone(), max_ctx.min(model.plan.model.max_position));
            let mut sampler = Sampler::new(SamplingParams {
                temperature,
                top_p,
                seed,
            });
            print!("{prompt}");
            std::io::stdout().flush()?;
            let t1 = Instant::now();
            let mut first: Option<f64> = None;
            let mut shown = String::new();
            let mut acc: Vec<u32> = vec![];
            let (out, finish) = generate(&mut sess, &ids, max_tokens, &mut sampler, &eos, |t| {
                first.get_or_insert(t1.elapsed().as_secs_f64());
                acc.push(t);
                if let Ok(s) = model.tokenizer.decode(&acc, true) {
                    if s.len() > shown.len() && s.starts_with(&shown) {
                        print!("{}", &s[shown.len()..]);
                        let _ = std::io::stdout().flush();
                        shown = s;
                    }
                }
                true
            })?;
            println!();
            let total = t1.elapsed().as_secs_f64();
            if stats {
                let decode = total - first.unwrap_or(0.0);
                eprintln!(
                    "device=cpu load={load_s:.3}s prompt_tokens={} new_tokens={} finish={finish:?} ttft={:.3}s \
                     decode_tok_per_s={:.1}",
                    ids.len(),
                    out.len(),
                    first.unwrap_or(0.0),
                    (out.len().saturating_sub(1)) as f64 / decode.max(1e-9)
                );
            }
        }
    }
    Ok(())
}
