"""Shared by the probes in tools/ (run as scripts: this directory is on sys.path)."""
import time


def tg(m, n: int) -> float:
    """Tokens/s of n single-token decodes after BOS, from an empty KV cache (as llama-bench)."""
    m.reset()
    m.eval([max(m.token_bos(), 0)])
    t0 = time.perf_counter()
    for _ in range(n):
        m.eval([1])
    m.logits()  # waits for the last token (stock's decode returns before the GPU finishes)
    return n / (time.perf_counter() - t0)
