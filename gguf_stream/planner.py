"""Decide, for a VRAM budget, which layers stay resident and which stream,
and how each decode is placed.

Everything here is pure: sizes come from the GGUF header (ModelFile) and the
memory estimates (memory.py), so plans can be table-tested without a GPU. The
engine measures the real figures after loading and reports both.
"""
from __future__ import annotations

import bisect
import os
from dataclasses import dataclass, replace

from .errors import BudgetError
from .gguf_file import ModelFile
from .memory import (GiB, MiB, amx_extra_bytes, compute_bytes, format_size, input_embedding_bytes,  # noqa: F401
                     kv_cache_bytes, kv_cells, parse_size, shared_device_bytes, stock_device_bytes)

DEFAULT_MAX_SLOTS = 2
# how far over the budget the estimate of streaming's minimum may be for a GPU
# load to measure it: the estimate is conservative (CUDA's lazily loaded
# kernels, compute buffers; 8B with 16 sequences' KV cache: 1.09 GiB estimated,
# 1.01 GiB measured)
MEASURED_MINIMUM_MARGIN = 0.10
# llama.cpp's scheduler runs host-resident weights on the CPU for batches
# under this many tokens and copies them to the GPU op by op above it.
OFFLOAD_MIN_BATCH = int(os.environ.get("GGML_OP_OFFLOAD_MIN_BATCH", "32"))


