"""The HTTP side of ``gguf-stream serve -np N`` (serve_batch.py's loop).

llama-cpp-python's own code answers the requests: a request's completion runs
``llama_cpp.Llama``'s create_completion / create_chat_completion (chat
templates, stop strings, response and stream-chunk shapes) on a SeatedLlama,
a per-request view of the StreamedLlama whose ``generate`` submits a Job to
the batch loop and yields the tokens the loop produces for it instead of
decoding itself. The routes (install_routes) shadow llama_cpp.server's
completion routes, which hold a lock for a whole request; embeddings still
go through its routes (SeatedLlama runs them in the loop between jobs).
"""
from __future__ import annotations

import json
from functools import partial

from .sampling import SamplingParams
from .serve_batch import _END, BatchLoop, Job

import anyio  # noqa: E402  (after llama.cpp: gguf_stream first)
import llama_cpp
import numpy as np
from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from llama_cpp.server import app as server_app
from llama_cpp.server import types as server_types
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

WATCH_SECONDS = 0.1  # how often a waiting request checks that its client is still there
# Llama.generate's options the loop's sampler chain does not have
UNSUPPORTED = {"typical_p": 1.0, "tfs_z": 1.0, "mirostat_mode": 0}
COMPLETION_PATHS = ("/v1/completions", "/v1/engines/copilot-codex/completions")
CHAT_PATH = "/v1/chat/completions"


class SeatedLlama:
    """A StreamedLlama for one request: llama_cpp.Llama's completion code
    runs on it unchanged (the methods below are Llama's own), while its
    generate takes a seat of the batch loop. Everything else (tokenizer,
    metadata, chat handlers) is the StreamedLlama's."""

    create_completion = llama_cpp.Llama.create_completion
    __call__ = llama_cpp.Llama.__call__
    create_chat_completion = llama_cpp.Llama.create_chat_completion

    def __init__(self, llm, loop: BatchLoop):
        self._llm, self._loop = llm, loop
        self._n_ctx = loop.cells  # Llama checks prompts and caps max_tokens against it
        self._seed = llm._seed
        self.verbose = False  # Llama's timings are its own context's
        self.cache = None
        self._max_tokens = None
        self._job: Job | None = None
        self._input_ids = np.zeros(0, dtype=np.intc)
        self._scores = np.zeros((1, llm.n_vocab()), dtype=np.float32)

    def __getattr__(self, name):
        return getattr(self._llm, name)

    def set_seed(self, seed: int) -> None:
        self._seed = seed

    def reset(self) -> None:
        pass  # the job's seat starts empty

    def _create_completion(self, prompt, suffix=None, max_tokens=16, *args, **kwargs):
        self._max_tokens = max_tokens  # generate's limit; Llama counts it too, the loop stops there
        return llama_cpp.Llama._create_completion(self, prompt, suffix, max_tokens, *args, **kwargs)

    def create_embedding(self, *args, **kwargs):
        return self._loop.run_exclusive(partial(self._llm.create_embedding, *args, **kwargs))

    def embed(self, *args, **kwargs):
        return self._loop.run_exclusive(partial(self._llm.embed, *args, **kwargs))

    def generate(self, tokens, top_k=40, top_p=0.95, min_p=0.05, typical_p=1.0, temp=0.80, repeat_penalty=1.0,
                 reset=True, frequency_penalty=0.0, presence_penalty=0.0, tfs_z=1.0, mirostat_mode=0,
                 mirostat_tau=5.0, mirostat_eta=0.1, penalize_nl=True, logits_processor=None,
                 stopping_criteria=None, grammar=None):
        given = dict(typical_p=typical_p, tfs_z=tfs_z, mirostat_mode=mirostat_mode)
        odd = [k for k, v in given.items() if v != UNSUPPORTED[k]]
        if odd:
            raise ValueError(f"{', '.join(odd)} need the server started with -np 1 (the batched server's "
                             "sampler has temperature, top_k, top_p, min_p, penalties, seed and grammars)")
        if temp < 0:
            raise ValueError(f"temperature must be at least 0, got {temp}")
        if grammar is not None and grammar._root != "root":
            raise ValueError("a grammar's root rule must be named root")
        tokens = list(tokens)
        room = self._loop.cells - len(tokens)
        if room < 1:
            raise ValueError(f"the prompt ({len(tokens)} tokens) leaves no room in a slot's {self._loop.cells} "
                             "KV cells; shorten it or restart with a larger -c (or a smaller -np)")
        limit = room if self._max_tokens is None or self._max_tokens <= 0 else min(self._max_tokens, room)
        sampling = SamplingParams(temp=temp, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                                  frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                                  seed=self._seed & 0xFFFFFFFF, grammar=None if grammar is None else grammar._grammar)
        job = self._job = Job(list(tokens), limit, sampling, logits_processor)
        self._loop.submit(job)
        try:
            while True:
                item = job.out.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                token = item
                # as Llama.generate: the criteria see the tokens before this one and the latest
                # logits (llama-cpp-python's own criteria look at the tokens only)
                self._input_ids, self._scores = np.array(tokens, dtype=np.intc), job.logits[None, :]
                if stopping_criteria is not None and stopping_criteria(self._input_ids, self._scores[-1]):
                    return
                tokens.append(token)
                yield token
        finally:
            self._loop.cancel(job)  # a no-op once the loop ended it; else frees its seat

    def cancel(self) -> None:
        if self._job is not None:
            self._loop.cancel(self._job)


