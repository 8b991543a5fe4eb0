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


def test_no_split_runs_where_the_budget_places_no_expert_layers():
    """A whole-layers plan (deepseek-v2-lite at 0.25x) or one below
    streaming's minimum has no expert layers to split: each N would load
    the same model again (minutes on the GPU box). A note says so; an
    experts plan, or no default run to look at, still runs them."""
    runs = []

    def run_streamed(**kw):
        runs.append(kw["moe_split"])
        return SimpleNamespace(greedy=None, engine_note="", vram_peak=None)

    ctx = SimpleNamespace(moe_splits=("off", 3), run_streamed=run_streamed, rows=lambda t, budget, mode, refs: [mode])
    b = SimpleNamespace(nbytes=1 << 30, label="0.25x")

    def default(part, stock_gpu_layers=None):
        return SimpleNamespace(plan=SimpleNamespace(part=part, stock_gpu_layers=stock_gpu_layers))

    for plan, why in ((default("layer"), "places whole layers"), (default("layer", 2), "below streaming's minimum")):
        notes = []
        assert moe_split_rows(ctx, b, {}, notes, None, default=plan) == [] and runs == []
        assert notes == [notes[0]] and "--moe-split / --prompt-cpu-experts not run" in notes[0] and why in notes[0]
    assert moe_split_rows(ctx, b, {}, [], None, default=default("experts")) == ["split off", "split 3"]
    assert moe_split_rows(ctx, b, {}, [], None) == ["split off", "split 3"]
    assert runs == ["off", 3, "off", 3]


def test_prompt_cpu_experts_runs_follow_the_split_runs():
    """--prompt-cpu-experts N: one more streamed run per N (mode
    'prompt-cpu N'), after --moe-split's, with that EngineConfig change."""
    runs = []

    def run_streamed(**kw):
        runs.append(kw)
        return SimpleNamespace(greedy=None, engine_note="", vram_peak=None)

    ctx = SimpleNamespace(moe_splits=(3,), prompt_cpu_experts=(8, 12), run_streamed=run_streamed,
                          rows=lambda t, budget, mode, refs: [mode])
    b = SimpleNamespace(nbytes=1 << 30, label="0.25x")
    assert moe_split_rows(ctx, b, {}, [], None) == ["split 3", "prompt-cpu 8", "prompt-cpu 12"]
    assert runs[1] == {"vram_budget": 1 << 30, "prompt_cpu_experts": 8} and runs[0]["moe_split"] == 3
