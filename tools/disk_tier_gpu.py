"""The disk tier on a GPU (issue #19): correctness, then speed, with the
page cache dropped before each timed test. Driven by tools/disk_tier_gpu.sh.

    python3 tools/disk_tier_gpu.py --model M --vram-budget 3GiB --host-budget 1.5GiB --out DIR
    python3 tools/disk_tier_gpu.py --model M --vram-budget 3GiB --host-budget 1.5GiB --ram-left 3 --out DIR

Without --ram-left:
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
   dropping its pages (buffered: one reader and READERS at once), and with
   O_DIRECT where allowed.

With --ram-left GiB, the same-memory comparison: tools/lock_ram.py locks
all host RAM but that for the whole run, and under it, the page cache
dropped before each (all of it, `echo 3 > /proc/sys/vm/drop_caches`, where
permitted; else the file's pages), run
- stock llama.cpp, its best recipe for a model larger than RAM:
  `llama-bench -lm mmap -ngl N` with N the most layers that fit
  --vram-budget by gguf-stream's estimate of a stock split, -r 1;
- gguf-stream at the same VRAM budget with --host-budget (the rest of the
  streamed parts on the disk tier): pp and tg as in 2 (tg once);
in that order (stock first, while this process has no CUDA context; ours
then runs here, its Python counted against its own RAM). No correctness
pair (the pinned run would not fit the RAM left). Each side's pp, tg,
bytes read from the disk during it (/proc/diskstats), and the disk bound:
n_prompt / (bytes a pass must read / the disk's best rate) for pp and
rate / bytes for tg, with gguf-stream's disk tier as its bytes and, for
stock, its CPU layers (the -ngl split's host part: what a pass reads when
the page cache cannot hold it). Exit 1 if a side failed or the lock was lost
(the OOM killer takes the largest process: the locker).
Writes DIR/disk_tier_gpu.json; prints one line per result.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import signal
import subprocess
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
READERS = 4  # gguf_stream.disk.DISK_READERS: the parallel read rate's readers
GB = 1e9


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


def read_rate(path: str, limit: int, direct: bool, readers: int = 1) -> float | None:
    """Bytes/s reading up to `limit` bytes of the file in PIECE preads, cache
    dropped first; `readers` threads take every readers-th piece (several
    reads in flight, as the staged engine's readers)."""
    drop_cache(path)
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    except OSError:
        return None
    limit = min(limit, os.fstat(fd).st_size)
    done, failed = [0] * readers, []

    def work(k):
        buf = mmap.mmap(-1, PIECE)  # page-aligned, as O_DIRECT needs
        try:
            for at in range(k * PIECE, limit, readers * PIECE):
                done[k] += os.preadv(fd, [buf], at)
        except OSError as exc:
            failed.append(exc)
        finally:
            buf.close()

    threads = [threading.Thread(target=work, args=(k,)) for k in range(readers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    os.close(fd)
    return None if failed or not sum(done) else sum(done) / seconds


def timed_tests(m, path: str, n_prompt: int, n_gen: int, drop_every: float | None, drop=None) -> dict:
    """pp, then tg with the file's pages left to the OS ("tg_cache") and, with
    drop_every, dropped that often ("tg_nocache"); drop(path) before each."""
    drop = drop or drop_cache
    pp, tg = workload_tokens(m, n_prompt, n_gen, seed=42)
    out = {}
    m.reset()
    m.eval(pp[:8])  # warm-up: kernels, graphs
    m.synchronize()
    tests = [("pp", pp, False, None), ("tg_cache", tg, True, None)]
    if drop_every:
        tests.append(("tg_nocache", tg, True, drop_every))
    for name, toks, single, dropper in tests:
        if not toks:
            continue
        m.reset()
        m.reset_counters()
        drop(path)
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


# ------------------------------------------------------------------ the same-memory comparison (--ram-left)

LOCK_RAM = Path(__file__).resolve().parent / "lock_ram.py"
NOT_DISKS = ("loop", "ram", "zram", "dm-", "md", "nbd", "sr", "fd")  # virtual, or counted on the disk below


def drop_page_cache(path: str) -> str:
    """The whole page cache where permitted (root), else the file's pages; says which."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "all"
    except OSError:
        drop_cache(path)
        return "file"


def disk_read_bytes(diskstats: str | None = None, disks: list[str] | None = None) -> int:
    """Bytes read from the machine's disks so far: /proc/diskstats' sectors
    read (512 bytes each) of the whole devices in /sys/block, less virtual
    ones (NOT_DISKS), so a partition or device mapper is not counted twice."""
    if diskstats is None:
        diskstats = Path("/proc/diskstats").read_text()
    if disks is None:
        disks = os.listdir("/sys/block") if os.path.isdir("/sys/block") else []
    whole = {d for d in disks if not d.startswith(NOT_DISKS)}
    total = 0
    for line in diskstats.splitlines():
        f = line.split()
        if len(f) > 5 and f[2] in whole:
            total += int(f[5]) * 512
    return total


def stock_ngl(mf, vram_budget: int, n_ctx: int, n_ubatch: int) -> int:
    """The most layers stock llama.cpp's -ngl puts on the GPU within the VRAM
    budget, by gguf-stream's estimate of a stock split (0 if none fits)."""
    from gguf_stream.planner import stock_split_plan

    return max([n for n in range(mf.n_layer + 1)
                if stock_split_plan(mf, n, vram_budget, n_ctx, n_ubatch).device_bytes <= vram_budget] or [0])


def stock_cpu_bytes(mf, ngl: int) -> int:
    """What stock's CPU side reads every pass with -ngl ngl: the layers not
    offloaded and, below n_layer + 1, the output matrix (llama.cpp offloads it last)."""
    layers = sum(mf.layer_bytes[:max(0, mf.n_layer - ngl)])
    output = mf.tensor("output.weight") or mf.tensor("token_embd.weight")  # tied embeddings
    return layers + (output.nbytes if output is not None and ngl <= mf.n_layer else 0)


def llama_bench_command(bench: str, model: str, ngl: int, n_prompt: int, n_gen: int) -> list[str]:
    """Stock's run: mmap (-lm mmap: this llama-bench's load mode; pages come
    from the file as touched), -ngl ngl, one repetition, JSON out."""
    return [bench, "-m", model, "-ngl", str(ngl), "-lm", "mmap", "-fa", "1", "-b", str(n_prompt),
            "-ub", str(n_prompt), "-p", str(n_prompt), "-n", str(n_gen), "-r", "1", "-o", "json"]


def parse_llama_bench(stdout: str) -> dict:
    """{"pp": t/s, "tg": t/s} from llama-bench -o json (a test it did not run: None)."""
    rows = json.loads(stdout[stdout.index("["):stdout.rindex("]") + 1])
    out = {"pp": None, "tg": None}
    for r in rows:
        out["pp" if r.get("n_gen", 0) == 0 else "tg"] = float(r["avg_ts"])
    return out


def disk_bound(rate: float | None, pass_bytes: int, n_prompt: int) -> dict:
    """The t/s a disk of `rate` bytes/s allows when every pass reads
    pass_bytes: pp (n_prompt tokens a pass) and tg (one token a pass); None
    without a rate, or with nothing to read (no disk bound)."""
    if not rate or pass_bytes <= 0:
        return {"pp": None, "tg": None}
    seconds = pass_bytes / rate
    return {"pp": n_prompt / seconds, "tg": 1 / seconds}


class RamLock:
    """tools/lock_ram.py --leave GiB held for a with block: waits for its
    `holding` line (its own output goes to log), then lets the body run."""

    def __init__(self, leave_gib: float, log: Path, timeout: float = 300):
        self.leave, self.log, self.timeout = leave_gib, log, timeout
        self.proc: subprocess.Popen | None = None
        self.line = ""

    def command(self) -> list[str]:
        # --hold-max: released even if this process is stopped in a way that skips __exit__
        return [sys.executable, str(LOCK_RAM), "--leave", str(self.leave), "--hold-max", "3600"]

    def __enter__(self):
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, text=True)
        t0 = time.perf_counter()
        while "holding" not in (text := self.log.read_text()):
            if self.proc.poll() is not None or time.perf_counter() - t0 > self.timeout:
                self.__exit__()
                last = text.strip().splitlines()[-1] if text.strip() else "no output"
                raise RuntimeError(f"the RAM lock did not start ({last})")
            time.sleep(0.2)
        self.line = text.splitlines()[0]
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __exit__(self, *exc):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_stock(a, mf, n_ctx: int) -> dict:
    """llama-bench -lm mmap at the VRAM budget, page cache dropped first."""
    ngl = stock_ngl(mf, parse_size(a.vram_budget), n_ctx, a.n_prompt)
    cmd = llama_bench_command(a.llama_bench, a.model, ngl, a.n_prompt, a.n_gen)
    res = {"ngl": ngl, "command": " ".join(cmd), "pass_bytes": stock_cpu_bytes(mf, ngl), "pp": None, "tg": None}
    if not shutil.which(a.llama_bench):
        res["error"] = f"{a.llama_bench} not found"
        return res
    res["dropped"] = drop_page_cache(a.model)
    before, t0 = disk_read_bytes(), time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.stock_timeout)
        if proc.returncode == 0:
            res.update(parse_llama_bench(proc.stdout))
        else:
            res["error"] = f"llama-bench exit {proc.returncode}: " + " | ".join(proc.stderr.strip().splitlines()[-3:])
    except subprocess.TimeoutExpired:
        res["error"] = f"llama-bench ran past {a.stock_timeout} s"
    except ValueError as exc:
        res["error"] = f"llama-bench output not understood: {exc}"
    res["seconds"], res["disk_read_bytes"] = time.perf_counter() - t0, disk_read_bytes() - before
    return res


def run_streamed(a, n_ctx: int) -> dict:
    """gguf-stream with the host budget (the disk tier), page cache dropped before load and each test."""
    opts = dict(vram_budget=a.vram_budget, n_ctx=n_ctx, n_batch=a.n_prompt, n_ubatch=a.n_prompt,
                generate_cpu_layers="none", device=a.device, host_budget=a.host_budget)
    res = {"dropped": drop_page_cache(a.model), "pp": None, "tg": None}
    before, t0 = disk_read_bytes(), time.perf_counter()
    try:
        with StreamedModel(a.model, **opts) as m:
            res["load_seconds"] = time.perf_counter() - t0
            print(f"gguf-stream: loaded in {res['load_seconds']:.1f} s; {m.plan.tiers_line()}", flush=True)
            res["tiers"], res["pass_bytes"] = m.plan.tiers_line(), m.plan.disk_bytes
            tests = timed_tests(m, a.model, a.n_prompt, a.n_gen, None, drop=drop_page_cache)
            c = m.stats.counters
            res.update(tests=tests, pp=tests.get("pp", {}).get("tps"), tg=tests.get("tg_cache", {}).get("tps"),
                       disk_readers=c.disk_readers, staging_bytes=c.staging_bytes,
                       disk_tier_used=bool(m.plan.disk_layers) and c.disk_reads > 0)
    except Exception as exc:  # reported in the table, the other side's numbers kept
        res["error"] = f"{type(exc).__name__}: {exc}"
    res["seconds"], res["disk_read_bytes"] = time.perf_counter() - t0, disk_read_bytes() - before
    return res


def fmt(x, unit=""):
    return "-" if x is None else f"{x:.2f}{unit}"


def locked_comparison(a, res: dict) -> int:
    """Stock and gguf-stream under one RAM lock (see the module's doc)."""
    from gguf_stream import read_model

    mf = read_model(a.model)
    n_ctx = max(a.n_prompt + a.n_gen, 512)
    rate = max([r for r in (res["read_rate_buffered"], res["read_rate_parallel"], res["read_rate_direct"]) if r],
               default=None)
    res.update(ram_left_gib=a.ram_left, disk_rate=rate or None)
    sides = {}
    try:
        with RamLock(a.ram_left, Path(a.out, "lock_ram.log"), a.lock_timeout) as lock:
            res["lock"] = lock.line
            print(f"RAM lock: {lock.line}", flush=True)
            for name, run in (("stock", lambda: run_stock(a, mf, n_ctx)), ("gguf-stream", lambda: run_streamed(a, n_ctx))):
                sides[name] = run()
                sides[name]["lock_held"] = lock.alive()
                sides[name]["bound"] = disk_bound(rate, sides[name].get("pass_bytes", 0), a.n_prompt)
                print(f"{name}: pp{a.n_prompt} {fmt(sides[name]['pp'])} t/s, tg{a.n_gen} {fmt(sides[name]['tg'])} t/s, "
                      f"{sides[name]['disk_read_bytes'] / GB:.2f} GB read from disk in {sides[name]['seconds']:.0f} s"
                      + (f"; ERROR {sides[name]['error']}" if "error" in sides[name] else "")
                      + ("" if sides[name]["lock_held"] else "; the RAM lock was lost"), flush=True)
    except RuntimeError as exc:
        res["error"] = str(exc)
        print(f"ERROR {exc}", flush=True)
    res["sides"] = sides
    s = sides.get("stock", {})
    placement = {"stock": f"-ngl {s.get('ngl')} -lm mmap, CPU part {format_size(s.get('pass_bytes', 0))}",
                 "gguf-stream": f"host budget {a.host_budget}, disk tier "
                                f"{format_size(sides.get('gguf-stream', {}).get('pass_bytes', 0))}"}
    print(f"\n{Path(a.model).name}, {format_size(res['size'])}; VRAM budget {a.vram_budget}, RAM left {a.ram_left} GiB "
          f"(locked), disk {fmt(rate and rate / GB, ' GB/s')} (its best rate above: the bounds' rate)\n"
          f"| side | placement | pp{a.n_prompt} t/s | tg{a.n_gen} t/s | read from disk | disk bound pp / tg |\n"
          "| :--- | :--- | ---: | ---: | ---: | ---: |")
    for name, r in sides.items():
        b = r["bound"]
        print(f"| {name} | {placement[name]} | {fmt(r['pp'])} | {fmt(r['tg'])} | {r['disk_read_bytes'] / GB:.2f} GB "
              f"| {fmt(b['pp'])} / {fmt(b['tg'])} |")
    ok = (len(sides) == 2 and all(r["pp"] and r["tg"] and r["lock_held"] for r in sides.values())
          and sides["gguf-stream"].get("disk_tier_used"))
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python3 tools/disk_tier_gpu.py")
    ap.add_argument("--model", required=True)
    ap.add_argument("--vram-budget", default="3GiB")
    ap.add_argument("--host-budget", default="1.5GiB")
    ap.add_argument("--n-prompt", type=int, default=2048)
    ap.add_argument("--n-gen", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens compared")
    ap.add_argument("--drop-every", type=float, default=0.05)
    ap.add_argument("--read-limit", default="2GiB", help="bytes of the file read for the disk's rate")
    ap.add_argument("--device", default="auto", help="host: a smoke test of this script without a GPU")
    ap.add_argument("--ram-left", type=float, metavar="GIB",
                    help="the same-memory comparison: lock all host RAM but this, run stock and gguf-stream under it")
    ap.add_argument("--llama-bench", default="llama-bench", help="stock's llama-bench (--ram-left)")
    ap.add_argument("--stock-timeout", type=int, default=300, help="seconds stock's run may take (--ram-left)")
    ap.add_argument("--lock-timeout", type=int, default=300, help="seconds the RAM lock may take to set up")
    ap.add_argument("--out", required=True)
    return ap


def parse_args(argv=None):
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.ram_left is not None:
        if not a.ram_left > 0:
            ap.error(f"--ram-left {a.ram_left}: give the GiB of RAM to leave, above 0")
        if parse_size(a.host_budget) >= a.ram_left * 2**30:
            ap.error(f"--host-budget {a.host_budget} must be below --ram-left {a.ram_left} GiB "
                     "(the process, its CUDA context and the page cache need room beside it)")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    # a timeout's SIGTERM unwinds (the RAM lock's with block releases it) instead of killing outright
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    n_ctx = max(a.n_prompt + a.n_gen, 512)
    opts = dict(vram_budget=a.vram_budget, n_ctx=n_ctx, n_batch=a.n_prompt, n_ubatch=a.n_prompt,
                generate_cpu_layers="none", device=a.device)
    res = {"model": a.model, "size": os.path.getsize(a.model), "vram_budget": a.vram_budget,
           "host_budget": a.host_budget}
    limit = parse_size(a.read_limit)
    for name, direct, readers in (("buffered", False, 1), ("parallel", False, READERS), ("direct", True, 1)):
        rate = read_rate(a.model, limit, direct, readers)
        res[f"read_rate_{name}"] = rate
        what = "O_DIRECT" if direct else f"buffered, cache dropped, {readers} reader{'s' if readers > 1 else ''}"
        print(f"disk read rate ({what}): " + (f"{rate / 1e9:.2f} GB/s" if rate else "not measured (refused)"),
              flush=True)
    if a.ram_left is not None:
        rc = locked_comparison(a, res)
        Path(a.out, "disk_tier_gpu.json").write_text(json.dumps(res, indent=2))
        return rc

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
