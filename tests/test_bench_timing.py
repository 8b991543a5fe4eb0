"""gguf_stream/bench/timing.py: llama-bench's workload and timed loop, on a fake model."""
from __future__ import annotations

import io

from gguf_stream.bench.timing import Progress, Workload, decode_tps, workload_tokens


class FakeModel:
    """Records evals and device waits; BOS 1, a 100-token vocabulary."""

    n_vocab = 100

    def __init__(self, bos=1):
        self.bos, self.calls = bos, []

    def token_bos(self):
        return self.bos

    def eval(self, tokens):
        self.calls.append(("eval", list(tokens)))

    def synchronize(self):
        self.calls.append(("sync",))


def test_workload_tokens_start_at_bos_and_are_reproducible():
    m = FakeModel()
    pp, tg = workload_tokens(m, 16, 8, seed=42)
    assert len(pp) == 16 and len(tg) == 8 and pp[0] == 1 and tg[0] == 1
    assert all(0 <= t < m.n_vocab for t in pp + tg)
    assert (pp, tg) == workload_tokens(m, 16, 8, seed=42) and pp != workload_tokens(m, 16, 8, seed=7)[0]
    assert workload_tokens(m, 0, 4, seed=42)[0] == [] and workload_tokens(m, 4, 0, seed=42)[1] == []
    assert workload_tokens(FakeModel(bos=-1), 2, 2, seed=0)[0][0] == 0  # no BOS in the vocabulary: token 0


def test_decode_tps_waits_for_the_device_after_every_eval():
    m = FakeModel()
    assert decode_tps(m, [1, 2, 3], one_at_a_time=True) > 0
    assert m.calls == [("eval", [1]), ("sync",), ("eval", [2]), ("sync",), ("eval", [3]), ("sync",)]
    m.calls.clear()
    decode_tps(m, [1, 2, 3], one_at_a_time=False)
    assert m.calls == [("eval", [1, 2, 3]), ("sync",)]


def test_workload_context_holds_the_test_and_the_gate():
    assert Workload(n_prompt=2048, n_gen=128).n_ctx == 2176
    assert Workload(n_prompt=8, n_gen=2, check_tokens=16).n_ctx == 80


def test_progress_lines_go_to_stderr_unless_quiet():
    out = io.StringIO()
    Progress(stream=out)("hello")
    Progress(quiet=True, stream=out)("not shown")
    assert out.getvalue().endswith("s] hello\n") and "not shown" not in out.getvalue()
