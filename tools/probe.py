"""Probes: the measurements behind BENCHMARKS.md's "where the time goes"
notes, one subcommand each, over the public API (StreamedModel, StockModel,
EngineConfig, m.plan, m.stats, the engine's counters and timeline).

    python tools/probe.py PROBE MODEL [options]   # PROBE -h: its options

Every probe times with timed() (gguf_stream.bench's workload and loop:
pp = one eval of BOS + random ids, tg = single-token evals from an empty KV
cache starting at BOS, each eval waited for), loads with load(), and reaches
past the public API only in the functions under "engine internals".
--device host runs any model-loading probe on a CPU-only machine (host-memory
slots; a smoke run, not a measurement).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

if not __package__:  # run as a script: the checkout's gguf_stream (the one sys.path line of tools/)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gguf_stream  # noqa: E402,F401  (llama.cpp before numpy)
from gguf_stream import GGUFStreamError, llama_abi, native, read_model  # noqa: E402
from gguf_stream.bench.timing import decode_tps, workload_tokens  # noqa: E402
from gguf_stream.perfmodel import Rates, generate_splits  # noqa: E402
from gguf_stream.planner import with_generate_placement  # noqa: E402
from gguf_stream.config import EngineConfig  # noqa: E402
from gguf_stream.model import StockModel, StreamedModel  # noqa: E402

ONE_LAYER = dict(n_streamed=1, n_slots=2)


# ------------------------------------------------------------ shared helpers

def load(a, stock_ngl: int | None = None, *, n_ctx: int = 2176, n_batch: int = 2048, n_cpu_moe: int = 0, **options):
    """The one loader: StockModel at -ngl stock_ngl (--n-cpu-moe n_cpu_moe), else StreamedModel,
    with the shared options (--device, -t, -ub) and EngineConfig's options.
    Streamed runs keep the exact placement unless a probe asks for CPU layers
    (the probes measure streaming; the library's default on CUDA is the split)."""
    if stock_ngl is None:
        options.setdefault("generate_cpu_layers", "none")
    config = EngineConfig(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=min(a.ubatch, n_batch), device=a.device,
                          n_threads=a.threads, **options)
    if stock_ngl is None:
        return StreamedModel(a.model, config=config)
    return StockModel(a.model, stock_ngl, config=config, n_cpu_moe=n_cpu_moe)


def placement(a, default: dict | None = None) -> dict:
    """--budget B or --n-streamed K (through --slots, default 2), else default."""
    if a.budget:
        return dict(vram_budget=a.budget)
    if getattr(a, "n_streamed", None) is not None:
        return dict(n_streamed=a.n_streamed, n_slots=getattr(a, "n_slots", None) or 2)
    if default is None:
        raise ValueError("give --budget B or --n-streamed K")
    return default


def timed(m, test: str, n: int, *, seed: int = 0, after_reset=None) -> float:
    """t/s of one llama-bench test from an empty KV cache: 'pp' (n tokens in
    one eval) or 'tg' (n single-token evals); after_reset runs between
    clearing the cache and starting the clock (e.g. m.reset_counters)."""
    pp, tg = workload_tokens(m, n if test == "pp" else 0, n if test == "tg" else 0, seed)
    m.reset()
    if after_reset is not None:
        after_reset()
    return decode_tps(m, pp or tg, one_at_a_time=test == "tg")


def timeline_ms(t) -> dict:
    """An engine Timeline as ms per decode: pre (graph building and inputs),
    cpu and gpu segments, between (the hook's work) and what is left."""
    n = max(t.decodes, 1)
    parts = dict(decode=t.wall_s, pre=t.pre_s, cpu=t.cpu_s, gpu=t.gpu_s, between=t.between_s,
                 rest=t.wall_s - t.pre_s - t.cpu_s - t.gpu_s - t.between_s)
    return {k: round(v / n * 1e3, 3) for k, v in parts.items()}


def bracketed(m, tokens) -> None:
    """One eval between the engine's timeline marks."""
    m.engine.timeline_mark(True)
    m.eval(tokens)
    m.engine.timeline_mark(False)


@contextlib.contextmanager
def environ(**values: str):
    """Environment variables set for a while (read by llama.cpp or the engine at load)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def fresh_rates_cache():
    """The engine measures its rates and split anew (an empty rates cache)."""
    with tempfile.TemporaryDirectory() as d, environ(GGUF_STREAM_CACHE=d):
        yield


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


# ------------------------------------------------------------ engine internals
# The only places the probes reach past the public API; adapt these when
# the Python stack changes.

def calibration(m) -> dict:
    """The plan's split and what the engine measured to choose it (rates in
    GB/s, ms; none without a measured split, e.g. in host mode)."""
    s, plan = m.streamer, m.plan
    out = dict(n_streamed=len(plan.streamed), n_overflow=len(plan.generate_overflow), n_cpu=len(plan.cpu_layers),
               reuse=s.reuses_graphs)
    cal = m.calibration
    if cal is not None:
        r = cal.rates
        out.update(pcie=r.pcie_bytes_per_s / 1e9, cpu=r.cpu_bytes_per_s / 1e9, G_ms=r.gpu_token_seconds * 1e3,
                   predicted=1 / cal.predicted_token_seconds, trials=cal.split_trials)
    return out


def candidate_splits(m) -> list[tuple[tuple[int, ...], float]]:
    """The engine's candidates: which overflow layers the CPU computes for
    each count (without measured rates, e.g. in host mode, any)."""
    rates = m.calibration.rates if m.calibration else Rates(1.0, 1.0, 0.0)
    return generate_splits(m.plan.generate_overflow, read_model(m.path).layer_bytes, rates)


def switch_cpu_layers(m, layers) -> None:
    """Make layers the CPU layers of the live model while generating, and
    its plan say so. Needs a context that rebuilds every graph
    (graph_reuse=False): a reused graph keeps the placement it was built with."""
    if m.config.graph_reuse:
        raise ValueError("CPU layers change on a live context only with graph_reuse=False")
    m.engine.set_cpu_layers(tuple(layers))
    m.streamer.plan = with_generate_placement(m.plan, layers, m.plan.generate_resident)


def cpu_layers_own_device(m, own: bool) -> None:
    """CPU layers count as CPU layers for llama.cpp's graph while generating
    (own, as loaded with cpu_layer_device=True) or not; back in the prompt
    phase, so the loaded devices are in the model's table first."""
    m.engine.set_phase(native.PHASE_PROMPT)
    m.engine.bind_layer_devices(None)
    cells = llama_abi.layer_device_cells(m.model, m.plan.n_layer) if own else None
    if cells is not None:
        m.engine.bind_layer_devices(cells)


