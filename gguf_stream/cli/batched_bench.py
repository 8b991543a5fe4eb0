"""gguf-stream batched-bench: aggregate tg t/s against parallel sequences and
the cost of a verify decode, stock -ngl beside streamed at the same budget
and KV size (bench/batched.py). The table on stdout, progress on stderr."""
from __future__ import annotations

import sys

from .common import EXIT_OK, Formatter, add_model, model_arg
from .options import parse_layers

EPILOG = """\
examples:
  gguf-stream batched-bench /tmp/m/llama3-8b.gguf --vram-budget 0.5x,0.25x
  gguf-stream batched-bench tiny --device host -npp 16 -ntg 4 -npl 1,2,4 --verify 1,4 -r 1"""


def _numbers(flag: str):
    def parse(spec: str) -> tuple[int, ...]:
        try:
            values = tuple(int(x) for x in spec.split(",") if x.strip())
        except ValueError:
            raise ValueError(f"{flag}: give comma-separated numbers like 1,2,4, not {spec!r:.40}") from None
        if not values:
            raise ValueError(f"{flag}: no numbers in {spec!r:.40}")
        return values
    return parse


def add_parser(sub, parents) -> None:
    p = sub.add_parser("batched-bench", parents=parents, formatter_class=Formatter, epilog=EPILOG,
                       help="aggregate t/s with 1..32 parallel sequences and verify-decode cost, stock vs streamed",
                       description=__doc__.split("\n\n")[0] + ". As llama.cpp's llama-batched-bench: one context "
                       "of n_seq_max = the largest -npl and -c = that many x (-npp + -ntg) cells for every load; "
                       "stock's -ngl is the largest whose measured GPU memory with that context fits the budget. "
                       "Without a GPU (or --device host): stock ngl=0 against --n-streamed layers through "
                       "host-memory slots.")
    add_model(p, required=False)
    p.add_argument("--vram-budget", default="0.5x,0.25x", metavar="B,B",
                   help="budgets (sizes or multiples of the model's bytes, e.g. 0.5x,6GiB; default 0.5x,0.25x)")
    p.add_argument("-npp", "--n-prompt", type=int, default=128, metavar="N", help="prompt tokens per sequence "
                   "(default 128)")
    p.add_argument("-ntg", "--n-gen", type=int, default=32, metavar="N", help="generation steps (default 32)")
    p.add_argument("-npl", "--parallel", default="1,2,4,8,16,32", metavar="N,N",
                   help="parallel sequences per row (default 1,2,4,8,16,32)")
    p.add_argument("--verify", default="1,2,4,8,16", metavar="K,K",
                   help="tokens per verify decode (default 1,2,4,8,16)")
    p.add_argument("-kvu", "--kv-unified", action="store_true", help="one KV cache the sequences share (as "
                   "llama-batched-bench -kvu): the cells the workload needs, not 256 per sequence at least")
    p.add_argument("-b", "--batch-size", type=int, default=2048, metavar="N", help="logical batch (default 2048)")
    p.add_argument("-ub", "--ubatch-size", type=int, default=512, metavar="N", help="physical batch (default 512)")
    p.add_argument("-r", "--repetitions", type=int, default=3, metavar="N", help="timed repetitions (median)")
    p.add_argument("-t", "--threads", type=int, metavar="N", help="CPU threads (default: all cores)")
    p.add_argument("-tb", "--threads-batch", type=int, metavar="N", help="CPU threads for decodes of several rows, "
                   "stock's and ours, as llama-batched-bench's -tb (default: -t's)")
    p.add_argument("-ngl", "--n-gpu-layers", dest="ngl", type=int, metavar="N",
                   help="stock's -ngl for every budget (default: searched per budget)")
    p.add_argument("--n-streamed", type=int, metavar="K", help="host mode: streamed layers (default half)")
    p.add_argument("--generate-cpu-layers", default="auto", metavar="auto|none|L,L",
                   help="streamed runs' generate split (default auto, as bench: measured for one row, and where "
                   "it has CPU layers also for each row count of -npl / --verify, one load each, --generate-rows; "
                   "given layers: a second streamed run puts decodes of 2 or more rows on the GPU, "
                   "cpu_layers_max_batch=1)")
    p.add_argument("--max-slots", type=int, metavar="S", help="streamed loads: the most slots (default: the "
                   "engine's, 3 for a dense model's loads whose split is for 8 rows or more, else 2; 2: without the "
                   "third slot)")
    p.add_argument("--device", choices=("auto", "cuda", "host"), default="auto")
    p.add_argument("-o", "--output", choices=("md", "json"), default="md", help="table format (default md)")
    p.add_argument("--plot", metavar="PNG", default=None, help="also draw aggregate tg t/s against parallel "
                   "sequences to PNG, a panel per budget (needs matplotlib; default: none; from a saved -o json: "
                   "python -m gguf_stream.bench.plot_batched BATCHED.json PNG)")
    p.set_defaults(func=cmd_batched_bench)


