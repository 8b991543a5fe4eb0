"""synth's deepseek2 (DeepSeek-V2-Lite's shape, and V3's low-rank queries and
sigmoid routing in miniature): llama.cpp loads and decodes it, its latent
attention and experts reach the output."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from gguf_stream.synth import SHAPES, write_synthetic  # noqa: E402
from test_synth import N_MOE_TOKENS, _field, _moe_generate, _swap_tensors, assert_dense_lead_layers  # noqa: E402

DS = SHAPES["tiny-deepseek2"]


def test_deepseek2_structure_metadata_and_llama_cpp_decodes(tmp_path):
    from gguf_stream.gguf_file import read_model

    path = write_synthetic(tmp_path / "tiny-deepseek2.gguf", DS, "Q4_K", seed=0)
    m = read_model(path)
    assert (m.arch, m.n_layer, m.is_moe, m.has_shared_experts) == ("deepseek2", DS.n_layer, True, True)
    e, h, ql, kl, rot, v = DS.n_embd, DS.n_head, DS.q_lora_rank, DS.kv_lora_rank, DS.n_rot, DS.v_head_dim
    assert_dense_lead_layers(m, DS, {
        "attn_norm.weight": (e,), "attn_q_a.weight": (e, ql), "attn_q_a_norm.weight": (ql,),
        "attn_q_b.weight": (ql, h * DS.head_dim), "attn_kv_a_mqa.weight": (e, kl + rot), "attn_kv_a_norm.weight": (kl,),
        "attn_k_b.weight": (DS.head_dim - rot, kl, h), "attn_v_b.weight": (kl, v, h), "attn_output.weight": (h * v, e),
        "ffn_norm.weight": (e,)})
    r = gguf.GGUFReader(path)
    assert _field(r, "deepseek2.attention.head_count_kv") == 1  # the latent, one "head" in the cache
    assert _field(r, "deepseek2.attention.key_length") == kl + rot
    assert _field(r, "deepseek2.attention.value_length") == kl
    assert _field(r, "deepseek2.attention.key_length_mla") == DS.head_dim
    assert _field(r, "deepseek2.attention.value_length_mla") == v
    assert _field(r, "deepseek2.attention.q_lora_rank") == ql
    assert _field(r, "deepseek2.expert_gating_func") == gguf.ExpertGatingFuncType.SIGMOID
    assert _field(r, "deepseek2.expert_weights_scale") == pytest.approx(2.5)
    tokens, logits = _moe_generate(path)
    assert len(tokens) == N_MOE_TOKENS and np.isfinite(logits).all() and logits.std() > 1e-3
    # the latent attention and the experts reach the output: swapping two layers' copies changes it
    for a, b in (("blk.1.attn_k_b.weight", "blk.2.attn_k_b.weight"),
                 ("blk.1.attn_kv_a_mqa.weight", "blk.3.attn_kv_a_mqa.weight"),
                 ("blk.2.ffn_up_exps.weight", "blk.3.ffn_up_exps.weight")):
        other = tmp_path / "swapped.gguf"
        _swap_tensors(path, other, a, b)
        assert np.abs(_moe_generate(other)[1] - logits).max() > 1e-4, a


def test_deepseek_v2_lite_shape_and_its_checks():
    """DeepSeek-V2-Lite's sizes (its Q4_K_M file is ~10 GB with some matrices at
    higher precision); llama.cpp reads 27 layers as V2-Lite, whose queries are
    one matrix: a q_lora_rank there is refused, as is latent attention elsewhere."""
    from gguf_stream.synth import _nbytes, tensor_specs, tensor_type

    s = SHAPES["deepseek-v2-lite"]
    assert (s.n_layer, s.n_embd, s.n_head, s.n_expert, s.n_expert_used, s.n_ff_shexp // s.n_ff_exp) == (
        27, 2048, 16, 64, 6, 2)
    specs = tensor_specs(s)
    assert 8.5 < sum(_nbytes(spec, "Q4_K") for spec in specs) / 2**30 < 9.2
    types = {spec.name.split(".", 2)[2]: tensor_type(spec, "Q4_K") for spec in specs if spec.name.startswith("blk.1.")}
    assert "attn_q.weight" in types and "attn_q_a.weight" not in types and "exp_probs_b.bias" not in types
    assert types["ffn_down_exps.weight"] == types["attn_k_b.weight"] == "Q5_0"  # rows of 1408, 128
    with pytest.raises(ValueError, match="without q_lora_rank"):
        write_synthetic("/nonexistent/x.gguf", dataclasses.replace(s, q_lora_rank=64))
    with pytest.raises(ValueError, match="deepseek2 alone has"):
        write_synthetic("/nonexistent/x.gguf", dataclasses.replace(DS, n_head_kv=2))
    with pytest.raises(ValueError, match="deepseek2 alone has"):
        write_synthetic("/nonexistent/x.gguf", dataclasses.replace(SHAPES["tiny-glm4moe"], kv_lora_rank=64,
                                                                   v_head_dim=32, n_head_kv=1))
