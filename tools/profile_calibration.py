"""Where a first load's calibration of the generate split goes, on the CPU.

    python3 tools/profile_calibration.py [MODEL] [--streamed 12] [--threads 2] [--repeat 1]

Loads MODEL (default /tmp/fl/l1b.gguf, made with gguf_stream.synth's
llama3.2-1b shape when missing) in host-slot mode with `--streamed` layers
streamed and repacking on, then runs the calibration the GPU's first load runs
(Calibrator.choose_split: rates, then the split search) with a fresh cache
directory, and prints its parts: the calibration context's creation, the
rates' upload timing, each change of CPU layers (repack, KV moves, re-arming),
the timed decodes, and the rest. The code path is the GPU's apart from CUDA
(no generate-resident layers here: they are a CUDA feature). Host mode has no
PCIe, so the split it picks says nothing about a GPU; its cost does.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict


def profile(path: str, streamed: int, threads: int) -> dict:
    from gguf_stream import llama_abi
    from gguf_stream.calibrate import Calibrator
    from gguf_stream.model import StreamedModel

    os.environ["GGUF_STREAM_CACHE"] = tempfile.mkdtemp(prefix="gguf-stream-cal-")
    spent, count, patched = defaultdict(float), defaultdict(int), []

    def timed(obj, name, key):
        f = getattr(obj, name)
        patched.append((obj, name, f))

        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return f(*a, **kw)
            finally:
                spent[key] += time.perf_counter() - t0
                count[key] += 1
        setattr(obj, name, wrapper)

    opts = dict(device="host", n_ctx=256, n_batch=64, n_ubatch=64, n_threads=threads, cpu_repack=True,
                n_streamed=streamed, n_slots=2)
    t_load = time.perf_counter()
    with StreamedModel(path, **opts) as m:
        t_load = time.perf_counter() - t_load
        s, e = m.streamer, m.streamer.engine
        cal = Calibrator(s, m.model)
        lc = llama_abi.llama()
        timed(lc, "llama_init_from_model", "context creation")
        timed(lc, "llama_free", "context free")
        timed(e, "set_cpu_layers", "CPU-layer changes")
        sets, set_cpu_layers = [], e.set_cpu_layers
        patched.append((e, "set_cpu_layers", set_cpu_layers))

        def change(cpu):  # each change: CPU layers, seconds
            t = time.perf_counter()
            set_cpu_layers(cpu)
            sets.append((tuple(cpu), time.perf_counter() - t))
        e.set_cpu_layers = change
        timed(e, "measure_upload", "upload timing")
        timed(e, "set_generate_resident", "generate-resident changes")
        timed(cal, "decode_token", "timed decodes")
        s.context_closing()
        t0 = time.perf_counter()
        try:
            cpu, c = cal.choose_split()
        finally:
            total = time.perf_counter() - t0
            for obj, name, f in patched:
                setattr(obj, name, f)
            s.context_opened()
        repacked = m.stats.counters.repacked_bytes
    repacks, held, kept = 0, set(), hasattr(e, "keep_repacks")  # layers repacked, by the code's policy
    changes = []
    for cpu, seconds in sets:
        changes.append(f"{len(cpu)} CPU layers, {len(set(cpu) - held)} repacked: {seconds:.3f} s")
        repacks += len(set(cpu) - held)
        held = held | set(cpu) if kept else set(cpu)
    return dict(repacks=repacks, sets=[len(c) for c, _ in sets], changes=changes, load=t_load, total=total, spent=dict(spent), count=dict(count), cpu=cpu, trials=c.split_trials,
                decodes=c.decodes, parts=getattr(c, "parts", None), repacked=repacked)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="/tmp/fl/l1b.gguf")
    ap.add_argument("--streamed", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    a = ap.parse_args()
    if not os.path.exists(a.model):
        os.makedirs(os.path.dirname(a.model) or ".", exist_ok=True)
        subprocess.run([sys.executable, "-m", "gguf_stream.synth", a.model, "--shape", "llama3.2-1b", "--type",
                        "Q4_K", "--seed", "0", "-q"], check=True)
    for _ in range(a.repeat):
        r = profile(a.model, a.streamed, a.threads)
        print(f"load {r['load']:.2f} s; calibration {r['total']:.3f} s, {r['decodes']} decodes, "
              f"{len(r['trials'])} splits {sorted(r['trials'])} -> {len(r['cpu'])} CPU layers; "
              f"repacked at the end {r['repacked'] / 2**20:.0f} MiB; CPU-layer sets {r['sets']}, "
              f"{r['repacks']} layer repacks")
        rest = r["total"] - sum(r["spent"].values())
        for k, v in sorted(r["spent"].items(), key=lambda kv: -kv[1]):
            print(f"  {k:26s} {v:7.3f} s  ({r['count'][k]} calls)")
        print(f"  {'rest':26s} {rest:7.3f} s")
        if r["parts"]:
            print("  Calibration.parts: " + ", ".join(f"{k} {v:.3f} s" for k, v in r["parts"].items()))
        print("  changes: " + "; ".join(r["changes"]))
        print("  trials (ms/token): " + ", ".join(f"{n}: {t * 1e3:.1f}" for n, t in sorted(r["trials"].items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
