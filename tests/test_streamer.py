"""The load protocol and the decode loop (streamer.py) on the real engine in
host mode: decode placement with graph reuse (a prompt's short tail decoded
on its own, KV moves held for reused graphs), the engine's checks of those
rules, CPU layers as llama.cpp's CPU layers while generating, and the
Streamer's own state handling."""
import ctypes

import numpy as np
import pytest

from conftest import CPU, HYBRID, PROMPT, hybrid_cpu_layers
from gguf_stream import DecodeError
from gguf_stream.config import EngineConfig
from gguf_stream.model import StockModel, StreamedModel
from gguf_stream.placement import initial_plan
from gguf_stream.streamer import Streamer
from test_llama_abi import dev_layer


def test_cpu_layers_change_only_under_contexts_that_rebuild_graphs(tiny_path):
    """A reused graph keeps the placement it was built with: on a context
    that reuses graphs (the default) CPU layers are chosen before it exists;
    with graph_reuse=False they may change between any two decodes."""
    from gguf_stream import NativeError

    cpu = hybrid_cpu_layers(tiny_path)
    with StreamedModel(tiny_path, **CPU, **HYBRID) as m:
        with pytest.raises(NativeError, match="reuses graphs"):
            m.engine.set_cpu_layers(cpu)
    with StreamedModel(tiny_path, **CPU, **HYBRID, graph_reuse=False) as m:
        m.eval([max(m.token_bos(), 0)])
        m.engine.set_cpu_layers(cpu)
        m.eval([5])
        m.eval([6])
        assert m.stats.counters.host_kv_bytes > 0


def test_reused_graph_across_a_kv_move_is_an_error(tiny_path):
    """The engine's safety net: a KV move behind the driver's back (which
    would have held the caches for a decode of the last graph's shape)
    under a reused graph is named instead of computed with stale values."""
    from gguf_stream import NativeError, native

    with StreamedModel(tiny_path, **CPU, **HYBRID, generate_cpu_layers=hybrid_cpu_layers(tiny_path)) as m:
        m.eval([max(m.token_bos(), 0)])  # generate phase: the CPU layers' caches in host memory
        assert m.stats.counters.host_kv_bytes > 0
        m.engine.set_phase(native.PHASE_PROMPT)  # they go home now
        with pytest.raises(NativeError, match="reused a graph"):
            m.eval([5])  # same shape: llama.cpp reuses the graph, built before the move


def test_prompt_phase_tail_is_an_error_when_graphs_are_reused(tiny_path):
    """Decoding a prompt's short tail ubatch in the prompt phase (what the
    driver splits off) would leave a graph that a generated token of the same
    size could reuse under the wrong placement: the engine refuses it."""
    from gguf_stream import NativeError, native

    with StreamedModel(tiny_path, **{**CPU, "n_ctx": 512, "n_batch": 128}, **HYBRID,
                       generate_cpu_layers=hybrid_cpu_layers(tiny_path)) as m:
        assert m.streamer.decode_sizes(69) == [64, 5]
        lc = m._lc
        arr = (lc.llama_token * 69)(*([max(m.token_bos(), 0)] + [7] * 68))
        m.engine.set_phase(native.PHASE_PROMPT)
        lc.llama_decode(m.ctx, lc.llama_batch_get_one(arr, 69))
        with pytest.raises(NativeError, match="ran in the prompt phase"):
            m.streamer.check("llama_decode")


