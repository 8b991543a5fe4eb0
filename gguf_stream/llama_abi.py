"""What gguf-stream relies on from llama-cpp-python, checked in one place.

The hooks depend on the exact ABI of llama-cpp-python 0.3.36 (llama.cpp
0c1e57098): the struct layouts in native/gs_abi.h, the scheduler's
cb_eval contract and the tensor_buft_overrides field. Any other version is
refused with a clear error rather than risking silent corruption.
"""
from __future__ import annotations

import ctypes
import os
import re
from contextlib import contextmanager
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


def flash_attn_type(flash_attn) -> int:
    """llama_context_params.flash_attn_type for EngineConfig.flash_attn (True, False, "auto")."""
    lc = llama()
    if flash_attn == "auto" and not isinstance(flash_attn, bool):
        return lc.LLAMA_FLASH_ATTN_TYPE_AUTO
    return lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED


# What llama.cpp logs when it settles flash attention "auto" at context
# creation (llama_init_from_model, llama_context::resolve_fused_ops); it
# keeps the outcome in cparams, which no function of its API returns.
FLASH_ATTN_ON_LOG = (b"Flash Attention enabled", b"enabling flash_attn since")
FLASH_ATTN_OFF_LOG = (b"Flash Attention not supported", b"flash_attn is not compatible")
FLASH_ATTN_LOG = FLASH_ATTN_ON_LOG + FLASH_ATTN_OFF_LOG


@contextmanager
def watch_log(*needles: bytes):
    """Yields a list that collects the lines of llama.cpp's log containing
    one of needles while inside; every line still goes on to the callback
    that was set (llama-cpp-python's, or the command line's), which is set
    back after."""
    lc = llama()
    prev, prev_data = lc.llama_log_callback(), ctypes.c_void_p()
    lc.llama_log_get(ctypes.byref(prev), ctypes.byref(prev_data))
    seen: list[bytes] = []

    @lc.llama_log_callback
    def forward(level, text, user_data):
        if text and any(n in text for n in needles):
            seen.append(text)
        if prev:
            prev(level, text, prev_data)

    lc.llama_log_set(forward, None)
    try:
        yield seen
    finally:
        lc.llama_log_set(prev, prev_data)


def flash_attn_outcome(flash_attn, log_lines) -> bool | None:
    """Whether the context computes with flash attention: what llama.cpp's
    log said at its creation, else the setting (True / False); None for
    "auto" where the log said nothing."""
    said = [on for line in log_lines for on, needles in ((True, FLASH_ATTN_ON_LOG), (False, FLASH_ATTN_OFF_LOG))
            if any(n in line for n in needles)]
    if said:
        return said[-1]
    return None if flash_attn == "auto" and not isinstance(flash_attn, bool) else bool(flash_attn)


def load_mode(use_mlock: bool) -> int:
    """llama_model_params.load_mode of every model the engine loads: never
    mmap (with mmap llama.cpp silently drops overrides to pinned host memory),
    and llama.cpp's mlock of the model's host buffers with use_mlock."""
    lc = llama()
    return lc.LLAMA_LOAD_MODE_MLOCK if use_mlock else lc.LLAMA_LOAD_MODE_NONE


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


def no_gpu_devices(params):
    """An empty device list in llama_model_params: llama.cpp then uses no GPU
    for the model (host mode on a GPU build, where its scheduler would
    otherwise run prompts' matrix products of host weights on the GPU: op
    offload). Returns the list, which must outlive the load."""
    empty = (ctypes.c_void_p * 1)()
    params.devices = ctypes.cast(empty, ctypes.c_void_p)
    return empty


def our_model_params(params, config, cuda: bool):
    """What every load of ours sets in llama_model_params: the load mode,
    repacking, and in host mode no GPU device. Returns what must outlive
    the load (None on CUDA)."""
    params.load_mode = load_mode(config.use_mlock)
    params.use_extra_bufts = config.repack
    return None if cuda else no_gpu_devices(params)


def layer_pattern(layers) -> str:
    """Regex matching the tensors of the given layers: ^blk\\.(3|7|11)\\."""
    return r"^blk\.(" + "|".join(str(i) for i in sorted(layers)) + r")\."


def expert_pattern(layers) -> str:
    """Regex matching the expert tensors of the given layers (what
    gguf_file.is_expert_tensor calls experts); llama.cpp's own rule is
    n_cpu_moe_pattern."""
    return layer_pattern(layers) + r"ffn_(gate|up|down|gate_up)_exps\."


# llama.cpp's --n-cpu-moe (common/common.h: LLM_FFN_EXPS_REGEX, searched
# unanchored in a tensor's name; "chexps" are conditional experts)
LLM_FFN_EXPS_REGEX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"


def n_cpu_moe_pattern(n: int) -> str:
    """llama.cpp's `--n-cpu-moe n` rules as one regex: it adds one rule
    llm_ffn_exps_block_regex(i) = blk\\.i + LLM_FFN_EXPS_REGEX per layer
    i < n; their alternation matches the same names."""
    if n < 1:
        raise ValueError(f"n_cpu_moe_pattern needs n >= 1, got {n}")
    return r"blk\.(" + "|".join(str(i) for i in range(n)) + ")" + LLM_FFN_EXPS_REGEX


