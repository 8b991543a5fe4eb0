#!/usr/bin/env bash
# The disk tier on the GPU box (issue #19): the staged CUDA engine alone, then
# gguf-stream with a host budget well below the model (correctness against
# the same VRAM budget without a disk tier, pp/tg with the page cache
# dropped), the disk's read rate, and stock llama.cpp (llama-bench, mmap) at
# the same VRAM. Finishes in about 4-5 minutes with the model present.
# Usage, from the repository root:
#   bash tools/disk_tier_gpu.sh OUTDIR [MODEL]     (default MODEL: a synthetic 8B, written if missing)
# Environment: VRAM (default 3GiB), HOST (host budget, default 1.5GiB),
#   LOCK_GIB: lock that much RAM first (mlock) so that neither side can keep
#   the model in the page cache (e.g. LOCK_GIB=112 on a 128 GiB box); off by default.
set -uo pipefail
out=${1:?output directory}
M=${2:-/tmp/m/llama3-8b.gguf}
VRAM=${VRAM:-3GiB}
HOST=${HOST:-1.5GiB}
export PYTHONUNBUFFERED=1
t0=$(date +%s)
mkdir -p "$out" "$(dirname "$M")"
{ nvidia-smi -L; free -g; df -h "$(dirname "$M")"; } > "$out/device.txt" 2>&1
python3 -m gguf_stream._build_native > "$out/build.log" 2>&1 || { tail "$out/build.log"; exit 1; }
[ -f "$M" ] || python3 -m gguf_stream.synth "$M" --shape llama3-8b --type Q4_K --seed 0 -q
drop() { python3 -c "import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)" "$M"; }

locker=
if [ -n "${LOCK_GIB:-}" ]; then
  python3 -c "
import ctypes, mmap, sys, time
n = int(float(sys.argv[1]) * 2**30)
m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
buf = (ctypes.c_char * n).from_buffer(m)
ok = ctypes.CDLL(None).mlock(ctypes.addressof(buf), ctypes.c_size_t(n)) == 0
print(f'locked {sys.argv[1]} GiB' if ok else 'mlock failed: RAM not limited', flush=True)
time.sleep(3600)" "$LOCK_GIB" > "$out/locker.log" 2>&1 &
  locker=$!
  trap '[ -n "$locker" ] && kill "$locker"' EXIT
  for _ in $(seq 60); do [ -s "$out/locker.log" ] && break; sleep 1; done
  cat "$out/locker.log"; grep MemAvailable /proc/meminfo
fi

echo "== 1. the staged CUDA engine alone (expect: all passed; the staged rate from the page cache)"
cudart=$(python3 -c "import gguf_stream; from gguf_stream import llama_abi; print(llama_abi.cudart_path() or '')" 2>/dev/null)
gcc -O2 -std=gnu11 -Wall -Inative -o /tmp/cuda_check native/check/cuda_check.c native/gs_copy.c \
    native/gs_copy_cuda.c native/gs_copy_host.c native/gs_copy_stage.c native/gs_file.c native/gs_ring.c \
    native/gs_util.c native/gs_libs.c -ldl -lpthread \
  && timeout 60 /tmp/cuda_check "${cudart:-/usr/local/cuda/lib64/libcudart.so}" "$(dirname "$M")" > "$out/cuda_check.log" 2>&1
echo "cuda_check rc=$?"; grep -E "FAIL|GB/s|passed|FAILED" "$out/cuda_check.log"

echo "== 2. the whole page cache (root only; per-file POSIX_FADV_DONTNEED is used before every run anyway)"
sync; (echo 3 > /proc/sys/vm/drop_caches) 2>/dev/null && echo "dropped" || echo "cannot drop it here"

echo "== 3. plan (three tiers, the tg bound)"
python3 -m gguf_stream plan "$M" --vram-budget "$VRAM" --host-budget "$HOST" -c 4096 -b 2048 -ub 2048 2>&1 \
  | tee "$out/plan.txt" | tail -3

echo "== 4. gguf-stream: correctness (expect: identical True, True, True), pp2048 / tg16, the disk's rate"
timeout 240 python3 tools/disk_tier_gpu.py --model "$M" --vram-budget "$VRAM" --host-budget "$HOST" --out "$out" \
  2> "$out/disk_tier_gpu.err" | tee "$out/disk_tier_gpu.log"
echo "disk_tier_gpu rc=${PIPESTATUS[0]}"; tail -2 "$out/disk_tier_gpu.err"

echo "== 5. stock llama.cpp, mmap, -ngl N fitting $VRAM by gguf-stream's estimate (llama-bench)"
ngl=$(python3 - "$M" "$VRAM" <<'PY'
import sys
import gguf_stream
from gguf_stream import read_model
from gguf_stream.memory import parse_size
from gguf_stream.planner import stock_split_plan
mf, budget = read_model(sys.argv[1]), parse_size(sys.argv[2])
print(max([n for n in range(mf.n_layer + 1)
           if stock_split_plan(mf, n, budget, 4096, 2048).device_bytes <= budget] or [0]))
PY
)
if command -v llama-bench > /dev/null; then
  drop
  timeout 120 llama-bench -m "$M" -ngl "$ngl" -lm mmap -fa 1 -b 2048 -ub 2048 -p 2048 -n 16 -r 1 -o md 2>/dev/null \
    | tee "$out/llama-bench.md"
else
  echo "llama-bench not on PATH: no stock comparison" | tee "$out/llama-bench.md"
fi
echo "total $(( $(date +%s) - t0 )) s; results in $out"
