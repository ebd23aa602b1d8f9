#!/usr/bin/env bash
# Every GPU measurement of mone-serve in one run; tables, logs and a summary in one output folder.
#
#   scripts/gpu-bench.sh [OUT]                 # on a CUDA machine; at most BUDGET_S (480) seconds
#   scripts/gpu-bench.sh --tiny [OUT]          # the same steps end to end on the CPU: small shapes, short runs
#   STEPS="serve-s16 budget-s16" scripts/gpu-bench.sh [OUT]     # only these steps (e.g. to rerun one)
#
# Steps, most important first; each runs under its own time limit, cut to what is left of BUDGET_S (a step
# with under 30 s left does not start), and one that fails or runs out of time is recorded in the summary and
# the next one starts:
#   tests-cuda      the GPU paths' own tests on the device (captured forwards against eager, bf16 / fp16
#                   against fp32 on the CPU); they skip in --tiny mode
#   speed-bf16      bench.model_speed, S/16 and B/16 at 224 px, bf16, batches 1 8 64 256, capacities
#                   1.0/0.75/0.5/0.25, eager and captured (CUDA graphs); dense references: F.linear + SDPA,
#                   nn.TransformerEncoder, and F.linear + SDPA under torch.compile; peak GPU memory
#   serve-s16       bench.serve, a random S/16 at 224 px, bf16: mone-serve at capacities 1.0 and 0.5 against
#                   LitServe serving the same model on the same GPU, same client; the degrade run at 1.5x the
#                   dense saturation rate
#   budget-s16      bench.budget, the same S/16: throughput and p50/p99 at capacities 1.0/0.5/0.25
#   serve-shipped   bench.serve, the shipped checkpoint (checkpoints/default), against LitServe, with degrade
#   budget-shipped  bench.budget, the shipped checkpoint, images and clips, capacities 1.0/0.5/0.25
#   speed-fp32      bench.model_speed as speed-bf16 in fp32 (no compiled reference)
#
# OUT (default artifacts/gpu-bench-<UTC time>) gets env.txt (GPU, driver, torch), <step>.md (the step's
# tables), <step>.log (its whole output) and summary.md (env, each step's status and time, every table).
# PYTHON picks the interpreter (default .venv/bin/python, else python3); it needs torch with CUDA (full mode),
# the project's dependencies and LitServe (pip install -e '.[bench]').
set -uo pipefail
cd "$(dirname "$0")/.."

TINY=0
if [[ "${1:-}" == "--tiny" ]]; then
    TINY=1
    shift
fi
OUT=${1:-artifacts/gpu-bench-$(date -u +%Y%m%d-%H%M%S)}
PY=${PYTHON:-.venv/bin/python}
[[ -x "$PY" ]] || PY=python3
mkdir -p "$OUT"
DEADLINE=$((SECONDS + ${BUDGET_S:-480}))
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY="$OUT/summary.md"

