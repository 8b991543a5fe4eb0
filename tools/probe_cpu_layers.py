"""Probe: what a CPU-computed layer costs inside the hybrid generate phase.

Loads the model streamed at a budget with generate_cpu_layers="auto" (fresh
rates cache), prints the engine-measured rates, then times tg of N tokens for
the hybrid and for stock at a given -ngl. Run once per environment variant
(e.g. OMP_WAIT_POLICY) to see what moves the CPU rate.
"""
import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gguf_stream  # noqa: E402,F401  (llama.cpp before numpy)
from probe_util import tg  # noqa: E402
from gguf_stream.runtime import StockModel, StreamedModel  # noqa: E402


ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--budget", required=True)
ap.add_argument("--ngl", type=int, required=True)
ap.add_argument("-n", type=int, default=64)
ap.add_argument("--label", default="")
ap.add_argument("-t", "--threads", type=int, default=None)
ap.add_argument("--host-kv", type=int, choices=(0, 1), default=1, help="CPU layers' KV cache in host memory")
ap.add_argument("--own-device", type=int, choices=(0, 1), default=1,
                help="CPU layers count as CPU layers while generating (their norms on the CPU)")
a = ap.parse_args()


def anon_huge_mib() -> float:
    """Transparent huge pages backing this process's anonymous memory (MiB)."""
    with open("/proc/self/smaps_rollup") as f:
        kib = next((int(l.split()[1]) for l in f if l.startswith("AnonHugePages:")), 0)
    return kib / 1024


os.environ["GGUF_STREAM_CACHE"] = tempfile.mkdtemp()
opts = dict(n_ctx=2176, n_batch=2048, n_ubatch=2048, n_threads=a.threads)
out = {"label": a.label, "threads": a.threads, "host_kv": a.host_kv, "own_device": a.own_device}
with StreamedModel(a.model, vram_budget=a.budget, generate_cpu_layers="auto", cpu_layer_host_kv=bool(a.host_kv),
                   cpu_layer_device=bool(a.own_device), **opts) as m:
    r = m.streamer.rates
    out.update(pcie=r.pcie_bytes_per_s / 1e9, cpu=r.cpu_bytes_per_s / 1e9, G_ms=r.gpu_token_seconds * 1e3,
               predicted=1 / m.streamer.predicted_token_seconds, n_cpu=len(m.plan.cpu_layers),
               n_streamed=len(m.plan.streamed))
    tg(m, 8)
    out["hybrid_tg"] = tg(m, a.n)
    out["hybrid_anon_huge_mib"] = anon_huge_mib()
with StockModel(a.model, a.ngl, **opts) as s:
    tg(s, 8)
    out["stock_tg"] = tg(s, a.n)
    out["stock_anon_huge_mib"] = anon_huge_mib()
with StockModel(a.model, 0, **opts) as s:
    tg(s, 4)
    out["stock_ngl0_tg"] = tg(s, 16)
print(json.dumps(out))
