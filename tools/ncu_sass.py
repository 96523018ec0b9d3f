#!/usr/bin/env python3
"""Nsight Compute warp-state samples of the megakernel, by device function and by SASS instruction.

Input: the source page `bench/gpu.sh ncu` writes (ncu_sass_tN.csv.gz: one row per SASS instruction, absolute
addresses, no function names) and an nvdisasm listing of the same cubin (the function labels):

    nvdisasm -c <plan>/megakernel.cubin > mk.sass
    python3 tools/ncu_sass.py ncu_sass_t1.csv.gz mk.sass                 # by function
    python3 tools/ncu_sass.py ncu_sass_t1.csv.gz mk.sass --fn ring_consumeILi4ELi1E --top 40
    python3 tools/ncu_sass.py ncu_sass_t1.csv.gz mk.sass --fn ring_consumeILi4ELi1E --ranges
    python3 tools/ncu_sass.py ncu_sass_t1.csv.gz mk.sass --fn ring_consumeILi4ELi1E --by-count
    nvdisasm -c -g <plan>/megakernel.cubin > mk_lines.sass   # with the cubin's line info (mimoc builds -lineinfo)
    python3 tools/ncu_sass.py ncu_sass_t1.csv.gz mk_lines.sass --fn ring_consumeILi4ELi1E --lines <plan>/megakernel.cu

--fn takes a substring of the mangled name; --top lists its hottest instructions, --ranges its samples by
straight-line stretch between branch targets (loops show up as the hot stretches), --by-count its instructions and
samples by how many times each ran (loop body, per chunk, per row group: distinct levels), --lines SRC its samples by
source line of SRC (the generated megakernel.cu the cubin was built from; a listing made with nvdisasm -g).
--code (no --fn): all stall reasons, the instruction-cache misses by function and each function's executed code;
--code --lines SRC: the executed instructions by (function, source line), largest first (--fn A,B leaves out the
functions whose names contain A or B, e.g. ILi1E,op_rowwise for the LM head and embedding: the per-layer code).
"""
import csv
import gzip
import re
import sys
from collections import defaultdict

STALLS = ["barrier", "branch_resolving", "dispatch", "drain", "imc", "lg", "long_sb", "math", "membar", "mio",
          "misc", "no_inst", "not_selected", "selected", "short_sb", "sleep", "tex", "wait"]


def line_map(sass_path):
    """{offset: source line} from an `nvdisasm -g` listing (the last `//## File ..., line N` before each
    instruction)."""
    out, cur, on = {}, None, False
    for line in open(sass_path):
        # Only the megakernel's section: every kernel's offsets start at 0 (the load-time kernels would overwrite
        # the main loop's first lines).
        if re.match(r"^\s*\.section\s+\.text\.", line):
            on = ".text.mimo_forward," in line
            continue
        if not on:
            continue
        m = re.search(r'//## File ".*", line (\d+)', line)
        if m:
            cur = int(m.group(1))
            continue
        m = re.match(r"^\s*/\*([0-9a-f]{4,})\*/", line)
        if m and cur is not None:
            out[int(m.group(1), 16)] = cur
    return out


def functions(sass_path):
    """[(offset, name)] sorted: the kernel entry and every `$mimo_forward$NAME:` label."""
    out, pending = [], None
    for line in open(sass_path):
        s = line.strip()
        m = re.match(r"^\$mimo_forward\$(\S+):$", s)
        if m:
            pending = m.group(1)
            continue
        if s.startswith(".text.mimo_forward:"):
            pending = "mimo_forward (main loop)"
            continue
        m = re.match(r"^/\*([0-9a-f]{4,})\*/", s)
        if m and pending:
            out.append((int(m.group(1), 16), pending))
            pending = None
    return sorted(out)


def rows(csv_path):
    with gzip.open(csv_path, "rt") if csv_path.endswith(".gz") else open(csv_path) as f:
        r = list(csv.reader(f))
    head = next(i for i, x in enumerate(r) if x and x[0] == "Address")
    cols = r[head]
    idx = {c: i for i, c in enumerate(cols)}
    data = [x for x in r[head + 1:] if x and x[0].startswith("0x")]
    base = int(data[0][0], 16)
    for x in data:
        rec = {"off": int(x[0], 16) - base, "src": x[1].strip(),
               "samples": int(x[idx["Warp Stall Sampling (All Samples)"]] or 0),
               "instrs": int(x[idx["Instructions Executed"]] or 0)}
        for s in STALLS:
            c = idx.get("stall_" + s)
            rec[s] = int(x[c] or 0) if c is not None and x[c] not in ("", "-") else 0
        yield rec


