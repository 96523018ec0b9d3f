#!/usr/bin/env python3
"""Per-block timelines of profiled megakernel forwards (`mimort bench --timeline`, `MIMO_TIMELINE=1 bash
bench/gpu.sh bench` -> timeline.txt.gz): where an instruction kind's critical path goes beyond its mean busy time.

    python3 tools/timeline.py timeline.txt.gz                 # by kind, every token count
    python3 tools/timeline.py timeline.txt.gz --op moe_down --tokens 16 --detail 3

For each instruction, over the blocks that worked on it (work start > wait start): the mean and the largest busy
time (end - work start), how late the last block started after the first, and how far the last block ended
after the previous instruction's frontier (its critical-path share). Summed by kind. `--detail N` prints N
instructions of the kind block by block (start offset, busy), slowest first. Timelines with a fourth number per
block (the instruction's time in the weight ring, or its preparation time in `-DMK_PHASE=1` builds) also give
the mean of that. `--instrs A:B` lists instructions A .. B - 1 one by one (e.g. one layer).
"""
import argparse
import gzip
import sys


def parse(path):
    opener = gzip.open if path.endswith(".gz") else open
    runs, cur = {}, None
    with opener(path, "rt") as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            if parts[0] == "T":
                cur = runs.setdefault(int(parts[1]), [])
                continue
            blocks = [tuple(int(v) for v in b.split(",")) for b in parts[2:]]
            cur.append((int(parts[0]), parts[1], blocks))
    return runs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--op")
    ap.add_argument("--tokens", type=int)
    ap.add_argument("--detail", type=int, default=0)
    ap.add_argument("--instrs", help="A:B: list instructions A .. B - 1 one by one")
    a = ap.parse_args()
    lo, hi = (int(v) for v in a.instrs.split(":")) if a.instrs else (0, -1)
    runs = parse(a.path)
    for t, instrs in sorted(runs.items()):
        if a.tokens and t != a.tokens:
            continue
        front = 0  # times are relative to the forward's first wait start
        kinds = {}
        detail = []
        rows = []
        has_ring = any(len(b) > 3 for _, _, bl in instrs for b in bl)
        for i, name, bl in instrs:
            wb = [b for b in bl if b[1] > b[0] and b[2] > b[1]]
            work = [(b[1], b[2]) for b in wb]
            end = max((b[2] for b in bl), default=0)
            adv = max(0, end - front)
            front = max(front, end)
            k = kinds.setdefault(name, [0, 0.0, 0.0, 0.0, 0.0, 0.0])
            k[0] += 1
            k[4] += adv / 10
            if not work:
                continue
            busy = [e - s for s, e in work]
            ring = sum(b[3] for b in wb if len(b) > 3) / len(wb) / 10
            wait = sum(b[1] - b[0] for b in wb) / len(wb) / 10
            k[1] += sum(busy) / len(busy) / 10
            k[2] += max(busy) / 10
            k[3] += (max(s for s, _ in work) - min(s for s, _ in work)) / 10
            k[5] += ring
            if lo <= i < hi:
                rows.append((i, name, len(work), sum(busy) / len(busy) / 10, max(busy) / 10, wait, ring, adv / 10))
            if a.op == name and len(detail) < a.detail:
                detail.append((i, work))
        rc = " / mean ring" if has_ring else ""
        print(f"T={t}: kind, instrs, sum of mean busy / max busy / start spread / critical path{rc} (us)")
        for name, (n, mean, mx, spread, adv, ring) in sorted(kinds.items(), key=lambda kv: -kv[1][4]):
            if a.op and name != a.op:
                continue
            rs = f" {ring:10.1f}" if has_ring else ""
            print(f"  {name:>10} {n:5d} {mean:10.1f} {mx:10.1f} {spread:10.1f} {adv:10.1f}{rs}")
        if rows:
            print("  instr       kind blocks  mean busy   max busy  mean wait  mean ring  crit path (us)")
            for i, name, nb, mean, mx, wait, ring, adv in rows:
                print(f"  {i:5d} {name:>10} {nb:6d} {mean:10.1f} {mx:10.1f} {wait:10.1f} {ring:10.1f} {adv:10.1f}")
        for i, work in detail:
            s0 = min(s for s, _ in work)
            rows = sorted(((e - s, s - s0) for s, e in work), reverse=True)
            print(f"  instr {i}: {len(work)} blocks; (busy us, start offset us), slowest first:")
            print("    " + " ".join(f"({b / 10:.1f},{o / 10:.1f})" for b, o in rows[:24]))
            print("    ... fastest: " + " ".join(f"({b / 10:.1f},{o / 10:.1f})" for b, o in rows[-8:]))


if __name__ == "__main__":
    sys.exit(main())
