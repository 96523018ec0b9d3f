//! The compiled plan, run by the CPU runtime, against the independent reference forward pass
//! (`mimo_tests::reference`), for both architectures: chunked prefill, token-by-token decode across the
//! sliding window, mixed forward sizes, and greedy generation.

use mimo_models::checkpoint::Checkpoint;
use mimo_models::config::Arch;
use mimo_runtime::cpu::CpuSession;
use mimo_runtime::generate::generate;
use mimo_runtime::model::Model;
use mimo_runtime::sampling::{argmax, Sampler, SamplingParams};
use mimo_tests::reference::Reference;
use mimo_tests::util::{compile_bf16, random_tokens, rel_err, tiny};
use std::path::PathBuf;
use std::sync::Arc;

const MAX_TOKENS: usize = 16;
const PROMPT: usize = 40;
const DECODE: usize = 30;
/// bf16 weights are identical in both paths and both accumulate in >= f32, so only rounding differs
/// (measured ~3e-7).
const BOUND: f64 = 1e-4;

struct Setup {
    _td: tempfile::TempDir,
    model: Arc<Model>,
    reference: Reference,
    arch: Arch,
    seed: u64,
}

fn setup(arch: Arch, seed: u64, fused: bool) -> Setup {
    let td = tempfile::tempdir().unwrap();
    let ck_dir = td.path().join("ckpt");
    let plan_dir: PathBuf = td.path().join("plan");
    tiny(&ck_dir, arch, seed, fused);
    compile_bf16(&ck_dir, &plan_dir, MAX_TOKENS);
    let ck = Checkpoint::open(&ck_dir).unwrap();
    let reference = Reference::new(&ck);
    let model = Model::load(&plan_dir, true).unwrap();
    assert_eq!(model.plan.max_tokens, MAX_TOKENS);
    Setup {
        _td: td,
        model,
        reference,
        arch,
        seed,
    }
}

/// Run `tokens` through a fresh session in forwards of the given sizes (cycled); logits of every position.
fn run_chunks(model: &Arc<Model>, tokens: &[u32], sizes: &[usize]) -> Vec<Vec<f32>> {
    let mut s = CpuSession::new(model.clone(), 256);
    let mut out = vec![];
    let mut start = 0;
    let mut k = 0;
    while start < tokens.len() {
        let n = sizes[k % sizes.len()].min(tokens.len() - start);
        k += 1;
        s.forward("target", &tokens[start..start + n], start)
            .unwrap();
        for t in 0..n {
            out.push(s.output("target", "logits", t).unwrap().to_vec());
        }
        start += n;
        assert_eq!(s.kv.len, start);
    }
    out
}

fn max_err(got: &[Vec<f32>], want: &[Vec<f32>], range: std::ops::Range<usize>, what: &str) -> f64 {
    let mut worst = (0.0f64, 0usize);
    for p in range {
        let e = rel_err(&got[p], &want[p]);
        if e > worst.0 {
            worst = (e, p);
        }
    }
    println!(
        "{what}: max relative error {:.3e} (at position {})",
        worst.0, worst.1
    );
    worst.0
}

