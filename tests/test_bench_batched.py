"""gguf-stream batched-bench (bench/batched.py) in host mode on the tiny
model: every row measured, stock beside streamed; the acceptance checks
computed from the rows (and failing where the rows fail them)."""
import gguf_stream  # noqa: F401  (llama.cpp before numpy)

import json

import pytest
from test_cli import T, assert_user_error, run_main

from gguf_stream.bench.batched import BatchedWorkload, Run, checks, render_md


def test_batched_bench_host(tiny_path, capsys):
    argv = ["batched-bench", str(tiny_path), "--device", "host", "-npp", "8", "-ntg", "2", "-npl", "1,2",
            "--verify", "1,3", "-r", "1", "-b", "64", "-ub", "64", "-t", T, "--n-streamed", "4",
            "--generate-cpu-layers", "1,5"]
    rc, out, err = run_main(capsys, *argv, "-o", "json")
    assert rc == 0, err
    doc = json.loads(out)
    runs = doc["runs"]
    # CPU layers in the split: a second streamed run puts decodes of 2+ rows on the device
    assert [r["mode"] for r in runs] == ["stock ngl=0", "streamed", "streamed, k rows on the GPU"]
    assert [r["cpu_layers"] for r in runs] == [0, 2, 2]
    for r in runs:
        assert sorted(map(int, r["tg"])) == [1, 2] and all(v > 0 for v in r["tg"].values())
        assert sorted(map(int, r["verify"])) == [1, 3] and all(v > 0 for v in r["verify"].values())
    assert "4/8 layers streamed" in runs[1]["plan"]
    assert doc["workload"]["parallel"] == [1, 2]
    rc, out, err = run_main(capsys, *argv)
    assert rc == 0, err
    assert "| parallel sequences | stock ngl=0 tg t/s | streamed tg t/s |" in out
    assert "| verify decode of k tokens |" in out and "context 2 x 256 cells" in out
    assert "the verify rows share the context of 2 sequences" in out  # -npl 1 is speculative decoding's context


def _run(mode, tg, verify, peak=None, budget=None):
    return Run("0.5x", budget, mode, tg=tg, verify=verify, vram_peak=peak)


def test_checks_pass_and_fail():
    good = [_run("stock ngl=9", {1: 2.0, 16: 10.0}, {1: 0.1, 8: 0.3}, 90, 100),
            _run("streamed", {1: 2.0, 16: 24.0}, {1: 0.1, 8: 0.12}, 99, 100)]
    lines = checks(good)
    assert len(lines) == 5 and all(line.endswith("PASS") for line in lines), lines
    bad = [_run("stock ngl=9", {1: 2.0, 16: 20.0}, {1: 0.1, 8: 0.3}, 90, 100),
           _run("streamed", {1: 3.0, 16: 21.0}, {1: 0.1, 8: 0.2}, 101, 100)]
    verdicts = [line.rsplit(" ", 1)[1] for line in checks(bad)]
    assert verdicts == ["FAIL", "FAIL", "FAIL", "PASS", "FAIL"]  # 7x, 1.05x, 2x verify, peaks
    fallback = _run("streamed", {1: 2.0, 16: 9.0}, {}, 99, 100)
    fallback.plan = "plan: below streaming's minimum at this budget: llama.cpp's own split -ngl 2 (...)"
    assert [line for line in checks([fallback]) if "nothing streams" in line] == [
        "0.5x: streamed: nothing streams: with the KV cache of the largest -npl the budget is below streaming's "
        "minimum (llama.cpp's own split ran); measure fewer sequences here"]
    assert not [line for line in checks(good) if "nothing streams" in line]
    md = render_md(good, BatchedWorkload(parallel=(1, 16), verify=(1, 8)), checks(good))
    assert "| 16 | 10.00 | 24.00 | 2.40 | 5.00 | 12.00 |" in md


def test_stock_takes_a_gpu_layer_fewer_while_its_run_peaks_over_the_budget():
    """The stock probe measures one sequence's ubatch; where k sequences'
    decodes then peak over the budget, stock runs again with one GPU layer
    fewer until its measured run fits (or -ngl 0)."""
    from gguf_stream.bench.batched import BatchedBench
    from gguf_stream.bench.budgets import Budget

    peaks = {5: 107, 4: 103, 3: 99}
    loaded = []

    class Fake(BatchedBench):
        def stock(self, b, ngl):
            loaded.append(ngl)
            return Run(b.label, b.nbytes, f"stock ngl={ngl}", vram_peak=peaks[ngl])

    bench = Fake("m.gguf", 8, BatchedWorkload(), "cuda", lambda *a: None)
    assert bench.stock_within(Budget("0.25x", 100), 5).mode == "stock ngl=3" and loaded == [5, 4, 3]
    loaded.clear()
    assert bench.stock_within(Budget("0.25x", 110), 5).mode == "stock ngl=5" and loaded == [5]


