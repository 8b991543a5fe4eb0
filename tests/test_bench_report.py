"""gguf_stream/bench/rows.py and report.py: rows, statistics and the three
formats, with fabricated data. row() and result() serve the other bench tests."""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import fields

import pytest

from gguf_stream.bench.report import MD_COLUMNS, render_csv, render_json, render_md
from gguf_stream.bench.rows import BenchResult, Row, mean_sd

GiB = 1 << 30


def row(**kw) -> Row:
    base = dict(model="m", size_bytes=GiB, params=8_000_000_000, backend="CUDA", budget="4GiB", budget_bytes=4 * GiB,
                mode="stock", ngl=20, n_streamed=None, n_slots=None, streamed_bytes=None, n_ubatch=2048,
                test="pp2048", tps_mean=100.0, tps_sd=1.5, ratio=1.0, vram_peak_bytes=3 * GiB,
                pinned_host_bytes=None, waits=None, sync_fallbacks=None, uploads=None, check="")
    base.update(kw)
    return Row(**base)


def result(check="ok") -> BenchResult:
    rows = (row(), row(mode="streamed", ngl=None, n_streamed=8, n_slots=2, tps_mean=150.0, ratio=1.5,
                       pinned_host_bytes=GiB, waits=0.0, sync_fallbacks=0.0, uploads=8.0, check=check))
    return BenchResult(rows, {"model": "m"}, ("a note",))


def test_mean_sd_is_sample_stddev():
    assert mean_sd([2.0, 4.0]) == (3.0, math.sqrt(2))
    assert mean_sd([5.0]) == (5.0, 0.0)


def test_row_is_frozen():
    with pytest.raises(Exception):
        row().tps_mean = 1.0


def test_render_md():
    md = render_md(result())
    lines = md.splitlines()
    assert lines[0] == "| " + " | ".join(MD_COLUMNS) + " |"
    assert len(lines[2].split("|")) == len(MD_COLUMNS) + 2
    assert "| 150.00 ± 0.00 |" not in md and "150.00 ± 1.50" in md
    assert "| 8 ×2 |" in md and "| 0/0/8 |" in md and "| 1.50 |" in md
    assert "- a note" in md and "MISMATCH" not in md


def test_mismatch_is_loud_in_every_format():
    res = result(check="MISMATCH@3")
    assert res.mismatch
    md = render_md(res)
    assert "**MISMATCH@3**" in md and "MISMATCH: streamed greedy tokens differ" in md
    assert "MISMATCH@3" in render_csv(res)
    assert json.loads(render_json(res))["mismatch"] is True


def test_render_csv_and_json_carry_every_field():
    res = result()
    rows = list(csv.DictReader(io.StringIO(render_csv(res))))
    assert list(rows[0]) == [f.name for f in fields(Row)] and len(rows) == 2
    assert rows[0]["n_streamed"] == "" and float(rows[1]["tps_mean"]) == 150.0
    doc = json.loads(render_json(res))
    assert set(doc) == {"meta", "rows", "notes", "mismatch"}
    assert doc["rows"][1]["n_slots"] == 2 and doc["mismatch"] is False
