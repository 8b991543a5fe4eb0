"""The plan a load starts from, as far as it is known before loading: the
planner's estimate for a config, the generate placement the Streamer will
choose (generate-resident layers, CPU layers or expert parts), and the
host-memory check on it. Pure but for the device's size (native), so
`plan` shows what a run would do without loading anything."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

from .config import MAX_MOE_SPLIT, EngineConfig, available_host_memory, kv_streams, resolve_context
from .disk import assign_disk_tier, host_margin, reader_options, spare_host_memory, staging_bytes
from .errors import BudgetError, HostMemoryError, UnsupportedModelError
from .gguf_file import ModelFile, is_expert_tensor
from .memory import LAZY_KERNEL_BYTES, format_size, generate_graph_bytes, parse_size
from .perfmodel import split_cpu_layers
from .planner import (OFFLOAD_MIN_BATCH, Plan, generate_resident_layers, interleaved_layers, make_plan,
                      with_generate_placement)


def initial_plan(model_file: ModelFile, config: EngineConfig, cuda: bool, check_device: bool = True) -> Plan:
    """The planner's estimate for the config (everything resident without a
    budget or streamed layers); on CUDA a budget beyond the device is an
    error (unless check_device is off: `plan` where no GPU is present)."""
    c = resolve_context(config, model_file.hparams["n_ctx_train"])
    if c.vram_budget is not None and cuda and check_device:
        from . import native

        total = native.device_memory("CUDA0")[1]
        if parse_size(c.vram_budget) > total:
            raise BudgetError(f"VRAM budget {format_size(parse_size(c.vram_budget))} exceeds the device's "
                              f"{format_size(total)}; give at most that")
    if c.places_layers:
        what = {"vram_budget": c.vram_budget, "n_streamed": c.n_streamed, "streamed_layers": c.streamed_layers}
    else:
        what = {"n_streamed": 0}
    return make_plan(model_file, n_ctx=c.n_ctx, n_ubatch=c.n_ubatch, flash_attn=c.planned_flash_attn,
                     n_slots=c.n_slots, max_slots=c.slots_max(model_file.is_moe, cuda), whole_layers=c.whole_layers, type_k=c.type_k,
                     type_v=c.type_v, repack_cpu_layers=c.repack, amx_layout=c.amx_layout, n_seq=kv_streams(c),
                     runtime_bytes=(LAZY_KERNEL_BYTES if cuda else 0) + split_region_bytes(model_file, c, cuda), **what)


def chosen_generate_resident(model_file: ModelFile, plan: Plan, config: EngineConfig,
                             cuda: bool) -> tuple[tuple[int, ...], int]:
    """Streamed layers that stay resident while generating and the compute
    buffer bytes left to generate-phase graphs; ((), 0) when none are kept
    (generate_resident 'none', or 'auto' off CUDA)."""
    choice = config.generate_resident
    if choice == "none" or (choice == "auto" and not cuda):
        return (), 0
    reserve = generate_graph_bytes(model_file, config.n_ctx, OFFLOAD_MIN_BATCH, config.planned_flash_attn)
    if choice != "auto":
        return tuple(choice), reserve
    split = config.generate_split(cuda)
    cpu = () if isinstance(split, str) else split
    return generate_resident_layers(model_file, plan, config.n_ubatch, reserve, cpu), reserve


def moe_cpu_parts(plan: Plan) -> tuple[int, ...]:
    """generate_cpu_layers 'auto' for an experts plan: the overflow layers
    whose experts the CPU computes. A token reads the few experts it routes
    to: the CPU moves ~k/n of the bytes an upload would move (8 of 128
    experts, 1/16). As many as there are slots stay on the GPU: the ring
    holds a layer it has already uploaded, so with no more streamed layers
    than slots, generating uploads nothing."""
    overflow = plan.generate_overflow
    held = set(overflow[j] for j in interleaved_layers(len(overflow), min(plan.n_slots, len(overflow))))
    return tuple(i for i in overflow if i not in held)


# where --moe-split's CPU part (SwiGLU experts, gpt-oss's clamped one with
# biases; their sum added to the residual) computes what llama.cpp's graph
# does; tested in host mode (deepseek2's weights come scaled from the node the
# split reads them at, as every architecture's final routing weights do)
MOE_SPLIT_ARCHS = ("qwen3moe", "qwen2moe", "glm4moe", "gpt-oss", "deepseek2")
OAI_ACTIVATION_ARCHS = ("gpt-oss",)  # their experts' GLU is swiglu_oai (with expert biases)
# the default's: gpt-oss's split (biases through the region, MXFP4) has not run on a GPU yet
MOE_SPLIT_DEFAULT_ARCHS = ("qwen3moe", "qwen2moe", "glm4moe")


def moe_split_choice(config: EngineConfig, mf: ModelFile, cuda: bool) -> int | str:
    """config.moe_split as a run on this device uses it: the default (None)
    is "auto" on CUDA for MOE_SPLIT_DEFAULT_ARCHS, else "off" (also where the layers
    have no room for an uploaded expert beside a zero one per expert used)."""
    if config.moe_split is not None:
        return config.moe_split
    room = mf.hparams.get("n_expert", 0) - mf.hparams.get("n_expert_used", 0)
    return "auto" if cuda and mf.is_moe and mf.arch in MOE_SPLIT_DEFAULT_ARCHS and room >= 1 else "off"


def split_region_bytes(mf: ModelFile, config: EngineConfig, cuda: bool) -> int:
    """Device bytes the split's region takes (gs_split.c): per expert tensor
    kind and layout (bytes per expert: Q4_K_M files mix types across layers),
    room for the most experts uploaded (with "auto", its largest candidate:
    about three quarters of those used, as tune_range) and a zero expert per
    expert used; 0 when no split runs. Every layer with experts counts (the
    load splits some of them)."""
    choice = moe_split_choice(config, mf, cuda)
    if choice == "off" or not mf.is_moe or config.generate_split(cuda) != "auto":  # the split replaces auto's CPU layers
        return 0
    used = mf.hparams.get("n_expert_used", 0)
    layouts = set()
    for layer in range(mf.n_layer):
        exps = [t for t in mf.layer_tensors(layer) if is_expert_tensor(t.name)]  # gpt-oss: their biases too
        weights = [t for t in exps if len(t.shape) == 3]
        if weights:
            n_expert = weights[0].shape[2]
            layouts |= {(t.name.split(".", 2)[2], t.nbytes // n_expert, n_expert) for t in exps}
    return sum(((choice if isinstance(choice, int) else _auto_room(used, n_expert)) + used) * per_expert + SPLIT_PAD
               for _, per_expert, n_expert in layouts)


def _auto_room(used: int, n_expert: int) -> int:
    """The most experts "auto" uploads per layer: gs_split.c's tune_range."""
    lo = max(1, used // 4)
    return max(1, min((3 * used + 3) // 4, n_expert - used, MAX_MOE_SPLIT, lo + SPLIT_TUNE_CANDIDATES - 1))


SPLIT_TUNE_CANDIDATES = 8  # gguf_stream.h GS_SPLIT_TUNE_CANDIDATES
SPLIT_PAD = 512 + 256  # gs_split.c's padding after each tensor's experts and the buffer alignment


def moe_generate_parts(plan: Plan, config: EngineConfig, mf: ModelFile, cuda: bool) -> tuple[tuple[int, ...], tuple[int, ...], int | str]:
    """(CPU expert layers, split expert layers, experts uploaded per split
    layer or "auto": timed by the engine) of an experts plan while generating
    ('auto'): moe_cpu_parts, or with config.moe_split those layers split
    (gs_split.c), the generate-resident ones too, for whenever they are not
    in their region. The default splits on CUDA where the architecture
    allows; asked for elsewhere, an architecture outside MOE_SPLIT_ARCHS is
    refused."""
    cpu, choice = moe_cpu_parts(plan), moe_split_choice(config, mf, cuda)
    if not cpu or choice == "off":
        return cpu, (), 0
    if mf.arch not in MOE_SPLIT_ARCHS:
        raise UnsupportedModelError(f"--moe-split supports {', '.join(MOE_SPLIT_ARCHS)} (experts whose activation "
                                    f"the CPU part computes as llama.cpp does), not {mf.arch}; run without it")
    disk = set(plan.disk_layers)  # none where the plan came from run_tiers (disk.disk_candidates)
    return (), tuple(sorted(i for i in cpu + tuple(plan.generate_resident) if i not in disk)), choice


def _check_named_layers(plan: Plan, config: EngineConfig, cuda: bool) -> None:
    """Layers named for the generate phase must be streamed ones: refused
    here, before loading, in one line (an experts plan never streams a
    layer without experts, such as glm4moe's leading dense ones)."""
    named = (("generate_cpu_layers", config.generate_split(cuda)),
             ("generate_resident", config.generate_resident))
    for flag, layers in named:
        if isinstance(layers, str) or layers is None:
            continue
        bad = sorted(set(layers) - set(plan.streamed))
        if bad:
            what = "layers whose experts stream" if plan.part == "experts" else "streamed layers"
            raise ValueError(f"{flag} names layers {bad}, which are not streamed; this plan's {what} are "
                             f"{list(plan.streamed)} (give n_streamed / streamed_layers to stream others)")


def expected_generate_plan(model_file: ModelFile, plan: Plan, config: EngineConfig, cuda: bool) -> Plan:
    """The plan with the generate placement the Streamer will choose at
    load without a host budget (host_tiers): with 'auto' on CUDA a dense
    model's CPU layers are measured then, so every overflow layer counts
    (the most calibration can choose)."""
    return host_tiers(model_file, plan, config, cuda, HostBudget(None)).most_plan


ENV_HOST_MEMORY_CHECK = "GGUF_STREAM_HOST_MEMORY_CHECK"


def _host_check_on(config: EngineConfig) -> bool:
    return config.host_memory_check and os.environ.get(ENV_HOST_MEMORY_CHECK, "1") != "0"


@dataclass(frozen=True)
class HostBudget:
    """The host-memory budget a run's tiers are chosen for: given
    (host_budget), measured (what the machine can spare), or none (None)."""

    nbytes: int | None
    available: int | None = None  # MemAvailable, when the budget was measured from it

    @property
    def source(self) -> str:
        """Where a measured budget came from, for messages ('' when given)."""
        if self.available is None:
            return ""
        return (f" (what this machine can spare: MemAvailable {format_size(self.available)} less a margin of "
                f"{format_size(host_margin(self.available))})")


def host_budget_of(config: EngineConfig, available: int | None = None) -> HostBudget:
    """config.host_budget as a HostBudget: a size; 'none' (no budget); or,
    without one, what the machine can spare (disk.spare_host_memory of
    MemAvailable, or `available`) while the host-memory check is on."""
    value = config.host_budget
    if value == "none":
        return HostBudget(None)
    if value is not None:
        return HostBudget(parse_size(value))
    if not _host_check_on(config):
        return HostBudget(None)
    available = available_host_memory() if available is None else available
    return HostBudget(None) if available is None else HostBudget(spare_host_memory(available), available)


@dataclass(frozen=True)
class HostTiers:
    """What host_tiers decided: the plan's tiers (disk layers) and the
    generate placement the load starts from, and for a split measured at
    load ('auto' on CUDA) the layers it may put on the CPU."""

    plan: Plan
    budget: HostBudget
    split: str  # where the plan's CPU layers come from (plan prints it)
    choices: tuple[int, ...] = ()  # 'auto' on CUDA: pinned overflow layers the calibrated split chooses among
    most: int = 0  # at most this many of them (their copies within the host budget)
    cached: bool = False  # the plan's CPU layers are the split cached by an earlier load

    @property
    def most_plan(self) -> Plan:
        """The plan with the most CPU layers the load may end with (the host-memory check's view)."""
        if self.cached or not self.most:
            return self.plan
        cpu = split_cpu_layers(self.choices, self.most)
        return with_generate_placement(self.plan, cpu, self.plan.generate_resident)

    def notice(self) -> str | None:
        """The one line a run and `plan` print when the measured default budget put parts on the disk tier."""
        p = self.plan
        if self.budget.available is None or not p.disk_layers:
            return None
        return (f"host memory: this run would need {format_size(p.host_bytes + p.disk_bytes)} but the host budget is "
                f"{format_size(self.budget.nbytes)}{self.budget.source}, so {len(p.disk_layers)} streamed part(s) "
                f"({format_size(p.disk_bytes)}) are read from the GGUF file at every use (the disk tier); "
                "--host-budget SIZE sets the budget, --host-budget none keeps every streamed part in host memory")


def host_tiers(model_file: ModelFile, plan: Plan, config: EngineConfig, cuda: bool, budget: HostBudget,
               staging: int = 0, lookup=None) -> HostTiers:
    """The one decision, for `plan` and the load alike, of the host memory a
    run holds: its CPU layers while generating (given, none, a mixture-of-
    experts' parts, or the calibrated split) and, under a host budget, which
    streamed parts go to the disk tier (disk.assign_disk_tier; a disk tier
    adds `staging` bytes). With 'auto' on CUDA (a dense model) the split is
    measured after loading, but the disk tier must be chosen before: the
    tiers are chosen without CPU layers, and the split then chooses among
    the pinned overflow layers, as many as the budget's room left holds
    copies of. `lookup(choices, most)` gives the split an earlier load
    cached (split_cache.split_lookup): then the plan has those CPU layers,
    exactly what the load will take from the cache."""
    if not plan.streamed:
        return HostTiers(plan, budget, "")
    _check_named_layers(plan, config, cuda)
    streamed = set(plan.streamed)
    resident = [i for i in chosen_generate_resident(model_file, plan, config, cuda)[0] if i in streamed]
    base = with_generate_placement(plan, (), resident)
    choice = config.generate_split(cuda)
    rows, most_rows = config.split_rows, config.cpu_layers_max_batch
    measured = (choice == "auto" and cuda and plan.part != "experts" and bool(base.generate_overflow)
                and rows < OFFLOAD_MIN_BATCH and (most_rows is None or rows <= most_rows))
    if not measured:
        split = ()
        if choice == "auto" and plan.part == "experts":
            cpu, split, n = moe_generate_parts(base, config, model_file, cuda)
            why = "the overflow layers' experts beyond the slots (a token reads few of them)" + (
                f", each token's routed experts split between uploads and the CPU ("
                f"{'N timed on the first generated tokens' if n == 'auto' else f'{n} uploaded'}; --moe-split off: "
                "the CPU computes them all)" if split else "")
        elif choice == "auto" and cuda and not base.generate_overflow:
            cpu, why = (), "none (every streamed layer stays resident while generating)"
        elif choice == "auto" and cuda:
            cpu, why = (), f"none (decodes of {rows} rows compute every row on the GPU)"
        elif choice == "auto":
            cpu, why = (), "none (host mode: no split to measure)"
        elif choice == "none":
            cpu, why = (), "none (every layer computed on the GPU: exact)"
        else:
            cpu, why = tuple(choice), "as given"
        fixed = with_generate_placement(base, [i for i in cpu if i in streamed and i not in resident], resident)
        return HostTiers(_with_budget(replace(fixed, split_layers=tuple(split)), budget, staging), budget, why)
    tiered = _with_budget(base, budget, staging)
    disk = set(tiered.disk_layers)
    choices = tuple(i for i in tiered.generate_overflow if i not in disk)
    room = None if budget.nbytes is None else budget.nbytes - tiered.host_bytes - (staging if disk else 0)
    most = _most_cpu_layers(tiered, choices, room)
    cpu = lookup(choices, most) if lookup is not None and most else None
    if cpu is not None:
        return HostTiers(with_generate_placement(tiered, cpu, resident), budget,
                         f"the calibrated split cached by an earlier load on this machine ({len(cpu)} of "
                         f"{len(choices)} CPU layers)", choices, most, cached=True)
    if not most:
        why = ("none: the host budget leaves no room for a CPU layer's repacked copy" if choices else
               "none: every overflow layer is on the disk tier")
    else:
        within = "" if room is None else f", their copies within the {format_size(room)} the host budget leaves"
        why = (f"measured at load (none cached{'' if lookup else ' here'}): up to {most} of {len(choices)} pinned "
               f"overflow layers{within}; the tiers stay as shown")
    return HostTiers(tiered, budget, why, choices, most)


def run_tiers(model_file: ModelFile, plan: Plan, config: EngineConfig, cuda: bool, lookup=None) -> HostTiers:
    """host_tiers for a run of `config` on this device: its host budget
    (host_budget_of) and its disk reader's staging buffers. `plan` and the
    Streamer both call this."""
    staging = staging_bytes(model_file, reader_options(cuda, config.disk_direct), cuda)
    return host_tiers(model_file, plan, config, cuda, host_budget_of(config), staging, lookup)


def _with_budget(plan: Plan, budget: HostBudget, staging: int) -> Plan:
    if budget.nbytes is None:
        return plan
    remedy = ("free host memory, give a host_budget ('none': no budget), or skip the measured budget with "
              f"{ENV_HOST_MEMORY_CHECK}=0") if budget.available is not None else "raise the host budget"
    return assign_disk_tier(plan, budget.nbytes, staging, budget.source, remedy)


def _most_cpu_layers(plan: Plan, choices: tuple[int, ...], room: int | None) -> int:
    """The most of `choices` the calibrated split may put on the CPU: as
    many as their host memory (repacked copies, KV caches) fits in `room`."""
    if room is None:
        return len(choices)
    n = 0
    while n < len(choices) and with_generate_placement(plan, split_cpu_layers(choices, n + 1),
                                                       plan.generate_resident).cpu_layer_host_bytes <= room:
        n += 1
    return n


def check_host_memory(plan: Plan, config: EngineConfig, available: int | None = None) -> None:
    """Refuse a plan whose host memory (Plan.host_bytes) exceeds what the
    machine has available: pinned memory cannot be swapped out, and a run
    whose weights swap crawls. Skipped with config.host_memory_check False,
    GGUF_STREAM_HOST_MEMORY_CHECK=0, or where MemAvailable is unknown."""
    if not _host_check_on(config):
        return
    available = available_host_memory() if available is None else available
    if available is None or plan.host_bytes <= available:
        return
    changes = ["a larger vram_budget (fewer streamed or host layers)"]
    if plan.cpu_layer_host_bytes:
        changes.append("fewer CPU layers (exact=True, or fewer generate_cpu_layers)")
    raise HostMemoryError(
        f"this run needs about {format_size(plan.host_bytes)} of host memory (pinned "
        f"{format_size(plan.pinned_bytes)} + pageable {format_size(plan.pageable_bytes)}) but "
        f"{format_size(available)} is available (MemAvailable); give {' or '.join(changes)}, or free host "
        f"memory ({ENV_HOST_MEMORY_CHECK}=0 skips this check)")
