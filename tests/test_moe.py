"""Mixture-of-experts models in host mode: placement moves expert tensors
(every layer's attention, norms, router and shared expert stay resident), and
whatever the placement, greedy tokens and logits are bit-identical to stock
llama.cpp. Each test runs on qwen3moe (routed experts only), qwen2moe
(routed experts plus a gated shared expert every token uses) and glm4moe
(a shared expert, sigmoid routing, and a leading dense layer: nothing to
place in an experts plan)."""

import re

import numpy as np
import pytest

from conftest import CPU, N_GEN, expert_layers, needs_no_amx
from gguf_stream import read_model
from gguf_stream.gguf_file import is_expert_tensor
from gguf_stream.model import StockModel, StreamedModel
from gguf_stream.planner import make_plan


# options for a model whose layers with experts are E
PLACEMENTS = {
    "experts streamed, 2 slots": lambda E: dict(n_streamed=3, n_slots=2),
    "every layer's experts through 1 slot": lambda E: dict(n_streamed=len(E), n_slots=1),
    "overflow experts on the CPU while generating": lambda E: dict(n_streamed=3, n_slots=2,
                                                                   generate_cpu_layers="auto"),
    "some experts on the CPU, some streamed": lambda E: dict(n_streamed=len(E), n_slots=2,
                                                             generate_cpu_layers=(E[0], E[2])),
    "whole layers (dense part streamed too)": lambda E: dict(n_streamed=3, n_slots=2, whole_layers=True,
                                                             generate_cpu_layers=(1,)),
}


