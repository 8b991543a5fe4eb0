"""What gguf-stream relies on from llama-cpp-python, checked in one place.

The hooks depend on the exact ABI of llama-cpp-python 0.3.36 (llama.cpp
0c1e57098): the struct layouts in native/gguf_stream.c, the scheduler's
cb_eval contract and the tensor_buft_overrides field. Any other version is
refused with a clear error rather than risking silent corruption.
"""
from __future__ import annotations

import ctypes
import os
import re
from functools import lru_cache
from pathlib import Path

from .errors import EnvironmentMismatchError

REQUIRED_VERSION = "0.3.36"


@lru_cache(maxsize=None)
def llama():
    """The llama_cpp.llama_cpp module, after checking the version and initialising the backend."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise EnvironmentMismatchError(
            f"llama-cpp-python is not installed; `pip install llama-cpp-python=={REQUIRED_VERSION}` "
            '(with CMAKE_ARGS="-DGGML_CUDA=on" for GPUs)'
        ) from exc
    version = getattr(llama_cpp, "__version__", "?")
    if version != REQUIRED_VERSION:
        raise EnvironmentMismatchError(
            f"gguf-stream needs llama-cpp-python=={REQUIRED_VERSION} (its hooks depend on that exact ABI), "
            f"found {version}; `pip install llama-cpp-python=={REQUIRED_VERSION}`"
        )
    import llama_cpp.llama_cpp as lc

    lc.llama_backend_init()
    return lc


def library_dir() -> Path:
    lc = llama()
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    return Path(override) if override else Path(lc.__file__).resolve().parent / "lib"


def _find_library(stem: str) -> str:
    d = library_dir()
    for name in (f"lib{stem}.so", f"lib{stem}.dylib"):
        if (d / name).exists():
            return str(d / name)
    raise EnvironmentMismatchError(f"lib{stem} not found in {d}: is llama-cpp-python installed correctly?")


def _mapped_library(pattern: str) -> str | None:
    """Path of a shared library already mapped into this process.

    Wheels cannot hold symlinks, so lib/ contains separate copies named
    libggml.so, libggml.so.0, ...; dlopen-ing another name than the one the
    dynamic linker picked would load a second ggml with its own state."""
    rx = re.compile(pattern)
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if line.strip() else ""
                if rx.fullmatch(os.path.basename(path)):
                    return path
    except OSError:
        pass
    return None


def cudart_path() -> str | None:
    """The CUDA runtime libggml-cuda already loaded (same copy, same context)."""
    return _mapped_library(r"libcudart\.so(\.[0-9.]+)?")


def ggml_paths() -> tuple[str, str]:
    """(libggml-base, libggml) as loaded by llama-cpp-python."""
    llama()
    found = []
    for stem in ("ggml-base", "ggml"):
        # the SONAME copy (libggml.so.0) is the one libllama linked against
        path = _mapped_library(rf"lib{stem}\.so\.[0-9]+")
        found.append(path or _find_library(stem))
    return found[0], found[1]


class BuftOverride(ctypes.Structure):
    """llama_model_tensor_buft_override (llama.h); llama-cpp-python leaves it undeclared."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def buft_overrides(rules: list[tuple[str, int]]):
    """NULL-terminated override array; keep the returned object alive while loading."""
    arr = (BuftOverride * (len(rules) + 1))()
    for i, (pattern, buft) in enumerate(rules):
        arr[i].pattern = pattern.encode()
        arr[i].buft = buft
    return arr


def layer_pattern(layers) -> str:
    """Regex matching the tensors of the given layers: ^blk\\.(3|7|11)\\."""
    return r"^blk\.(" + "|".join(str(i) for i in sorted(layers)) + r")\."
