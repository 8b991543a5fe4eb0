#!/usr/bin/env bash
# The disk tier on the GPU box (issue #19): the staged CUDA engine alone
# (readers 1 and 4), then for each model the same-memory comparison: all
# host RAM but RAM_LEFT locked (tools/lock_ram.py), page cache dropped before
# each run, stock llama.cpp (llama-bench -lm mmap -ngl N at the VRAM budget)
# and gguf-stream (the same VRAM budget, a host budget below the RAM left:
# the rest of the model on the disk tier) under it: pp2048, tg, the disk's
# read rate and the disk bound (tools/disk_tier_gpu.py --ram-left).
# About 6-8 minutes with the models present (synthetic ones are written if
# missing: add about 1 minute for the 32B).
# Usage, from the repository root:
#   bash tools/disk_tier_gpu.sh OUTDIR
# Environment:
#   MODELS   which of the table below (default "8b 32b")
#   CHECK=1  also the correctness run without a lock (8B: disk tier vs
#            every streamed layer pinned, bit-identical), about 2 minutes more
#   model    file                      VRAM    host budget  RAM left  tg tokens  stock's limit
#   8b       /tmp/m/llama3-8b.gguf     3GiB    1.5GiB       4 GiB     8          120 s
#   32b      /tmp/m/dense-32b.gguf     8GiB    6GiB         8 GiB     4          200 s
# (RAM left: the host budget plus room for the process, its CUDA context and
# some page cache; stock gets the same. dense-32b: Qwen2.5-32B's sizes, 17.2 GiB.)
set -uo pipefail
out=${1:?output directory}
MODELS=${MODELS:-8b 32b}
export PYTHONUNBUFFERED=1
t0=$(date +%s)
mkdir -p "$out" /tmp/m
{ nvidia-smi -L; free -g; df -h /tmp/m; } > "$out/device.txt" 2>&1
python3 -m gguf_stream._build_native > "$out/build.log" 2>&1 || { tail "$out/build.log"; exit 1; }

echo "== 1. the staged CUDA engine alone (expect: all passed; rates with 1 and 4 readers, page cache dropped)"
cudart=$(python3 -c "import gguf_stream; from gguf_stream import llama_abi; print(llama_abi.cudart_path() or '')" 2>/dev/null)
gcc -O2 -std=gnu11 -Wall -Inative -o /tmp/cuda_check native/check/cuda_check.c native/gs_copy.c \
    native/gs_copy_cuda.c native/gs_copy_host.c native/gs_copy_stage.c native/gs_file.c native/gs_ring.c \
    native/gs_util.c native/gs_libs.c -ldl -lpthread \
  && timeout 90 /tmp/cuda_check "${cudart:-/usr/local/cuda/lib64/libcudart.so}" /tmp/m > "$out/cuda_check.log" 2>&1
echo "cuda_check rc=$?"; grep -E "FAIL|GB/s|passed|FAILED" "$out/cuda_check.log"

for name in $MODELS; do
  case $name in
    8b)  M=/tmp/m/llama3-8b.gguf; shape=llama3-8b; VRAM=3GiB; HOST=1.5GiB; LEFT=4; NGEN=8; STOCK_T=120 ;;
    32b) M=/tmp/m/dense-32b.gguf; shape=dense-32b; VRAM=8GiB; HOST=6GiB; LEFT=8; NGEN=4; STOCK_T=200 ;;
    *) echo "unknown model $name (8b, 32b)"; continue ;;
  esac
  [ -f "$M" ] || python3 -m gguf_stream.synth "$M" --shape "$shape" --type Q4_K --seed 0 -q
  mkdir -p "$out/$name"
  if [ "${CHECK:-0}" = 1 ] && [ "$name" = 8b ]; then
    echo "== $name: correctness without a lock (expect: identical True, True, True)"
    timeout 240 python3 tools/disk_tier_gpu.py --model "$M" --vram-budget "$VRAM" --host-budget "$HOST" \
      --out "$out/$name" 2> "$out/$name/check.err" | tee "$out/$name/check.log"
    mv "$out/$name/disk_tier_gpu.json" "$out/$name/check.json" 2>/dev/null
  fi
  echo "== $name: plan (three tiers, the tg bound)"
  python3 -m gguf_stream plan "$M" --vram-budget "$VRAM" --host-budget "$HOST" -c 4096 -b 2048 -ub 2048 2>&1 \
    | tee "$out/$name/plan.txt" | tail -2
  echo "== $name: stock (llama-bench -lm mmap) and gguf-stream, $LEFT GiB of RAM left to each"
  timeout 330 python3 tools/disk_tier_gpu.py --model "$M" --vram-budget "$VRAM" --host-budget "$HOST" \
    --ram-left "$LEFT" --n-gen "$NGEN" --stock-timeout "$STOCK_T" --lock-timeout 120 --read-limit 1GiB \
    --out "$out/$name" \
    2> "$out/$name/disk_tier_gpu.err" | tee "$out/$name/disk_tier_gpu.log"
  echo "$name rc=${PIPESTATUS[0]}"; tail -2 "$out/$name/disk_tier_gpu.err"
done
echo "total $(( $(date +%s) - t0 )) s; results in $out"
