"""Benchmark: streamed vs stock llama.cpp at the same VRAM budget.

Follows docs/performance.md: llama-bench's workload (pp = one eval of
n_prompt tokens, BOS + random ids; tg = n_gen single-token evals after it;
one warm-up; KV cleared between repetitions; t/s mean ± sample stddev), and
for every VRAM budget B the fair pair

* stock: llama.cpp's -ngl split with the largest ngl whose *measured* GPU
  memory (after an n_ubatch prompt, since compute pools grow at first use)
  fits B, found by loading candidates (binary search);
* streamed: StreamedModel(vram_budget=B);

plus the all-in-VRAM ceiling. A correctness gate (greedy tokens of stock and
streamed must agree) runs before any speed is reported. Without a GPU the
tool runs a reduced "host" comparison: stock ngl=0 vs a fixed number of
streamed layers through 2 host slots.

    python tools/bench.py -m llama3-8b --vram-budget 2.5GiB,0.75x,all -r 3
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import io
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Sequence

from .errors import GGUFStreamError
from .perfmodel import pp_bound_tps, tg_bound_seconds
from .planner import format_size, parse_size

GATE_PROMPT = "The capital of France is"
EXIT_MISMATCH = 1
EXIT_ERROR = 2


# ---------------------------------------------------------------- pure parts

@dataclass(frozen=True)
class Budget:
    """One VRAM budget of the command line; nbytes None means 'all' (the
    measured all-in-VRAM ceiling, known only after measuring it)."""

    label: str
    nbytes: int | None


def parse_budgets(spec: str, model_bytes: int) -> list[Budget]:
    """'4GiB,0.5x,all' -> budgets; 'Nx' is N times the model's weight bytes."""
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part.lower() == "all":
            out.append(Budget("all", None))
        elif part.lower().endswith("x"):
            try:
                factor = float(part[:-1])
            except ValueError:
                raise ValueError(f"cannot read budget {part!r}: use e.g. 0.5x, 4GiB or all") from None
            if factor <= 0:
                raise ValueError(f"budget factor must be positive, got {part!r}")
            out.append(Budget(part, int(factor * model_bytes)))
        else:
            out.append(Budget(part, parse_size(part)))
    if not out:
        raise ValueError(f"no budgets in {spec!r}")
    return out


@dataclass(frozen=True)
class Gate:
    """Result of comparing greedy tokens of a reference and a candidate run."""

    ok: bool
    n_compared: int
    first_mismatch: int | None  # index of the first differing token

    def describe(self) -> str:
        return "ok" if self.ok else f"MISMATCH@{self.first_mismatch}"


def check_tokens(reference: Sequence[int], candidate: Sequence[int]) -> Gate:
    """Greedy tokens must be identical, length included: streaming moves
    weights, it must not change a single result."""
    n = min(len(reference), len(candidate))
    first = next((i for i in range(n) if reference[i] != candidate[i]), None)
    if first is None and len(reference) != len(candidate):
        first = n
    return Gate(first is None, max(len(reference), len(candidate)), first)


@dataclass(frozen=True, eq=False)
class Greedy:
    """A run's gate output: greedy tokens and the logits that chose them."""

    tokens: tuple[int, ...]
    logits: object = None  # numpy (n_tokens, n_vocab) or None


NEAR_TIE = 0.005  # rms logit deviation (fraction of the logits' std) that is rounding by any account
PEER_MARGIN = 1.5  # a stock split's own deviation, times this, still passes (see gate)


def logit_noise(ref: Greedy, other: Greedy, upto: int) -> float | None:
    """Largest root-mean-square logit difference at one of positions
    0..upto, relative to the spread (std) of the reference's logits. Up to
    the first differing token both runs saw the same context, so this
    measures numerical deviation only. RMS over the vocabulary rather than
    the largest single difference: it is stable (the largest of 128k
    differences grows with how many positions are looked at), and it
    separates the cases cleanly: a CPU-computed layer's rounding, which on
    random-weight models grows through the layers, stays a small fraction
    of the std, while unrelated logits (a wrong layer) differ by ~1.4 std."""
    if ref.logits is None or other.logits is None or upto >= min(len(ref.logits), len(other.logits)):
        return None
    import numpy as np

    a, b = np.asarray(ref.logits[:upto + 1]), np.asarray(other.logits[:upto + 1])
    per_position = np.sqrt(np.mean((a - b) ** 2, axis=-1))
    return float(per_position.max() / (np.std(a) or 1.0))


def deviation_to_flip(ref: Greedy, other: Greedy) -> tuple[int | None, float | None]:
    """Where other's greedy tokens first differ from ref's (None: nowhere
    over their common length) and its logit_noise up to there."""
    n = min(len(ref.tokens), len(other.tokens))
    flip = check_tokens(ref.tokens[:n], other.tokens[:n]).first_mismatch
    return flip, logit_noise(ref, other, n - 1 if flip is None else flip)


