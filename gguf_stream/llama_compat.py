"""StreamedLlama: a llama_cpp.Llama whose model and context go through the engine.

Everything Llama offers (completion, chat completion with the GGUF's chat
template, streaming, tokenization, reset, save_state/load_state, embeddings,
close) works unchanged, because only two objects differ: the model (loaded
with streamed layers in pinned host memory, then re-homed into the slot ring)
and the context (created with the streaming hook, decoding through the
Streamer): llama_wrappers.StreamedLlamaModel and StreamedLlamaContext, the same
objects StreamedModel holds.

Llama.__init__ builds those two objects through the module-level name
``llama_cpp.llama.internals``; StreamedLlama swaps in a namespace that builds
ours for the duration of its own constructor only, under a lock. This relies on
llama-cpp-python 0.3.36's exact constructor, which gguf-stream pins anyway.
"""
from __future__ import annotations

import os
import threading
import warnings
from contextlib import contextmanager

from . import llama_abi
from .config import MAX_CONTEXT, SHARED_WITH_LLAMA, EngineConfig, check_int, resolve_context, split_options
from .errors import DecodeError
from .gguf_file import read_model
from .grammar import grammar_error
from .memory import kv_ggml_type, kv_type_name
from .llama_wrappers import StreamedLlamaContext, StreamedLlamaModel
from .streamer import Streamer

llama_abi.llama()  # version check before touching Llama's internals
import llama_cpp  # noqa: E402
import numpy as np  # noqa: E402  (after llama_cpp, as gguf_stream/__init__.py says)
import llama_cpp._internals as internals  # noqa: E402
import llama_cpp.llama as llama_module  # noqa: E402
from llama_cpp.llama_tokenizer import LlamaTokenizer  # noqa: E402

_swap_lock = threading.RLock()


@contextmanager
def swapped(module, name: str, value):
    """Replace module.name for the duration of the block (under one lock)."""
    with _swap_lock:
        saved = getattr(module, name)
        setattr(module, name, value)
        try:
            yield
        finally:
            setattr(module, name, saved)


class _Internals:
    """llama_cpp._internals, except that models and contexts stream."""

    def __init__(self, streamer: Streamer):
        self._streamer = streamer

    def __getattr__(self, name):
        return getattr(internals, name)

    def LlamaModel(self, **kw):  # noqa: N802 (mirrors the class name)
        return StreamedLlamaModel(self._streamer, **kw)

    def LlamaContext(self, **kw):  # noqa: N802
        c, params = self._streamer.config, kw["params"]
        if c.n_seq_max > 1:  # -np: Llama has no such option (its embedding mode sets its own, unified)
            params.n_seq_max = max(params.n_seq_max, c.n_seq_max)
            params.kv_unified = params.kv_unified or c.kv_unified
        return StreamedLlamaContext(self._streamer, **kw)


class _Closed:
    """Stands in for a closed Llama's model, context and batch: any use is an error."""

    def __getattr__(self, name):
        raise DecodeError("this model is closed")


_CLOSED = _Closed()


# llama_cpp.Llama options the engine decides itself, with the value that
# changes nothing (Llama's default; for use_mmap what the engine does): given
# another, each warns once (per call site) with what happens instead
IGNORED_LLAMA_OPTIONS = {
    "n_gpu_layers": (0, "gguf-stream places the layers itself: every layer computes on the GPU and those that do "
                        "not fit stream through it (none run on the CPU); give vram_budget='8GiB' (--vram-budget) to "
                        "set the GPU memory it may use (without one it plans for the free VRAM), or n_streamed=K"),
    "split_mode": (llama_cpp.LLAMA_SPLIT_MODE_LAYER, "gguf-stream runs on one GPU (CUDA0)"),
    "main_gpu": (0, "gguf-stream runs on one GPU (CUDA0; choose it with CUDA_VISIBLE_DEVICES)"),
    "tensor_split": (None, "gguf-stream runs on one GPU (CUDA0; choose it with CUDA_VISIBLE_DEVICES)"),
    "use_mmap": (False, "gguf-stream loads without mmap (as use_mmap=False): streamed layers must sit in pinned host "
                       "memory, which llama.cpp does not give a memory-mapped file"),
}
# Llama's defaults for the EngineConfig fields it takes too (SHARED_WITH_LLAMA):
# StreamedLlama keeps them, being a Llama, but for the threads (None: the
# engine's, which its CPU layers are measured with)
LLAMA_DEFAULTS = dict(n_ctx=512, n_batch=512, n_ubatch=512, flash_attn=False, n_threads=None, n_threads_batch=None,
                      type_k="f16", type_v="f16", use_mlock=False, verbose=True)


class IgnoredOptionWarning(UserWarning):
    """A llama_cpp.Llama option that gguf-stream decides itself was given."""