def raw_decoder(m):
    """m as decode_tps sees it, but each eval one raw llama_decode after the
    engine's placement call (the path the engine's split trials take)."""
    lc = llama_abi.llama()

    def eval_raw(tokens):
        arr = (lc.llama_token * len(tokens))(*tokens)
        m.streamer.before_decode(len(tokens))
        rc = lc.llama_decode(m.ctx, lc.llama_batch_get_one(arr, len(tokens)))
        if rc != 0:
            raise GGUFStreamError(f"llama_decode returned {rc}")

    return SimpleNamespace(eval=eval_raw, synchronize=m.synchronize)


def reused_graphs(m) -> int:
    return llama_abi.llama().llama_perf_context(m.ctx).n_reused


# ------------------------------------------------------------ probes

PROBES: dict[str, tuple] = {}


def probe(name: str, summary: str, *options):
    """Register a probe: its options as (flags, argparse keywords) pairs."""
    def register(func):
        PROBES[name] = (func, summary, options)
        return func
    return register


BUDGET = (("--budget",), dict(metavar="B", help="stream the plan of this VRAM budget"))
N_STREAMED = (("--n-streamed",), dict(type=int, metavar="K", help="stream K layers instead, through --slots "
                                      "(default 2)"))
SLOTS = (("--slots",), dict(type=int, dest="n_slots", metavar="S",  # the slots probe's --slots is a list of max_slots
                            help="with --n-streamed: through S slots (default 2)"))
