#!/usr/bin/env python3
"""Independent reference check of the MiMo-V2-Flash (MoE) forward against Hugging Face transformers.

Runs on the GPU device machine (needs torch + transformers >= 5.x with `mimo_v2_flash`); `compare` needs only numpy.

    python3 tools/hf_reference.py make --out DIR [--seed 0] [--variant moe] [--tokenizer-from TINY_DIR]
    python3 tools/hf_reference.py compare --ckpt DIR --ours LOGITS.json [--ours2 MORE.json ...] --json OUT.json

`make` builds a small `MiMoV2FlashConfig`, a `MiMoV2FlashForCausalLM` with non-trivial random weights (every value
exactly representable in bf16), saves it with `save_pretrained` (bf16, sharded, with an index), and writes the
float32 reference logits of one 40-token forward:
    DIR/ref_tokens.json   list of 40 token ids
    DIR/ref_logits.npy    float32 [40, vocab]
    DIR/ref_meta.json     config summary, saved tensor names/dtypes/shapes, layout checks, reload check

`compare` reads DIR/ref_logits.npy and each runtime output ({"tokens": [...], "logits": [[...], ...]}, one row per
position) and reports max abs error, max relative error (max|a-b| / max|ref|), mean KL(ref||ours) and top-1
agreement. It always exits 0; it prints FAIL lines where the max relative error exceeds 2e-2.
"""

import argparse
import json
import math
import os
import shutil
import struct
import sys

import numpy as np

REL_TOL = 2e-2

# ----------------------------------------------------------------------------------------------------------------
# config of the reference model (transformers field names)
# ----------------------------------------------------------------------------------------------------------------


def moe_config_kwargs():
    head_dim = 96
    prf = 0.334
    rot = int(head_dim * prf)
    # MiMo uses int(head_dim * partial_rotary_factor); our compiler requires it even and non-zero.
    assert rot > 0 and rot % 2 == 0, f"rotary dim {rot} must be even"
    return dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 5000000.0, "partial_rotary_factor": prf},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": prf},
        },
        attention_bias=False,
        attention_dropout=0.0,
        moe_intermediate_size=64,
        num_experts_per_tok=2,
        n_routed_experts=8,
        routed_scaling_factor=1.0,
        n_group=2,
        topk_group=1,
        norm_topk_prob=True,
        bos_token_id=None,
        eos_token_id=2,
        pad_token_id=None,
        head_dim=head_dim,
        v_head_dim=32,
        sliding_window=8,
        layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
        attention_value_scale=0.707,
    )


def expected_tensors(kw, layout):
    """Names and shapes the Rust loader expects (mirror of models/src/checkpoint.rs `expected_tensors`)."""
    h = kw["hidden_size"]
    nh = kw["num_attention_heads"]
    hd = kw["head_dim"]
    vd = kw["v_head_dim"]
    out = {"model.embed_tokens.weight": [kw["vocab_size"], h]}
    for i in range(kw["num_hidden_layers"]):
        p = f"model.layers.{i}"
        swa = kw["layer_types"][i] == "sliding_attention"
        kv = kw["num_key_value_heads"] * (2 if swa else 1)
        out[f"{p}.input_layernorm.weight"] = [h]
        out[f"{p}.post_attention_layernorm.weight"] = [h]
        out[f"{p}.self_attn.q_proj.weight"] = [nh * hd, h]
        out[f"{p}.self_attn.k_proj.weight"] = [kv * hd, h]
        out[f"{p}.self_attn.v_proj.weight"] = [kv * vd, h]
        out[f"{p}.self_attn.o_proj.weight"] = [h, nh * vd]
        if swa:
            out[f"{p}.self_attn.sinks"] = [nh]
        if kw["mlp_layer_types"][i] == "dense":
            inter = kw["intermediate_size"]
            out[f"{p}.mlp.gate_proj.weight"] = [inter, h]
            out[f"{p}.mlp.up_proj.weight"] = [inter, h]
            out[f"{p}.mlp.down_proj.weight"] = [h, inter]
        else:
            e = kw["n_routed_experts"]
            inter = kw["moe_intermediate_size"]
            out[f"{p}.mlp.gate.weight"] = [e, h]
            out[f"{p}.mlp.gate.e_score_correction_bias"] = [e]
            x = f"{p}.mlp.experts"
            if layout == "per_expert":
                for j in range(e):
                    out[f"{x}.{j}.gate_proj.weight"] = [inter, h]
                    out[f"{x}.{j}.up_proj.weight"] = [inter, h]
                    out[f"{x}.{j}.down_proj.weight"] = [h, inter]
            else:
                out[f"{x}.gate_up_proj"] = [e, 2 * inter, h]
                out[f"{x}.down_proj"] = [e, h, inter]
    out["model.norm.weight"] = [h]
    if not kw["tie_word_embeddings"]:
        out["lm_head.weight"] = [kw["vocab_size"], h]
    return out


