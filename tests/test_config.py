"""Run options, the device decision, threads and the cache directory (config.py)."""
from pathlib import Path

import pytest

from gguf_stream import EnvironmentMismatchError
from gguf_stream.config import EngineConfig, cache_dir, cuda_available, physical_cores, select_device


@pytest.mark.parametrize("kw,match", [
    (dict(device="gpu"), "device must be"),
    (dict(n_batch=16, n_ubatch=32), "n_ubatch"),
    (dict(generate_cpu_layers="all"), "generate_cpu_layers must be"),
    (dict(generate_resident="some"), "generate_resident must be"),
    (dict(n_slots=0), "n_slots must be at least 1"),
])
def test_bad_options_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kw)


def test_derived_options():
    assert EngineConfig(device="host").repack is False  # host mode: stock and streamed use plain kernels
    assert EngineConfig(device="cuda").repack is True
    assert EngineConfig(device="host", cpu_repack=True).repack is True
    assert EngineConfig(n_threads=3).threads == 3
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
