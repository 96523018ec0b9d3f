#!/usr/bin/env python3
"""Per-instruction phase breakdown from MK_PHASE variant timelines (bench/gpu.sh variants with
MIMO_VARIANT_TIMELINE naming the phase builds, e.g. p1..p6 = -DMK_PHASE=1..6):

    python3 tools/phases.py BASE_TIMELINE.txt.gz PHASE_DIR [FIRST LAST]

BASE is a default build's timeline (its ring column is the ring time); PHASE_DIR holds timeline_p1.txt.gz ..
timeline_p6.txt.gz, whose ring column reports thread 0's time in one phase (1 prep, 2 matmul setup before the ring,
3 ring end to the epilogue, 4 matmul_finish, 5 completion, 6 the producer issuing prefetches). Prints, for
instructions FIRST .. LAST - 1 (default 14 .. 22: one MoE layer) at T = 1 and 16, the mean over the blocks that
work on each: busy (work start to end), ring, dependency wait, the phases, and what the phases 1-5 and the ring
leave unexplained (e.g. the block waiting for the producer's prefetch after the dependency spin).
"""
import gzip
import os
import sys


def load(path):
    sec, cur = {}, None
    for line in gzip.open(path, "rt"):
        if line.startswith("T "):
            cur = sec.setdefault(line.strip(), [])
            continue
        if line.strip() and cur is not None:
            p = line.split()
            v = [tuple(map(int, x.split(","))) for x in p[2:] if x.count(",") == 3]
            cur.append((int(p[0]), p[1], v))
    return sec


def main():
    base = load(sys.argv[1])
    ph = {n: load(os.path.join(sys.argv[2], "timeline_p%d.txt.gz" % n)) for n in range(1, 7)}
    lo, hi = (int(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) > 4 else (14, 22)
    for t in ("T 1", "T 16"):
        if t not in base:
            continue
        print(t, "(us, mean over the blocks with work)")
        print("  i name       blocks  busy  ring  wait |  prep setup  post finish  tail prodpf | unexplained")
        for idx in range(lo, min(hi, len(base[t]))):
            i, name, v = base[t][idx]
            act = [j for j, x in enumerate(v) if x[2] - x[1] > 20]
            n = max(1, len(act))

            def mean(rows, f):
                vv = rows[idx][2]
                return sum(f(vv[j]) for j in act) / n / 10

            busy = mean(base[t], lambda x: x[2] - x[1])
            ring = mean(base[t], lambda x: x[3])
            wait = mean(base[t], lambda x: x[1] - x[0])
            phs = [mean(ph[k][t], lambda x: x[3]) for k in range(1, 7)]
            print("%3d %-9s %4d %5.1f %5.1f %5.1f |" % (i, name, len(act), busy, ring, wait),
                  " ".join("%5.1f" % x for x in phs), "| %5.1f" % (busy - ring - sum(phs[:5])))


if __name__ == "__main__":
    main()
