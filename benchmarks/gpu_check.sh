#!/usr/bin/env bash
# The one script a GPU session runs, in one device call of under 10 minutes: build pyfast with its CUDA
# extension, record the machine, run the GPU tests, time every op's kernels on the RegNetX-32 and
# ResNet-50 stage shapes, then `python -m pyfast bench` at full size; a short summary comes last.
#
#   bash benchmarks/gpu_check.sh            (from the repository root; results land in $OUT)
#
# Every step runs under its own time limit and the script goes on past a failing step, so a failing
# test never costs the timings. $OUT receives at most 8 flat files: setup.log, tests.log, kernels.log,
# kernels.json, bench.log, bench.json, bench.png, summary.txt.
# Knobs (environment): PYFAST_CHECK_BUDGET (seconds for the whole script, default 560),
# PYFAST_CHECK_STEPS (default "build tests kernels bench"; e.g. "build bench" for a second call that
# gives the model report all the time), PYFAST_CHECK_BENCH_ARGS (replaces the bench step's
# model/mode selection), PYFAST_CHECK_KERNEL_ARGS (extra arguments for the kernels step).
# Triton's autotuning results are cached on disk (TRITON_CACHE_AUTOTUNING=1), so the bench step reuses
# what the kernels step tuned for the same shapes.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pyfast-gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET=${PYFAST_CHECK_BUDGET:-560}
STEPS=" ${PYFAST_CHECK_STEPS:-build tests kernels bench} "
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TRITON_CACHE_AUTOTUNING=1
STATUS=()

wanted() { [[ $STEPS == *" $1 "* ]]; }

left() { echo $((BUDGET - SECONDS)); }

# step NAME LOG LIMIT CMD...: runs CMD with at most LIMIT seconds (and never past the budget), appends
# its output to LOG and remembers "NAME rc seconds".
step() {
    local name=$1 log=$2 limit=$3
    shift 3
    local cap=$(( $(left) - 15 ))
    (( limit > cap )) && limit=$cap
    if (( limit < 10 )); then
        STATUS+=("$name: not run (budget spent)")
        return
    fi
    local t0=$SECONDS
    echo "=== $name (limit ${limit}s): $*" | tee -a "$log"
    timeout -k 10 "$limit" "$@" >>"$log" 2>&1
    local rc=$?
    tail -n 25 "$log"
    local verdict="ok"
    (( rc == 124 || rc == 137 )) && verdict="TIMED OUT"
    (( rc != 0 && rc != 124 && rc != 137 )) && verdict="FAILED"
    STATUS+=("$name: $verdict (rc $rc, $((SECONDS - t0)) s)")
}

# 1. build + machine record
if wanted build; then
    step build "$OUT/setup.log" 240 $PY -m pip install --no-build-isolation --no-deps --no-index -e .
    if ! $PY -c "import pyfast.benchmarks, pyfast._C" >>"$OUT/setup.log" 2>&1; then
        # without the extension the Triton and reference backends still run: keep the timings coming
        PYFAST_NO_EXTENSION=1 step build-without-extension "$OUT/setup.log" 120 \
            $PY -m pip install --no-build-isolation --no-deps --no-index -e .
    fi
fi
step nvidia-smi "$OUT/setup.log" 20 nvidia-smi
step gpu-state "$OUT/setup.log" 20 nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,power.limit --format=csv
step info "$OUT/setup.log" 30 $PY -m pyfast info

# 2. tests: every gpu-marked test, then a smoke run of the pytest-benchmark suites on the GPU
TIMEOUT_ARGS=()
$PY -c "import pytest_timeout" 2>/dev/null && TIMEOUT_ARGS=(--timeout 90)
# One Triton config per kernel in the tests (PYFAST_TRITON_AUTOTUNE=0): correctness does not need the
# tuning, and tuning every test shape would eat the step's time.
wanted tests && PYFAST_TRITON_AUTOTUNE=0 step tests-gpu "$OUT/tests.log" 150 $PY -m pytest -q -m gpu tests \
    -p no:cacheprovider -rfE \
    ${TIMEOUT_ARGS[@]+"${TIMEOUT_ARGS[@]}"}
wanted tests && step bench-suites "$OUT/tests.log" 60 $PY -m pytest --benchmark -q -p no:cacheprovider \
    benchmarks/test_ops.py benchmarks/test_models.py \
    -k "(regnetx_32.s2 and add_relu and inference or regnetx_32 and in1 and train_step) and bf16 and channels_last and not compile" \
    --benchmark-columns=median,iqr,rounds

# 3. per-op kernel timings (bf16 first: under the time limit fp32 is what gives way)
KLIMIT=$(( $(left) * 2 / 5 ))
(( KLIMIT > 200 )) && KLIMIT=200
wanted kernels && step kernels "$OUT/kernels.log" $((KLIMIT + 30)) $PY -m pyfast.benchmarks.kernels --out "$OUT/kernels.json" \
    --time-limit "$KLIMIT" ${PYFAST_CHECK_KERNEL_ARGS:-}

# 4. the model report at full GPU size (batch 128, 224x224, bf16, channels_last); torch.compile for the
# first model only (its compilation costs about a minute per model and mode); configurations not started
# before the time limit are listed as skipped. The JSON is rewritten after every row.
BLIMIT=$(( $(left) - 40 ))
BENCH_ARGS=${PYFAST_CHECK_BENCH_ARGS:-"--models regnetx_32 resnet50 vionet_d deresnext resnet18 preact_resnet50 vionet_b regnetx_400mf resnet152 --compile-models regnetx_32 --modes train_step inference"}
# shellcheck disable=SC2086
wanted bench && step bench "$OUT/bench.log" $((BLIMIT + 20)) $PY -m pyfast bench $BENCH_ARGS --time-limit $((BLIMIT - 60)) \
    --out "$OUT/bench.json"

# 5. summary, most important last (a reader of the log's tail sees the steps, tests and model table);
# also redraws the PNG when the bench step was stopped before drawing it
{
    [ -f "$OUT/kernels.json" ] && timeout 60 $PY -m pyfast.benchmarks.results --short "$OUT/kernels.json"
    [ -f "$OUT/bench.json" ] && timeout 60 $PY -m pyfast.benchmarks.results "$OUT/bench.json"
    grep -h "^error:" "$OUT/bench.log" 2>/dev/null | head -n 10
    echo "=== pyfast GPU check: $(date -u +%FT%TZ), ${SECONDS} s"
    for line in "${STATUS[@]}"; do echo "  $line"; done
    grep -hE "^(FAILED|ERROR) |[0-9]+ (passed|failed|skipped|deselected|errors?)\b.* in [0-9.]+s" "$OUT/tests.log" \
        2>/dev/null | tail -n 15
} >"$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
