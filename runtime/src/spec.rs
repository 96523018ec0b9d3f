//! DFlash block speculative decoding: the round scheduler.
//!
//! One round, with `last` the newest token (known, not yet in the target's KV cache) at position `pos`:
//! 1. the draft fills the block `[last, mask, ..., mask]` (B positions) in one forward: B-1 guesses
//!    (greedy: argmax; sampling: drawn from the draft's distribution q with the same temperature / top-p);
//! 2. the target verifies `[last, guess_1, ..., guess_{B-1}]` in ONE forward of B tokens;
//! 3. the longest prefix of guesses the target agrees with is accepted, plus one token from the target
//!    (greedy: guess i is kept iff it is the target's argmax; sampling: speculative rejection sampling — keep
//!    guess x with probability min(1, p(x)/q(x)), else draw from norm(max(0, p - q)); after B-1 acceptances
//!    draw the bonus token from p — so the output distribution equals plain sampling from the target);
//! 4. roll back: the target's KV cache keeps positions `< pos + accepted + 1` (later slots are overwritten by the
//!    next verify), and the draft's context gets the accepted tokens' target features (`draft_ctx`), which
//!    overwrites the block's own K/V rows in the draft cache.
//!
//! Greedy speculative output is token-identical to plain greedy decoding.

use crate::generate::{Backend, Finish};
use crate::sampling::{argmax, distribution, Sampler};
use anyhow::{bail, Result};
use serde::Serialize;
use std::time::Instant;

/// Block size used when none is given: 8, capped by the draft's trained block size and the plan's max_tokens.
pub const DEFAULT_BLOCK: usize = 8;

/// A target that can also run a DFlash draft.
pub trait SpecTarget: Backend {
    /// Whether a draft is available (else speculative decoding falls back to plain decoding).
    fn has_draft(&self) -> bool;
    /// Target layers whose hidden states, concatenated, are the draft's context features.
    fn feature_layers(&self) -> Vec<usize>;
    /// The draft's trained block size.
    fn draft_block_size(&self) -> usize;
    /// The mask token filling unknown block positions.
    fn mask_token(&self) -> u32;
    /// The draft's context window (context before a block older than this is never read).
    fn draft_window(&self) -> Option<usize>;
    /// Give the draft the context features `feats` (one row per token) of `tokens` at positions `start..`.
    fn draft_context(&mut self, tokens: &[u32], start: usize, feats: &[Vec<f32>]) -> Result<()>;
    /// Run the draft on the block `block` at positions `start..`; returns the logits of block positions `1..`.
    fn draft_block(&mut self, block: &[u32], start: usize) -> Result<Vec<Vec<f32>>>;
    /// Keep only positions `< len` of the target's KV cache.
    fn rollback(&mut self, len: usize);

    /// The context features of token `t` of the last target forward.
    fn features(&self, t: usize) -> Result<Vec<f32>> {
        let mut f = vec![];
        for l in self.feature_layers() {
            match self.hidden(&format!("hidden.{l}"), t) {
                Some(h) => f.extend_from_slice(h),
                None => bail!("the target program does not expose hidden.{l}"),
            }
        }
        Ok(f)
    }
}

impl SpecTarget for crate::cpu::CpuSession {
    fn has_draft(&self) -> bool {
        self.model.plan.draft.is_some()
    }
    fn feature_layers(&self) -> Vec<usize> {
        self.model
            .plan
            .draft
            .as_ref()
            .map(|d| d.target_layers.clone())
            .unwrap_or_default()
    }
    fn draft_block_size(&self) -> usize {
        self.model.plan.draft.as_ref().map_or(1, |d| d.block_size)
    }
    fn mask_token(&self) -> u32 {
        self.model.plan.draft.as_ref().map_or(0, |d| d.mask_token)
    }
    fn draft_window(&self) -> Option<usize> {
        self.model.plan.draft.as_ref().map(|d| d.window)
    }
    fn draft_context(&mut self, tokens: &[u32], start: usize, feats: &[Vec<f32>]) -> Result<()> {
        self.run_program("draft_ctx", tokens, start, &[("hidden_in", feats)])
    }
    fn draft_block(&mut self, block: &[u32], start: usize) -> Result<Vec<Vec<f32>>> {
        self.run_program("draft_block", block, start, &[])?;
        (1..block.len())
            .map(|t| {
                self.output("draft_block", "logits", t)
                    .map(|r| r.to_vec())
                    .ok_or_else(|| anyhow::anyhow!("draft_block has no logits"))
            })
            .collect()
    }
    fn rollback(&mut self, len: usize) {
        self.kv.len = len;
    }
}

