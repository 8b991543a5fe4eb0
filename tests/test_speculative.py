"""Speculative decoding (speculative.py): greedy output with drafts checked
in one decode equals plain greedy output, streamed or not, with prompt
lookup and with a draft model; acceptance and tokens per pass counted."""
import gguf_stream  # noqa: F401  (llama.cpp before numpy)
import numpy as np
import pytest
from conftest import CPU, HYBRID, hybrid_cpu_layers

from gguf_stream.model import StockModel, StreamedModel
from gguf_stream.speculative import DraftModel, PromptLookup, generate_speculative

TEXT = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n"
N = 24


@pytest.fixture(scope="module", params=["gemma", "tiny"])
def reference(request):
    path = request.getfixturevalue(f"{request.param}_path")
    with StockModel(path, 0, **CPU) as m:
        prompt = m.tokenize(TEXT, add_bos=True, special=True)
        return path, prompt, m.generate(prompt, N, stop_at_eog=True)


def test_prompt_lookup_equals_greedy(reference):
    path, prompt, ref = reference
    with StreamedModel(path, **CPU, **HYBRID, generate_cpu_layers=hybrid_cpu_layers(path)) as m:
        for n_draft in (1, 5):
            seen = []
            r = generate_speculative(m, prompt, N, PromptLookup(n_draft), on_token=seen.append)
            assert r.tokens == ref and seen == ref
            assert r.passes + 1 >= len(ref) / (n_draft + 1)
            assert r.drafted >= r.accepted >= 0 and 0 <= r.acceptance <= 1
            assert "tokens per pass" in r.summary()


def test_draft_model_equals_greedy(tiny_path):
    """The model itself as its draft: every draft is accepted, so every pass
    checks n_draft tokens at once - and the tokens are still greedy's."""
    path = tiny_path
    with StockModel(path, 0, **CPU) as m:
        prompt = m.tokenize(TEXT, add_bos=True, special=True)
        ref = m.generate(prompt, N, stop_at_eog=True)
    with StreamedModel(path, **CPU, **HYBRID) as m, StockModel(path, 0, **CPU) as dm:
        drafter = DraftModel(dm, 6)
        drafter.check_vocabulary(m)
        r = generate_speculative(m, prompt, N, drafter)
        assert r.tokens == ref
        if r.stop == "length":
            assert r.acceptance == 1.0 and r.tokens_per_pass > 4
        again = generate_speculative(m, prompt, N, drafter)  # the draft model's cache follows a new context
        assert again.tokens == ref


def _follow_and_draft(m, seen: list[int], text: list[int], n: int) -> list[int]:
    """The reference drafter: m's cache cut back to what it shares with text
    (less the last token, whose logits draft the first), the rest of text
    evaluated, then n greedy tokens one eval each; seen tracks the cache."""
    from gguf_stream.batch import common_start

    common = common_start(seen, text[:-1])
    m._lc.llama_memory_seq_rm(m._lc.llama_get_memory(m._live_ctx()), 0, common, -1)
    m.eval(text[common:])
    seen[:] = list(text)
    out = []
    while True:
        out.append(int(np.argmax(m.logits())))
        if len(out) == n:
            return out
        m.eval(out[-1:])
        seen.append(out[-1])


@pytest.mark.parametrize("unified", [False, True])
def test_seat_drafts_equal_the_draft_models_greedy_text(tiny_path, unified):
    """DraftModel.draft_seats (the batch loop's draft model): a seat's drafts
    are the draft model's greedy continuation of its text (one eval at a time
    in a context of its own whose cache follows that text, as the seat's
    cells do), as the text grows (only the new tokens decoded), changes (its
    cells cut back to the common start) and another seat drafts beside it,
    with a cache per seat or one shared (-kvu); a seat asked for none gets
    none; draft() is sequence 0's. (llama.cpp's CPU kernels round by a
    decode's rows, so two seats' decodes might tip a near tie; the target
    checks every draft anyway.)"""
    shape = {**CPU, "n_seq_max": 2, "kv_unified": unified, "n_ctx": 2 * CPU["n_ctx"] if unified else CPU["n_ctx"]}
    with StockModel(tiny_path, 0, **CPU) as one, StockModel(tiny_path, 0, **shape) as two:
        seats, seen = DraftModel(two, 5), []

        def greedy(text, n):
            return _follow_and_draft(one, seen, text, n)

        a = one.tokenize(TEXT, add_bos=True, special=True)
        b = one.tokenize("The capital of France is", add_bos=True, special=True)
        for seat, text in ((0, a), (1, b), (0, a + [7, 8]), (0, a[:5] + [9]), (1, b + a[:3]), (1, b)):
            got = seats.draft_seats([(seat, text, 4), (1 - seat, a, 0)])
            assert got == [greedy(text, 4), []]
        assert seats._seen[1][:len(b)] == b and len(seats._seen[1]) == len(b) + 3  # the last draft not decoded
        both = seats.draft_seats([(0, a + [5], 3), (1, b + [6], 2)])  # each seat's text grown: one shared decode
        assert both == [greedy(a + [5], 3), greedy(b + [6], 2)]  # each its own seat's drafts
        assert seats.draft(a, 4) == greedy(a, 4)
        seats.close()
    assert two.ctx is None


