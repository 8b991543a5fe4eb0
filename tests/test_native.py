"""The compiled helper's devices, errors and engine, driven directly (see
test_native_ring.py, test_native_copy.py and test_native_discovery.py for
the units that run without llama.cpp)."""
import pytest

from conftest import CPU
from gguf_stream import NativeError


@pytest.fixture(scope="module")
def native():
    from gguf_stream.config import load_native

    load_native(want_cuda=False)
    from gguf_stream import native

    return native


def cpu_engine(native, **kw):
    return native.Engine(**{"n_layer": 4, "n_slots": 1, "ring_buft": native.device_bufts("CPU")[0],
                            "use_cuda": False, **kw})


def test_cpu_device(native):
    buft, _ = native.device_bufts("CPU")
    assert buft != 0
    assert native.has_device("CPU") and not native.has_device("NOPE0")
    assert native.plain_cpu_buft() not in (0, buft)  # the same type under another address
    free, total = native.device_memory("CPU")
    assert 0 < free <= total


def test_flash_attention_question_answers_any_shape_without_aborting(native):
    """-fa auto's question (gs_device_supports_flash_attn) over head sizes,
    head counts and every KV cache type, the shapes ggml's op would abort on
    included (they are answered "no" first): an answer each, and "yes" for
    the common shapes on the CPU, which computes any it can build; on CUDA
    also CUDA0's answer (one per shape)."""
    from gguf_stream.memory import KV_CACHE_TYPES

    types = sorted({t for t, _, _ in KV_CACHE_TYPES.values()})
    devices = ["CPU"] + (["CUDA0"] if native.has_device("CUDA0") else [])
    shapes = [(128, 128, 32, 8), (64, 64, 4, 2), (256, 256, 8, 4), (576, 512, 16, 1), (192, 128, 16, 2),
              (40, 40, 4, 4), (100, 100, 4, 2), (128, 128, 32, 7), (0, 128, 4, 2), (128, 128, 0, 0), (7, 7, 1, 1)]
    answers = {(dev, shape, tk, tv): native.supports_flash_attn(dev, *shape, tk, tv)
               for dev in devices for shape in shapes for tk in types for tv in types}
    assert all(isinstance(a, bool) for a in answers.values())
    f16 = KV_CACHE_TYPES["f16"][0]
    assert answers[("CPU", (128, 128, 32, 8), f16, f16)] and answers[("CPU", (64, 64, 4, 2), f16, f16)]
    for bad in ((128, 128, 32, 7), (0, 128, 4, 2), (128, 128, 0, 0)):  # heads not grouped, no head size, no heads
        assert not any(answers[("CPU", bad, tk, tv)] for tk in types for tv in types)
    with pytest.raises(NativeError, match="no device named NOPE0"):
        native.supports_flash_attn("NOPE0", 128, 128, 32, 8, f16, f16)


def test_errors_name_the_call(native):
    with pytest.raises(NativeError, match="gs_device_get_bufts.*no device named NOPE0"):
        native.device_bufts("NOPE0")
    with pytest.raises(NativeError, match="gs_engine_create.*n_slots > 0"):
        cpu_engine(native, n_slots=0)
    with pytest.raises(NativeError, match="gs_tensor_get_buffer.*no buffer"):
        native.tensor_buffer(native.ffi.cast("uintptr_t", native.ffi.new("char[336]")))

    if not native.has_device("CUDA0"):
        with pytest.raises(NativeError, match="CUDA runtime"):
            cpu_engine(native, use_cuda=True)


def test_start_without_tensors_fails_cleanly(native):
    e = cpu_engine(native)
    try:
        with pytest.raises(NativeError, match="no streamed tensors"):
            e.start()
        with pytest.raises(NativeError, match="already started"):
            e.start()
    finally:
        e.destroy()
    assert not e.alive
    with pytest.raises(NativeError, match="destroyed"):
        e.start()


def test_engine_before_start(native):
    """Phase and CPU-layer choices wait for start; the hook stays out of the way."""
    from gguf_stream._native import ffi, lib

    e = cpu_engine(native)
    try:
        e.set_cpu_layers([1, 2])
        e.set_phase(native.PHASE_GENERATE)
        e.kv_detach()  # nothing attached, nothing in flight
        node = ffi.new("char[336]")
        ffi.memmove(node + 256, b"l_out-0\0", 8)
        user = ffi.cast("void *", e.address)
        assert lib.gs_engine_eval_cb(node, True, user) is False
        assert lib.gs_engine_eval_cb(node, False, user) is True
        e.check_status("the test")
        with pytest.raises(NativeError, match="not started"):
            e.set_generate_resident([1])
        with pytest.raises(NativeError, match="not in the ring"):
            e.measure_upload(0)
        with pytest.raises(NativeError, match="cpu layer 4 out of range"):
            e.set_cpu_layers([4])
        assert e.counters() == native.Counters(**{f: 0 for f in native.Counters.__dataclass_fields__})
    finally:
        e.destroy()


def test_timeline_marks_need_it_on(native):
    e = cpu_engine(native)
    try:
        with pytest.raises(NativeError, match="timeline is off"):
            e.timeline_mark(True)
        e.timeline(True)
        with pytest.raises(NativeError, match="no decode begun"):
            e.timeline_mark(False)
        e.timeline_mark(True)
        e.timeline_mark(False)
        t = e.timeline_get()
        assert t.decodes == 1 and t.wall_s >= 0 and t.cpu_segments == t.gpu_segments == 0
    finally:
        e.destroy()


def test_reset_zeroes_counters_and_keeps_sizes(tiny_path):
    """Counters compose gs_counters (reset) and gs_sizes (kept): a reset
    also zeroes the per-layer timing."""
    from gguf_stream.model import StreamedModel

    with StreamedModel(tiny_path, **CPU, n_streamed=4, n_slots=2) as m:
        m.engine.set_timing(True)
        m.eval(m.tokenize("The quick brown fox"))
        m.engine.set_timing(False)
        before = m.stats.counters
        assert before.uploads > 0 and before.boundaries > 0 and before.evaluations == 1
        assert any(n for _, n in m.engine.layer_times(8))
        m.reset_counters()
        after = m.stats.counters
        assert m.engine.layer_times(8) == [(0.0, 0)] * 8
    kept = {"slot_bytes", "ring_bytes", "n_streamed", "n_slots", "repacked_bytes", "host_kv_bytes", "gen_resident",
            "compute_buffer_bytes", "generate_extent"}
    for f in native_fields():
        assert getattr(after, f) == (getattr(before, f) if f in kept else 0), f
    assert (after.n_streamed, after.n_slots) == (4, 2) and after.ring_bytes == 2 * after.slot_bytes > 0


def native_fields():
    from gguf_stream.native import Counters

    return Counters.__dataclass_fields__
