"""The performance model shared by the planner's generate split and the bench's bounds."""
import pytest

from gguf_stream.perfmodel import Rates, best_split, generate_splits, pp_bound_tps, tg_bound_seconds, token_seconds
from gguf_stream.planner import interleaved_layers


def test_generate_splits_follow_the_token_time_model():
    """4 overflow layers of 100 bytes, 1 s per layer on each path: a token
    takes max(G + CPU layers, streamed layers) seconds."""
    overflow, layer_bytes = (2, 5, 8, 11), {i: 100 for i in range(12)}
    for G, best in ((0.0, 2), (1.0, 2), (3.0, 1)):
        splits = generate_splits(overflow, layer_bytes, Rates(100.0, 100.0, G))
        assert [t for _, t in splits] == pytest.approx([max(G + n, 4 - n) for n in range(5)])
        assert [len(cpu) for cpu, _ in splits] == [0, 1, 2, 3, 4]
        assert all(set(cpu) <= set(overflow) for cpu, _ in splits)
        assert best_split(splits) == best  # G=1: 1 and 2 CPU layers tie at 3 s; more CPU, fewer bytes over PCIe
    # the streamed ones are spread through the overflow, like every placement
    cpu, _ = generate_splits(overflow, layer_bytes, Rates(100.0, 100.0, 0.0))[2]
    assert tuple(i for i in overflow if i not in cpu) == tuple(overflow[j] for j in interleaved_layers(4, 2))


def test_tg_bound():
    G, c, p, O = 0.004, 1 / 60e9, 1 / 50e9, 1e9
    t = tg_bound_seconds(G, c, p, O)
    # better than either pure strategy, and both paths finish together
    assert t < min(G + c * O, max(G, p * O))
    x = (G + c * O) / (p + c)
    assert t == pytest.approx(p * x) == pytest.approx(G + c * (O - x))
    assert tg_bound_seconds(G, c, p, 0) == G  # nothing to move
    # a very slow CPU: stream everything
    assert tg_bound_seconds(G, 1.0, p, O) == pytest.approx(max(G, p * O), rel=1e-4)


def test_pp_bound():
    # copy shorter than compute: the all-in-VRAM speed
    assert pp_bound_tps(2048, 2048, 10000, 1e9, 50e9) == pytest.approx(10000)
    # copy longer than compute: bytes / bandwidth per ubatch
    assert pp_bound_tps(2048, 2048, 10000, 20e9, 50e9) == pytest.approx(2048 / 0.4)
    assert pp_bound_tps(4096, 2048, 10000, 20e9, 50e9) == pytest.approx(4096 / 0.8)


def test_bound_is_the_best_split_at_byte_granularity():
    """The tg bound is the best the split could do with layers of one byte:
    no split of whole layers beats it, and the best one is close to it."""
    overflow, layer_bytes = tuple(range(40)), {i: 1 for i in range(40)}
    rates = Rates(pcie_bytes_per_s=50.0, cpu_bytes_per_s=60.0, gpu_token_seconds=0.1)
    splits = generate_splits(overflow, layer_bytes, rates)
    bound = tg_bound_seconds(0.1, 1 / 60.0, 1 / 50.0, 40)
    best = splits[best_split(splits)][1]
    assert bound <= best <= bound + 1 / 50.0
    assert token_seconds(0.1, 1 / 60.0, 1 / 50.0, 40, 0) == pytest.approx(0.1 + 40 / 60.0)
