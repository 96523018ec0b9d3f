//! Plain (non-speculative) generation over any backend.

use crate::sampling::Sampler;
use anyhow::{bail, Result};

/// What a forward-capable backend offers the decoding loops.
pub trait Backend {
    /// Run the target program on `tokens` at positions `start..`; the cache must hold `start` positions.
    fn forward(&mut self, tokens: &[u32], start: usize) -> Result<()>;
    /// Logits of token `t` of the last forward.
    fn logits(&self, t: usize) -> &[f32];
    /// A named hidden-state output (`hidden.L`) of token `t` of the last forward.
    fn hidden(&self, name: &str, t: usize) -> Option<&[f32]>;
    fn max_tokens(&self) -> usize;
    fn max_ctx(&self) -> usize;
}

impl Backend for crate::cpu::CpuSession {
    fn forward(&mut self, tokens: &[u32], start: usize) -> Result<()> {
        crate::cpu::CpuSession::forward(self, "target", tokens, start)
    }
    fn logits(&self, t: usize) -> &[f32] {
        self.output("target", "logits", t)
            .expect("logits of a token of the last forward")
    }
    fn hidden(&self, name: &str, t: usize) -> Option<&[f32]> {
        self.output("target", name, t)
    }
    fn max_tokens(&self) -> usize {
        self.model.plan.max_tokens
    }
    fn max_ctx(&self) -> usize {
        self.kv.max_ctx
    }
}

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    Stop,
    Length,
}

/// Run the prompt through the backend in chunks of at most `max_tokens`. Returns the logits of the last token.
pub fn prefill<B: Backend>(b: &mut B, prompt: &[u32]) -> Result<Vec<f32>> {
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
    let mut start = 0;
    for chunk in prompt.chunks(b.max_tokens()) {
        b.forward(chunk, start)?;
        start += chunk.len();
    }
    let last = (prompt.len() - 1) % b.max_tokens();
    Ok(b.logits(last).to_vec())
}

/// Plain decoding: one token per forward. `on_token` sees each new token; returning false stops.
pub fn generate<B: Backend>(
    b: &mut B,
    prompt: &[u32],
    max_new: usize,
    sampler: &mut Sampler,
    eos: &[u32],
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<(Vec<u32>, Finish)> {
    let mut logits = prefill(b, prompt)?;
    let mut out = vec![];
    let mut pos = prompt.len();
    loop {
        if out.len() >= max_new {
            return Ok((out, Finish::Length));
        }
        let t = sampler.sample(&logits);
        out.push(t);
        if !on_token(t) || eos.contains(&t) {
            return Ok((out, Finish::Stop));
        }
        if pos + 1 > b.max_ctx() || out.len() >= max_new {
            return Ok((out, Finish::Length));
        }
        b.forward(&[t], pos)?;
        pos += 1;
        logits = b.logits(0).to_vec();
    }
}

impl<B: Backend + ?Sized> Backend for Box<B> {
    fn forward(&mut self, tokens: &[u32], start: usize) -> Result<()> {
        (**self).forward(tokens, start)
    }
    fn logits(&self, t: usize) -> &[f32] {
        (**self).logits(t)
    }
    fn hidden(&self, name: &str, t: usize) -> Option<&[f32]> {
        (**self).hidden(name, t)
    }
    fn max_tokens(&self) -> usize {
        (**self).max_tokens()
    }
    fn max_ctx(&self) -> usize {
        (**self).max_ctx()
    }
}
