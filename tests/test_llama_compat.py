"""StreamedLlama is a llama_cpp.Llama: with Gemma 3 270M and 6 of 18 layers
streaming through 2 host slots, greedy completion and chat completion (both
streaming and not) must give exactly what stock llama_cpp.Llama gives on the
same settings, and the rest of Llama's API must work.

"The same settings" includes CPU weight repacking: the engine turns it off
(use_extra_bufts, so host mode is bit-comparable), while llama_cpp.Llama
repacks Q4_K by default, which rounds differently and flips near-tie tokens
of this small model. The stock reference here loads without repacking."""
import gguf_stream  # noqa: F401  (llama.cpp before numpy)

import ctypes

import llama_cpp
import numpy as np
import pytest

from conftest import CPU
import llama_cpp._internals as internals
import llama_cpp.llama as llama_module
from gguf_stream.llama_compat import StreamedLlama, swapped

ENGINE = dict(n_streamed=6, n_slots=2, device="host")
# The embedded GGUF has no chat template; llama-cpp-python would fall back to
# 'llama-2', which Gemma answers with an empty reply: use its own format.
LLAMA = dict(n_ctx=CPU["n_ctx"], n_batch=CPU["n_batch"], n_ubatch=CPU["n_ubatch"], n_threads=CPU["n_threads"],
             seed=0, verbose=False, chat_format="gemma")
PROMPT = "The capital of France is"
CHATS = [
    [{"role": "user", "content": "Say hello."}],
    [{"role": "user", "content": "What is the capital of France?"}],
]
GREEDY = dict(temperature=0.0, max_tokens=12)


class _NoRepack:
    """llama_cpp._internals, except that models load without CPU repacking."""

    def __getattr__(self, name):
        return getattr(internals, name)

    def LlamaModel(self, *, params, **kw):  # mirrors the class name
        params.use_extra_bufts = False
        return internals.LlamaModel(params=params, **kw)


@pytest.fixture(scope="module")
def stock(gemma_path):
    with swapped(llama_module, "internals", _NoRepack()):
        llm = llama_cpp.Llama(str(gemma_path), **LLAMA)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def streamed(gemma_path):
    llm = StreamedLlama(gemma_path, **ENGINE, **LLAMA)
    yield llm
    llm.close()


def last_logits(llm) -> np.ndarray:
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(llm.n_vocab(),)).copy()


def test_plan_streams_the_requested_layers(streamed):
    assert streamed.plan.streamed == (2, 5, 8, 11, 14, 17)
    assert streamed.plan.n_slots == 2


def test_logits_match_stock_bit_for_bit(stock, streamed):
    tokens = stock.tokenize(PROMPT.encode())
    for llm in (stock, streamed):
        llm.reset()
        llm.eval(tokens)
    want, got = last_logits(stock), last_logits(streamed)
    assert np.count_nonzero(want) > 0
    assert np.array_equal(got, want), f"max |diff| {np.abs(got - want).max()}"


def test_completion_matches_stock(stock, streamed):
    want = stock.create_completion(PROMPT, **GREEDY)
    got = streamed.create_completion(PROMPT, **GREEDY)
    assert want["choices"][0]["text"].strip(), "stock produced no text: the comparison would prove nothing"
    assert got["choices"][0]["text"] == want["choices"][0]["text"]
    assert got["choices"][0]["finish_reason"] == want["choices"][0]["finish_reason"]
    assert got["usage"] == want["usage"]


@pytest.mark.parametrize("messages", CHATS, ids=[m[0]["content"] for m in CHATS])
def test_chat_completion_matches_stock(stock, streamed, messages):
    want = stock.create_chat_completion(messages, **GREEDY)["choices"][0]["message"]["content"]
    got = streamed.create_chat_completion(messages, **GREEDY)["choices"][0]["message"]["content"]
    assert want.strip(), "stock produced an empty reply: the comparison would prove nothing"
    assert got == want


