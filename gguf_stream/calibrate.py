"""Measured on this machine, once per model: which streamed layers the CPU
computes while generating (the generate split), and the rates behind it.

The performance model (perfmodel.py) predicts a token's time for every split
from three rates: p from timed uploads of a streamed layer, c and G from one
short generation with a sample of the overflow layers on the CPU, timed
layer by layer. Splits near its best are then timed, from three CPU layers
up (FIRST_TRIAL_MORE_CPU_LAYERS), against their neighbours: the rates come
from separate measurements (the GPU part timed with a sync per layer), and
the two paths slow each other down in ways they do not capture (shared host
memory). Measured: the fastest split had 3-5 more CPU layers than the
model's pick, 3-15% faster. Both results are cached per machine, model and
overflow.

The rates are measured in one short-lived context of its own, before the
real context exists (its memory is free then), on the first load of a model
on a machine only. The splits are timed by default on the first generated
tokens (LiveSplit: the run starts at the search's first split and the
Streamer changes CPU layers between decodes, so the load waits for the
rates only and no token is decoded for timing alone); with
calibrate_on_tokens=False (the bench) in that context too, before the load
returns (Calibrator.time_splits). One search (SplitSearch) serves both. What it costs is counted (Calibration.decodes, .seconds,
.parts) and said on stderr with progress on: the rates' tokens, then each
timed split's. Its largest costs on a big model are the timed tokens and
repacking CPU layers, so nothing is done twice: a layer repacked once keeps
its copy for the whole search (gs_engine_keep_repacks; the splits'
interleaved CPU sets differ by several layers from one count to the next,
and the search comes back), the rates' sample is taken from the layers most
splits put on the CPU, the chosen split's copies are the run's, and a
neighbour's decodes stop once its median is sure to be slower.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from . import native
from .errors import BudgetError, DecodeError
from .perfmodel import Rates, best_split, generate_splits, split_cpu_layers
from .progress import note
from .split_cache import RatesCache, cache_key, fastest_split

CALIBRATION_BATCH = 8
CALIBRATION_TOKENS = 3  # single-token decodes timed per layer (the first is a warm-up)
# CPU layers during calibration: a sample, so that at most this much is
# repacked for it (host memory, load time); the others stream meanwhile, as
# they will while generating (the CPU then shares host memory with the DMA).
CALIBRATION_CPU_BYTES = 1 << 29
CALIBRATION_CPU_LAYERS = 4
# Where a first load's calibration goes (Calibration.parts, said with its
# result): creating its context, the rates (uploads timed, the sample's
# repack, its decodes), changing CPU layers between splits (repacking the
# layers added, KV moves), the splits' timed decodes (warm-ups included),
# and closing (the chosen split set, the context freed, the other trials'
# repacked copies dropped).
CALIBRATION_PARTS = ("context", "rates", "split set-up", "split decodes", "closing")
# Timed single-token decodes per split (after a warm-up), median taken: on the
# GPU box one split's decodes vary by ~1%, a CPU layer more or less moves the
# time by 3-7%, so 3 tell them apart (8 cost the first load 0.6 s on the 8B).
SPLIT_TRIAL_TOKENS = 3
SPLIT_TRIAL_WARMUP = 1
# A split whose measured token is within this of its streamed bytes' time
# over PCIe (p x) is stream-bound: one more CPU layer takes a layer off the
# link, so the search keeps climbing through it even where noise made it no
# faster than the fastest so far. On the GPU box stream-bound splits of the
# 32B-class measured -2% to +3% of p x, while one CPU layer is 3% of a token
# (a first load's search stopped at 6 CPU layers where 19 were 1.5x faster).
STREAM_BOUND_TOLERANCE = 0.04
# The search starts this many CPU layers above the model's pick: the rates'
# GPU part of a token is timed layer by layer, a sync each, and runs several
# times the real one, so the pick is low. The fastest split measured on the
# GPU box had 3-5 more (8B at 0.5x: picks 6, 7, 7 -> fastest 9, 10, 12; the
# 32B-class at 8 GiB: 15 -> 20). Replayed on those four searches' recorded
# trials, starting 3 above times 3-4 splits where 1 above timed 4-6, with
# the same choice (the 32B's first load: 6 splits, 5.8 s of calibration).
# Decodes of k rows too: the 8B's 8-row searches started at the pick (0 and 1)
# stopped there, one CPU layer no faster than none, where 7-8 were 1.3x faster
# (8-row decodes at 0.5x per CPU-layer count: 52, 62, 49, 42, 41, 44 ms for
# 0, 2, .., 10; BENCHMARKS.md, twelfth session).
FIRST_TRIAL_MORE_CPU_LAYERS = 3


@dataclass(frozen=True)
class Calibration:
    """What the automatic generate split was chosen from."""

    rates: Rates
    # CPU-layer count -> measured seconds per decode (of `rows` rows): the median of
    # its timed decodes, or for a split slower than the chosen one possibly a
    # lower bound of it (its decodes stopped once it was sure to be slower)
    split_trials: dict[int, float]
    predicted_token_seconds: float  # the performance model's time for the chosen split
    decodes: int = 0  # decodes this load ran to measure (0: all from the cache)
    seconds: float = 0.0  # wall time of choosing the split, measurements included
    rows: int = 1  # rows per timed decode (EngineConfig.split_rows)
    # where `seconds` went (CALIBRATION_PARTS; empty: from the cache)
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def cached(self) -> bool:
        return self.decodes == 0


def rates_sample(overflow: tuple[int, ...], n: int, most: int | None = None) -> tuple[int, ...]:
    """n overflow layers for the rates' CPU sample: those that are CPU
    layers in the most of the splits (up to `most` CPU layers) that can hold
    n of them, so that their repacked copies (kept through the search) serve
    the timed splits too. In a dense model the layers are alike: any n
    measure the same rate."""
    count = dict.fromkeys(overflow, 0)
    for n_cpu in range(n, (len(overflow) if most is None else min(most, len(overflow))) + 1):
        for i in split_cpu_layers(overflow, n_cpu):
            count[i] += 1
    return tuple(sorted(sorted(overflow, key=lambda i: -count[i])[:n]))


class SplitSearch:
    """Which split is fastest, one timed decode at a time: split `start`
    first (where the search starts), then its neighbours one CPU layer at a
    time (more first), for as long as they are faster (up: or stream-bound,
    STREAM_BOUND_TOLERANCE). Each split gets
    SPLIT_TRIAL_WARMUP decodes, then SPLIT_TRIAL_TOKENS timed ones, median
    taken; a neighbour's decodes stop once its median is sure to be slower
    than the fastest so far (it then holds a lower bound of its median,
    which is still slower). `current` is the split (CPU-layer count) the
    next decode must run with, None once done; feed() takes that decode's
    seconds. The same search serves a first load's own timed decodes
    (Calibrator.time_splits) and the first generated tokens (LiveSplit)."""

    def __init__(self, n_splits: int, start: int, stream_seconds=None):
        self.n_splits = n_splits
        # per split, its streamed bytes' time over PCIe (None: not known)
        self.stream_seconds = stream_seconds
        self.trials: dict[int, float] = {}   # as Calibration.split_trials
        self.bounds: set[int] = set()        # trials that are lower bounds
        self.decodes: dict[int, int] = {}    # decodes run per split, warm-ups included
        self._walk = self._search(min(max(start, 0), n_splits - 1))
        self.current: int | None = next(self._walk)

    def feed(self, seconds: float) -> None:
        """The seconds of one decode run with split `current`."""
        if self.current is None:
            raise RuntimeError("the split search is over")
        self.decodes[self.current] = self.decodes.get(self.current, 0) + 1
        try:
            self.current = self._walk.send(seconds)
        except StopIteration:
            self.current = None

    @property
    def best(self) -> int:
        """The fastest split timed (fastest_split)."""
        return fastest_split(self.trials)

    def said(self, n_cpu: int, decode: str, how: str) -> str:
        """One line on split n_cpu's result; `how`: what it cost."""
        bound, why = (">= ", "slower either way; ") if n_cpu in self.bounds else ("", "")
        return (f"split with {n_cpu} CPU layers: {bound}{self.trials[n_cpu] * 1e3:.1f} ms per {decode} "
                f"({why}{how})")

    def stream_bound(self, n_cpu: int) -> bool:
        """Whether split n_cpu measured what its streamed bytes take over
        PCIe (STREAM_BOUND_TOLERANCE): then more CPU layers can be faster."""
        return (self.stream_seconds is not None
                and self.trials[n_cpu] <= (1 + STREAM_BOUND_TOLERANCE) * self.stream_seconds[n_cpu])

    def _search(self, start: int):
        fastest = yield from self._time(start, None)
        for step in (1, -1):
            n, moved = start + step, False
            while 0 <= n < self.n_splits:
                t = yield from self._time(n, fastest)
                if t < fastest:
                    fastest, moved = t, True
                elif step < 0 or not self.stream_bound(n):  # up: on through stream-bound splits
                    break
                n += step
            if moved:
                break

    def _time(self, n_cpu: int, fastest: float | None):
        for _ in range(SPLIT_TRIAL_WARMUP):
            yield n_cpu
        # this many samples above `fastest` put the median (index T // 2) above it
        enough = SPLIT_TRIAL_TOKENS - SPLIT_TRIAL_TOKENS // 2
        times, slower = [], []
        while len(times) < SPLIT_TRIAL_TOKENS and len(slower) < enough:
            times.append((yield n_cpu))
            slower = sorted(t for t in times if fastest is not None and t > fastest)
        if len(times) < SPLIT_TRIAL_TOKENS:
            # a lower bound of the median: at most T // 2 samples could have come in below the least of these
            self.trials[n_cpu] = slower[0]
            self.bounds.add(n_cpu)
        else:
            self.trials[n_cpu] = sorted(times)[len(times) // 2]
        return self.trials[n_cpu]


class Calibrator:
    """Measures one loaded model through its Streamer (between loading the
    model and creating the context that will decode). The CPU layers are
    chosen among `choices` (default: the generate overflow), at most `most`
    of them (a host budget's room for their copies; default: all)."""

    def __init__(self, streamer, model, choices: tuple[int, ...] | None = None, most: int | None = None):
        self.s, self.model = streamer, model
        total = native.device_memory("CUDA0")[1] if streamer.cuda else None
        self.cache = RatesCache(cache_key(streamer.path, streamer.config, total))
        self.choices = tuple(streamer.plan.generate_overflow if choices is None else choices)
        self.most = len(self.choices) if most is None else min(most, len(self.choices))
        # rows of every timed decode: the split is chosen for decodes of that many
        self.rows = streamer.config.split_rows
        self.decodes = 0  # decodes run so far (decode_token)
        self.parts = dict.fromkeys(CALIBRATION_PARTS, 0.0)  # seconds, as Calibration.parts
        self.keep_cpu_layers: tuple[int, ...] = ()  # left set when the calibration context closes without error
        self.rates: Rates | None = None  # once measured or read from the cache

    def choose_split(self) -> tuple[tuple[int, ...], Calibration]:
        """The CPU layers of the fastest split that was timed. What the
        cache lacks is measured in one context, whose CPU layers are left
        at the chosen split (their repacked copies serve the run)."""
        cpu, calibration, _ = self.start_split(live=False)
        return cpu, calibration

    def start_split(self, live: bool) -> tuple[tuple[int, ...], Calibration | None, LiveSplit | None]:
        """(CPU layers, calibration, None) as choose_split; with live=True,
        where the cache lacks the splits' timings, the search is left to the
        first generated tokens: (the CPU layers it starts from, None, the
        LiveSplit the Streamer feeds). The rates are measured here either way."""
        t0 = time.perf_counter()
        overflow = self.choices
        rates, trials = self.cache.rates(), self.cache.split_trials(overflow, self.most)
        start = None
        if rates is None or (trials is None and not live):
            self._say("calibrating the generate split (first load of this model on this machine; cached in "
                      f"{self.cache.path} for the next ones" + ("; its splits are timed on the first generated "
                                                                "tokens)" if live and trials is None else ")"))
            t = time.perf_counter()
            with self.context() as ctx:
                t = self._spent("context", t)
                self._say(f"  calibration context ready in {self.parts['context']:.2f} s")
                if rates is None:
                    rates = self.measure_rates(ctx)
                    t = self._spent("rates", t)
                self.rates = rates
                splits = self._splits(rates)
                if trials is None:
                    start = self._search_start(splits)
                    if not live:
                        trials = self.time_splits(splits, start, ctx)
                t = time.perf_counter()
                n_cpu = start if trials is None else fastest_split(trials)
                self.s.engine.set_cpu_layers(splits[n_cpu][0])
                self.keep_cpu_layers = splits[n_cpu][0]
            self._spent("closing", t)
        else:
            self.rates = rates
            splits = self._splits(rates)
            if trials is None:  # live, the rates cached: the search starts without a context of its own
                start = self._search_start(splits)
        if trials is None:
            search = LiveSplit(self, splits, start, rates, time.perf_counter() - t0)
            rates_from = f"measured in {time.perf_counter() - t0:.1f} s" if self.decodes else "from the cache"
            self._say(f"generate split: the CPU computes {start} of {len(overflow)} overflow layers while generating "
                      f"to start with; the fastest split is timed on the first generated tokens (rates {rates_from})")
            return splits[start][0], None, search
        n_cpu = fastest_split(trials)
        cpu, predicted = splits[n_cpu]
        parts = {k: v for k, v in self.parts.items() if v} if self.decodes else {}
        calibration = Calibration(rates, trials, predicted, self.decodes, time.perf_counter() - t0, self.rows, parts)
        self._say(f"generate split: the CPU computes {n_cpu} of {len(overflow)} overflow layers while generating "
                  f"({trials[n_cpu] * 1e3:.1f} ms per {self._decode} measured; "
                  + (f"from {self.cache.path})" if calibration.cached else
                     f"calibrated in {calibration.seconds:.1f} s: {self.decodes} timed decodes, "
                     f"{len(trials)} splits; " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()) + " s)"))
        return cpu, calibration, None

    def _search_start(self, splits) -> int:
        """Where the split search starts: FIRST_TRIAL_MORE_CPU_LAYERS above
        the model's pick, for decodes of any row count (their rates' GPU
        part is timed layer by layer too)."""
        return min(best_split(splits) + FIRST_TRIAL_MORE_CPU_LAYERS, len(splits) - 1)

    def _spent(self, part: str, since: float) -> float:
        """Count the time since `since` to `part`; returns now."""
        now = time.perf_counter()
        self.parts[part] += now - since
        return now

    def stream_seconds(self, splits) -> list[float] | None:
        """Per split, its streamed bytes over PCIe at the rates' p (None
        before the rates are known)."""
        rates = self.rates or self.cache.rates()
        if rates is None:
            return None
        lb = self.s.model_file.layer_bytes
        total = sum(lb[i] for i in self.choices)
        return [(total - sum(lb[i] for i in cpu)) / rates.pcie_bytes_per_s for cpu, _ in splits]

    def _splits(self, rates: Rates):
        """generate_splits of the choices, up to `most` CPU layers."""
        return generate_splits(self.choices, self.s.model_file.layer_bytes, rates)[:self.most + 1]

    @property
    def _decode(self) -> str:
        return "token" if self.rows == 1 else f"decode of {self.rows} rows"

    def _say(self, msg: str) -> None:
        note(msg, self.s.config.progress)

    @contextmanager
    def context(self, ctx=None):
        """A small context with the hook, its KV caches attached; generation
        in it runs the generate phase (one token per decode). Given one
        (ctx), that one: the caller's context already opened."""
        if ctx is not None:
            yield ctx
            return
        s, e = self.s, self.s.engine
        lc = s.lc
        p = s.small_context_params(max(CALIBRATION_BATCH, self.rows))
        p.flash_attn_type = (lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if s.config.flash_attn
                             else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        s.patch_context_params(p)
        # Generate-resident layers go to a buffer of the engine's own meanwhile:
        # the real context's compute buffer, where they will live, does not
        # exist yet (the memory it will take is free now).
        e.set_generate_resident(s.plan.generate_resident, own=True)
        self.keep_cpu_layers, ok = (), False
        try:
            with s.no_graph_reuse():  # CPU layers change under it between trials
                ctx = lc.llama_init_from_model(self.model, p)
            if not ctx:
                raise BudgetError("llama.cpp could not create a small calibration context (out of memory?)")
            try:
                e.kv_attach()  # (a context that rebuilds every graph)
                # a layer leaving the CPU keeps its repacked copy: a later trial
                # (or the chosen split) may take it back; not when a host budget
                # caps the CPU layers (the trials' copies together could pass it)
                e.keep_repacks(self.most == len(self.choices))
                with s.own_context():
                    yield ctx
                ok = True
            finally:
                try:
                    e.set_timing(False)
                    e.set_phase(native.PHASE_PROMPT)
                    s.context_closing()
                finally:
                    lc.llama_free(ctx)
                try:
                    # the chosen split stays (its repacked copies are the run's); else none
                    e.set_cpu_layers(self.keep_cpu_layers if ok else ())
                finally:
                    e.keep_repacks(False)  # the other trials' copies go
                e.reset_counters()
        finally:
            e.set_generate_resident(s.plan.generate_resident, s.generate_reserve)

    def decode_token(self, ctx, token: int) -> float:
        """One generate-phase decode of self.rows tokens of one sequence (as a
        speculative verify; parallel sequences' rows cost the layers the
        same); seconds until its results are ready. A full KV cache is
        cleared first (one context serves every trial)."""
        lc, k = self.s.lc, self.rows
        if lc.llama_memory_seq_pos_max(lc.llama_get_memory(ctx), 0) + k >= lc.llama_n_ctx(ctx):
            lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
            self.s.kv_cleared()
        arr = (lc.llama_token * k)(*([token] * k))
        t0 = time.perf_counter()
        rc = self.s.decode(ctx, lc.llama_batch_get_one(arr, k))
        lc.llama_synchronize(ctx)
        seconds = time.perf_counter() - t0
        self.decodes += 1
        if rc != 0:
            raise DecodeError(f"calibration decode failed with llama_decode = {rc}")
        return seconds

    def time_splits(self, splits, best: int, ctx=None) -> dict[int, float]:
        """SplitSearch from split `best`, timed in one context with decodes
        of its own (the bench's way: nothing of it in the timed runs), so
        load-to-load variation of the CPU path does not enter the comparison."""
        e, bos = self.s.engine, self.s.bos(self.model)
        search = SplitSearch(len(splits), best, self.stream_seconds(splits))
        with self.context(ctx) as ctx:
            while search.current is not None:
                t0 = time.perf_counter()
                e.set_cpu_layers(splits[search.current][0])  # repacks the layers it adds (kept ones serve again)
                t1 = self._spent("split set-up", t0)
                n_cpu = search.current
                while search.current == n_cpu:
                    search.feed(self.decode_token(ctx, bos))
                self._say("  " + search.said(n_cpu, self._decode, f"set up {t1 - t0:.2f} s, {search.decodes[n_cpu]} "
                                                                  f"decodes {time.perf_counter() - t1:.2f} s"))
                self._spent("split decodes", t1)
        self.cache.put_split_trials(self.choices, search.trials, self.most)
        return search.trials

    def measure_rates(self, ctx=None) -> Rates:
        """p from timed uploads of a streamed layer; c and G from one short
        generation with a sample of the overflow layers on the CPU (the rest
        streaming), timed layer by layer."""
        s, e = self.s, self.s.engine
        mf, plan = s.model_file, s.plan
        first = plan.streamed[0]
        pcie = mf.layer_bytes[first] / e.measure_upload(first, 3)
        overflow = self.choices
        n_cpu = min(len(overflow), CALIBRATION_CPU_LAYERS, max(2, CALIBRATION_CPU_BYTES // max(mf.layer_bytes)),
                    self.most)  # the sample's copies stay within the host budget's room too
        sample = rates_sample(overflow, n_cpu, self.most)
        bos = s.bos(self.model)
        t0 = time.perf_counter()
        with self.context(ctx) as ctx:
            e.set_cpu_layers(sample)  # inside: the context's exit takes them away again on any path
            token_times = []
            for k in range(CALIBRATION_TOKENS):
                if k == 1:  # after the warm-up token (which shows the KV caches to the engine)
                    e.reset_counters()
                    e.set_timing(True)
                token_times.append(self.decode_token(ctx, bos))
            times = e.layer_times(mf.n_layer)
            e.set_timing(False)
        per_layer = {i: t / n for i, (t, n) in enumerate(times) if n}
        cpu = [i for i in sample if i in per_layer]
        gpu = [i for i in plan.resident if i in per_layer]
        cpu_rate = sum(mf.layer_bytes[i] for i in cpu) / max(sum(per_layer[i] for i in cpu), 1e-9)
        # A resident layer's time stands for any layer on the GPU; without
        # resident layers, assume HBM speed (it is small next to c and p).
        gpu_layer = (sum(per_layer[i] for i in gpu) / len(gpu)) if gpu else max(mf.layer_bytes) / 2e12 + 3e-5
        token = sorted(token_times[1:])[len(token_times[1:]) // 2]
        # what the per-layer segments do not cover: embedding, output head,
        # layer 0 (timed from the previous token's end) and host overheads
        edges = max(token - sum(per_layer.values()), 0.0)
        rates = Rates(pcie_bytes_per_s=pcie, cpu_bytes_per_s=cpu_rate,
                      gpu_token_seconds=mf.n_layer * gpu_layer + edges)
        self._say(f"  rates: PCIe {pcie / 1e9:.1f} GB/s, CPU layers {cpu_rate / 1e9:.1f} GB/s, "
                  f"GPU token {rates.gpu_token_seconds * 1e3:.1f} ms ({CALIBRATION_TOKENS} decodes, "
                  f"{len(sample)} CPU layers, {time.perf_counter() - t0:.2f} s)")
        self.cache.put_rates(rates)
        return rates


class LiveSplit:
    """A first load's split search on its first generated tokens
    (Calibrator.start_split(live=True)): the load measures the rates only
    and the run starts at the search's first split; the Streamer times its
    one-row generate decodes (sync included, as the caller reads the logits
    next) and feeds them here, changes CPU layers between decodes where the
    search says, and once it is over the fastest split stays and goes to the
    cache, as a search before the load would have left it. No token is spent
    on timing alone: the search costs the load the rates, and the first
    tokens the time of its slower splits and of changing CPU layers (the
    layers' repacked copies are kept meanwhile, so a split coming back costs
    the KV moves only)."""

    def __init__(self, calibrator: Calibrator, splits, start: int, rates: Rates, load_seconds: float):
        self.cal, self.splits, self.rates = calibrator, splits, rates
        self.search = SplitSearch(len(splits), start, calibrator.stream_seconds(splits))
        self.decodes = 0
        self.parts = {k: v for k, v in calibrator.parts.items() if v}
        self.parts["split set-up"] = self.parts.get("split set-up", 0.0)
        self.parts["split decodes"] = 0.0
        self.seconds = load_seconds      # the load's part, then each change of CPU layers and timed decode
        self.calibration: Calibration | None = None   # set when the search is over
        calibrator.s.engine.keep_repacks(calibrator.most == len(calibrator.choices))

    @property
    def cpu_layers(self) -> tuple[int, ...]:
        """The CPU layers the next timed decode runs with."""
        return self.splits[self.search.best if self.search.current is None else self.search.current][0]

    @property
    def done(self) -> bool:
        return self.calibration is not None

    def timed(self, seconds: float) -> tuple[int, ...] | None:
        """One timed decode's seconds; the CPU layers to change to before
        the next decode, or None to keep them."""
        before = self.cpu_layers
        self.decodes += 1
        self.seconds += seconds
        self.parts["split decodes"] += seconds
        self.search.feed(seconds)
        if self.search.current is None:
            self._finish()
        return self.cpu_layers if self.cpu_layers != before else None

    def set_up(self, seconds: float) -> None:
        """Time the Streamer spent changing CPU layers for the search."""
        self.seconds += seconds
        self.parts["split set-up"] += seconds

    def _finish(self) -> None:
        cal, trials = self.cal, self.search.trials
        cal.cache.put_split_trials(cal.choices, trials, cal.most)
        n_cpu = self.search.best
        self.calibration = Calibration(self.rates, dict(trials), self.splits[n_cpu][1], cal.decodes + self.decodes,
                                       self.seconds, cal.rows, dict(self.parts))
        timed = ", ".join(f"{n}: {'>=' if n in self.search.bounds else ''}{trials[n] * 1e3:.1f}"
                          for n in sorted(trials))
        cal._say(f"generate split: the CPU computes {n_cpu} of {len(cal.choices)} overflow layers while generating "
                 f"({trials[n_cpu] * 1e3:.1f} ms per {cal._decode} measured; calibrated on the first "
                 f"{self.decodes} generated tokens, {len(trials)} splits timed (CPU layers: ms) {timed}; "
                 + ", ".join(f"{k} {v:.2f}" for k, v in self.parts.items()) + f" s; cached in {cal.cache.path})")