def test_graph_reuse_with_cpu_layers_matches_stock(case, monkeypatch):
    """Graph reuse (the default) with CPU layers, through every case the
    driver handles: a first decode and the next of the same shape (the KV
    move waits), prompts ending in a short tail ubatch (decoded on its own,
    in the generate placement), a one-token tail followed by generated
    tokens of its shape. Greedy tokens and logits equal stock's bit for
    bit, and llama.cpp did reuse graphs."""
    path = case[0]
    opts = {**CPU, "n_ctx": 512, "n_batch": 128}  # n_ubatch 64: 64 + k tokens end in a k-token tail

    def chat(m):
        bos = max(m.token_bos(), 0)
        words = m.tokenize(PROMPT * 16, add_bos=False)
        assert len(words) >= 135
        m.eval([bos])
        m.eval([words[0]])
        first = m.generate(words[1:70], 3, with_logits=True)     # 69 tokens: 64 + 5
        second = m.generate(words[70:135], 3, with_logits=True)  # 65 tokens: 64 + 1
        return first[0] + second[0], np.concatenate([first[1], second[1]])

    with StockModel(path, **opts) as s:
        ref_tokens, ref_logits = chat(s)
    with StreamedModel(path, **opts, **HYBRID, generate_cpu_layers=hybrid_cpu_layers(path)) as m:
        calls, decode = [], m._lc.llama_decode
        monkeypatch.setattr(m._lc, "llama_decode", lambda ctx, batch: (calls.append(batch.n_tokens),
                                                                       decode(ctx, batch))[1])
        tokens, logits = chat(m)
        reused = m._lc.llama_perf_context(m.ctx).n_reused
        c = m.stats.counters
    assert m.streamer.reuses_graphs and reused > 0
    assert calls[:4] == [1, 1, 64, 5] and [64, 1] in [calls[i:i + 2] for i in range(4, len(calls))]
    assert c.host_kv_bytes > 0 and c.kv_moved_bytes > 0
    assert tokens == ref_tokens and np.array_equal(logits, ref_logits)


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded-at-open", "negative-control"])
def test_a_first_short_prompt_finds_cpu_layers_caches_in_host_memory(tiny_path, monkeypatch, recorded):
    """The context's caches are recorded when it opens (one token decoded and
    forgotten), so a first short prompt (generate phase) already computes the
    CPU layers' attention from host memory, as every later one does: moved
    while empty, nothing copied. On CUDA the other order computed that first
    prompt's CPU-layer attention on the GPU, and the same prompt gave other
    tokens the second time. Negative control: without the recording decode the
    first prompt finds no cache in host memory. The recording leaves the
    context empty: the tokens equal a fresh stock run's."""
    cpu = hybrid_cpu_layers(tiny_path)
    with StockModel(tiny_path, **CPU) as s:
        prompt = s.tokenize("Once upon a time")
        ref = s.generate(prompt, 4)
    if not recorded:
        monkeypatch.setattr(Streamer, "_record_kv", lambda self, ctx: None)
    with StreamedModel(tiny_path, **CPU, **HYBRID, generate_cpu_layers=cpu) as m:
        assert len(prompt) < m.streamer.prompt_min_ubatch  # generate phase
        m.eval(prompt)
        c = m.stats.counters
        assert c.host_kv_bytes == (len(cpu) * m.plan.kv_layer_bytes if recorded else 0)
        assert c.kv_moved_bytes == 0
        m.reset()
        assert m.generate(prompt, 4) == ref


def test_cleared_cache_moves_without_copying(case):
    """After reset() (llama_memory_clear) no cell is in use: the next phase
    switches re-point the CPU layers' caches without copying bytes, and the
    next sequences still equal stock's."""
    path = case[0]

    def two_sequences(m):
        out = []
        for text in (PROMPT * 4, "Far away, behind the word mountains " * 6):
            m.reset()
            prompt = m.tokenize(text)
            assert 32 <= len(prompt) <= 250  # prompt phase, and it fits the context
            out.append(m.generate(prompt, 3, with_logits=True))
        return out

    with StockModel(path, **CPU) as s:
        ref = two_sequences(s)
    with StreamedModel(path, **CPU, **HYBRID, generate_cpu_layers=hybrid_cpu_layers(path)) as m:
        got = two_sequences(m)
        c = m.stats.counters
    for (t, lg), (rt, rlg) in zip(got, ref):
        assert t == rt and np.array_equal(lg, rlg)
    # each sequence: prompt (a cleared cache goes home: nothing copied) -> tokens (copied once)
    assert c.host_kv_bytes > 0 and c.kv_moved_bytes == 2 * c.host_kv_bytes


