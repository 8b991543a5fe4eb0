"""gguf_stream/bench/budgets.py: budgets of the command line and the stock -ngl search."""
from __future__ import annotations

import math

import pytest

from gguf_stream.bench.budgets import Budget, largest_fitting, parse_budgets, search_stock_ngl

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
