"""StreamedLlama: a llama_cpp.Llama whose model and context go through the engine.

Everything Llama offers (completion, chat completion with the GGUF's chat
template, streaming, tokenization, reset, save_state/load_state, embeddings,
close) works unchanged, because only two objects differ: the model (loaded
with streamed layers in pinned host memory, then re-homed into the slot ring)
and the context (created with the streaming hook, decoding through the
Streamer): streamer.StreamedLlamaModel and StreamedLlamaContext, the same
objects StreamedModel holds.

Llama.__init__ builds those two objects through the module-level name
``llama_cpp.llama.internals``; StreamedLlama swaps in a namespace that builds
ours for the duration of its own constructor only, under a lock. This relies on
llama-cpp-python 0.3.36's exact constructor, which gguf-stream pins anyway.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager

from . import llama_abi
from .config import MAX_CONTEXT, EngineConfig, check_int, resolve_context
from .errors import DecodeError
from .gguf_file import read_model
from .grammar import grammar_error
from .memory import kv_ggml_type, kv_type_name
from .streamer import StreamedLlamaContext, StreamedLlamaModel, Streamer

llama_abi.llama()  # version check before touching Llama's internals
import llama_cpp  # noqa: E402
import llama_cpp._internals as internals  # noqa: E402
import llama_cpp.llama as llama_module  # noqa: E402
from llama_cpp.llama_tokenizer import LlamaTokenizer  # noqa: E402

_swap_lock = threading.RLock()


def kv_types_as_ggml(llama_kwargs: dict) -> dict:
    """The kwargs with type_k / type_v as the ggml type ids llama_cpp.Llama
    takes, whether given as ids or as llama.cpp's names ('q8_0')."""
    out = dict(llama_kwargs)
    for key in ("type_k", "type_v"):
        value = out.get(key)
        if isinstance(value, str):
            out[key] = kv_ggml_type(value)
        elif value is not None:
            kv_type_name(value)  # a one-line error for an id that is no KV cache type
    return out


def kv_type_names(llama_kwargs: dict) -> dict:
    """type_k / type_v of Llama's kwargs (ggml ids, None: f16) as EngineConfig's names."""
    return {key: "f16" if llama_kwargs.get(key) is None else kv_type_name(llama_kwargs[key])
            for key in ("type_k", "type_v")}


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
        return StreamedLlamaContext(self._streamer, **kw)


class _Closed:
    """Stands in for a closed Llama's model, context and batch: any use is an error."""

    def __getattr__(self, name):
        raise DecodeError("this model is closed")


_CLOSED = _Closed()


class StreamedLlama(llama_cpp.Llama):
    """``llama_cpp.Llama`` with gguf-stream placement.

    Takes Llama's keyword arguments plus the engine's: ``vram_budget`` (the
    planner streams what does not fit), or ``n_streamed`` / ``streamed_layers``
    and ``n_slots``; ``device`` ("auto", "cuda", "host"), ``prefetch``,
    ``generate_cpu_layers`` (default: the measured CPU/PCIe split on CUDA, the
    exact placement in host mode; "auto", "none" or layer numbers: see
    EngineConfig), ``exact=True`` (every layer on the GPU while generating:
    tokens bit-identical to all-in-VRAM, slower), ``progress=True`` (load and
    calibration progress on stderr; off by default, whatever ``verbose`` says),
    ``graph_reuse`` (off by itself with ``logits_all`` or ``embedding``) and
    ``whole_layers`` (mixture-of-experts models: see EngineConfig).
    ``type_k`` / ``type_v`` (KV cache types) take Llama's ggml type ids or
    llama.cpp's names ("q8_0"); the planner sizes the KV cache by them.
    ``n_gpu_layers`` and ``use_mmap`` are decided by the engine and ignored.
    """

    def __init__(self, model_path: str | os.PathLike, *, vram_budget=None, n_streamed=None, streamed_layers=None,
                 n_slots=None, device: str = "auto", prefetch: bool = True,
                 generate_cpu_layers=None, exact: bool = False, progress: bool = False, graph_reuse: bool = True,
                 whole_layers=None, **llama_kwargs):
        model_file = read_model(model_path)
        llama_kwargs = kv_types_as_ggml(llama_kwargs)
        n_batch, n_ubatch = llama_kwargs.get("n_batch", 512), llama_kwargs.get("n_ubatch", 512)
        check_int("n_batch", n_batch, 1, MAX_CONTEXT)
        check_int("n_ubatch", n_ubatch, 1, MAX_CONTEXT)
        config = EngineConfig(
            vram_budget=vram_budget, n_streamed=n_streamed, streamed_layers=streamed_layers, n_slots=n_slots,
            device=device, prefetch=prefetch, generate_cpu_layers=generate_cpu_layers, exact=exact,
            progress=progress, whole_layers=whole_layers,
            # n_ctx 0: the training context, as Llama reads it (resolve_context)
            n_ctx=llama_kwargs.get("n_ctx", 512), n_batch=n_batch,
            n_ubatch=min(n_ubatch, n_batch),
            flash_attn=bool(llama_kwargs.get("flash_attn", False)), n_threads=llama_kwargs.get("n_threads"),
            verbose=bool(llama_kwargs.get("verbose", True)),
            # splitting a prompt's short tail off (see EngineConfig.graph_reuse)
            # would lose the outputs of every token before it
            graph_reuse=graph_reuse and not (llama_kwargs.get("logits_all") or llama_kwargs.get("embedding")),
            **kv_type_names(llama_kwargs),
        )
        config = resolve_context(config, model_file.hparams["n_ctx_train"])
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

    @property
    def plan(self):
        return self._streamer.plan

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
