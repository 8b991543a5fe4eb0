"""The result: one Row per model load and test, and their statistics."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Sequence


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value), as llama-bench."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def count_params(mf) -> int:
    return sum(math.prod(t.shape) for t in mf.tensors)


@dataclass(frozen=True)
class Row:
    """One line of the result table (one model load, one test)."""

    model: str
    size_bytes: int
    params: int
    backend: str
    budget: str
    budget_bytes: int | None
    mode: str  # "stock", "stock-moe" (-ngl all --n-cpu-moe N), "streamed" or "all-in-VRAM"
    ngl: int | None
    n_streamed: int | None
    n_slots: int | None
    streamed_bytes: int | None
    n_ubatch: int
    test: str  # "pp2048", "tg128"
    tps_mean: float | None
    tps_sd: float | None
    ratio: float | None  # to the (faster, see ratio_vs) stock row of the same budget and test
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
    n_cpu_moe: int | None = None  # stock-moe: the expert tensors of layers 0..N-1 stay in host memory
    ratio_vs: str = ""  # the mode of the stock row ratio is to, where a budget has two stock recipes (MoE)
    host_budget: str = ""  # --host-budget of a streamed run with a disk tier ("" without one)
    n_disk: int | None = None  # streamed parts on the disk tier
    disk_bytes: float | None = None  # per repetition: bytes read from the GGUF file (the disk tier)
    disk_rate: float | None = None  # those reads' bytes/s (in the reader, page cache dropped or not)
    disk_overlap: float | None = None  # share of the read time hidden behind compute (Counters.disk_overlap)


@dataclass(frozen=True)
class BenchResult:
    rows: tuple[Row, ...]
    meta: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def mismatch(self) -> bool:
        return any(r.check.startswith("MISMATCH") for r in self.rows)
