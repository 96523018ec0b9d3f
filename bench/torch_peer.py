#!/usr/bin/env python3
"""PyTorch peer for the decode benchmark: a hand-written bf16 MiMo-V2-Flash decode step in plain PyTorch.

    python3 bench/torch_peer.py --experts 16 --layers 48 --tokens 1,4,8,16 --ctx 512 --json OUT.json [--small]

Real layer shapes (hidden 4096, 64 heads, head_dim 192, v_head_dim 128, kv heads 4 full / 8 sliding, window 128,
full attention at layer 0 and every 6th layer, dense layer 0 with intermediate 16384, MoE layers with expert width
2048 and sigmoid top-8 routing with correction bias and normalised weights, sinks on sliding layers, partial rotary
64 of 192, vocab 152576, untied lm_head), random bf16 weights, a static KV cache of ctx+16 positions pre-filled with
random values. One step processes T tokens at positions ctx..ctx+T-1 and produces logits for all T.

The step runs without host syncs (MoE via grouped GEMM over the touched experts, sorted by expert id, counts from a
one-hot sum) and is captured in one CUDA graph per T. If capture fails it falls back to torch.compile
(max-autotune-no-cudagraphs), then to eager; the JSON records which mode ran. Timing: CUDA events, 5 warm-up
replays, median of 20. HBM bandwidth: 2 GiB device-to-device copy, read+write bytes, median of 10.
"""

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------
# shapes
# ----------------------------------------------------------------------------------------------------------------


class Cfg:
    def __init__(self, n_layers, n_experts, ctx, vocab=152576):
        self.hidden = 4096
        self.n_layers = n_layers
        self.n_heads = 64
        self.head_dim = 192
        self.v_head_dim = 128
        self.kv_full = 4
        self.kv_swa = 8
        self.window = 128
        self.rot = 64  # int(192 * 0.334)
        self.theta_full = 5_000_000.0
        self.theta_swa = 10_000.0
        self.v_scale = 0.707
        self.dense_inter = 16384
        self.moe_inter = 2048
        self.n_experts = n_experts
        self.top_k = min(8, n_experts)
        self.vocab = vocab
        self.eps = 1e-5
        self.ctx = ctx
        self.cache_len = ctx + 16

    def is_full(self, i):
        return i == 0 or (i + 1) % 6 == 0

    def is_dense(self, i):
        return i == 0


def randn(shape, fan_in, dev):
    t = torch.randn(shape, device=dev, dtype=torch.bfloat16)
    t.mul_(1.0 / math.sqrt(fan_in))
    return t


# ----------------------------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------------------------


def grouped_mm_fn():
    fn = getattr(F, "grouped_mm", None)
    if fn is None:
        fn = getattr(torch, "_grouped_mm", None)
    return fn