PP = (("--pp",), dict(type=int, default=2048, metavar="N", help="prompt tokens (default 2048)"))
REPS = (("-r", "--reps"), dict(type=int, default=3, metavar="N", help="repetitions (default 3)"))
N_TOKENS = (("-n",), dict(type=int, default=32, metavar="N", help="tokens per measurement (default 32)"))
ROUNDS = (("--rounds",), dict(type=int, default=3, metavar="N", help="rounds (default 3)"))
LABEL = (("--label",), dict(default="", help="echoed in the output (default empty)"))
HOST_KV = (("--host-kv",), dict(type=int, choices=(0, 1), default=1,
                                help="CPU layers' KV cache in host memory while generating (default 1)"))
OWN_DEVICE = (("--own-device",), dict(type=int, choices=(0, 1), default=1,
                                      help="CPU layers count as CPU layers while generating, their norms on the "
                                      "CPU (default 1)"))
NGL = (("--ngl",), dict(type=int, required=True, metavar="N", help="stock llama.cpp's -ngl"))


@probe("pp-hook", "stock (all in VRAM) against the engine with one layer (or --budget's plan) streamed",
       BUDGET, N_STREAMED, PP, REPS)
def pp_hook(a) -> None:
    """Both loaded in one process and timed alternately on the same random
    ids (the first round warms up). With one layer streamed the copies are
    negligible: what differs is the engine's hook, whose path synchronises
    every segment, the graph's last one included. Then the engine's
    timeline of the streamed prompts."""
    sizes = dict(n_ctx=a.pp + 128, n_batch=a.pp)
    with load(a, 99, **sizes) as stock, load(a, **placement(a, ONE_LAYER), **sizes) as streamed:
        out = {"stock": [], "streamed": []}
        for rep in range(a.reps + 1):
            for name, m in (("stock", stock), ("streamed", streamed)):
                tps = timed(m, "pp", a.pp)
                if rep:
                    out[name].append(round(tps, 1))
        e, prompt = streamed.engine, workload_tokens(streamed, a.pp, 0, 0)[0]
        e.timeline(True)
        for _ in range(a.reps):
            streamed.reset()
            bracketed(streamed, prompt)
        emit(n_ubatch=a.ubatch, n_streamed=len(streamed.plan.streamed), **out,
             ratio=round(statistics.median(out["streamed"]) / statistics.median(out["stock"]), 3),
             streamed_ms=timeline_ms(e.timeline_get()))


@probe("boundaries", "what one synchronised segment boundary costs a prompt", BUDGET, N_STREAMED, PP, REPS)
def boundaries(a) -> None:
    """One layer (or --budget's plan) streamed; pp with the engine's usual
    boundaries, alternating with its timing mode, which adds one at every
    layer end: t/s, boundaries per prompt, the cost per added boundary."""
    with load(a, **placement(a, ONE_LAYER), n_ctx=a.pp + 128, n_batch=a.pp) as m:
        e = m.engine
        timed(m, "pp", a.pp)  # warm-up
        seconds, bounds = {False: [], True: []}, {}
        for _ in range(a.reps):
            for timing in (False, True):
                e.set_timing(timing)
                seconds[timing].append(a.pp / timed(m, "pp", a.pp, after_reset=e.reset_counters))
                bounds[timing] = e.counters().boundaries
        e.set_timing(False)
        base, more = statistics.median(seconds[False]), statistics.median(seconds[True])
        emit(n_ubatch=a.ubatch, n_streamed=len(m.plan.streamed),
             usual=dict(boundaries=bounds[False], tps=[round(a.pp / s, 1) for s in seconds[False]]),
             every_layer=dict(boundaries=bounds[True], tps=[round(a.pp / s, 1) for s in seconds[True]]),
             ms_per_added_boundary=round((more - base) / max(bounds[True] - bounds[False], 1) * 1e3, 4))


@probe("slots", "prompt speed against max_slots at one budget", BUDGET, N_STREAMED, PP, REPS,
       (("--slots",), dict(type=int, nargs="+", default=[2, 3], metavar="S", help="max_slots values (default 2 3)")))