# ---------------------------------------------------------------- HTTP routes

def install_routes(app, proxy, loop: BatchLoop) -> None:
    """Completion routes that run on the batch loop, in front of
    llama_cpp.server's (which its app includes as a router shared by every
    app, so they are shadowed rather than removed), and /slots."""
    before = len(app.router.routes)
    for path in COMPLETION_PATHS:
        app.add_api_route(path, _route(proxy, loop, chat=False), methods=["POST"], include_in_schema=False)
    app.add_api_route(CHAT_PATH, _route(proxy, loop, chat=True), methods=["POST"], include_in_schema=False)
    app.add_api_route("/slots", lambda: JSONResponse(loop.slots()), methods=["GET"], include_in_schema=False)
    routes = app.router.routes
    routes[:] = routes[before:] + routes[:before]  # the first route that matches a request serves it


def _route(proxy, loop: BatchLoop, chat: bool):
    async def route(request: Request):
        return await _completion(request, proxy, loop, chat)

    return route


async def _completion(request: Request, proxy, loop: BatchLoop, chat: bool):
    body_type = server_types.CreateChatCompletionRequest if chat else server_types.CreateCompletionRequest
    body = body_type.model_validate(await request.json())  # RequestGuard checked it
    exclude = {"n", "logit_bias_type", "user", "min_tokens", *(() if chat else ("best_of",))}
    kwargs = body.model_dump(exclude=exclude)
    if not chat and isinstance(kwargs["prompt"], list):  # as llama_cpp.server: one prompt
        if len(kwargs["prompt"]) > 1:
            return _bad_request("the batched server takes one prompt per request; send several requests")
        kwargs["prompt"] = kwargs["prompt"][0] if kwargs["prompt"] else ""
    model = "copilot-codex" if request.url.path.endswith("copilot-codex/completions") else body.model
    view = proxy(body.model)  # a SeatedLlama (StreamedLlamaProxy with a batch loop); 503 once closed
    server_app.prepare_request_resources(body, lambda _: view, model, kwargs)  # logit_bias, grammar, min_tokens
    call = llama_cpp.Llama.create_chat_completion if chat else llama_cpp.Llama.__call__
    try:
        if not kwargs.get("stream"):
            result = await _watched(request, view, partial(call, view, **kwargs))
            if await request.is_disconnected():
                raise HTTPException(status_code=400, detail="Client closed request")
            return result
        chunks = call(view, **kwargs)
        first = await _watched(request, view, partial(next, chunks, None))  # errors before the stream starts: 4xx
    except ValueError as exc:  # as llama_cpp.server: a prompt over the context, an option it lacks
        view.cancel()
        return _bad_request(str(exc))
    except HTTPException:
        raise
    except Exception as exc:  # noqa: BLE001 - a decode error: OpenAI's shape, not a bare 500
        view.cancel()
        return JSONResponse({"error": {"message": str(exc), "type": "internal_server_error", "param": None,
                                       "code": None}}, status_code=500)
    send, receive = anyio.create_memory_object_stream(10)
    return EventSourceResponse(receive, data_sender_callable=partial(_publish, send, request, view, first, chunks),
                               sep="\n", ping_message_factory=server_app._ping_message_factory)


async def _watched(request: Request, view: SeatedLlama, fn):
    """fn() in a worker thread; the job is cancelled if the client goes away meanwhile."""
    outcome = {}

    async def watch():
        while not await request.is_disconnected():
            await anyio.sleep(WATCH_SECONDS)
        view.cancel()

    async with anyio.create_task_group() as tg:  # no exception raised inside: anyio would wrap it in a group
        tg.start_soon(watch)
        try:
            outcome["result"] = await run_in_threadpool(fn)
        except Exception as exc:  # noqa: BLE001 - raised below
            outcome["error"] = exc
        tg.cancel_scope.cancel()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


async def _publish(send, request: Request, view: SeatedLlama, first, chunks):
    """The stream's events; whatever ends it (its end, the client gone,
    the server stopping) frees the job's seat."""
    async with send:
        try:
            if first is not None:
                await send.send(dict(data=json.dumps(first)))
                async for chunk in iterate_in_threadpool(chunks):
                    await send.send(dict(data=json.dumps(chunk)))
                    if await request.is_disconnected():
                        return
            await send.send(dict(data="[DONE]"))
        finally:
            view.cancel()


def _bad_request(message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                   "code": None}}, status_code=400)
