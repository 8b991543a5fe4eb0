"""Where a mixture-of-experts generate decode's time goes, one placement per process (issue #15).

    python tools/split_time.py MODEL.gguf stock:N      # llama.cpp's -ngl all --n-cpu-moe N
    python tools/split_time.py MODEL.gguf split:auto   # gguf-stream at --budget, --moe-split auto|off|N
        [--budget 0.75 | --streamed K] [--ubatch 512] [--threads T] [--tokens 128] [--reps 3]

Loads the model on CUDA (--device host: its test; n_ctx 2176, n_batch 2048, flash attention), takes
bench's tg tokens, and per repetition decodes them one at a time after one
warm-up token (each waited for). For gguf-stream it also prints, per token,
the engine's timeline (the GPU's segments, the hook's time between them,
the time before the first) and, per split layer run, the hook's time with
the part spent waiting for the CPU's experts and for the uploads (counters).
The best repetition closes the output (RESULT). BENCHMARKS.md, ninth
session, has this on Qwen3-30B-A3B's shape at 0.75x -ub 512; environment
variables such as OMP_WAIT_POLICY apply as usual.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gguf_stream.bench.timing import workload_tokens  # noqa: E402
from tools.probe import bracketed, load as probe_load  # noqa: E402  (the probes' loader: n_ctx 2176, n_batch 2048)


def load(a):
    """stock:N (-ngl all --n-cpu-moe N) or split:auto|off|N at --budget / --streamed."""
    kind, _, value = a.variant.partition(":")
    if kind == "stock":
        return probe_load(a, 99, n_cpu_moe=int(value), flash_attn=True)
    if kind != "split":
        raise SystemExit(f"variant {a.variant!r}: use stock:N or split:auto|off|N")
    place = dict(n_streamed=a.streamed, n_slots=1) if a.streamed else dict(
        vram_budget=int(a.budget * os.path.getsize(a.model)))
    return probe_load(a, moe_split=value if value in ("auto", "off") else int(value), generate_cpu_layers="auto",
                      calibrate_on_tokens=False, flash_attn=True, **place)


def per_token(eng, c0, c1, n: int) -> str:
    tl = eng.timeline_get()
    runs = max(c1.split_layers - c0.split_layers, 1)
    us = 1e6 / runs
    return (f"; N={c1.split_n_upload}, {runs / n:.1f} split layer runs per token, each: hook {tl.between_s * us:.0f} us, "
            f"CPU wait {(c1.split_cpu_wait_seconds - c0.split_cpu_wait_seconds) * us:.0f} us, upload wait "
            f"{(c1.split_upload_seconds - c0.split_upload_seconds) * us:.0f} us, experts on the CPU "
            f"{(c1.split_cpu - c0.split_cpu) / runs:.2f}, uploaded {(c1.split_uploaded - c0.split_uploaded) / runs:.2f}; "
            f"per token: wall {tl.wall_s / n * 1e3:.2f} ms, GPU {tl.gpu_s / n * 1e3:.2f} ms in "
            f"{tl.gpu_segments / n:.1f} segments, hooks {tl.between_s / n * 1e3:.2f} ms, before {tl.pre_s / n * 1e3:.2f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("variant", help="stock:N or split:auto|off|N")
    ap.add_argument("--budget", type=float, default=0.75, help="VRAM budget as a fraction of the file (split)")
    ap.add_argument("--streamed", type=int, default=0, help="stream this many layers' experts instead (split)")
    ap.add_argument("--ubatch", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cuda", help="cuda (the measure), or host (the tool's own test)")
    a = ap.parse_args()
    with load(a) as m:
        _, tg = workload_tokens(m, 0, a.tokens, 42)
        eng = getattr(m, "engine", None)
        best = 0.0
        for rep in range(a.reps):
            m.reset()
            m.eval(tg[:1])
            m.synchronize()
            c0 = m.stats.counters
            if eng is not None:
                eng.timeline(True)
            t0 = time.perf_counter()
            for t in tg[1:]:
                bracketed(m, [t]) if eng is not None else m.eval([t])
                m.synchronize()
            n = len(tg) - 1
            tps = n / (time.perf_counter() - t0)
            best = max(best, tps)
            line = f"{a.variant} rep {rep}: tg {tps:.2f} t/s"
            if eng is not None and c0 is not None:
                line += per_token(eng, c0, m.stats.counters, n)
                eng.timeline(False)
            print(line, flush=True)
        print(f"RESULT {a.variant}: tg {best:.2f} t/s, best of {a.reps}", flush=True)


if __name__ == "__main__":
    main()
