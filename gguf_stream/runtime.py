"""Load a model through llama.cpp, stream its non-resident layers, decode.

StreamedModel is the product: plan -> load with streamed layers overridden to
host memory (pinned on CUDA) -> discover the weight tensors through cb_eval ->
re-home streamed layers into the slot ring -> create the real context with the
streaming hook. StockModel is llama.cpp's own `-ngl` split, the baseline every
comparison is made against; both share the decoding code in _Session.
"""
from __future__ import annotations

import ctypes
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from . import llama_abi, native
from .errors import BudgetError, DecodeError, GGUFStreamError, ModelFileError
from .gguf_file import read_model
from .planner import Plan, format_size, make_plan, parse_size, stock_split_plan
from .streamer import LOAD_MODE_NONE, Streamer, cuda_available, load_native, no_cuda_error, validate_graph  # noqa: F401


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

    @property
    def repack(self) -> bool:
        return self.device != "host" if self.cpu_repack is None else self.cpu_repack
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
    # outputs are kept, and the probes that change CPU layers on the fly).
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


@dataclass(frozen=True)
class Stats:
    mode: str
    plan: Plan | None
    counters: native.Counters | None
    vram_used_bytes: int | None  # after load (weights, slots, KV, compute buffers)
    vram_peak_bytes: int | None  # highest seen after any decode
    pinned_host_bytes: int
    load_seconds: float

    def summary(self) -> str:
        parts = [f"mode={self.mode}"]
        if self.vram_peak_bytes is not None:
            parts.append(f"peak VRAM {format_size(self.vram_peak_bytes)}")
        if self.pinned_host_bytes:
            parts.append(f"pinned host {format_size(self.pinned_host_bytes)}")
        c = self.counters
        if c is not None:
            parts.append(
                f"adopted ready {c.adopted_ready}, after wait {c.adopted_waited} ({c.wait_seconds * 1e3:.1f} ms), "
                f"sync fallbacks {c.sync_fallbacks}, uploads {c.uploads} ({format_size(c.bytes_uploaded)})"
            )
        return "; ".join(parts)


@lru_cache(maxsize=None)
def physical_cores() -> int:
    """Physical cores, as llama.cpp's tools count them for their default
    thread count (hyperthreads do not help its kernels)."""
    try:
        cores = set()
        with open("/proc/cpuinfo") as f:
            phys = core = None
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    phys = value.strip()
                elif key == "core id":
                    core = value.strip()
                    cores.add((phys, core))
        if cores:
            return len(cores)
    except OSError:
        pass
    return os.cpu_count() or 1


