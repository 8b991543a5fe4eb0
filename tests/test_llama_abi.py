"""What gguf-stream relies on from llama-cpp-python (llama_abi.py): the exact
version, and where llama.cpp keeps each layer's device."""
import ctypes

import pytest

from conftest import CPU
from gguf_stream import EnvironmentMismatchError
from gguf_stream.model import StreamedModel


def test_wrong_llama_cpp_version(monkeypatch):
    import llama_cpp

    from gguf_stream import llama_abi

    llama_abi.llama.cache_clear()
    monkeypatch.setattr(llama_cpp, "__version__", "0.3.99")
    try:
        with pytest.raises(EnvironmentMismatchError, match=r"needs llama-cpp-python==0\.3\.36.*found 0\.3\.99"):
            llama_abi.llama()
    finally:
        llama_abi.llama.cache_clear()


def dev_layer(model, il):
    from gguf_stream import llama_abi

    fn = getattr(llama_abi.llama()._lib, "_ZNK11llama_model9dev_layerEi")
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_int], ctypes.c_void_p
    return fn(model, il)


def test_layer_device_cells_are_llama_cpps(tiny_path, monkeypatch):
    """The cells the engine writes are where llama.cpp reads each layer's
    device; a wrong layout is refused (None), not written through."""
    from gguf_stream import llama_abi, read_model

    n = read_model(tiny_path).n_layer
    with StreamedModel(tiny_path, **CPU) as m:
        cells = llama_abi.layer_device_cells(m.model, n)
        assert cells is not None and len(cells) == n
        assert [ctypes.c_void_p.from_address(c).value for c in cells] == [dev_layer(m.model, i) for i in range(n)]
        assert llama_abi.layer_device_cells(m.model, n + 1) is None
        assert llama_abi.layer_device_cells(0, n) is None
        monkeypatch.setattr(llama_abi, "_IMPL_DEV_LAYER_OFFSET", llama_abi._IMPL_DEV_LAYER_OFFSET + 8)
        assert llama_abi.layer_device_cells(m.model, n) is None
        monkeypatch.setattr(llama_abi, "_MODEL_PIMPL_OFFSET", 8)
        assert llama_abi.layer_device_cells(m.model, n) is None


def test_n_cpu_moe_pattern_is_llama_cpps_rules_combined():
    """One regex for `--n-cpu-moe n` matches what llama.cpp's n rules
    (blk\\.i + LLM_FFN_EXPS_REGEX, searched unanchored) match, no more."""
    import re

    from gguf_stream.llama_abi import LLM_FFN_EXPS_REGEX, n_cpu_moe_pattern

    kinds = ("ffn_up_exps", "ffn_down_exps", "ffn_gate_exps", "ffn_gate_up_exps", "ffn_gate_chexps", "ffn_gate_inp",
             "ffn_up_shexp", "ffn_up", "attn_q")
    names = [f"blk.{i}.{k}.weight" for i in (0, 1, 2, 9, 10, 11, 12, 21) for k in kinds] + ["output.weight"]
    for n in (1, 2, 10, 12):
        rules = [rf"blk\.{i}" + LLM_FFN_EXPS_REGEX for i in range(n)]
        want = [any(re.search(r, name) for r in rules) for name in names]
        assert [bool(re.search(n_cpu_moe_pattern(n), name)) for name in names] == want
        assert sum(want) == 5 * sum(i < n for i in (0, 1, 2, 9, 10, 11, 12, 21))


def test_host_mode_gives_llama_cpp_no_gpu_device(tiny_path, monkeypatch):
    """Host mode loads every model with an empty device list (a GPU build's
    scheduler would otherwise run prompts' matrix products on the GPU):
    StockModel, StreamedModel and StreamedLlama (chat, serve) alike. A load
    given no list (NULL: every device) fails this."""
    import llama_cpp.llama_cpp as low

    from gguf_stream.llama_compat import StreamedLlama
    from gguf_stream.model import StockModel

    seen, load = [], low.llama_model_load_from_file

    def spy(path, params):
        first = ctypes.cast(params.devices, ctypes.POINTER(ctypes.c_void_p))[0] if params.devices else "all"
        seen.append(first)
        return load(path, params)

    monkeypatch.setattr(low, "llama_model_load_from_file", spy)
    with StockModel(tiny_path, 0, **CPU):
        pass
    with StreamedModel(tiny_path, **CPU, n_streamed=2):
        pass
    llm = StreamedLlama(str(tiny_path), device="host", n_streamed=2, n_ctx=CPU["n_ctx"], verbose=False)
    llm.close()
    assert seen == [None, None, None]  # each list empty: its first entry is the terminating NULL
