#!/usr/bin/env python3
"""Group a compute-sanitizer racecheck log's hazards by kind and by the two accesses.

    python3 tools/race_summary.py racecheck.log [line offset]

Lines are the generated megakernel.cu's minus the offset (7: the generated file's header before the body of
kernels/cuda/megakernel.cu; other files' lines as they are); threads 224-255 are the producer warp (MK_CW = 7). bench/gpu.sh runs it for
MIMO_RACECHECK_ALL=1 (the s5r8 summary in bench/results/gpu-s5r8-sanitizer-summary.txt).
"""
import re
import sys
from collections import Counter


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    offset = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    lines = open(sys.argv[1], errors="replace").read().split("\n")
    access = re.compile(r"(Write|Read) Thread \((\d+),0,0\) at (.*?)\+0x[0-9a-f]+ in (\S+?\.cu):(\d+)")
    pairs = Counter()
    for j, l in enumerate(lines):
        if "Error:" not in l and "Warning:" not in l:
            continue
        if "Warning" in l:
            kind = "WAR warning (warp level)" if "Warp Level" in l else "warning"
        else:
            kind = "RAW error" if "RAW" in l else ("WAW error" if "WAW" in l else "WAR error")
        accs = []
        for k in (1, 2):
            m = access.search(lines[j + k]) if j + k < len(lines) else None
            if m:
                who = "producer warp" if int(m.group(2)) >= 224 else "warps 0-6"
                fn = m.group(3).split("(")[0].replace("$mimo_forward$", "")
                line = int(m.group(5)) - (offset if m.group(4).endswith("megakernel.cu") else 0)
                accs.append(f"{m.group(1)} by {who} at line {line} ({fn})")
        pairs[(kind, " / ".join(accs))] += 1
    for l in lines:
        if "RACECHECK SUMMARY" in l:
            print(l.strip())
    for (kind, acc), n in pairs.most_common():
        print(f"{n:6d}  {kind}: {acc}")


if __name__ == "__main__":
    main()
