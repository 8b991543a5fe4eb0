#!/usr/bin/env bash
# A/B on the GPU box of one CPU-layer option, on (1, the default) against off
# (0): --host-kv (their KV cache in host memory while generating) or
# --own-device (they count as CPU layers, so their norms run on the CPU).
# For each: llama.cpp's graph splits per token, per-layer times, and tg of
# the auto split next to stock -ngl, alternating on/off twice.
# Usage (repo root, after `source .device/setup.sh`):
#   bash tools/gpu_cpu_layer_ab.sh OUTDIR [--host-kv|--own-device [BUDGET [NGL]]]
set -uo pipefail
out=${1:?output directory}; knob=${2:---host-kv}; budget=${3:-3.16GiB}; ngl=${4:-14}
export PYTHONUNBUFFERED=1
mkdir -p "$out" /tmp/m
model=/tmp/m/llama3-8b.gguf
[ -f $model ] || python3 -m gguf_stream.synth $model --shape llama3-8b --type Q4_K --seed 0 -q
tag=${knob#--}
for v in 1 0; do
  timeout 120 python3 tools/probe.py sched $model --budget "$budget" $knob $v --sched-debug \
    > "$out/sched_${tag}$v.log" 2>&1
  echo "$tag=$v: $(sed -n '/=== one token ===/,/=== end ===/p' "$out/sched_${tag}$v.log" | grep -c '## SPLIT') graph splits per token"
  timeout 120 python3 tools/probe.py sched $model --budget "$budget" $knob $v 2>/dev/null \
    | grep '^layer' > "$out/layers_${tag}$v.txt"
  awk -v kv="$tag=$v" '{k[$3]+=$4; n[$3]++} END {for (t in k) printf "%s %-8s %.3f ms/layer (%d layers)\n", kv, t, k[t]/n[t], n[t]}' \
    "$out/layers_${tag}$v.txt"
done
for v in 1 0 1 0; do
  timeout 150 python3 tools/probe.py cpu-layers $model --budget "$budget" --ngl "$ngl" $knob $v 2>/dev/null \
    | tail -1 | tee -a "$out/probe_cpu_layers.jsonl"
done