# ----------------------------------------------------------------------------------------------------------------
# safetensors inspection (pure python: header only)
# ----------------------------------------------------------------------------------------------------------------


def read_safetensors_header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        hdr = json.loads(f.read(n).decode("utf-8"))
    hdr.pop("__metadata__", None)
    return {k: (v["dtype"], list(v["shape"])) for k, v in hdr.items()}


def saved_tensors(ckpt_dir):
    """{name: (dtype, shape, file)} of every tensor of a checkpoint directory (index or single file)."""
    idx = os.path.join(ckpt_dir, "model.safetensors.index.json")
    files = []
    if os.path.exists(idx):
        with open(idx) as f:
            wm = json.load(f)["weight_map"]
        files = sorted(set(wm.values()))
    elif os.path.exists(os.path.join(ckpt_dir, "model.safetensors")):
        files = ["model.safetensors"]
    out = {}
    for fn in files:
        for k, (dt, shape) in read_safetensors_header(os.path.join(ckpt_dir, fn)).items():
            out[k] = (dt, shape, fn)
    return out, files, os.path.exists(idx)


def layout_report(kw, saved):
    """Which expert layout the saved names follow, and every difference from what our loader expects."""
    names = set(saved)
    per = any(".mlp.experts.0.gate_proj.weight" in n for n in names)
    fused = any(n.endswith(".mlp.experts.gate_up_proj") for n in names)
    if per and not fused:
        layout = "per_expert"
    elif fused and not per:
        layout = "fused"
    elif per and fused:
        layout = "mixed(!)"
    else:
        layout = "none-found(!)"
    exp = expected_tensors(kw, "fused" if layout == "fused" else "per_expert")
    missing = sorted(n for n in exp if n not in names)
    unexpected = sorted(n for n in names if n not in exp)
    bad_shape = sorted(
        f"{n}: saved {saved[n][1]} expected {exp[n]}" for n in exp if n in names and list(saved[n][1]) != exp[n]
    )
    dtypes = {}
    for n, (dt, _, _) in saved.items():
        dtypes.setdefault(dt, 0)
        dtypes[dt] += 1
    non_bf16 = sorted(f"{n}: {saved[n][0]}" for n in names if saved[n][0] != "BF16")
    return {
        "expert_layout": layout,
        "matches_loader_names": not missing and not unexpected and not bad_shape,
        "missing_vs_loader": missing,
        "unexpected_vs_loader": unexpected,
        "bad_shapes": bad_shape,
        "dtype_counts": dtypes,
        "non_bf16": non_bf16,
    }


# ----------------------------------------------------------------------------------------------------------------
# make
# ----------------------------------------------------------------------------------------------------------------


def _import_hf():
    try:
        from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM
    except ImportError:
        from transformers.models.mimo_v2_flash import MiMoV2FlashConfig, MiMoV2FlashForCausalLM
    return MiMoV2FlashConfig, MiMoV2FlashForCausalLM


def _build_config(Config, kw):
    # `dtype` (v5 name) / `torch_dtype` (v4 name); the strict v5 dataclass may reject unknown keys, so try in order.
    last = None
    for extra in ({"dtype": "bfloat16"}, {"torch_dtype": "bfloat16"}, {}):
        try:
            return Config(**kw, **extra)
        except (TypeError, ValueError) as e:  # unknown kwarg / strict validation
            last = e
    raise RuntimeError(f"cannot build MiMoV2FlashConfig: {last}")


