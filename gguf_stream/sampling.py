"""Sampling for StreamedModel / StockModel: llama.cpp's own sampler chain
(grammar, repeat penalty, top-k, top-p, min-p, temperature, then a seeded
draw; greedy at temperature 0) over the logits the model returns.

    params = SamplingParams(temp=0.8, seed=42)
    with Sampler(model, params) as sampler:
        sampler.feed_prompt(prompt)          # the repeat penalty sees the prompt, as in llama.cpp
        token = sampler.sample(model.logits())

The chain is applied to a candidate array we own and the chosen token is
checked before the chain accepts it: llama.cpp's grammar aborts the process
on a token it does not allow (llama_sampler_sample asserts instead of
reporting "no token possible"), so this is where such a state becomes an error.
"""
from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import numpy as np

from . import llama_abi

# llama.cpp's defaults (common/common.h), except temp: 0 (greedy) here
DEFAULT_TOP_K, DEFAULT_TOP_P, DEFAULT_MIN_P = 40, 0.95, 0.05
DEFAULT_REPEAT_LAST_N = 64
MIN_KEEP = 1
# llama_token_data: {int32 id; float logit; float p}
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


@dataclass(frozen=True)
class SamplingParams:
    temp: float = 0.0  # 0: greedy
    top_k: int = DEFAULT_TOP_K  # 0: off
    top_p: float = DEFAULT_TOP_P  # 1: off
    min_p: float = DEFAULT_MIN_P  # 0: off
    repeat_penalty: float = 1.0  # 1: off
    repeat_last_n: int = DEFAULT_REPEAT_LAST_N  # 0: off, -1: the context size
    frequency_penalty: float = 0.0  # 0: off (OpenAI's, over the same last tokens)
    presence_penalty: float = 0.0  # 0: off
    seed: int = 0
    grammar: str | None = None  # GBNF, rule "root"; check it with grammar.grammar_error first

    @property
    def greedy(self) -> bool:
        """The pick is the plain argmax: nothing here changes which token has the largest logit."""
        return (self.temp == 0 and self.repeat_penalty == 1.0 and self.frequency_penalty == 0.0
                and self.presence_penalty == 0.0 and self.grammar is None)


class Sampler:
    """A llama.cpp sampler chain for one generation on `model` (a model.py
    session); free it (close, or `with`) before the model is closed: the
    grammar sampler holds the model's vocabulary."""

    def __init__(self, model, params: SamplingParams):
        self._lc = lc = llama_abi.llama()
        self.params = params
        self.n_vocab = model.n_vocab
        self._chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        self._penalties = None
        # the candidates every token starts from: each id, p 0 (the chain sorts and cuts them in place);
        # a byte copy of that, then the logits: faster than writing the three fields one by one
        self._fresh = np.zeros(self.n_vocab, dtype=TOKEN_DATA)
        self._fresh["id"] = np.arange(self.n_vocab, dtype=np.int32)
        self._data = np.zeros_like(self._fresh)
        self._data_bytes, self._fresh_bytes = self._data.view(np.uint8), self._fresh.view(np.uint8)
        self._data_logits = self._data["logit"]
        try:
            self._build(model.vocab, model.config.n_ctx)
        except BaseException:
            self.close()
            raise

    def _build(self, vocab, n_ctx: int) -> None:
        lc, p = self._lc, self.params
        if p.grammar is not None:
            # first: no later cut may leave only tokens the grammar forbids
            self._add(lc.llama_sampler_init_grammar(vocab, p.grammar.encode("utf-8"), b"root"), "the grammar")
        last_n = n_ctx if p.repeat_last_n == -1 else p.repeat_last_n
        self._penalties = self._add(lc.llama_sampler_init_penalties(self.n_vocab, last_n, p.repeat_penalty,
                                                                        p.frequency_penalty, p.presence_penalty),
                                    "the repeat penalty")
        if p.temp == 0:
            self._add(lc.llama_sampler_init_greedy(), "greedy")
            return
        # llama.cpp's common order: top-k, top-p, min-p, temperature, draw
        if p.top_k > 0:
            self._add(lc.llama_sampler_init_top_k(p.top_k), "top-k")
        self._add(lc.llama_sampler_init_top_p(p.top_p, MIN_KEEP), "top-p")
        self._add(lc.llama_sampler_init_min_p(p.min_p, MIN_KEEP), "min-p")
        self._add(lc.llama_sampler_init_temp(p.temp), "temperature")
        self._add(lc.llama_sampler_init_dist(p.seed), "dist")

    def _add(self, sampler, what: str):
        if not sampler:  # llama.cpp returns NULL for a grammar it cannot parse; the chain must never hold one
            raise ValueError(f"llama.cpp could not make a sampler of {what}")
        self._lc.llama_sampler_chain_add(self._chain, sampler)  # the chain owns it now
        return sampler

    def feed_prompt(self, tokens) -> None:
        """Let the repeat penalty see the prompt (llama.cpp does; the grammar does not)."""
        for t in tokens:
            self._lc.llama_sampler_accept(self._penalties, t)

    def sample(self, logits: np.ndarray) -> int:
        """The next token for these logits (model.logits_view() will do: they are copied); the chain accepts it."""
        if self._chain is None:
            raise ValueError("this sampler is closed")
        lc, data = self._lc, self._data
        self._data_bytes[:] = self._fresh_bytes
        self._data_logits[:] = logits
        cur = lc.llama_token_data_array(data=data.ctypes.data_as(lc.llama_token_data_p), size=self.n_vocab,
                                        selected=-1, sorted=False)
        lc.llama_sampler_apply(self._chain, ctypes.byref(cur))
        if not 0 <= cur.selected < cur.size or not math.isfinite(cur.data[cur.selected].logit):
            raise ValueError("no token of the model's vocabulary can continue the grammar here")
        token = int(cur.data[cur.selected].id)
        lc.llama_sampler_accept(self._chain, token)
        return token

    def close(self) -> None:
        if self._chain is not None:
            self._lc.llama_sampler_free(self._chain)  # and every sampler in it
            self._chain = self._penalties = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
