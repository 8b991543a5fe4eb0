"""The disk tier: streamed parts that hold no host memory, read from the GGUF
file itself at every use (see ARCHITECTURE.md, "The disk tier").

Pure planning (which streamed parts go to disk under a host-memory budget),
the file's identity that the native engine checks at every read, and the
load's arming (the native helper, imported there only: planning needs none).
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import replace

from .errors import HostMemoryError
from .memory import format_size, parse_size
from .perfmodel import tg_bound_seconds
from .planner import Plan, interleaved_layers

# The disk tier's early trigger (gs_engine_config.disk_lookahead): with each
# upload issued, the kernel starts reading the disk-tier layer this many
# streamed layers further on (a disk read needs more lead time than an upload).
DISK_LOOKAHEAD = 2

# The staged reader (gs_copy_stage.c: preads into staging buffers by a pool
# of reader threads, then the uploads in order): always on CUDA, where the
# buffers are pinned; in host-slot mode only when this variable asks for it
# ("on", or a chunk size such as "64KiB"), so that CI runs the CUDA path's
# reader and staging code. Its value also sets the chunk on CUDA. See
# staging_options.
STAGING_ENV = "GGUF_STREAM_DISK_STAGING"
STAGING_CHUNK = 64 << 20  # gguf_stream.h GS_STAGING_DEFAULT
# Reads in flight at once (the reader threads): an NVMe drive reaches its
# bandwidth only with several requests queued; one pread at a time read 1.31
# GB/s where the drive gives 1.79 to a streaming reader (BENCHMARKS.md).
READERS_ENV = "GGUF_STREAM_DISK_READERS"
DISK_READERS = 4          # GS_DISK_READERS
DISK_READERS_MAX = 64     # GS_DISK_READERS_MAX
STAGING_SPARE = 2         # GS_STAGING_SPARE: staging buffers = readers + this
PAGE = 4096

# The default host budget (no --host-budget): what the machine can spare,
# MemAvailable less a margin for everything else on it (the OS, other
# programs, this process's own Python and llama.cpp's buffers not estimated)
HOST_MARGIN_MIN = 1 << 30
HOST_MARGIN_FRACTION = 0.10


def host_margin(available: int) -> int:
    """The margin the default host budget leaves: max(1 GiB, 10% of MemAvailable)."""
    return max(HOST_MARGIN_MIN, int(available * HOST_MARGIN_FRACTION))


def spare_host_memory(available: int) -> int:
    """The default host budget for MemAvailable `available` (at least 0)."""
    return max(available - host_margin(available), 0)


def staging_options(cuda: bool, environ=os.environ) -> dict:
    """native.Engine's staging_bytes (chunk), host_staging and disk_readers,
    from STAGING_ENV: unset/"off" stages on CUDA only, with 64 MiB chunks;
    "on" also in host mode; a size stages everywhere in chunks of that size;
    and READERS_ENV: the reader threads (default DISK_READERS)."""
    value = environ.get(STAGING_ENV, "").strip().lower()
    options = {"staging_bytes": STAGING_CHUNK, "host_staging": value not in ("", "off", "0"),
               "disk_readers": disk_readers(environ)}
    if value in ("", "off", "0", "on"):
        return options
    try:
        chunk = parse_size(value)
    except ValueError as exc:
        raise ValueError(f"{STAGING_ENV}={value!r}: give on, off or a chunk size such as 64MiB ({exc})") from None
    if chunk <= 0:
        raise ValueError(f"{STAGING_ENV}={value!r}: the chunk size must be above 0")
    return dict(options, staging_bytes=chunk)


def disk_readers(environ=os.environ) -> int:
    """READERS_ENV as a reader count, DISK_READERS when unset."""
    value = environ.get(READERS_ENV, "").strip()
    if not value:
        return DISK_READERS
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= DISK_READERS_MAX:
        raise ValueError(f"{READERS_ENV}={value!r}: give the disk tier's reader threads as a whole number "
                         f"from 1 to {DISK_READERS_MAX} (default {DISK_READERS})")
    return n


def staging_buffers(options: dict) -> int:
    """The staged engine's staging buffers: one a reader, and STAGING_SPARE
    for chunks read and waiting for their turn or being uploaded."""
    return options["disk_readers"] + STAGING_SPARE


def reader_options(cuda: bool, disk_direct: bool) -> dict:
    """The disk tier's reader as a run on this device has it: staging_options and O_DIRECT."""
    return dict(staging_options(cuda), disk_direct=disk_direct)