{
    echo "# GPU measurements, $(date -u '+%Y-%m-%d %H:%M UTC')$([[ $TINY == 1 ]] && echo ' (tiny mode, CPU)')"
    echo
    echo '```'
    "$PY" -c "import platform, torch; print('torch', torch.__version__, 'python', platform.python_version()); print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '-')"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
    echo "CPUs: $(nproc)"
    echo '```'
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" > "$SUMMARY"

if [[ $TINY == 0 ]] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "CUDA is not available to $PY: run on a GPU machine, or --tiny for the CPU rehearsal" | tee -a "$SUMMARY"
    exit 2
fi

if [[ $TINY == 1 ]]; then
    # Same steps, CPU-sized: the 28 px Mi/4 for S/16 and B/16, a random Mi/4 for the random S/16, seconds
    # instead of tens of seconds.  bench.serve has no random model smaller than S/16, so serve-s16 is left
    # to serve-shipped, which runs the same code.
    SPEED_ARGS=(--device cpu --variants Mi/4 --batches 2 --repeats 2)
    SPEED_BF16=(--dtype bf16)
    SERVE_ARGS=(--seconds 1 --concurrency 1,4 --rounds 1 --round-batches 1 --batch 8 --memory-requests 50
        --memory-requests-large 50)
    SKIP=" serve-s16 "
    BUDGET_ARGS=(--rounds 1 --seconds 1 --one-seconds 1 --clients 4 --batch 8 --loadgen python)
    BUDGET_S16=(--variant Mi/4 --no-clips)
    DEADLINE=$((DEADLINE + 600))  # a loaded CPU is slow; the tiny run has no device time to save
    LIMITS=(120 120 120 120 120 120 120)
else
    SPEED_ARGS=(--device cuda --variants S/16 B/16 --batches 1 8 64 256 --repeats 5 --graphs)
    SPEED_BF16=(--dtype bf16 --compile)
    SERVE_ARGS=(--seconds 5 --concurrency 1,64,256 --rounds 2 --round-batches 8 --batch 64 --client-procs 4
        --memory-requests 2000 --memory-requests-large 2000)
    SKIP=""
    BUDGET_ARGS=(--rounds 1 --seconds 4 --one-seconds 2 --clients 64 --batch 64)
    BUDGET_S16=(--variant S/16 --no-clips)
    # tests-cuda, speed-bf16, serve-s16, budget-s16, serve-shipped, budget-shipped, speed-fp32
    LIMITS=(60 180 150 90 120 60 90)
fi
DTYPE=(--dtype bf16)
SERVER_DTYPE=(--server-arg "--inference-dtype bf16")

# step NAME LIMIT_S COMMAND...: run it, its output in NAME.log, the markdown parts of it in NAME.md.
step() {
    local name=$1 limit=$2
    shift 2
    if [[ -n "${STEPS:-}" && " $STEPS " != *" $name "* ]] || [[ "$SKIP" == *" $name "* ]]; then
        return
    fi
    local left=$((DEADLINE - SECONDS))
    if ((left < 30)); then
        printf '\n## %s: NOT RUN (BUDGET_S spent; rerun with STEPS="%s")\n' "$name" "$name" >> "$SUMMARY"
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $name: $*" >&2
    local start=$SECONDS rc
    timeout --signal=INT --kill-after=20 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    local took=$((SECONDS - start))
    # The tables and result lines: markdown rows, headings and bullets (bench.serve, bench.budget and
    # model_speed --markdown print them), pytest's outcomes, and the last lines of the log when it failed.
    # bench.serve streams its rows, then prints them again under a "## bench.serve" heading: keep the latter.
    local from
    from=$(grep -n '^## bench\.' "$OUT/$name.log" | tail -n 1 | cut -d: -f1)
    tail -n +"${from:-1}" "$OUT/$name.log" | grep -E '^(\||#|- |`bench|cost monotone|SKIPPED |FAILED |ERROR |[0-9]+ (passed|failed|skipped))' \
        > "$OUT/$name.md"
    {
        echo
        if [[ $rc == 0 ]]; then
            echo "## $name: done in ${took} s"
        elif [[ $rc == 1 ]] && grep -q '^cost monotone in the budget.*NO' "$OUT/$name.log"; then
            echo "## $name: done in ${took} s; cost NOT monotone in the budget (bench.budget exit 1)"
        elif [[ $rc == 124 || $rc == 137 ]]; then
            echo "## $name: STOPPED at its ${limit} s limit (partial tables below)"
        else
            echo "## $name: FAILED (exit $rc) after ${took} s; last lines of $name.log:"
            echo '```'
            tail -n 15 "$OUT/$name.log"
            echo '```'
        fi
        echo
        echo "\`$*\`"
        echo
        cat "$OUT/$name.md"
    } >> "$SUMMARY"
    echo "== $name: exit $rc after ${took} s" >&2
}

step tests-cuda "${LIMITS[0]}" "$PY" -m pytest -q -p no:cacheprovider -rs tests/server/test_cuda.py \
    tests/bench/test_model_speed.py::test_cuda_rows_with_graphs_and_peak_memory
step speed-bf16 "${LIMITS[1]}" "$PY" -m bench.model_speed "${SPEED_ARGS[@]}" "${SPEED_BF16[@]}" --markdown
step serve-s16 "${LIMITS[2]}" "$PY" -m bench.serve --models s16 "${SERVE_ARGS[@]}" "${DTYPE[@]}"
step budget-s16 "${LIMITS[3]}" "$PY" -m bench.budget "${BUDGET_S16[@]}" "${BUDGET_ARGS[@]}" "${SERVER_DTYPE[@]}"
step serve-shipped "${LIMITS[4]}" "$PY" -m bench.serve --models shipped "${SERVE_ARGS[@]}" "${DTYPE[@]}"
step budget-shipped "${LIMITS[5]}" "$PY" -m bench.budget "${BUDGET_ARGS[@]}" "${SERVER_DTYPE[@]}"
step speed-fp32 "${LIMITS[6]}" "$PY" -m bench.model_speed "${SPEED_ARGS[@]}" --dtype fp32 --markdown

echo "tables and logs in $OUT (summary: $SUMMARY)" >&2