class Peer:
    def __init__(self, cfg, dev, moe_impl="grouped"):
        self.cfg = cfg
        self.dev = dev
        self.moe_impl = moe_impl
        self.gmm = grouped_mm_fn()
        c = cfg
        H = c.hidden
        torch.manual_seed(0)
        self.embed = torch.randn((c.vocab, H), device=dev, dtype=torch.bfloat16)
        self.final_norm = torch.ones(H, device=dev, dtype=torch.bfloat16)
        self.lm_head = randn((c.vocab, H), H, dev)
        self.layers = []
        for i in range(c.n_layers):
            full = c.is_full(i)
            kv = c.kv_full if full else c.kv_swa
            L = {"full": full, "kv": kv}
            L["attn_norm"] = torch.ones(H, device=dev, dtype=torch.bfloat16)
            L["mlp_norm"] = torch.ones(H, device=dev, dtype=torch.bfloat16)
            n_qkv = c.n_heads * c.head_dim + kv * c.head_dim + kv * c.v_head_dim
            L["w_qkv"] = randn((n_qkv, H), H, dev)  # q, k, v projections fused along the output dim
            L["w_o"] = randn((H, c.n_heads * c.v_head_dim), c.n_heads * c.v_head_dim, dev)
            L["sinks"] = None if full else torch.randn(c.n_heads, device=dev, dtype=torch.float32)
            L["k_cache"] = torch.randn((kv, c.cache_len, c.head_dim), device=dev, dtype=torch.bfloat16)
            L["v_cache"] = torch.randn((kv, c.cache_len, c.v_head_dim), device=dev, dtype=torch.bfloat16)
            if c.is_dense(i):
                L["dense"] = True
                L["w_gu"] = randn((2 * c.dense_inter, H), H, dev)  # [gate; up]
                L["w_d"] = randn((H, c.dense_inter), c.dense_inter, dev)
            else:
                L["dense"] = False
                E, I = c.n_experts, c.moe_inter
                L["router"] = randn((E, H), H, dev)
                L["e_bias"] = 0.1 * torch.randn(E, device=dev, dtype=torch.float32)
                L["w_gu"] = randn((E, 2 * I, H), H, dev)  # [E, 2I, H] (gate rows then up rows)
                L["w_d"] = randn((E, H, I), I, dev)  # [E, H, I]
            self.layers.append(L)
        self.expert_ids = torch.arange(c.n_experts, device=dev)
        self.aux = {}
        self.record = None  # list to collect routing (eager debug runs only)

    # per-T static tensors: rotary tables, masks, cache slices
    def prepare(self, T):
        c = self.cfg
        if T in self.aux:
            return self.aux[T]
        if c.ctx + T > c.cache_len:
            raise ValueError(f"T={T} does not fit the cache of {c.cache_len} positions at ctx {c.ctx}")
        pos = torch.arange(c.ctx, c.ctx + T, device=self.dev, dtype=torch.float32)
        a = {"T": T}
        for name, theta in (("full", c.theta_full), ("swa", c.theta_swa)):
            inv = 1.0 / (theta ** (torch.arange(0, c.rot, 2, device=self.dev, dtype=torch.float32) / c.rot))
            fr = pos[:, None] * inv[None, :]
            emb = torch.cat((fr, fr), dim=-1)  # [T, rot]
            a["cos_" + name] = emb.cos().to(torch.bfloat16)[:, None, :]  # [T, 1, rot]
            a["sin_" + name] = emb.sin().to(torch.bfloat16)[:, None, :]
        hi = c.ctx + T
        for name in ("full", "swa"):
            lo = 0 if name == "full" else max(0, c.ctx - (c.window - 1))
            kpos = torch.arange(lo, hi, device=self.dev)
            qpos = torch.arange(c.ctx, c.ctx + T, device=self.dev)
            ok = kpos[None, :] <= qpos[:, None]
            if name == "swa":
                ok = ok & (kpos[None, :] > qpos[:, None] - c.window)
            mask = torch.zeros((T, hi - lo), device=self.dev, dtype=torch.float32)
            mask.masked_fill_(~ok, float("-inf"))
            a["lo_" + name] = lo
            a["mask_" + name] = mask  # [T, L], broadcast over kv heads and head groups
        self.aux[T] = a
        return a

    def rmsnorm(self, x, w):
        if hasattr(F, "rms_norm"):
            return F.rms_norm(x, (x.shape[-1],), w, self.cfg.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.cfg.eps)
        return xf.to(x.dtype) * w

    def rope(self, x, cos, sin):
        r = self.cfg.rot
        xr = x[..., :r]
        h = r // 2
        rot = torch.cat((-xr[..., h:], xr[..., :h]), dim=-1)
        return torch.cat((xr * cos + rot * sin, x[..., r:]), dim=-1)

    def attention(self, x, L, a):
        c = self.cfg
        T = a["T"]
        nh, hd, vd, kv = c.n_heads, c.head_dim, c.v_head_dim, L["kv"]
        g = nh // kv
        name = "full" if L["full"] else "swa"
        qkv = F.linear(x, L["w_qkv"])  # [T, nh*hd + kv*hd + kv*vd]
        q = qkv[:, : nh * hd].view(T, nh, hd)
        k = qkv[:, nh * hd : nh * hd + kv * hd].view(T, kv, hd)
        v = qkv[:, nh * hd + kv * hd :].view(T, kv, vd) * c.v_scale
        q = self.rope(q, a["cos_" + name], a["sin_" + name])
        k = self.rope(k, a["cos_" + name], a["sin_" + name])
        kc, vc = L["k_cache"], L["v_cache"]
        kc[:, c.ctx : c.ctx + T].copy_(k.transpose(0, 1))
        vc[:, c.ctx : c.ctx + T].copy_(v.transpose(0, 1))
        lo, hi = a["lo_" + name], c.ctx + T
        K = kc[:, lo:hi]  # [kv, L, hd]
        V = vc[:, lo:hi]  # [kv, L, vd]
        # head h uses kv head h // g: rows of qg are (kv, group j, token t)
        qg = q.view(T, kv, g, hd).permute(1, 2, 0, 3).reshape(kv, g * T, hd)
        s = torch.matmul(qg, K.transpose(1, 2)).float() * (hd ** -0.5)  # [kv, g*T, L]
        s = s.view(kv, g, T, hi - lo) + a["mask_" + name]
        if L["sinks"] is not None:
            sk = L["sinks"].view(kv, g, 1, 1).expand(kv, g, T, 1)
            s = torch.cat((s, sk), dim=-1)
            p = torch.softmax(s, dim=-1)[..., :-1]
        else:
            p = torch.softmax(s, dim=-1)
        p = p.to(torch.bfloat16).reshape(kv, g * T, hi - lo)
        o = torch.matmul(p, V)  # [kv, g*T, vd]
        o = o.view(kv, g, T, vd).permute(2, 0, 1, 3).reshape(T, nh * vd)
        return F.linear(o, L["w_o"])

    def dense_mlp(self, x, L):
        I = L["w_d"].shape[1]
        gu = F.linear(x, L["w_gu"])
        h = F.silu(gu[:, :I]) * gu[:, I:]
        return F.linear(h, L["w_d"])

    def route(self, x, L):
        c = self.cfg
        logits = F.linear(x, L["router"]).float()  # [T, E]
        scores = torch.sigmoid(logits)
        choice = scores + L["e_bias"]
        idx = torch.topk(choice, c.top_k, dim=-1, sorted=False)[1]  # n_group = topk_group = 1
        w = scores.gather(1, idx)
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)  # norm_topk_prob, routed_scaling_factor 1.0
        if self.record is not None:
            self.record.append(idx)
        return idx, w

    def moe_grouped(self, x, idx, w, L):
        T, H = x.shape
        K = idx.shape[1]
        E = self.cfg.n_experts
        I = L["w_d"].shape[2]
        flat = idx.reshape(-1)
        sorted_ids, perm = torch.sort(flat)
        tok = perm // K
        xs = x.index_select(0, tok)  # [T*K, H] grouped by expert
        counts = (flat[:, None] == self.expert_ids[None, :]).sum(dim=0)
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
        gu = self.gmm(xs, L["w_gu"].transpose(-2, -1), offs=offs)  # [T*K, 2I]
        h = F.silu(gu[:, :I]) * gu[:, I:]
        y = self.gmm(h, L["w_d"].transpose(-2, -1), offs=offs)  # [T*K, H]
        y = y.float() * w.reshape(-1).index_select(0, perm)[:, None]
        out = torch.zeros((T, H), device=x.device, dtype=torch.float32)
        out.index_add_(0, tok, y)
        return out.to(x.dtype)

    def moe_all_experts(self, x, idx, w, L):
        # reads every expert (fallback when grouped GEMM is unavailable)
        E = self.cfg.n_experts
        I = L["w_d"].shape[2]
        xe = x.unsqueeze(0).expand(E, -1, -1)  # [E, T, H]
        gu = torch.bmm(xe, L["w_gu"].transpose(1, 2))  # [E, T, 2I]
        h = F.silu(gu[..., :I]) * gu[..., I:]
        y = torch.bmm(h, L["w_d"].transpose(1, 2))  # [E, T, H]
        onehot = (idx[:, :, None] == self.expert_ids[None, None, :]).float()  # [T, K, E]
        we = (onehot * w[:, :, None]).sum(dim=1).t()  # [E, T]
        return (y.float() * we[:, :, None]).sum(dim=0).to(x.dtype)

    def moe(self, x, L):
        idx, w = self.route(x, L)
        if self.moe_impl == "grouped":
            return self.moe_grouped(x, idx, w, L)
        return self.moe_all_experts(x, idx, w, L)

    def layer(self, x, L, a):
        x = x + self.attention(self.rmsnorm(x, L["attn_norm"]), L, a)
        h = self.rmsnorm(x, L["mlp_norm"])
        if L["dense"]:
            return x + self.dense_mlp(h, L)
        return x + self.moe(h, L)

    def step(self, tokens):
        a = self.aux[tokens.shape[0]]
        x = self.embed.index_select(0, tokens)
        for L in self.layers:
            x = self.layer(x, L, a)
        x = self.rmsnorm(x, self.final_norm)
        return F.linear(x, self.lm_head).float()  # [T, vocab]

    # bytes one step reads (weights touched + KV)
    def step_bytes(self, T, touched=None):
        c = self.cfg
        H = c.hidden
        b = T * H * 2  # embedding rows
        moe_i = 0
        for L in self.layers:
            b += 2 * H * 2  # norms
            b += L["w_qkv"].numel() * 2 + L["w_o"].numel() * 2
            if L["sinks"] is not None:
                b += c.n_heads * 4
            n_keys = c.ctx + T if L["full"] else (c.ctx + T) - max(0, c.ctx - (c.window - 1))
            b += n_keys * L["kv"] * (c.head_dim + c.v_head_dim) * 2
            if L["dense"]:
                b += 3 * c.dense_inter * H * 2
            else:
                n = min(c.top_k * T, c.n_experts) if touched is None else touched[moe_i]
                moe_i += 1
                b += c.n_experts * H * 2 + c.n_experts * 4  # router + correction bias
                b += n * 3 * c.moe_inter * H * 2
        b += H * 2 + c.vocab * H * 2  # final norm + lm_head
        return b


