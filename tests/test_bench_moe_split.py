"""bench --moe-split's extra runs (bench/moe_split.py) with a stand-in for
the sweep's context: one run per N, its rows under mode 'split N', its
tokens compared with the faster stock recipe's, a failed run a note."""

from types import SimpleNamespace

from gguf_stream.bench.gate import Greedy
from gguf_stream.bench.moe_split import moe_split_rows
from gguf_stream.errors import BudgetError


def test_one_run_per_n_with_its_rows_and_notes():
    runs = []

    def run_streamed(**kw):
        runs.append(kw)
        if kw["moe_split"] == 9:
            raise BudgetError("no room")
        tokens = (1, 2, 3) if kw["moe_split"] == 2 else (1, 5, 3)
        return SimpleNamespace(greedy=Greedy(tokens), engine_note="split experts (4 layers)", vram_peak=2 << 30)

    ctx = SimpleNamespace(moe_splits=(2, 3, 9), run_streamed=run_streamed,
                          rows=lambda t, budget, mode, refs: [mode])
    b = SimpleNamespace(nbytes=1 << 30, label="0.5x")
    notes = []
    rows = moe_split_rows(ctx, b, {}, notes, SimpleNamespace(greedy=Greedy((1, 2, 3))))
    assert rows == ["split 2", "split 3"]
    assert [r["moe_split"] for r in runs] == [2, 3, 9] and all(r["vram_budget"] == 1 << 30 for r in runs)
    text = "\n".join(notes)
    assert "moe-split 2: greedy tokens equal the faster stock recipe's (3)" in text
    assert "moe-split 3: greedy tokens first differ from the faster stock recipe's at 1" in text
    assert "moe-split 3 peak 2.00 GiB exceeds the budget" in text
    assert "moe-split 9 run failed: no room" in text
