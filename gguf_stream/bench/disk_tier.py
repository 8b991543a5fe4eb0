"""The bench's host-budget axis (--host-budget): for each VRAM budget, one
more streamed run per host budget, with the streamed parts beyond it on the
disk tier (read from the GGUF file at every use), gated against the same
budget's streamed run without one, and the disk's bytes and read rate in
its rows."""
from __future__ import annotations

from ..errors import GGUFStreamError
from .gate import gate


def disk_fields(plan, ctr) -> dict:
    """Row fields of the disk tier from a plan and one test's averaged
    counters (timing._counter_tuple's order); empty without a disk tier."""
    if plan is None or not getattr(plan, "disk_layers", ()):
        return {}
    out = {"n_disk": len(plan.disk_layers)}
    if ctr and len(ctr) >= 6:
        nbytes, seconds, waited = ctr[3], ctr[4], ctr[5]
        out["disk_bytes"] = nbytes
        out["disk_rate"] = nbytes / seconds if seconds else None
        out["disk_overlap"] = max(0.0, 1.0 - waited / seconds) if seconds else None
    return out


def host_budget_rows(ctx, budget, streamed, refs, notes: list[str], **streamed_kw) -> list:
    """One streamed run per ctx.host_budgets at this VRAM budget (streamed_kw:
    its placement), each gated against `streamed` (the same placement
    without a host budget; its Timing, or None when that run failed)."""
    rows = []
    for host in ctx.host_budgets:
        try:
            t = ctx.run_streamed(host_budget=host, **streamed_kw)
        except GGUFStreamError as exc:
            notes.append(f"budget {budget.label}, host budget {host}: streamed run failed: {exc}")
            rows += ctx.rows(None, budget=budget, mode="streamed", note=f"error: {type(exc).__name__}",
                             host_budget=host)
            continue
        reference = [("streamed without a disk tier", streamed.greedy)] if streamed is not None else []
        check = gate(t.greedy, reference, ctx.allow_near_ties) if reference else ""
        rows += ctx.rows(t, budget=budget, mode="streamed", check=check, refs=refs, host_budget=host)
        if t.plan is not None and getattr(t.plan, "disk_layers", ()):
            notes.append(f"budget {budget.label}, host budget {host}: {t.plan.tiers_line()}")
    return rows
