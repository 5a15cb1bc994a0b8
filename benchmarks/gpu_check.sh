#!/usr/bin/env bash
# The GPU check, in two device calls planned for 12 minutes together (from the repository root):
#
#   bash benchmarks/gpu_check.sh 1   results first, <= 7 min: build; per-kernel table of RegNetX-32's and
#                                    ResNet-50's layers (bf16, channels_last, batch 128) on every backend,
#                                    auto's table from it; the model report for regnetx_32 (1x224x224) and
#                                    resnet50 (3x224x224), batch 128, bf16 autocast, channels_last,
#                                    inference and training step, eager vs torch.compile vs pyfast, with
#                                    peak memory, and eager vs pyfast with each step replayed from a CUDA graph
#   bash benchmarks/gpu_check.sh 2   <= 5 min: the GPU correctness tests, one shape per kernel path and
#                                    dtype (benchmarks/gpu_selection.py), under `timeout -s INT` so that
#                                    pytest prints its summary
#   bash benchmarks/gpu_check.sh 1 --dry-run   (or 2) every step on the CPU with tiny shapes, printing
#                                    the planned budget; CI runs it (tests/benchmarks/test_gpu_check.py)
#
# Results land in $OUT (default /tmp/pyfast-gpu-check), at most 8 flat files per call:
#   call 1: setup.log kernels.log kernels.json auto_table.json bench.log bench.json bench.png summary.txt
#   call 2: setup.log tests.log summary.txt
# After call 1, commit $OUT/auto_table.json as pyfast/ops/backends/auto_table.json (call 1 already
# installs it in the device's copy, so its model report runs with the measured choices).
# Every step has its own time limit and the script goes on past a failing step. Triton autotuning is
# bounded: one config per kernel (PYFAST_TRITON_AUTOTUNE=0, or PYFAST_CHECK_AUTOTUNE=1 for the full
# lists), so that the numbers arrive within the call. Knobs: PYFAST_CHECK_BUDGET (seconds, default 400
# for call 1 and 280 for call 2), MAX_JOBS, PYTHON.
set -u
cd "$(dirname "$0")/.."
CALL=${1:-}
DRY=0
[[ ${2:-} == --dry-run ]] && DRY=1
if [[ $CALL != 1 && $CALL != 2 ]]; then
    echo "usage: bash benchmarks/gpu_check.sh 1|2 [--dry-run]" >&2
    exit 2
