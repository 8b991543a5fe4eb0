"""The budget sweep: for every VRAM budget, stock llama.cpp at its largest
fitting -ngl (and, for a mixture-of-experts model, at -ngl all with the
smallest fitting --n-cpu-moe) and gguf-stream at the same budget, plus the
all-in-VRAM ceiling, gated and put in rows (run_gpu); without a GPU a
reduced host-mode comparison (run_host). The bounds (perfmodel.py) are in
bounds.py."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from ..errors import GGUFStreamError
from ..memory import format_size
from .bounds import bound_notes, weights_per_token
from .budgets import Budget, search_stock_n_cpu_moe, search_stock_ngl
from .disk_tier import disk_fields, host_budget_rows
from .moe_split import moe_split_rows
from .gate import PEER_MARGIN, Greedy, gate
from .mirror import Mirror, mirror_of
from .rows import Row, count_params, mean_sd
from .timing import Progress, Timing, Workload, gate_tokens, measure_h2d_bandwidth, time_model

STOCK_MOE = "stock-moe"  # the mode of llama.cpp's `-ngl all --n-cpu-moe N` rows


def recipe_text(ngl, n_cpu_moe: int = 0) -> str:
    """'ngl=9' / 'ngl=49 n-cpu-moe=12'."""
    return f"ngl={ngl}" + (f" n-cpu-moe={n_cpu_moe}" if n_cpu_moe else "")


def stock_label(ngl, n_cpu_moe: int = 0) -> str:
    """A stock run's name in progress lines, checks and notes: 'stock ngl=9'."""
    return f"stock {recipe_text(ngl, n_cpu_moe)}"


@dataclass(frozen=True)
class Recipe:
    """One stock llama.cpp placement of a budget: mode 'stock' is -ngl ngl,
    mode 'stock-moe' is -ngl all (ngl) --n-cpu-moe n_cpu_moe; ngl None when
    nothing fits the budget."""

    mode: str
    ngl: int | None
    n_cpu_moe: int = 0

    @property
    def label(self) -> str:
        return stock_label(self.ngl, self.n_cpu_moe)

    @property
    def missing_note(self) -> str:
        return "no ngl fits" if self.mode == "stock" else "no n-cpu-moe fits"


def best_stock(runs: list[tuple[str, Timing | None]]) -> dict[str, tuple[float, str]]:
    """Per test ('pp', 'tg'): the highest stock mean among runs (mode,
    Timing or None) and the mode it came from; the mode is '' when there is
    a single recipe (nothing was chosen). Ties go to the first run."""
    out = {}
    for test in ("pp", "tg"):
        means = [(mean_sd(getattr(t, test))[0], mode) for mode, t in runs if t is not None and getattr(t, test)]
        if means:
            mean, mode = max(means, key=lambda m: m[0])
            out[test] = (mean, mode if len(runs) > 1 else "")
    return out


def _speed(t: Timing) -> float:
    """What makes one stock recipe 'the better' for the gate: tg t/s (pp where there is no tg test)."""
    values = t.tg or t.pp
    return mean_sd(values)[0] if values else -math.inf


def engine_calibration(model):
    """(rates, {CPU layers: seconds per token timed}, predicted seconds per
    token) that the engine measured for its generate split on this load, or
    None when it measured none (StreamedModel.calibration)."""
    cal = model.calibration
    if cal is None:
        return None
    return cal.rates, dict(cal.split_trials), cal.predicted_token_seconds


