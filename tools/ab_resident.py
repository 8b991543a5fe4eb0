"""Interleaved A/B on a GPU where gguf-stream picks stock's own placement:
stock llama.cpp at -ngl NGL against gguf-stream at BUDGET, e.g. every layer
(-1) at a budget the whole model fits in (it keeps it resident), or -ngl 1 at
a budget below streaming's minimum (it runs llama.cpp's split).

    python tools/ab_resident.py MODEL [BUDGET [NGL]]

Three rounds, each loading both in turn and timing pp2048 once and tg128
twice from an empty KV cache, so that run order (GPU/CPU warmth) cannot
favour either side.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gguf_stream.runtime import StockModel, StreamedModel  # noqa: E402  (llama.cpp before numpy)

OPTS = dict(n_ctx=2176, n_batch=2048, n_ubatch=2048)


def tg_tps(m, n: int = 128) -> float:
    m.reset()
    m.eval([max(m.token_bos(), 0)])
    t0 = time.perf_counter()
    for i in range(n - 1):
        m.eval([1000 + i])
    m.synchronize()
    return (n - 1) / (time.perf_counter() - t0)


def pp_tps(m, n: int = 2048) -> float:
    m.reset()
    t0 = time.perf_counter()
    m.eval([max(m.token_bos(), 0)] + [1000 + i for i in range(n - 1)])
    m.synchronize()
    return n / (time.perf_counter() - t0)


def main() -> None:
    path = sys.argv[1]
    budget = sys.argv[2] if len(sys.argv) > 2 else "6GiB"
    ngl = int(sys.argv[3]) if len(sys.argv) > 3 else -1
    for rnd in range(3):
        for name, make in ((f"stock -ngl {ngl}", lambda: StockModel(path, ngl, **OPTS)),
                           (f"streamed {budget}", lambda: StreamedModel(path, vram_budget=budget, **OPTS))):
            with make() as m:
                tg_tps(m, 16)  # warm-up
                pp = pp_tps(m)
                runs = [tg_tps(m) for _ in range(2)]
                plan = getattr(m, "plan", None)
                how = "" if plan is None else (f"stock split -ngl {plan.stock_gpu_layers}" if plan.stock_gpu_layers
                                               is not None else f"streamed layers: {len(plan.streamed)}")
                print(rnd, name, f"pp2048 {pp:.0f}", "tg128", [round(x, 1) for x in runs], how, flush=True)


if __name__ == "__main__":
    main()
