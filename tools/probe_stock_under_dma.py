"""Probe: stock llama.cpp's CPU-layer speed with and without a concurrent
pinned host->device copy loop (tools/probe_membw.py --hog in a child
process), i.e. the CPU rate c the hybrid can expect while streaming.

    python3 tools/probe_stock_under_dma.py /tmp/m/llama3-8b.gguf --ngl 14
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
a = ap.parse_args()


out = {"ngl": a.ngl}
with StockModel(a.model, a.ngl, n_ctx=2176, n_batch=2048, n_ubatch=2048) as s:
    tg(s, 8)
    for rep in range(2):
        out[f"alone_{rep}"] = round(tg(s, a.n), 2)
        hog = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "probe_membw.py"),
                                "--hog", "20"], stdout=subprocess.PIPE, text=True)
        hog.stdout.readline()  # "ready": CUDA is up and the copies start
        time.sleep(0.5)
        out[f"with_dma_{rep}"] = round(tg(s, a.n), 2)
        hog.kill()
        hog.wait()
print(json.dumps(out))
