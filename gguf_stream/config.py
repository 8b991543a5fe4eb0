"""What a run is configured with, decided once: the options (EngineConfig),
the device (CUDA or host-slot mode), the thread count and the cache directory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import EnvironmentMismatchError

ENV_CACHE = "GGUF_STREAM_CACHE"


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Options of a run. Either vram_budget (the planner decides) or the
    streamed layers (n_streamed / streamed_layers) must be given to stream."""

    vram_budget: int | str | None = None
    n_ctx: int = 4096
    n_batch: int = 512
    n_ubatch: int = 512
    flash_attn: bool = True
    device: str = "auto"  # "auto", "cuda" or "host" (slots in host memory, CPU compute)
    n_streamed: int | None = None
    streamed_layers: tuple[int, ...] | None = None
    n_slots: int | None = None
    max_slots: int = 2
    prefetch: bool = True
    host_copy_delay_us: int = 0  # host mode: simulate a slow link
    n_threads: int | None = None
    # CPU weight repacking (llama.cpp's default): None = on, except in host
    # mode, where stock and streamed must use the same plain kernels.
    cpu_repack: bool | None = None
    # While generating, streamed layers the CPU computes from host memory
    # instead of uploading them: "none" (default: every layer on the GPU,
    # results bit-identical to all-in-VRAM), "auto" (a split measured on this
    # machine: faster generation, CPU rounding like stock -ngl's CPU layers;
    # CUDA only), or layer numbers.
    generate_cpu_layers: str | tuple[int, ...] = "none"
    # Streamed layers that stay resident while generating, in the part of
    # llama.cpp's compute buffer that a prompt-sized ubatch needs and a
    # generated token leaves idle (no extra VRAM; they are copied in at each
    # switch from a prompt to generating, and computed on the GPU as
    # before): "auto" (as many as fit; CUDA), "none", or layer numbers.
    generate_resident: str | tuple[int, ...] = "auto"
    # CPU layers keep their KV cache in host memory while generating, so the
    # CPU computes the whole layer (attention included) like stock -ngl does;
    # False leaves it on the GPU (one GPU round trip per attention: an A/B aid).
    cpu_layer_host_kv: bool = True
    # CPU layers count as CPU layers for llama.cpp's graph while generating,
    # so their RMS norms run on the CPU with the rest of the layer (two
    # backend switches per CPU layer, not four); False: an A/B aid.
    cpu_layer_device: bool = True
    # Let the context reuse a graph for the next decode of the same shape
    # (llama.cpp's default; saves building one per generated token). With CPU
    # layers the engine then keeps the placement a function of the shape: a
    # prompt's tail ubatch under the offload threshold is decoded on its own,
    # in the generate placement, and CPU layers cannot change on the live
    # context. False: rebuild every graph (StreamedLlama, when every token's
    # outputs are kept, and probes that change CPU layers on the fly).
    graph_reuse: bool = True
    verbose: bool = False

    def __post_init__(self):
        if self.device not in ("auto", "cuda", "host"):
            raise ValueError(f"device must be 'auto', 'cuda' or 'host', not {self.device!r}")
        if self.n_ubatch > self.n_batch:
            raise ValueError(f"n_ubatch ({self.n_ubatch}) cannot exceed n_batch ({self.n_batch})")
        for name in ("generate_cpu_layers", "generate_resident"):
            value = getattr(self, name)
            if isinstance(value, str) and value not in ("auto", "none"):
                raise ValueError(f"{name} must be 'auto', 'none' or layer numbers, not {value!r}")
        if self.n_slots is not None and self.n_slots < 1:
            raise ValueError(f"n_slots must be at least 1, got {self.n_slots}")

    @property
    def repack(self) -> bool:
        return self.device != "host" if self.cpu_repack is None else self.cpu_repack

    @property
    def threads(self) -> int:
        return self.n_threads or physical_cores()

    @property
    def places_layers(self) -> bool:
        """A budget or streamed layers were given (else everything stays resident)."""
        return not (self.vram_budget is None and self.n_streamed is None and self.streamed_layers is None)


# ------------------------------------------------------------------ device

def load_native(want_cuda: bool) -> bool:
    """Load the native helper's libraries; True if a CUDA device will be used."""
    from . import llama_abi, native

    ggml_base, ggml = llama_abi.ggml_paths()
    native.load_libraries(ggml_base, ggml, None)
    if not want_cuda or not native.has_device("CUDA0"):
        return False
    cudart = llama_abi.cudart_path()
    if cudart is None:
        raise EnvironmentMismatchError("libggml-cuda is loaded but no libcudart.so is mapped in the process")
    native.load_libraries(ggml_base, ggml, cudart)
    return True


def cuda_available() -> bool:
    return load_native(want_cuda=True)


def no_cuda_error() -> EnvironmentMismatchError:
    return EnvironmentMismatchError(
        "a GPU run was asked for but this llama-cpp-python has no CUDA device; reinstall it with "
        'CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir llama-cpp-python==0.3.36, '
        "or run on the CPU (device='host')")


def select_device(requested: str) -> str:
    """The device a run uses, decided here only: 'cuda' or 'host' for
    requested 'auto' | 'cuda' | 'host'; 'cuda' without a CUDA build is an error."""
    if requested not in ("auto", "cuda", "host"):
        raise ValueError(f"device must be 'auto', 'cuda' or 'host', not {requested!r}")
    if load_native(want_cuda=requested != "host"):
        return "cuda"
    if requested == "cuda":
        raise no_cuda_error()
    return "host"


# ------------------------------------------------------------------ machine

@lru_cache(maxsize=None)
def physical_cores() -> int:
    """Physical cores, as llama.cpp's tools count them for their default
    thread count (hyperthreads do not help its kernels)."""
    try:
        cores = set()
        with open("/proc/cpuinfo") as f:
            phys = None
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    phys = value.strip()
                elif key == "core id":
                    cores.add((phys, value.strip()))
        if cores:
            return len(cores)
    except OSError:
        pass
    return os.cpu_count() or 1


def cache_dir() -> Path:
    """Where gguf-stream keeps generated models and measured rates:
    $GGUF_STREAM_CACHE, else $XDG_CACHE_HOME/gguf-stream, else ~/.cache/gguf-stream."""
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg and Path(xdg).expanduser().is_absolute() else Path.home() / ".cache"
    return base / "gguf-stream"
