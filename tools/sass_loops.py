#!/usr/bin/env python3
"""Loops of one function in a megakernel SASS listing, with their instruction mix.

The numbers in bench/NOTES.md about the consumers' K-step loops (instructions per two steps, the share spent
decoding MXFP4) come from this. Build the cubin and list it here, no GPU needed:

    nvcc -gencode=arch=compute_90a,code=sm_90a -O3 -cubin -o mk.cubin <plan>/megakernel.cu
    nvdisasm -c mk.cubin > mk.sass
    python3 tools/sass_loops.py mk.sass _Z12ring_consumeILi4ELi1EEvPKhiiPKfiPfjb [--ops]

(nvdisasm installs from PyPI: nvidia-cuda-nvdisasm.) A loop is a backward branch to a label of the function;
--ops adds an opcode histogram per innermost loop (those containing no other loop).
"""
import re
import sys
from collections import Counter


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    path, fn = sys.argv[1], sys.argv[2]
    ops = "--ops" in sys.argv[3:]
    lines = open(path).read().split("\n")
    start = [i for i, l in enumerate(lines) if l.startswith("$mimo_forward$" + fn + ":")]
    if not start:
        sys.exit(f"function {fn} not found in {path}")
    body = []
    for l in lines[start[0] + 1:]:
        if l.startswith("$mimo_forward$") or ".type" in l:
            break
        body.append(l)
    labels, ins = {}, []
    for l in body:
        m = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(.*)", l)
        if m:
            ins.append((int(m.group(1), 16), m.group(2)))
        m = re.match(r"^(\.L_x_\d+):", l)
        if m:
            labels[m.group(1)] = len(ins)
    loops = []
    for idx, (addr, text) in enumerate(ins):
        m = re.search(r"BRA.*`\((\.L_x_\d+)\)", text)
        if m and m.group(1) in labels and labels[m.group(1)] <= idx:
            loops.append((labels[m.group(1)], idx))
    for lo, hi in loops:
        seg = [t for _, t in ins[lo:hi + 1]]
        count = lambda s: sum(s in t for t in seg)
        print(f"loop {ins[lo][0]:#x}-{ins[hi][0]:#x}: {len(seg)} instructions, {count('HMMA')} HMMA, "
              f"{count(' LDS')} LDS, {count('LDL') + count('STL')} local")
        inner = not any(lo <= a and b <= hi and (a, b) != (lo, hi) for a, b in loops)
        if ops and inner:
            hist = Counter(t.split()[1] if t.startswith("@") else t.split()[0] for t in seg)
            print("   " + ", ".join(f"{op} {n}" for op, n in hist.most_common()))
    print("instructions in the function:", len(ins))


if __name__ == "__main__":
    main()
