"""gguf_stream/bench/gate.py: the correctness gate, with fabricated tokens and logits."""
from __future__ import annotations

import pytest

from gguf_stream.bench.gate import Greedy, check_tokens, gate
from gguf_stream.bench.rows import BenchResult
from test_bench_report import row


@pytest.mark.parametrize("ref, cand, ok, first", [
    ([1, 2, 3], [1, 2, 3], True, None),
    ([], [], True, None),
    ([1, 2, 3], [1, 9, 3], False, 1),
    ([5, 2, 3], [1, 2, 3], False, 0),
    ([1, 2, 3], [1, 2], False, 2),  # a shorter answer is a mismatch too
    ([1, 2], [1, 2, 3], False, 2),
])
def test_gate(ref, cand, ok, first):
    g = check_tokens(ref, cand)
    assert (g.ok, g.first_mismatch) == (ok, first)
    assert g.describe() == ("ok" if ok else f"MISMATCH@{first}")


def test_gate_with_several_references():
    a, b = Greedy((1, 2, 3)), Greedy((1, 2, 4))
    assert gate(a, [("all-in-VRAM", a), ("stock ngl=5", b)]) == "ok"
    assert gate(b, [("all-in-VRAM", a), ("stock ngl=5", b)]) == "ok (=stock ngl=5)"
    assert gate(Greedy((9, 9, 9)), [("all-in-VRAM", a), ("stock ngl=5", b)]) == "MISMATCH@0"
    assert gate(b, [("all-in-VRAM", None), ("stock", a)]) == "MISMATCH@2"  # vs the first one present
    assert gate(None, [("stock", a)]) == "" and gate(a, [("stock", None)]) == ""


def test_gate_tells_a_near_tie_from_a_wrong_layer():
    import numpy as np

    rng = np.random.default_rng(0)
    ref_tokens, flipped = (3, 5, 7, 9), (3, 5, 8, 9)
    logits = rng.normal(0, 1, (4, 32))
    for i, tok in enumerate(ref_tokens):
        logits[i, tok] = logits[i].max() + 1.0
    logits[2, 8] = logits[2, 7] - 1e-5  # a near tie at position 2
    ref = Greedy(ref_tokens, logits)
    # rounding: every logit within ~1e-4 of the reference; the near tie flips
    near = logits + rng.normal(0, 1e-5, logits.shape)
    near[2, 8] = near[2, 7] + 1e-5
    tie = Greedy(flipped, near)
    got = gate(tie, [("all-in-VRAM", ref)])
    assert got.startswith("MISMATCH@2 (Δlogit 0.000σ rms") and got.endswith("within rounding 0.005σ)")
    assert BenchResult((row(check=got),)).mismatch  # still loud without --allow-near-ties
    assert gate(tie, [("all-in-VRAM", ref)], allow_near_ties=True) == "ok (near tie @2)"
    # a wrong layer: the same flip, but logits unrelated to the reference's
    other = rng.normal(0, 1, (4, 32))
    for i, tok in enumerate(flipped):
        other[i, tok] = other[i].max() + 1.0
    wrong = Greedy(flipped, other)
    got = gate(wrong, [("all-in-VRAM", ref)], allow_near_ties=True)
    assert got.startswith("MISMATCH@2 (Δlogit") and "above rounding" in got
    # ... unless stock at the same budget deviates as much from all-in-VRAM: calibrate against it
    stock = Greedy(ref_tokens, other + rng.normal(0, 0.5, other.shape))
    got = gate(wrong, [("all-in-VRAM", ref)], peers=[("stock ngl=5", stock)])
    assert "within 1.5x stock ngl=5's own" in got
    calm = Greedy(ref_tokens, logits + 1e-6)
    assert "above rounding" in gate(wrong, [("all-in-VRAM", ref)], peers=[("stock ngl=5", calm)])
    # any stock split of the run calibrates: the most deviating one decides
    got = gate(wrong, [("all-in-VRAM", ref)], peers=[("stock ngl=5", calm), ("stock ngl=9", stock)])
    assert "within 1.5x stock ngl=9's own" in got


def test_gate_judges_every_position_before_the_flip():
    """A peer calibrates with its deviation up to its own flip; the
    candidate is judged over all its positions up to its flip, so unrelated
    logits after the peer's flip still fail, and a peer that rounds like the
    candidate passes it wherever it flips."""
    import numpy as np

    rng = np.random.default_rng(1)
    tokens = (1, 2, 3, 4, 5, 6)
    logits = rng.normal(0, 1, (6, 4096))
    ref = Greedy(tokens, logits)
    bad = logits.copy()
    bad[4] = rng.normal(0, 1, 4096)  # unrelated logits at position 4
    early = Greedy((1, 7, 3, 4, 5, 6), logits + rng.normal(0, 0.2, logits.shape))  # flips at 1
    got = gate(Greedy((1, 2, 3, 4, 9, 6), bad), [("all-in-VRAM", ref)], peers=[("stock ngl=3", early)])
    assert got.startswith("MISMATCH@4") and "above 1.5x stock ngl=3's own" in got
    rounded = Greedy((1, 2, 3, 4, 9, 6), logits + rng.normal(0, 0.2, logits.shape))
    got = gate(rounded, [("all-in-VRAM", ref)], peers=[("stock ngl=3", early)])
    assert "within 1.5x stock ngl=3's own" in got


# ------------------------------------------- without the all-in-VRAM run (--no-ceiling)

