"""tools/probe.py: every probe parses its options, and each one that loads a
model runs end to end on the tiny synthetic model in host mode (CPU only;
a smoke run, not a measurement)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from gguf_stream.config import cuda_available
from tools import probe

HOST = ["--device", "host", "-t", "1"]

PARSES = {
    "pp-hook": (["--ubatch", "512", "--budget", "3GiB"], dict(ubatch=512, budget="3GiB", pp=2048, reps=3)),
    "boundaries": ([], dict(ubatch=512, budget=None, n_streamed=None, pp=2048)),
    "slots": (["--budget", "2.11GiB", "--slots", "2", "3", "4"], dict(slots=[2, 3, 4], ubatch=512)),
    "timeline": (["--budget", "3.16GiB", "--n-cpu", "9", "10", "11"], dict(n_cpu=[9, 10, 11], n=32, pp=None)),
    "tg-paths": (["--streamed", "3", "5", "--cpu", "5", "--no-reuse"], dict(streamed=[3, 5], cpu=[5], no_reuse=True)),
    "split-sweep": (["--budget", "3.16GiB", "--spread", "3"], dict(spread=3, rounds=3, n=32)),
    "sched": (["--budget", "3.16GiB", "--own-device", "0", "--sched-debug"],
              dict(own_device=0, host_kv=1, sched_debug=True, cpu_every=2, tokens=8)),
    "cpu-layers": (["--budget", "3.16GiB", "--ngl", "14", "-t", "8"], dict(ngl=14, threads=8, n=64)),
    "ab-resident": (["--budget", "1.47GiB", "--ngl", "1"], dict(budget="1.47GiB", ngl=1, pp=2048, n=128, rounds=3)),
    "stock-under-dma": (["--ngl", "99", "--pp", "2048", "-ub", "512"], dict(ngl=99, pp=2048, ubatch=512, n=48)),
}


@pytest.mark.parametrize("name", sorted(PARSES))
def test_every_probe_parses_its_options(name):
    argv, want = PARSES[name]
    a = probe.build_parser().parse_args([name, "model.gguf", *argv])
    assert a.func is probe.PROBES[name][0] and a.model == "model.gguf" and a.device == "auto"
    assert {k: getattr(a, k) for k in want} == want


def test_every_option_says_what_it_does():
    for name, (func, summary, options) in probe.PROBES.items():
        assert func.__doc__ and summary, name
        for flags, kw in options:
            assert kw.get("help"), (name, flags)


def test_dma_hog_parses():
    a = probe.build_parser().parse_args(["dma-hog", "--seconds", "3"])
    assert (a.func, a.seconds, a.gib) == (probe.dma_hog, 3.0, 2.0)


def run(capsys, *argv) -> tuple[str, str]:
    rc = probe.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out, err


def json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_timeline_of_a_split_prompt_counts_the_split(tiny_moe_path, capsys):
    """--prompt-cpu-experts: a prompt's split layers, their CPU jobs and the
    hook's time on them per decode (where a split prompt's time goes)."""
    from conftest import expert_layers

    n_moe = len(expert_layers(tiny_moe_path))
    out, _ = run(capsys, "timeline", str(tiny_moe_path), *HOST, "--n-streamed", str(n_moe), "-n", "2", "--pp", "64",
                 "-ub", "64", "--moe-split", "1", "--prompt-cpu-experts", "3")
    (pp,) = json_lines(out)
    assert pp["split_layers"] > 0 and pp["split_cpu_jobs"] > 0
    assert pp["split_cpu_wait_ms"] >= 0 and pp["split_upload_ms"] >= 0
    assert 0 < pp["split_early_releases"] <= pp["split_layers"]  # experts-only slots freed before the CPU's part
    out, _ = run(capsys, "timeline", str(tiny_moe_path), *HOST, "--n-streamed", str(n_moe), "-n", "2", "--pp", "64",
                 "-ub", "64")
    (plain,) = json_lines(out)
    assert "split_layers" not in plain  # no split in host mode unless asked


def test_timeline_switches_cpu_layers_and_the_plan_says_so(tiny_path, capsys):
    out, _ = run(capsys, "timeline", tiny_path, *HOST, "--n-streamed", "4", "-n", "3", "--n-cpu", "0", "2")
    lines = json_lines(out)
    assert [(r["n_cpu"], r["n_streamed"]) for r in lines] == [(0, 4), (2, 2)]
    assert all(r["tokens_per_s"] > 0 and r["decode_ms"] > 0 for r in lines)
    assert lines[0]["uploads"] == 4.0  # every streamed layer crosses for each token without CPU layers
    out, _ = run(capsys, "timeline", tiny_path, *HOST, "--n-streamed", "4", "-n", "2", "--pp", "32", "-ub", "32")
    (pp,) = json_lines(out)
    assert pp["n_cpu"] == 0 and pp["uploads"] == 4.0
    # a verify's decodes: 3 tokens each, one pass over the layers per decode, as a token's
    out, _ = run(capsys, "timeline", tiny_path, *HOST, "--n-streamed", "4", "-n", "2", "--rows", "3", "--n-cpu", "0")
    (verify,) = json_lines(out)
    assert verify["rows"] == 3 and verify["uploads"] == 4.0
    assert verify["tokens_per_s"] == pytest.approx(3e3 / verify["decode_ms"], rel=0.01)


def test_sched_reports_the_cpu_layers_it_switched(tiny_path, capsys):
    out, err = run(capsys, "sched", tiny_path, *HOST, "--n-streamed", "4", "--tokens", "2")
    assert "CPU layers (3, 7)" in err  # every other layer of the overflow 1, 3, 5, 7
    kinds = {int(line.split()[1]): line.split()[2] for line in out.splitlines() if line.startswith("layer")}
    assert {i for i, k in kinds.items() if k == "cpu"} == {3, 7} and kinds[5] == "streamed"


def test_split_sweep_tg_paths_and_cpu_layers(tiny_path, capsys):
    out, _ = run(capsys, "split-sweep", tiny_path, *HOST, "--n-streamed", "4", "-n", "2", "--rounds", "1",
                 "--spread", "1")
    head, *rows = json_lines(out)
    assert head["n_overflow"] == 4 and [(r["own"], r["n_cpu"]) for r in rows] == [(1, 0), (1, 1), (0, 0), (0, 1)]
    out, _ = run(capsys, "tg-paths", tiny_path, *HOST, "--streamed", "1", "3", "--cpu", "3", "-n", "2",
                 "--rounds", "1", "--ctx", "256", "-ub", "64")
    head, ev, raw = json_lines(out)
    assert head["cpu"] == [3] and head["reuse"] is True and (ev["path"], raw["path"]) == ("eval", "raw")
    assert ev["t_s"] > 0 and raw["t_s"] > 0 and "tl_decode_ms" in ev
    out, _ = run(capsys, "cpu-layers", tiny_path, *HOST, "--n-streamed", "2", "--ngl", "4", "-n", "2")
    (r,) = json_lines(out)
    assert r["hybrid_tg"] > 0 and r["stock_tg"] > 0 and r["stock_ngl0_tg"] > 0 and r["n_streamed"] == 2


def test_prompt_probes(tiny_path, capsys):
    small = [*HOST, "--pp", "32", "-ub", "32", "-r", "1"]
    (r,) = json_lines(run(capsys, "pp-hook", tiny_path, *small)[0])
    assert r["n_streamed"] == 1 and len(r["stock"]) == len(r["streamed"]) == 1 and r["ratio"] > 0
    (r,) = json_lines(run(capsys, "boundaries", tiny_path, *small)[0])
    assert r["every_layer"]["boundaries"] > r["usual"]["boundaries"] >= 1
    out, _ = run(capsys, "slots", tiny_path, *small, "--n-streamed", "4", "--slots", "1", "2")
    assert [line.split(":")[0] for line in out.splitlines()] == ["max_slots 1", "max_slots 2"]
    assert "4 streamed x 1 slots" in out and "4 streamed x 2 slots" in out


def test_ab_resident(tiny_path, capsys):
    out, _ = run(capsys, "ab-resident", tiny_path, *HOST, "--pp", "16", "-n", "2", "--rounds", "1")
    stock, streamed = out.splitlines()
    assert stock.startswith("0 stock -ngl -1 pp16 ") and streamed.startswith("0 streamed 6GiB pp16 ")
    assert streamed.endswith("streamed layers: 0")  # the whole model fits: resident, as stock


@pytest.mark.skipif(cuda_available(), reason="the copy loop runs here")
def test_dma_probes_need_cuda(tiny_path, capsys):
    assert probe.main(["dma-hog", "--seconds", "1"]) == 2
    assert probe.main(["stock-under-dma", str(tiny_path), *HOST, "--ngl", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "probe stock-under-dma: error:" in err and "CUDA" in err


def test_engine_internals_stay_in_one_place():
    """The streamer's internals, live CPU-layer switches and raw decodes only
    in the functions under "engine internals" (adapted there at a refactor)."""
    lines = (ROOT / "tools" / "probe.py").read_text().splitlines()
    start = lines.index("# ------------------------------------------------------------ engine internals")
    end = lines.index("# ------------------------------------------------------------ probes")
    for i, line in enumerate(lines):
        if any(k in line for k in (".streamer", "set_cpu_layers(", "bind_layer_devices(", "m.ctx", "lc.llama_")):
            assert start < i < end, line


def test_runs_as_a_script_from_anywhere(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "probe.py"), "timeline", "-h"], capture_output=True,
                          text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python tools/probe.py timeline ") and "--n-cpu" in proc.stdout


def test_split_time_and_routing_ahead_run(tiny_moe_path):
    """tools/split_time.py (a split placement and stock's --n-cpu-moe) and
    tools/routing_ahead.py end to end on tiny-moe in host mode: smoke runs.
    routing_ahead's hit rate at distance 0 (a layer's router on its own
    input) must be 1.0."""
    def tool(*argv):
        return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)

    for variant, extra in (("split:1", ["--streamed", "4"]), ("stock:2", [])):
        r = tool("tools/split_time.py", str(tiny_moe_path), variant, "--device", "host", "--tokens", "4", "--reps",
                 "1", "--ubatch", "64", *extra)
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"RESULT {variant}: tg" in r.stdout
        assert ("split layer runs per token" in r.stdout) == (variant == "split:1")
    r = tool("tools/routing_ahead.py", str(tiny_moe_path), "--tokens", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "hit rate by distance" in r.stdout and "0: 1.0," in r.stdout


def test_cpu_layouts_runs_and_ours_equal_stocks_layout(gemma_path):
    """tools/cpu_layouts.py end to end on Gemma (host mode): the engine's CPU
    layers in the layouts llama.cpp's loader picks (AMX where the CPU has it)
    give stock's logits bit for bit, and differ from stock's plain weights
    (on Gemma the layouts round differently, so this can fail)."""
    r = subprocess.run([sys.executable, "tools/cpu_layouts.py", str(gemma_path), "--reps", "1",
                        "--variants", "stock-extra,ours-amx,stock-plain"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| 16 rows |" in r.stdout and "| tg (per token) |" in r.stdout and "stock-plain: buffers" in r.stdout
    assert "logits max |stock-extra - ours-amx| = 0\n" in r.stdout
    assert "logits max |stock-extra - stock-plain| = 0\n" not in r.stdout