class _Session:
    """A llama.cpp model and context with greedy decoding helpers."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self._lc = llama_abi.llama()
        from llama_cpp._logger import set_verbose

        set_verbose(config.verbose)
        self._stack = ExitStack()
        self.model = self.ctx = self.vocab = None
        self._cuda = False
        self._vram_base = None
        self._vram_peak = None
        self._vram_loaded = None
        self._keep = []  # ctypes objects that must outlive the C calls using them

    # -- construction helpers (each registers its own cleanup) --
    def _model_params(self, n_gpu_layers: int, overrides=None):
        p = self._lc.llama_model_default_params()
        p.n_gpu_layers = n_gpu_layers
        p.load_mode = LOAD_MODE_NONE
        p.use_extra_bufts = self.config.repack
        if overrides is not None:
            self._keep.append(overrides)
            p.tensor_buft_overrides = ctypes.addressof(overrides)
        return p

    def _load_model(self, path: str, params) -> None:
        model = self._lc.llama_model_load_from_file(path.encode(), params)
        if not model:
            raise ModelFileError(f"llama.cpp could not load {path} (unsupported architecture or damaged file; "
                                 "run with verbose=True for its log)")
        self.model = model
        self._stack.callback(self._free_model)
        self.vocab = self._lc.llama_model_get_vocab(model)

    def _free_model(self):
        if self.model:
            self._lc.llama_model_free(self.model)
            self.model = None

    def _context_params(self, *, n_ctx=None, n_batch=None, n_ubatch=None, cb_eval=None, cb_user=None):
        c = self.config
        p = self._lc.llama_context_default_params()
        p.n_ctx = n_ctx or c.n_ctx
        p.n_batch = n_batch or c.n_batch
        p.n_ubatch = n_ubatch or c.n_ubatch
        threads = c.n_threads or physical_cores()
        p.n_threads = p.n_threads_batch = threads
        p.flash_attn_type = (self._lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if c.flash_attn
                             else self._lc.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        p.no_perf = True
        if cb_eval is not None:
            cb = self._lc.ggml_backend_sched_eval_callback(cb_eval)
            self._keep.append(cb)
            p.cb_eval = cb
            p.cb_eval_user_data = cb_user
        return p

    def _new_context(self, params):
        ctx = self._lc.llama_init_from_model(self.model, params)
        if not ctx:
            raise BudgetError("llama.cpp could not create the context (out of memory for KV cache or compute "
                              "buffers?); lower n_ctx / n_ubatch or raise the budget")
        return ctx

    def _open_context(self, params) -> None:
        self.ctx = self._new_context(params)
        self._stack.callback(self._free_ctx)

    def _free_ctx(self):
        if self.ctx:
            self._lc.llama_free(self.ctx)
            self.ctx = None

    # -- VRAM accounting (device free-memory query) --
    def _vram_free(self) -> int | None:
        return native.device_memory("CUDA0")[0] if self._cuda else None

    def _vram_sample(self) -> None:
        if self._vram_base is None:
            return
        used = self._vram_base - self._vram_free()
        self._vram_peak = max(self._vram_peak or 0, used)

    # -- decoding --
    @property
    def n_vocab(self) -> int:
        return self._lc.llama_vocab_n_tokens(self.vocab)

    @property
    def n_layer(self) -> int:
        return self._lc.llama_model_n_layer(self.model)

    def tokenize(self, text: str | bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        data = text.encode() if isinstance(text, str) else text
        cap = len(data) + 16
        buf = (self._lc.llama_token * cap)()
        n = self._lc.llama_tokenize(self.vocab, data, len(data), buf, cap, add_bos, special)
        if n < 0:
            buf = (self._lc.llama_token * -n)()
            n = self._lc.llama_tokenize(self.vocab, data, len(data), buf, -n, add_bos, special)
        return list(buf[:n])

    def token_bytes(self, token: int) -> bytes:
        """A token's piece of text as bytes (may end inside a UTF-8 character)."""
        buf = ctypes.create_string_buffer(256)
        n = self._lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:max(n, 0)]

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(map(self.token_bytes, tokens)).decode("utf-8", errors="replace")

    def token_bos(self) -> int:
        return self._lc.llama_vocab_bos(self.vocab)

    def is_eog(self, token: int) -> bool:
        return bool(self._lc.llama_vocab_is_eog(self.vocab, token))

    def reset(self) -> None:
        """Clear the KV cache: the next eval starts a new sequence."""
        self._lc.llama_memory_clear(self._lc.llama_get_memory(self.ctx), True)
        self._after_reset()

    def eval(self, tokens: list[int]) -> None:
        """Decode tokens after what is already in the KV cache, n_batch at a time."""
        if self.ctx is None:
            raise DecodeError("this model is closed")
        if not tokens:
            raise ValueError("eval needs at least one token")
        n_vocab = self.n_vocab  # one foreign call, not one per token
        bad = [t for t in tokens if not 0 <= t < n_vocab]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (0..{n_vocab - 1})")
        step = self.config.n_batch
        for i in range(0, len(tokens), step):
            start = i
            for n in self._decode_sizes(min(step, len(tokens) - i)):
                part = tokens[start:start + n]
                start += n
                arr = (self._lc.llama_token * n)(*part)
                self._before_decode(n)
                rc = self._lc.llama_decode(self.ctx, self._lc.llama_batch_get_one(arr, n))
                self._after_decode()
                if rc != 0:
                    raise DecodeError(f"llama_decode returned {rc} (1: KV cache full - raise n_ctx or reset(); "
                                      "2: aborted; <0: error)")
        self._vram_sample()

    def synchronize(self) -> None:
        """Wait for the device: llama_decode may return before the GPU is done."""
        self._lc.llama_synchronize(self.ctx)

    def _decode_sizes(self, n_tokens: int) -> list[int]:
        """Hook for subclasses: how many tokens each llama_decode call takes."""
        return [n_tokens]

    def _before_decode(self, n_tokens: int) -> None:
        """Hook for subclasses: placement for the batch about to be decoded."""

    def _after_decode(self) -> None:
        """Hook for subclasses: check native state after every llama_decode."""

    def _after_reset(self) -> None:
        """Hook for subclasses: the KV cache was cleared."""

    def logits(self) -> np.ndarray:
        """Logits of the last evaluated token (a copy)."""
        ptr = self._lc.llama_get_logits_ith(self.ctx, -1)
        if not ptr:
            raise DecodeError("no logits: evaluate tokens first")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def generate(self, prompt: list[int], n_tokens: int, *, stop_at_eog: bool = False,
                 with_logits: bool = False):
        """Greedy generation after `prompt`. Returns the new tokens, and the
        logits that chose each of them when with_logits is set."""
        self.eval(prompt)
        tokens, all_logits = [], []
        for _ in range(n_tokens):
            lg = self.logits()
            tok = int(np.argmax(lg))
            if with_logits:
                all_logits.append(lg)
            tokens.append(tok)
            if stop_at_eog and self.is_eog(tok):
                break
            self.eval([tok])
        return (tokens, np.stack(all_logits)) if with_logits else tokens

    # -- lifetime --
    def close(self) -> None:
        """Free the context, then the model (it owns the pinned host copy),
        then the slots. Safe to call twice."""
        self._stack.close()
        self._keep.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _guarded_init(self, build) -> None:
        """Run build(); on any failure release what was already created."""
        try:
            build()
        except BaseException:
            self.close()
            raise