def slots(a) -> None:
    """More slots let uploads run further ahead of adjacent streamed
    layers, but take VRAM that would hold resident layers."""
    size = {k: v for k, v in placement(a).items() if k != "n_slots"}  # max_slots decides
    for max_slots in a.slots:
        with load(a, **size, n_ctx=a.pp + 128, n_batch=a.ubatch, max_slots=max_slots) as m:
            timed(m, "pp", a.pp)  # warm-up
            rates = [timed(m, "pp", a.pp, after_reset=m.reset_counters) for _ in range(a.reps)]
            c, peak = m.stats.counters, m.stats.vram_peak_bytes
            print(f"max_slots {max_slots}: {len(m.plan.streamed)} streamed x {m.plan.n_slots} slots, "
                  f"pp{a.pp} {' '.join(f'{r:.0f}' for r in rates)} t/s, last run waits {c.adopted_waited} "
                  f"({c.wait_seconds * 1e3:.0f} ms), peak " + ("-" if peak is None else f"{peak / 2**30:.2f} GiB"),
                  flush=True)


@probe("timeline", "where a token's (--pp: a prompt's) time goes, per CPU-layer count", BUDGET, N_STREAMED, SLOTS,
       N_TOKENS, (("--n-cpu",), dict(type=int, nargs="*", metavar="N",
                                     help="CPU-layer counts (default: the engine's choice)")),
       (("--pp",), dict(type=int, metavar="N", help="time prompts of N tokens (n_batch N) instead of tokens")),
       (("--rows",), dict(type=int, default=1, metavar="K", help="decodes of K tokens of one sequence (a "
                          "speculative verify), the split and CPU layout chosen for K rows (default 1)")),
       (("--moe-split",), dict(default=None, metavar="auto|off|N", help="a mixture of experts' split of CPU "
                               "expert layers (default: the engine's)")),
       (("--prompt-cpu-experts",), dict(type=int, default=0, metavar="N", help="with --pp, a mixture of experts: "
                                        "the split layers' last N experts on the CPU in prompts (default 0)")))
def timeline(a) -> None:
    """Automatic generate split (fresh rates) unless --n-cpu; a few warm-up
    tokens, then each of -n decodes bracketed with the engine's timeline:
    one JSON line per CPU-layer count with ms per decode for graph building
    (pre), CPU and GPU segments, the hook's work between segments and what
    is left, segments per decode, copy waits, the CPU layers' GB/s. With
    --pp every overflow layer streams and each decode is a whole prompt;
    with --rows K each decode is K tokens of one sequence; --prompt-cpu-experts
    adds the split layers' counts per decode (CPU jobs, the hook's time in
    uploads and waiting for the CPU's part: where a split prompt's time goes)."""
    with fresh_rates_cache(), load(a, **placement(a), generate_cpu_layers="auto", calibrate_on_tokens=False, graph_reuse=False,
                                   n_ctx=max(2176, (a.pp or 0) + 128), n_batch=a.pp or a.ubatch,
                                   generate_rows=a.rows, prompt_cpu_experts=a.prompt_cpu_experts,
                                   moe_split=int(a.moe_split) if str(a.moe_split).isdigit() else a.moe_split) as m:
        e, splits, layer_bytes = m.engine, candidate_splits(m), read_model(a.model).layer_bytes
        bos, rows = max(m.token_bos(), 0), a.pp or a.rows  # rows per timed decode
        prompt = workload_tokens(m, a.pp or 1, 0, 0)[0]
        for n_cpu in [0] if a.pp else a.n_cpu or [len(m.plan.cpu_layers)]:
            if n_cpu >= len(splits):
                print(f"error: {n_cpu} CPU layers: only {len(splits) - 1} layers overflow", flush=True)
                continue
            cpu = splits[n_cpu][0]
            switch_cpu_layers(m, cpu)
            m.reset()
            m.eval([bos] * (a.pp or 5))
            e.reset_counters()
            e.timeline(True)
            for _ in range(a.n):
                if a.pp:
                    m.reset()
                bracketed(m, prompt if a.pp else [1] * a.rows)
            t, c = e.timeline_get(), e.counters()
            e.timeline(False)
            n = max(t.decodes, 1)
            emit(n_cpu=n_cpu, n_streamed=len(m.plan.generate_overflow) - n_cpu, rows=rows,
                 tokens_per_s=round(t.decodes * rows / t.wall_s, 2),
                 **{f"{k}_ms": v for k, v in timeline_ms(t).items()},
                 cpu_segments=round(t.cpu_segments / n, 1), gpu_segments=round(t.gpu_segments / n, 1),
                 uploads=round(c.uploads / n, 1), boundaries=round(c.boundaries / n, 1),
                 waits=round(c.adopted_waited / n, 2), wait_ms=round(c.wait_seconds / n * 1e3, 3),
                 cpu_gb_s=round(sum(layer_bytes[i] for i in cpu) / (t.cpu_s / n) / 1e9, 1) if cpu and t.cpu_s else None,
                 **(dict(split_layers=round(c.split_layers / n, 1), split_cpu_jobs=round(c.split_cpu / n, 1),
                         split_upload_ms=round(c.split_upload_seconds / n * 1e3, 3),
                         split_cpu_wait_ms=round(c.split_cpu_wait_seconds / n * 1e3, 3),
                         split_early_releases=round(c.split_early_releases / n, 1)) if c.split_layers else {}))


