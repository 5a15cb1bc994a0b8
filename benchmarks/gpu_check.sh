#!/usr/bin/env bash
# The GPU check: ONE device call of at most 360 s, so that a rerun still fits a session's 15 device-minutes
# with two machine starts (~1-2 min each). From the repository root:
#
#   bash benchmarks/gpu_check.sh             on the GPU machine (device tool: carry .gpu, timeout_s 420)
#   bash benchmarks/gpu_check.sh --dry-run   every step on the CPU with tiny shapes, in ~2 minutes; CI runs it
#                                            (tests/benchmarks/test_gpu_check.py)
#   bash benchmarks/gpu_check.sh --prepare   on a CPU machine, before the call: fills .gpu/ (below)
#
# The plan (printed first; a step's limit is also cut to what is left of the 360 s, and the script goes on
# past a failing step):
#   setup    20 s  the carried build and Triton cache put in place, nvidia-smi, `pyfast info`
#   smoke    70 s  correctness first (benchmarks/gpu_smoke.py): each fused backend against the float64 reference
#                  on one shape per kernel path, the real-size statistics (batch 128: the two-level combine),
#                  a training step captured in a CUDA graph and replayed twice, no arrival counter left set
#   kernels 110 s  per-kernel table of RegNetX-32's and ResNet-50's layers (bf16, channels_last, batch 128),
#                  eager against each backend that passed the smoke
#   table    10 s  auto's table from it (commit $OUT/auto_table.json as pyfast/ops/backends/auto_table.json)
#   bench   rest   the model report, regnetx_32 (1x224x224) and resnet50 (3x224x224), batch 128, bf16 autocast,
#                  channels_last, inference and training step, eager vs pyfast, each also replayed from a CUDA
#                  graph; no torch.compile (a later call's job)
#   pack     15 s  the summary, and the call's Triton cache packed for the next call
# Triton autotuning is bounded to one config per kernel (PYFAST_TRITON_AUTOTUNE=0; PYFAST_CHECK_AUTOTUNE=1
# for the full lists). The GPU test grids are a later call's job, trimmed to one shape per kernel path:
#   PYFAST_TRITON_AUTOTUNE=0 python3 -m pytest -m gpu -p pyfast.benchmarks.gpu_selection -q tests
#
# What comes back ($OUT, at most 8 files, each result stamped with device, versions and date): summary.txt
# (the plan, each step's verdict, the smoke's verdicts, the short tables), run.log, smoke.json, kernels.json,
# auto_table.json, bench.json, bench.png, triton-cache.tar.gz.
#
# No build and no cold Triton compile on the device. `--prepare` runs on a CPU machine whose Python has the
# device's stack (Python 3.12, torch 2.11.0 CUDA 13.0, triton 3.6.0; nvcc 13.0), e.g. a venv made with
#   python3.12 -m venv /tmp/gpu312 && /tmp/gpu312/bin/pip install torch==2.11.0 triton==3.6.0 numpy setuptools \
#       ninja --index-url https://download.pytorch.org/whl/cu130 --extra-index-url https://pypi.org/simple
#   PYTHON=/tmp/gpu312/bin/python bash benchmarks/gpu_check.sh --prepare
# and fills .gpu/ (add `/.gpu/` to .git/info/exclude; the device tool's `carry` takes it, 64 MiB at most):
#   .gpu/pyfast/_C.*.so, .gpu/pyfast/_build_info.py   the extension, CUDA kernels for sm_90 (TORCH_CUDA_ARCH_LIST
#                                   9.0), built in a copy of the tree so the checkout's own build stays (~6 MB);
#   .gpu/triton-cache/             every Triton convolution launch of a RegNetX-32 and a ResNet-50 training step
#                                   compiled for sm_90 (`python -m pyfast.benchmarks.kernels --static`) at
#                                   /tmp/pyfast-triton-cache, the path the call copies it to (Triton's cache names
#                                   its files by absolute path), packed (benchmarks/triton_cache.py: binaries and
#                                   metadata, no IRs: 4 MB for its 20 kernels). 7 minutes on 2 busy cores.
# After a call, put its cache in .gpu/ for the next one (it holds every kernel the call launched):
#   rm -rf .gpu/triton-cache && python -m pyfast.benchmarks.triton_cache unpack FILES_AT/triton-cache.tar.gz \
#       .gpu/triton-cache
# The BN kernels and the smoke's shapes are not precompiled: the first call compiles them (a smoke check the time
# limit cuts is listed as skipped, not failed), and its pack covers them for a rerun. Whether the device's Triton
# finds the precompiled entries (the same Triton, ptxas and options give the same keys) is not yet seen on a
# device: the summary says how many kernels the call found in the cache and how many it compiled. Without .gpu/
# the call still runs, with cold compiles and the cuda backend failing the smoke as unavailable.
# Knobs: PYFAST_CHECK_BUDGET (seconds, default 360), PYTHON.
set -u
cd "$(dirname "$0")/.."
MODE=run
case ${1:-} in
    "") ;;
    --dry-run) MODE=dry ;;
    --prepare) MODE=prepare ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run | --prepare]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=1
