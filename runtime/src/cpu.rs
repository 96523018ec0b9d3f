//! The CPU backend: interprets a plan's instruction stream (multi-threaded with rayon, f32 accumulation).

use crate::kv::KvCache;
use crate::model::Model;
use anyhow::{bail, Result};
use mimo_ir::plan::{BufId, Instr};
use mimo_ir::{AttnSpec, Epilogue, RouterSpec};
use mimo_kernels::cpu::{rmsnorm_row, rope_row, silu, WeightView};
use rayon::prelude::*;
use std::sync::Arc;

/// One sequence's state on the CPU: activation arena and KV cache.
pub struct CpuSession {
    pub model: Arc<Model>,
    arena: Vec<f32>,
    pub kv: KvCache,
    /// Tokens of the last forward.
    t: usize,
}

/// `y[t][r] = W[r] . x[t]` for all tokens, parallel over blocks of weight rows (each row read once for all T).
pub fn matmul_rows(w: &WeightView<'_>, xs: &[Vec<f32>]) -> Vec<Vec<f32>> {
    let n = w.rows();
    let t = xs.len();
    const BLK: usize = 16;
    let mut yt = vec![0f32; n * t];
    yt.par_chunks_mut(BLK * t)
        .enumerate()
        .for_each(|(b, chunk)| {
            for (i, row) in chunk.chunks_mut(t).enumerate() {
                let r = b * BLK + i;
                for (j, x) in xs.iter().enumerate() {
                    row[j] = w.dot_row(r, x);
                }
            }
        });
    (0..t)
        .map(|j| (0..n).map(|r| yt[r * t + j]).collect())
        .collect()
}

impl CpuSession {
    pub fn new(model: Arc<Model>, max_ctx: usize) -> CpuSession {
        let arena = vec![0f32; model.plan.arena_len];
        let kv = KvCache::new(&model.plan, max_ctx);
        CpuSession {
            model,
            arena,
            kv,
            t: 0,
        }
    }

    fn rows(&self, b: BufId) -> Vec<Vec<f32>> {
        let d = &self.model.plan.buffers[b as usize];
        (0..self.t)
            .map(|t| self.arena[d.offset + t * d.width..d.offset + (t + 1) * d.width].to_vec())
            .collect()
    }

    /// Rows of buffer `x`, through the RMSNorm prologue `norm` when there is one (computed exactly as
    /// [`Instr::RmsNorm`] computes it, so fused and unfused plans agree bit for bit).
    fn rows_normed(&self, m: &Model, x: BufId, norm: Option<(u32, f32)>) -> Vec<Vec<f32>> {
        let mut xs = self.rows(x);
        if let Some((nw, eps)) = norm {
            let g = m.small(nw);
            for r in xs.iter_mut() {
                let mut o = vec![0f32; r.len()];
                rmsnorm_row(r, g, eps, &mut o);
                *r = o;
            }
        }
        xs
    }

    fn put(&mut self, b: BufId, rows: &[Vec<f32>]) {
        let d = &self.model.plan.buffers[b as usize];
        let (o, w) = (d.offset, d.width);
        for (t, r) in rows.iter().enumerate() {
            self.arena[o + t * w..o + t * w + r.len()].copy_from_slice(r);
        }
    }

    /// Row `t` of buffer `b` after the last forward.
    pub fn row(&self, b: BufId, t: usize) -> &[f32] {
        let d = &self.model.plan.buffers[b as usize];
        &self.arena[d.offset + t * d.width..d.offset + (t + 1) * d.width]
    }

    /// Row `t` of the named output of `program` after the last forward.
    pub fn output(&self, program: &str, name: &str, t: usize) -> Option<&[f32]> {
        let b = self.model.plan.program(program)?.output(name)?;
        (t < self.t).then(|| self.row(b, t))
    }

    /// Run `program` on `tokens` at positions `start..start+T`. The KV cache must hold positions `< start`.
    pub fn forward(&mut self, program: &str, tokens: &[u32], start: usize) -> Result<()> {
        self.run_program(program, tokens, start, &[])?;
        self.kv.len = start + tokens.len();
        Ok(())
    }