def test_streaming_yields_the_same_text(stock, streamed):
    messages = CHATS[0]
    whole = streamed.create_chat_completion(messages, **GREEDY)["choices"][0]["message"]["content"]
    pieces = [c["choices"][0]["delta"].get("content") or ""
              for c in streamed.create_chat_completion(messages, stream=True, **GREEDY)]
    assert len([p for p in pieces if p]) > 1  # really streamed, piece by piece
    assert "".join(pieces) == whole
    text = "".join(c["choices"][0]["text"] for c in streamed.create_completion(PROMPT, stream=True, **GREEDY))
    assert text == stock.create_completion(PROMPT, **GREEDY)["choices"][0]["text"]


def test_tokenize_detokenize(stock, streamed):
    text = b"Streaming layers through slots, ok?"
    tokens = streamed.tokenize(text)
    assert tokens == stock.tokenize(text)
    assert tokens[0] == streamed.token_bos()
    assert streamed.detokenize(tokens[1:]) == text
    assert streamed.n_vocab() == stock.n_vocab() > 0


def test_reset_and_state_round_trip(streamed):
    tokens = streamed.tokenize(PROMPT.encode())
    streamed.reset()
    assert streamed.n_tokens == 0
    streamed.eval(tokens)
    state = streamed.save_state()
    assert state.n_tokens == len(tokens)

    nxt = int(np.argmax(last_logits(streamed)))
    streamed.eval([nxt])
    first = last_logits(streamed)
    assert np.isfinite(first).all() and np.count_nonzero(first) > 0

    streamed.eval([nxt, nxt])  # move on, then go back
    streamed.load_state(state)
    assert streamed.n_tokens == len(tokens)
    streamed.eval([nxt])
    assert np.array_equal(last_logits(streamed), first)

    streamed.reset()
    streamed.eval(tokens)
    streamed.eval([nxt])
    assert np.array_equal(last_logits(streamed), first)  # reset really starts over


def test_counters_show_streaming_and_close(gemma_path):
    llm = StreamedLlama(gemma_path, **ENGINE, **LLAMA)
    try:
        out = llm.create_completion(PROMPT, temperature=0.0, max_tokens=4)
        assert out["choices"][0]["text"]
        c = llm.stats["counters"]
        assert c.adopted_ready + c.adopted_waited + c.sync_fallbacks > 0
        assert c.evaluations >= 1 and c.uploads > 0
        assert llm.stats["plan"].streamed == (2, 5, 8, 11, 14, 17)
    finally:
        llm.close()
    assert llm.stats["counters"] is None  # the slot ring is gone
    llm.close()  # twice is fine


def test_cpu_layers_with_graph_reuse_match_stock(gemma_path, monkeypatch):
    """With CPU layers and graph reuse (the default), a prompt of 64 + 5
    tokens in one n_batch chunk has its 5-token tail decoded on its own
    (llama_batch views of Llama's batch); logits equal stock's bit for bit,
    before and after a generated token."""
    sizes = dict(LLAMA, n_ctx=512, n_batch=128, n_ubatch=64)
    with swapped(llama_module, "internals", _NoRepack()):
        stock = llama_cpp.Llama(str(gemma_path), **sizes)
    llm = StreamedLlama(gemma_path, **ENGINE, **sizes, generate_cpu_layers=(5, 14))
    try:
        seen = []
        before = llm._streamer.before_decode
        monkeypatch.setattr(llm._streamer, "before_decode", lambda n: (seen.append(n), before(n))[1])
        tokens = stock.tokenize((PROMPT + " Paris. ") .encode() * 12)[:69]
        assert len(tokens) == 69
        got = []
        for m in (stock, llm):
            m.eval(tokens)
            first = last_logits(m)
            m.eval([int(np.argmax(first))])
            got.append((first, last_logits(m)))
        assert llm._streamer.reuses_graphs and seen == [64, 5, 1]
        assert llm.stats["counters"].host_kv_bytes > 0
        for want, have in zip(*got):
            assert np.array_equal(have, want), f"max |diff| {np.abs(have - want).max()}"
    finally:
        llm.close()
        stock.close()


def test_every_token_outputs_turn_graph_reuse_off(gemma_path):
    """logits_all keeps every token's logits, which the tail split would
    lose: such a Llama rebuilds graphs and decodes each n_batch chunk whole."""
    llm = StreamedLlama(gemma_path, **ENGINE, **dict(LLAMA, n_ctx=512, n_batch=128, n_ubatch=64),
                        generate_cpu_layers=(5, 14), logits_all=True)
    try:
        assert not llm._streamer.reuses_graphs
        assert llm._streamer.decode_sizes(69) == [69]
    finally:
        llm.close()


