"""Discovery (gs_engine_discover_cb) on fake graphs: layer boundaries and their order."""
import pytest

from gguf_stream import UnsupportedModelError, read_model
from gguf_stream.config import load_native
from gguf_stream.streamer import validate_graph


@pytest.fixture(scope="module")
def native():
    load_native(want_cuda=False)
    from gguf_stream import native

    return native


def _fake_graph(native, names):
    """Feed nodes with the given names through the real discovery callback."""
    from gguf_stream._native import ffi, lib

    e = native.Engine(n_layer=3, n_slots=1, ring_buft=native.device_bufts("CPU")[0], use_cuda=False)
    nodes = []
    for name in names:
        t = ffi.new("char[336]")  # sizeof(struct ggml_tensor); all pointers NULL
        ffi.memmove(t + 256, name.encode() + b"\0", len(name) + 1)
        nodes.append(t)
        assert lib.gs_engine_discover_cb(t, True, ffi.cast("void *", e.address)) is False
    check = e.graph_check()
    assert e.weights() == []  # no node had a source
    e.destroy()
    return check


def test_discovery_counts_layer_boundaries(native):
    check = _fake_graph(native, ["attn_norm-0", "l_out-0", "ffn_out-1", "l_out-1", "l_out-2", "result_output"])
    assert (check.n_lout, check.max_lout, check.violations) == (3, 2, 0)


@pytest.mark.parametrize("names,violations,first", [
    (["l_out-0", "l_out-2", "l_out-1"], 2, "l_out-2 follows l_out-0"),
    (["l_out-1"], 1, "l_out-1 follows l_out--1"),
    (["l_out-0", "l_out-1", "l_out-2", "l_out-3"], 1, "node l_out-3 but the model has 3 layers"),
    (["l_out-0", "l_out-0"], 1, "l_out-0 follows l_out-0"),
])
def test_discovery_flags_out_of_order_layers(native, names, violations, first):
    check = _fake_graph(native, names)
    assert check.violations == violations and first in check.first_violation


def test_discovery_reset_starts_over(native):
    from gguf_stream._native import ffi, lib

    e = native.Engine(n_layer=3, n_slots=1, ring_buft=native.device_bufts("CPU")[0], use_cuda=False)
    try:
        t = ffi.new("char[336]")
        ffi.memmove(t + 256, b"l_out-2\0", 8)
        lib.gs_engine_discover_cb(t, True, ffi.cast("void *", e.address))
        assert e.graph_check().violations == 1
        e.discover_reset()
        assert e.graph_check() == native.GraphCheck(0, -1, 0, "")
        assert lib.gs_engine_discover_cb(t, False, ffi.cast("void *", e.address)) is False  # ask=false: ignored
        assert e.graph_check().n_lout == 0
    finally:
        e.destroy()


def test_graph_without_l_out_is_unsupported(native, tiny_path):
    check = _fake_graph(native, ["inp_embd", "attn_out-0", "ffn_out-0", "result_norm"])
    assert check.n_lout == 0
    with pytest.raises(UnsupportedModelError, match="no l_out-<i> layer boundaries"):
        validate_graph(check, read_model(tiny_path))