def gate(candidate: Greedy | None, references: Sequence[tuple[str, Greedy | None]],
         allow_near_ties: bool = False, peers: Sequence[tuple[str, Greedy | None]] = ()) -> str:
    """The check column: '' with nothing to compare, 'ok' when candidate's
    tokens equal the first reference's, 'ok (=NAME)' when they equal a later
    one's, else 'MISMATCH@i' against the first, with the logit deviation.

    Several references because stock llama.cpp itself is not one answer: a
    partial -ngl computes its CPU layers with other kernels, and greedy
    tokens then flip on near ties. The candidate's deviation up to its
    first differing token is judged against NEAR_TIE, or, when larger,
    against PEER_MARGIN times the largest deviation a peer (a stock -ngl
    split of the same run) shows up to its own first differing token: each
    is one legitimate rounding of the model, and CPU layers placed
    elsewhere round about as much (the margin absorbs that spread), while
    a streaming bug (a stale or wrong slot) gives unrelated logits.
    With allow_near_ties such a flip within bounds reads 'ok (near tie @i)'."""
    refs = [(name, r) for name, r in references if r is not None and r.tokens is not None]
    if candidate is None or candidate.tokens is None or not refs:
        return ""
    for k, (name, r) in enumerate(refs):
        if check_tokens(r.tokens, candidate.tokens).ok:
            return "ok" if k == 0 else f"ok (={name})"
    name, r = refs[0]
    g = check_tokens(r.tokens, candidate.tokens)
    noise = logit_noise(r, candidate, g.first_mismatch)
    if noise is None:
        return g.describe()
    bound, what = NEAR_TIE, "rounding"
    for peer_name, peer_run in peers:
        if peer_run is None or peer_run.tokens is None:
            continue
        _, own = deviation_to_flip(r, peer_run)
        if own is not None and PEER_MARGIN * own > bound:
            bound, what = PEER_MARGIN * own, f"{PEER_MARGIN:g}x {peer_name}'s own"
    if noise <= bound and allow_near_ties:
        return f"ok (near tie @{g.first_mismatch})"
    verdict = "within" if noise <= bound else "above"
    return f"{g.describe()} (Δlogit {noise:.3f}σ rms vs {name}, {verdict} {what} {bound:.3f}σ)"


def largest_fitting(lo: int, hi: int, fits: Callable[[int], bool]) -> int | None:
    """Largest x in [lo, hi] with fits(x), for a monotone fits (true up to
    some x, false after); None if not even fits(lo). O(log) calls, each of
    which may load a model."""
    if hi < lo or not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def search_stock_ngl(n_max: int, budget: int, measure: Callable[[int], float]) -> tuple[int, float] | None:
    """(ngl, measured bytes) of the largest ngl in 0..n_max whose measured GPU
    memory fits budget, or None if even ngl=0 does not. measure(ngl) loads
    and measures (math.inf when the load fails); pass a memoized measure to
    share probes between budgets."""
    cache: dict[int, float] = {}

    def vram(ngl: int) -> float:
        if ngl not in cache:
            cache[ngl] = measure(ngl)
        return cache[ngl]

    ngl = largest_fitting(0, n_max, lambda n: vram(n) <= budget)
    return None if ngl is None else (ngl, vram(ngl))


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value), as llama-bench."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass(frozen=True)
class Row:
    """One line of the result table (one model load, one test)."""

    model: str
    size_bytes: int
    params: int
    backend: str
    budget: str
    budget_bytes: int | None
    mode: str  # "stock", "streamed" or "all-in-VRAM"
    ngl: int | None
    n_streamed: int | None
    n_slots: int | None
    streamed_bytes: int | None
    n_ubatch: int
    test: str  # "pp2048", "tg128"
    tps_mean: float | None
    tps_sd: float | None
    ratio: float | None  # to the stock row of the same budget and test
    vram_peak_bytes: int | None
    pinned_host_bytes: int | None
    waits: float | None  # per repetition
    sync_fallbacks: float | None
    uploads: float | None
    check: str  # "", "ok", "MISMATCH@i"
    note: str = ""
    n_cpu_generate: int | None = None  # streamed layers the CPU computes while generating
    n_resident_generate: int | None = None  # streamed layers resident while generating
    generate_overflow_bytes: int | None = None  # streamed bytes not resident while generating
    cpu_rate_streaming: float | None = None  # see Timing


# ------------------------------------------------------------------ rendering

def _num(v: float | None, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.{digits}f}"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _size(n: int | None) -> str:
    return "" if n is None else format_size(n)


MD_COLUMNS = ["model", "size", "params", "backend", "budget", "mode", "ngl", "streamed", "n_ubatch", "test",
              "t/s", "ratio", "peak VRAM", "pinned host", "waits/fallbacks/uploads", "check"]


def _md_cells(r: Row) -> list[str]:
    tps = "" if r.tps_mean is None else f"{r.tps_mean:.2f} ± {r.tps_sd:.2f}"
    streamed = "" if r.n_streamed is None else f"{r.n_streamed} ×{r.n_slots}"
    if r.mode == "streamed" and r.ngl is not None:
        streamed = "stock split"  # the planner's choice below streaming's minimum
    if r.n_cpu_generate and r.test.startswith("tg"):
        streamed += f", {r.n_cpu_generate} on CPU"
    if r.n_resident_generate and r.test.startswith("tg"):
        streamed += f", {r.n_resident_generate} resident"
    counters = "" if r.waits is None else f"{_num(r.waits)}/{_num(r.sync_fallbacks)}/{_num(r.uploads)}"
    check = r.check if r.check in ("", "ok") else f"**{r.check}**"
    return [r.model, _size(r.size_bytes), _params(r.params), r.backend, r.budget, r.mode,
            "" if r.ngl is None else str(r.ngl), streamed, str(r.n_ubatch), r.test, tps or r.note,
            "" if r.ratio is None else f"{r.ratio:.2f}", _size(r.vram_peak_bytes), _size(r.pinned_host_bytes),
            counters, check]


