#!/usr/bin/env bash
# The body of one device call: bench/gpu.sh with its results kept off the returned folder until the end, so that
# the call returns few files (the device tool returns a limited number) and something even when it is cut off.
#
#   bash bench/device_call.sh SECONDS [gpu.sh stages ...]
#
# summary.txt is copied to $OUT every 5 s while gpu.sh runs (a call killed at its time limit still returns it);
# gpu.sh's stdout / stderr go to $OUT/log.txt; when gpu.sh ends (or SECONDS pass: it is stopped) everything it wrote
# (JSON, timelines) is packed into $OUT/out.tgz. The gpu.sh knobs (MIMO_*) pass through the environment.
set -uo pipefail
limit=${1:?usage: bench/device_call.sh SECONDS [stages ...]}
shift
real=${OUT:?OUT must name the folder the device tool returns}
work=$(mktemp -d /tmp/mimo-out.XXXXXX)
(while sleep 5; do cp "$work/summary.txt" "$real/" 2>/dev/null; done) &
copier=$!
OUT=$work timeout "$limit" bash bench/gpu.sh "$@" > "$real/log.txt" 2>&1
rc=$?
kill "$copier" 2>/dev/null
cp "$work/summary.txt" "$real/" 2>/dev/null
tar czf "$real/out.tgz" -C "$work" .
echo "gpu.sh rc=$rc; results: summary.txt, log.txt, out.tgz ($(ls "$work" | wc -l) files)"
exit $rc
