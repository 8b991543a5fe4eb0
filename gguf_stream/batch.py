"""Several sequences in one llama.cpp context: batched generation.

A context made with n_seq_max = k (EngineConfig.n_seq_max, llama.cpp's -np)
holds k sequences, each in its own KV cells (llama.cpp's default
non-unified cache: n_ctx / k cells per sequence). Every step decodes one
llama_batch holding the next token of every live sequence, so one pass over
the weights - one upload of every streamed layer - yields up to k tokens.
More prompts than seats queue; a finished sequence's seat (its KV cells
cleared) takes the next prompt at the following step, as llama.cpp's
parallel example does.

A step of k tokens is one ubatch of k rows and is placed as the streamer
places any decode of that size (Streamer.before_decode): under
OFFLOAD_MIN_BATCH rows the generate placement, from there on the prompt
placement, which streams every non-resident layer through the slots and
computes all rows on the GPU (never llama.cpp's op-by-op copies of host
weights). A prompt is prefilled before its sequence joins the steps; with
a unified KV cache (kv_unified) the prompts seated at one time share
decodes, as many tokens per decode as n_batch holds (BatchDecoder.prefill).

Greedy generation may carry drafts (speculative.PromptLookup or
DraftModel.draft_seats): a sequence's rows of a step are its last token and the
drafts, its tokens the model's picks while they match the drafts (the
rejected drafts' cells freed): several tokens per sequence per pass, the
tokens it gets without drafts.
"""
from __future__ import annotations

import time
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np

from .errors import DecodeError


@dataclass
class SequenceResult:
    """One prompt's generation; index is its place in the prompts given."""

    index: int
    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    stop: str = ""  # "eos" (an end-of-generation token, not kept) or "length"
    prompt_seconds: float = 0.0
    generate_seconds: float = 0.0  # from its prompt's logits to its last token

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.generate_seconds if self.generate_seconds > 0 else 0.0


@dataclass
class BatchResult:
    sequences: list[SequenceResult]  # in the order of the prompts
    seconds: float  # wall time of the whole batch, prompts included
    generate_seconds: float  # wall time of the generation steps
    steps: int  # llama_decode calls of generated tokens (each one pass over the weights)
    max_parallel: int  # the most sequences decoded in one step
    drafted: int = 0  # drafted tokens decoded in steps, of which the model's picks accepted
    accepted: int = 0

    @property
    def n_generated(self) -> int:
        return sum(len(s.tokens) for s in self.sequences)

    @property
    def tokens_per_step(self) -> float:
        return self.n_generated / self.steps if self.steps else 0.0

    @property
    def aggregate_tps(self) -> float:
        """Generated tokens of all sequences per second of generation steps."""
        return self.n_generated / self.generate_seconds if self.generate_seconds > 0 else 0.0


class TokenBatch:
    """A llama_batch of up to `capacity` tokens, one sequence id each."""

    def __init__(self, lc, capacity: int):
        self._lc, self.capacity = lc, capacity
        self.batch = lc.llama_batch_init(capacity, 0, 1)

    def fill(self, entries) -> None:
        """entries: (token, position, sequence, wants logits) tuples."""
        if len(entries) > self.capacity:
            raise ValueError(f"{len(entries)} tokens do not fit a batch of {self.capacity}")
        b = self.batch
        for i, (tok, pos, seq, out) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, bool(out)
            b.seq_id[i][0] = seq
        b.n_tokens = len(entries)

    def close(self) -> None:
        if self.batch is not None:
            self._lc.llama_batch_free(self.batch)
            self.batch = None


@dataclass
class _Seat:
    seq: int  # the llama.cpp sequence id
    result: SequenceResult
    pos: int  # the next token's position
    last: int = -1  # the token the next step decodes
    pick: object = None  # logits -> token
    t0: float = 0.0


