"""Interleaved A/B on a GPU: stock -ngl all vs gguf-stream at a budget that fits,
3 rounds x 2 tg128 each from an empty KV cache. Usage: python tools/ab_resident.py MODEL"""
import sys, time
import gguf_stream  # llama.cpp before numpy
from gguf_stream.runtime import StockModel, StreamedModel, EngineConfig
P = sys.argv[1] if len(sys.argv) > 1 else "/tmp/m/llama3-8b.gguf"
cfg = dict(n_ctx=2176, n_batch=2048, n_ubatch=2048)
def tg(m, n=128):
    m.reset(); bos = max(m.token_bos(), 0)
    m.eval([bos]); t = time.perf_counter()
    for i in range(n - 1):
        m.eval([1000 + i])
    m._lc.llama_synchronize(m.ctx)
    return (n - 1) / (time.perf_counter() - t)
for rnd in range(3):
    for name, make in (("stock ngl33", lambda: StockModel(P, 33, **cfg)), ("streamed all", lambda: StreamedModel(P, vram_budget="6GiB", **cfg))):
        with make() as m:
            tg(m, 16)
            r = [tg(m) for _ in range(2)]
            print(rnd, name, [round(x, 1) for x in r], getattr(m, "plan", None) and len(m.plan.streamed), flush=True)
