//! Engineering tools behind `mimort logits`, `mimort verify-gpu` and `mimort bench`.

use crate::cpu::CpuSession;
use crate::cuda::CudaSession;
use crate::generate::Backend;
use crate::model::Model;
use anyhow::{bail, Context, Result};
use cudarc::driver::sys::CUevent_flags;
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;

/// Run `tokens` through a backend in forwards of `chunk` tokens; return every position's logits.
pub fn all_logits<B: Backend>(b: &mut B, tokens: &[u32], chunk: usize) -> Result<Vec<Vec<f32>>> {
    let mut out = vec![];
    let mut start = 0;
    for c in tokens.chunks(chunk.max(1)) {
        b.forward(c, start)?;
        for t in 0..c.len() {
            out.push(b.logits(t).to_vec());
        }
        start += c.len();
    }
    Ok(out)
}

/// Max |a - b| / max |b| over all rows.
pub fn max_rel_err(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    let mut num = 0f32;
    let mut den = 0f32;
    for (x, y) in a.iter().zip(b) {
        for (p, q) in x.iter().zip(y) {
            num = num.max((p - q).abs());
            den = den.max(q.abs());
        }
    }
    if num.is_nan() || a.iter().flatten().any(|v| !v.is_finite()) {
        return f32::INFINITY;
    }
    num / den.max(1e-30)
}

/// Deterministic pseudo-random token ids in `[lo, vocab)`.
pub fn random_tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let lo = 3.min(vocab - 1);
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (lo + ((s >> 33) as usize) % (vocab - lo)) as u32
        })
        .collect()
}

#[derive(Serialize)]
pub struct VerifyReport {
    pub plan: String,
    pub device: String,
    pub positions: usize,
    pub prefill_chunk: usize,
    pub max_rel_err_prefill: f32,
    pub max_rel_err_decode: f32,
    pub argmax_agree: f32,
    pub in_kernel_argmax_ok: bool,
}

/// GPU vs CPU on the same plan: chunked prefill, then token-by-token decode past the sliding window.
pub fn verify_gpu(
    plan_dir: &Path,
    n_prefill: usize,
    n_decode: usize,
    seed: u64,
) -> Result<VerifyReport> {
    let model = Model::load(plan_dir, true)?;
    let ctx = n_prefill + n_decode + 8;
    let toks = random_tokens(n_prefill + n_decode, model.plan.model.vocab, seed);
    let mut cpu = CpuSession::new(model.clone(), ctx);
    let mut gpu = CudaSession::new(model.clone(), plan_dir, ctx, 0)?;
    let chunk = model.plan.max_tokens;
    let c_pre = all_logits(&mut cpu, &toks[..n_prefill], chunk)?;
    let g_pre = all_logits(&mut gpu, &toks[..n_prefill], chunk)?;
    let mut c_dec = vec![];
    let mut g_dec = vec![];
    let mut argmax_ok = true;
    for (i, &t) in toks[n_prefill..].iter().enumerate() {
        let p = n_prefill + i;
        cpu.forward("target", &[t], p)?;
        gpu.forward(&[t], p)?;
        c_dec.push(cpu.output("target", "logits", 0).expect("logits").to_vec());
        g_dec.push(gpu.logits(0).to_vec());
        let s = gpu.sampled()?;
        argmax_ok &= s[0] == crate::sampling::argmax(&g_dec[i]);
    }
    let agree = c_dec
        .iter()
        .zip(&g_dec)
        .filter(|(a, b)| crate::sampling::argmax(a) == crate::sampling::argmax(b))
        .count() as f32
        / c_dec.len().max(1) as f32;
    Ok(VerifyReport {
        plan: plan_dir.display().to_string(),
        device: gpu.device_name(),
        positions: n_prefill + n_decode,
        prefill_chunk: chunk,
        max_rel_err_prefill: max_rel_err(&g_pre, &c_pre),
        max_rel_err_decode: max_rel_err(&g_dec, &c_dec),
        argmax_agree: agree,
        in_kernel_argmax_ok: argmax_ok,
    })
}

