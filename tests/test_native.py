"""Smoke tests of the compiled helper, driven directly (no llama context)."""
import pytest

from gguf_stream import NativeError, UnsupportedModelError, read_model
from gguf_stream.config import load_native
from gguf_stream.streamer import validate_graph


@pytest.fixture(scope="module")
def native():
    load_native(want_cuda=False)
    from gguf_stream import native

    return native


def test_cpu_device(native):
    buft, _ = native.device_bufts("CPU")
    assert buft != 0
    assert native.has_device("CPU") and not native.has_device("NOPE0")


def test_errors_name_the_call(native):
    with pytest.raises(NativeError, match="gs_device_bufts.*no device named NOPE0"):
        native.device_bufts("NOPE0")
    with pytest.raises(NativeError, match="gs_engine_create.*n_slots > 0"):
        native.Engine(n_layer=4, n_slots=0, ring_buft=native.device_bufts("CPU")[0], use_cuda=False)

    from gguf_stream._native import lib

    if not lib.gs_device_bufts(b"CUDA0", native.ffi.new("void **"), native.ffi.NULL) == lib.GS_OK:
        with pytest.raises(NativeError, match="CUDA runtime"):
            native.Engine(n_layer=4, n_slots=1, ring_buft=native.device_bufts("CPU")[0], use_cuda=True)


def test_start_without_tensors_fails_cleanly(native):
    e = native.Engine(n_layer=4, n_slots=1, ring_buft=native.device_bufts("CPU")[0], use_cuda=False)
    try:
        with pytest.raises(NativeError, match="no streamed tensors"):
            e.start()
    finally:
        e.destroy()


def _fake_graph(native, names):
    """Feed nodes with the given names through the real discovery callback."""
    from gguf_stream._native import ffi, lib

    e = native.Engine(n_layer=3, n_slots=1, ring_buft=native.device_bufts("CPU")[0], use_cuda=False)
    nodes = []
    for name in names:
        t = ffi.new("char[336]")  # sizeof(struct ggml_tensor); all pointers NULL
        ffi.memmove(t + 256, name.encode() + b"\0", len(name) + 1)
        nodes.append(t)
        assert lib.gs_discover_cb(t, True, ffi.cast("void *", e.address)) is False
    check = e.graph_check()
    e.destroy()
    return check


def test_discovery_counts_layer_boundaries(native):
    check = _fake_graph(native, ["attn_norm-0", "l_out-0", "ffn_out-1", "l_out-1", "l_out-2", "result_output"])
    assert (check.n_lout, check.max_lout, check.violations) == (3, 2, 0)


def test_discovery_flags_out_of_order_layers(native):
    check = _fake_graph(native, ["l_out-0", "l_out-2", "l_out-1"])
    assert check.violations == 2 and "l_out-2 follows l_out-0" in check.first_violation


def test_graph_without_l_out_is_unsupported(native, tiny_path):
    check = _fake_graph(native, ["inp_embd", "attn_out-0", "ffn_out-0", "result_norm"])
    assert check.n_lout == 0
    with pytest.raises(UnsupportedModelError, match="no l_out-<i> layer boundaries"):
        validate_graph(check, read_model(tiny_path))
