"""Aggregate t/s of K concurrent HTTP clients against one, on `gguf-stream serve -np K` (GPU box).

    python3 tools/serve_batch_bench.py [MODEL] [--budget 0.25x] [-k 1,4,16] [-n 64] [-c 512] [-- SERVE FLAGS]

On the GPU box the server packages come from `bash tools/stage_server_wheels.sh`
(run locally after staging .device). MODEL defaults to /tmp/m/llama3-8b.gguf (made with gguf_stream.synth when
missing). For each K it starts `gguf-stream serve MODEL -np K -c C*K
--vram-budget B` (C cells per slot), waits for /health, then times K clients
that each send one greedy /v1/completions of -n tokens at the same moment
(short distinct prompts), and, on the same server, one client alone. With
--queued it also runs K clients against -np 1 (llama_cpp.server's queue).

Prints one line per run: np, clients, generated tokens (the responses'
usage), wall seconds (first request sent to last response), aggregate t/s
(tokens / wall, prompts included), and the ratio to one client on that
server. Decides: aggregate t/s with K clients vs 1 (issue #18's target for
the engine: >= 8x at 16 sequences on the 8B shape at 0.25x / 0.5x budgets;
the server adds HTTP and Python per token, so expect somewhat less), and
-np K vs --queued (1x: requests served one after another).

With --turns T each of the K clients holds a conversation instead: T
requests, each prompt the previous one, its reply and a short follow-up (a
chat client resending its history), its first prompt --history words long;
run once with the prompt cache (the default) and once with
--no-prompt-cache, each a fresh server: wall seconds of each turn (all K
clients' requests of that turn), and the cache's speed-up per turn
(--no-cache-first: that server first, an order check).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

PROMPTS = ["The capital of France is", "Once upon a time", "The quick brown fox", "In 1492 Columbus",
           "Water boils at", "def fibonacci(n):", "The best way to learn", "My favourite colour is"]


def vram_budget(budget: str, model: str) -> str:
    """--vram-budget for serve: a fraction of the file ('0.25x', as bench takes it) in MiB, else as given."""
    if budget.endswith("x"):
        return f"{os.path.getsize(model) * float(budget[:-1]) / 2**20:.0f}MiB"
    return budget


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=3600) as r:
        return json.load(r)


def at_once(url: str, bodies: list[dict]) -> tuple[list[dict], float]:
    """One /v1/completions per body, all sent at the same moment, each from
    its own thread; (the responses, wall seconds from the send to the last)."""
    out, start = [None] * len(bodies), threading.Barrier(len(bodies) + 1)

    def one(i):
        start.wait()
        out[i] = post(f"{url}/v1/completions", bodies[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return out, time.perf_counter() - t0


def clients(url: str, k: int, n: int) -> tuple[int, float]:
    """k requests at once; (generated tokens, wall seconds)."""
    bodies = [{"prompt": f"{PROMPTS[i % len(PROMPTS)]} ({i})", "max_tokens": n, "temperature": 0} for i in range(k)]
    out, wall = at_once(url, bodies)
    return sum(r["usage"]["completion_tokens"] for r in out), wall


def conversations(url: str, k: int, turns: int, n: int, history: int) -> list[float]:
    """k clients, each `turns` requests whose prompt grows by the last reply
    and a follow-up; wall seconds of each turn (all k clients at once)."""
    base = " ".join(["The report covers the harvest, the weather and the markets of the year."] * (history // 13 + 1))
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} ({i}). {base}" for i in range(k)]
    walls = []
    for _ in range(turns):
        out, wall = at_once(url, [{"prompt": p, "max_tokens": n, "temperature": 0} for p in prompts])
        walls.append(wall)
        prompts = [p + r["choices"][0]["text"] + " Go on." for p, r in zip(prompts, out)]
    return walls


def serve(model: str, np_: int, args, *more: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "gguf_stream", "serve", model, "--port", str(port), "-np", str(np_),
           "-c", str(args.c * np_), "--vram-budget", vram_budget(args.budget, args.model), *args.extra, *more]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=sys.stderr)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 1800
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if json.load(r).get("status") == "ok":
                    return proc, url
        except OSError:
            time.sleep(2)
    proc.kill()
    raise SystemExit("serve did not start in 30 min")


def run(model: str, np_: int, ks: list[int], args) -> None:
    proc, url = serve(model, np_, args)
    try:
        clients(url, 1, 4)  # warm-up (graphs, pools)
        one_tok, one_s = clients(url, 1, args.n)
        base = one_tok / one_s
        print(f"np {np_:3d}  clients   1  tokens {one_tok:5d}  {one_s:7.2f} s  {base:8.2f} t/s  1.00x", flush=True)
        for k in ks:
            if k == 1:
                continue
            tok, s = clients(url, k, args.n)
            print(f"np {np_:3d}  clients {k:3d}  tokens {tok:5d}  {s:7.2f} s  {tok / s:8.2f} t/s  "
                  f"{tok / s / base:.2f}x", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=120)


def run_turns(model: str, k: int, args) -> None:
    walls = {}
    order = (("cache", ()), ("no cache", ("--no-prompt-cache",)))
    for label, more in order[::-1] if args.no_cache_first else order:
        proc, url = serve(model, k, args, *more)
        try:
            clients(url, 1, 4)  # warm-up (graphs, pools)
            walls[label] = conversations(url, k, args.turns, args.n, args.history)
        finally:
            proc.terminate()
            proc.wait(timeout=120)
    for t, (a, b) in enumerate(zip(walls["cache"], walls["no cache"]), 1):
        print(f"np {k:3d}  turn {t:2d}  cache {a:7.2f} s  no cache {b:7.2f} s  {b / a:.2f}x", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default="/tmp/m/llama3-8b.gguf")
    p.add_argument("--budget", default="0.25x", help="--vram-budget (default 0.25x)")
    p.add_argument("-k", default="1,4,16", help="concurrent clients, comma-separated (default 1,4,16)")
    p.add_argument("-n", type=int, default=64, help="tokens per request (default 64)")
    p.add_argument("-c", type=int, default=512, help="KV cells per slot (default 512)")
    p.add_argument("--queued", action="store_true", help="also the largest K against -np 1")
    p.add_argument("--turns", type=int, default=0, help="conversations of this many requests per client, with "
                   "and without the prompt cache (default 0: single requests)")
    p.add_argument("--history", type=int, default=300, help="--turns: words of each first prompt (default 300)")
    p.add_argument("--no-cache-first", action="store_true",
                   help="--turns: start the server without the cache first (an order check)")
    args, extra = p.parse_known_args()  # the rest: serve flags, after --
    args.extra = [a for a in extra if a != "--"]
    if not os.path.exists(args.model):
        subprocess.run([sys.executable, "-m", "gguf_stream.synth", args.model, "--shape", "llama3-8b", "--type",
                        "Q4_K", "--seed", "0", "-q"], check=True)
    ks = [int(k) for k in args.k.split(",")]
    if args.turns:
        for k in ks:
            run_turns(args.model, max(k, 2), args)  # the batch loop (and its cache) is -np 2 and up
        return 0
    for k in ks:
        if k > 1:
            run(args.model, k, [k], args)
    if args.queued:
        run(args.model, 1, [max(ks)], args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
