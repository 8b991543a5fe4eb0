"""Batched generation (batch.py): k sequences in one context give each
sequence the tokens it gets alone, on stock llama.cpp and streamed (host
mode, exact), with more prompts than seats; the KV cache is sized for the
sequences as llama.cpp sizes it."""
import gguf_stream  # noqa: F401  (llama.cpp before numpy)
import numpy as np
import pytest
from conftest import CPU, HYBRID, hybrid_cpu_layers

from gguf_stream.gguf_file import read_model
from gguf_stream.memory import kv_cache_bytes
from gguf_stream.model import StockModel, StreamedModel
from gguf_stream.sampling import Sampler, SamplingParams

TEXTS = ["The quick brown fox", "Once upon a time there was", "In 1492 Columbus", "def fibonacci(n):",
         "The capital of France is"]  # 5 prompts for 4 seats: the first to finish gives its seat to the last
N = 8
SEATS = dict(CPU, n_seq_max=4, n_ctx=1024)


def alone(path, sampling=None):
    """Each prompt generated alone by stock llama.cpp, one sequence, a cleared cache each time."""
    out = []
    with StockModel(path, 0, **CPU) as m:
        for text in TEXTS:
            m.reset()
            prompt = m.tokenize(text, add_bos=True, special=True)
            if sampling is None:
                out.append(m.generate(prompt, N, stop_at_eog=True))
                continue
            with Sampler(m, sampling) as s:
                s.feed_prompt(prompt)
                m.eval(prompt)
                toks = []
                for _ in range(N):
                    toks.append(s.sample(m.logits()))
                    m.eval([toks[-1]])
                out.append(toks)
    return out


@pytest.fixture(scope="module", params=["gemma", "tiny"])
def model_alone(request):
    path = request.getfixturevalue(f"{request.param}_path")
    return path, alone(path)


@pytest.mark.parametrize("placement", ["stock", "resident", "streamed", "hybrid", "hybrid-rows-on-gpu"])
def test_batched_equals_each_sequence_alone(model_alone, placement):
    path, reference = model_alone
    if placement == "stock":
        m = StockModel(path, 0, **SEATS)
    else:
        kw = {"resident": {}, "streamed": HYBRID,
              "hybrid": dict(HYBRID, generate_cpu_layers=hybrid_cpu_layers(path)),
              "hybrid-rows-on-gpu": dict(HYBRID, generate_cpu_layers=hybrid_cpu_layers(path),
                                         cpu_layers_max_batch=1)}[placement]
        m = StreamedModel(path, **SEATS, **kw)
    with m:
        done = []
        r = m.generate_batch(TEXTS, N, on_done=lambda s: done.append(s.index))
        assert [s.tokens for s in r.sequences] == reference
        assert [s.index for s in r.sequences] == list(range(len(TEXTS)))
        assert sorted(done) == list(range(len(TEXTS)))
        assert r.max_parallel == 4 and r.steps < len(TEXTS) * N  # several tokens per pass
        assert r.tokens_per_step > 1 and r.aggregate_tps > 0
        assert all(s.stop in ("length", "eos") and s.tokens_per_second > 0 for s in r.sequences)
        if placement != "stock" and placement != "resident":
            assert m.stats.counters.uploads > 0
        # the model is usable alone afterwards (the batch leaves no sequence behind)
        m.reset()
        assert m.generate(m.tokenize(TEXTS[0], add_bos=True, special=True), N, stop_at_eog=True) == reference[0]


def test_cpu_layers_max_batch_moves_multi_row_decodes_to_the_prompt_placement(tiny_path):
    """With cpu_layers_max_batch=1 a step of several sequences streams the
    CPU layers too (prompt placement, every row on the device), while a
    lone sequence's step still leaves them to the CPU: more uploads, the
    same tokens."""
    cpu = hybrid_cpu_layers(tiny_path)
    uploads, tokens = {}, {}
    for most in (None, 1):
        with StreamedModel(tiny_path, **SEATS, **HYBRID, generate_cpu_layers=cpu, cpu_layers_max_batch=most) as m:
            assert m.streamer.prompt_min_ubatch == (32 if most is None else 2)
            m.reset_counters()
            r = m.generate_batch([[1, 2, 3]] * 4, N, stop_at_eog=False)
            uploads[most], tokens[most] = m.stats.counters.uploads, [s.tokens for s in r.sequences]
            m.reset_counters()
            m.generate_batch([[1, 2, 3]], N, stop_at_eog=False)  # one row: the generate placement either way
            alone = m.stats.counters.uploads
    assert tokens[None] == tokens[1]
    assert uploads[1] >= uploads[None] + (N - 1) * len(cpu)  # each 4-row step uploads the CPU layers too
    assert alone < uploads[None]