/// Metrics of a speculative generation (also what the server exposes).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SpecStats {
    pub block_size: usize,
    /// Draft + verify rounds.
    pub rounds: usize,
    /// Guesses proposed by the draft, and how many of them the target accepted.
    pub drafted: usize,
    pub accepted: usize,
    /// Tokens produced by the rounds (accepted guesses + one target token each, before EOS / limit trimming).
    pub round_tokens: usize,
    /// `hist[k]`: rounds that produced k tokens (acceptance length k = accepted guesses + 1), k in 0..=block.
    pub hist: Vec<usize>,
    /// Rounds in which every guess was accepted.
    pub full_blocks: usize,
    pub new_tokens: usize,
    pub prefill_s: f64,
    pub decode_s: f64,
}

impl SpecStats {
    /// Mean acceptance length: tokens per round (accepted guesses + the target's token).
    pub fn mean_acceptance_len(&self) -> f64 {
        self.round_tokens as f64 / self.rounds.max(1) as f64
    }
    /// Fraction of draft guesses accepted.
    pub fn acceptance_rate(&self) -> f64 {
        self.accepted as f64 / self.drafted.max(1) as f64
    }
    /// Decode tokens per second (tokens after the first, over the decode time).
    pub fn tokens_per_s(&self) -> f64 {
        self.new_tokens.saturating_sub(1) as f64 / self.decode_s.max(1e-9)
    }
    pub fn summary(&self) -> String {
        let hist: Vec<String> = self
            .hist
            .iter()
            .enumerate()
            .skip(1)
            .map(|(k, n)| format!("{k}:{n}"))
            .collect();
        format!(
            "block={} rounds={} mean_accept_len={:.3} accept_rate={:.3} full_blocks={} hist=[{}] new_tokens={} \
             prefill={:.3}s decode={:.3}s decode_tok_per_s={:.1}",
            self.block_size,
            self.rounds,
            self.mean_acceptance_len(),
            self.acceptance_rate(),
            self.full_blocks,
            hist.join(" "),
            self.new_tokens,
            self.prefill_s,
            self.decode_s,
            self.tokens_per_s()
        )
    }
}

/// Decide a verified block. `guesses` are the draft's B-1 tokens, `draft_probs` (sampling only) the draft
/// distributions they were drawn from, `target` the target's B logits rows for `[last, guesses..]`.
/// Returns (accepted guesses, the target's token that follows them).
pub fn accept_block(
    guesses: &[u32],
    draft_probs: Option<&[Vec<f32>]>,
    target: &[Vec<f32>],
    sampler: &mut Sampler,
) -> (usize, u32) {
    debug_assert_eq!(target.len(), guesses.len() + 1);
    if sampler.params.temperature <= 0.0 {
        for (i, &g) in guesses.iter().enumerate() {
            let t = argmax(&target[i]);
            if t != g {
                return (i, t);
            }
        }
        return (guesses.len(), argmax(&target[guesses.len()]));
    }
    let params = sampler.params;
    for (i, &x) in guesses.iter().enumerate() {
        let p = distribution(&target[i], &params);
        let q = &draft_probs.expect("sampling needs the draft distributions")[i];
        let (px, qx) = (p[x as usize], q[x as usize]);
        // Accept with probability min(1, p/q) (q(x) > 0: x was drawn from q).
        if sampler.uniform() * qx < px {
            continue;
        }
        let mut r: Vec<f32> = p.iter().zip(q).map(|(a, b)| (a - b).max(0.0)).collect();
        let s: f32 = r.iter().sum();
        if s > 0.0 {
            r.iter_mut().for_each(|v| *v /= s);
        } else {
            r = p;
        }
        return (i, sampler.draw(&r));
    }
    let p = distribution(&target[guesses.len()], &params);
    (guesses.len(), sampler.draw(&p))
}

