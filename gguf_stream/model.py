"""Our own model API: load, tokenize, eval, generate greedily, read stats.

StreamedModel is the product (its non-resident layers stream through the
Streamer's slots); StockModel is llama.cpp's own `-ngl` split, the baseline
every comparison is made against. Both hold llama-cpp-python's model and
context wrappers (llama_cpp._internals) and share the decoding helpers in
_Session; only how a batch is decoded differs.
"""
from __future__ import annotations

import ctypes
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace

import numpy as np

from . import llama_abi, native
from .config import (EngineConfig, engine_config, kv_streams, resolve_context, resolve_flash_attn, select_device,
                     with_default_budget)
from .errors import BudgetError, DecodeError, GGUFStreamError, ModelFileError
from .gguf_file import ModelFile, read_model
from .memory import LAZY_KERNEL_BYTES, format_size, kv_ggml_type, parse_size
from .planner import Plan, make_plan, stock_split_plan
from .placement import initial_plan
from .llama_wrappers import StreamedLlamaContext, StreamedLlamaModel
from .streamer import Streamer

llama_abi.llama()  # version check before touching llama-cpp-python's internals
import llama_cpp._internals as internals  # noqa: E402


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
            if c.disk_tier_bytes:
                overlap = "" if c.disk_overlap is None else f", {c.disk_overlap:.0%} hidden"
                staging = format_size(c.staging_bytes) if c.staging_bytes >= 1 << 20 else f"{c.staging_bytes >> 10} KiB"
                via = (f", staged through {staging} by {c.disk_readers} readers" if c.staging_bytes else "") \
                    + (", O_DIRECT" if c.disk_direct else "")
                parts.append(f"disk tier {format_size(c.disk_tier_bytes)}: {c.disk_reads} reads "
                             f"({format_size(c.disk_bytes)} in {c.disk_read_seconds:.2f} s{overlap}{via})")
        return "; ".join(parts)


