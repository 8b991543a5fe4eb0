"""The bench's --moe-split axis: for each VRAM budget, one more streamed run
per N, whose CPU expert layers upload N of each token's routed experts while
the CPU computes the others (EngineConfig.moe_split), beside the default's
rows."""
from __future__ import annotations

from ..errors import GGUFStreamError
from ..memory import format_size
from .gate import check_tokens


def moe_split_rows(ctx, b, refs: dict, notes: list[str], stock) -> list:
    """A streamed run per ctx.moe_splits N at budget b (mode 'split N'); its
    greedy tokens compared with those of `stock` (the faster stock recipe's
    Timing, or None) in a note."""
    rows = []
    for n in ctx.moe_splits:
        try:
            t = ctx.run_streamed(vram_budget=b.nbytes, moe_split=n)
        except GGUFStreamError as exc:
            notes.append(f"budget {b.label}: moe-split {n} run failed: {exc}")
            continue
        rows += ctx.rows(t, budget=b, mode=f"split {n}", refs=refs)
        if t.engine_note:
            notes.append(f"budget {b.label}: moe-split {n}: {t.engine_note}")
        mine, theirs = t.greedy, None if stock is None else stock.greedy
        if mine is not None and theirs is not None:
            g = check_tokens(theirs.tokens, mine.tokens)
            notes.append(f"budget {b.label}: moe-split {n}: greedy tokens " + (
                f"equal the faster stock recipe's ({g.n_compared})" if g.ok
                else f"first differ from the faster stock recipe's at {g.first_mismatch}"))
        if t.vram_peak is not None and t.vram_peak > b.nbytes:
            notes.append(f"budget {b.label}: moe-split {n} peak {format_size(t.vram_peak)} exceeds the budget")
    return rows
