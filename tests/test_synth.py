"""Tests for gguf_stream/synth.py: random-weight GGUF files with real model shapes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from conftest import needs_no_amx
from gguf_stream.synth import SHAPES, main, write_synthetic

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
    for s in SHAPES.values():
        assert s.n_embd % 256 == 0 and s.n_ff % 256 == 0


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
