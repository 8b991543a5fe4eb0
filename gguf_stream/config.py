"""What a run is configured with, decided once: the options (EngineConfig),
the device (CUDA or host-slot mode), the thread count and the cache directory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path

from .errors import EnvironmentMismatchError
from .validate import LLAMA_MAX_EXPERTS

ENV_CACHE = "GGUF_STREAM_CACHE"
# llama.cpp's positions are int32 (llama_pos), its context sizes uint32: a
# larger number would wrap on the way through ctypes
MAX_CONTEXT = 2**31 - 1
# Past the training context llama.cpp only warns (RoPE scaling can stretch a
# model a few times); this far past it is a typo
LONG_CONTEXT_FACTOR = 8
MAX_THREADS = 512  # GGML_MAX_N_THREADS
MAX_SLOTS = 512  # one per layer at most (LLAMA_MAX_LAYERS)
MAX_COPY_DELAY_US = 10_000_000
# Without a placement on a GPU: plan for the free VRAM minus this much (other
# processes, CUDA context growth, fragmentation).
GPU_HEADROOM = 1 << 30
MAX_SEQUENCES = 256  # LLAMA_MAX_SEQ
# CPU layers take AMX's layout from this many rows per generate decode: on the
# GPU box's Xeon (AMX; 8B shape, 32 CPU layers, 16 threads, host mode) AMX's
# kernels took 7-18% longer than CPU_REPACK's for one row, 12-23% less for 8
# rows and 23-28% less for 16 (two boxes; BENCHMARKS.md, tenth session).
AMX_MIN_ROWS = 8
# Contexts whose generate split is chosen for this many rows or more may
# stream through DEEP_RING_SLOTS slots (EngineConfig.slots_max).
DEEP_RING_MIN_ROWS = 8
DEEP_RING_SLOTS = 3


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Options of a run. Either vram_budget (the planner decides) or the
    streamed layers (n_streamed / streamed_layers) must be given to stream."""

    vram_budget: int | str | None = None
    n_ctx: int = 4096
    n_batch: int = 512
    n_ubatch: int = 512
    # Sequences the context holds (llama.cpp's -np / n_parallel, the
    # context's n_seq_max): n_ctx is all of them together, n_ctx / n_seq_max
    # KV cells each (llama.cpp's default, non-unified KV cache)
    n_seq_max: int = 1
    # One KV cache the sequences share (llama.cpp's -kvu): n_ctx cells in all,
    # any sequence may take any of them (a short sequence leaves room to a
    # long one; padding is per cache, not per sequence)
    kv_unified: bool = False
    # llama.cpp's -fa: True (on), False (off) or "auto" (llama.cpp decides
    # when it creates the context: on where the device runs the op for every
    # layer).
    flash_attn: bool | str = True
    # What "auto" will become, asked of the device before planning
    # (resolve_flash_attn): the estimates plan "auto" as that; None (not
    # asked, or no device here to ask) plans it as off (the larger compute
    # buffer), unless a quantized V cache makes llama.cpp turn it on. Derived:
    # not an option of the front ends.
    flash_attn_auto: bool | None = field(default=None, metadata={"derived": True})
    device: str = "auto"  # "auto", "cuda" or "host" (slots in host memory, CPU compute)
    n_streamed: int | None = None
    streamed_layers: tuple[int, ...] | None = None
    n_slots: int | None = None
    # the most slots the planner may choose; None: DEEP_RING_SLOTS where the
    # generate split is chosen for DEEP_RING_MIN_ROWS rows or more, else 2
    max_slots: int | None = None
    prefetch: bool = True
    host_copy_delay_us: int = 0  # host mode: simulate a slow link
    n_threads: int | None = None
    # decodes of several tokens (prompts, batches, verifies): llama.cpp's
    # n_threads_batch, -tb; None: n_threads
    n_threads_batch: int | None = None
    # CPU weight repacking (llama.cpp's default): None = on, except in host
    # mode, where stock and streamed must use the same plain kernels.
    cpu_repack: bool | None = None
    # While generating, streamed layers the CPU computes from host memory
    # instead of uploading them: None (the default: "auto" on CUDA, "none" in
    # host mode, where there is no split to measure), "auto" (a split measured
    # on this machine: faster generation, with CPU rounding like stock -ngl's
    # CPU layers, which is not bit-identical to all-in-VRAM either), "none"
    # (every layer computed on the GPU: results bit-identical to all-in-VRAM),
    # or layer numbers. exact=True is "none".
    generate_cpu_layers: str | tuple[int, ...] | None = None
    # Mixture-of-experts plans, with CPU expert layers ('auto'): while
    # generating, those layers upload N of each token's routed experts and the
    # CPU computes the others at the same time (the link and the CPU's memory
    # bus on one layer at once), instead of the CPU computing them all. "auto":
    # N timed by the engine on the first generated tokens; "off"; or N. None
    # (the default): "auto" on CUDA for the architectures measured on a GPU
    # (placement.MOE_SPLIT_DEFAULT_ARCHS), "off" elsewhere and in host mode. Sums the
    # experts in another order than stock: not bit-identical.
    moe_split: int | str | None = None
    # Mixture-of-experts plans whose CPU expert layers split (moe_split):
    # in prompts those layers' last N experts are computed by the CPU at the
    # routing boundary instead of crossing PCIe (their part of each slot
    # copy is zeros): PCIe moves (n_expert - N) / n_expert of their expert
    # bytes, plus the rows' activations to the host and their sum back (4 MiB
    # each way for 512 rows of 2048). 0 (the default): every expert streams.
    prompt_cpu_experts: int = 0
    exact: bool = False
    # The most rows (tokens of one ubatch: parallel sequences, a speculative
    # verify) the CPU layers compute on the CPU; larger ubatches take the
    # prompt placement (every streamed layer through the slots, all rows on
    # the GPU). None: up to llama.cpp's offload threshold (31).
    cpu_layers_max_batch: int | None = None
    # Rows of the generate decodes the measured split ("auto") is chosen for:
    # CPU layers' work grows with the rows, a streamed layer's upload does
    # not, so k parallel sequences or a speculative verify of k-1 drafts want
    # fewer CPU layers than one token. None: n_seq_max (1 for one sequence).
    generate_rows: int | None = None
    # Where a first load times the candidate splits of 'auto' (the rates
    # are measured at load either way): True, on the first generated tokens
    # (one-row decodes: the load waits for the rates only, and no token is
    # spent on timing alone); False, before the load returns, with decodes of
    # its own (the bench: its timed runs must not contain the search).
    calibrate_on_tokens: bool = True
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
    # A mixture-of-experts model's placement moves its expert tensors only
    # (attention, norms, router and KV of every layer on the GPU): None (the
    # experts where that fits the budget), or True: whole layers, as dense.
    whole_layers: bool | None = None
    # KV cache types (llama.cpp's -ctk / -ctv): f32, f16, bf16, q8_0, q4_0,
    # q4_1, iq4_nl, q5_0, q5_1; a quantized V cache needs flash attention
    type_k: str = "f16"
    type_v: str = "f16"
    # Refuse, before loading, a plan whose host memory (streamed parts, CPU
    # layers' copies) exceeds MemAvailable; also off with
    # GGUF_STREAM_HOST_MEMORY_CHECK=0
    host_memory_check: bool = True
    # Host memory the weights may hold (e.g. "16GiB"); streamed parts beyond
    # it go to the disk tier, read from the GGUF file at every use. None:
    # what the machine can spare (MemAvailable less max(1 GiB, 10%), measured
    # at load; not with the check above off); "none": no budget, no disk
    # tier (every streamed part in host memory, the check above enforcing
    # MemAvailable).
    host_budget: int | str | None = None
    # The disk tier reads with O_DIRECT (bypassing the page cache) where the
    # filesystem allows it, buffered reads where it refuses.
    disk_direct: bool = False
    # llama.cpp's --mlock: lock the model's host buffers in RAM (streamed
    # layers' pinned copies are locked anyway; this adds the rest). The model
    # always loads without mmap (--no-mmap): streamed layers must sit in
    # pinned memory, and with mmap llama.cpp drops that placement.
    use_mlock: bool = False
    verbose: bool = False
    # Progress of the long steps (loading, calibration) on stderr: a bar on a
    # terminal, plain lines otherwise (progress.py); off: silent
    progress: bool = False

    def __post_init__(self):
        if self.device not in ("auto", "cuda", "host"):
            raise ValueError(f"device must be 'auto', 'cuda' or 'host', not {self.device!r}")
        if self.vram_budget is not None:
            from .memory import parse_size

            parse_size(self.vram_budget)  # names what is wrong with it
        if self.host_budget is not None and self.host_budget != "none":
            from .memory import parse_size

            try:
                parse_size(self.host_budget)
            except ValueError as exc:
                raise ValueError(f"host_budget: {exc} (or 'none': no budget, no disk tier)") from None
        check_int("n_ctx", self.n_ctx, 0, MAX_CONTEXT, "0: the model's training context")
        check_int("n_batch", self.n_batch, 1, MAX_CONTEXT)
        check_int("n_ubatch", self.n_ubatch, 1, MAX_CONTEXT)
        # a ubatch no larger than the batch, as llama.cpp clamps it (every front end alike)
        object.__setattr__(self, "n_ubatch", min(self.n_ubatch, self.n_batch))
        check_int("n_seq_max", self.n_seq_max, 1, MAX_SEQUENCES)
        if 0 < self.n_ctx < self.n_seq_max:
            raise ValueError(f"n_ctx {self.n_ctx} is shared by n_seq_max {self.n_seq_max} sequences: give at least "
                             "one KV cell per sequence (n_ctx = sequences x cells per sequence)")
        for name in ("n_threads", "n_threads_batch"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1, max_threads())
        if self.n_streamed is not None:
            check_int("n_streamed", self.n_streamed, 0, MAX_SLOTS)
        if self.n_slots is not None:
            check_int("n_slots", self.n_slots, 1, MAX_SLOTS)
        if self.max_slots is not None:
            check_int("max_slots", self.max_slots, 1, MAX_SLOTS)
        check_int("host_copy_delay_us", self.host_copy_delay_us, 0, MAX_COPY_DELAY_US)
        if not (isinstance(self.flash_attn, bool) or self.flash_attn == "auto"):
            raise ValueError(f"flash_attn must be True, False or 'auto', not {self.flash_attn!r:.40}")
        if self.cpu_layers_max_batch is not None:
            check_int("cpu_layers_max_batch", self.cpu_layers_max_batch, 1, MAX_CONTEXT)
        if self.generate_rows is not None:
            check_int("generate_rows", self.generate_rows, 1, MAX_SEQUENCES)
        if self.moe_split not in (None, "auto", "off"):
            if isinstance(self.moe_split, str):
                raise ValueError(f"moe_split must be 'auto', 'off' or a number of experts, not {self.moe_split!r:.40}")
            check_int("moe_split", self.moe_split, 0, MAX_MOE_SPLIT)
        check_int("prompt_cpu_experts", self.prompt_cpu_experts, 0, LLAMA_MAX_EXPERTS)
        check_kv_types(self.type_k, self.type_v, self.flash_attn)
        for name in ("kv_unified", "prefetch", "cpu_layer_host_kv", "cpu_layer_device", "graph_reuse", "calibrate_on_tokens",
                     "host_memory_check", "use_mlock", "verbose", "exact", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, not {getattr(self, name)!r}")
        for name in ("cpu_repack", "whole_layers"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be None, True or False, not {getattr(self, name)!r}")
        if self.streamed_layers is not None:
            object.__setattr__(self, "streamed_layers", layer_numbers("streamed_layers", self.streamed_layers))
        if self.exact and self.generate_cpu_layers not in (None, "none"):
            raise ValueError(f"exact computes every layer on the GPU while generating; it cannot be combined with "
                             f"CPU layers (generate_cpu_layers={self.generate_cpu_layers!r})")
        for name in ("generate_cpu_layers", "generate_resident"):
            value = getattr(self, name)
            if value is None and name == "generate_cpu_layers":
                continue
            if isinstance(value, str):
                if value not in ("auto", "none"):
                    raise ValueError(f"{name} must be 'auto', 'none' or layer numbers, not {value!r}")
            else:
                object.__setattr__(self, name, layer_numbers(name, value))

    def generate_split(self, cuda: bool) -> str | tuple[int, ...]:
        """generate_cpu_layers as a run on this device uses it: the default
        (None) is the measured split ("auto") on CUDA and the exact placement
        ("none") in host mode; exact=True is "none"."""
        if self.exact:
            return "none"
        if self.generate_cpu_layers is None:
            return "auto" if cuda else "none"
        return self.generate_cpu_layers

    @property
    def split_rows(self) -> int:
        """Rows per generate decode the measured split is chosen for."""
        return self.generate_rows or self.n_seq_max

    @property
    def repack(self) -> bool:
        return self.device != "host" if self.cpu_repack is None else self.cpu_repack

    @property
    def amx_layout(self) -> bool:
        """Whether CPU layers' 2-D weights take llama.cpp's AMX layout (where
        the CPU has AMX; CPU_REPACK's otherwise), as llama.cpp's loader gives
        them first: only for generate decodes of AMX_MIN_ROWS rows or more."""
        return self.repack and self.split_rows >= AMX_MIN_ROWS

    def slots_max(self, moe: bool = False, cuda: bool = True) -> int:
        """The most slots the planner may choose (max_slots). Decodes of many
        rows make CPU layers slower than an upload: with two slots the link
        then idles through each of them (8-row decodes of the 8B shape on
        the H200 box: 49.8 ms with two slots, 40.4 with three, BENCHMARKS
        fourteenth session). So the default is three where a generate split
        may put layers on the CPU; measured for dense models only: a mixture
        of experts keeps two, as does a run without CPU layers (host mode,
        exact). Below DEEP_RING_MIN_ROWS it stays two: for one row a third
        slot, with the streamed layer it costs, tied (26.80 against 27.00 ms
        at 0.5x, 36.63 against 36.21 at 0.25x), and a fourth for 8 rows lost
        the layer it costs (52.01 against 49.82 ms; fifteenth session)."""
        if self.max_slots is not None:
            return self.max_slots
        deep = self.split_rows >= DEEP_RING_MIN_ROWS and not moe and self.generate_split(cuda) != "none"
        return DEEP_RING_SLOTS if deep else 2

    @property
    def threads(self) -> int:
        return thread_counts(self.n_threads, self.n_threads_batch)[0]

    @property
    def threads_batch(self) -> int:
        """Threads of a decode of several tokens, as llama.cpp's -tb."""
        return thread_counts(self.n_threads, self.n_threads_batch)[1]

    @property
    def planned_flash_attn(self) -> bool:
        """Whether the memory estimates assume flash attention: "auto" as
        resolve_flash_attn found it, else off (its compute buffer is the
        larger), unless a quantized V cache makes llama.cpp turn it on."""
        from .memory import is_quantized_kv

        return self.flash_attn is True or (self.flash_attn == "auto"
                                           and (self.flash_attn_auto is True or is_quantized_kv(self.type_v)))

    @property
    def places_layers(self) -> bool:
        """A budget or streamed layers were given (else everything stays resident)."""
        return not (self.vram_budget is None and self.n_streamed is None and self.streamed_layers is None)


# ------------------------------------------------------------------ the options' one source

ENGINE_OPTIONS = tuple(f.name for f in fields(EngineConfig) if not f.metadata.get("derived"))
# EngineConfig fields llama_cpp.Llama takes too, under the same name: a front
# end built on Llama (StreamedLlama, the server) passes them to both.
SHARED_WITH_LLAMA = ("n_ctx", "n_batch", "n_ubatch", "flash_attn", "n_threads", "n_threads_batch", "type_k",
                     "type_v", "use_mlock", "verbose")


def split_options(options: dict) -> tuple[dict, dict]:
    """(engine options, the others) of a front end's keyword arguments: every
    EngineConfig field goes to the engine; the rest (llama_cpp.Llama's or the
    server's) to the other, whose receiver names what it does not know.
    Fields shared with Llama are in the engine's part only: the front end
    passes them on to Llama in Llama's terms."""
    engine = {k: v for k, v in options.items() if k in ENGINE_OPTIONS}
    return engine, {k: v for k, v in options.items() if k not in engine}


def engine_config(**options) -> EngineConfig:
    """EngineConfig(**options), with an unknown option named among the known ones."""
    unknown = sorted(set(options) - set(ENGINE_OPTIONS))
    if unknown:
        hint = ("; n_gpu_layers and llama_cpp.Llama's other options go to gguf_stream.StreamedLlama (the placement "
                "here is vram_budget or n_streamed)" if any(k in ("n_gpu_layers", "use_mmap") for k in unknown) else "")
        raise TypeError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; the engine's options "
                        f"are {', '.join(ENGINE_OPTIONS)}{hint}")
    return EngineConfig(**options)


def free_vram_budget() -> tuple[int, int]:
    """(budget, free VRAM) of a GPU run given no placement: the free VRAM
    of CUDA0 minus GPU_HEADROOM, as every front end plans it."""
    from . import native

    free = native.device_memory("CUDA0")[0]
    return max(free - GPU_HEADROOM, 0), free


def with_default_budget(config: EngineConfig, cuda: bool) -> EngineConfig:
    """The config a run plans with: on a GPU without a placement, a budget of
    the free VRAM (free_vram_budget), so that a model larger than it streams
    instead of failing to load; in host mode, or with a placement, as given
    (without one every layer stays resident)."""
    if config.places_layers or not cuda:
        return config
    return replace(config, vram_budget=free_vram_budget()[0])


def kv_streams(config: EngineConfig) -> int:
    """KV cache streams llama.cpp allocates: one per sequence, or one shared (kv_unified)."""
    return 1 if config.kv_unified else config.n_seq_max


def check_kv_types(type_k, type_v, flash_attn) -> None:
    """Known KV cache types; a quantized V cache not with flash attention off
    (llama.cpp cannot create the context; "auto" turns it on)."""
    from .memory import check_kv_type, is_quantized_kv

    check_kv_type("type_k", type_k)
    check_kv_type("type_v", type_v)
    if is_quantized_kv(type_v) and flash_attn is False:
        raise ValueError(f"a quantized V cache (type_v {type_v!r}) needs flash attention in llama.cpp: "
                         "set flash_attn=True, or use type_v='f16'")


def check_int(name: str, value, lo: int, hi: int, note: str = "") -> None:
    """value must be an int (not a bool, float or string) in lo..hi."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise ValueError(f"{name} must be at least {lo} and at most {hi} (an integer{f'; {note}' if note else ''}), "
                         f"got {shown}")


def layer_numbers(name: str, value) -> tuple[int, ...]:
    """A tuple of layer numbers from a tuple or list of ints ("1,2", floats and bools are refused)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list, range)):
        raise ValueError(f"{name} must be a tuple of layer numbers like (1, 2), not {value!r:.60}")
    for v in value:
        check_int(f"each of {name}", v, 0, MAX_SLOTS - 1)
    return tuple(value)