def test_bad_flags(tiny_path, capsys):
    for extra, words in ((["-npl", "1,x"], "-npl: give comma-separated numbers"),
                         (["-npl", "0"], "-npl needs numbers in 1..256"),
                         (["-ntg", "0"], "-npp, -ntg and -r must be at least 1"),
                         (["--verify", "128", "-b", "64"], "--verify 128 exceeds -b 64")):
        rc, _, err = run_main(capsys, "batched-bench", str(tiny_path), "--device", "host", *extra)
        assert_user_error(rc, err, words)


@pytest.mark.parametrize("w", [dict(parallel=(1, 2), n_prompt=10, n_gen=5, verify=(1, 8))])
def test_context_holds_every_sequence(w):
    wl = BatchedWorkload(**w)
    assert wl.n_seq_max == 2 and wl.n_ctx == 2 * 256


def test_unified_context_is_what_the_workload_needs():
    wl = BatchedWorkload(parallel=(1, 32), n_prompt=100, n_gen=20, verify=(1, 8), kv_unified=True)
    assert wl.n_ctx == 4096  # 32 x 121 = 3872 cells, padded to 256 once (not 256 per sequence: 8192)
    assert BatchedWorkload(parallel=(1, 32), n_prompt=100, n_gen=20, verify=(1, 8)).n_ctx == 8192


def test_split_per_rows_measures_each_row_count_with_its_own_split(monkeypatch):
    """With the measured split, a run per row count: each load's split is
    chosen for its rows (generate_rows) and measures only its own row; one
    row comes from the single-token run, so a verify's cost is over the best
    single-token decode."""
    from gguf_stream.bench.batched import BatchedBench
    from gguf_stream.bench.budgets import Budget
    from gguf_stream.bench.timing import Progress

    w = BatchedWorkload(parallel=(1, 4, 16), verify=(1, 8), reps=1)
    bench = BatchedBench("m.gguf", 8, w, "cuda", Progress(quiet=True))
    loads = []

    def streamed(b, placement, rows_on_gpu=False, rows=1, only_rows=False):
        loads.append((rows, only_rows))
        r = Run(b.label, b.nbytes, "streamed" if rows == 1 else "x", plan="p", cpu_layers=10 // rows,
                vram_peak=100 + rows, n_slots=3 if rows >= 8 else 2, n_streamed=6 if rows >= 8 else 5)
        r.tg = {n: float(n * 10 + rows) for n in w.parallel if not only_rows or n == rows}
        r.verify = {k: 0.01 * (k + rows) for k in w.verify if not only_rows or k == rows}
        return r

    monkeypatch.setattr(bench, "streamed", streamed)
    monkeypatch.setattr(bench, "stock", lambda b, ngl: Run(b.label, b.nbytes, f"stock ngl={ngl}", tg={1: 1.0}))
    runs = bench.budget_runs(Budget("0.5x", 1000), {}, 3)
    assert [r.mode for r in runs] == ["stock ngl=3", "streamed", "streamed, split per rows"]
    assert loads == [(1, False), (4, True), (8, True), (16, True)]
    per = runs[2]
    assert per.tg == {1: 11.0, 4: 44.0, 16: 176.0} and per.verify == {1: 0.02, 8: 0.16}
    assert per.vram_peak == 116 and "1 row: 10" in per.plan
    assert "4: 2," in per.plan and "16: 0 (6 streamed through 3 slots)" in per.plan  # another placement says so


def test_max_slots_reaches_every_streamed_load(monkeypatch):
    """--max-slots (the A/B of the third slot) is in the config of every
    streamed load, whatever its rows; None leaves the engine's choice."""
    import gguf_stream.model as model
    from gguf_stream.bench.batched import BatchedBench
    from gguf_stream.bench.budgets import Budget
    from gguf_stream.bench.timing import Progress

    seen = []

    class Stop(Exception):
        pass

    def fake(path, config):
        seen.append((config.generate_rows, config.max_slots, config.slots_max()))
        raise Stop

    monkeypatch.setattr(model, "StreamedModel", fake)
    w = BatchedWorkload(parallel=(1,), verify=(1, 8), reps=1)
    for max_slots in (2, None):
        bench = BatchedBench("m.gguf", 8, w, "cuda", Progress(quiet=True), max_slots=max_slots)
        for rows in (1, 8):
            with pytest.raises(Stop):
                bench.streamed(Budget("0.5x", 1000), {"vram_budget": 1000}, rows=rows, only_rows=True)
    assert seen == [(1, 2, 2), (8, 2, 2), (1, None, 2), (8, None, 3)]
