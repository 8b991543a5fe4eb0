"""Engine acceptance on a CUDA machine: streamed vs stock all-in-VRAM.

    python tools/gpu_check.py --model /tmp/llama3-8b.gguf --min-streamed 8 --out results.json

1. stock llama.cpp, every layer in VRAM: greedy tokens and their logits;
2. gguf-stream at a budget that streams >= --min-streamed layers: the same,
   plus counters, measured peak VRAM against the budget;
3. prompt processing (one n_ubatch batch) to show uploads hidden behind compute;
4. --cycles load/close cycles: device free memory and RSS back to baseline.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from probe import timed  # first: the checkout on sys.path, llama.cpp before numpy (see probe.py)
import numpy as np
from gguf_stream import make_plan, read_model
from gguf_stream.memory import format_size
from gguf_stream.bench import Greedy, deviation_to_flip
from gguf_stream import native
from gguf_stream.model import StockModel, StreamedModel

PROMPT = "The history of the transistor begins with"


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))


def budget_streaming(mf, n_streamed: int, **kw) -> int:
    """A budget the planner answers with at least n_streamed streamed layers."""
    full = make_plan(mf, vram_budget=1 << 50, **kw).device_bytes
    layer = max(mf.layer_bytes)
    return int(full - (n_streamed + 1.5) * layer)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--min-streamed", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--n-ubatch", type=int, default=512)
    ap.add_argument("--cycles", type=int, default=10)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    opts = dict(n_ctx=a.n_ctx, n_batch=a.n_ubatch, n_ubatch=a.n_ubatch)
    # Pure streaming: every layer computed on the GPU, so the output must be
    # bit-identical. (The generate-phase CPU layers round like stock's CPU
    # layers do; the benchmark checks those.)
    streamed_opts = dict(opts, generate_cpu_layers="none")
    mf = read_model(a.model)
    res = {"model": a.model, "size": mf.total_bytes}

    t = time.perf_counter()
    with StockModel(a.model, n_gpu_layers=-1, **opts) as stock:
        prompt = stock.tokenize(PROMPT)
        ref_tokens, ref_logits = stock.generate(prompt, a.tokens, with_logits=True)
        res["stock"] = {"peak_vram": stock.stats.vram_peak_bytes, "seconds": time.perf_counter() - t}
    print(f"stock all-in-VRAM: peak VRAM {format_size(res['stock']['peak_vram'])}", flush=True)

    budget = budget_streaming(mf, a.min_streamed, n_ctx=a.n_ctx, n_ubatch=a.n_ubatch)
    t = time.perf_counter()
    with StreamedModel(a.model, vram_budget=budget, **streamed_opts) as m:
        print(m.plan.table(), flush=True)
        tokens, logits = m.generate(prompt, a.tokens, with_logits=True)
        gen_stats = m.stats
        pp_seconds = a.n_ubatch / timed(m, "pp", a.n_ubatch, after_reset=m.reset_counters)
        pp_counters = m.stats.counters
        # What the benchmark's gate sees from a streaming bug: two streamed
        # layers' sources swapped (uploads from then on bring the wrong bytes).
        m.reset()
        x, y = m.plan.streamed[:2]
        m.engine.debug_swap_sources(x, y)
        bad_tokens, bad_logits = m.generate(prompt, 16, with_logits=True)
        m.engine.debug_swap_sources(x, y)
        res["streamed"] = {
            "budget": budget, "streamed_layers": list(m.plan.streamed), "n_slots": m.plan.n_slots,
            "plan_estimate": m.plan.device_bytes, "vram_after_load": gen_stats.vram_used_bytes,
            "peak_vram": m.stats.vram_peak_bytes, "pinned_host": gen_stats.pinned_host_bytes,
            "generation_counters": asdict(gen_stats.counters), "pp_counters": asdict(pp_counters),
            "pp_tokens": a.n_ubatch, "pp_seconds": pp_seconds, "seconds": time.perf_counter() - t,
        }
    diff = float(np.abs(logits - ref_logits).max())
    res["tokens_identical"] = tokens == ref_tokens
    res["logits_max_abs_diff"] = diff
    res["peak_within_budget"] = res["streamed"]["peak_vram"] <= budget
    flip, res["swapped_layers_logit_rms"] = deviation_to_flip(Greedy(tuple(ref_tokens), ref_logits),
                                                              Greedy(tuple(bad_tokens), bad_logits))
    s = res["streamed"]
    print(f"greedy {a.tokens} tokens identical: {res['tokens_identical']}; logits max |diff| = {diff}")
    print(f"budget {format_size(budget)}: plan estimate {format_size(s['plan_estimate'])}, "
          f"measured after load {format_size(s['vram_after_load'])}, peak {format_size(s['peak_vram'])}, "
          f"within budget: {res['peak_within_budget']}; pinned host {format_size(s['pinned_host'])}")
    print(f"generation counters: {s['generation_counters']}")
    print(f"pp{a.n_ubatch}: {a.n_ubatch / pp_seconds:.0f} t/s, counters {s['pp_counters']}", flush=True)
    print(f"two streamed layers swapped (a simulated slot bug): greedy tokens differ from {flip}, "
          f"Δlogit {res['swapped_layers_logit_rms']:.3f}σ rms (the bench gate's measure)", flush=True)

    base_free, base_rss = native.device_memory("CUDA0")[0], rss_bytes()
    cycles = []
    for _ in range(a.cycles):
        with StreamedModel(a.model, vram_budget=budget, **streamed_opts) as m:
            m.eval(m.tokenize("hello"))
            loaded_free = native.device_memory("CUDA0")[0]
        cycles.append({"vram_in_use_loaded": base_free - loaded_free,
                       "vram_after_close": base_free - native.device_memory("CUDA0")[0],
                       "rss_after_close": rss_bytes() - base_rss})
    res["cycles"] = cycles
    print("load/close cycles (bytes vs baseline): " + ", ".join(
        f"[{c['vram_in_use_loaded'] >> 20} MiB loaded -> {c['vram_after_close'] >> 20} MiB VRAM, "
        f"{c['rss_after_close'] >> 20} MiB RSS]" for c in cycles))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))
    ok = res["tokens_identical"] and res["peak_within_budget"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
