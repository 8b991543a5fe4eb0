"""Probe: stock llama.cpp's speed with and without a concurrent pinned
host->device copy loop (tools/probe_membw.py --hog in a child process):
tg at a CPU/GPU split gives the CPU rate c the hybrid can expect while
streaming; --pp N with everything in VRAM shows whether the copies slow the
GPU's own compute.

    python3 tools/probe_stock_under_dma.py /tmp/m/llama3-8b.gguf --ngl 14
    python3 tools/probe_stock_under_dma.py /tmp/m/llama3-8b.gguf --ngl 99 --pp 2048 --ubatch 512
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gguf_stream  # noqa: E402,F401  (llama.cpp before numpy)
from probe_util import tg  # noqa: E402
from gguf_stream.runtime import StockModel  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--ngl", type=int, required=True)
ap.add_argument("-n", type=int, default=48)
ap.add_argument("--pp", type=int, help="time prompts of this many tokens (t/s of 3) instead of tg")
ap.add_argument("--ubatch", type=int, default=2048)
a = ap.parse_args()


def pp(m, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(3):
        m.reset()
        m.eval([max(m.token_bos(), 0)] + [1] * (n - 1))
        m.logits()  # waits for the GPU: stock's decode returns before it finishes
    return 3 * n / (time.perf_counter() - t0)


speed = (lambda m: pp(m, a.pp)) if a.pp else (lambda m: tg(m, a.n))


out = {"ngl": a.ngl, "test": f"pp{a.pp}" if a.pp else f"tg{a.n}", "n_ubatch": a.ubatch}
with StockModel(a.model, a.ngl, n_ctx=max(2176, (a.pp or 0) + 128), n_batch=a.pp or 2048, n_ubatch=a.ubatch) as s:
    tg(s, 8)
    speed(s)
    for rep in range(2):
        out[f"alone_{rep}"] = round(speed(s), 2)
        hog = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "probe_membw.py"),
                                "--hog", "20"], stdout=subprocess.PIPE, text=True)
        hog.stdout.readline()  # "ready": CUDA is up and the copies start
        time.sleep(0.5)
        out[f"with_dma_{rep}"] = round(speed(s), 2)
        hog.kill()
        hog.wait()
print(json.dumps(out))
