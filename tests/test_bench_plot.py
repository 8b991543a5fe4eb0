"""gguf_stream/bench/plot.py: the chart, drawn in a child process that never loads llama.cpp."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from gguf_stream.bench import plot
from gguf_stream.bench.report import render_json
from gguf_stream.bench.rows import BenchResult
from test_bench_report import result, row


def sweep_result() -> BenchResult:
    """A GPU sweep's rows: the ceiling, two budgets (smallest first), one whose stock has no ngl."""
    rows = [row(budget="device", mode="all-in-VRAM", ngl=33, tps_mean=10300.0, tps_sd=40.0),
            row(budget="device", mode="all-in-VRAM", ngl=33, test="tg128", tps_mean=289.4, tps_sd=1.2)]
    for budget, stock_pp, stock_tg, pp, tg in (("0.1x", None, None, 5000.0, 12.0),
                                               ("0.5x", 4000.0, 25.8, 8820.4, 36.69)):
        for test, s, t, sd in (("pp2048", stock_pp, pp, 117.0), ("tg128", stock_tg, tg, 0.03)):
            rows.append(row(budget=budget, test=test, tps_mean=s, tps_sd=None if s is None else 0.5,
                            ratio=None, note="" if s else "no ngl fits"))
            rows.append(row(budget=budget, mode="streamed", ngl=None, test=test, tps_mean=t, tps_sd=sd,
                            ratio=t / s if s else None, check="ok"))
    return BenchResult(tuple(rows), {"model": "llama3-8b"})


def test_panels_are_what_the_chart_draws():
    """The data of the chart, from the JSON rows alone (no matplotlib)."""
    pp, tg = plot.panels(json.loads(render_json(sweep_result())))
    assert (pp.test, tg.test) == ("pp2048", "tg128")
    assert pp.title == "llama3-8b pp2048, n_ubatch 2048" and pp.budgets == ("0.1x", "0.5x")
    stock, streamed = tg.series
    assert (stock.mode, streamed.mode) == ("stock", "streamed")
    assert stock.means == (None, 25.8) and stock.sds == (0.0, 0.5)  # no bar where stock has no ngl ...
    assert stock.labels == ("n/a: no ngl fits", "25.8 ± 0.5")  # ... and the reason instead
    assert streamed.means == (12.0, 36.69) and streamed.sds == (0.03, 0.03)
    assert streamed.labels == ("12.0 ± 0.03", "36.7 ± 0.03\n1.42x stock")  # sd shown to a significant digit
    assert tg.ceiling == (289.4, 1.2, "all in VRAM: 289 ± 1 t/s")
    # tg: bars of 12-37 t/s under a 289 t/s ceiling get a log axis; pp (5000-10300) stays linear
    assert tg.log and not pp.log
    assert tg.ylim[0] < 12.0 - 0.03 and tg.ylim[1] > 289.4 + 1.2
    assert pp.ylim[0] == 0 and pp.ylim[1] > 10340
    assert pp.series[1].labels[1] == "8820 ± 117\n2.21x stock"


def test_panels_of_a_host_run_without_ceiling():
    (pp,) = plot.panels(json.loads(render_json(BenchResult(result().rows[:2], {"model": "m"}))))
    assert pp.ceiling is None and not pp.log and pp.budgets == ("4GiB",)
    assert [s.labels for s in pp.series] == [("100 ± 2",), ("150 ± 2\n1.50x stock",)]
    assert plot.fmt(10546.2, 145.6) == "10546 ± 146" and plot.fmt(2.04) == "2.04"


def test_plot_without_matplotlib_is_a_note(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    note = plot.plot(result(), str(tmp_path / "p.png"))
    assert "matplotlib is not installed" in note and not (tmp_path / "p.png").exists()
    assert not plot.available()


def test_plot_with_matplotlib(tmp_path):
    # not importorskip: matplotlib must stay out of a process that loads llama.cpp (see plot.py)
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed")
    for res, name in ((result(), "p.png"), (sweep_result(), "sweep.png"), (moe_result(), "moe.png")):
        assert plot.plot(res, str(tmp_path / name)) == f"plot written to {tmp_path / name}"
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_the_child_imports_nothing_of_gguf_stream():
    """plot() runs plot.py by path: nothing there may import the package
    (its __init__ loads llama.cpp, which must stay out of matplotlib's process)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", plot.__file__], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage: python -m gguf_stream.bench.plot" in proc.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert imported and not [m for m in imported if m.startswith(("gguf_stream", "llama_cpp", "numpy"))]


def moe_result() -> BenchResult:
    """A mixture-of-experts budget: both stock recipes, streamed's ratio to the faster of each test."""
    rows = []
    for test, stock, moe, streamed, vs in (("pp2048", 4000.0, 3000.0, 5000.0, "stock"),
                                           ("tg128", 20.0, 30.0, 45.0, "stock-moe")):
        best = max(stock, moe)
        rows += [row(test=test, tps_mean=stock, tps_sd=0.0, ratio=stock / best, ratio_vs=vs),
                 row(mode="stock-moe", ngl=49, n_cpu_moe=12, test=test, tps_mean=moe, tps_sd=0.0, ratio=moe / best,
                     ratio_vs=vs),
                 row(mode="streamed", ngl=None, test=test, tps_mean=streamed, tps_sd=0.0, ratio=streamed / best,
                     ratio_vs=vs)]
    return BenchResult(tuple(rows), {"model": "qwen3-30b-a3b"})


def test_panels_of_a_moe_sweep():
    pp, tg = plot.panels(json.loads(render_json(moe_result())))
    assert [s.mode for s in tg.series] == ["stock", "stock-moe", "streamed"]
    assert tg.series[2].labels == ("45.0\n1.50x stock-moe",) and pp.series[2].labels == ("5000\n1.25x stock",)