def test_lookup_finds_repeats():
    lookup = PromptLookup(3)
    assert lookup.draft([1, 2, 3, 9, 1, 2, 3], 3) == [9, 1, 2]
    assert lookup.draft([5, 1, 2, 7, 1, 2], 2) == [7, 1]
    assert lookup.draft([1, 2, 3], 3) == []
    assert lookup.draft([4, 4], 3) == [4]
    with pytest.raises(ValueError):
        PromptLookup(0)


def test_negative_control_wrong_row_is_caught(tiny_path, monkeypatch):
    """Checking a draft against the next position's logits (an off-by-one)
    changes the output: the comparison above would see it."""
    from gguf_stream import speculative

    path = tiny_path
    with StockModel(path, 0, **CPU) as m:
        prompt = m.tokenize(TEXT, add_bos=True, special=True)
        ref = m.generate(prompt, N, stop_at_eog=True)
    logits = speculative._logits
    monkeypatch.setattr(speculative, "_logits", lambda m, i: logits(m, i + 1) if i == 0 and m._n_rows > 1
                        else logits(m, i))
    fill = speculative.TokenBatch.fill

    def counting_fill(self, entries):
        model_ref[0]._n_rows = len(entries)
        fill(self, entries)

    monkeypatch.setattr(speculative.TokenBatch, "fill", counting_fill)
    with StockModel(path, 0, **CPU) as m, StockModel(path, 0, **CPU) as dm:
        model_ref = [m]
        r = generate_speculative(m, prompt, N, DraftModel(dm, 4))
    assert r.tokens != ref


def test_bad_input(tiny_path, gemma_path):
    with StockModel(tiny_path, 0, **CPU) as m, StockModel(gemma_path, 0, **CPU) as other:
        with pytest.raises(ValueError, match="vocabulary"):
            DraftModel(other, 4).check_vocabulary(m)
        with pytest.raises(ValueError, match="exceed the context"):
            generate_speculative(m, [1] * 250, 10, PromptLookup(4))
        with pytest.raises(ValueError, match="empty"):
            generate_speculative(m, [], 10, PromptLookup(4))


def test_run_lookup_prints_the_greedy_text(tiny_path, capsys):
    from test_cli import SMALL, T, run_main

    argv = ["run", str(tiny_path), "-p", TEXT, "-n", "20", "-t", T, "--n-streamed", "4", *SMALL]
    rc, plain, err = run_main(capsys, *argv)
    assert rc == 0, err
    for extra in (["--lookup", "4"], ["-md", str(tiny_path), "--draft-max", "5"]):
        rc, out, err = run_main(capsys, *argv, *extra)
        assert rc == 0, err
        assert out == plain and "tokens per pass" in err


@pytest.mark.parametrize("extra, needles", [
    (["--lookup", "4", "--temp", "0.7"], ["greedy only"]),
    (["--lookup", "4", "-md", "x.gguf"], ["give one"]),
    (["--lookup", "0"], ["--lookup must be in 1..256"]),
    (["-md", "{tiny}", "--draft-max", "0"], ["--draft-max must be in 1..256"]),
    (["-md", "{gemma}"], ["vocabulary"]),
])
def test_run_speculative_bad_flags(tiny_path, gemma_path, capsys, extra, needles):
    from test_cli import SMALL, T, assert_user_error, run_main

    extra = [e.format(tiny=tiny_path, gemma=gemma_path) for e in extra]
    rc, _, err = run_main(capsys, "run", str(tiny_path), "-p", "x", "-n", "4", "-t", T, "--n-streamed", "2", *SMALL,
                          *extra)
    assert_user_error(rc, err, *needles)


def test_run_speculative_measures_the_split_for_verify_rows(tiny_path, capsys, monkeypatch):
    """run --lookup N / -md with --draft-max N: the generate split is chosen
    for verify decodes of N + 1 rows (EngineConfig.generate_rows), unless
    --generate-rows says otherwise."""
    import gguf_stream.model as model_mod
    from test_cli import SMALL, T, run_main

    seen, load = [], model_mod.load
    monkeypatch.setattr(model_mod, "load", lambda path, **o: seen.append(o.get("generate_rows")) or load(path, **o))
    argv = ["run", str(tiny_path), "-p", TEXT, "-n", "4", "-t", T, "--n-streamed", "4", *SMALL]
    for extra in (["--lookup", "4"], ["-md", str(tiny_path), "--draft-max", "6"], ["--lookup", "4", "--generate-rows",
                                                                                  "2"], []):
        rc, _, err = run_main(capsys, *argv, *extra)
        assert rc == 0, err
    assert seen == [5, 7, 2, None]