def interleaved_layers(n_layer: int, n_streamed: int) -> tuple[int, ...]:
    """Spread n_streamed layers evenly: 20 layers, 2 streamed -> (9, 19).

    Streamed layer j sits at the end of the j-th of n_streamed equal blocks,
    so resident layers separate consecutive streamed ones (their compute hides
    the next upload) instead of stacking all streamed layers at one end.
    """
    if not 0 <= n_streamed <= n_layer:
        raise ValueError(f"cannot stream {n_streamed} of {n_layer} layers")
    return tuple((j + 1) * n_layer // n_streamed - 1 for j in range(n_streamed))


def slot_schedule(streamed: tuple[int, ...], n_slots: int, n_evals: int = 1) -> list[tuple[int, int]]:
    """(layer, slot) in execution order when every prefetch arrives in time.

    The k-th streamed layer executed overall uses slot k % n_slots: a freed
    slot always receives the layer n_slots steps ahead, wrapping round to the
    next evaluation. Mirrors gs_ring_release()/gs_ring_adopt() in native/gs_ring.c.
    """
    n_slots = min(n_slots, len(streamed))
    return [(streamed[k % len(streamed)], k % n_slots) for k in range(len(streamed) * n_evals)] if n_slots else []


@dataclass(frozen=True)
class LayerSpan:
    layer: int
    bytes: int
    # prompt phase: "resident", "streamed", or "host" (stock split: host
    # memory, computed by the CPU or copied in op by op by llama.cpp)
    placement: str
    slot: int | None = None  # first-evaluation slot of a streamed layer
    generate: str = ""  # generate phase: "resident", "streamed" or "cpu" (computed from host memory)
    # Bytes of the layer resident whatever the placement says (attention,
    # norms, router, shared experts of a mixture-of-experts layer, whose
    # `bytes` are its routed experts); 0 when the placement moves the whole layer.
    fixed_bytes: int = 0
    # A streamed part on the disk tier: its uploads read the GGUF file, it
    # holds no host memory (disk.py decides, under the host budget).
    disk: bool = False

    def __post_init__(self):
        if not self.generate:
            object.__setattr__(self, "generate", self.placement)


@dataclass(frozen=True)
class Plan:
    model_name: str
    arch: str
    n_layer: int
    layers: tuple[LayerSpan, ...]
    n_slots: int
    slot_bytes: int
    shared_bytes: int
    kv_bytes: int
    compute_bytes: int
    budget: int | None
    n_ctx: int
    n_ubatch: int
    # Set when the budget cannot hold the streaming minimum: llama.cpp's own
    # split with this many GPU layers (nothing streams).
    stock_gpu_layers: int | None = None
    # What a layer's placement moves: "layer" (all of it) or "experts" (a
    # mixture-of-experts layer's expert tensors; the rest stays resident)
    part: str = "layer"
    type_k: str = "f16"  # KV cache types (kv_bytes is sized by them)
    type_v: str = "f16"
    # Host memory beyond the streamed parts: llama.cpp keeps the input
    # embedding there; a layer's KV cache (host layers of a stock split, CPU
    # layers while generating) is kv_layer_bytes; CPU layers get a copy
    # repacked for the CPU kernels when repack_cpu_layers (EngineConfig.repack)
    input_bytes: int = 0
    kv_layer_bytes: int = 0
    repack_cpu_layers: bool = True
    # per layer, what its repacked copy takes beyond its bytes (AMX's wider
    # rows, memory.amx_extra_bytes; () where the copy is CPU_REPACK's: the same size)
    repack_extra: tuple[int, ...] = ()
    host_budget: int | None = None  # the host-memory budget the tiers were chosen for (disk.py)
    # KV streams: the sequences of a context (n_seq_max), each with n_ctx /
    # n_seq cells, padded (memory.kv_cells); 1 also when they share one
    # (kv_unified). kv_bytes covers them all.
    n_seq: int = 1
    # streamed layers whose routed experts are split between uploads and the
    # CPU while generating (--moe-split, gs_split.c); shown as "split"
    split_layers: tuple[int, ...] = ()
    # a stock plan whose budget is within MEASURED_MINIMUM_MARGIN of the
    # estimate of streaming's minimum: that estimate (a GPU load measures it)
    stream_minimum: int = 0

    @property
    def streamed(self) -> tuple[int, ...]:
        return tuple(s.layer for s in self.layers if s.placement == "streamed")

    @property
    def cpu_layers(self) -> tuple[int, ...]:
        """Layers the CPU computes while generating (they stream for prompts)."""
        return tuple(s.layer for s in self.layers if s.generate == "cpu")

    @property
    def generate_resident(self) -> tuple[int, ...]:
        """Streamed layers kept resident while generating (in the compute
        buffer's part that prompts need and generated tokens leave idle)."""
        return tuple(s.layer for s in self.layers if s.placement == "streamed" and s.generate == "resident")

    @property
    def generate_overflow(self) -> tuple[int, ...]:
        """Streamed layers not resident while generating: they stream then,
        or the CPU computes them."""
        return tuple(s.layer for s in self.layers if s.placement == "streamed" and s.generate != "resident")

    @property
    def generate_overflow_bytes(self) -> int:
        overflow = set(self.generate_overflow)
        return sum(s.bytes for s in self.layers if s.layer in overflow)

    @property
    def resident(self) -> tuple[int, ...]:
        return tuple(s.layer for s in self.layers if s.placement == "resident")

    @property
    def host_layers(self) -> tuple[int, ...]:
        return tuple(s.layer for s in self.layers if s.placement == "host")

    @property
    def resident_bytes(self) -> int:
        return sum(s.bytes for s in self.layers if s.placement == "resident") + self.fixed_bytes

    @property
    def fixed_bytes(self) -> int:
        return sum(s.fixed_bytes for s in self.layers)

    @property
    def streamed_bytes(self) -> int:
        return sum(s.bytes for s in self.layers if s.placement == "streamed")

    @property
    def device_bytes(self) -> int:
        """Estimated GPU memory of the whole run."""
        return (self.resident_bytes + self.shared_bytes + self.n_slots * self.slot_bytes
                + self.kv_bytes + self.compute_bytes)

    @property
    def disk_layers(self) -> tuple[int, ...]:
        """Streamed parts on the disk tier: read from the GGUF file at every use."""
        return tuple(s.layer for s in self.layers if s.placement == "streamed" and s.disk)

    @property
    def disk_bytes(self) -> int:
        return sum(s.bytes for s in self.layers if s.placement == "streamed" and s.disk)

    @property
    def pinned_bytes(self) -> int:
        """Host memory holding the streamed parts, the uploads' only source:
        pinned on CUDA (it cannot be swapped out), plain memory in host mode;
        the disk tier's parts are read from the file instead."""
        return self.streamed_bytes - self.disk_bytes

    @property
    def cpu_layer_host_bytes(self) -> int:
        """Pageable host memory the CPU layers add while generating: their
        weights repacked for the CPU kernels (when repacking; at most the
        layer's bytes, what the repack buffer does not take stays in the
        upload source, plus repack_extra where AMX's layout widens rows), and
        for whole layers their KV caches, which move to
        host memory then (mixture-of-experts CPU parts are experts only)."""
        n_cpu = len(self.cpu_layers)
        extra = self.repack_extra
        repacked = sum(s.bytes + (extra[s.layer] if extra else 0) for s in self.layers
                       if s.generate == "cpu") if self.repack_cpu_layers else 0
        return repacked + (n_cpu * self.kv_layer_bytes if self.part == "layer" else 0)

    @property
    def pageable_bytes(self) -> int:
        """Other host memory of the run: the input embedding, a stock split's
        host layers with their KV caches (llama.cpp's CPU layers), and the
        CPU layers' part (cpu_layer_host_bytes)."""
        host = [s for s in self.layers if s.placement == "host"]
        stock = sum(s.bytes for s in host) + len(host) * self.kv_layer_bytes
        return self.input_bytes + stock + self.cpu_layer_host_bytes

    @property
    def host_bytes(self) -> int:
        return self.pinned_bytes + self.pageable_bytes

    def host_memory_line(self) -> str:
        return (f"host memory: pinned {format_size(self.pinned_bytes)} + pageable {format_size(self.pageable_bytes)}"
                f" = {format_size(self.host_bytes)}")

    def _pageable_parts(self) -> str:
        parts = ["the input embedding"]
        if self.cpu_layers and self.repack_cpu_layers:
            parts.append("the CPU layers' repacked weights")
        if self.cpu_layers and self.part == "layer":
            parts.append("their KV caches")
        return ", ".join(parts)

    def _kv_types(self) -> str:
        types = "" if self.type_k == self.type_v == "f16" else f"K {self.type_k}, V {self.type_v}"
        seqs = (f"{self.n_seq} sequences x {kv_cells(self.n_ctx, self.n_seq) // self.n_seq} cells" if self.n_seq > 1
                else "")
        return f" ({'; '.join(p for p in (types, seqs) if p)})" if types or seqs else ""

    def table(self) -> str:
        experts = self.part == "experts"
        lines = [
            f"plan for {self.model_name} ({self.arch}, {self.n_layer} layers)"
            + (f", VRAM budget {format_size(self.budget)}" if self.budget is not None else ""),
            "| layer | dense part | experts | prompt | generate | slot |" if experts else
            "| layer | bytes | prompt | generate | slot |",
            "| ---: | ---: | ---: | :--- | :--- | ---: |" if experts else "| ---: | ---: | :--- | :--- | ---: |",
        ]
        for s in self.layers:
            size = (f"{format_size(s.fixed_bytes)} resident | " if experts else "") + (
                format_size(s.bytes) if s.bytes or not experts else "none (a dense layer)")
            disk = " (disk)" if s.disk and s.placement == "streamed" else ""
            generate = "split" if s.layer in self.split_layers and s.generate == "streamed" else s.generate
            lines.append(f"| {s.layer} | {size} | {s.placement}{disk} | {generate}{disk} | "
                         f"{'' if s.slot is None else s.slot} |")
        if experts:
            lines += ["", "(a mixture-of-experts model: every layer's dense part (attention, norms, router, "
                      "shared experts if any) stays resident; prompt/generate say where its experts are)"]
        if self.stock_gpu_layers is not None:
            return "\n".join(lines + [
                "",
                f"the budget is below streaming's minimum: llama.cpp's own split, -ngl {self.stock_gpu_layers} "
                f"({len(self.host_layers)} layers in host memory)"
                + (f"; a GPU load measures streaming's minimum first (estimated {format_size(self.stream_minimum)}"
                   f", within {MEASURED_MINIMUM_MARGIN:.0%} of the budget)" if self.stream_minimum else ""),
                f"device estimate: resident {format_size(self.resident_bytes)} + KV {format_size(self.kv_bytes)}"
                f"{self._kv_types()} + compute {format_size(self.compute_bytes)} = {format_size(self.device_bytes)}",
                self.host_memory_line() + " (the host layers, their KV caches and the input embedding)",
            ])
        unit = "expert parts" if experts else "layers"
        lines += [
            "",
            (f"dense parts {format_size(self.fixed_bytes)}, " if experts else "")
            + f"resident {unit} {len(self.resident)} ({format_size(self.resident_bytes - self.fixed_bytes)}), "
            f"streamed {len(self.streamed)} ({format_size(self.streamed_bytes)}) through "
            f"{self.n_slots} slot(s) of {format_size(self.slot_bytes)}"
            + (f"; while generating, {len(self.cpu_layers)} of them are computed by the CPU" if self.cpu_layers else "")
            + (f"; while generating, the routed experts of {len(self.split_layers)} of them split between uploads and "
               "the CPU" if self.split_layers else "")
            + (f"; {len(self.generate_resident)} stay resident while generating, in the compute buffer's part "
               "that only prompts use" if self.generate_resident else ""),
            f"device estimate: resident {format_size(self.resident_bytes)} + shared {format_size(self.shared_bytes)}"
            f" + slots {format_size(self.n_slots * self.slot_bytes)} + KV {format_size(self.kv_bytes)}"
            f"{self._kv_types()} + compute {format_size(self.compute_bytes)} = {format_size(self.device_bytes)}",
            self.host_memory_line() + f" (pinned: the streamed {unit}, the uploads' source; pageable: "
            + self._pageable_parts() + ")",
        ]
        if self.host_budget is not None or self.disk_layers:
            lines.append(self.tiers_line())
        return "\n".join(lines)

    def tiers_line(self) -> str:
        """The three tiers of the weights with bytes, and what the disk tier costs."""
        pinned = [s for s in self.layers if s.placement == "streamed" and not s.disk]
        budget = "" if self.host_budget is None else f" (host budget {format_size(self.host_budget)})"
        line = (f"tiers{budget}: GPU-resident {len(self.resident)} ({format_size(self.resident_bytes)}), "
                f"pinned host {len(pinned)} ({format_size(self.pinned_bytes)}), "
                f"disk {len(self.disk_layers)} ({format_size(self.disk_bytes)})")
        if self.disk_layers:
            line += (f"; the disk tier is read from the GGUF file at every use, prompts and each generated token: "
                     f"tokens/s at most (disk read rate) / {format_size(self.disk_bytes)}")
        return line

    __str__ = table


def with_generate_placement(plan: Plan, cpu_layers=(), resident_layers=()) -> Plan:
    """The plan with these streamed layers computed by the CPU, and those
    kept resident, while generating."""
    cpu, resident = set(cpu_layers), set(resident_layers)
    for what, layers in (("cpu", cpu), ("generate-resident", resident)):
        if not layers <= set(plan.streamed):
            raise ValueError(f"{what} layers {sorted(layers - set(plan.streamed))} are not streamed layers")
    if cpu & resident:
        raise ValueError(f"layers {sorted(cpu & resident)} cannot be both CPU and generate-resident layers")
    spans = tuple(replace(s, generate="cpu" if s.layer in cpu else "resident" if s.layer in resident else s.placement)
                  for s in plan.layers)
    return replace(plan, layers=spans)


def generate_resident_count(model: ModelFile, plan: Plan, n_ubatch: int, reserve: int) -> int:
    """How many streamed layers fit, while generating, in the compute buffer
    llama.cpp sizes for a prompt-sized ubatch: it holds at least logits for
    every token of a ubatch (n_vocab floats each, as llama.cpp reserves by
    default), of which a generated token's graph uses `reserve` at most."""
    idle = n_ubatch * model.hparams["n_vocab"] * 4 - reserve
    if not plan.streamed or idle <= 0:
        return 0
    return min(len(plan.streamed), idle // plan.slot_bytes)



def generate_resident_layers(model: ModelFile, plan: Plan, n_ubatch: int, reserve: int,
                             exclude=()) -> tuple[int, ...]:
    """The streamed layers (less `exclude`, the CPU layers) that stay
    resident while generating: as many as generate_resident_count says fit,
    spread evenly through them."""
    excluded = set(exclude)
    candidates = [i for i in plan.streamed if i not in excluded]
    n = min(len(candidates), generate_resident_count(model, plan, n_ubatch, reserve))
    return tuple(candidates[j] for j in interleaved_layers(len(candidates), n))


# ------------------------------------------------------------------ decodes

def decode_sizes(n_tokens: int, n_ubatch: int, split_tail: bool, prompt_min: int = OFFLOAD_MIN_BATCH) -> list[int]:
    """How many tokens each llama_decode call takes for a batch of n_tokens
    (at most n_batch). One call, except with split_tail (a context that
    reuses graphs, with CPU layers): a prompt whose tail ubatch is under
    prompt_min tokens (is_generate_phase) decodes that tail on its own, in the generate
    placement (where stock -ngl runs such a ubatch too), so that every
    graph's shape decides its placement."""
    tail = n_tokens % n_ubatch
    if (not split_tail or n_ubatch < prompt_min or n_tokens <= n_ubatch
            or not 0 < tail < prompt_min):
        return [n_tokens]
    return [n_tokens - tail, tail]


def decode_ubatches(n_tokens: int, n_ubatch: int) -> tuple[int, int]:
    """Tokens in the first and in the last ubatch of one llama_decode call."""
    return min(n_tokens, n_ubatch), (n_tokens - 1) % n_ubatch + 1


def is_generate_phase(first_ubatch: int, prompt_min: int = OFFLOAD_MIN_BATCH) -> bool:
    """Prompt-sized ubatches stream every non-resident layer; small ones
    leave the CPU layers to the CPU (the scheduler runs host weights on the
    CPU below OFFLOAD_MIN_BATCH tokens, so the first ubatch decides).
    prompt_min lowers the bound: a ubatch of k rows (k sequences, or a
    speculative verify) costs CPU layers k rows of CPU work, while streaming
    a layer costs the same for any k (EngineConfig.cpu_layers_max_batch)."""
    return first_ubatch < prompt_min

def _slot_bytes(unit: tuple[int, ...], streamed: tuple[int, ...], slot_pad: int) -> int:
    return max((unit[i] for i in streamed), default=0) + slot_pad


def make_plan(
    model: ModelFile,
    *,
    vram_budget: int | str | None = None,
    n_ctx: int = 4096,
    n_ubatch: int = 512,
    flash_attn: bool = True,
    n_streamed: int | None = None,
    streamed_layers: tuple[int, ...] | None = None,
    n_slots: int | None = None,
    max_slots: int = DEFAULT_MAX_SLOTS,
    slot_pad: int = 0,
    whole_layers: bool | None = None,
    type_k: str = "f16",
    type_v: str = "f16",
    repack_cpu_layers: bool = True,
    n_seq: int = 1,
    runtime_bytes: int = 0,
    amx_layout: bool = False,
) -> Plan:
    """Choose resident/streamed layers and the slot count.

    A mixture-of-experts model's placement moves expert tensors only (every
    layer's dense part resident) unless ``whole_layers`` is True; None: the
    experts where their plan fits the budget, else whole layers.

    Either give the streamed layers (``streamed_layers`` or ``n_streamed``,
    interleaved) or a ``vram_budget``: then the fewest layers are streamed
    whose estimated device memory fits, preferring 2 slots (an upload can land
    while the previous streamed layer computes) when that costs no extra
    streamed layer or when streamed layers would sit next to each other, and
    each slot beyond two that ``max_slots`` allows where it costs at most one
    more streamed layer (given layers: where the budget has room for it).
    ``slot_pad`` adds per-slot bytes the device buffer type needs (row padding).
    ``type_k`` / ``type_v`` are the KV cache types (KV_CACHE_TYPES);
    ``repack_cpu_layers`` says whether CPU layers get a repacked copy, and
    ``amx_layout`` whether in AMX's layout where it takes them (wider rows;
    host memory figures only). ``n_seq`` sequences share the n_ctx KV
    cells (the estimate is the same; the plan says it). ``runtime_bytes``:
    device memory the GPU runtime takes after the load (memory.LAZY_KERNEL_BYTES
    on CUDA), counted with the compute buffer.
    """
    budget = None if vram_budget is None else parse_size(vram_budget)
    if n_ctx <= 0 or n_ubatch <= 0:
        raise ValueError(f"n_ctx and n_ubatch must be positive (got {n_ctx}, {n_ubatch})")
    if whole_layers is None and model.is_moe:
        try:
            plan = make_plan(model, vram_budget=vram_budget, n_ctx=n_ctx, n_ubatch=n_ubatch, flash_attn=flash_attn,
                             n_streamed=n_streamed, streamed_layers=streamed_layers, n_slots=n_slots,
                             max_slots=max_slots, slot_pad=slot_pad, whole_layers=False, type_k=type_k,
                             type_v=type_v, repack_cpu_layers=repack_cpu_layers, n_seq=n_seq,
                             runtime_bytes=runtime_bytes, amx_layout=amx_layout)
            if plan.stock_gpu_layers is None:
                return plan
        except BudgetError:
            pass
        whole_layers = True
    by_experts = model.is_moe and not whole_layers
    N = model.n_layer
    unit = model.stream_bytes if by_experts else model.layer_bytes
    fixed_layer = model.fixed_layer_bytes if by_experts else (0,) * N
    candidates = tuple(i for i in range(N) if unit[i])  # MoE layers without experts (dense ones) cannot stream
    shared = shared_device_bytes(model)
    kv = kv_cache_bytes(model, kv_cells(n_ctx, n_seq), type_k, type_v)
    comp = compute_bytes(model, n_ctx, n_ubatch, flash_attn) + runtime_bytes
    fixed = shared + kv + comp + sum(fixed_layer)
    total = sum(unit)

    def fits(streamed: tuple[int, ...], k: int) -> bool:
        resident = total - sum(unit[i] for i in streamed)
        return budget is None or fixed + resident + k * _slot_bytes(unit, streamed, slot_pad) <= budget

    def spread(n: int) -> tuple[int, ...]:
        return tuple(candidates[j] for j in interleaved_layers(len(candidates), n))

    if streamed_layers is not None:
        streamed = tuple(sorted(set(streamed_layers)))
        if any(not 0 <= i < N for i in streamed):
            raise ValueError(f"streamed layers {streamed} out of range for {N} layers")
        if any(not unit[i] for i in streamed):
            raise ValueError(f"layers {[i for i in streamed if not unit[i]]} have no expert tensors to stream "
                             "(a mixture-of-experts model streams experts; its dense layers stay resident)")
    elif n_streamed is not None:
        if not 0 <= n_streamed <= len(candidates):
            dense = N - len(candidates)  # a mixture-of-experts model's leading dense layers
            raise ValueError(f"cannot stream {n_streamed} of {len(candidates)} layers"
                             + (f" ({dense} of the {N} layers have no experts to stream; whole_layers / "
                                "--whole-layers places whole layers)" if dense else ""))
        streamed = spread(n_streamed)
    else:
        streamed = None

    if streamed is not None:
        k = min(n_slots or min(max_slots, len(streamed)), len(streamed)) if streamed else 0
        # given layers take up to max_slots slots, a slot beyond two only where the budget has room for it
        while budget is not None and not n_slots and k > min(DEFAULT_MAX_SLOTS, len(streamed)) and not fits(streamed, k):
            k -= 1
        if budget is not None and not fits(streamed, k):
            raise BudgetError(
                f"{len(streamed)} streamed layers with {k} slot(s) need about "
                f"{format_size(fixed + total - sum(unit[i] for i in streamed) + k * _slot_bytes(unit, streamed, slot_pad))}"
                f", over the budget of {format_size(budget)}"
            )
    else:
        if budget is None:
            raise ValueError("give a vram_budget, or the layers to stream (n_streamed / streamed_layers)")
        minimum = fixed + _slot_bytes(unit, candidates, slot_pad)
        if budget < minimum:
            return _stock_plan(model, budget, minimum, n_ctx, n_ubatch, flash_attn, type_k, type_v, n_seq,
                               runtime_bytes)
        need = fixed + total - budget  # bytes streaming must take off the GPU, slots aside
        streamed, k = _fewest_streamed([unit[i] for i in candidates], spread, fits, n_slots, max_slots, need,
                                       slot_pad)

    spans = []
    first_slot = {layer: slot for layer, slot in slot_schedule(streamed, k)}
    for i in range(N):
        placement = "streamed" if i in first_slot else "resident"
        spans.append(LayerSpan(i, unit[i], placement, first_slot.get(i), fixed_bytes=fixed_layer[i]))
    return Plan(
        model_name=str(model.hparams.get("name") or model.path.name),
        arch=model.arch,
        n_layer=N,
        layers=tuple(spans),
        n_slots=k,
        slot_bytes=_slot_bytes(unit, streamed, slot_pad) if streamed else 0,
        shared_bytes=shared,
        kv_bytes=kv,
        compute_bytes=comp,
        budget=budget,
        n_ctx=n_ctx,
        n_ubatch=n_ubatch,
        part="experts" if by_experts else "layer",
        type_k=type_k,
        type_v=type_v,
        input_bytes=input_embedding_bytes(model),
        kv_layer_bytes=kv // N,
        repack_cpu_layers=repack_cpu_layers,
        repack_extra=amx_extra_bytes(model) if amx_layout and not by_experts else (),
        n_seq=n_seq,
    )


def _stock_plan(model: ModelFile, budget: int, stream_minimum: int, n_ctx: int, n_ubatch: int,
                flash_attn: bool, type_k: str = "f16", type_v: str = "f16", n_seq: int = 1,
                runtime_bytes: int = 0) -> Plan:
    """Below streaming's minimum (every KV cache, the shared tensors and a
    slot on the GPU) llama.cpp's own split may still fit: keep its KV cache
    and output matrix on the host. Nothing can beat it there, so use it."""
    N = model.n_layer
    # the estimate grows with the GPU layers: the most that fit, by bisection
    n_fit = bisect.bisect_right(range(N + 1), budget,
                                key=lambda n: stock_device_bytes(model, n, n_ctx, n_ubatch, flash_attn, type_k,
                                                                 type_v, n_seq, runtime_bytes)) - 1
    if n_fit < 0:
        need = stock_device_bytes(model, 0, n_ctx, n_ubatch, flash_attn, type_k, type_v, n_seq, runtime_bytes)
        raise BudgetError(
            f"VRAM budget {format_size(budget)} is below the minimum of {format_size(need)} for "
            f"{model.path.name} (compute buffers at n_ubatch={n_ubatch}, even with every layer in host memory; "
            f"streaming needs {format_size(stream_minimum)}); raise the budget or lower n_ctx / n_ubatch")
    plan = stock_split_plan(model, n_fit, budget, n_ctx, n_ubatch, flash_attn, type_k, type_v, n_seq, runtime_bytes)
    return replace(plan, stream_minimum=stream_minimum if stream_minimum <= budget * (1 + MEASURED_MINIMUM_MARGIN)
                   else 0)


def stock_split_plan(model: ModelFile, ngl: int, budget: int | None, n_ctx: int, n_ubatch: int,
                     flash_attn: bool = True, type_k: str = "f16", type_v: str = "f16", n_seq: int = 1,
                     runtime_bytes: int = 0) -> Plan:
    """llama.cpp's `-ngl ngl` split as a Plan (nothing streams)."""
    N = model.n_layer
    spans = tuple(LayerSpan(i, model.layer_bytes[i], "resident" if i >= N - ngl else "host") for i in range(N))
    comp = stock_device_bytes(model, 0, n_ctx, n_ubatch, flash_attn, type_k, type_v, runtime_bytes=runtime_bytes)
    kv_layer = kv_cache_bytes(model, kv_cells(n_ctx, n_seq), type_k, type_v) // N
    return Plan(
        model_name=str(model.hparams.get("name") or model.path.name),
        arch=model.arch, n_layer=N, layers=spans, n_slots=0, slot_bytes=0, shared_bytes=0,
        kv_bytes=ngl * kv_layer, compute_bytes=comp,
        budget=budget, n_ctx=n_ctx, n_ubatch=n_ubatch, stock_gpu_layers=ngl, type_k=type_k, type_v=type_v,
        input_bytes=input_embedding_bytes(model), kv_layer_bytes=kv_layer, n_seq=n_seq)


def _fewest_streamed(sizes: list[int], spread, fits, n_slots, max_slots, need: int, slot_pad: int):
    """Fewest streamed layers that fit, preferring two slots. With one slot an
    upload can only start once the previous streamed layer has finished, so
    only the resident layers between them hide it: not at all when streamed
    layers sit next to each other (more than half streamed), barely with
    small ubatches. Two slots are taken when streamed layers are adjacent, or
    when they cost at most one more streamed layer. Where max_slots allows
    more, each further slot is taken if it costs at most one more streamed
    layer than two slots do: uploads then run further ahead through CPU
    layers that take longer than an upload (decodes of many rows:
    EngineConfig.slots_max)."""
    N = len(sizes)  # the layers that can stream; spread(s) picks s of them
    if fits((), 0):
        return (), 0
    options = []
    for k in ([n_slots] if n_slots else range(1, max_slots + 1)):
        first = max(k, 1, _fewest_possible(sizes, need, k, slot_pad))
        s = next((s for s in range(first, N + 1) if fits(spread(s), k)), None)
        if s is not None:
            options.append((s, k))
    if not options:
        raise BudgetError("no placement fits the VRAM budget, even with every layer streamed")
    s1, k1 = min(options)
    overlapping = [(s, k) for s, k in options if k >= 2]
    if overlapping:
        s2, k2 = min(overlapping)
        # adjacent streamed layers need it; otherwise still worth one more
        # streamed layer (small ubatches compute a layer faster than it crosses)
        if s1 > N // 2 or s2 <= s1 + 1:
            s1, k1 = s2, k2
        deeper = [(k, s) for s, k in options if k > 2 and s <= s2 + 1]
        if k1 == 2 and deeper:
            k1, s1 = max(deeper)
    return spread(s1), k1


def _fewest_possible(layer_bytes, need: int, k: int, slot_pad: int) -> int:
    """A lower bound on the streamed layers that fit with k slots: s layers
    take off the GPU at most the s largest layers' bytes and add k slots of
    at least the s-th smallest layer. The search for the fewest that really
    fit starts here, so planning stays about linear in the layer count
    (every candidate costs a pass over its layers)."""
    largest, smallest = sorted(layer_bytes, reverse=True), sorted(layer_bytes)
    freed = 0
    for s in range(1, len(largest) + 1):
        freed += largest[s - 1]
        if freed - k * (smallest[s - 1] + slot_pad) >= need:
            return s
    return len(largest)
