"""CUDA checks; skipped unless llama-cpp-python has a CUDA device."""
import numpy as np
import pytest

from gguf_stream.config import cuda_available
from gguf_stream.model import StockModel, StreamedModel

pytestmark = pytest.mark.gpu
if not cuda_available():
    pytest.skip("needs a CUDA build of llama-cpp-python and a GPU", allow_module_level=True)

OPTS = dict(n_ctx=512, n_batch=64, n_ubatch=64)


@pytest.mark.parametrize("n_streamed,n_slots", [(3, 1), (4, 2), (8, 2)])
def test_cuda_streamed_matches_all_in_vram(tiny_path, n_streamed, n_slots):
    with StockModel(tiny_path, n_gpu_layers=-1, **OPTS) as s:
        prompt = s.tokenize("Once upon a time")
        ref_tokens, ref_logits = s.generate(prompt, 16, with_logits=True)
    with StreamedModel(tiny_path, n_streamed=n_streamed, n_slots=n_slots, exact=True, **OPTS) as m:
        tokens, logits = m.generate(prompt, 16, with_logits=True)
        c = m.stats.counters
        assert m.stats.pinned_host_bytes > 0
    assert tokens == ref_tokens
    assert np.abs(logits - ref_logits).max() == 0.0
    assert c.adoptions == n_streamed * 17 and c.uploads > 0


def test_cuda_default_is_the_measured_split_and_exact_is_one_flag_away(tiny_path, tmp_path, monkeypatch):
    """On CUDA the default generate split is measured (first load: the
    rates at load, the splits timed on the first generated tokens; second:
    from the cache) and CPU layers compute while generating; exact=True has
    none and no calibration."""
    monkeypatch.setenv("GGUF_STREAM_CACHE", str(tmp_path))
    seen = []
    for load in range(2):  # (no generate-resident layers: tiny layers would all fit the idle compute buffer)
        with StreamedModel(tiny_path, n_streamed=6, n_slots=2, generate_resident="none", **OPTS) as m:
            assert m.config.generate_cpu_layers == "auto"
            assert (m.calibration is None and m.streamer.live_split is not None) if load == 0 else \
                (m.calibration is not None and m.streamer.live_split is None)
            m.generate(m.tokenize("Once upon a time"), 40)
            assert m.calibration is not None and m.streamer.live_split is None
            seen.append((m.calibration.decodes, m.plan.cpu_layers))
    (first, cpu), (second, cpu2) = seen
    assert first > 0 and second == 0 and cpu == cpu2
    with StreamedModel(tiny_path, n_streamed=6, n_slots=2, exact=True, **OPTS) as m:
        assert m.calibration is None and m.plan.cpu_layers == () and m.config.generate_cpu_layers == "none"


def test_cuda_calibrated_split_computes_as_that_split_given(tiny_path, tmp_path, monkeypatch):
    """A first load's split search moves CPU layers back and forth, keeping
    repacked copies; its run computes bit-identically to a load given the
    chosen split explicitly. Negative control: one CPU layer more or less
    changes the logits (the CPU rounds differently from the GPU)."""
    from gguf_stream.perfmodel import split_cpu_layers

    monkeypatch.setenv("GGUF_STREAM_CACHE", str(tmp_path))
    opts = dict(n_streamed=6, n_slots=2, generate_resident="none", cpu_repack=True, **OPTS)
    with StreamedModel(tiny_path, **opts, calibrate_on_tokens=False) as m:
        assert m.calibration is not None and m.calibration.decodes > 0
        cpu, overflow = m.plan.cpu_layers, m.plan.generate_overflow
        prompt = m.tokenize("Once upon a time")
        tokens, logits = m.generate(prompt, 8, with_logits=True)
    other = split_cpu_layers(overflow, len(cpu) + 1 if len(cpu) < len(overflow) else len(cpu) - 1)
    results = {}
    for split in (cpu, other):
        with StreamedModel(tiny_path, **opts, generate_cpu_layers=split) as f:
            assert f.calibration is None and f.plan.cpu_layers == split
            results[split] = f.generate(prompt, 8, with_logits=True)
    assert tokens == results[cpu][0] and np.array_equal(logits, results[cpu][1])
    assert not np.array_equal(logits, results[other][1])


