"""Serve a StreamedLlama through llama-cpp-python's OpenAI-compatible server.

    from gguf_stream.server import create_app, close_app
    app = create_app("model.gguf", vram_budget="6GiB", n_ctx=4096)   # loads the model
    try:
        uvicorn.run(app, host="127.0.0.1", port=8000)
    finally:
        close_app(app)            # also runs by itself when the server shuts down

or ``gguf-stream serve model.gguf --vram-budget 6GiB --port 8000``.

What differs from llama_cpp.server's own app: requests are checked before its
routes see them (RequestGuard: a JSON object of the endpoint's fields in their
ranges, a known model name, grammars and JSON schemas llama.cpp can parse,
token ids inside the vocabulary: else 4xx instead of a 500 or a crashed
process), and OpenAI's newer chat fields are put in llama_cpp.server's terms
(openai_compatible: max_completion_tokens, a json_schema response format);
``embedding=True`` serves /v1/embeddings pooled (embedding_pooling); ``api_key`` is required when given; CORS is off unless origins are
named; concurrent requests queue instead of cutting a running stream off
(interrupt_requests), or with ``n_seq_max`` > 1 (-np) share one batch loop
(serve_batch: continuous batching, ``/slots``); ``/health`` answers;
``lookup=N`` or ``draft_model=PATH`` (``draft_max``) draft greedy requests
(speculative.py's drafters through Llama's draft_model; -np N: in the batch loop), each
request's acceptance logged on the ``gguf_stream.server`` logger.

llama_cpp.server.app.create_app builds its model through
``set_llama_proxy -> LlamaProxy(models) -> LlamaProxy.load_llama_from_model_settings
-> llama_cpp.Llama(...)``. create_app here runs it with ``LlamaProxy`` swapped
(in the app module, for the duration of the call, under llama_compat's lock)
for StreamedLlamaProxy, whose loader runs llama-cpp-python's own loader with
``llama_cpp.Llama`` seen as StreamedLlama there: every ModelSettings field is
passed as llama_cpp.server passes it (except its defaults for the options the
engine decides, and its mlock on by default), plus the engine options as given.

Like llama_cpp.server itself, one app per process: the model lives in a
module global of llama_cpp.server.app. Creating a second app closes the model
of the first. Needs ``pip install 'gguf-stream[server]'``.
"""
from __future__ import annotations

import hmac
import json
import logging
import os
import socket

from . import __version__  # noqa: F401  (first: llama.cpp before numpy)
from .grammar import grammar_error, schema_grammar
from .config import ENGINE_OPTIONS, split_options
from .llama_compat import IGNORED_LLAMA_OPTIONS, StreamedLlama, apply_chat_format, swapped
from .speculative import (DEFAULT_DRAFT_MAX, LlamaDrafter, check_options, counted, llama_vocabulary, make_drafter,
                          verify_rows)

# ImportError without the server extra (gguf-stream serve turns it into advice)
import anyio
import llama_cpp
import llama_cpp.server.app as server_app
import llama_cpp.server.model as server_model
import pydantic
from fastapi import FastAPI, HTTPException
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from llama_cpp.server import types as server_types
from llama_cpp.server.settings import ModelSettings, ServerSettings
from starlette.middleware import Middleware

# ModelSettings fields llama_cpp.server passes to Llama whatever the caller
# said: unless the caller of create_app gave them, StreamedLlama gets Llama's
# defaults (no ignored-option warning; and no mlock, which ModelSettings turns
# on by default where llama.cpp's own server does not)
SERVER_DEFAULTS_DROPPED = (*IGNORED_LLAMA_OPTIONS, "use_mlock")
CLOSED_MESSAGE = ("gguf-stream: error: the model of this server was closed (server shutting down or "
                  "close_app called); restart the server to serve requests again")
