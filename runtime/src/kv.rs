//! Per-sequence KV cache. Global-attention layers keep every position; sliding-window layers keep a ring of
//! `window + max_tokens` slots, enough for any query of a forward of up to `max_tokens` tokens to see its whole
//! window, so their memory is constant in context length. Rolling back (speculative decoding) is setting `len`:
//! later writes overwrite the rejected slots.

use mimo_ir::plan::Plan;
use mimo_ir::KvKind;

pub struct LayerCache {
    pub cap: usize,
    pub heads: usize,
    pub k_dim: usize,
    pub v_dim: usize,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

pub struct KvCache {
    /// Indexed by layer; `None` for layers without attention cache.
    pub layers: Vec<Option<LayerCache>>,
    /// Positions `< len` are valid.
    pub len: usize,
    pub max_ctx: usize,
}

impl KvCache {
    pub fn new(plan: &Plan, max_ctx: usize) -> KvCache {
        let n = plan.kv.iter().map(|k| k.layer + 1).max().unwrap_or(0);
        let mut layers: Vec<Option<LayerCache>> = (0..n).map(|_| None).collect();
        for d in &plan.kv {
            let cap = match d.window {
                Some(w) => (w + plan.max_tokens).min(max_ctx),
                None => max_ctx,
            };
            layers[d.layer] = Some(LayerCache {
                cap,
                heads: d.heads,
                k_dim: d.k_dim,
                v_dim: d.v_dim,
                k: vec![0.0; cap * d.heads * d.k_dim],
                v: vec![0.0; cap * d.heads * d.v_dim],
            });
        }
        KvCache {
            layers,
            len: 0,
            max_ctx,
        }
    }

    fn layer(&self, l: usize) -> &LayerCache {
        self.layers[l]
            .as_ref()
            .expect("plan validation checks cache layers")
    }

    pub fn write(&mut self, l: usize, kind: KvKind, pos: usize, row: &[f32]) {
        let c = self.layers[l]
            .as_mut()
            .expect("plan validation checks cache layers");
        let slot = pos % c.cap;
        let (buf, d) = match kind {
            KvKind::K => (&mut c.k, c.k_dim),
            KvKind::V => (&mut c.v, c.v_dim),
        };
        let w = c.heads * d;
        buf[slot * w..(slot + 1) * w].copy_from_slice(&row[..w]);
    }

    pub fn key(&self, l: usize, pos: usize, head: usize) -> &[f32] {
        let c = self.layer(l);
        let o = ((pos % c.cap) * c.heads + head) * c.k_dim;
        &c.k[o..o + c.k_dim]
    }

    pub fn value(&self, l: usize, pos: usize, head: usize) -> &[f32] {
        let c = self.layer(l);
        let o = ((pos % c.cap) * c.heads + head) * c.v_dim;
        &c.v[o..o + c.v_dim]
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|c| 4 * (c.k.len() + c.v.len()))
            .sum()
    }
}