def warn_ignored(llama_kwargs: dict, stacklevel: int = 3) -> None:
    """One warning per llama.cpp option in llama_kwargs the engine decides
    (IGNORED_LLAMA_OPTIONS), naming it and what the engine does instead."""
    for name, (default, instead) in IGNORED_LLAMA_OPTIONS.items():
        if name in llama_kwargs and llama_kwargs[name] != default:
            warnings.warn(f"gguf-stream: {name}={llama_kwargs[name]!r:.40} is ignored: {instead}",
                          IgnoredOptionWarning, stacklevel=stacklevel)


def engine_and_llama_options(options: dict) -> tuple[EngineConfig, dict]:
    """(EngineConfig, llama_cpp.Llama's kwargs) from StreamedLlama's keyword
    arguments: engine options by EngineConfig's names (config.split_options),
    the ones Llama takes too at Llama's defaults and passed on to it in its
    terms (KV cache types as ggml ids, flash attention on or off: the engine
    sets "auto" on the context itself)."""
    engine, llama_kwargs = split_options(options)
    shared = {**LLAMA_DEFAULTS, **{k: engine.pop(k) for k in SHARED_WITH_LLAMA if k in engine}}
    for key in ("type_k", "type_v"):  # ggml ids (Llama's way) or llama.cpp's names, None: f16
        value = shared[key]
        shared[key] = "f16" if value is None else kv_type_name(kv_ggml_type(value) if isinstance(value, str) else value)
    check_int("n_batch", shared["n_batch"], 1, MAX_CONTEXT)
    check_int("n_ubatch", shared["n_ubatch"], 1, MAX_CONTEXT)
    # splitting a prompt's short tail off (see EngineConfig.graph_reuse) would
    # lose the outputs of every token before it (Llama keeps every token's
    # logits with a draft_model too)
    keeps_outputs = (llama_kwargs.get("logits_all") or llama_kwargs.get("embedding")
                     or llama_kwargs.get("draft_model") is not None)
    config = EngineConfig(**{**engine, "graph_reuse": engine.get("graph_reuse", True) and not keeps_outputs},
                          **{**shared, "n_ubatch": min(shared["n_ubatch"], shared["n_batch"]),
                             "flash_attn": shared["flash_attn"] if shared["flash_attn"] == "auto"
                             else bool(shared["flash_attn"]), "verbose": bool(shared["verbose"])})
    llama_kwargs.update(n_ctx=shared["n_ctx"], n_batch=shared["n_batch"], n_ubatch=shared["n_ubatch"],
                        flash_attn=config.flash_attn is True, n_threads=config.threads,
                        n_threads_batch=config.threads_batch,
                        type_k=kv_ggml_type(config.type_k), type_v=kv_ggml_type(config.type_v),
                        use_mlock=config.use_mlock, use_mmap=False, verbose=config.verbose)
    return config, llama_kwargs


def _plain_greedy(sample_kwargs: dict) -> bool:
    """Llama.sample's arguments pick the argmax (its defaults where not given)."""
    k = sample_kwargs
    return (k.get("temp", 0.80) == 0.0 and k.get("repeat_penalty", 1.0) == 1.0
            and k.get("frequency_penalty", 0.0) == 0.0 and k.get("presence_penalty", 0.0) == 0.0
            and k.get("logits_processor") is None and k.get("grammar") is None)