    /// Run `program` with runtime inputs (`LoadInput` rows, e.g. the DFlash draft's `hidden_in`: one row per
    /// token). Unlike [`CpuSession::forward`] this leaves `kv.len` (the target's valid length) alone: the draft
    /// programs write only the draft's cache layers.
    pub fn run_program(
        &mut self,
        program: &str,
        tokens: &[u32],
        start: usize,
        inputs: &[(&str, &[Vec<f32>])],
    ) -> Result<()> {
        let model = self.model.clone();
        let plan = &model.plan;
        let Some(prog) = plan.program(program) else {
            bail!("plan has no program {program:?}")
        };
        if tokens.is_empty() || tokens.len() > plan.max_tokens {
            bail!(
                "a forward takes 1..={} tokens, got {}",
                plan.max_tokens,
                tokens.len()
            );
        }
        if start + tokens.len() > self.kv.max_ctx {
            bail!(
                "context of {} tokens exceeds the KV cache ({} tokens)",
                start + tokens.len(),
                self.kv.max_ctx
            );
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= plan.model.vocab) {
            bail!(
                "token id {bad} is outside the vocabulary ({})",
                plan.model.vocab
            );
        }
        self.t = tokens.len();
        let pos: Vec<u32> = (start..start + tokens.len()).map(|p| p as u32).collect();
        for ins in &prog.instrs {
            self.exec(&model, ins, tokens, &pos, inputs)?;
        }
        Ok(())
    }