@dataclass
class Ctx:
    """Everything the row builders share for one model."""

    path: str
    mf: object
    w: Workload
    backend: str
    device: str
    progress: Progress
    model_name: str
    allow_near_ties: bool = False
    stock_times: dict = field(default_factory=dict)  # (ngl, n_cpu_moe) -> Timing (reused across budgets)
    mirror_tokens: dict = field(default_factory=dict)  # Mirror -> its gate tokens or None (reused across budgets)
    host_budgets: tuple = ()  # --host-budget: each adds a streamed run with a disk tier per budget
    moe_splits: tuple = ()  # --moe-split: each adds a streamed run with that many experts uploaded per CPU expert layer
    prompt_cpu_experts: tuple = ()  # --prompt-cpu-experts: each adds a streamed run with that many on the CPU in prompts

    def config(self, **kw):
        from ..config import EngineConfig

        # streamed runs use the measured CPU+PCIe split while generating, timed
        # before the load returns (the timed runs must not contain the search)
        kw.setdefault("generate_cpu_layers", "auto")
        kw.setdefault("calibrate_on_tokens", False)
        return EngineConfig(n_ctx=self.w.n_ctx, n_batch=self.w.n_batch, n_ubatch=self.w.n_ubatch,
                            flash_attn=self.w.flash_attn, type_k=self.w.type_k, type_v=self.w.type_v,
                            device=self.device, n_threads=self.w.n_threads, **kw)

    def rows(self, t: Timing | None, *, budget: Budget, mode: str, ngl=None, n_cpu_moe=None, note="", check="",
             refs: dict | None = None, host_budget: str = "") -> list[Row]:
        """One row per test of run t; refs: best_stock's reference per test
        (the ratio's denominator and the mode it came from)."""
        out = []
        for test, n in (("pp", self.w.n_prompt), ("tg", self.w.n_gen)):
            if not n:
                continue
            vals = getattr(t, test) if t else ()
            mean, sd = mean_sd(vals) if vals else (None, None)
            ref, ref_mode = (refs or {}).get(test, (None, ""))
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
                ratio_vs=ref_mode if mean is not None and ref else "", n_cpu_moe=n_cpu_moe,
                vram_peak_bytes=t.vram_peak if t else None,
                # StockModel reports 0 pinned bytes although its CPU layers are pinned on CUDA: leave it blank
                pinned_host_bytes=t.pinned if t and mode == "streamed" and plan and plan.streamed else None,
                waits=ctr[0] if ctr else None, sync_fallbacks=ctr[1] if ctr else None,
                uploads=ctr[2] if ctr else None, check=check, note=note,
                cpu_rate_streaming=t.cpu_rate_streaming if t else None, host_budget=host_budget,
                **disk_fields(plan, ctr)))
        return out

    def run_stock(self, ngl: int, n_cpu_moe: int = 0) -> Timing:
        from ..model import StockModel

        key, label = (ngl, n_cpu_moe), stock_label(ngl, n_cpu_moe)
        if key not in self.stock_times:
            self.progress(f"loading {label}")
            with StockModel(self.path, ngl, config=self.config(), n_cpu_moe=n_cpu_moe) as m:
                self.stock_times[key] = time_model(m, self.w, self.progress, label)
        return self.stock_times[key]

    def run_streamed(self, **kw) -> Timing:
        from ..model import StreamedModel

        self.progress(f"loading streamed {kw}")
        with StreamedModel(self.path, config=self.config(**kw)) as m:
            if m.plan is None:
                return time_model(m, self.w, self.progress, "streamed")
            self.progress(plan_line(m.plan))
            notes, cpu_rate, calibration = [], None, engine_calibration(m)
            if calibration is not None:
                r, split_trials, predicted = calibration
                cpu_rate = r.cpu_bytes_per_s
                trials = ", ".join(f"{n}: {1 / t:.1f}" for n, t in sorted(split_trials.items()))
                notes.append(f"engine-measured rates: PCIe {r.pcie_bytes_per_s / 1e9:.1f} GB/s, CPU layers "
                             f"{r.cpu_bytes_per_s / 1e9:.1f} GB/s, GPU part of a token (timed layer by layer) "
                             f"{r.gpu_token_seconds * 1e3:.2f} ms; "
                             f"splits timed (CPU layers: t/s; a slower one's may be an upper bound) {trials}, chosen "
                             f"{len(m.plan.cpu_layers)} "
                             f"(the rates predict {1 / predicted:.1f} t/s for it)")
                self.progress(notes[-1])
            timing = time_model(m, self.w, self.progress, "streamed")
            c = m.stats.counters
            if c is None:  # below streaming's minimum: llama.cpp's own split, no engine
                return replace(timing, engine_note="; ".join(notes), cpu_rate_streaming=cpu_rate)
            if m.plan.cpu_layers:
                notes.append(f"CPU layers' repacked copy {format_size(c.repacked_bytes)} (pageable host memory); "
                             f"their KV caches in host memory while generating {format_size(c.host_kv_bytes)}")
            if c.split_layers:
                chosen = "still timing" if c.split_n_upload < 0 else f"{c.split_n_upload} uploaded"
                notes.append(f"split experts ({len(m.streamer.split_experts)} layers, {chosen}"
                             f"{' (timed)' if m.config.moe_split in (None, 'auto') and c.split_n_upload >= 0 else ''}): "
                             f"per layer run {c.split_uploaded / c.split_layers:.2f} experts uploaded, "
                             f"{c.split_cpu / c.split_layers:.2f} on the CPU; the hook's time per layer run: uploads "
                             f"{c.split_upload_seconds / c.split_layers * 1e3:.3f} ms, then the CPU's rest "
                             f"{c.split_cpu_wait_seconds / c.split_layers * 1e3:.3f} ms; region "
                             f"{format_size(c.split_region_bytes)}")
            if m.plan.generate_resident:
                notes.append(f"{c.gen_resident} of {len(m.plan.generate_resident)} generate-resident layers in the "
                             f"compute buffer's tail at the end ({format_size(c.compute_buffer_bytes)} buffer, of which "
                             f"generate graphs used {format_size(c.generate_extent)})")
            return replace(timing, engine_note="; ".join(notes), cpu_rate_streaming=cpu_rate)

    def run_mirror(self, mirror: Mirror) -> Greedy | None:
        """The gate's tokens of mirror (see mirror.py); None where llama.cpp cannot load it."""
        from .mirror import MirrorStock

        self.progress(f"loading {mirror.label} for the gate: {mirror.recipe}")
        try:
            with MirrorStock(self.path, mirror, self.config()) as m:
                return gate_tokens(m, self.w.check_tokens)
        except GGUFStreamError as exc:
            self.progress(f"  {mirror.label} does not load: {exc}")
            return None

    def measure_stock_vram(self, ngl: int, n_cpu_moe: int = 0) -> float | None:
        """GPU bytes of a stock load after one n_ubatch prompt (compute pools
        grow at first use); inf when llama.cpp cannot load it."""
        from ..model import stock_vram_peak

        what = recipe_text(ngl, n_cpu_moe)
        self.progress(f"probing stock {what}")
        try:
            peak = stock_vram_peak(self.path, ngl, self.config(), n_cpu_moe=n_cpu_moe)
        except GGUFStreamError as exc:
            self.progress(f"  {what} does not load: {exc}")
            return math.inf
        # StockModel measures no VRAM at ngl=0 (no layer on the GPU): None, counted as fitting
        self.progress(f"  {what}: {format_size(peak) if peak is not None else 'not measured'}")
        return None if peak is None else float(peak)


