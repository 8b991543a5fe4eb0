"""cffi build script for the native helper (``gguf_stream._native``).

Registered through ``cffi_modules`` in setup.py, so ``pip install`` compiles it
with the system C compiler. It needs no CUDA toolkit and no ggml headers: the
helper resolves ggml and the CUDA runtime from the already-loaded libraries at
run time. ``python -m gguf_stream._build_native`` builds it in place (used on
machines where the package is run from a checkout without pip).

The declarations cffi sees are native/gguf_stream.h itself, less its
preprocessor lines (the include guard and #includes); its integer #defines
stay, and cffi checks their values against the compiled header.
"""
import re
from pathlib import Path

import cffi

ROOT = Path(__file__).resolve().parent.parent
NATIVE = ROOT / "native"
HEADER = "gguf_stream.h"

_DEFINE = re.compile(r"#define\s+\w+\s+-?\d+\b")


def cdef_from_header(text: str) -> str:
    """The public header as cffi's cdef: every preprocessor line goes except
    `#define NAME <integer>` (kept, without its trailing comment)."""
    out = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            m = _DEFINE.match(line.strip())
            line = m.group(0) if m else ""
        out.append(line)
    return "\n".join(out)


CDEF = cdef_from_header((NATIVE / HEADER).read_text())


def make_builder(absolute: bool = False) -> cffi.FFI:
    """setuptools wants paths relative to setup.py; an in-place build
    (which compiles inside its temporary directory) needs absolute ones."""
    base = NATIVE if absolute else NATIVE.relative_to(ROOT)
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.set_source(
        "gguf_stream._native",
        f'#include "{HEADER}"',
        sources=[str(base / p.name) for p in sorted(NATIVE.glob("*.c"))],
        depends=[str(base / p.name) for p in sorted(NATIVE.glob("*.h"))],
        include_dirs=[str(base)],
        libraries=["dl", "pthread", "m"],
        # Only the module's init function leaves the library: the units'
        # shared internals (G, C, fail, ...) stay private to it.
        extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-fvisibility=hidden"],
    )
    return ffi


ffibuilder = make_builder()

if __name__ == "__main__":
    # A stale build with another suffix (e.g. _native.abi3.so from an
    # editable install) would win the import; keep only this one.
    for old in (ROOT / "gguf_stream").glob("_native*.so"):
        old.unlink()
    make_builder(absolute=True).compile(tmpdir=str(ROOT / "build" / "cffi"),
                                        target=str(ROOT / "gguf_stream" / "_native.*"))
