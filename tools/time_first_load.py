"""Time the first load of the default (fast) mode against a plain load, on the GPU box.

    python3 tools/time_first_load.py [MODEL] [--budget-fraction 0.5] [-n 32]

MODEL defaults to /tmp/m/llama3-8b.gguf (made with gguf_stream.synth when
missing). Each run is a separate `gguf-stream run MODEL --vram-budget B -n N`
process, at B = the fraction of the file's size:

  0. warm-up   --exact, its output discarded (the file into the page cache)
  1. plain     --exact: every layer on the GPU while generating, no calibration
  2. first     the default, with XDG_CACHE_HOME a fresh empty directory
               (GGUF_STREAM_CACHE unset): the load measures the rates, the
               splits are timed on the first generated tokens (its tg
               includes that search)
  3. second    the default again, same cache: the split comes from rates.json
  4. plain     --exact again (brackets the load-to-load variation)
  5. (--also-at-load) first again in another fresh cache with
     --calibrate-at-load: the whole search before the load returns

It prints each run's load time ("loaded in X s", the engine's own figure),
the process's wall time, the generation t/s, the calibration's counted cost
(timed decodes, splits), where its time went (calibrate.CALIBRATION_PARTS:
context, rates, split set-up, split decodes, closing; the rest of the first
load is what the cached load does too, the chosen split's repack included),
each timed split's result ('>=': its decodes stopped once it was sure to be
slower) and the ratio first / plain; the issue's target is
first <= 1.5 x plain (load time). Decides: that ratio, and tg of 'first' and
'second' against 'plain'.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

PROMPT = "The history of the printing press begins"


def run(model: str, budget: str, n: int, *extra: str, env: dict) -> dict:
    cmd = [sys.executable, "-m", "gguf_stream", "run", model, "--vram-budget", budget, "-n", str(n), "-p", PROMPT,
           "--ignore-eos", *extra]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    err = p.stderr
    load = re.search(r"loaded in ([\d.]+) s", err)
    tg = re.search(r"generated: \d+ tokens in [\d.]+ s \(([\d.]+) t/s\)", err)
    cal = re.search(r"calibrated in ([\d.]+) s: (\d+) timed decodes, (\d+) splits(?:; ([^)]*))?\)", err)
    trials = re.findall(r"split with (\d+) CPU layers: (>= )?([\d.]+) ms per .*?set up ([\d.]+) s, (\d+) decodes", err)
    # the search on the first generated tokens (the default): one line at its end
    live = re.search(r"calibrated on the first (\d+) generated tokens, (\d+) splits timed \(CPU layers: ms\) "
                     r"([^;]*); ([^;]*) s; cached", err)
    rates = re.search(r"rates measured in ([\d.]+) s", err)
    split = re.findall(r"the CPU computes (\d+) of (\d+) overflow layers", err)
    if live:
        calibration = (f"rates at load {rates.group(1) if rates else '?'} s; {live.group(2)} splits on the first "
                       f"{live.group(1)} generated tokens")
    elif cal:
        calibration = f"{cal.group(1)} s, {cal.group(2)} decodes, {cal.group(3)} splits"
    else:
        calibration = "from cache" if split else "-"
    return {"load": float(load.group(1)) if load else float("nan"), "wall": wall,
            "tg": float(tg.group(1)) if tg else float("nan"), "calibration": calibration,
            "parts": live.group(4) if live else cal.group(4) if cal and cal.group(4) else "",
            "trials": live.group(3) + " ms/token" if live else
            "; ".join(f"{n}: {ge or ''}{ms} ms/token, set up {su} s, {d} decodes" for n, ge, ms, su, d in trials),
            "cpu_layers": "/".join(split[-1]) if split else "0", "stderr": err}


def say_parts(r: dict) -> None:
    if r["parts"]:
        print(f"{'':18s} calibration's parts (engine's own clock): {r['parts']}")
        print(f"{'':18s} splits timed (CPU layers): {r['trials']}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="/tmp/m/llama3-8b.gguf")
    ap.add_argument("--budget-fraction", type=float, default=0.5)
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("--log", help="write every run's stderr here")
    ap.add_argument("--args", default="", help="more flags for every `gguf-stream run`, e.g. '-c 4096 -ub 512'")
    ap.add_argument("--also-at-load", action="store_true",
                    help="one more first load, with --calibrate-at-load (the search before the load returns), "
                         "in another fresh cache")
    a = ap.parse_args()
    if not os.path.exists(a.model):
        os.makedirs(os.path.dirname(a.model) or ".", exist_ok=True)
        subprocess.run([sys.executable, "-m", "gguf_stream.synth", a.model, "--shape", "llama3-8b", "--type", "Q4_K",
                        "--seed", "0", "-q"], check=True)
    budget = f"{os.path.getsize(a.model) * a.budget_fraction / 2**20:.0f}MiB"
    fresh = tempfile.mkdtemp(prefix="gguf-stream-xdg-")
    env = {k: v for k, v in os.environ.items() if k != "GGUF_STREAM_CACHE"}
    env["XDG_CACHE_HOME"] = fresh
    env["PYTHONUNBUFFERED"] = "1"
    print(f"model {a.model}, --vram-budget {budget}, -n {a.n}, fresh cache {fresh}", flush=True)
    runs = []
    for name, extra in (("warm-up", ("--exact",)), ("plain (--exact)", ("--exact",)), ("first (default)", ()),
                        ("second (default)", ()), ("plain (--exact)", ("--exact",))):
        r = run(a.model, budget, a.n, *extra, *shlex.split(a.args), env=env)
        runs.append((name, r))
        print(f"{name:18s} load {r['load']:6.1f} s  wall {r['wall']:6.1f} s  tg {r['tg']:6.1f} t/s  "
              f"CPU layers {r['cpu_layers']:>6s}  calibration: {r['calibration']}", flush=True)
        say_parts(r)
    if a.also_at_load:
        env_at_load = dict(env, XDG_CACHE_HOME=tempfile.mkdtemp(prefix="gguf-stream-xdg-"))
        r = run(a.model, budget, a.n, "--calibrate-at-load", *shlex.split(a.args), env=env_at_load)
        runs.append(("first, at load", r))
        print(f"{'first, at load':18s} load {r['load']:6.1f} s  wall {r['wall']:6.1f} s  tg {r['tg']:6.1f} t/s  "
              f"CPU layers {r['cpu_layers']:>6s}  calibration: {r['calibration']}", flush=True)
        say_parts(r)
    if a.log:
        with open(a.log, "w") as f:
            for name, r in runs:
                f.write(f"===== {name}\n{r['stderr']}\n")
    plain = max(min(runs[1][1]["load"], runs[4][1]["load"]), 0.05)  # "loaded in" has 0.1 s steps
    first, second = runs[2][1]["load"], runs[3][1]["load"]
    print(f"first / plain load = {first / plain:.2f} (target <= 1.5); second / plain = {second / plain:.2f}")
    wall = min(runs[1][1]["wall"], runs[4][1]["wall"])
    print(f"process wall time: first / plain = {runs[2][1]['wall'] / wall:.2f}, second / plain = "
          f"{runs[3][1]['wall'] / wall:.2f}")
    print(f"tg: plain {runs[1][1]['tg']:.1f}, first {runs[2][1]['tg']:.1f}, second {runs[3][1]['tg']:.1f} t/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