def test_cpu_layers_count_as_cpu_layers_while_generating(case):
    """In the generate phase a CPU layer's device (what llama.cpp pins its
    norms to) is the CPU; in the prompt phase, and for the other layers, the
    device it was loaded for. On a CPU-only build every layer loads for the
    CPU, so the loaded devices are replaced by markers that match no backend
    (llama.cpp then pins nothing: placement and output unchanged)."""
    path, _, _, _ = case
    with StockModel(path, **CPU) as s:
        prompt = s.tokenize(PROMPT * 4)
        ref_tokens, ref_logits = s.generate(prompt, 4, with_logits=True)
    cpu = hybrid_cpu_layers(path)
    with StreamedModel(path, **CPU, **HYBRID, generate_cpu_layers=cpu) as m:
        streamer = m.streamer
        assert streamer.layer_devices_bound
        n = m.plan.n_layer
        cpu_dev = dev_layer(m.model, 0)
        from gguf_stream import llama_abi, native

        cells = llama_abi.layer_device_cells(m.model, n)
        markers = (ctypes.c_char * n)()
        marker = [ctypes.addressof(markers) + i for i in range(n)]
        streamer.engine.set_phase(native.PHASE_PROMPT)  # binding is for the prompt phase (the context's opening
        streamer.engine.bind_layer_devices(None)        # decode, which records its KV caches, left it generating)
        for c, v in zip(cells, marker):
            ctypes.c_void_p.from_address(c).value = v
        streamer.engine.bind_layer_devices(cells)
        try:
            m.eval(prompt)
            assert [dev_layer(m.model, i) for i in range(n)] == marker
            tokens, logits = [], []
            for _ in range(4):
                lg = m.logits()
                tokens.append(int(np.argmax(lg)))
                logits.append(lg)
                m.eval([tokens[-1]])
                assert [dev_layer(m.model, i) for i in range(n)] == [
                    cpu_dev if i in cpu else marker[i] for i in range(n)]
            m.reset()
            m.eval(prompt[:32])  # a prompt-sized batch: back to the loaded devices
            assert [dev_layer(m.model, i) for i in range(n)] == marker
        finally:
            streamer.engine.bind_layer_devices(None)
            for c in cells:
                ctypes.c_void_p.from_address(c).value = cpu_dev
    assert tokens == ref_tokens and np.array_equal(np.stack(logits), ref_logits)


def test_initial_plan_follows_the_config(tiny_path):
    from gguf_stream import read_model

    mf = read_model(tiny_path)
    assert initial_plan(mf, EngineConfig(**CPU), cuda=False).streamed == ()  # nothing asked: all resident
    assert len(initial_plan(mf, EngineConfig(**CPU, n_streamed=3), cuda=False).streamed) == 3
    assert initial_plan(mf, EngineConfig(**CPU, streamed_layers=(1, 5)), cuda=False).streamed == (1, 5)


def test_own_context_keeps_the_decoding_contexts_state(tiny_path):
    """Calibration's contexts rebuild every graph; while one is attached the
    decoding context's reuse state is set aside and comes back after."""
    with StreamedModel(tiny_path, **CPU, **HYBRID, generate_cpu_layers=hybrid_cpu_layers(tiny_path)) as m:
        s = m.streamer
        m.eval(m.tokenize(PROMPT))
        assert s.reuses_graphs and s._last_ubatch > 0
        before = (s.reuses_graphs, s._last_ubatch)
        with s.own_context():
            assert not s.reuses_graphs and s.decode_sizes(69) == [69]
        assert (s.reuses_graphs, s._last_ubatch) == before


def test_a_split_that_would_lose_outputs_is_refused(tiny_path):
    """A batch asking for outputs before its short tail cannot be split."""
    import llama_cpp

    with StreamedModel(tiny_path, **{**CPU, "n_ctx": 512, "n_batch": 128}, **HYBRID,
                       generate_cpu_layers=hybrid_cpu_layers(tiny_path)) as m:
        batch = llama_cpp.llama_batch_init(69, 0, 1)
        try:
            batch.n_tokens = 69
            for i in range(69):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = 1, i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = True  # every token's logits
            with pytest.raises(DecodeError, match="loses outputs"):
                m.streamer.decode(m.ctx, batch)
        finally:
            llama_cpp.llama_batch_free(batch)


def test_streamer_is_a_context_manager_closing_once(tiny_path):
    with Streamer(tiny_path, EngineConfig(**CPU, n_streamed=2)) as s:
        assert s.engine is not None and s.plan.streamed
    assert s.engine is None
    s.close()  # twice is fine