MAX_MOE_SPLIT = 64  # the engine's GS_SPLIT_MAX_UPLOAD


def max_threads() -> int:
    """A generous multiple of the CPUs, within ggml's limit."""
    return min(MAX_THREADS, 8 * (os.cpu_count() or 1))


def context_sizes(n_ctx: int, n_batch: int, n_ubatch: int, n_ctx_train: int) -> tuple[int, int, int]:
    """(n_ctx, n_batch, n_ubatch) as llama.cpp will use them: n_ctx 0 is the
    model's training context, a batch no larger than the context, a ubatch
    no larger than the batch. A context far past the training one is refused."""
    n_ctx = n_ctx or n_ctx_train
    if n_ctx <= 0:
        raise ValueError("n_ctx is 0 (the model's training context) but the model does not give one; "
                         "give n_ctx")
    if n_ctx_train and n_ctx > LONG_CONTEXT_FACTOR * n_ctx_train:
        raise ValueError(f"n_ctx {n_ctx} is over {LONG_CONTEXT_FACTOR} times the model's training context "
                         f"({n_ctx_train}); give at most {LONG_CONTEXT_FACTOR * n_ctx_train} (0: {n_ctx_train})")
    n_batch = min(n_batch, n_ctx)
    return n_ctx, n_batch, min(n_ubatch, n_batch)


