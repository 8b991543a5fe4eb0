#!/usr/bin/env bash
# The GPU-box session behind BENCHMARKS.md: build in place, write the
# synthetic 8B model, run the GPU tests, the engine acceptance check and the
# benchmark. Usage (from the repo root, after `source .device/setup.sh`):
#   bash tools/gpu_bench.sh OUTDIR [UBATCH ...]
set -uo pipefail
out=${1:?output directory}; shift
ubatches=${*:-2048}
export PYTHONUNBUFFERED=1
mkdir -p "$out" /tmp/m
nvidia-smi -L > "$out/device.txt"
python3 -m gguf_stream._build_native > "$out/build.log" 2>&1 || { tail "$out/build.log"; exit 1; }
model=/tmp/m/llama3-8b.gguf
[ -f $model ] || python3 -m gguf_stream.synth $model --shape llama3-8b --type Q4_K --seed 0 -q
for ub in $ubatches; do
  if [ "$ub" = check ]; then
    # pytest: an auto-loaded plugin there imports numpy before llama.cpp (see gguf_stream/__init__.py)
    PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_native*.py \
      > "$out/pytest_gpu.log" 2>&1; tail -3 "$out/pytest_gpu.log"
    python3 tools/gpu_check.py --model $model --min-streamed 8 --out "$out/gpu_check.json" 2>&1 \
      | grep -v -E "^(llama_|load|print_info|create_tensor|ggml_cuda|sched_|graph_|init_|set_|common|\.)" \
      | tee "$out/gpu_check.log" | tail -8
    continue
  fi
  if [ "$ub" = llama-bench ]; then
    llama-bench -m $model -fa 1 -ub 2048 -b 2048 -lm none -r 2 -ngl 99,14 -p 2048 -n 128 2>/dev/null \
      | tee "$out/llama-bench.md"
    continue
  fi
  plot=()  # bench refuses --plot up front without matplotlib: then the table alone
  python3 -c "import matplotlib" 2>/dev/null && plot=(--plot "$out/bench_ub$ub.png")
  python3 -m gguf_stream bench -m $model -p 2048 -n 128 -b "$ub" -ub "$ub" -r 2 \
    --vram-budget "${BUDGETS:-all,0.75x,0.5x,0.35x}" --allow-near-ties ${plot[@]+"${plot[@]}"} --output md \
    > "$out/bench_ub$ub.md" 2> "$out/bench_ub$ub.err"
  echo "bench ub=$ub rc=$?"; cat "$out/bench_ub$ub.md"
done
