"""CPU layers' weight layouts against each other and against stock, every layer
on the CPU in host mode (no GPU device: llama.cpp's loader then puts a CPU
weight in the first of the CPU's extra buffer types that computes it, AMX
before CPU_REPACK): decodes of 1..16 rows, one-token decodes, and each
variant's greedy logits against the others'.

    python tools/cpu_layouts.py MODEL [--variants stock-extra,ours-amx,ours-repack,stock-plain]

Variants (each in a child process: a layout whose kernels crash takes only
its own row down):
  stock-extra   llama.cpp with its extra buffer types (AMX where the CPU has it)
  stock-plain   llama.cpp without them (plain weights)
  ours-amx      the engine's CPU layers with AMX's layout where it computes
                them, CPU_REPACK's elsewhere (config.amx_layout: loaded for
                decodes of AMX_MIN_ROWS rows)
  ours-repack   the engine's CPU layers with CPU_REPACK's only (loaded as ours-amx)
Exit status 1 if a variant failed.
"""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

if not __package__:  # run as a script: the checkout's gguf_stream
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VARIANTS = ("stock-extra", "ours-amx", "ours-repack", "stock-plain")
ROWS = (1, 2, 4, 8, 16)


def measure(model: str, variant: str, out: str, reps: int) -> None:
    """The child: load one variant, save its greedy logits to `out`, print one JSON line."""
    import gguf_stream  # noqa: F401  (llama.cpp before numpy)
    import numpy as np

    from gguf_stream import llama_abi, native, read_model
    from gguf_stream.config import AMX_MIN_ROWS
    from gguf_stream.model import StockModel, StreamedModel
    from tools.probe import timed

    n = read_model(model).n_layer
    opts = dict(device="host", n_ctx=512, n_batch=512, n_ubatch=512, cpu_repack=variant != "stock-plain")
    if variant.startswith("ours"):  # the engine asks for AMX's layout where the split is for that many rows
        opts["generate_rows"] = AMX_MIN_ROWS
    if variant == "ours-repack":
        get = native.cpu_extra_buft
        native.cpu_extra_buft = lambda name: 0 if name == "AMX" else get(name)
    with llama_abi.watch_log(b"model buffer size") as seen:
        if variant.startswith("stock"):
            m = StockModel(model, **opts)
        else:  # host mode has no default split: every layer streamed, each on the CPU while generating
            m = StreamedModel(model, n_streamed=n, n_slots=2, whole_layers=True, generate_cpu_layers=list(range(n)),
                              **opts)
    with m:
        _, logits = m.generate(list(range(1, 20)), 8, with_logits=True)
        np.save(out, np.asarray(logits))
        ms = {rows: rows / max(timed(m, "pp", rows, seed=s) for s in range(reps)) * 1e3 for rows in ROWS}
        tg = 1e3 / max(timed(m, "tg", 16, seed=s) for s in range(reps))
    buffers = [line.decode().split(":", 1)[1].strip() for line in seen]
    print(json.dumps({"ms": ms, "tg": tg, "buffers": buffers}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--reps", type=int, default=4, help="timed runs per row count (the best is kept)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        measure(a.model, a.child, a.out, a.reps)
        return 0
    import numpy as np

    variants = [v for v in a.variants.split(",") if v]
    if bad := [v for v in variants if v not in VARIANTS]:
        ap.error(f"unknown variant {bad[0]!r}; choose from {', '.join(VARIANTS)}")
    results, logits = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            out = str(Path(tmp) / f"{v}.npy")
            r = subprocess.run([sys.executable, __file__, a.model, "--child", v, "--out", out, "--reps", str(a.reps)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{v}: exit {r.returncode}: {r.stderr.strip().splitlines()[-1:] or ''}")
                continue
            results[v] = json.loads(r.stdout.strip().splitlines()[-1])
            logits[v] = np.load(out)
            print(f"{v}: buffers {results[v]['buffers']}")
    print("| ms per decode | " + " | ".join(results) + " |")
    print("| :--- |" + " ---: |" * len(results))
    for rows in ROWS:
        print(f"| {rows} row{'s' * (rows > 1)} | " + " | ".join(f"{r['ms'][str(rows)]:.2f}" for r in results.values())
              + " |")
    print("| tg (per token) | " + " | ".join(f"{r['tg']:.2f}" for r in results.values()) + " |")
    for x, y in itertools.combinations(logits, 2):
        print(f"logits max |{x} - {y}| = {np.abs(logits[x] - logits[y]).max():.3g}")
    return 0 if len(results) == len(variants) else 1


if __name__ == "__main__":
    sys.exit(main())
