"""Chart of a batched bench: aggregate tg t/s against parallel sequences
(groups at log2 of the count), stock beside streamed (and the split measured
per row count, or k rows on the GPU, where the run has them), one panel per
budget; each bar labelled with its value (and a streamed run's ratio to
stock), error bars the sample sd of the -r repetitions where there are
several. Drawn by plot.py's renderer; batched_panels() computes it all
from the JSON rows.

    python -m gguf_stream.bench.plot_batched BATCHED.json OUT.png   # from `gguf-stream batched-bench -o json`
    python gguf_stream/bench/plot_batched.py BATCHED.json OUT.png   # the same on a CUDA box (see below)

`gguf-stream batched-bench --plot PNG` draws it in a child process that runs
this file by path, for plot.py's reason (matplotlib and llama.cpp's
libraries in one process crash on the CUDA box): nothing of the package is
imported here, plot.py is loaded as this file's sibling.
"""
from __future__ import annotations

import math
import statistics
import sys

try:
    from . import plot
except ImportError:  # run by path: the sibling file, not the package (whose __init__ loads llama.cpp)
    import plot

EXTRA_COLORS = ("C2", "C3", "C4")  # streamed runs beyond the first, in their order


def _color(mode: str, extra: list[str]) -> str:
    if mode.startswith("stock"):
        return plot.COLORS["stock"]
    if mode == "streamed":
        return plot.COLORS["streamed"]
    extra.append(mode)
    return EXTRA_COLORS[(len(extra) - 1) % len(EXTRA_COLORS)]


def _spread(reps) -> float:
    return statistics.stdev(reps) if reps and len(reps) > 1 else 0.0


def batched_panels(doc: dict) -> list[plot.Panel]:
    """One panel per budget of a batched bench's JSON (batched.render_json):
    a series per run, a group per parallel-sequence count."""
    w = doc["workload"]
    parallel = tuple(w["parallel"])
    out = []
    for budget in dict.fromkeys(r["budget"] for r in doc["runs"]):
        runs = [r for r in doc["runs"] if r["budget"] == budget]
        stock = next((r for r in runs if r["mode"].startswith("stock")), None)
        series, extra = [], []
        for r in runs:
            mode = "stock" if r is stock else r["mode"]  # its -ngl in the title: one legend entry for all budgets
            means = tuple(r["tg"].get(str(n)) for n in parallel)
            sds = tuple(_spread(r.get("tg_reps", {}).get(str(n))) for n in parallel)
            labels = []
            for n, m, sd in zip(parallel, means, sds):
                text = "" if m is None else plot.fmt(m, sd)
                base = None if stock is None or r is stock else stock["tg"].get(str(n))
                if m is not None and base:
                    text += f"\n{m / base:.2f}x stock"
                labels.append(text)
            series.append(plot.Series(mode, means, sds, tuple(labels), _color(mode, extra)))
        log, ylim = plot.y_axis(series)
        model = doc.get("meta", {}).get("model", "")
        title = f"{model} budget {budget}".strip() + (f", {stock['mode']}" if stock else "") + \
            f": -npp {w['n_prompt']} -ntg {w['n_gen']}"
        out.append(plot.Panel(budget, title, tuple(map(str, parallel)), tuple(series), None, log, ylim,
                              xlabel="parallel sequences", ylabel="aggregate tg t/s",
                              positions=tuple(math.log2(n) for n in parallel)))
    return out


def draw(doc: dict, png: str) -> None:
    plot.render(batched_panels(doc), png)


def plot_batched(document: str, path: str) -> str:
    """Draw a batched bench's JSON text to path in a child process; a line for stderr."""
    return plot.in_child(__file__, document, path)


def main(argv: list[str] | None = None) -> int:
    return plot.main(argv, draw, "python -m gguf_stream.bench.plot_batched BATCHED.json OUT.png")


if __name__ == "__main__":
    if not __package__:  # run by path: keep this folder's modules from shadowing any later import
        sys.path.pop(0)
    sys.exit(main())