def resolve_flash_attn(config: EngineConfig, hparams: dict, cuda: bool) -> EngineConfig:
    """The config with flash_attn_auto set where flash_attn is "auto": whether
    the device (CUDA0 or the CPU) computes flash attention for the model's
    attention shape and KV cache types, asked the way llama.cpp asks it when
    it creates the context, so that the plan sizes the compute buffer llama.cpp
    will allocate. Unchanged for on/off, or with no native helper here."""
    if config.flash_attn != "auto" or config.flash_attn_auto is not None:
        return config
    from . import native
    from .errors import GGUFStreamError
    from .memory import kv_ggml_type

    try:
        load_native(cuda)
        on = native.supports_flash_attn("CUDA0" if cuda else "CPU", hparams["key_length"], hparams["value_length"],
                                        hparams["n_head"], hparams["n_head_kv"], kv_ggml_type(config.type_k),
                                        kv_ggml_type(config.type_v))
    except (GGUFStreamError, OSError, KeyError, TypeError):  # nothing to ask here: planned as off
        return config
    return replace(config, flash_attn_auto=on)


def resolve_context(config: EngineConfig, n_ctx_train: int) -> EngineConfig:
    """The config with its context sizes as llama.cpp will use them (context_sizes)."""
    n_ctx, n_batch, n_ubatch = context_sizes(config.n_ctx, config.n_batch, config.n_ubatch, n_ctx_train)
    return replace(config, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch)


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

def thread_counts(n_threads: int | None, n_threads_batch: int | None) -> tuple[int, int]:
    """(-t, -tb) as llama.cpp's tools default them: the physical cores, and -tb -t's."""
    n = n_threads or physical_cores()
    return n, n_threads_batch or n


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


MEMINFO = "/proc/meminfo"


def available_host_memory(meminfo: str | None = None) -> int | None:
    """Bytes of host memory available without swapping (MemAvailable of
    MEMINFO, /proc/meminfo, or of the file `meminfo`); None where it does not say."""
    try:
        with open(meminfo or MEMINFO) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == "MemAvailable":
                    return int(value.split()[0]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def cache_dir() -> Path:
    """Where gguf-stream keeps generated models and measured rates:
    $GGUF_STREAM_CACHE, else $XDG_CACHE_HOME/gguf-stream, else ~/.cache/gguf-stream."""
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg and Path(xdg).expanduser().is_absolute() else Path.home() / ".cache"
    return base / "gguf-stream"
