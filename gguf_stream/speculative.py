"""Speculative decoding, greedy: a cheap drafter proposes tokens, one decode
of the model checks them all.

A streamed model pays for a pass over its weights (an upload of every
streamed layer) whatever the number of tokens in it, so a decode of the last
token plus k drafted ones costs about one token's decode and yields every
drafted token that matches the model's own greedy choice, plus one. The
output is the model's greedy output: each position's token is the argmax of
the logits the model computes for it after the tokens before it, drafts
only decide how many positions one pass computes.

Drafters: PromptLookup (n-grams of the text so far, llama.cpp's
llama-lookup / prompt lookup decoding) and DraftModel (a small model with
the same vocabulary, e.g. a StockModel fully on the GPU); for the batched
server's seats (-np N) each drafts per seat too (draft_seats: DraftModel
from one draft context with a sequence per seat).

The verify decode is a ubatch of 1 + k rows, placed like any decode of that
size (Streamer.before_decode): the generate placement below
OFFLOAD_MIN_BATCH rows.
"""
from __future__ import annotations

import inspect
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

from .batch import BatchDecoder, TokenBatch, _decode, _logits, cells_per_sequence, common_start

DEFAULT_NGRAM_MAX = 3
DEFAULT_DRAFT_MAX = 16  # llama.cpp's --draft-max
MAX_DRAFT = 256


def check_options(lookup: int | None, draft_model, draft_max: int) -> None:
    """The speculative options every front end takes (run, chat, serve,
    create_app), checked before anything loads."""
    if lookup is not None and draft_model is not None:
        raise ValueError("--lookup and --model-draft both draft; give one")
    if lookup is not None and (isinstance(lookup, bool) or not isinstance(lookup, int)
                               or not 1 <= lookup <= MAX_DRAFT):
        raise ValueError(f"--lookup must be in 1..{MAX_DRAFT} (tokens drafted per pass), got {lookup!r:.40}")
    if isinstance(draft_max, bool) or not isinstance(draft_max, int) or not 1 <= draft_max <= MAX_DRAFT:
        raise ValueError(f"--draft-max must be in 1..{MAX_DRAFT}, got {draft_max!r:.40}")


def verify_rows(lookup: int | None, draft_max: int) -> int:
    """Rows of a verify decode: the most drafts per pass and the last kept
    token (EngineConfig.generate_rows: the generate split is measured for them)."""
    return (lookup if lookup is not None else draft_max) + 1


def make_drafter(lookup: int | None, draft_path, draft_max: int, target, *, cuda: bool, config,
                 verbose: bool = False, seats: bool = False):
    """PromptLookup(lookup), or a DraftModel of the GGUF at draft_path (all
    its layers on the GPU with cuda, else in host memory) with the context
    shape of `config` (the target's EngineConfig); it must share `target`'s
    vocabulary (n_vocab, token_bytes). seats: the draft model's context has
    the target's sequences (n_seq_max, kv_unified) too, so a seat's cells
    hold what the target's may (DraftModel.draft_seats)."""
    from .model import StockModel

    if lookup is not None:
        return PromptLookup(lookup)
    c = config
    shape = dict(n_seq_max=c.n_seq_max, kv_unified=c.kv_unified) if seats else {}
    draft = StockModel(draft_path, -1 if cuda else 0, device="cuda" if cuda else "host", n_ctx=c.n_ctx,
                       n_batch=c.n_batch, n_ubatch=c.n_ubatch, n_threads=c.n_threads, flash_attn=c.flash_attn,
                       verbose=verbose, **shape)
    drafter = None
    try:
        drafter = DraftModel(draft, draft_max)
        drafter.check_vocabulary(target)
    except BaseException:
        (draft if drafter is None else drafter).close()
        raise
    return drafter


@dataclass
class SpeculativeResult:
    tokens: list[int] = field(default_factory=list)
    stop: str = ""  # "eos" (not kept) or "length"
    passes: int = 0  # verify decodes of the model (after the prompt's)
    drafted: int = 0
    accepted: int = 0
    prompt_seconds: float = 0.0
    generate_seconds: float = 0.0

    @property
    def acceptance(self) -> float:
        """Accepted drafted tokens per drafted token."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Generated tokens per decode of the model (the first comes from the prompt's)."""
        return len(self.tokens) / (self.passes + 1) if self.tokens else 0.0

    def summary(self) -> str:
        return (f"speculative: {self.accepted} of {self.drafted} drafted tokens accepted "
                f"({100 * self.acceptance:.0f}%), {self.tokens_per_pass:.2f} tokens per pass "
                f"({self.passes + 1} passes for {len(self.tokens)} tokens)")


