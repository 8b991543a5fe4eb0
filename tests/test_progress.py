"""Progress of the long steps (progress.py): plain lines off a terminal
(rising, ending at 100%), a bar on one, silence unless asked; the load's
progress through llama.cpp's callback, and the embedded model's assembly."""
import hashlib
import io
import re

import pytest

from conftest import CPU
from gguf_stream import models
from gguf_stream.progress import Progress, note

LINE = re.compile(r"^gguf-stream: (.+?): +(\d+)% \((.+?) of (.+?), (.+?)\)$")


def percents(text: str, what: str) -> list[int]:
    out = []
    for line in text.splitlines():
        m = LINE.match(line)
        if m and m.group(1).startswith(what):
            out.append(int(m.group(2)))
    return out


def test_plain_lines_rise_in_steps_and_end_at_100():
    s = io.StringIO()
    with Progress("copying", 1000, stream=s) as p:
        for done in (0, 5, 120, 90, 130, 450, 451, 999):  # 90: smaller than before, ignored
            p.update(done)
    pct = percents(s.getvalue(), "copying")
    assert pct == [0, 12, 45, 99, 100]
    assert all(a < b for a, b in zip(pct, pct[1:]))
    assert "of 1000 B" in s.getvalue() and "/s" in s.getvalue()


def test_a_failed_step_does_not_claim_100():
    s = io.StringIO()
    with pytest.raises(RuntimeError):
        with Progress("copying", 1000, stream=s) as p:
            p.update(300)
            raise RuntimeError("disk full")
    assert percents(s.getvalue(), "copying") == [30]


def test_disabled_prints_nothing():
    s = io.StringIO()
    with Progress("copying", 1000, stream=s, enabled=False) as p:
        p.update(500)
    note("calibrating", False, stream=s)
    assert s.getvalue() == ""


def test_a_terminal_gets_a_bar_with_bytes_and_rate(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tqdm(name, *a, **kw):  # our own bar (tqdm's, where installed, is tqdm's)
        if name == "tqdm":
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    s = io.StringIO()
    with Progress("loading", 4 << 20, stream=s, tty=True) as p:
        p.update(1 << 20)
        p.update(4 << 20)
    text = s.getvalue()
    assert "\r" in text and text.endswith("\n") and "\n" not in text[:-1]  # one line, redrawn
    assert "100%" in text and "4.0 MiB/4.0 MiB" in text and re.search(r"[KMG]iB/s", text)


def test_the_api_is_silent_by_default_and_progress_shows_the_load(tiny_path, capfd):
    """load() and StreamedLlama print no progress unless asked; asked, the
    load's bytes come from llama.cpp's progress callback, rising to 100%
    (off a terminal: plain lines on stderr), even though llama-cpp-python
    silences stderr during a non-verbose load."""
    from gguf_stream.llama_compat import StreamedLlama
    from gguf_stream.model import load

    opts = dict(CPU, n_streamed=4, n_slots=2)
    with load(tiny_path, **opts) as m:
        m.generate(m.tokenize("hi"), 2)
    llm = StreamedLlama(tiny_path, **opts, verbose=False)
    llm.close()
    out, err = capfd.readouterr()
    assert "gguf-stream" not in err and "gguf-stream" not in out
    with load(tiny_path, **opts, progress=True):
        pass
    out, err = capfd.readouterr()
    pct = percents(err, "loading tiny.gguf")
    assert pct[0] == 0 and pct[-1] == 100 and len(pct) >= 5, err
    assert all(a < b for a, b in zip(pct, pct[1:]))
    assert out == ""


def _fake_model_package(tmp_path, monkeypatch, parts: list[bytes], sha: str):
    name = f"fake_model_pkg_{tmp_path.name}".replace("-", "_")  # a module of its own per test
    pkgs = tmp_path / "pkgs"
    pkgs.mkdir()
    data = tmp_path / "data"
    data.mkdir()
    for i, part in enumerate(parts):
        (data / f"part{i}").write_bytes(part)
    out = tmp_path / "out" / "model.gguf"
    (pkgs / f"{name}.py").write_text(
        "from pathlib import Path\n"
        f"EXPECTED_SHA256 = {sha!r}\n"
        f"def chunk_paths():\n    return [Path({str(data)!r}) / f'part{{i}}' for i in range({len(parts)})]\n"
        f"def default_output_path():\n    Path({str(out.parent)!r}).mkdir(exist_ok=True)\n"
        f"    return Path({str(out)!r})\n"
        "def assemble():\n    raise AssertionError('joined by gguf-stream with progress')\n")
    monkeypatch.syspath_prepend(str(pkgs))
    reg_file = tmp_path / "m.toml"
    reg_file.write_text(f'[models.fake]\nsource = "pypi:{name.replace("_", "-")}"\n')
    return models.load_registry([reg_file]), out


def test_first_use_assembly_shows_bytes_and_checks_the_hash(tmp_path, monkeypatch, capsys):
    parts = [bytes(range(256)) * 4096, b"x" * (3 << 20)]
    whole = b"".join(parts)
    reg, out = _fake_model_package(tmp_path, monkeypatch, parts, hashlib.sha256(whole).hexdigest())
    said = []
    path = models.resolve("fake", registry=reg, progress=said.append)
    assert path == out and out.read_bytes() == whole
    assert len(said) == 1 and said[0].startswith("assembling fake from fake-model-pkg")
    pct = percents(capsys.readouterr().err, "assembling fake")
    assert pct[-1] == 100 and len(pct) >= 3 and all(a < b for a, b in zip(pct, pct[1:]))
    assert models.resolve("fake", registry=reg) == out  # on disk now: nothing joined again


def test_assembly_with_a_wrong_hash_leaves_no_file(tmp_path, monkeypatch, capsys):
    reg, out = _fake_model_package(tmp_path, monkeypatch, [b"abc" * 1000], "0" * 64)
    with pytest.raises(models.ModelFileError, match="sha256 does not match"):
        models.resolve("fake", registry=reg, progress=lambda m: None)
    assert not out.exists() and list(out.parent.iterdir()) == []
    assert 100 not in percents(capsys.readouterr().err, "assembling fake")
