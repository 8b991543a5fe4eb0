"""Bar chart of a bench result: t/s per VRAM budget, stock against
streamed (mean with the ± sample sd as error bars, the value and streamed's
ratio to stock over each bar; a mixture-of-experts model's second stock
recipe, stock-moe, as a third bar, the ratio naming the stock it is to),
the all-in-VRAM ceiling as a dashed line with its value written on it and
its sd as a band; one panel per test, each as wide as its bars need for
their labels, a log axis where the ceiling dwarfs the bars (tg), one legend
below the axes. panels() computes all of it from the rows; draw() only
renders it.

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
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

MODES = ("stock", "stock-moe", "streamed")  # the bars of each budget, in this order (stock-moe: MoE models)
COLORS = {"stock": "C0", "streamed": "C1", "stock-moe": "C2"}  # a dense model's chart keeps its colours
LOG_RATIO = 5.0  # a panel whose largest value exceeds its smallest bar this many times gets a log axis
BAR_INCHES = 0.9  # room per bar: its label ("10277 ± 39", "1.50x stock-moe" at 7 pt) stays clear of the next one


def available() -> bool:
    """Whether the child can draw (it runs this same interpreter)."""
    return importlib.util.find_spec("matplotlib") is not None


def cannot_write(path: str) -> str | None:
    """Why a chart cannot be drawn to path (before anything runs), or None."""
    if not available():
        return "needs matplotlib, which is not installed (`pip install matplotlib`)"
    folder = Path(path).expanduser().resolve().parent
    if not folder.is_dir():
        return f"folder {folder} does not exist"
    if not os.access(folder, os.W_OK):
        return f"folder {folder} is not writable"
    return None


@dataclass(frozen=True)
class Series:
    """One mode's bars across a panel's budgets: mean (None: no value, see
    the label), sample sd, and the text over each bar."""

    mode: str
    means: tuple
    sds: tuple
    labels: tuple
    color: str | None = None  # None: COLORS[mode]


@dataclass(frozen=True)
class Panel:
    """Everything one test's chart shows, computed from the rows alone."""

    test: str
    title: str
    budgets: tuple  # x tick labels
    series: tuple  # Series per mode
    ceiling: tuple | None  # (mean, sd, legend label) of the all-in-VRAM row
    log: bool  # log y axis: bars of 20-50 t/s stay readable next to a ~280 t/s ceiling
    ylim: tuple  # (bottom, top), with room for the labels over the bars
    xlabel: str = "VRAM budget"
    ylabel: str = "t/s"
    positions: tuple | None = None  # x of each group of bars (None: 0, 1, 2, ...)


def _decimals(v: float) -> int:
    return 0 if abs(v) >= 100 else 1 if abs(v) >= 10 else 2


def fmt(mean: float, sd: float | None = None) -> str:
    """Three significant figures or more (10546, 280, 33.5, 2.04); the sd
    with the mean's decimals, or one significant figure where those show 0."""
    text = f"{mean:.{_decimals(mean)}f}"
    if sd:
        d = _decimals(mean)
        if round(sd, d) == 0:
            d = max(d, -math.floor(math.log10(abs(sd))))
        text += f" ± {sd:.{d}f}"
    return text


def _label(row: dict) -> str:
    if row.get("tps_mean") is None:
        return "n/a" + (f": {row['note']}" if row.get("note") else "")
    text = fmt(row["tps_mean"], row.get("tps_sd"))
    if row["mode"] == "streamed" and row.get("ratio"):
        text += f"\n{row['ratio']:.2f}x {row.get('ratio_vs') or 'stock'}"
    return text


def y_axis(series, highs=()) -> tuple[bool, tuple]:
    """(log, ylim) for bars of series (and lines at highs): a log axis where
    the largest value exceeds the smallest bar LOG_RATIO times, room above for
    the labels."""
    bars = [(m, sd) for s in series for m, sd in zip(s.means, s.sds) if m is not None]
    highs = [m + sd for m, sd in bars] + list(highs)
    lows = [m for m, _ in bars if m > 0]
    log = bool(lows) and max(highs) > LOG_RATIO * min(lows)
    if not highs:
        return log, (0.0, 1.0)
    if log:
        bottom = min(min(lows), *(max(m - sd, m / 2) for m, sd in bars if m > 0)) / 2
        return log, (bottom, max(highs) * 3.0)  # a decade of headroom reads like 15% on a linear axis
    return log, (0.0, max(highs) * 1.25)


def panels(doc: dict) -> list[Panel]:
    """The charts of a result's JSON document (render_json's): one panel per
    test (pp first), bars per budget and mode with their sd and labels, the
    all-in-VRAM row as a line, and the axis each needs. Pure: draw() only
    renders what this returns."""
    rows = doc["rows"]
    tests = sorted(dict.fromkeys(r["test"] for r in rows), key=lambda t: not t.startswith("pp"))
    out = []
    for test in tests:
        these = [r for r in rows if r["test"] == test]
        budgets = tuple(dict.fromkeys(r["budget"] for r in these if r["mode"] != "all-in-VRAM"))
        series = []
        for mode in MODES:
            found = [next((r for r in these if r["budget"] == b and r["mode"] == mode), None) for b in budgets]
            if not any(found):
                continue
            series.append(Series(mode, tuple(None if r is None else r["tps_mean"] for r in found),
                                 tuple(0.0 if r is None or r["tps_sd"] is None else r["tps_sd"] for r in found),
                                 tuple("" if r is None else _label(r) for r in found)))
        top = next((r for r in these if r["mode"] == "all-in-VRAM" and r["tps_mean"] is not None), None)
        ceiling = None if top is None else (top["tps_mean"], top["tps_sd"] or 0.0,
                                            f"all in VRAM: {_label(top)} t/s")
        log, ylim = y_axis(series, [ceiling[0] + ceiling[1]] if ceiling else [])
        model = doc.get("meta", {}).get("model", "")
        ubatch = next((r["n_ubatch"] for r in these if r.get("n_ubatch")), None)
        title = f"{model} {test}".strip() + (f", n_ubatch {ubatch}" if ubatch else "")
        out.append(Panel(test, title, budgets, tuple(series), ceiling, log, ylim))
    return out