    fn exec(
        &mut self,
        m: &Model,
        ins: &Instr,
        tokens: &[u32],
        pos: &[u32],
        inputs: &[(&str, &[Vec<f32>])],
    ) -> Result<()> {
        match ins {
            Instr::LoadInput { name, out } => {
                let Some((_, rows)) = inputs.iter().find(|(n, _)| n == name) else {
                    bail!("program input {name:?} was not given")
                };
                let w = m.plan.buffers[*out as usize].width;
                if rows.len() != tokens.len() || rows.iter().any(|r| r.len() != w) {
                    bail!(
                        "input {name:?} must have {} rows of width {w}",
                        tokens.len()
                    );
                }
                self.put(*out, rows);
            }
            Instr::HeadRmsNorm {
                x,
                w,
                out,
                eps,
                head_dim,
            } => {
                let g = m.small(*w);
                let rows: Vec<Vec<f32>> = self
                    .rows(*x)
                    .iter()
                    .map(|r| {
                        let mut o = vec![0f32; r.len()];
                        for (xi, oi) in r.chunks(*head_dim).zip(o.chunks_mut(*head_dim)) {
                            rmsnorm_row(xi, g, *eps, oi);
                        }
                        o
                    })
                    .collect();
                self.put(*out, &rows);
            }
            Instr::BlockAttention { q, out, spec } => {
                // The block is the whole forward: positions pos[0]..=pos[T-1]; the context window precedes it.
                let s0 = pos[0] as usize;
                let end = pos[pos.len() - 1] as usize;
                let lo = spec.window.map_or(0, |w| s0.saturating_sub(w));
                let qs = self.rows(*q);
                let rows: Vec<Vec<f32>> = qs
                    .iter()
                    .map(|qr| self.attend_range(spec, qr, lo, end, None))
                    .collect();
                self.put(*out, &rows);
            }
            Instr::Embed { table, out } => {
                let v = m.view(*table);
                let rows: Vec<Vec<f32>> = tokens
                    .iter()
                    .map(|&t| {
                        let mut r = vec![0f32; v.cols()];
                        v.row_into(t as usize, &mut r);
                        r
                    })
                    .collect();
                self.put(*out, &rows);
            }
            Instr::RmsNorm { x, w, out, eps } => {
                let g = m.small(*w);
                let rows: Vec<Vec<f32>> = self
                    .rows(*x)
                    .iter()
                    .map(|r| {
                        let mut o = vec![0f32; r.len()];
                        rmsnorm_row(r, g, *eps, &mut o);
                        o
                    })
                    .collect();
                self.put(*out, &rows);
            }
            Instr::MatMul {
                x,
                w,
                bias,
                norm,
                residual,
                epilogue,
                out,
            } => {
                let xs = self.rows_normed(m, *x, *norm);
                let mut ys = matmul_rows(&m.view(*w), &xs);
                if let Some(b) = bias {
                    let bv = m.small(*b);
                    for y in ys.iter_mut() {
                        for (a, c) in y.iter_mut().zip(bv) {
                            *a += c;
                        }
                    }
                }
                let res = residual.map(|r| self.rows(r));
                for (t, y) in ys.iter_mut().enumerate() {
                    for e in epilogue {
                        match e {
                            Epilogue::Scale(s) => y.iter_mut().for_each(|v| *v *= s),
                            Epilogue::Rope(r) => {
                                rope_row(y, pos[t], r.theta, r.head_dim, r.rotary_dim)
                            }
                            Epilogue::KvWrite { layer, kind, .. } => {
                                self.kv.write(*layer, *kind, pos[t] as usize, y)
                            }
                            Epilogue::SwiGlu => {
                                let h = y.len() / 2;
                                let s: Vec<f32> = (0..h).map(|i| silu(y[i]) * y[h + i]).collect();
                                *y = s;
                            }
                            Epilogue::ResidualAdd => {
                                let r = &res
                                    .as_ref()
                                    .expect("lowering gives residual matmuls a residual")[t];
                                y.iter_mut().zip(r).for_each(|(a, b)| *a += b);
                            }
                        }
                    }
                }
                self.put(*out, &ys);
            }
            Instr::Rope { x, out, spec } => {
                let mut rows = self.rows(*x);
                for (t, r) in rows.iter_mut().enumerate() {
                    rope_row(r, pos[t], spec.theta, spec.head_dim, spec.rotary_dim);
                }
                self.put(*out, &rows);
            }
            Instr::KvWrite { x, layer, kind } => {
                let rows = self.rows(*x);
                for (t, r) in rows.iter().enumerate() {
                    self.kv.write(*layer, *kind, pos[t] as usize, r);
                }
            }
            Instr::Attention {
                q,
                sinks,
                out,
                spec,
            } => {
                let qs = self.rows(*q);
                let sk = sinks.map(|s| m.small(s));
                let rows: Vec<Vec<f32>> = qs
                    .iter()
                    .enumerate()
                    .map(|(t, qr)| self.attend(spec, qr, pos[t] as usize, sk))
                    .collect();
                self.put(*out, &rows);
            }
            Instr::Router {
                x,
                w,
                bias,
                norm,
                out,
                spec,
            } => {
                let xs = self.rows_normed(m, *x, *norm);
                let wv = m.view(*w);
                let bv = bias.map(|b| m.small(b));
                let rows: Vec<Vec<f32>> = xs.iter().map(|xr| route(spec, &wv, bv, xr)).collect();
                self.put(*out, &rows);
            }
            Instr::Moe {
                x,
                routing,
                gate_up,
                down,
                norm,
                residual,
                out,
                top_k,
                inter,
            } => {
                let xs = self.rows_normed(m, *x, *norm);
                let rs = self.rows(*routing);
                let res = residual.map(|r| self.rows(r));
                let rows: Vec<Vec<f32>> = xs
                    .par_iter()
                    .zip(rs.par_iter())
                    .enumerate()
                    .map(|(t, (xr, rr))| {
                        let mut acc = vec![0f32; xr.len()];
                        for k in 0..*top_k {
                            let e = rr[k] as usize;
                            let wgt = rr[top_k + k];
                            let gu = m.expert(*gate_up, e);
                            let h: Vec<f32> = (0..*inter)
                                .map(|i| silu(gu.dot_row(i, xr)) * gu.dot_row(inter + i, xr))
                                .collect();
                            let d = m.expert(*down, e);
                            for (i, a) in acc.iter_mut().enumerate() {
                                *a += wgt * d.dot_row(i, &h);
                            }
                        }
                        // residual + moe after the expert sum, as the separate add computed it (one f32 addition
                        // of the same two values: IEEE addition is commutative, so the result is bit-identical).
                        if let Some(res) = &res {
                            acc.iter_mut().zip(&res[t]).for_each(|(a, r)| *a += r);
                        }
                        acc
                    })
                    .collect();
                self.put(*out, &rows);
            }
            Instr::SwiGlu { x, out } => {
                let rows: Vec<Vec<f32>> = self
                    .rows(*x)
                    .iter()
                    .map(|r| {
                        let h = r.len() / 2;
                        (0..h).map(|i| silu(r[i]) * r[h + i]).collect()
                    })
                    .collect();
                self.put(*out, &rows);
            }
            Instr::Scale { x, out, factor } => {
                let rows: Vec<Vec<f32>> = self
                    .rows(*x)
                    .into_iter()
                    .map(|r| r.into_iter().map(|v| v * factor).collect())
                    .collect();
                self.put(*out, &rows);
            }
            Instr::Add { a, b, out } => {
                let (ra, rb) = (self.rows(*a), self.rows(*b));
                let rows: Vec<Vec<f32>> = ra
                    .iter()
                    .zip(&rb)
                    .map(|(x, y)| x.iter().zip(y).map(|(p, q)| p + q).collect())
                    .collect();
                self.put(*out, &rows);
            }
            Instr::LmHead { x, w, norm, out } => {
                let ys = matmul_rows(&m.view(*w), &self.rows_normed(m, *x, *norm));
                self.put(*out, &ys);
            }
        }
        Ok(())
    }

