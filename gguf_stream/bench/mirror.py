"""The gate's calibration run without all-in-VRAM tokens: a stock split's
mirror.

Without an all-in-VRAM run the gate compares streamed with the budget's
stock run, itself one rounding of the model, and must know how far another
legitimate rounding lies from it. Stock -ngl splits of one sweep do not
tell: every one of them computes layer 0 (and the layers after it, up to
its split) on the CPU, so they agree on the first layers, and a rounding
difference that starts at layer 0 grows through all the layers after it
(on random-weight models it dominates). Streamed computes layer 0 on the
GPU, so it differs from stock from layer 0 on, by more than the splits
differ from each other: an honest run failed the gate that way.

The mirror is llama.cpp's own placement that differs from the stock run
from layer 0 on too: the same number of layers (or, for --n-cpu-moe, expert
tensors) in host memory, but the last ones instead of the first, i.e.
`-ngl all -ot "blk\\.(k|...|n-1)\\.=CPU"`. It runs for the gate's tokens
only (no timing, not held to the budget: it only has to load on the device).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

from .. import llama_abi, native
from ..model import StockModel


@dataclass(frozen=True)
class Mirror:
    """A stock recipe's mirror: every layer on the GPU (ngl = n_layer + 1)
    except what pattern moves to host memory (the tensors of layers, whole or
    their experts only)."""

    n_layer: int
    layers: tuple[int, ...]
    experts_only: bool
    of: str  # the mirrored stock run's label

    @property
    def pattern(self) -> str:
        """llama.cpp's -ot pattern (the rule --n-cpu-moe builds, for other layers)."""
        if self.experts_only:
            return r"blk\.(" + "|".join(map(str, self.layers)) + ")" + llama_abi.LLM_FFN_EXPS_REGEX
        return llama_abi.layer_pattern(self.layers)

    @property
    def label(self) -> str:
        return f"mirror of {self.of}"

    @property
    def recipe(self) -> str:
        """What llama.cpp is told, as its command line would say it."""
        what = "the expert tensors of layers" if self.experts_only else "layers"
        return (f"-ngl {self.n_layer + 1} -ot \"{self.pattern}=CPU\" ({what} {self.layers[0]}..{self.layers[-1]} "
                "in host memory)")


def mirror_of(n_layer: int, ngl: int | None, n_cpu_moe: int, label: str) -> Mirror | None:
    """The mirror of stock `-ngl ngl` (CPU layers 0..n_layer-ngl) or of
    `-ngl all --n-cpu-moe N` (the experts of layers 0..N-1 in host memory);
    None where there is nothing to mirror (no recipe, everything on the GPU,
    or what is in host memory already reaches the last layer: no GPU layer
    to move to the front)."""
    if ngl is None:
        return None
    if n_cpu_moe:
        if n_cpu_moe >= n_layer:
            return None
        return Mirror(n_layer, tuple(range(n_layer - n_cpu_moe, n_layer)), True, label)
    n_cpu = n_layer + 1 - ngl  # llama.cpp counts the output layer as the last one it offloads
    if n_cpu <= 0 or n_cpu >= n_layer:
        return None
    return Mirror(n_layer, tuple(range(n_layer - n_cpu, n_layer)), False, label)


class MirrorStock(StockModel):
    """Stock llama.cpp at -ngl all with mirror.pattern's tensors overridden
    to the CPU buffer type (as --n-cpu-moe does for the first N layers'
    experts): their weights stay in host memory and the CPU computes them."""

    def __init__(self, path, mirror: Mirror, config):
        self.mirror = mirror
        self._mirror_overrides = None  # kept as long as the model
        super().__init__(path, mirror.n_layer + 1, config)

    def _load_stock_model(self, *, params, **kw):
        cpu_buft = native.device_bufts("CPU")[0]  # resolved through llama.cpp's CPU list, like stock's CPU layers
        self._mirror_overrides = llama_abi.buft_overrides([(self.mirror.pattern, cpu_buft)])
        params.tensor_buft_overrides = ctypes.addressof(self._mirror_overrides)
        return super()._load_stock_model(params=params, **kw)
