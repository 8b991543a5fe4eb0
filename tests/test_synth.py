"""Tests for gguf_stream/synth.py: random-weight GGUF files with real model shapes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from conftest import needs_no_amx
from gguf_stream.synth import MOE_ATTN_OUTPUT_STD, SHAPES, main, write_synthetic

TINY = SHAPES["tiny"]
QTYPES = ["Q4_K", "Q8_0"]


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict[tuple[str, int], Path]:
    d = tmp_path_factory.mktemp("synth")
    return {(qt, seed): write_synthetic(d / f"tiny-{qt}-{seed}.gguf", TINY, qt, seed=seed)
            for qt in QTYPES for seed in (0, 1)}


def _expected_shapes(s=TINY) -> dict[str, tuple[int, ...]]:
    """GGUF (ggml order: row length first) shape of every tensor."""
    e, ff, kv = s.n_embd, s.n_ff, s.n_head_kv * (s.n_embd // s.n_head)
    out = {"token_embd.weight": (e, s.n_vocab), "output_norm.weight": (e,), "output.weight": (e, s.n_vocab)}
    for i in range(s.n_layer):
        out.update({f"blk.{i}.attn_norm.weight": (e,), f"blk.{i}.attn_q.weight": (e, e),
                    f"blk.{i}.attn_k.weight": (e, kv), f"blk.{i}.attn_v.weight": (e, kv),
                    f"blk.{i}.attn_output.weight": (e, e), f"blk.{i}.ffn_norm.weight": (e,),
                    f"blk.{i}.ffn_gate.weight": (e, ff), f"blk.{i}.ffn_up.weight": (e, ff),
                    f"blk.{i}.ffn_down.weight": (ff, e)})
    return out


def _field(reader, key):
    f = reader.fields[key]
    return f.parts[f.data[0]][0] if f.types[0] != gguf.GGUFValueType.STRING else bytes(f.parts[f.data[0]]).decode()


@pytest.mark.parametrize("qtype", QTYPES)
def test_structure_and_metadata(tiny_files, qtype):
    r = gguf.GGUFReader(tiny_files[(qtype, 0)])
    tensors = {t.name: t for t in r.tensors}
    expected = _expected_shapes()
    assert set(tensors) == set(expected)
    assert len(r.tensors) == 3 + 9 * TINY.n_layer
    for name, shape in expected.items():
        t = tensors[name]
        assert tuple(int(x) for x in t.shape) == shape, name
        want = gguf.GGMLQuantizationType.F32 if len(shape) == 1 else gguf.GGMLQuantizationType[qtype]
        assert t.tensor_type == want, name

    assert _field(r, "general.architecture") == "llama"
    assert _field(r, "llama.block_count") == TINY.n_layer
    assert _field(r, "llama.embedding_length") == TINY.n_embd
    assert _field(r, "llama.feed_forward_length") == TINY.n_ff
    assert _field(r, "llama.attention.head_count") == TINY.n_head
    assert _field(r, "llama.attention.head_count_kv") == TINY.n_head_kv
    assert _field(r, "llama.rope.dimension_count") == TINY.n_embd // TINY.n_head
    assert _field(r, "tokenizer.ggml.model") == "llama"
    assert len(r.fields["tokenizer.ggml.tokens"].data) == TINY.n_vocab


@pytest.mark.parametrize("qtype", QTYPES)
def test_layers_have_distinct_bytes(tiny_files, qtype):
    r = gguf.GGUFReader(tiny_files[(qtype, 0)])
    tensors = {t.name: t for t in r.tensors}
    for kind in ("attn_q", "ffn_down", "attn_norm"):
        datas = [bytes(np.asarray(tensors[f"blk.{i}.{kind}.weight"].data)) for i in range(TINY.n_layer)]
        assert len(set(datas)) == TINY.n_layer, kind
    # a different seed gives different bytes, the same seed the same bytes
    r1 = gguf.GGUFReader(tiny_files[(qtype, 1)])
    a = np.asarray(tensors["blk.3.ffn_up.weight"].data)
    b = np.asarray({t.name: t for t in r1.tensors}["blk.3.ffn_up.weight"].data)
    assert not np.array_equal(a, b)


def test_deterministic(tmp_path, tiny_files):
    again = write_synthetic(tmp_path / "again.gguf", "tiny", "Q4_K", seed=0)
    assert again.read_bytes() == tiny_files[("Q4_K", 0)].read_bytes()


@pytest.mark.parametrize("qtype", QTYPES)
def test_dequantized_values(tiny_files, qtype):
    r = gguf.GGUFReader(tiny_files[(qtype, 0)])
    for t in r.tensors:
        x = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        assert np.isfinite(x).all(), t.name
        if "norm" in t.name:
            assert abs(x.mean() - 1.0) < 0.01 and x.std() < 0.05, t.name
        elif t.name == "token_embd.weight":
            assert abs(x.mean()) < 0.02 and 0.5 < x.std() < 2.0
        else:
            assert abs(x.mean()) < 2e-3, t.name
            assert 0.01 < x.std() < 0.04, t.name
            # every Q4_K sub-block / Q8_0 block is symmetric about 0
            assert abs(x.reshape(-1, 32).mean(axis=1)).max() < 0.02, t.name


def test_cli(tmp_path, capsys):
    assert main(["--list"]) == 0
    assert "llama3-8b" in capsys.readouterr().out
    out = tmp_path / "cli.gguf"
    assert main([str(out), "--shape", "tiny", "--type", "Q8_0", "--seed", "3", "-q"]) == 0
    assert str(out) in capsys.readouterr().out and out.stat().st_size > 0


def test_8b_shape_sizes():
    s = SHAPES["llama3-8b"]
    assert (s.n_layer, s.n_embd, s.n_ff, s.n_head, s.n_head_kv, s.n_vocab) == (32, 4096, 14336, 32, 8, 128256)
    for s in SHAPES.values():  # Q4_K throughout (MoE shapes: Q5_0 where rows of n_ff* do not fit, see below)
        # (gpt-oss's 2880 fits neither: Q5_0 throughout, MXFP4 experts, test_gpt_oss_shapes)
        assert (s.n_embd % 256 == 0 or s.arch == "gpt-oss") and (s.is_moe or s.n_ff % 256 == 0)


def _logits(path: Path, tokens: list[int]) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp")
    m = llama_cpp.Llama(str(path), n_ctx=64, verbose=False, n_gpu_layers=0, logits_all=True)
    try:
        m.eval(tokens)
        return np.array(m.scores[: m.n_tokens])
    finally:
        m.close()


@needs_no_amx  # a plain llama_cpp.Llama repacks its weights
@pytest.mark.parametrize("qtype", QTYPES)
def test_llama_cpp_runs(tiny_files, qtype):
    llama_cpp = pytest.importorskip("llama_cpp")
    path = tiny_files[(qtype, 0)]
    m = llama_cpp.Llama(str(path), n_ctx=64, verbose=False, n_gpu_layers=0)
    try:
        text = "Hello, world! \u00e9\u20ac 123".encode()
        toks = m.tokenize(text)
        assert toks[0] == 1 and len(toks) > 5
        assert m.detokenize(toks[1:]).strip() == text.strip()
    finally:
        m.close()
    logits0 = _logits(path, toks)
    assert logits0.shape == (len(toks), TINY.n_vocab)
    assert np.isfinite(logits0).all() and logits0.std() > 1e-3
    logits1 = _logits(tiny_files[(qtype, 1)], toks)
    assert np.isfinite(logits1).all()
    assert not np.allclose(logits0, logits1)


# ------------------------------------------------------------------ mixture of experts (qwen3moe)

MOE = SHAPES["tiny-moe"]
N_MOE_TOKENS = 4
MOE_PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def moe_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("synth-moe")
    return {qt: write_synthetic(d / f"tiny-moe-{qt}.gguf", MOE, qt, seed=0) for qt in QTYPES}


def _expected_moe_layer(s=MOE) -> dict[str, tuple[tuple[int, ...], str]]:
    """ggml shape (ne) and type of one qwen3moe layer's tensors (llama.cpp's create_tensor calls)."""
    e, hd, n_exp, ff = s.n_embd, s.head_dim, s.n_expert, s.n_ff_exp
    q, kv = s.n_head * hd, s.n_head_kv * hd
    return {"attn_norm": ((e,), "F32"), "attn_q": ((e, q), "Q"), "attn_k": ((e, kv), "Q"),
            "attn_v": ((e, kv), "Q"), "attn_output": ((q, e), "Q"), "attn_q_norm": ((hd,), "F32"),
            "attn_k_norm": ((hd,), "F32"), "ffn_norm": ((e,), "F32"), "ffn_gate_inp": ((e, n_exp), "F32"),
            "ffn_gate_exps": ((e, ff, n_exp), "Q"), "ffn_up_exps": ((e, ff, n_exp), "Q"),
            "ffn_down_exps": ((ff, e, n_exp), "Q")}


@pytest.mark.parametrize("qtype", QTYPES)
def test_moe_structure(moe_files, qtype):
    from gguf_stream.gguf_file import read_model

    m = read_model(moe_files[qtype])  # validate.py's header checks run here
    assert (m.arch, m.n_layer) == ("qwen3moe", MOE.n_layer)
    assert (m.hparams["key_length"], m.hparams["value_length"]) == (MOE.head_dim, MOE.head_dim)
    tensors = {t.name: t for t in m.tensors}
    assert len(tensors) == 3 + 12 * MOE.n_layer
    for il in range(MOE.n_layer):
        for kind, (shape, qt) in _expected_moe_layer().items():
            t = tensors[f"blk.{il}.{kind}.weight"]
            assert (t.shape, t.qtype) == (shape, qtype if qt == "Q" else qt), t.name

    r = gguf.GGUFReader(moe_files[qtype])
    assert _field(r, "general.architecture") == "qwen3moe"
    assert _field(r, "qwen3moe.expert_count") == MOE.n_expert
    assert _field(r, "qwen3moe.expert_used_count") == MOE.n_expert_used
    assert _field(r, "qwen3moe.expert_feed_forward_length") == MOE.n_ff_exp
    assert _field(r, "qwen3moe.attention.key_length") == MOE.head_dim


def test_moe_experts_and_router(moe_files):
    r = gguf.GGUFReader(moe_files["Q4_K"])
    tensors = {t.name: t for t in r.tensors}
    for kind in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
        layers = [np.asarray(tensors[f"blk.{i}.{kind}.weight"].data) for i in range(MOE.n_layer)]
        assert len({a.tobytes() for a in layers}) == MOE.n_layer, kind
        experts = layers[0].reshape(MOE.n_expert, -1)
        assert len({row.tobytes() for row in experts}) == MOE.n_expert, kind
        x = gguf.quants.dequantize(layers[0], gguf.GGMLQuantizationType.Q4_K)
        assert abs(x.mean()) < 2e-3 and 0.01 < x.std() < 0.04, kind
    router = np.asarray(tensors["blk.0.ffn_gate_inp.weight"].data)
    assert router.dtype == np.float32 and router.shape == (MOE.n_expert, MOE.n_embd)
    assert abs(router.std() * np.sqrt(MOE.n_embd) - 1.0) < 0.05  # logits of std ~1 on a normed state
    # attention output scaled down so deep routers keep telling tokens apart
    wo = gguf.quants.dequantize(np.asarray(tensors["blk.0.attn_output.weight"].data), gguf.GGMLQuantizationType.Q4_K)
    assert 0.5 * MOE_ATTN_OUTPUT_STD < wo.std() < 2 * MOE_ATTN_OUTPUT_STD


def _moe_generate(path: Path) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and their logits from llama.cpp on the CPU, without weight repacking."""
    from gguf_stream.model import StockModel

    # one thread: the model is tiny, and thread barriers only cost time here
    with StockModel(path, n_gpu_layers=0, device="host", n_ctx=64, n_batch=64, n_ubatch=64, n_threads=1) as m:
        return m.generate(m.tokenize(MOE_PROMPT), N_MOE_TOKENS, with_logits=True)