class _Session:
    """A llama.cpp model and context with greedy decoding helpers."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self._lc = llama_abi.llama()
        from llama_cpp._logger import set_verbose

        set_verbose(config.verbose)
        self._stack = ExitStack()
        self.llama_model = self.llama_ctx = None  # llama_cpp._internals wrappers
        self._cuda = False
        self._vram_base = self._vram_peak = self._vram_loaded = None
        self._load_seconds = 0.0
        self._n_vocab = None  # read once: eval and the logits views ask for it every token

    # -- construction (each step registers its own cleanup) --
    def _model_params(self, n_gpu_layers: int = 0):
        p = self._lc.llama_model_default_params()
        p.n_gpu_layers = n_gpu_layers
        self._keep_params = llama_abi.our_model_params(p, self.config, self._cuda)
        return p

    def _context_params(self):
        c = self.config
        p = self._lc.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch = c.n_ctx, c.n_batch, c.n_ubatch
        p.n_seq_max, p.kv_unified = c.n_seq_max, c.kv_unified
        p.n_threads, p.n_threads_batch = c.threads, c.threads_batch
        p.flash_attn_type = llama_abi.flash_attn_type(c.flash_attn)
        p.type_k, p.type_v = kv_ggml_type(c.type_k), kv_ggml_type(c.type_v)
        p.no_perf = True
        return p

    def _open(self, path: str, make_model, make_context) -> None:
        """Load the model and create its context through the given wrapper
        factories, translating llama-cpp-python's errors into ours."""
        try:
            self.llama_model = make_model(path_model=path, params=self._model_params(), verbose=self.config.verbose)
        except GGUFStreamError:
            raise
        except ValueError as exc:  # llama-cpp-python's "Failed to load model from file"
            raise ModelFileError(f"llama.cpp could not load {path} (unsupported architecture or damaged file; "
                                 "run with verbose=True for its log)") from exc
        self._stack.callback(self.llama_model.close)  # the context too (it registered on the model)
        try:
            self.llama_ctx = make_context(model=self.llama_model, params=self._context_params(),
                                          verbose=self.config.verbose)
        except GGUFStreamError:
            raise
        except ValueError as exc:  # llama-cpp-python's "Failed to create llama_context"
            raise BudgetError("llama.cpp could not create the context (out of memory for KV cache or compute "
                              "buffers?); lower n_ctx / n_ubatch or raise the budget") from exc

    @property
    def model(self):
        """The llama_model pointer (None once closed)."""
        return self.llama_model.model if self.llama_model is not None else None

    @property
    def ctx(self):
        """The llama_context pointer (None once closed)."""
        return self.llama_ctx.ctx if self.llama_ctx is not None else None

    def _live_ctx(self):
        if self.ctx is None:
            raise DecodeError("this model is closed")
        return self.ctx

    def _live_model(self):
        """The llama_model pointer; llama.cpp would dereference a NULL one."""
        if self.model is None:
            raise DecodeError("this model is closed")
        return self.model

    @property
    def vocab(self):
        if self.llama_model is None or self.llama_model.vocab is None:
            raise DecodeError("this model is closed")
        return self.llama_model.vocab

    # -- VRAM accounting (device free-memory query) --
    def _vram_free(self) -> int | None:
        return native.device_memory("CUDA0")[0] if self._cuda else None

    def _vram_sample(self) -> None:
        if self._vram_base is None:
            return
        used = self._vram_base - self._vram_free()
        self._vram_peak = max(self._vram_peak or 0, used)

    def _loaded(self, t0: float) -> None:
        self._vram_sample()
        self._vram_loaded = self._vram_peak
        self._load_seconds = time.perf_counter() - t0

    # -- decoding --
    @property
    def n_vocab(self) -> int:
        vocab = self.vocab  # raises once closed
        if self._n_vocab is None:
            self._n_vocab = self._lc.llama_vocab_n_tokens(vocab)
        return self._n_vocab

    @property
    def n_layer(self) -> int:
        return self._lc.llama_model_n_layer(self._live_model())

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
        self._live_ctx()
        self.llama_ctx.kv_cache_clear()

    def eval(self, tokens: list[int]) -> None:
        """Decode tokens after what is already in the KV cache, n_batch at a time."""
        self._live_ctx()
        if not tokens:
            raise ValueError("eval needs at least one token")
        n_vocab = self.n_vocab  # one foreign call, not one per token
        bad = [t for t in tokens if not 0 <= t < n_vocab]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (0..{n_vocab - 1})")
        step = self.config.n_batch
        for i in range(0, len(tokens), step):
            part = tokens[i:i + step]
            arr = (self._lc.llama_token * len(part))(*part)
            rc = self._decode(self._lc.llama_batch_get_one(arr, len(part)))
            if rc != 0:
                raise DecodeError(f"llama_decode returned {rc} (1: KV cache full - raise n_ctx or reset(); "
                                  "2: aborted; <0: error)")
        self._vram_sample()

    def _decode(self, batch) -> int:
        return self._lc.llama_decode(self.ctx, batch)

    def synchronize(self) -> None:
        """Wait for the device: llama_decode may return before the GPU is done."""
        self._lc.llama_synchronize(self._live_ctx())

    def logits(self) -> np.ndarray:
        """Logits of the last evaluated token (a copy)."""
        return self.logits_view().copy()

    def logits_view(self) -> np.ndarray:
        """Logits of the last evaluated token in llama.cpp's own buffer, not
        copied (n_vocab floats a token: half a MiB for a 128k vocabulary);
        valid until the next eval. Waits for the device, as llama.cpp does."""
        ptr = self._lc.llama_get_logits_ith(self._live_ctx(), -1)
        if not ptr:
            raise DecodeError("no logits: evaluate tokens first")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def greedy_token(self) -> int:
        """The argmax of the last logits (the first on a tie, as llama.cpp's
        greedy sampler), read in place."""
        return int(np.argmax(self.logits_view()))

    def generate(self, prompt: list[int], n_tokens: int, *, stop_at_eog: bool = False,
                 with_logits: bool = False):
        """Greedy generation after `prompt`. Returns the new tokens, and the
        logits that chose each of them when with_logits is set."""
        self.eval(prompt)
        tokens, all_logits = [], []
        for _ in range(n_tokens):
            if with_logits:
                all_logits.append(self.logits())
                tok = int(np.argmax(all_logits[-1]))
            else:
                tok = self.greedy_token()
            tokens.append(tok)
            if stop_at_eog and self.is_eog(tok):
                break
            self.eval([tok])
        return (tokens, np.stack(all_logits)) if with_logits else tokens

    def generate_batch(self, prompts, n_tokens: int, *, sampling=None, stop_at_eog: bool = True, on_done=None,
                       drafter=None):
        """Generate after several prompts (texts or token lists) at once, up
        to config.n_seq_max sequences per decode (batch.generate_batch; a
        drafter's drafts checked in each step, greedy); returns a batch.BatchResult."""
        from .batch import generate_batch

        if isinstance(prompts, (list, tuple)):
            prompts = [self.tokenize(p, add_bos=True, special=True) if isinstance(p, str) else p for p in prompts]
        return generate_batch(self, prompts, n_tokens, sampling=sampling, stop_at_eog=stop_at_eog, on_done=on_done,
                              drafter=drafter)

    # -- lifetime --
    def close(self) -> None:
        """Free the context, then the model (it owns the pinned host copy),
        then the slots. Safe to call twice."""
        self._stack.close()
        self.llama_model = self.llama_ctx = None
        self._n_vocab = None

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
    the rest in host memory (pinned when a GPU is present), no streaming.

    n_cpu_moe=N adds llama.cpp's `--n-cpu-moe N` (for a mixture-of-experts
    model, with n_gpu_layers covering every layer): the expert tensors of
    layers 0..N-1 are overridden to the CPU buffer type and stay in host
    memory, the rest of those layers (attention, router, KV) on the GPU."""

    def __init__(self, path: str | os.PathLike, n_gpu_layers: int = 0, config: EngineConfig | None = None, *,
                 n_cpu_moe: int = 0, **kw):
        super().__init__(config or engine_config(**kw))
        self.path = str(path)
        self.n_gpu_layers = n_gpu_layers
        self.n_cpu_moe = n_cpu_moe
        self._overrides = None  # the override array llama.cpp was given; kept as long as the model
        self._guarded_init(self._build)

    def _build(self):
        mf = read_model(self.path)  # clear errors for missing / damaged files
        check_n_cpu_moe(mf, self.n_cpu_moe)
        self.config = resolve_context(self.config, mf.hparams["n_ctx_train"])
        t0 = time.perf_counter()
        self._cuda = select_device(self.config.device) == "cuda"
        self._vram_base = self._vram_free()
        self._open(self.path, self._load_stock_model, internals.LlamaContext)
        self._loaded(t0)

    def _load_stock_model(self, *, params, **kw):
        params.n_gpu_layers = self.n_gpu_layers
        if self.n_cpu_moe:
            # what --n-cpu-moe passes: the CPU backend's own buffer type, which
            # llama.cpp treats as "the CPU" and resolves through its CPU list
            cpu_buft = native.device_bufts("CPU")[0]
            self._overrides = llama_abi.buft_overrides([(llama_abi.n_cpu_moe_pattern(self.n_cpu_moe), cpu_buft)])
            params.tensor_buft_overrides = ctypes.addressof(self._overrides)
        return internals.LlamaModel(params=params, **kw)

    @property
    def stats(self) -> Stats:
        self._live_ctx()
        mode = f"stock ngl={self.n_gpu_layers}" + (f" n-cpu-moe={self.n_cpu_moe}" if self.n_cpu_moe else "")
        return Stats(mode, None, None, self._vram_loaded, self._vram_peak, 0, self._load_seconds)


def check_n_cpu_moe(model_file: ModelFile, n_cpu_moe: int) -> None:
    """n_cpu_moe must name layers of a model that has experts."""
    if not 0 <= n_cpu_moe <= model_file.n_layer:
        raise ValueError(f"n_cpu_moe must be in 0..{model_file.n_layer} (the model's layers), got {n_cpu_moe}")
    if n_cpu_moe and not model_file.is_moe:
        raise ValueError(f"n_cpu_moe={n_cpu_moe} needs a mixture-of-experts model; this {model_file.arch} model "
                         "has no expert tensors")


class StreamedModel(_Session):
    """A GGUF model whose non-resident layers stream through GPU (or host) slots."""

    def __init__(self, path: str | os.PathLike, config: EngineConfig | None = None, **kw):
        super().__init__(config or engine_config(**kw))
        self.path = str(path)
        self.streamer: Streamer | None = None
        self._guarded_init(self._build)

    def _build(self):
        t0 = time.perf_counter()
        mf = read_model(self.path)
        self.config = resolve_context(self.config, mf.hparams["n_ctx_train"])
        self._cuda = select_device(self.config.device) == "cuda"
        self.config = resolve_flash_attn(self.config, mf.hparams, self._cuda)  # -fa auto planned as it will end
        self.config = with_default_budget(self.config, self._cuda)  # no placement on a GPU: the free VRAM
        plan = initial_plan(mf, self.config, self._cuda)
        if self._cuda:
            plan = measured_plan(self.path, mf, self.config, plan)
        s = self.streamer = Streamer(self.path, self.config, model_file=mf, plan=plan, cuda=self._cuda)
        self._stack.callback(s.close)  # runs last: after the model and the context are freed
        self.config = s.config  # with the generate split resolved for the device
        self._vram_base = self._vram_free()
        self._open(self.path, lambda **kw: StreamedLlamaModel(s, **kw),
                   lambda **kw: StreamedLlamaContext(s, **kw))
        self._loaded(t0)

    def _decode(self, batch) -> int:
        return self.streamer.decode(self.ctx, batch)

    @property
    def plan(self) -> Plan | None:
        return self.streamer.plan if self.streamer else None

    @property
    def engine(self) -> native.Engine | None:
        return self.streamer.engine if self.streamer else None

    @property
    def flash_attn(self) -> bool | None:
        """Whether the context computes with flash attention (flash_attn="auto": llama.cpp's choice; None: unknown)."""
        return self.streamer.flash_attn if self.streamer else None

    @property
    def calibration(self):
        """What the automatic generate split was chosen from (calibrate.Calibration), or None."""
        return self.streamer.calibration if self.streamer else None

    @property
    def stats(self) -> Stats:
        self._live_ctx()  # closed: no engine, nothing to count
        s = self.streamer
        mode = ("streamed" if s.engine else "resident" if s.plan.stock_gpu_layers is None
                else f"stock split ngl={s.plan.stock_gpu_layers}")
        return Stats(mode, s.plan, s.counters(), self._vram_loaded, self._vram_peak, s.pinned_bytes,
                     self._load_seconds)

    def reset_counters(self) -> None:
        self._live_ctx()
        if self.engine is not None:
            self.engine.reset_counters()


# ------------------------------------------------------------ measured placement

def measured_plan(path: str, model_file: ModelFile, config: EngineConfig, plan: Plan) -> Plan:
    """On a GPU the planner's estimate is a little conservative; where it is
    close, loads decide, measured the way the stock baseline is (the peak
    after one full ubatch, since compute pools grow at first use):
    * the whole model estimated within 5% of the budget: resident if it fits;
    * below streaming's estimated minimum, within MEASURED_MINIMUM_MARGIN
      (Plan.stream_minimum): that minimum (every layer streamed through one
      slot) if its peak fits;
    * otherwise llama.cpp's split with one more GPU layer at a time, the
      most whose peak fits."""
    c = config
    if plan.streamed and c.vram_budget is not None and c.n_streamed is None and c.streamed_layers is None:
        budget = parse_size(c.vram_budget)
        full = make_plan(model_file, vram_budget=None, n_streamed=0, n_ctx=c.n_ctx, n_ubatch=c.n_ubatch,
                         flash_attn=c.planned_flash_attn, type_k=c.type_k, type_v=c.type_v,
                         n_seq=kv_streams(c)).device_bytes
        if full <= budget * 1.05 and _stock_fits(path, -1, budget, c):
            return initial_plan(model_file, replace(c, vram_budget=None), cuda=True)
    if plan.stock_gpu_layers is not None:
        budget, ngl = parse_size(c.vram_budget), plan.stock_gpu_layers
        minimum = minimum_streaming_config(c, model_file.n_layer)
        # whole layers: a user's whole_layers=False keeps the experts plan's stock fallback
        if plan.stream_minimum and c.whole_layers is not False and \
                _peak_fits(lambda: streamed_vram_peak(path, minimum), budget):
            return replace(initial_plan(model_file, minimum, cuda=True), budget=budget)
        while ngl < plan.n_layer and _stock_fits(path, ngl + 1, budget, c):
            ngl += 1
        return stock_split_plan(model_file, ngl, budget, c.n_ctx, c.n_ubatch, c.planned_flash_attn, c.type_k,
                                c.type_v, kv_streams(c), LAZY_KERNEL_BYTES)
    return plan


def _stock_fits(path: str, n_gpu_layers: int, budget: int, config: EngineConfig) -> bool:
    return _peak_fits(lambda: stock_vram_peak(path, n_gpu_layers, config), budget)


def _peak_fits(measure, budget: int) -> bool:
    try:
        peak = measure()
    except GGUFStreamError:
        return False
    return peak is not None and peak <= budget


def minimum_streaming_config(config: EngineConfig, n_layer: int) -> EngineConfig:
    """The placement with the least VRAM streaming has: every layer (whole,
    for a mixture-of-experts model too) streamed through one slot."""
    return replace(config, vram_budget=None, n_streamed=None, streamed_layers=tuple(range(n_layer)), n_slots=1,
                   whole_layers=True)


def streamed_vram_peak(path, config: EngineConfig) -> int | None:
    """Measured GPU bytes of a streamed load of `config` (a placement) after
    one full ubatch, as stock_vram_peak measures stock's. Nothing is
    calibrated: a whole-layer plan's generate split (CPU layers; no expert
    split, no device region) adds host memory only, and the layers kept
    resident while generating use the prompt's compute buffer."""
    probe = replace(config, generate_cpu_layers="none", moe_split="off", generate_resident="none", progress=False)
    with StreamedModel(path, probe) as m:
        return _first_ubatch_peak(m, config)


def stock_vram_peak(path, n_gpu_layers: int, config: EngineConfig, n_cpu_moe: int = 0) -> int | None:
    """Measured GPU bytes of llama.cpp's own `-ngl n_gpu_layers` split (with
    `--n-cpu-moe n_cpu_moe` when set) after one full ubatch (compute pools
    grow at first use); None when nothing was measured (no layer on the
    GPU). Raises GGUFStreamError where llama.cpp cannot load it."""
    with StockModel(path, n_gpu_layers, config=replace(config, vram_budget=None), n_cpu_moe=n_cpu_moe) as m:
        return _first_ubatch_peak(m, config)


def _first_ubatch_peak(m, config: EngineConfig) -> int | None:
    """The loaded model's VRAM peak after one full ubatch (compute pools grow at first use)."""
    m.eval([max(m.token_bos(), 0)] + [1] * (min(config.n_ubatch, config.n_ctx) - 1))
    m.synchronize()
    return m.stats.vram_peak_bytes


def load(path: str | os.PathLike, **options) -> StreamedModel:
    """``with gguf_stream.load(path, vram_budget="8GiB", n_ctx=4096) as m: ...``

    options: EngineConfig's fields. Without a placement (vram_budget,
    n_streamed, streamed_layers) a GPU run plans for the free VRAM, a host
    run keeps every layer resident."""
    return StreamedModel(path, engine_config(**options))
