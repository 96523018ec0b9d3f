//! Helpers shared by the integration tests: tiny checkpoints, plans, random tokens, error metrics, binaries.

use mimo_compiler::{compile, CompileOptions};
use mimo_models::config::Arch;
use mimo_models::tiny::{make_tiny, TinyOptions};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Write a tiny checkpoint of `arch` into `dir`.
pub fn tiny(dir: &Path, arch: Arch, seed: u64, fused_experts: bool) {
    make_tiny(
        dir,
        &TinyOptions {
            arch,
            seed,
            fp8: false,
            fused_experts,
        },
    )
    .expect("make_tiny");
}

/// Compile options with bf16 experts and `max_tokens` tokens per forward.
pub fn bf16_options(max_tokens: usize) -> CompileOptions {
    let mut o = CompileOptions {
        max_tokens,
        ..Default::default()
    };
    o.passes.experts = mimo_ir::DType::BF16;
    o
}

/// Compile `ckpt` into `out` with bf16 experts.
pub fn compile_bf16(ckpt: &Path, out: &Path, max_tokens: usize) {
    compile(ckpt, out, &bf16_options(max_tokens)).expect("compile");
}

/// `n` random token ids in `1..vocab` (seeded).
pub fn random_tokens(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| r.random_range(1..vocab as u32)).collect()
}

/// `max |a - b| / max |ref|` over one logits row.
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "logits width");
    let diff = got
        .iter()
        .zip(want)
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .fold(0.0, f64::max);
    let scale = want.iter().map(|v| (*v as f64).abs()).fold(0.0, f64::max);
    assert!(
        got.iter().all(|v| v.is_finite()),
        "non-finite logits from the runtime"
    );
    diff / scale.max(1e-30)
}

/// All files of a directory (recursively) with their bytes, sorted by path.
pub fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let p = e.expect("dir entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let b = std::fs::read(&p).expect("read");
                out.push((p.strip_prefix(dir).unwrap().to_path_buf(), b));
            }
        }
    }
    out.sort();
    out
}

/// The target directory of this build (`target/debug`), from the test executable's location.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/deps/<test-exe>
    exe.parent()
        .and_then(|p| p.parent())
        .expect("test executable lives in target/<profile>/deps")
        .to_path_buf()
}

/// Paths of the `mimoc` and `mimort` binaries, (re)built with cargo first. `None` (with a message) if they are
/// missing and cannot be built.
pub fn binaries() -> Option<(PathBuf, PathBuf)> {
    let dir = target_dir();
    let suffix = std::env::consts::EXE_SUFFIX;
    let mimoc = dir.join(format!("mimoc{suffix}"));
    let mimort = dir.join(format!("mimort{suffix}"));
    // Always (re)build: cargo is a no-op when up to date, and a stale binary would test old code.
    let profile_release = dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "-q",
        "-p",
        "mimo-compiler",
        "-p",
        "mimo-runtime",
        "--bins",
    ])
    .arg("--manifest-path")
    .arg(&manifest);
    if profile_release {
        cmd.arg("--release");
    }
    if let Some(t) = dir.parent() {
        cmd.arg("--target-dir").arg(t);
    }
    match cmd.status() {
        Ok(s) if s.success() => {}
        Ok(s) => eprintln!("building mimoc/mimort failed ({s}); using whatever binaries exist"),
        Err(e) => eprintln!("cannot run cargo ({e}); using whatever binaries exist"),
    }
    if mimoc.is_file() && mimort.is_file() {
        Some((mimoc, mimort))
    } else {
        eprintln!(
            "SKIPPING binary tests: {} or {} is missing and could not be built",
            mimoc.display(),
            mimort.display()
        );
        None
    }
}

/// Run a binary; returns its output.
pub fn run(bin: &Path, args: &[&std::ffi::OsStr]) -> Output {
    Command::new(bin)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()))
}

/// Assert a command succeeded; returns its stdout.
pub fn assert_ok(what: &str, o: &Output) -> String {
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    );
    assert!(
        o.status.success(),
        "{what} failed ({}):\nstdout: {out}\nstderr: {err}",
        o.status
    );
    out
}

/// Assert a command failed cleanly (non-zero exit, no panic) with every `needles` in stderr.
pub fn assert_clean_failure(what: &str, o: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        !o.status.success(),
        "{what} should fail but succeeded; stderr: {err}"
    );
    assert_ne!(
        o.status.code(),
        Some(101),
        "{what}: exit code 101 means a panic; stderr: {err}"
    );
    assert!(
        o.status.code().is_some(),
        "{what}: killed by a signal; stderr: {err}"
    );
    assert!(!err.contains("panicked"), "{what} panicked: {err}");
    for n in needles {
        assert!(
            err.contains(n),
            "{what}: stderr should mention {n:?}: {err}"
        );
    }
}

/// The `bench/mid_config.json` plan that `bench/gpu.sh` verifies and sanitizes on the device (FP8 attention / dense,
/// MXFP4 experts), compiled from synthetic weights into `dir`, and its device encoding at a 256-token context.
pub fn mid_plan(dir: &Path) -> (mimo_ir::plan::Plan, mimo_kernels::device::Encoded) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../bench/mid_config.json");
    let cfg = mimo_models::config::ModelConfig::from_file(Path::new(path)).expect("mid config");
    let mut opts = CompileOptions::default();
    opts.passes.dense = mimo_ir::DType::F8E4M3;
    let plan = mimo_compiler::synth::compile_synthetic(&cfg, dir, &opts, 5).unwrap();
    let enc = mimo_kernels::device::encode_with(
        &plan,
        &plan.programs[0],
        256,
        true,
        mimo_kernels::device::EncodeOptions::from_env(),
    )
    .expect("encode");
    (plan, enc)
}
