#!/usr/bin/env bash
# One device call: check the GPU megakernel against the CPU interpreter and transformers, run the sanitizer, and
# benchmark decode steps against the HBM floor and the PyTorch peer. Results land under $OUT (JSON + logs).
#
# Binaries are built on the CI-like machine and carried (see README.md, "The GPU device script"):
#   cargo build --profile device -p mimo-compiler -p mimo-runtime --bins
#   device run: carry target/device/mimoc, target/device/mimort; command: bash bench/gpu.sh [stages]
# Stages (default all but ncu / variants / racerepro / icache): env verify sanitize racerepro hf bench bigverify ncu peer
# variants icache wgmma
# sanitize: MIMO_SANITIZE_TOOLS, MIMO_SANITIZE_TIMEOUT; MIMO_RACECHECK_ALL=1 adds every racecheck hazard, grouped.
# variants: every bench/variants/NAME.cubin (an experimental build of the same kernel source revision's encoding,
# carried, git-ignored) replaces the bench plan's cubin in turn: checked against the CPU on the tiny MoE plan and
# timed at T = 1 and 16 (results bench_NAME.json); MIMO_VARIANT_BIGVERIFY=1 (or names) also checks it on the bench plan;
# MIMO_VARIANT_SANITIZE="racecheck ..." also runs those tools on it (only on the variants MIMO_VARIANT_SANITIZE_NAMES lists, when set).
set -uo pipefail
OUT=${OUT:-/tmp/mimo-out}
mkdir -p "$OUT"
B=${MIMO_BIN:-target/device}
W=${MIMO_WORK:-/tmp/mimo-work}
mkdir -p "$W"
export PATH=/usr/local/cuda/bin:$PATH
export PYTHONUNBUFFERED=1
STAGES=${*:-env verify sanitize hf bench bigverify peer}
has() { [[ " $STAGES " == *" $1 "* ]]; }
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }
make_bench() { $B/mimoc make-bench -o "$W/bench" --n-experts 16 --dense fp8; }

if has env; then
  log "env"
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nvcc --version | tail -2
    python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
  } 2>&1 | tee -a "$OUT/summary.txt"
fi