def staging_bytes(model_file, options: dict, cuda: bool) -> int:
    """Host memory the staging buffers take when a disk tier exists (pinned
    on CUDA): staging_buffers chunks, a chunk capped at the largest layer
    tensor (page-rounded) as the engine caps it at the largest disk-tier one."""
    if not (cuda or options["host_staging"] or options.get("disk_direct")):
        return 0
    biggest = max((t.nbytes for t in model_file.tensors if t.layer is not None), default=0)
    return staging_buffers(options) * min(options["staging_bytes"], -(-biggest // PAGE) * PAGE)


def disk_candidates(plan: Plan) -> tuple[int, ...]:
    """Streamed parts that may live on disk: not the CPU layers, which the CPU
    computes from host memory while generating, nor the layers whose experts
    the split computes partly there (--moe-split)."""
    split = set(plan.split_layers)
    return tuple(s.layer for s in plan.layers
                 if s.placement == "streamed" and s.generate != "cpu" and s.layer not in split)


def with_disk_layers(plan: Plan, layers, host_budget: int | None = None) -> Plan:
    """The plan with these streamed parts on the disk tier (the others stay in host memory)."""
    disk = set(layers)
    if not disk <= set(disk_candidates(plan)):
        raise ValueError(f"layers {sorted(disk - set(disk_candidates(plan)))} cannot be on the disk tier "
                         "(only streamed parts that are not CPU or split layers)")
    spans = tuple(replace(s, disk=s.layer in disk) for s in plan.layers)
    return replace(plan, layers=spans, host_budget=host_budget)


def assign_disk_tier(plan: Plan, host_budget: int, staging: int = 0, budget_source: str = "",
                     remedy: str = "raise the host budget") -> Plan:
    """Fewest streamed parts on the disk tier so that the plan's host memory
    (Plan.host_bytes) fits host_budget, spread evenly through the candidates
    (so pinned uploads lie between disk reads). A disk tier also takes
    `staging` bytes (its staging buffers). Refuses a budget that even every
    candidate on disk cannot meet (`budget_source` says where the budget
    came from in that error, `remedy` what to change first)."""
    if host_budget < 0:
        raise ValueError(f"host budget {host_budget} < 0")
    if plan.host_bytes <= host_budget:
        return with_disk_layers(plan, (), host_budget)
    excess = plan.host_bytes + staging - host_budget
    candidates = disk_candidates(plan)
    sizes = {s.layer: s.bytes for s in plan.layers}
    for n in range(1, len(candidates) + 1):
        chosen = [candidates[j] for j in interleaved_layers(len(candidates), n)]
        if sum(sizes[i] for i in chosen) >= excess:
            return with_disk_layers(plan, chosen, host_budget)
    rest = plan.host_bytes + staging - sum(sizes[i] for i in candidates)
    raise HostMemoryError(
        f"host budget {format_size(host_budget)}{budget_source} is below the {format_size(rest)} of host memory "
        "this run needs with every streamed part on the disk tier (the input embedding, CPU layers' copies and KV "
        "caches" + (f", {format_size(staging)} of staging buffers" if staging else "") + "); "
        f"{remedy}, or use a larger vram_budget or fewer CPU layers")


def tier_bounds(plan: Plan, n_ubatch: int, rates=None, disk_rate: float | None = None) -> str:
    """The speeds the tiers allow, from measured rates where known
    (perfmodel.Rates: PCIe, CPU, G; the disk's read rate): a prompt's ubatch
    moves every streamed part over PCIe and reads the disk tier once; a
    generated token reads the disk tier once (it streams in both phases)."""
    def rate(nbytes, per_s, name):
        return f"{nbytes / per_s:.3f} s" if per_s else f"{format_size(nbytes)} / ({name})"

    if not plan.streamed:
        return "bounds: nothing streams (every layer resident)"
    pcie = rates.pcie_bytes_per_s if rates is not None else None
    ub = [rate(plan.streamed_bytes, pcie, "PCIe rate")]
    if plan.disk_layers:
        ub.append(rate(plan.disk_bytes, disk_rate, "disk read rate"))
    pp = f"pp: a ubatch of {n_ubatch} tokens takes at least " + (f"max({', '.join(ub)})" if len(ub) > 1 else ub[0])
    if pcie and (disk_rate or not plan.disk_layers):
        per_ub = max(plan.streamed_bytes / pcie, plan.disk_bytes / disk_rate if plan.disk_layers else 0.0)
        pp += f", at most {n_ubatch / per_ub:.0f} t/s"
    if plan.disk_layers:
        tg = f"tg: each token reads the disk tier, {rate(plan.disk_bytes, disk_rate, 'disk read rate')}" + (
            f", at most {disk_rate / plan.disk_bytes:.2f} t/s" if disk_rate else "")
    else:
        tg = "tg: no disk tier"
    if rates is not None and plan.generate_overflow:
        # the best split of the overflow at the measured rates, as if all of it sat in pinned memory
        token = tg_bound_seconds(rates.gpu_token_seconds, 1 / rates.cpu_bytes_per_s, 1 / pcie,
                                 plan.generate_overflow_bytes)
        tg += f"; the generate split at the measured rates: at most {1 / token:.1f} t/s"
    known = "measured: " + ", ".join(f"{n} {v / 1e9:.1f} GB/s" for n, v in (("PCIe", pcie), ("disk", disk_rate)) if v) \
        if pcie or disk_rate else "no rates measured on this machine yet"
    return f"bounds ({known}): {pp}; {tg}"


def arm_disk_load(params):
    """Before loading llama_model_params `params` with a disk tier: its pages
    go back to the OS as llama.cpp loads (gs_diskload.c), through a progress
    callback put in front of the one already set. Returns the callback
    object, to keep alive through the load; disarm with native.disk_load_disarm."""
    import llama_cpp

    from . import native

    previous = ctypes.cast(params.progress_callback, ctypes.c_void_p).value or 0
    user = ctypes.cast(params.progress_callback_user_data, ctypes.c_void_p).value or 0
    native.disk_load_arm(previous, user)
    cb = llama_cpp.llama_progress_callback(native.DISK_PROGRESS_CB)
    params.progress_callback = cb
    return cb


def file_identity(path: str | os.PathLike) -> tuple[int, int]:
    """(size, mtime_ns) of the model file: the engine refuses to read a file
    that no longer has them (changed since the plan was made)."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns
