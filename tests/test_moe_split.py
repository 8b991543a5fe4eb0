"""Mixture-of-experts layers split while generating (moe_split, gs_split.c):
of each token's routed experts in a CPU expert layer, N are uploaded into a
small device region and computed there by llama.cpp's kernels while the CPU
computes the others from host memory; the hook adds the CPU's part to the
layer's residual, or (host mode, a model with a shared expert: into_sum)
to the routed experts' sum before the shared expert's is added. Host mode:
greedy tokens equal stock's and logits within TOL of them (relative to the
largest |logit|): where uploaded and CPU experts mix in qwen3moe or
gpt-oss, the CPU's part joins the residual in another order than stock's
(measured here: 6e-4 on tiny-moe at N = 1, a flipped routing choice
downstream amplifying an ulp); with every expert on the CPU their outputs
are stock's bit for bit, and so are qwen2moe's and glm4moe's at every N
(two experts used: their sum in either order is llama.cpp's; before
into_sum, their shared expert in between gave 6e-3 on the GPU box's
AVX-512 build). Two layers' expert sources swapped give 1e-2 to 2e-2."""

import numpy as np
import pytest

from conftest import CPU, N_GEN, PROMPT, expert_layers
from gguf_stream.errors import GGUFStreamError
from gguf_stream.gguf_file import read_model
from gguf_stream.model import StreamedModel

TOL = 2e-3


@pytest.fixture(scope="module", params=["tiny_moe", "tiny_qwen2moe", "tiny_glm4moe", "tiny_gpt_oss", "tiny_deepseek2"])
def moe_path(request):
    """The split's architectures (placement.MOE_SPLIT_ARCHS) among conftest's tiny MoE models."""
    return request.getfixturevalue(f"{request.param}_path")


