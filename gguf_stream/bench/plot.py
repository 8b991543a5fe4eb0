"""Bar chart of a bench result: t/s per VRAM budget, stock against
streamed, the all-in-VRAM ceiling as a dashed line; one panel per test.

    python -m gguf_stream.bench.plot RESULT.json OUT.png   # RESULT.json from `gguf-stream bench -o json`

`gguf-stream bench --plot PNG` draws it in a child process (plot() below):
on the CUDA box, importing matplotlib into a process that has llama.cpp's
libraries loaded crashes (a segfault in the same family as the numpy
import-order one), and a chart is not worth that. The child runs this file
by path rather than with -m, because -m would first import the gguf_stream
package, whose __init__ loads llama.cpp; so this module imports nothing of
gguf_stream at its top, and matplotlib only in draw().
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def available() -> bool:
    """Whether the child can draw (it runs this same interpreter)."""
    return importlib.util.find_spec("matplotlib") is not None


def draw(doc: dict, png: str) -> None:
    """The chart of a result's JSON document (render_json's), written to png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["rows"] if r["tps_mean"] is not None]
    tests = sorted({r["test"] for r in rows}, key=lambda t: not t.startswith("pp"))
    fig, axes = plt.subplots(1, len(tests), figsize=(6 * len(tests), 4), squeeze=False)
    for ax, test in zip(axes[0], tests):
        these = [r for r in rows if r["test"] == test]
        budgets = list(dict.fromkeys(r["budget"] for r in these if r["mode"] != "all-in-VRAM"))
        for k, mode in enumerate(("stock", "streamed")):
            vals = [next((r["tps_mean"] for r in these if r["budget"] == b and r["mode"] == mode), 0)
                    for b in budgets]
            ax.bar([i + 0.4 * k for i in range(len(budgets))], vals, width=0.4, label=mode)
        for r in these:
            if r["mode"] == "all-in-VRAM":
                ax.axhline(r["tps_mean"], color="gray", linestyle="--", label="all in VRAM")
        ax.set_xticks([i + 0.2 for i in range(len(budgets))], budgets)
        ax.set_xlabel("VRAM budget")
        ax.set_ylabel("t/s")
        ax.set_title(doc["meta"].get("model", "") + " " + test)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png)


def plot(result, path: str) -> str:
    """Draw result's chart to path in a child process (see the module's
    docstring); returns a line for stderr. A missing matplotlib is a note,
    not a failed benchmark (the command refuses --plot before running
    anything when it is missing)."""
    from .report import render_json

    if not available():
        return f"--plot {path} skipped: matplotlib is not installed (`pip install matplotlib`)"
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        f.write(render_json(result))
        f.flush()
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), f.name, str(path)],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        return f"--plot {path} failed: {(proc.stderr.strip().splitlines() or [f'exit {proc.returncode}'])[-1]}"
    return f"plot written to {path}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m gguf_stream.bench.plot RESULT.json OUT.png", file=sys.stderr)
        return 2
    with open(args[0]) as f:
        draw(json.load(f), args[1])
    return 0


if __name__ == "__main__":
    if not __package__:  # run by path (as plot() does): keep this folder's modules from shadowing any import
        sys.path.pop(0)
    sys.exit(main())
