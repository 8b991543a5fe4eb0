"""Probe: what one synchronised segment boundary costs a prompt.

Streams one layer (or --budget's plan) and times pp of random ids with the
engine's usual boundaries, alternating with its timing mode, which adds a
boundary at every layer end, in one process. Prints t/s, boundaries per
prompt and the cost per added boundary.

    python3 tools/probe_boundaries.py /tmp/m/llama3-8b.gguf --ubatch 512
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gguf_stream  # noqa: E402,F401  (llama.cpp before numpy)
import numpy as np  # noqa: E402
from probe_util import prompt_probe_args  # noqa: E402
from gguf_stream.runtime import StreamedModel  # noqa: E402

a = prompt_probe_args(ubatch=512)

size = dict(vram_budget=a.budget) if a.budget else dict(n_streamed=1, n_slots=2)
with StreamedModel(a.model, **size, n_ctx=a.pp + 128, n_batch=a.pp, n_ubatch=a.ubatch) as m:
    e = m.engine
    toks = [max(m.token_bos(), 0)] + np.random.default_rng(0).integers(0, m.n_vocab, a.pp - 1).tolist()
    m.eval(toks)  # warm-up
    res = {False: [], True: []}
    bounds = {}
    for _ in range(a.reps):
        for timing in (False, True):
            e.set_timing(timing)
            m.reset()
            e.reset_counters()
            t0 = time.perf_counter()
            m.eval(toks)  # synchronous: the hook syncs at every boundary and at the graph's end
            res[timing].append(time.perf_counter() - t0)
            bounds[timing] = e.counters().boundaries
    e.set_timing(False)
    base, more = np.median(res[False]), np.median(res[True])
    print(json.dumps(dict(n_ubatch=a.ubatch, n_streamed=len(m.plan.streamed),
                          usual=dict(boundaries=bounds[False], tps=[round(a.pp / s, 1) for s in res[False]]),
                          every_layer=dict(boundaries=bounds[True], tps=[round(a.pp / s, 1) for s in res[True]]),
                          ms_per_added_boundary=round((more - base) / max(bounds[True] - bounds[False], 1) * 1e3, 4))))