def rel_diff(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def split_model(path, n_upload, **kw):
    E = expert_layers(path)
    return StreamedModel(path, **CPU, n_streamed=len(E), n_slots=1, generate_cpu_layers="auto",
                         moe_split=n_upload, **kw)


@pytest.mark.parametrize("n_upload", [0, 1, 2])
def test_split_experts_equal_stock(moe_case, n_upload):
    """0: the CPU computes every routed expert; 1: one per token uploaded, one
    on the CPU; 2 (= experts used): every expert of a one-row decode
    uploaded, a prompt's short tail (several rows) still shares out."""
    path, prompt, ref_tokens, ref_logits = moe_case
    with split_model(path, n_upload) as m:
        tokens, logits = m.generate(prompt, N_GEN, with_logits=True)
        c, split = m.stats.counters, m.streamer.split_experts
        assert m.plan.cpu_layers == ()
    assert tokens == ref_tokens
    assert rel_diff(logits, ref_logits) <= TOL
    if read_model(path).has_shared_experts or n_upload == 0:
        # every routed expert on the CPU, summed in llama.cpp's order before the
        # residual (no shared expert in between): stock's bits, gpt-oss's biases,
        # MXFP4 and clamped SwiGLU included; with a shared expert the CPU's part
        # joins the experts' sum (into_sum, host mode), where two used experts
        # add up in either order as llama.cpp adds them: stock's bits at every N
        assert np.array_equal(logits, ref_logits)
    assert split and c.split_layers >= len(split) * N_GEN
    used = c.split_uploaded + c.split_cpu
    assert c.split_uploaded <= n_upload * c.split_layers
    if n_upload == 0:
        assert c.split_uploaded == 0 and c.split_cpu > 0
    if n_upload == 1:
        assert c.split_uploaded == c.split_layers and c.split_cpu > 0 and used > c.split_layers
    assert c.split_region_bytes > 0


def test_split_experts_swapped_sources_differ(moe_case):
    """Negative control: the CPU's and the uploads' source (the host copy)
    swapped between two layers must put the logits outside TOL."""
    path, prompt, _, ref_logits = moe_case
    E = expert_layers(path)
    with split_model(path, 1) as m:
        m.streamer.engine.debug_swap_sources(E[0], E[1])
        _, bad = m.generate(prompt, N_GEN, with_logits=True)
    assert rel_diff(bad, ref_logits) > TOL


@pytest.mark.parametrize("n_cpu", [1, 3])
def test_prompt_cpu_experts_equal_stock(moe_case, n_cpu):
    """prompt_cpu_experts: in the prompt's ubatches (64 rows) the split
    layers' last n_cpu experts are computed by the CPU and read as zeros from
    the slots (their bytes not uploaded; gpt-oss's biases zeroed with them):
    the prompt's logits are stock's bit for bit (the CPU's part joins the
    experts' sum, where a zero expert's place adds nothing), the rest within
    the generate split's TOL."""
    path, prompt, ref_tokens, ref_logits = moe_case
    with split_model(path, 1, prompt_cpu_experts=n_cpu) as m:
        tokens, logits = m.generate(prompt, N_GEN, with_logits=True)
        c = m.stats.counters
    assert c.split_prompt_layers >= len(expert_layers(path)) * 2  # every split layer, in each full ubatch
    assert c.split_cpu > 0
    # their slots (experts alone) freed before the CPU's part joined, the next
    # layer's upload into the one slot landing meanwhile: the logits still stock's
    assert 0 < c.split_early_releases <= c.split_prompt_layers
    assert tokens == ref_tokens
    assert np.array_equal(logits[0], ref_logits[0])
    assert rel_diff(logits, ref_logits) <= TOL


def test_prompt_cpu_experts_pool_kernel_equal_stock(moe_case, monkeypatch):
    """A prompt's CPU experts go to llama.cpp's MUL_MAT_ID graph (gs_split_graph.c)
    where it can take them; GGUF_STREAM_PROMPT_CPU_KERNEL=pool keeps them on the
    split pool's rows (gpt-oss's case), which must equal stock as well."""
    monkeypatch.setenv("GGUF_STREAM_PROMPT_CPU_KERNEL", "pool")
    path, prompt, ref_tokens, ref_logits = moe_case
    with split_model(path, 1, prompt_cpu_experts=3) as m:
        tokens, logits = m.generate(prompt, N_GEN, with_logits=True)
        assert m.stats.counters.split_prompt_layers > 0 and m.stats.counters.split_cpu > 0
    assert tokens == ref_tokens
    assert np.array_equal(logits[0], ref_logits[0])


def test_prompt_cpu_experts_with_generate_resident_layers(tiny_moe_path):
    """A split layer kept resident while generating is copied whole into its
    region (the slots' uploads leave its CPU experts out, the region's must
    not: no CPU part is added there)."""
    from gguf_stream.model import StockModel

    E = expert_layers(tiny_moe_path)
    with StockModel(tiny_moe_path, n_gpu_layers=0, **CPU) as stock:
        prompt = stock.tokenize(PROMPT * 3)
        ref_tokens, ref_logits = stock.generate(prompt, N_GEN, with_logits=True)
    with split_model(tiny_moe_path, 1, prompt_cpu_experts=6, generate_resident=(E[0],)) as m:
        assert E[0] in m.streamer.split_experts
        m.engine.set_generate_resident((E[0],), own=True)  # host mode: a region of its own (no GPU compute buffer)
        tokens, logits = m.generate(prompt, N_GEN, with_logits=True)
        c = m.stats.counters
        assert c.gen_resident_loads > 0 and c.split_prompt_layers > 0
    assert tokens == ref_tokens and rel_diff(logits, ref_logits) <= TOL


def test_prompt_cpu_experts_without_split_layers_says_so(tiny_moe_path, capsys):
    with split_model(tiny_moe_path, "off", prompt_cpu_experts=3) as m:
        m.generate(m.tokenize(PROMPT * 3), 2)
        assert m.stats.counters.split_prompt_layers == 0
    assert "prompt_cpu_experts ignored: no expert layers split here" in capsys.readouterr().err


def test_prompt_cpu_experts_swapped_sources_differ(moe_case):
    """Negative control of the CPU's part: two layers' host copies swapped
    after the prompt split was set (its uploads keep their sources, the CPU
    reads the swapped ones) change the prompt's own logits."""
    path, prompt, _, ref_logits = moe_case
    E = expert_layers(path)
    with split_model(path, 1, prompt_cpu_experts=3) as m:
        m.streamer.engine.debug_swap_sources(E[0], E[1])
        _, bad = m.generate(prompt, 1, with_logits=True)
        assert m.stats.counters.split_prompt_layers > 0
    assert rel_diff(bad[0], ref_logits[0]) > 1e-3


def test_prompt_cpu_experts_upload_fewer_bytes(tiny_moe_path):
    """The uploads leave the CPU's experts out, and the counters say so: a
    prompt with 6 of tiny-moe's 8 experts on the CPU moves 2/8 of the bytes
    per split layer's upload; the layer the slot holds while generating is
    no split layer and uploads all of its experts."""
    per_upload = {}
    for n_cpu in (0, 6):
        with split_model(tiny_moe_path, 1, prompt_cpu_experts=n_cpu) as m:
            m.reset_counters()
            m.eval(m.tokenize(PROMPT * 3))
            c = m.stats.counters
            per_upload[n_cpu] = c.bytes_uploaded / c.uploads
    assert per_upload[0] * 2 / 8 < per_upload[6] < per_upload[0] / 2


def test_prompt_cpu_experts_refuses_bad_counts(tiny_moe_path):
    with pytest.raises(ValueError, match="prompt_cpu_experts"):
        split_model(tiny_moe_path, 1, prompt_cpu_experts=-1)
    with pytest.raises(GGUFStreamError, match="set_prompt_cpu_experts: 8 of layer .* 8 experts"):
        with split_model(tiny_moe_path, 1, prompt_cpu_experts=8):
            pass


def test_split_experts_refuses_bad_counts(tiny_moe_path):
    with pytest.raises(ValueError, match="moe_split"):
        split_model(tiny_moe_path, -1)
    # tiny-moe has 8 experts, 2 used: 7 uploaded leave no room for a zero expert per used one
    with pytest.raises(GGUFStreamError, match="zero ones"):
        with split_model(tiny_moe_path, 7):
            pass


def test_split_experts_second_generation_same_tokens(tiny_moe_path):
    """The split keeps nothing of one decode's graph for the next: a second
    generation from a reset context (the one-boundary mode learned in the
    first) gives the first one's tokens."""
    with split_model(tiny_moe_path, 1) as m:
        prompt = m.tokenize(PROMPT * 3)
        first = m.generate(prompt, N_GEN)
        m.reset()
        second = m.generate(prompt, N_GEN)
    assert first == second


def test_split_experts_refuses_an_architecture_it_does_not_know(tiny_moe_path, monkeypatch):
    """Another activation or expert biases would make the CPU's part wrong:
    an architecture outside the list is a one-line error, not a guess."""
    import gguf_stream.placement as placement

    monkeypatch.setattr(placement, "MOE_SPLIT_ARCHS", ("qwen2moe",))
    with pytest.raises(GGUFStreamError, match="--moe-split supports qwen2moe .experts whose .* not qwen3moe"):
        with split_model(tiny_moe_path, 1):
            pass


def test_split_experts_auto_times_then_keeps_the_fastest(moe_case):
    """moe_split='auto': the engine times each candidate count on the first
    one-row decodes (-1 until then), then keeps one of them; the tokens and
    logits stay stock's throughout (bit for bit with a shared expert, whose
    runs are timed to their second boundary)."""
    path, prompt, ref_tokens, ref_logits = moe_case
    exact = read_model(path).has_shared_experts
    with split_model(path, "auto") as m:
        assert m.stats.counters.split_n_upload == -1
        for _ in range(4):  # tiny models: 2 candidates x 24 timed runs, 2-4 split layers per one-row decode
            tokens, logits = m.generate(prompt, N_GEN, with_logits=True)
            assert tokens == ref_tokens
            assert rel_diff(logits, ref_logits) <= TOL
            assert not exact or np.array_equal(logits, ref_logits)
            m.reset()
        assert m.stats.counters.split_n_upload in (1, 2)


def test_split_default_on_cuda_only_for_known_architectures(tiny_moe_path, monkeypatch):
    """The default (None): off in host mode; on CUDA 'auto' for an
    architecture of MOE_SPLIT_DEFAULT_ARCHS, off (no error) for another,
    which still splits when asked (gpt-oss until a GPU run)."""
    from dataclasses import replace

    import gguf_stream.placement as placement

    with split_model(tiny_moe_path, None) as m:
        assert m.streamer.split_experts == () and m.stats.counters.split_layers == 0
        plan, config, mf = m.streamer.plan, replace(m.config, moe_split=None), m.streamer.model_file
    cpu, split_on, n = placement.moe_generate_parts(plan, config, mf, cuda=True)
    assert cpu == () and split_on and n == "auto"
    assert placement.moe_generate_parts(plan, replace(config, moe_split="off"), mf, cuda=True)[1] == ()
    monkeypatch.setattr(placement, "MOE_SPLIT_DEFAULT_ARCHS", ("qwen2moe",))
    cpu, split, _ = placement.moe_generate_parts(plan, config, mf, cuda=True)
    assert cpu and split == ()
    assert placement.moe_generate_parts(plan, replace(config, moe_split="auto"), mf, cuda=True)[1] == split_on


@pytest.mark.parametrize("name", ["tiny_moe", "tiny_gpt_oss"])  # gpt-oss: the experts' biases in the region too
def test_split_region_counted_in_the_plan(name, request):
    """The region the split allocates is in the plan's device estimate (with
    the runtime, in compute_bytes) where the split will run: the default on
    CUDA, an explicit N anywhere; and it covers what the engine allocated."""
    from gguf_stream import read_model
    from gguf_stream.config import EngineConfig
    from gguf_stream.placement import initial_plan, split_region_bytes

    tiny_moe_path = request.getfixturevalue(f"{name}_path")
    mf = read_model(tiny_moe_path)
    on = {"moe_split": "auto"} if name == "tiny_gpt_oss" else {}  # gpt-oss: not the default yet
    est = split_region_bytes(mf, EngineConfig(**on), cuda=True)
    assert est > 0 and split_region_bytes(mf, EngineConfig(), cuda=False) == 0
    assert split_region_bytes(mf, EngineConfig(moe_split="off"), cuda=True) == 0
    assert (split_region_bytes(mf, EngineConfig(), cuda=True) == 0) == (name == "tiny_gpt_oss")

    def compute(**kw):
        return initial_plan(mf, EngineConfig(vram_budget="1GiB", n_ctx=256, **kw), cuda=True, check_device=False).compute_bytes

    assert compute(**on) - compute(moe_split="off") == est
    with split_model(tiny_moe_path, "auto") as m:
        allocated = m.stats.counters.split_region_bytes
    n_tensors = sum(1 for t in mf.layer_tensors(1) if "_exps." in t.name)
    host = EngineConfig(moe_split="auto", generate_cpu_layers="auto")  # as split_model runs it
    assert 0 < est - n_tensors * 768 <= allocated <= est == split_region_bytes(mf, host, cuda=False)
    assert split_region_bytes(mf, EngineConfig(exact=True, **on), cuda=True) == 0  # --exact: no split


def test_split_constants_match_the_engine():
    from gguf_stream import native, placement
    from gguf_stream.config import MAX_MOE_SPLIT

    assert placement.SPLIT_TUNE_CANDIDATES == native.lib.GS_SPLIT_TUNE_CANDIDATES
    assert MAX_MOE_SPLIT == native.lib.GS_SPLIT_MAX_UPLOAD and native.SPLIT_AUTO == -1


def test_plan_shows_the_split_and_no_repacked_copies(tiny_moe_path):
    """A CUDA plan of a split-capable MoE (the default: --moe-split auto)
    shows its CPU expert layers as 'split' and counts no repacked copy for
    them (the split reads the pinned copy); with --moe-split off they are
    CPU layers with their repacked copies, as before."""
    import re

    from gguf_stream import read_model
    from gguf_stream.config import EngineConfig
    from gguf_stream.placement import initial_plan, run_tiers

    mf = read_model(tiny_moe_path)

    def planned(**kw):
        config = EngineConfig(n_ctx=256, n_ubatch=64, n_streamed=4, n_slots=2, device="cuda", **kw)
        return run_tiers(mf, initial_plan(mf, config, True, check_device=False), config, True)

    split, off = planned(), planned(moe_split="off")
    assert off.plan.cpu_layers and not off.plan.split_layers
    assert split.plan.split_layers == off.plan.cpu_layers and not split.plan.cpu_layers
    assert split.plan.pageable_bytes < off.plan.pageable_bytes == off.plan.input_bytes + sum(
        mf.stream_bytes[i] for i in off.plan.cpu_layers)
    table = split.plan.table()
    for i in split.plan.split_layers:
        assert re.search(rf"^\| {i} \| .* \| streamed \| split \| \d \|$", table, re.M), table
    assert "split between uploads and the CPU" in split.split and "split" not in off.split


@pytest.mark.parametrize("name, told, seen, expected", [("tiny_moe", ("qwen3moe",), "ffn_moe_swiglu", "swiglu_oai"),
                                                         ("tiny_gpt_oss", (), "ffn_moe_swiglu_oai", "swiglu")])
def test_split_refuses_an_activation_it_does_not_compute(name, told, seen, expected, request, monkeypatch):
    """Negative control of the activation check: told the wrong activation
    (qwen3moe's experts gpt-oss's clamped SwiGLU, or the other way round),
    the split fails the first split decode in one line naming both, instead
    of summing a wrong activation."""
    import gguf_stream.streamer as streamer

    monkeypatch.setattr(streamer, "OAI_ACTIVATION_ARCHS", told)
    with split_model(request.getfixturevalue(f"{name}_path"), 1) as m:
        with pytest.raises(GGUFStreamError, match=f"experts use {seen}, not the {expected} the CPU computes"):
            m.generate(m.tokenize(PROMPT), N_GEN)


def test_split_layers_with_other_expert_layouts_keep_their_zero_experts(tmp_path, monkeypatch):
    """A layer whose experts are larger (Q8_0 among Q4_K, as Q4_K_M files mix
    Q6_K and Q4_K) gets its own part of the region: its uploads never land on
    another layer's zero experts (they did: GS_OLD_LAYOUT-style per-layer
    offsets fail this test)."""
    import dataclasses

    from gguf_stream import read_model, synth
    from gguf_stream.config import EngineConfig
    from gguf_stream.model import StockModel
    from gguf_stream.placement import split_region_bytes

    specs = synth.tensor_specs
    monkeypatch.setattr(synth, "tensor_specs", lambda shape: [
        dataclasses.replace(s, qtype="Q8_0") if s.name.startswith("blk.1.ffn_") and "_exps" in s.name else s
        for s in specs(shape)])
    path = synth.write_synthetic(tmp_path / "mixed.gguf", "tiny-moe", "Q4_K", seed=3)
    mf = read_model(path)
    assert {t.qtype for t in mf.tensors if t.name.endswith("_exps.weight")} == {"Q4_K", "Q8_0"}
    with StockModel(path, n_gpu_layers=0, **CPU) as stock:
        # a 10-row tail after two ubatches: a decode of several rows in the generate
        # placement, whose left-out experts read zero experts at every position
        prompt = stock.tokenize(PROMPT * 3)[:2 * CPU["n_ubatch"] + 10]
        ref_tokens, ref_logits = stock.generate(prompt, N_GEN, with_logits=True)
    with split_model(path, 1) as m:
        tokens, logits = m.generate(prompt, N_GEN, with_logits=True)
        allocated = m.stats.counters.split_region_bytes
    assert tokens == ref_tokens and rel_diff(logits, ref_logits) <= TOL
    assert 0 < allocated <= split_region_bytes(mf, EngineConfig(moe_split=1, generate_cpu_layers="auto"), cuda=False)


def test_split_layers_stay_off_the_disk_tier(tiny_moe_path):
    """The disk tier takes none of the split layers (the split reads their
    host copy every token; the default on CUDA used CPU layers before, which
    the disk tier never takes), and a plan's disk layers are not split."""
    from dataclasses import replace

    from gguf_stream import read_model
    from gguf_stream.config import EngineConfig
    from gguf_stream.disk import disk_candidates, with_disk_layers
    from gguf_stream.placement import initial_plan, moe_generate_parts, run_tiers

    mf = read_model(tiny_moe_path)
    config = EngineConfig(n_ctx=256, n_ubatch=64, n_streamed=4, n_slots=2, device="cuda")
    plan = run_tiers(mf, initial_plan(mf, config, True, check_device=False), config, True).plan
    split = plan.split_layers
    assert split and set(disk_candidates(plan)) == set(plan.streamed) - set(split)
    with pytest.raises(ValueError, match="not CPU or split layers"):
        with_disk_layers(plan, split[:1])
    on_disk = with_disk_layers(replace(plan, split_layers=()), split[:1])  # a plan whose disk tier took one
    assert moe_generate_parts(on_disk, config, mf, cuda=True)[1] == split[1:]


@pytest.mark.parametrize("name, into_sum", [("tiny_moe", False), ("tiny_qwen2moe", True), ("tiny_glm4moe", True),
                                            ("tiny_gpt_oss", False), ("tiny_deepseek2", True)])
def test_split_into_sum_in_host_mode_where_a_shared_expert_follows(request, monkeypatch, name, into_sum):
    """The two-boundary order (into_sum) only where a shared expert is added
    after the routed experts: elsewhere one boundary per layer is stock's order."""
    from gguf_stream import native

    seen = []
    real = native.Engine.set_split_experts
    monkeypatch.setattr(native.Engine, "set_split_experts",
                        lambda self, *a, **kw: (seen.append(kw["into_sum"]), real(self, *a, **kw))[1])
    with split_model(request.getfixturevalue(f"{name}_path"), 1):
        pass
    assert seen == [into_sum]


@pytest.mark.parametrize("n_upload", [0, 1])
def test_split_decode_of_many_rows_equals_stock(tiny_qwen2moe_path, n_upload):
    """A 20-row decode through the split (under the offload threshold: the
    generate placement) in the two-boundary mode a shared expert takes: the
    final routing weights are read right after their multiply (read at the
    experts' sum, later nodes had reused their memory: 7.4e-3 off)."""
    from gguf_stream.model import StockModel

    with StockModel(tiny_qwen2moe_path, n_gpu_layers=0, **CPU) as stock:
        tokens = stock.tokenize(PROMPT * 3)
        stock.eval(tokens[:70])
        stock.eval(tokens[70:90])
        ref = stock.logits()
    with split_model(tiny_qwen2moe_path, n_upload) as m:
        m.eval(tokens[:70])
        m.eval(tokens[70:90])
        assert m.stats.counters.split_layers > 0
        assert np.array_equal(m.logits(), ref)
