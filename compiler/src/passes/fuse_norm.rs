//! fuse-norm: an RMSNorm whose every consumer can take an RMSNorm prologue is folded into those consumers (each
//! normalizes its activation rows while loading them), so the normalized activation is never written out. The
//! consumers take the norm's input `x` and its weight (as an extra input); the RmsNorm node disappears.
//!
//! The ops with a prologue are matmuls, the MoE router, the MoE experts (on their `x`, input 0) and the LM head:
//! so the attention and MLP norms of a layer, the MoE norm read by router + experts, and the final norm read by the
//! LM head all disappear. A consumer qualifies when it has no prologue yet and reads the normalized value only as
//! its activation (input 0). An RMSNorm with any other consumer (a graph output, an add, a matmul's weight slot)
//! is kept whole: folding it into only some users would compute it twice.

use super::{nodes_where, MatMulParts, Pass, PassOptions};
use anyhow::Result;
use mimo_ir::{Graph, NodeId, Op};

pub struct FuseNorm;

/// How a consumer of the norm takes the prologue.
enum Taker {
    MatMul(MatMulParts),
    /// A router, MoE experts or LM head: the norm weight goes into [`Op::norm_slot`].
    Other,
}

/// Can `u` take the prologue of norm `n`?
fn taker(g: &Graph, n: NodeId, u: NodeId) -> Option<Taker> {
    let ins = g.inputs(u);
    // The normalized value must be the activation, not another input.
    if ins.first() != Some(&n) || ins[1..].contains(&n) {
        return None;
    }
    match &g.node(u).op {
        Op::MatMul { .. } => MatMulParts::read(g, u)
            .filter(|p| p.norm_eps.is_none())
            .map(Taker::MatMul),
        op @ (Op::Router { .. } | Op::MoeExperts { .. } | Op::LmHead { .. }) => {
            (op.norm_eps().is_none() && ins.len() == op.arity()).then_some(Taker::Other)
        }
        _ => None,
    }
}

/// Give router / MoE experts / LM head node `u` the prologue: `x` as its activation, `w` at its norm slot.
fn add_prologue(g: &mut Graph, u: NodeId, x: NodeId, w: NodeId, eps: f32) {
    let node = g.node_mut(u);
    match &mut node.op {
        Op::Router { norm_eps, .. } | Op::MoeExperts { norm_eps, .. } | Op::LmHead { norm_eps } => {
            *norm_eps = Some(eps)
        }
        other => unreachable!("{} takes no prologue here", other.mnemonic()),
    }
    let slot = node
        .op
        .norm_slot()
        .expect("ops with a prologue have a norm slot");
    let mut ins = g.inputs(u);
    ins[0] = x;
    ins.insert(slot, w);
    g.set_inputs(u, &ins);
}