def cmd_batched_bench(args) -> int:
    from ..bench import plot
    from ..bench.batched import BatchedBench, BatchedWorkload, checks, render_json, render_md
    from ..bench.plot_batched import plot_batched
    from ..bench.budgets import Budget, parse_budgets
    from ..bench.timing import Progress
    from ..config import select_device
    from ..gguf_file import read_model
    from ..memory import format_size
    from ..models import resolve

    problem = plot.cannot_write(args.plot) if args.plot else None
    if problem:  # refuse before minutes of loading, not after
        raise ValueError(f"--plot {args.plot}: {problem}; nothing was run")
    parallel, verify = _numbers("-npl")(args.parallel), _numbers("--verify")(args.verify)
    w = BatchedWorkload(args.n_prompt, args.n_gen, parallel, verify, args.batch_size,
                        min(args.ubatch_size, args.batch_size), args.repetitions, n_threads=args.threads,
                        n_threads_batch=args.threads_batch, kv_unified=args.kv_unified)
    progress = Progress(args.quiet)
    device = select_device(args.device)
    path = resolve(model_arg(args), progress=progress)
    mf = read_model(path)
    split = parse_layers(args.generate_cpu_layers)
    bench = BatchedBench(str(path), mf.n_layer, w, device, progress, split, args.max_slots)
    progress(f"model {path} ({mf.arch}, {mf.n_layer} layers, {format_size(mf.total_bytes)}); context "
             f"{_context(w)}")
    runs, notes = [], []
    if device == "cuda":
        for b in parse_budgets(args.vram_budget, mf.total_bytes):
            if b.nbytes is None:
                raise ValueError("batched-bench compares at budgets: 'all' has none; give sizes or multiples")
            ngl = args.ngl if args.ngl is not None else bench.stock_ngl(b)
            if ngl is None:
                notes.append(f"{b.label}: no stock -ngl fits the budget with this context")
            runs += bench.budget_runs(b, {"vram_budget": b.nbytes}, ngl)
    else:
        k = args.n_streamed if args.n_streamed is not None else max(mf.n_layer // 2, 1)
        if not 0 <= k <= mf.n_layer:
            raise ValueError(f"--n-streamed must be in 0..{mf.n_layer}, got {k}")
        runs += bench.budget_runs(Budget(f"host, {k} streamed", None), {"n_streamed": k, "n_slots": 2}, 0)
        notes.append("host mode (no GPU): CPU compute, slots in host memory - shows the mechanics, not GPU speed")
    notes.append(f"workload: -npp {w.n_prompt} -ntg {w.n_gen} -npl {','.join(map(str, w.parallel))}, context "
                 f"{_context(w)} for every load, -b {w.n_batch} -ub {w.n_ubatch}, "
                 f"median of {w.reps} after a warm-up; aggregate tg = sequences x steps / the steps' time")
    if w.n_seq_max > 1 and max(w.verify) > 1:
        notes.append(f"the verify rows share the context of {w.n_seq_max} sequences (their KV cache counts in the "
                     "budget); speculative decoding runs one sequence: -npl 1 --verify ... measures its context")
    notes += checks(runs)
    meta = {"model": path.name}
    sys.stdout.write(render_md(runs, w, notes) if args.output == "md" else render_json(runs, w, notes, meta))
    if args.plot:
        print(plot_batched(render_json(runs, w, notes, meta), args.plot), file=sys.stderr)
    return EXIT_OK


def _context(w) -> str:
    if w.kv_unified:
        return f"{w.n_seq_max} sequences sharing {w.n_ctx} cells (-kvu)"
    return f"{w.n_seq_max} x {w.n_ctx // w.n_seq_max} cells"