    /// Attention of one query row at position `p` over the cached keys it may see.
    fn attend(&self, s: &AttnSpec, q: &[f32], p: usize, sinks: Option<&[f32]>) -> Vec<f32> {
        let lo = match s.window {
            Some(w) => (p + 1).saturating_sub(w),
            None => 0,
        };
        self.attend_range(s, q, lo, p, sinks)
    }

    /// Attention of one query row over the cached positions `lo..=p`.
    fn attend_range(
        &self,
        s: &AttnSpec,
        q: &[f32],
        lo: usize,
        p: usize,
        sinks: Option<&[f32]>,
    ) -> Vec<f32> {
        let group = s.n_heads / s.n_kv_heads;
        let mut out = vec![0f32; s.n_heads * s.v_head_dim];
        let heads: Vec<Vec<f32>> = (0..s.n_heads)
            .into_par_iter()
            .map(|h| {
                let kvh = h / group;
                let qh = &q[h * s.head_dim..(h + 1) * s.head_dim];
                let scores: Vec<f32> = (lo..=p)
                    .map(|j| {
                        let k = self.kv.key(s.layer, j, kvh);
                        qh.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * s.scale
                    })
                    .collect();
                let sink = sinks.map(|sk| sk[h]);
                let mx = scores
                    .iter()
                    .copied()
                    .chain(sink)
                    .fold(f32::NEG_INFINITY, f32::max);
                let ex: Vec<f32> = scores.iter().map(|v| (v - mx).exp()).collect();
                let den: f32 = ex.iter().sum::<f32>() + sink.map(|v| (v - mx).exp()).unwrap_or(0.0);
                let mut o = vec![0f32; s.v_head_dim];
                for (i, j) in (lo..=p).enumerate() {
                    let v = self.kv.value(s.layer, j, kvh);
                    let pj = ex[i] / den;
                    for (a, b) in o.iter_mut().zip(v) {
                        *a += pj * b;
                    }
                }
                o
            })
            .collect();
        for (h, o) in heads.into_iter().enumerate() {
            out[h * s.v_head_dim..(h + 1) * s.v_head_dim].copy_from_slice(&o);
        }
        out
    }
}

/// Top-k routing of one token: returns `[idx_0..idx_k (as f32), w_0..w_k]`.
pub fn route(spec: &RouterSpec, w: &WeightView<'_>, bias: Option<&[f32]>, x: &[f32]) -> Vec<f32> {
    let e = spec.n_experts;
    let logits: Vec<f32> = (0..e).map(|r| w.dot_row(r, x)).collect();
    let scores: Vec<f32> = if spec.sigmoid {
        logits.iter().map(|l| 1.0 / (1.0 + (-l).exp())).collect()
    } else {
        let mx = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let ex: Vec<f32> = logits.iter().map(|l| (l - mx).exp()).collect();
        let s: f32 = ex.iter().sum();
        ex.iter().map(|v| v / s).collect()
    };
    let choice: Vec<f32> = match bias {
        Some(b) => scores.iter().zip(b).map(|(s, b)| s + b).collect(),
        None => scores.clone(),
    };
    // Group-limited choice: a group's score is the sum of its top-2 choice scores.
    let per = e / spec.n_group;
    let mut allowed = vec![true; e];
    if spec.n_group > 1 {
        let mut gs: Vec<(f32, usize)> = (0..spec.n_group)
            .map(|g| {
                let mut v: Vec<f32> = choice[g * per..(g + 1) * per].to_vec();
                v.sort_by(|a, b| b.total_cmp(a));
                (v.iter().take(2).sum(), g)
            })
            .collect();
        gs.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        allowed = vec![false; e];
        for &(_, g) in gs.iter().take(spec.topk_group) {
            allowed[g * per..(g + 1) * per]
                .iter_mut()
                .for_each(|a| *a = true);
        }
    }
    let mut cand: Vec<usize> = (0..e).filter(|&i| allowed[i]).collect();
    cand.sort_by(|&a, &b| choice[b].total_cmp(&choice[a]).then(a.cmp(&b)));
    let chosen = &cand[..spec.top_k];
    let mut wts: Vec<f32> = chosen.iter().map(|&i| scores[i]).collect();
    if spec.norm_topk_prob {
        let s: f32 = wts.iter().sum::<f32>() + 1e-20;
        wts.iter_mut().for_each(|v| *v /= s);
    }
    wts.iter_mut().for_each(|v| *v *= spec.scaling);
    chosen.iter().map(|&i| i as f32).chain(wts).collect()
}
