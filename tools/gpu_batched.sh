#!/usr/bin/env bash
# The batched bench of issue #18 on the GPU box: the 8B shape at 0.5x and
# 0.25x budgets, stock -ngl beside streamed, aggregate tg with 1..32 parallel
# sequences and the verify-decode cost. -kvu: one shared KV cache of the
# cells the workload needs (32 x (128 + 33) = 5152 -> 5376 cells, 0.66 GiB at
# f16 for the 8B shape; without it llama.cpp pads each of the 32 sequences
# to 256 cells: 8192 cells, 1 GiB, which crowds the 0.25x budget).
# Output per budget B: batched-8b-B.md (the table, then PASS/FAIL lines for the
# acceptance), batched-8b-B.json (the same rows), batched-8b-B.png (aggregate
# tg against parallel sequences, where matplotlib is installed; elsewhere:
# python -m gguf_stream.bench.plot_batched batched-8b-B.json batched-8b-B.png),
# progress on stderr.
set -euo pipefail
MODEL=${MODEL:-/tmp/m/llama3-8b.gguf}
[ -f "$MODEL" ] || python3 -m gguf_stream.synth "$MODEL" --shape llama3-8b --type Q4_K --seed 0 -q
# 0.25x (1.05 GiB) cannot hold 32 sequences' KV cache and still stream
# (below streaming's minimum, llama.cpp's own split runs): up to 16 there.
EXTRA=("$@")
for cell in "0.5x 1,2,4,8,16,32" "0.25x 1,2,4,8,16"; do
  set -- $cell
  name="batched-8b-$1"
  python3 -m gguf_stream batched-bench "$MODEL" --vram-budget "$1" -kvu \
      -npp 128 -ntg 32 -npl "$2" --verify 1,2,4,8,16 -r 3 -o json "${EXTRA[@]}" > "$name.json"
  NAME=$name python3 - <<'PY'
import os
from gguf_stream.bench.batched import load_json, render_md
name = os.environ["NAME"]
runs, w, notes = load_json(open(f"{name}.json").read())
open(f"{name}.md", "w").write(render_md(runs, w, notes))
print(open(f"{name}.md").read())
PY
  # the chart by path, in its own process: matplotlib beside llama.cpp's libraries crashes here (bench/plot.py)
  python3 "$(dirname "$0")/../gguf_stream/bench/plot_batched.py" "$name.json" "$name.png" \
      && echo "plot written to $name.png" || echo "no plot (matplotlib missing?); the JSON re-renders elsewhere" >&2
done
