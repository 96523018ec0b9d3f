#!/usr/bin/env bash
# Build here everything a device call carries: the device-profile binaries, the megakernel cubin cache for the
# default and --max-tokens 4 plans (`.mkcache`), and optional variant cubins (bench/variants/NAME.cubin).
#   tools/prepare_device.sh [NAME="NVCC FLAGS" ...]     e.g. tm1="-DMK_TMAP=1" tm1pf2="-DMK_TMAP=1 -DMK_TMPF=2"
# then: run with carry [target/device/mimoc, target/device/mimort, .mkcache, bench/variants] and
#   MIMO_CACHE=$PWD/.mkcache bash bench/gpu.sh <stages>
# nvcc 13: $MIMO_NVCC, else nvcc on PATH, else installed from PyPI into a venv under /tmp/mimo-nvcc.
set -euo pipefail
cd "$(dirname "$0")/.."
NV=${MIMO_NVCC:-$(command -v nvcc || true)}
if [ -z "$NV" ]; then
  venv=/tmp/mimo-nvcc
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-crt==13.0.*" \
      "nvidia-nvvm==13.0.*" "nvidia-cuda-cccl==13.0.*"
  fi
  NV=$(ls "$venv"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc)
fi
echo "nvcc: $NV"
cargo build --profile device -p mimo-compiler -p mimo-runtime --bins
t=$(mktemp -d)
trap 'rm -rf "$t"' EXIT
target/device/mimoc make-tiny "$t/moe" --arch moe --seed 3 > /dev/null
rm -rf .mkcache
MIMO_NVCC=$NV MIMO_CACHE=$PWD/.mkcache target/device/mimoc compile "$t/moe" -o "$t/p16" | tail -1
MIMO_NVCC=$NV MIMO_CACHE=$PWD/.mkcache target/device/mimoc compile "$t/moe" -o "$t/p4" --max-tokens 4 | tail -1
rm -rf bench/variants
# A variant named *_tN is built under the header of a plan compiled for N threads a block (MIMO_THREADS=N; gpu.sh
# runs it with that environment), e.g. v23s2_t288="-DMK_V23=1 -DMK_V23S=2".
for a in "$@"; do
  name=${a%%=*}
  if [[ $name =~ _t([0-9]+)$ ]]; then
    n=${BASH_REMATCH[1]}
    [ -d "$t/p16_t$n" ] || MIMO_THREADS=$n MIMO_NVCC=$NV target/device/mimoc compile "$t/moe" -o "$t/p16_t$n" > /dev/null
    [ -f "$t/p16_t$n/megakernel.cu" ] || { echo "no plan source for $n threads" >&2; exit 1; }
    MIMO_NVCC=$NV tools/build_variants.sh "$t/p16_t$n" "$a"
  else
    MIMO_NVCC=$NV tools/build_variants.sh "$t/p16" "$a"
  fi
done
ls .mkcache
echo "carry: target/device/mimoc target/device/mimort .mkcache bench/variants"
