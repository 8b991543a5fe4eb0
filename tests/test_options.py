"""One set of engine options through every door: each EngineConfig field,
given to load(), StreamedLlama, server.create_app and the commands (run,
chat, serve, plan), reaches the engine's config with the value given. The
samples table must name every field, so a field added to EngineConfig fails
here until each front end takes it. Also: the default placement on a GPU,
ignored llama.cpp options warning, --mlock, --mmap, -fa auto."""
import gguf_stream  # noqa: F401  (llama.cpp before numpy)

import dataclasses
from dataclasses import replace
import os
import warnings

import pytest

from conftest import CPU
from gguf_stream import cli, config, native, streamer
from gguf_stream import placement as placement_module
from gguf_stream.config import ENGINE_OPTIONS, EngineConfig
from gguf_stream.llama_compat import IgnoredOptionWarning, StreamedLlama
from gguf_stream.model import load

# field -> [(Python value, command-line flags, value the config holds)]; the
# commands' host placement streams layers 1, 3, 5, 7 of the tiny model
SAMPLES = {
    "vram_budget": [("1GiB", ["--vram-budget", "1GiB"], "1GiB")],
    "n_ctx": [(300, ["-c", "300"], 300)],
    "n_batch": [(128, ["-b", "128"], 128)],
    "n_ubatch": [(64, ["-ub", "64"], 64)],
    "flash_attn": [(True, ["-fa", "on"], True), (False, ["-fa", "off"], False), ("auto", ["-fa", "auto"], "auto")],
    "device": [("host", ["--device", "host"], "host")],
    "n_streamed": [(3, ["--n-streamed", "3"], 3)],
    "streamed_layers": [((1, 2), ["--streamed-layers", "1,2"], (1, 2))],
    "n_slots": [(1, ["--n-slots", "1"], 1)],
    "max_slots": [(3, ["--max-slots", "3"], 3)],
    "prefetch": [(False, ["--no-prefetch"], False)],
    "host_copy_delay_us": [(5, ["--host-copy-delay-us", "5"], 5)],
    "n_threads": [(3, ["-t", "3"], 3)],
    "n_threads_batch": [(2, ["-tb", "2"], 2)],
    "cpu_repack": [(True, ["--repack"], True), (False, ["--no-repack"], False)],
    "generate_cpu_layers": [((3,), ["--generate-cpu-layers", "3"], (3,)),
                            ("auto", ["--generate-cpu-layers", "auto"], "auto")],
    "generate_resident": [("none", ["--generate-resident", "none"], "none"),
                          ((1,), ["--generate-resident", "1"], (1,))],
    "cpu_layer_host_kv": [(False, ["--no-cpu-layer-host-kv"], False)],
    "cpu_layer_device": [(False, ["--no-cpu-layer-device"], False)],
    "graph_reuse": [(False, ["--no-graph-reuse"], False)],
    "whole_layers": [(True, ["--whole-layers"], True)],
    "type_k": [("q8_0", ["-ctk", "q8_0"], "q8_0")],
    "type_v": [("bf16", ["-ctv", "bf16"], "bf16")],
    "host_memory_check": [(False, ["--no-host-memory-check"], False)],
    "use_mlock": [(True, ["--mlock"], True)],
    "verbose": [(True, ["-v"], True), (False, [], False)],
    "exact": [(True, ["--exact"], True)],
    "progress": [(False, ["-q"], False)],
    "host_budget": [("1GiB", ["--host-budget", "1GiB"], "1GiB")],
    "disk_direct": [(True, ["--disk-direct"], True)],
    "n_seq_max": [(2, ["-np", "2"], 2)],
    "kv_unified": [(True, ["-kvu"], True)],
    "cpu_layers_max_batch": [(4, ["--cpu-layers-max-batch", "4"], 4)],
    "generate_rows": [(8, ["--generate-rows", "8"], 8)],
    "moe_split": [(4, ["--moe-split", "4"], 4)],
    "prompt_cpu_experts": [(8, ["--prompt-cpu-experts", "8"], 8)],
    "calibrate_on_tokens": [(False, ["--calibrate-at-load"], False)],
}
CASES = [(name, *sample) for name, samples in SAMPLES.items() for sample in samples]
IDS = [f"{name}={value}" for name, value, _, _ in CASES]