if has verify; then
  log "verify: GPU megakernel vs CPU interpreter on tiny plans"
  rm -rf "$W/moe" "$W/dense" "$W/moe8"
  $B/mimoc make-tiny "$W/moe" --arch moe --seed 3 >/dev/null
  $B/mimoc make-tiny "$W/dense" --arch dense --seed 4 >/dev/null
  $B/mimoc make-tiny "$W/moe8" --arch moe --seed 5 --fp8 >/dev/null
  # Each entry: [ENV=VALUE@]checkpoint:mimoc-flags ('_' for spaces); the environment applies to mimort (e.g. the
  # MIMO_MOE_DOWN_EM=1 knob, which forces MoE down's expert-major mode on plans too small to need it).
  VARIANTS=${MIMO_VERIFY:-"moe: moe:--no-fuse moe:--experts_bf16 moe:--dense_fp8 moe:--max-tokens_4 dense: dense:--no-fuse moe8: MIMO_MOE_DOWN_EM=1@moe: MIMO_MOE_DOWN_EM=1@moe:--max-tokens_4 MIMO_ROUTER_FUSE=0@moe:"}
  for v in $VARIANTS; do
    envs=""; [[ $v == *@* ]] && { envs=${v%%@*}; v=${v#*@}; }
    v=${v//_/ }
    ck=${v%%:*}; flags=${v#*:}; tag=$(echo "${envs:+$envs }$ck $flags" | tr 'A-Z' 'a-z' | tr -c 'a-z0-9\n' '_')
    rm -rf "$W/p_$tag"
    if $B/mimoc compile "$W/$ck" -o "$W/p_$tag" $flags > "$W/compile_$tag.log" 2>&1; then
      timeout ${MIMO_VERIFY_TIMEOUT:-90} env $envs $B/mimort verify-gpu "$W/p_$tag" --prefill 40 --decode 24 --json "$W/verify_$tag.json" > "$W/verify_$tag.log" 2>&1
      rc=$?
      echo "verify ${envs:+$envs }$ck $flags: rc=$rc $(tr -d '\n ' < "$W/verify_$tag.json" 2>/dev/null | head -c 400)" | tee -a "$OUT/summary.txt"
      [ $rc -ne 0 ] && tail -5 "$W/verify_$tag.log" | tee -a "$OUT/summary.txt"
    else
      echo "compile $ck $flags FAILED"; tail -20 "$W/compile_$tag.log" | tee -a "$OUT/summary.txt"
    fi
  done
  # verify_config NAME DECODE: a bench plan from bench/NAME_config.json (MXFP4 experts, FP8 dense) in $W/p_NAME,
  # checked against the CPU over 40 prefill positions and DECODE decode steps.
  verify_config() {
    rm -rf "$W/p_$1"
    $B/mimoc make-bench -o "$W/p_$1" --config bench/$1_config.json --n-experts 8 --dense fp8 > "$W/compile_$1.log" 2>&1 \
      || tail -5 "$W/compile_$1.log" | tee -a "$OUT/summary.txt"
    timeout ${MIMO_VERIFY_TIMEOUT:-90} $B/mimort verify-gpu "$W/p_$1" --prefill 40 --decode $2 --json "$W/verify_$1.json" > "$W/verify_$1.log" 2>&1
    local rc=$?
    echo "verify $1 (bench/$1_config.json, fp8 dense): rc=$rc $(tr -d '\n ' < "$W/verify_$1.json" 2>/dev/null | head -c 400)" | tee -a "$OUT/summary.txt"
    [ $rc -ne 0 ] && tail -5 "$W/verify_$1.log" | tee -a "$OUT/summary.txt"
  }
  # The mid plan (bench/mid_config.json: FP8 attention, MXFP4 experts, rows of 256 B and more): real formats at
  # shapes where the ring fills chunks by tensor copies (MK_TMAP builds), small enough for the sanitizers.
  [ "${MIMO_VERIFY_MID:-1}" = 1 ] && verify_config mid 24
  # MIMO_VERIFY_MIDK=1: the mid-k plan (bench/midk_config.json: hidden 2304, dense MLP width 12288), where T x K
  # exceeds the activation buffer from T = 8 and blocks hold several dense-up tiles: the K-outer matmul runs on it,
  # small enough for the sanitizers (variants: copy pvk).
  [ "${MIMO_VERIFY_MIDK:-0}" = 1 ] && verify_config midk 8
  cat "$W"/verify_*.json > "$OUT/verify.json" 2>/dev/null
fi

if has sanitize; then
  log "compute-sanitizer on the tiny MoE plan and the mid plan"
  # MIMO_SANITIZE_PLANS: plan dirs under $W (default: the tiny MoE plan, and the mid plan where verify made it).
  for pl in ${MIMO_SANITIZE_PLANS:-p_moe_ p_mid}; do
    [ -d "$W/$pl" ] || continue
    for tool in ${MIMO_SANITIZE_TOOLS:-memcheck racecheck synccheck}; do
      timeout ${MIMO_SANITIZE_TIMEOUT:-240} compute-sanitizer --tool $tool --error-exitcode 9 $B/mimort verify-gpu "$W/$pl" --prefill 20 --decode 4 \
        > "$W/san_${pl}_$tool.log" 2>&1
      echo "sanitizer $pl $tool rc=$? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$W/san_${pl}_$tool.log" | tail -1)" | tee -a "$OUT/summary.txt"
    done
  done
  if [ "${MIMO_RACECHECK_ALL:-0}" = 1 ]; then
    # Every hazard (warnings too), grouped by kind and by the two accesses.
    timeout ${MIMO_SANITIZE_TIMEOUT:-240} compute-sanitizer --tool racecheck --racecheck-report all --print-limit 2000 \
      $B/mimort verify-gpu "$W/p_moe_" --prefill 8 --decode 2 > "$W/race_all.log" 2>&1
    python3 tools/race_summary.py "$W/race_all.log" | tee -a "$OUT/summary.txt"
  fi
fi

if has racerepro; then
  # racecheck on minimal kernels of the megakernel's synchronization patterns (tools/racecheck_repro.cu): which of
  # its reports the tool also makes on correct code.
  log "racecheck on minimal kernels (tools/racecheck_repro.cu)"
  nvcc -arch=sm_90a -lineinfo -o "$W/race_repro" tools/racecheck_repro.cu > "$W/race_repro_build.log" 2>&1 || tail -5 "$W/race_repro_build.log" | tee -a "$OUT/summary.txt"
  for m in ${MIMO_REPRO_MODES:-plain named ring ringbar stage ringall stagenb stagesw stageall loop}; do
    "$W/race_repro" $m 2>&1 | tee -a "$OUT/summary.txt"
    compute-sanitizer --tool racecheck --racecheck-report all --print-limit 2000 "$W/race_repro" $m > "$W/race_repro_$m.log" 2>&1
    echo "racecheck $m: rc=$? $(grep -E 'RACECHECK SUMMARY' "$W/race_repro_$m.log" | tail -1)" | tee -a "$OUT/summary.txt"
    python3 tools/race_summary.py "$W/race_repro_$m.log" | tail -n +2 | tee -a "$OUT/summary.txt"
  done
fi

if has icache; then
  # The instruction-cache probe (tools/icache_probe.cu): cycles per instruction of straight-line code by its size,
  # cold and warm, for 1 / 4 / 8 warps (bench/variants/icache_probe when carried, else built here).
  log "instruction-cache probe"
  probe=bench/variants/icache_probe
  [ -x "$probe" ] || { nvcc -arch=sm_90a -O3 -o "$W/icache_probe" tools/icache_probe.cu && probe=$W/icache_probe; }
  timeout 120 "$probe" 2>&1 | tee -a "$OUT/summary.txt"
  # The instruction-cache counters this ncu has (names only).
  timeout 60 ncu --query-metrics 2>/dev/null | grep -iE "icc|inst_cache|instruction_cache|imc" | head -40 | tee -a "$OUT/summary.txt"
fi

if has hf; then
  log "transformers mimo_v2_flash reference"
  rm -rf "$W/hf" "$W/hfp" "$W/hfp4"
  timeout 300 python3 tools/hf_reference.py make --out "$W/hf" --tokenizer-from "$W/moe" > "$OUT/hf_make.log" 2>&1
  echo "hf make rc=$?" | tee -a "$OUT/summary.txt"; tail -3 "$OUT/hf_make.log" | tee -a "$OUT/summary.txt"
  $B/mimoc compile "$W/hf" -o "$W/hfp" --experts bf16 > "$W/hfp.log" 2>&1 || tail -5 "$W/hfp.log" | tee -a "$OUT/summary.txt"
  $B/mimoc compile "$W/hf" -o "$W/hfp4" > "$W/hfp4.log" 2>&1 || tail -5 "$W/hfp4.log" | tee -a "$OUT/summary.txt"
  for d in cpu cuda; do
    timeout 120 $B/mimort logits "$W/hfp" --tokens "@$W/hf/ref_tokens.json" --device $d --out "$W/ours_bf16_$d.json" > /dev/null
    timeout 120 $B/mimort logits "$W/hfp4" --tokens "@$W/hf/ref_tokens.json" --device $d --out "$W/ours_mxfp4_$d.json" > /dev/null
  done
  python3 tools/hf_reference.py compare --ckpt "$W/hf" --ours "$W/ours_bf16_cpu.json" --ours "$W/ours_bf16_cuda.json" \
    --ours "$W/ours_mxfp4_cpu.json" --ours "$W/ours_mxfp4_cuda.json" --json "$OUT/hf_compare.json" 2>&1 | tee -a "$OUT/summary.txt"
fi

if has bench; then
  log "decode benchmark: MiMo-V2-Flash shapes, 16 experts, MXFP4 experts + FP8 dense"
  rm -rf "$W/bench"
  start=$SECONDS
  make_bench 2>&1 | tail -1 | tee -a "$OUT/summary.txt"
  echo "make-bench $((SECONDS - start))s" | tee -a "$OUT/summary.txt"
  # MIMO_TIMELINE=1: every block's start / end per instruction of the profiled forwards (timeline.txt.gz;
  # tools/timeline.py reads it).
  tl=""; [ "${MIMO_TIMELINE:-0}" = 1 ] && tl="--timeline $W/timeline.txt"
  timeout 300 $B/mimort bench "$W/bench" --tokens ${MIMO_BENCH_TOKENS:-1,4,8,16} --context 512 --json "$OUT/bench_mimo.json" $tl 2>&1 | tee -a "$OUT/summary.txt"
  [ -n "$tl" ] && gzip -c "$W/timeline.txt" > "$OUT/timeline.txt.gz"
  # MIMO_BENCH_ENVS="VAR=VALUE[,VAR=VALUE] ...": the same kernel again under each environment (encoder knobs such
  # as MIMO_ROUTER_FUSE=0), results bench_env_TAG.json: an A/B inside one call.
  for e in ${MIMO_BENCH_ENVS:-}; do
    tag=$(echo "$e" | tr 'A-Z' 'a-z' | tr -c 'a-z0-9\n' '_')
    log "bench with $e"
    timeout 300 env ${e//,/ } $B/mimort bench "$W/bench" --tokens ${MIMO_BENCH_TOKENS:-1,4,8,16} --context 512 \
      --json "$OUT/bench_env_$tag.json" 2>&1 | tee -a "$OUT/summary.txt"
  done
fi

if has bigverify; then
  log "verify: GPU megakernel vs CPU interpreter on the bench plan (real shapes: ring scale copies, chunked K)"
  [ -d "$W/bench" ] || make_bench > /dev/null 2>&1
  timeout ${MIMO_BIGVERIFY_TIMEOUT:-300} $B/mimort verify-gpu "$W/bench" --prefill 20 --decode 3 --json "$OUT/verify_bench.json" \
    > "$W/verify_bench.log" 2>&1
  echo "verify bench: rc=$? $(tr -d '\n ' < "$OUT/verify_bench.json" 2>/dev/null | head -c 400)" | tee -a "$OUT/summary.txt"
fi

if has ncu; then
  # Nsight Compute on one decode step of the bench plan per MIMO_NCU_TOKENS entry (default 1; launch 37: after the
  # 32 prefill chunks of the context and 4 warm-up steps): stall reasons per SASS line (source page) and the
  # summary sections.
  [ -d "$W/bench" ] || make_bench > /dev/null 2>&1
  # MIMO_NCU_VARIANT=NAME: profile bench/variants/NAME.cubin instead of the plan's own cubin (restored after).
  nv=${MIMO_NCU_VARIANT:-}
  if [ -n "$nv" ]; then cp "$W/bench/megakernel.cubin" "$W/ncu_base.cubin"; cp "bench/variants/$nv.cubin" "$W/bench/megakernel.cubin"; fi
  for nt in ${MIMO_NCU_TOKENS:-1}; do
    log "ncu: one T=$nt decode step of the bench plan"
    timeout 420 ncu --clock-control none -k regex:mimo_forward --launch-skip 36 --launch-count 1 \
      --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section SourceCounters \
      --section MemoryWorkloadAnalysis --import-source yes -f -o "$W/prof$nt" \
      $B/mimort bench "$W/bench" --tokens $nt --context 512 > "$W/ncu_run$nt.log" 2>&1
    echo "ncu T=$nt rc=$?" | tee -a "$OUT/summary.txt"; tail -3 "$W/ncu_run$nt.log" | tee -a "$OUT/summary.txt"
    ncu -i "$W/prof$nt.ncu-rep" --page details --csv > "$OUT/ncu_details_t$nt.csv" 2>&1
    ncu -i "$W/prof$nt.ncu-rep" --page source --csv --print-source sass 2>&1 | gzip > "$OUT/ncu_sass_t$nt.csv.gz"
  done
  [ -n "$nv" ] && cp "$W/ncu_base.cubin" "$W/bench/megakernel.cubin"
  ls -la "$OUT" | tee -a "$OUT/summary.txt"
fi

if has wgmma; then
  # The warpgroup-MMA streaming probe (tools/wgmma_probe.cu): FP8 / MXFP4 weights through a bulk-copy ring into
  # wgmma consumers, as a fraction of the device-to-device copy rate, checked against a host reference.
  log "wgmma probe"
  nvcc -gencode=arch=compute_90a,code=sm_90a -O3 -o "$W/wgmma_probe" tools/wgmma_probe.cu 2>&1 | tail -5 | tee -a "$OUT/summary.txt"
  timeout 300 "$W/wgmma_probe" "$OUT/wgmma_probe.json" 2>&1 | tee -a "$OUT/summary.txt"
fi

if has peer; then
  log "PyTorch peer (bf16, CUDA graphs)"
  timeout 400 python3 bench/torch_peer.py --experts 16 --layers 48 --tokens 1,4,8,16 --ctx 512 --json "$OUT/bench_torch.json" 2>&1 \
    | tail -15 | tee -a "$OUT/summary.txt"
fi
if has variants; then
  [ -d "$W/bench" ] || make_bench > /dev/null 2>&1
  cp "$W/bench/megakernel.cubin" "$W/bench_base.cubin"
  # variant_verify PLAN COPY TAG: variant $v in a copy of plan $W/PLAN against the CPU (verify_TAG$name.json).
  variant_verify() {
    rm -rf "$W/$2"; cp -r "$W/$1" "$W/$2"; cp "$v" "$W/$2/megakernel.cubin"
    timeout ${MIMO_VARIANT_VERIFY_TIMEOUT:-60} env $venv $B/mimort verify-gpu "$W/$2" --prefill 40 --decode 24 --json "$W/verify_$3$name.json" > "$W/verify_$3$name.log" 2>&1
    vrc=$?
    [ $vrc = 0 ] || vbad=1
    echo "verify ${3//_/ }$name: rc=$vrc $(tr -d '\n ' < "$W/verify_$3$name.json" 2>/dev/null | head -c 300)" | tee -a "$OUT/summary.txt"
  }
  # MIMO_VARIANT_DIR: where the variant cubins are (default bench/variants; a second set, e.g. for a later call
  # in the same device command, can sit in another carried folder).
  for v in ${MIMO_VARIANT_DIR:-bench/variants}/*.cubin; do
    [ -f "$v" ] || continue
    name=$(basename "$v" .cubin)
    # MIMO_VARIANT_ENV="NAME:VAR=VALUE[,VAR=VALUE] ...": the environment variant NAME runs under (e.g. an older
    # kernel that needs MIMO_ROUTER_FUSE=0, the encoding it was built for).
    venv=""
    for ve in ${MIMO_VARIANT_ENV:-}; do [ "${ve%%:*}" = "$name" ] && venv=${ve#*:}; done
    venv=${venv//,/ }
    # A variant named *_tN was built for N threads a block (tools/prepare_device.sh): the runtime encodes for it.
    [[ $name =~ _t([0-9]+)$ ]] && venv="$venv MIMO_THREADS=${BASH_REMATCH[1]}"
    log "variant $name${venv:+ ($venv)}"
    # MIMO_VARIANT_NOVERIFY="NAME ...": variants not checked against the CPU (diagnostic builds whose results are
    # right by construction or wrong by design, timed only).
    vbad=0
    if [[ -d "$W/p_moe_" && " ${MIMO_VARIANT_NOVERIFY:-} " != *" $name "* ]]; then
      variant_verify p_moe_ pv ""
      # MIMO_VARIANT_SKIPBAD=1: a variant that fails (or hangs in) the tiny plan's check is not run any further.
      if [[ $vbad = 1 && ${MIMO_VARIANT_SKIPBAD:-0} = 1 ]]; then
        echo "variant $name skipped: it failed the tiny plan's check" | tee -a "$OUT/summary.txt"
        continue
      fi
      [ -d "$W/p_mid" ] && variant_verify p_mid pvm mid_
      [ -d "$W/p_midk" ] && variant_verify p_midk pvk midk_
      # The tiny plan with MoE down's expert-major mode forced (the runtime's encoder knob): its combine path.
      venv0=$venv; venv="$venv MIMO_MOE_DOWN_EM=1"; variant_verify p_moe_ pve em_; venv=$venv0
      # MIMO_VARIANT_SANITIZE="racecheck ...": the sanitizer on the variant (racecheck: every hazard, grouped).
      # MIMO_VARIANT_SANITIZE_PLANS: the variant's plan copies it runs on (pv: tiny MoE, pvm: mid, pvk: mid-k when
      # MIMO_VERIFY_MIDK=1 made it; default pv pvm).
      for tool in ${MIMO_VARIANT_SANITIZE:-}; do
        [[ -n ${MIMO_VARIANT_SANITIZE_NAMES:-} && " $MIMO_VARIANT_SANITIZE_NAMES " != *" $name "* ]] && continue
        for pl in ${MIMO_VARIANT_SANITIZE_PLANS:-pv pvm}; do
          [ -d "$W/$pl" ] || continue
          ropts=""; [ $tool = racecheck ] && ropts="--racecheck-report all --print-limit 2000"
          log=$W/san_${name}_${pl}_$tool.log
          timeout ${MIMO_SANITIZE_TIMEOUT:-240} env $venv compute-sanitizer --tool $tool $ropts \
            $B/mimort verify-gpu "$W/$pl" --prefill 8 --decode 2 > "$log" 2>&1
          echo "sanitizer $name $pl $tool rc=$? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -1)" | tee -a "$OUT/summary.txt"
          [ $tool = racecheck ] && python3 tools/race_summary.py "$log" | tee -a "$OUT/summary.txt"
        done
      done
    fi
    cp "$v" "$W/bench/megakernel.cubin"
    # MIMO_VARIANT_BIGVERIFY=1 (or a list of variant names): the variant against the CPU on the bench plan too
    # (real shapes: what tiny plans' short rows never reach, such as tensor-copied ring chunks).
    bv=${MIMO_VARIANT_BIGVERIFY:-0}
    if [[ $bv = 1 || " $bv " == *" $name "* ]]; then
      timeout ${MIMO_BIGVERIFY_TIMEOUT:-300} env $venv $B/mimort verify-gpu "$W/bench" --prefill 20 --decode 3 \
        --json "$OUT/verify_bench_$name.json" > "$W/verify_bench_$name.log" 2>&1
      echo "verify bench $name: rc=$? $(tr -d '\n ' < "$OUT/verify_bench_$name.json" 2>/dev/null | head -c 400)" | tee -a "$OUT/summary.txt"
    fi
    # MIMO_VARIANT_TIMELINE=1 (or a list of variant names): every block's start / end per instruction
    # (timeline_NAME.txt.gz, tools/timeline.py).
    vt=${MIMO_VARIANT_TIMELINE:-0}
    vtl=""; [[ $vt = 1 || " $vt " == *" $name "* ]] && vtl="--timeline $W/timeline_$name.txt"
    timeout 200 env $venv $B/mimort bench "$W/bench" --tokens ${MIMO_VARIANT_TOKENS:-1,16} --context 512 --json "$OUT/bench_$name.json" $vtl 2>&1 \
      | tee -a "$OUT/summary.txt"
    [ -n "$vtl" ] && gzip -c "$W/timeline_$name.txt" > "$OUT/timeline_$name.txt.gz"
  done
  cp "$W/bench_base.cubin" "$W/bench/megakernel.cubin"
fi

log "done"
