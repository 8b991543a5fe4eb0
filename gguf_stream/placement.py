"""The plan a load starts from, as far as it is known before loading: the
planner's estimate for a config, the generate placement the Streamer will
choose (generate-resident layers, CPU layers or expert parts), and the
host-memory check on it. Pure but for the device's size (native), so
`plan` shows what a run would do without loading anything."""
from __future__ import annotations

import os

from .config import EngineConfig, available_host_memory, kv_streams, resolve_context
from .errors import BudgetError, HostMemoryError
from .gguf_file import ModelFile
from .memory import format_size, generate_graph_bytes, parse_size
from .planner import (OFFLOAD_MIN_BATCH, Plan, generate_resident_layers, interleaved_layers, make_plan,
                      with_generate_placement)


def initial_plan(model_file: ModelFile, config: EngineConfig, cuda: bool) -> Plan:
    """The planner's estimate for the config (everything resident without a
    budget or streamed layers); a budget beyond the device is an error."""
    c = resolve_context(config, model_file.hparams["n_ctx_train"])
    if c.vram_budget is not None and cuda:
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
                     n_slots=c.n_slots, max_slots=c.max_slots, whole_layers=c.whole_layers, type_k=c.type_k,
                     type_v=c.type_v, repack_cpu_layers=c.repack, n_seq=kv_streams(c), **what)


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
    load, as far as it is known before loading: with 'auto' on CUDA a dense
    model's CPU layers are measured then, so every overflow layer counts
    (the most calibration can choose)."""
    if not plan.streamed:
        return plan
    _check_named_layers(plan, config, cuda)
    streamed = set(plan.streamed)
    resident = [i for i in chosen_generate_resident(model_file, plan, config, cuda)[0] if i in streamed]
    plan = with_generate_placement(plan, (), resident)
    choice = config.generate_split(cuda)
    if choice == "auto" and plan.part == "experts":
        cpu = moe_cpu_parts(plan)
    elif choice == "auto" and cuda:
        cpu = plan.generate_overflow
    else:
        cpu = () if isinstance(choice, str) else tuple(choice)
    return with_generate_placement(plan, [i for i in cpu if i in streamed and i not in resident], resident)


ENV_HOST_MEMORY_CHECK = "GGUF_STREAM_HOST_MEMORY_CHECK"


def check_host_memory(plan: Plan, config: EngineConfig, available: int | None = None) -> None:
    """Refuse a plan whose host memory (Plan.host_bytes) exceeds what the
    machine has available: pinned memory cannot be swapped out, and a run
    whose weights swap crawls. Skipped with config.host_memory_check False,
    GGUF_STREAM_HOST_MEMORY_CHECK=0, or where MemAvailable is unknown."""
    if not config.host_memory_check or os.environ.get(ENV_HOST_MEMORY_CHECK, "1") == "0":
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