class PromptLookup:
    """Drafts from the context itself: the tokens that followed the latest
    earlier occurrence of its last n tokens (n from ngram_max down to
    ngram_min), at most n_draft of them."""

    def __init__(self, n_draft: int, ngram_max: int = DEFAULT_NGRAM_MAX, ngram_min: int = 1):
        if not 1 <= n_draft <= MAX_DRAFT or not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"prompt lookup needs 1 <= n_draft <= {MAX_DRAFT} and 1 <= ngram_min <= ngram_max, got "
                             f"{n_draft}, {ngram_min}, {ngram_max}")
        self.n_draft, self.ngram_max, self.ngram_min = n_draft, ngram_max, ngram_min

    def draft(self, context: list[int], n: int) -> list[int]:
        n = min(n, self.n_draft)
        for size in range(min(self.ngram_max, len(context) - 1), self.ngram_min - 1, -1):
            tail = context[-size:]
            for start in range(len(context) - size - 1, -1, -1):  # the latest match first
                if context[start:start + size] == tail:
                    return context[start + size:start + size + n]
        return []

    def draft_seats(self, requests) -> list[list[int]]:
        """requests: (seat, context, n) each; the drafts of each context."""
        return [self.draft(context, n) if n > 0 else [] for _, context, n in requests]

    def close(self) -> None:
        pass


