"""The bench's --moe-split and --prompt-cpu-experts axes: for each VRAM
budget, one more streamed run per N, whose CPU expert layers upload N of
each token's routed experts while the CPU computes the others
(EngineConfig.moe_split), or whose split layers' last N experts the CPU
computes in prompts (EngineConfig.prompt_cpu_experts), beside the default's
rows."""
from __future__ import annotations

from ..errors import GGUFStreamError
from ..memory import format_size
from .gate import check_tokens


def _splits_nothing(plan) -> str:
    """Why no --moe-split N can change the default run's placement (its
    plan: None when unknown), or ''."""
    if plan is None:
        return ""
    if plan.stock_gpu_layers is not None:
        return "the budget is below streaming's minimum (llama.cpp's own split runs)"
    if plan.part != "experts":
        return "its plan places whole layers (the split applies to layers whose experts stream)"
    return ""


def _variants(ctx) -> list[tuple[str, str, dict]]:
    """(row mode, the flag's words, the EngineConfig change) of each extra
    streamed run: --moe-split N and --prompt-cpu-experts N."""
    return ([(f"split {n}", f"moe-split {n}", {"moe_split": n}) for n in ctx.moe_splits]
            + [(f"prompt-cpu {n}", f"prompt-cpu-experts {n}", {"prompt_cpu_experts": n})
               for n in getattr(ctx, "prompt_cpu_experts", ())])


def moe_split_rows(ctx, b, refs: dict, notes: list[str], stock, default=None) -> list:
    """A streamed run per ctx.moe_splits N (mode 'split N') and per
    ctx.prompt_cpu_experts N (mode 'prompt-cpu N') at budget b; its greedy
    tokens compared with those of `stock` (the faster stock recipe's Timing,
    or None) in a note. None where the budget's default run (`default`, its
    Timing) shows that no N could place anything differently: each would
    load the same model again."""
    why, variants = _splits_nothing(getattr(default, "plan", None)), _variants(ctx)
    if why and variants:
        notes.append(f"budget {b.label}: --moe-split / --prompt-cpu-experts not run: {why}")
        return []
    rows = []
    for mode, flag, change in variants:
        try:
            t = ctx.run_streamed(vram_budget=b.nbytes, **change)
        except GGUFStreamError as exc:
            notes.append(f"budget {b.label}: {flag} run failed: {exc}")
            continue
        rows += ctx.rows(t, budget=b, mode=mode, refs=refs)
        if t.engine_note:
            notes.append(f"budget {b.label}: {flag}: {t.engine_note}")
        mine, theirs = t.greedy, None if stock is None else stock.greedy
        if mine is not None and theirs is not None:
            g = check_tokens(theirs.tokens, mine.tokens)
            notes.append(f"budget {b.label}: {flag}: greedy tokens " + (
                f"equal the faster stock recipe's ({g.n_compared})" if g.ok
                else f"first differ from the faster stock recipe's at {g.first_mismatch}"))
        if t.vram_peak is not None and t.vram_peak > b.nbytes:
            notes.append(f"budget {b.label}: {flag} peak {format_size(t.vram_peak)} exceeds the budget")
    return rows
