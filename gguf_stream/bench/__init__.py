"""Benchmark: streamed vs stock llama.cpp at the same VRAM budget.

llama-bench's workload (pp = one eval of n_prompt tokens, BOS + random ids;
tg = n_gen single-token evals from an empty KV cache; one warm-up; KV cleared
between repetitions; t/s mean ± sample stddev), and for every VRAM budget B
the fair pair

* stock: llama.cpp's -ngl split with the largest ngl whose *measured* GPU
  memory (after an n_ubatch prompt, since compute pools grow at first use)
  fits B, found by loading candidates (binary search);
* for a mixture-of-experts model also stock-moe: llama.cpp's -ngl all
  --n-cpu-moe N (the expert tensors of the first N layers in host memory)
  with the smallest N whose measured GPU memory fits B (bisection); every
  ratio is then to the faster of the two stock recipes in its own test;
* streamed: StreamedModel(vram_budget=B);

plus the all-in-VRAM ceiling. A correctness gate (greedy tokens of stock and
streamed must agree) runs before any speed is reported. Without a GPU the
tool runs a reduced "host" comparison: stock ngl=0 (and for a MoE model
stock -ngl all --n-cpu-moe N) vs a fixed number of streamed layers through
2 host slots.

    gguf-stream bench -m llama3-8b --vram-budget 2.5GiB,0.75x,all -r 3

The modules, in the order the data flows: cli (arguments, the command) ->
sweep (budgets.py's budgets, the runs, timing.py's timing of each load,
gate.py's check of its tokens; without all-in-VRAM tokens mirror.py's
calibration run) -> rows -> bounds, report, plot.
"""
from .budgets import Budget, largest_fitting, parse_budgets, search_stock_n_cpu_moe, search_stock_ngl, smallest_fitting
from .cli import EXIT_ERROR, EXIT_MISMATCH, add_parser, command, run
from .gate import GATE_PROMPT, NEAR_TIE, PEER_MARGIN, Gate, Greedy, check_tokens, deviation_to_flip, gate, logit_noise
from .report import MD_COLUMNS, RENDERERS, render_csv, render_json, render_jsonl, render_md
from .rows import BenchResult, Row, mean_sd
from .timing import Progress, Timing, Workload, decode_tps, measure_h2d_bandwidth, time_model, workload_tokens

__all__ = [
    "Budget", "largest_fitting", "parse_budgets", "search_stock_n_cpu_moe", "search_stock_ngl", "smallest_fitting",
    "EXIT_ERROR", "EXIT_MISMATCH", "add_parser", "command", "run",
    "GATE_PROMPT", "NEAR_TIE", "PEER_MARGIN", "Gate", "Greedy", "check_tokens", "deviation_to_flip", "gate",
    "logit_noise",
    "MD_COLUMNS", "RENDERERS", "render_csv", "render_json", "render_jsonl", "render_md",
    "BenchResult", "Row", "mean_sd",
    "Progress", "Timing", "Workload", "decode_tps", "measure_h2d_bandwidth", "time_model", "workload_tokens",
]
