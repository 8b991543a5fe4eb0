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

With prompt lookup (--lookup N) or a draft model (-md, --draft-max N), a
greedy job's step carries its last token and up to N tokens drafted from its
own text (speculative.PromptLookup, DraftModel.draft_seats: the draft model's
context has a sequence per seat, every seat's drafts from N decodes); the
rows whose drafts match the model's picks are kept, the rest of the seat's
cells freed: several tokens per pass, the same tokens as without drafts.

The HTTP side (serve_routes.py) puts requests in as jobs and takes their
tokens out; embeddings run in the loop between jobs (run_exclusive), since
they clear the cache.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass, field

from . import llama_abi
from .batch import BatchDecoder, cells_per_sequence, common_start, draft_share, verified_picks
from .errors import DecodeError
from .sampling import Sampler, SamplingParams
from .speculative import SpeculativeResult

import numpy as np  # noqa: E402  (after llama.cpp: gguf_stream first)
from fastapi import HTTPException

log = logging.getLogger("gguf_stream.server")
_END = object()  # a job's last queue item
# A free seat's cells serve a new prompt when they hold at least this
# share of its start (llama-server's --slot-prompt-similarity default)
PROMPT_SIMILARITY = 0.5


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
    drafts: SpeculativeResult | None = None  # the drafts' counts (greedy jobs, with a drafter)
    prefill_seconds: float = 0.0  # wall time of the prefill decodes it took part in
    prefilled_at: float = 0.0  # perf_counter when its first token's logits came

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

    def __init__(self, llm, prompt_cache: bool = True, drafter=None):
        """drafter: speculative.make_drafter's (PromptLookup, DraftModel) for greedy jobs; the loop closes it."""
        self.session = LlamaSession(llm)
        self.prompt_cache = prompt_cache  # free seats keep their cells for prompts that continue them
        self.drafter = drafter
        self.drafted = self.accepted = 0  # drafted tokens, over all jobs
        c = self.session.config
        self.n_seats = c.n_seq_max
        cells = cells_per_sequence(self.session)
        # a unified cache (-kvu; --embedding makes one too) is shared: each seat is promised its share
        self.unified = unified = cells == self.session._lc.llama_n_ctx(self.session.ctx)
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
        """End every job (their requests get an error), then the thread, then
        the drafter (a draft model). Idempotent."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()
        if self.drafter is not None:
            self.drafter.close()

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
        the other seats' cells for the prompts that may continue them; either
        way, without -kvu, one next to the busy seats first (_runs_with). At
        least the prompt's last token is decoded again (its logits start
        the reply)."""
        def held(seat):
            n = common_start(self._kept[seat][0], prompt[:-1])
            return n if n >= PROMPT_SIMILARITY * len(prompt) else 0

        found = {s: held(s) for s in free if s in self._kept}
        best = max(found, key=lambda s: (found[s], -s), default=None)
        if best is not None and found[best]:
            return best, found[best]
        empty = [s for s in free if s not in self._kept]
        if empty:
            return min(empty, key=lambda s: (self._runs_with(s, free), s)), 0
        return min(free, key=lambda s: (self._runs_with(s, free), self._kept[s][1])), 0

    def _runs_with(self, seat: int, free: list[int]) -> int:
        """Runs of consecutive busy seats once `seat` is taken: without a
        unified cache llama.cpp puts only consecutive sequence ids in one
        ubatch, so each run is a pass over the streamed weights per step
        (0 with -kvu, where one pass serves them all)."""
        if self.unified:
            return 0
        busy = sorted(set(range(self.n_seats)).difference(free) | {seat})
        return 1 + sum(b != a + 1 for a, b in zip(busy, busy[1:]))

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
        t0 = time.perf_counter()
        first = decoder.prefill([(job.seq, job.prompt, job.cached) for job in ready]) if ready else []
        now = time.perf_counter()
        for job, logits in zip(ready, first):
            job.prefilled, job.prefill_seconds, job.prefilled_at = True, now - t0, now
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
            picks = verified_picks(rows, draft)
            n_past = len(job.prompt) + len(job.tokens) + len(picks) - 1
            try:
                decoder.drop_rejected(job.seq, n_past)
            except DecodeError as e:
                self._leave(decoder, job, e, keep=False)
                continue
            job.drafts.passes += 1
            job.drafts.drafted += len(draft)
            job.drafts.accepted += len(picks) - 1
            self.drafted, self.accepted = self.drafted + len(draft), self.accepted + len(picks) - 1
            for token, row in zip(picks, rows):
                if not self._take(decoder, job, row, token):
                    break

    def _drafts(self, jobs: list[Job]) -> list[list[int]]:
        """The drafts of each drafting job (none for the others), within its
        token limit, its seat's cells and one decode the streamer does not
        split (a split would lose the first part's outputs)."""
        if self.drafter is None:
            return [[] for _ in jobs]
        share = draft_share(self.session, len(jobs), sum(j.drafts is not None for j in jobs), self.drafter.n_draft)
        asks = []
        for j in jobs:
            n = len(j.prompt) + len(j.tokens)
            room = min(share, j.limit - len(j.tokens) - 1, self.cells - n - 1)
            asks.append((j.seq, j.prompt + j.tokens, room if j.drafts is not None else 0))
        try:
            return self.drafter.draft_seats(asks)
        except Exception as exc:  # noqa: BLE001 - drafts are optional: the requests go on without them
            log.warning(f"drafting failed ({type(exc).__name__}: {exc}); the requests go on without drafts")
            self.drafter.close()
            self.drafter = None
            return [[] for _ in jobs]

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
        if job.prefilled:  # as llama-server's timings per slot
            seconds = time.perf_counter() - job.prefilled_at
            log.info(f"slot {job.seq}: prompt {len(job.prompt)} tokens, {job.cached} from the cache, "
                     f"{len(job.prompt) - job.cached} decoded in {job.prefill_seconds:.3f} s; generated "
                     f"{len(job.tokens)} tokens in {seconds:.3f} s ({len(job.tokens) / max(seconds, 1e-9):.1f} t/s)")
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
