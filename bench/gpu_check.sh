#!/usr/bin/env bash
# GPU check of umm's generation back ends (issue 15): PyTorch (loop, hf) against vLLM, on one GPU.
#
#   bash bench/gpu_check.sh                       # from the repository root, on a machine with an NVIDIA GPU
#   WORK=/tmp/gc LIMIT=128 BACKENDS="loop vllm" bash bench/gpu_check.sh
#   WHEELS=/mnt/wheels bash bench/gpu_check.sh    # offline: install from a folder of wheels (pip --no-index)
#   SKIP_INSTALL=1 bash bench/gpu_check.sh        # use the python on PATH as it is
#
# Steps (each under `timeout STEP_LIMIT`; its wall seconds go to $WORK/timings.jsonl):
#   1. install: a virtual environment in $WORK/venv with torch (CUDA build) and `umm[vllm,test]`;
#   2. build the tiny expert suite on the GPU (umm experts prepare --variant full --device cuda);
#   3. `umm eval` of the math expert with each back end on the same test items;
#   4. a short `umm evolve` (task arithmetic over math + code, 13 candidates) with each back end;
#   5. bench/gpu_report.py (items/s, seconds per candidate and agreement of the answers, into
#      $WORK/report.txt), then the tests of tests/test_eval_backends.py, the vLLM ones included.
# Settings (environment): WORK (default bench/out/gpu_check), STEP_LIMIT (seconds, default 1800),
# LIMIT (test items per task, default 256), DTYPE (default bfloat16: both back ends run it),
# BACKENDS (default "loop hf vllm"; the first is the reference), TORCH_INDEX (torch's wheel index,
# default CUDA 12.8), PYTHON (the interpreter that makes the venv, default python3).
# A dry run of the flow without a GPU: SKIP_INSTALL=1 DEVICE=cpu VARIANT=small BACKENDS="loop hf" LIMIT=8.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
WORK=$(mkdir -p "${WORK:-$ROOT/bench/out/gpu_check}" && cd "${WORK:-$ROOT/bench/out/gpu_check}" && pwd)
STEP_LIMIT=${STEP_LIMIT:-1800}
LIMIT=${LIMIT:-256}
DTYPE=${DTYPE:-bfloat16}
BACKENDS=${BACKENDS:-"loop hf vllm"}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cu128}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
VARIANT=${VARIANT:-full}
TASKS=synth-math,synth-list,synth-code

export UMM_HOME="$WORK/umm-home"   # the suite and caches stay inside the work folder
export UMM_NO_PROGRESS=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
TIMINGS="$WORK/timings.jsonl"
: > "$TIMINGS"

# step NAME COMMAND...: run COMMAND under the time limit, record its wall seconds, stop on failure
step() {
    local name=$1 start end rc
    shift
    echo "== $name (at most ${STEP_LIMIT}s): $*"
    start=$(date +%s.%N)
    rc=0
    timeout --kill-after=30 "$STEP_LIMIT" "$@" || rc=$?
    end=$(date +%s.%N)
    printf '{"step": "%s", "seconds": %s, "rc": %d}\n' "$name" "$(awk "BEGIN { print $end - $start }")" "$rc" >> "$TIMINGS"
    if [ "$rc" -ne 0 ]; then
        echo "== $name FAILED (exit $rc; 124 = over the time limit)" >&2
        exit "$rc"
    fi
    echo "== $name done"
}

# 1. install ------------------------------------------------------------------------------------
if [ "${SKIP_INSTALL:-0}" = "1" ]; then
    PY=$(command -v python) || { echo "no python on PATH" >&2; exit 1; }
    UMM=$(command -v umm) || { echo "no umm on PATH (pip install -e '.[vllm,test]')" >&2; exit 1; }
else
    step venv "$PYTHON" -m venv "$WORK/venv"
    PY="$WORK/venv/bin/python"
    if [ -n "${WHEELS:-}" ]; then
        # the folder holds every wheel needed, setuptools and wheel included (umm is built from source)
        step install "$PY" -m pip install --no-index --find-links "$WHEELS" torch -e "$ROOT[vllm,test]"
    else
        step install-torch "$PY" -m pip install --index-url "$TORCH_INDEX" torch
        # vllm pins the torch it was built for: pip replaces the one above if it differs
        step install-umm "$PY" -m pip install -e "$ROOT[vllm,test]"
    fi
    UMM="$WORK/venv/bin/umm"
fi
if [ "$DEVICE" = "cpu" ]; then
    DEVICE_NAME="CPU (dry run)"
else
    step check-gpu "$PY" -c "import torch, vllm; assert torch.cuda.is_available(), 'no CUDA GPU'; \
print(torch.cuda.get_device_name(0), 'torch', torch.__version__, 'vllm', vllm.__version__)"
    DEVICE_NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")
fi

# 2. the expert suite -----------------------------------------------------------------------------
step suite "$UMM" experts prepare --variant "$VARIANT" --device "$DEVICE"
MATH=$("$PY" -c "from umm.experts.build import load_suite; print(load_suite('$VARIANT').path('math'))")

# 3. umm eval, each back end, same items ----------------------------------------------------------
for b in $BACKENDS; do
    step "eval-$b" "$UMM" eval "$MATH" --task "$TASKS" --split test --limit "$LIMIT" --seed 0 \
        --device "$DEVICE" --dtype "$DTYPE" --backend "$b" \
        --output "$WORK/eval-$b.json" --samples "$WORK/samples-$b.jsonl"
done

# 4. a short search, each back end ----------------------------------------------------------------
CONFIG="$WORK/evolve.yaml"
cat > "$CONFIG" <<EOF
models: [suite:$VARIANT/math, suite:$VARIANT/code]
base_model: suite:$VARIANT/base
method: task_arithmetic
tasks:
  - {name: synth-math, search_size: 64}
  - {name: synth-code, search_size: 64}
population: 4
budget: {evaluations: 13}
seed: 0
device: $DEVICE
dtype: $DTYPE
compare: false
write_model: false
baselines: []
EOF
for b in $BACKENDS; do
    rm -rf "$WORK/evolve-$b"
    step "evolve-$b" "$UMM" evolve "$CONFIG" --run-dir "$WORK/evolve-$b" --backend "$b"
done

# 5. the report, then the vLLM tests ---------------------------------------------------------------
report_rc=0
# shellcheck disable=SC2086  # BACKENDS is a list of words
"$PY" bench/gpu_report.py "$WORK" --backends $BACKENDS --device-name "$DEVICE_NAME" \
    | tee "$WORK/report.txt" || report_rc=$?   # 1: a back end left no output; the tests still run
step tests "$PY" -m pytest -q -rs tests/test_eval_backends.py
exit "$report_rc"
