use anyhow::{bail, Result};
use clap::{Parser, Subcommand, ValueEnum};
use mimo_runtime::cpu::CpuSession;
use mimo_runtime::cuda::CudaSession;
use mimo_runtime::generate::{generate, Backend};
use mimo_runtime::model::Model;
use mimo_runtime::sampling::{Sampler, SamplingParams};
use mimo_runtime::spec::{default_block, spec_generate};
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
        /// Print timing statistics (and, with a DFlash draft, acceptance statistics).
        #[arg(long)]
        stats: bool,
        /// Skip hashing weights.bin at load.
        #[arg(long)]
        no_verify: bool,
        /// DFlash verify block size (1..=the plan's max_tokens; default 8, capped by the draft's block size).
        #[arg(long)]
        block_size: Option<usize>,
        /// Plain decoding even when the plan has a DFlash draft.
        #[arg(long)]
        no_spec: bool,
    },
    /// Print the logits of every position of a token sequence as JSON (engineering / reference checks).
    Logits {
        plan: PathBuf,
        /// Comma-separated token ids, or @file.json holding a JSON list.
        #[arg(long)]
        tokens: String,
        #[arg(long, value_enum)]
        device: Option<DeviceArg>,
        /// Tokens per forward (default: the plan's maximum).
        #[arg(long)]
        chunk: Option<usize>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Compare the GPU megakernel against the CPU interpreter on the same plan (prefill + decode).
    VerifyGpu {
        plan: PathBuf,
        #[arg(long, default_value_t = 40)]
        prefill: usize,
        #[arg(long, default_value_t = 24)]
        decode: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Fail (exit 1) when an error exceeds this relative bound.
        #[arg(long, default_value_t = 1e-3)]
        bound: f32,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Serve the plan over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models,
    /// /health, /metrics).
    Serve {
        plan: PathBuf,
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// Execution device (default: cuda when a GPU is present, else cpu). cuda serves one sequence at a time.
        #[arg(long, value_enum)]
        device: Option<DeviceArg>,
        /// Sequences decoded together (each holds its own KV cache of --max-ctx tokens).
        #[arg(long, default_value_t = 8)]
        max_batch: usize,
        /// Requests that may wait for a slot; more get 429.
        #[arg(long, default_value_t = 64)]
        max_queue: usize,
        /// KV-cache capacity per sequence in tokens (prompt + completion).
        #[arg(long, default_value_t = 4096)]
        max_ctx: usize,
        /// Require 'Authorization: Bearer KEY' on every route but /health (default: $MIMO_API_KEY if set).
        #[arg(long)]
        api_key: Option<String>,
        /// Model id clients must name (default: the plan directory's name).
        #[arg(long)]
        model_name: Option<String>,
        /// Seconds shutdown waits for in-flight requests.
        #[arg(long, default_value_t = 30)]
        shutdown_grace: u64,
        /// Skip hashing weights.bin at load.
        #[arg(long)]
        no_verify: bool,
    },
    /// Decode-step benchmark on the GPU against the HBM bandwidth floor measured in the same run.
    Bench {
        plan: PathBuf,
        #[arg(long, default_value = "1,4,8,16")]
        tokens: String,
        #[arg(long, default_value_t = 512)]
        context: usize,
        #[arg(long, default_value_t = 20)]
        iters: usize,
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write every block's start / end per instruction of the profiled forwards (text, see
        /// `tools::timeline_text`).
        #[arg(long)]
        timeline: Option<PathBuf>,
    },
}

fn parse_list(s: &str) -> Result<Vec<usize>> {
    s.split(',')
        .filter(|x| !x.trim().is_empty())
        .map(|x| {
            x.trim()
                .parse::<usize>()
                .map_err(|e| anyhow::anyhow!("bad number {x:?}: {e}"))
        })
        .collect()
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
            block_size,
            no_spec,
        } => {
            if !(temperature >= 0.0 && temperature.is_finite()) {
                bail!("--temperature must be a finite number >= 0");
            }
            if !(top_p > 0.0 && top_p <= 1.0) {
                bail!("--top-p must be in (0, 1]");
            }
            let device = device.unwrap_or(if mimo_runtime::cuda::cuda_available() {
                DeviceArg::Cuda
            } else {
                DeviceArg::Cpu
            });
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
            let ctx = max_ctx.min(model.plan.model.max_position);
            let spec = !no_spec && model.plan.draft.is_some();
            if spec && device == DeviceArg::Cuda {
                eprintln!("mimort: note: DFlash speculative decoding runs on the CPU backend only for now; decoding plainly on the GPU (--device cpu for DFlash)");
            }
            if spec && device == DeviceArg::Cpu {
                let mut sess = CpuSession::new(model.clone(), ctx);
                let block = default_block(&sess, block_size);
                let mut sampler = Sampler::new(SamplingParams {
                    temperature,
                    top_p,
                    seed,
                });
                print!("{prompt}");
                std::io::stdout().flush()?;
                let mut shown = String::new();
                let mut acc: Vec<u32> = vec![];
                let (out, finish, st) = spec_generate(
                    &mut sess,
                    &ids,
                    max_tokens,
                    block,
                    &mut sampler,
                    &eos,
                    |t| {
                        acc.push(t);
                        if let Ok(s) = model.tokenizer.decode(&acc, true) {
                            if s.len() > shown.len() && s.starts_with(&shown) {
                                print!("{}", &s[shown.len()..]);
                                let _ = std::io::stdout().flush();
                                shown = s;
                            }
                        }
                        true
                    },
                )?;
                println!();
                if stats {
                    eprintln!(
                        "device=Cpu load={load_s:.3}s prompt_tokens={} new_tokens={} finish={finish:?} dflash: {}",
                        ids.len(),
                        out.len(),
                        st.summary()
                    );
                }
                return Ok(());
            }
            let mut sess: Box<dyn Backend> = match device {
                DeviceArg::Cpu => Box::new(CpuSession::new(model.clone(), ctx)),
                DeviceArg::Cuda => Box::new(CudaSession::new(model.clone(), &plan, ctx, 0)?),
            };
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
                    "device={device:?} load={load_s:.3}s prompt_tokens={} new_tokens={} finish={finish:?} ttft={:.3}s \
                     decode_tok_per_s={:.1}",
                    ids.len(),
                    out.len(),
                    first.unwrap_or(0.0),
                    (out.len().saturating_sub(1)) as f64 / decode.max(1e-9)
                );
            }
        }
        Cmd::Logits {
            plan,
            tokens,
            device,
            chunk,
            out,
        } => {
            let toks: Vec<u32> = if let Some(f) = tokens.strip_prefix('@') {
                serde_json::from_str(&std::fs::read_to_string(f)?)?
            } else {
                parse_list(&tokens)?.into_iter().map(|x| x as u32).collect()
            };
            let model = Model::load(&plan, true)?;
            let chunk = chunk.unwrap_or(model.plan.max_tokens);
            let ctx = toks.len() + 1;
            let mut b: Box<dyn Backend> = match device.unwrap_or(DeviceArg::Cpu) {
                DeviceArg::Cpu => Box::new(CpuSession::new(model.clone(), ctx)),
                DeviceArg::Cuda => Box::new(CudaSession::new(model.clone(), &plan, ctx, 0)?),
            };
            let logits = mimo_runtime::tools::all_logits(&mut b, &toks, chunk)?;
            let j = serde_json::json!({"tokens": toks, "logits": logits});
            std::fs::write(&out, serde_json::to_string(&j)?)?;
            println!(
                "wrote {} positions of logits to {}",
                logits.len(),
                out.display()
            );
        }
        Cmd::VerifyGpu {
            plan,
            prefill,
            decode,
            seed,
            bound,
            json,
        } => {
            let r = mimo_runtime::tools::verify_gpu(&plan, prefill, decode, seed)?;
            let text = serde_json::to_string_pretty(&r)?;
            println!("{text}");
            if let Some(j) = json {
                std::fs::write(j, &text)?;
            }
            let ok = r.max_rel_err_prefill <= bound && r.max_rel_err_decode <= bound;
            if !(ok && r.in_kernel_argmax_ok) {
                bail!("GPU does not match CPU within {bound}");
            }
        }
        Cmd::Bench {
            plan,
            tokens,
            context,
            iters,
            json,
            timeline,
        } => {
            let r = mimo_runtime::tools::bench_gpu(
                &plan,
                &parse_list(&tokens)?,
                context,
                iters,
                timeline.as_deref(),
            )?;
            println!(
                "device {} ({} SMs), HBM copy {:.0} GB/s, context {}",
                r.device, r.sms, r.hbm_copy_gbps, r.context
            );
            println!(
                "{:>6} {:>10} {:>10} {:>12} {:>10} {:>8}",
                "tokens", "ms/step", "tok/s", "MB/step", "floor ms", "of floor"
            );
            for row in &r.rows {
                println!(
                    "{:>6} {:>10.3} {:>10.1} {:>12.1} {:>10.3} {:>7.1}%",
                    row.tokens,
                    row.ms_median,
                    row.tok_per_s,
                    row.bytes / 1e6,
                    row.floor_ms,
                    100.0 * row.floor_frac
                );
            }
            for pr in &r.profile {
                println!(
                    "profile T={}: {:.0} us in-kernel; ring: consumers wait {:.0}%, producer waits {:.0}%; by kind (span / busy / wait us, instrs, ring us, critical-path us):",
                    pr.tokens,
                    pr.total_us,
                    100.0 * pr.ring_consumer_wait_frac,
                    100.0 * pr.ring_producer_wait_frac
                );
                for o in &pr.ops {
                    println!(
                        "  {:>10} {:>9.1} {:>9.1} {:>9.1} {:>5}  ring {:>9.1}  path {:>9.1}",
                        o.op, o.span_us, o.busy_us, o.wait_us, o.instrs, o.ring_us, o.advance_us
                    );
                }
            }
            if let Some(j) = json {
                std::fs::write(j, serde_json::to_string_pretty(&r)?)?;
            }
        }
        Cmd::Serve {
            plan,
            host,
            port,
            device,
            max_batch,
            max_queue,
            max_ctx,
            api_key,
            model_name,
            shutdown_grace,
            no_verify,
        } => {
            use mimo_runtime::server::{serve, Device, ServeOptions};
            let device = match device.unwrap_or(if mimo_runtime::cuda::cuda_available() {
                DeviceArg::Cuda
            } else {
                DeviceArg::Cpu
            }) {
                DeviceArg::Cpu => Device::Cpu,
                DeviceArg::Cuda => Device::Cuda,
            };
            if max_batch == 0 || max_ctx < 2 {
                bail!("--max-batch must be at least 1 and --max-ctx at least 2");
            }
            let model_name = model_name.unwrap_or_else(|| {
                let p = plan.canonicalize().unwrap_or_else(|_| plan.clone());
                p.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "mimo".into())
            });
            let model = Model::load(&plan, !no_verify)?;
            let opts = ServeOptions {
                host,
                port,
                device,
                max_batch,
                max_queue,
                max_ctx,
                api_key: api_key
                    .or_else(|| std::env::var("MIMO_API_KEY").ok())
                    .filter(|k| !k.is_empty()),
                model_name,
                shutdown_grace: std::time::Duration::from_secs(shutdown_grace),
            };
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(serve(model, &plan, opts))?;
        }
    }
    Ok(())
}