# ----------------------------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------------------------


def time_fn(fn, warmup=5, iters=20):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts), ts


def measure_bw(dev, gib=2.0):
    n = int(gib * (1 << 30))
    src = torch.empty(n, dtype=torch.uint8, device=dev)
    src.fill_(1)
    dst = torch.empty_like(src)
    ms, _ = time_fn(lambda: dst.copy_(src), warmup=2, iters=10)
    del src, dst
    torch.cuda.empty_cache()
    return 2.0 * n / (ms * 1e-3) / 1e9


def check_grouped(peer, dev):
    """grouped GEMM vs all-experts bmm on one real MoE layer; returns (ok, detail)."""
    if peer.gmm is None:
        return False, "no torch grouped_mm"
    L = next((L for L in peer.layers if not L["dense"]), None)
    if L is None:
        return True, "no MoE layer"
    try:
        g = torch.Generator(device=dev)
        g.manual_seed(1)
        x = torch.randn((4, peer.cfg.hidden), device=dev, dtype=torch.bfloat16, generator=g)
        idx, w = peer.route(x, L)
        a = peer.moe_grouped(x, idx, w, L).float()
        b = peer.moe_all_experts(x, idx, w, L).float()
        err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))
        return err < 2e-2, f"rel err {err:.2e}"
    except Exception as e:  # noqa: BLE001
        return False, f"grouped_mm failed: {e!r}"


