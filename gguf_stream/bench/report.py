"""The result as a markdown table (llama-bench's columns plus ours), CSV,
JSON (rows, notes and the run's metadata) or JSONL (one row per line, as
llama-bench's -o jsonl)."""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, fields

from ..memory import format_size
from .rows import BenchResult, Row


def _num(v: float | None, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.{digits}f}"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _size(n: int | None) -> str:
    return "" if n is None else format_size(n)


MD_COLUMNS = ["model", "size", "params", "backend", "budget", "mode", "ngl", "streamed", "n_ubatch", "test",
              "t/s", "ratio", "peak VRAM", "pinned host", "waits/fallbacks/uploads", "disk read", "check"]


def _disk(r: Row) -> str:
    """The disk tier's reads per repetition: bytes, their rate, the share hidden behind compute."""
    if r.disk_bytes is None:
        return ""
    rate = "" if r.disk_rate is None else f" at {r.disk_rate / 1e9:.2f} GB/s"
    hidden = "" if r.disk_overlap is None else f", {r.disk_overlap:.0%} hidden"
    return f"{format_size(int(r.disk_bytes))}{rate}{hidden}"


def _md_cells(r: Row) -> list[str]:
    tps = "" if r.tps_mean is None else f"{r.tps_mean:.2f} ± {r.tps_sd:.2f}"
    streamed = "" if r.n_streamed is None else f"{r.n_streamed} ×{r.n_slots}"
    if r.mode == "streamed" and r.ngl is not None:
        streamed = "stock split"  # the planner's choice below streaming's minimum
    if r.n_cpu_generate and r.test.startswith("tg"):
        streamed += f", {r.n_cpu_generate} on CPU"
    if r.n_resident_generate and r.test.startswith("tg"):
        streamed += f", {r.n_resident_generate} resident"
    counters = "" if r.waits is None else f"{_num(r.waits)}/{_num(r.sync_fallbacks)}/{_num(r.uploads)}"
    if r.n_disk:
        streamed += f", {r.n_disk} on disk"
    budget = f"{r.budget}, host {r.host_budget}" if r.host_budget else r.budget
    check = r.check if r.check in ("", "ok") else f"**{r.check}**"
    ngl = "" if r.ngl is None else str(r.ngl) + ("" if r.n_cpu_moe is None else f", n-cpu-moe {r.n_cpu_moe}")
    # with two stock recipes (MoE) a ratio says which it is to
    ratio = "" if r.ratio is None else f"{r.ratio:.2f}" + (f" vs {r.ratio_vs}" if r.ratio_vs else "")
    return [r.model, _size(r.size_bytes), _params(r.params), r.backend, budget, r.mode, ngl, streamed,
            str(r.n_ubatch), r.test, tps or r.note, ratio, _size(r.vram_peak_bytes), _size(r.pinned_host_bytes),
            counters, _disk(r), check]


def render_md(result: BenchResult) -> str:
    right = {"size", "params", "ngl", "streamed", "n_ubatch", "t/s", "ratio", "peak VRAM", "pinned host",
             "waits/fallbacks/uploads", "disk read"}
    lines = ["| " + " | ".join(MD_COLUMNS) + " |",
             "| " + " | ".join("---:" if c in right else ":---" for c in MD_COLUMNS) + " |"]
    lines += ["| " + " | ".join(_md_cells(r)) + " |" for r in result.rows]
    if result.mismatch:
        lines += ["", "**MISMATCH: streamed greedy tokens differ from stock; speeds above are not comparable.**"]
    lines += [""] + [f"- {n}" for n in result.notes]
    return "\n".join(lines) + "\n"


def render_csv(result: BenchResult) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[f.name for f in fields(Row)], lineterminator="\n")
    w.writeheader()
    for r in result.rows:
        w.writerow({k: "" if v is None else v for k, v in asdict(r).items()})
    return buf.getvalue()


def render_json(result: BenchResult) -> str:
    return json.dumps({"meta": result.meta, "rows": [asdict(r) for r in result.rows],
                       "notes": list(result.notes), "mismatch": result.mismatch}, indent=2) + "\n"


def render_jsonl(result: BenchResult) -> str:
    return "".join(json.dumps(asdict(r)) + "\n" for r in result.rows)


RENDERERS = {"md": render_md, "csv": render_csv, "json": render_json, "jsonl": render_jsonl}
