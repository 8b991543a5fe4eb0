"""gguf_stream/bench/budgets.py: budgets of the command line, the stock -ngl search and the --n-cpu-moe one."""
from __future__ import annotations

import math

import pytest

from gguf_stream.bench.budgets import (Budget, largest_fitting, parse_budgets, search_stock_n_cpu_moe, search_stock_ngl,
                                        smallest_fitting)

GiB = 1 << 30


def test_parse_budgets():
    got = parse_budgets("4GiB, 0.5x,all,1000", model_bytes=8 * GiB)
    assert got == [Budget("4GiB", 4 * GiB), Budget("0.5x", 4 * GiB), Budget("all", None), Budget("1000", 1000)]


@pytest.mark.parametrize("spec", ["", "lots", "-1x", "0x", "fourx"])
def test_parse_budgets_rejects(spec):
    with pytest.raises(ValueError):
        parse_budgets(spec, GiB)


def fake_measure(base, per_layer, calls, fail_from=None):
    """VRAM of a stock load: fixed part + per offloaded layer; inf when it
    would not load at all."""
    def measure(ngl):
        calls.append(ngl)
        if fail_from is not None and ngl >= fail_from:
            return math.inf
        return base + per_layer * ngl
    return measure


@pytest.mark.parametrize("budget, want", [
    (1000 + 100 * 20, 20),  # exactly at the limit fits
    (1000 + 100 * 20 - 1, 19),
    (1000 + 100 * 33, 33),  # everything fits
    (10 ** 12, 33),
    (1000, 0),  # only the CPU split
    (999, None),  # nothing fits, not even ngl=0
])
def test_search_stock_ngl(budget, want):
    calls = []
    got = search_stock_ngl(33, budget, fake_measure(1000, 100, calls))
    assert (got[0] if got else None) == want
    if got:
        assert got[1] == 1000 + 100 * want <= budget
    assert len(set(calls)) <= math.ceil(math.log2(34)) + 1  # a binary search, not a scan


def test_search_treats_failed_loads_as_not_fitting():
    calls = []
    assert search_stock_ngl(33, 10 ** 12, fake_measure(1000, 100, calls, fail_from=25)) == (24, 1000 + 2400)


def test_largest_fitting_edges():
    assert largest_fitting(0, 0, lambda x: True) == 0
    assert largest_fitting(0, -1, lambda x: True) is None
    assert largest_fitting(3, 9, lambda x: x <= 5) == 5
    assert largest_fitting(3, 9, lambda x: False) is None


def fake_moe_measure(fixed, experts_per_layer, n_layer, calls, fail_below=None):
    """VRAM of a `-ngl all --n-cpu-moe n` load: the dense parts, KV and
    compute fixed, plus the experts of the n_layer - n layers left on the
    GPU; inf when so much is on the GPU that the load fails."""
    def measure(n):
        calls.append(n)
        if fail_below is not None and n < fail_below:
            return math.inf
        return fixed + experts_per_layer * (n_layer - n)
    return measure


@pytest.mark.parametrize("budget, want", [
    (1000 + 100 * (48 - 20), 20),  # exactly at the limit fits
    (1000 + 100 * (48 - 20) - 1, 21),  # a byte less: one more layer's experts to the CPU
    (1000 + 100 * 48, 0),  # everything fits: no expert on the CPU
    (10 ** 12, 0),
    (1000, 48),  # only with every layer's experts on the CPU
    (999, None),  # not even then
])
def test_search_stock_n_cpu_moe(budget, want):
    calls = []
    got = search_stock_n_cpu_moe(48, budget, fake_moe_measure(1000, 100, 48, calls))
    assert (got[0] if got else None) == want
    if got:
        assert got[1] == 1000 + 100 * (48 - want) <= budget
    assert calls[0] == 48  # the least VRAM first: whether anything fits at all
    assert len(set(calls)) <= math.ceil(math.log2(49)) + 1  # a binary search, not a scan


def test_n_cpu_moe_search_treats_failed_loads_as_not_fitting():
    assert search_stock_n_cpu_moe(48, 10 ** 12, fake_moe_measure(1000, 100, 48, [], fail_below=30)) == \
        (30, 1000 + 100 * 18)


def test_smallest_fitting_edges():
    assert smallest_fitting(0, 0, lambda x: True) == 0
    assert smallest_fitting(0, -1, lambda x: True) is None
    assert smallest_fitting(3, 9, lambda x: x >= 5) == 5
    assert smallest_fitting(3, 9, lambda x: False) is None
    assert smallest_fitting(3, 9, lambda x: True) == 3
