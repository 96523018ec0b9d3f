#!/usr/bin/env bash
# Build experimental megakernel cubins for `bench/gpu.sh variants`: each NAME=FLAGS argument compiles the current
# kernels/cuda/megakernel.cu, under the generated header of a compiled plan, with extra nvcc flags into
# bench/variants/NAME.cubin (same flags as compiler/src/codegen.rs).
#   tools/build_variants.sh <plan dir> tm1="-DMK_TMAP=1" tm2="-DMK_TMAP=2"
# nvcc: $MIMO_NVCC, else nvcc on PATH. The plan gives the header (#defines before the kernel source); any plan
# compiled with the default max tokens serves the bench plan (the header's constants are the encoder's limits).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: $0 <plan dir> NAME=FLAGS..." >&2; exit 2; }
plan=$1; shift
NVCC=${MIMO_NVCC:-nvcc}
gen="$plan/megakernel.cu"
[ -f "$gen" ] || { echo "$gen not found: compile a plan first (mimoc compile <ckpt> -o <plan dir>)" >&2; exit 1; }
# The generated source is the header followed by the kernel source verbatim: keep the lines before its first line.
first=$(head -1 kernels/cuda/megakernel.cu)
n=$(grep -nxF -- "$first" "$gen" | head -1 | cut -d: -f1)
[ -n "$n" ] || { echo "$gen does not embed kernels/cuda/megakernel.cu's first line" >&2; exit 1; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
{ head -n $((n - 1)) "$gen"; cat kernels/cuda/megakernel.cu; } > "$tmp/megakernel.cu"
mkdir -p bench/variants
pids=()
for a in "$@"; do
  name=${a%%=*}; flags=${a#*=}
  # shellcheck disable=SC2086
  "$NVCC" -gencode=arch=compute_90a,code=sm_90a -O3 -lineinfo -cubin $flags -o "bench/variants/$name.cubin" "$tmp/megakernel.cu" &
  pids+=($!)
done
fail=0
for p in "${pids[@]}"; do wait "$p" || fail=1; done
[ $fail = 0 ] || { echo "nvcc failed" >&2; exit 1; }
ls -l bench/variants/*.cubin