/// Speculative generation. `block` (1..=max_tokens) is the verify block size; 1 (or a plan without a draft)
/// decodes plainly. `on_token` sees each new token; returning false stops.
pub fn spec_generate<B: SpecTarget>(
    b: &mut B,
    prompt: &[u32],
    max_new: usize,
    block: usize,
    sampler: &mut Sampler,
    eos: &[u32],
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<(Vec<u32>, Finish, SpecStats)> {
    if block == 0 || block > b.max_tokens() {
        bail!(
            "block size must be in 1..={} (the plan's max_tokens), got {block}",
            b.max_tokens()
        );
    }
    if prompt.is_empty() {
        bail!("empty prompt");
    }
    if prompt.len() >= b.max_ctx() {
        bail!(
            "prompt of {} tokens does not fit the context of {} tokens",
            prompt.len(),
            b.max_ctx()
        );
    }
    let use_draft = block > 1 && b.has_draft();
    let block = if use_draft { block } else { 1 };
    let mut st = SpecStats {
        block_size: block,
        hist: vec![0; block + 1],
        ..Default::default()
    };
    let t0 = Instant::now();
    // Prefill the target; feed the draft the features of the prompt positions its window can see.
    let n = prompt.len();
    let window = b.draft_window();
    let mut start = 0;
    let mut logits = vec![];
    for chunk in prompt.chunks(b.max_tokens()) {
        b.forward(chunk, start)?;
        if start + chunk.len() == n {
            logits = b.logits(chunk.len() - 1).to_vec();
        }
        let seen = window.is_none_or(|w| start + chunk.len() + w > n);
        if use_draft && seen {
            let feats = (0..chunk.len())
                .map(|t| b.features(t))
                .collect::<Result<Vec<_>>>()?;
            b.draft_context(chunk, start, &feats)?;
        }
        start += chunk.len();
    }
    st.prefill_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut out = vec![];
    let finish = |out: &Vec<u32>, mut st: SpecStats, f: Finish| {
        st.new_tokens = out.len();
        st.decode_s = t1.elapsed().as_secs_f64();
        Ok((out.clone(), f, st))
    };
    if max_new == 0 {
        return finish(&out, st, Finish::Length);
    }
    let mut last = sampler.sample(&logits);
    out.push(last);
    if !on_token(last) || eos.contains(&last) {
        return finish(&out, st, Finish::Stop);
    }
    let mut pos = n;
    let mask = b.mask_token();
    loop {
        let bs = block
            .min(max_new - out.len())
            .min(b.max_ctx().saturating_sub(pos));
        if bs == 0 {
            return finish(&out, st, Finish::Length);
        }
        // Draft.
        let mut guesses = vec![];
        let mut qs = vec![];
        if bs > 1 {
            let mut blk = vec![mask; bs];
            blk[0] = last;
            let rows = b.draft_block(&blk, pos)?;
            for r in &rows[..bs - 1] {
                if sampler.params.temperature <= 0.0 {
                    guesses.push(argmax(r));
                } else {
                    let q = distribution(r, &sampler.params);
                    guesses.push(sampler.draw(&q));
                    qs.push(q);
                }
            }
        }
        // Verify.
        let mut toks = vec![last];
        toks.extend_from_slice(&guesses);
        b.forward(&toks, pos)?;
        let target: Vec<Vec<f32>> = (0..bs).map(|t| b.logits(t).to_vec()).collect();
        let qref = (!qs.is_empty()).then_some(qs.as_slice());
        let (a, next) = accept_block(&guesses, qref, &target, sampler);
        st.rounds += 1;
        st.drafted += guesses.len();
        st.accepted += a;
        st.round_tokens += a + 1;
        st.hist[a + 1] += 1;
        if bs > 1 && a == guesses.len() {
            st.full_blocks += 1;
        }
        // Roll back the target to the accepted prefix; extend the draft's context with it.
        b.rollback(pos + a + 1);
        if bs > 1 && out.len() + a + 1 < max_new {
            let feats = (0..=a).map(|t| b.features(t)).collect::<Result<Vec<_>>>()?;
            b.draft_context(&toks[..=a], pos, &feats)?;
        }
        for &t in guesses[..a].iter().chain(std::iter::once(&next)) {
            out.push(t);
            if !on_token(t) || eos.contains(&t) {
                return finish(&out, st, Finish::Stop);
            }
        }
        last = next;
        pos += a + 1;
    }
}

/// The block size to use: `requested`, else [`DEFAULT_BLOCK`] capped by the draft's and the plan's limits.
pub fn default_block<B: SpecTarget>(b: &B, requested: Option<usize>) -> usize {
    requested.unwrap_or_else(|| {
        DEFAULT_BLOCK
            .min(b.draft_block_size())
            .min(b.max_tokens())
            .max(1)
    })
}