def test_negative_control_crossed_rows_are_caught(gemma_path, monkeypatch):
    """Reading the logits of another sequence's row (an indexing slip) is
    caught by the comparison above: the sequences' tokens change."""
    from gguf_stream import batch

    reference = alone(gemma_path)
    step = batch.BatchDecoder.step

    def crossed(self, entries):  # row i gets row i-1's logits
        out = step(self, entries)
        return out[:1] + out[:-1]

    monkeypatch.setattr(batch.BatchDecoder, "step", crossed)
    with StockModel(gemma_path, 0, **SEATS) as m:
        got = [s.tokens for s in m.generate_batch(TEXTS, N).sequences]
    assert got[0] == reference[0] and got[1:] != reference[1:]


def test_prompts_seated_together_share_a_prefill_decode(gemma_path, monkeypatch):
    """With a unified KV cache the 4 prompts seated at first are prefilled
    in one decode (they fit n_batch), the fifth in its own when a seat
    frees; a long prompt spans decodes of n_batch tokens; the tokens are
    still each prompt's alone. With a cache per sequence each prompt has its
    own decode (llama.cpp would cut a shared one into uneven ubatches)."""
    from gguf_stream import batch

    reference = alone(gemma_path)
    sizes = []
    decode = batch._decode

    def counted(model, tb):
        sizes.append(tb.batch.n_tokens)
        return decode(model, tb)

    monkeypatch.setattr(batch, "_decode", counted)
    with StreamedModel(gemma_path, **SEATS, kv_unified=True) as m:
        prompts = [m.tokenize(t, add_bos=True, special=True) for t in TEXTS]
        r = m.generate_batch(prompts, N)
        assert [s.tokens for s in r.sequences] == reference
        first_four = sum(len(p) for p in prompts[:4])
        assert sizes[0] == first_four and len(prompts[4]) in sizes  # one decode for four prompts
        assert len(sizes) == r.steps + 2
        sizes.clear()
        long = (prompts[0] * 40)[:SEATS["n_batch"] + 5]  # over n_batch: two decodes
        m.generate_batch([long, prompts[1]], 2, stop_at_eog=False)
        assert sizes[:2] == [SEATS["n_batch"], 5 + len(prompts[1])]
    sizes.clear()
    with StreamedModel(gemma_path, **SEATS) as m:
        r = m.generate_batch(prompts, N)
        assert [s.tokens for s in r.sequences] == reference
        assert sizes[:4] == [len(p) for p in prompts[:4]]


def test_sampled_sequences_equal_alone(tiny_path):
    """Each sequence has its own sampler chain, seeded alike: its tokens are those it draws alone."""
    sampling = SamplingParams(temp=0.8, top_k=40, seed=7)
    reference = alone(tiny_path, sampling)
    with StreamedModel(tiny_path, **SEATS, **HYBRID) as m:
        r = m.generate_batch(TEXTS, N, sampling=sampling, stop_at_eog=False)
    assert [s.tokens for s in r.sequences] == reference
    assert len(set(map(tuple, reference))) > 1


