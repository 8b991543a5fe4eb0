"""llama-cpp-python's model and context wrappers (llama_cpp._internals),
driving a Streamer through its load protocol (streamer.py's docstring):
StreamedModel (model.py) and StreamedLlama (llama_compat.py) build theirs
from these."""
from __future__ import annotations

from .streamer import Streamer

import llama_cpp._internals as internals  # noqa: E402  (after llama.cpp: gguf_stream first)


class StreamedLlamaModel(internals.LlamaModel):
    """llama-cpp-python's model wrapper, loaded for the Streamer and attached
    to it; closing it frees the context, the model, then the slot ring."""

    def __init__(self, streamer: Streamer, *, path_model, params, verbose=True):
        self._streamer = streamer
        streamer.patch_model_params(params)
        try:
            super().__init__(path_model=path_model, params=params, verbose=verbose)
        finally:
            streamer.model_loaded(getattr(self, "model", None) is not None)
        try:
            streamer.attach(self.model)
        except BaseException:
            self.close()
            raise

    def close(self):
        streamer = getattr(self, "_streamer", None)
        if streamer is not None:
            streamer.model_closing()
        super().close()  # the context (registered on our stack) and the model first,
        if streamer is not None:  # then the slots they pointed into
            streamer.close()


class StreamedLlamaContext(internals.LlamaContext):
    """llama-cpp-python's context wrapper, with the scheduler hook; its
    decode goes through Streamer.decode."""

    def __init__(self, streamer: Streamer, *, model, params, verbose=True):
        self._streamer = streamer
        streamer.patch_context_params(params)
        with streamer.creating_context():
            super().__init__(model=model, params=params, verbose=verbose)
        streamer.context_opened(self.ctx)
        self._exit_stack.callback(streamer.context_closing)  # runs before llama_free (LIFO)

    def kv_cache_clear(self):
        super().kv_cache_clear()
        self._streamer.kv_cleared()

    def decode(self, batch):
        rc = self._streamer.decode(self.ctx, batch.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
