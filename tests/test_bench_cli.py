"""gguf_stream/bench/cli.py: `gguf-stream bench` as a subcommand: its
flags, exit codes, the --plot check, and `python -m gguf_stream bench`."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from conftest import ROOT, subprocess_env
from gguf_stream import cli
from gguf_stream.bench import EXIT_ERROR, EXIT_MISMATCH
from gguf_stream.bench import cli as bench_cli
from gguf_stream.bench import plot
from test_bench_report import result


def bench(*argv) -> int:
    return cli.main(["bench", *argv])


def gguf_stream_cmd(*argv, timeout=120):
    return subprocess.run([sys.executable, "-m", "gguf_stream", *argv], capture_output=True, text=True,
                          timeout=timeout, env=subprocess_env(), cwd=ROOT)


def _bench_parser() -> argparse.ArgumentParser:
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["bench"]


def test_main_exit_code_on_mismatch(monkeypatch, capsys):
    monkeypatch.setattr(bench_cli, "run", lambda args, progress=None: result(check="MISMATCH@0"))
    assert bench("-q") == EXIT_MISMATCH
    assert "MISMATCH" in capsys.readouterr().err
    assert bench("-q", "--allow-mismatch") == 0
    monkeypatch.setattr(bench_cli, "run", lambda args, progress=None: result())
    assert bench("-q") == 0


def test_tool_errors_exit_2(capsys):
    assert bench("-m", "no-such-model", "-q") == EXIT_ERROR
    assert "unknown model" in capsys.readouterr().err
    assert bench("--device", "host", "-p", "0", "-n", "0", "-q") == EXIT_ERROR


def test_help_is_a_subcommands():
    proc = gguf_stream_cmd("bench", "-h")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: gguf-stream bench ")
    for opt in ("--vram-budget", "--check-tokens", "--allow-mismatch", "--plot", "-ub", "--ngl", "-ngl", "-o",
                "--output", "--quiet", "exit codes"):
        assert opt in proc.stdout


def test_every_flag_says_what_it_does_and_its_default():
    for action in _bench_parser()._actions:
        if action.dest in ("help", "verbose", "quiet"):
            continue
        assert action.help and "default" in action.help, action.option_strings


def test_llama_cpp_spellings_parse():
    parse = cli.build_parser().parse_args
    args = parse(["bench", "-ngl", "10", "-o", "json", "-ub", "64"])
    assert (args.ngl, args.output, args.ubatch_size, args.func) == (10, "json", 64, bench_cli.command)
    assert parse(["bench", "--ngl", "3", "--output", "csv"]).ngl == 3
    assert parse(["-q", "bench"]).quiet and parse(["bench", "-q"]).quiet and not parse(["bench"]).quiet


def test_plot_without_matplotlib_is_refused_before_running(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    monkeypatch.setattr(bench_cli, "run", lambda *a, **k: pytest.fail("ran although --plot cannot work"))
    assert not plot.available()
    assert bench("--plot", str(tmp_path / "p.png")) == EXIT_ERROR
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("bench: error: --plot") and "matplotlib" in err


def test_plot_into_a_missing_folder_is_refused_before_running(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(plot, "available", lambda: True)
    monkeypatch.setattr(bench_cli, "run", lambda *a, **k: pytest.fail("ran although --plot cannot be written"))
    assert bench("--plot", str(tmp_path / "nowhere" / "p.png")) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere does not exist" in err and err.startswith("bench: error: --plot")


def test_output_formats_of_llama_bench(monkeypatch, capsys):
    monkeypatch.setattr(bench_cli, "run", lambda args, progress=None: result())
    assert bench("-q", "-o", "jsonl") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(x)["mode"] for x in lines] == [r.mode for r in result().rows]
    for fmt, first in (("md", "| model |"), ("csv", "model,"), ("json", "{")):
        assert bench("-q", "--output", fmt) == 0
        assert capsys.readouterr().out.startswith(first)


def test_python_m_gguf_stream_bench_on_tiny(tiny_path):
    proc = gguf_stream_cmd("-q", "bench", "-m", str(tiny_path), "--device", "host", "-p", "16", "-n", "2",
                           "-b", "16", "-ub", "16", "-r", "1", "--check-tokens", "4", "-t", "1", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert [(r["mode"], r["test"]) for r in doc["rows"]] == [("stock", "pp16"), ("stock", "tg2"),
                                                             ("streamed", "pp16"), ("streamed", "tg2")]
    assert all(r["check"] == "ok" for r in doc["rows"][2:]) and doc["mismatch"] is False
    assert "] " not in proc.stderr  # -q before the command silences the progress lines


def test_kv_cache_types_and_flash_attention_as_llama_bench(tiny_path, capsys):
    """-fa / -ctk / -ctv reach every load (the workload note says what ran);
    a quantized V cache without flash attention is refused before loading."""
    parse = cli.build_parser().parse_args
    args = parse(["bench", "-fa", "off", "-ctk", "q8_0", "-ctv", "f16"])
    assert (args.flash_attn, args.cache_type_k, args.cache_type_v) == ("off", "q8_0", "f16")
    assert bench("-m", str(tiny_path), "--device", "host", "-fa", "off", "-ctv", "q8_0", "-q") == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "-ctv q8_0 (a quantized V cache) needs flash attention" in err
    assert bench("-m", str(tiny_path), "--device", "host", "-p", "16", "-n", "2", "-b", "16", "-ub", "16", "-r", "1",
                 "--check-tokens", "4", "-t", "1", "-ctk", "q8_0", "-ctv", "q8_0", "-q", "-o", "json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["meta"]["workload"]["type_k"], doc["meta"]["workload"]["type_v"]) == ("q8_0", "q8_0")
    assert any("flash attention on, KV cache q8_0/q8_0" in n for n in doc["notes"])
    assert all(r["check"] == "ok" for r in doc["rows"] if r["mode"] == "streamed")