# The request body each endpoint takes (llama_cpp.server.types), checked by RequestGuard
BODIES = {
    "/v1/completions": server_types.CreateCompletionRequest,
    "/v1/engines/copilot-codex/completions": server_types.CreateCompletionRequest,
    "/v1/chat/completions": server_types.CreateChatCompletionRequest,
    "/v1/embeddings": server_types.CreateEmbeddingRequest,
    "/extras/tokenize": server_types.TokenizeInputRequest,
    "/extras/tokenize/count": server_types.TokenizeInputRequest,
    "/extras/detokenize": server_types.DetokenizeInputRequest,
}
OPEN_PATHS = ("/health", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc")  # no API key needed
MAX_BODY_BYTES = 16 << 20  # a 128k-token prompt is about 0.5 MiB of text
PROMPT_LOOKUP = "prompt-lookup-decoding"  # llama_cpp.server's draft_model value for prompt lookup
log = logging.getLogger(__name__)


class _LlamaCppWithStreamed:
    """The ``llama_cpp`` module as llama_cpp.server.model sees it while loading:
    everything is llama_cpp's, except that ``Llama`` builds a StreamedLlama
    with the engine options (EngineConfig's fields, as the caller gave them)
    and Llama options ModelSettings has no field for, over what the server
    passes; ModelSettings' values for SERVER_DEFAULTS_DROPPED only where the
    caller gave them."""

    def __init__(self, engine_options: dict, llama_options: dict, given: frozenset = frozenset()):
        self._engine_options, self._llama_options, self._given = engine_options, llama_options, given

    def Llama(self, **kwargs):  # noqa: N802 (mirrors the class name)
        kwargs = {k: v for k, v in kwargs.items() if k not in SERVER_DEFAULTS_DROPPED or k in self._given}
        return StreamedLlama(**{**kwargs, **self._llama_options, **self._engine_options})

    def __getattr__(self, name):
        return getattr(llama_cpp, name)


class StreamedLlamaProxy(server_model.LlamaProxy):
    """llama_cpp.server's model holder, loading StreamedLlama with the engine
    options; after close() requests get HTTP 503 instead of touching freed memory."""

    def __init__(self, models: list[ModelSettings], *, engine_options: dict, llama_options: dict | None = None,
                 given: frozenset = frozenset(), speculative: dict | None = None):
        unknown = set(engine_options) - set(ENGINE_OPTIONS)
        if unknown:
            raise ValueError(f"unknown engine options {sorted(unknown)}; known: {', '.join(ENGINE_OPTIONS)}")
        self._engine_options = dict(engine_options)
        self._llama_options = dict(llama_options or {})
        self._given = frozenset(given)
        self._closed = False
        self.batch_loop = None  # serve_batch.BatchLoop with -np > 1 (start_batching)
        # lookup / draft_model / draft_max: Llama's draft_model, its drafter set once the model is loaded
        # (-np N: the batch loop drafts)
        self.speculative = speculative
        self.drafter = None
        n_seq_max = self._engine_options.get("n_seq_max", 1)
        if speculative is not None and not (isinstance(n_seq_max, int) and n_seq_max > 1):
            self.drafter = self._llama_options["draft_model"] = LlamaDrafter()
        super().__init__(models)

    def load_llama_from_model_settings(self, settings: ModelSettings) -> StreamedLlama:  # llama_cpp: a staticmethod
        if settings.hf_model_repo_id is not None:
            raise ValueError("gguf-stream serves local GGUF files: give a path, not hf_model_repo_id")
        loader = _LlamaCppWithStreamed(self._engine_options, self._llama_options, self._given)
        with swapped(server_model, "llama_cpp", loader):
            llm = server_model.LlamaProxy.load_llama_from_model_settings(settings)
        try:
            apply_chat_format(llm, settings.chat_format)  # GGUFs without a chat template (Gemma)
            if self.drafter is not None:
                self._set_drafter(llm)
        except BaseException:
            llm.close()
            raise
        return llm

    def _set_drafter(self, llm: StreamedLlama) -> None:
        """The drafter asked for, sized for llm's context; its counts logged per request."""
        s = self.speculative
        self.drafter.close()  # a draft model of a model loaded before
        self.drafter.drafter = make_drafter(s["lookup"], s["draft_model"], s["draft_max"], llama_vocabulary(llm),
                                            cuda=llm._streamer.cuda, config=llm._streamer.config,
                                            verbose=llm.verbose)
        counted(llm, self.drafter, _log_drafts)

    def __call__(self, model: str | None = None) -> StreamedLlama:
        if self._closed:
            raise HTTPException(status_code=503, detail=CLOSED_MESSAGE)
        llm = super().__call__(model)
        if self.batch_loop is not None:  # a request's view: its generation takes a seat of the loop
            from .serve_routes import SeatedLlama

            return SeatedLlama(llm, self.batch_loop)
        return llm

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
        if self.batch_loop is not None:  # its thread uses the context
            self.batch_loop.close()
        llm, self._current_model, self._current_model_alias = self._current_model, None, None
        if llm is not None:
            llm.close()
        if self.drafter is not None:  # the draft model
            self.drafter.close()

    free = close  # LlamaProxy's name for it


class BadRequest(Exception):
    """A request the guard answers itself: HTTP status and message."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


class RequestGuard:
    """ASGI middleware in front of llama_cpp.server's routes. It checks the
    API key, then reads a POST body whole (at most MAX_BODY_BYTES) and checks
    it (check_request) before the route sees it: llama_cpp.server answers a
    malformed body with a 500, an unknown model name with the one model,
    and a grammar llama.cpp cannot parse with a crashed process. Streaming
    responses start before the route touches the model, so this is the only
    place such a request can still get a 4xx."""

    def __init__(self, app, *, proxy, api_key: str | None):
        self.app, self.proxy, self.api_key = app, proxy, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"][len(scope.get("root_path", "")):] if scope.get("root_path") else scope["path"]
        try:
            if self.api_key is not None and path not in OPEN_PATHS and not self._authorized(scope):
                raise BadRequest(401, "invalid or missing API key; send the header 'Authorization: Bearer KEY'")
            if scope["method"] == "POST" and path in BODIES:
                body = openai_compatible(path, await _read_body(receive))
                await anyio.to_thread.run_sync(check_request, path, body, self.proxy)
                receive = _replay(body, receive)
        except BadRequest as exc:
            if exc.status == 503:  # as the proxy answers it (an HTTPException)
                content = {"detail": exc.message}
            else:  # as OpenAI answers bad requests
                content = {"error": {"message": exc.message, "type": "invalid_request_error", "param": exc.param,
                                     "code": None}}
            return await JSONResponse(content, status_code=exc.status)(scope, receive, send)
        await self.app(scope, receive, send)

    def _authorized(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(header, b"Bearer " + self.api_key.encode())


async def _read_body(receive) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequest(400, "the client went away before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BadRequest(413, f"the request body is over {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def _replay(body: bytes, receive):
    """The body read, then the connection's own messages (a disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def openai_compatible(path: str, body: bytes) -> bytes:
    """The body with what OpenAI's newer chat API names in llama_cpp.server's
    terms, which ignores max_completion_tokens (generation then ran to the end
    of the context) and knows no json_schema response format; else as it came."""
    if path != "/v1/chat/completions":
        return body
    try:
        data = json.loads(body)
    except ValueError:
        return body  # check_request says what is wrong with it
    if not isinstance(data, dict):
        return body
    changed = _max_completion_tokens(data) | _json_schema_format(data)
    return json.dumps(data).encode() if changed else body


def _max_completion_tokens(data: dict) -> bool:
    """max_completion_tokens as max_tokens, where max_tokens is absent (or null)."""
    if "max_completion_tokens" not in data:
        return False
    value = data.pop("max_completion_tokens")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise BadRequest(400, f"max_completion_tokens must be a positive integer, got {str(value)[:40]!r}",
                         "max_completion_tokens")
    if data.get("max_tokens") is None:
        data["max_tokens"] = value
    return True


def _json_schema_format(data: dict) -> bool:
    """response_format {"type": "json_schema", "json_schema": {"schema": S}} (OpenAI's structured
    outputs) as llama-cpp-python's {"type": "json_object", "schema": S}."""
    fmt = data.get("response_format")
    if not (isinstance(fmt, dict) and fmt.get("type") == "json_schema"):
        return False
    spec = fmt.get("json_schema")
    if not (isinstance(spec, dict) and "schema" in spec):
        raise BadRequest(400, "response_format: type json_schema needs json_schema.schema (a JSON schema)",
                         "response_format")
    data["response_format"] = {"type": "json_object", "schema": spec["schema"]}
    return True


def check_request(path: str, body: bytes, proxy) -> None:
    """Raise BadRequest for what llama_cpp.server would answer with a 500 or a crash."""
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise BadRequest(400, "the request body is empty; send a JSON object" if not body.strip()
                         else f"the request body is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BadRequest(400, f"the request body must be a JSON object, not {type(data).__name__}")
    try:
        request = BODIES[path].model_validate(data)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BadRequest(400, f"{where}: {first['msg']} (got {str(first.get('input'))[:60]!r})", where) from None
    llm = proxy.model
    if llm is None:
        raise BadRequest(503, CLOSED_MESSAGE)
    model = data.get("model")
    if model is not None and model not in list(proxy):
        raise BadRequest(404, f"model {str(model)[:80]!r} is not served here: this server serves "
                         f"{', '.join(map(repr, proxy))} (or leave model out)", "model")
    if path == "/v1/embeddings" and not llm.context_params.embeddings:
        raise BadRequest(400, "this server's model computes no embeddings: start it with --embedding "
                         "(create_app(..., embedding=True))")
    n_vocab = llm.n_vocab()
    tokens = data.get("tokens") if path == "/extras/detokenize" else None
    if tokens and not all(0 <= t < n_vocab for t in tokens):
        raise BadRequest(400, f"tokens must be ids in 0..{n_vocab - 1}", "tokens")
    if getattr(request, "logit_bias", None) and request.logit_bias_type != "tokens":
        _check_logit_bias(request.logit_bias, n_vocab)
    grammar = getattr(request, "grammar", None)
    if grammar is not None:
        _check_grammar(llm, grammar, "grammar")
    schema = (getattr(request, "response_format", None) or {}).get("schema")
    if schema is not None:
        _check_grammar(llm, _schema_grammar(schema), "response_format")


def _check_logit_bias(bias: dict, n_vocab: int) -> None:
    for key in bias:
        if not (key.strip().lstrip("-").isdigit() and 0 <= int(key) < n_vocab):
            raise BadRequest(400, f"logit_bias keys must be token ids in 0..{n_vocab - 1}, got {key[:40]!r}",
                             "logit_bias")


def _check_grammar(llm, grammar: str, param: str) -> None:
    reason = grammar_error(llm.model_path, grammar)
    if reason is not None:
        raise BadRequest(400, f"{param}: llama.cpp cannot use this grammar: {reason}", param)


def _schema_grammar(schema) -> str:
    try:
        return schema_grammar(schema)
    except ValueError as exc:
        raise BadRequest(400, f"response_format: {exc}", "response_format") from None


def _log_drafts(drafter: LlamaDrafter, greedy: bool) -> None:
    """One line per request: its acceptance, or why it had no drafts."""
    if greedy:
        log.info(drafter.result.summary())
    else:
        log.info("speculative: a request that samples (temperature > 0, min_tokens or logit_bias) is generated "
                 "without drafts (they are greedy's)")


def speculative_options(lookup: int | None, draft_model, draft_max: int, model_settings: dict) -> dict | None:
    """create_app's drafting options, checked (None: no drafting).
    llama_cpp.server's spelling works too: draft_model="prompt-lookup-decoding"
    with draft_model_num_pred_tokens N (default 10) is lookup=N."""
    n_pred = model_settings.pop("draft_model_num_pred_tokens", None)
    if draft_model == PROMPT_LOOKUP:
        if lookup is not None:
            raise ValueError(f"lookup and draft_model={PROMPT_LOOKUP!r} both ask for prompt lookup; give one")
        default = ModelSettings.model_fields["draft_model_num_pred_tokens"].default
        lookup, draft_model = n_pred if n_pred is not None else default, None
    elif n_pred is not None:
        raise ValueError(f"draft_model_num_pred_tokens goes with draft_model={PROMPT_LOOKUP!r}; give lookup=N "
                         "for prompt lookup, draft_max=N for a draft model")
    if lookup is None and draft_model is None:
        return None
    check_options(lookup, draft_model, draft_max)
    if draft_model is not None and not os.path.isfile(draft_model):
        raise ValueError(f"draft model {os.fspath(draft_model)!r} is not a file; give the path of a GGUF")
    return {"lookup": lookup, "draft_model": draft_model, "draft_max": draft_max}


def create_app(model_path, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               cors_origins=(), pooling: str | None = None, lookup: int | None = None, draft_model=None,
               draft_max: int = DEFAULT_DRAFT_MAX, prompt_cache: bool = True, **options) -> FastAPI:
    """llama_cpp.server's FastAPI app, serving ``model_path`` as a StreamedLlama.

    ``options``: the engine's (every EngineConfig field, as StreamedLlama
    takes them: vram_budget, generate_cpu_layers (default: the measured
    CPU/PCIe split on CUDA), exact=True (bit-identical to all-in-VRAM),
    progress, flash_attn="auto", ...;
    without a placement a GPU run plans for the free VRAM), and
    llama_cpp.server's ModelSettings fields (chat_format, model_alias,
    embedding, n_threads_batch, seed, ...; n_ctx defaults to its 2048).
    ``api_key``:
    requests must send ``Authorization: Bearer KEY``; ``cors_origins``: the
    browser origins allowed to call it (none by default). ``embedding=True``
    serves /v1/embeddings, pooled by ``pooling`` (see embedding_pooling).
    ``lookup=N`` (prompt lookup: up to N drafted tokens per pass) or
    ``draft_model=PATH`` (a GGUF of the same vocabulary, all on the GPU;
    ``draft_max`` tokens per pass): greedy requests (temperature 0) are
    checked in one decode per pass, the generate split measured for those
    rows (generate_rows); with n_seq_max > 1 in the batch loop (a draft
    model's context then has a sequence per slot). ``prompt_cache=False`` (n_seq_max > 1): a request never starts from
    the cells its slot kept of an earlier one (every prompt decoded whole, as
    a fresh run decodes it). The model is loaded
    here (errors raise here); it is closed by close_app(app) or when the
    server shuts down.
    """
    if not isinstance(prompt_cache, bool):
        raise ValueError(f"prompt_cache must be True or False, not {prompt_cache!r:.40}")
    engine, model_settings = split_options(options)  # the engine's reach StreamedLlama as given
    speculative = speculative_options(lookup, draft_model, draft_max, model_settings)
    if speculative is not None:
        n_seq_max = engine.get("n_seq_max", 1)
        batched = isinstance(n_seq_max, int) and n_seq_max > 1
        if engine.get("generate_rows") is None and not batched:  # the split measured for verify decodes,
            engine["generate_rows"] = verify_rows(speculative["lookup"], draft_max)  # as run and chat
    unknown = sorted(set(model_settings) - set(ModelSettings.model_fields))
    if unknown:
        raise TypeError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: create_app takes "
                        f"the engine's ({', '.join(ENGINE_OPTIONS)}) and llama_cpp.server's model settings")
    settings = ModelSettings(model=str(model_path), **model_settings)
    llama_options = {"pooling_type": embedding_pooling(model_path, pooling)} if settings.embedding else {}
    if pooling is not None and not settings.embedding:
        raise ValueError("pooling applies to embeddings: give embedding=True (--embedding) too")
    # interrupt_requests=False: a second request waits for the running one
    # (llama_cpp.server's default ends a running stream when one arrives)
    server_settings = ServerSettings(host=host, port=port, api_key=api_key, interrupt_requests=False)
    previous = server_app._llama_proxy
    if isinstance(previous, StreamedLlamaProxy):
        previous.close()  # one model per process, as in llama_cpp.server

    def proxy_factory(models):
        return StreamedLlamaProxy(models, engine_options=engine, llama_options=llama_options,
                                  given=frozenset(model_settings), speculative=speculative)

    with swapped(server_app, "LlamaProxy", proxy_factory):
        app = server_app.create_app(server_settings=server_settings, model_settings=[settings])
    proxy = server_app._llama_proxy
    app.state.gguf_stream_proxy = proxy
    _set_middleware(app, proxy, api_key, tuple(cors_origins))
    app.add_api_route("/health", lambda: _health(proxy), methods=["GET"], include_in_schema=False)
    if proxy.model._streamer.config.n_seq_max > 1:
        _start_batching(app, proxy, prompt_cache)

    async def close_on_shutdown():
        # after uvicorn drained the connections; the locks wait for a request still generating
        async with server_app.llama_outer_lock, server_app.llama_inner_lock:
            proxy.close()

    app.router.on_shutdown.append(close_on_shutdown)
    return app


POOLING = {"none": llama_cpp.LLAMA_POOLING_TYPE_NONE, "mean": llama_cpp.LLAMA_POOLING_TYPE_MEAN,
           "cls": llama_cpp.LLAMA_POOLING_TYPE_CLS, "last": llama_cpp.LLAMA_POOLING_TYPE_LAST}


def embedding_pooling(model_path, requested: str | None) -> int:
    """llama.cpp's pooling type for /v1/embeddings: the one requested, else the
    GGUF's own, else mean. A generative model names none or "none" (a vector
    per token, which OpenAI clients cannot read: llama.cpp's server refuses
    it there); mean gives one vector per input."""
    if requested is not None:
        if requested not in POOLING:
            raise ValueError(f"pooling must be one of {', '.join(POOLING)}, got {requested!r}")
        return POOLING[requested]
    from .gguf_file import read_model

    own = read_model(model_path).hparams.get("pooling_type")
    return own if own in POOLING.values() and own != llama_cpp.LLAMA_POOLING_TYPE_NONE else \
        llama_cpp.LLAMA_POOLING_TYPE_MEAN


def _set_middleware(app: FastAPI, proxy, api_key: str | None, cors_origins: tuple[str, ...]) -> None:
    """llama_cpp.server allows every origin, with credentials: CORS only for
    the origins named; the guard inside it (a browser's preflight needs no key)."""
    kept = [m for m in app.user_middleware if m.cls is not CORSMiddleware]
    ours = [Middleware(RequestGuard, proxy=proxy, api_key=api_key)]
    if cors_origins:
        ours.insert(0, Middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                                  allow_headers=["Authorization", "Content-Type"]))
    app.user_middleware[:] = ours + kept


def _start_batching(app: FastAPI, proxy, prompt_cache: bool) -> None:
    """-np N > 1: continuous batching of the completion endpoints (serve_batch)."""
    from .serve_batch import BatchLoop
    from .serve_routes import install_routes

    s, llm, drafter = proxy.speculative, proxy.model, None
    try:
        if s is not None:  # a draft model's context gets a sequence per slot too
            drafter = make_drafter(s["lookup"], s["draft_model"], s["draft_max"], llama_vocabulary(llm),
                                   cuda=llm._streamer.cuda, config=llm._streamer.config, verbose=llm.verbose,
                                   seats=True)
        proxy.batch_loop = BatchLoop(llm, prompt_cache=prompt_cache, drafter=drafter)
        install_routes(app, proxy, proxy.batch_loop)
    except BaseException:
        if drafter is not None and proxy.batch_loop is None:
            drafter.close()  # else the loop closes it
        proxy.close()
        raise


def _health(proxy) -> JSONResponse:
    if proxy.closed:
        return JSONResponse({"status": "closed"}, status_code=503)
    slots = proxy.batch_loop.health() if proxy.batch_loop is not None else {}
    return JSONResponse({"status": "ok", **slots})


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
