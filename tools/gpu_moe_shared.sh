#!/usr/bin/env bash
# GPU-box run for shared-expert MoE models (issue #15): the Qwen1.5-MoE-A2.7B-
# shaped synthetic (qwen2moe, 8.0 GiB: 60 routed experts, 4 used, a shared
# expert of 5632 in every layer's resident dense part) through the bench,
# against both stock recipes (-ngl N and -ngl all --n-cpu-moe N).
# Usage (from the repo root, after `source .device/setup.sh`):
#   bash tools/gpu_moe_shared.sh OUTDIR
# What decides: every streamed cell's gate "ok" (greedy tokens as stock's),
# peak VRAM <= budget in every cell, and the ratios "vs stock-moe"
# (issue #15's targets: pp >= 1.3x, tg >= 1.1x the better stock recipe).
# The GLM-4.5-Air shape (glm-4.5-air, 60 GiB) is left out: it does not fit
# the box's disk beside the other models.
set -uo pipefail
out=${1:?output directory}
export PYTHONUNBUFFERED=1
mkdir -p "$out" /tmp/m
nvidia-smi -L > "$out/device.txt"
python3 -m gguf_stream._build_native > "$out/build.log" 2>&1 || { tail "$out/build.log"; exit 1; }
model=/tmp/m/qwen1.5-moe-a2.7b.gguf
[ -f $model ] || python3 -m gguf_stream.synth $model --shape qwen1.5-moe-a2.7b --type Q4_K --seed 0 -q
python3 -m gguf_stream plan $model --vram-budget 4GiB -c 4096 -ub 2048 > "$out/plan_4GiB.txt" 2>&1
for ub in 2048 512; do
  budgets=all,0.5x,0.25x; extra=()
  [ "$ub" = 512 ] && { budgets=0.5x,0.25x; extra=(--no-ceiling); }
  python3 -m gguf_stream bench -m $model -p 2048 -n 128 -b "$ub" -ub "$ub" -r 2 \
    --allow-near-ties --output md --vram-budget "$budgets" ${extra[@]+"${extra[@]}"} \
    > "$out/bench_qwen2moe_ub$ub.md" 2> "$out/bench_qwen2moe_ub$ub.err"
  echo "bench qwen2moe ub=$ub rc=$?"; cat "$out/bench_qwen2moe_ub$ub.md"
done
