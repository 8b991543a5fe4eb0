"""The batched bench (llama.cpp's llama-batched-bench, stock beside streamed):
aggregate generation t/s with 1, 2, 4, ... parallel sequences in one
context, and the cost of a verify decode of k tokens relative to one.

Every load of one budget shares one context shape: n_seq_max = the largest
-npl, n_ctx = that many sequences x (-npp + -ntg) cells, so stock and
streamed hold the same KV cache and stock's -ngl is searched with it (the
largest ngl whose measured GPU memory after an -ub prompt fits the budget,
bench/budgets.py). A parallel row: npl sequences each get an -npp token
prompt (BOS + random ids, decoded one sequence at a time, not timed), then
-ntg steps each decoding one token of every sequence (batch.py); aggregate
tg t/s = npl x ntg / the steps' time. A verify row: after an -npp prompt, a
decode of k tokens with logits for every one (what a speculative pass
checks), its time over a 1-token decode's; median of -r after a warm-up.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field

from ..errors import GGUFStreamError
from ..memory import format_size
from .budgets import Budget, search_stock_ngl
from .timing import Progress

# The acceptance (#18), checked per budget when the rows are there
ACCEPT_PARALLEL = 16
ACCEPT_VS_SINGLE = 8.0  # aggregate tg at 16 sequences >= 8x the single-sequence streamed tg
ACCEPT_VS_STOCK = 2.0  # ... and >= 2x stock's aggregate at 16
ACCEPT_VERIFY_K = 8
ACCEPT_VERIFY_COST = 1.3  # a verify decode of 8 tokens <= 1.3x a 1-token decode


@dataclass(frozen=True)
class BatchedWorkload:
    n_prompt: int = 128  # -npp: prompt tokens per sequence
    n_gen: int = 32  # -ntg: generation steps
    parallel: tuple[int, ...] = (1, 2, 4, 8, 16, 32)  # -npl
    verify: tuple[int, ...] = (1, 2, 4, 8, 16)  # --verify: tokens per verify decode
    n_batch: int = 2048
    n_ubatch: int = 512
    reps: int = 3
    seed: int = 42
    n_threads: int | None = None
    n_threads_batch: int | None = None  # -tb: decodes of several rows (both sides)
    kv_unified: bool = False  # -kvu: one KV cache the sequences share

    def __post_init__(self):
        if self.n_prompt < 1 or self.n_gen < 1 or self.reps < 1:
            raise ValueError("-npp, -ntg and -r must be at least 1")
        for name, values in (("-npl", self.parallel), ("--verify", self.verify)):
            if not values or any(not 1 <= v <= 256 for v in values):
                raise ValueError(f"{name} needs numbers in 1..256, got {values}")
        if max(self.verify) > self.n_batch:
            raise ValueError(f"--verify {max(self.verify)} exceeds -b {self.n_batch}")

    @property
    def n_seq_max(self) -> int:
        return max(self.parallel)

    @property
    def n_ctx(self) -> int:
        """Every sequence's prompt and generation, plus room for the largest
        verify after a prompt, padded as llama.cpp pads each sequence's cells."""
        from ..memory import kv_cells

        need = self.n_seq_max * (self.n_prompt + max(self.n_gen + 1, max(self.verify)))
        return kv_cells(need, 1 if self.kv_unified else self.n_seq_max)


@dataclass
class Run:
    """One loaded model of one budget: its label, what it measured."""

    budget: str
    budget_bytes: int | None
    mode: str  # "stock ngl=N" or "streamed" / "streamed, no CPU layers"
    plan: str = ""
    tg: dict[int, float] = field(default_factory=dict)  # npl -> aggregate tg t/s (median of the repetitions)
    tg_reps: dict[int, list[float]] = field(default_factory=dict)  # npl -> each repetition's t/s (error bars)
    verify: dict[int, float] = field(default_factory=dict)  # k -> seconds per decode
    vram_peak: int | None = None
    cpu_layers: int = 0  # CPU layers of a streamed run's generate split
    n_slots: int = 0  # a streamed run's slots
    n_streamed: int = 0  # ... and streamed layers


