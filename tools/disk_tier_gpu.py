"""The disk tier on a GPU (issue #19): correctness, then speed, with the
page cache dropped before each timed test. Driven by tools/disk_tier_gpu.sh.

    python3 tools/disk_tier_gpu.py --model M --vram-budget 3GiB --host-budget 1.5GiB --out DIR

1. correctness: gguf-stream at the VRAM budget without a host budget (every
   streamed layer pinned) and with it (part of them on the disk tier, read
   through the staged CUDA reader): greedy tokens and logits must be equal
   (same bytes, same kernels: generate_cpu_layers none). Exit 1 otherwise.
2. speed, disk tier: pp (one eval of --n-prompt tokens) and tg (--n-gen
   single-token evals), the file's pages dropped (POSIX_FADV_DONTNEED)
   before each; tg twice: "cache" (pages may stay cached between tokens,
   as the OS allows) and "no-cache" (a thread drops the file's pages every
   --drop-every s, so each token reads the disk tier from the device).
   The pinned run's pp/tg at the same VRAM budget beside it.
3. the disk's read rate: the file read with pread in 64 MiB pieces after
   dropping its pages (buffered), and with O_DIRECT where allowed.
Writes DIR/disk_tier_gpu.json; prints one line per result.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

if not __package__:  # run as a script: the checkout's gguf_stream
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gguf_stream  # noqa: E402,F401  (llama.cpp before numpy)
import numpy as np  # noqa: E402
from gguf_stream.bench.timing import decode_tps, workload_tokens  # noqa: E402
from gguf_stream.config import select_device  # noqa: E402
from gguf_stream.memory import format_size, parse_size  # noqa: E402
from gguf_stream.model import StreamedModel  # noqa: E402

PROMPT = "The history of the transistor begins with"
PIECE = 64 << 20


def drop_cache(path: str) -> None:
    """The file's clean pages out of the page cache (no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class Dropper:
    """Drops the file's pages every `every` seconds while active."""

    def __init__(self, path: str, every: float):
        self.path, self.every, self._stop = path, every, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.every):
            drop_cache(self.path)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def read_rate(path: str, limit: int, direct: bool) -> float | None:
    """Bytes/s reading up to `limit` bytes of the file in PIECE preads, cache dropped first."""
    drop_cache(path)
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    except OSError:
        return None
    buf = mmap.mmap(-1, PIECE)  # page-aligned, as O_DIRECT needs
    total, t0 = 0, time.perf_counter()
    try:
        while total < limit:
            n = os.preadv(fd, [buf], total)
            if n <= 0:
                break
            total += n
    except OSError:
        return None
    finally:
        os.close(fd)
        buf.close()
    return total / (time.perf_counter() - t0)


def timed_tests(m, path: str, n_prompt: int, n_gen: int, drop_every: float) -> dict:
    pp, tg = workload_tokens(m, n_prompt, n_gen, seed=42)
    out = {}
    m.reset()
    m.eval(pp[:8])  # warm-up: kernels, graphs
    m.synchronize()
    for name, toks, single, dropper in (("pp", pp, False, None), ("tg_cache", tg, True, None),
                                        ("tg_nocache", tg, True, drop_every)):
        if not toks:
            continue
        m.reset()
        m.reset_counters()
        drop_cache(path)
        if dropper:
            with Dropper(path, dropper):
                tps = decode_tps(m, toks, single)
        else:
            tps = decode_tps(m, toks, single)
        c = m.stats.counters
        out[name] = {"tps": tps, "disk_bytes": c.disk_bytes, "disk_read_seconds": c.disk_read_seconds,
                     "disk_wait_seconds": c.disk_wait_seconds, "disk_overlap": c.disk_overlap,
                     "waited": c.adopted_waited, "uploads": c.uploads}
        rate = f", disk {c.disk_bytes / c.disk_read_seconds / 1e9:.2f} GB/s in the reader" if c.disk_read_seconds else ""
        print(f"  {name}: {tps:.2f} t/s ({format_size(c.disk_bytes)} read from the file{rate}, "
              f"overlap {c.disk_overlap if c.disk_overlap is None else round(c.disk_overlap, 2)})", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--vram-budget", default="3GiB")
    ap.add_argument("--host-budget", default="1.5GiB")
    ap.add_argument("--n-prompt", type=int, default=2048)
    ap.add_argument("--n-gen", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens compared")
    ap.add_argument("--drop-every", type=float, default=0.05)
    ap.add_argument("--read-limit", default="2GiB", help="bytes of the file read for the disk's rate")
    ap.add_argument("--device", default="auto", help="host: a smoke test of this script without a GPU")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    n_ctx = max(a.n_prompt + a.n_gen, 512)
    opts = dict(vram_budget=a.vram_budget, n_ctx=n_ctx, n_batch=a.n_prompt, n_ubatch=a.n_prompt,
                generate_cpu_layers="none", device=a.device)
    res = {"model": a.model, "size": os.path.getsize(a.model), "vram_budget": a.vram_budget,
           "host_budget": a.host_budget}
    limit = parse_size(a.read_limit)
    for direct in (False, True):
        rate = read_rate(a.model, limit, direct)
        res[f"read_rate_{'direct' if direct else 'buffered'}"] = rate
        print(f"disk read rate ({'O_DIRECT' if direct else 'buffered, cache dropped'}): "
              + (f"{rate / 1e9:.2f} GB/s" if rate else "not measured (refused)"), flush=True)

    runs = {}
    for name, extra in (("pinned", {}), ("disk", {"host_budget": a.host_budget})):
        drop_cache(a.model)
        t0 = time.perf_counter()
        with StreamedModel(a.model, **opts, **extra) as m:
            load_s = time.perf_counter() - t0
            print(f"{name}: loaded in {load_s:.1f} s; {m.plan.tiers_line()}", flush=True)
            tokens, logits = m.generate(m.tokenize(PROMPT), a.tokens, with_logits=True)
            c = m.stats.counters
            runs[name] = {"tokens": tokens, "logits": logits, "load_seconds": load_s,
                          "plan": {"disk_layers": list(m.plan.disk_layers), "disk_bytes": m.plan.disk_bytes,
                                   "pinned_bytes": m.plan.pinned_bytes, "streamed": list(m.plan.streamed)},
                          "counters_after_generate": asdict(c),
                          "tests": timed_tests(m, a.model, a.n_prompt, a.n_gen, a.drop_every)}
    same_tokens = runs["disk"]["tokens"] == runs["pinned"]["tokens"]
    same_logits = bool(np.array_equal(runs["disk"]["logits"], runs["pinned"]["logits"]))
    res["tokens_identical"], res["logits_identical"] = same_tokens, same_logits
    c = runs["disk"]["counters_after_generate"]
    # on CUDA every disk-tier read goes through the staged reader (pinned staging buffers)
    staged = c["staging_bytes"] > 0 or select_device(a.device) != "cuda"
    res["disk_tier_used"] = bool(runs["disk"]["plan"]["disk_layers"]) and c["disk_reads"] > 0 and staged
    for r in runs.values():
        del r["logits"]
    res["runs"] = runs
    print(f"greedy {a.tokens} tokens identical: {same_tokens}; logits bit-identical: {same_logits}; "
          f"disk tier used (staged reader): {res['disk_tier_used']}", flush=True)
    Path(a.out, "disk_tier_gpu.json").write_text(json.dumps(res, indent=2))
    return 0 if same_tokens and same_logits and res["disk_tier_used"] else 1


if __name__ == "__main__":
    sys.exit(main())