def draw(doc: dict, png: str) -> None:
    """The chart of a result's JSON document (render_json's), written to png."""
    render(panels(doc), png)


def _groups(p: Panel) -> int:
    """Groups of bars the panel's x axis has room for (positions may leave gaps)."""
    at = p.positions
    if not at or len(at) < 2:
        return len(p.budgets)
    gap = min(b - a for a, b in zip(at, at[1:]))
    return round((at[-1] - at[0]) / gap) + 1


def render(ps: list[Panel], png: str) -> None:
    """Panels side by side (bars per group and series, their labels and
    error bars, a ceiling line), one legend below, written to png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    from matplotlib.transforms import blended_transform_factory

    widths = [max(5.0, 1.2 + BAR_INCHES * _groups(p) * len(p.series)) for p in ps] or [5.0]
    fig, axes = plt.subplots(1, len(widths), figsize=(sum(widths), 4.8), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    for ax, p in zip(axes[0], ps):
        base = blended_transform_factory(ax.transData, ax.transAxes)
        at = p.positions or tuple(range(len(p.budgets)))
        gap = min((b - a for a, b in zip(at, at[1:])), default=1.0)
        width = 0.8 * gap / max(len(p.series), 1)
        for k, s in enumerate(p.series):
            xs = [x + (k - (len(p.series) - 1) / 2) * width for x in at]
            heights = [float("nan") if m is None else m for m in s.means]
            ax.bar(xs, heights, width=width * 0.95, yerr=list(s.sds), capsize=3, label=s.mode,
                   color=s.color or COLORS[s.mode], error_kw={"elinewidth": 1, "ecolor": "0.25"})
            for x, m, sd, text in zip(xs, s.means, s.sds, s.labels):
                if m is None:  # no bar: say why, from the bottom of the axes
                    ax.text(x, 0.02, text, transform=base, rotation=90, ha="center", va="bottom",
                            fontsize=7, color="0.4")
                else:
                    ax.annotate(text, (x, m + sd), xytext=(0, 2), textcoords="offset points", ha="center",
                                va="bottom", fontsize=7, linespacing=1.1,
                                bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.75})
        if p.ceiling is not None:  # its value written on it, at the left where the bars are lowest
            mean, sd, label = p.ceiling
            if sd:
                ax.axhspan(mean - sd, mean + sd, color="0.5", alpha=0.15, lw=0)
            ax.axhline(mean, color="0.35", linestyle="--", linewidth=1.2, label="all in VRAM")
            ax.annotate(label, (0.01, mean), xycoords=("axes fraction", "data"), xytext=(0, 2),
                        textcoords="offset points", ha="left", va="bottom", fontsize=7, color="0.25")
        if p.log:  # ticks at 1, 2, 3, 5 x 10^k, written as plain numbers
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(*p.ylim)
        ax.set_xticks(at, p.budgets)
        ax.set_xlim(at[0] - 0.6 * gap, at[-1] + 0.6 * gap)
        ax.set_xlabel(p.xlabel)
        ax.set_ylabel(f"{p.ylabel} (log scale)" if p.log else p.ylabel)
        ax.set_title(p.title, fontsize=10)
        ax.grid(axis="y", which="major", alpha=0.3)
        ax.set_axisbelow(True)
    # one legend for the figure, below the axes, never over the bars
    entries = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    if entries:
        fig.legend(list(entries.values()), list(entries), loc="lower center", ncol=len(entries), frameon=False,
                   fontsize=8)
    fig.savefig(png, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot(result, path: str) -> str:
    """Draw result's chart to path in a child process (see the module's
    docstring); returns a line for stderr."""
    from .report import render_json

    return in_child(__file__, render_json(result), path)


def in_child(script: str, document: str, path: str) -> str:
    """Run `python SCRIPT DOC.json PNG` (a chart module by path) on document,
    a JSON text; returns a line for stderr. A missing matplotlib is a note,
    not a failed benchmark (the command refuses --plot before running
    anything when it is missing)."""
    if not available():
        return f"--plot {path} skipped: matplotlib is not installed (`pip install matplotlib`)"
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        f.write(document)
        f.flush()
        proc = subprocess.run([sys.executable, str(Path(script).resolve()), f.name, str(path)],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        return f"--plot {path} failed: {(proc.stderr.strip().splitlines() or [f'exit {proc.returncode}'])[-1]}"
    return f"plot written to {path}"


def main(argv: list[str] | None = None, draw_document=draw,
         usage: str = "python -m gguf_stream.bench.plot RESULT.json OUT.png") -> int:
    """The command line of a chart module: `DOC.json OUT.png` drawn by draw_document."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(f"usage: {usage}", file=sys.stderr)
        return 2
    with open(args[0]) as f:
        draw_document(json.load(f), args[1])
    return 0


if __name__ == "__main__":
    if not __package__:  # run by path (as plot() does): keep this folder's modules from shadowing any import
        sys.path.pop(0)
    sys.exit(main())