def _prompts(model, w: BatchedWorkload, npl: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(w.seed)
    bos = max(model.token_bos(), 0)
    return [[bos] + rng.integers(0, model.n_vocab, w.n_prompt - 1).tolist() for _ in range(npl)]


def time_parallel(model, w: BatchedWorkload, npl: int) -> list[float]:
    """Aggregate tg t/s of npl sequences, each of w.reps repetitions after a warm-up."""
    prompts = _prompts(model, w, npl)
    model.generate_batch(prompts, 2, stop_at_eog=False)  # warm-up: graphs and pools of this shape
    rates = []
    for _ in range(w.reps):
        r = model.generate_batch(prompts, w.n_gen + 1, stop_at_eog=False)  # the first token is the prompt's
        rates.append(npl * w.n_gen / r.generate_seconds)
    return rates


def time_verify(model, w: BatchedWorkload, k: int) -> float:
    """Seconds of a decode of k tokens (logits for each) after an n_prompt prompt, median of w.reps."""
    from ..batch import TokenBatch, _decode

    lc = model._lc
    prompt = _prompts(model, w, 1)[0]
    model.reset()
    model.eval(prompt)
    mem = lc.llama_get_memory(model.ctx)
    batch = TokenBatch(lc, k)
    try:
        batch.fill([(prompt[-1 - j], w.n_prompt + j, 0, True) for j in range(k)])
        times = []
        for _ in range(w.reps + 1):
            t0 = time.perf_counter()
            _decode(model, batch)
            model.synchronize()
            times.append(time.perf_counter() - t0)
            lc.llama_memory_seq_rm(mem, 0, w.n_prompt, -1)
    finally:
        batch.close()
    return statistics.median(times[1:])


def measure(model, run: Run, w: BatchedWorkload, progress: Progress, only: int | None = None) -> Run:
    """Every row of the workload (only: those of that many sequences / verify tokens)."""
    for npl in w.parallel:
        if only not in (None, npl):
            continue
        progress(f"{run.budget} {run.mode}: {npl} sequence(s)")
        run.tg_reps[npl] = time_parallel(model, w, npl)
        run.tg[npl] = statistics.median(run.tg_reps[npl])
        progress(f"  aggregate tg {run.tg[npl]:.2f} t/s")
    for k in w.verify:
        if only in (None, k):
            run.verify[k] = time_verify(model, w, k)
    run.vram_peak = model.stats.vram_peak_bytes
    return run


@dataclass
class BatchedBench:
    """What the bench needs of the model and machine."""

    path: str
    n_layer: int
    w: BatchedWorkload
    device: str  # "cuda" or "host"
    progress: Progress
    generate_cpu_layers: object = "auto"
    max_slots: int | None = None  # streamed loads' --max-slots (None: the engine's, per row count)

    def config(self, **kw):
        from ..config import EngineConfig

        return EngineConfig(n_ctx=self.w.n_ctx, n_batch=self.w.n_batch, n_ubatch=self.w.n_ubatch,
                            n_seq_max=self.w.n_seq_max, kv_unified=self.w.kv_unified, flash_attn=True, device=self.device,
                            n_threads=self.w.n_threads, n_threads_batch=self.w.n_threads_batch,
                            **{"calibrate_on_tokens": False, **kw})

    def stock(self, b: Budget, ngl: int) -> Run:
        from ..model import StockModel

        run = Run(b.label, b.nbytes, f"stock ngl={ngl}")
        self.progress(f"loading {run.mode}")
        with StockModel(self.path, ngl, config=self.config()) as m:
            return measure(m, run, self.w, self.progress)

    def stock_within(self, b: Budget, ngl: int) -> Run:
        """Stock at ngl, with one GPU layer fewer at a time while the
        workload's measured peak is over the budget: stock_ngl measures one
        sequence's ubatch, k sequences' decodes can peak higher (8B at 0.25x
        with 16: -ngl 5 probed within 1.05 GiB, its run peaked at 1.07)."""
        run = self.stock(b, ngl)
        while run.vram_peak is not None and run.vram_peak > b.nbytes and ngl > 0:
            self.progress(f"stock ngl={ngl} peaked at {format_size(run.vram_peak)}, over the budget: "
                          f"ngl={ngl - 1}")
            ngl -= 1
            run = self.stock(b, ngl)
        return run

    def streamed(self, b: Budget, placement: dict, rows_on_gpu: bool = False, rows: int = 1,
                 only_rows: bool = False) -> Run:
        """A streamed load with the generate split for `rows` rows (one
        sequence by default, not the context's n_seq_max); only_rows: it
        measures only the rows of that many sequences / that verify."""
        from ..model import StreamedModel
        from .sweep import plan_line

        mode = ("streamed, k rows on the GPU" if rows_on_gpu else
                "streamed" if rows == 1 else f"streamed, split for {rows}")
        run = Run(b.label, b.nbytes, mode)
        self.progress(f"loading {mode}")
        config = self.config(generate_cpu_layers=self.generate_cpu_layers, generate_rows=rows,
                             cpu_layers_max_batch=1 if rows_on_gpu else None, max_slots=self.max_slots,
                             **placement)
        with StreamedModel(self.path, config=config) as m:
            plan = m.plan
            run.plan = plan_line(plan) if plan is not None else "all layers resident"
            if plan is not None:
                run.cpu_layers, run.n_slots, run.n_streamed = len(plan.cpu_layers), plan.n_slots, len(plan.streamed)
            return measure(m, run, self.w, self.progress, rows if only_rows else None)

    def split_per_rows(self, b: Budget, placement: dict, single: Run) -> Run:
        """What a run gets with the generate split measured for the rows it
        decodes (EngineConfig.generate_rows): one load per row count of the
        workload, each measuring its own parallel / verify row; one row is
        `single`'s (the split for one token). A verify's cost is then over
        the best single-token decode, what speculative decoding must beat."""
        def one_row(d: dict) -> dict:
            return {1: d[1]} if 1 in d else {}

        run = Run(b.label, b.nbytes, "streamed, split per rows", tg=one_row(single.tg),
                  tg_reps=one_row(single.tg_reps), verify=one_row(single.verify), vram_peak=single.vram_peak,
                  cpu_layers=single.cpu_layers)
        splits = [f"1 row: {single.cpu_layers}"]
        for rows in sorted((set(self.w.parallel) | set(self.w.verify)) - {1}):
            r = self.streamed(b, placement, rows=rows, only_rows=True)
            run.tg.update(r.tg)
            run.tg_reps.update(r.tg_reps)
            run.verify.update(r.verify)
            peaks = [v for v in (run.vram_peak, r.vram_peak) if v is not None]
            run.vram_peak = max(peaks) if peaks else None
            # a load whose split is for many rows may stream one layer more, through a third slot
            other = (f" ({r.n_streamed} streamed through {r.n_slots} slots)"
                     if (r.n_slots, r.n_streamed) != (single.n_slots, single.n_streamed) else "")
            splits.append(f"{rows}: {r.cpu_layers}{other}")
        run.plan = f"{single.plan}; CPU layers of the split for k rows: " + ", ".join(splits)
        return run

    def stock_ngl(self, b: Budget) -> int | None:
        """The largest -ngl whose measured GPU memory with this context fits the budget."""
        from ..model import stock_vram_peak

        def vram(ngl: int) -> float:
            self.progress(f"probing stock ngl={ngl}")
            try:
                peak = stock_vram_peak(self.path, ngl, self.config())
            except GGUFStreamError:
                return math.inf
            return 0.0 if peak is None else float(peak)

        found = search_stock_ngl(self.n_layer + 1, b.nbytes, vram)
        return None if found is None else found[0]

    def budget_runs(self, b: Budget, placement: dict, stock_ngl: int | None) -> list[Run]:
        """Stock at its ngl, streamed with the configured generate split (for
        one row), and where that split has CPU layers - they compute all k
        rows of a bigger decode - also: with the measured split ('auto') the
        split measured per row count (split_per_rows); with given CPU
        layers, every decode of 2 or more rows in the prompt placement
        (cpu_layers_max_batch=1: all k rows on the GPU, the CPU layers streamed)."""
        runs = [] if stock_ngl is None else [self.stock_within(b, stock_ngl)]
        first = self.streamed(b, placement)
        runs.append(first)
        if first.cpu_layers and self.generate_cpu_layers == "auto":
            runs.append(self.split_per_rows(b, placement, first))
        elif first.cpu_layers:
            runs.append(self.streamed(b, placement, rows_on_gpu=True))
        return runs


# ------------------------------------------------------------------ report

def checks(runs: list[Run]) -> list[str]:
    """The issue's acceptance, per budget, where the rows are there."""
    out = []
    budgets = dict.fromkeys(r.budget for r in runs)
    for label in budgets:
        rs = [r for r in runs if r.budget == label]
        stock = next((r for r in rs if r.mode.startswith("stock")), None)
        streamed = [r for r in rs if r.mode.startswith("streamed")]
        if not streamed:
            continue
        for r in streamed:
            if "below streaming's minimum" in r.plan:
                out.append(f"{label}: {r.mode}: nothing streams: with the KV cache of the largest -npl the budget "
                           "is below streaming's minimum (llama.cpp's own split ran); measure fewer sequences here")
        n = ACCEPT_PARALLEL
        single = max((r.tg.get(1, 0.0) for r in streamed), default=0.0)
        best = max(streamed, key=lambda r: r.tg.get(n, 0.0))
        if n in best.tg and single:
            ratio = best.tg[n] / single
            out.append(f"{label}: {best.mode} aggregate tg at {n} sequences {best.tg[n]:.2f} t/s = {ratio:.2f}x the "
                       f"best single-sequence streamed tg ({single:.2f}); want >= {ACCEPT_VS_SINGLE:g}x: "
                       + ("PASS" if ratio >= ACCEPT_VS_SINGLE else "FAIL"))
            if stock is not None and stock.tg.get(n):
                ratio = best.tg[n] / stock.tg[n]
                out.append(f"{label}: ... = {ratio:.2f}x {stock.mode}'s aggregate at {n} ({stock.tg[n]:.2f}); want "
                           f">= {ACCEPT_VS_STOCK:g}x: " + ("PASS" if ratio >= ACCEPT_VS_STOCK else "FAIL"))
        for r in streamed:
            k = ACCEPT_VERIFY_K
            if k in r.verify and 1 in r.verify:
                cost = r.verify[k] / r.verify[1]
                out.append(f"{label}: {r.mode} verify decode of {k} tokens costs {cost:.2f}x a 1-token decode; "
                           f"want <= {ACCEPT_VERIFY_COST:g}x: " + ("PASS" if cost <= ACCEPT_VERIFY_COST else "FAIL"))
        for r in rs:
            if r.budget_bytes is not None and r.vram_peak is not None:
                out.append(f"{label}: {r.mode} peak VRAM {format_size(r.vram_peak)} vs budget "
                           f"{format_size(r.budget_bytes)}: " + ("PASS" if r.vram_peak <= r.budget_bytes else "FAIL"))
    return out


def _num(v: float | None, digits: int = 2) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def render_md(runs: list[Run], w: BatchedWorkload, notes: list[str]) -> str:
    lines = []
    for label in dict.fromkeys(r.budget for r in runs):
        rs = [r for r in runs if r.budget == label]
        stock = next((r for r in rs if r.mode.startswith("stock")), None)
        lines += [f"### budget {label}" + (f" ({format_size(rs[0].budget_bytes)})" if rs[0].budget_bytes else ""),
                  ""]
        lines += [f"- {r.mode}: {r.plan or 'llama.cpp -ngl split'}; peak VRAM "
                  f"{format_size(r.vram_peak) if r.vram_peak is not None else 'n/a'}" for r in rs]
        head = ["parallel sequences"] + [f"{r.mode} tg t/s" for r in rs]
        head += [f"{r.mode} / {stock.mode}" for r in rs if stock is not None and r is not stock]
        head += [f"{r.mode} / its 1 sequence" for r in rs]
        lines += ["", "| " + " | ".join(head) + " |", "|" + " ---: |" * len(head)]
        for n in w.parallel:
            cells = [str(n)] + [_num(r.tg.get(n)) for r in rs]
            cells += [_num(r.tg[n] / stock.tg[n] if stock.tg.get(n) and n in r.tg else None)
                      for r in rs if stock is not None and r is not stock]
            cells += [_num(r.tg[n] / r.tg[1] if r.tg.get(1) and n in r.tg else None) for r in rs]
            lines.append("| " + " | ".join(cells) + " |")
        head = ["verify decode of k tokens"] + [f"{r.mode} ms" for r in rs] + [f"{r.mode} / 1 token" for r in rs]
        lines += ["", "| " + " | ".join(head) + " |", "|" + " ---: |" * len(head)]
        for k in w.verify:
            cells = [str(k)] + [_num(r.verify[k] * 1e3) if k in r.verify else "" for r in rs]
            cells += [_num(r.verify[k] / r.verify[1] if r.verify.get(1) and k in r.verify else None) for r in rs]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines + [f"- {n}" for n in notes]) + "\n"


def render_json(runs: list[Run], w: BatchedWorkload, notes: list[str], meta: dict | None = None) -> str:
    """The rows as JSON (meta: {"model": name} for the chart's titles)."""
    return json.dumps({"meta": meta or {}, "workload": asdict(w), "runs": [asdict(r) for r in runs], "notes": notes},
                      indent=1) + "\n"


def load_json(text: str) -> tuple[list[Run], BatchedWorkload, list[str]]:
    """render_json's document read back: (runs, workload, notes), for re-rendering."""
    doc = json.loads(text)
    w = doc["workload"]
    w = BatchedWorkload(**{**w, "parallel": tuple(w["parallel"]), "verify": tuple(w["verify"])})
    runs = [Run(**{**r, **{key: {int(k): v for k, v in r.get(key, {}).items()} for key in ("tg", "tg_reps", "verify")}})
            for r in doc["runs"]]
    return runs, w, doc["notes"]