def capture_graph(peer, tokens):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            peer.step(tokens)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = peer.step(tokens)
    return g, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--tokens", default="1,4,8,16")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--json", default=None)
    ap.add_argument("--small", action="store_true", help="4 layers: quick smoke test")
    ap.add_argument("--mode", default="auto", choices=["auto", "graph", "compile", "eager"],
                    help="auto: CUDA graph, else torch.compile, else eager")
    ap.add_argument("--moe", default="auto", choices=["auto", "grouped", "all"],
                    help="MoE kernel: grouped GEMM over touched experts, or bmm over all experts")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    n_layers = 4 if args.small else args.layers
    Ts = [int(t) for t in args.tokens.split(",") if t.strip()]
    cfg = Cfg(n_layers, args.experts, args.ctx)
    cfg.cache_len = args.ctx + max(16, max(Ts))
    name = torch.cuda.get_device_name(0)
    print(f"device: {name}; torch {torch.__version__}; layers {n_layers}, experts {args.experts}, ctx {args.ctx}")

    bw = measure_bw(dev)
    print(f"HBM bandwidth (2 GiB D2D copy, read+write): {bw:.1f} GB/s")

    t0 = time.time()
    peer = Peer(cfg, dev)
    torch.cuda.synchronize()
    wbytes = sum(
        t.numel() * t.element_size()
        for L in peer.layers
        for k, t in L.items()
        if isinstance(t, torch.Tensor) and not k.endswith("cache")
    ) + 2 * peer.embed.numel() * 2
    print(f"weights: {wbytes / 1e9:.2f} GB generated in {time.time() - t0:.1f}s; "
          f"GPU memory allocated {torch.cuda.memory_allocated() / 1e9:.2f} GB")

    if args.moe == "all":
        peer.moe_impl = "all"
        moe_note = "forced"
    else:
        ok, moe_note = check_grouped(peer, dev)
        if ok:
            peer.moe_impl = "grouped"
        elif args.moe == "grouped":
            print(f"grouped MoE check failed ({moe_note}); continuing with it as forced")
            peer.moe_impl = "grouped"
        else:
            peer.moe_impl = "all"
    print(f"MoE implementation: {peer.moe_impl} ({moe_note})")

    if args.mode == "compile":
        modes = ["compile", "eager"]
    elif args.mode == "eager":
        modes = ["eager"]
    elif args.mode == "graph":
        modes = ["graph"]
    else:
        modes = ["graph", "compile", "eager"]
    compiled_step = None
    results = []
    mode_used = {}
    gen = torch.Generator(device="cpu")
    gen.manual_seed(123)
    with torch.inference_mode():
        for T in Ts:
            peer.prepare(T)
            tokens = torch.randint(0, cfg.vocab, (T,), generator=gen).to(dev)

            # routing statistics + finiteness (eager, with host syncs; outside timing)
            peer.record = []
            ref = peer.step(tokens)
            touched = [int(torch.unique(r).numel()) for r in peer.record]
            peer.record = None
            finite_eager = bool(torch.isfinite(ref).all().item())
            eager_ms, _ = time_fn(lambda: peer.step(tokens), warmup=2, iters=5)

            ms = None
            out = None
            used = None
            err = []
            for m in modes:
                try:
                    if m == "graph":
                        g, out = capture_graph(peer, tokens)
                        fn = g.replay
                    elif m == "compile":
                        if compiled_step is None:
                            compiled_step = torch.compile(
                                peer.step, mode="max-autotune-no-cudagraphs", dynamic=False)
                        holder = {}

                        def fn(holder=holder):
                            holder["out"] = compiled_step(tokens)

                        fn()
                        out = None
                    else:
                        holder = {}

                        def fn(holder=holder):
                            holder["out"] = peer.step(tokens)

                    ms, _ = time_fn(fn, warmup=5, iters=20)
                    if out is None:
                        out = holder["out"]
                    used = m
                    break
                except Exception as e:  # noqa: BLE001 - fall back to the next mode
                    err.append(f"{m}: {e!r}")
                    print(f"T={T}: mode {m} failed: {e!r}")
                    torch.cuda.synchronize()
            if used is None:
                print(f"T={T}: every mode failed")
                results.append({"T": T, "error": "; ".join(err)})
                continue
            mode_used[T] = used
            finite = bool(torch.isfinite(out).all().item())
            max_diff = float((out - ref).abs().max().item())
            ref_max = float(ref.abs().max().item())
            nbytes = peer.step_bytes(T)
            nbytes_actual = peer.step_bytes(T, touched)
            floor_ms = nbytes / (bw * 1e9) * 1e3
            r = {
                "T": T,
                "ms": ms,
                "tok_s": T / (ms * 1e-3),
                "bytes": nbytes,
                "floor_ms": floor_ms,
                "floor_frac": floor_ms / ms,
                "x_floor": ms / floor_ms,
                "bytes_actual_routing": nbytes_actual,
                "experts_touched_mean": sum(touched) / max(1, len(touched)),
                "eager_ms": eager_ms,
                "mode": used,
                "finite": finite and finite_eager,
                "max_abs_vs_eager": max_diff,
                "logits_max_abs": ref_max,
            }
            if err:
                r["fallback_errors"] = err
            results.append(r)
            print(f"T={T:3d} {used:8s} {ms:8.3f} ms  {r['tok_s']:9.1f} tok/s  floor {floor_ms:7.3f} ms "
                  f"({r['floor_frac'] * 100:5.1f}%)  eager {eager_ms:8.3f} ms  finite {r['finite']}")
            del out, ref

    modes_seen = sorted(set(mode_used.values()))
    mode = modes_seen[0] if len(modes_seen) == 1 else ",".join(f"T{t}:{m}" for t, m in mode_used.items())
    report = {
        "device": name,
        "torch": torch.__version__,
        "bw_GBps": bw,
        "mode": mode,
        "moe_impl": peer.moe_impl,
        "layers": n_layers,
        "experts": args.experts,
        "top_k": cfg.top_k,
        "ctx": args.ctx,
        "weights_GB": wbytes / 1e9,
        "results": results,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)

    print()
    print(f"device {name} | HBM {bw:.0f} GB/s | mode {mode} | MoE {peer.moe_impl} | "
          f"{n_layers} layers, {args.experts} experts, ctx {args.ctx}")
    hdr = f"{'T':>4s} {'ms/step':>9s} {'tok/s':>9s} {'GB/step':>9s} {'floor ms':>9s} {'floor %':>8s} {'eager ms':>9s} {'finite':>7s}"
    print(hdr)
    print("-" * len(hdr))
    bad = False
    for r in results:
        if "error" in r:
            print(f"{r['T']:4d} ERROR {r['error']}")
            bad = True
            continue
        print(f"{r['T']:4d} {r['ms']:9.3f} {r['tok_s']:9.1f} {r['bytes'] / 1e9:9.3f} {r['floor_ms']:9.3f} "
              f"{r['floor_frac'] * 100:7.1f}% {r['eager_ms']:9.3f} {str(r['finite']):>7s}")
        if not r["finite"]:
            print(f"FAIL T={r['T']}: non-finite logits")
            bad = True
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