def test_every_field_has_samples_and_a_flag():
    from gguf_stream.cli.options import ENGINE_FLAGS, GLOBAL_FIELDS

    assert set(SAMPLES) == set(ENGINE_OPTIONS), "give the new EngineConfig field samples (and every front end it)"
    assert {f.field for f in ENGINE_FLAGS if f.field} | set(GLOBAL_FIELDS) == set(ENGINE_OPTIONS)


class Reached(Exception):
    """Raised where the engine gets its config, before anything loads."""


@pytest.fixture
def engine_config(monkeypatch):
    """The config the Streamer is created with (then the load stops)."""
    seen = []

    def capture(self, path, config, **kw):
        seen.append(config)
        raise Reached

    monkeypatch.setattr(streamer.Streamer, "__init__", capture)
    return seen


def _reach(seen, make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IgnoredOptionWarning)
        with pytest.raises(Reached):
            make()
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize("name, value, flags, want", CASES, ids=IDS)
def test_load_takes_every_engine_option(engine_config, tiny_path, name, value, flags, want):
    assert getattr(_reach(engine_config, lambda: load(tiny_path, **{"device": "host", name: value})), name) == want


@pytest.mark.parametrize("name, value, flags, want", CASES, ids=IDS)
def test_streamed_llama_takes_every_engine_option(engine_config, tiny_path, name, value, flags, want):
    got = _reach(engine_config, lambda: StreamedLlama(tiny_path, **{"device": "host", name: value}))
    assert getattr(got, name) == want


@pytest.mark.parametrize("name, value, flags, want", CASES, ids=IDS)
def test_create_app_takes_every_engine_option(engine_config, tiny_path, name, value, flags, want):
    server = pytest.importorskip("gguf_stream.server")
    got = _reach(engine_config, lambda: server.create_app(tiny_path, **{"device": "host", name: value}))
    assert getattr(got, name) == want


@pytest.mark.parametrize("command", ["run", "chat", "serve"])
@pytest.mark.parametrize("name, value, flags, want", CASES, ids=IDS)
def test_every_command_takes_every_engine_option(engine_config, tiny_path, capsys, command, name, value, flags,
                                                 want):
    if command == "serve":
        pytest.importorskip("gguf_stream.server")
    extra = {"run": ["-p", "hi"], "chat": [], "serve": ["--port", "0"]}[command]
    device = [] if name == "device" else ["--device", "host"]
    got = _reach(engine_config, lambda: cli.main([command, str(tiny_path), *extra, *device, *flags]))
    assert getattr(got, name) == want


@pytest.mark.parametrize("name, value, flags, want", CASES, ids=IDS)
def test_plan_takes_every_engine_option(tiny_path, capsys, monkeypatch, name, value, flags, want):
    """plan builds its EngineConfig from the same flags (and needs a placement)."""
    seen = []
    monkeypatch.setattr(placement_module, "initial_plan", lambda mf, c, cuda, **kw: seen.append(c) or _raise(Reached()))
    placement = [] if name in ("vram_budget", "n_streamed", "streamed_layers") else ["--n-streamed", "2"]
    with pytest.raises(Reached):
        cli.main(["plan", str(tiny_path), *placement, *flags])
    assert getattr(seen[0], name) == want


def _raise(exc):
    raise exc


# ------------------------------------------------------------ no placement on a GPU

def test_no_placement_on_a_gpu_plans_for_the_free_vram(monkeypatch, tiny_path):
    """Without a placement, a CUDA run plans for the free VRAM less the
    headroom (as the CLI does), through StreamedLlama's Streamer and
    StreamedModel alike; with one, or in host mode, the config is kept."""
    from gguf_stream import model

    free = 5 << 30
    monkeypatch.setattr(native, "device_memory", lambda dev: (free, 8 << 30))
    assert config.with_default_budget(EngineConfig(), cuda=True).vram_budget == free - config.GPU_HEADROOM
    for kept, cuda in ((EngineConfig(n_streamed=2), True), (EngineConfig(vram_budget="2GiB"), True),
                       (EngineConfig(), False)):
        assert config.with_default_budget(kept, cuda) == kept

    seen = []

    def capture(mf, c, cuda, **kw):
        seen.append(c)
        raise Reached

    monkeypatch.setattr(streamer, "initial_plan", capture)
    with pytest.raises(Reached):
        streamer.Streamer(tiny_path, EngineConfig(device="host", n_ctx=256), cuda=True)
    monkeypatch.setattr(model, "initial_plan", capture)
    monkeypatch.setattr(model, "select_device", lambda requested: "cuda")
    with pytest.raises(Reached):
        model.StreamedModel(tiny_path, device="host", n_ctx=256)
    assert [c.vram_budget for c in seen] == [free - config.GPU_HEADROOM] * 2
    with pytest.raises(Reached):  # host mode: every layer resident, as before
        streamer.Streamer(tiny_path, EngineConfig(device="host", n_ctx=256), cuda=False)
    assert seen[-1].vram_budget is None and not seen[-1].places_layers