@dataclass(frozen=True)
class BenchResult:
    rows: tuple[Row, ...]
    meta: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def mismatch(self) -> bool:
        return any(r.check.startswith("MISMATCH") for r in self.rows)


def render_md(result: BenchResult) -> str:
    right = {"size", "params", "ngl", "streamed", "n_ubatch", "t/s", "ratio", "peak VRAM", "pinned host",
             "waits/fallbacks/uploads"}
    lines = ["| " + " | ".join(MD_COLUMNS) + " |",
             "| " + " | ".join("---:" if c in right else ":---" for c in MD_COLUMNS) + " |"]
    lines += ["| " + " | ".join(_md_cells(r)) + " |" for r in result.rows]
    if result.mismatch:
        lines += ["", "**MISMATCH: streamed greedy tokens differ from stock; speeds above are not comparable.**"]
    lines += [""] + [f"- {n}" for n in result.notes]
    return "\n".join(lines) + "\n"


def render_csv(result: BenchResult) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[f.name for f in fields(Row)], lineterminator="\n")
    w.writeheader()
    for r in result.rows:
        w.writerow({k: "" if v is None else v for k, v in asdict(r).items()})
    return buf.getvalue()


def render_json(result: BenchResult) -> str:
    return json.dumps({"meta": result.meta, "rows": [asdict(r) for r in result.rows],
                       "notes": list(result.notes), "mismatch": result.mismatch}, indent=2) + "\n"


RENDERERS = {"md": render_md, "csv": render_csv, "json": render_json}


# Runs in a child process: on the CUDA box, importing matplotlib into a
# process that has llama.cpp's libraries loaded crashes (a segfault in the
# same family as the numpy import-order one), and a chart is not worth that.
# The script needs only matplotlib and the JSON rows (argv: JSON, PNG).
_PLOT_SCRIPT = r"""
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
doc = json.load(open(sys.argv[1]))
rows = [r for r in doc["rows"] if r["tps_mean"] is not None]
tests = sorted({r["test"] for r in rows}, key=lambda t: not t.startswith("pp"))
fig, axes = plt.subplots(1, len(tests), figsize=(6 * len(tests), 4), squeeze=False)
for ax, test in zip(axes[0], tests):
    these = [r for r in rows if r["test"] == test]
    budgets = list(dict.fromkeys(r["budget"] for r in these if r["mode"] != "all-in-VRAM"))
    for k, mode in enumerate(("stock", "streamed")):
        vals = [next((r["tps_mean"] for r in these if r["budget"] == b and r["mode"] == mode), 0) for b in budgets]
        ax.bar([i + 0.4 * k for i in range(len(budgets))], vals, width=0.4, label=mode)
    for r in these:
        if r["mode"] == "all-in-VRAM":
            ax.axhline(r["tps_mean"], color="gray", linestyle="--", label="all in VRAM")
    ax.set_xticks([i + 0.2 for i in range(len(budgets))], budgets)
    ax.set_xlabel("VRAM budget")
    ax.set_ylabel("t/s")
    ax.set_title(doc["meta"].get("model", "") + " " + test)
    ax.legend()
fig.tight_layout()
fig.savefig(sys.argv[2])
"""


def plot(result: BenchResult, path: str) -> str:
    """Bar chart of t/s per budget (stock vs streamed, the ceiling as a
    line), drawn by a child process; returns a line for stderr. A missing
    matplotlib is a note, not a failed benchmark."""
    import importlib.util
    import subprocess
    import tempfile

    if importlib.util.find_spec("matplotlib") is None:
        return f"--plot {path} skipped: matplotlib is not installed (`pip install matplotlib`)"
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        f.write(render_json(result))
        f.flush()
        proc = subprocess.run([sys.executable, "-c", _PLOT_SCRIPT, f.name, str(path)],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        return f"--plot {path} failed: {(proc.stderr.strip().splitlines() or [f'exit {proc.returncode}'])[-1]}"
    return f"plot written to {path}"


# ------------------------------------------------------------------- running

class Progress:
    """Status lines with elapsed time on stderr (stdout carries the table)."""

    def __init__(self, quiet: bool = False, stream=None):
        self.quiet, self.stream, self.t0 = quiet, stream or sys.stderr, time.perf_counter()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.t0:7.1f} s] {msg}", file=self.stream, flush=True)


@dataclass(frozen=True)
class Workload:
    n_prompt: int = 2048
    n_gen: int = 128
    n_batch: int = 2048
    n_ubatch: int = 2048
    reps: int = 3
    check_tokens: int = 16
    seed: int = 42
    n_threads: int | None = None

    @property
    def n_ctx(self) -> int:
        """Room for the timed workload and for the gate's prompt + tokens."""
        return max(self.n_prompt + self.n_gen, 64 + self.check_tokens, 64)


@dataclass(frozen=True)
class Timing:
    """What one loaded model measured: gate tokens, t/s per rep, counters."""

    greedy: Greedy | None
    pp: tuple[float, ...]
    tg: tuple[float, ...]
    counters: dict  # test -> (waits, sync fallbacks, uploads) per rep, or None
    vram_peak: int | None
    pinned: int
    plan: object = None
    engine_note: str = ""  # the engine's own measured rates and predicted token time
    cpu_rate_streaming: float | None = None  # engine-measured CPU-layer bytes/s while uploads run beside