def owner(funcs, off):
    lo, hi = 0, len(funcs) - 1
    if not funcs or off < funcs[0][0]:
        return "?"
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if funcs[mid][0] <= off:
            lo = mid
        else:
            hi = mid - 1
    return funcs[lo][1]


def top_stalls(rec, total, n=3):
    parts = sorted(((rec[s], s) for s in STALLS), reverse=True)[:n]
    return ", ".join(f"{s} {100.0 * v / total:.1f}" for v, s in parts if v)


def code_report(funcs, recs, total):
    """Every stall reason as a share of all samples; the no-instruction (instruction-cache miss) samples by
    function; and the executed code per function (distinct executed instructions and 128-byte lines: the working
    set the instruction cache must hold)."""
    tot = defaultdict(int)
    for r in recs:
        for s in STALLS:
            tot[s] += r[s]
    print("stall reasons (% of all samples): " + ", ".join(
        f"{s} {100.0 * v / total:.1f}" for s, v in sorted(tot.items(), key=lambda kv: -kv[1]) if v * 200 >= total))
    agg = defaultdict(lambda: defaultdict(int))
    lines = defaultdict(set)
    for r in recs:
        f = owner(funcs, r["off"])
        a = agg[f]
        a["samples"] += r["samples"]
        a["no_inst"] += r["no_inst"]
        a["static"] += 1
        if r["instrs"] > 0:
            a["exec"] += 1
            lines[f].add(r["off"] // 128)
    nl = sum(len(v) for v in lines.values())
    print(f"executed code: {sum(a['exec'] for a in agg.values()) * 16 / 1024:.1f} KB of instructions in {nl} "
          f"128-byte lines ({nl * 128 / 1024:.1f} KB), of {sum(a['static'] for a in agg.values()) * 16 / 1024:.1f} KB")
    print(f"{'function':<60} {'no_inst':>8} {'of fn':>6} {'lines KB':>9} {'exec KB':>8} {'size KB':>8}")
    for name, a in sorted(agg.items(), key=lambda kv: -len(lines[kv[0]])):
        if not lines[name]:
            continue
        print(f"{name[:60]:<60} {100.0 * a['no_inst'] / total:7.2f}% {100.0 * a['no_inst'] / max(1, a['samples']):5.0f}% "
              f"{len(lines[name]) * 128 / 1024:9.1f} {a['exec'] * 16 / 1024:8.1f} {a['static'] * 16 / 1024:8.1f}")


def exec_lines(funcs, recs, total, sass_path, src_path, top, skip):
    """The executed code by source line (all functions, or all but those whose names contain one of the
    comma-separated --fn substrings, e.g. the LM head's): distinct executed instructions per (function, line), their
    no-instruction samples, largest first: where a step's instruction-cache working set comes from (session 18:
    MoE up's inlined assignment divisions)."""
    src = open(src_path).read().split("\n")
    lm = line_map(sass_path)
    drop = [x for x in (skip or "").split(",") if x]
    agg = defaultdict(lambda: [0, 0])
    for r in recs:
        if r["instrs"] <= 0:
            continue
        f = owner(funcs, r["off"])
        if any(x in f for x in drop):
            continue
        a = agg[(f, lm.get(r["off"], 0))]
        a[0] += 1
        a[1] += r["no_inst"]
    n = sum(a[0] for a in agg.values())
    print(f"executed: {n} instructions ({n * 16 / 1024:.1f} KB){' without ' + skip if skip else ''}")
    print(f"{'instrs':>6} {'no_inst':>8}  {'function':<32} {'line':>5}  source")
    for (f, ln), a in sorted(agg.items(), key=lambda kv: -kv[1][0])[:top]:
        text = src[ln - 1].strip() if 0 < ln <= len(src) else "?"
        print(f"{a[0]:6d} {100.0 * a[1] / total:7.2f}%  {f[:32]:<32} {ln:5d}  {text[:80]}")


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    csv_path, sass_path = sys.argv[1], sys.argv[2]
    args = sys.argv[3:]
    fn = args[args.index("--fn") + 1] if "--fn" in args else None
    top = int(args[args.index("--top") + 1]) if "--top" in args else 0
    funcs = functions(sass_path)
    recs = list(rows(csv_path))
    total = sum(r["samples"] for r in recs) or 1
    if "--code" in args and "--lines" in args:
        exec_lines(funcs, recs, total, sass_path, args[args.index("--lines") + 1], top or 40, fn)
        return
    if "--code" in args:
        code_report(funcs, recs, total)
        return
    if fn is None:
        agg = defaultdict(lambda: defaultdict(int))
        for r in recs:
            a = agg[owner(funcs, r["off"])]
            for k in ["samples", "instrs"] + STALLS:
                a[k] += r[k]
        print(f"{total} samples; share = % of all samples, stall reasons as % of all")
        print(f"{'function':<60} {'share':>6} {'warp-instrs':>12}  top stall reasons")
        for name, a in sorted(agg.items(), key=lambda kv: -kv[1]["samples"]):
            if a["samples"] * 1000 < total:
                continue
            print(f"{name[:60]:<60} {100.0 * a['samples'] / total:5.1f}% {a['instrs']:12.3e}  {top_stalls(a, total)}")
        return
    mine = [r for r in recs if fn in owner(funcs, r["off"])]
    ftot = sum(r["samples"] for r in mine) or 1
    print(f"{fn}: {ftot} samples ({100.0 * ftot / total:.1f}% of all), {len(mine)} instructions")
    if "--lines" in args:
        src = open(args[args.index("--lines") + 1]).read().split("\n")
        lm = line_map(sass_path)
        agg = defaultdict(lambda: defaultdict(int))
        for r in mine:
            a = agg[lm.get(r["off"], 0)]
            for k in ["samples", "instrs"] + STALLS:
                a[k] += r[k]
            a["static"] += 1
        for ln, a in sorted(agg.items(), key=lambda kv: -kv[1]["samples"])[:top or 25]:
            text = src[ln - 1].strip() if 0 < ln <= len(src) else "?"
            print(f"  line {ln:5d} {100.0 * a['samples'] / ftot:5.1f}% {a['static']:4d} instrs  {text[:70]:<70} "
                  f"{top_stalls(a, ftot, 2)}")
        return
    if "--by-count" in args:
        # Instructions grouped by how often they ran (two significant digits): a loop body, the per-chunk and
        # per-row-group code of a ring call each run a distinct number of times, so this splits a function's
        # executed instructions and samples by those levels (session 17: the MXFP4 consumer's per-group code).
        lm = line_map(sass_path)
        lvl = defaultdict(lambda: defaultdict(int))
        lines = defaultdict(set)
        ntot = sum(r["instrs"] for r in mine) or 1
        for r in mine:
            if r["instrs"] <= 0:
                continue
            a = lvl[float(f"{r['instrs']:.2g}")]
            a["static"] += 1
            for k in ["samples", "instrs"] + STALLS:
                a[k] += r[k]
            if r["off"] in lm:
                lines[float(f"{r['instrs']:.2g}")].add(lm[r["off"]])
        for n, a in sorted(lvl.items(), key=lambda kv: -kv[0]):
            if a["instrs"] * 200 < ntot and a["samples"] * 200 < ftot:
                continue
            ls = sorted(lines[n])
            where = f"  source lines {ls[0]}-{ls[-1]}" if ls else ""
            print(f"  ran {n:9.2e} times: {a['static']:4d} instrs, {100.0 * a['instrs'] / ntot:5.1f}% of executed, "
                  f"{100.0 * a['samples'] / ftot:5.1f}% of samples  {top_stalls(a, ftot, 2)}{where}")
        return
    if "--ranges" in args:
        # Stretches between branch targets / branches: split at every BRA and every target it names.
        targets = set()
        for r in mine:
            m = re.search(r"BRA\s+(?:\S+\s+)?`?\(?\.?L?_?x?_?(\w*)", r["src"])
            t = re.search(r"0x([0-9a-f]+)", r["src"])
            if "BRA" in r["src"] and t:
                targets.add(int(t.group(1), 16))
        cur, start, acc = [], None, []
        for r in mine:
            if r["off"] in targets and cur:
                acc.append(cur)
                cur = []
            cur.append(r)
            if "BRA" in r["src"] or "EXIT" in r["src"] or "RET" in r["src"]:
                acc.append(cur)
                cur = []
        if cur:
            acc.append(cur)
        acc.sort(key=lambda c: -sum(r["samples"] for r in c))
        for c in acc[:top or 15]:
            s = sum(r["samples"] for r in c)
            agg = defaultdict(int)
            for r in c:
                for k in STALLS:
                    agg[k] += r[k]
            print(f"  {c[0]['off']:#07x}-{c[-1]['off']:#07x} {len(c):4d} instrs {100.0 * s / ftot:5.1f}% of fn, "
                  f"executed {max(r['instrs'] for r in c):.3e}  {top_stalls(agg, ftot)}")
        return
    for r in sorted(mine, key=lambda r: -r["samples"])[:top or 30]:
        print(f"  {r['off']:#07x} {100.0 * r['samples'] / ftot:5.1f}% {r['instrs']:10d}  {r['src'][:60]:<60} {top_stalls(r, ftot, 2)}")


if __name__ == "__main__":
    main()
