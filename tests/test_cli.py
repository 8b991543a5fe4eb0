"""The gguf-stream command: every subcommand through cli.main (in process),
and exit codes / one-line errors / Ctrl-C through `python -m gguf_stream`."""
import gguf_stream  # noqa: F401  (llama.cpp before numpy)

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CPU, interrupt, subprocess_env
from gguf_stream import cli
from gguf_stream.gguf_file import read_model
from gguf_stream.planner import make_plan
from gguf_stream.config import cuda_available
from gguf_stream.model import StockModel

ROOT = Path(__file__).resolve().parent.parent
T = str(CPU["n_threads"])
SMALL = ["-c", "256", "-b", "64", "-ub", "64"]  # small context, as the other CPU tests
PROMPT = "The capital of France is"


def run_main(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("gguf-stream: error:")]


def assert_user_error(rc, err, *needles):
    assert rc == cli.EXIT_ERROR, err
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert err.rstrip("\n").splitlines()[-1] == lines[0]  # the error is the last word
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, gemma_path):
    d = tmp_path_factory.mktemp("bad")
    (d / "notes.gguf").write_text("these are not weights\n")
    data = gemma_path.read_bytes()
    (d / "header-cut.gguf").write_bytes(data[:100_000])  # inside the vocabulary
    (d / "data-cut.gguf").write_bytes(data[:len(data) // 2])  # header intact, tensors missing
    return d


def gguf_stream_cmd(*argv, timeout=60, **kw):
    return subprocess.run([sys.executable, "-m", "gguf_stream", *argv], check=False, capture_output=True, text=True,
                          timeout=timeout, env=subprocess_env(), cwd=ROOT, **kw)


# ---------------------------------------------------------------- commands

def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["-h"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("plan", "run", "chat", "bench", "models", "serve"):
        assert f"    {cmd} " in out


def test_plan_prints_the_table(capsys, gemma_path):
    mf = read_model(gemma_path)
    from gguf_stream.memory import LAZY_KERNEL_BYTES

    # `plan` plans a CUDA run: room for the kernels CUDA loads at first use
    everything = make_plan(mf, n_streamed=0, n_ctx=256, n_ubatch=64, runtime_bytes=LAZY_KERNEL_BYTES).device_bytes
    budget = everything - 10 * 2**20  # 10 MiB short of all-resident: a few layers must stream
    rc, out, err = run_main(capsys, "plan", str(gemma_path), "--vram-budget", str(budget), "-c", "256", "-ub", "64")
    assert rc == 0, err
    rows = [line for line in out.splitlines() if line.startswith("| ") and "MiB |" in line]
    assert len(rows) == 18  # one per layer
    assert any("| streamed |" in r for r in rows) and any("| resident |" in r for r in rows)
    assert "device estimate" in out and "slot(s)" in out

    rc, out, _ = run_main(capsys, "plan", str(gemma_path), "-ngl", "12", "-c", "256", "-ub", "64")
    assert rc == 0
    assert len([line for line in out.splitlines() if line.startswith("| ") and "| streamed |" in line]) == 6

    # the ubatch is clamped like the context will clamp it (by -b, which -c clamps), as run does
    rc, out, _ = run_main(capsys, "plan", str(gemma_path), "-ngl", "12", "-c", "128")
    assert rc == 0 and "at -c 128 -ub 128, as a CUDA run places it;" in out


def test_run_prints_stock_greedy_text_and_counters(capsys, gemma_path):
    rc, out, err = run_main(capsys, "run", str(gemma_path), "-p", PROMPT, "-n", "8", "--n-streamed", "6",
                            "--device", "host", "-t", T, *SMALL)
    assert rc == 0, err
    with StockModel(gemma_path, n_gpu_layers=0, **CPU) as stock:
        want = stock.detokenize(stock.generate(stock.tokenize(PROMPT, special=True), 8, stop_at_eog=True))
    assert out == PROMPT + want + "\n"
    assert want.strip()
    assert "t/s" in err and "adopted ready" in err and "6 of 18 layers streamed" in err


def test_run_default_in_host_mode_is_exact_with_load_progress_and_quiet_has_none(capsys, gemma_path):
    """Host mode has no split to measure: the default stays the exact
    placement (no error, no CPU layer), the same text as --exact and as
    stock; the load's progress goes to stderr as plain lines up to 100%,
    and -q leaves only the error channel's silence."""
    texts = []
    for extra in ((), ("--exact",), ("-q",)):
        rc, out, err = run_main(capsys, "run", str(gemma_path), "-p", PROMPT, "-n", "8", "--n-streamed", "6",
                                "--device", "host", "-t", T, *SMALL, *extra)
        assert rc == 0, err
        texts.append(out)
        loading = [line for line in err.splitlines() if "loading gemma" in line and "%" in line]
        if extra == ("-q",):
            assert err == ""
        else:
            assert loading and loading[-1].split(": ")[2].startswith("100%"), err
            assert "the CPU computes" not in err
    assert texts[0] == texts[1] == texts[2]


def run_text(capsys, gemma_path, *argv, n=16):
    rc, out, err = run_main(capsys, "run", str(gemma_path), "-p", PROMPT, "-n", str(n), "--n-streamed", "6",
                            "--device", "host", "-t", T, *SMALL, "--no-display-prompt", *argv)
    assert rc == 0, err
    return out, err


def test_run_temp_0_is_todays_greedy_output(capsys, gemma_path):
    """--temp 0 (the default) is the argmax, whatever the other sampling flags
    say; with a repeat penalty at temp 0 llama.cpp's greedy sampler picks."""
    greedy, _ = run_text(capsys, gemma_path)
    with StockModel(gemma_path, n_gpu_layers=0, **CPU) as stock:
        want = stock.detokenize(stock.generate(stock.tokenize(PROMPT, special=True), 16, stop_at_eog=True))
    assert greedy == want + "\n"
    assert run_text(capsys, gemma_path, "--temp", "0", "-s", "9", "--top-k", "1", "--min-p", "0.5")[0] == greedy
    # the sampler chain's greedy pick is the argmax too (a penalty this small moves no token here)
    assert run_text(capsys, gemma_path, "--repeat-penalty", "1.0001")[0] == greedy


def test_run_sampling_is_reproducible_by_seed(capsys, gemma_path):
    flags = ("--temp", "1.0", "--top-k", "0", "--top-p", "1", "--min-p", "0")  # the whole distribution
    a, _ = run_text(capsys, gemma_path, *flags, "--seed", "7")
    assert run_text(capsys, gemma_path, *flags, "-s", "7")[0] == a
    others = {run_text(capsys, gemma_path, *flags, "-s", str(s))[0] for s in (8, 9)}
    assert others - {a}, "different seeds gave the same text"
    # -1 (the default): a random seed, said on stderr so the run can be repeated
    text, err = run_text(capsys, gemma_path, *flags)
    seed = err.split("sampling seed ", 1)[1].split()[0]
    assert run_text(capsys, gemma_path, *flags, "-s", seed)[0] == text


def test_run_penalty_and_cuts_change_sampled_text_within_reason(capsys, gemma_path):
    out, _ = run_text(capsys, gemma_path, "--temp", "0.8", "--repeat-penalty", "1.5", "--repeat-last-n", "-1",
                      "--top-k", "20", "--top-p", "0.9", "--min-p", "0.1", "-s", "1")
    assert out.strip()


def test_run_json_schema_constrains_output_to_valid_json(capsys, gemma_path, tmp_path):
    import json

    schema = {"type": "object", "properties": {"answer": {"type": "boolean"}, "n": {"type": "integer"}},
              "required": ["answer", "n"], "additionalProperties": False}
    for argv in (["-j", json.dumps(schema)], ["-j", json.dumps(schema), "--temp", "0.9", "-s", "3"]):
        out, _ = run_text(capsys, gemma_path, *argv, n=64)
        got = json.loads(out)  # stopped at the end of the grammar, not at -n
        assert set(got) == {"answer", "n"} and isinstance(got["answer"], bool) and isinstance(got["n"], int)
    (tmp_path / "s.json").write_text(json.dumps(schema))
    out, _ = run_text(capsys, gemma_path, "-jf", str(tmp_path / "s.json"), n=64)
    assert isinstance(json.loads(out)["answer"], bool)
    (tmp_path / "yes-no.gbnf").write_text('root ::= "yes" | "no"\n')
    for argv in (["--grammar", 'root ::= "yes" | "no"'], ["--grammar-file", str(tmp_path / "yes-no.gbnf")],
                 ["--grammar", 'root ::= "yes" | "no"', "--temp", "1", "-s", "2"]):
        assert run_text(capsys, gemma_path, *argv)[0] in ("yes\n", "no\n")


def test_run_without_model_or_budget_uses_the_default_and_streams_half(capsys):
    rc, out, err = run_main(capsys, "run", "-p", "Hello", "-n", "2", "-t", T, *SMALL, "--no-display-prompt")
    assert rc == 0, err
    assert "embedded default model" in err
    if not cuda_available():
        assert "streaming 9 of 18 layers" in err and "host" in err
    assert out.strip()


def test_chat_reads_stdin_until_exit(capsys, monkeypatch, gemma_path):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Say hello.\n\n/reset\nSay hello.\n/exit\nnever read\n"))
    rc, out, err = run_main(capsys, "chat", str(gemma_path), "-n", "8", "--n-streamed", "6", "--device", "host",
                            "-t", T, *SMALL)
    assert rc == 0, err
    first = out[:len(out) // 2]  # each reply ends with a newline; greedy, and /reset forgot the first turn
    assert first.strip() and first.endswith("\n") and out == first * 2
    assert "chat format: gemma" in err


def test_chat_ends_at_eof(capsys, monkeypatch, gemma_path):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    rc, out, err = run_main(capsys, "chat", str(gemma_path), "--n-streamed", "2", "--device", "host", "-t", T,
                            *SMALL, "-q")  # -q after the command works too
    assert rc == 0 and out == "" and err == ""


def test_models_lists_the_registry(capsys):
    rc, out, err = run_main(capsys, "models")
    assert rc == 0, err
    assert any(line.startswith("* gemma3-270m") for line in out.splitlines())
    for name in ("tiny", "llama3-8b"):
        assert f" {name} " in out


def test_bench_delegates(capsys, gemma_path):
    rc, out, err = run_main(capsys, "bench", "-m", str(gemma_path), "-p", "8", "-n", "2", "-b", "64", "-ub", "64",
                            "-r", "1", "--check-tokens", "2", "--n-streamed", "6", "-q")
    assert rc == 0, err
    assert "| stock |" in out and "| streamed |" in out


def test_serve_user_errors(capsys):
    rc, _, err = run_main(capsys, "serve", "--port", "70000")
    assert_user_error(rc, err, "--port")


# ------------------------------------------------------------- bad input

def test_unknown_model_name(capsys):
    rc, out, err = run_main(capsys, "run", "no-such-model", "-p", "hi")
    assert_user_error(rc, err, "unknown model 'no-such-model'", "gemma3-270m")
    assert out == ""


def test_missing_path(capsys, tmp_path):
    rc, _, err = run_main(capsys, "plan", str(tmp_path / "nope.gguf"), "--vram-budget", "4GiB")
    assert_user_error(rc, err, "not found")


@pytest.mark.parametrize("name, needle", [("notes.gguf", "not a GGUF file"),
                                          ("header-cut.gguf", "truncated"),
                                          ("data-cut.gguf", "truncated")])
def test_damaged_files(capsys, bad_files, name, needle):
    rc, _, err = run_main(capsys, "run", str(bad_files / name), "-p", "hi", "--device", "host")
    assert_user_error(rc, err, needle)


def test_budget_too_small(capsys, gemma_path):
    rc, _, err = run_main(capsys, "run", str(gemma_path), "-p", "hi", "--vram-budget", "64MiB", *SMALL)
    assert_user_error(rc, err, "below the minimum", "raise the budget")


@pytest.mark.skipif(cuda_available(), reason="this llama-cpp-python has CUDA")
def test_device_cuda_without_cuda(capsys, gemma_path):
    rc, _, err = run_main(capsys, "run", str(gemma_path), "-p", "hi", "--device", "cuda")
    assert_user_error(rc, err, "CUDA", "CMAKE_ARGS=\"-DGGML_CUDA=on\"")


@pytest.mark.parametrize("argv, needle", [
    (["--vram-budget", "8 gigs"], "cannot read '8 gigs' as a size"),
    (["--vram-budget", "1GiB", "--n-streamed", "3"], "give only one"),
    (["-n", "0"], "-n must be positive"),
    (["--n-streamed", "99"], "only 18 layers"),
    (["-n", "300"], "exceed the context"),
    (["--generate-cpu-layers", "odd"], "--generate-cpu-layers takes auto, none or layer numbers"),
    # out of range: refused before anything loads, never wrapped in ctypes
    (["-c", "4294967297"], "-c must be in 0..2147483647 (0: the model's training context), got 4294967297"),
    (["-c", "1000000"], "n_ctx 1000000 is over 8 times the model's training context (32768)"),
    (["-b", "0"], "-b must be in 1..2147483647, got 0"),
    (["-t", "0"], "-t must be in 1.."),
    (["-t", "100000"], "-t must be in 1.."),
    (["--n-slots", "0"], "--n-slots must be in 1..512, got 0"),
    (["--n-streamed", "-2"], "--n-streamed must be in 0..512, got -2"),
    (["--vram-budget", "inf"], "cannot read 'inf' as a size"),
    (["--vram-budget", "9" * 400], "must be a finite number of bytes"),
    (["-ctv", "q8_0", "-fa", "off"], "a quantized V cache (type_v 'q8_0') needs flash attention in llama.cpp: "
                                     "give -fa on, or -ctv f16"),
    # sampling: llama.cpp's flags, each range-checked
    (["--temp", "-1"], "--temp must be a number in 0..100 (0: greedy), got -1.0"),
    (["--temp", "nan"], "--temp must be a number in 0..100"),
    (["--top-k", "-1"], "--top-k must be in 0..2147483647 (0: off), got -1"),
    (["--top-p", "1.5"], "--top-p must be a number in 0..1 (1: off), got 1.5"),
    (["--min-p", "-0.1"], "--min-p must be a number in 0..1 (0: off), got -0.1"),
    (["--repeat-penalty", "0"], "--repeat-penalty must be a number over 0"),
    (["--repeat-penalty", "inf"], "--repeat-penalty must be a number over 0"),
    (["--repeat-last-n", "-2"], "--repeat-last-n must be in -1..2147483647"),
    (["-s", "-2"], "--seed must be in -1..4294967294 (-1: random), got -2"),
    (["--seed", str(2**32)], "--seed must be in -1..4294967294"),
    (["--grammar", "root ::= ("], "--grammar: llama.cpp cannot use this grammar: parse: error parsing grammar: "
                                  "expecting ')'"),
    (["--grammar", "root ::= " + "(" * 100_000 + '"a"' + ")" * 100_000], "grammar parser crashed"),
    (["--grammar-file", "/no/such/file"], "--grammar-file /no/such/file: cannot read it (No such file"),
    (["--json-schema", "{nope"], "--json-schema is not JSON"),
    (["--json-schema", "[1, 2]"], "--json-schema must be a JSON object (a JSON schema), not list"),
    (["-j", '{"type": 5}'], "--json-schema: the schema cannot be turned into a grammar"),
    (["-j", '{"type": "array", "minItems": 1000000}'], "repeats something 1000000 times"),
    (["--grammar", 'root ::= "a"', "-j", "{}"], "--grammar and --json-schema both constrain the output"),
])
def test_bad_flags(capsys, gemma_path, argv, needle):
    rc, _, err = run_main(capsys, "run", str(gemma_path), "-p", "hi", "--device", "host", "-t", T, *SMALL, *argv)
    assert_user_error(rc, err, needle)


def test_context_0_is_the_training_context(capsys, tiny_path):
    rc, out, err = run_main(capsys, "plan", str(tiny_path), "--n-streamed", "2", "-c", "0")
    assert rc == 0, err
    assert "at -c 512 -ub 512" in out  # tiny's training context; the ubatch clamped to it
    rc, out, err = run_main(capsys, "run", str(tiny_path), "-p", "hi", "-n", "2", "-c", "0", "--device", "host",
                            "-t", T)
    assert rc == 0, err


def test_non_utf8_prompt_fails_before_the_load(capsys):
    """Python keeps argv bytes that are not UTF-8 as surrogates: refused at
    once (here before the missing model would be noticed)."""
    rc, _, err = run_main(capsys, "run", "no-such-model.gguf", "-p", "caf\udce9")
    assert_user_error(rc, err, "-p is not valid UTF-8 (at character 3)")


# ------------------------------------------------------ as a real process

def test_subprocess_non_utf8_prompt():
    r = subprocess.run([sys.executable, "-m", "gguf_stream", "-q", "run", "-p", b"caf\xe9"], capture_output=True,
                       env=subprocess_env(), cwd=ROOT, timeout=60)
    assert r.returncode == cli.EXIT_ERROR
    assert r.stderr.decode().splitlines() == ["gguf-stream: error: -p is not valid UTF-8 (at character 3); "
                                              "give UTF-8 text"]

def test_subprocess_user_errors_are_one_line(bad_files, gemma_path):
    cases = [
        (["run", "no-such-model", "-p", "hi"], "unknown model"),
        (["run", str(bad_files / "notes.gguf"), "-p", "hi"], "not a GGUF file"),
        (["run", str(bad_files / "data-cut.gguf"), "-p", "hi"], "truncated"),
        (["run", str(gemma_path), "-p", "hi", "--vram-budget", "64MiB"], "below the minimum"),
        (["chat", str(gemma_path), "--vram-budget", "64MiB"], "below the minimum"),  # through StreamedLlama
    ]
    if not cuda_available():
        cases.append((["run", str(gemma_path), "-p", "hi", "--device", "cuda"], "no CUDA device"))
    for argv, needle in cases:
        r = gguf_stream_cmd("-q", *argv, stdin=subprocess.DEVNULL)
        assert r.returncode == cli.EXIT_ERROR, (argv, r.stderr)
        assert r.stdout == ""
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("gguf-stream: error: "), (argv, r.stderr)
        assert needle in r.stderr


def test_subprocess_run_and_version(gemma_path):
    r = gguf_stream_cmd("--version")
    assert r.returncode == 0 and r.stdout.startswith("gguf-stream ")
    r = gguf_stream_cmd("run", str(gemma_path), "-p", PROMPT, "-n", "4", "-t", T, *SMALL)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(PROMPT) and len(r.stdout) > len(PROMPT) + 1
    assert "Traceback" not in r.stderr


def test_ctrl_c_stops_cleanly_and_exits_130(gemma_path):
    p = subprocess.Popen([sys.executable, "-m", "gguf_stream", "run", str(gemma_path), "-p", "Once upon a time",
                          "-n", "-1", "--ignore-eos", "--n-streamed", "6", "-t", T, "-c", "2048"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env(), cwd=ROOT)
    seen = b""
    while len(seen) <= len("Once upon a time") + 2:  # generation has begun
        chunk = os.read(p.stdout.fileno(), 64)
        if not chunk:  # exited before generating
            pytest.fail(interrupt(p)[1].decode())
        seen += chunk
    out, err = interrupt(p)
    err = err.decode()
    assert p.returncode == cli.EXIT_INTERRUPTED, err
    text = (seen + out).decode()
    assert text.startswith("Once upon a time") and text.endswith("\n")
    assert "Traceback" not in err
    assert error_lines(err) == [error_lines(err)[0]] and "interrupted (Ctrl-C) after" in err
    assert "adopted ready" in err  # the counters still come out


def test_chat_threads_apply_to_batches_too(capsys, monkeypatch, gemma_path):
    """-t sets n_threads and n_threads_batch, as llama.cpp's -t does (llama_cpp.Llama
    would otherwise run prompts on every core); -tb sets the second alone."""
    import gguf_stream.llama_compat as compat

    seen = {}

    class Refused(Exception):
        pass

    def fake(path, **kwargs):
        seen.update(kwargs)
        raise Refused

    monkeypatch.setattr(compat, "StreamedLlama", fake)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    with pytest.raises(Refused):
        cli.main(["chat", str(gemma_path), "--device", "host", "-t", "3", *SMALL])
    assert seen["n_threads"] == seen["n_threads_batch"] == 3
    with pytest.raises(Refused):
        cli.main(["chat", str(gemma_path), "--device", "host", "-t", "3", "-tb", "2", *SMALL])
    assert (seen["n_threads"], seen["n_threads_batch"]) == (3, 2)


def test_plan_of_a_moe_model_places_experts_or_whole_layers(capsys, tiny_moe_path):
    rc, out, err = run_main(capsys, "plan", str(tiny_moe_path), "--n-streamed", "2")
    assert rc == 0, err
    assert "| layer | dense part | experts | prompt | generate | slot |" in out and "dense parts" in out
    rc, out, err = run_main(capsys, "plan", str(tiny_moe_path), "--n-streamed", "2", "--whole-layers")
    assert rc == 0, err
    assert "| layer | bytes | prompt | generate | slot |" in out and "dense part" not in out


def test_run_a_moe_model_with_whole_layers(capsys, tiny_moe_path):
    rc, out, err = run_main(capsys, "run", str(tiny_moe_path), "-p", "hello", "-n", "4", "--n-streamed", "2",
                            "--whole-layers", "--device", "host", "-t", T, *SMALL)
    assert rc == 0, err
    assert "2 of 4 layers streamed" in err
    rc, out, err = run_main(capsys, "run", str(tiny_moe_path), "-p", "hello", "-n", "4", "--n-streamed", "2",
                            "--device", "host", "-t", T, *SMALL)
    assert rc == 0, err
    assert "2 of 4 layers' experts streamed" in err


# ---------------------------------------------------------------- KV cache types, host memory, default model

def test_kv_cache_types_in_plan_and_run(capsys, tiny_path):
    rc, out, err = run_main(capsys, "plan", str(tiny_path), "--n-streamed", "2", *SMALL, "-ctk", "q8_0",
                            "-ctv", "q8_0")
    assert rc == 0, err
    assert "(K q8_0, V q8_0)" in out
    kv = dict(type_k="q8_0", type_v="q8_0", flash_attn=True)
    with StockModel(tiny_path, n_gpu_layers=0, **{**CPU, **kv}) as stock:
        want = stock.detokenize(stock.generate(stock.tokenize(PROMPT, special=True), 6, stop_at_eog=True))
    rc, out, err = run_main(capsys, "run", str(tiny_path), "-p", PROMPT, "-n", "6", "--n-streamed", "4",
                            "--device", "host", "-t", T, *SMALL, "-ctk", "q8_0", "-ctv", "q8_0")
    assert rc == 0, err
    assert out == PROMPT + want + "\n"


def test_bad_kv_cache_type_is_a_usage_error(capsys, tiny_path):
    with pytest.raises(SystemExit) as e:
        cli.main(["run", str(tiny_path), "-p", "hi", "-ctk", "q8"])
    assert e.value.code == 2
    assert "invalid choice: 'q8'" in capsys.readouterr().err


def test_plan_shows_host_memory(capsys, tiny_path):
    rc, out, err = run_main(capsys, "plan", str(tiny_path), "--n-streamed", "4", *SMALL, "--exact")
    assert rc == 0, err
    mf = read_model(tiny_path)
    plan = make_plan(mf, n_streamed=4, n_ctx=256, n_ubatch=64)
    assert plan.host_memory_line() in out and "host memory: pinned" in out
    # the default is a CUDA run's default, the measured split: chosen at load (nothing cached here), after the
    # tiers, among the pinned overflow layers; the plan holds no CPU layer yet and says how many it may get
    # a fixed host budget: the default reads MemAvailable, which moves between the two plans below
    host = ["--host-budget", "16GiB"]
    rc, out, err = run_main(capsys, "plan", str(tiny_path), "--n-streamed", "4", *SMALL, *host)
    assert rc == 0, err
    line = next(x for x in out.splitlines() if x.startswith("host memory:"))
    assert "the CPU layers' repacked weights" not in line and plan.host_memory_line() in out
    assert "generate split: measured at load (none cached here): up to " in out
    rc, out2, err = run_main(capsys, "plan", str(tiny_path), "--n-streamed", "4", *SMALL, *host,
                             "--generate-cpu-layers", "auto")
    assert rc == 0 and out2 == out, err
    rc, _, err = run_main(capsys, "plan", str(tiny_path), "--n-streamed", "4", *SMALL, "--exact",
                          "--generate-cpu-layers", "auto")
    assert_user_error(rc, err, "--exact computes every layer on the GPU")
    # a CUDA run's generate placement: explicit CPU layers add their repacked copy and KV caches
    rc, out, err = run_main(capsys, "plan", str(tiny_path), "--n-streamed", "4", *SMALL, "--generate-cpu-layers",
                            ",".join(map(str, plan.streamed[:2])))
    assert rc == 0, err
    line = next(x for x in out.splitlines() if x.startswith("host memory:"))
    assert "the CPU layers' repacked weights, their KV caches" in line
    assert plan.host_memory_line() not in out


def test_host_memory_check_is_one_line_in_the_cli(capsys, tiny_path, monkeypatch):
    from gguf_stream import placement

    monkeypatch.setattr(placement, "available_host_memory", lambda: 1 << 20)
    rc, _, err = run_main(capsys, "run", str(tiny_path), "-p", "hi", "-n", "2", "--n-streamed", "4",
                          "--device", "host", "-t", T, *SMALL)
    assert_user_error(rc, err, "host budget 0.0 MiB (what this machine can spare: MemAvailable 1.0 MiB",
                      "give --host-budget", "a larger --vram-budget")
    rc, _, err = run_main(capsys, "run", str(tiny_path), "-p", "hi", "-n", "2", "--n-streamed", "4",
                          "--device", "host", "-t", T, "--host-budget", "none", *SMALL)
    assert_user_error(rc, err, "of host memory (pinned", "1.0 MiB is available (MemAvailable)",
                      "give a larger --vram-budget")


def test_plan_without_model_uses_the_default(capsys):
    rc, out, err = run_main(capsys, "plan", "--n-streamed", "4", *SMALL)
    assert rc == 0, err
    assert "embedded default model" in err and "gemma" in out.splitlines()[0].lower()
    assert len([line for line in out.splitlines() if "| streamed |" in line]) == 4


def test_vram_budget_relative_to_the_model(capsys, tiny_path):
    """--vram-budget 5.6x reads as the bench's budgets do: 5.6 times the
    model file's bytes (the tiny model's compute buffers outweigh it), in
    plan and run alike; a bad factor is a one-line error."""
    mf = read_model(tiny_path)
    host = [*SMALL, "--exact", "--device", "host"]

    def planned(budget: str) -> list[str]:  # the tiers line: the host budget is what the machine spares now
        rc, out, err = run_main(capsys, "plan", str(tiny_path), "--vram-budget", budget, *host)
        assert rc == 0, err
        return [line for line in out.splitlines() if not line.startswith("tiers")]

    relative = "\n".join(planned("5.6x"))
    assert relative == "\n".join(planned(str(int(5.6 * mf.total_bytes))))
    assert "| streamed |" in relative
    rc, _, err = run_main(capsys, "run", str(tiny_path), "-p", "hi", "-n", "2", "--vram-budget", "5.6x",
                          "--device", "host", "-t", T, *SMALL)
    assert rc == 0 and "simulating the plan for a 5.6x VRAM budget" in err, err
    for bad, words in (("zx", "cannot read budget 'zx'"), ("-1x", "budget factor must be a positive number"),
                       ("infx", "budget factor must be a positive number"), ("0.5x,1x", "give one budget")):
        rc, _, err = run_main(capsys, "plan", str(tiny_path), f"--vram-budget={bad}", *SMALL)
        assert_user_error(rc, err, words)
