"""VRAM budgets of the command line, stock's largest fitting -ngl, and for a
mixture-of-experts model stock's smallest fitting --n-cpu-moe."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..memory import parse_size


@dataclass(frozen=True)
class Budget:
    """One VRAM budget of the command line; nbytes None means 'all' (the
    measured all-in-VRAM ceiling, known only after measuring it)."""

    label: str
    nbytes: int | None


def is_relative(budget) -> bool:
    """A budget written as 'Nx' (N times the model's bytes), not a size."""
    return isinstance(budget, str) and budget.strip().lower().endswith("x")


def parse_budgets(spec: str, model_bytes: int) -> list[Budget]:
    """'4GiB,0.5x,all' -> budgets; 'Nx' is N times the model's weight bytes."""
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part.lower() == "all":
            out.append(Budget("all", None))
        elif is_relative(part):
            try:
                factor = float(part[:-1])
            except ValueError:
                raise ValueError(f"cannot read budget {part!r}: use e.g. 0.5x, 4GiB or all") from None
            if not 0 < factor < float("inf"):
                raise ValueError(f"budget factor must be a positive number, got {part!r}")
            out.append(Budget(part, int(factor * model_bytes)))
        else:
            out.append(Budget(part, parse_size(part)))
    if not out:
        raise ValueError(f"no budgets in {spec!r}")
    return out


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


def smallest_fitting(lo: int, hi: int, fits: Callable[[int], bool]) -> int | None:
    """Smallest x in [lo, hi] with fits(x), for a monotone fits (false up to
    some x, true from there on); None if not even fits(hi). O(log) calls."""
    if hi < lo or not fits(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _memoized(measure: Callable[[int], float]) -> Callable[[int], float]:
    """measure, asked once per argument (each call may load a model)."""
    cache: dict[int, float] = {}

    def vram(n: int) -> float:
        if n not in cache:
            cache[n] = measure(n)
        return cache[n]

    return vram


def search_stock_ngl(n_max: int, budget: int, measure: Callable[[int], float]) -> tuple[int, float] | None:
    """(ngl, measured bytes) of the largest ngl in 0..n_max whose measured GPU
    memory fits budget, or None if even ngl=0 does not. measure(ngl) loads
    and measures (math.inf when the load fails); pass a memoized measure to
    share probes between budgets."""
    vram = _memoized(measure)
    ngl = largest_fitting(0, n_max, lambda n: vram(n) <= budget)
    return None if ngl is None else (ngl, vram(ngl))


def search_stock_n_cpu_moe(n_layer: int, budget: int, measure: Callable[[int], float]) -> tuple[int, float] | None:
    """(n, measured bytes) of the smallest n in 0..n_layer whose
    `-ngl all --n-cpu-moe n` load fits budget, or None if even n=n_layer
    does not. The GPU memory falls as n grows (the experts of the first n
    layers stay in host memory; attention, router and KV stay on the GPU),
    and the fewer experts on the CPU the faster: the smallest n that fits is
    llama.cpp's best MoE recipe at this budget. measure(n) as in
    search_stock_ngl."""
    vram = _memoized(measure)
    n = smallest_fitting(0, n_layer, lambda k: vram(k) <= budget)
    return None if n is None else (n, vram(n))
