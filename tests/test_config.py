"""Run options, the device decision, threads and the cache directory (config.py)."""
from pathlib import Path

import pytest

from gguf_stream import EnvironmentMismatchError
from gguf_stream.config import EngineConfig, cache_dir, cuda_available, physical_cores, select_device


@pytest.mark.parametrize("kw,match", [
    (dict(device="gpu"), "device must be"),
    (dict(generate_cpu_layers="all"), "generate_cpu_layers must be"),
    (dict(generate_resident="some"), "generate_resident must be"),
    (dict(exact=True, generate_cpu_layers="auto"), "exact computes every layer on the GPU"),
    (dict(exact=True, generate_cpu_layers=(1, 2)), r"combined with CPU layers \(generate_cpu_layers=\(1, 2\)\)"),
    (dict(exact=1), "exact must be True or False"),
    (dict(progress="yes"), "progress must be True or False"),
    (dict(n_slots=0), "n_slots must be at least 1"),
    # numbers that would wrap in ctypes, or are not numbers of the right kind
    (dict(n_ctx=2**32 + 1), r"n_ctx must be at least 0 and at most 2147483647 .*got 4294967297"),
    (dict(n_ctx=-1), "n_ctx must be at least 0"),
    (dict(n_ctx=4096.0), "n_ctx must be .*got 4096.0"),
    (dict(n_ctx="4096"), "n_ctx must be .*got '4096'"),
    (dict(n_batch=0, n_ubatch=0), "n_batch must be at least 1"),
    (dict(n_batch=2**31), "n_batch must be at least 1 and at most 2147483647"),
    (dict(n_ubatch=True), "n_ubatch must be .*got True"),
    (dict(n_threads=0), "n_threads must be at least 1"),
    (dict(n_threads=10**6), "n_threads must be at least 1 and at most"),
    (dict(n_threads_batch=0), "n_threads_batch must be at least 1"),
    (dict(vram_budget=float("inf")), "size inf must be a finite number of bytes"),
    (dict(vram_budget=float("nan")), "size nan must be a finite number"),
    (dict(vram_budget=10**400), r"size 10{59} must be a finite number"),  # the value, cut short
    (dict(vram_budget="9" * 400 + "GiB"), "must be a finite number"),
    (dict(vram_budget="1e400GiB"), "cannot read '1e400GiB' as a size"),
    (dict(vram_budget=0), "size 0 must be a finite number of bytes in 1.."),
    (dict(vram_budget=True), "cannot read True as a size"),
    (dict(streamed_layers="1,2"), r"streamed_layers must be a tuple of layer numbers like \(1, 2\), not '1,2'"),
    (dict(streamed_layers=(1.0, 2)), "each of streamed_layers must be .*got 1.0"),
    (dict(streamed_layers=(True,)), "each of streamed_layers must be .*got True"),
    (dict(streamed_layers=(-1,)), "each of streamed_layers must be at least 0"),
    (dict(n_streamed=-1), "n_streamed must be at least 0"),
    (dict(n_streamed="3"), "n_streamed must be .*got '3'"),
    (dict(n_slots=1.5), "n_slots must be at least 1 .*got 1.5"),
    (dict(n_slots=True), "n_slots must be .*got True"),
    (dict(generate_cpu_layers=(1.5,)), "each of generate_cpu_layers"),
    (dict(flash_attn="no"), "flash_attn must be True, False or 'auto', not 'no'"),
    (dict(flash_attn=1), "flash_attn must be True, False or 'auto', not 1"),
    (dict(use_mlock="yes"), "use_mlock must be True or False"),
    (dict(type_v="q8_0", flash_attn=False), "a quantized V cache"),
    (dict(host_copy_delay_us=-1), "host_copy_delay_us must be at least 0"),
])
def test_bad_options_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kw)


def test_derived_options():
    assert EngineConfig(device="host").repack is False  # host mode: stock and streamed use plain kernels
    assert EngineConfig(device="cuda").repack is True
    assert EngineConfig(device="host", cpu_repack=True).repack is True
    assert EngineConfig(n_threads=3).threads == 3 == EngineConfig(n_threads=3).threads_batch  # -tb: -t's
    assert EngineConfig(n_threads=3, n_threads_batch=5).threads_batch == 5
    assert EngineConfig().threads_batch == physical_cores()
    assert EngineConfig().threads == physical_cores() >= 1
    assert not EngineConfig().places_layers
    assert EngineConfig(vram_budget="1GiB").places_layers and EngineConfig(n_streamed=2).places_layers


