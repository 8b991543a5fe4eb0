"""Shared by the probes in tools/ (run as scripts: this directory is on sys.path)."""
import argparse
import time


def prompt_probe_args(ubatch: int):
    """Options of the probes that time prompts: a model, how much of it
    streams (--budget, else one layer), prompt size, ubatch, repetitions."""
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--budget", help="stream the plan of this VRAM budget (default: one layer)")
    ap.add_argument("--pp", type=int, default=2048)
    ap.add_argument("--ubatch", type=int, default=ubatch)
    ap.add_argument("--reps", type=int, default=3)
    return ap.parse_args()


def tg(m, n: int) -> float:
    """Tokens/s of n single-token decodes after BOS, from an empty KV cache (as llama-bench)."""
    m.reset()
    m.eval([max(m.token_bos(), 0)])
    t0 = time.perf_counter()
    for _ in range(n):
        m.eval([1])
    m.logits()  # waits for the last token (stock's decode returns before the GPU finishes)
    return n / (time.perf_counter() - t0)


def timeline_ms(t) -> dict:
    """An engine Timeline as ms per decode: pre (graph building and inputs),
    cpu and gpu segments, between (the hook's work) and what is left."""
    n = max(t.decodes, 1)
    parts = dict(decode=t.wall_s, pre=t.pre_s, cpu=t.cpu_s, gpu=t.gpu_s, between=t.between_s,
                 rest=t.wall_s - t.pre_s - t.cpu_s - t.gpu_s - t.between_s)
    return {k: round(v / n * 1e3, 3) for k, v in parts.items()}
