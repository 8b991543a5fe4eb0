"""The server for what OpenAI clients send (host mode, Gemma): /v1/embeddings
with --embedding (one pooled vector per input, equal to stock llama.cpp's),
max_completion_tokens (OpenAI's newer name for max_tokens, which
llama_cpp.server ignores), and response_format json_schema (OpenAI's
structured outputs) mapped to llama-cpp-python's json_object + schema."""
import gguf_stream  # noqa: F401  (llama.cpp before numpy)

import json
import os

import numpy as np
import pytest


try:
    import httpx  # noqa: F401

    from gguf_stream import server
except ImportError:
    if os.environ.get("CI"):
        raise
    pytest.skip("needs the server extra: pip install -e '.[dev]'", allow_module_level=True)

from test_server import free_port
from test_server_guard import SETTINGS, call

CHAT = {"messages": [{"role": "user", "content": "Count from one to fifty."}], "temperature": 0}
SCHEMA = {"type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"]}
TEXTS = ["The capital of France is Paris.", "hello"]


@pytest.fixture(scope="module")
def app(gemma_path):
    app = server.create_app(gemma_path, n_streamed=6, n_slots=2, device="host", model_alias="gemma",
                            embedding=True, **SETTINGS)
    yield app
    server.close_app(app)


def stock_embeddings(gemma_path, texts):
    """llama_cpp.Llama's own, mean-pooled, loaded without CPU repacking as the engine loads in host mode."""
    import llama_cpp
    import llama_cpp.llama as llama_module

    from gguf_stream.llama_compat import swapped
    from test_llama_compat import _NoRepack

    with swapped(llama_module, "internals", _NoRepack()):
        llm = llama_cpp.Llama(str(gemma_path), embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                              **SETTINGS)
    try:
        return np.array(llm.embed(texts))
    finally:
        llm.close()


def test_embeddings_with_embedding_flag(app, gemma_path):
    r = call(app, "POST", "/v1/embeddings", headers={}, json={"input": TEXTS, "model": "gemma"})
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in r.json()["data"]])
    assert got.shape == (2, 640)  # one vector per input (mean pooling: the GGUF names none)
    assert np.isfinite(got).all() and not np.allclose(got[0], got[1])
    np.testing.assert_allclose(got, stock_embeddings(gemma_path, TEXTS), rtol=1e-5, atol=1e-5)
    # the same model still completes
    r = call(app, "POST", "/v1/chat/completions", headers={}, json=dict(CHAT, max_tokens=4))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4


def test_max_completion_tokens_is_honoured(app):
    r = call(app, "POST", "/v1/chat/completions", headers={}, json=dict(CHAT, max_completion_tokens=3))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == 3 and body["choices"][0]["finish_reason"] == "length"
    # max_tokens given too: it decides, as before
    r = call(app, "POST", "/v1/chat/completions", headers={}, json=dict(CHAT, max_tokens=2, max_completion_tokens=5))
    assert r.json()["usage"]["completion_tokens"] == 2
    # streamed: the body the route sees is the rewritten one too
    r = call(app, "POST", "/v1/chat/completions", headers={}, json=dict(CHAT, max_completion_tokens=3, stream=True))
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert r.status_code == 200 and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len([c for c in chunks if c["choices"][0]["delta"].get("content")]) <= 3
    for bad in (0, -1, "ten", 2.5, True):
        r = call(app, "POST", "/v1/chat/completions", headers={}, json=dict(CHAT, max_completion_tokens=bad))
        assert r.status_code == 400 and "max_completion_tokens must be a positive integer" in \
            r.json()["error"]["message"], (bad, r.text)


def test_response_format_json_schema(app):
    fmt = {"type": "json_schema", "json_schema": {"name": "yes_no", "schema": SCHEMA}}
    r = call(app, "POST", "/v1/chat/completions", headers={}, json=dict(CHAT, max_tokens=24, response_format=fmt))
    assert r.status_code == 200, r.text
    assert isinstance(json.loads(r.json()["choices"][0]["message"]["content"])["answer"], bool)
    for fmt, needle in (({"type": "json_schema", "json_schema": {"schema": {"type": 5}}},
                         "the schema cannot be turned into a grammar"),
                        ({"type": "json_schema", "json_schema": {"name": "x"}}, "needs json_schema.schema"),
                        ({"type": "json_schema"}, "needs json_schema.schema")):
        r = call(app, "POST", "/v1/chat/completions", headers={}, json=dict(CHAT, response_format=fmt))
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


def test_embedding_pooling_choice(gemma_path):
    import llama_cpp

    assert server.embedding_pooling(gemma_path, None) == llama_cpp.LLAMA_POOLING_TYPE_MEAN
    assert server.embedding_pooling(gemma_path, "last") == llama_cpp.LLAMA_POOLING_TYPE_LAST
    with pytest.raises(ValueError, match="pooling must be one of"):
        server.embedding_pooling(gemma_path, "max")


def test_serve_embedding_flags_reach_the_app(capsys, monkeypatch, tiny_path):
    from gguf_stream import cli

    seen = {}

    def fake_create_app(path, **kw):
        seen.update(kw)
        raise ValueError("stopped before loading")

    monkeypatch.setattr(server, "create_app", fake_create_app)
    argv = ["serve", str(tiny_path), "--device", "host", "--port", str(free_port())]
    assert cli.main(argv + ["--embedding", "--pooling", "cls"]) == cli.EXIT_ERROR
    assert seen["embedding"] is True and seen["pooling"] == "cls"
    assert cli.main(argv) == cli.EXIT_ERROR and seen["embedding"] is False and seen["pooling"] is None
    capsys.readouterr()
    assert cli.main(argv + ["--pooling", "mean"]) == cli.EXIT_ERROR
    assert "--pooling applies to embeddings: give --embedding too" in capsys.readouterr().err
