"""Probe: what a generated token costs along different call paths and
context shapes, for one placement, in one process per variant.

Loads the model streamed at a budget (automatic generate split), or with the
layers given by --streamed/--cpu, in a context of --ctx cells and --ubatch,
then alternates --rounds times: -n tokens through StreamedModel.eval plus a
device sync (the bench's tg loop) and -n raw llama_decode calls plus
llama_synchronize (the split trials' loop). Prints one JSON line per path
with the per-token median, mean and 90th percentile (ms), the engine
timeline of the eval path, and llama.cpp's count of reused graphs.
--no-reuse makes the context rebuild every graph (graph_reuse=False).

    python3 tools/probe_tg_paths.py /tmp/m/llama3-8b.gguf --budget 3.16GiB [--no-reuse]
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gguf_stream  # noqa: E402,F401  (llama.cpp before numpy)
from probe_util import timeline_ms  # noqa: E402
from gguf_stream import llama_abi  # noqa: E402
from gguf_stream.runtime import StreamedModel  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--budget")
ap.add_argument("--streamed", type=int, nargs="*", help="streamed layers (instead of a budget)")
ap.add_argument("--cpu", type=int, nargs="*", default=(), help="with --streamed: the generate phase's CPU layers")
ap.add_argument("--ctx", type=int, default=2176)
ap.add_argument("--ubatch", type=int, default=2048)
ap.add_argument("-n", type=int, default=48)
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--no-reuse", action="store_true", help="rebuild every graph")
ap.add_argument("--label", default="")
a = ap.parse_args()
size = (dict(vram_budget=a.budget, generate_cpu_layers="auto") if a.budget else
        dict(streamed_layers=tuple(a.streamed), n_slots=2, generate_cpu_layers=tuple(a.cpu)))
lc = llama_abi.llama()


def stats(ms):
    s = sorted(ms)
    return dict(median=round(s[len(s) // 2], 3), mean=round(sum(s) / len(s), 3), p90=round(s[int(len(s) * 0.9)], 3))


with StreamedModel(a.model, **size, n_ctx=a.ctx, n_batch=a.ubatch, n_ubatch=a.ubatch,
                   graph_reuse=not a.no_reuse) as m:
    e, bos = m.engine, max(m.token_bos(), 0)
    print(json.dumps(dict(label=a.label, streamed=list(m.plan.streamed), cpu=list(m.plan.cpu_layers),
                          trials=m.streamer.split_trials, ctx=a.ctx, ubatch=a.ubatch,
                          reuse=m.streamer.reuses_graphs)), flush=True)
    m.eval([bos] * 40)  # a prompt first, as in a chat (a graph of another shape)
    times = {"eval": [], "raw": []}
    e.timeline(True)
    for _ in range(a.rounds):
        for path in times:
            m.reset()
            m.eval([bos])
            m.synchronize()
            for k in range(a.n):
                t0 = time.perf_counter()
                if path == "eval":
                    e.timeline_mark(True)
                    m.eval([1 + k])
                    m.synchronize()
                    e.timeline_mark(False)
                else:
                    arr = (lc.llama_token * 1)(1 + k)
                    m.streamer.before_decode(1)
                    rc = lc.llama_decode(m.ctx, lc.llama_batch_get_one(arr, 1))
                    m.synchronize()
                    assert rc == 0, rc
                times[path].append((time.perf_counter() - t0) * 1e3)
    t = e.timeline_get()
    e.timeline(False)
    reused = lc.llama_perf_context(m.ctx).n_reused
    for path, ms in times.items():
        st = stats(ms)
        print(json.dumps(dict(label=a.label, path=path, **st, t_s=round(1e3 / st["mean"], 2),
                              reused=reused, **({f"tl_{k}_ms": v for k, v in timeline_ms(t).items()}
                                                if path == "eval" else {}))), flush=True)
