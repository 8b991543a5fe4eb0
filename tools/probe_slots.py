"""Probe: prompt speed at n_ubatch 512 against the number of slots the
planner may use (max_slots), at one budget. More slots let uploads run
further ahead of adjacent streamed layers, but take VRAM that would hold
resident layers.

    python3 tools/probe_slots.py /tmp/m/llama3-8b.gguf --budget 2.11GiB --slots 2 3
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gguf_stream  # noqa: E402,F401  (llama.cpp before numpy)
from gguf_stream.runtime import StreamedModel  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--budget", required=True)
ap.add_argument("--slots", type=int, nargs="+", default=[2, 3])
ap.add_argument("-ub", type=int, default=512)
ap.add_argument("-r", type=int, default=3)
a = ap.parse_args()
for max_slots in a.slots:
    with StreamedModel(a.model, vram_budget=a.budget, n_ctx=2176, n_batch=a.ub, n_ubatch=a.ub,
                       max_slots=max_slots) as m:
        prompt = [max(m.token_bos(), 0)] + [1] * 2047
        m.eval(prompt)  # warm-up
        rates = []
        for _ in range(a.r):
            m.reset()
            m.engine.reset_counters()
            t0 = time.perf_counter()
            m.eval(prompt)
            rates.append(2048 / (time.perf_counter() - t0))
        c = m.stats.counters
        print(f"max_slots {max_slots}: {len(m.plan.streamed)} streamed x {m.plan.n_slots} slots, "
              f"pp2048 {' '.join(f'{r:.0f}' for r in rates)} t/s, last run waits {c.adopted_waited} "
              f"({c.wait_seconds * 1e3:.0f} ms), peak {m.stats.vram_peak_bytes / 2**30:.2f} GiB", flush=True)