def test_threads_of_the_context_are_the_engines(tiny_path):
    """The context decodes on the threads the engine measures its CPU layers
    with: n_threads_batch given (llama.cpp's -tb), else n_threads; not Llama's
    defaults (half the CPUs, all of them). Checked on llama.cpp's context."""
    from gguf_stream import llama_abi
    from gguf_stream.config import physical_cores

    lc = llama_abi.llama()
    for given, want in ((dict(n_threads=2, n_threads_batch=1), (2, 1)), (dict(n_threads=1), (1, 1)),
                        ({}, (physical_cores(), physical_cores()))):
        llm = StreamedLlama(tiny_path, n_ctx=64, n_streamed=2, device="host", verbose=False, **given)
        try:
            c = llm._streamer.config
            assert (c.threads, c.threads_batch) == want
            assert (lc.llama_n_threads(llm.ctx), lc.llama_n_threads_batch(llm.ctx)) == want
        finally:
            llm.close()


def test_context_0_plans_for_the_training_context(tiny_path):
    """n_ctx=0 is llama.cpp's "the training context": the plan (and its KV
    estimate) is for the context llama.cpp really allocates."""
    llm = StreamedLlama(tiny_path, n_ctx=0, n_streamed=2, device="host", n_threads=CPU["n_threads"], verbose=False)
    try:
        assert llm.n_ctx() == 512 == llm.plan.n_ctx == llm._streamer.config.n_ctx
    finally:
        llm.close()


def test_generate_split_default_exact_and_progress(tiny_path, capfd):
    """The engine's generate options reach StreamedLlama: the default in
    host mode is the exact placement, exact=True with CPU layers is refused
    before loading, and progress=True shows the load (off by default, even
    with verbose=False's silence around llama.cpp's load)."""
    opts = dict(n_streamed=2, device="host", n_ctx=256, n_threads=CPU["n_threads"], verbose=False)
    with pytest.raises(ValueError, match="exact computes every layer on the GPU"):
        StreamedLlama(tiny_path, **opts, exact=True, generate_cpu_layers=(1,))
    for progress in (False, True):
        llm = StreamedLlama(tiny_path, **opts, exact=True, progress=progress)
        try:
            assert llm._streamer.config.generate_cpu_layers == "none" and llm.plan.cpu_layers == ()
        finally:
            llm.close()
        err = capfd.readouterr().err
        assert ("loading tiny.gguf" in err and "100%" in err) == progress, err
    llm = StreamedLlama(tiny_path, **opts)
    try:
        assert llm._streamer.config.generate_cpu_layers == "none"  # no CUDA: nothing to measure
    finally:
        llm.close()