def _counter_tuple(model):
    c = model.stats.counters
    return None if c is None else (c.adopted_waited, c.sync_fallbacks, c.uploads)


def time_model(model, w: Workload, progress: Progress, label: str) -> Timing:
    """Gate tokens, one warm-up, then w.reps timed repetitions of pp and of
    tg, each from an empty KV cache as llama-bench runs them."""
    import numpy as np

    greedy = None
    if w.check_tokens:
        toks, logits = model.generate(model.tokenize(GATE_PROMPT), w.check_tokens, with_logits=True)
        greedy = Greedy(tuple(toks), logits)
    rng = np.random.default_rng(w.seed)
    bos = max(model.token_bos(), 0)
    pp = [bos] + rng.integers(0, model.n_vocab, max(w.n_prompt - 1, 0)).tolist() if w.n_prompt else []
    tg = rng.integers(0, model.n_vocab, w.n_gen).tolist()
    if tg:
        tg[0] = bos  # llama-bench: tg is its own test, from an empty KV cache, starting at BOS

    def one_rep():
        times, ctrs = {}, {}
        for test, toks, single in (("pp", pp, False), ("tg", tg, True)):
            if not toks:
                continue
            model.reset()  # as llama-bench: each test from an empty KV cache
            c0, t0 = _counter_tuple(model), time.perf_counter()
            for chunk in ([[t] for t in toks] if single else [toks]):
                model.eval(chunk)
                model.synchronize()
            times[test] = len(toks) / (time.perf_counter() - t0)
            c1 = _counter_tuple(model)
            ctrs[test] = None if c0 is None else tuple(b - a for a, b in zip(c0, c1))
        return times, ctrs

    progress(f"{label}: warm-up")
    model.reset()
    if pp:
        model.eval(pp)
    if tg:
        model.eval(tg[:1])
    model.synchronize()
    runs = []
    for r in range(w.reps):
        progress(f"{label}: repetition {r + 1}/{w.reps}")
        runs.append(one_rep())
    counters = {}
    for test in ("pp", "tg"):
        per = [c[test] for _, c in runs if c.get(test) is not None]
        counters[test] = tuple(sum(x) / len(per) for x in zip(*per)) if per else None
    st = model.stats
    return Timing(greedy, tuple(t["pp"] for t, _ in runs if "pp" in t), tuple(t["tg"] for t, _ in runs if "tg" in t),
                  counters, st.vram_peak_bytes, st.pinned_host_bytes, getattr(model, "plan", None))


def weights_per_token(mf) -> int:
    """Bytes a single-token decode reads: every layer, plus the output matrix
    (token_embd when tied); the input embedding is one row, ignored."""
    out = mf.tensor("output.weight") or mf.tensor("token_embd.weight")
    return sum(mf.layer_bytes) + (out.nbytes if out else 0)


def count_params(mf) -> int:
    return sum(math.prod(t.shape) for t in mf.tensors)


def measure_h2d_bandwidth(nbytes: int = 256 << 20, reps: int = 5) -> tuple[dict | None, str]:
    """Host->device copy rate in bytes/s from pinned and pageable memory,
    through the libcudart llama.cpp itself loaded (no torch needed, and no
    second CUDA runtime in the process). Returns (rates or None, note)."""
    from . import llama_abi

    path = llama_abi.cudart_path()
    if path is None:
        return None, "host->device bandwidth not measured: no CUDA runtime in this process"
    rt = ctypes.CDLL(path)
    dev, pinned = ctypes.c_void_p(), ctypes.c_void_p()
    if rt.cudaMalloc(ctypes.byref(dev), ctypes.c_size_t(nbytes)) != 0:
        return None, "host->device bandwidth not measured: cudaMalloc failed"
    try:
        if rt.cudaMallocHost(ctypes.byref(pinned), ctypes.c_size_t(nbytes)) != 0:
            return None, "host->device bandwidth not measured: cudaMallocHost failed"
        try:
            ctypes.memset(pinned, 1, nbytes)
            pageable = ctypes.create_string_buffer(nbytes)
            rates = {}
            for name, src in (("pinned", pinned.value), ("pageable", ctypes.addressof(pageable))):
                for timed in (False, True):  # one untimed copy first
                    t0 = time.perf_counter()
                    for _ in range(reps if timed else 1):
                        rt.cudaMemcpy(dev, ctypes.c_void_p(src), ctypes.c_size_t(nbytes), 1)  # 1: host to device
                    rt.cudaDeviceSynchronize()
                rates[name] = nbytes * reps / (time.perf_counter() - t0)
        finally:
            rt.cudaFreeHost(pinned)
    finally:
        rt.cudaFree(dev)
    return rates, (f"host->device copy: {rates['pinned'] / 1e9:.1f} GB/s pinned, "
                   f"{rates['pageable'] / 1e9:.1f} GB/s pageable ({nbytes >> 20} MiB x {reps}, cudaMemcpy)")


# ---------------------------------------------------------------- the driver