def check_prompts(model, prompts, n_tokens: int) -> list[list[int]]:
    """Token lists that fit a sequence's cells with n_tokens more, or a
    one-line ValueError naming the prompt."""
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__"):
        raise ValueError("prompts must be a list of token lists")
    if not prompts:
        raise ValueError("give at least one prompt")
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens must be a positive integer, got {n_tokens!r:.40}")
    cells = cells_per_sequence(model)
    n_vocab = model.n_vocab
    out = []
    if model.config.kv_unified:  # one cache: the sequences seated together must fit it together
        need = sorted((len(p) + n_tokens for p in prompts), reverse=True)[:model.config.n_seq_max]
        if sum(need) > cells:
            raise ValueError(f"{len(need)} sequences at once need up to {sum(need)} KV cells, over the shared "
                             f"cache's {cells} (n_ctx {model.config.n_ctx}, kv_unified); raise n_ctx or lower "
                             "n_tokens or n_seq_max")
    for i, p in enumerate(prompts):
        p = list(p)
        if not p:
            raise ValueError(f"prompt {i} is empty")
        if any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < n_vocab for t in p):
            raise ValueError(f"prompt {i} holds token ids outside the vocabulary (0..{n_vocab - 1})")
        if len(p) + n_tokens > cells:
            raise ValueError(f"prompt {i} ({len(p)} tokens) plus {n_tokens} generated exceed a sequence's "
                             f"{cells} KV cells (n_ctx {model.config.n_ctx} / n_seq_max {model.config.n_seq_max}, "
                             "padded); "
                             "raise n_ctx or lower n_tokens")
        out.append([int(t) for t in p])
    return out


def cells_per_sequence(model) -> int:
    """KV cells a sequence of the model's context may have (llama.cpp's
    non-unified cache: n_ctx / n_seq_max, padded; unified: all of them)."""
    return model._lc.llama_n_ctx_seq(model._live_ctx())


class BatchDecoder:
    """The decodes of several sequences in one context: prompts prefilled
    (together where the KV cache is unified), then steps of one token per
    live sequence. Used by generate_batch and by the server's batch
    loop (serve_batch); the caller owns the seats (sequence ids)."""

    def __init__(self, model, stack: ExitStack, shared_prefill: bool = False):
        """shared_prefill: prompts share prefill decodes with a cache per
        sequence too (a model without a streamer, whose outputs need not be
        each prompt's alone bit for bit: a draft model's)."""
        self.model, self._lc = model, model._lc
        self._shared = shared_prefill
        self.batch = TokenBatch(self._lc, max(model.config.n_seq_max, model.config.n_batch))
        stack.callback(self.batch.close)
        self._mem = self._lc.llama_get_memory(model._live_ctx())

    def prefill(self, prompts) -> list[np.ndarray]:
        """prompts: (sequence id, tokens) pairs, each tokens at positions 0..,
        or (sequence id, tokens, start): tokens[start:] at positions start..
        (the sequence's cells hold the first start already, keep_prefix);
        returns the logits after each prompt's last token, in their order.
        With one KV cache for all sequences (kv_unified) several prompts
        share a decode where they fit in n_batch (a long one spans decodes):
        llama.cpp cuts it into ubatches of n_ubatch tokens, as one prompt's.
        With a cache per sequence llama.cpp cuts a decode of several
        sequences into ubatches of equal tokens per sequence (split_equal):
        prompts of unequal lengths give more ubatches (each a pass over the
        streamed weights) of mixed sizes, which one decode cannot place
        (Streamer.before_decode places a decode by its first ubatch), so
        there each prompt has its own decodes. A decode the streamer would
        split in two (a short tail, Streamer.decode_sizes) ends where the
        split would fall, since the split keeps only the tail's outputs."""
        entries = [(p[pos], pos, seq, (n, pos == len(p) - 1)) for n, (seq, p, *start) in enumerate(prompts)
                   for pos in range(start[0] if start else 0, len(p))]
        logits: list[np.ndarray | None] = [None] * len(prompts)
        shared = self.model.config.kv_unified or self._shared
        start = 0
        while start < len(entries):
            part = entries[start:start + self.batch.capacity]
            if not shared:  # up to the end of the first prompt in it
                part = part[:next(i for i, e in enumerate(part) if e[3][1] or i == len(part) - 1) + 1]
            part = part[:_unsplit(self.model, len(part))]
            self.batch.fill([(t, pos, seq, last) for t, pos, seq, (_, last) in part])
            _decode(self.model, self.batch)
            for i, (_, _, _, (n, last)) in enumerate(part):
                if last:
                    logits[n] = _logits(self.model, i)
            start += len(part)
        return logits

    def step(self, entries) -> list[np.ndarray]:
        """entries: (token, position, sequence id) of each live sequence (or
        a sequence's drafts, in position order); the logits after each, in
        their order. One decode: one pass over the weights. The rows go to
        llama.cpp by sequence id: with a cache per sequence it puts only
        consecutive increasing sequence ids in one ubatch
        (llama_batch_allocr::split_equal), and each more ubatch is one more
        pass over the streamed weights (seats taken out of order, e.g. a
        prompt-cache hit on seat 1 before seat 0, doubled a step's time)."""
        order = sorted(range(len(entries)), key=lambda i: (entries[i][2], entries[i][1]))
        self.batch.fill([(entries[i][0], entries[i][1], entries[i][2], True) for i in order])
        _decode(self.model, self.batch)
        rows: list[np.ndarray | None] = [None] * len(entries)
        for row, i in enumerate(order):
            rows[i] = _logits(self.model, row)
        return rows

    def clear(self, seq: int) -> None:
        """Free a sequence's KV cells (its seat can take another prompt)."""
        self._lc.llama_memory_seq_rm(self._mem, seq, -1, -1)

    def keep_prefix(self, seq: int, n: int) -> int:
        """Keep a sequence's cells of positions 0..n-1 and free the rest; how
        many were kept: n, or 0 where the cache cannot keep that prefix (a
        sliding-window cache that has dropped its start, or llama.cpp
        refusing a partial removal), which then holds nothing of the sequence."""
        lc, mem = self._lc, self._mem
        if n > 0 and lc.llama_memory_seq_pos_min(mem, seq) == 0 and lc.llama_memory_seq_rm(mem, seq, n, -1):
            return n
        self.clear(seq)
        return 0

    def drop_rejected(self, seq: int, n: int) -> None:
        """After a verify: keep a sequence's cells of positions 0..n-1 (its
        accepted tokens), free those of its rejected drafts."""
        if not self.keep_prefix(seq, n):
            raise DecodeError("llama.cpp could not free the rejected drafts' KV cells (a sliding-window or recurrent "
                              "cache): generate without drafts (no --lookup / -md)")