export PYFAST_TRITON_AUTOTUNE=${PYFAST_CHECK_AUTOTUNE:-0}
CACHE=/tmp/pyfast-triton-cache  # pyfast.benchmarks.triton_cache.CACHE_PATH

# -- --prepare: the extension and the Triton cache the call carries, made on a CPU machine ---------------------
if [[ $MODE == prepare ]]; then
    set -e
    copy=$(mktemp -d)
    git ls-files -co --exclude-standard -z | tar --null -T - -c | tar -x -C "$copy"
    ln -sfn ../kernels "$copy/pyfast/kernels" && ln -sfn ../benchmarks "$copy/pyfast/benchmarks"
    (cd "$copy" && TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-2} $PY setup.py -q build_ext --inplace)
    mkdir -p .gpu/pyfast
    cp "$copy"/pyfast/_C.*.so "$copy/pyfast/_build_info.py" .gpu/pyfast/
    strip --strip-debug .gpu/pyfast/_C.*.so  # Python's CFLAGS say -g: 51 MB with, 6 MB without (carry: 64 MiB)
    rm -rf "$CACHE" && mkdir -p "$CACHE"
    (cd "$copy" && env -u TRITON_INTERPRET TRITON_CACHE_DIR="$CACHE" PYTHONPATH="$copy" \
        $PY -m pyfast.benchmarks.kernels --static --nets regnetx_32 resnet50)
    rm -rf .gpu/triton-cache
    PYTHONPATH="$copy" $PY -m pyfast.benchmarks.triton_cache pack "$CACHE" "$copy/triton-cache.tar.gz"
    PYTHONPATH="$copy" $PY -m pyfast.benchmarks.triton_cache unpack "$copy/triton-cache.tar.gz" .gpu/triton-cache
    rm -rf "$copy"
    echo "prepared .gpu/ ($(du -sh .gpu | cut -f1)): carry it with the call"
    exit 0
fi

DRY=0
[[ $MODE == dry ]] && DRY=1
OUT=${OUT:-/tmp/pyfast-gpu-check}
mkdir -p "$OUT"
LOG="$OUT/run.log"
: >"$LOG"
GPU_BUDGET=${PYFAST_CHECK_BUDGET:-360}
BUDGET=$GPU_BUDGET
if (( DRY )); then
    export CUDA_VISIBLE_DEVICES=""
    BUDGET=240  # tiny shapes on the CPU: every step, a fraction of the time
fi
STATUS=()
# A kill leaves no half-written JSON (results.write_json writes NAME.tmp, then renames it).
trap 'rm -f "$OUT"/*.tmp' EXIT

left() { echo $((BUDGET - SECONDS)); }

