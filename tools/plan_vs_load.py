"""Does `gguf-stream plan` show what a CUDA load does? (issue 19: both call
placement.run_tiers). Run on the GPU box, e.g.

    python3 tools/plan_vs_load.py --model /tmp/m/llama3-8b.gguf --vram-budget 3GiB --host-budget 1.5GiB,4GiB,none

For each host budget (default generate split: auto, measured on CUDA) it loads
the model twice. Before each load it computes the tiers as `plan` does (with
the calibration cache as the load will find it) and compares them with what
the load made: the disk-tier layers and the bytes of each tier (attach's tally
of the loaded tensors, and the engine's disk-tier size). The first load may
calibrate: its CPU layers must then be among the plan's choices (pinned
overflow layers) and at most its `most`; the second finds that split cached
and its CPU layers must equal the plan's. The cache goes to a fresh directory
($GGUF_STREAM_CACHE), so the first load always calibrates. Prints one line per
load; exit 1 on a mismatch.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

from gguf_stream import read_model
from gguf_stream.cli.plan import cached_calibration
from gguf_stream.config import EngineConfig
from gguf_stream.model import StreamedModel
from gguf_stream.placement import initial_plan, run_tiers


def planned(path: str, options: dict):
    mf = read_model(path)
    config = EngineConfig(**options)
    return run_tiers(mf, initial_plan(mf, config, cuda=False), config, True, cached_calibration(path, config)[0])


def compare(path: str, options: dict) -> list[str]:
    tiers = planned(path, options)
    p = tiers.plan
    with StreamedModel(path, **options) as m:
        got = m.streamer.tier_bytes
        problems = [f"{what}: plan {a} != load {b}" for what, a, b in (
            ("disk layers", p.disk_layers, m.plan.disk_layers), ("GPU-resident bytes", p.resident_bytes, got["resident"]),
            ("pinned host bytes", p.pinned_bytes, got["host"]), ("disk bytes", p.disk_bytes, got["disk"]),
            ("engine's disk-tier bytes", p.disk_bytes, m.stats.counters.disk_tier_bytes)) if a != b]
        cpu = m.plan.cpu_layers
        if tiers.cached and cpu != p.cpu_layers:
            problems.append(f"CPU layers: plan (cached split) {p.cpu_layers} != load {cpu}")
        if not tiers.cached and not (set(cpu) <= set(tiers.choices) and len(cpu) <= tiers.most):
            problems.append(f"CPU layers {cpu} not among the plan's choices {tiers.choices} (at most {tiers.most})")
        if p.host_budget is not None and m.plan.host_bytes > p.host_budget:
            problems.append(f"host bytes {m.plan.host_bytes} over the budget {p.host_budget}")
    print(f"host budget {options.get('host_budget')}: {p.tiers_line()}; split: {tiers.split}; load's CPU layers "
          f"{cpu}: {'ok' if not problems else '; '.join(problems)}", flush=True)
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--vram-budget", default="3GiB")
    ap.add_argument("--host-budget", default="1.5GiB,none", help="comma-separated; 'none': no budget")
    ap.add_argument("-c", "--ctx-size", type=int, default=4096)
    a = ap.parse_args()
    os.environ["GGUF_STREAM_CACHE"] = tempfile.mkdtemp(prefix="plan-vs-load-")
    failed = False
    for host in a.host_budget.split(","):
        options = dict(vram_budget=a.vram_budget, host_budget=host, n_ctx=a.ctx_size, device="cuda")
        for _ in range(2):  # the first load calibrates, the second reads the cache
            failed |= bool(compare(a.model, options))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