@dataclass
class _Ctx:
    """Everything the row builders share for one model."""

    path: str
    mf: object
    w: Workload
    backend: str
    device: str
    progress: Progress
    model_name: str
    allow_near_ties: bool = False
    stock_times: dict = field(default_factory=dict)  # ngl -> Timing (reused across budgets)

    def config(self, **kw):
        from .config import EngineConfig

        # streamed runs use the measured CPU+PCIe split while generating
        kw.setdefault("generate_cpu_layers", "auto")
        return EngineConfig(n_ctx=self.w.n_ctx, n_batch=self.w.n_batch, n_ubatch=self.w.n_ubatch,
                            flash_attn=True, device=self.device, n_threads=self.w.n_threads, **kw)

    def rows(self, t: Timing | None, *, budget: Budget, mode: str, ngl=None, note="", check="",
             stock: Timing | None = None) -> list[Row]:
        out = []
        for test, n in (("pp", self.w.n_prompt), ("tg", self.w.n_gen)):
            if not n:
                continue
            vals = getattr(t, test) if t else ()
            mean, sd = mean_sd(vals) if vals else (None, None)
            ref = mean_sd(getattr(stock, test))[0] if stock and getattr(stock, test) else None
            ctr = t.counters.get(test) if t else None
            plan = t.plan if t else None
            if plan is not None and plan.stock_gpu_layers is not None:
                ngl = plan.stock_gpu_layers
            out.append(Row(
                model=self.model_name, size_bytes=self.mf.total_bytes, params=count_params(self.mf),
                backend=self.backend, budget=budget.label, budget_bytes=budget.nbytes, mode=mode, ngl=ngl,
                n_streamed=len(plan.streamed) if plan is not None else None,
                n_cpu_generate=len(plan.cpu_layers) if plan is not None else None,
                n_resident_generate=len(plan.generate_resident) if plan is not None else None,
                generate_overflow_bytes=plan.generate_overflow_bytes if plan is not None else None,
                n_slots=plan.n_slots if plan is not None else None,
                streamed_bytes=plan.streamed_bytes if plan is not None else None,
                n_ubatch=self.w.n_ubatch, test=f"{test}{n}", tps_mean=mean, tps_sd=sd,
                ratio=mean / ref if mean is not None and ref else None,
                vram_peak_bytes=t.vram_peak if t else None,
                # StockModel reports 0 pinned bytes although its CPU layers are pinned on CUDA: leave it blank
                pinned_host_bytes=t.pinned if t and mode == "streamed" and plan and plan.streamed else None,
                waits=ctr[0] if ctr else None, sync_fallbacks=ctr[1] if ctr else None,
                uploads=ctr[2] if ctr else None, check=check, note=note,
                cpu_rate_streaming=t.cpu_rate_streaming if t else None))
        return out

    def run_stock(self, ngl: int) -> Timing:
        from .model import StockModel

        if ngl not in self.stock_times:
            self.progress(f"loading stock ngl={ngl}")
            with StockModel(self.path, ngl, config=self.config()) as m:
                self.stock_times[ngl] = time_model(m, self.w, self.progress, f"stock ngl={ngl}")
        return self.stock_times[ngl]

    def run_streamed(self, **kw) -> Timing:
        from .model import StreamedModel

        self.progress(f"loading streamed {kw}")
        with StreamedModel(self.path, config=self.config(**kw)) as m:
            if m.plan is None:
                return time_model(m, self.w, self.progress, "streamed")
            self.progress(f"plan: {len(m.plan.streamed)}/{m.plan.n_layer} layers streamed, "
                          f"{m.plan.n_slots} slot(s); while generating the CPU computes {m.plan.cpu_layers}, "
                          f"{m.plan.generate_resident} stay resident")
            cal, notes, cpu_rate = m.calibration, [], None
            if cal is not None:
                r = cal.rates
                cpu_rate = r.cpu_bytes_per_s
                trials = ", ".join(f"{n}: {1 / t:.1f}" for n, t in sorted(cal.split_trials.items()))
                notes.append(f"engine-measured rates: PCIe {r.pcie_bytes_per_s / 1e9:.1f} GB/s, CPU layers "
                             f"{r.cpu_bytes_per_s / 1e9:.1f} GB/s, GPU part of a token (timed layer by layer) "
                             f"{r.gpu_token_seconds * 1e3:.2f} ms; "
                             f"splits timed (CPU layers: t/s) {trials}, chosen {len(m.plan.cpu_layers)} "
                             f"(the rates predict {1 / cal.predicted_token_seconds:.1f} t/s for it)")
                self.progress(notes[-1])
            timing = time_model(m, self.w, self.progress, "streamed")
            c = m.stats.counters
            if m.plan.cpu_layers:
                notes.append(f"CPU layers' repacked copy {format_size(c.repacked_bytes)} (pageable host memory); "
                             f"their KV caches in host memory while generating {format_size(c.host_kv_bytes)}")
            if m.plan.generate_resident:
                notes.append(f"{c.gen_resident} of {len(m.plan.generate_resident)} generate-resident layers in the "
                             f"compute buffer's tail at the end ({format_size(c.compute_buffer_bytes)} buffer, of which "
                             f"generate graphs used {format_size(c.generate_extent)})")
            return replace(timing, engine_note="; ".join(notes), cpu_rate_streaming=cpu_rate)

    def measure_stock_vram(self, ngl: int) -> float | None:
        """GPU bytes of a stock load after one n_ubatch prompt (compute pools
        grow at first use); inf when llama.cpp cannot load it."""
        from .model import stock_vram_peak

        self.progress(f"probing stock ngl={ngl}")
        try:
            peak = stock_vram_peak(self.path, ngl, self.config())
        except GGUFStreamError as exc:
            self.progress(f"  ngl={ngl} does not load: {exc}")
            return math.inf
        # StockModel measures no VRAM at ngl=0 (no layer on the GPU): None, counted as fitting
        self.progress(f"  ngl={ngl}: {format_size(peak) if peak is not None else 'not measured'}")
        return None if peak is None else float(peak)


