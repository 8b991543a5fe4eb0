"""Probe: where a CPU-computed layer's time goes in the hybrid generate phase.

Streams a model at a budget, makes every other streamed layer a CPU layer
(--cpu-every 1: all of them, so no upload runs beside the CPU),
times each layer of single-token decodes (the engine's per-layer timing),
and with --sched-debug prints llama.cpp's graph splits for one token
(GGML_SCHED_DEBUG=1: one "## SPLIT" line per backend switch, with its inputs).

    python3 tools/probe_sched.py /tmp/m/llama3-8b.gguf --budget 3.16GiB
    python3 tools/probe_sched.py /tmp/m/llama3-8b.gguf --budget 3.16GiB --sched-debug 2>&1 | grep SPLIT
"""
import argparse
import os
import sys

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--budget", required=True)
ap.add_argument("--tokens", type=int, default=8)
ap.add_argument("--sched-debug", action="store_true")
ap.add_argument("--host-kv", type=int, choices=(0, 1), default=1, help="CPU layers' KV cache in host memory")
ap.add_argument("--own-device", type=int, choices=(0, 1), default=1,
                help="CPU layers count as CPU layers while generating (their norms on the CPU)")
ap.add_argument("--cpu-every", type=int, default=2,
                help="every k-th streamed layer is a CPU layer (1: all of them, so nothing streams while generating)")
a = ap.parse_args()
if a.sched_debug:
    os.environ["GGML_SCHED_DEBUG"] = "1"  # read when the context's scheduler is created
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gguf_stream  # noqa: E402,F401  (llama.cpp before numpy)
from gguf_stream.runtime import StreamedModel  # noqa: E402

with StreamedModel(a.model, vram_budget=a.budget, n_ctx=2176, n_batch=2048, n_ubatch=2048,
                   cpu_layer_host_kv=bool(a.host_kv), cpu_layer_device=bool(a.own_device),
                   verbose=a.sched_debug, graph_reuse=False) as m:  # CPU layers chosen on the live context
    cpu = m.plan.streamed[a.cpu_every - 1::a.cpu_every]
    m.engine.set_cpu_layers(cpu)
    print("CPU layers", cpu, file=sys.stderr)
    m.eval([1])
    m.eval([1])
    if a.sched_debug:
        print("=== one token ===", file=sys.stderr, flush=True)
        m.eval([1])
        print("=== end ===", file=sys.stderr, flush=True)
        sys.exit(0)
    m.engine.set_timing(True)
    for _ in range(a.tokens):
        m.eval([1])
    times = m.engine.layer_times(m.plan.n_layer)
    m.engine.set_timing(False)
    for i, (s, n) in enumerate(times):
        if n:
            kind = "cpu" if i in cpu else "streamed" if i in m.plan.streamed else "resident"
            per = s / n
            print(f"layer {i:2d} {kind:8s} {per * 1e3:.3f} ms  {m.plan.layers[i].bytes / per / 1e9:.1f} GB/s")
