//! DFlash block speculative decoding on the CPU backend (issue #5):
//! - the draft programs against an independent reference of the DFlash draft forward;
//! - greedy speculative output token-identical to plain greedy decoding, with the random tiny draft (low
//!   acceptance) and with a draft that agrees (the target itself drafting: full blocks accepted);
//! - speculative sampling's output distribution equals plain sampling (chi-square tests, alpha = 1e-3, on a
//!   4-token Markov model and on the tiny model; deterministic seeds, so they never flake);
//! - KV rollback: after rejections, the target cache equals the cache of plain decoding of the same tokens.

use anyhow::Result;
use mimo_kernels::cpu::{rmsnorm_row, rope_row};
use mimo_models::checkpoint::Checkpoint;
use mimo_models::config::Arch;
use mimo_models::draft::{make_tiny_draft, DraftCheckpoint};
use mimo_runtime::cpu::CpuSession;
use mimo_runtime::generate::{generate, prefill, Backend};
use mimo_runtime::model::Model;
use mimo_runtime::sampling::{distribution, Sampler, SamplingParams};
use mimo_runtime::spec::{spec_generate, SpecStats, SpecTarget};
use mimo_tests::util::{compile_bf16, random_tokens, rel_err, tiny};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

const MAX_TOKENS: usize = 16;
const CTX: usize = 256;

struct Fixture {
    _dir: tempfile::TempDir,
    ckpt: PathBuf,
    model: Arc<Model>,
}

/// A tiny checkpoint of `arch` with a random draft, compiled (draft included) once per test binary.
fn fixture(arch: Arch) -> &'static Fixture {
    static MOE: OnceLock<Fixture> = OnceLock::new();
    static DENSE: OnceLock<Fixture> = OnceLock::new();
    let cell = if arch == Arch::Mimo { &DENSE } else { &MOE };
    cell.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("ck");
        tiny(&ckpt, arch, 5, false);
        make_tiny_draft(&ckpt, 9).unwrap();
        let plan = dir.path().join("plan");
        compile_bf16(&ckpt, &plan, MAX_TOKENS);
        let model = Model::load(&plan, true).unwrap();
        assert!(model.plan.draft.is_some(), "the draft was compiled in");
        Fixture {
            _dir: dir,
            ckpt,
            model,
        }
    })
}

fn greedy() -> Sampler {
    Sampler::new(SamplingParams::default())
}

fn plain(model: &Arc<Model>, prompt: &[u32], max_new: usize, s: &mut Sampler) -> Vec<u32> {
    let mut sess = CpuSession::new(model.clone(), CTX);
    generate(&mut sess, prompt, max_new, s, &[], |_| true)
        .unwrap()
        .0
}

fn spec<B: SpecTarget>(
    b: &mut B,
    prompt: &[u32],
    max_new: usize,
    block: usize,
    s: &mut Sampler,
) -> (Vec<u32>, SpecStats) {
    let (out, _, st) = spec_generate(b, prompt, max_new, block, s, &[], |_| true).unwrap();
    (out, st)
}

// ---------------------------------------------------------------------------------------------------------
// The draft programs against an independent reference forward.
// ---------------------------------------------------------------------------------------------------------

fn matvec(w: &[f32], rows: usize, x: &[f32]) -> Vec<f32> {
    let k = x.len();
    (0..rows)
        .map(|r| {
            w[r * k..(r + 1) * k]
                .iter()
                .zip(x)
                .map(|(a, b)| a * b)
                .sum()
        })
        .collect()
}

fn norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mut o = vec![0f32; x.len()];
    rmsnorm_row(x, w, eps, &mut o);
    o
}

fn head_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    x.chunks(w.len()).flat_map(|h| norm(h, w, eps)).collect()
}

