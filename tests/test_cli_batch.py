"""gguf-stream batch on Gemma: JSONL in and out, each prompt's text what it
gets alone, one-line errors for bad prompt files."""
import gguf_stream  # noqa: F401  (llama.cpp before numpy)

import io
import json

import pytest
from conftest import CPU
from test_cli import SMALL, T, assert_user_error, run_main

from gguf_stream.model import StockModel

PROMPTS = ["The capital of France is", "Once upon a time", "def fib(n):"]
N = 8


def alone_texts(path):
    with StockModel(path, 0, **CPU) as m:
        out = []
        for p in PROMPTS:
            m.reset()
            out.append(m.detokenize(m.generate(m.tokenize(p, add_bos=True, special=True), N, stop_at_eog=True)))
        return out


def test_batch_jsonl(gemma_path, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(f"{PROMPTS[0]}\n" + json.dumps({"prompt": PROMPTS[1], "id": "a7"}) + f"\n\n{PROMPTS[2]}\n")
    out = tmp_path / "r.jsonl"
    rc, stdout, err = run_main(capsys, "batch", str(gemma_path), "-np", "2", "-f", str(prompts), "-o", str(out),
                               "-n", str(N), "--n-streamed", "6", "-t", T, *["-c", "512", "-b", "64", "-ub", "64"])
    assert rc == 0, err
    assert stdout == ""
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    records, summary = sorted(lines[:-1], key=lambda r: r["index"]), lines[-1]["aggregate"]
    assert [r["text"] for r in records] == alone_texts(gemma_path)
    assert [r["prompt"] for r in records] == PROMPTS and records[1]["id"] == "a7" and "id" not in records[0]
    assert all(r["n_generated"] == N and r["stop"] == "length" and r["tokens_per_second"] > 0 for r in records)
    assert summary["sequences"] == 3 and summary["generated"] == 3 * N and summary["parallel"] == 2
    assert summary["tokens_per_step"] > 1 and summary["aggregate_tokens_per_second"] > 0
    assert "2 sequences of 256 KV cells" in err and "tokens per pass" in err


def test_batch_stdin(gemma_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(PROMPTS) + "\n"))
    rc, stdout, err = run_main(capsys, "batch", str(gemma_path), "--parallel", "4", "-n", str(N), "-t", T,
                               *["-c", "1024", "-b", "64", "-ub", "64"], "--n-streamed", "6")
    assert rc == 0, err
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert sorted(r["text"] for r in lines[:-1]) == sorted(alone_texts(gemma_path))
    assert lines[-1]["aggregate"]["generated"] == 3 * N


@pytest.mark.parametrize("content, argv, needles", [
    ('{"prompt": 3}\n', [], ["line 1", "string \"prompt\""]),
    ('ok\n{"prompt": "x"\n', [], ["line 2", "not valid JSON"]),
    ("\n\n", [], ["no prompts"]),
    ("a\n", ["-np", "0"], ["--parallel must be at least 1 and at most 256"]),
    ("a\n", ["-n", "0"], ["-n must be positive"]),
    ("a b c\n", ["-np", "2", "-c", "512", "-n", "300"], ["prompt 0", "exceed a sequence's 256 KV cells", "raise -c"]),
])
def test_batch_bad_input(gemma_path, tmp_path, capsys, content, argv, needles):
    f = tmp_path / "p.txt"
    f.write_text(content)
    rc, _, err = run_main(capsys, "batch", str(gemma_path), "-f", str(f), "-t", T, "--n-streamed", "2", *SMALL[2:],
                          *argv)
    assert_user_error(rc, err, *needles)


def test_batch_with_prompt_lookup(gemma_path, tmp_path, capsys):
    """--lookup N: each sequence's drafts ride in its rows of the step
    decode; every text is still what it gets alone, and the aggregate line
    counts the drafts. Drafts with sampling are refused before loading."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    rc, stdout, err = run_main(capsys, "batch", str(gemma_path), "-np", "2", "-f", str(prompts), "-n", str(N),
                               "--lookup", "2", "--n-streamed", "6", "-t", T, *["-c", "512", "-b", "64", "-ub", "64"])
    assert rc == 0, err
    lines = [json.loads(line) for line in stdout.splitlines()]
    records, summary = sorted(lines[:-1], key=lambda r: r["index"]), lines[-1]["aggregate"]
    assert [r["text"] for r in records] == alone_texts(gemma_path)
    assert summary["drafted"] >= summary["accepted"] >= 0 and "drafted tokens accepted" in err
    rc, _, err = run_main(capsys, "batch", str(gemma_path), "-f", str(prompts), "--lookup", "2", "--temp", "0.8",
                          "-t", T, *SMALL[2:])
    assert_user_error(rc, err, "greedy only")
