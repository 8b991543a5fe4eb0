"""The gate without all-in-VRAM tokens, on real llama.cpp runs (host mode, CPU only).

On the GPU, stock -ngl k computes layers 0..n-k with the CPU's kernels and
the rest with the GPU's, which round differently. Here two real CPU kernel
layouts stand in for the two devices: llama.cpp's repacked layout (what
stock's CPU layers use) for "CPU", the plain layout of the engine's host
slots for "GPU". With cpu_repack=True a host-mode StreamedModel computes its
resident layers from the repacked weights and its streamed layers from the
plain slots, so streamed_layers places the "GPU" layers:

* stock ngl=k: the last k-1 layers streamed (layers 0..n-k "on the CPU");
* its mirror: the first k-1 layers streamed (layers k-1..n-1 "on the CPU");
* stock ngl=0: StockModel, every layer repacked;
* streamed (gguf-stream's fast mode): every layer streamed for the prompt,
  every third one computed from a repacked copy while generating;
* the negative control: that run with two layers' sources swapped.

The runs reproduce the GPU box's failure (the -ngl splits share layer 0's
rounding, so their mutual deviation is smaller than streamed's honest one)
and show that the mirror calibrates: the honest run passes, the swap fails.
"""
from __future__ import annotations

import pytest

from gguf_stream.bench.gate import PEER_MARGIN, deviation_to_flip
from gguf_stream.bench.sweep import GateRun, gate_runs
from gguf_stream.bench.timing import gate_tokens

from gguf_stream.config import cuda_available

# The stand-in needs a CPU-only build: with CUDA, llama.cpp keeps host weights
# in pinned buffers with other kernels, and on the GPU box's native build the
# two layouts rounded alike (deviation 0.0); test_gpu_mirror_... covers it there.
cpu_build_only = pytest.mark.skipif(cuda_available(), reason="the two CPU layouts stand in for two devices only "
                                    "on a CPU-only build of llama.cpp (the GPU test below covers a CUDA one)")

N_LAYER, K = 16, 4  # stock ngl=4: 13 of 16 layers on the "CPU", as a big model at a small budget
HOST = dict(device="host", n_ctx=128, n_batch=64, n_ubatch=64, n_threads=1, cpu_repack=True)
N_TOKENS = 16


@pytest.fixture(scope="module")
def deep_path(tmp_path_factory):
    """A random Q4_K llama deep and wide enough that rounding grows through
    the layers as on the GPU box's synthetic models (26 MiB)."""
    from gguf_stream.synth import Shape, write_synthetic

    shape = Shape("llama", n_layer=N_LAYER, n_embd=512, n_ff=1536, n_head=8, n_head_kv=4, n_vocab=8192,
                  ctx_len=512, rope_theta=10000.0)
    return write_synthetic(tmp_path_factory.mktemp("deep") / "deep.gguf", shape, "Q4_K", seed=8)  # 8: streamed flips a tie here