def _force_eager(model):
    """Eager attention (the sink-aware reference path) and eager (per-expert loop) MoE."""
    for meth, val in (("set_attn_implementation", "eager"), ("set_experts_implementation", "eager")):
        fn = getattr(model, meth, None)
        if fn is not None:
            try:
                fn(val)
            except Exception as e:  # noqa: BLE001 - report and fall back to the config attribute
                print(f"note: model.{meth}({val!r}) failed: {e}")
    for attr in ("_attn_implementation", "_experts_implementation"):
        try:
            setattr(model.config, attr, "eager")
        except Exception as e:  # noqa: BLE001
            print(f"note: setting config.{attr} failed: {e}")
    print(
        "attn implementation:",
        getattr(model.config, "_attn_implementation", "?"),
        "| experts implementation:",
        getattr(model.config, "_experts_implementation", "?"),
    )


def _reinit(model, seed):
    """Non-trivial random values for every parameter and every e_score_correction_bias buffer, rounded to bf16."""
    import torch

    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    report = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            shape = tuple(p.shape)
            z = torch.randn(shape, generator=g, dtype=torch.float32)
            if name.endswith("embed_tokens.weight"):
                v = z
                rule = "N(0,1)"
            elif name.endswith("norm.weight"):
                v = 1.0 + 0.1 * z
                rule = "1+0.1N"
            elif name.endswith("sinks") or name.endswith("attention_sink_bias"):
                v = z
                rule = "N(0,1)"
            elif p.dim() >= 2:
                fan_in = shape[-1]  # [out, in] linear, [E, 2I, H] gate_up, [E, H, I] down: input is last
                v = z * (0.5 / math.sqrt(fan_in))
                rule = f"N(0,(0.5/sqrt({fan_in}))^2)"
            else:
                v = 0.1 * z
                rule = "0.1N"
            v = v.to(torch.bfloat16).to(torch.float32)
            p.data = v.to(device=p.device, dtype=p.dtype)
            report.append((name, list(shape), rule))
        n_bias = 0
        for mname, mod in model.named_modules():
            b = getattr(mod, "e_score_correction_bias", None)
            if isinstance(b, torch.Tensor):
                z = torch.randn(tuple(b.shape), generator=g, dtype=torch.float32)
                v = (0.1 * z).to(torch.bfloat16).to(torch.float32)
                b.copy_(v.to(device=b.device, dtype=b.dtype))
                report.append((f"{mname}.e_score_correction_bias (buffer)", list(b.shape), "0.1N"))
                n_bias += 1
        others = [n for n, _ in model.named_buffers() if not n.endswith("e_score_correction_bias")]
    return report, n_bias, others


def _set_bias_dtype(model, dtype):
    import torch

    for _, mod in model.named_modules():
        b = getattr(mod, "e_score_correction_bias", None)
        if isinstance(b, torch.Tensor):
            mod.e_score_correction_bias = b.to(dtype)  # Module.__setattr__ updates the registered buffer


def _forward_logits(model, tokens, device):
    import torch

    ids = torch.tensor([tokens], dtype=torch.long, device=device)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False)
    return out.logits[0].detach().to(torch.float32).cpu().numpy()


def _save(model, out_dir):
    kwargs = dict(max_shard_size="200KB")
    try:
        model.save_pretrained(out_dir, safe_serialization=True, **kwargs)
    except TypeError:
        model.save_pretrained(out_dir, **kwargs)  # newer versions: safetensors only, no flag