@pytest.mark.parametrize("qtype", QTYPES)
def test_moe_llama_cpp_decodes(moe_files, qtype):
    tokens, logits = _moe_generate(moe_files[qtype])
    assert len(tokens) == N_MOE_TOKENS
    assert logits.shape == (N_MOE_TOKENS, MOE.n_vocab)
    assert np.isfinite(logits).all() and logits.std() > 1e-3


def _swap_experts(src: Path, dst: Path, tensor: str, a: int, b: int) -> None:
    """Copy src to dst with experts a and b of one 3-D expert tensor exchanged."""
    from gguf_stream.gguf_file import read_model

    t = next(t for t in read_model(src).tensors if t.name == tensor)
    slab = t.nbytes // t.shape[-1]
    data = bytearray(src.read_bytes())
    pa, pb = t.offset + a * slab, t.offset + b * slab
    data[pa:pa + slab], data[pb:pb + slab] = data[pb:pb + slab], data[pa:pa + slab]
    dst.write_bytes(bytes(data))


def test_moe_routing_reaches_the_experts(moe_files, tmp_path):
    """Swapping two experts' bytes changes the logits: the router selects them,
    and llama.cpp computes with each expert's own slab."""
    src = moe_files["Q4_K"]
    same = tmp_path / "same.gguf"
    same.write_bytes(src.read_bytes())
    swapped = tmp_path / "swapped.gguf"
    _swap_experts(src, swapped, "blk.0.ffn_up_exps.weight", 0, 1)
    assert swapped.read_bytes() != src.read_bytes()

    _, logits = _moe_generate(src)
    _, logits_same = _moe_generate(same)
    _, logits_swapped = _moe_generate(swapped)
    np.testing.assert_allclose(logits_same, logits, rtol=0, atol=1e-5)
    assert np.abs(logits_swapped - logits).max() > 1e-2