# Where llama.cpp keeps each layer's device: llama_model::pimpl (a
# unique_ptr<impl>) and, in it, dev_layer (a std::vector of {dev, buft_list}).
# Offsets of 0.3.36 on x86-64 / libstdc++, as llama_model::dev_layer(int)
# const reads them; layer_device_cells() checks them against that function.
_MODEL_PIMPL_OFFSET = 0x90B0
_IMPL_DEV_LAYER_OFFSET = 0x100
_LAYER_DEV_BYTES = 16
_DEV_LAYER_SYMBOL = "_ZNK11llama_model9dev_layerEi"  # llama_model::dev_layer(int) const


def _peek(address: int, n: int) -> bytes | None:
    """n bytes at address in this process, None if unmapped (read through
    /proc/self/mem: a wrong guess is an error there, not a crash)."""
    if address <= 0:
        return None
    try:
        with open("/proc/self/mem", "rb", buffering=0) as mem:
            mem.seek(address)
            data = mem.read(n)
    except (OSError, ValueError, OverflowError):
        return None
    return data if len(data) == n else None


def _words(data: bytes) -> list[int]:
    return [int.from_bytes(data[i:i + 8], "little") for i in range(0, len(data), 8)]


def layer_device_cells(model: int, n_layer: int) -> list[int] | None:
    """Addresses of model->pimpl->dev_layer[i].dev for i < n_layer, or None
    where this build keeps them elsewhere. Checked against llama.cpp itself:
    every cell must hold what llama_model::dev_layer(i) returns, and a value
    written into a cell must be what that function then returns."""
    fn = getattr(llama()._lib, _DEV_LAYER_SYMBOL, None)
    if fn is None or not model:
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_int], ctypes.c_void_p
    raw = _peek(model + _MODEL_PIMPL_OFFSET, 8)
    impl = _words(raw)[0] if raw else 0
    raw = _peek(impl + _IMPL_DEV_LAYER_OFFSET, 16)
    if raw is None:
        return None
    begin, end = _words(raw)
    if end - begin != n_layer * _LAYER_DEV_BYTES or _peek(begin, end - begin) is None:
        return None
    cells = [begin + i * _LAYER_DEV_BYTES for i in range(n_layer)]
    for i, cell in enumerate(cells):
        if ctypes.c_void_p.from_address(cell).value != fn(model, i):
            return None
    cell = ctypes.c_void_p.from_address(cells[0])
    saved = cell.value
    cell.value = begin  # any recognisable value; restored at once
    try:
        seen = fn(model, 0)
    finally:
        cell.value = saved
    return cells if seen == begin else None


_GET_SCHED_SYMBOL = "_ZNK13llama_context9get_schedEv"  # llama_context::get_sched() const


@lru_cache(maxsize=None)
def _get_sched():
    fn = getattr(llama()._lib, _GET_SCHED_SYMBOL, None)
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_void_p], ctypes.c_void_p
    return fn


def context_scheduler(ctx: int) -> int | None:
    """The ggml_backend_sched_t of a llama_context (its hook is set there for
    each graph), or None where this build does not export the accessor."""
    fn = _get_sched()
    return fn(ctx) if fn is not None and ctx else None


_GRAPH_RESERVE_SYMBOL = "_Z19llama_graph_reserveP13llama_contextjjj"  # llama_graph_reserve (llama-ext.h)


@lru_cache(maxsize=None)
def _graph_reserve():
    fn = getattr(llama()._lib, _GRAPH_RESERVE_SYMBOL, None)
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32], ctypes.c_void_p
    return fn


def can_drop_graphs() -> bool:
    """Whether this build exports what drop_graphs needs."""
    return _graph_reserve() is not None


def drop_graphs(ctx: int) -> bool:
    """Make a llama_context forget the graphs it would reuse, so that its
    next decode builds one with the placement in force then (CPU layers
    changed between decodes). llama_graph_reserve resets them first, then
    reserves a one-token graph: compute buffers only grow there, and a
    generated token's graph fits the buffers the context was created with.
    False where this build lacks it or the reserve failed."""
    fn = _graph_reserve()
    return fn is not None and bool(ctx) and fn(ctx, 1, 1, 1) is not None


def batch_view(b, start: int, n: int):
    """Tokens start..start+n of a token llama_batch, sharing its arrays."""
    def at(ptr):
        if not ptr:
            return ptr
        return ctypes.cast(ctypes.addressof(ptr.contents) + start * ctypes.sizeof(ptr._type_), type(ptr))

    return llama().llama_batch(n_tokens=n, token=at(b.token), embd=b.embd, pos=at(b.pos),
                               n_seq_id=at(b.n_seq_id), seq_id=at(b.seq_id), logits=at(b.logits))
