"""Probe: where a generated token's time goes, without adding boundaries.

Loads the model streamed at a budget (automatic generate split unless
--n-cpu is given), generates a few warm-up tokens, then brackets each of -n
single-token decodes with the engine's timeline and prints one JSON line per
CPU-layer count: ms per token for graph building (pre), CPU and GPU segments,
the hook's work between segments (adoption, copy waits and issues, split
input copies) and what is left (logits, Python), segments per token, copy
waits, and the CPU layers' effective GB/s. With --pp N it times prompts of
N tokens instead (every overflow layer streamed), one decode each.

    python3 tools/probe_timeline.py /tmp/m/llama3-8b.gguf --budget 3.16GiB --n-cpu 9 10 11
"""
import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gguf_stream  # noqa: E402,F401  (llama.cpp before numpy)
from probe_util import timeline_ms  # noqa: E402
from gguf_stream.perfmodel import Rates, generate_splits  # noqa: E402
from gguf_stream.runtime import StreamedModel  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--budget")
ap.add_argument("--n-streamed", type=int, help="instead of a budget (e.g. a CPU-only smoke run)")
ap.add_argument("-n", type=int, default=32)
ap.add_argument("--n-cpu", type=int, nargs="*", help="CPU-layer counts to probe (default: the engine's choice)")
ap.add_argument("--ubatch", type=int, default=2048)
ap.add_argument("--pp", type=int, help="time prompts of this many tokens (n_batch = N) instead of tokens")
a = ap.parse_args()
os.environ["GGUF_STREAM_CACHE"] = tempfile.mkdtemp()
size = dict(vram_budget=a.budget) if a.budget else dict(n_streamed=a.n_streamed, n_slots=2)
# CPU layers change under the live context: it must not reuse graphs
with StreamedModel(a.model, **size, generate_cpu_layers="auto", n_ctx=max(2176, (a.pp or 0) + 128),
                   n_batch=a.pp or a.ubatch, n_ubatch=a.ubatch, graph_reuse=False) as m:
    e, overflow = m.engine, m.plan.streamed
    layer_bytes = m.streamer.model_file.layer_bytes
    # the engine's candidates (which layers for each count; without rates, i.e. on a CPU build, any)
    splits = generate_splits(overflow, layer_bytes, m.streamer.rates or Rates(1.0, 1.0, 0.0))
    bos = max(m.token_bos(), 0)
    prompt = [bos] + [1] * ((a.pp or 1) - 1)
    for n_cpu in [0] if a.pp else a.n_cpu or [len(m.plan.cpu_layers)]:
        cpu = splits[n_cpu][0]
        e.set_cpu_layers(cpu)
        m.reset()
        m.eval([bos] * (a.pp or 5))
        e.reset_counters()
        e.timeline(True)
        for _ in range(a.n):
            if a.pp:
                m.reset()
            e.timeline_mark(True)
            m.eval(prompt if a.pp else [1])
            e.timeline_mark(False)
        t, c = e.timeline_get(), e.counters()
        e.timeline(False)
        n = t.decodes
        print(json.dumps(dict(
            n_cpu=n_cpu, n_streamed=len(overflow) - n_cpu, tokens_per_s=round(n * (a.pp or 1) / t.wall_s, 2),
            **{f"{k}_ms": v for k, v in timeline_ms(t).items()},
            cpu_segments=round(t.cpu_segments / n, 1), gpu_segments=round(t.gpu_segments / n, 1),
            uploads=round(c.uploads / n, 1),
            boundaries=round(c.boundaries / n, 1), waits=round(c.adopted_waited / n, 2),
            wait_ms=round(c.wait_seconds / n * 1e3, 3),
            cpu_gb_s=round(sum(layer_bytes[i] for i in cpu) / (t.cpu_s / n) / 1e9, 1) if cpu else None)),
            flush=True)