def test_moe_shapes():
    s = SHAPES["qwen3-30b-a3b"]
    assert (s.arch, s.n_layer, s.n_embd, s.n_head, s.n_head_kv, s.head_dim) == ("qwen3moe", 48, 2048, 32, 4, 128)
    assert (s.n_expert, s.n_expert_used, s.n_ff_exp, s.n_vocab) == (128, 8, 768, 151936)
    from gguf_stream.synth import _nbytes, tensor_specs

    size = sum(_nbytes(spec, "Q4_K") for spec in tensor_specs(s))
    assert 15.9 < size / 2**30 < 16.2
    for s in SHAPES.values():
        if s.is_moe:
            assert s.n_expert_used <= s.n_expert
            for spec in tensor_specs(s):  # every tensor has a type llama.cpp can use (Q5_0 where Q4_K cannot)
                assert _nbytes(spec, "Q4_K") > 0
    q = SHAPES["qwen1.5-moe-a2.7b"]
    assert (q.arch, q.n_layer, q.n_embd, q.n_head, q.n_head_kv, q.head_dim) == ("qwen2moe", 24, 2048, 16, 16, 128)
    assert (q.n_expert, q.n_expert_used, q.n_ff_exp, q.n_ff_shexp, q.n_vocab) == (60, 4, 1408, 5632, 151936)
    assert 7.9 < sum(_nbytes(spec, "Q4_K") for spec in tensor_specs(q)) / 2**30 < 8.1