# step NAME LIMIT CMD...: runs CMD for at most LIMIT seconds (never past the budget) with SIGINT, so that the
# benchmarks stop cleanly and print what they have, then SIGKILL 10 s later; appends its output to run.log and
# remembers "NAME: verdict (rc, seconds)".
step() {
    local name=$1 limit=$2
    shift 2
    local cap=$(( $(left) - 10 ))
    (( limit > cap )) && limit=$cap
    if (( limit < 5 )); then
        STATUS+=("$name: not run (budget spent)")
        return
    fi
    local t0=$SECONDS mark
    mark=$(wc -l <"$LOG")
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    timeout -s INT -k 10 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    tail -n +"$((mark + 2))" "$LOG" | tail -n 12
    local verdict="ok"
    (( rc == 124 || rc == 137 )) && verdict="TIMED OUT"
    (( rc != 0 && rc != 124 && rc != 137 )) && verdict="FAILED"
    STATUS+=("$name: $verdict (rc $rc, $((SECONDS - t0)) s)")
}

# The plan: each step's limit in seconds, in order (correctness first).
PLAN=(setup:20 smoke:70 kernels:110 table:10 bench:rest pack:15)
limit_of() { local s; for s in "${PLAN[@]}"; do [[ ${s%%:*} == "$1" ]] && echo "${s#*:}"; done; }
{
    echo "=== pyfast GPU check: one call, planned ${GPU_BUDGET} s on the GPU (+ ~90 s machine start, twice in a" \
        "session's 15 minutes); steps in order, limits in s: ${PLAN[*]}"
    (( DRY )) && echo "=== dry run on the CPU, tiny shapes, budget ${BUDGET} s"
} | tee -a "$LOG"

# -- setup: the carried build (a dry run uses the installed one) and the Triton cache -----------------------
if (( ! DRY )); then
    if ls .gpu/pyfast/_C.*.so >/dev/null 2>&1; then
        cp .gpu/pyfast/_C.*.so .gpu/pyfast/_build_info.py pyfast/
        SETUP_NOTE="the carried extension (.gpu/pyfast)"
    else
        SETUP_NOTE="no carried extension (.gpu/pyfast): no cuda backend; see --prepare"
    fi
    # the package as an editable install maps it, without pip: pyfast.kernels and pyfast.benchmarks
    ln -sfn ../kernels pyfast/kernels && ln -sfn ../benchmarks pyfast/benchmarks
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    [ -d .gpu/triton-cache ] && mkdir -p "$CACHE" && cp -r .gpu/triton-cache/. "$CACHE"/
    export TRITON_CACHE_DIR=$CACHE
else
    SETUP_NOTE="dry run: the installed pyfast"
    export TRITON_CACHE_DIR=$(mktemp -d)  # nothing compiles on the CPU: an empty cache to pack
fi
cached_kernels() { find "$TRITON_CACHE_DIR" -name '__grp__*' 2>/dev/null | wc -l; }  # one group file per kernel
CACHED_BEFORE=$(cached_kernels)
echo "=== setup: $SETUP_NOTE; Triton cache $TRITON_CACHE_DIR with $CACHED_BEFORE kernels" | tee -a "$LOG"
if (( ! DRY )); then
    QUERY=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,power.limit,driver_version
    nvidia-smi --query-gpu=$QUERY --format=csv >>"$LOG" 2>&1
fi
step setup "$(limit_of setup)" $PY -m pyfast info

# -- smoke: correctness before any timing; the backends that pass go on --------------------------------------
SMOKE=(--out "$OUT/smoke.json" --time-limit $(( $(limit_of smoke) - 15 )))
(( DRY )) && SMOKE+=(--tiny)
step smoke "$(limit_of smoke)" $PY -m pyfast.benchmarks.gpu_smoke "${SMOKE[@]}"
PASSED=$($PY -m pyfast.benchmarks.gpu_smoke --passed "$OUT/smoke.json")
echo "=== backends that passed the smoke: ${PASSED:-none}" | tee -a "$LOG"
# the model report runs on what passed: auto between cuda and triton when both did
case " $PASSED " in
    *" cuda "*" triton "* | *" triton "*" cuda "*) export PYFAST_BACKEND=auto ;;
    *" cuda "*) export PYFAST_BACKEND=cuda ;;
    *" triton "*) export PYFAST_BACKEND=triton ;;
    *" cpu "*) export PYFAST_BACKEND=auto ;;
    *) export PYFAST_BACKEND=reference ;;
