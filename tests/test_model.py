"""The real engine in host mode (slots in host memory, CPU compute) against
stock llama.cpp on the same model, prompt and options: greedy tokens and
logits must be bit-identical, and the counters must prove streaming ran."""

import ctypes

import numpy as np
import pytest

from conftest import CPU, HYBRID, N_GEN, PROMPT, hybrid_cpu_layers, needs_no_amx
from gguf_stream import BudgetError, DecodeError, EnvironmentMismatchError, ModelFileError, read_model
from gguf_stream.model import StockModel, StreamedModel

def run_streamed(path, prompt, **options):
    with StreamedModel(path, **CPU, **options) as m:
        tokens, logits = m.generate(prompt, N_GEN, with_logits=True)
        return tokens, logits, m.stats.counters, m.plan


CONFIGS = {
    "1 slot, 4 streamed": dict(n_streamed=4, n_slots=1),
    "2 slots, 5 streamed": dict(n_streamed=5, n_slots=2),
    "3 slots, all streamed": dict(n_streamed=-1, n_slots=3),
    "no prefetch (synchronous uploads)": dict(n_streamed=3, n_slots=2, prefetch=False),
    "slow link (adoptions wait)": dict(n_streamed=-1, n_slots=2, host_copy_delay_us=20000),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_streamed_is_bit_identical_to_stock(case, name):
    path, prompt, ref_tokens, ref_logits = case
    options = dict(CONFIGS[name])
    if options["n_streamed"] == -1:
        from gguf_stream import read_model

        options["n_streamed"] = read_model(path).n_layer
    tokens, logits, c, plan = run_streamed(path, prompt, **options)
    assert tokens == ref_tokens
    assert np.array_equal(logits, ref_logits), f"max |diff| {np.abs(logits - ref_logits).max()}"

    evaluations = 1 + N_GEN  # the prompt (one ubatch), then one per generated token
    assert len(plan.streamed) == options["n_streamed"]
    assert c.evaluations == evaluations
    assert c.adoptions == len(plan.streamed) * evaluations
    assert c.uploads > 0 and c.bytes_uploaded > 0
    if options.get("prefetch") is False:
        # every upload is a synchronous one at adoption; a layer still held
        # by a slot from the previous evaluation is adopted without one
        assert c.sync_fallbacks == c.uploads > 0 and c.adopted_waited == 0
    else:
        assert c.sync_fallbacks == 0
    if options.get("host_copy_delay_us"):
        assert c.adopted_waited > 0 and c.wait_seconds > 0


def test_generate_phase_cpu_layers_match(case):
    """Hybrid placement: a prompt of >= 32 tokens streams every overflow layer,
    single-token generation leaves the chosen layers in host memory for the
    CPU and streams the rest. Output must not change."""
    path, _, _, _ = case
    long_prompt = PROMPT * 4
    with StockModel(path, **CPU) as s:
        prompt = s.tokenize(long_prompt)
        assert len(prompt) >= 32
        ref_tokens, ref_logits = s.generate(prompt, N_GEN, with_logits=True)
    cpu = hybrid_cpu_layers(path)
    with StreamedModel(path, **CPU, **HYBRID, generate_cpu_layers=cpu) as m:
        assert m.plan.cpu_layers == cpu and len(cpu) == 2
        tokens, logits = m.generate(prompt, N_GEN, with_logits=True)
        c = m.stats.counters
    assert tokens == ref_tokens and np.array_equal(logits, ref_logits)
    prompt_evals = -(-len(prompt) // CPU["n_batch"])
    assert c.adoptions == 6 * prompt_evals + (6 - 2) * N_GEN
    # the CPU layers' KV caches were moved into host memory for generation
    assert c.host_kv_bytes > 0 and c.kv_moved_bytes >= c.host_kv_bytes // 2


HOOKLESS = {
    "every streamed layer holds a slot": dict(n_streamed=2, n_slots=2),
    "the rest on the CPU": dict(n_streamed=6, n_slots=2, n_cpu=4),
}


def run_hookless_case(path, prompt, n_streamed, n_slots, n_cpu=0):
    """Greedy tokens, logits and counters; the first n_cpu streamed layers
    are CPU layers while generating."""
    from gguf_stream.planner import interleaved_layers

    cpu = interleaved_layers(read_model(path).n_layer, n_streamed)[:n_cpu]
    with StreamedModel(path, **CPU, n_streamed=n_streamed, n_slots=n_slots, generate_cpu_layers=cpu) as m:
        tokens, logits = m.generate(prompt, N_GEN, with_logits=True)
        return tokens, logits, m.stats.counters


@pytest.mark.parametrize("name", HOOKLESS)
def test_generation_leaves_out_the_hook_where_it_has_nothing_to_do(case, name, monkeypatch):
    """While generating, when no more layers stream than there are slots (each
    stays in the slot it was adopted into), a decode that reuses the last
    graph runs without the scheduler hook, as stock's does: the output must
    not change, and the counters show those decodes, with no upload in them.
    With the hook forced on (GGUF_STREAM_ALWAYS_HOOK=1, the A/B aid) none
    leaves it out, and the output is the same."""
    path, _, _, _ = case
    with StockModel(path, **CPU) as s:
        prompt = s.tokenize(PROMPT * 4)
        ref_tokens, ref_logits = s.generate(prompt, N_GEN, with_logits=True)
    tokens, logits, c = run_hookless_case(path, prompt, **HOOKLESS[name])
    assert tokens == ref_tokens and np.array_equal(logits, ref_logits)
    # the first generated token's decode (a new graph) ran with the hook, the rest without
    assert c.hookless_decodes == N_GEN - 1
    monkeypatch.setenv("GGUF_STREAM_ALWAYS_HOOK", "1")
    tokens, logits, hooked = run_hookless_case(path, prompt, **HOOKLESS[name])
    assert tokens == ref_tokens and np.array_equal(logits, ref_logits)
    assert hooked.hookless_decodes == 0 and hooked.uploads == c.uploads


def test_generation_keeps_the_hook_while_layers_stream(case):
    path, prompt, ref_tokens, _ = case
    with StreamedModel(path, **CPU, n_streamed=3, n_slots=2) as m:
        assert m.generate(prompt, N_GEN) == ref_tokens
        assert m.stats.counters.hookless_decodes == 0


def test_timeline_accounts_for_each_decode(case):
    """The probe's timeline splits a token's wall time into graph building,
    segments per backend and the hook's work, adding no boundaries: on this
    CPU build every segment is a CPU one, the parts never exceed the wall
    time, and the output is the hybrid run's."""
    path, prompt, _, _ = case
    cpu = hybrid_cpu_layers(path)
    with StreamedModel(path, **CPU, **HYBRID, generate_cpu_layers=cpu) as m:
        m.eval(prompt)
        m.reset_counters()
        m.engine.timeline(True)
        for _ in range(4):
            m.engine.timeline_mark(True)
            m.eval([1])
            m.engine.timeline_mark(False)
        t, boundaries = m.engine.timeline_get(), m.stats.counters.boundaries
        m.engine.timeline(False)
        with pytest.raises(Exception, match="timeline is off"):
            m.engine.timeline_mark(True)
    assert t.decodes == 4 and t.gpu_segments == 0 and t.gpu_s == 0
    # one segment per synchronised boundary, plus each graph's last one
    assert t.cpu_segments == boundaries + 4
    parts = t.pre_s + t.cpu_s + t.between_s
    assert min(t.pre_s, t.cpu_s, t.between_s) > 0 and parts <= t.wall_s
    # the compute is a real share of it (not a bound on speed: a tiny model's token
    # is a few ms, of which graph building and the hook's work take up to half)
    assert t.cpu_s > 0.25 * t.wall_s


def state_bytes(m) -> bytes:
    lc = m._lc
    n = lc.llama_state_get_size(m.ctx)
    buf = (ctypes.c_uint8 * n)()
    assert lc.llama_state_get_data(m.ctx, buf, n) == n
    return bytes(buf)


def load_state(m, data: bytes) -> None:
    lc = m._lc
    buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    assert lc.llama_state_set_data(m.ctx, buf, len(data)) == len(data)


def continue_greedy(m, token, n):
    tokens, logits = [], []
    for _ in range(n):
        m.eval([token])
        lg = m.logits()
        token = int(np.argmax(lg))
        tokens.append(token)
        logits.append(lg)
    return tokens, np.stack(logits)


def test_state_saved_while_cpu_layers_hold_kv_on_host(case):
    """While generating, the CPU layers' KV caches live in host memory;
    llama.cpp's state save reads them through per-stream views that must
    follow. A state saved there and loaded into stock must continue exactly
    as the streamed model does (stale views would save the device copy,
    which lacks every generated token's keys and values)."""
    path = case[0]
    with StreamedModel(path, **CPU, **HYBRID, generate_cpu_layers=hybrid_cpu_layers(path)) as m:
        prompt = m.tokenize(PROMPT * 4)
        m.generate(prompt, 4)
        assert m.stats.counters.host_kv_bytes > 0
        state = state_bytes(m)
        ref = continue_greedy(m, 7, 4)
    with StockModel(path, **CPU) as s:
        load_state(s, state)
        got = continue_greedy(s, 7, 4)
    assert got[0] == ref[0] and np.array_equal(got[1], ref[1])


def test_state_loaded_while_cpu_layers_hold_kv_on_host(case):
    """The other direction: a stock state loaded while the CPU layers'
    caches are in host memory must land there (not in the device copy,
    which the next phase switch would overwrite with the old prompt's)."""
    path = case[0]
    with StockModel(path, **CPU) as s:
        s.generate(s.tokenize(PROMPT * 4), 3)
        state = state_bytes(s)
        ref = continue_greedy(s, 7, 4)
    with StreamedModel(path, **CPU, **HYBRID, generate_cpu_layers=hybrid_cpu_layers(path)) as m:
        m.generate(m.tokenize("A different prompt that fills the cache with other keys and values " * 2), 3)
        assert m.stats.counters.host_kv_bytes > 0
        load_state(m, state)
        got = continue_greedy(m, 7, 4)
    assert got[0] == ref[0] and np.array_equal(got[1], ref[1])


def test_turns_switch_phases_back_and_forth(case):
    """A chat: prompt, a few tokens, a second long prompt, more tokens. The
    CPU layers' caches go to host memory and back at every switch and must
    carry every token's keys and values across (the second prompt attends to
    the generated tokens, the last tokens to everything)."""
    path = case[0]

    def chat(m):
        first = m.generate(m.tokenize(PROMPT * 2), 3)
        second = m.generate(m.tokenize(" Then the fox said to the dog: " * 6, add_bos=False), 3, with_logits=True)
        return first, second

    opts = {**CPU, "n_ctx": 512}
    with StockModel(path, **opts) as s:
        ref_first, (ref_tokens, ref_logits) = chat(s)
    with StreamedModel(path, **opts, **HYBRID, generate_cpu_layers=hybrid_cpu_layers(path)) as m:
        first, (tokens, logits) = chat(m)
        c = m.stats.counters
    assert first == ref_first and tokens == ref_tokens and np.array_equal(logits, ref_logits)
    assert c.kv_moved_bytes >= 3 * c.host_kv_bytes // 2  # to host, back, to host again


def test_cpu_layer_kv_can_stay_on_the_device(case):
    """cpu_layer_host_kv=False (the A/B switch) keeps every KV cache in
    llama.cpp's buffers and gives the same output."""
    path, _, _, _ = case
    with StockModel(path, **CPU) as s:
        prompt = s.tokenize(PROMPT * 4)
        ref_tokens, ref_logits = s.generate(prompt, 4, with_logits=True)
    with StreamedModel(path, **CPU, **HYBRID, generate_cpu_layers=hybrid_cpu_layers(path),
                       cpu_layer_host_kv=False) as m:
        tokens, logits = m.generate(prompt, 4, with_logits=True)
        c = m.stats.counters
    assert c.host_kv_bytes == 0 and c.kv_moved_bytes == 0
    assert tokens == ref_tokens and np.array_equal(logits, ref_logits)


@needs_no_amx
@pytest.mark.parametrize("piece_bytes", [None, "4096"], ids=["whole-or-4MiB-pieces", "64-row-pieces"])
def test_cpu_layers_use_stocks_repacked_layout(gemma_path, piece_bytes, monkeypatch):
    """With repacking on, CPU layers compute from a repacked copy (what stock
    does with its CPU layers): a short prompt and generation (all in the
    generate phase) with every layer a CPU layer must equal stock *with*
    repacking bit for bit, and differ from stock without it (on Gemma the
    two layouts round differently, so this comparison can fail). Repacked
    in pieces of 64 rows by several threads too (gs_repack.c piece_rows):
    the same bytes (a piece written at a wrong offset fails this)."""
    from gguf_stream import read_model

    if piece_bytes:
        monkeypatch.setenv("GGUF_STREAM_REPACK_PIECE_BYTES", piece_bytes)

    n = read_model(gemma_path).n_layer
    refs = {}
    for repack in (True, False):
        with StockModel(gemma_path, **CPU, cpu_repack=repack) as s:
            prompt = s.tokenize("The quick brown fox")
            assert len(prompt) < 32  # generate phase throughout
            refs[repack] = s.generate(prompt, N_GEN, with_logits=True)
    assert not np.array_equal(refs[True][1], refs[False][1])
    with StreamedModel(gemma_path, **CPU, cpu_repack=True, n_streamed=n, n_slots=2,
                       generate_cpu_layers=list(range(n)), graph_reuse=False) as m:  # CPU layers change below
        assert m.stats.counters.repacked_bytes > 0
        tokens, logits = m.generate(prompt, N_GEN, with_logits=True)
        assert m.stats.counters.adoptions == 0  # nothing streamed: every layer ran on the CPU
        m.engine.set_cpu_layers([])  # the repacked copies are freed with the choice
        assert m.stats.counters.repacked_bytes == 0
    assert tokens == refs[True][0] and np.array_equal(logits, refs[True][1])


@needs_no_amx
def test_host_mode_sources_stay_plain_with_repacking(gemma_path):
    """llama.cpp turns an override to the CPU buffer type into its repacked
    variant when repacking is on; host-mode upload sources must stay plain
    (the slots are). With every layer streamed (a long prompt, then tokens
    that stream too) no layer may read a repacked byte: the output equals
    stock without repacking (Gemma's shared tensors are not repacked)."""
    with StockModel(gemma_path, **CPU, cpu_repack=False) as s:
        prompt = s.tokenize(PROMPT * 4)
        ref_tokens, ref_logits = s.generate(prompt, 2, with_logits=True)
    from gguf_stream import read_model

    n = read_model(gemma_path).n_layer
    with StreamedModel(gemma_path, **CPU, cpu_repack=True, n_streamed=n, n_slots=2) as m:
        tokens, logits = m.generate(prompt, 2, with_logits=True)
    # every layer streamed and plain: only the shared tensors could differ
    assert tokens == ref_tokens and np.array_equal(logits, ref_logits)


def test_swapped_layers_fail_the_comparison(case):
    """Proves the comparison above can fail: feed two streamed layers each
    other's weights and the output must change."""
    path, prompt, ref_tokens, ref_logits = case
    with StreamedModel(path, **CPU, n_streamed=6, n_slots=2) as m:
        streamed = m.plan.streamed
        pairs = [(a, b) for i, a in enumerate(streamed) for b in streamed[i + 1:]]
        for a, b in pairs:  # the first pair with identical tensor layouts
            try:
                m.engine.debug_swap_sources(a, b)
                break
            except Exception:
                continue
        else:
            pytest.fail("no two streamed layers share a layout")
        tokens, logits = m.generate(prompt, N_GEN, with_logits=True)
    assert not np.array_equal(logits, ref_logits)


def test_budget_plan_streams_and_matches(tiny_path):
    """Budget-driven planning in host mode: the planner's choice runs exactly."""
    from gguf_stream import make_plan, read_model

    mf = read_model(tiny_path)
    full = make_plan(mf, vram_budget="100GiB", n_ctx=CPU["n_ctx"], n_ubatch=CPU["n_ubatch"]).device_bytes
    budget = full - 3 * mf.layer_bytes[0]
    with StockModel(tiny_path, **CPU) as s:
        ref = s.generate(s.tokenize(PROMPT), N_GEN)
    with StreamedModel(tiny_path, vram_budget=budget, **CPU) as m:
        assert len(m.plan.streamed) >= 3
        assert m.generate(m.tokenize(PROMPT), N_GEN) == ref
        assert m.plan.device_bytes <= budget


def test_q8_model(tiny_q8_path):
    with StockModel(tiny_q8_path, **CPU) as s:
        prompt = s.tokenize(PROMPT)
        ref_tokens, ref_logits = s.generate(prompt, 4, with_logits=True)
    with StreamedModel(tiny_q8_path, n_streamed=4, n_slots=2, **CPU) as m:
        tokens, logits = m.generate(prompt, 4, with_logits=True)
    assert tokens == ref_tokens and np.array_equal(logits, ref_logits)


def test_nothing_streamed_runs_without_hook(tiny_path):
    with StreamedModel(tiny_path, **CPU) as m:
        assert m.plan.streamed == () and m.engine is None and m.stats.mode == "resident"
        assert len(m.generate(m.tokenize("hi"), 2)) == 2


def test_bad_inputs(tmp_path, tiny_path):
    with pytest.raises(ModelFileError, match="not found"):
        StreamedModel(tmp_path / "missing.gguf", n_streamed=2, **CPU)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        StreamedModel(junk, n_streamed=2, **CPU)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_path.read_bytes()[:-4096])
    with pytest.raises(ModelFileError, match="truncated"):
        StreamedModel(cut, n_streamed=2, **CPU)
    with pytest.raises(BudgetError, match="below the minimum"):
        StreamedModel(tiny_path, vram_budget="1MiB", **CPU)
    with pytest.raises(ValueError, match="n_ubatch"):
        StreamedModel(tiny_path, n_batch=16, n_ubatch=0)


def test_gpu_request_without_cuda_build(tiny_path):
    from gguf_stream.config import cuda_available

    if cuda_available():
        pytest.skip("this llama-cpp-python has CUDA")
    with pytest.raises(EnvironmentMismatchError, match="GGML_CUDA=on"):
        StreamedModel(tiny_path, device="cuda", n_streamed=2, **{k: v for k, v in CPU.items() if k != "device"})


def test_close_is_idempotent_and_final(tiny_path):
    m = StreamedModel(tiny_path, n_streamed=2, **CPU)
    m.close()
    m.close()
    with pytest.raises(DecodeError, match="closed"):
        m.eval([1, 2])


AFTER_CLOSE = {
    "eval": lambda m: m.eval([1, 2]), "logits": lambda m: m.logits(), "reset": lambda m: m.reset(),
    "tokenize": lambda m: m.tokenize("hi"), "detokenize": lambda m: m.detokenize([1, 2]),
    "token_bytes": lambda m: m.token_bytes(5), "token_bos": lambda m: m.token_bos(), "is_eog": lambda m: m.is_eog(2),
    "generate": lambda m: m.generate([1], 2), "synchronize": lambda m: m.synchronize(), "stats": lambda m: m.stats,
    "n_vocab": lambda m: m.n_vocab, "n_layer": lambda m: m.n_layer, "reset_counters": lambda m: m.reset_counters(),
}


@pytest.mark.parametrize("kind", ["streamed", "stock"])
def test_every_call_after_close_is_refused(tiny_path, kind):
    """Not a call into freed llama.cpp memory (n_layer crashed; stats said 'resident')."""
    m = StreamedModel(tiny_path, n_streamed=2, **CPU) if kind == "streamed" else StockModel(tiny_path, **CPU)
    m.eval(m.tokenize("hi"))
    m.close()
    for name, call in AFTER_CLOSE.items():
        if name == "reset_counters" and kind == "stock":
            continue
        with pytest.raises(DecodeError, match="this model is closed"):
            call(m)


def _rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def test_close_waits_for_uploads_in_flight(gemma_path):
    """Uploads read the model's host memory; the last token's prefetches are
    still queued when the caller closes. Closing must wait for them before
    the model is freed (it did not: a copy read freed memory and crashed the
    process now and then). A slow link makes the queued copy start long
    after the model would be gone; in a child process, as a crash would end
    the test run."""
    import subprocess
    import sys

    from conftest import subprocess_env

    script = (
        "import gguf_stream\n"
        "from gguf_stream.model import StreamedModel\n"
        f"with StreamedModel({str(gemma_path)!r}, device='host', n_ctx=256, n_batch=64, n_ubatch=64,"
        " n_threads=2, n_streamed=8, n_slots=2, host_copy_delay_us=300000) as m:\n"
        "    m.eval([max(m.token_bos(), 0)])\n"
        "print('closed')\n")
    p = subprocess.run([sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0 and "closed" in p.stdout, (p.returncode, p.stderr[-2000:])


def test_repeated_load_close_does_not_leak(gemma_path):
    """10 load/close cycles; resident memory must come back (host mode)."""
    rss = []
    for _ in range(10):
        with StreamedModel(gemma_path, n_streamed=6, n_slots=2, **CPU) as m:
            m.eval(m.tokenize("hello"))
        rss.append(_rss_kib())
    growth_mib = (rss[-1] - rss[1]) / 1024
    print(f"RSS after cycles (MiB): {[r // 1024 for r in rss]}; growth after warm-up {growth_mib:.1f} MiB")
    assert growth_mib < 32, rss  # one model is ~250 MiB: a leak per cycle would show


def test_budget_below_streaming_minimum_runs_the_stock_split(tiny_path):
    from gguf_stream import make_plan, read_model

    mf = read_model(tiny_path)
    one_slot = make_plan(mf, n_streamed=mf.n_layer, n_slots=1, n_ctx=CPU["n_ctx"],
                         n_ubatch=CPU["n_ubatch"]).device_bytes
    with StockModel(tiny_path, **CPU) as s:
        prompt = s.tokenize(PROMPT)
        ref = s.generate(prompt, N_GEN, with_logits=True)
    with StreamedModel(tiny_path, vram_budget=one_slot - 1, **CPU) as m:
        assert m.plan.stock_gpu_layers is not None and m.engine is None
        assert m.stats.mode.startswith("stock split")
        tokens, logits = m.generate(prompt, N_GEN, with_logits=True)
    assert tokens == ref[0] and np.array_equal(logits, ref[1])


def test_measured_streaming_minimum_decides_below_the_estimate(tiny_path, monkeypatch):
    """A GPU load whose budget is just under the estimate of streaming's
    minimum measures that minimum (every layer through one slot, one full
    ubatch) and streams if its peak fits; else llama.cpp's split, measured
    as before. The measurements are stubbed: the GPU test loads them."""
    from gguf_stream import make_plan, model
    from gguf_stream.config import engine_config
    from gguf_stream.placement import initial_plan

    mf = read_model(tiny_path)
    one_slot = make_plan(mf, n_streamed=mf.n_layer, n_slots=1, n_ctx=CPU["n_ctx"],
                         n_ubatch=CPU["n_ubatch"]).device_bytes
    budget = one_slot - 1
    config = engine_config(**{**CPU, "vram_budget": budget})
    plan = initial_plan(mf, config, cuda=False)
    probed = []

    def streamed_peak(path, c):
        probed.append(c)
        return peak

    monkeypatch.setattr(model, "streamed_vram_peak", streamed_peak)
    monkeypatch.setattr(model, "stock_vram_peak", lambda *a, **k: budget + 1)  # no more stock GPU layers fit
    peak = budget
    measured = model.measured_plan(tiny_path, mf, config, plan)
    assert probed[-1].streamed_layers == tuple(range(mf.n_layer)) and probed[-1].n_slots == 1
    assert measured.streamed == tuple(range(mf.n_layer)) and measured.n_slots == 1
    assert measured.stock_gpu_layers is None and measured.budget == budget
    peak = budget + 1
    measured = model.measured_plan(tiny_path, mf, config, plan)
    assert measured.stock_gpu_layers == plan.stock_gpu_layers and not measured.streamed
    probed.clear()
    # beyond the margin (the KV cache of n_ctx 1024 widens the gap to stock's split): nothing probed
    opts = {**CPU, "n_ctx": 1024}
    far_budget = int(make_plan(mf, n_streamed=mf.n_layer, n_slots=1, n_ctx=1024, n_ubatch=CPU["n_ubatch"])
                     .device_bytes / 1.2)
    far = engine_config(**opts, vram_budget=far_budget)
    model.measured_plan(tiny_path, mf, far, initial_plan(mf, far, cuda=False))
    assert probed == []


GEN_RES_OPTS = {**CPU, "n_ctx": 512, "n_batch": 256, "n_ubatch": 256}  # a compute buffer with room


def hybrid_generate_resident(path):
    """2 of HYBRID's 6 streamed layers, none of hybrid_cpu_layers'."""
    from gguf_stream import read_model
    from gguf_stream.planner import interleaved_layers

    return interleaved_layers(read_model(path).n_layer, 6)[::3]


# (the tiny model's compute buffer is mostly its graph's layout: no room in it)
@pytest.mark.parametrize("model,own", [("gemma", False), ("gemma", True), ("tiny", True)],
                         ids=["gemma-compute buffer", "gemma-own buffer", "tiny-own buffer"])
def test_generate_resident_layers_match_stock(request, model, own):
    """Streamed layers resident while generating, in the compute buffer's
    tail (or the engine's own buffer, as in calibration), beside CPU layers
    and with graph reuse: a chat that starts with a generated token and
    switches phases twice equals stock bit for bit; they were in their region
    for every generated token, the first included (the context's opening
    decode, which records its KV caches, has shown the engine the compute
    buffer), loaded once per turn (adoptions count the rest)."""
    path = request.getfixturevalue(f"{model}_path")

    def chat(m):
        words = m.tokenize(PROMPT * 16, add_bos=False)
        assert len(words) >= 140
        m.eval([max(m.token_bos(), 0)])
        first = m.generate(words[:70], 3, with_logits=True)
        second = m.generate(words[70:140], 3, with_logits=True)
        return first[0] + second[0], np.concatenate([first[1], second[1]])

    with StockModel(path, **GEN_RES_OPTS) as s:
        ref_tokens, ref_logits = chat(s)
    resident, cpu = hybrid_generate_resident(path), hybrid_cpu_layers(path)
    with StreamedModel(path, **GEN_RES_OPTS, **HYBRID, generate_cpu_layers=cpu, generate_resident=resident) as m:
        assert m.plan.generate_resident == resident and m.plan.cpu_layers == cpu
        if own:
            m.engine.set_generate_resident(resident, own=True)
        tokens, logits = chat(m)
        c = m.stats.counters
        assert m._lc.llama_perf_context(m.ctx).n_reused > 0
    assert tokens == ref_tokens and np.array_equal(logits, ref_logits)
    assert c.gen_resident == 2
    assert c.gen_resident_loads == 3  # the first token, then after each prompt
    first_token = 6 - 2 - 2
    # two layers stream while generating, as many as the slots: a token's decode
    # that reuses the last graph runs without the hook and adopts nothing
    assert c.hookless_decodes > 0
    assert c.adoptions == first_token + 2 * (6 + 3 * (6 - 2 - 2)) - (6 - 2 - 2) * c.hookless_decodes
    if not own:
        assert 0 < c.generate_extent < c.compute_buffer_bytes


def test_graph_laid_out_over_the_region_streams_its_layers(case):
    """llama.cpp may lay a generate-phase graph out over the region (it
    keeps the layout of the last graph with as many nodes): the engine sees
    the whole graph at its first node and streams the layers instead, so
    the results stay stock's. (Forced here: nothing reserved and no generate
    graph seen yet, so the region starts at the buffer's start.) The next
    switch places the region above what generate graphs used."""
    path = case[0]

    def chat(m):
        words = m.tokenize(PROMPT * 16, add_bos=False)
        first = m.generate(words[:70], 3, with_logits=True)
        second = m.generate(words[70:140], 3, with_logits=True)
        return first[0] + second[0], np.concatenate([first[1], second[1]])

    with StockModel(path, **GEN_RES_OPTS) as s:
        ref_tokens, ref_logits = chat(s)
    with StreamedModel(path, **GEN_RES_OPTS, **HYBRID, generate_resident="none") as m:
        m.engine.set_generate_resident(hybrid_generate_resident(path), reserve_bytes=0)
        tokens, logits = chat(m)
        c = m.stats.counters
    assert tokens == ref_tokens and np.array_equal(logits, ref_logits)
    assert c.gen_resident_evictions == 1 and c.gen_resident_loads >= 1
    assert c.compute_buffer_bytes > 0 and c.generate_extent > 0


def test_generate_resident_choice_is_checked(tiny_path):
    from gguf_stream import NativeError
    from gguf_stream.config import EngineConfig

    with pytest.raises(ValueError, match="generate_resident must be"):
        EngineConfig(generate_resident="all")
    cpu = hybrid_cpu_layers(tiny_path)
    with pytest.raises(NativeError, match="cannot also be a CPU layer"):
        StreamedModel(tiny_path, **GEN_RES_OPTS, **HYBRID, generate_cpu_layers=cpu, generate_resident=cpu)
    with StreamedModel(tiny_path, **GEN_RES_OPTS, **HYBRID, generate_cpu_layers=cpu) as m:
        assert m.plan.generate_resident == ()  # "auto" keeps them on the GPU only (CUDA)
        with pytest.raises(NativeError, match="not a streamed layer"):
            m.engine.set_generate_resident([m.plan.resident[0]])
        with pytest.raises(NativeError, match="is a CPU layer"):
            m.engine.set_generate_resident(cpu[:1])