def test_moe_cli_lists_the_shapes(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "tiny-moe" in out and "qwen3-30b-a3b" in out
    assert "tiny-qwen2moe" in out and "qwen1.5-moe-a2.7b" in out


def test_arch_and_experts_must_agree():
    import dataclasses

    with pytest.raises(ValueError, match="experts"):
        write_synthetic("/nonexistent/x.gguf", dataclasses.replace(MOE, n_expert=0))
    with pytest.raises(ValueError, match="experts"):
        write_synthetic("/nonexistent/x.gguf", dataclasses.replace(TINY, n_expert=4, n_expert_used=2, n_ff_exp=256))
    with pytest.raises(ValueError, match="shared expert"):
        write_synthetic("/nonexistent/x.gguf", dataclasses.replace(MOE, n_ff_shexp=256))
    with pytest.raises(ValueError, match="shared expert"):
        write_synthetic("/nonexistent/x.gguf", dataclasses.replace(SHARED, n_ff_shexp=0))
    with pytest.raises(ValueError, match="not a multiple of 256 .Q4_K. nor of 32 .Q5_0."):
        write_synthetic("/nonexistent/x.gguf", dataclasses.replace(SHARED, n_ff_exp=100))


# ------------------------------------------------------------------ shared expert (qwen2moe)

SHARED = SHAPES["tiny-qwen2moe"]


@pytest.fixture(scope="module")
def shared_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("synth-qwen2moe")
    return {qt: write_synthetic(d / f"tiny-qwen2moe-{qt}.gguf", SHARED, qt, seed=0) for qt in QTYPES}


def _expected_qwen2moe_layer(s=SHARED, qtype="Q4_K") -> dict[str, tuple[tuple[int, ...], str]]:
    """ggml shape (ne) and type of one qwen2moe layer's tensors (llama_model_qwen2moe::load_arch_tensors)."""
    e, n_exp, ff, sh = s.n_embd, s.n_expert, s.n_ff_exp, s.n_ff_shexp
    kv = s.n_head_kv * s.head_dim
    down = qtype if ff % 256 == 0 or qtype != "Q4_K" else "Q5_0"  # llama-quantize's fallback
    return {"attn_norm.weight": ((e,), "F32"), "attn_q.weight": ((e, e), qtype), "attn_q.bias": ((e,), "F32"),
            "attn_k.weight": ((e, kv), qtype), "attn_k.bias": ((kv,), "F32"), "attn_v.weight": ((e, kv), qtype),
            "attn_v.bias": ((kv,), "F32"), "attn_output.weight": ((e, e), qtype), "ffn_norm.weight": ((e,), "F32"),
            "ffn_gate_inp.weight": ((e, n_exp), "F32"), "ffn_gate_exps.weight": ((e, ff, n_exp), qtype),
            "ffn_up_exps.weight": ((e, ff, n_exp), qtype), "ffn_down_exps.weight": ((ff, e, n_exp), down),
            "ffn_gate_inp_shexp.weight": ((e,), "F32"), "ffn_gate_shexp.weight": ((e, sh), qtype),
            "ffn_up_shexp.weight": ((e, sh), qtype), "ffn_down_shexp.weight": ((sh, e), qtype)}


@pytest.mark.parametrize("qtype", QTYPES)
def test_qwen2moe_structure(shared_files, qtype):
    from gguf_stream.gguf_file import read_model

    m = read_model(shared_files[qtype])  # validate.py's header checks run here
    assert (m.arch, m.n_layer, m.is_moe) == ("qwen2moe", SHARED.n_layer, True)
    tensors = {t.name: t for t in m.tensors}
    expected = _expected_qwen2moe_layer(qtype=qtype)
    assert len(tensors) == 3 + len(expected) * SHARED.n_layer
    for il in range(SHARED.n_layer):
        for kind, (shape, qt) in expected.items():
            t = tensors[f"blk.{il}.{kind}"]
            assert (t.shape, t.qtype) == (shape, qt), t.name
    r = gguf.GGUFReader(shared_files[qtype])
    assert _field(r, "qwen2moe.expert_count") == SHARED.n_expert
    assert _field(r, "qwen2moe.expert_used_count") == SHARED.n_expert_used
    assert _field(r, "qwen2moe.expert_feed_forward_length") == SHARED.n_ff_exp
    assert _field(r, "qwen2moe.expert_shared_feed_forward_length") == SHARED.n_ff_shexp


def test_q5_0_fallback_is_zero_mean_and_distinct_per_expert(shared_files):
    r = gguf.GGUFReader(shared_files["Q4_K"])
    tensors = {t.name: t for t in r.tensors}
    layers = [np.asarray(tensors[f"blk.{i}.ffn_down_exps.weight"].data) for i in range(SHARED.n_layer)]
    assert tensors["blk.0.ffn_down_exps.weight"].tensor_type == gguf.GGMLQuantizationType.Q5_0
    assert len({a.tobytes() for a in layers}) == SHARED.n_layer
    assert len({row.tobytes() for row in layers[0].reshape(SHARED.n_expert, -1)}) == SHARED.n_expert
    x = gguf.quants.dequantize(layers[0], gguf.GGMLQuantizationType.Q5_0)
    assert abs(x.mean()) < 2e-3 and 0.01 < x.std() < 0.04
    gate = np.asarray(tensors["blk.0.ffn_gate_inp_shexp.weight"].data)
    assert gate.dtype == np.float32 and abs(gate.std() * np.sqrt(SHARED.n_embd) - 1.0) < 0.2  # sigmoid not saturated


def _swap_tensors(src: Path, dst: Path, a: str, b: str) -> None:
    """Copy src to dst with the bytes of two tensors of one size exchanged."""
    from gguf_stream.gguf_file import read_model

    ta, tb = (next(t for t in read_model(src).tensors if t.name == n) for n in (a, b))
    assert ta.nbytes == tb.nbytes
    data = bytearray(src.read_bytes())
    pa, pb, n = ta.offset, tb.offset, ta.nbytes
    data[pa:pa + n], data[pb:pb + n] = data[pb:pb + n], data[pa:pa + n]
    dst.write_bytes(bytes(data))


def test_qwen2moe_shared_expert_and_routed_experts_reach_the_output(shared_files, tmp_path):
    """llama.cpp computes the shared expert (two layers' shared experts
    swapped change the logits) and routes to the experts (two experts swapped
    change them), so a misplaced shared or routed expert shows in a
    comparison; the same bytes give the same logits, bit for bit. (A routed
    expert moves them less than in qwen3moe: qwen2moe does not renormalise the
    chosen experts' weights, and the shared expert's output is added.)"""
    src = shared_files["Q4_K"]
    tokens, logits = _moe_generate(src)
    assert len(tokens) == N_MOE_TOKENS and np.isfinite(logits).all() and logits.std() > 1e-3
    same = tmp_path / "same.gguf"
    same.write_bytes(src.read_bytes())
    assert np.array_equal(_moe_generate(same)[1], logits)
    for name, change in (("shexp", lambda d: _swap_tensors(src, d, "blk.1.ffn_up_shexp.weight",
                                                           "blk.2.ffn_up_shexp.weight")),
                         ("experts", lambda d: _swap_experts(src, d, "blk.0.ffn_up_exps.weight", 0, 1))):
        changed = tmp_path / f"{name}.gguf"
        change(changed)
        _, other = _moe_generate(changed)
        assert np.abs(other - logits).max() > 1e-4, name


# ------------------------------------------------------------------ glm4moe: a leading dense layer

GLM = SHAPES["tiny-glm4moe"]


def assert_dense_lead_layers(m, s, attention: dict) -> None:
    """Every layer's tensors (ggml shapes) of a model with leading dense layers
    and shared experts (glm4moe, deepseek2): `attention` (with the ffn norm
    its architecture has), then a dense FFN in the leading layers, routed
    experts with a selection bias and a shared expert in the others."""
    from gguf_stream.gguf_file import is_expert_tensor

    e, ff, sh, n = s.n_embd, s.n_ff_exp, s.n_ff_shexp, s.n_expert
    dense = {**attention, "ffn_gate.weight": (e, s.n_ff), "ffn_up.weight": (e, s.n_ff), "ffn_down.weight": (s.n_ff, e)}
    moe = {**attention, "ffn_gate_inp.weight": (e, n), "exp_probs_b.bias": (n,),
           "ffn_gate_exps.weight": (e, ff, n), "ffn_up_exps.weight": (e, ff, n), "ffn_down_exps.weight": (ff, e, n),
           "ffn_gate_shexp.weight": (e, sh), "ffn_up_shexp.weight": (e, sh), "ffn_down_shexp.weight": (sh, e)}
    for il in range(s.n_layer):
        names = {t.name.split(".", 2)[2]: t.shape for t in m.layer_tensors(il)}
        assert names == (dense if il < s.n_dense_lead else moe), il
        assert any(is_expert_tensor(t.name) for t in m.layer_tensors(il)) == (il >= s.n_dense_lead)


def test_glm4moe_structure_and_llama_cpp_decodes(tmp_path):
    from gguf_stream.gguf_file import read_model

    path = write_synthetic(tmp_path / "tiny-glm4moe.gguf", GLM, "Q4_K", seed=0)
    m = read_model(path)
    assert (m.arch, m.n_layer, m.is_moe) == ("glm4moe", GLM.n_layer, True)
    e, kv, q = GLM.n_embd, GLM.n_head_kv * GLM.head_dim, GLM.n_head * GLM.head_dim
    assert_dense_lead_layers(m, GLM, {
        "attn_norm.weight": (e,), "attn_q.weight": (e, q), "attn_q.bias": (q,), "attn_k.weight": (e, kv),
        "attn_k.bias": (kv,), "attn_v.weight": (e, kv), "attn_v.bias": (kv,), "attn_output.weight": (q, e),
        "post_attention_norm.weight": (e,)})
    down = next(t for t in m.layer_tensors(1) if t.name == "blk.1.ffn_down_exps.weight")
    assert down.qtype == "Q5_0"  # rows of 160
    r = gguf.GGUFReader(path)
    assert _field(r, "glm4moe.leading_dense_block_count") == GLM.n_dense_lead
    assert _field(r, "glm4moe.expert_shared_count") == 1
    assert _field(r, "glm4moe.expert_gating_func") == gguf.ExpertGatingFuncType.SIGMOID
    assert _field(r, "glm4moe.rope.dimension_count") == GLM.n_rot < GLM.head_dim
    tokens, logits = _moe_generate(path)
    assert len(tokens) == N_MOE_TOKENS and np.isfinite(logits).all() and logits.std() > 1e-3


def test_glm_4_5_air_shape():
    from gguf_stream.synth import _nbytes, tensor_specs

    s = SHAPES["glm-4.5-air"]
    assert (s.arch, s.n_layer, s.n_embd, s.n_head, s.n_head_kv, s.head_dim, s.n_rot) == (
        "glm4moe", 46, 4096, 96, 8, 128, 64)
    assert (s.n_expert, s.n_expert_used, s.n_ff_exp, s.n_ff_shexp, s.n_dense_lead) == (128, 8, 1408, 1408, 1)
    specs = tensor_specs(s)
    assert not any("exps" in spec.name for spec in specs if spec.name.startswith("blk.0."))
    assert 59 < sum(_nbytes(spec, "Q4_K") for spec in specs) / 2**30 < 61
    import dataclasses

    with pytest.raises(ValueError, match="only glm4moe and deepseek2 have dense leading layers"):
        write_synthetic("/nonexistent/x.gguf", dataclasses.replace(MOE, n_dense_lead=1))
    with pytest.raises(ValueError, match="must be a multiple of n_ff_exp"):
        write_synthetic("/nonexistent/x.gguf", dataclasses.replace(GLM, n_ff_shexp=200))


# ------------------------------------------------------------------ gpt-oss: MXFP4 experts with biases


def test_gpt_oss_shapes():
    """gpt-oss-20b/120b's sizes (their released files are 12-13 / 60-65 GB with
    some matrices at higher precision); MXFP4 experts, F32 biases and sinks."""
    from gguf_stream.synth import _nbytes, tensor_specs, tensor_type

    for name, n_layer, n_expert, lo, hi in (("gpt-oss-20b", 24, 32, 10.4, 10.8), ("gpt-oss-120b", 36, 128, 58, 58.5)):
        s = SHAPES[name]
        assert (s.arch, s.n_layer, s.n_embd, s.n_expert, s.n_expert_used, s.n_swa) == ("gpt-oss", n_layer, 2880,
                                                                                        n_expert, 4, 128)
        specs = tensor_specs(s)
        assert lo < sum(_nbytes(spec, "Q4_K") for spec in specs) / 2**30 < hi
        types = {spec.name.split(".", 2)[2]: tensor_type(spec, "Q4_K") for spec in specs if spec.name.startswith("blk.0.")}
        assert {k: v for k, v in types.items() if "_exps" in k} == {
            "ffn_gate_exps.weight": "MXFP4", "ffn_up_exps.weight": "MXFP4", "ffn_down_exps.weight": "MXFP4",
            "ffn_gate_exps.bias": "F32", "ffn_up_exps.bias": "F32", "ffn_down_exps.bias": "F32"}
        assert types["attn_sinks.weight"] == types["ffn_gate_inp.bias"] == "F32" and types["attn_q.weight"] == "Q5_0"


def test_mxfp4_blocks_are_zero_mean_with_the_chosen_spread():
    from gguf_stream.synth import mxfp4_blocks

    x = gguf.quants.dequantize(mxfp4_blocks(np.random.default_rng(0), 1 << 14, 0.02), gguf.GGMLQuantizationType.MXFP4)
    assert abs(float(x.mean())) < 1e-4 and 0.015 < float(x.std()) < 0.03
    assert set(np.unique(np.abs(x) / (2.0 ** -7 / 2))) == {0, 1, 2, 3, 4, 6, 8, 12}
