//! fuse-rope-kv: per-row ops that directly follow a matmul become epilogue stages of it.
//!
//! - `MatMul -> Rope` (the rope the matmul's only consumer) becomes an `Epilogue::Rope` stage;
//! - `MatMul -> Scale` likewise becomes `Epilogue::Scale`;
//! - a matmul (with those stages) whose only consumer is a `KvWrite` takes a final `Epilogue::KvWrite` stage and
//!   becomes the cache handle itself (output type `Cache`): the attention then takes the matmul as its cache input,
//!   and the projected K / V rows go from registers into the cache without an activation buffer.
//!
//! Rope and KvWrite read the positions input, which the matmul gains (slot as `matmul_inputs` says).

use super::{nodes_where, only_user, MatMulParts, Pass, PassOptions};
use anyhow::Result;
use mimo_ir::{Epilogue, Graph, NodeId, Op};

pub struct FuseRopeKv;

#[derive(Default)]
struct Counts {
    rope: usize,
    scale: usize,
    kv: usize,
}

/// Absorb the consumer of matmul `mm` if it is a fusable per-row op. Returns whether it did.
fn absorb_one(g: &mut Graph, mm: NodeId, c: &mut Counts) -> bool {
    let Some(mut p) = MatMulParts::read(g, mm) else {
        return false;
    };
    if p.ends_in_kv_write() {
        return false;
    }
    let Some(u) = only_user(g, mm) else {
        return false;
    };
    let ins = g.inputs(u);
    if ins.first() != Some(&mm) {
        return false;
    }
    // A positions input other than the one the matmul already reads cannot be shared.
    let positions_ok = |p: &MatMulParts| {
        ins.get(1)
            .is_some_and(|&q| p.positions.is_none_or(|pp| pp == q))
    };
    let stage = match &g.node(u).op {
        Op::Rope { spec } if positions_ok(&p) => {
            c.rope += 1;
            Epilogue::Rope(*spec)
        }
        Op::Scale { factor } => {
            c.scale += 1;
            Epilogue::Scale(*factor)
        }
        Op::KvWrite {
            layer,
            kind,
            heads,
            head_dim,
        } if positions_ok(&p) => {
            c.kv += 1;
            Epilogue::KvWrite {
                layer: *layer,
                kind: *kind,
                heads: *heads,
                head_dim: *head_dim,
            }
        }
        _ => return false,
    };
    if matches!(stage, Epilogue::Rope(_) | Epilogue::KvWrite { .. }) {
        p.positions = Some(ins[1]);
    }
    p.epilogue.push(stage);
    let ty = g.node(u).ty.clone();
    p.write(g, mm);
    g.node_mut(mm).ty = ty;
    g.replace_uses(u, mm);
    g.remove(u);
    true
}