#[derive(Serialize)]
pub struct BenchRow {
    pub tokens: usize,
    pub ms_median: f64,
    pub ms_min: f64,
    pub tok_per_s: f64,
    pub bytes: f64,
    pub floor_ms: f64,
    pub floor_frac: f64,
}

#[derive(Serialize)]
pub struct BenchReport {
    pub device: String,
    pub sms: u32,
    pub hbm_copy_gbps: f64,
    pub context: usize,
    pub rows: Vec<BenchRow>,
    pub weight_bytes_total: u64,
    /// Where one profiled forward of each token count spends its time, by instruction kind.
    pub profile: Vec<ProfileReport>,
}

#[derive(Serialize)]
pub struct ProfileReport {
    pub tokens: usize,
    /// First wait start to last completion, microseconds.
    pub total_us: f64,
    pub ops: Vec<OpProfile>,
    /// Weight ring, summed over blocks: fraction of the consumers' ring time spent waiting for weights, and of
    /// the producer's spent waiting for a free slot.
    pub ring_consumer_wait_frac: f64,
    pub ring_producer_wait_frac: f64,
}

#[derive(Serialize)]
pub struct OpProfile {
    pub op: &'static str,
    pub instrs: usize,
    /// Sum over this kind's instructions of the mean (over working blocks) time from work start to completion.
    pub busy_us: f64,
    /// Sum over instructions of the mean time working blocks waited for producers.
    pub wait_us: f64,
    /// Sum over instructions of (last block's completion - first block's work start).
    pub span_us: f64,
    /// Sum over instructions of the mean time consumer warp 0 spent streaming weights through the ring.
    pub ring_us: f64,
    /// Critical-path share: sum over instructions of how far each one moved the completion frontier (the latest
    /// completion of it and every earlier instruction). Over all kinds this adds up to the in-kernel time.
    pub advance_us: f64,
}

const OP_NAMES: [&str; 13] = [
    "embed",
    "rmsnorm",
    "matmul",
    "rope",
    "kvwrite",
    "attention",
    "router",
    "moe_up",
    "moe_down",
    "swiglu",
    "scale",
    "add",
    "argmax",
];

/// Every block's timeline of one profiled forward as text: a `T <tokens>` line, then per instruction its index,
/// kind and, per block, `wait-start,work-start,end,ring` in tenths of a microsecond (the times after the
/// forward's first wait start, 0,0,0 for a block that recorded nothing; ring: what the instruction added to the
/// block's cumulative ring counter, i.e. its time in the weight ring, or its preparation time in `-DMK_PHASE=1`
/// builds).
pub fn timeline_text(tokens: usize, fwd: &crate::cuda::ForwardProfile) -> String {
    use std::fmt::Write;
    let base = fwd
        .instrs
        .iter()
        .flat_map(|i| i.blocks.iter().map(|b| b.0))
        .filter(|&t| t > 0)
        .min()
        .unwrap_or(0);
    let rel = |t: u64| t.saturating_sub(base) / 100;
    let mut out = format!("T {tokens}\n");
    let mut ring_before = vec![0u64; fwd.instrs.first().map_or(0, |i| i.blocks.len())];
    for (i, ins) in fwd.instrs.iter().enumerate() {
        let name = OP_NAMES.get(ins.op as usize).copied().unwrap_or("?");
        let _ = write!(out, "{i} {name}");
        for (b, &(t0, t1, t2, ring)) in ins.blocks.iter().enumerate() {
            let prev = ring_before.get(b).copied().unwrap_or(0);
            let _ = write!(
                out,
                " {},{},{},{}",
                rel(t0),
                rel(t1),
                rel(t2),
                ring.saturating_sub(prev) / 100
            );
            if let Some(r) = ring_before.get_mut(b) {
                *r = ring;
            }
        }
        out.push('\n');
    }
    out
}

