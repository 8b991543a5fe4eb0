"""Serve a StreamedLlama through llama-cpp-python's OpenAI-compatible server.

    from gguf_stream.server import create_app, close_app
    app = create_app("model.gguf", vram_budget="6GiB", n_ctx=4096)   # loads the model
    try:
        uvicorn.run(app, host="127.0.0.1", port=8000)
    finally:
        close_app(app)            # also runs by itself when the server shuts down

or ``gguf-stream serve model.gguf --vram-budget 6GiB --port 8000``.

llama_cpp.server.app.create_app builds its model through
``set_llama_proxy -> LlamaProxy(models) -> LlamaProxy.load_llama_from_model_settings
-> llama_cpp.Llama(...)``. create_app here runs it with ``LlamaProxy`` swapped
(in the app module, for the duration of the call, under llama_compat's lock)
for StreamedLlamaProxy, whose loader runs llama-cpp-python's own loader with
``llama_cpp.Llama`` seen as StreamedLlama there: every ModelSettings field is
passed exactly as llama_cpp.server passes it, plus the engine options.

Like llama_cpp.server itself, one app per process: the model lives in a
module global of llama_cpp.server.app. Creating a second app closes the model
of the first. Needs ``pip install 'gguf-stream[server]'``.
"""
from __future__ import annotations

import socket

from . import __version__  # noqa: F401  (first: llama.cpp before numpy)
from .llama_compat import StreamedLlama, apply_chat_format, swapped

# ImportError without the server extra (gguf-stream serve turns it into advice)
import llama_cpp
import llama_cpp.server.app as server_app
import llama_cpp.server.model as server_model
from fastapi import FastAPI, HTTPException
from llama_cpp.server.settings import ModelSettings, ServerSettings

ENGINE_OPTIONS = ("vram_budget", "n_streamed", "streamed_layers", "n_slots", "device", "prefetch")
CLOSED_MESSAGE = ("gguf-stream: error: the model of this server was closed (server shutting down or "
                  "close_app called); restart the server to serve requests again")


class _LlamaCppWithStreamed:
    """The ``llama_cpp`` module as llama_cpp.server.model sees it while loading:
    everything is llama_cpp's, except that ``Llama`` builds a StreamedLlama."""

    def __init__(self, engine_options: dict):
        self._engine_options = engine_options

    def Llama(self, **kwargs):  # noqa: N802 (mirrors the class name)
        return StreamedLlama(**kwargs, **self._engine_options)

    def __getattr__(self, name):
        return getattr(llama_cpp, name)


class StreamedLlamaProxy(server_model.LlamaProxy):
    """llama_cpp.server's model holder, loading StreamedLlama with the engine
    options; after close() requests get HTTP 503 instead of touching freed memory."""

    def __init__(self, models: list[ModelSettings], *, engine_options: dict):
        unknown = set(engine_options) - set(ENGINE_OPTIONS)
        if unknown:
            raise ValueError(f"unknown engine options {sorted(unknown)}; known: {', '.join(ENGINE_OPTIONS)}")
        self._engine_options = dict(engine_options)
        self._closed = False
        super().__init__(models)

    def load_llama_from_model_settings(self, settings: ModelSettings) -> StreamedLlama:  # llama_cpp: a staticmethod
        if settings.hf_model_repo_id is not None:
            raise ValueError("gguf-stream serves local GGUF files: give a path, not hf_model_repo_id")
        with swapped(server_model, "llama_cpp", _LlamaCppWithStreamed(self._engine_options)):
            llm = server_model.LlamaProxy.load_llama_from_model_settings(settings)
        try:
            apply_chat_format(llm, settings.chat_format)  # GGUFs without a chat template (Gemma)
        except BaseException:
            llm.close()
            raise
        return llm

    def __call__(self, model: str | None = None) -> StreamedLlama:
        if self._closed:
            raise HTTPException(status_code=503, detail=CLOSED_MESSAGE)
        return super().__call__(model)

    @property
    def model(self) -> StreamedLlama | None:
        return None if self._closed else self._current_model

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the model (context, weights, then slots). Idempotent."""
        if self._closed:
            return
        self._closed = True
        llm, self._current_model, self._current_model_alias = self._current_model, None, None
        if llm is not None:
            llm.close()

    free = close  # LlamaProxy's name for it


def create_app(model_path, *, vram_budget=None, n_streamed=None, streamed_layers=None, n_slots=None,
               device: str = "auto", prefetch: bool = True, host: str = "127.0.0.1", port: int = 8000,
               **model_settings) -> FastAPI:
    """llama_cpp.server's FastAPI app, serving ``model_path`` as a StreamedLlama.

    ``model_settings`` are llama_cpp.server ModelSettings fields (n_ctx,
    n_batch, n_ubatch, n_threads, chat_format, model_alias, flash_attn,
    verbose, ...); the engine options are StreamedLlama's. The model is loaded
    here (errors raise here); it is closed by close_app(app) or when the server
    shuts down.
    """
    engine = dict(vram_budget=vram_budget, n_streamed=n_streamed, streamed_layers=streamed_layers,
                  n_slots=n_slots, device=device, prefetch=prefetch)
    settings = ModelSettings(model=str(model_path), **model_settings)
    server_settings = ServerSettings(host=host, port=port)
    previous = server_app._llama_proxy
    if isinstance(previous, StreamedLlamaProxy):
        previous.close()  # one model per process, as in llama_cpp.server

    def proxy_factory(models):
        return StreamedLlamaProxy(models, engine_options=engine)

    with swapped(server_app, "LlamaProxy", proxy_factory):
        app = server_app.create_app(server_settings=server_settings, model_settings=[settings])
    proxy = server_app._llama_proxy
    app.state.gguf_stream_proxy = proxy

    async def close_on_shutdown():
        # after uvicorn drained the connections; the locks wait for a request still generating
        async with server_app.llama_outer_lock, server_app.llama_inner_lock:
            proxy.close()

    app.router.on_shutdown.append(close_on_shutdown)
    return app


def app_model(app: FastAPI) -> StreamedLlama:
    """The StreamedLlama an app serves (for its plan and stats)."""
    model = app.state.gguf_stream_proxy.model
    if model is None:
        raise ValueError("this app's model is closed")
    return model


def close_app(app: FastAPI) -> None:
    """Close the app's model; later requests get HTTP 503. Call it after the
    server stopped, or while no request is being served. Idempotent."""
    app.state.gguf_stream_proxy.close()


def check_port(host: str, port: int) -> None:
    """Raise ValueError with advice when host:port cannot be listened on."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve --host {host!r}: {exc.strerror}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            raise ValueError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port "
                             "or stop what uses it") from None
