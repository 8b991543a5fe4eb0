"""gguf_stream/bench/plot_batched.py: the batched bench's chart (aggregate tg
against parallel sequences, a panel per budget), from its JSON; drawn in a
child process that never loads llama.cpp; batched-bench --plot refused
without matplotlib before anything runs."""
from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys

import pytest

from gguf_stream.bench import plot_batched
from gguf_stream.bench.batched import BatchedWorkload, Run, load_json, render_json

W = BatchedWorkload(n_prompt=128, n_gen=32, parallel=(1, 2, 4, 16), verify=(1, 8))


def runs() -> list[Run]:
    """Two budgets: stock, streamed and the split per rows at 0.5x (3 repetitions);
    stock and streamed at 0.25x from one repetition each, stock missing 16."""
    out = []
    for mode, base in (("stock ngl=20", 10.0), ("streamed", 8.0), ("streamed, split per rows", 9.0)):
        reps = {n: [base * n * f for f in (0.98, 1.0, 1.02)] for n in W.parallel}
        out.append(Run("0.5x", 1 << 32, mode, tg={n: statistics.median(r) for n, r in reps.items()}, tg_reps=reps))
    out.append(Run("0.25x", 1 << 31, "stock ngl=9", tg={1: 4.0, 2: 7.0, 4: 12.0}, tg_reps={1: [4.0], 2: [7.0],
                                                                                       4: [12.0]}))
    out.append(Run("0.25x", 1 << 31, "streamed", tg={n: 5.0 * n for n in W.parallel},
                   tg_reps={n: [5.0 * n] for n in W.parallel}))
    return out


def document() -> dict:
    return json.loads(render_json(runs(), W, ["a note"], {"model": "llama3-8b.gguf"}))


def test_panels_are_what_the_chart_draws():
    """A panel per budget, a series per run, groups at log2 of the sequences;
    medians with the repetitions' sd, labels with a streamed run's ratio to stock."""
    half, quarter = plot_batched.batched_panels(document())
    assert half.title == "llama3-8b.gguf budget 0.5x, stock ngl=20: -npp 128 -ntg 32"
    assert half.budgets == ("1", "2", "4", "16")
    assert half.positions == (0.0, 1.0, 2.0, 4.0) and half.xlabel == "parallel sequences"
    stock, streamed, per_rows = half.series
    assert [s.mode for s in half.series] == ["stock", "streamed", "streamed, split per rows"]
    assert [s.color for s in half.series] == ["C0", "C1", "C2"]
    assert stock.means == (10.0, 20.0, 40.0, 160.0)
    assert stock.sds == pytest.approx(tuple(statistics.stdev([10.0 * n * f for f in (0.98, 1.0, 1.02)])
                                            for n in W.parallel))
    assert stock.labels[3] == "160 ± 3" and "x stock" not in stock.labels[3]
    assert streamed.labels[0] == "8.00 ± 0.16\n0.80x stock" and per_rows.labels[3] == "144 ± 3\n0.90x stock"
    assert half.log  # 8 .. 160 t/s
    # one repetition: no error bars; no stock value at 16: no ratio, no stock bar
    qs, qt = quarter.series
    assert qs.means == (4.0, 7.0, 12.0, None) and qs.sds == (0.0,) * 4 and qs.labels[3] == ""
    assert qt.labels == ("5.00\n1.25x stock", "10.0\n1.43x stock", "20.0\n1.67x stock", "80.0")


def test_json_round_trip():
    back, w, notes = load_json(render_json(runs(), W, ["a note"]))
    assert back == runs() and w == W and notes == ["a note"]


def test_plot_without_matplotlib_is_a_note(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    note = plot_batched.plot_batched(json.dumps(document()), str(tmp_path / "b.png"))
    assert "matplotlib is not installed" in note and not (tmp_path / "b.png").exists()


def _has_matplotlib() -> bool:
    # not importorskip: matplotlib must stay out of a process that loads llama.cpp (see plot.py)
    return importlib.util.find_spec("matplotlib") is not None


def test_plot_with_matplotlib(tmp_path):
    if not _has_matplotlib():
        pytest.skip("matplotlib is not installed")
    png = tmp_path / "b.png"
    assert plot_batched.plot_batched(json.dumps(document()), str(png)) == f"plot written to {png}"
    assert png.read_bytes()[:4] == b"\x89PNG"
    # a broken document fails in the child and says so
    assert plot_batched.plot_batched("{}", str(tmp_path / "x.png")).startswith(f"--plot {tmp_path / 'x.png'} failed")


def test_the_child_imports_nothing_of_gguf_stream():
    """plot_batched() runs plot_batched.py by path: it reaches plot.py as its
    sibling, and nothing there may import the package (which loads llama.cpp)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", plot_batched.__file__], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage: python -m gguf_stream.bench.plot_batched" in proc.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert "plot" in imported and not [m for m in imported if m.startswith(("gguf_stream", "llama_cpp", "numpy"))]


def test_batched_bench_plot_is_refused_before_running(tiny_path, capsys, monkeypatch):
    import gguf_stream.bench.batched as batched
    from test_cli import assert_user_error, run_main

    monkeypatch.setattr(batched.BatchedBench, "budget_runs", lambda *a: pytest.fail("ran"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rc, _, err = run_main(capsys, "batched-bench", str(tiny_path), "--device", "host", "--plot",
                          str(tiny_path.parent / "b.png"))
    assert_user_error(rc, err, "--plot", "needs matplotlib", "nothing was run")
    monkeypatch.delitem(sys.modules, "matplotlib")
    import gguf_stream.bench.plot as plot

    monkeypatch.setattr(plot, "available", lambda: True)  # the folder's check, with or without matplotlib here
    rc, _, err = run_main(capsys, "batched-bench", str(tiny_path), "--device", "host", "--plot", "/nonexistent/b.png")
    assert_user_error(rc, err, "folder /nonexistent does not exist")


def test_batched_bench_plots_and_the_json_replots(tiny_path, tmp_path, capsys):
    """A host run with --plot writes the chart; its -o json re-renders with
    python -m gguf_stream.bench.plot_batched."""
    from conftest import subprocess_env
    from test_cli import T, run_main

    if not _has_matplotlib():
        pytest.skip("matplotlib is not installed")
    png = tmp_path / "run.png"
    rc, out, err = run_main(capsys, "batched-bench", str(tiny_path), "--device", "host", "-npp", "8", "-ntg", "2",
                            "-npl", "1,2", "--verify", "1", "-r", "2", "-b", "64", "-ub", "64", "-t", T,
                            "--n-streamed", "4", "-o", "json", "--plot", str(png))
    assert rc == 0, err
    assert f"plot written to {png}" in err and png.read_bytes()[:4] == b"\x89PNG"
    doc = json.loads(out)
    assert doc["meta"] == {"model": tiny_path.name}
    assert all(len(reps) == 2 for r in doc["runs"] for reps in r["tg_reps"].values())
    (tmp_path / "b.json").write_text(out)
    again = tmp_path / "again.png"
    proc = subprocess.run([sys.executable, "-m", "gguf_stream.bench.plot_batched", str(tmp_path / "b.json"),
                           str(again)], capture_output=True, text=True, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    assert again.read_bytes()[:4] == b"\x89PNG"
