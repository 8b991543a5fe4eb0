"""Timing one loaded model as llama-bench does, and the host->device copy rate.

llama-bench's workload: pp = one eval of n_prompt tokens, BOS + random ids;
tg = n_gen single-token evals from an empty KV cache, BOS first; every eval
waited for (llama.cpp's decode may return before the GPU is done); one
warm-up; KV cleared between tests. The probes in tools/ time with the same
workload_tokens and decode_tps.
"""
from __future__ import annotations

import ctypes
import sys
import time
from dataclasses import dataclass

from .gate import GATE_PROMPT, Greedy


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
    flash_attn: bool = True
    type_k: str = "f16"  # KV cache types (llama.cpp's -ctk / -ctv)
    type_v: str = "f16"

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


def workload_tokens(model, n_prompt: int, n_gen: int, seed: int) -> tuple[list[int], list[int]]:
    """The pp and tg tokens: BOS + random ids each (tg is its own test, from
    an empty KV cache, starting at BOS); either is empty when its n is 0."""
    import numpy as np

    rng = np.random.default_rng(seed)
    bos = max(model.token_bos(), 0)
    pp = [bos] + rng.integers(0, model.n_vocab, max(n_prompt - 1, 0)).tolist() if n_prompt else []
    tg = rng.integers(0, model.n_vocab, n_gen).tolist()
    if tg:
        tg[0] = bos
    return pp, tg


def decode_tps(model, tokens: list[int], one_at_a_time: bool) -> float:
    """t/s of evaluating tokens after what the KV cache holds: in one eval
    (pp) or one eval per token (tg), waiting for the device after each."""
    t0 = time.perf_counter()
    for chunk in ([[t] for t in tokens] if one_at_a_time else [tokens]):
        model.eval(chunk)
        model.synchronize()
    return len(tokens) / (time.perf_counter() - t0)


def _counter_tuple(model):
    """(waits, sync fallbacks, uploads, disk bytes, disk read seconds, disk wait seconds) so far."""
    c = model.stats.counters
    return None if c is None else (c.adopted_waited, c.sync_fallbacks, c.uploads, c.disk_bytes,
                                   c.disk_read_seconds, c.disk_wait_seconds)


def gate_tokens(model, n: int) -> Greedy | None:
    """The gate's n greedy tokens after GATE_PROMPT and their logits (None for n = 0)."""
    if not n:
        return None
    toks, logits = model.generate(model.tokenize(GATE_PROMPT), n, with_logits=True)
    return Greedy(tuple(toks), logits)


def time_model(model, w: Workload, progress: Progress, label: str) -> Timing:
    """Gate tokens, one warm-up, then w.reps timed repetitions of pp and of
    tg, each from an empty KV cache as llama-bench runs them."""
    greedy = gate_tokens(model, w.check_tokens)
    pp, tg = workload_tokens(model, w.n_prompt, w.n_gen, w.seed)

    def one_rep():
        times, ctrs = {}, {}
        for test, toks, single in (("pp", pp, False), ("tg", tg, True)):
            if not toks:
                continue
            model.reset()  # as llama-bench: each test from an empty KV cache
            c0 = _counter_tuple(model)
            times[test] = decode_tps(model, toks, single)
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


def measure_h2d_bandwidth(nbytes: int = 256 << 20, reps: int = 5) -> tuple[dict | None, str]:
    """Host->device copy rate in bytes/s from pinned and pageable memory,
    through the libcudart llama.cpp itself loaded (no torch needed, and no
    second CUDA runtime in the process). Returns (rates or None, note)."""
    from .. import llama_abi

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
