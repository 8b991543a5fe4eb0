#!/usr/bin/env bash
# A/B on the GPU box: CPU layers with their KV cache in host memory (1, the
# default) against left on the GPU (0). For each: llama.cpp's graph splits
# per token, per-layer times, and tg of the auto split next to stock -ngl.
# Usage (repo root, after `source .device/setup.sh`):
#   bash tools/gpu_host_kv_ab.sh OUTDIR [BUDGET [NGL]]
set -uo pipefail
out=${1:?output directory}; budget=${2:-3.16GiB}; ngl=${3:-14}
export PYTHONUNBUFFERED=1
mkdir -p "$out" /tmp/m
model=/tmp/m/llama3-8b.gguf
[ -f $model ] || python3 tools/synth.py $model --shape llama3-8b --type Q4_K --seed 0 -q
for kv in 1 0; do
  timeout 120 python3 tools/probe_sched.py $model --budget "$budget" --host-kv $kv --sched-debug \
    > "$out/sched_kv$kv.log" 2>&1
  echo "host_kv=$kv: $(sed -n '/=== one token ===/,/=== end ===/p' "$out/sched_kv$kv.log" | grep -c '## SPLIT') graph splits per token"
  timeout 120 python3 tools/probe_sched.py $model --budget "$budget" --host-kv $kv 2>/dev/null \
    | grep '^layer' > "$out/layers_kv$kv.txt"
  awk -v kv=$kv '{k[$3]+=$4; n[$3]++} END {for (t in k) printf "host_kv=%s %-8s %.3f ms/layer (%d layers)\n", kv, t, k[t]/n[t], n[t]}' \
    "$out/layers_kv$kv.txt"
done
for kv in 1 0 1 0; do
  timeout 150 python3 tools/probe_cpu_layers.py $model --budget "$budget" --ngl "$ngl" --host-kv $kv 2>/dev/null \
    | tail -1 | tee -a "$out/probe_cpu_layers.jsonl"
done
