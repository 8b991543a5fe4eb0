"""Calibration of the generate split (calibrate.py): the timed split search on
the real engine in host mode, and the rates cache."""
import json
import math

import numpy as np
import pytest

from conftest import CPU, N_GEN, needs_no_amx
from gguf_stream import read_model
from gguf_stream.calibrate import (CALIBRATION_CPU_LAYERS, CALIBRATION_PARTS, CALIBRATION_TOKENS, SPLIT_TRIAL_TOKENS,
                                   SPLIT_TRIAL_WARMUP, Calibrator)
from gguf_stream.config import EngineConfig
from gguf_stream.split_cache import RatesCache, cache_key
from gguf_stream.model import StockModel, StreamedModel
from gguf_stream.perfmodel import Rates, generate_splits

PROMPT = "The quick brown fox jumps over the lazy dog. In the beginning"
HYBRID = dict(n_streamed=6, n_slots=2)


@pytest.fixture(params=["gemma", "tiny"])
def path(request):
    return request.getfixturevalue(f"{request.param}_path")


def test_split_trials_time_each_candidate_and_are_cached(path, tmp_path, monkeypatch):
    """The automatic generate split times the model's pick and its neighbours
    in a context of its own (normally before the real context exists), keeps
    the timings per overflow, and leaves the engine as it found it."""
    monkeypatch.setenv("GGUF_STREAM_CACHE", str(tmp_path))
    with StockModel(path, **CPU) as s:
        prompt = s.tokenize(PROMPT * 4)
        ref_tokens, ref_logits = s.generate(prompt, 4, with_logits=True)
    with StreamedModel(path, **CPU, **HYBRID) as m:
        streamer = m.streamer
        cal = Calibrator(streamer, m.model)
        splits = generate_splits(m.plan.streamed, read_model(path).layer_bytes, Rates(1e9, 1e9, 1e-3))
        assert cal.cache.split_trials(m.plan.generate_overflow) is None
        streamer.context_closing()  # one attached context at a time
        try:
            trials = cal.time_splits(splits, 1)
        finally:
            streamer.context_opened(m.ctx)
        assert 1 in trials and sorted(trials) == list(range(min(trials), max(trials) + 1))
        assert all(0 < t < 10 for t in trials.values())
        assert cal.cache.split_trials(m.plan.generate_overflow) == trials
        tokens, logits = m.generate(prompt, 4, with_logits=True)
        c = m.stats.counters
    # no CPU layer left behind: every token adopts all 6 streamed layers
    assert c.adoptions == 6 * (-(-len(prompt) // CPU["n_batch"]) + 4) and c.host_kv_bytes == 0
    assert tokens == ref_tokens and np.array_equal(logits, ref_logits)


@pytest.mark.parametrize("fastest,best,expected", [
    (3, 1, [1, 2, 3, 4]),   # up while faster, one past the fastest
    (0, 2, [0, 1, 2, 3]),   # up is slower: down while faster
    (2, 2, [1, 2, 3]),      # the pick is the fastest
    (4, 3, [3, 4]),         # the top: nothing further up
])
def test_split_search_moves_while_faster(tiny_path, tmp_path, monkeypatch, fastest, best, expected):
    """The search, on token times that depend only on the CPU-layer count."""
    monkeypatch.setenv("GGUF_STREAM_CACHE", str(tmp_path))
    with StreamedModel(tiny_path, **CPU, n_streamed=4, n_slots=2) as m:
        streamer, engine = m.streamer, m.streamer.engine
        cal = Calibrator(streamer, m.model)
        splits = [(tuple(m.plan.streamed[:n]), 0.0) for n in range(5)]
        current = [0]
        set_cpu_layers = engine.set_cpu_layers
        monkeypatch.setattr(engine, "set_cpu_layers", lambda cpu: (current.__setitem__(0, len(cpu)),
                                                                    set_cpu_layers(cpu)))
        monkeypatch.setattr(cal, "decode_token", lambda ctx, tok: 1.0 + abs(current[0] - fastest))
        streamer.context_closing()
        try:
            trials = cal.time_splits(splits, best)
        finally:
            streamer.context_opened(m.ctx)
    assert sorted(trials) == expected and min(trials, key=trials.get) == fastest


# Searches recorded on the GPU box (ms per token by CPU layers, the model's
# pick): the 8B shape at 0.5x (first load -c 4096 -ub 512; bench -c 640 -ub
# 2048, t/s there; the previous session's first load) and the 32B-class at
# 8 GiB. Only splits a search from three above the pick reaches are listed.
RECORDED_SEARCHES = {
    "8B first load": (7, {8: 36.0, 9: 33.8, 10: 32.8, 11: 32.1, 12: 31.4, 13: 34.4}, 12),
    "8B bench": (6, {7: 1 / 31.6, 8: 1 / 33.5, 9: 1 / 37.0, 10: 1 / 35.6}, 9),
    "8B earlier": (7, {8: 36.4, 9: 34.0, 10: 31.4, 11: 32.8}, 10),
    "32B first load": (15, {16: 132.8, 17: 130.1, 18: 126.0, 19: 122.0, 20: 120.4, 21: 121.9}, 20),
}


@pytest.mark.parametrize("name", RECORDED_SEARCHES)
def test_the_search_start_on_recorded_searches(tiny_path, tmp_path, monkeypatch, name):
    """Replayed on the recorded token times, a search from
    FIRST_TRIAL_MORE_CPU_LAYERS above the model's pick finds the fastest
    split those searches found, timing at most 4 splits (they timed 4-6
    from one above)."""
    from gguf_stream import calibrate

    pick, times, fastest = RECORDED_SEARCHES[name]
    monkeypatch.setenv("GGUF_STREAM_CACHE", str(tmp_path))
    with StreamedModel(tiny_path, **CPU, n_streamed=6, n_slots=2) as m:
        cal = Calibrator(m.streamer, m.model)
        n_max = max(times) + 1
        current = [0]
        monkeypatch.setattr(m.streamer.engine, "set_cpu_layers", lambda cpu: current.__setitem__(0, len(cpu)))
        splits = [(tuple(range(n)), 0.0) for n in range(n_max + 1)]
        monkeypatch.setattr(cal, "decode_token", lambda ctx, tok: times[current[0]] / 1e3)
        m.streamer.context_closing()
        try:
            with cal.context() as ctx:
                trials = cal.time_splits(splits, pick + calibrate.FIRST_TRIAL_MORE_CPU_LAYERS, ctx)
        finally:
            m.streamer.context_opened(m.ctx)
    assert min(trials, key=trials.get) == fastest and len(trials) <= 4


def test_split_keeps_to_its_choices_and_their_most_and_the_plan_finds_it_cached(tiny_path, tmp_path, monkeypatch):
    """With a disk tier or a host budget's room, the split chooses only among
    the layers host_tiers leaves it (pinned ones), at most `most` of them, even
    where more would be faster; the cache keys that, and split_lookup (what
    `plan` and the next load ask before loading) gives the same layers."""
    from gguf_stream.split_cache import cached_split, split_lookup

    monkeypatch.setenv("GGUF_STREAM_CACHE", str(tmp_path))
    with StreamedModel(tiny_path, **CPU, n_streamed=6, n_slots=2) as m:
        streamer, engine = m.streamer, m.streamer.engine
        choices = m.plan.streamed[1:]  # as if the first were on the disk tier
        cal = Calibrator(streamer, m.model, choices, 2)
        n_cpu, set_cpu_layers = [0], engine.set_cpu_layers
        monkeypatch.setattr(engine, "set_cpu_layers", lambda c: (n_cpu.__setitem__(0, len(c)), set_cpu_layers(c)))
        decode = cal.decode_token  # real decodes (the rates time them), token times favouring more CPU layers
        monkeypatch.setattr(cal, "decode_token", lambda ctx, tok: decode(ctx, tok) * 0 + 1 / (1 + n_cpu[0]))
        streamer.context_closing()
        try:
            cpu, calibration = cal.choose_split()
        finally:
            streamer.context_opened(m.ctx)
        assert len(cpu) == 2 and set(cpu) <= set(choices) and max(calibration.split_trials) == 2
        assert cached_split(cal.cache, choices, 2) == cpu == split_lookup(m.path, streamer.config, None)(choices, 2)
        # negative controls: other choices, or another most, are other keys
        assert cached_split(cal.cache, m.plan.streamed, 2) is None and cached_split(cal.cache, choices, 3) is None


def test_rates_measured_layer_by_layer_are_plausible(tiny_path, tmp_path, monkeypatch):
    """measure_rates on the real engine in host mode: positive, finite
    rates, cached, and the engine left without CPU layers."""
    monkeypatch.setenv("GGUF_STREAM_CACHE", str(tmp_path))
    with StreamedModel(tiny_path, **CPU, n_streamed=4, n_slots=2) as m:
        cal = Calibrator(m.streamer, m.model)
        m.streamer.context_closing()
        try:
            rates = cal.measure_rates()
        finally:
            m.streamer.context_opened(m.ctx)
        assert cal.cache.rates() == rates
        assert m.stats.counters.host_kv_bytes == 0 and m.plan.cpu_layers == ()
    for v in (rates.pcie_bytes_per_s, rates.cpu_bytes_per_s, rates.gpu_token_seconds):
        assert math.isfinite(v) and v > 0


def test_cache_is_written_atomically_and_validated(tmp_path):
    cache = RatesCache("k", tmp_path / "sub" / "rates.json")
    assert cache.rates() is None and cache.split_trials((1, 2)) is None
    cache.put_rates(Rates(5e10, 6e10, 0.004))
    cache.put_split_trials((1, 2), {0: 0.02, 1: 0.019})
    assert cache.rates() == Rates(5e10, 6e10, 0.004)
    assert cache.split_trials((1, 2)) == {0: 0.02, 1: 0.019}
    assert cache.split_trials((1, 2, 3)) is None  # another overflow
    assert [p.name for p in cache.path.parent.iterdir()] == ["rates.json"]  # no temporary file left
    # what a damaged or edited file holds counts as absent, never as an error
    for bad in ({"pcie_bytes_per_s": 0, "cpu_bytes_per_s": 1, "gpu_token_seconds": 1},
                {"pcie_bytes_per_s": "fast", "cpu_bytes_per_s": 1, "gpu_token_seconds": 1},
                {"pcie_bytes_per_s": 1}, [1, 2], "x",
                {"pcie_bytes_per_s": True, "cpu_bytes_per_s": 1, "gpu_token_seconds": 1}):
        cache.path.write_text(json.dumps({"k": bad, "k|split|1,2": {"0": -1}}))
        assert cache.rates() is None and cache.split_trials((1, 2)) is None
    for trials in ({"0": "0.02"}, {"0": True}, {"0": 0}, {"x": 0.02}, {"5": 0.02}, {}):
        cache.path.write_text(json.dumps({"k|split|1,2": trials}))
        assert cache.split_trials((1, 2)) is None, trials
    cache.path.write_text("{not json")
    assert cache.rates() is None
    cache.put_rates(Rates(1.0, 1.0, 0.0))  # rewrites a damaged file
    assert cache.rates() == Rates(1.0, 1.0, 0.0)


def test_cache_key_names_what_the_rates_depend_on(tiny_path):
    a = cache_key(str(tiny_path), EngineConfig(n_threads=2), None)
    assert a == cache_key(str(tiny_path), EngineConfig(n_threads=2), None)
    assert a != cache_key(str(tiny_path), EngineConfig(n_threads=3), None)
    assert a != cache_key(str(tiny_path), EngineConfig(n_threads=2, cpu_repack=False), None)
    assert a != cache_key(str(tiny_path), EngineConfig(n_threads=2), 80 << 30)
    # -tb runs decodes of several rows: their splits only
    assert a == cache_key(str(tiny_path), EngineConfig(n_threads=2, n_threads_batch=1), None)
    rows = cache_key(str(tiny_path), EngineConfig(n_threads=2, generate_rows=8), None)
    assert rows not in (a, cache_key(str(tiny_path), EngineConfig(n_threads=2, n_threads_batch=1, generate_rows=8), None))
    # a split timed without the third slot is not the default's (batched-bench --max-slots 2)
    assert rows != cache_key(str(tiny_path), EngineConfig(n_threads=2, generate_rows=8, max_slots=2), None)



def test_tampered_rates_are_measured_again_end_to_end(tiny_path, tmp_path, monkeypatch):
    """A rates.json edited to a 0 rate and string trials: the calibration
    measures instead of dividing by zero, and writes valid entries back."""
    monkeypatch.setenv("GGUF_STREAM_CACHE", str(tmp_path))
    with StreamedModel(tiny_path, **CPU, n_streamed=4, n_slots=2) as m:
        cal = Calibrator(m.streamer, m.model)
        overflow = m.plan.generate_overflow
        cal.cache.path.write_text(json.dumps({
            cal.cache.key: {"pcie_bytes_per_s": 0, "cpu_bytes_per_s": "fast", "gpu_token_seconds": 0.01},
            cal.cache._split_key(overflow): {"0": "0.5", "1": "0.1"}}))
        def time_splits(splits, best, ctx=None):  # the rates are measured for real, the (slow) timing is not
            trials = {n: 0.01 * (1 + n) for n in range(len(splits))}
            cal.cache.put_split_trials(overflow, trials)
            return trials

        monkeypatch.setattr(cal, "time_splits", time_splits)
        m.streamer.context_closing()
        try:
            cpu, calibration = cal.choose_split()
        finally:
            m.streamer.context_opened(m.ctx)
    r = calibration.rates
    assert r.pcie_bytes_per_s > 0 and r.cpu_bytes_per_s > 0 and math.isfinite(r.gpu_token_seconds)
    assert all(isinstance(t, float) and t > 0 for t in calibration.split_trials.values())
    assert set(cpu) <= set(overflow)
    assert cal.cache.rates() == r and cal.cache.split_trials(overflow) == calibration.split_trials


def test_first_calibration_counts_its_decodes_in_one_context_and_the_next_load_is_cached(
        tiny_path, tmp_path, monkeypatch, capsys):
    """The cost of a first load's calibration, counted: the rates' decodes
    and each timed split's, all in one small context; the chosen split's CPU
    layers (and their repacked copies) stay for the run. The same model again
    reads both from rates.json: no decode, no context. Progress lines only
    with progress on."""
    from gguf_stream import llama_abi

    monkeypatch.setenv("GGUF_STREAM_CACHE", str(tmp_path))
    contexts, lc = [], llama_abi.llama()
    init = lc.llama_init_from_model
    monkeypatch.setattr(lc, "llama_init_from_model", lambda *a: contexts.append(1) or init(*a))
    opts = dict(CPU, n_streamed=4, n_slots=2, cpu_repack=True)
    results = []
    for progress in (True, False):
        with StreamedModel(tiny_path, **opts, progress=progress) as m:
            cal = Calibrator(m.streamer, m.model)
            # real decodes, counted, but token times that favour more CPU
            # layers, so that the choice does not hang on this machine's load
            engine, n_cpu, decode = m.streamer.engine, [0], cal.decode_token
            set_cpu_layers = engine.set_cpu_layers
            monkeypatch.setattr(engine, "set_cpu_layers", lambda c: (n_cpu.__setitem__(0, len(c)),
                                                                     set_cpu_layers(c)))
            monkeypatch.setattr(cal, "decode_token", lambda ctx, tok: decode(ctx, tok) * 0 + 1 / (1 + n_cpu[0]))
            m.streamer.context_closing()
            contexts.clear()
            try:
                cpu, calibration = cal.choose_split()
            finally:
                m.streamer.context_opened(m.ctx)
            repacked = m.stats.counters.repacked_bytes
            results.append((cpu, calibration, len(contexts), repacked))
        err = capsys.readouterr().err
        assert ("calibrating the generate split" in err) == progress
        assert ("split decodes" in err) == progress  # where the time went, said with the result
    (cpu, first, n_ctx, repacked), (cpu2, second, n_ctx2, _) = results
    assert first.decodes == CALIBRATION_TOKENS + len(first.split_trials) * (SPLIT_TRIAL_WARMUP + SPLIT_TRIAL_TOKENS)
    assert n_ctx == 1 and not first.cached and first.seconds > 0
    # its parts: measured pieces of that time, each named
    assert set(first.parts) == set(CALIBRATION_PARTS) and 0 < sum(first.parts.values()) <= first.seconds
    mf = read_model(tiny_path)
    assert cpu and repacked >= sum(mf.layer_bytes[i] for i in cpu) // 2  # the chosen split stays repacked
    assert second.cached and second.decodes == 0 and n_ctx2 == 0 and second.parts == {}
    assert cpu2 == cpu and second.split_trials == first.split_trials and second.rates == first.rates


def test_one_calibration_context_outlasts_its_kv_cache(tiny_path, tmp_path, monkeypatch):
    """Every trial decodes into the one context: a full KV cache is cleared
    instead of failing the load (a long split search on a deep model)."""
    from gguf_stream.streamer import SMALL_CONTEXT_CELLS

    monkeypatch.setenv("GGUF_STREAM_CACHE", str(tmp_path))
    with StreamedModel(tiny_path, **CPU, n_streamed=4, n_slots=2) as m:
        cal = Calibrator(m.streamer, m.model)
        m.streamer.context_closing()
        try:
            with cal.context() as ctx:
                for _ in range(SMALL_CONTEXT_CELLS + 10):
                    cal.decode_token(ctx, m.streamer.bos(m.model))
        finally:
            m.streamer.context_opened(m.ctx)
    assert cal.decodes == SMALL_CONTEXT_CELLS + 10


def test_split_for_rows_times_decodes_of_that_many_rows(tiny_path, tmp_path, monkeypatch):
    """generate_rows=k (or n_seq_max=k): every timed decode has k rows (the
    split is chosen for k parallel sequences or a verify of k-1 drafts), the
    calibration context takes them in one ubatch, a full KV cache is cleared
    in time, and the cache keeps them apart from the one-row measurements."""
    from gguf_stream.streamer import SMALL_CONTEXT_CELLS

    monkeypatch.setenv("GGUF_STREAM_CACHE", str(tmp_path))
    with StreamedModel(tiny_path, **CPU, n_streamed=4, n_slots=2, generate_rows=5) as m:
        cal = Calibrator(m.streamer, m.model)
        assert cal.rows == 5 and "|rows=5|" in cache_key(tiny_path, m.config, None)
        rows, decode = [], m.streamer.decode
        monkeypatch.setattr(m.streamer, "decode", lambda ctx, batch: rows.append(batch.n_tokens) or decode(ctx, batch))
        m.streamer.context_closing()
        try:
            with cal.context() as ctx:
                for _ in range(SMALL_CONTEXT_CELLS // 5 + 3):  # past a full cache
                    assert cal.decode_token(ctx, m.streamer.bos(m.model)) > 0
        finally:
            m.streamer.context_opened(m.ctx)
        assert set(rows) == {5}
    one = EngineConfig(**CPU, n_streamed=4, n_slots=2)
    assert cache_key(tiny_path, one, None) != cache_key(tiny_path, EngineConfig(**CPU, n_seq_max=5), None)
    assert EngineConfig(**CPU, n_seq_max=5).split_rows == 5 and one.split_rows == 1
    with pytest.raises(ValueError, match="generate_rows"):
        EngineConfig(generate_rows=0)


def test_no_split_for_rows_that_take_the_prompt_placement(tiny_path, capsys):
    """Decodes of 32 rows or more (or more than cpu_layers_max_batch) stream
    every layer with all rows on the GPU: 'auto' then chooses no CPU layers,
    and says why."""
    for extra in (dict(generate_rows=32), dict(generate_rows=4, cpu_layers_max_batch=3)):
        with StreamedModel(tiny_path, **CPU, n_streamed=4, n_slots=2, generate_cpu_layers="auto", progress=True,
                           **extra) as m:
            assert m.plan.cpu_layers == ()
        assert f"decodes of {extra['generate_rows']} rows compute every row on the GPU" in capsys.readouterr().err


def test_a_neighbour_stops_once_its_median_is_sure_to_be_slower(tiny_path, tmp_path, monkeypatch):
    """Scripted token times: the up neighbour's first two timed decodes are
    both slower than the start's median, so its third cannot change the
    decision and is not run (a lower bound of its median is kept); the down
    neighbour's first one is faster, so it runs all three and keeps its
    median (the negative control)."""
    assert (SPLIT_TRIAL_WARMUP, SPLIT_TRIAL_TOKENS) == (1, 3)  # the script below is written for these
    monkeypatch.setenv("GGUF_STREAM_CACHE", str(tmp_path))
    script = {2: [5.0, 1.0, 1.0, 1.0], 3: [5.0, 1.2, 1.3, 0.1], 1: [5.0, 0.9, 1.1, 1.1]}
    with StreamedModel(tiny_path, **CPU, n_streamed=4, n_slots=2) as m:
        engine = m.streamer.engine
        cal = Calibrator(m.streamer, m.model)
        splits = [(tuple(m.plan.streamed[:n]), 0.0) for n in range(5)]
        current, ran = [0], []
        set_cpu_layers = engine.set_cpu_layers
        monkeypatch.setattr(engine, "set_cpu_layers", lambda cpu: (current.__setitem__(0, len(cpu)),
                                                                    set_cpu_layers(cpu)))

        def decode_token(ctx, tok):
            ran.append(current[0])
            return script[current[0]][sum(1 for n in ran if n == current[0]) - 1]

        monkeypatch.setattr(cal, "decode_token", decode_token)
        m.streamer.context_closing()
        try:
            trials = cal.time_splits(splits, 2)
        finally:
            m.streamer.context_opened(m.ctx)
    assert ran == [2] * 4 + [3] * 3 + [1] * 4
    assert trials == {2: 1.0, 3: 1.2, 1: 1.1}  # 3: the least of its two slower samples, a bound under 1.3


def _tracking_repacks(monkeypatch, engine):
    """engine.set_cpu_layers counting the layers each call repacked."""
    repacked, set_cpu_layers = [], engine.set_cpu_layers

    def tracked(cpu):
        before = engine.counters().layers_repacked
        set_cpu_layers(cpu)
        repacked.append(engine.counters().layers_repacked - before)

    monkeypatch.setattr(engine, "set_cpu_layers", tracked)
    return repacked


def test_kept_repacks_serve_a_layer_that_returns_to_the_cpu(tiny_path):
    """With keep_repacks, a layer that leaves the CPU keeps its repacked
    copy and is not repacked when it comes back; turning it off frees the
    copies of layers that are not CPU layers. Negative control: without
    it, the same moves repack the returning layers again."""
    with StreamedModel(tiny_path, **CPU, n_streamed=6, n_slots=2, cpu_repack=True, graph_reuse=False) as m:
        e = m.streamer.engine
        a, b = m.plan.streamed[:2], m.plan.streamed[1:3]

        def moves():
            before = e.counters().layers_repacked
            for cpu in (a, b, a):
                e.set_cpu_layers(cpu)
            return e.counters().layers_repacked - before

        assert e.counters().repacked_bytes == 0
        assert moves() == 2 + 1 + 1  # dropped copies are made again
        only_a = e.counters().repacked_bytes
        e.set_cpu_layers(())
        e.keep_repacks(True)
        assert moves() == 2 + 1  # the third move finds a's copies kept
        assert e.counters().repacked_bytes > only_a  # b's own layer still held
        e.keep_repacks(False)
        assert e.counters().repacked_bytes == only_a  # only the CPU layers' copies stay
        e.set_cpu_layers(())
        assert e.counters().repacked_bytes == 0


@needs_no_amx
def test_the_calibrated_split_computes_as_a_load_given_that_split(tiny_path, tmp_path, monkeypatch):
    """After a search that moved between splits (start, up, down, back to
    the start), the engine's CPU layers compute bit-identically to a fresh
    load with the chosen split named explicitly: their kept repacked copies
    are the weights a fresh repack makes. The layers that came back were not
    repacked again. Negative control: a load with the neighbouring split
    gives other logits (a CPU layer's repacked kernels round differently)."""
    from gguf_stream import calibrate
    from gguf_stream.planner import with_generate_placement

    monkeypatch.setenv("GGUF_STREAM_CACHE", str(tmp_path))
    opts = dict(CPU, n_streamed=6, n_slots=2, cpu_repack=True, graph_reuse=False)
    with StreamedModel(tiny_path, **opts) as m:
        s, engine = m.streamer, m.streamer.engine
        prompt = m.tokenize(PROMPT)
        cal = Calibrator(s, m.model)
        overflow = m.plan.generate_overflow
        repacked = _tracking_repacks(monkeypatch, engine)
        current = [()]
        set_cpu_layers = engine.set_cpu_layers
        monkeypatch.setattr(engine, "set_cpu_layers", lambda cpu: (current.__setitem__(0, tuple(cpu)),
                                                                    set_cpu_layers(cpu)))
        target = calibrate.split_cpu_layers(overflow, 2)
        decode = cal.decode_token  # real decodes; the times favour the 2-layer split
        monkeypatch.setattr(cal, "decode_token", lambda ctx, tok: decode(ctx, tok) * 0 + 1.0 + abs(len(current[0]) - 2))
        start = 2 - calibrate.FIRST_TRIAL_MORE_CPU_LAYERS
        monkeypatch.setattr(calibrate, "best_split", lambda splits: start)  # the search starts at 2
        s.context_closing()
        try:
            cpu, c = cal.choose_split()
            s.plan = with_generate_placement(s.plan, cpu, s.plan.generate_resident)
        finally:
            s.context_opened(m.ctx)
        assert cpu == target and sorted(c.split_trials) == [1, 2, 3]
        # sample, then 2, 3, 1, back to 2 (the chosen): only what no earlier set had is repacked
        sets = [calibrate.rates_sample(overflow, CALIBRATION_CPU_LAYERS)] + \
            [calibrate.split_cpu_layers(overflow, n) for n in (2, 3, 1, 2)]
        seen, fresh = set(), []
        for cpu_set in sets:
            fresh.append(len(set(cpu_set) - seen))
            seen |= set(cpu_set)
        assert repacked[:5] == fresh and repacked[4] == 0
        assert m.stats.counters.repacked_bytes > 0
        tokens, logits = m.generate(prompt, N_GEN, with_logits=True)
    results = {}
    for n in (2, 3):
        with StreamedModel(tiny_path, **opts, generate_cpu_layers=calibrate.split_cpu_layers(overflow, n)) as f:
            assert f.plan.cpu_layers == calibrate.split_cpu_layers(overflow, n)
            results[n] = f.generate(prompt, N_GEN, with_logits=True)
    assert tokens == results[2][0] and np.array_equal(logits, results[2][1])
    assert not np.array_equal(logits, results[3][1])


@pytest.mark.parametrize("start,fastest,expected", [
    (1, 3, {1: 4, 2: 4, 3: 4, 4: 3}),   # up while faster; the first slower one stops early
    (2, 0, {2: 4, 3: 3, 1: 4, 0: 4}),   # up is slower: down while faster
    (4, 4, {4: 4, 3: 3}),               # the top: nothing further up
])
def test_split_search_one_decode_at_a_time(start, fastest, expected):
    """SplitSearch (the search of both a first load's own decodes and the
    live one) on token times that depend only on the split: each split a
    warm-up and SPLIT_TRIAL_TOKENS timed decodes, a slower neighbour's
    stopping once its median is sure to be slower (a lower bound)."""
    from gguf_stream.calibrate import SplitSearch

    search, order = SplitSearch(5, start), []
    while search.current is not None:
        order.append(search.current)
        search.feed(1.0 + abs(search.current - fastest))
    assert search.best == fastest and search.decodes == expected
    assert list(dict.fromkeys(order)) == list(expected)
    assert search.bounds == {n for n, d in expected.items() if d < SPLIT_TRIAL_WARMUP + SPLIT_TRIAL_TOKENS}
    with pytest.raises(RuntimeError):
        search.feed(1.0)


def _live_split(m, start, fastest, tmp_path):
    """A first load's live search on m, as Streamer._choose_generate_split
    starts it (here on a context that already exists: it is re-attached
    around the start split's CPU layers), with token times that depend only
    on the split's CPU-layer count."""
    from gguf_stream.calibrate import LiveSplit

    streamer, engine = m.streamer, m.streamer.engine
    cal = Calibrator(streamer, m.model)
    splits = generate_splits(m.plan.streamed, read_model(streamer.path).layer_bytes, Rates(1e9, 1e9, 1e-3))
    live = LiveSplit(cal, splits, start, Rates(1e9, 1e9, 1e-3), 0.0)
    streamer.context_closing()
    engine.set_cpu_layers(splits[start][0])
    streamer.context_opened(m.ctx)
    timed = live.timed
    live.timed = lambda seconds: timed(1.0 + abs(len(live.cpu_layers) - fastest))
    streamer.live_split = live
    return live, splits


def test_live_split_search_on_generated_tokens(path, tmp_path, monkeypatch):
    """The first load's split search on its first generated tokens: CPU
    layers change between decodes of the real context (which reuses graphs:
    it drops them at each change), the tokens and logits stay stock's (host
    mode: CPU layers and streamed ones use the same kernels), and once the
    search is over the fastest split stays and is cached."""
    monkeypatch.setenv("GGUF_STREAM_CACHE", str(tmp_path))
    with StockModel(path, **CPU) as s:
        prompt = s.tokenize(PROMPT)
        ref_tokens, ref_logits = s.generate(prompt, 24, with_logits=True)
    with StreamedModel(path, **CPU, **HYBRID) as m:
        assert m.streamer.reuses_graphs
        live, splits = _live_split(m, 1, 3, tmp_path)
        tokens, logits = m.generate(prompt, 24, with_logits=True)
        assert live.done and m.streamer.live_split is None and m.streamer.calibration is live.calibration
        cal = live.calibration
        assert sorted(cal.split_trials) == [1, 2, 3, 4] and cal.decodes == 15 and not cal.cached
        assert set(cal.parts) >= {"split set-up", "split decodes"}
        assert live.cpu_layers == splits[3][0] == m.plan.cpu_layers
        assert RatesCache(live.cal.cache.key).split_trials(m.plan.generate_overflow) == cal.split_trials
        c = m.stats.counters
    assert c.host_kv_bytes > 0  # CPU layers did compute, their KV in host memory
    assert tokens == ref_tokens and np.array_equal(logits, ref_logits)


def test_live_split_changes_need_the_graphs_dropped(tiny_path, tmp_path, monkeypatch):
    """Negative control: with llama.cpp's graphs not dropped at a change of
    CPU layers (the engine told they were), the next decode reuses a graph
    built for the old split, which the engine catches; and told nothing, it
    refuses the change itself."""
    from gguf_stream import llama_abi
    from gguf_stream.errors import NativeError

    monkeypatch.setenv("GGUF_STREAM_CACHE", str(tmp_path))
    monkeypatch.setattr(llama_abi, "drop_graphs", lambda ctx: True)  # says so, drops nothing
    with StreamedModel(tiny_path, **CPU, **HYBRID) as m:
        _live_split(m, 1, 3, tmp_path)
        with pytest.raises(NativeError, match="reused a graph across a move"):
            m.generate(m.tokenize(PROMPT), 24)
    with StreamedModel(tiny_path, **CPU, **HYBRID) as m:
        monkeypatch.setattr(m.streamer.engine, "graphs_dropped", lambda: None)
        _live_split(m, 1, 3, tmp_path)
        with pytest.raises(NativeError, match="reuses graphs"):
            m.generate(m.tokenize(PROMPT), 24)


def test_split_search_climbs_through_stream_bound_noise():
    """Where the measured tokens sit on their streamed bytes' time over
    PCIe (stream-bound), one CPU layer more takes a layer off the link: the
    search climbs through a split that noise made no faster (the 32B-class
    first load that stopped at 6 CPU layers of a fastest 19), and stops once
    a split is CPU-bound and slower. Without the streamed times it stops at
    the first split no faster (negative control)."""
    from gguf_stream.calibrate import SplitSearch

    stream = [0.200 - 0.005 * n for n in range(25)]         # p x: a layer off the link per CPU layer
    cpu_side = [0.030 + 0.0045 * n for n in range(25)]      # G + c x_cpu
    noise = {7: 0.0035}                                     # split 7 measured no faster than 6 (+3% of p x)

    def token(n):
        return max(stream[n], cpu_side[n]) * (1.0 + (0.01 if n % 2 else -0.01)) + noise.get(n, 0.0)

    fastest = min(range(25), key=token)
    for floors, expected in ((stream, fastest), (None, 6)):
        search = SplitSearch(25, 6, floors)
        while search.current is not None:
            search.feed(token(search.current))
        assert search.best == expected
    assert fastest >= 17


def test_live_split_search_stops_at_its_split_when_the_graphs_cannot_drop(tiny_path, tmp_path, monkeypatch):
    """Where llama.cpp cannot drop the context's graphs (its reserve
    failing), the search stops with a warning and the run goes on at the
    split it has: the tokens stay stock's, nothing is cached."""
    from gguf_stream import llama_abi

    monkeypatch.setenv("GGUF_STREAM_CACHE", str(tmp_path))
    with StockModel(tiny_path, **CPU) as s:
        prompt = s.tokenize(PROMPT)
        ref_tokens = s.generate(prompt, 24)
    monkeypatch.setattr(llama_abi, "drop_graphs", lambda ctx: False)
    with StreamedModel(tiny_path, **CPU, **HYBRID) as m:
        live, splits = _live_split(m, 1, 3, tmp_path)
        with pytest.warns(RuntimeWarning, match="search stopped at 1 CPU layers"):
            tokens = m.generate(prompt, 24)
        assert m.streamer.live_split is None and m.calibration is None
        assert live.cal.cache.split_trials(m.plan.generate_overflow) is None
    assert tokens == ref_tokens