def _greedy(t: Timing | None) -> Greedy | None:
    return None if t is None else t.greedy


def run_host(ctx: _Ctx, n_streamed: int | None) -> tuple[list[Row], list[str]]:
    """Reduced mode without a GPU: budgets mean nothing, so compare stock
    ngl=0 with a fixed set of streamed layers through 2 host slots."""
    n = n_streamed if n_streamed is not None else ctx.mf.n_layer // 2
    budget = Budget(f"host ({n}/{ctx.mf.n_layer} streamed)", None)
    stock = ctx.run_stock(0)
    rows = ctx.rows(stock, budget=budget, mode="stock", ngl=0, stock=stock)
    try:
        streamed = ctx.run_streamed(n_streamed=n, n_slots=min(2, n) if n else None)
        check = gate(_greedy(streamed), [("stock", _greedy(stock))], ctx.allow_near_ties)
        rows += ctx.rows(streamed, budget=budget, mode="streamed", check=check, stock=stock)
    except GGUFStreamError as exc:
        rows += ctx.rows(None, budget=budget, mode="streamed", note=f"error: {exc}")
    notes = ["host mode (no GPU): VRAM budgets do not apply; stock is ngl=0, streamed runs "
             f"{n} of {ctx.mf.n_layer} layers through 2 host-memory slots (CPU compute, memcpy uploads)"]
    if stock.tg:
        rate = weights_per_token(ctx.mf) * mean_sd(stock.tg)[0]
        notes.append(f"CPU path: stock ngl=0 tg {mean_sd(stock.tg)[0]:.2f} t/s x "
                     f"{format_size(weights_per_token(ctx.mf))} of weights per token = {rate / 1e9:.2f} GB/s effective")
    return rows, notes


def run_gpu(ctx: _Ctx, budgets: list[Budget], forced_ngl: int | None, ceiling: bool,
            cpu_rate_tokens: int) -> tuple[list[Row], list[str], dict]:
    """Per budget: stock at the largest fitting measured ngl, streamed at the
    same budget; plus the all-in-VRAM ceiling; then the bounds of performance.md."""
    from . import native

    notes, extra = [], {}
    ctx.progress("measuring host->device bandwidth")
    bw, bw_note = measure_h2d_bandwidth()
    notes.append(bw_note)
    extra["h2d_bytes_per_s"] = bw
    n_all = ctx.mf.n_layer + 1  # llama.cpp counts the output layer as one more
    probes: dict[int, float | None] = {}  # None: loaded, but StockModel measured no VRAM (ngl=0)

    def measure(ngl: int) -> float:
        if ngl not in probes:
            probes[ngl] = ctx.measure_stock_vram(ngl)
        return probes[ngl] or 0.0

    rows: list[Row] = []
    ceiling_t = None
    if ceiling or any(b.nbytes is None for b in budgets):
        if math.isfinite(measure(n_all)):
            ceiling_t = ctx.run_stock(n_all)
            if ceiling:
                total = native.device_memory("CUDA0")[1]
                rows += ctx.rows(ceiling_t, budget=Budget("device", total), mode="all-in-VRAM", ngl=n_all)
        else:
            notes.append("all-in-VRAM ceiling skipped: the whole model does not load on this device")
    for b in sorted(budgets, key=lambda b: math.inf if b.nbytes is None else b.nbytes):  # see _peers
        if b.nbytes is None:
            if ceiling_t is None:
                continue
            b = Budget("all", int(measure(n_all)))
        ctx.progress(f"budget {b.label} ({format_size(b.nbytes)})")
        choice = (forced_ngl, None) if forced_ngl is not None else search_stock_ngl(n_all, b.nbytes, measure)
        rows += _budget_rows(ctx, b, None if choice is None else choice[0], ceiling_t, notes)
    if probes:
        notes.append(f"stock VRAM probes (after an n_ubatch={ctx.w.n_ubatch} prompt): " + ", ".join(
            f"ngl={k}: " + ("not measured" if v is None else format_size(int(v)) if math.isfinite(v) else "failed")
            for k, v in sorted(probes.items())))
    notes.append("gate: streamed greedy tokens must equal the all-in-VRAM run's ('ok') or the same budget's "
                 "stock run's ('ok (=stock ngl=N)'); otherwise MISMATCH with the logit deviation up to the first "
                 "differing token, next to the largest deviation from all-in-VRAM that a stock -ngl split of this run "
                 "shows over the same tokens (CPU layers round differently; on random-weight models that grows to "
                 "tenths of a std; a wrong layer gives unrelated logits). --allow-near-ties passes flips within it")
    cpu_rate = _cpu_rate(ctx, cpu_rate_tokens, notes)
    extra["cpu_bytes_per_s"] = cpu_rate
    if ceiling_t and bw and cpu_rate:
        notes += _bounds(ctx, rows, ceiling_t, bw["pinned"], cpu_rate)
    return rows, notes, extra