def cmd_make(args):
    import torch
    import transformers

    Config, Model = _import_hf()
    if args.variant != "moe":
        raise SystemExit(f"unknown variant {args.variant}")
    out = args.out
    if os.path.isdir(out) and os.listdir(out) and not args.force:
        raise SystemExit(f"{out} is not empty (use --force to write into it anyway)")
    os.makedirs(out, exist_ok=True)

    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    kw = moe_config_kwargs()
    config = _build_config(Config, kw)
    try:
        config._attn_implementation = "eager"
    except Exception:  # noqa: BLE001
        pass
    print("=== config ===")
    print(config.to_json_string() if hasattr(config, "to_json_string") else config)

    torch.manual_seed(args.seed)
    model = Model(config)
    model.float()  # the reference runs in float32 whatever default dtype the constructor picked
    model.eval()
    _force_eager(model)
    report, n_bias, other_buffers = _reinit(model, args.seed)
    n_moe = sum(1 for t in kw["mlp_layer_types"] if t == "sparse")
    print(f"re-initialised {len(report)} tensors; e_score_correction_bias buffers set: {n_bias} (MoE layers: {n_moe})")
    if n_bias != n_moe:
        print(f"WARNING: expected {n_moe} e_score_correction_bias buffers, found {n_bias}")
    print(f"buffers left alone (rotary tables etc.): {other_buffers}")
    for name, shape, rule in report:
        print(f"  init {name:60s} {str(shape):18s} {rule}")

    # reference logits: the float32 model holding exactly the bf16 values that get saved
    rng = np.random.default_rng(args.seed)
    tokens = [int(t) for t in rng.integers(3, kw["vocab_size"], size=args.ntokens)]
    device = args.device
    if device == "auto":
        device = "cpu"  # deterministic and exact fp32 (no TF32); the model is tiny
    model.to(device)
    logits = _forward_logits(model, tokens, device)
    assert logits.shape == (len(tokens), kw["vocab_size"]), logits.shape
    if not np.all(np.isfinite(logits)):
        print("WARNING: reference logits are not all finite")
    print(f"reference logits: shape {logits.shape}, max|.| {np.abs(logits).max():.4f}, std {logits.std():.4f}")
    top1 = logits.argmax(-1)
    print(f"reference top-1 (first 10 positions): {top1[:10].tolist()}")

    # save in bf16 (e_score_correction_bias kept float32 like real checkpoints, unless asked otherwise)
    model.to("cpu")
    model.to(torch.bfloat16)
    if args.bias_dtype == "float32":
        _set_bias_dtype(model, torch.float32)
    _save(model, out)

    # tokenizer from an existing tiny checkpoint (e.g. `mimoc make-tiny` output)
    copied = []
    if args.tokenizer_from:
        for fn in ("tokenizer.json", "tokenizer_config.json"):
            src = os.path.join(args.tokenizer_from, fn)
            if os.path.exists(src):
                shutil.copyfile(src, os.path.join(out, fn))
                copied.append(fn)
            else:
                print(f"WARNING: {src} does not exist")
    else:
        print("WARNING: no --tokenizer-from given: the checkpoint has no tokenizer.json")

    np.save(os.path.join(out, "ref_logits.npy"), logits.astype(np.float32))
    with open(os.path.join(out, "ref_tokens.json"), "w") as f:
        json.dump(tokens, f)

    # what was saved, and does the Rust loader's naming match it
    saved, files, has_index = saved_tensors(out)
    print(f"=== saved tensors ({len(saved)} in {len(files)} file(s), index: {has_index}) ===")
    for n in sorted(saved):
        dt, shape, fn = saved[n]
        print(f"  {n:60s} {dt:6s} {str(shape):18s} {fn}")
    lr = layout_report(kw, saved)
    print("=== names vs. our loader (models/src/checkpoint.rs expected_tensors) ===")
    print(f"expert layout in the checkpoint: {lr['expert_layout']}")
    if any(".mlp.experts.0.gate_proj.weight" in n for n in saved):
        print("  -> per-expert names: mlp.experts.{e}.{gate,up,down}_proj.weight")
    if any(n.endswith(".mlp.experts.gate_up_proj") for n in saved):
        print("  -> fused names: mlp.experts.gate_up_proj [E,2I,H] / mlp.experts.down_proj [E,H,I]")
    sink_names = sorted({n.rsplit(".", 1)[-1] for n in saved if ".self_attn." in n and "proj" not in n})
    print(f"attention extra tensor names (sinks): {sink_names}")
    print(f"dtype counts: {lr['dtype_counts']}; non-BF16: {lr['non_bf16']}")
    print(f"matches loader names/shapes: {lr['matches_loader_names']}")
    for k in ("missing_vs_loader", "unexpected_vs_loader", "bad_shapes"):
        if lr[k]:
            print(f"{k} ({len(lr[k])}):")
            for n in lr[k][:50]:
                print(f"    {n}")

    # round trip: load what was saved with transformers itself and re-run (checks save/load conversions)
    reload = {}
    try:
        last = None
        m2 = None
        for extra in ({"dtype": torch.float32}, {"torch_dtype": torch.float32}):
            try:
                m2 = Model.from_pretrained(out, attn_implementation="eager", **extra)
                break
            except TypeError as e:
                last = e
        if m2 is None:
            raise RuntimeError(last)
        m2.eval()
        _force_eager(m2)
        m2.to(device)
        l2 = _forward_logits(m2, tokens, device)
        d = float(np.abs(l2 - logits).max())
        reload = {"ok": True, "max_abs_diff": d}
        print(f"reload check (from_pretrained of the saved checkpoint, fp32): max|diff| = {d:.3e}")
        if d > 1e-4:
            print("WARNING: the reloaded checkpoint does not reproduce the reference logits")
        del m2
    except Exception as e:  # noqa: BLE001 - report only
        reload = {"ok": False, "error": repr(e)}
        print(f"WARNING: reload check failed: {e!r}")

    meta = {
        "seed": args.seed,
        "variant": args.variant,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "config_kwargs": kw,
        "tokens": tokens,
        "logits_shape": list(logits.shape),
        "reference_device": device,
        "bias_dtype": args.bias_dtype,
        "tokenizer_files": copied,
        "shards": files,
        "tensors": {n: {"dtype": v[0], "shape": v[1], "file": v[2]} for n, v in sorted(saved.items())},
        "layout": lr,
        "reload": reload,
    }
    with open(os.path.join(out, "ref_meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {out}/ref_tokens.json, ref_logits.npy, ref_meta.json")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# compare (numpy only)
# ----------------------------------------------------------------------------------------------------------------


def log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def compare_logits(ref, ours):
    """Metrics of `ours` against `ref` (both [positions, vocab])."""
    ref = np.asarray(ref, dtype=np.float64)
    ours = np.asarray(ours, dtype=np.float64)
    diff = np.abs(ref - ours)
    max_abs = float(diff.max()) if diff.size else 0.0
    ref_max = float(np.abs(ref).max()) if ref.size else 0.0
    max_rel = max_abs / ref_max if ref_max > 0 else (0.0 if max_abs == 0 else float("inf"))
    lp = log_softmax(ref)
    lq = log_softmax(ours)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    a1 = ref.argmax(-1)
    b1 = ours.argmax(-1)
    agree = a1 == b1
    srt = np.sort(ref, axis=-1)
    margins = srt[:, -1] - srt[:, -2] if ref.shape[-1] >= 2 else np.zeros(len(ref))
    disagree = [
        {"pos": int(i), "ref": int(a1[i]), "ours": int(b1[i]), "ref_margin": float(margins[i])}
        for i in np.nonzero(~agree)[0]
    ]
    return {
        "max_abs": max_abs,
        "max_rel": max_rel,
        "ref_max_abs": ref_max,
        "mean_abs": float(diff.mean()) if diff.size else 0.0,
        "mean_kl": float(kl.mean()) if kl.size else 0.0,
        "max_kl": float(kl.max()) if kl.size else 0.0,
        "top1_agree": float(agree.mean()) if agree.size else 1.0,
        "top1_disagree": disagree,
        "worst_pos": int(diff.max(axis=-1).argmax()) if diff.size else 0,
    }


def compare_one(ref, ref_tokens, path):
    entry = {"file": path}
    try:
        with open(path) as f:
            d = json.load(f)
        toks = [int(t) for t in d["tokens"]]
        logits = np.asarray(d["logits"], dtype=np.float64)
    except Exception as e:  # noqa: BLE001
        entry["error"] = f"cannot read: {e!r}"
        return entry
    entry["n_tokens"] = len(toks)
    if toks != list(ref_tokens):
        n = min(len(toks), len(ref_tokens))
        first = next((i for i in range(n) if toks[i] != ref_tokens[i]), n)
        entry["error"] = f"tokens differ from ref_tokens.json (lengths {len(toks)}/{len(ref_tokens)}, first at {first})"
        return entry
    if logits.ndim != 2 or logits.shape != ref.shape:
        entry["error"] = f"logits shape {list(logits.shape)} != reference {list(ref.shape)}"
        return entry
    if not np.all(np.isfinite(logits)):
        entry["non_finite"] = int((~np.isfinite(logits)).sum())
        logits = np.nan_to_num(logits, nan=0.0, posinf=1e30, neginf=-1e30)
    entry.update(compare_logits(ref, logits))
    return entry


def cmd_compare(args):
    ref = np.load(os.path.join(args.ckpt, "ref_logits.npy")).astype(np.float64)
    with open(os.path.join(args.ckpt, "ref_tokens.json")) as f:
        ref_tokens = [int(t) for t in json.load(f)]
    files = list(args.ours) + [p for group in (args.ours2 or []) for p in group]
    results = [compare_one(ref, ref_tokens, p) for p in files]
    out = {
        "ckpt": args.ckpt,
        "positions": int(ref.shape[0]),
        "vocab": int(ref.shape[1]),
        "rel_tol": REL_TOL,
        "results": results,
    }
    for r in results:
        r["pass"] = ("error" not in r) and ("non_finite" not in r) and r["max_rel"] <= REL_TOL
    if args.json:
        d = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(d, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)

    print(f"reference: {args.ckpt} ({ref.shape[0]} positions x {ref.shape[1]} vocab, max|ref| {np.abs(ref).max():.4f})")
    hdr = f"{'file':40s} {'max_abs':>10s} {'max_rel':>10s} {'mean_KL':>10s} {'top1':>7s}"
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        name = os.path.basename(r["file"])[-40:]
        if "error" in r:
            print(f"{name:40s} ERROR: {r['error']}")
            continue
        print(f"{name:40s} {r['max_abs']:10.3e} {r['max_rel']:10.3e} {r['mean_kl']:10.3e} {r['top1_agree']:7.3f}")
        if r["top1_disagree"]:
            dd = ", ".join(f"pos {x['pos']} (ref margin {x['ref_margin']:.3g})" for x in r["top1_disagree"][:8])
            print(f"{'':40s} top-1 differs at: {dd}")
    for r in results:
        if "error" in r:
            print(f"FAIL {r['file']}: {r['error']}")
        elif "non_finite" in r:
            print(f"FAIL {r['file']}: {r['non_finite']} non-finite logits")
        elif r["max_rel"] > REL_TOL:
            print(f"FAIL {r['file']}: max relative error {r['max_rel']:.3e} > {REL_TOL:g} (worst position {r['worst_pos']})")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="build, save and run the transformers reference model")
    m.add_argument("--out", required=True)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--variant", default="moe", choices=["moe"])
    m.add_argument("--tokenizer-from", default=None, help="checkpoint dir with tokenizer.json (mimoc make-tiny)")
    m.add_argument("--ntokens", type=int, default=40)
    m.add_argument("--device", default="auto", help="device of the float32 reference forward (auto = cpu)")
    m.add_argument("--bias-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="stored dtype of e_score_correction_bias (values are bf16-exact either way)")
    m.add_argument("--force", action="store_true", help="write into a non-empty --out")
    c = sub.add_parser("compare", help="compare runtime logits with the reference")
    c.add_argument("--ckpt", required=True)
    c.add_argument("--ours", required=True, action="append", help="runtime logits JSON (repeatable)")
    c.add_argument("--ours2", nargs="+", action="append", help="more runtime logits JSON files")
    c.add_argument("--json", default=None, help="write the report here")
    args = ap.parse_args(argv)
    if args.cmd == "make":
        return cmd_make(args)
    return cmd_compare(args)


if __name__ == "__main__":
    sys.exit(main())