/// The DFlash draft forward written from its description: context features of positions `0..n` (already
/// concatenated per token), block tokens at positions `n..n+B`; returns the logits of every block position.
fn reference_draft(
    target: &Checkpoint,
    d: &DraftCheckpoint,
    feats: &[Vec<f32>],
    block: &[u32],
) -> Vec<Vec<f32>> {
    let c = &d.config;
    let h = c.hidden;
    let r = |n: &str| d.read_f32(n).unwrap();
    let n = feats.len();
    let lo = n.saturating_sub(c.window);
    let fc = r("fc.weight");
    let ctx: Vec<Vec<f32>> = feats
        .iter()
        .map(|f| norm(&matvec(&fc, h, f), &r("hidden_norm.weight"), c.eps))
        .collect();
    let emb = target.read_f32("model.embed_tokens.weight").unwrap();
    let mut x: Vec<Vec<f32>> = block
        .iter()
        .map(|&t| emb[t as usize * h..(t as usize + 1) * h].to_vec())
        .collect();
    let (hd, nh, nkv) = (c.head_dim, c.n_heads, c.n_kv_heads);
    for l in 0..c.n_layers {
        let p = format!("layers.{l}");
        let a = format!("{p}.self_attn");
        let (qw, kw, vw, ow) = (
            r(&format!("{a}.q_proj.weight")),
            r(&format!("{a}.k_proj.weight")),
            r(&format!("{a}.v_proj.weight")),
            r(&format!("{a}.o_proj.weight")),
        );
        let (qn, kn) = (
            r(&format!("{a}.q_norm.weight")),
            r(&format!("{a}.k_norm.weight")),
        );
        let key = |src: &[f32], pos: usize| {
            let mut k = head_norm(&matvec(&kw, nkv * hd, src), &kn, c.eps);
            rope_row(&mut k, pos as u32, c.rope_theta, hd, hd);
            k
        };
        // Keys / values: the visible context positions, then the block.
        let mut keys = vec![];
        let mut vals = vec![];
        for (j, cj) in ctx.iter().enumerate().skip(lo) {
            keys.push(key(cj, j));
            vals.push(matvec(&vw, nkv * hd, cj));
        }
        let hn: Vec<Vec<f32>> = x
            .iter()
            .map(|xi| norm(xi, &r(&format!("{p}.input_layernorm.weight")), c.eps))
            .collect();
        for (i, hi) in hn.iter().enumerate() {
            keys.push(key(hi, n + i));
            vals.push(matvec(&vw, nkv * hd, hi));
        }
        for (i, hi) in hn.iter().enumerate() {
            let mut q = head_norm(&matvec(&qw, nh * hd, hi), &qn, c.eps);
            rope_row(&mut q, (n + i) as u32, c.rope_theta, hd, hd);
            let mut att = vec![0f32; nh * hd];
            for head in 0..nh {
                let kvh = head / (nh / nkv);
                let qh = &q[head * hd..(head + 1) * hd];
                let s: Vec<f32> = keys
                    .iter()
                    .map(|k| {
                        qh.iter()
                            .zip(&k[kvh * hd..(kvh + 1) * hd])
                            .map(|(a, b)| a * b)
                            .sum::<f32>()
                            / (hd as f32).sqrt()
                    })
                    .collect();
                let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = s.iter().map(|v| (v - m).exp()).collect();
                let z: f32 = e.iter().sum();
                for (j, v) in vals.iter().enumerate() {
                    for dd in 0..hd {
                        att[head * hd + dd] += e[j] / z * v[kvh * hd + dd];
                    }
                }
            }
            let o = matvec(&ow, h, &att);
            x[i].iter_mut().zip(o).for_each(|(a, b)| *a += b);
            let m = norm(
                &x[i],
                &r(&format!("{p}.post_attention_layernorm.weight")),
                c.eps,
            );
            let g = matvec(&r(&format!("{p}.mlp.gate_proj.weight")), c.inter, &m);
            let u = matvec(&r(&format!("{p}.mlp.up_proj.weight")), c.inter, &m);
            let s: Vec<f32> = g
                .iter()
                .zip(&u)
                .map(|(a, b)| a / (1.0 + (-a).exp()) * b)
                .collect();
            let dn = matvec(&r(&format!("{p}.mlp.down_proj.weight")), h, &s);
            x[i].iter_mut().zip(dn).for_each(|(a, b)| *a += b);
        }
    }
    let head = target.read_f32("lm_head.weight").unwrap();
    let vocab = head.len() / h;
    x.iter()
        .map(|xi| matvec(&head, vocab, &norm(xi, &r("norm.weight"), c.eps)))
        .collect()
}

