"""llama.cpp's sampler chain over a model's logits (host mode, Gemma): greedy
is the argmax, a seed repeats its draw, a grammar constrains, and a state
where the grammar allows no token is an error instead of llama.cpp's abort."""
import gguf_stream  # noqa: F401  (llama.cpp before numpy)

import numpy as np
import pytest

from conftest import CPU
from gguf_stream.model import StockModel
from gguf_stream.sampling import Sampler, SamplingParams


@pytest.fixture(scope="module")
def model(gemma_path):
    with StockModel(gemma_path, n_gpu_layers=0, **CPU) as m:
        m.eval(m.tokenize("The capital of France is"))
        yield m


def test_greedy_chain_is_the_argmax(model):
    logits = model.logits()
    params = SamplingParams(repeat_penalty=1.0001)  # not plain greedy: goes through the chain
    assert not params.greedy and SamplingParams().greedy
    with Sampler(model, params) as s:
        assert s.sample(logits) == int(np.argmax(logits))


def test_same_seed_same_draws(model):
    logits = model.logits()
    params = SamplingParams(temp=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=11)

    def draws(p):
        with Sampler(model, p) as s:
            return [s.sample(logits) for _ in range(20)]

    first = draws(params)
    assert draws(params) == first and len(set(first)) > 1
    assert draws(SamplingParams(temp=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=12)) != first


def test_grammar_constrains_and_a_dead_end_is_an_error(model):
    logits = model.logits()
    with Sampler(model, SamplingParams(grammar='root ::= "yes" | "no"')) as s:
        assert model.detokenize([s.sample(logits)]) in ("yes", "no", "y", "n", "ye")
    with Sampler(model, SamplingParams(grammar='root ::= "yes"', temp=1.0, seed=1)) as s:
        with pytest.raises(ValueError, match="no token of the model's vocabulary can continue the grammar"):
            s.sample(np.full_like(logits, -np.inf))  # every allowed token ruled out
    s.close()  # twice is fine
    with pytest.raises(ValueError, match="closed"):
        s.sample(logits)