def test_device_is_decided_in_one_place():
    assert select_device("host") == "host"
    with pytest.raises(ValueError, match="device must be"):
        select_device("tpu")
    if cuda_available():
        assert select_device("auto") == select_device("cuda") == "cuda"
    else:
        assert select_device("auto") == "host"
        with pytest.raises(EnvironmentMismatchError, match="GGML_CUDA=on"):
            select_device("cuda")


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("GGUF_STREAM_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "gguf-stream"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "gguf-stream"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # the XDG spec says: ignore it
    assert cache_dir() == tmp_path / "home" / ".cache" / "gguf-stream"
    monkeypatch.setenv("GGUF_STREAM_CACHE", "~/mine")
    assert cache_dir() == Path(tmp_path / "home" / "mine")


def test_the_generate_split_default_resolves_per_device():
    """The fast mode by default on CUDA, the exact placement in host mode
    (where there is no split to measure); exact=True and explicit choices
    mean the same on both."""
    default = EngineConfig()
    assert default.generate_cpu_layers is None
    assert default.generate_split(cuda=True) == "auto" and default.generate_split(cuda=False) == "none"
    for cuda in (True, False):
        assert EngineConfig(exact=True).generate_split(cuda) == "none"
        assert EngineConfig(exact=True, generate_cpu_layers="none").generate_split(cuda) == "none"
        assert EngineConfig(generate_cpu_layers="none").generate_split(cuda) == "none"
        assert EngineConfig(generate_cpu_layers="auto").generate_split(cuda) == "auto"
        assert EngineConfig(generate_cpu_layers=[3]).generate_split(cuda) == (3,)


def test_ubatch_is_clamped_to_the_batch_as_llama_cpp_does():
    assert EngineConfig(n_batch=16, n_ubatch=32).n_ubatch == 16
    assert EngineConfig(n_batch=64, n_ubatch=32).n_ubatch == 32


def test_layer_lists_become_tuples():
    assert EngineConfig(streamed_layers=[3, 1]).streamed_layers == (3, 1)
    assert EngineConfig(generate_cpu_layers=[2]).generate_cpu_layers == (2,)


def test_context_sizes_as_llama_cpp_uses_them():
    from gguf_stream.config import context_sizes, resolve_context

    assert context_sizes(0, 512, 512, 256) == (256, 256, 256)  # 0: the training context, batches clamped
    assert context_sizes(1024, 2048, 512, 256) == (1024, 1024, 512)  # past training: allowed (a warning in the CLI)
    assert context_sizes(2048, 512, 512, 256) == (2048, 512, 512)  # 8 times: still allowed
    with pytest.raises(ValueError, match="n_ctx 2049 is over 8 times the model's training context"):
        context_sizes(2049, 512, 512, 256)
    with pytest.raises(ValueError, match="does not give one"):
        context_sizes(0, 512, 512, 0)
    assert resolve_context(EngineConfig(n_ctx=0), 300).n_ctx == 300


def test_kv_cache_types():
    from gguf_stream.config import EngineConfig

    c = EngineConfig(type_k="q8_0", type_v="q4_0")
    assert (c.type_k, c.type_v) == ("q8_0", "q4_0")
    with pytest.raises(ValueError, match="type_k must be one of f32, f16, bf16, q8_0"):
        EngineConfig(type_k="q8")
    with pytest.raises(ValueError, match="type_v must be one of"):
        EngineConfig(type_v=8)  # names, not ggml ids
    with pytest.raises(ValueError, match="quantized V cache .* needs flash attention"):
        EngineConfig(type_v="q8_0", flash_attn=False)
    EngineConfig(type_k="q8_0", flash_attn=False)  # a quantized K cache works without it


def test_available_host_memory_reads_meminfo():
    from gguf_stream.config import available_host_memory

    value = available_host_memory()
    assert value is None or value > 0


def test_amx_layout_only_for_generate_decodes_of_many_rows():
    """CPU layers take AMX's layout (where the CPU has it) only when the split
    is chosen for AMX_MIN_ROWS rows or more: one row computes faster from
    CPU_REPACK's on the GPU box, 8 and 16 from AMX's."""
    from gguf_stream.config import AMX_MIN_ROWS, EngineConfig

    assert not EngineConfig(device="cuda").amx_layout  # one sequence: one-row decodes
    assert not EngineConfig(device="cuda", n_seq_max=AMX_MIN_ROWS - 1).amx_layout
    assert EngineConfig(device="cuda", n_seq_max=16).amx_layout
    assert EngineConfig(device="cuda", generate_rows=AMX_MIN_ROWS).amx_layout  # a verify of 7 drafts
    assert not EngineConfig(device="cuda", n_seq_max=16, cpu_repack=False).amx_layout
    assert not EngineConfig(device="host", n_seq_max=16).amx_layout  # host mode: no repacking by default


def test_three_slots_at_most_for_dense_splits_of_many_rows():
    from gguf_stream.config import DEEP_RING_MIN_ROWS, DEEP_RING_SLOTS

    assert EngineConfig(device="cuda").slots_max() == 2  # one sequence: one-row decodes
    assert EngineConfig(device="cuda", n_seq_max=DEEP_RING_MIN_ROWS - 1).slots_max() == 2
    assert EngineConfig(device="cuda", n_seq_max=16).slots_max() == DEEP_RING_SLOTS
    assert EngineConfig(device="cuda", generate_rows=DEEP_RING_MIN_ROWS).slots_max() == DEEP_RING_SLOTS  # 7 drafts
    assert EngineConfig(device="cuda", n_seq_max=16).slots_max(moe=True) == 2  # measured on dense models only
    assert EngineConfig(device="cuda", n_seq_max=16, max_slots=2).slots_max() == 2
    assert EngineConfig(max_slots=4).slots_max(moe=True) == 4


def test_no_third_slot_without_cpu_layers_to_hide_behind():
    from gguf_stream.config import DEEP_RING_SLOTS

    assert EngineConfig(device="host", n_seq_max=16).slots_max(cuda=False) == 2  # host mode: no split
    assert EngineConfig(device="cuda", n_seq_max=16, exact=True).slots_max() == 2
    assert EngineConfig(device="cuda", n_seq_max=16, generate_cpu_layers="none").slots_max() == 2
    assert EngineConfig(device="host", n_seq_max=16, generate_cpu_layers="auto").slots_max(cuda=False) == DEEP_RING_SLOTS