/// Prefill (chunks of MAX_TOKENS) then DECODE single-token forwards, and mixed forward sizes, against one
/// reference pass over the whole sequence (causal: earlier logits do not depend on later tokens).
fn check_arch(arch: Arch, seeds: &[u64], fused: bool) {
    for &seed in seeds {
        let mut s = setup(arch, seed, fused);
        let vocab = s.model.plan.model.vocab;
        let toks = random_tokens(1000 + seed, PROMPT + DECODE, vocab);
        let want = s.reference.forward(&toks);
        assert_eq!(want.len(), toks.len());
        assert!(want.iter().flatten().all(|v| v.is_finite()));
        let tag = format!("{:?} seed {} fused {}", s.arch, s.seed, fused);

        // prefill in chunks of MAX_TOKENS, then one token per forward
        let mut sizes = vec![MAX_TOKENS; PROMPT / MAX_TOKENS];
        sizes.push(PROMPT % MAX_TOKENS);
        sizes.extend(std::iter::repeat_n(1, DECODE));
        let got = {
            let mut sess = CpuSession::new(s.model.clone(), 256);
            let mut out = vec![];
            let mut start = 0;
            for &n in &sizes {
                sess.forward("target", &toks[start..start + n], start)
                    .unwrap();
                for t in 0..n {
                    out.push(sess.output("target", "logits", t).unwrap().to_vec());
                }
                start += n;
            }
            assert_eq!(start, toks.len());
            out
        };
        let e_pre = max_err(&got, &want, 0..PROMPT, &format!("{tag} prefill"));
        let e_dec = max_err(
            &got,
            &want,
            PROMPT..PROMPT + DECODE,
            &format!("{tag} decode"),
        );
        assert!(e_pre < BOUND, "{tag}: prefill error {e_pre:.3e} >= {BOUND}");
        assert!(e_dec < BOUND, "{tag}: decode error {e_dec:.3e} >= {BOUND}");

        // mixed forward sizes after a prefill chunk
        let got = run_chunks(&s.model, &toks, &[MAX_TOKENS, 1, 3, 7, 16, 2, 5]);
        let e_mix = max_err(&got, &want, 0..toks.len(), &format!("{tag} mixed"));
        assert!(e_mix < BOUND, "{tag}: mixed error {e_mix:.3e} >= {BOUND}");
    }
}

#[test]
fn moe_matches_reference() {
    check_arch(Arch::MimoV2Flash, &[1, 2, 3], false);
}

#[test]
fn moe_fused_experts_match_reference() {
    check_arch(Arch::MimoV2Flash, &[4], true);
}

#[test]
fn dense_matches_reference() {
    check_arch(Arch::Mimo, &[1, 2, 3], false);
}

/// The sliding-window ring of the KV cache is `window + max_tokens` slots; a context exactly at the cache
/// capacity and chunk boundaries that straddle the ring's wrap point must still match.
#[test]
fn moe_small_kv_cache_matches_reference() {
    let mut s = setup(Arch::MimoV2Flash, 5, false);
    let n = 48;
    let toks = random_tokens(77, n, s.model.plan.model.vocab);
    let want = s.reference.forward(&toks);
    let mut sess = CpuSession::new(s.model.clone(), n);
    let mut got = vec![];
    let mut start = 0;
    for &k in [5usize, 16, 9, 16, 2].iter().cycle() {
        if start == n {
            break;
        }
        let k = k.min(n - start);
        sess.forward("target", &toks[start..start + k], start)
            .unwrap();
        for t in 0..k {
            got.push(sess.output("target", "logits", t).unwrap().to_vec());
        }
        start += k;
    }
    let e = max_err(&got, &want, 0..n, "moe max_ctx = sequence length");
    assert!(e < BOUND);
    // one past the capacity is an error, not a panic
    let err = sess.forward("target", &toks[..1], n).unwrap_err();
    assert!(
        format!("{err:#}").contains("exceeds the KV cache"),
        "{err:#}"
    );
}

fn check_greedy(arch: Arch, seed: u64) {
    let mut s = setup(arch, seed, false);
    let vocab = s.model.plan.model.vocab;
    // prompt longer than max_tokens so that prefill is chunked
    let prompt = random_tokens(500 + seed, 21, vocab);
    let mut sess = CpuSession::new(s.model.clone(), 256);
    let mut sampler = Sampler::new(SamplingParams::default());
    let n_new = 20;
    let (out, _finish) = generate(&mut sess, &prompt, n_new, &mut sampler, &[], |_| true).unwrap();
    assert_eq!(out.len(), n_new);
    let mut seq = prompt.clone();
    seq.extend(&out);
    let want = s.reference.forward(&seq[..seq.len() - 1]);
    for (i, &t) in out.iter().enumerate() {
        let row = &want[prompt.len() - 1 + i];
        let best = argmax(row);
        if best != t {
            // only a near-tie may flip
            let margin = row[best as usize] - row[t as usize];
            let scale = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(
                margin <= 1e-4 * scale,
                "{arch:?} seed {seed}: step {i}: generated {t}, reference argmax {best} (margin {margin})"
            );
        }
    }
}

#[test]
fn greedy_generation_matches_reference_argmax() {
    check_greedy(Arch::MimoV2Flash, 11);
    check_greedy(Arch::Mimo, 12);
}
