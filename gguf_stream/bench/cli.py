"""`gguf-stream bench`: its arguments, and the command that runs the sweep
and prints the table (stdout) and progress (stderr).

Exit codes: 0, 1 when the gate finds a mismatch (unless --allow-mismatch),
2 on an error (one line, `bench: error: ...`)."""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from ..cli.options import parse_moe_split
from ..errors import GGUFStreamError
from ..memory import KV_CACHE_TYPES, format_size, is_quantized_kv, parse_size
from . import plot
from .budgets import parse_budgets
from .gate import GATE_PROMPT, NEAR_TIE, PEER_MARGIN
from .report import RENDERERS
from .rows import BenchResult
from .sweep import Ctx, run_gpu, run_host
from .timing import Progress, Workload

EXIT_MISMATCH = 1
EXIT_ERROR = 2

DESCRIPTION = """\
Streamed vs stock llama.cpp at the same VRAM budget (bounds from gguf_stream/perfmodel.py).

llama-bench's workload: pp = one eval of -p tokens (BOS + random ids), tg =
-n single-token evals from an empty KV cache, one warm-up, -r repetitions,
t/s mean ± sample sd. For every VRAM budget B the fair pair: stock, llama.cpp's
-ngl split with the largest ngl whose measured GPU memory (after an -ub
prompt) fits B, found by loading candidates; streamed, gguf-stream at budget
B; plus the all-in-VRAM ceiling. For a mixture-of-experts model stock also
runs llama.cpp's -ngl all --n-cpu-moe N per budget (mode stock-moe: the
expert tensors of the first N layers in host memory, everything else on the
GPU, the smallest N whose measured GPU memory fits), and streamed's ratios
are to the faster stock recipe of each test (pp and tg apart). A
correctness gate (greedy tokens of stock and streamed must agree) runs
before any speed is reported: against the all-in-VRAM tokens when there are
some; without them (--no-ceiling, or a model that does not fit) against the
same budget's stock run (for MoE the faster recipe's, by tg), a token flip
passing as a near tie when its logits differ from that run's no more than
the run's mirror does (llama.cpp at -ngl all with as many layers in host
memory, but the last ones: -ot "blk\\.(k|..)\\.=CPU", loaded for the gate's
tokens only where streamed flips). Without a GPU a
reduced host mode compares stock ngl=0 (and, for a mixture-of-experts model,
stock -ngl all --n-cpu-moe N) with --n-streamed layers through 2
host-memory slots."""

