"""The performance model's bounds for each streamed row (perfmodel.py,
shared with the planner), next to what the row reached."""
from __future__ import annotations

from ..memory import format_size
from ..perfmodel import pp_bound_tps, tg_bound_seconds
from .rows import Row, mean_sd


def weights_per_token(mf) -> int:
    """Bytes a single-token decode reads: every layer, plus the output matrix
    (token_embd when tied); the input embedding is one row, ignored."""
    out = mf.tensor("output.weight") or mf.tensor("token_embd.weight")
    return sum(mf.layer_bytes) + (out.nbytes if out else 0)


def bound_notes(rows: list[Row], w, ceiling, bandwidth: float, cpu_rate: float) -> list[str]:
    """One line per streamed row: its bound, and how much of it the row
    reached. w: the Workload; ceiling: the all-in-VRAM run's Timing."""
    out = []
    G = 1 / mean_sd(ceiling.tg)[0] if ceiling.tg else None
    pp_ceiling = mean_sd(ceiling.pp)[0] if ceiling.pp else None
    for r in rows:
        if r.mode != "streamed" or r.tps_mean is None or r.streamed_bytes is None:
            continue
        if r.ngl is not None:  # below streaming's minimum: stock's own split is the bound
            if r.ratio:
                out.append(f"bound {r.budget} {r.test}: the stock split (nothing can stream at this budget); "
                           f"reached {r.ratio:.2f}x {r.ratio_vs or 'stock'}")
            continue
        O = r.streamed_bytes
        if r.test.startswith("pp") and pp_ceiling:
            bound = pp_bound_tps(w.n_prompt, w.n_ubatch, pp_ceiling, O, bandwidth)
        elif r.test.startswith("tg") and G:
            # every byte not resident while generating crosses once per token
            O = r.generate_overflow_bytes if r.generate_overflow_bytes is not None else O
            bound = 1 / tg_bound_seconds(G, 1 / cpu_rate, 1 / bandwidth, O)
        else:
            continue
        line = (f"bound {r.budget} {r.test}: {bound:.2f} t/s with {format_size(O)} "
                f"{'not resident while generating' if r.test.startswith('tg') else 'streamed'}; "
                f"reached {r.tps_mean:.2f} ({100 * r.tps_mean / bound:.0f}%)")
        if r.test.startswith("tg") and O != r.streamed_bytes:
            # the same bound with the prompt's overflow (what the budget leaves out of VRAM)
            whole = 1 / tg_bound_seconds(G, 1 / cpu_rate, 1 / bandwidth, r.streamed_bytes)
            line += (f"; with all {format_size(r.streamed_bytes)} streamed for prompts crossing "
                     f"{whole:.2f} t/s ({100 * r.tps_mean / whole:.0f}%)")
        if r.test.startswith("tg") and r.cpu_rate_streaming:
            # the CPU and the copy engine read the same host memory: the CPU
            # rate the engine measured while uploads run beside it
            shared = 1 / tg_bound_seconds(G, 1 / r.cpu_rate_streaming, 1 / bandwidth, O)
            line += (f"; with the CPU rate measured while streaming ({r.cpu_rate_streaming / 1e9:.1f} GB/s) "
                     f"{shared:.2f} t/s ({100 * r.tps_mean / shared:.0f}%)")
        out.append(line)
    return out
