#!/usr/bin/env bash
# Issue #18's verify decode on the GPU box, where its time goes: the 8B shape's 8-row decodes per CPU-layer
# count for each of RUNS (threads, or threads:OMP_WAIT_POLICY; default "16 14 12 16:active": llama.cpp's CPU
# layers share the 16 vCPUs with the engine's and CUDA's threads, and OpenMP's may sleep through the GPU's
# segments between them), then batched-bench's verify rows in one sequence's context (speculative
# decoding's) at both budgets. From the repository root after `source .device/setup.sh`:
#     bash tools/gpu_verify.sh            # BENCHMARKS.md, twelfth session, has the first run of both parts;
# the thirteenth its thread runs (16 threads fastest for 8 rows too) and the verify with nothing streamed;
# since the fourteenth the verify runs twice: with the third slot of splits of 8+ rows and without (--max-slots 2)
set -euo pipefail
MODEL=${MODEL:-/tmp/m/llama3-8b.gguf}
[ -f "$MODEL" ] || python3 -m gguf_stream.synth "$MODEL" --shape llama3-8b --type Q4_K --seed 0 -q
SIZE=$(stat -c %s "$MODEL")
for f in 0.5 0.25; do
  budget=$(python3 -c "print(int($f * $SIZE))")
  for run in ${RUNS:-16 14 12 16:active}; do   # threads[:OMP_WAIT_POLICY]: do OpenMP's threads sleeping
    t=${run%%:*}; wait=${run#*:}; [ "$wait" = "$run" ] && wait=""   # through GPU segments cost the CPU layers?
    echo "== 8-row decodes, budget ${f}x, $t threads${wait:+, OMP_WAIT_POLICY=$wait}"
    env ${wait:+OMP_WAIT_POLICY=$wait} python3 tools/probe.py timeline "$MODEL" --budget "$budget" -ub 512 -t "$t" \
        --rows 8 -n 12 --n-cpu ${N_CPU:-0 4 6 8 10 12} 2>&1 | grep -E '^\{|error' || true
  done
done
for slots in "" 2; do   # the engine's slots (3 for the 8-row loads), then the same box without the third
  echo "== verify in one sequence's context${slots:+, --max-slots $slots}"
  python3 -m gguf_stream batched-bench "$MODEL" --vram-budget 0.5x,0.25x -kvu -npp 128 -ntg 32 -npl 1 \
      --verify 1,8 -r 3 ${slots:+--max-slots $slots} 2>&1 | grep -v '^\['
done
