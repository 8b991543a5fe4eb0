"""Our Q4_K kernel for CPU layers' decodes of a few rows (native/gs_gemm.c,
EngineConfig.cpu_gemm): the kernel against an independent reference, and in
the engine (host mode) against stock llama.cpp's plain kernels."""
from __future__ import annotations

import numpy as np
import pytest

import gguf_stream  # noqa: F401  (llama.cpp before numpy's own libraries)
from gguf_stream import native
from gguf_stream.config import GEMM_MIN_ROWS, EngineConfig, gemm_available
from gguf_stream.errors import EnvironmentMismatchError
from gguf_stream.model import StockModel, StreamedModel

needs_avx512 = pytest.mark.skipif(not native.gemm_available(), reason="the kernel needs AVX-512 BW/VL/VNNI")

N_LAYER = 8
HOST = dict(device="host", n_ctx=128, n_batch=64, n_ubatch=64, n_threads=2)
PROMPT = list(range(10, 22))  # 12 tokens: one 12-row decode on the CPU layers, then one-row decodes
N_GEN = 6


def q8_k(x: np.ndarray) -> np.ndarray:
    """x as llama.cpp's quantize_row_q8_K_ref rounds it (blocks of 256, the
    largest magnitude at -127, ties to even), back in float64."""
    b = x.reshape(-1, 256).astype(np.float32)
    big = b[np.arange(len(b)), np.argmax(np.abs(b), axis=1)]
    out = np.zeros(b.shape)
    nz = big != 0
    iscale = np.float32(-127.0) / big[nz]
    q = np.minimum(np.rint((iscale[:, None] * b[nz]).astype(np.float32)), 127)
    out[nz] = q * (np.float32(1) / iscale)[:, None]
    return out.reshape(x.shape)


@pytest.fixture(scope="module")
def matrix():
    import gguf
    from gguf.quants import dequantize

    from gguf_stream.synth_blocks import q4_k_blocks

    n, k = 96, 1024
    blocks = q4_k_blocks(np.random.default_rng(0), n * k // 256, 0.02)
    return blocks.tobytes(), n, k, dequantize(blocks.reshape(n, -1), gguf.GGMLQuantizationType.Q4_K).reshape(n, k)


@needs_avx512
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 16, 17, native.GEMM_MAX_ROWS])
def test_kernel_equals_the_dequantized_product(matrix, rows):
    """Every row count (chunks of 8 and their remainders): the product of the
    dequantized matrix with the rows quantized as llama.cpp quantizes them,
    to float rounding; an all-zero block of a row too. Control: the same
    rows with two sub-blocks of each block swapped (a layout slip) miss by far."""
    data, n, k, w = matrix
    x = np.random.default_rng(rows).standard_normal((rows, k)).astype(np.float32)
    x[0, :256] = 0
    got = np.array(native.gemm_test(data, n, k, x.ravel())).reshape(rows, n)
    want = q8_k(x) @ w.T.astype(np.float64)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-5 * scale
    slip = x.reshape(rows, -1, 8, 32)[:, :, [0, 2, 1, 3, 4, 5, 6, 7]].reshape(rows, k)
    assert np.abs(got - q8_k(slip) @ w.T.astype(np.float64)).max() > 1e-2 * scale


@pytest.fixture(scope="module")
def deep_path(tmp_path_factory):
    from gguf_stream.synth import Shape, write_synthetic

    shape = Shape("llama", n_layer=N_LAYER, n_embd=512, n_ff=1536, n_head=8, n_head_kv=4, n_vocab=8192,
                  ctx_len=512, rope_theta=10000.0)
    return write_synthetic(tmp_path_factory.mktemp("gemm") / "deep.gguf", shape, "Q4_K", seed=8)


@needs_avx512
def test_cpu_layers_on_our_kernel_give_stocks_tokens(deep_path):
    """Host mode, every layer on the CPU while generating, through our kernel
    (a 12-row decode, then one-row ones): stock's greedy tokens, logits
    within what another kernel's rounding moves them (stock with llama.cpp's
    repacked layout against its plain one: 0.028 sigma here, ours 0.028 sigma);
    no repacked copy (every matrix is Q4_K). Two layers' sources swapped
    must fail the same check."""
    with StockModel(deep_path, **HOST, cpu_repack=False) as s:
        ref_tokens, ref_logits = s.generate(PROMPT, N_GEN, with_logits=True)
    tol = 0.1 * float(np.std(ref_logits))
    before = native.gemm_nodes()
    with StreamedModel(deep_path, **HOST, cpu_gemm=True, cpu_repack=True, n_streamed=N_LAYER, n_slots=2,
                       generate_cpu_layers=list(range(N_LAYER)), graph_reuse=False) as m:
        tokens, logits = m.generate(PROMPT, N_GEN, with_logits=True)
        assert m.stats.counters.repacked_bytes == 0
        assert m.stats.counters.adoptions == 0  # nothing streamed: every layer ran on the CPU
        assert native.gemm_nodes() - before >= N_LAYER * 7 * N_GEN  # q, k, v, o, gate, up, down per layer and decode
        m.reset()
        m.engine.debug_swap_sources(1, N_LAYER // 2)
        m.engine.set_cpu_layers(list(range(N_LAYER)))  # the CPU layers' homes follow the swapped sources
        swapped_tokens, swapped = m.generate(PROMPT, N_GEN, with_logits=True)
    assert tokens == ref_tokens
    assert np.abs(np.asarray(logits) - np.asarray(ref_logits)).max() <= tol
    assert np.abs(np.asarray(swapped) - np.asarray(ref_logits)).max() > tol


def test_cpu_gemm_without_avx512_is_a_one_line_error(deep_path, monkeypatch):
    monkeypatch.setattr(native, "gemm_available", lambda: False)
    with pytest.raises(EnvironmentMismatchError, match="AVX-512 VNNI"):
        StreamedModel(deep_path, **HOST, cpu_gemm=True, n_streamed=N_LAYER, n_slots=2,
                      generate_cpu_layers=list(range(N_LAYER)))


def test_default_is_on_for_decodes_of_several_rows_where_the_cpu_has_it():
    assert not EngineConfig(device="host", n_seq_max=8).gemm  # host mode: stock's kernels
    assert not EngineConfig(device="cuda").gemm  # one sequence: one-row decodes keep llama.cpp's
    assert EngineConfig(device="cuda", generate_rows=GEMM_MIN_ROWS).gemm == gemm_available()
    assert EngineConfig(device="cuda", cpu_gemm=True).gemm
    assert not EngineConfig(device="cuda", n_seq_max=8, cpu_gemm=False).gemm
    with pytest.raises(ValueError, match="cpu_gemm"):
        EngineConfig(cpu_gemm="yes")


def test_the_plan_counts_no_copy_of_the_matrices_our_kernel_computes(deep_path):
    from gguf_stream import read_model
    from gguf_stream.memory import gemm_saved_bytes
    from gguf_stream.planner import make_plan, with_generate_placement

    mf = read_model(deep_path)
    plans = {g: make_plan(mf, n_streamed=4, n_ctx=256, n_ubatch=64, gemm=g) for g in (False, True)}
    cpu = plans[False].streamed[:2]
    hybrid = {g: with_generate_placement(p, cpu) for g, p in plans.items()}
    saved = gemm_saved_bytes(mf)
    assert hybrid[False].cpu_layer_host_bytes - hybrid[True].cpu_layer_host_bytes == sum(saved[i] for i in cpu) > 0
