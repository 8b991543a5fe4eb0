"""The correctness gate: streamed greedy tokens must equal stock's before
any speed is reported; a token flip passes only as rounding (its logits
within what stock's own CPU layers deviate). With an all-in-VRAM run that
is the reference; without one, a stock -ngl split is, and the other stock
splits of the run calibrate how far legitimate roundings differ from it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

GATE_PROMPT = "The capital of France is"
NEAR_TIE = 0.005  # rms logit deviation (fraction of the logits' std) that is rounding by any account
PEER_MARGIN = 1.5  # a stock split's own deviation, times this, still passes (see gate)


@dataclass(frozen=True)
class Gate:
    """Result of comparing greedy tokens of a reference and a candidate run."""

    ok: bool
    n_compared: int
    first_mismatch: int | None  # index of the first differing token

    def describe(self) -> str:
        return "ok" if self.ok else f"MISMATCH@{self.first_mismatch}"


def check_tokens(reference: Sequence[int], candidate: Sequence[int]) -> Gate:
    """Greedy tokens must be identical, length included: streaming moves
    weights, it must not change a single result."""
    n = min(len(reference), len(candidate))
    first = next((i for i in range(n) if reference[i] != candidate[i]), None)
    if first is None and len(reference) != len(candidate):
        first = n
    return Gate(first is None, max(len(reference), len(candidate)), first)


@dataclass(frozen=True, eq=False)
class Greedy:
    """A run's gate output: greedy tokens and the logits that chose them."""

    tokens: tuple[int, ...]
    logits: object = None  # numpy (n_tokens, n_vocab) or None


def logit_noise(ref: Greedy, other: Greedy, upto: int) -> float | None:
    """Largest root-mean-square logit difference at one of positions
    0..upto, relative to the spread (std) of the reference's logits. Up to
    the first differing token both runs saw the same context, so this
    measures numerical deviation only. RMS over the vocabulary rather than
    the largest single difference: it is stable (the largest of 128k
    differences grows with how many positions are looked at), and it
    separates the cases cleanly: a CPU-computed layer's rounding, which on
    random-weight models grows through the layers, stays a small fraction
    of the std, while unrelated logits (a wrong layer) differ by ~1.4 std."""
    if ref.logits is None or other.logits is None or upto >= min(len(ref.logits), len(other.logits)):
        return None
    import numpy as np

    a, b = np.asarray(ref.logits[:upto + 1]), np.asarray(other.logits[:upto + 1])
    per_position = np.sqrt(np.mean((a - b) ** 2, axis=-1))
    return float(per_position.max() / (np.std(a) or 1.0))


def deviation_to_flip(ref: Greedy, other: Greedy) -> tuple[int | None, float | None]:
    """Where other's greedy tokens first differ from ref's (None: nowhere
    over their common length) and its logit_noise up to there."""
    n = min(len(ref.tokens), len(other.tokens))
    flip = check_tokens(ref.tokens[:n], other.tokens[:n]).first_mismatch
    return flip, logit_noise(ref, other, n - 1 if flip is None else flip)


def gate(candidate: Greedy | None, references: Sequence[tuple[str, Greedy | None]],
         allow_near_ties: bool = False, peers: Sequence[tuple[str, Greedy | None]] = (),
         exact: bool = True) -> str:
    """The check column: '' with nothing to compare, 'ok' when candidate's
    tokens equal the first reference's, 'ok (=NAME)' when they equal a later
    one's, else 'MISMATCH@i' against the first, with the logit deviation.

    Several references because stock llama.cpp itself is not one answer: a
    partial -ngl computes its CPU layers with other kernels, and greedy
    tokens then flip on near ties. The candidate's deviation up to its
    first differing token is judged against NEAR_TIE, or, when larger,
    against PEER_MARGIN times the largest deviation a peer (a stock -ngl
    split of the same run) shows from the same reference up to its own
    first differing token: each is one legitimate rounding of the model, and
    CPU layers placed elsewhere round about as much (the margin absorbs that
    spread), while a streaming bug (a stale or wrong slot) gives unrelated
    logits.

    exact: the first reference present computes what the candidate should
    reproduce (all-in-VRAM; host mode's stock): a flip within bounds is still
    'MISMATCH@i (... within ...)', and 'ok (near tie @i)' with
    allow_near_ties. Not exact (no all-in-VRAM run: the reference is a stock
    -ngl split, itself one rounding of the model): the question is no longer
    whether the candidate is exact but whether it differs from that stock run
    more than stock splits differ from each other, so a flip within bounds
    passes as 'ok (near tie vs NAME @i, ...)' with its deviation, flag or
    not, and one above them is a MISMATCH as always."""
    refs = [(name, r) for name, r in references if r is not None and r.tokens is not None]
    if candidate is None or candidate.tokens is None or not refs:
        return ""
    for k, (name, r) in enumerate(refs):
        if check_tokens(r.tokens, candidate.tokens).ok:
            return "ok" if k == 0 else f"ok (={name})"
    name, r = refs[0]
    g = check_tokens(r.tokens, candidate.tokens)
    noise = logit_noise(r, candidate, g.first_mismatch)
    if noise is None:
        return g.describe()
    bound, what = NEAR_TIE, "rounding"
    for peer_name, peer_run in peers:
        if peer_run is None or peer_run.tokens is None or peer_run is r:
            continue
        _, own = deviation_to_flip(r, peer_run)
        if own is not None and PEER_MARGIN * own > bound:
            bound = PEER_MARGIN * own
            what = f"{PEER_MARGIN:g}x {peer_name}'s " + ("own" if exact else "deviation from it")
    if noise <= bound and not exact:
        return (f"ok (near tie vs {name} @{g.first_mismatch}, Δlogit {noise:.3f}σ rms within {what} "
                f"{bound:.3f}σ)")
    if noise <= bound and allow_near_ties:
        return f"ok (near tie @{g.first_mismatch})"
    verdict = "within" if noise <= bound else "above"
    return f"{g.describe()} (Δlogit {noise:.3f}σ rms vs {name}, {verdict} {what} {bound:.3f}σ)"
