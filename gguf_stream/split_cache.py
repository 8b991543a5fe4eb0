"""The measured rates and timed splits, cached per machine, model and
options (rates.json in the cache directory): what calibrate.py measures
once and every later load of the model on this machine reads, and what
`plan` and placement.host_tiers look up before loading."""
from __future__ import annotations

import json
import math
import os
import platform
import tempfile
from dataclasses import asdict
from pathlib import Path

from .config import cache_dir
from .perfmodel import Rates, split_cpu_layers

RATES_VERSION = "4"  # bump when what calibrate.measure_rates measures changes


def _number(v) -> bool:
    """A finite JSON number (not a string or a bool that would convert to one)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class RatesCache:
    """rates.json in the cache directory: one entry per key. Written
    atomically; entries that do not read back as what was stored count as
    absent (a damaged or edited file only costs a re-measurement)."""

    def __init__(self, key: str, path: Path | None = None):
        self.key = key
        self.path = path or cache_dir() / "rates.json"

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write(self, key: str, value) -> None:
        data = self._read()
        data[key] = value
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".rates-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only home only costs a re-measurement next time

    def rates(self) -> Rates | None:
        entry = self._read().get(self.key)
        try:
            rates = Rates(**entry)
        except TypeError:
            return None
        ok = all(_number(v) for v in asdict(rates).values())
        return rates if ok and rates.pcie_bytes_per_s > 0 and rates.cpu_bytes_per_s > 0 \
            and rates.gpu_token_seconds >= 0 else None

    def put_rates(self, rates: Rates) -> None:
        self._write(self.key, asdict(rates))

    def split_trials(self, overflow: tuple[int, ...], most: int | None = None) -> dict[int, float] | None:
        """Timed splits of these candidate CPU layers, with at most `most` of
        them on the CPU (a host budget's room; None: any number)."""
        most = len(overflow) if most is None else most
        entry = self._read().get(self._split_key(overflow, most))
        try:
            trials = {int(n): t for n, t in entry.items()}
        except (AttributeError, TypeError, ValueError):
            return None
        ok = trials and all(0 <= n <= most and _number(t) and t > 0 for n, t in trials.items())
        return trials if ok else None

    def put_split_trials(self, overflow: tuple[int, ...], trials: dict[int, float], most: int | None = None) -> None:
        self._write(self._split_key(overflow, len(overflow) if most is None else most), trials)

    def _split_key(self, overflow: tuple[int, ...], most: int | None = None) -> str:
        key = self.key + "|split|" + ",".join(map(str, overflow))
        return key + (f"|most={most}" if most is not None and most < len(overflow) else "")


def fastest_split(trials: dict[int, float]) -> int:
    """The CPU-layer count of the fastest timed split (on a tie the one with
    more CPU layers: fewer bytes over PCIe)."""
    return min(trials, key=lambda n: (trials[n], -n))


def cached_split(cache: RatesCache, choices: tuple[int, ...], most: int) -> tuple[int, ...] | None:
    """The CPU layers of the split calibrated before for these candidates
    (at most `most` of them), as a load would take it from the cache; None
    when the cache lacks it (the load then measures)."""
    trials = cache.split_trials(choices, most)
    if cache.rates() is None or trials is None:
        return None
    return split_cpu_layers(choices, fastest_split(trials))


def cache_key(path: str, config, device_total: int | None) -> str:
    """What the measured rates depend on: this code's version, the machine
    and its GPU, the model file, the options that change the CPU path and
    the rows per decode they are measured for (config.split_rows), and a
    given --max-slots (the default's slots follow from the rest; a split
    timed with a third slot is not one timed without)."""
    st = os.stat(path)
    key = [RATES_VERSION, platform.node(), str(device_total), os.path.abspath(path), str(st.st_size),
           str(int(st.st_mtime)), str(config.threads), str(config.repack),
           str(config.cpu_layer_host_kv), str(config.cpu_layer_device)]
    key += [f"rows={config.split_rows}", f"tb={config.threads_batch}"] if config.split_rows > 1 else []
    return "|".join(key + ([f"max_slots={config.max_slots}"] if config.max_slots is not None else []))


def split_lookup(path: str, config, device_total: int | None):
    """(choices, most) -> cached_split for this model, machine and config: what
    the load will find in the cache (placement.host_tiers asks it before loading)."""
    cache = RatesCache(cache_key(path, config, device_total))
    return lambda choices, most: cached_split(cache, tuple(choices), most)