def split_runs(seed=2):
    """Fabricated greedy runs of one model, shaped like the GPU box's: all-in-VRAM
    (truth); stock -ngl splits, which all compute layer 0 (and the layers
    after it up to their split) on the CPU, so they share one rounding that
    grew through every later layer (shared) and differ from each other only
    a little; each split's mirror (the same layers in host memory, but the
    last ones), which computes layer 0 on the GPU as streamed does and so
    differs from the split about as much as truth does; a correct streamed
    run (every layer on the GPU: the truth) and a wrong-layer one (unrelated
    logits). Position 2 is a near tie that stock ngl=30's rounding flips.
    Returns truth, stock ngl=30, {ngl: split}, streamed, wrong, {ngl: mirror}."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n_pos, n_vocab = 8, 4096
    truth = rng.normal(0, 1, (n_pos, n_vocab))
    chosen = rng.integers(0, n_vocab, n_pos)
    for i, tok in enumerate(chosen):
        truth[i, tok] = truth[i].max() + 1.0
    runner_up = (chosen[2] + 1) % n_vocab
    truth[2, runner_up] = truth[2, chosen[2]] - 1e-3  # the near tie
    shared = rng.normal(0, 0.10, truth.shape)  # layer 0 on the CPU, grown through the layers after it

    def run(logits):
        return Greedy(tuple(int(t) for t in logits.argmax(axis=-1)), logits)

    def placed(noise, sd, flip=False):
        logits = truth + noise + rng.normal(0, sd, truth.shape)
        a, b = (runner_up, chosen[2]) if flip else (chosen[2], runner_up)  # a wins the tie
        logits[2, a] = logits[2, b] + 1e-3
        return run(logits)

    s30 = placed(shared, 0.02, flip=True)  # the budget's stock split: its rounding flips the tie
    s45, s0 = placed(shared, 0.02), placed(shared, 0.03)  # the sweep's other stock splits
    mirrors = {30: placed(0.0, 0.03), 45: placed(0.0, 0.03)}  # late layers on the CPU: close to the truth
    wrong = rng.normal(0, 1, truth.shape)
    for i, tok in enumerate(chosen):
        wrong[i, tok if i != 1 else (tok + 7) % n_vocab] = wrong[i].max() + 1.0  # a different token at 1
    return run(truth), s30, {0: s0, 30: s30, 45: s45}, run(truth.copy()), run(wrong), mirrors


def test_gate_without_ceiling_judges_against_the_stock_splits():
    """The --no-ceiling failure of the GPU box: streamed (exact, = all-in-VRAM)
    flips against stock ngl=30, whose own CPU layers flip a near tie. The
    other -ngl splits share stock ngl=30's layer-0 rounding, so their
    deviation from it says nothing about streamed's: judged by them alone the
    honest run is a MISMATCH. Stock ngl=30's mirror differs from it from
    layer 0 on, as streamed does: calibrated by it, the flip passes as a
    near tie vs stock, flag or not."""
    from gguf_stream.bench.sweep import GateRun, gate_runs

    truth, s30, splits, streamed, _, mirrors = split_runs()
    assert streamed.tokens != s30.tokens
    old, = gate_runs([GateRun(30, s30, streamed)], None, splits)
    assert old.startswith("MISMATCH@2 (Δlogit") and "above 1.5x stock ngl=0's deviation from it" in old, old
    for allow in (False, True):
        check, = gate_runs([GateRun(30, s30, streamed, mirror=mirrors[30], mirror_name="mirror of stock ngl=30")],
                           None, splits, allow)
        assert check.startswith("ok (near tie vs stock ngl=30 @2, Δlogit 0.10"), check
        assert "within 1.5x mirror of stock ngl=30's deviation from it" in check  # the mirror decides
        assert not BenchResult((row(check=check),)).mismatch
    # with the ceiling the same streamed run is simply exact
    assert gate_runs([GateRun(30, s30, streamed)], truth, splits) == ["ok"]
    # a lone stock split calibrates nothing: only NEAR_TIE, and the flip is loud
    check, = gate_runs([GateRun(30, s30, streamed)], None, {30: s30})
    assert check.startswith("MISMATCH@2 (Δlogit") and check.endswith("above rounding 0.005σ)")


def test_gate_without_ceiling_still_fails_a_wrong_layer():
    """Unrelated logits (a wrong or stale layer) sit ~1.4 std from any
    rounding of the model: above the mirror's and the splits' deviation,
    with or without the ceiling, with or without --allow-near-ties."""
    from gguf_stream.bench.sweep import GateRun, gate_runs

    truth, s30, splits, _, wrong, mirrors = split_runs()
    for ceiling in (None, truth):
        for allow in (False, True):
            run = GateRun(30, s30, wrong, mirror=mirrors[30], mirror_name="mirror of stock ngl=30")
            check, = gate_runs([run], ceiling, splits, allow)
            assert check.startswith("MISMATCH@") and "above 1.5x " in check, check
            assert float(check.split("Δlogit ")[1].split("σ")[0]) > 1.0
            assert BenchResult((row(check=check),)).mismatch


def test_gate_exact_reference_keeps_the_flag():
    """With an exact reference (all-in-VRAM) a flip within bounds still needs
    --allow-near-ties; the peers' deviation is measured from that reference."""
    truth, s30, splits, _, _, mirrors = split_runs()
    flipped = Greedy(s30.tokens, truth.logits + (s30.logits - truth.logits) * 0.5)  # half stock's rounding, same flip
    got = gate(flipped, [("all-in-VRAM", truth)], peers=[("stock ngl=30", s30)])
    assert got.startswith("MISMATCH@2") and "within 1.5x stock ngl=30's own" in got
    assert gate(flipped, [("all-in-VRAM", truth)], True, [("stock ngl=30", s30)]) == "ok (near tie @2)"
    # not exact: the same comparison is a near tie vs the reference, flag or not
    got = gate(flipped, [("stock ngl=45", splits[45])], peers=[("mirror of stock ngl=45", mirrors[45])], exact=False)
    assert got.startswith("ok (near tie vs stock ngl=45 @")
