"""Interleaved A/B on a GPU: stock llama.cpp with every layer on the GPU against
gguf-stream at a budget the whole model fits in (so it keeps it resident).

    python tools/ab_resident.py MODEL [BUDGET]

Three rounds, each loading both in turn and timing tg128 twice from an empty
KV cache, so that run order (GPU/CPU warmth) cannot favour either side.
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
    m._lc.llama_synchronize(m.ctx)
    return (n - 1) / (time.perf_counter() - t0)


def main() -> None:
    path = sys.argv[1]
    budget = sys.argv[2] if len(sys.argv) > 2 else "6GiB"
    for rnd in range(3):
        for name, make in (("stock all layers", lambda: StockModel(path, -1, **OPTS)),
                           (f"streamed {budget}", lambda: StreamedModel(path, vram_budget=budget, **OPTS))):
            with make() as m:
                tg_tps(m, 16)  # warm-up
                runs = [tg_tps(m) for _ in range(2)]
                streamed = len(m.plan.streamed) if getattr(m, "plan", None) else 0
                print(rnd, name, [round(x, 1) for x in runs], f"streamed layers: {streamed}", flush=True)


if __name__ == "__main__":
    main()
