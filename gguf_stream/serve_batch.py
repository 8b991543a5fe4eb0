"""Continuous batching for ``gguf-stream serve -np N`` (N > 1), as llama-server's slots.

One thread (BatchLoop) owns the model's context. A completion request is a
Job: it waits for a free seat (a sequence id of the context, llama.cpp's
slot), is prefilled (batch.BatchDecoder.prefill: with -kvu the prompts
seated together share decodes), then each step decodes the next token of
every seated job in one llama_decode (one pass over the streamed weights).
A job leaves its seat at its token limit, at an end-of-generation token,
or when its request is done with it (a stop string, a client that went
away): the seat takes the next waiting job at the following step. A seat
keeps the KV cells of its last job's tokens until then, and a waiting job
takes the free seat whose cells hold the longest start of its prompt, which
is not decoded again (llama-server's prompt cache: a chat client resends the
whole conversation each turn).

With prompt lookup (--lookup N), a greedy job's step carries its last token
and up to N tokens drafted from its own text (speculative.PromptLookup); the
rows whose drafts match the model's picks are kept, the rest of the seat's
cells freed: several tokens per pass, the same tokens as without drafts.

The HTTP side reuses llama-cpp-python: a request's completion runs
``llama_cpp.Llama``'s own create_completion / create_chat_completion (chat
templates, stop strings, response and stream-chunk shapes) on a SeatedLlama,
a per-request view of the StreamedLlama whose ``generate`` yields the
tokens the loop produces for its job instead of decoding itself. The
routes (install_routes) shadow llama_cpp.server's completion routes, which
hold a lock for a whole request; embeddings still go through its routes
and run in the loop between jobs (run_exclusive), since they clear the cache.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial

from . import llama_abi
from .batch import BatchDecoder, _unsplit, cells_per_sequence
from .sampling import Sampler, SamplingParams
from .speculative import PromptLookup, SpeculativeResult

import anyio  # noqa: E402  (after llama.cpp: gguf_stream first)
import llama_cpp
import numpy as np
from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from llama_cpp.server import app as server_app
from llama_cpp.server import types as server_types
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

log = logging.getLogger("gguf_stream.server")
_END = object()  # a job's last queue item
WATCH_SECONDS = 0.1  # how often a waiting request checks that its client is still there
# Llama.generate's options the loop's sampler chain does not have
UNSUPPORTED = {"typical_p": 1.0, "tfs_z": 1.0, "mirostat_mode": 0}
# A free seat's cells serve a new prompt when they hold at least this
# share of its start (llama-server's --slot-prompt-similarity default)
PROMPT_SIMILARITY = 0.5
COMPLETION_PATHS = ("/v1/completions", "/v1/engines/copilot-codex/completions")
CHAT_PATH = "/v1/chat/completions"


class LlamaSession:
    """A StreamedLlama as batch.BatchDecoder and sampling.Sampler see a
    model.py session: its context, engine config and vocabulary."""

    def __init__(self, llm):
        self.llm, self._lc = llm, llama_abi.llama()
        self.streamer = llm._streamer
        self.config = llm._streamer.config
        self.vocab = llm._model.vocab
        self.n_vocab = llm.n_vocab()

    @property
    def ctx(self):
        return self.llm._ctx.ctx

    def _live_ctx(self):
        return self.ctx

    def _decode(self, batch) -> int:
        return self.streamer.decode(self.ctx, batch)

    def is_eog(self, token: int) -> bool:
        return bool(self._lc.llama_vocab_is_eog(self.vocab, token))

    def reset(self) -> None:
        self.llm._ctx.kv_cache_clear()
        self.llm.n_tokens = 0  # Llama's own record of what the cache holds


@dataclass(eq=False)
class Job:
    """One request's generation: tokens go to `out` as the loop makes them,
    then _END (or an exception). Only the latest logits are kept (a slow
    client's queue holds token ids, not a vocabulary's floats per token)."""

    prompt: list[int]
    limit: int  # tokens at most
    sampling: SamplingParams
    processors: object = None  # llama_cpp LogitsProcessorList (logit_bias, min_tokens), or None
    out: queue.Queue = field(default_factory=queue.Queue)
    cancelled: bool = False
    seq: int = -1  # its seat, once seated
    cached: int = 0  # tokens at the start of its prompt its seat's cells already hold
    prefilled: bool = False  # its prompt is in its seat's cells
    tokens: list[int] = field(default_factory=list)
    pick: object = None
    closer: object = None
    logits: np.ndarray | None = None  # of the latest token
    drafts: SpeculativeResult | None = None  # prompt lookup's counts (greedy jobs, --lookup)

    def choose(self, logits: np.ndarray) -> int:
        if self.processors is not None:
            ids = np.array(self.prompt + self.tokens, dtype=np.intc)
            logits = np.asarray(self.processors(ids, logits), dtype=np.float32)
        return self.pick(logits)


class _Exclusive:
    """A call the loop runs with no job seated (it may clear the cache)."""

    def __init__(self, fn):
        self.fn, self.done, self.result, self.error = fn, threading.Event(), None, None
        self.cancelled = False


class BatchLoop:
    """The thread that owns the context; jobs in, tokens out."""

    def __init__(self, llm, lookup: int | None = None, prompt_cache: bool = True):
        self.session = LlamaSession(llm)
        self.prompt_cache = prompt_cache  # free seats keep their cells for prompts that continue them
        self.drafter = PromptLookup(lookup) if lookup else None
        self.drafted = self.accepted = 0  # prompt lookup's tokens, over all jobs
        c = self.session.config
        self.n_seats = c.n_seq_max
        cells = cells_per_sequence(self.session)
        # a unified cache (-kvu; --embedding makes one too) is shared: each seat is promised its share
        unified = cells == self.session._lc.llama_n_ctx(self.session.ctx)
        self.cells = cells // self.n_seats if unified else cells
        self._cond = threading.Condition()
        self._waiting: deque = deque()
        self._seated: dict[int, Job] = {}
        self._kept: dict[int, tuple[list[int], int]] = {}  # a free seat: the tokens its KV cells hold, when left
        self.prompt_tokens = self.cached_tokens = 0  # prompts' tokens, of which found in their seat's cells
        self._closing = False
        self.steps = self.generated = self.max_parallel = 0  # decodes of steps, tokens, most rows in one
        self._thread = threading.Thread(target=self._run, name="gguf-stream-batch", daemon=True)
        self._thread.start()

    # -- the request side --
    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closing:
                raise HTTPException(status_code=503, detail="the server is shutting down")
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job) -> None:
        """The job's request is done with it: out of the queue, or out of its seat at the next step."""
        with self._cond:
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)
                if isinstance(job, Job):
                    job.out.put(_END)
            self._cond.notify()

    def run_exclusive(self, fn):
        """fn() in the loop's thread once no job is seated (new jobs wait behind it)."""
        call = _Exclusive(fn)
        with self._cond:
            if self._closing:
                raise HTTPException(status_code=503, detail="the server is shutting down")
            self._waiting.append(call)
            self._cond.notify()
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result

    def slots(self) -> list[dict]:
        """llama-server's /slots, in short: each seat, busy or free."""
        with self._cond:
            seated = dict(self._seated)
            kept = {i: len(t) for i, (t, _) in self._kept.items()}
        return [{"id": i, "is_processing": i in seated,
                 **({"n_prompt_tokens": len(seated[i].prompt), "n_cached_tokens": seated[i].cached,
                     "n_decoded": len(seated[i].tokens)} if i in seated else {"n_kept_tokens": kept.get(i, 0)})}
                for i in range(self.n_seats)]

    def health(self) -> dict:
        """/health's slot counts, as llama-server's."""
        with self._cond:
            busy = len(self._seated)
            waiting = sum(isinstance(j, Job) for j in self._waiting)
        return {"slots_idle": self.n_seats - busy, "slots_processing": busy, "requests_waiting": waiting}

    def close(self) -> None:
        """End every job (their requests get an error), then the thread. Idempotent."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()

    # -- the loop --
    def _run(self) -> None:
        with ExitStack() as stack:
            decoder = BatchDecoder(self.session, stack)
            while True:
                with self._cond:
                    while not (self._closing or self._waiting or self._seated):
                        self._cond.wait()
                    if self._closing:
                        break
                    exclusive, new = self._admit()
                try:
                    if exclusive is not None:
                        self._run_exclusive(exclusive)
                        continue
                    self._drop_cancelled(decoder)
                    if new:
                        self._prefill(decoder, new)
                    if self._seated:
                        self._step(decoder)
                except Exception as exc:  # noqa: BLE001 - every seated request gets it; the loop goes on
                    self._fail_all(decoder, exc)
            self._fail_all(decoder, HTTPException(status_code=503, detail="the server is shutting down"))
            with self._cond:
                for job in self._waiting:
                    if isinstance(job, Job):
                        job.out.put(HTTPException(status_code=503, detail="the server is shutting down"))
                    else:
                        job.error = HTTPException(status_code=503, detail="the server is shutting down")
                        job.done.set()
                self._waiting.clear()

    def _admit(self):
        """Under the lock: an exclusive call (once no job is seated), or the
        waiting jobs that free seats take, in their order."""
        if self._waiting and isinstance(self._waiting[0], _Exclusive):
            if self._seated:
                return None, []
            return self._waiting.popleft(), []
        free = [s for s in range(self.n_seats) if s not in self._seated]
        new = []
        while self._waiting and free and isinstance(self._waiting[0], Job):
            job = self._waiting.popleft()
            job.seq, job.cached = self._best_seat(job.prompt, free)
            free.remove(job.seq)
            self._seated[job.seq] = job
            new.append(job)
        return None, new

    def _best_seat(self, prompt: list[int], free: list[int]) -> tuple[int, int]:
        """(seat, tokens of the prompt its cells hold) among the free seats:
        the one holding the longest start of the prompt where that is at
        least PROMPT_SIMILARITY of it (llama-server's slot choice; a shared
        BOS alone would only make the prompt's decodes differ from a fresh
        run's); else an empty seat, else the one left longest ago, keeping
        the other seats' cells for the prompts that may continue them. At
        least the prompt's last token is decoded again (its logits start
        the reply)."""
        def held(seat):
            n = 0
            for a, b in zip(self._kept[seat][0], prompt[:-1]):
                if a != b:
                    break
                n += 1
            return n if n >= PROMPT_SIMILARITY * len(prompt) else 0

        best = max((s for s in free if s in self._kept), key=lambda s: (held(s), -s), default=None)
        if best is not None and held(best):
            return best, held(best)
        empty = [s for s in free if s not in self._kept]
        return (empty[0] if empty else min(free, key=lambda s: self._kept[s][1])), 0

    def _run_exclusive(self, call: _Exclusive) -> None:
        try:
            call.result = call.fn()
        except BaseException as exc:  # noqa: BLE001 - handed to its caller
            call.error = exc
        finally:
            self.session.reset()  # nothing of it stays for the jobs' sequences
            with self._cond:
                self._kept.clear()
            call.done.set()

    def _prefill(self, decoder: BatchDecoder, new: list[Job]) -> None:
        ready = []
        for job in new:
            if job.cancelled:
                continue  # _drop_cancelled ended it
            try:
                if job.sampling.greedy:
                    job.pick = _argmax
                    if self.drafter is not None and job.processors is None:
                        job.drafts = SpeculativeResult()
                else:
                    # the prompt is not fed to the repeat penalty: llama_cpp.Llama's chain sees
                    # only the tokens it samples, and a request gets what -np 1 gives it
                    sampler = Sampler(self.session, job.sampling)
                    job.pick, job.closer = sampler.sample, sampler.close
                ready.append(job)
            except Exception as exc:  # noqa: BLE001 - this request's error
                self._leave(decoder, job, exc)
        for job in ready:  # the seat's cells: the start of this prompt they hold, nothing else
            job.cached = decoder.keep_prefix(job.seq, job.cached)
            with self._cond:
                self._kept.pop(job.seq, None)
            self.prompt_tokens += len(job.prompt)
            self.cached_tokens += job.cached
        first = decoder.prefill([(job.seq, job.prompt, job.cached) for job in ready]) if ready else []
        for job, logits in zip(ready, first):
            job.prefilled = True
            self._take(decoder, job, logits)

    def _step(self, decoder: BatchDecoder) -> None:
        jobs = list(self._seated.values())
        self.steps, self.max_parallel = self.steps + 1, max(self.max_parallel, len(jobs))
        drafts = self._drafts(jobs)
        entries = []
        for j, d in zip(jobs, drafts):
            pos = len(j.prompt) + len(j.tokens) - 1
            entries += [(t, pos + i, j.seq) for i, t in enumerate([j.tokens[-1]] + d)]
        out = iter(decoder.step(entries))
        for job, draft in zip(jobs, drafts):
            rows = [next(out) for _ in range(1 + len(draft))]
            if job.drafts is None:
                self._take(decoder, job, rows[0])
                continue
            # greedy: the model's picks while they match the drafts, then its own
            picks = []
            for row, d in zip(rows, draft + [None]):
                picks.append(_argmax(row))
                if picks[-1] != d:
                    break
            n_past = len(job.prompt) + len(job.tokens) + len(picks) - 1
            if not decoder.keep_prefix(job.seq, n_past):  # the cells of the rejected drafts go
                self._leave(decoder, job, RuntimeError(
                    "llama.cpp could not free the rejected drafts' KV cells (a sliding-window or recurrent "
                    "cache): serve this model without --lookup"), keep=False)
                continue
            job.drafts.passes += 1
            job.drafts.drafted += len(draft)
            job.drafts.accepted += len(picks) - 1
            self.drafted, self.accepted = self.drafted + len(draft), self.accepted + len(picks) - 1
            for token, row in zip(picks, rows):
                if not self._take(decoder, job, row, token):
                    break

    def _drafts(self, jobs: list[Job]) -> list[list[int]]:
        """Prompt lookup's drafts of each drafting job (none for the others),
        within its token limit, its seat's cells and one decode the streamer
        does not split (a split would lose the first part's outputs)."""
        if self.drafter is None:
            return [[] for _ in jobs]
        rows = min(self.session.config.n_ubatch, len(jobs) * (1 + self.drafter.n_draft))
        rows = _unsplit(self.session, max(rows, len(jobs)))
        share = (rows - len(jobs)) // max(1, sum(j.drafts is not None for j in jobs))
        out = []
        for j in jobs:
            n = len(j.prompt) + len(j.tokens)
            room = min(share, j.limit - len(j.tokens) - 1, self.cells - n - 1)
            out.append(self.drafter.draft(j.prompt + j.tokens, room) if j.drafts is not None and room > 0 else [])
        return out

    def _take(self, decoder: BatchDecoder, job: Job, logits: np.ndarray, token: int | None = None) -> bool:
        """The job's next token (`token`, or its pick from `logits`); False
        when the job has left its seat."""
        try:
            token = job.choose(logits) if token is None else token
        except Exception as exc:  # noqa: BLE001 - its grammar or logits processor: this request's error
            self._leave(decoder, job, exc)
            return False
        job.tokens.append(token)
        self.generated += 1
        job.logits = logits
        job.out.put(token)
        if self.session.is_eog(token) or len(job.tokens) >= job.limit:
            self._leave(decoder, job, _END)
            return False
        return True

    def _drop_cancelled(self, decoder: BatchDecoder) -> None:
        for job in [j for j in self._seated.values() if j.cancelled]:
            self._leave(decoder, job, _END)

    def _leave(self, decoder: BatchDecoder, job: Job, last, keep: bool = True) -> None:
        """The job out of its seat; the seat keeps the cells of the tokens
        decoded (its prompt and all but the last token picked) for a later
        prompt that starts with them. keep=False (a failed decode: the cells
        may hold anything) and a job never prefilled (the cells are not its)
        free them."""
        kept = keep and job.prefilled and self.prompt_cache
        held = job.prompt + job.tokens[:-1]  # the tokens decoded into its cells
        if kept:  # (a drafted step may have left cells past them)
            kept = decoder.keep_prefix(job.seq, len(held)) > 0
        if not kept:
            decoder.clear(job.seq)
        if job.drafts is not None:
            job.drafts.tokens = job.tokens
            log.info(job.drafts.summary())
        if job.closer is not None:
            job.closer()
            job.closer = None
        with self._cond:  # (slots() reads both)
            self._seated.pop(job.seq, None)
            if kept:
                self._kept[job.seq] = held, self.generated
            else:
                self._kept.pop(job.seq, None)
        job.out.put(last)

    def _fail_all(self, decoder: BatchDecoder, exc: BaseException) -> None:
        for job in list(self._seated.values()):
            self._leave(decoder, job, exc, keep=False)
        with self._cond:
            seats, self._kept = list(self._kept), {}
        for seat in seats:  # the failed decode may have written any sequence's cells
            decoder.clear(seat)


def _argmax(logits: np.ndarray) -> int:
    return int(np.argmax(logits))


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
