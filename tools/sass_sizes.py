#!/usr/bin/env python3
"""SASS bytes per device function of a megakernel cubin listing (no GPU needed), largest first:

    nvdisasm -c <plan>/megakernel.cubin > mk.sass     # or a bench/variants/NAME.cubin
    python3 tools/sass_sizes.py mk.sass [N]

The session-14 code-size numbers in bench/NOTES.md (op_attn, route_tokens, matmul_finish, ...) come from this on
the default and variant cubins that tools/prepare_device.sh builds.
"""
import re
import sys

from ncu_sass import functions


def main():
    path = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    funcs = functions(path)
    last = max(int(m.group(1), 16) for m in (re.match(r"^\s*/\*([0-9a-f]{4,})\*/", l) for l in open(path)) if m)
    ends = [a for a, _ in funcs[1:]] + [last + 16]
    sizes = sorted(((e - a, name) for (a, name), e in zip(funcs, ends)), reverse=True)
    for size, name in sizes[:n]:
        print(f"{size / 1024:7.1f} KB  {name}")


if __name__ == "__main__":
    main()
