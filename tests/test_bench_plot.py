"""gguf_stream/bench/plot.py: the chart, drawn in a child process that never loads llama.cpp."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from gguf_stream.bench import plot
from test_bench_report import result


def test_plot_without_matplotlib_is_a_note(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    note = plot.plot(result(), str(tmp_path / "p.png"))
    assert "matplotlib is not installed" in note and not (tmp_path / "p.png").exists()
    assert not plot.available()


def test_plot_with_matplotlib(tmp_path):
    # not importorskip: matplotlib must stay out of a process that loads llama.cpp (see plot.py)
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed")
    assert plot.plot(result(), str(tmp_path / "p.png")) == f"plot written to {tmp_path / 'p.png'}"
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_the_child_imports_nothing_of_gguf_stream():
    """plot() runs plot.py by path: nothing there may import the package
    (its __init__ loads llama.cpp, which must stay out of matplotlib's process)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", plot.__file__], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage: python -m gguf_stream.bench.plot" in proc.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert imported and not [m for m in imported if m.startswith(("gguf_stream", "llama_cpp", "numpy"))]