def _layers(layers) -> str:
    """'layer 3' / 'layers 3, 7 and 11'."""
    layers = [str(x) for x in layers]
    if len(layers) == 1:
        return f"layer {layers[0]}"
    return f"layers {', '.join(layers[:-1])} and {layers[-1]}"


def _and(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def plan_line(plan) -> str:
    """The progress line of a streamed load: what streams, and what happens
    to the streamed layers while generating (some the CPU computes, some stay
    resident in the compute buffer's idle tail, the rest are uploaded for
    every token), in a sentence that reads in each case."""
    if plan.stock_gpu_layers is not None:
        return (f"plan: below streaming's minimum at this budget: llama.cpp's own split -ngl "
                f"{plan.stock_gpu_layers} ({plan.n_layer - plan.stock_gpu_layers} of {plan.n_layer} layers "
                "on the CPU), nothing streams")
    streamed = plan.streamed
    if not streamed:
        return f"plan: all {plan.n_layer} layers resident, nothing streams"
    head = f"plan: {len(streamed)}/{plan.n_layer} layers streamed through {plan.n_slots} slot(s)"
    cpu, resident = set(plan.cpu_layers), set(plan.generate_resident)
    split = set(plan.split_layers) - resident  # a generate-resident layer splits only when out of its region
    uploaded = [x for x in streamed if x not in cpu and x not in resident and x not in split]
    if not cpu and not resident and not split:
        return f"{head}; while generating every streamed layer is uploaded for each token"
    parts = []
    if cpu:
        parts.append(f"the CPU computes {_layers(sorted(cpu))}")
    if split:
        parts.append(f"{_layers(sorted(split))} split their routed experts between uploads and the CPU")
    if resident:
        parts.append(f"{_layers(sorted(resident))} {'stays' if len(resident) == 1 else 'stay'} resident")
    if uploaded:
        n = len(uploaded)
        parts.append("the other one is uploaded for each token" if n == 1 else
                     f"the other {n} are uploaded for each token")
    else:
        parts.append("nothing is uploaded")
    return f"{head}; while generating {_and(parts)}"


def _greedy(t: Timing | None) -> Greedy | None:
    return None if t is None else t.greedy


def run_host(ctx: Ctx, n_streamed: int | None, n_cpu_moe: int | None = None) -> tuple[list[Row], list[str]]:
    """Reduced mode without a GPU: budgets mean nothing, so compare stock
    ngl=0 with a fixed set of streamed layers through 2 host slots; for a
    mixture-of-experts model also stock's MoE recipe at a fixed n_cpu_moe
    (default half the layers), so that its loading runs without a GPU too."""
    n = n_streamed if n_streamed is not None else ctx.mf.n_layer // 2
    budget = Budget(f"host ({n}/{ctx.mf.n_layer} streamed)", None)
    stock = ctx.run_stock(0)
    notes = ["host mode (no GPU): VRAM budgets do not apply; stock is ngl=0, streamed runs "
             f"{n} of {ctx.mf.n_layer} layers through 2 host-memory slots (CPU compute, memcpy uploads)"]
    stocks = [("stock", stock)]
    moe = moe_t = None
    if ctx.mf.is_moe:
        moe = Recipe(STOCK_MOE, ctx.mf.n_layer + 1, n_cpu_moe if n_cpu_moe is not None else max(1, ctx.mf.n_layer // 2))
        moe_t = ctx.run_stock(moe.ngl, moe.n_cpu_moe)
        stocks.append((STOCK_MOE, moe_t))
        notes.append(_host_moe_note(moe, moe_t, stock))
    refs = best_stock(stocks)
    rows = ctx.rows(stock, budget=budget, mode="stock", ngl=0, refs=refs)
    if moe is not None:
        rows += ctx.rows(moe_t, budget=budget, mode=STOCK_MOE, ngl=moe.ngl, n_cpu_moe=moe.n_cpu_moe, refs=refs)
    # the exact reference: the faster stock run first (on the CPU both compute the same)
    references = sorted(stocks, key=lambda mt: -_speed(mt[1]))
    try:
        streamed = ctx.run_streamed(n_streamed=n, n_slots=min(2, n) if n else None)
        check = gate(_greedy(streamed), [(m, _greedy(t)) for m, t in references], ctx.allow_near_ties)
        rows += ctx.rows(streamed, budget=budget, mode="streamed", check=check, refs=refs)
    except GGUFStreamError as exc:
        streamed = None
        rows += ctx.rows(None, budget=budget, mode="streamed", note=f"error: {exc}")
    rows += host_budget_rows(ctx, budget, streamed, refs, notes, n_streamed=n, n_slots=min(2, n) if n else None)
    if stock.tg:
        rate = weights_per_token(ctx.mf) * mean_sd(stock.tg)[0]
        notes.append(f"CPU path: stock ngl=0 tg {mean_sd(stock.tg)[0]:.2f} t/s x "
                     f"{format_size(weights_per_token(ctx.mf))} of weights per token = {rate / 1e9:.2f} GB/s effective")
    return rows, notes


def _host_moe_note(moe: Recipe, moe_t: Timing, stock: Timing) -> str:
    same = gate(_greedy(moe_t), [("stock ngl=0", _greedy(stock))])
    return (f"{STOCK_MOE} is llama.cpp's -ngl {moe.ngl} --n-cpu-moe {moe.n_cpu_moe} (the expert tensors of the first "
            f"{moe.n_cpu_moe} layers overridden to the CPU buffer type); without a GPU every tensor is on the CPU "
            "either way, so it computes what stock ngl=0 does (the row shows that the recipe loads and runs)"
            + {"": "", "ok": "; its greedy tokens equal stock ngl=0's"}.get(same, f"; its greedy tokens differ from "
                                                                               f"stock ngl=0's: {same}"))


def _recipes(ctx: Ctx, b: Budget, n_all: int, measure, forced_ngl: int | None,
             forced_n_cpu_moe: int | None) -> list[Recipe]:
    """Budget b's stock recipes: -ngl N, N forced or the largest that fits;
    for a mixture-of-experts model also -ngl all --n-cpu-moe N, N forced or
    the smallest that fits (the fewest experts computed by the CPU)."""
    if forced_ngl is not None:
        ngl = forced_ngl
    else:
        found = search_stock_ngl(n_all, b.nbytes, measure)
        ngl = None if found is None else found[0]
    recipes = [Recipe("stock", ngl)]
    if ctx.mf.is_moe:
        if forced_n_cpu_moe is not None:
            n = forced_n_cpu_moe
        else:
            found = search_stock_n_cpu_moe(ctx.mf.n_layer, b.nbytes, lambda k: measure(n_all, k))
            n = None if found is None else found[0]
        recipes.append(Recipe(STOCK_MOE, None if n is None else n_all, n or 0))
    return recipes


def run_gpu(ctx: Ctx, budgets: list[Budget], forced_ngl: int | None, ceiling: bool,
            cpu_rate_tokens: int, forced_n_cpu_moe: int | None = None) -> tuple[list[Row], list[str], dict]:
    """Per budget: stock at the largest fitting measured ngl (and, for a
    mixture-of-experts model, at -ngl all with the smallest fitting measured
    --n-cpu-moe), streamed at the same budget; plus the all-in-VRAM ceiling;
    then the performance model's bounds."""
    from .. import native

    notes, extra = [], {}
    ctx.progress("measuring host->device bandwidth")
    bw, bw_note = measure_h2d_bandwidth()
    notes.append(bw_note)
    extra["h2d_bytes_per_s"] = bw
    n_all = ctx.mf.n_layer + 1  # llama.cpp counts the output layer as one more
    # (ngl, n_cpu_moe) -> bytes; None: loaded, but StockModel measured no VRAM (ngl=0)
    probes: dict[tuple[int, int], float | None] = {}

    def measure(ngl: int, n_cpu_moe: int = 0) -> float:
        key = (ngl, n_cpu_moe)
        if key not in probes:
            probes[key] = ctx.measure_stock_vram(ngl, n_cpu_moe)
        return probes[key] or 0.0

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
    gated: list[tuple[int, int, GateRun]] = []  # rows[lo:hi] of a budget, and what its gate compares
    for b in sorted(budgets, key=lambda b: math.inf if b.nbytes is None else b.nbytes):
        if b.nbytes is None:
            if ceiling_t is None:
                continue
            b = Budget("all", int(measure(n_all)))
        ctx.progress(f"budget {b.label} ({format_size(b.nbytes)})")
        recipes = _recipes(ctx, b, n_all, measure, forced_ngl, forced_n_cpu_moe)
        lo = len(rows)
        budget_rows, run = _budget_rows(ctx, b, recipes, ceiling_t, notes)
        rows += budget_rows
        if run is not None:
            gated.append((lo, len(rows), run))
    if probes:
        notes.append(f"stock VRAM probes (after an n_ubatch={ctx.w.n_ubatch} prompt): " + ", ".join(
            f"{recipe_text(*k)}: " + ("not measured" if v is None else format_size(int(v)) if math.isfinite(v)
                                      else "failed")
            for k, v in sorted(probes.items())))
    # a budget whose stock split holds every layer ran all-in-VRAM too: its tokens are the exact reference
    reference = ceiling_t if ceiling_t is not None else ctx.stock_times.get((n_all, 0))
    # without all-in-VRAM tokens the gate calibrates with each stock run's mirror (and the other stock splits;
    # the CPU-rate run's stock ngl=0 too, whose gate tokens then cost a few CPU tokens)
    calibrate = reference is None and ctx.w.check_tokens > 0 and bool(gated)
    cpu_rate, cpu_stock = _cpu_rate(ctx, cpu_rate_tokens, notes,
                                    with_gate_tokens=calibrate and (0, 0) not in ctx.stock_times)
    extra["cpu_bytes_per_s"] = cpu_rate
    splits = {k: t.greedy for k, t in ctx.stock_times.items() if t is not reference}
    if cpu_stock is not None and (0, 0) not in splits:
        splits[(0, 0)] = cpu_stock.greedy
    if calibrate:
        gated = [(lo, hi, _with_mirror(ctx, run, notes)) for lo, hi, run in gated]
    checks = gate_runs([run for _, _, run in gated], _greedy(reference), splits, ctx.allow_near_ties)
    for (lo, hi, _), check in zip(gated, checks):
        rows[lo:hi] = [replace(r, check=check) if r.mode == "streamed" else r for r in rows[lo:hi]]
    notes.append(GATE_NOTE_CEILING if reference is not None else GATE_NOTE_STOCK)
    if ctx.mf.is_moe:
        notes.append(MOE_NOTE)
    if ceiling_t and bw and cpu_rate:
        notes += bound_notes(rows, ctx.w, ceiling_t, bw["pinned"], cpu_rate)
    return rows, notes, extra


GATE_NOTE_CEILING = (
    "gate: streamed greedy tokens must equal the all-in-VRAM run's ('ok') or the same budget's stock run's "
    "('ok (=stock ngl=N)'); otherwise MISMATCH with the logit deviation up to the first differing token, next to "
    f"{PEER_MARGIN:g}x the largest deviation from all-in-VRAM that a stock -ngl split of this run shows up to its "
    "own first differing token (CPU layers round differently; on random-weight models that grows to tenths of a "
    "std; a wrong layer gives unrelated logits, ~1.4 std). --allow-near-ties passes flips within it")
GATE_NOTE_STOCK = (
    "gate without an all-in-VRAM run: streamed greedy tokens are compared with the same budget's stock run, "
    "which itself rounds its CPU layers differently from all-in-VRAM, so exactness is not checked. Equal tokens "
    "read 'ok'; a flip passes as 'ok (near tie vs stock ngl=N @i, ...)' when the logit deviation up to it is "
    f"within {PEER_MARGIN:g}x the largest deviation from that stock run that another stock placement of this "
    "run shows up to its own first differing token, and is a MISMATCH above it (a wrong layer gives unrelated "
    "logits, ~1.4 std). The placement that counts is the stock run's mirror (llama.cpp at -ngl all with as many "
    "layers, or experts, in host memory, but the last ones: `-ot \"blk\\.(k|..)\\.=CPU\"`, gate tokens only): "
    "streamed, like it, computes layer 0 on the GPU, and a rounding difference from layer 0 on grows through "
    "every layer after it, while the -ngl splits all compute the first layers on the CPU and agree on them. "
    "Run with the all-in-VRAM ceiling (or an 'all' budget) where the model fits for the exact check")


MOE_NOTE = (
    "mixture of experts: stock runs two recipes per budget, llama.cpp's -ngl N (mode stock, the largest N that "
    f"fits) and -ngl all --n-cpu-moe N (mode {STOCK_MOE}: every layer on the GPU except the expert tensors of "
    "layers 0..N-1, which stay in host memory; the smallest N that fits). Every ratio is to the faster of the two "
    "in its own test (pp to the higher pp, tg to the higher tg; the ratio column names it); where the gate "
    "compares with the budget's stock run it is the faster recipe's (by tg, by pp without a tg test)")


@dataclass(frozen=True)
class GateRun:
    """What the gate of one budget compares: its stock run (the recipe:
    ngl and n_cpu_moe; its tokens) and its streamed tokens; without
    all-in-VRAM tokens also the stock run's mirror (mirror.py), the peer
    that calibrates the comparison."""

    ngl: int | None
    stock: Greedy | None
    streamed: Greedy | None
    n_cpu_moe: int = 0
    mirror: Greedy | None = None
    mirror_name: str = ""


def _with_mirror(ctx: Ctx, run: GateRun, notes: list[str]) -> GateRun:
    """run with its stock run's mirror's tokens (where streamed's tokens
    differ from its stock run's, and the stock run has a mirror), and a note
    of what ran."""
    if run.stock is None or run.streamed is None or run.stock.tokens == run.streamed.tokens:
        return run
    m = mirror_of(ctx.mf.n_layer, run.ngl, run.n_cpu_moe, stock_label(run.ngl, run.n_cpu_moe))
    if m is None:
        notes.append(f"gate: {stock_label(run.ngl, run.n_cpu_moe)} has no mirror (no GPU layer to move to the "
                     "front); calibrated by the other stock splits only")
        return run
    if m not in ctx.mirror_tokens:
        ctx.mirror_tokens[m] = ctx.run_mirror(m)
    tokens = ctx.mirror_tokens[m]
    notes.append(f"gate calibration: {m.label} is {m.recipe}" + ("" if tokens is not None else
                                                                  ": it did not load; the other stock splits only"))
    return replace(run, mirror=tokens, mirror_name=m.label)


def _recipe_key(key) -> tuple[int, int]:
    """A split's key: (ngl, n_cpu_moe), or a bare ngl."""
    return key if isinstance(key, tuple) else (key, 0)


def gate_runs(runs: list[GateRun], ceiling: Greedy | None, splits: dict,
              allow_near_ties: bool = False) -> list[str]:
    """The check of each budget's streamed run, once every stock split of
    the sweep is known (so that each budget is calibrated by all of them).

    With all-in-VRAM tokens (ceiling) they are the reference, and the peers
    are the stock splits' deviations from them, this budget's first. Without
    them the reference is the budget's own stock split, and the peers are
    its mirror (run.mirror, mirror.py) and the other splits (splits:
    (ngl, n_cpu_moe) or ngl -> tokens), their deviation measured from that
    reference: each pair is two legitimate roundings of the model, which is
    what streamed against stock is too (gate's exact=False). The mirror is
    the peer that counts: like streamed it differs from the stock run from
    layer 0 on, where the -ngl splits share their first layers' rounding."""
    checks = []
    for run in runs:
        name = stock_label(run.ngl, run.n_cpu_moe)
        refs = [("all-in-VRAM", ceiling), (name, run.stock)]
        own = [(name, run.stock)] if ceiling is not None and run.stock is not None else []
        if ceiling is None and run.mirror is not None:
            own = [(run.mirror_name, run.mirror)]
        ordered = sorted(splits.items(), key=lambda kg: _recipe_key(kg[0]))
        others = [(stock_label(*_recipe_key(k)), g) for k, g in ordered
                  if g is not None and g is not run.stock and g is not ceiling]
        checks.append(gate(run.streamed, refs, allow_near_ties, own + others, exact=ceiling is not None))
    return checks


def _stock_runs(ctx: Ctx, b: Budget, recipes: list[Recipe], ceiling: Timing | None,
                notes: list[str]) -> list[tuple[Recipe, Timing]]:
    """Each recipe that fits, run; a note where its tokens differ from all-in-VRAM."""
    runs = []
    for r in recipes:
        if r.ngl is None:
            continue
        t = ctx.run_stock(r.ngl, r.n_cpu_moe)
        runs.append((r, t))
        own = gate(_greedy(t), [("all-in-VRAM", _greedy(ceiling))])
        if own not in ("", "ok"):
            on_cpu = "CPU layers" if r.mode == "stock" else "CPU experts"
            notes.append(f"budget {b.label}: {r.label} itself differs from all-in-VRAM ({own}: "
                         f"its {on_cpu} round differently)")
    return runs


def _stock_rows(ctx: Ctx, b: Budget, recipes: list[Recipe], timings: dict, refs: dict) -> list[Row]:
    """Each recipe's rows (timings: Recipe -> Timing of those that ran), or why it has none."""
    rows = []
    for r in recipes:
        t = timings.get(r)
        if t is None:
            rows += ctx.rows(None, budget=b, mode=r.mode, note=r.missing_note)
            continue
        over = t.vram_peak is not None and t.vram_peak > b.nbytes
        rows += ctx.rows(t, budget=b, mode=r.mode, ngl=r.ngl, n_cpu_moe=r.n_cpu_moe if r.mode == STOCK_MOE else None,
                         refs=refs, note="over budget" if over else "")
    return rows


def _budget_rows(ctx: Ctx, b: Budget, recipes: list[Recipe], ceiling: Timing | None,
                 notes: list[str]) -> tuple[list[Row], GateRun | None]:
    """Stock by each recipe and streamed at budget b, every ratio to the
    faster stock of its test; the streamed rows' check is left to gate_runs
    (after the sweep), which gets the returned GateRun with the faster
    recipe's tokens (None when the streamed run failed)."""
    runs = _stock_runs(ctx, b, recipes, ceiling, notes)
    timings = dict(runs)
    refs = best_stock([(r.mode, timings.get(r)) for r in recipes])
    rows = _stock_rows(ctx, b, recipes, timings, refs)
    if len(recipes) > 1 and refs:
        labels = {r.mode: r.label for r, _ in runs}
        notes.append(f"budget {b.label}: ratios to the faster stock recipe of each test: " + ", ".join(
            f"{test} to {labels[mode]} ({mode})" for test, (_, mode) in refs.items()))
    better, stock = max(runs, key=lambda rt: _speed(rt[1])) if runs else (recipes[0], None)
    try:
        streamed = ctx.run_streamed(vram_budget=b.nbytes)
    except GGUFStreamError as exc:
        notes.append(f"budget {b.label}: streamed run failed: {exc}")
        return rows + ctx.rows(None, budget=b, mode="streamed", note=f"error: {type(exc).__name__}"), None
    rows += ctx.rows(streamed, budget=b, mode="streamed", refs=refs)
    rows += host_budget_rows(ctx, b, streamed, refs, notes, vram_budget=b.nbytes)
    rows += moe_split_rows(ctx, b, refs, notes, stock, default=streamed)
    if streamed.engine_note:
        notes.append(f"budget {b.label}: {streamed.engine_note}")
    if streamed.vram_peak is not None and streamed.vram_peak > b.nbytes:
        notes.append(f"budget {b.label}: streamed peak {format_size(streamed.vram_peak)} exceeds the budget")
    return rows, GateRun(better.ngl, _greedy(stock), _greedy(streamed), better.n_cpu_moe)


def _cpu_rate(ctx: Ctx, n_tokens: int, notes: list[str],
              with_gate_tokens: bool = False) -> tuple[float | None, Timing | None]:
    """Effective CPU weight-streaming rate: stock ngl=0 single-token decodes
    times the bytes each one reads (the 'c' of perfmodel's tg bound); and
    that run's Timing, with the gate's tokens when with_gate_tokens (a stock
    split for gate_runs to calibrate with; then it runs even for 0 tokens)."""
    if n_tokens <= 0 and not with_gate_tokens:
        return None, None
    w = ctx.w
    check = w.check_tokens if with_gate_tokens else 0
    cpu_ctx = replace(ctx, w=replace(w, n_prompt=0, n_gen=max(n_tokens, 0), reps=1, check_tokens=check),
                      stock_times={})
    t = cpu_ctx.run_stock(0)
    if n_tokens <= 0:
        return None, t
    tps = mean_sd(t.tg)[0]
    rate = tps * weights_per_token(ctx.mf)
    notes.append(f"CPU path: stock ngl=0 tg{n_tokens} {tps:.2f} t/s x {format_size(weights_per_token(ctx.mf))} "
                 f"per token = {rate / 1e9:.2f} GB/s effective")
    return rate, t
