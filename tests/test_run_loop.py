"""run's generation loop (cli/run.Generation, issue #16): the greedy pick
read in llama.cpp's logits buffer gives the tokens of the previous pick (a
numpy copy of the logits, then its argmax) and of stock llama_cpp.Llama's
greedy generate; the timing counts what llama.cpp counts (the first token
closes the prompt's time, each later one is a decode); -fa auto says what
llama.cpp chose (CPU, Gemma)."""
import gguf_stream  # noqa: F401  (llama.cpp before numpy)

import numpy as np
import pytest

from conftest import CPU
from gguf_stream import llama_abi
from gguf_stream.cli.run import Generation
from gguf_stream.model import StockModel, load

PROMPT = "The capital of France is"
N = 24
# stock llama_cpp.Llama uses llama.cpp's repacked CPU kernels and its own defaults: ours the same
STOCK = dict(CPU, cpu_repack=True, flash_attn=False)


def copy_then_argmax(model):
    """The pick before issue #16: the logits copied to numpy, the argmax of the copy."""
    return lambda: int(np.argmax(model.logits()))


def second_best(model):
    """Negative control: a pick that is not the argmax."""
    return lambda: int(np.argsort(model.logits())[-2])


@pytest.fixture(scope="module")
def stock(gemma_path):
    with StockModel(gemma_path, n_gpu_layers=0, **STOCK) as m:
        yield m


def generated(model, pick, n=N, stop_at_eog=False) -> Generation:
    model.reset()
    gen = Generation(model, pick, stop_at_eog=stop_at_eog)
    gen.run(model.tokenize(PROMPT, special=True), n)
    return gen


def test_greedy_in_place_is_the_copied_argmax_and_stock_llama_greedy(stock, gemma_path):
    import llama_cpp

    fast = generated(stock, stock.greedy_token).tokens
    assert fast == generated(stock, copy_then_argmax(stock)).tokens
    llm = llama_cpp.Llama(model_path=str(gemma_path), n_ctx=CPU["n_ctx"], n_batch=CPU["n_batch"],
                          n_ubatch=CPU["n_ubatch"], n_threads=CPU["n_threads"], flash_attn=False, verbose=False)
    try:
        want = []
        for tok in llm.generate(stock.tokenize(PROMPT, special=True), temp=0.0):
            want.append(tok)
            if len(want) == N:
                break
    finally:
        llm.close()
    assert len(set(fast)) > 3  # a real continuation, not one token repeated
    assert fast == want
    assert generated(stock, second_best(stock)).tokens != want  # the comparison can fail


def test_streamed_greedy_in_place_is_the_copied_argmax(gemma_path):
    with load(gemma_path, n_streamed=6, **CPU) as m:
        assert generated(m, m.greedy_token).tokens == generated(m, copy_then_argmax(m)).tokens


def test_timing_counts_one_decode_per_token_after_the_first(stock):
    calls = []

    def pick():
        calls.append(1)
        return stock.greedy_token()

    gen = generated(stock, pick, n=5)
    assert len(gen.tokens) == 5 and gen.decodes == 4 and len(calls) == 5  # the last token is never decoded
    assert gen.prompt_seconds > 0 and gen.generate_seconds > 0
    assert gen.tokens_per_second == pytest.approx(4 / gen.generate_seconds)
    one = generated(stock, stock.greedy_token, n=1)
    assert one.decodes == 0 and one.tokens_per_second == 0.0 and "no decode timed" in one.summary(3)
    # an end of text stops before its token: its decode and pick were made, and are counted
    eog = [i for i in range(stock.n_vocab) if stock.is_eog(i)][0]
    picks = iter([stock.greedy_token, stock.greedy_token, lambda: eog])
    gen = generated(stock, lambda: next(picks)(), n=10, stop_at_eog=True)
    assert len(gen.tokens) == 2 and gen.decodes == 2


def test_stop_ends_before_the_next_token(stock):
    model = stock
    model.reset()
    gen = Generation(model, model.greedy_token)
    assert gen.run(model.tokenize(PROMPT, special=True), N, stop=lambda: True) == [] and gen.decodes == 0
    model.reset()
    gen = Generation(model, model.greedy_token)
    assert len(gen.run(model.tokenize(PROMPT, special=True), N, stop=lambda: len(gen.tokens) >= 3)) == 3