def test_quantized_v_cache_without_flash_attention_is_refused_before_loading(tiny_path):
    """llama.cpp cannot create a context with a quantized V cache and no
    flash attention: refused with one line before anything loads (it used to
    fail after the load, as llama_cpp.Llama does), and a clean exit, in a
    child process."""
    import subprocess
    import sys

    from conftest import subprocess_env

    code = ("import gguf_stream\n"
            "from gguf_stream.llama_compat import StreamedLlama\n"
            f"StreamedLlama({str(tiny_path)!r}, n_streamed=2, device='host', n_ctx=256, type_k=8, type_v=8, "
            "flash_attn=False, verbose=False)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert r.returncode == 1, r.stderr[-2000:]
    assert r.stderr.rstrip().endswith("ValueError: a quantized V cache (type_v 'q8_0') needs flash attention in "
                                      "llama.cpp: set flash_attn=True, or use type_v='f16'")


def test_every_call_after_close_raises(tiny_path):
    """llama-cpp-python keeps the closed model's wrappers, pointing at freed
    memory: tokenize, eval, completions... segfaulted. In a child process,
    where a crash cannot take the test run with it."""
    import subprocess
    import sys

    from conftest import subprocess_env

    calls = ["tokenize(b'hi')", "detokenize([1, 2])", "eval([1])", "create_completion('hi', max_tokens=2)",
             "create_chat_completion([{'role': 'user', 'content': 'hi'}], max_tokens=2)", "n_vocab()", "n_ctx()",
             "save_state()", "token_bos()", "embed('hi')", "next(llm.generate([1]))", "__call__('hi', max_tokens=2)",
             "tokenizer().encode('hi')"]
    code = ("import gguf_stream\n"
            "from gguf_stream.llama_compat import StreamedLlama\n"
            f"llm = StreamedLlama({str(tiny_path)!r}, n_streamed=2, device='host', n_ctx=256, verbose=False)\n"
            "llm.close()\n"
            f"for call in {calls!r}:\n"
            "    try:\n"
            "        eval(call if call.startswith('next') else 'llm.' + call)\n"
            "        print('returned', call)\n"
            "    except Exception as exc:\n"
            "        print(type(exc).__name__, exc)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines() == ["DecodeError this model is closed"] * len(calls)


@pytest.mark.parametrize("placement", [
    dict(n_streamed=6),                                   # 12 resident, 6 streamed
    dict(streamed_layers=(1, 2), generate_cpu_layers=(2,)),  # mostly resident; a CPU layer while generating
    dict(n_streamed=6, generate_cpu_layers=(5, 14)),
], ids=["resident+streamed", "mostly-resident+cpu", "streamed+cpu"])
def test_logits_all_match_stock_at_every_position(gemma_path, placement):
    """logits_all with resident, streamed and CPU layers together: every
    position's logits equal stock's (repacking off on both sides), through a
    prompt in pieces of prompt and generate size and single tokens."""
    sizes = dict(LLAMA, n_ctx=512, n_batch=64, n_ubatch=64, logits_all=True)

    def run(llm, tokens):
        llm.reset()
        for a, b in ((0, 10), (10, 80), (80, 81), (81, 82), (82, 100)):
            llm.eval(tokens[a:b])
        return np.array(llm.scores[:100])

    with swapped(llama_module, "internals", _NoRepack()):
        stock = llama_cpp.Llama(str(gemma_path), **sizes)
    llm = StreamedLlama(gemma_path, device="host", **placement, **sizes)
    try:
        tokens = stock.tokenize((PROMPT + " Paris. ").encode() * 16)[:100]
        assert len(tokens) == 100
        want, got = run(stock, tokens), run(llm, tokens)
        assert np.count_nonzero(want[-1]) > 0
        differ = np.nonzero(np.abs(got - want).max(axis=1))[0]
        assert differ.size == 0, f"positions {differ[:10]} differ, max {np.abs(got - want).max()}"
    finally:
        llm.close()
        stock.close()


def test_kv_cache_types_by_name_or_ggml_id(tiny_path):
    from gguf_stream.llama_compat import StreamedLlama

    for type_k, type_v in (("q8_0", "q4_0"), (8, 2)):
        llm = StreamedLlama(tiny_path, n_streamed=2, device="host", n_ctx=256, type_k=type_k, type_v=type_v,
                            flash_attn=True, verbose=False)
        try:
            assert (llm.context_params.type_k, llm.context_params.type_v) == (8, 2)  # what llama.cpp got
            assert (llm.plan.type_k, llm.plan.type_v) == ("q8_0", "q4_0")  # what the planner sized
            assert llm.create_completion("hi", max_tokens=2)["choices"][0]["text"] is not None
        finally:
            llm.close()
    with pytest.raises(ValueError, match="not a KV cache type"):
        StreamedLlama(tiny_path, n_streamed=2, device="host", n_ctx=256, type_k=12, verbose=False)


def test_a_draft_model_keeps_every_tokens_outputs():
    """Llama keeps every token's logits with a draft_model (a verify's rows
    are sampled one by one), so graph_reuse is off as with logits_all - a
    prompt's tail split off would make the decode raise; without one it stays on."""
    from gguf_stream.llama_compat import engine_and_llama_options
    from gguf_stream.speculative import LlamaDrafter

    assert engine_and_llama_options({"draft_model": LlamaDrafter()})[0].graph_reuse is False
    assert engine_and_llama_options({"draft_model": None})[0].graph_reuse is True