EPILOG = """\
examples:
  gguf-stream bench -m llama3-8b --vram-budget 2.5GiB,0.75x,all -r 3
  gguf-stream bench -m tiny --device host -p 64 -n 8 -b 64 -ub 64 -r 1   # CPU-only reduced mode
exit codes: 0 ok, 1 the gate found a mismatch (unless --allow-mismatch), 2 error"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=30)


def add_parser(subparsers, parents=()) -> argparse.ArgumentParser:
    """Register `bench` (its flags, func=command) on the gguf-stream parser's subparsers."""
    p = subparsers.add_parser("bench", parents=list(parents), formatter_class=_Formatter,
                              help="streamed vs stock llama.cpp at the same VRAM budget (llama-bench style)",
                              description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("-m", "--model", default=None, metavar="MODEL",
                   help="model name from models.toml or a GGUF path (default: the registry default, gemma3-270m)")
    g = p.add_argument_group("workload (as llama-bench)")
    g.add_argument("-p", "--n-prompt", type=int, default=2048, metavar="N",
                   help="prompt tokens of the pp test (0: none; default 2048)")
    g.add_argument("-n", "--n-gen", type=int, default=128, metavar="N",
                   help="generated tokens of the tg test (0: none; default 128)")
    g.add_argument("-b", "--batch-size", type=int, default=2048, metavar="N", help="logical batch (default 2048)")
    g.add_argument("-ub", "--ubatch-size", type=int, default=2048, metavar="N",
                   help="physical batch (default 2048; at most -b)")
    g.add_argument("-r", "--repetitions", type=int, default=3, metavar="N",
                   help="timed repetitions after one warm-up (default 3)")
    g.add_argument("-t", "--threads", type=int, default=None, metavar="N", help="CPU threads (default: all cores)")
    g.add_argument("-fa", "--flash-attn", choices=("on", "off"), default="on", help="flash attention (default on)")
    for flag, name, which in (("-ctk", "--cache-type-k", "K"), ("-ctv", "--cache-type-v", "V")):
        g.add_argument(flag, name, choices=tuple(KV_CACHE_TYPES), default="f16", metavar="TYPE",
                       help=f"KV cache type for {which}: {', '.join(KV_CACHE_TYPES)} (default f16)"
                       + ("; a quantized one needs -fa on" if which == "V" else ""))
    g.add_argument("--seed", type=int, default=42, metavar="N", help="seed of the random prompt/tg token ids (default 42)")
    g.add_argument("--cpu-rate-tokens", type=int, default=16, metavar="N",
                   help="GPU mode: tokens of the stock ngl=0 run that measures the CPU path (0: skip; default 16)")
    g = p.add_argument_group("placement")
    g.add_argument("--vram-budget", default="0.5x,0.75x,all", metavar="LIST",
                   help="comma list of budgets: sizes (4GiB), fractions of the model's weight bytes (0.5x), all "
                   "(the measured all-in-VRAM peak) (default 0.5x,0.75x,all)")
    g.add_argument("--device", choices=("auto", "cuda", "host"), default="auto",
                   help="cuda: the budget sweep; host: the reduced CPU-only comparison; auto: cuda if there is "
                   "one (default auto)")
    g.add_argument("-ngl", "--ngl", type=int, default=None, metavar="N",
                   help="force the stock ngl instead of searching (default: search per budget)")
    g.add_argument("--n-cpu-moe", type=int, default=None, metavar="N",
                   help="mixture-of-experts models: force stock's -ngl all --n-cpu-moe N recipe (the expert tensors "
                   "of layers 0..N-1 in host memory) instead of searching the smallest N that fits each budget; "
                   "host mode: its N (default: search per budget; host mode: half the layers)")
    g.add_argument("--no-ceiling", action="store_true",
                   help="skip the all-in-VRAM row (default: run it); the gate then compares with each budget's "
                   "stock run, calibrated by that run's mirror (see above and --allow-near-ties)")
    g.add_argument("--moe-split", default=None, metavar="LIST",
                   help="mixture-of-experts models: per budget, one more streamed run per entry of LIST (e.g. "
                        "off,3,4): off, the CPU computes the CPU expert layers' routed experts, as --n-cpu-moe; N, "
                        "they upload N of each token's experts while the CPU computes the others; auto, N timed "
                        "(--moe-split of run/serve, whose default the streamed rows use; default: none)")
    g.add_argument("--prompt-cpu-experts", default=None, metavar="LIST",
                   help="mixture-of-experts models: per budget, one more streamed run per number N in LIST (e.g. "
                        "8,12): in prompts the split layers' last N experts are computed by the CPU instead of "
                        "uploaded (--prompt-cpu-experts of run/serve; default: none)")
    g.add_argument("--n-streamed", type=int, default=None, metavar="K",
                   help="host mode: streamed layers (default: half of them)")
    g.add_argument("--host-budget", default=None, metavar="LIST",
                   help="comma list of host-memory budgets (sizes, 2GiB): for each VRAM budget one more streamed "
                   "run per host budget, the streamed layers beyond it on the disk tier (read from the GGUF file "
                   "at every use), gated against the streamed run without one; its rows give the disk bytes read, "
                   "their rate and the share hidden (default: none)")
    g = p.add_argument_group("correctness gate")
    g.add_argument("--check-tokens", type=int, default=16, metavar="N",
                   help=f"greedy tokens after {GATE_PROMPT!r} compared (0: off; default 16)")
    g.add_argument("--allow-mismatch", action="store_true",
                   help="exit 0 even when the gate fails (default: exit 1)")
    g.add_argument("--allow-near-ties", action="store_true",
                   help=f"pass a token flip whose rms logit deviation is within {NEAR_TIE} std, or within "
                   f"{PEER_MARGIN:g}x the largest deviation of a stock -ngl split of the run from all-in-VRAM "
                   "(default: such a flip is a MISMATCH). Without all-in-VRAM tokens the reference is a stock "
                   "split, itself one rounding: a flip within 1.5x its mirror's deviation from it passes as "
                   "'ok (near tie vs stock ngl=N ...)' either way")
    g = p.add_argument_group("output")
    g.add_argument("-o", "--output", choices=sorted(RENDERERS), default="md",
                   help="format on stdout: md (table and notes), csv, json (rows, notes, metadata), jsonl (one "
                   "row per line) (default md)")
    g.add_argument("--plot", metavar="PNG", default=None,
                   help="also draw a bar chart to PNG (needs matplotlib; default: none)")
    p.set_defaults(func=command)
    return p


def run(args: argparse.Namespace, progress: Progress | None = None) -> BenchResult:
    """Resolve the model, pick the mode, run, and collect rows and notes."""
    from ..config import select_device
    from ..gguf_file import read_model
    from ..models import load_registry, resolve

    progress = progress or Progress(args.quiet)
    if min(args.n_prompt, args.n_gen, args.repetitions - 1, args.check_tokens) < 0 or \
            args.n_prompt + args.n_gen == 0:
        raise ValueError("-p/-n/--check-tokens must be >= 0 (not both -p and -n zero) and -r >= 1")
    if is_quantized_kv(args.cache_type_v) and args.flash_attn == "off":
        raise ValueError(f"-ctv {args.cache_type_v} (a quantized V cache) needs flash attention in llama.cpp: "
                         "give -fa on, or -ctv f16")
    path = resolve(args.model, progress=progress)
    mf = read_model(path)
    if args.n_cpu_moe is not None:
        _check_n_cpu_moe(mf, args.n_cpu_moe)
    progress(f"model {path} ({mf.arch}, {mf.n_layer} layers, {format_size(mf.total_bytes)})")
    w = Workload(args.n_prompt, args.n_gen, args.batch_size, min(args.ubatch_size, args.batch_size),
                 args.repetitions, args.check_tokens, args.seed, args.threads, args.flash_attn == "on",
                 args.cache_type_k, args.cache_type_v)
    use_cuda = select_device(args.device) == "cuda"
    # a registry name as given; a file by its stem; the default by its registry name
    name = path.stem if args.model and Path(args.model).expanduser().exists() else args.model or load_registry().default
    ctx = Ctx(str(path), mf, w, "CUDA" if use_cuda else "CPU", "cuda" if use_cuda else "host", progress, name,
               args.allow_near_ties, host_budgets=_host_budgets(args.host_budget),
               moe_splits=_moe_splits(args.moe_split), prompt_cpu_experts=_numbers(args.prompt_cpu_experts))
    meta = {"model": ctx.model_name, "path": str(path), "arch": mf.arch, "n_layer": mf.n_layer,
            "size_bytes": mf.total_bytes, "backend": ctx.backend, "mode": "gpu" if use_cuda else "host",
            "workload": asdict(w), "command": " ".join(sys.argv)}
    if use_cuda:
        budgets = parse_budgets(args.vram_budget, mf.total_bytes)
        rows, notes, extra = run_gpu(ctx, budgets, args.ngl, not args.no_ceiling, args.cpu_rate_tokens,
                                     forced_n_cpu_moe=args.n_cpu_moe)
        meta.update(extra)
    else:
        rows, notes = run_host(ctx, args.n_streamed, args.n_cpu_moe)
    notes.append(f"workload: pp{w.n_prompt} tg{w.n_gen}, n_batch {w.n_batch}, n_ubatch {w.n_ubatch}, "
                 f"flash attention {'on' if w.flash_attn else 'off'}, KV cache {w.type_k}/{w.type_v}, "
                 f"{w.reps} repetition(s) after a warm-up; t/s mean ± sample sd; counters "
                 f"per repetition; gate: {w.check_tokens} greedy tokens after {GATE_PROMPT!r}")
    return BenchResult(tuple(rows), meta, tuple(notes))


def _numbers(spec: str | None) -> tuple[int, ...]:
    """--prompt-cpu-experts's list of counts."""
    try:
        return tuple(int(v) for v in spec.split(",")) if spec else ()
    except ValueError:
        raise SystemExit(f"gguf-stream bench: --prompt-cpu-experts {spec!r}: give comma-separated numbers") from None


def _moe_splits(spec: str | None) -> tuple:
    """--moe-split's list: auto, off or numbers of experts."""
    try:
        return tuple(parse_moe_split(v) for v in spec.split(",")) if spec else ()
    except ValueError as exc:
        raise SystemExit(f"gguf-stream bench: {exc}") from None


def _host_budgets(text: str | None) -> tuple[str, ...]:
    """--host-budget's sizes as given (checked before any loading)."""
    if not text:
        return ()
    out = tuple(s.strip() for s in text.split(","))
    for s in out:
        try:
            parse_size(s)
        except ValueError as exc:
            raise ValueError(f"--host-budget {s!r}: {exc}") from None
    return out


def _check_n_cpu_moe(mf, n: int) -> None:
    """--n-cpu-moe: a mixture-of-experts model, and layers it has."""
    if not mf.is_moe:
        raise ValueError(f"--n-cpu-moe needs a mixture-of-experts model; this {mf.arch} model has no expert tensors")
    if not 0 <= n <= mf.n_layer:
        raise ValueError(f"--n-cpu-moe must be in 0..{mf.n_layer} (the model's layers), got {n}")


def command(args: argparse.Namespace) -> int:
    """`gguf-stream bench`: run, print the table; the exit code."""
    problem = plot.cannot_write(args.plot) if args.plot else None
    if problem:  # refuse before minutes of loading, not after
        print(f"bench: error: --plot {args.plot}: {problem}; nothing was run", file=sys.stderr)
        return EXIT_ERROR
    progress = Progress(args.quiet)
    try:
        result = run(args, progress)
    except (GGUFStreamError, ValueError) as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    sys.stdout.write(RENDERERS[args.output](result))
    if args.plot:
        print(plot.plot(result, args.plot), file=sys.stderr)
    if result.mismatch:
        print("bench: MISMATCH between stock and streamed greedy tokens", file=sys.stderr)
        return 0 if args.allow_mismatch else EXIT_MISMATCH
    return 0