@pytest.mark.parametrize("name", PLACEMENTS)
def test_moe_placements_are_bit_identical_to_stock(moe_case, name):
    path, prompt, ref_tokens, ref_logits = moe_case
    options = PLACEMENTS[name](expert_layers(path))
    with StreamedModel(path, **CPU, **options) as m:
        tokens, logits = m.generate(prompt, N_GEN, with_logits=True)
        plan, c = m.plan, m.stats.counters
    assert tokens == ref_tokens
    assert np.array_equal(logits, ref_logits), f"max |diff| {np.abs(logits - ref_logits).max()}"

    assert plan.part == ("layer" if options.get("whole_layers") else "experts")
    n_prompt_evals = -(-len(prompt) // CPU["n_ubatch"])
    streamed_generating = len(plan.streamed) - len(plan.cpu_layers)
    # a generate decode that reuses the last graph, with every streamed part in
    # its slot, runs without the hook (test_model's hookless tests): it adopts nothing
    assert (c.hookless_decodes > 0) == (streamed_generating <= plan.n_slots)
    assert c.adoptions == (len(plan.streamed) * n_prompt_evals
                           + streamed_generating * (N_GEN - c.hookless_decodes))
    mf = read_model(path)
    moved = mf.layer_bytes if plan.part == "layer" else mf.stream_bytes
    assert plan.slot_bytes == max(moved[i] for i in plan.streamed)  # a slot holds what moves, no more
    if plan.part == "experts":
        assert c.host_kv_bytes == 0  # attention and its KV cache stay where they are
    elif plan.cpu_layers:
        assert c.host_kv_bytes > 0   # a whole CPU layer takes its KV cache with it


def test_auto_leaves_to_the_cpu_what_the_slots_cannot_hold(moe_case):
    """With 'auto' the slots keep as many expert parts as they can while
    generating (each stays in its slot), the CPU computes the rest: after
    the switch to generating, tokens upload nothing."""
    path, prompt, ref_tokens, _ = moe_case
    with StreamedModel(path, **CPU, n_streamed=3, n_slots=2, generate_cpu_layers="auto") as m:
        plan = m.plan
        assert len(plan.cpu_layers) == len(plan.streamed) - plan.n_slots == 1
        tokens = m.generate(prompt, 2)
        before = m.stats.counters
        tokens += m.generate([tokens[-1]], N_GEN - 2)
        after = m.stats.counters
    assert tokens == ref_tokens
    # each token reads the slots as they are: no upload, and (reusing the last
    # graph, nothing to adopt anew) no hook either
    assert after.uploads == before.uploads and after.hookless_decodes >= N_GEN - 2


def test_swapped_experts_fail_the_comparison(moe_case):
    """Proves the comparison can fail: two layers' expert tensors swapped."""
    path, prompt, _, ref_logits = moe_case
    experts = expert_layers(path)
    with StreamedModel(path, **CPU, n_streamed=len(experts), n_slots=2) as m:
        m.engine.debug_swap_sources(experts[0], experts[2])
        _, logits = m.generate(prompt, N_GEN, with_logits=True)
    assert not np.array_equal(logits, ref_logits)


def test_moe_plan_keeps_dense_parts_resident(moe_path):
    mf = read_model(moe_path)
    assert mf.is_moe and all(e < t for e, t in zip(mf.stream_bytes, mf.layer_bytes))
    assert len(expert_layers(moe_path)) >= 3
    dense = sum(mf.layer_bytes) - sum(mf.stream_bytes)
    full = make_plan(mf, n_streamed=0, n_ctx=256, n_ubatch=64)
    budget = full.device_bytes - 2 * max(mf.stream_bytes)  # room for the slots, then less
    plan = make_plan(mf, vram_budget=budget, n_ctx=256, n_ubatch=64)
    assert plan.part == "experts" and plan.streamed and plan.device_bytes <= budget
    assert plan.fixed_bytes == dense and plan.resident_bytes == dense + sum(
        mf.stream_bytes[i] for i in plan.resident)
    table = plan.table()
    assert "| layer | dense part | experts | prompt | generate | slot |" in table
    assert f"dense parts {format(dense / 2**20, '.1f')} MiB" in table
    # the same budget placing whole layers streams more bytes than it must
    whole = make_plan(mf, vram_budget=budget, n_ctx=256, n_ubatch=64, whole_layers=True)
    assert whole.part == "layer" and whole.streamed_bytes > plan.streamed_bytes


def test_moe_plan_falls_back_to_whole_layers_when_dense_parts_do_not_fit(moe_path):
    mf = read_model(moe_path)
    n = len(expert_layers(moe_path))
    experts_minimum = make_plan(mf, n_streamed=n, n_slots=1, n_ctx=256, n_ubatch=64).device_bytes
    layers_minimum = make_plan(mf, n_streamed=mf.n_layer, n_slots=1, n_ctx=256, n_ubatch=64,
                               whole_layers=True).device_bytes
    assert layers_minimum < experts_minimum
    plan = make_plan(mf, vram_budget=(layers_minimum + experts_minimum) // 2, n_ctx=256, n_ubatch=64, n_slots=1)
    assert plan.part == "layer" and plan.stock_gpu_layers is None


# ------------------------------------------- stock llama.cpp's --n-cpu-moe (the bench's MoE baseline)

def _overridden(log: str) -> dict[str, str]:
    """tensor name -> buffer type, from llama.cpp's debug log of the overrides it applied."""
    return dict(re.findall(r"tensor (\S+) \([^)]*\) buffer type overridden to (\S+)", log))


def test_stock_n_cpu_moe_overrides_the_first_layers_experts(moe_case, capsys):
    """`-ngl all --n-cpu-moe 2`: llama.cpp applies the override to exactly
    the expert tensors of layers 0 and 1 (its load log names each and the
    CPU buffer type it chose), and on the CPU the result is stock ngl=0's,
    bit for bit."""
    path, prompt, ref_tokens, ref_logits = moe_case
    mf = read_model(path)
    capsys.readouterr()
    with StockModel(path, n_gpu_layers=mf.n_layer + 1, n_cpu_moe=2, verbose=True, **CPU) as m:
        overridden = _overridden(capsys.readouterr().err)
        tokens, logits = m.generate(prompt, N_GEN, with_logits=True)
        assert m.stats.mode == f"stock ngl={mf.n_layer + 1} n-cpu-moe=2"
    experts = {t.name for t in mf.tensors if is_expert_tensor(t.name) and t.layer < 2}
    weights = [name for name in experts if name.endswith(".weight")]  # gpt-oss: their biases go too
    assert set(overridden) == experts and len(weights) == 3 * len([i for i in expert_layers(path) if i < 2]) > 0
    assert set(overridden.values()) <= {"CPU", "CPU_REPACK"}  # host mode: no GPU build's CUDA_Host either
    assert tokens == ref_tokens and np.array_equal(logits, ref_logits)


def test_stock_n_cpu_moe_bad_inputs(moe_path, tiny_path):
    with pytest.raises(ValueError, match="needs a mixture-of-experts model"):
        StockModel(tiny_path, n_gpu_layers=99, n_cpu_moe=1, **CPU)
    for n in (-1, 5):
        with pytest.raises(ValueError, match=r"n_cpu_moe must be in 0\.\.4"):
            StockModel(moe_path, n_gpu_layers=99, n_cpu_moe=n, **CPU)


def test_expected_generate_plan_is_what_the_engine_chooses(moe_path):
    """The host-memory check's view before loading equals the load's choice
    (generate_cpu_layers auto on an experts plan)."""
    from gguf_stream.config import EngineConfig
    from gguf_stream.placement import expected_generate_plan, initial_plan

    options = dict(**CPU, n_streamed=3, n_slots=1, generate_cpu_layers="auto")
    mf = read_model(moe_path)
    expected = expected_generate_plan(mf, initial_plan(mf, EngineConfig(**options), False),
                                      EngineConfig(**options), cuda=False)
    with StreamedModel(moe_path, **options) as m:
        assert m.plan.cpu_layers and m.plan.cpu_layers == expected.cpu_layers
        assert m.plan.pageable_bytes == expected.pageable_bytes
        assert m.plan.pageable_bytes == m.plan.input_bytes  # host mode: no repacked copy, experts keep no KV


# ------------------------------------------- shared experts (qwen2moe): the dense part

def test_shared_experts_belong_to_the_dense_part(tiny_qwen2moe_path):
    """A shared expert and its gate are read by every token: they stay with
    attention, norms and router in the resident dense part; only the routed
    experts are placed (and a slot holds those alone)."""
    mf = read_model(tiny_qwen2moe_path)
    for il in range(mf.n_layer):
        tensors = mf.layer_tensors(il)
        shared = [t for t in tensors if "_shexp." in t.name]
        assert sorted(t.name.split(".")[2] for t in shared) == [
            "ffn_down_shexp", "ffn_gate_inp_shexp", "ffn_gate_shexp", "ffn_up_shexp"]
        assert not any(is_expert_tensor(t.name) for t in shared)
        routed = [t for t in tensors if is_expert_tensor(t.name)]
        assert sorted(t.name.split(".")[2] for t in routed) == ["ffn_down_exps", "ffn_gate_exps", "ffn_up_exps"]
        assert mf.stream_bytes[il] == sum(t.nbytes for t in routed)
        assert mf.fixed_layer_bytes[il] == sum(t.nbytes for t in tensors if t not in routed)
        assert mf.fixed_layer_bytes[il] > sum(t.nbytes for t in shared) > 0
    plan = make_plan(mf, n_streamed=4, n_slots=2, n_ctx=256, n_ubatch=64)
    assert plan.part == "experts" and plan.slot_bytes == max(mf.stream_bytes)
    assert all(s.fixed_bytes == mf.fixed_layer_bytes[s.layer] for s in plan.layers)
    table = plan.table()
    for s in plan.layers:
        assert re.search(rf"^\| {s.layer} \| [\d.]+ \w+ resident \| [\d.]+ \w+ \| streamed \| streamed \| \d \|$",
                         table, re.M), table
    assert "dense part (attention, norms, router, shared experts if any) stays resident" in table


# ------------------------------------------- leading dense layers (glm4moe): nothing to place

def test_a_leading_dense_layer_stays_resident_in_an_experts_plan(tiny_glm4moe_path):
    """glm4moe's layer 0 has no experts: an experts plan keeps it resident
    whole (its dense part is all of it) and never streams it; asking to
    stream it, or more layers than have experts, is a one-line error that
    says what to do. Placing whole layers streams it like any other."""
    mf = read_model(tiny_glm4moe_path)
    assert mf.stream_bytes[0] == 0 and mf.fixed_layer_bytes[0] == mf.layer_bytes[0] > 0
    assert expert_layers(tiny_glm4moe_path) == [1, 2, 3]
    plan = make_plan(mf, n_streamed=3, n_slots=2, n_ctx=256, n_ubatch=64)
    assert plan.part == "experts" and plan.streamed == (1, 2, 3)
    assert (plan.layers[0].placement, plan.layers[0].bytes, plan.layers[0].fixed_bytes) == (
        "resident", 0, mf.layer_bytes[0])
    assert plan.fixed_bytes == sum(mf.fixed_layer_bytes)
    assert re.search(r"^\| 0 \| [\d.]+ \w+ resident \| none \(a dense layer\) \| resident \| resident \|  \|$",
                     plan.table(), re.M), plan.table()
    with pytest.raises(ValueError, match=r"cannot stream 4 of 3 layers \(1 of the 4 layers have no experts "
                                         r"to stream; whole_layers / --whole-layers places whole layers\)"):
        make_plan(mf, n_streamed=4, n_ctx=256, n_ubatch=64)
    with pytest.raises(ValueError, match=r"layers \[0\] have no expert tensors to stream"):
        make_plan(mf, streamed_layers=(0, 1), n_ctx=256, n_ubatch=64)
    whole = make_plan(mf, n_streamed=4, n_slots=2, n_ctx=256, n_ubatch=64, whole_layers=True)
    assert whole.part == "layer" and whole.streamed == (0, 1, 2, 3)
    # a budget: the dense layer is never what streaming takes off the GPU
    full = make_plan(mf, n_streamed=0, n_ctx=256, n_ubatch=64)
    for budget in (full.device_bytes - max(mf.stream_bytes), full.device_bytes - 2 * max(mf.stream_bytes)):
        p = make_plan(mf, vram_budget=budget, n_ctx=256, n_ubatch=64)
        assert p.part == "experts" and p.streamed and 0 not in p.streamed and p.device_bytes <= budget


def test_naming_a_layer_that_does_not_stream_is_refused_before_loading(tiny_glm4moe_path, monkeypatch):
    """--generate-cpu-layers / generate_resident naming a layer the plan does
    not stream (here glm4moe's dense layer 0, which has no experts) is one
    line naming the layers that do, before llama.cpp loads anything (it was
    reported as a file llama.cpp could not load)."""
    import gguf_stream.streamer as streamer

    def no_load(*a, **k):
        raise AssertionError("llama.cpp was asked to load")

    with monkeypatch.context() as patch:
        patch.setattr(streamer.Streamer, "patch_model_params", no_load)
        for option in (dict(generate_cpu_layers=(0,)), dict(generate_resident=(0, 2))):
            with pytest.raises(ValueError, match=r"names layers \[0\], which are not streamed; this plan's layers "
                                                 r"whose experts stream are \[1, 2, 3\]"):
                StreamedModel(tiny_glm4moe_path, **CPU, n_streamed=3, **option)
    with StreamedModel(tiny_glm4moe_path, **CPU, n_streamed=3, generate_cpu_layers=(2,)) as m:
        assert m.plan.cpu_layers == (2,)


@needs_no_amx
def test_cpu_layers_repack_only_what_llama_cpp_computes_repacked(tiny_deepseek2_path):
    """deepseek2's attn_v_b is a 3-D stack of per-head matrices (Q4_K here) in a
    plain MUL_MAT, which CPU_REPACK has no kernel for: llama.cpp keeps it plain,
    and so must CPU layers' repacked copies (repacked, the scheduler found no
    backend for its node and aborted the process). With repacking on, whole
    CPU layers equal stock with repacking, bit for bit."""
    path = tiny_deepseek2_path
    mf = read_model(path)
    prompt = list(range(1, 24))  # under 32 tokens: the generate phase throughout
    assert any(t.name.endswith("attn_v_b.weight") and t.qtype == "Q4_K" for t in mf.tensors)
    with StockModel(path, **CPU, cpu_repack=True) as s:
        ref_tokens, ref_logits = s.generate(prompt, N_GEN, with_logits=True)
    n = mf.n_layer
    with StreamedModel(path, **CPU, cpu_repack=True, n_streamed=n, n_slots=2, whole_layers=True,
                       generate_cpu_layers=list(range(n))) as m:
        tokens, logits = m.generate(prompt, N_GEN, with_logits=True)
        assert m.stats.counters.repacked_bytes > 0
    assert tokens == ref_tokens and np.array_equal(logits, ref_logits)


def test_discovery_names_the_cpu_layouts_llama_cpp_computes_each_weight_in(tiny_deepseek2_path, monkeypatch):
    """A CPU layer's weight is repacked in the first of llama.cpp's layouts
    (AMX, then CPU_REPACK) whose kernels compute every use of it, as
    llama.cpp's loader places stock's CPU layers: AMX takes 2-D products of
    its types (Q4_K here, not Q5_0 or F32) with outputs in multiples of 32,
    CPU_REPACK 2-D products and 3-D expert stacks, neither deepseek2's
    per-head 3-D stacks in a plain product nor norms. (This machine need not
    have AMX: what discovery allows is what this checks.)"""
    from gguf_stream import native
    from gguf_stream.streamer import Streamer

    seen, discover = [], Streamer._discover

    def spy(self, model):
        seen[:] = discover(self, model)
        return seen

    monkeypatch.setattr(Streamer, "_discover", spy)
    with StreamedModel(tiny_deepseek2_path, **CPU, n_streamed=4, n_slots=2, whole_layers=True):
        pass
    mf = read_model(tiny_deepseek2_path)
    both, repack = native.CPU_AMX | native.CPU_REPACK, native.CPU_REPACK
    want = {"attn_q_a": both, "attn_kv_a_mqa": both, "ffn_gate": both, "ffn_down": both, "ffn_up_shexp": both,
            "attn_q_b": repack, "attn_output": repack, "ffn_down_shexp": repack,  # Q5_0: no AMX kernel
            "ffn_gate_inp": repack,  # F32, 8 outputs
            "ffn_gate_exps": repack, "ffn_down_exps": repack,  # MUL_MAT_ID
            "attn_k_b": 0, "attn_v_b": 0, "attn_norm": 0, "exp_probs_b": 0}
    got = {w.name.split(".")[2]: w.cpu_layouts for w in seen if w.layer in (0, 1)}
    assert {name: got[name] for name in want} == want
    assert mf.tensor("blk.0.ffn_gate.weight").qtype == "Q4_K" and mf.tensor("blk.0.attn_q_b.weight").qtype == "Q5_0"