def test_chat_drafts_give_the_greedy_reply(gemma_path, capsys, monkeypatch):
    """chat --lookup N / -md DRAFT: llama-cpp-python's draft_model path with
    our drafters (speculative.LlamaDrafter) replies exactly as without; with
    the model itself as the draft every draft is right, so a reply takes
    fewer passes than tokens."""
    import io
    import re
    import sys

    from test_cli import SMALL, T, run_main

    message = "Repeat exactly: red green blue red green blue red green blue\n"
    argv = ["chat", str(gemma_path), "-n", "24", "--n-streamed", "6", "--device", "host", "-t", T, *SMALL]
    replies = []
    for extra in ([], ["--lookup", "4"], ["-md", str(gemma_path), "--draft-max", "4"]):
        monkeypatch.setattr(sys, "stdin", io.StringIO(message))
        rc, out, err = run_main(capsys, *argv, *extra)
        assert rc == 0, err
        replies.append((out, err))
    assert replies[0][0].strip() and replies[1][0] == replies[0][0] and replies[2][0] == replies[0][0]
    assert "speculative:" not in replies[0][1]
    for _, err in replies[1:]:  # the reply's acceptance after its timing
        assert re.search(r"generated: \d+ tokens.*; speculative: \d+ of \d+ drafted tokens accepted", err), err
    generated, accepted, drafted, passes, tokens = map(int, re.search(
        r"generated: (\d+) tokens.* (\d+) of (\d+) drafted tokens accepted .* \((\d+) passes for (\d+) tokens\)",
        replies[2][1]).groups())
    assert generated == tokens  # not the drafts decoded past the reply's end
    # the model as its own draft: every draft right, but for the last pass's
    # that the token limit cut off
    assert drafted - 4 <= accepted <= drafted and accepted > 0 and passes < tokens


def test_chat_speculative_is_greedy_only(gemma_path, capsys):
    from test_cli import SMALL, T, assert_user_error, run_main

    rc, _, err = run_main(capsys, "chat", str(gemma_path), "--lookup", "4", "--temp", "0.7", "--device", "host",
                          "-t", T, *SMALL)
    assert_user_error(rc, err, "greedy only")


class FixedDrafts:
    """A drafter proposing the given drafts in turn."""

    n_draft = 3

    def __init__(self, drafts):
        self.drafts = iter(drafts)

    def draft(self, context, n):
        return next(self.drafts)


def test_llama_drafter_counts_the_drafts_generate_keeps():
    """Llama.generate keeps drafts up to the first the model disagrees with:
    a generated token equal to the pass's next draft is accepted, nothing
    after a disagreement is (even a token equal to a later draft)."""
    from gguf_stream.speculative import LlamaDrafter

    d = LlamaDrafter(FixedDrafts([[4, 5, 6], [7, 8], [1, 2]]))
    d.begin()
    d.saw(3)  # from the prompt's decode: no draft yet
    assert list(d([1, 2, 3])) == [4, 5, 6]
    for t in (4, 9, 6):  # one accepted, then the model's own; 6 after it is no draft of this pass
        d.saw(t)
    assert list(d([1, 2, 3, 4, 9, 6])) == [7, 8]
    for t in (7, 8, 1):  # both accepted, then the token after them
        d.saw(t)
    r = d.result
    assert (r.passes, r.drafted, r.accepted, r.tokens) == (2, 5, 3, [3, 4, 9, 6, 7, 8, 1])
    assert r.tokens_per_pass == 7 / 3 and "3 of 5 drafted tokens accepted (60%)" in r.summary()
    d.begin(drafting=False)  # a generation that samples: passes, no drafts
    assert list(d([1, 2])) == [] and (d.result.passes, d.result.drafted) == (1, 0)


def test_counted_drafts_for_greedy_generations_only():
    """counted() routes Llama.generate through the drafter: greedy ones draft
    (temperature 0, no logits processor), the report follows each, tokens
    pass through unchanged and a generation closed early closes Llama's."""
    from gguf_stream.speculative import LlamaDrafter, counted

    closed = []

    class FakeLlama:
        def generate(self, tokens, top_k=40, temp=0.80, logits_processor=None):
            try:  # llama-cpp-python's order: the prompt's token, a pass's draft, its checked tokens
                yield 5
                self.draft_model(tokens)
                yield 6
                yield 7
            finally:
                closed.append(True)

    llm, drafter, reports = FakeLlama(), LlamaDrafter(FixedDrafts([[6, 8]] * 4)), []
    llm.draft_model = drafter
    counted(llm, drafter, lambda d, greedy: reports.append((greedy, d.result.drafted, d.result.accepted)))
    assert list(llm.generate([1], temp=0)) == [5, 6, 7]
    assert list(llm.generate([1], temp=0.7)) == [5, 6, 7]
    assert list(llm.generate([1], 40, 0, ["processor"])) == [5, 6, 7]
    assert reports == [(True, 2, 1), (False, 0, 0), (False, 0, 0)]
    g = llm.generate([1], temp=0)
    next(g)
    g.close()
    assert len(closed) == 4 and len(reports) == 4
