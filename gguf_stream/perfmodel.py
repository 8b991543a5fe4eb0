"""The one performance model: what a token and a prompt cost, by path.

The planner's generate split and the benchmark's bounds both come from here.
While generating, every byte not resident on the GPU crosses once per token:
either over PCIe (streamed, p seconds per byte) or through host memory (the
CPU computes its layer, c seconds per byte). Both paths run at the same time
as each other, beside G, the all-in-VRAM token, so a token that streams x of
the O overflow bytes takes about max(G + c(O - x), p x). A prompt's ubatch
takes at least max(its all-in-VRAM compute, streamed bytes / PCIe rate),
because uploads overlap compute.

Pure functions: rates are measured elsewhere (calibrate.py, the bench).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .planner import interleaved_layers


@dataclass(frozen=True)
class Rates:
    """Measured on the machine: what a byte costs on each path while generating."""
    pcie_bytes_per_s: float     # pinned host -> device copy
    cpu_bytes_per_s: float      # CPU computing a layer from host memory (incl. its transfers)
    gpu_token_seconds: float    # G: one token with every layer in VRAM


def token_seconds(G: float, c: float, p: float, overflow: float, streamed: float) -> float:
    """One generated token when `streamed` of the overflow bytes cross PCIe
    and the CPU computes the rest, both beside the G-second GPU part."""
    return max(G + c * (overflow - streamed), p * streamed)


def generate_splits(overflow: tuple[int, ...], layer_bytes, rates: Rates) -> list[tuple[tuple[int, ...], float]]:
    """Every way to split the overflow layers while generating, indexed by
    the number the CPU computes: (cpu layers, predicted seconds per token).
    The streamed layers are spread evenly through the overflow."""
    p, c, G = 1.0 / rates.pcie_bytes_per_s, 1.0 / rates.cpu_bytes_per_s, rates.gpu_token_seconds
    total = sum(layer_bytes[i] for i in overflow)
    splits = []
    for n_cpu in range(len(overflow) + 1):
        cpu = split_cpu_layers(overflow, n_cpu)
        x = total - sum(layer_bytes[i] for i in cpu)
        splits.append((cpu, token_seconds(G, c, p, total, x)))
    return splits


def split_cpu_layers(overflow: tuple[int, ...], n_cpu: int) -> tuple[int, ...]:
    """The CPU layers of the split with n_cpu of them: the streamed rest
    spread evenly through the overflow (independent of the rates, so the
    host memory a split takes is known before anything is measured)."""
    streamed = {overflow[j] for j in interleaved_layers(len(overflow), len(overflow) - n_cpu)}
    return tuple(i for i in overflow if i not in streamed)


def best_split(splits) -> int:
    """Index (CPU-layer count) of the fastest predicted split; on a tie the
    one with more CPU layers (fewer bytes over PCIe)."""
    return min(range(len(splits)), key=lambda n: (round(splits[n][1], 12), -n))


def tg_bound_seconds(G: float, c: float, p: float, O: float) -> float:
    """Best token time when O overflow bytes may be split at any byte: the
    minimum over x in [0, O] of token_seconds. The first term falls and the
    second rises with x, so the minimum is at their crossing, clamped."""
    x = min(max((G + c * O) / (p + c), 0.0), O) if p + c > 0 else O
    return token_seconds(G, c, p, O, x)


def pp_bound_tps(n_prompt: int, n_ubatch: int, ceiling_tps: float, streamed_bytes: float, bandwidth: float) -> float:
    """pp t/s bound: each ubatch takes at least max(all-in-VRAM compute,
    streamed bytes / PCIe bandwidth)."""
    n_ub = math.ceil(n_prompt / n_ubatch)
    per_ub = max(n_prompt / ceiling_tps / n_ub, streamed_bytes / bandwidth)
    return n_prompt / (n_ub * per_ub)