@pytest.mark.parametrize("reuse", [True, False], ids=["graph-reuse", "no-graph-reuse"])
def test_cuda_split_searched_on_tokens_leaves_that_split(tiny_path, tmp_path, monkeypatch, reuse):
    """The default first load times its splits on the first generated
    tokens, changing CPU layers between decodes of the real context (which
    drops its graphs at each change when it reuses them). Once the search
    is over, the context computes bit-identically to a load given the chosen
    split; a split one CPU layer off does not (negative control)."""
    from gguf_stream.perfmodel import split_cpu_layers

    monkeypatch.setenv("GGUF_STREAM_CACHE", str(tmp_path))
    opts = dict(n_streamed=6, n_slots=2, generate_resident="none", cpu_repack=True, graph_reuse=reuse, **OPTS)
    with StreamedModel(tiny_path, **opts) as m:
        assert m.streamer.reuses_graphs == reuse and m.streamer.live_split is not None
        prompt = m.tokenize("Once upon a time")
        m.generate(prompt, 40)
        assert m.calibration is not None and len(m.calibration.split_trials) >= 2
        cpu, overflow = m.plan.cpu_layers, m.plan.generate_overflow
        m.reset()
        tokens, logits = m.generate(prompt, 8, with_logits=True)
    other = split_cpu_layers(overflow, len(cpu) + 1 if len(cpu) < len(overflow) else len(cpu) - 1)
    results = {}
    for split in (cpu, other):
        with StreamedModel(tiny_path, **opts, generate_cpu_layers=split) as f:
            results[split] = f.generate(prompt, 8, with_logits=True)
    assert tokens == results[cpu][0] and np.array_equal(logits, results[cpu][1])
    assert not np.array_equal(logits, results[other][1])


def test_cuda_swapped_layers_change_output(tiny_path):
    with StockModel(tiny_path, n_gpu_layers=-1, **OPTS) as s:
        prompt = s.tokenize("Once upon a time")
        _, ref_logits = s.generate(prompt, 4, with_logits=True)
    with StreamedModel(tiny_path, n_streamed=4, n_slots=2, exact=True, **OPTS) as m:
        a, b = m.plan.streamed[:2]
        m.engine.debug_swap_sources(a, b)
        _, logits = m.generate(prompt, 4, with_logits=True)
    assert not np.array_equal(logits, ref_logits)


@pytest.mark.parametrize("piece_bytes", [None, "4096"], ids=["default-pieces", "64-row-pieces"])
def test_cuda_repacked_cpu_layers_match_stock_cpu_layers(tiny_path, piece_bytes, monkeypatch):
    """Generate phase with CPU layers on CUDA: they compute from a repacked
    copy (stock's CPU path), with their KV cache in host memory (recorded
    when the context opened). Layers 0-3 on the CPU, 4-7 on the GPU is stock
    -ngl 4's placement for single tokens, so a short prompt (generate phase
    throughout) must give stock -ngl 4's logits, up to rounding.
    Also with the weights repacked in 64-row pieces (gs_repack.c)."""
    if piece_bytes:
        monkeypatch.setenv("GGUF_STREAM_REPACK_PIECE_BYTES", piece_bytes)
    with StockModel(tiny_path, n_gpu_layers=4, **OPTS) as s:
        prompt = s.tokenize("Once upon a time")
        assert len(prompt) < 32
        ref_tokens, ref_logits = s.generate(prompt, 8, with_logits=True)
    for host_kv in (True, False):
        with StreamedModel(tiny_path, streamed_layers=(0, 1, 2, 3), n_slots=2, cpu_layer_host_kv=host_kv,
                           generate_cpu_layers=(0, 1, 2, 3), **OPTS) as m:
            assert m.stats.counters.repacked_bytes > 0
            _, logits = m.generate(prompt, 8, with_logits=True)
            c = m.stats.counters
        assert c.adoptions == 0  # every streamed layer ran on the CPU
        # recorded when the context opened, moved to host memory while empty (nothing copied)
        assert (c.host_kv_bytes > 0) == host_kv and c.kv_moved_bytes == 0
        assert np.abs(logits - ref_logits).max() < 1e-2 * np.abs(ref_logits).max()