def _unsplit(model, n: int) -> int:
    """The most of n tokens one llama_decode takes without the streamer splitting it."""
    streamer = getattr(model, "streamer", None)
    return n if streamer is None else streamer.decode_sizes(n)[0]


def common_start(a, b) -> int:
    """How many leading tokens a and b share."""
    m = min(len(a), len(b))
    if a[:m] == b[:m]:  # the usual case (one continues the other): one comparison in C
        return m
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def verified_picks(rows, draft: list[int]) -> list[int]:
    """Greedy picks of a sequence's step rows (its last token, then its
    drafts): the model's while they match the drafts, then its own."""
    picks = []
    for row, d in zip(rows, draft + [None]):
        picks.append(int(np.argmax(row)))
        if picks[-1] != d:
            break
    return picks


def draft_share(model, n_live: int, n_drafting: int, n_draft: int) -> int:
    """Drafts each of n_drafting sequences may add to a step of n_live:
    within n_ubatch rows and one decode the streamer does not split (a
    split would lose the first part's outputs)."""
    rows = _unsplit(model, max(min(model.config.n_ubatch, n_live * (1 + n_draft)), n_live))
    return (rows - n_live) // max(1, n_drafting)


def _keep_verified(decoder, seat: _Seat, rows, draft: list[int], take) -> tuple[bool, int]:
    """A seat's step rows: its picks (take) while they match its drafts; the
    rejected drafts' cells freed. (whether it goes on, drafts accepted)"""
    used, alive = 0, True
    for row in rows[:len(verified_picks(rows, draft)) if draft else 1]:  # no drafts: one row, take picks it
        used += 1
        alive = take(seat, row)
        if not alive:
            break
    seat.pos += used
    if alive and draft:
        decoder.drop_rejected(seat.seq, seat.pos)
    return alive, used - 1