/// Aggregate one profiled forward by instruction kind.
pub fn summarize_profile(tokens: usize, fwd: &crate::cuda::ForwardProfile) -> ProfileReport {
    let prof = &fwd.instrs;
    let mut ops: Vec<OpProfile> = vec![];
    let mut t_min = u64::MAX;
    let mut t_max = 0u64;
    let nblocks = prof.first().map(|p| p.blocks.len()).unwrap_or(0);
    // Each block's cumulative ring time at the end of its previous instruction.
    let mut ring_before = vec![0u64; nblocks];
    // Completion frontier; starts at the first block's first wait.
    let mut front = prof
        .iter()
        .flat_map(|i| i.blocks.iter().map(|b| b.0))
        .filter(|&t| t > 0)
        .min()
        .unwrap_or(0);
    for ins in prof {
        let name = OP_NAMES.get(ins.op as usize).copied().unwrap_or("?");
        let mut n = 0usize;
        let (mut busy, mut wait, mut ring) = (0f64, 0f64, 0f64);
        let (mut first, mut last) = (u64::MAX, 0u64);
        for (b, &(t0, t1, t2, r)) in ins.blocks.iter().enumerate() {
            if t0 > 0 {
                t_min = t_min.min(t0);
            }
            t_max = t_max.max(t2);
            // A block that had no tile of this instruction records t1 == t0.
            if t1 > t0 && t2 > t1 {
                n += 1;
                busy += (t2 - t1) as f64;
                wait += (t1 - t0) as f64;
                ring += r.saturating_sub(ring_before[b]) as f64;
                first = first.min(t1);
                last = last.max(t2);
            }
            ring_before[b] = r;
        }
        let done = ins.blocks.iter().map(|b| b.2).max().unwrap_or(0);
        let advance = done.saturating_sub(front) as f64 / 1e3;
        front = front.max(done);
        let nf = n.max(1) as f64 * 1e3;
        let span = if n > 0 {
            (last - first) as f64 / 1e3
        } else {
            0.0
        };
        let (busy, wait, ring) = (busy / nf, wait / nf, ring / nf);
        match ops.iter_mut().find(|o| o.op == name) {
            Some(o) => {
                o.instrs += 1;
                o.busy_us += busy;
                o.wait_us += wait;
                o.span_us += span;
                o.ring_us += ring;
                o.advance_us += advance;
            }
            None => ops.push(OpProfile {
                op: name,
                instrs: 1,
                busy_us: busy,
                wait_us: wait,
                span_us: span,
                ring_us: ring,
                advance_us: advance,
            }),
        }
    }
    ops.sort_by(|a, b| b.busy_us.total_cmp(&a.busy_us));
    ProfileReport {
        tokens,
        total_us: t_max.saturating_sub(t_min) as f64 / 1e3,
        ops,
        ring_consumer_wait_frac: fwd.ring[0] as f64 / fwd.ring[1].max(1) as f64,
        ring_producer_wait_frac: fwd.ring[2] as f64 / fwd.ring[3].max(1) as f64,
    }
}

/// Bytes one forward of `t` tokens must read from HBM at `context`: every non-expert weight once (embedding:
/// one row per token), the experts the tokens route to (expected distinct experts under uniform routing:
/// E (1 - (1 - k/E)^t)), and the KV cache each token attends to.
pub fn step_bytes(model: &Model, t: usize, context: usize) -> f64 {
    use mimo_ir::plan::Instr;
    use mimo_ir::WeightClass;
    let plan = &model.plan;
    let prog = plan.program("target").expect("target program");
    let mut expert_frac = std::collections::HashMap::new();
    for ins in &prog.instrs {
        if let Instr::Moe {
            gate_up,
            down,
            top_k,
            ..
        } = ins
        {
            let e = plan.weights[*gate_up as usize].dims[0] as f64;
            let frac = (1.0 - (1.0 - *top_k as f64 / e).powi(t as i32)).min(1.0);
            expert_frac.insert(*gate_up, frac);
            expert_frac.insert(*down, frac);
        }
    }
    let mut bytes = 0f64;
    for (i, w) in plan.weights.iter().enumerate() {
        let b = w.total_bytes() as f64;
        bytes += match w.class {
            WeightClass::Embedding => b / w.dims[0] as f64 * t as f64,
            WeightClass::Experts => b * expert_frac.get(&(i as u32)).copied().unwrap_or(1.0),
            _ => b,
        };
    }
    for k in &plan.kv {
        let vis = match k.window {
            Some(w) => (context + t).min(w + t),
            None => context + t,
        };
        bytes += (vis * k.heads * (k.k_dim + k.v_dim) * 4) as f64;
    }
    bytes
}