def teacher_forced_chat(m):
    """Prompt (streamed), tokens (CPU layers), a second prompt, more tokens."""
    out = []
    for text, bos in (("Once upon a time " * 12, True), (" and then " * 16, False)):
        m.eval(m.tokenize(text, add_bos=bos))
        for tok in (5, 6, 7, 8):
            m.eval([tok])
            out.append(m.logits())
    return np.stack(out)


HYBRID = dict(streamed_layers=(1, 3, 5, 7), n_slots=2, generate_cpu_layers=(3, 7))


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded-at-open", "negative-control"])
def test_cuda_same_prompt_gives_the_same_logits_every_time_in_one_context(tiny_path, monkeypatch, recorded):
    """CPU layers with their KV caches in host memory while generating: the
    same short prompt (generate phase) greedy-decoded three times in one
    context, reset between, gives bit-identical logits each time. The context
    records its caches when it opens; negative control: without that, the
    first time computes the CPU layers' attention on the GPU (the caches
    still where llama.cpp put them) and the later ones on the CPU, so the
    first differs from the second while the second equals the third."""
    from gguf_stream.streamer import Streamer

    if not recorded:
        monkeypatch.setattr(Streamer, "_record_kv", lambda self, ctx: None)
    with StreamedModel(tiny_path, streamed_layers=(0, 1, 2, 3), n_slots=2, generate_cpu_layers=(0, 1, 2, 3),
                       **OPTS) as m:
        prompt = m.tokenize("Once upon a time")
        assert len(prompt) < m.streamer.prompt_min_ubatch
        runs = []
        for _ in range(3):
            m.reset()
            runs.append(m.generate(prompt, 8, with_logits=True)[1])
        assert m.stats.counters.host_kv_bytes > 0
    assert np.array_equal(runs[1], runs[2])
    assert np.array_equal(runs[0], runs[1]) == recorded


def test_cuda_hybrid_chat_keeps_kv_across_phase_switches(tiny_path):
    """Prompt (streamed, KV on the GPU), tokens (CPU layers' KV in host
    memory), a second prompt, more tokens, all teacher-forced: logits equal
    the same run with every KV cache left on the device, within rounding
    (a cache that lost the tokens of a phase would be far off)."""
    runs = {}
    for host_kv in (True, False):
        with StreamedModel(tiny_path, cpu_layer_host_kv=host_kv, **HYBRID, **OPTS) as m:
            runs[host_kv] = teacher_forced_chat(m), m.stats.counters
    (l1, c1), (l0, c0) = runs[True], runs[False]
    assert c1.kv_moved_bytes >= 3 * c1.host_kv_bytes // 2 > 0 and c0.kv_moved_bytes == 0
    assert np.abs(l1 - l0).max() < 1e-2 * np.abs(l0).max()


def test_cuda_cpu_layers_are_cpu_layers_while_generating(tiny_path):
    """CPU layers count as CPU layers for llama.cpp while generating (their
    norms then run on the CPU) and as CUDA layers for prompts; the logits
    equal those with the norms left on the GPU, within rounding."""
    import ctypes

    from gguf_stream import llama_abi

    fn = getattr(llama_abi.llama()._lib, "_ZNK11llama_model9dev_layerEi")
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_int], ctypes.c_void_p
    runs = {}
    for own in (True, False):
        with StreamedModel(tiny_path, cpu_layer_device=own, **HYBRID, **OPTS) as m:
            assert m.streamer.layer_devices_bound == own
            n = m.plan.n_layer
            # (the context's opening decode, which records its KV caches, left the generate phase)
            m.eval(m.tokenize("Once upon a time " * 12)[:OPTS["n_batch"]])  # one prompt-sized ubatch
            loaded = [fn(m.model, i) for i in range(n)]
            assert len(set(loaded)) == 1  # every layer a CUDA layer, as loaded
            m.eval([5])
            generating = [fn(m.model, i) for i in range(n)]
            m.reset()
            runs[own] = teacher_forced_chat(m)
        changed = [i for i in range(n) if generating[i] != loaded[i]]
        assert changed == ([3, 7] if own else [])
    assert np.abs(runs[True] - runs[False]).max() < 1e-2 * np.abs(runs[False]).max()