# ------------------------------------------------------------ llama.cpp options the engine decides

@pytest.mark.parametrize("option, value, needle", [
    ("n_gpu_layers", -1, "n_gpu_layers=-1 is ignored: gguf-stream places the layers itself"),
    ("tensor_split", [0.5, 0.5], "tensor_split=[0.5, 0.5] is ignored: gguf-stream runs on one GPU"),
    ("main_gpu", 1, "main_gpu=1 is ignored"),
    ("split_mode", 2, "split_mode=2 is ignored"),
    ("use_mmap", True, "use_mmap=True is ignored: gguf-stream loads without mmap"),
])
def test_ignored_llama_options_warn(engine_config, tiny_path, option, value, needle):
    import re

    with pytest.warns(IgnoredOptionWarning, match=re.escape(needle)) as record:
        with pytest.raises(Reached):
            StreamedLlama(tiny_path, device="host", **{option: value})
    assert len(record) == 1 and record[0].filename == __file__  # points at the caller
    if option == "n_gpu_layers":
        assert "vram_budget='8GiB' (--vram-budget)" in str(record[0].message)


def test_options_that_change_nothing_do_not_warn(engine_config, tiny_path):
    """Llama's defaults (as llama_cpp.server passes them for every model) and
    use_mmap=False (what the engine does) are silent, through create_app too."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", IgnoredOptionWarning)
        with pytest.raises(Reached):
            StreamedLlama(tiny_path, device="host", n_gpu_layers=0, main_gpu=0, tensor_split=None, use_mmap=False)
        server = pytest.importorskip("gguf_stream.server")
        with pytest.raises(Reached):
            server.create_app(tiny_path, device="host")
    # ModelSettings turns mlock on by default; llama.cpp's own server does not
    assert engine_config[-1].use_mlock is False
    with pytest.warns(IgnoredOptionWarning, match="n_gpu_layers=-1 is ignored"):
        with pytest.raises(Reached):
            server.create_app(tiny_path, device="host", n_gpu_layers=-1)


def test_load_names_an_unknown_option(tiny_path):
    with pytest.raises(TypeError, match="unknown option n_gpu_layers; the engine's options are vram_budget, .*"
                                        "go to gguf_stream.StreamedLlama"):
        load(tiny_path, n_gpu_layers=-1)


def test_streamed_llama_is_exported_at_the_top_level():
    from gguf_stream import llama_compat

    assert gguf_stream.StreamedLlama is llama_compat.StreamedLlama
    assert "StreamedLlama" in gguf_stream.__all__


# ------------------------------------------------------------ --mlock, --mmap, -fa auto

def _locked_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmLck:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmLck from /proc")
def test_mlock_locks_the_models_host_memory(tiny_path):
    """use_mlock (--mlock) has llama.cpp lock the model's host buffers, as its
    --mlock --no-mmap does: here (host mode) every weight; without it nothing
    is locked (the negative control)."""
    from gguf_stream.gguf_file import read_model

    weights = read_model(tiny_path).total_bytes
    for mlock in (False, True):
        before = _locked_bytes()
        with load(tiny_path, n_streamed=2, use_mlock=mlock, **CPU) as m:
            locked = _locked_bytes() - before
            assert m.generate(m.tokenize("hi"), 2)
        if mlock:
            assert locked >= 0.9 * weights, (locked, weights)
        else:
            assert locked < 0.1 * weights, (locked, weights)


def test_mmap_is_refused_and_no_mmap_accepted(capsys, tiny_path):
    assert cli.main(["run", str(tiny_path), "-p", "hi", "--mmap"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "--mmap: gguf-stream loads models without mmap" in err
    assert cli.main(["plan", str(tiny_path), "--n-streamed", "2", "--no-mmap", "-c", "256"]) == cli.EXIT_OK


def test_flash_attention_auto_is_planned_as_the_device_answers(capsys, tiny_path):
    """-fa auto is planned as what llama.cpp will choose: the device is asked
    about the model's attention shape and KV types before planning (the CPU
    computes this one; a head size no kernel has is refused, the negative
    control). With no device to ask (a CUDA plan on a machine without CUDA)
    it is planned as off, the larger compute buffer."""
    from gguf_stream.config import cuda_available, resolve_flash_attn
    from gguf_stream.gguf_file import read_model
    from gguf_stream.memory import format_size
    from gguf_stream.planner import make_plan

    mf = read_model(tiny_path)
    off, on = (make_plan(mf, n_streamed=2, n_ctx=256, n_ubatch=256, flash_attn=fa).device_bytes for fa in (False, True))
    assert off > on
    assert cli.main(["plan", str(tiny_path), "--n-streamed", "2", "-c", "256", "-fa", "auto", "--device", "host"]) \
        == cli.EXIT_OK
    out = capsys.readouterr().out
    assert f"= {format_size(on)}" in out and "-fa auto (planned as on: the device's answer" in out
    if not cuda_available():
        from gguf_stream.memory import LAZY_KERNEL_BYTES

        assert cli.main(["plan", str(tiny_path), "--n-streamed", "2", "-c", "256", "-fa", "auto"]) == cli.EXIT_OK
        out = capsys.readouterr().out
        cuda_off = off + LAZY_KERNEL_BYTES  # a CUDA plan: room for kernels loaded at first use
        assert f"= {format_size(cuda_off)}" in out and "-fa auto (planned as off: no CUDA device here to ask" in out
    auto = EngineConfig(flash_attn="auto")
    assert auto.planned_flash_attn is False  # not asked yet
    assert resolve_flash_attn(auto, mf.hparams, cuda=False).planned_flash_attn is True
    odd = {**mf.hparams, "key_length": 40, "value_length": 40}  # q8_0 rows of 40: not whole blocks
    assert resolve_flash_attn(replace(auto, type_k="q8_0"), odd, cuda=False).flash_attn_auto is False
    assert resolve_flash_attn(EngineConfig(flash_attn=False), mf.hparams, cuda=False).planned_flash_attn is False
    assert EngineConfig(flash_attn="auto", type_v="q8_0").planned_flash_attn is True  # llama.cpp turns it on
    with pytest.raises(ValueError, match="flash_attn must be True, False or 'auto'"):
        EngineConfig(flash_attn="yes")


def test_flash_attention_auto_runs_like_stock_auto(tiny_path):
    """-fa auto reaches llama.cpp as its own auto (the context decides), and
    the streamed run's logits equal stock llama.cpp's with auto."""
    import numpy as np

    from gguf_stream.model import StockModel

    opts = dict(CPU, flash_attn="auto", device="host")
    with StockModel(tiny_path, 0, **opts) as stock:
        want = stock.generate(stock.tokenize("The capital of France is"), 6, with_logits=True)
    llm = StreamedLlama(tiny_path, n_streamed=4, **opts, verbose=False)
    try:
        assert llm.context_params.flash_attn_type == -1  # LLAMA_FLASH_ATTN_TYPE_AUTO
    finally:
        llm.close()
    with load(tiny_path, n_streamed=4, **opts) as m:
        got = m.generate(m.tokenize("The capital of France is"), 6, with_logits=True)
        assert m.config.planned_flash_attn is True and m.streamer.flash_attn is True  # planned as it ended
    assert got[0] == want[0] and np.array_equal(got[1], want[1])


def test_samples_are_valid_configs():
    for name, value, _, _ in CASES:
        EngineConfig(**{name: value})
    assert dataclasses.is_dataclass(EngineConfig)


def test_create_app_names_an_unknown_option(tiny_path):
    server = pytest.importorskip("gguf_stream.server")
    with pytest.raises(TypeError, match="unknown option vram_budgt: create_app takes the engine's"):
        server.create_app(tiny_path, vram_budgt="1GiB")