@pytest.fixture(scope="module")
def runs(deep_path):
    from gguf_stream.model import StockModel, StreamedModel

    def streamed(layers, **kw):
        with StreamedModel(deep_path, **HOST, streamed_layers=tuple(layers), n_slots=2, **kw) as m:
            return gate_tokens(m, N_TOKENS)

    out = {"stock ngl=4": streamed(range(N_LAYER - K + 1, N_LAYER)),
           "mirror of stock ngl=4": streamed(range(K - 1)),
           "stock ngl=8": streamed(range(N_LAYER - 8 + 1, N_LAYER))}
    with StockModel(deep_path, **HOST) as s:
        out["stock ngl=0"] = gate_tokens(s, N_TOKENS)
    cpu = tuple(range(0, N_LAYER, 3))
    with StreamedModel(deep_path, **HOST, streamed_layers=tuple(range(N_LAYER)), n_slots=2,
                       generate_cpu_layers=cpu, graph_reuse=False) as m:
        assert m.stats.counters.repacked_bytes > 0  # the CPU layers compute from repacked copies
        out["streamed"] = gate_tokens(m, N_TOKENS)
        m.reset()
        m.engine.debug_swap_sources(1, N_LAYER // 2)
        out["swapped"] = gate_tokens(m, N_TOKENS)
    return out


def _dev(runs, ref, other) -> float:
    return deviation_to_flip(runs[ref], runs[other])[1]


@cpu_build_only
def test_the_two_layouts_round_differently(runs):
    assert 0 < _dev(runs, "stock ngl=4", "stock ngl=0") < 0.05
    assert _dev(runs, "stock ngl=4", "streamed") > 0


@cpu_build_only
def test_ngl_splits_share_layer_0_and_undercalibrate(runs):
    """The GPU box's --no-ceiling run had one budget's split and the CPU-rate
    run's stock ngl=0: both compute layer 0 on the CPU, and their deviation
    from each other, even with the margin, is below streamed's honest one."""
    peer = _dev(runs, "stock ngl=4", "stock ngl=0")
    honest = _dev(runs, "stock ngl=4", "streamed")
    assert honest > PEER_MARGIN * peer, (honest, peer)
    if runs["streamed"].tokens != runs["stock ngl=4"].tokens:  # a flip: the old rule's verdict, as on the GPU box
        check, = gate_runs([GateRun(4, runs["stock ngl=4"], runs["streamed"])], None,
                           {(0, 0): runs["stock ngl=0"]})
        assert check.startswith("MISMATCH@"), check


@cpu_build_only
def test_the_mirror_calibrates_honest_from_wrong(runs):
    """The mirror differs from stock from layer 0 on, as streamed does: its
    deviation (with the margin) covers streamed's, and a swapped layer lies
    far above it; gate_runs' verdicts follow, flag or not."""
    mirror = _dev(runs, "stock ngl=4", "mirror of stock ngl=4")
    assert _dev(runs, "stock ngl=4", "streamed") <= PEER_MARGIN * mirror
    swapped = _dev(runs, "stock ngl=4", "swapped")
    assert swapped > 3 * PEER_MARGIN * mirror, (swapped, mirror)
    splits = {(0, 0): runs["stock ngl=0"], (8, 0): runs["stock ngl=8"], (4, 0): runs["stock ngl=4"]}
    for allow in (False, True):
        honest, wrong = gate_runs(
            [GateRun(4, runs["stock ngl=4"], runs[name], mirror=runs["mirror of stock ngl=4"],
                     mirror_name="mirror of stock ngl=4") for name in ("streamed", "swapped")],
            None, splits, allow)
        assert honest.startswith("ok"), honest
        assert wrong.startswith("MISMATCH@") and "above 1.5x" in wrong, wrong


# ------------------------------------------------------------------ the mirror recipe

@pytest.mark.parametrize("ngl, n_cpu_moe, layers, experts_only", [
    (4, 0, tuple(range(3, 16)), False),  # stock -ngl 4: layers 0..12 in host memory -> 3..15
    (16, 0, (15,), False),  # layer 0 alone -> layer 15 alone
    (17, 5, (11, 12, 13, 14, 15), True),  # --n-cpu-moe 5: experts of 0..4 -> 11..15
    (17, 0, None, None),  # all in VRAM: nothing in host memory
    (1, 0, None, None),  # only the output layer on the GPU: every layer in host memory, the mirror is the same
    (0, 0, None, None), (None, 0, None, None),  # nothing on the GPU; no recipe fit
    (17, 16, None, None),  # every layer's experts in host memory
])
def test_mirror_of(ngl, n_cpu_moe, layers, experts_only):
    from gguf_stream.bench.mirror import mirror_of

    m = mirror_of(16, ngl, n_cpu_moe, "stock")
    assert (m.layers, m.experts_only) == (layers, experts_only) if layers else m is None
    if m is not None:
        assert len(m.layers) == (n_cpu_moe or 17 - ngl)  # as much in host memory as the stock run keeps there
        assert m.recipe.startswith("-ngl 17 -ot ") and m.label == "mirror of stock"


def test_mirror_pattern_names_exactly_its_tensors(tiny_moe_path):
    import re

    from gguf_stream.bench.mirror import mirror_of
    from gguf_stream.gguf_file import read_model

    mf = read_model(tiny_moe_path)
    names = [t.name for t in mf.tensors]
    whole, experts = mirror_of(4, 3, 0, "s"), mirror_of(4, 5, 2, "s")
    assert whole.layers == (2, 3) and experts.layers == (2, 3)
    hit = [n for n in names if re.search(whole.pattern, n)]
    assert hit and all(n.startswith(("blk.2.", "blk.3.")) for n in hit)
    assert len(hit) == sum(n.startswith(("blk.2.", "blk.3.")) for n in names)
    hit = [n for n in names if re.search(experts.pattern, n)]  # llama.cpp searches the pattern unanchored
    assert hit and all(n.startswith(("blk.2.", "blk.3.")) and "_exps" in n for n in hit)


@cpu_build_only
def test_mirror_stock_loads_and_runs(tiny_path):
    """MirrorStock is stock llama.cpp with an override: it loads, and on the
    CPU (where every layer is in host memory anyway) computes what stock does."""
    import numpy as np

    from gguf_stream.bench.mirror import MirrorStock, mirror_of
    from gguf_stream.config import EngineConfig
    from gguf_stream.model import StockModel

    config = EngineConfig(**{**HOST, "cpu_repack": None})
    with StockModel(tiny_path, 0, config) as s:
        ref = gate_tokens(s, 4)
    with MirrorStock(tiny_path, mirror_of(8, 3, 0, "stock ngl=3"), config) as m:
        got = gate_tokens(m, 4)
    assert got.tokens == ref.tokens and np.array_equal(got.logits, ref.logits)


# ------------------------------------------------------------------ the same on a GPU (skipped without one)

@pytest.mark.gpu
def test_gpu_mirror_calibrates_honest_from_wrong(deep_path):
    """The real placements: stock -ngl 4 (layers 0..12 on the CPU), its
    mirror (-ngl 17 -ot layers 3..15 to the CPU), streamed (every layer
    through the slots, every third one on the CPU while generating) and
    that run with two layers' sources swapped."""
    from gguf_stream.bench.mirror import MirrorStock, mirror_of
    from gguf_stream.config import EngineConfig, cuda_available
    from gguf_stream.model import StockModel, StreamedModel

    if not cuda_available():
        pytest.skip("needs a CUDA build of llama-cpp-python and a GPU")
    config = EngineConfig(n_ctx=128, n_batch=64, n_ubatch=64, device="cuda")
    with StockModel(deep_path, K, config) as s:
        stock = gate_tokens(s, N_TOKENS)
    mirror = mirror_of(N_LAYER, K, 0, f"stock ngl={K}")
    with MirrorStock(deep_path, mirror, config) as m:
        mirrored = gate_tokens(m, N_TOKENS)
    with StreamedModel(deep_path, config=EngineConfig(n_ctx=128, n_batch=64, n_ubatch=64, device="cuda",
                                                       streamed_layers=tuple(range(N_LAYER)), n_slots=2,
                                                       generate_cpu_layers=tuple(range(0, N_LAYER, 3)))) as m:
        streamed = gate_tokens(m, N_TOKENS)
        m.reset()
        m.engine.debug_swap_sources(1, N_LAYER // 2)
        swapped = gate_tokens(m, N_TOKENS)
    own = deviation_to_flip(stock, mirrored)[1]
    assert own > 0  # the mirror rounds differently from stock: it calibrates something
    assert deviation_to_flip(stock, streamed)[1] <= PEER_MARGIN * own
    assert deviation_to_flip(stock, swapped)[1] > 3 * PEER_MARGIN * own
    honest, wrong = gate_runs([GateRun(K, stock, g, mirror=mirrored, mirror_name=mirror.label)
                               for g in (streamed, swapped)], None, {})
    assert honest.startswith("ok") and wrong.startswith("MISMATCH@"), (honest, wrong)