esac

# -- per-kernel timings, then auto's table from them ---------------------------------------------------------
if (( DRY )); then
    SIZE=(--batch-size 2 --image-size 32 --repeats 2 --nets regnetx_32 --ops conv_bn_relu add_relu --dtype fp32)
else
    SIZE=(--batch-size 128 --image-size 224 --repeats 20 --dtype bf16)
fi
KLIMIT=$(limit_of kernels)
step kernels "$KLIMIT" $PY -m pyfast.benchmarks.kernels "${SIZE[@]}" --layout channels_last \
    --modes inference train_step --backends $PASSED --time-limit $((KLIMIT - 25)) --out "$OUT/kernels.json"
if [ -f "$OUT/kernels.json" ]; then
    step table "$(limit_of table)" $PY -m pyfast.benchmarks.backend_table "$OUT/kernels.json" \
        --note "PYFAST_TRITON_AUTOTUNE=$PYFAST_TRITON_AUTOTUNE; backends that passed the smoke: ${PASSED:-none}" \
        --out "$OUT/auto_table.json"
    # the model report below runs with the measured choices (never in a dry run: CI's copy is the repo's)
    (( ! DRY )) && [ -f "$OUT/auto_table.json" ] && cp "$OUT/auto_table.json" pyfast/ops/backends/auto_table.json
fi

# -- the model report, no torch.compile; configurations not started before the time limit are listed as skipped
if (( DRY )); then
    BENCH=(--models regnetx_32 --batch-size 2 --image-size 32 --repeats 2 --device cpu)
else
    BENCH=(--models regnetx_32 resnet50 --batch-size 128 --image-size 224 --repeats 20 --dtype bf16)
fi
BLIMIT=$(( $(left) - $(limit_of pack) - 10 ))
step bench "$BLIMIT" $PY -m pyfast bench "${BENCH[@]}" --no-compile --cuda-graphs --layout channels_last \
    --modes inference train_step --time-limit $((BLIMIT * 3 / 5)) --out "$OUT/bench.json"

# -- pack: the Triton cache for the next call, then the summary (most important last) -------------------------
CACHED_AFTER=$(cached_kernels)
step pack "$(limit_of pack)" $PY -m pyfast.benchmarks.triton_cache pack "$TRITON_CACHE_DIR" \
    "$OUT/triton-cache.tar.gz"
PACKED_MB=$(( $(stat -c %s "$OUT/triton-cache.tar.gz" 2>/dev/null || echo 0) / 1048576 ))
(( DRY )) && rm -rf "$TRITON_CACHE_DIR"
{
    echo "=== pyfast GPU check: plan (s) ${PLAN[*]} of ${GPU_BUDGET}"
    $PY -m pyfast.benchmarks.gpu_smoke --stamp
    echo "setup: $SETUP_NOTE; Triton cache: $CACHED_BEFORE kernels carried," \
        "$((CACHED_AFTER - CACHED_BEFORE)) compiled in this call, packed in $PACKED_MB MiB (over 16 stays behind)"
    grep -hE "^smoke: " "$LOG" | tail -n 1
    echo "backends that passed the smoke: ${PASSED:-none}; the model report's PYFAST_BACKEND=$PYFAST_BACKEND"
    [ -f "$OUT/kernels.json" ] && timeout 30 $PY -m pyfast.benchmarks.results --short "$OUT/kernels.json"
    [ -f "$OUT/auto_table.json" ] && echo "auto's table: commit $OUT/auto_table.json as pyfast/ops/backends/"
    [ -f "$OUT/bench.json" ] && timeout 60 $PY -m pyfast.benchmarks.results "$OUT/bench.json"
    grep -h "^error:" "$LOG" 2>/dev/null | head -n 10
    echo "=== pyfast GPU check: $(date -u +%FT%TZ), ${SECONDS} s of ${BUDGET} s"
    for line in "${STATUS[@]}"; do echo "  $line"; done
} >"$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