def _budget_rows(ctx: _Ctx, b: Budget, ngl: int | None, ceiling: Timing | None, notes: list[str]) -> list[Row]:
    """Stock at ngl and streamed at budget b. The gate compares streamed
    with the all-in-VRAM tokens when there are some, else with this stock."""
    rows, stock = [], None
    if ngl is None:
        rows += ctx.rows(None, budget=b, mode="stock", note="no ngl fits")
    else:
        stock = ctx.run_stock(ngl)
        over = stock.vram_peak is not None and stock.vram_peak > b.nbytes
        rows += ctx.rows(stock, budget=b, mode="stock", ngl=ngl, stock=stock, note="over budget" if over else "")
        own = gate(_greedy(stock), [("all-in-VRAM", _greedy(ceiling))])
        if own not in ("", "ok"):
            notes.append(f"budget {b.label}: stock ngl={ngl} itself differs from all-in-VRAM ({own}: "
                         "its CPU layers round differently)")
    try:
        streamed = ctx.run_streamed(vram_budget=b.nbytes)
    except GGUFStreamError as exc:
        notes.append(f"budget {b.label}: streamed run failed: {exc}")
        return rows + ctx.rows(None, budget=b, mode="streamed", note=f"error: {type(exc).__name__}")
    refs = [("all-in-VRAM", _greedy(ceiling)), (f"stock ngl={ngl}", _greedy(stock))]
    check = gate(_greedy(streamed), refs, ctx.allow_near_ties, _peers(ctx, ngl, stock, ceiling))
    rows += ctx.rows(streamed, budget=b, mode="streamed", check=check, stock=stock)
    if streamed.engine_note:
        notes.append(f"budget {b.label}: {streamed.engine_note}")
    if streamed.vram_peak is not None and streamed.vram_peak > b.nbytes:
        notes.append(f"budget {b.label}: streamed peak {format_size(streamed.vram_peak)} exceeds the budget")
    return rows


def _peers(ctx: _Ctx, ngl: int | None, stock: Timing | None, ceiling: Timing | None):
    """The stock runs whose own deviation from all-in-VRAM calibrates the
    gate: this budget's first, then every other partial -ngl run so far
    (budgets run smallest first, so the largest budget sees them all). Each
    is one legitimate way of rounding the same model."""
    if ceiling is None:
        return []
    peers = [(f"stock ngl={ngl}", stock.greedy)] if stock is not None and stock is not ceiling else []
    peers += [(f"stock ngl={k}", t.greedy) for k, t in sorted(ctx.stock_times.items())
              if t is not ceiling and t is not stock and t.greedy is not None]
    return peers


def _cpu_rate(ctx: _Ctx, n_tokens: int, notes: list[str]) -> float | None:
    """Effective CPU weight-streaming rate: stock ngl=0 single-token decodes
    times the bytes each one reads (the 'c' of performance.md's tg bound)."""
    if n_tokens <= 0:
        return None
    w = ctx.w
    cpu_ctx = replace(ctx, w=replace(w, n_prompt=0, n_gen=n_tokens, reps=1, check_tokens=0), stock_times={})
    t = cpu_ctx.run_stock(0)
    tps = mean_sd(t.tg)[0]
    rate = tps * weights_per_token(ctx.mf)
    notes.append(f"CPU path: stock ngl=0 tg{n_tokens} {tps:.2f} t/s x {format_size(weights_per_token(ctx.mf))} "
                 f"per token = {rate / 1e9:.2f} GB/s effective")
    return rate


def _bounds(ctx: _Ctx, rows: list[Row], ceiling: Timing, bandwidth: float, cpu_rate: float) -> list[str]:
    """performance.md's bounds for each streamed row, next to what it reached."""
    out = []
    G = 1 / mean_sd(ceiling.tg)[0] if ceiling.tg else None
    pp_ceiling = mean_sd(ceiling.pp)[0] if ceiling.pp else None
    for r in rows:
        if r.mode != "streamed" or r.tps_mean is None or r.streamed_bytes is None:
            continue
        if r.ngl is not None:  # below streaming's minimum: stock's own split is the bound
            if r.ratio:
                out.append(f"bound {r.budget} {r.test}: the stock split (nothing can stream at this budget); "
                           f"reached {r.ratio:.2f}x stock")
            continue
        O = r.streamed_bytes
        if r.test.startswith("pp") and pp_ceiling:
            bound = pp_bound_tps(ctx.w.n_prompt, ctx.w.n_ubatch, pp_ceiling, O, bandwidth)
        elif r.test.startswith("tg") and G:
            # every byte not resident while generating crosses once per token
            O = r.generate_overflow_bytes if r.generate_overflow_bytes is not None else O
            bound = 1 / tg_bound_seconds(G, 1 / cpu_rate, 1 / bandwidth, O)
        else:
            continue
        line = (f"bound {r.budget} {r.test}: {bound:.2f} t/s with {format_size(O)} "
                f"{'not resident while generating' if r.test.startswith('tg') else 'streamed'}; "
                f"reached {r.tps_mean:.2f} ({100 * r.tps_mean / bound:.0f}%)")
        if r.test.startswith("tg") and O != r.streamed_bytes:
            # the same bound with the prompt's overflow (what the budget leaves out of VRAM)
            whole = 1 / tg_bound_seconds(G, 1 / cpu_rate, 1 / bandwidth, r.streamed_bytes)
            line += (f"; with all {format_size(r.streamed_bytes)} streamed for prompts crossing "
                     f"{whole:.2f} t/s ({100 * r.tps_mean / whole:.0f}%)")
        if r.test.startswith("tg") and r.cpu_rate_streaming:
            # the CPU and the copy engine read the same host memory: the CPU
            # rate the engine measured while uploads run beside it
            shared = 1 / tg_bound_seconds(G, 1 / r.cpu_rate_streaming, 1 / bandwidth, O)
            line += (f"; with the CPU rate measured while streaming ({r.cpu_rate_streaming / 1e9:.1f} GB/s) "
                     f"{shared:.2f} t/s ({100 * r.tps_mean / shared:.0f}%)")
        out.append(line)
    return out