@probe("tg-paths", "a token through StreamedModel.eval and through raw llama_decode", BUDGET,
       (("--streamed",), dict(type=int, nargs="*", metavar="L", help="streamed layers (instead of a budget)")),
       (("--cpu",), dict(type=int, nargs="*", default=(), metavar="L",
                         help="with --streamed: the CPU layers while generating (default none)")),
       (("--ctx",), dict(type=int, default=2176, metavar="N", help="context cells (default 2176)")),
       N_TOKENS, ROUNDS, (("--no-reuse",), dict(action="store_true", help="rebuild every graph (default: reuse)")),
       LABEL)
def tg_paths(a) -> None:
    """One placement, one context shape; --rounds times -n tokens through
    each path (eval plus a device wait, as the bench's tg; raw decode plus a
    wait, as the engine's split trials): one JSON line per path with the
    per-token median, mean and 90th percentile (ms), the eval path's
    timeline and llama.cpp's count of reused graphs."""
    if not a.budget and a.streamed is None:
        raise ValueError("give --budget B or --streamed L ...")
    size = (dict(vram_budget=a.budget, generate_cpu_layers="auto", calibrate_on_tokens=False) if a.budget else
            dict(streamed_layers=tuple(a.streamed), n_slots=2, generate_cpu_layers=tuple(a.cpu)))
    with load(a, **size, n_ctx=a.ctx, n_batch=a.ubatch, graph_reuse=not a.no_reuse) as m:
        e, bos = m.engine, max(m.token_bos(), 0)
        emit(label=a.label, streamed=list(m.plan.streamed), cpu=list(m.plan.cpu_layers), ctx=a.ctx,
             ubatch=a.ubatch, **calibration(m))
        m.eval([bos] * 40)  # a prompt first, as in a chat (a graph of another shape)
        paths = {"eval": m, "raw": raw_decoder(m)}
        times = {path: [] for path in paths}
        e.timeline(True)
        for _ in range(a.rounds):
            for path, view in paths.items():
                m.reset()
                m.eval([bos])
                m.synchronize()
                for k in range(a.n):
                    if path == "eval":
                        e.timeline_mark(True)
                    times[path].append(1e3 / decode_tps(view, [1 + k], one_at_a_time=True))
                    if path == "eval":
                        e.timeline_mark(False)
        t = e.timeline_get()
        e.timeline(False)
        reused = reused_graphs(m)
    for path, ms in times.items():
        s = sorted(ms)
        st = dict(median=round(s[len(s) // 2], 3), mean=round(sum(s) / len(s), 3), p90=round(s[int(len(s) * 0.9)], 3))
        emit(label=a.label, path=path, **st, t_s=round(1e3 / st["mean"], 2), reused=reused,
             **({f"tl_{k}_ms": v for k, v in timeline_ms(t).items()} if path == "eval" else {}))


@probe("split-sweep", "tg for CPU-layer counts around the engine's pick, own device on and off", BUDGET,
       N_STREAMED, N_TOKENS, ROUNDS,
       (("--spread",), dict(type=int, default=2, metavar="K", help="counts chosen-K .. chosen+K (default 2)")))
def split_sweep(a) -> None:
    """Is the automatic split the fastest, and what does the own-device
    option cost, on one loaded model (load-to-load variation of a VM's CPU
    path, +-15%, is larger than the effects): fresh rates, then per round
    and own=1/0, tg for each count; one JSON line per measurement."""
    with fresh_rates_cache(), load(a, **placement(a), generate_cpu_layers="auto", calibrate_on_tokens=False, graph_reuse=False) as m:
        cal = calibration(m)
        emit(**cal)
        chosen, splits, n_overflow = cal["n_cpu"], candidate_splits(m), cal["n_overflow"]
        for rnd in range(a.rounds):
            for own in (1, 0):
                cpu_layers_own_device(m, bool(own))
                for n_cpu in range(max(chosen - a.spread, 0), min(chosen + a.spread, n_overflow) + 1):
                    switch_cpu_layers(m, splits[n_cpu][0])
                    timed(m, "tg", 4)  # warm-up
                    tps = timed(m, "tg", a.n, after_reset=m.engine.reset_counters)
                    c = m.engine.counters()
                    emit(round=rnd, own=own, n_cpu=n_cpu, tg=round(tps, 3),
                         waits_per_token=round(c.adopted_waited / a.n, 2),
                         wait_ms_per_token=round(c.wait_seconds / a.n * 1e3, 3))
        cpu_layers_own_device(m, True)  # as loaded


@probe("sched", "per-layer times with CPU layers, or llama.cpp's graph splits of one token", BUDGET, N_STREAMED,
       (("--tokens",), dict(type=int, default=8, metavar="N", help="timed tokens (default 8)")),
       (("--sched-debug",), dict(action="store_true", help="print llama.cpp's graph splits (GGML_SCHED_DEBUG=1) "
                                 "of one token between '=== one token ===' and '=== end ===' on stderr instead")),
       HOST_KV, OWN_DEVICE,
       (("--cpu-every",), dict(type=int, default=2, metavar="K", help="every K-th layer not resident while "
                               "generating is a CPU layer (1: all, so nothing uploads while generating; default 2)")))
def sched(a) -> None:
    """Per-layer times of single-token decodes (the engine's timing mode: a
    sync at every layer end), one line per layer: 'layer I KIND MS ms GB/s'."""
    debug = environ(GGML_SCHED_DEBUG="1") if a.sched_debug else contextlib.nullcontext()  # read at context creation
    with debug, load(a, **placement(a), cpu_layer_host_kv=bool(a.host_kv), cpu_layer_device=bool(a.own_device),
                     verbose=a.sched_debug, graph_reuse=False) as m:  # CPU layers chosen on the live context
        cpu = m.plan.generate_overflow[a.cpu_every - 1::a.cpu_every]
        switch_cpu_layers(m, cpu)
        print("CPU layers", cpu, file=sys.stderr)
        m.eval([1])
        m.eval([1])
        if a.sched_debug:
            print("=== one token ===", file=sys.stderr, flush=True)
            m.eval([1])
            print("=== end ===", file=sys.stderr, flush=True)
            return
        m.engine.set_timing(True)
        for _ in range(a.tokens):
            m.eval([1])
        times = m.engine.layer_times(m.plan.n_layer)
        m.engine.set_timing(False)
        plan = m.plan
        for i, (s, n) in enumerate(times):
            if n:
                kind = ("cpu" if i in plan.cpu_layers else "gen-res" if i in plan.generate_resident
                        else "streamed" if i in plan.streamed else "resident")
                per = s / n
                print(f"layer {i:2d} {kind:8s} {per * 1e3:.3f} ms  {plan.layers[i].bytes / per / 1e9:.1f} GB/s")


def anon_huge_mib() -> float:
    """Transparent huge pages backing this process's anonymous memory (MiB)."""
    with open("/proc/self/smaps_rollup") as f:
        kib = next((int(line.split()[1]) for line in f if line.startswith("AnonHugePages:")), 0)
    return kib / 1024


@probe("cpu-layers", "the automatic split's rates and tg against stock -ngl N and -ngl 0", BUDGET, N_STREAMED,
       NGL, (("-n",), dict(type=int, default=64, metavar="N", help="tg tokens (default 64)")), LABEL, HOST_KV,
       OWN_DEVICE)
def cpu_layers(a) -> None:
    """What a CPU-computed layer costs in the hybrid generate phase: fresh
    rates, then tg of the hybrid, of stock -ngl N and of stock -ngl 0 (one
    JSON line). Run once per environment variant (-t, OMP_WAIT_POLICY)."""
    out = {"label": a.label, "threads": a.threads, "host_kv": a.host_kv, "own_device": a.own_device}
    with fresh_rates_cache(), load(a, **placement(a), generate_cpu_layers="auto", calibrate_on_tokens=False, cpu_layer_host_kv=bool(a.host_kv),
                                   cpu_layer_device=bool(a.own_device)) as m:
        out.update(calibration(m))
        timed(m, "tg", 8)
        out["hybrid_tg"] = timed(m, "tg", a.n)
        out["hybrid_anon_huge_mib"] = anon_huge_mib()
    with load(a, a.ngl) as s:
        timed(s, "tg", 8)
        out["stock_tg"] = timed(s, "tg", a.n)
        out["stock_anon_huge_mib"] = anon_huge_mib()
    with load(a, 0) as s:
        timed(s, "tg", 4)
        out["stock_ngl0_tg"] = timed(s, "tg", 16)
    emit(**out)


@probe("ab-resident", "interleaved A/B: stock -ngl N against gguf-stream at a budget",
       (("--budget",), dict(default="6GiB", metavar="B", help="gguf-stream's VRAM budget (default 6GiB)")),
       (("--ngl",), dict(type=int, default=-1, metavar="N", help="stock's -ngl (default -1: every layer)")),
       PP, (("-n",), dict(type=int, default=128, metavar="N", help="tg tokens (default 128)")), ROUNDS)
def ab_resident(a) -> None:
    """Where gguf-stream picks stock's own placement: every layer (-ngl -1)
    at a budget the whole model fits in, or e.g. -ngl 1 at a budget below
    streaming's minimum. Each round loads both in turn and times pp once and
    tg twice from an empty KV cache, so run order cannot favour either."""
    for rnd in range(a.rounds):
        for name, ngl, options in ((f"stock -ngl {a.ngl}", a.ngl, {}),
                                   (f"streamed {a.budget}", None, dict(vram_budget=a.budget))):
            with load(a, ngl, **options) as m:
                timed(m, "tg", 16)  # warm-up
                pp = timed(m, "pp", a.pp)
                runs = [timed(m, "tg", a.n) for _ in range(2)]
                plan = getattr(m, "plan", None)
                how = "" if plan is None else (f"stock split -ngl {plan.stock_gpu_layers}" if plan.stock_gpu_layers
                                               is not None else f"streamed layers: {len(plan.streamed)}")
                print(rnd, name, f"pp{a.pp} {pp:.0f}", f"tg{a.n}", [round(x, 1) for x in runs], how, flush=True)


@contextlib.contextmanager
def dma_load(seconds: float):
    """A dma-hog child copying pinned host memory to the device meanwhile."""
    hog = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "dma-hog", "--seconds", str(seconds)],
                           stdout=subprocess.PIPE, text=True)
    try:
        if hog.stdout.readline().strip() != "ready":  # CUDA is up and the copies start
            raise GGUFStreamError(f"the dma-hog child did not start (exit {hog.wait()})")
        time.sleep(0.5)
        yield
    finally:
        hog.kill()
        hog.wait()


@probe("stock-under-dma", "stock's speed alone and beside a pinned host->device copy loop", NGL,
       (("-n",), dict(type=int, default=48, metavar="N", help="tg tokens (default 48)")),
       (("--pp",), dict(type=int, metavar="N", help="time prompts of N tokens (mean t/s of 3) instead of tg")))
def stock_under_dma(a) -> None:
    """tg at a CPU/GPU split gives the CPU rate the hybrid can expect while
    streaming; --pp N with everything in VRAM shows whether the copies slow
    the GPU's own compute. Two rounds, alone then beside dma-hog."""
    if llama_abi.cudart_path() is None:
        raise GGUFStreamError("stock-under-dma needs a CUDA build of llama-cpp-python (its copy loop is CUDA's)")
    test, n = ("pp", a.pp) if a.pp else ("tg", a.n)
    out = {"ngl": a.ngl, "test": f"{test}{n}", "n_ubatch": a.ubatch}
    with load(a, a.ngl, n_ctx=max(2176, (a.pp or 0) + 128), n_batch=a.pp or 2048) as s:
        def speed() -> float:
            return statistics.fmean(timed(s, test, n) for _ in range(3 if a.pp else 1))

        timed(s, "tg", 8)
        speed()
        for rep in range(2):
            out[f"alone_{rep}"] = round(speed(), 2)
            with dma_load(20):
                out[f"with_dma_{rep}"] = round(speed(), 2)
    emit(**out)


def dma_hog(a) -> None:
    """Pinned host -> device copies on a stream of their own, waiting on
    blocking syncs (a spinning wait would take a core from llama.cpp's
    threads); prints 'ready', then GB/s at the end."""
    path = llama_abi.cudart_path()  # the CUDA runtime of the llama.cpp build `import gguf_stream` loaded
    if path is None:
        raise GGUFStreamError("dma-hog needs the CUDA runtime of a CUDA build of llama-cpp-python")
    rt, n = ctypes.CDLL(path), int(a.gib * 2**30)
    rt.cudaMemcpyAsync.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    rt.cudaSetDeviceFlags(4)  # cudaDeviceScheduleBlockingSync, before anything creates the context
    dev, pinned, stream = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
    for call, rc in (("cudaMalloc", rt.cudaMalloc(ctypes.byref(dev), ctypes.c_size_t(n))),
                     ("cudaMallocHost", rt.cudaMallocHost(ctypes.byref(pinned), ctypes.c_size_t(n))),
                     ("cudaStreamCreateWithFlags", rt.cudaStreamCreateWithFlags(ctypes.byref(stream), 1))):
        if rc != 0:
            raise GGUFStreamError(f"dma-hog: {call} failed ({rc})")
    print("ready", flush=True)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < a.seconds:
        for _ in range(2):
            rt.cudaMemcpyAsync(dev, pinned, n, 1, stream)  # 1: host to device
        rt.cudaStreamSynchronize(stream)
        done += 2 * n
    emit(hog_dma_GBps=round(done / (time.perf_counter() - t0) / 1e9, 1))


# ------------------------------------------------------------ command line

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python tools/probe.py", description=__doc__.split("\n\n")[0],
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="probe", metavar="PROBE", required=True)
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("model", metavar="MODEL", help="GGUF path")
    shared.add_argument("--device", choices=("auto", "cuda", "host"), default="auto",
                        help="cuda: GPU slots; host: slots in host memory, CPU compute (a smoke run on a CPU-only "
                        "machine); auto: cuda if there is one (default auto)")
    shared.add_argument("-t", "--threads", type=int, metavar="N", help="CPU threads (default: all cores)")
    shared.add_argument("-ub", "--ubatch", type=int, default=2048, metavar="N",
                        help="n_ubatch (default 2048; 512 for slots and boundaries)")
    for name, (func, summary, options) in PROBES.items():
        p = sub.add_parser(name, parents=[shared], help=summary, description=f"{summary}.\n\n{func.__doc__}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        for flags, kw in options:
            p.add_argument(*flags, **kw)
        p.set_defaults(func=func, **({"ubatch": 512} if name in ("slots", "boundaries") else {}))
    p = sub.add_parser("dma-hog", help="pinned host->device copies for a while (stock-under-dma's child)",
                       description=dma_hog.__doc__)
    p.add_argument("--seconds", type=float, default=20.0, help="how long (default 20)")
    p.add_argument("--gib", type=float, default=2.0, help="size of each copy (default 2)")
    p.set_defaults(func=dma_hog)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        a.func(a)
    except (GGUFStreamError, ValueError, OSError) as exc:
        print(f"probe {a.probe}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