class StreamedLlama(llama_cpp.Llama):
    """``llama_cpp.Llama`` with gguf-stream placement.

    Takes Llama's keyword arguments plus the engine's: every field of
    ``gguf_stream.EngineConfig`` by its name, e.g. ``vram_budget`` (the
    planner streams what does not fit), or ``n_streamed`` /
    ``streamed_layers`` and ``n_slots``; ``device`` ("auto", "cuda", "host"),
    ``generate_cpu_layers`` (default: the measured CPU/PCIe split on CUDA,
    the exact placement in host mode), ``exact=True`` (every layer on the
    GPU while generating: tokens bit-identical to all-in-VRAM, slower),
    ``progress=True`` (load and calibration progress on stderr; off by
    default, whatever ``verbose`` says), ``whole_layers`` (see EngineConfig). Without a
    placement a GPU run plans for the free VRAM; host mode keeps every layer
    resident. The fields Llama has too (n_ctx, n_batch, n_ubatch, flash_attn
    (also "auto", as llama.cpp's -fa), n_threads, n_threads_batch, type_k /
    type_v (ggml ids or names such as "q8_0"), use_mlock, verbose) keep
    Llama's defaults and reach both, but for the threads: the engine's (the
    physical cores; n_threads_batch: n_threads), which its CPU layers are
    measured with (Llama's: half the CPUs, all of them). ``graph_reuse`` is
    off by itself with ``logits_all``, ``embedding`` or a ``draft_model``. n_gpu_layers, split_mode, main_gpu,
    tensor_split and use_mmap are the engine's to decide: given, they warn
    (IgnoredOptionWarning) and are ignored.
    """

    def __init__(self, model_path: str | os.PathLike, **options):
        model_file = read_model(model_path)
        warn_ignored(options)
        config, llama_kwargs = engine_and_llama_options(options)
        config = resolve_context(config, model_file.hparams["n_ctx_train"])  # n_ctx 0: the training context
        self._streamer = streamer = Streamer(model_path, config, model_file=model_file)
        self._vram_base = streamer.vram_free()
        try:
            with swapped(llama_module, "internals", _Internals(streamer)):
                super().__init__(str(model_path), **llama_kwargs)
        except BaseException:
            if hasattr(self, "_stack"):  # context, then model (it closes the ring after itself)
                super().close()
            streamer.close()  # no-op if the model already did
            raise

    def close(self) -> None:
        # Llama.__del__ calls close() even when our constructor failed before
        # Llama.__init__ created its exit stack.
        if hasattr(self, "_stack"):
            super().close()
        # Llama keeps its model, context and batch wrappers after close,
        # pointing at freed memory: the next tokenize or eval would crash.
        for name in ("_model", "_ctx", "_batch"):
            if name in vars(self):
                setattr(self, name, _CLOSED)
        if isinstance(vars(self).get("tokenizer_"), LlamaTokenizer):  # it holds the model wrapper too
            self.tokenizer_._model = _CLOSED

    def detokenize(self, tokens, prev_tokens=None, special: bool = False) -> bytes:
        # llama.cpp looks token ids up with .at(): one outside the vocabulary
        # is a C++ exception through ctypes, which aborts the process
        n_vocab = self.n_vocab()
        bad = [t for t in tokens if not 0 <= t < n_vocab]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (0..{n_vocab - 1})")
        return super().detokenize(tokens, prev_tokens=prev_tokens, special=special)

    def _init_sampler(self, *args, grammar=None, **kwargs):
        # llama.cpp makes no sampler of a grammar it cannot parse, and
        # llama-cpp-python chains that NULL in: the next sample crashes
        if grammar is not None:
            reason = grammar_error(self.model_path, grammar._grammar, grammar._root)
            if reason is not None:
                raise ValueError(f"llama.cpp cannot use this grammar: {reason}")
        return super()._init_sampler(*args, grammar=grammar, **kwargs)

    def sample(self, *args, **kwargs):
        # llama.cpp's llama_sampler_sample fills a candidate array of the whole
        # vocabulary for every token (milliseconds for a 128k vocabulary on a
        # CPU); plain greedy (no penalty, grammar, logits processor) is the
        # argmax, read in llama.cpp's logits buffer: the first on a tie, as its
        # greedy sampler, which still sees the token accepted
        if args or not _plain_greedy(kwargs) or self.n_tokens <= 0:
            return super().sample(*args, **kwargs)
        idx = kwargs.get("idx")
        ptr = llama_cpp.llama_get_logits_ith(self._ctx.ctx, -1 if idx is None else idx - self.n_tokens)
        if not ptr:
            return super().sample(*args, **kwargs)
        token = int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self._n_vocab,))))
        if self._sampler is not None:
            self._sampler.accept(token)
        return token

    @property
    def plan(self):
        return self._streamer.plan

    @property
    def flash_attn(self) -> bool | None:
        """Whether the context computes with flash attention (flash_attn="auto": llama.cpp's choice; None: unknown)."""
        return self._streamer.flash_attn

    @property
    def stats(self) -> dict:
        """Plan, streaming counters and memory, as in StreamedModel.stats."""
        s = self._streamer
        free = s.vram_free()
        return {
            "plan": s.plan,
            "counters": s.counters(),
            "vram_used_bytes": None if free is None else self._vram_base - free,
            "pinned_host_bytes": s.pinned_bytes,
        }


def chat_format_for(llm, requested: str | None) -> str | None:
    """The chat format to use: the requested one, else the GGUF's template
    (llama-cpp-python picks it up by itself). A GGUF without a template falls
    back to llama-cpp-python's 'llama-2' format, which Gemma models do not
    understand; use the 'gemma' format for them instead."""
    if requested is not None:
        return requested
    meta = getattr(llm, "metadata", {}) or {}
    if meta.get("tokenizer.chat_template"):
        return None
    if str(meta.get("general.architecture", "")).startswith("gemma"):
        return "gemma"
    return None


def apply_chat_format(llm, requested: str | None) -> str:
    """Set chat_format_for's choice on llm (unless a chat handler is set); its name."""
    fmt = chat_format_for(llm, requested)
    if fmt is not None and llm.chat_handler is None:
        llm.chat_format = fmt
    return llm.chat_format or "?"