def test_kv_cache_sized_for_the_sequences(tiny_path):
    """The plan's KV is k sequences x n_ctx/k cells, padded as llama.cpp pads
    them: the engine measures CPU layers' KV caches, and they match."""
    mf = read_model(tiny_path)
    cpu = hybrid_cpu_layers(tiny_path)
    with StreamedModel(tiny_path, **dict(CPU, n_seq_max=3, n_ctx=1000), **HYBRID, generate_cpu_layers=cpu) as m:
        assert m.generate_batch(TEXTS[:3], 2).n_generated == 6  # a generate-phase decode moves KV to host
        plan = m.plan
        assert "3 sequences x 512 cells" in plan.table()
        assert plan.kv_bytes == kv_cache_bytes(mf, 3 * 512) and plan.n_seq == 3
        measured = m.stats.counters.host_kv_bytes
        assert measured == len(cpu) * plan.kv_layer_bytes
        assert measured != len(cpu) * (kv_cache_bytes(mf, 1000) // mf.n_layer)  # unpadded would be wrong
        assert m._lc.llama_n_ctx_seq(m.ctx) == 512


def test_bad_input(tiny_path):
    with StockModel(tiny_path, 0, **dict(CPU, n_seq_max=2, n_ctx=512)) as m:
        for prompts, n, words in (([], 4, "at least one prompt"), ([[]], 4, "prompt 0 is empty"),
                                  ([[1], [10**9]], 4, "prompt 1 holds token ids"),
                                  ([[1] * 200], 100, "exceed a sequence's 256 KV cells"),
                                  ("text", 4, "list of token lists"), ([[1]], 0, "n_tokens")):
            with pytest.raises(ValueError, match=words):
                m.generate_batch(prompts, n)
        assert m.generate_batch([[1, 2]], 2).n_generated == 2  # still usable
    with pytest.raises(ValueError, match="n_seq_max"):
        StockModel(tiny_path, 0, **dict(CPU, n_seq_max=8, n_ctx=4))
    with pytest.raises(ValueError, match="n_seq_max"):
        StockModel(tiny_path, 0, **dict(CPU, n_seq_max=0))


def test_unified_kv_cache(tiny_path):
    """kv_unified (llama.cpp's -kvu): the sequences share one cache of n_ctx
    cells (padded once), sized so in the plan and measured so; outputs as alone."""
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    with StockModel(tiny_path, 0, **CPU) as m:
        reference = []
        for p in prompts:
            m.reset()
            reference.append(m.generate(p, 6))
    cpu = hybrid_cpu_layers(tiny_path)
    with StreamedModel(tiny_path, **dict(CPU, n_ctx=64, n_seq_max=3, kv_unified=True), **HYBRID,
                       generate_cpu_layers=cpu) as m:
        r = m.generate_batch(prompts, 6, stop_at_eog=False)
        assert [s.tokens for s in r.sequences] == reference
        assert m.plan.kv_bytes == kv_cache_bytes(read_model(tiny_path), 256)
        assert m.stats.counters.host_kv_bytes == len(cpu) * m.plan.kv_layer_bytes
        with pytest.raises(ValueError, match="3 sequences at once need up to 600 KV cells"):
            m.generate_batch([[1] * 100] * 3, 100)


def test_plan_sizes_kv_for_the_sequences(tiny_path):
    from gguf_stream.planner import make_plan

    mf = read_model(tiny_path)
    one = make_plan(mf, n_streamed=4, n_ctx=1024)
    four = make_plan(mf, n_streamed=4, n_ctx=1000, n_seq=4)  # 250 each, padded to 256
    assert four.kv_bytes == one.kv_bytes == kv_cache_bytes(mf, 1024)
    assert make_plan(mf, n_streamed=4, n_ctx=1000, n_seq=8).kv_bytes == kv_cache_bytes(mf, 8 * 256)
    assert "8 sequences x 256 cells" in make_plan(mf, n_streamed=4, n_ctx=1000, n_seq=8).table()
    # the budget covers it: 8 sequences' KV counts in the device estimate the budget is held to
    budget = make_plan(mf, n_streamed=2, n_ctx=256).device_bytes + kv_cache_bytes(mf, 7 * 256)
    many = make_plan(mf, vram_budget=budget, n_ctx=256 * 8, n_seq=8)
    alone = make_plan(mf, streamed_layers=many.streamed, n_slots=many.n_slots, n_ctx=256)
    assert many.device_bytes <= budget and many.device_bytes - alone.device_bytes == kv_cache_bytes(mf, 7 * 256)


def test_a_step_is_one_pass_whatever_the_seats_order(tiny_path):
    """With a KV cache per sequence llama.cpp puts only consecutive
    increasing sequence ids in one ubatch, and each ubatch is a pass over the
    streamed weights: a step whose rows come in another order (seats taken
    out of order: a server's prompt-cache hit on seat 1 before seat 0) is
    still one pass (each streamed layer adopted once), and each row's logits
    are its own. Negative control: the same rows decoded in their given
    order take two passes."""
    from contextlib import ExitStack

    from gguf_stream import batch

    with StreamedModel(tiny_path, **SEATS, **HYBRID) as m, ExitStack() as stack:
        assert not m.config.kv_unified and SEATS["n_seq_max"] >= 2
        d = batch.BatchDecoder(m, stack)
        a, b = d.prefill([(0, [1, 2, 3]), (1, [1, 4, 5, 6])])
        ta, tb = int(np.argmax(a)), int(np.argmax(b))
        m.reset_counters()
        forward = d.step([(ta, 3, 0), (tb, 4, 1)])
        one_pass = m.stats.counters.adoptions
        d.keep_prefix(0, 3), d.keep_prefix(1, 4)  # the same step again, its rows the other way round
        m.reset_counters()
        backward = d.step([(tb, 4, 1), (ta, 3, 0)])
        assert m.stats.counters.adoptions == one_pass == len(m.plan.streamed)
        assert np.array_equal(backward[0], forward[1]) and np.array_equal(backward[1], forward[0])
        d.keep_prefix(0, 3), d.keep_prefix(1, 4)
        m.reset_counters()
        d.batch.fill([(tb, 4, 1, True), (ta, 3, 0, True)])  # unsorted, as before the fix
        batch._decode(m, d.batch)
        assert m.stats.counters.adoptions == 2 * one_pass


# repeats, so that prompt lookup finds drafts in each sequence's text
REPEATING = ["one two three four, one two three four, one two three four, one two",
             "red green blue red green blue red green blue red", "The capital of France is"]


@pytest.mark.parametrize("drafting", ["lookup", "draft model"])
def test_batched_drafts_give_the_tokens_without_drafts(tiny_path, drafting):
    """Greedy batched generation with drafts (prompt lookup; the model itself
    as its draft model, one sequence per seat) gives every sequence the
    tokens it gets without drafts, in fewer steps; drafts with sampling are
    refused. (Tiny, streamed with CPU layers: host mode.)"""
    from gguf_stream.speculative import DraftModel, PromptLookup

    kw = dict(SEATS, **HYBRID, generate_cpu_layers=hybrid_cpu_layers(tiny_path))
    with StreamedModel(tiny_path, **kw) as m:
        plain = m.generate_batch(REPEATING, 3 * N)
        if drafting == "lookup":
            drafter = PromptLookup(3)
        else:
            drafter = DraftModel(StockModel(tiny_path, 0, **dict(CPU, n_seq_max=4, n_ctx=1024)), 3)
        try:
            r = m.generate_batch(REPEATING, 3 * N, drafter=drafter)
            assert [s.tokens for s in r.sequences] == [s.tokens for s in plain.sequences]
            assert r.drafted >= r.accepted > 0 and r.steps < plain.steps
            if drafting == "draft model":  # its drafts are the model's picks
                assert r.accepted > 0.9 * r.drafted
            with pytest.raises(ValueError, match="greedy"):
                m.generate_batch(REPEATING, N, drafter=drafter, sampling=SamplingParams(temp=0.8, seed=1))
        finally:
            drafter.close()


class WrongDrafts:
    """Drafts token 7 three times, whatever the text."""

    n_draft = 3

    def draft_seats(self, requests):
        return [[7] * min(n, 3) for _, _, n in requests]


def test_batched_drafts_taken_unchecked_change_the_tokens(tiny_path, monkeypatch):
    """Wrong drafts are rejected: the tokens stay those without drafts.
    Negative control: a step that keeps every draft as the model's pick
    gives other tokens, so the equality above checks the verification."""
    import gguf_stream.batch as batch

    def trusting(decoder, seat, rows, draft, take):
        for j, row in enumerate(rows):
            if not take(seat, row):
                return False, j
            if j < len(draft):
                seat.result.tokens[-1] = seat.last = draft[j]  # the draft, whatever the model picked
        seat.pos += len(rows)
        return True, len(draft)

    with StreamedModel(tiny_path, **SEATS, **HYBRID) as m:
        plain = m.generate_batch(REPEATING, 3 * N)
        checked = m.generate_batch(REPEATING, 3 * N, drafter=WrongDrafts())
        monkeypatch.setattr(batch, "_keep_verified", trusting)
        r = m.generate_batch(REPEATING, 3 * N, drafter=WrongDrafts())
    assert [s.tokens for s in checked.sequences] == [s.tokens for s in plain.sequences]
    assert checked.drafted > 0 and checked.accepted < checked.drafted / 4 and checked.steps >= plain.steps - 1
    assert r.drafted > 0 and [s.tokens for s in r.sequences] != [s.tokens for s in plain.sequences]
