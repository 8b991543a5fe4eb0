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