impl Pass for FuseNorm {
    fn name(&self) -> &'static str {
        "fuse-norm"
    }

    fn run(&self, g: &mut Graph, opts: &PassOptions) -> Result<String> {
        if !opts.fuse {
            return Ok("skipped (--no-fuse)".into());
        }
        let (mut norms, mut kept) = (0usize, 0usize);
        // matmul, router, moe_experts, lm_head
        let mut into = [0usize; 4];
        for n in nodes_where(g, |op| matches!(op, Op::RmsNorm { .. })) {
            let Op::RmsNorm { eps } = g.node(n).op else {
                unreachable!("filtered on RmsNorm")
            };
            let users = g.users(n);
            let takers: Option<Vec<Taker>> = users.iter().map(|&u| taker(g, n, u)).collect();
            let Some(takers) = takers.filter(|t| !t.is_empty()) else {
                kept += 1;
                continue;
            };
            let ins = g.inputs(n);
            let (x, w) = (ins[0], ins[1]);
            for (&u, t) in users.iter().zip(takers) {
                match t {
                    Taker::MatMul(mut p) => {
                        p.norm_eps = Some(eps);
                        p.norm = Some(w);
                        p.x = x;
                        p.write(g, u);
                        into[0] += 1;
                    }
                    Taker::Other => {
                        into[match g.node(u).op {
                            Op::Router { .. } => 1,
                            Op::MoeExperts { .. } => 2,
                            _ => 3,
                        }] += 1;
                        add_prologue(g, u, x, w, eps);
                    }
                }
            }
            g.remove(n);
            norms += 1;
        }
        let [mm, router, moe, head] = into;
        Ok(format!(
            "fused {norms} rmsnorms into {mm} matmuls, {router} routers, {moe} moe experts and {head} lm heads \
             ({kept} rmsnorms kept: they feed ops without a prologue)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{count, input_names, line, Tb};
    use super::*;
    use mimo_ir::*;

    /// x -> norm -> {q, k}; x -> norm2 -> {matmul, lm_head}.
    fn graph() -> Graph {
        let mut t = Tb::new(8);
        let x = t.x;
        let hn = t.norm("attn_norm", x);
        let q = t.matmul("q", hn, 8);
        let k = t.matmul("k", hn, 4);
        let k8 = t.matmul("k_up", k, 8);
        let s = t.op("sum", Op::Add, TensorType::act(8), &[q, k8]);
        let r = t.op("res", Op::Add, TensorType::act(8), &[x, s]);
        let fn_ = t.norm("final_norm", r);
        let m = t.matmul("side", fn_, 8);
        let hw = t.weight("head", WeightClass::LmHead, DType::BF16, &[16, 8]);
        let lg = t.op(
            "lm_head",
            Op::LmHead { norm_eps: None },
            TensorType::act(16),
            &[fn_, hw],
        );
        let both = t.op("both", Op::Add, TensorType::act(8), &[m, m]);
        t.op(
            "hidden",
            Op::Output {
                name: "hidden.0".into(),
            },
            TensorType::act(8),
            &[both],
        );
        t.output(lg);
        t.g
    }

    #[test]
    fn folds_norm_into_all_matmul_and_lm_head_users() {
        let mut g = graph();
        g.verify().unwrap();
        let nodes = g.g.node_count();
        let msg = FuseNorm.run(&mut g, &PassOptions::default()).unwrap();
        assert_eq!(
            msg,
            "fused 2 rmsnorms into 3 matmuls, 0 routers, 0 moe experts and 1 lm heads \
             (0 rmsnorms kept: they feed ops without a prologue)"
        );
        g.verify().unwrap();
        assert_eq!(g.g.node_count(), nodes - 2);
        let text = g.to_text();
        // q and k now read the embedding directly, with the norm weight as their third input.
        let q = line(&text, "q");
        assert!(
            q.starts_with("%") && q.contains("matmul{prologue=rmsnorm(eps=0.00001)}(%3, %5, %4)"),
            "{text}"
        );
        assert!(line(&text, "k").contains("prologue=rmsnorm"), "{text}");
        assert!(!line(&text, "k_up").contains("prologue"), "{text}");
        // The final norm feeds a matmul and the LM head: both take the prologue.
        assert!(line(&text, "side").contains("prologue=rmsnorm"), "{text}");
        let head = line(&text, "lm_head");
        assert!(
            head.contains("lm_head{prologue=rmsnorm(eps=0.00001)}(")
                && head.ends_with(": f32[T,16]  ; lm_head"),
            "{text}"
        );
        assert_eq!(count(&g, "rmsnorm"), 0);
        assert!(!text.contains("; attn_norm\n"));
        // The LM head reads the residual stream (res), its weight, then final_norm's weight.
        let names = input_names(&g, "lm_head");
        assert_eq!(names, ["res", "head", "final_norm.w"]);
    }

    /// A MoE block: x -> norm -> {router, moe_experts}, the moe output added back to x.
    fn moe_graph(extra_user: bool) -> Graph {
        let mut t = Tb::new(32);
        let x = t.x;
        let hn = t.norm("mlp_norm", x);
        let r = t.router("router", hn, 2, true);
        let gu = t.weight("gate_up", WeightClass::Experts, DType::BF16, &[4, 64, 32]);
        let d = t.weight("down", WeightClass::Experts, DType::BF16, &[4, 32, 32]);
        let moe = Op::MoeExperts {
            n_experts: 4,
            top_k: 2,
            inter: 32,
            norm_eps: None,
            residual: false,
        };
        let m = t.op("moe", moe, TensorType::act(32), &[hn, r, gu, d]);
        let mut y = t.op("mlp_residual", Op::Add, TensorType::act(32), &[x, m]);
        if extra_user {
            // The normalized value also feeds an add: no prologue can replace it there.
            y = t.op("odd", Op::Add, TensorType::act(32), &[y, hn]);
        }
        t.output(y);
        t.g
    }

    #[test]
    fn folds_moe_norm_into_router_and_experts() {
        let mut g = moe_graph(false);
        g.verify().unwrap();
        let nodes = g.g.node_count();
        let msg = FuseNorm.run(&mut g, &PassOptions::default()).unwrap();
        assert!(
            msg.starts_with(
                "fused 1 rmsnorms into 0 matmuls, 1 routers, 1 moe experts and 0 lm heads"
            ),
            "{msg}"
        );
        g.verify().unwrap();
        assert_eq!(g.g.node_count(), nodes - 1);
        assert_eq!(count(&g, "rmsnorm"), 0);
        let text = g.to_text();
        assert!(
            line(&text, "router").contains(
                "router{experts=4, top_k=2, groups=1/1, sigmoid, norm=true, scale=1, prologue=rmsnorm(eps=0.00001)}(%3, %5, %6, %4)"
            ),
            "{text}"
        );
        assert!(
            line(&text, "moe").contains(
                "moe_experts{experts=4, top_k=2, inter=32, prologue=rmsnorm(eps=0.00001)}(%3, %7, %8, %9, %4)"
            ),
            "{text}"
        );
    }

    #[test]
    fn keeps_norm_with_a_user_without_prologue() {
        let mut g = moe_graph(true);
        let before = g.to_text();
        let msg = FuseNorm.run(&mut g, &PassOptions::default()).unwrap();
        assert!(
            msg.starts_with("fused 0 rmsnorms") && msg.contains("(1 rmsnorms kept"),
            "{msg}"
        );
        assert_eq!(g.to_text(), before);
        assert!(!before.contains("prologue"));
    }

    #[test]
    fn no_fuse_is_identity() {
        let mut g = graph();
        let before = g.to_text();
        let opts = PassOptions {
            fuse: false,
            ..Default::default()
        };
        FuseNorm.run(&mut g, &opts).unwrap();
        assert_eq!(g.to_text(), before);
    }

    #[test]
    fn second_run_changes_nothing() {
        let mut g = graph();
        FuseNorm.run(&mut g, &PassOptions::default()).unwrap();
        let before = g.to_text();
        let msg = FuseNorm.run(&mut g, &PassOptions::default()).unwrap();
        assert!(msg.starts_with("fused 0 rmsnorms"), "{msg}");
        assert_eq!(g.to_text(), before);
        g.verify().unwrap();
    }

    #[test]
    fn keeps_norm_read_by_a_consumer_that_already_has_a_prologue() {
        // An LM head whose activation is a norm but which already normalizes: the norm stays.
        let mut t = Tb::new(8);
        let x = t.x;
        let n1 = t.norm("n1", x);
        let hw = t.weight("head", WeightClass::LmHead, DType::BF16, &[16, 8]);
        let nw = t.weight("hn.w", WeightClass::Norm, DType::F32, &[8]);
        let lg = t.op(
            "lm_head",
            Op::LmHead {
                norm_eps: Some(1e-6),
            },
            TensorType::act(16),
            &[n1, hw, nw],
        );
        t.output(lg);
        let mut g = t.g;
        g.verify().unwrap();
        let msg = FuseNorm.run(&mut g, &PassOptions::default()).unwrap();
        assert!(msg.starts_with("fused 0 rmsnorms"), "{msg}");
        assert_eq!(count(&g, "rmsnorm"), 1);
    }
}