class StockModel(_Session):
    """llama.cpp's own `-ngl` split: the last n_gpu_layers layers on the GPU,
    the rest in host memory (pinned when a GPU is present), no streaming."""

    def __init__(self, path: str | os.PathLike, n_gpu_layers: int = 0, config: EngineConfig | None = None, **kw):
        super().__init__(config or EngineConfig(**kw))
        self.path = str(path)
        self.n_gpu_layers = n_gpu_layers
        self._guarded_init(self._build)

    def _build(self):
        read_model(self.path)  # clear errors for missing / damaged files
        t0 = time.perf_counter()
        self._cuda = load_native(self.config.device != "host")
        if self.config.device == "cuda" and not self._cuda:
            raise no_cuda_error()
        self._vram_base = self._vram_free()
        self._load_model(self.path, self._model_params(self.n_gpu_layers))
        self._open_context(self._context_params())
        self._vram_sample()
        self._vram_loaded = self._vram_peak
        self._load_seconds = time.perf_counter() - t0

    @property
    def stats(self) -> Stats:
        return Stats(f"stock ngl={self.n_gpu_layers}", None, None, self._vram_loaded, self._vram_peak, 0,
                     self._load_seconds)


class StreamedModel(_Session):
    """A GGUF model whose non-resident layers stream through GPU (or host) slots."""

    def __init__(self, path: str | os.PathLike, config: EngineConfig | None = None, **kw):
        super().__init__(config or EngineConfig(**kw))
        self.path = str(path)
        self.streamer: Streamer | None = None
        self._guarded_init(self._build)

    def _build(self):
        t0 = time.perf_counter()
        s = self.streamer = Streamer(self.path, self.config)
        try:
            resident = s.engine is not None and self._fits_resident_by_measurement(s)
        except BaseException:
            s.close()
            raise
        if resident:
            s.close()
            s = self.streamer = Streamer(self.path, replace(self.config, vram_budget=None))
        elif s.plan.stock_gpu_layers is not None and s.cuda:
            s.plan = self._stock_split_by_measurement(s)
        self._stack.callback(s.close)  # runs after the model and the context are freed
        self._cuda = s.cuda
        self._vram_base = self._vram_free()
        params = self._model_params(0)
        s.patch_model_params(params)
        self._load_model(self.path, params)
        s.attach(self.model)
        params = self._context_params()
        s.patch_context_params(params)
        with s.creating_context():
            self._open_context(params)
        s.context_opened()
        self._stack.callback(s.context_closing)  # before the context is freed (LIFO)
        self._vram_sample()
        self._vram_loaded = self._vram_peak
        self._load_seconds = time.perf_counter() - t0

    def _fits_resident_by_measurement(self, s: Streamer) -> bool:
        """The planner's estimate is a little conservative. When the whole
        model is estimated within 5% of the budget, load it resident, run one
        full ubatch (compute pools grow at first use) and keep it if the
        measured peak fits: the same test the stock baseline gets."""
        c = self.config
        if not s.cuda or c.vram_budget is None or c.n_streamed is not None or c.streamed_layers is not None:
            return False
        budget = parse_size(c.vram_budget)
        full = make_plan(s.model_file, vram_budget=None, n_streamed=0, n_ctx=c.n_ctx, n_ubatch=c.n_ubatch,
                         flash_attn=c.flash_attn).device_bytes
        if full > budget * 1.05:
            return False
        return self._stock_fits(-1, budget)

    def _stock_fits(self, n_gpu_layers: int, budget: int) -> bool:
        try:
            peak = stock_vram_peak(self.path, n_gpu_layers, self.config)
        except GGUFStreamError:
            return False
        return peak is not None and peak <= budget

    def _stock_split_by_measurement(self, s: Streamer) -> Plan:
        """Below streaming's minimum the planner estimates llama.cpp's split
        conservatively; like the stock baseline's own search, try one more
        GPU layer at a time and keep the most whose measured peak (after one
        full ubatch) fits the budget."""
        c, plan = self.config, s.plan
        budget, ngl = parse_size(c.vram_budget), plan.stock_gpu_layers
        while ngl < plan.n_layer and self._stock_fits(ngl + 1, budget):
            ngl += 1
        return stock_split_plan(s.model_file, ngl, budget, c.n_ctx, c.n_ubatch, c.flash_attn)

    @property
    def plan(self) -> Plan | None:
        return self.streamer.plan if self.streamer else None

    @property
    def engine(self) -> native.Engine | None:
        return self.streamer.engine if self.streamer else None

    def _decode_sizes(self, n_tokens: int) -> list[int]:
        return self.streamer.decode_sizes(n_tokens) if self.streamer is not None else [n_tokens]

    def _before_decode(self, n_tokens: int) -> None:
        if self.streamer is not None:
            self.streamer.before_decode(n_tokens)

    def _after_decode(self) -> None:
        if self.streamer is not None:
            self.streamer.check("llama_decode")

    def _after_reset(self) -> None:
        if self.streamer is not None:
            self.streamer.kv_cleared()

    @property
    def stats(self) -> Stats:
        s = self.streamer
        mode = ("streamed" if s.engine else "resident" if s.plan.stock_gpu_layers is None
                else f"stock split ngl={s.plan.stock_gpu_layers}")
        return Stats(mode, s.plan, s.counters(),
                     self._vram_loaded, self._vram_peak, s.pinned_bytes, self._load_seconds)

    def reset_counters(self) -> None:
        if self.engine is not None:
            self.engine.reset_counters()


def stock_vram_peak(path, n_gpu_layers: int, config: EngineConfig) -> int | None:
    """Measured GPU bytes of llama.cpp's own `-ngl n_gpu_layers` split after
    one full ubatch (compute pools grow at first use); None when nothing was
    measured (no layer on the GPU). Raises GGUFStreamError where llama.cpp
    cannot load it."""
    with StockModel(path, n_gpu_layers, config=replace(config, vram_budget=None)) as m:
        m.eval([max(m.token_bos(), 0)] + [1] * (min(config.n_ubatch, config.n_ctx) - 1))
        m.synchronize()
        return m.stats.vram_peak_bytes


def load(path: str | os.PathLike, **options) -> StreamedModel:
    """``with gguf_stream.load(path, vram_budget="8GiB", n_ctx=4096) as m: ...``"""
    return StreamedModel(path, EngineConfig(**options))