class DraftModel:
    """Drafts greedily with a small model (a model.py session) of the same
    vocabulary, for one sequence (draft) or for the batch loop's seats at
    once (draft_seats: a context with a sequence per seat, -np N). A
    sequence's cells follow the text last drafted for it: only what changed
    is decoded again (a seat's next step brings the tokens the target kept,
    all seats' in one decode), and the k drafts of every seat come from k
    decodes of one row per seat (BatchDecoder). close() closes the model too."""

    def __init__(self, model, n_draft: int):
        if not 1 <= n_draft <= MAX_DRAFT:
            raise ValueError(f"n_draft must be in 1..{MAX_DRAFT}, got {n_draft}")
        self.model, self.n_draft = model, n_draft
        self._stack = ExitStack()
        try:  # the seats' new tokens in shared decodes (no streamer to place them)
            self.decoder = BatchDecoder(model, self._stack, shared_prefill=getattr(model, "streamer", None) is None)
        except BaseException:
            self._stack.close()
            raise
        self._seen: dict[int, list[int]] = {}  # per sequence, the tokens in its cells

    def check_vocabulary(self, target) -> None:
        """The draft model must tokenize as the target does (llama.cpp checks the same)."""
        d, t = self.model, target
        same = d.n_vocab == t.n_vocab and all(d.token_bytes(i) == t.token_bytes(i)
                                              for i in range(0, t.n_vocab, max(t.n_vocab // 64, 1)))
        if not same:
            raise ValueError(f"the draft model's vocabulary ({d.n_vocab} tokens) differs from the model's "
                             f"({t.n_vocab}); give a draft model of the same family")

    def draft(self, context: list[int], n: int) -> list[int]:
        """Up to n drafted tokens after context (sequence 0), within its cells."""
        return self.draft_seats([(0, context, min(n, cells_per_sequence(self.model) - len(context)))])[0]

    def draft_seats(self, requests) -> list[list[int]]:
        """requests: (seat, context, n) each; up to n drafted tokens after each
        context (the caller keeps context + n within a seat's cells)."""
        out: list[list[int]] = [[] for _ in requests]
        live = [(i, seat, list(context), min(n, self.n_draft)) for i, (seat, context, n) in enumerate(requests)
                if n > 0]
        if not live:
            return out
        try:
            starts = []
            for _, seat, context, _ in live:
                # at least the last token decoded again: its logits draft the first
                common = self.decoder.keep_prefix(seat, common_start(self._seen.get(seat, []), context[:-1]))
                starts.append((seat, context, common))
                self._seen[seat] = list(context)  # (grows with the drafts decoded; context must not)
            logits = self.decoder.prefill(starts)
            while live:
                entries, going = [], []
                for (i, seat, context, n), row in zip(live, logits):
                    out[i].append(int(np.argmax(row)))
                    if len(out[i]) < n:  # the last draft needs no decode
                        entries.append((out[i][-1], len(context) + len(out[i]) - 1, seat))
                        self._seen[seat].append(out[i][-1])
                        going.append((i, seat, context, n))
                live = going
                if live:
                    logits = self.decoder.step(entries)
        except BaseException:
            self._seen.clear()  # a failed decode may have left any seat's cells half written
            self.model.reset()
            raise
        return out

    def close(self) -> None:
        self._stack.close()
        self.model.close()


def generate_speculative(model, prompt: list[int], n_tokens: int, drafter, *, stop_at_eog: bool = True,
                         on_token=None) -> SpeculativeResult:
    """Greedy generation of up to n_tokens after prompt with drafts checked
    in one decode each; the tokens equal model.generate's. on_token(token)
    is called for each generated token in order (not for an end token)."""
    lc, ctx = model._lc, model._live_ctx()
    if not prompt:
        raise ValueError("the prompt is empty")
    if len(prompt) + n_tokens > model.config.n_ctx:
        raise ValueError(f"the prompt ({len(prompt)} tokens) plus {n_tokens} exceed the context "
                         f"({model.config.n_ctx}); raise n_ctx or lower n_tokens")
    r = SpeculativeResult()
    model.reset()
    mem = lc.llama_get_memory(ctx)
    t0 = time.perf_counter()
    model.eval(prompt)
    r.prompt_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_draft = min(getattr(drafter, "n_draft", 16), model.config.n_batch - 1)
    batch = TokenBatch(lc, 1 + n_draft)
    context = list(prompt)

    def emit(tok: int) -> bool:
        """Keep the model's token; False when generation ends."""
        if stop_at_eog and model.is_eog(tok):
            r.stop = "eos"
            return False
        r.tokens.append(tok)
        context.append(tok)
        if on_token is not None:
            on_token(tok)
        if len(r.tokens) >= n_tokens:
            r.stop = "length"
            return False
        return True

    try:
        pending = model.logits()  # for the position after the KV cache's tokens
        n_past = len(prompt)
        while True:
            tok = int(np.argmax(pending))
            if not emit(tok):
                return r
            room = min(n_draft, n_tokens - len(r.tokens) - 1, model.config.n_ctx - n_past - 1)
            draft = drafter.draft(context, room) if room > 0 else []
            batch.fill([(t, n_past + j, 0, True) for j, t in enumerate([tok] + draft)])
            _decode(model, batch)
            r.passes += 1
            r.drafted += len(draft)
            rows = [_logits(model, j) for j in range(len(draft) + 1)]
            accepted = 0
            for j, d in enumerate(draft):
                if int(np.argmax(rows[j])) != d:
                    break
                accepted += 1
                r.accepted += 1
                if not emit(d):
                    return r
            n_past += 1 + accepted
            lc.llama_memory_seq_rm(mem, 0, n_past, -1)  # the rejected drafts' cells
            pending = rows[accepted]
    finally:
        batch.close()
        r.generate_seconds = time.perf_counter() - t0
        model._vram_sample()


class LlamaDrafter:
    """A drafter (PromptLookup, DraftModel) behind llama-cpp-python's
    draft_model interface (llama_cpp.llama_speculative.LlamaDraftModel: called
    with the context's token ids, returns the draft), so StreamedLlama -
    chat, serve - drafts as run does; Llama.generate checks the drafts in one
    decode. `drafter` may be set after the StreamedLlama exists (a draft
    model sized from its context).

    Counts one generation (Llama.generate's call, `counted` below) in
    `result`: a call is one pass (a verify decode follows each); a generated
    token equal to the pass's next drafted one is an accepted draft."""

    def __init__(self, drafter=None):
        self.drafter = drafter
        self.drafting = True  # off for a generation that samples (see counted)
        self.begin()

    def begin(self, drafting: bool = True) -> None:
        self.drafting, self.result = drafting, SpeculativeResult()
        self._draft, self._next = [], 0

    @property
    def passes(self) -> int:
        return self.result.passes

    def __call__(self, input_ids, /, **kwargs):
        self.result.passes += 1
        draft = []
        if self.drafter is not None and self.drafting:
            draft = self.drafter.draft([int(t) for t in input_ids], self.drafter.n_draft)
        self.result.drafted += len(draft)
        self._draft, self._next = draft, 0
        return np.array(draft, dtype=np.intc)

    def saw(self, token: int) -> None:
        """A token the model generated (in order). Llama.generate keeps the
        drafts up to the first the model disagrees with, so a token that
        equals the pass's next draft is that draft accepted."""
        self.result.tokens.append(token)
        if self._next < len(self._draft) and self._draft[self._next] == token:
            self._next += 1
            self.result.accepted += 1
        else:
            self._next = len(self._draft)  # the rest of this pass's draft is rejected

    def close(self) -> None:
        close = getattr(self.drafter, "close", None)
        if close is not None:
            close()


def llama_vocabulary(llm):
    """A llama_cpp.Llama's vocabulary as DraftModel.check_vocabulary reads it."""
    return SimpleNamespace(n_vocab=llm.n_vocab(), token_bytes=lambda i: llm.detokenize([i]))


def counted(llm, drafter: LlamaDrafter, report=None) -> None:
    """Route llm's generations (Llama.generate, under its completion and chat
    code) through drafter's counts: a generation drafts only when it is
    greedy (temperature 0, no logits processor: min_tokens' reads the
    context, which holds the drafts); report(drafter, greedy) after each."""
    generate = llm.generate

    def drafted_generate(tokens, *args, **kwargs):
        bound = inspect.signature(generate).bind(tokens, *args, **kwargs)
        bound.apply_defaults()
        greedy = bound.arguments["temp"] == 0 and bound.arguments["logits_processor"] is None
        drafter.begin(greedy)
        inner = generate(tokens, *args, **kwargs)
        try:
            for token in inner:
                drafter.saw(token)
                yield token
        finally:
            inner.close()
            if report is not None:
                report(drafter, greedy)

    llm.generate = drafted_generate