def _one_slot_bytes(path, opts) -> int:
    """The planner's estimate of streaming's minimum, as a CUDA load plans it."""
    from gguf_stream import make_plan, read_model
    from gguf_stream.memory import LAZY_KERNEL_BYTES

    mf = read_model(path)
    return make_plan(mf, n_streamed=mf.n_layer, n_slots=1, n_ctx=opts["n_ctx"], n_ubatch=opts["n_ubatch"],
                     runtime_bytes=LAZY_KERNEL_BYTES).device_bytes


def test_cuda_budget_below_streaming_minimum_runs_the_stock_split(tiny_path):
    from gguf_stream.planner import MEASURED_MINIMUM_MARGIN

    # a KV cache large enough that a budget beyond the measuring margin still holds stock's split
    opts = {**OPTS, "n_ctx": 4096}  # (at most 8x the tiny model's training context)
    budget = int(_one_slot_bytes(tiny_path, opts) / (1 + MEASURED_MINIMUM_MARGIN)) - 1
    with StreamedModel(tiny_path, vram_budget=budget, **opts) as m:
        ngl = m.plan.stock_gpu_layers
        assert ngl is not None and m.engine is None and m.stats.mode == f"stock split ngl={ngl}"
        prompt = m.tokenize("Once upon a time")
        tokens, logits = m.generate(prompt, 8, with_logits=True)
    with StockModel(tiny_path, n_gpu_layers=ngl, **opts) as s:
        ref_tokens, ref_logits = s.generate(prompt, 8, with_logits=True)
    assert tokens == ref_tokens and np.array_equal(logits, ref_logits)


def test_cuda_budget_just_below_the_estimated_minimum_streams_if_measured_to_fit(tiny_path):
    """The estimate of streaming's minimum is conservative: a budget just
    under it loads that minimum once to measure it, and streams when the
    measured peak fits. Whatever was chosen, the run's peak (a full ubatch,
    then generating) stays within the budget."""
    budget = _one_slot_bytes(tiny_path, OPTS) - 1
    with StreamedModel(tiny_path, vram_budget=budget, **OPTS) as m:
        streamed = m.engine is not None
        m.eval([max(m.token_bos(), 0)] + [1] * (OPTS["n_ubatch"] - 1))
        m.reset()
        prompt = m.tokenize("Once upon a time")
        m.generate(prompt, 8)
        m.synchronize()
        peak = m.stats.vram_peak_bytes
        print(f"budget {budget}, streamed {streamed} ({m.stats.mode}), peak {peak}")
        assert peak <= budget
        # the tiny model's measured minimum is far under its estimate (64 MiB for lazily loaded kernels)
        assert streamed and m.plan.streamed == tuple(range(m.plan.n_layer)) and m.plan.n_slots == 1


def test_cuda_no_placement_plans_for_the_free_vram(tiny_path):
    """Without a placement, StreamedLlama and load plan for the free VRAM
    less the headroom, as the command line does (before, StreamedLlama kept
    every layer resident, and a model larger than the GPU failed to load)."""
    from gguf_stream import native
    from gguf_stream.config import GPU_HEADROOM
    from gguf_stream.llama_compat import StreamedLlama

    want = native.device_memory("CUDA0")[0] - GPU_HEADROOM
    llm = StreamedLlama(tiny_path, n_ctx=512, verbose=False)
    try:
        got_llama = llm._streamer.config.vram_budget
        assert llm.plan.streamed == ()  # the tiny model fits
    finally:
        llm.close()
    with StreamedModel(tiny_path, **OPTS) as m:
        got_model = m.config.vram_budget
    for got in (got_llama, got_model):
        assert abs(got - want) < 256 << 20, (got, want)  # free VRAM moves a little between loads