#[test]
fn draft_programs_match_reference() {
    for arch in [Arch::MimoV2Flash, Arch::Mimo] {
        let f = fixture(arch);
        let target = Checkpoint::open(&f.ckpt).unwrap();
        let dck = DraftCheckpoint::open(&f.ckpt.join("draft")).unwrap();
        let info = f.model.plan.draft.clone().unwrap();
        // 30 context tokens (> the window of 16: the window matters), fed in chunks as the scheduler does.
        let ctx_toks = random_tokens(3, 30, 400);
        let mut s = CpuSession::new(f.model.clone(), CTX);
        let mut feats = vec![];
        for (c, chunk) in ctx_toks.chunks(7).enumerate() {
            Backend::forward(&mut s, chunk, c * 7).unwrap();
            let fs: Vec<Vec<f32>> = (0..chunk.len()).map(|t| s.features(t).unwrap()).collect();
            s.draft_context(chunk, c * 7, &fs).unwrap();
            feats.extend(fs);
        }
        assert_eq!(feats[0].len(), info.target_layers.len() * 64);
        for b in [2usize, 5, 16] {
            let mut block = vec![info.mask_token; b];
            block[0] = 17;
            let got = s.draft_block(&block, 30).unwrap();
            let want = reference_draft(&target, &dck, &feats, &block);
            assert_eq!(got.len(), b - 1);
            for (i, row) in got.iter().enumerate() {
                let e = rel_err(row, &want[i + 1]);
                assert!(
                    e < 2e-3,
                    "{arch:?} block {b} position {}: rel err {e}",
                    i + 1
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Greedy: token-identical to plain decoding.
// ---------------------------------------------------------------------------------------------------------

#[test]
fn greedy_random_draft_matches_plain() {
    for arch in [Arch::MimoV2Flash, Arch::Mimo] {
        let f = fixture(arch);
        let mut rates = vec![];
        for seed in 0..6u64 {
            let prompt = random_tokens(100 + seed, 3 + 5 * seed as usize, 500);
            let want = plain(&f.model, &prompt, 40, &mut greedy());
            for block in [2usize, 3, 8, 16] {
                let mut s = CpuSession::new(f.model.clone(), CTX);
                let (got, st) = spec(&mut s, &prompt, 40, block, &mut greedy());
                assert_eq!(got, want, "{arch:?} seed {seed} block {block}");
                assert_eq!(
                    st.round_tokens,
                    st.hist
                        .iter()
                        .enumerate()
                        .map(|(k, n)| k * n)
                        .sum::<usize>()
                );
                rates.push(st.acceptance_rate());
            }
        }
        let mean = rates.iter().sum::<f64>() / rates.len() as f64;
        eprintln!("{arch:?}: random draft, greedy acceptance rate {mean:.3}");
        assert!(mean < 0.5, "a random draft should rarely agree ({mean})");
    }
}

/// The target drafting for itself: a second session of the same plan proposes its own greedy continuation
/// (chained one token at a time), so guesses agree with the verify and whole blocks are accepted.
struct SelfDraft {
    t: CpuSession,
    d: CpuSession,
}

impl Backend for SelfDraft {
    fn forward(&mut self, tokens: &[u32], start: usize) -> Result<()> {
        Backend::forward(&mut self.t, tokens, start)
    }
    fn logits(&self, t: usize) -> &[f32] {
        Backend::logits(&self.t, t)
    }
    fn hidden(&self, name: &str, t: usize) -> Option<&[f32]> {
        self.t.hidden(name, t)
    }
    fn max_tokens(&self) -> usize {
        Backend::max_tokens(&self.t)
    }
    fn max_ctx(&self) -> usize {
        Backend::max_ctx(&self.t)
    }
}

impl SpecTarget for SelfDraft {
    fn has_draft(&self) -> bool {
        true
    }
    fn feature_layers(&self) -> Vec<usize> {
        vec![]
    }
    fn draft_block_size(&self) -> usize {
        16
    }
    fn mask_token(&self) -> u32 {
        0
    }
    fn draft_window(&self) -> Option<usize> {
        None
    }
    fn draft_context(&mut self, tokens: &[u32], start: usize, _: &[Vec<f32>]) -> Result<()> {
        Backend::forward(&mut self.d, tokens, start)
    }
    fn draft_block(&mut self, block: &[u32], start: usize) -> Result<Vec<Vec<f32>>> {
        let mut rows = vec![];
        let mut t = block[0];
        for i in 0..block.len() - 1 {
            Backend::forward(&mut self.d, &[t], start + i)?;
            let r = Backend::logits(&self.d, 0).to_vec();
            t = mimo_runtime::sampling::argmax(&r);
            rows.push(r);
        }
        Ok(rows)
    }
    fn rollback(&mut self, len: usize) {
        self.t.rollback(len);
    }
}

fn self_draft(model: &Arc<Model>) -> SelfDraft {
    SelfDraft {
        t: CpuSession::new(model.clone(), CTX),
        d: CpuSession::new(model.clone(), CTX),
    }
}

#[test]
fn greedy_agreeing_draft_matches_plain_with_full_blocks() {
    let f = fixture(Arch::MimoV2Flash);
    let mut total = SpecStats::default();
    for seed in 0..5u64 {
        let prompt = random_tokens(200 + seed, 4 + 3 * seed as usize, 500);
        let want = plain(&f.model, &prompt, 48, &mut greedy());
        for block in [4usize, 8, 16] {
            let mut b = self_draft(&f.model);
            let (got, st) = spec(&mut b, &prompt, 48, block, &mut greedy());
            assert_eq!(got, want, "seed {seed} block {block}");
            total.rounds += st.rounds;
            total.drafted += st.drafted;
            total.accepted += st.accepted;
            total.full_blocks += st.full_blocks;
            total.round_tokens += st.round_tokens;
        }
    }
    eprintln!(
        "self draft: acceptance rate {:.3}, mean acceptance length {:.2}, {} full blocks in {} rounds",
        total.acceptance_rate(),
        total.mean_acceptance_len(),
        total.full_blocks,
        total.rounds
    );
    assert!(total.acceptance_rate() > 0.9, "{total:?}");
    assert!(total.full_blocks > 0, "{total:?}");
}

// ---------------------------------------------------------------------------------------------------------
// Sampling: the output distribution equals plain sampling.
// ---------------------------------------------------------------------------------------------------------

/// Upper alpha = 1e-3 quantile of chi-square with `k` degrees of freedom (Wilson-Hilferty; z = 3.0902).
fn chi2_crit(k: usize) -> f64 {
    let k = k as f64;
    let a = 2.0 / (9.0 * k);
    k * (1.0 - a + 3.0902 * a.sqrt()).powi(3)
}

/// Pearson chi-square of `counts` (over `n` samples) against the exact probabilities `p`; cells with
/// expected count < 5 are pooled into one. Returns (statistic, degrees of freedom).
fn chi2(counts: &HashMap<Vec<u32>, usize>, p: &HashMap<Vec<u32>, f64>, n: usize) -> (f64, usize) {
    for k in counts.keys() {
        assert!(
            p.get(k).copied().unwrap_or(0.0) > 0.0,
            "sampled {k:?}, which has probability 0"
        );
    }
    let (mut stat, mut cells) = (0.0, 0usize);
    let (mut pool_e, mut pool_o) = (0.0, 0.0);
    for (k, &pk) in p {
        let e = pk * n as f64;
        let o = counts.get(k).copied().unwrap_or(0) as f64;
        if e < 5.0 {
            pool_e += e;
            pool_o += o;
        } else {
            stat += (o - e).powi(2) / e;
            cells += 1;
        }
    }
    if pool_e > 0.0 {
        stat += (pool_o - pool_e).powi(2) / pool_e.max(1e-9);
        cells += 1;
    }
    (stat, cells - 1)
}

/// A 4-token Markov "model": logits of the next token depend on the current one; its draft proposes from
/// another table, a function of the block's first token and the block position (independent per position, as
/// DFlash's parallel proposals are).
struct Markov {
    p: Vec<Vec<f32>>,
    q: Vec<Vec<f32>>,
    rows: Vec<Vec<f32>>,
}

impl Backend for Markov {
    fn forward(&mut self, tokens: &[u32], _: usize) -> Result<()> {
        self.rows = tokens.iter().map(|&t| self.p[t as usize].clone()).collect();
        Ok(())
    }
    fn logits(&self, t: usize) -> &[f32] {
        &self.rows[t]
    }
    fn hidden(&self, _: &str, _: usize) -> Option<&[f32]> {
        None
    }
    fn max_tokens(&self) -> usize {
        16
    }
    fn max_ctx(&self) -> usize {
        1000
    }
}

impl SpecTarget for Markov {
    fn has_draft(&self) -> bool {
        true
    }
    fn feature_layers(&self) -> Vec<usize> {
        vec![]
    }
    fn draft_block_size(&self) -> usize {
        16
    }
    fn mask_token(&self) -> u32 {
        3
    }
    fn draft_window(&self) -> Option<usize> {
        None
    }
    fn draft_context(&mut self, _: &[u32], _: usize, _: &[Vec<f32>]) -> Result<()> {
        Ok(())
    }
    fn draft_block(&mut self, block: &[u32], _: usize) -> Result<Vec<Vec<f32>>> {
        Ok((1..block.len())
            .map(|i| self.q[(block[0] as usize + i) % 4].clone())
            .collect())
    }
    fn rollback(&mut self, _: usize) {}
}

#[test]
fn sampling_distribution_markov() {
    let ln = |v: [f32; 4]| v.iter().map(|x| x.ln()).collect::<Vec<f32>>();
    let p = vec![
        ln([0.5, 0.2, 0.2, 0.1]),
        ln([0.1, 0.6, 0.1, 0.2]),
        ln([0.25, 0.25, 0.25, 0.25]),
        ln([0.05, 0.15, 0.3, 0.5]),
    ];
    let q = vec![
        ln([0.4, 0.3, 0.2, 0.1]),
        ln([0.1, 0.1, 0.1, 0.7]),
        ln([0.3, 0.2, 0.3, 0.2]),
        ln([0.6, 0.1, 0.2, 0.1]),
    ];
    const N: usize = 40_000;
    for (temperature, top_p, block) in [(1.0f32, 1.0f32, 4usize), (0.7, 0.8, 3), (1.3, 1.0, 8)] {
        let params = |seed| SamplingParams {
            temperature,
            top_p,
            seed,
        };
        let d: Vec<Vec<f32>> = p.iter().map(|l| distribution(l, &params(0))).collect();
        // Exact joint of the first 4 tokens after prompt token 2.
        let mut exact = HashMap::new();
        for a in 0..4u32 {
            for b in 0..4u32 {
                for c in 0..4u32 {
                    for e in 0..4u32 {
                        let pr = d[2][a as usize] as f64
                            * d[a as usize][b as usize] as f64
                            * d[b as usize][c as usize] as f64
                            * d[c as usize][e as usize] as f64;
                        if pr > 0.0 {
                            exact.insert(vec![a, b, c, e], pr);
                        }
                    }
                }
            }
        }
        let mut counts: HashMap<Vec<u32>, usize> = HashMap::new();
        let mut st_all = SpecStats::default();
        for seed in 0..N as u64 {
            let mut m = Markov {
                p: p.clone(),
                q: q.clone(),
                rows: vec![],
            };
            let mut s = Sampler::new(params(seed));
            let (out, st) = spec(&mut m, &[2], 4, block, &mut s);
            st_all.accepted += st.accepted;
            st_all.drafted += st.drafted;
            *counts.entry(out).or_default() += 1;
        }
        let (stat, dof) = chi2(&counts, &exact, N);
        eprintln!(
            "markov T={temperature} top_p={top_p} block={block}: chi2 {stat:.1} on {dof} dof (crit {:.1}), acceptance {:.3}",
            chi2_crit(dof),
            st_all.acceptance_rate()
        );
        assert!(st_all.acceptance_rate() > 0.1 && st_all.acceptance_rate() < 0.95);
        assert!(stat < chi2_crit(dof), "chi2 {stat} on {dof} dof");
    }
}

#[test]
fn sampling_distribution_tiny_model() {
    let f = fixture(Arch::MimoV2Flash);
    let params = |seed| SamplingParams {
        temperature: 0.25,
        top_p: 0.95,
        seed,
    };
    let prompt = random_tokens(77, 6, 500);
    let n = prompt.len();
    // Exact joint of the first 2 tokens from plain forwards (the second comes from a speculative round).
    let mut s = CpuSession::new(f.model.clone(), CTX);
    let d0 = distribution(&prefill(&mut s, &prompt).unwrap(), &params(0));
    let mut exact = HashMap::new();
    for (a, &pa) in d0.iter().enumerate().filter(|(_, &v)| v > 0.0) {
        Backend::forward(&mut s, &[a as u32], n).unwrap();
        let d1 = distribution(Backend::logits(&s, 0), &params(0));
        for (b, &pb) in d1.iter().enumerate().filter(|(_, &v)| v > 0.0) {
            exact.insert(vec![a as u32, b as u32], pa as f64 * pb as f64);
        }
    }
    const N: usize = 2000;
    for self_drafting in [false, true] {
        let mut counts: HashMap<Vec<u32>, usize> = HashMap::new();
        let mut acc = SpecStats::default();
        for seed in 0..N as u64 {
            let mut sm = Sampler::new(params(seed + 1_000_000 * self_drafting as u64));
            let (out, st) = if self_drafting {
                spec(&mut self_draft(&f.model), &prompt, 4, 4, &mut sm)
            } else {
                spec(
                    &mut CpuSession::new(f.model.clone(), CTX),
                    &prompt,
                    4,
                    4,
                    &mut sm,
                )
            };
            acc.accepted += st.accepted;
            acc.drafted += st.drafted;
            *counts.entry(out[..2].to_vec()).or_default() += 1;
        }
        let (stat, dof) = chi2(&counts, &exact, N);
        eprintln!(
            "tiny model (self draft: {self_drafting}): {} outcomes, chi2 {stat:.1} on {dof} dof (crit {:.1}), acceptance {:.3}",
            exact.len(),
            chi2_crit(dof),
            acc.acceptance_rate()
        );
        assert!(dof >= 8, "the test needs several outcomes ({dof} dof)");
        assert!(stat < chi2_crit(dof), "chi2 {stat} on {dof} dof");
    }
}

// ---------------------------------------------------------------------------------------------------------
// KV rollback.
// ---------------------------------------------------------------------------------------------------------

/// Assert that the target layers' caches of `a` and `b` agree on every position `< len` a query can still see.
fn assert_same_target_cache(
    a: &CpuSession,
    b: &CpuSession,
    len: usize,
    plan: &mimo_ir::plan::Plan,
) {
    let draft: Vec<usize> = plan
        .draft
        .as_ref()
        .map(|d| d.kv_layers.clone())
        .unwrap_or_default();
    let mut compared = 0;
    for k in plan.kv.iter().filter(|k| !draft.contains(&k.layer)) {
        let lo = k.window.map_or(0, |w| len.saturating_sub(w));
        for p in lo..len {
            for h in 0..k.heads {
                assert_eq!(
                    a.kv.key(k.layer, p, h),
                    b.kv.key(k.layer, p, h),
                    "L{} K pos {p}",
                    k.layer
                );
                assert_eq!(
                    a.kv.value(k.layer, p, h),
                    b.kv.value(k.layer, p, h),
                    "L{} V pos {p}",
                    k.layer
                );
                compared += 1;
            }
        }
    }
    assert!(compared > 0);
}

#[test]
fn kv_rollback_matches_plain_decoding() {
    for arch in [Arch::MimoV2Flash, Arch::Mimo] {
        let f = fixture(arch);
        for (seed, temperature) in [(1u64, 0.0f32), (2, 0.9), (3, 0.9)] {
            let prompt = random_tokens(300 + seed, 9, 500);
            let mut s = CpuSession::new(f.model.clone(), CTX);
            let mut sm = Sampler::new(SamplingParams {
                temperature,
                top_p: 1.0,
                seed,
            });
            let (out, st) = spec(&mut s, &prompt, 30, 6, &mut sm);
            assert!(st.drafted > st.accepted, "the round must see rejections");
            let len = s.kv.len;
            assert_eq!(
                len,
                prompt.len() + out.len() - 1,
                "the cache holds all but the newest token"
            );
            // Plain decoding of the same tokens: prefill, then one token per forward.
            let mut p = CpuSession::new(f.model.clone(), CTX);
            prefill(&mut p, &prompt).unwrap();
            for (i, &t) in out[..out.len() - 1].iter().enumerate() {
                Backend::forward(&mut p, &[t], prompt.len() + i).unwrap();
            }
            assert_eq!(p.kv.len, len);
            assert_same_target_cache(&s, &p, len, &f.model.plan);
        }
    }
}

#[test]
fn plan_dedupes_shared_weights_and_validates() {
    let f = fixture(Arch::MimoV2Flash);
    let plan = &f.model.plan;
    let names: Vec<&str> = plan.weights.iter().map(|w| w.name.as_str()).collect();
    for n in [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "draft.layers.0.self_attn.k_proj.weight",
    ] {
        assert_eq!(
            names.iter().filter(|x| **x == n).count(),
            1,
            "{n} packed once"
        );
    }
    let names: Vec<&str> = plan.programs.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["target", "draft_ctx", "draft_block"]);
    // A plan whose draft reads a layer the target does not expose is rejected.
    let mut bad = plan.clone();
    bad.draft.as_mut().unwrap().target_layers.push(0);
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.contains("hidden.0"), "{e}");
}
