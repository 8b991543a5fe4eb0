#!/usr/bin/env bash
# The disk tier (issue #19) on the GPU box, quick checks; tools/disk_tier_gpu.sh
# measures it. Usage: tools/disk_tier_check.sh [MODEL]  (default: a synthetic 8B shape)
set -euo pipefail
M=${1:-/tmp/m/llama3-8b.gguf}
[ -f "$M" ] || python3 -m gguf_stream.synth "$M" --shape llama3-8b --type Q4_K --seed 0 -q
echo "== 1. unit and CPU tests of the disk tier (expect: all passed)"
python3 -m pytest -q -p no:cacheprovider tests/test_disk.py tests/test_disk_native.py
echo "== 2. the GPU suite is unchanged (expect: as on main)"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
echo "== 3. CUDA + disk tier runs (expect a 'disk tier' line in the summary, exit 0)"
python3 -m gguf_stream run "$M" --vram-budget 3GiB --host-budget 1.5GiB -p hi -n 4
echo "== 4. plan: three tiers with bytes"
python3 -m gguf_stream plan "$M" --vram-budget 3GiB --host-budget 2GiB -c 2048 | tail -3
echo "== 5. host-slot mode read rate from this disk (page cache dropped where allowed):"
echo "   the summary's 'disk tier X: N reads (B in S s, H% hidden)' gives B/S, the disk bound of tg"
sync; (echo 3 > /proc/sys/vm/drop_caches) 2>/dev/null || echo "   (cannot drop the page cache: the rate may be the cache's)"
python3 -m gguf_stream run "$M" --device host --n-streamed 32 --host-budget 2GiB -p "The capital of France is" -n 4 -c 512 -ub 64