fi
OUT=${OUT:-/tmp/pyfast-gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TRITON_CACHE_AUTOTUNING=1
export PYFAST_TRITON_AUTOTUNE=${PYFAST_CHECK_AUTOTUNE:-0}
# The image's /usr/local/bin/nvcc is a wrapper script: name the toolkit it runs (setup.py finds it too).
[[ -z ${CUDA_HOME:-} && -x /usr/local/cuda/bin/nvcc ]] && export CUDA_HOME=/usr/local/cuda
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # the H200: sm_90 only, the shortest build
GPU_BUDGET=${PYFAST_CHECK_BUDGET:-$([[ $CALL == 1 ]] && echo 400 || echo 280)}
BUDGET=$GPU_BUDGET
if (( DRY )); then
    export CUDA_VISIBLE_DEVICES=""
    BUDGET=240  # tiny shapes on the CPU: every step, a fraction of the time
fi
STATUS=()
# A kill leaves no half-written JSON (results.write_json writes NAME.tmp, then renames it).
trap 'rm -f "$OUT"/*.tmp' EXIT

left() { echo $((BUDGET - SECONDS)); }

# step NAME LOG LIMIT CMD...: runs CMD for at most LIMIT seconds (never past the budget) with SIGINT, so
# that pytest and the benchmarks stop cleanly and print what they have, then SIGKILL 10 s later; appends
# its output to LOG and remembers "NAME: verdict (rc, seconds)".
step() {
    local name=$1 log=$2 limit=$3
    shift 3
    local cap=$(( $(left) - 10 ))
    (( limit > cap )) && limit=$cap
    if (( limit < 5 )); then
        STATUS+=("$name: not run (budget spent)")
        return
    fi
    local t0=$SECONDS
    echo "=== $name (limit ${limit}s): $*" | tee -a "$log"
    timeout -s INT -k 10 "$limit" "$@" >>"$log" 2>&1
    local rc=$?
    tail -n 15 "$log"
    local verdict="ok"
    (( rc == 124 || rc == 137 )) && verdict="TIMED OUT"
    (( rc != 0 && rc != 124 && rc != 137 )) && verdict="FAILED"
    STATUS+=("$name: $verdict (rc $rc, $((SECONDS - t0)) s)")
}

# The plan: each step's limit in seconds (a step's limit is also cut to what is left of the budget).
if [[ $CALL == 1 ]]; then
    PLAN=(build:150 machine:20 kernels:100 table:15 bench:rest)
else
    PLAN=(build:150 machine:20 tests:rest)
fi
limit_of() { local s; for s in "${PLAN[@]}"; do [[ ${s%%:*} == "$1" ]] && echo "${s#*:}"; done; }
{
    echo "=== pyfast GPU check, call $CALL: planned budget on the GPU ${GPU_BUDGET} s (call 1 400 + call 2 280 +" \
        "machine start ~90 = ~13 of the lease's 15 minutes); step limits in s: ${PLAN[*]}"
    (( DRY )) && echo "=== dry run on the CPU, tiny shapes, budget ${BUDGET} s"
} | tee "$OUT/setup.log"

# -- build and the machine's record (both calls; a warm machine keeps the build of the call before) -----
built_with_cuda() { $PY -c "from pyfast import _extension as e; raise SystemExit(not e.built_with_cuda())" 2>/dev/null; }
if (( DRY )); then
    step build "$OUT/setup.log" 60 $PY -c "import pyfast, pyfast._C, pyfast.benchmarks"
elif built_with_cuda; then
    STATUS+=("build: already built with CUDA (a warm machine)")
else
    step build "$OUT/setup.log" "$(limit_of build)" $PY -m pip install --no-build-isolation --no-deps --no-index -e .
    if ! built_with_cuda; then
        # without the CUDA kernels the Triton and reference backends still run: keep the timings coming
        PYFAST_NO_CUDA=1 step build-without-cuda "$OUT/setup.log" 100 \
            $PY -m pip install --no-build-isolation --no-deps --no-index -e .
    fi
fi
if (( ! DRY )); then
    step nvidia-smi "$OUT/setup.log" 20 nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,power.limit,driver_version --format=csv
fi
step info "$OUT/setup.log" "$(limit_of machine)" $PY -m pyfast info

if [[ $CALL == 1 ]]; then
    # -- per-kernel timings, then auto's table from them ------------------------------------------------
    if (( DRY )); then
        SIZE=(--batch-size 2 --image-size 32 --repeats 2 --nets regnetx_32 --ops conv_bn_relu add_relu --dtype fp32)
    else
        SIZE=(--batch-size 128 --image-size 224 --repeats 20 --dtype bf16)
    fi
    KLIMIT=$(limit_of kernels)
    step kernels "$OUT/kernels.log" $((KLIMIT + 30)) $PY -m pyfast.benchmarks.kernels "${SIZE[@]}" \
        --layout channels_last --modes inference train_step --time-limit "$KLIMIT" --out "$OUT/kernels.json"
    if [ -f "$OUT/kernels.json" ]; then
        step table "$OUT/kernels.log" "$(limit_of table)" $PY -m pyfast.benchmarks.backend_table "$OUT/kernels.json" \
            --note "PYFAST_TRITON_AUTOTUNE=$PYFAST_TRITON_AUTOTUNE" --out "$OUT/auto_table.json"
        # the model report below runs with the measured choices (never in a dry run: CI's copy is the repo's)
        (( ! DRY )) && [ -f "$OUT/auto_table.json" ] && cp "$OUT/auto_table.json" pyfast/ops/backends/auto_table.json
    fi

    # -- the model report: configurations not started before the time limit are listed as skipped; the
    # JSON is rewritten after every row
    if (( DRY )); then
        BENCH=(--models regnetx_32 --batch-size 2 --image-size 32 --repeats 2 --no-compile --device cpu --cuda-graphs)
    else
        BENCH=(--models regnetx_32 resnet50 --batch-size 128 --image-size 224 --repeats 20 --dtype bf16
               --compile-models regnetx_32 resnet50 --cuda-graphs)
    fi
    BLIMIT=$(( $(left) - 30 ))
    step bench "$OUT/bench.log" $((BLIMIT + 15)) $PY -m pyfast bench "${BENCH[@]}" --layout channels_last \
        --modes inference train_step --time-limit $((BLIMIT * 3 / 5)) --out "$OUT/bench.json"
else
    # -- the GPU correctness tests, trimmed (on the CPU: their selection is collected and counted) ----------
    SELECT=(-m gpu -p pyfast.benchmarks.gpu_selection -p no:cacheprovider -q -rfE tests)
    if (( DRY )); then
        step tests "$OUT/tests.log" 120 $PY -m pytest --collect-only "${SELECT[@]}"
    else
        TIMEOUT_ARGS=()
        $PY -c "import pytest_timeout" 2>/dev/null && TIMEOUT_ARGS=(--timeout 60)
        step tests "$OUT/tests.log" $(( $(left) - 15 )) $PY -m pytest "${SELECT[@]}" \
            ${TIMEOUT_ARGS[@]+"${TIMEOUT_ARGS[@]}"}
    fi
fi

# -- summary, most important last (the tail of the output shows the steps, the tests and the tables) -------
{
    [ -f "$OUT/kernels.json" ] && timeout 30 $PY -m pyfast.benchmarks.results --short "$OUT/kernels.json"
    [ -f "$OUT/auto_table.json" ] && echo "auto's table: $OUT/auto_table.json (commit it as pyfast/ops/backends/auto_table.json)"
    [ -f "$OUT/bench.json" ] && timeout 60 $PY -m pyfast.benchmarks.results "$OUT/bench.json"
    grep -h "^error:" "$OUT/bench.log" 2>/dev/null | head -n 10
    grep -hE "^(FAILED|ERROR) |[0-9]+ (passed|failed|skipped|deselected|errors?|tests? collected)\b" \
        "$OUT/tests.log" 2>/dev/null | tail -n 15
    echo "=== pyfast GPU check, call $CALL: $(date -u +%FT%TZ), ${SECONDS} s of ${BUDGET} s"
    for line in "${STATUS[@]}"; do echo "  $line"; done
} >"$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