def test_flash_attn_outcome_from_the_log():
    on, off = llama_abi.FLASH_ATTN_ON_LOG[0], llama_abi.FLASH_ATTN_OFF_LOG[0]
    assert llama_abi.flash_attn_outcome("auto", [b"resolve_fused_ops: " + on + b"\n"]) is True
    assert llama_abi.flash_attn_outcome("auto", [b"resolve_fused_ops: " + off + b", set to disabled\n"]) is False
    assert llama_abi.flash_attn_outcome("auto", []) is None
    assert llama_abi.flash_attn_outcome(True, []) is True and llama_abi.flash_attn_outcome(False, []) is False


@pytest.mark.parametrize("setting, want", [("auto", True), (True, True), (False, False)])
def test_the_context_says_whether_flash_attention_ended_on(gemma_path, setting, want):
    """On the CPU llama.cpp runs flash attention for every layer, so auto
    turns it on; off stays off (the negative control: the same reading can
    say off)."""
    with load(gemma_path, n_streamed=6, **dict(CPU, flash_attn=setting)) as m:
        assert m.flash_attn is want


def test_run_says_what_fa_auto_became_and_llama_log_still_reaches_stderr(capsys, gemma_path):
    from gguf_stream import cli

    argv = ["run", str(gemma_path), "-p", PROMPT, "-n", "2", "--n-streamed", "6", "--device", "host",
            "-t", str(CPU["n_threads"]), "-c", "256", "-b", "64", "-ub", "64", "-fa"]
    assert cli.main([*argv, "auto", "-v"]) == 0
    err = capsys.readouterr().err
    assert "gguf-stream: flash attention on (-fa auto, llama.cpp's choice)" in err
    assert "Flash Attention enabled" in err  # llama.cpp's own line, passed on by the watch (-v prints the log)
    assert cli.main([*argv, "off"]) == 0
    err = capsys.readouterr().err
    assert "gguf-stream: flash attention off\n" in err and "Flash Attention enabled" not in err


def test_watch_log_restores_the_callback():
    import ctypes

    lc = llama_abi.llama()

    def current():
        cb, data = lc.llama_log_callback(), ctypes.c_void_p()
        lc.llama_log_get(ctypes.byref(cb), ctypes.byref(data))
        return ctypes.cast(cb, ctypes.c_void_p).value

    before = current()
    with llama_abi.watch_log(b"x") as seen:
        assert current() != before
    assert current() == before and seen == []


def test_streamed_llama_greedy_reads_the_argmax_as_stock_llama_samples(gemma_path, monkeypatch):
    """StreamedLlama's plain greedy skips llama.cpp's full-vocabulary
    candidate array: the same tokens as through llama.cpp's sampler
    (Llama.sample itself) and as stock llama_cpp.Llama; a penalty goes
    through the chain and changes them (the negative control)."""
    import llama_cpp

    from gguf_stream.llama_compat import StreamedLlama

    kw = dict(n_ctx=CPU["n_ctx"], n_batch=CPU["n_batch"], n_ubatch=CPU["n_ubatch"], n_threads=CPU["n_threads"],
              verbose=False)

    def first(llm, n=N, **sampling):
        out = []
        for tok in llm.generate(llm.tokenize(PROMPT.encode()), **sampling):
            out.append(tok)
            if len(out) == n:
                return out

    stock = llama_cpp.Llama(model_path=str(gemma_path), **kw)
    try:
        want = first(stock, temp=0.0)
    finally:
        stock.close()
    llm = StreamedLlama(gemma_path, device="host", cpu_repack=True, **kw)  # resident, stock's kernels
    try:
        fast = first(llm, temp=0.0)
        penalized = first(llm, temp=0.0, repeat_penalty=1.5)
        monkeypatch.setattr(StreamedLlama, "sample", llama_cpp.Llama.sample)  # llama.cpp's sampler for each token
        assert first(llm, temp=0.0) == want
        assert first(llm, temp=0.0, repeat_penalty=1.5) == penalized
    finally:
        llm.close()
    assert fast == want and len(set(want)) > 3
    assert penalized != want
