"""gguf-stream: run GGUF models larger than GPU memory by streaming layers.

    with gguf_stream.load("model.gguf", vram_budget="8GiB", n_ctx=4096) as m:
        tokens = m.generate(m.tokenize("Hello"), 32)
        print(m.detokenize(tokens), m.stats.summary())
"""
try:
    # Load llama.cpp's libraries before anything imports numpy: on our CUDA
    # box (numpy 2.5 with scipy-openblas) the reverse order makes llama.cpp's
    # model loader crash.
    import llama_cpp as _llama_cpp  # noqa: F401
except ImportError:  # reported with install advice when a model is loaded
    pass

from .errors import (
    BudgetError,
    DecodeError,
    EnvironmentMismatchError,
    GGUFStreamError,
    ModelFileError,
    NativeError,
    UnsupportedModelError,
)
from .gguf_file import ModelFile, TensorInfo, read_model
from .memory import parse_size
from .planner import Plan, make_plan

__version__ = "0.1.0"

__all__ = [
    "BudgetError", "DecodeError", "EngineConfig", "EnvironmentMismatchError", "GGUFStreamError",
    "ModelFile", "ModelFileError", "NativeError", "Plan", "Stats", "StockModel", "StreamedLlama", "StreamedModel",
    "TensorInfo", "UnsupportedModelError", "load", "make_plan", "parse_size", "read_model",
]

# Imported on first use: they load llama_cpp and the native helper, and
# `import gguf_stream` stays light.
_LAZY = {"EngineConfig": "config", "Stats": "model", "StockModel": "model", "StreamedModel": "model",
         "load": "model", "StreamedLlama": "llama_compat"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'gguf_stream' has no attribute {name!r}")