def generate_batch(model, prompts, n_tokens: int, *, sampling=None, stop_at_eog: bool = True,
                   on_done=None, drafter=None) -> BatchResult:
    """Generate up to n_tokens after each prompt (token lists), up to
    model.config.n_seq_max of them at a time in one context. sampling: a
    sampling.SamplingParams (None: greedy), one sampler chain per sequence,
    each seeded alike, so a sequence's tokens are those it would get alone.
    on_done(SequenceResult) is called as each finishes. The KV cache is
    cleared first and left holding nothing of these sequences. Prompts seated
    at once are prefilled together (BatchDecoder.prefill; sharing decodes
    with kv_unified); a prompt's prompt_seconds is the wall time of that prefill.
    drafter (greedy only): its draft_seats drafts each step's rows."""
    prompts = check_prompts(model, prompts, n_tokens)
    if drafter is not None and sampling is not None and not sampling.greedy:
        raise ValueError("drafts are checked against greedy picks: give greedy sampling, or no drafter")
    k = model.config.n_seq_max
    model.reset()
    queue = deque(enumerate(prompts))
    free = list(range(k - 1, -1, -1))  # sequence ids, popped from the end: 0 first
    seats: list[_Seat] = []
    results: list[SequenceResult | None] = [None] * len(prompts)
    steps = max_parallel = drafted = accepted = 0
    t_start = time.perf_counter()
    t_gen = 0.0
    with ExitStack() as stack:
        decoder = BatchDecoder(model, stack)

        def finish(seat: _Seat, stop: str) -> None:
            seat.result.stop = stop
            seat.result.generate_seconds = time.perf_counter() - seat.t0
            decoder.clear(seat.seq)
            free.append(seat.seq)
            results[seat.result.index] = seat.result
            if on_done is not None:
                on_done(seat.result)

        def take(seat: _Seat, logits) -> bool:
            """Pick the seat's next token; False when the sequence ends."""
            tok = seat.pick(logits)
            if stop_at_eog and model.is_eog(tok):
                finish(seat, "eos")
                return False
            seat.result.tokens.append(tok)
            if len(seat.result.tokens) >= n_tokens:
                finish(seat, "length")
                return False
            seat.last = tok
            return True

        while queue or seats:
            new = []
            while queue and free:  # seat waiting prompts
                index, prompt = queue.popleft()
                seat = _Seat(free.pop(), SequenceResult(index, prompt), pos=len(prompt))
                seat.pick = _picker(model, sampling, prompt, stack)
                new.append(seat)
            if new:
                t0 = time.perf_counter()
                first = decoder.prefill([(s.seq, s.result.prompt_tokens) for s in new])
                t1 = time.perf_counter()
                for seat, logits in zip(new, first):
                    seat.result.prompt_seconds, seat.t0 = t1 - t0, t1
                    if take(seat, logits):
                        seats.append(seat)
            if not seats:
                continue
            t0 = time.perf_counter()
            drafts = [[] for _ in seats]
            if drafter is not None:
                share = draft_share(model, len(seats), len(seats), drafter.n_draft)
                drafts = drafter.draft_seats([(s.seq, s.result.prompt_tokens + s.result.tokens,
                                               min(share, n_tokens - len(s.result.tokens) - 1)) for s in seats])
            out = iter(decoder.step([(t, s.pos + i, s.seq) for s, d in zip(seats, drafts)
                                     for i, t in enumerate([s.last] + d)]))
            steps += 1
            max_parallel = max(max_parallel, len(seats))
            live = []
            for s, d in zip(seats, drafts):
                alive, n = _keep_verified(decoder, s, [next(out) for _ in range(1 + len(d))], d, take)
                drafted, accepted = drafted + len(d), accepted + n
                if alive:
                    live.append(s)
            seats = live
            t_gen += time.perf_counter() - t0
    model._vram_sample()
    return BatchResult([r for r in results], time.perf_counter() - t_start, t_gen, steps, max_parallel, drafted,
                       accepted)


def _picker(model, sampling, prompt: list[int], stack: ExitStack):
    if sampling is None or sampling.greedy:
        return lambda logits: int(np.argmax(logits))
    from .sampling import Sampler

    sampler = Sampler(model, sampling)
    stack.callback(sampler.close)
    sampler.feed_prompt(prompt)
    return sampler.sample


def _decode(model, batch: TokenBatch) -> None:
    rc = model._decode(batch.batch)
    if rc != 0:
        raise DecodeError(f"llama_decode returned {rc} (1: no KV cells left for the batch; 2: aborted; <0: error)")


def _logits(model, i: int) -> np.ndarray:
    """Logits of the i-th output of the last decode (-1: the last one), a copy."""
    ptr = model._lc.llama_get_logits_ith(model.ctx, i)
    if not ptr:
        raise DecodeError(f"llama.cpp has no logits for output {i} of the last decode")
    return np.ctypeslib.as_array(ptr, shape=(model.n_vocab,)).copy()
