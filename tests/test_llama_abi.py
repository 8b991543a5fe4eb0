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
