#!/usr/bin/env bash
# The batched bench of issue #18 on the GPU box: the 8B shape at 0.5x and
# 0.25x budgets, stock -ngl beside streamed, aggregate tg with 1..32 parallel
# sequences and the verify-decode cost. -kvu: one shared KV cache of the
# cells the workload needs (32 x (128 + 33) = 5152 -> 5376 cells, 0.66 GiB at
# f16 for the 8B shape; without it llama.cpp pads each of the 32 sequences
# to 256 cells: 8192 cells, 1 GiB, which crowds the 0.25x budget).
# Output: batched-8b.md (the table, then PASS/FAIL lines for the acceptance),
# batched-8b.json (the same rows), batched-8b.png (aggregate tg against
# parallel sequences, where matplotlib is installed; elsewhere:
# python -m gguf_stream.bench.plot_batched batched-8b.json batched-8b.png),
# progress on stderr.
set -euo pipefail
MODEL=${MODEL:-/tmp/m/llama3-8b.gguf}
[ -f "$MODEL" ] || python3 -m gguf_stream.synth "$MODEL" --shape llama3-8b --type Q4_K --seed 0 -q
python3 -m gguf_stream batched-bench "$MODEL" --vram-budget 0.5x,0.25x -kvu \
    -npp 128 -ntg 32 -npl 1,2,4,8,16,32 --verify 1,2,4,8,16 -r 3 -o json "$@" > batched-8b.json
python3 - <<'PY'
from gguf_stream.bench.batched import load_json, render_md
runs, w, notes = load_json(open("batched-8b.json").read())
open("batched-8b.md", "w").write(render_md(runs, w, notes))
print(open("batched-8b.md").read())
PY
# the chart by path, in its own process: matplotlib beside llama.cpp's libraries crashes here (bench/plot.py)
python3 "$(dirname "$0")/../gguf_stream/bench/plot_batched.py" batched-8b.json batched-8b.png \
    && echo "plot written to batched-8b.png" || echo "no plot (matplotlib missing?); the JSON re-renders elsewhere" >&2