# ----------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None, help="model name from models.toml or a GGUF path "
                    "(default: the registry default, gemma3-270m)")
    ap.add_argument("-p", "--n-prompt", type=int, default=2048, help="prompt tokens of the pp test (0: none)")
    ap.add_argument("-n", "--n-gen", type=int, default=128, help="generated tokens of the tg test (0: none)")
    ap.add_argument("-b", "--batch-size", type=int, default=2048)
    ap.add_argument("-ub", "--ubatch-size", type=int, default=2048)
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--vram-budget", default="0.5x,0.75x,all",
                    help="comma list: sizes (4GiB), fractions of the model's weight bytes (0.5x), all")
    ap.add_argument("--device", choices=("auto", "cuda", "host"), default="auto")
    ap.add_argument("--ngl", type=int, default=None, help="force the stock ngl instead of searching")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the all-in-VRAM row")
    ap.add_argument("--n-streamed", type=int, default=None, help="host mode: streamed layers (default: half)")
    ap.add_argument("--check-tokens", type=int, default=16, help="greedy tokens of the correctness gate (0: off)")
    ap.add_argument("--allow-mismatch", action="store_true", help="exit 0 even when the gate fails")
    ap.add_argument("--allow-near-ties", action="store_true",
                    help=f"pass a token flip whose rms logit deviation is within {NEAR_TIE} std, or within "
                    f"{PEER_MARGIN:g}x the largest deviation of a stock -ngl split of the run from all-in-VRAM")
    ap.add_argument("--cpu-rate-tokens", type=int, default=16,
                    help="GPU mode: tokens of the stock ngl=0 run that measures the CPU path (0: skip)")
    ap.add_argument("--output", choices=sorted(RENDERERS), default="md")
    ap.add_argument("--plot", metavar="PNG", default=None, help="bar chart (needs matplotlib)")
    ap.add_argument("--seed", type=int, default=42, help="seed of the random prompt/tg token ids")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    return ap


def run(args: argparse.Namespace, progress: Progress | None = None) -> BenchResult:
    """Resolve the model, pick the mode, run, and collect rows and notes."""
    from .gguf_file import read_model
    from .models import load_registry, resolve
    from .config import cuda_available

    progress = progress or Progress(args.quiet)
    if min(args.n_prompt, args.n_gen, args.repetitions - 1, args.check_tokens) < 0 or \
            args.n_prompt + args.n_gen == 0:
        raise ValueError("-p/-n/--check-tokens must be >= 0 (not both -p and -n zero) and -r >= 1")
    path = resolve(args.model, progress=progress)
    mf = read_model(path)
    progress(f"model {path} ({mf.arch}, {mf.n_layer} layers, {format_size(mf.total_bytes)})")
    w = Workload(args.n_prompt, args.n_gen, args.batch_size, min(args.ubatch_size, args.batch_size),
                 args.repetitions, args.check_tokens, args.seed, args.threads)
    use_cuda = args.device != "host" and cuda_available()
    if args.device == "cuda" and not use_cuda:
        raise GGUFStreamError("--device cuda: this llama-cpp-python build has no CUDA device")
    # a registry name as given; a file by its stem; the default by its registry name
    name = path.stem if args.model and Path(args.model).expanduser().exists() else args.model or load_registry().default
    ctx = _Ctx(str(path), mf, w, "CUDA" if use_cuda else "CPU", "cuda" if use_cuda else "host", progress, name,
               args.allow_near_ties)
    meta = {"model": ctx.model_name, "path": str(path), "arch": mf.arch, "n_layer": mf.n_layer,
            "size_bytes": mf.total_bytes, "backend": ctx.backend, "mode": "gpu" if use_cuda else "host",
            "workload": asdict(w), "command": " ".join(sys.argv)}
    if use_cuda:
        budgets = parse_budgets(args.vram_budget, mf.total_bytes)
        rows, notes, extra = run_gpu(ctx, budgets, args.ngl, not args.no_ceiling, args.cpu_rate_tokens)
        meta.update(extra)
    else:
        rows, notes = run_host(ctx, args.n_streamed)
    notes.append(f"workload: pp{w.n_prompt} tg{w.n_gen}, n_batch {w.n_batch}, n_ubatch {w.n_ubatch}, "
                 f"flash attention on, {w.reps} repetition(s) after a warm-up; t/s mean ± sample sd; counters "
                 f"per repetition; gate: {w.check_tokens} greedy tokens after {GATE_PROMPT!r}")
    return BenchResult(tuple(rows), meta, tuple(notes))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = Progress(args.quiet)
    try:
        result = run(args, progress)
    except (GGUFStreamError, ValueError) as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    sys.stdout.write(RENDERERS[args.output](result))
    if args.plot:
        print(plot(result, args.plot), file=sys.stderr)
    if result.mismatch:
        print("bench: MISMATCH between stock and streamed greedy tokens", file=sys.stderr)
        return 0 if args.allow_mismatch else EXIT_MISMATCH
    return 0


if __name__ == "__main__":
    sys.exit(main())
