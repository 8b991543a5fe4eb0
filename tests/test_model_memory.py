"""The real engine in host mode, continued from test_model.py: quantized KV
cache types against stock with the same types, and the host-memory check
and estimate against what the engine allocates."""

import numpy as np
import pytest

from conftest import CPU, HYBRID, N_GEN, PROMPT, hybrid_cpu_layers
from gguf_stream import read_model
from gguf_stream.model import StockModel, StreamedModel
from test_model import run_streamed


def test_quantized_kv_cache_matches_stock_with_the_same_types(tiny_path):
    kv = dict(type_k="q8_0", type_v="q8_0", flash_attn=True)
    with StockModel(tiny_path, **CPU, **kv) as stock:
        assert (stock.config.type_k, stock.config.type_v) == ("q8_0", "q8_0")
        prompt = stock.tokenize(PROMPT)
        ref_tokens, ref_logits = stock.generate(prompt, N_GEN, with_logits=True)
    with StockModel(tiny_path, **CPU, flash_attn=True) as f16:
        _, f16_logits = f16.generate(prompt, N_GEN, with_logits=True)
    assert not np.array_equal(ref_logits, f16_logits)  # the types reached llama.cpp
    tokens, logits, counters, plan = run_streamed(tiny_path, prompt, **HYBRID, **kv)
    assert counters.adoptions > 0 and plan.type_v == "q8_0"
    assert tokens == ref_tokens and np.array_equal(logits, ref_logits)


def test_host_memory_check_refuses_before_loading(tiny_path, monkeypatch):
    from gguf_stream import placement
    from gguf_stream.errors import BudgetError, HostMemoryError

    import gguf_stream.model as model_module

    loads = []

    def load(*args, **kw):
        loads.append(1)
        raise RuntimeError("loading")

    monkeypatch.setattr(model_module, "StreamedLlamaModel", load)
    monkeypatch.setattr(placement, "available_host_memory", lambda: 1 << 20)
    # the default host budget (what the machine can spare) is below what even the disk tier leaves
    with pytest.raises(HostMemoryError, match=r"host budget 0\.0 MiB \(what this machine can spare: MemAvailable "
                       r"1\.0 MiB .*\) is below .* with every streamed part on the disk tier .*a larger vram_budget"
                       ) as exc:
        StreamedModel(tiny_path, **CPU, **HYBRID)
    assert isinstance(exc.value, BudgetError) and not loads and "\n" not in str(exc.value)
    # without a budget, the check itself against MemAvailable
    with pytest.raises(HostMemoryError, match=r"needs about .* of host memory \(pinned .* \+ pageable .*\) but "
                       r"1\.0 MiB is available \(MemAvailable\); give a larger vram_budget") as exc:
        StreamedModel(tiny_path, **CPU, **HYBRID, host_budget="none")
    assert not loads
    monkeypatch.setenv("GGUF_STREAM_HOST_MEMORY_CHECK", "0")
    with pytest.raises(RuntimeError, match="loading"):  # past the check: the (stubbed) load
        StreamedModel(tiny_path, **CPU, **HYBRID)
    assert loads


def test_host_memory_check_names_cpu_layers(tiny_path, monkeypatch):
    from gguf_stream import placement
    from gguf_stream.errors import HostMemoryError

    monkeypatch.setattr(placement, "available_host_memory", lambda: 1 << 20)
    with pytest.raises(HostMemoryError, match="fewer CPU layers"):
        StreamedModel(tiny_path, **CPU, **HYBRID, generate_cpu_layers=hybrid_cpu_layers(tiny_path))
    with StreamedModel(tiny_path, **CPU, **HYBRID, host_memory_check=False) as m:  # the option skips it too
        assert m.plan.host_bytes > 1 << 20


def test_host_memory_estimate_covers_what_the_engine_allocates(tiny_path):
    cpu = hybrid_cpu_layers(tiny_path)
    with StreamedModel(tiny_path, **CPU, **HYBRID, cpu_repack=True, generate_cpu_layers=cpu) as m:
        repacked = m.stats.counters.repacked_bytes
        assert 0 < repacked <= m.plan.cpu_layer_host_bytes - len(cpu) * m.plan.kv_layer_bytes
        assert m.plan.pinned_bytes == sum(read_model(tiny_path).layer_bytes[i] for i in m.plan.streamed)
