"""llama_cpp.server on a StreamedLlama (host mode, Gemma): a chat request
over HTTP, clean shutdown (the model is closed), HTTP 503 after close, and
`gguf-stream serve` as a real process stopped with Ctrl-C."""
import gguf_stream  # first: llama.cpp before numpy

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import CPU, interrupt, subprocess_env

try:
    import httpx
    import uvicorn

    from gguf_stream import server
except ImportError:
    if os.environ.get("CI"):
        raise  # CI installs the dev extra, which includes the server packages
    pytest.skip("needs the server extra: pip install -e '.[dev]'", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = dict(n_ctx=CPU["n_ctx"], n_batch=CPU["n_batch"], n_ubatch=CPU["n_ubatch"], n_threads=CPU["n_threads"],
                verbose=False)
CHAT = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0}
TIMEOUT = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def test_chat_over_http_then_clean_shutdown_then_503(gemma_path):
    app = server.create_app(gemma_path, n_streamed=6, n_slots=2, device="host", model_alias="gemma", **SETTINGS)
    llm = server.app_model(app)
    assert llm.plan.streamed == (2, 5, 8, 11, 14, 17)
    assert llm.chat_format == "gemma"  # the GGUF has no template; llama-2 would give empty replies

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: srv.started or not thread.is_alive(), 30, "server start")
        assert srv.started
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=TIMEOUT) as client:
            r = client.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 200, r.text
            body = r.json()
            reply = body["choices"][0]["message"]["content"]
            assert reply.strip()
            assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["gemma"]
            # the same request, streamed as server-sent events
            pieces = []
            with client.stream("POST", "/v1/chat/completions", json=dict(CHAT, stream=True)) as s:
                for line in s.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        delta = json.loads(line[6:])["choices"][0]["delta"]
                        pieces.append(delta.get("content") or "")
            assert "".join(pieces) == reply
        c = llm.stats["counters"]
        assert c.adopted_ready + c.adopted_waited + c.sync_fallbacks > 0
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert app.state.gguf_stream_proxy.closed  # the shutdown hook closed the model
    assert llm.stats["counters"] is None
    server.close_app(app)  # idempotent

    # a request after close: a clear 503, not a crash on freed memory
    async def post_after_close():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://server", timeout=TIMEOUT) as client:
            return await client.post("/v1/chat/completions", json=CHAT)

    r = asyncio.run(post_after_close())
    assert r.status_code == 503
    assert r.json()["detail"].startswith("gguf-stream: error: the model of this server was closed")


def test_bad_engine_options_fail_before_loading(gemma_path):
    with pytest.raises(gguf_stream.BudgetError):
        server.create_app(gemma_path, vram_budget="64MiB", device="host", **SETTINGS)
    with pytest.raises(ValueError, match="exact computes every layer on the GPU"):
        server.create_app(gemma_path, n_streamed=4, device="host", exact=True, generate_cpu_layers="auto",
                          **SETTINGS)


def test_serve_subprocess_ctrl_c(gemma_path):
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "gguf_stream", "serve", str(gemma_path), "--port", str(port),
                          "--n-streamed", "4", "--device", "host", "-c", "256", "-b", "64", "-ub", "64",
                          "-t", str(CPU["n_threads"])],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env(), cwd=ROOT, text=True)
    try:
        lines = []
        while not any("serving on" in line for line in lines):
            line = p.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=TIMEOUT,
                       json={"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"]
    finally:
        _, err = interrupt(p)
    assert p.returncode == 0, err
    assert "server stopped, model closed" in err and "Traceback" not in err
