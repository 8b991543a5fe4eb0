"""CUDA checks; skipped unless llama-cpp-python has a CUDA device."""
import numpy as np
import pytest

from gguf_stream.runtime import StockModel, StreamedModel, cuda_available

pytestmark = pytest.mark.gpu
if not cuda_available():
    pytest.skip("needs a CUDA build of llama-cpp-python and a GPU", allow_module_level=True)

OPTS = dict(n_ctx=512, n_batch=64, n_ubatch=64)


@pytest.mark.parametrize("n_streamed,n_slots", [(3, 1), (4, 2), (8, 2)])
def test_cuda_streamed_matches_all_in_vram(tiny_path, n_streamed, n_slots):
    with StockModel(tiny_path, n_gpu_layers=-1, **OPTS) as s:
        prompt = s.tokenize("Once upon a time")
        ref_tokens, ref_logits = s.generate(prompt, 16, with_logits=True)
    with StreamedModel(tiny_path, n_streamed=n_streamed, n_slots=n_slots, **OPTS) as m:
        tokens, logits = m.generate(prompt, 16, with_logits=True)
        c = m.stats.counters
        assert m.stats.pinned_host_bytes > 0
    assert tokens == ref_tokens
    assert np.abs(logits - ref_logits).max() == 0.0
    assert c.adoptions == n_streamed * 17 and c.uploads > 0


def test_cuda_swapped_layers_change_output(tiny_path):
    with StockModel(tiny_path, n_gpu_layers=-1, **OPTS) as s:
        prompt = s.tokenize("Once upon a time")
        _, ref_logits = s.generate(prompt, 4, with_logits=True)
    with StreamedModel(tiny_path, n_streamed=4, n_slots=2, **OPTS) as m:
        a, b = m.plan.streamed[:2]
        m.engine.debug_swap_sources(a, b)
        _, logits = m.generate(prompt, 4, with_logits=True)
    assert not np.array_equal(logits, ref_logits)
