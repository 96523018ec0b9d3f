//! Corrupted plans and checkpoints give clear errors, never panics; a failed recompile leaves the old plan
//! intact; and the real `mimoc` / `mimort` binaries succeed on good input and fail cleanly on bad input.

use mimo_compiler::compile;
use mimo_ir::plan::{decode_plan, encode_plan, PLAN_FILE, WEIGHTS_FILE};
use mimo_models::config::Arch;
use mimo_runtime::cpu::CpuSession;
use mimo_runtime::model::Model;
use mimo_tests::util::{
    assert_clean_failure, assert_ok, bf16_options, binaries, compile_bf16, random_tokens, run,
    snapshot, tiny,
};
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// A tiny MoE checkpoint and its compiled plan in a temp dir.
struct Fixture {
    td: tempfile::TempDir,
    ckpt: PathBuf,
    plan: PathBuf,
}

fn fixture(arch: Arch) -> Fixture {
    let td = tempfile::tempdir().unwrap();
    let ckpt = td.path().join("ckpt");
    let plan = td.path().join("plan");
    tiny(&ckpt, arch, 9, false);
    compile_bf16(&ckpt, &plan, 16);
    Fixture { td, ckpt, plan }
}

fn load_err(dir: &Path, verify: bool) -> String {
    match Model::load(dir, verify) {
        Ok(_) => panic!("Model::load({}) should fail", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

fn assert_mentions(msg: &str, needles: &[&str]) {
    for n in needles {
        assert!(msg.contains(n), "error should mention {n:?}: {msg}");
    }
}

/// A deterministic byte index in the middle of a file of `len` bytes, past the 64-byte plan header.
fn middle(len: usize) -> usize {
    64 + (len - 64) / 2
}

/// Re-write the shard holding `name` with `edit` applied to its tensor list (name, dtype, shape, bytes).
fn rewrite_shard_of(
    ckpt: &Path,
    name: &str,
    edit: impl FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) {
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(ckpt.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let file = index["weight_map"][name].as_str().unwrap().to_string();
    let path = ckpt.join(&file);
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut ts: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    ts.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut ts);
    let views: Vec<(String, TensorView)> = ts
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let out = safetensors::serialize(views.iter().map(|(n, v)| (n.as_str(), v)), None).unwrap();
    std::fs::write(&path, out).unwrap();
}

const Q: &str = "model.layers.1.self_attn.q_proj.weight";

fn drop_tensor(ckpt: &Path, name: &str) {
    rewrite_shard_of(ckpt, name, |ts| ts.retain(|t| t.0 != name));
}

fn misshape_tensor(ckpt: &Path, name: &str) {
    rewrite_shard_of(ckpt, name, |ts| {
        let t = ts.iter_mut().find(|t| t.0 == name).unwrap();
        // same byte count, wrong shape: [r, c] -> [c, r] would be the transposed layout; use [r/2, 2c]
        let (r, c) = (t.2[0], t.2[1]);
        t.2 = vec![r / 2, 2 * c];
    });
}

#[test]
fn good_plan_loads_and_runs() {
    let f = fixture(Arch::MimoV2Flash);
    let m = Model::load(&f.plan, true).unwrap();
    let mut s = CpuSession::new(m.clone(), 64);
    s.forward("target", &random_tokens(1, 5, m.plan.model.vocab), 0)
        .unwrap();
    assert!(s
        .output("target", "logits", 4)
        .unwrap()
        .iter()
        .all(|v| v.is_finite()));
}

#[test]
fn truncated_plan_bin() {
    let f = fixture(Arch::MimoV2Flash);
    let p = f.plan.join(PLAN_FILE);
    let b = std::fs::read(&p).unwrap();
    std::fs::write(&p, &b[..b.len() - 100]).unwrap();
    assert_mentions(&load_err(&f.plan, true), &["plan.bin", "truncated"]);
    std::fs::write(&p, &b[..20]).unwrap();
    assert_mentions(&load_err(&f.plan, true), &["plan.bin", "bad magic"]);
    std::fs::write(&p, b"").unwrap();
    assert_mentions(&load_err(&f.plan, true), &["plan.bin"]);
}

#[test]
fn flipped_byte_in_plan_body() {
    let f = fixture(Arch::Mimo);
    let p = f.plan.join(PLAN_FILE);
    let mut b = std::fs::read(&p).unwrap();
    let i = middle(b.len());
    b[i] ^= 0x10;
    std::fs::write(&p, &b).unwrap();
    // the body checksum is checked whether or not weights are verified
    assert_mentions(
        &load_err(&f.plan, false),
        &["plan.bin", "checksum mismatch"],
    );
    // a flipped version field
    b[i] ^= 0x10;
    b[8] ^= 0x01;
    std::fs::write(&p, &b).unwrap();
    assert_mentions(&load_err(&f.plan, true), &["plan.bin", "version"]);
}

#[test]
fn flipped_byte_in_weights_bin() {
    let f = fixture(Arch::MimoV2Flash);
    let p = f.plan.join(WEIGHTS_FILE);
    let mut b = std::fs::read(&p).unwrap();
    let i = b.len() / 3;
    b[i] ^= 0x04;
    std::fs::write(&p, &b).unwrap();
    assert_mentions(
        &load_err(&f.plan, true),
        &["weights.bin", "checksum mismatch"],
    );
    // without verification the load is allowed (documented trade-off of --no-verify)
    assert!(Model::load(&f.plan, false).is_ok());
}

#[test]
fn truncated_or_missing_weights_bin() {
    let f = fixture(Arch::MimoV2Flash);
    let p = f.plan.join(WEIGHTS_FILE);
    let b = std::fs::read(&p).unwrap();
    std::fs::write(&p, &b[..b.len() - 1000]).unwrap();
    // the size is checked even without hashing
    assert_mentions(&load_err(&f.plan, false), &["weights.bin", "size"]);
    std::fs::remove_file(&p).unwrap();
    assert_mentions(&load_err(&f.plan, false), &["weights.bin"]);
}

#[test]
fn missing_plan_dir_or_file() {
    let td = tempfile::tempdir().unwrap();
    let nowhere = td.path().join("no-such-plan");
    assert_mentions(
        &load_err(&nowhere, true),
        &["no-such-plan", "does not exist"],
    );
    let f = fixture(Arch::Mimo);
    std::fs::remove_file(f.plan.join(PLAN_FILE)).unwrap();
    assert_mentions(&load_err(&f.plan, true), &["plan.bin"]);
}

fn compile_err(ckpt: &Path, out: &Path) -> String {
    match compile(ckpt, out, &bf16_options(16)) {
        Ok(_) => panic!("compiling {} should fail", ckpt.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn garbage_config_json() {
    let f = fixture(Arch::MimoV2Flash);
    std::fs::write(f.ckpt.join("config.json"), "{\"model_type\": \"mimo_v2_fl").unwrap();
    let out = f.td.path().join("plan2");
    assert_mentions(
        &compile_err(&f.ckpt, &out),
        &["config.json", "not valid JSON"],
    );
    assert!(
        !out.exists(),
        "a failed compile must not create the plan dir"
    );
    std::fs::write(f.ckpt.join("config.json"), "\u{0}\u{1}binary garbage").unwrap();
    assert_mentions(&compile_err(&f.ckpt, &out), &["config.json"]);
    std::fs::remove_file(f.ckpt.join("config.json")).unwrap();
    assert_mentions(&compile_err(&f.ckpt, &out), &["config.json"]);
}

#[test]
fn missing_tensor() {
    let f = fixture(Arch::MimoV2Flash);
    let name = "model.layers.2.mlp.experts.5.up_proj.weight";
    drop_tensor(&f.ckpt, name);
    let msg = compile_err(&f.ckpt, &f.td.path().join("plan2"));
    assert_mentions(&msg, &[name, "missing"]);
}

#[test]
fn misshaped_tensor() {
    let f = fixture(Arch::Mimo);
    misshape_tensor(&f.ckpt, Q);
    let msg = compile_err(&f.ckpt, &f.td.path().join("plan2"));
    assert_mentions(&msg, &[Q, "shape"]);
}

#[test]
fn truncated_shard() {
    let f = fixture(Arch::MimoV2Flash);
    let shard = f.ckpt.join("model-00002-of-00003.safetensors");
    let b = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &b[..b.len() / 2]).unwrap();
    let msg = compile_err(&f.ckpt, &f.td.path().join("plan2"));
    assert_mentions(&msg, &["model-00002-of-00003.safetensors"]);
}

/// No `.mimoc-*` temporaries or `*.old-*` leftovers next to the plan.
fn assert_no_leftovers(parent: &Path) {
    for e in std::fs::read_dir(parent).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().to_string();
        assert!(
            !n.starts_with(".mimoc-") && !n.contains(".old-"),
            "leftover {n} in {}",
            parent.display()
        );
    }
}

#[test]
fn failed_recompile_leaves_old_plan_intact() {
    let f = fixture(Arch::MimoV2Flash);
    let before = snapshot(&f.plan);
    let check_intact = |what: &str| {
        assert_eq!(snapshot(&f.plan), before, "{what}: the old plan changed");
        let m = Model::load(&f.plan, true).unwrap();
        let mut s = CpuSession::new(m, 32);
        s.forward("target", &[5, 6, 7], 0).unwrap();
        assert_no_leftovers(f.td.path());
    };

    // fails early: a tensor of the wrong shape
    let other = f.td.path().join("other");
    tiny(&other, Arch::MimoV2Flash, 10, false);
    misshape_tensor(&other, Q);
    assert_mentions(&compile_err(&other, &f.plan), &[Q]);
    check_intact("mis-shaped tensor");

    // fails midway: weights are already packed into the temporary dir when the tokenizer is read
    let other2 = f.td.path().join("other2");
    tiny(&other2, Arch::MimoV2Flash, 11, false);
    std::fs::write(other2.join("tokenizer.json"), "{ not json").unwrap();
    assert_mentions(&compile_err(&other2, &f.plan), &["tokenizer.json"]);
    check_intact("broken tokenizer.json");

    // max_tokens out of range
    let mut o = bf16_options(16);
    o.max_tokens = 0;
    let e = format!(
        "{:#}",
        compile(&other2, &f.plan, &o)
            .err()
            .expect("max_tokens 0 must fail")
    );
    assert_mentions(&e, &["max-tokens"]);
    check_intact("max_tokens 0");

    // and a successful recompile does replace it
    let good = f.td.path().join("good");
    tiny(&good, Arch::MimoV2Flash, 12, false);
    compile_bf16(&good, &f.plan, 8);
    assert_ne!(snapshot(&f.plan), before);
    assert_eq!(Model::load(&f.plan, true).unwrap().plan.max_tokens, 8);
    assert_no_leftovers(f.td.path());
}

/// Write `plan` into `dir`'s plan.bin with a valid checksum (so only `Plan::validate` and the runtime can catch
/// the inconsistency), keeping the header's weights hash.
fn rewrite_plan(dir: &Path, edit: impl FnOnce(&mut mimo_ir::plan::Plan)) {
    let p = dir.join(PLAN_FILE);
    let (mut plan, h) = decode_plan(&std::fs::read(&p).unwrap(), "plan.bin").unwrap();
    edit(&mut plan);
    std::fs::write(&p, encode_plan(&plan, h.weights_hash)).unwrap();
}

/// Load the plan and run a forward of the largest token id; Ok(()) if either step reports an error.
/// A panic anywhere fails the test (caught so that the message says which case it was).
fn load_and_run_reports_error(dir: &Path, case: &str) {
    let dir = dir.to_path_buf();
    let r = std::panic::catch_unwind(move || -> Result<(), String> {
        let m = match Model::load(&dir, true) {
            Ok(m) => m,
            Err(_) => return Ok(()),
        };
        let v = m.plan.model.vocab as u32;
        let mut s = CpuSession::new(m.clone(), 64);
        match s.forward("target", &[v - 1, 1, 2], 0) {
            Err(_) => Ok(()),
            Ok(()) => Err("no error from load or forward".into()),
        }
    });
    match r {
        Ok(Ok(())) => {}
        Ok(Err(m)) => panic!("{case}: {m}"),
        Err(_) => panic!("{case}: a checksum-valid but inconsistent plan made the runtime panic"),
    }
}

#[test]
fn inconsistent_plan_vocab_is_an_error_not_a_panic() {
    let f = fixture(Arch::Mimo);
    // model.vocab larger than the embedding table: token ids the runtime accepts index past the table
    rewrite_plan(&f.plan, |p| p.model.vocab *= 4);
    load_and_run_reports_error(&f.plan, "model.vocab > embedding rows");
}

#[test]
fn inconsistent_plan_buffer_offset_is_an_error_not_a_panic() {
    let f = fixture(Arch::Mimo);
    // an absurd buffer offset: validate's bounds arithmetic must not overflow
    rewrite_plan(&f.plan, |p| p.buffers[0].offset = usize::MAX - 8);
    load_and_run_reports_error(&f.plan, "buffer offset near usize::MAX");
}

#[test]
fn inconsistent_plan_weight_offset_is_an_error_not_a_panic() {
    let f = fixture(Arch::Mimo);
    rewrite_plan(&f.plan, |p| p.weights[0].offset = u64::MAX - 8);
    load_and_run_reports_error(&f.plan, "weight offset near u64::MAX");
}

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

#[test]
fn binaries_good_and_bad() {
    let Some((mimoc, mimort)) = binaries() else {
        return;
    };
    let td = tempfile::tempdir().unwrap();
    let ck = td.path().join("ck");
    let plan = td.path().join("plan");
    let plan_mx = td.path().join("plan-mxfp4");

    let o = run(
        &mimoc,
        &[
            os("make-tiny"),
            ck.as_os_str(),
            os("--arch"),
            os("moe"),
            os("--seed"),
            os("3"),
        ],
    );
    assert_ok("mimoc make-tiny", &o);
    let o = run(
        &mimoc,
        &[
            os("compile"),
            ck.as_os_str(),
            os("-o"),
            plan.as_os_str(),
            os("--experts"),
            os("bf16"),
        ],
    );
    assert!(assert_ok("mimoc compile", &o).contains("compiled"));
    let o = run(
        &mimoc,
        &[os("compile"), ck.as_os_str(), os("-o"), plan_mx.as_os_str()],
    );
    assert_ok("mimoc compile (mxfp4 experts)", &o);
    let o = run(
        &mimoc,
        &[os("dump-ir"), ck.as_os_str(), os("--after"), os("build")],
    );
    let ir = assert_ok("mimoc dump-ir --after build", &o);
    assert!(ir.lines().count() > 10, "dump-ir printed too little: {ir}");
    for p in [&plan, &plan_mx] {
        let o = run(
            &mimort,
            &[
                os("generate"),
                p.as_os_str(),
                os("--prompt"),
                os("def hello(): return"),
                os("--max-tokens"),
                os("6"),
                os("--stats"),
            ],
        );
        let out = assert_ok("mimort generate", &o);
        assert!(out.starts_with("def hello(): return"), "{out}");
    }
    let o = run(
        &mimort,
        &[
            os("generate"),
            plan.as_os_str(),
            os("--prompt"),
            os("hi"),
            os("--temperature"),
            os("0.8"),
            os("--top-p"),
            os("0.9"),
            os("--seed"),
            os("4"),
            os("--max-tokens"),
            os("4"),
        ],
    );
    assert_ok("mimort generate (sampled)", &o);

    // bad invocations
    let o = run(
        &mimoc,
        &[
            os("dump-ir"),
            ck.as_os_str(),
            os("--after"),
            os("no-such-pass"),
        ],
    );
    assert_clean_failure("dump-ir unknown pass", &o, &["unknown pass"]);
    let o = run(&mimoc, &[os("make-tiny"), ck.as_os_str()]);
    assert_clean_failure("make-tiny into non-empty dir", &o, &["non-empty"]);
    let o = run(
        &mimoc,
        &[
            os("compile"),
            ck.as_os_str(),
            os("-o"),
            td.path().join("p0").as_os_str(),
            os("--max-tokens"),
            os("0"),
        ],
    );
    assert_clean_failure("compile --max-tokens 0", &o, &["max-tokens"]);
    let o = run(
        &mimort,
        &[os("generate"), plan.as_os_str(), os("--prompt"), os("")],
    );
    assert_clean_failure("generate empty prompt", &o, &["empty prompt"]);
    let o = run(
        &mimort,
        &[
            os("generate"),
            plan.as_os_str(),
            os("--prompt"),
            os("def hello(): return 42"),
            os("--max-ctx"),
            os("2"),
        ],
    );
    assert_clean_failure("generate prompt > max-ctx", &o, &["does not fit"]);
    let o = run(
        &mimort,
        &[
            os("generate"),
            plan.as_os_str(),
            os("--prompt"),
            os("hi"),
            os("--temperature=-1"),
        ],
    );
    assert_clean_failure("generate negative temperature", &o, &["temperature"]);
    let o = run(
        &mimort,
        &[
            os("generate"),
            td.path().join("nope").as_os_str(),
            os("--prompt"),
            os("hi"),
        ],
    );
    assert_clean_failure("generate missing plan", &o, &["nope", "does not exist"]);

    // corrupt plan files
    let w = plan.join(WEIGHTS_FILE);
    let mut wb = std::fs::read(&w).unwrap();
    let i = wb.len() / 2;
    wb[i] ^= 0x20;
    std::fs::write(&w, &wb).unwrap();
    let o = run(
        &mimort,
        &[os("generate"), plan.as_os_str(), os("--prompt"), os("hi")],
    );
    assert_clean_failure(
        "generate flipped weights.bin",
        &o,
        &["weights.bin", "checksum mismatch"],
    );
    std::fs::write(&w, &wb[..wb.len() - 7]).unwrap();
    let o = run(
        &mimort,
        &[
            os("generate"),
            plan.as_os_str(),
            os("--prompt"),
            os("hi"),
            os("--no-verify"),
        ],
    );
    assert_clean_failure(
        "generate truncated weights.bin",
        &o,
        &["weights.bin", "size"],
    );
    let p = plan_mx.join(PLAN_FILE);
    let pb = std::fs::read(&p).unwrap();
    std::fs::write(&p, &pb[..pb.len() - 3]).unwrap();
    let o = run(
        &mimort,
        &[
            os("generate"),
            plan_mx.as_os_str(),
            os("--prompt"),
            os("hi"),
        ],
    );
    assert_clean_failure(
        "generate truncated plan.bin",
        &o,
        &["plan.bin", "truncated"],
    );
    let mut pb2 = pb.clone();
    let j = middle(pb2.len());
    pb2[j] ^= 0x01;
    std::fs::write(&p, &pb2).unwrap();
    let o = run(
        &mimort,
        &[
            os("generate"),
            plan_mx.as_os_str(),
            os("--prompt"),
            os("hi"),
        ],
    );
    assert_clean_failure(
        "generate flipped plan.bin",
        &o,
        &["plan.bin", "checksum mismatch"],
    );

    // corrupt checkpoints
    let ck2 = td.path().join("ck2");
    let o = run(
        &mimoc,
        &[os("make-tiny"), ck2.as_os_str(), os("--arch"), os("dense")],
    );
    assert_ok("mimoc make-tiny dense", &o);
    misshape_tensor(&ck2, Q);
    let o = run(
        &mimoc,
        &[os("compile"), ck2.as_os_str(), os("-o"), plan.as_os_str()],
    );
    assert_clean_failure("compile mis-shaped tensor", &o, &[Q, "shape"]);
    drop_tensor(&ck2, Q);
    let o = run(&mimoc, &[os("dump-ir"), ck2.as_os_str()]);
    assert_clean_failure("dump-ir missing tensor", &o, &[Q, "missing"]);
    std::fs::write(ck2.join("config.json"), "[garbage").unwrap();
    let o = run(
        &mimoc,
        &[os("compile"), ck2.as_os_str(), os("-o"), plan.as_os_str()],
    );
    assert_clean_failure("compile garbage config.json", &o, &["config.json"]);
    let o = run(
        &mimoc,
        &[
            os("compile"),
            td.path().join("nock").as_os_str(),
            os("-o"),
            plan.as_os_str(),
        ],
    );
    assert_clean_failure("compile missing checkpoint", &o, &["nock"]);
}
