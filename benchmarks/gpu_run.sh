#!/usr/bin/env bash
# Issue 6, item 8: benchmarks 1-5 on a lent GPU, in one device call (see benchmarks/gpu_kit.py):
#
#   python -m benchmarks.gpu_kit                      # here, first: writes runs/gpu_kit/
#   run(command="bash benchmarks/gpu_run.sh", carry=["runs/gpu_kit"], timeout_s=560)
#
# Every result lands in $OUT/results and comes back as one archive, $OUT/gpu_results.tgz (the
# device tool returns at most 8 files), beside this script's log. Each benchmark has its own time
# cap, so one that hangs or fails costs its cap and the others still run (about 8 minutes in all).
# DEVICE, DTYPE and EXTRA override cuda / bf16 / nothing, e.g. a plumbing check on a CPU:
#
#   DEVICE=cpu DTYPE=fp32 EXTRA=--quick OUT=/tmp/gpu_check bash benchmarks/gpu_run.sh
set -u
KIT=${KIT:-runs/gpu_kit}
OUT=${OUT:?OUT must name the folder results go to (the device tool sets it)}
RESULTS=$OUT/results
mkdir -p "$RESULTS"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export BITFIT_BENCH_MINILM=$KIT/minilm-fp16
COMMON=(--device "${DEVICE:-cuda}" --dtype "${DTYPE:-bf16}" --suffix _gpu --glue-dir "$KIT/glue" --out "$RESULTS")
[ -n "${EXTRA:-}" ] && COMMON+=($EXTRA)

exec > >(tee "$OUT/gpu_run.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || echo "no nvidia-smi"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"

bench() {  # bench SECONDS MODULE [ARGS...]: ARGS come last, so they win over COMMON (e.g. --suffix)
    local cap=$1 module=$2
    shift 2
    echo "== $module $* ($(date -u +%T), cap ${cap}s)"
    timeout "$cap" python3 -m "$module" "${COMMON[@]}" "$@" || echo "!! $module $* failed or hit its cap (rc $?)"
}

bench 75 benchmarks.vs_hf
bench 75 benchmarks.vs_hf --model bert-base --suffix _bertbase_gpu --batch-sizes 8,32,128
bench 100 benchmarks.mixed_tasks
bench 75 benchmarks.vs_swap
bench 90 benchmarks.vs_lora
bench 100 benchmarks.memory
python3 -m benchmarks.summary --results "$RESULTS" --suffix _gpu | tee "$RESULTS/summary_gpu.md"
echo "== done ($(date -u +%T))"
tar czf "$OUT/gpu_results.tgz" -C "$OUT" results && rm -rf "$RESULTS"
