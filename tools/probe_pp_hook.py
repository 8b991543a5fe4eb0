"""Probe: stock prompt speed (all layers in VRAM) against the engine's with
as little streaming as possible (one layer, or --budget's plan), both loaded
in one process and timed alternately on the same random ids (as
llama-bench), each prompt synchronised by reading its logits. With one layer
streamed the copies are negligible: what differs is the engine's hook, whose
path synchronises every segment, the graph's last one included.

    python3 tools/probe_pp_hook.py /tmp/m/llama3-8b.gguf --ubatch 512
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gguf_stream  # noqa: E402,F401  (llama.cpp before numpy)
import numpy as np  # noqa: E402
from probe_util import prompt_probe_args, timeline_ms  # noqa: E402
from gguf_stream.runtime import StockModel, StreamedModel  # noqa: E402

a = prompt_probe_args(ubatch=2048)

size = dict(n_ctx=a.pp + 128, n_batch=a.pp, n_ubatch=a.ubatch)
streamed_size = dict(vram_budget=a.budget) if a.budget else dict(n_streamed=1, n_slots=2)
with StockModel(a.model, 99, **size) as stock, StreamedModel(a.model, **streamed_size, **size) as streamed:
    models = {"stock": stock, "streamed": streamed}
    toks = [max(stock.token_bos(), 0)] + np.random.default_rng(0).integers(0, stock.n_vocab, a.pp - 1).tolist()
    out = {k: [] for k in models}
    for rep in range(a.reps + 1):
        for name, m in models.items():
            m.reset()
            t0 = time.perf_counter()
            m.eval(toks)
            m.logits()  # waits for the GPU (stock's decode returns before it finishes)
            if rep:  # the first round warms up
                out[name].append(round(a.pp / (time.perf_counter() - t0), 1))
    e = streamed.engine
    e.timeline(True)
    for _ in range(a.reps):
        streamed.reset()
        e.timeline_mark(True)
        streamed.eval(toks)
        e.timeline_mark(False)
    print(json.dumps(dict(n_ubatch=a.ubatch, n_streamed=len(streamed.plan.streamed), **out,
                          ratio=round(float(np.median(out["streamed"]) / np.median(out["stock"])), 3),
                          streamed_ms=timeline_ms(e.timeline_get()))))