/// Decode-step benchmark on the GPU, with the HBM copy bandwidth measured in the same run.
pub fn bench_gpu(
    plan_dir: &Path,
    tokens: &[usize],
    context: usize,
    iters: usize,
    timeline: Option<&Path>,
) -> Result<BenchReport> {
    let model: Arc<Model> = Model::load(plan_dir, false)?;
    let max_t = *tokens.iter().max().unwrap_or(&1);
    if max_t > model.plan.max_tokens {
        bail!(
            "plan handles {} tokens per forward, asked for {max_t}",
            model.plan.max_tokens
        );
    }
    let mut gpu = CudaSession::new(model.clone(), plan_dir, context + max_t + 1, 0)?;
    gpu.read_logits = false;
    let stream = gpu.stream().clone();
    let ctx = stream.context().clone();
    // HBM bandwidth: device-to-device copy of 2 GiB, bytes read + written.
    let n = 1usize << 29; // f32 elements = 2 GiB
    let src = stream.alloc_zeros::<f32>(n)?;
    let mut dst = stream.alloc_zeros::<f32>(n)?;
    let e0 = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let e1 = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let mut copies = vec![];
    for i in 0..12 {
        e0.record(&stream)?;
        stream.memcpy_dtod(&src, &mut dst)?;
        e1.record(&stream)?;
        e1.synchronize()?;
        if i >= 2 {
            copies.push(e0.elapsed_ms(&e1)? as f64);
        }
    }
    drop((src, dst));
    copies.sort_by(|a, b| a.total_cmp(b));
    let bw = 2.0 * 4.0 * n as f64 / (copies[copies.len() / 2] * 1e-3);
    // Fill the context.
    let prompt = random_tokens(context, model.plan.model.vocab, 1);
    let mut start = 0;
    for c in prompt.chunks(model.plan.max_tokens) {
        gpu.launch(c, start)?;
        start += c.len();
    }
    gpu.synchronize()?;
    let mut rows = vec![];
    for &t in tokens {
        let toks = random_tokens(t, model.plan.model.vocab, 7 + t as u64);
        let mut times = vec![];
        for i in 0..iters + 3 {
            e0.record(&stream)?;
            gpu.launch(&toks, context)?;
            e1.record(&stream)?;
            e1.synchronize()?;
            if i >= 3 {
                times.push(e0.elapsed_ms(&e1)? as f64);
            }
        }
        times.sort_by(|a, b| a.total_cmp(b));
        let med = times[times.len() / 2];
        let bytes = step_bytes(&model, t, context);
        let floor_ms = bytes / bw * 1e3;
        rows.push(BenchRow {
            tokens: t,
            ms_median: med,
            ms_min: times[0],
            tok_per_s: t as f64 / (med * 1e-3),
            bytes,
            floor_ms,
            floor_frac: floor_ms / med,
        });
    }
    // One profiled forward per token count (timestamps cost a little, so they stay out of the timed runs).
    gpu.enable_profile()?;
    let mut profile = vec![];
    let mut lines = String::new();
    for &t in tokens {
        let toks = random_tokens(t, model.plan.model.vocab, 7 + t as u64);
        gpu.launch(&toks, context)?;
        gpu.synchronize()?;
        let fwd = gpu.read_profile()?;
        if timeline.is_some() {
            lines.push_str(&timeline_text(t, &fwd));
        }
        profile.push(summarize_profile(t, &fwd));
    }
    if let Some(path) = timeline {
        std::fs::write(path, lines).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(BenchReport {
        device: gpu.device_name(),
        sms: gpu.num_sms(),
        hbm_copy_gbps: bw / 1e9,
        context,
        rows,
        weight_bytes_total: model.plan.weights.iter().map(|w| w.total_bytes()).sum(),
        profile,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::{ForwardProfile, InstrProfile};

    #[test]
    fn profile_summary_counts_only_working_blocks_and_splits_ring_time() {
        // Two blocks, three instructions: a matmul both blocks work on, an add only block 1 works on (block 0
        // records work start == wait start), and a second matmul. Ring counters are cumulative per block.
        let instrs = vec![
            InstrProfile {
                op: 2,
                blocks: vec![(1_000, 3_000, 13_000, 4_000), (1_000, 5_000, 11_000, 2_000)],
            },
            InstrProfile {
                op: 11,
                blocks: vec![
                    (13_000, 13_000, 14_000, 4_000),
                    (11_000, 12_000, 14_500, 2_000),
                ],
            },
            InstrProfile {
                op: 2,
                blocks: vec![
                    (14_000, 15_000, 21_000, 9_000),
                    (14_500, 16_000, 20_000, 3_000),
                ],
            },
        ];
        let fwd = ForwardProfile {
            instrs,
            ring: [1, 4, 3, 6],
        };
        let r = summarize_profile(1, &fwd);
        assert_eq!(r.tokens, 1);
        assert!((r.ring_consumer_wait_frac - 0.25).abs() < 1e-12);
        assert!((r.ring_producer_wait_frac - 0.5).abs() < 1e-12);
        assert!((r.total_us - 20.0).abs() < 1e-9, "{}", r.total_us);
        let mm = r.ops.iter().find(|o| o.op == "matmul").unwrap();
        assert_eq!(mm.instrs, 2);
        // busy: (10 + 6) / 2 + (6 + 4) / 2 = 13 us; wait: (2 + 4) / 2 + (1 + 1.5) / 2 = 4.25 us
        assert!((mm.busy_us - 13.0).abs() < 1e-9, "{}", mm.busy_us);
        assert!((mm.wait_us - 4.25).abs() < 1e-9, "{}", mm.wait_us);
        // ring: (4 + 2) / 2 + (5 + 1) / 2 = 6 us; span: (13 - 3) + (21 - 15) = 16 us
        assert!((mm.ring_us - 6.0).abs() < 1e-9, "{}", mm.ring_us);
        assert!((mm.span_us - 16.0).abs() < 1e-9, "{}", mm.span_us);
        let add = r.ops.iter().find(|o| o.op == "add").unwrap();
        assert!((add.busy_us - 2.5).abs() < 1e-9, "{}", add.busy_us);
        assert!((add.wait_us - 1.0).abs() < 1e-9, "{}", add.wait_us);
        // Critical path: the frontier starts at 1 us and moves to 13 (matmul), 14.5 (add), 21 (matmul): the
        // matmuls advanced it 12 + 6.5 us, the add 1.5, together the in-kernel time.
        assert!((mm.advance_us - 18.5).abs() < 1e-9, "{}", mm.advance_us);
        assert!((add.advance_us - 1.5).abs() < 1e-9, "{}", add.advance_us);
        assert!((mm.advance_us + add.advance_us - r.total_us).abs() < 1e-9);
        // Sorted by busy time, largest first.
        assert_eq!(r.ops[0].op, "matmul");
        // The timeline: times in tenths of a microsecond after the first wait start (1 us).
        let tl = timeline_text(1, &fwd);
        let lines: Vec<&str> = tl.lines().collect();
        assert_eq!(lines[0], "T 1");
        assert_eq!(lines[1], "0 matmul 0,20,120,40 0,40,100,20");
        // The add left the ring counters where they were; the second matmul added 5 and 1 us.
        assert_eq!(lines[2], "1 add 120,120,130,0 100,110,135,0");
        assert_eq!(lines[3], "2 matmul 130,140,200,50 135,150,190,10");
    }
}
