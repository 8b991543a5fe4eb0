"""Probe: is the automatic generate split the fastest, and what does an
option cost, measured in one process on one loaded model (load-to-load
variation of this VM's CPU path is +-15%, larger than the effects).

Loads the model streamed at a budget with generate_cpu_layers="auto" (fresh
rates cache), then for a few rounds times tg for CPU-layer counts around the
chosen one, with CPU layers counting as CPU layers for llama.cpp (own=1, the
default) and not (own=0), and prints one JSON line per measurement: tokens/s,
adoption waits and wait seconds per token.

    python3 tools/probe_split_sweep.py /tmp/m/llama3-8b.gguf --budget 3.16GiB
"""
import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gguf_stream  # noqa: E402,F401  (llama.cpp before numpy)
from probe_util import tg  # noqa: E402
from gguf_stream import llama_abi, native  # noqa: E402
from gguf_stream.perfmodel import generate_splits  # noqa: E402
from gguf_stream.runtime import StreamedModel  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--budget", required=True)
ap.add_argument("-n", type=int, default=32)
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--spread", type=int, default=2, help="CPU-layer counts chosen-spread .. chosen+spread")
a = ap.parse_args()
os.environ["GGUF_STREAM_CACHE"] = tempfile.mkdtemp()
# CPU layers change under the live context: it must not reuse graphs
with StreamedModel(a.model, vram_budget=a.budget, generate_cpu_layers="auto", n_ctx=2176, n_batch=2048,
                   n_ubatch=2048, graph_reuse=False) as m:
    e, overflow, n_layer = m.engine, m.plan.streamed, m.plan.n_layer
    r = m.streamer.rates
    chosen = len(m.plan.cpu_layers)
    print(json.dumps(dict(pcie=r.pcie_bytes_per_s / 1e9, cpu=r.cpu_bytes_per_s / 1e9, G_ms=r.gpu_token_seconds * 1e3,
                          predicted=1 / m.streamer.predicted_token_seconds, n_cpu=chosen, n_overflow=len(overflow))),
          flush=True)
    e.set_phase(native.PHASE_PROMPT)
    cells = llama_abi.layer_device_cells(m.model, n_layer)

    splits = generate_splits(overflow, m.streamer.model_file.layer_bytes, r)  # the engine's candidates

    for rnd in range(a.rounds):
        for own in (1, 0):
            e.set_phase(native.PHASE_PROMPT)  # the loaded devices back in the cells
            e.bind_layer_devices(None)
            if own:
                e.bind_layer_devices(cells)
            for n_cpu in range(max(chosen - a.spread, 0), min(chosen + a.spread, len(overflow)) + 1):
                e.set_cpu_layers(splits[n_cpu][0])
                tg(m, 4)
                e.reset_counters()
                t = tg(m, a.n)
                c = e.counters()
                print(json.dumps(dict(round=rnd, own=own, n_cpu=n_cpu, tg=round(t, 3),
                                      waits_per_token=round(c.adopted_waited / (a.n + 1), 2),
                                      wait_ms_per_token=round(c.wait_seconds / (a.n + 1) * 1e3, 3))), flush=True)
    e.set_phase(native.PHASE_PROMPT)