impl Pass for FuseRopeKv {
    fn name(&self) -> &'static str {
        "fuse-rope-kv"
    }

    fn run(&self, g: &mut Graph, opts: &PassOptions) -> Result<String> {
        if !opts.fuse {
            return Ok("skipped (--no-fuse)".into());
        }
        let mut c = Counts::default();
        for mm in nodes_where(g, |op| matches!(op, Op::MatMul { .. })) {
            while absorb_one(g, mm, &mut c) {}
        }
        Ok(format!(
            "fused {} ropes, {} scales and {} kv-writes into matmul epilogues",
            c.rope, c.scale, c.kv
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{count, input_names, line, Tb};
    use super::*;
    use mimo_ir::*;

    /// One attention block: q/k/v projections, rope on q and k, scale on v, cache writes, attention, o.
    fn graph() -> Graph {
        let mut t = Tb::new(16);
        let (x, pos) = (t.x, t.pos);
        let rope = RopeSpec {
            theta: 10000.0,
            head_dim: 8,
            rotary_dim: 4,
        };
        let q = t.matmul("q", x, 16);
        let k = t.matmul("k", x, 8);
        let v = t.matmul("v", x, 8);
        let q = t.op(
            "q_rope",
            Op::Rope { spec: rope },
            TensorType::act(16),
            &[q, pos],
        );
        let k = t.op(
            "k_rope",
            Op::Rope { spec: rope },
            TensorType::act(8),
            &[k, pos],
        );
        let v = t.op(
            "v_scale",
            Op::Scale { factor: 0.5 },
            TensorType::act(8),
            &[v],
        );
        let kv = |kind| Op::KvWrite {
            layer: 0,
            kind,
            heads: 1,
            head_dim: 8,
        };
        let cache = TensorType::fixed(DType::Cache, &[1, 8]);
        let kc = t.op("k_cache", kv(KvKind::K), cache.clone(), &[k, pos]);
        let vc = t.op("v_cache", kv(KvKind::V), cache, &[v, pos]);
        let spec = AttnSpec {
            layer: 0,
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 8,
            v_head_dim: 8,
            window: None,
            scale: 0.35,
            sinks: false,
        };
        let a = t.op(
            "attn",
            Op::Attention { spec },
            TensorType::act(16),
            &[q, kc, vc],
        );
        // A matmul with two users: its rope must stay.
        let m = t.matmul("shared", a, 16);
        let mr = t.op(
            "shared_rope",
            Op::Rope { spec: rope },
            TensorType::act(16),
            &[m, pos],
        );
        let s = t.op("sum", Op::Add, TensorType::act(16), &[m, mr]);
        t.output(s);
        t.g
    }

    #[test]
    fn fuses_rope_scale_and_cache_writes() {
        let mut g = graph();
        g.verify().unwrap();
        let msg = FuseRopeKv.run(&mut g, &PassOptions::default()).unwrap();
        assert_eq!(
            msg,
            "fused 2 ropes, 1 scales and 2 kv-writes into matmul epilogues"
        );
        g.verify().unwrap();
        let text = g.to_text();
        assert!(
            line(&text, "q").contains("matmul{epilogue=[rope(theta=10000, rot=4/8)]}(%3, %"),
            "{text}"
        );
        assert!(
            line(&text, "q").ends_with(", %1) : f32[T,16]  ; q"),
            "{text}"
        );
        assert!(
            line(&text, "k").contains("epilogue=[rope(theta=10000, rot=4/8), kv_write(L0.K)]"),
            "{text}"
        );
        assert!(
            line(&text, "k").ends_with(", %1) : cache[1,8]  ; k"),
            "{text}"
        );
        assert!(
            line(&text, "v").contains("epilogue=[scale(0.5), kv_write(L0.V)]"),
            "{text}"
        );
        assert_eq!(count(&g, "kv_write"), 0);
        assert_eq!(count(&g, "scale"), 0);
        // Only the rope of the shared matmul is left.
        assert_eq!(count(&g, "rope"), 1);
        assert!(!line(&text, "shared").contains("epilogue"), "{text}");
        // The attention reads the matmuls as its caches.
        let names = input_names(&g, "attn");
        assert_eq!(names, ["q", "k", "v"]);
    }

    #[test]
    fn no_fuse_is_identity() {
        let mut g = graph();
        let before = g.to_text();
        let opts = PassOptions {
            fuse: false,
            ..Default::default()
        };
        FuseRopeKv.run(&mut g, &opts).unwrap();
        assert_eq!(g.to_text(), before);
    }

    #[test]
    fn idempotent() {
        let mut g = graph();
        FuseRopeKv.run(&mut g, &PassOptions::default()).unwrap();
        let before = g.to_text();
        let msg = FuseRopeKv.run(&mut g, &PassOptions::default()).unwrap();
        assert_eq!(
            msg,
            "fused 0 ropes, 0 scales and 0 kv-writes into matmul epilogues"
        );
        assert_eq!(g.to_text(), before);
    }
}
