"""The server against careless and hostile clients (host mode, Gemma): bodies
that are not what an endpoint takes get a 4xx (llama_cpp.server answered
500s), an unknown model a 404, a grammar or JSON schema llama.cpp cannot
parse a 400 (it crashed the process), an API key is required when set, CORS
only for named origins, and concurrent streams all run to their end (one
arriving used to cut the running one off)."""
import gguf_stream  # noqa: F401  (llama.cpp before numpy)

import asyncio
import json
import os
import threading

import pytest

from conftest import CPU

try:
    import httpx
    import uvicorn

    from gguf_stream import server
except ImportError:
    if os.environ.get("CI"):
        raise
    pytest.skip("needs the server extra: pip install -e '.[dev]'", allow_module_level=True)

from test_server import TIMEOUT, free_port, wait_for

KEY = "sekrit"
AUTH = {"Authorization": f"Bearer {KEY}"}
GOOD_ORIGIN = "http://good.example"
SETTINGS = dict(n_ctx=CPU["n_ctx"], n_batch=CPU["n_batch"], n_ubatch=CPU["n_ubatch"], n_threads=CPU["n_threads"],
                verbose=False)
COMPLETION = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
CHAT = {"messages": [{"role": "user", "content": "Answer yes or no: is Paris in France?"}], "max_tokens": 8,
        "temperature": 0}


@pytest.fixture(scope="module")
def app(gemma_path):
    app = server.create_app(gemma_path, n_streamed=6, n_slots=2, device="host", model_alias="gemma", api_key=KEY,
                            cors_origins=[GOOD_ORIGIN], **SETTINGS)
    yield app
    server.close_app(app)


def call(app, method: str, path: str, headers=AUTH, **kw) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://server", timeout=TIMEOUT) as client:
            return await client.request(method, path, headers=headers, **kw)

    return asyncio.run(go())


def test_api_key_is_required(app):
    assert call(app, "GET", "/v1/models", headers={}).status_code == 401
    r = call(app, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    assert call(app, "POST", "/v1/completions", headers={}, json=COMPLETION).status_code == 401
    assert [m["id"] for m in call(app, "GET", "/v1/models").json()["data"]] == ["gemma"]
    assert call(app, "GET", "/health", headers={}).json() == {"status": "ok"}


def test_cors_only_for_named_origins(app):
    def preflight(origin):
        return call(app, "OPTIONS", "/v1/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "Authorization, Content-Type"})

    ok = preflight(GOOD_ORIGIN)
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == GOOD_ORIGIN
    assert "access-control-allow-credentials" not in ok.headers
    evil = preflight("http://evil.example")
    assert evil.status_code == 400 and "access-control-allow-origin" not in evil.headers
    r = call(app, "GET", "/v1/models", headers={**AUTH, "Origin": "http://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_is_off_by_default():
    """llama_cpp.server's allow-every-origin middleware is taken out."""
    from fastapi import FastAPI
    from fastapi.middleware.cors import CORSMiddleware

    app = FastAPI()
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=True)
    server._set_middleware(app, proxy=None, api_key=None, cors_origins=())
    assert [m.cls for m in app.user_middleware] == [server.RequestGuard]


DEEP = "root ::= " + "(" * 100_000 + '"a"' + ")" * 100_000  # llama.cpp's recursive parser overflows its stack


@pytest.mark.parametrize("path,body,status,needle", [
    ("/v1/completions", b"", 400, "the request body is empty"),
    ("/v1/completions", b"{nope", 400, "the request body is not JSON"),
    ("/v1/completions", b"[1, 2]", 400, "must be a JSON object, not list"),
    ("/v1/completions", dict(COMPLETION, max_tokens=-5), 400, "max_tokens: Input should be greater than or equal to 0"),
    ("/v1/completions", dict(COMPLETION, top_p=5), 400, "top_p: Input should be less than or equal to 1"),
    ("/v1/completions", dict(COMPLETION, stop=5), 400, "stop"),
    ("/v1/completions", dict(COMPLETION, model="gpt-4"), 404, "model 'gpt-4' is not served here"),
    ("/v1/chat/completions", dict(CHAT, model="gpt-4", stream=True), 404, "not served here"),
    ("/v1/completions", dict(COMPLETION, grammar="root ::= ("), 400, "expecting ')'"),
    ("/v1/completions", dict(COMPLETION, grammar="root ::= (", stream=True), 400, "cannot use this grammar"),
    ("/v1/completions", dict(COMPLETION, grammar=DEEP), 400, "grammar parser crashed"),
    ("/v1/completions", dict(COMPLETION, logit_bias={"999999999": 1.0}), 400, "logit_bias keys must be token ids"),
    ("/v1/chat/completions", dict(CHAT, response_format={"type": "json_object", "schema": {"type": 5}}), 400,
     "the schema cannot be turned into a grammar"),
    ("/v1/chat/completions", dict(CHAT, response_format={"type": "json_object", "schema": {
        "type": "array", "minItems": 10**9}}), 400, "repeats something 1000000000 times"),
    ("/v1/embeddings", {"input": "hi"}, 400, "computes no embeddings"),
    ("/extras/detokenize", {"tokens": [10**9]}, 400, "tokens must be ids in 0..262143"),
    ("/v1/completions", b"x" * (server.MAX_BODY_BYTES + 1), 413, "over"),
])
def test_bad_requests_get_a_4xx(app, path, body, status, needle):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = call(app, "POST", path, **kw)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_what_passes_the_guard_works(app):
    r = call(app, "POST", "/v1/completions", json=COMPLETION)  # no model named: the one served
    assert r.status_code == 200 and r.json()["choices"][0]["text"]
    r = call(app, "POST", "/v1/completions", json=dict(COMPLETION, model="gemma", grammar='root ::= "yes" | "no"'))
    assert r.status_code == 200 and r.json()["choices"][0]["text"] in ("yes", "no")
    schema = {"type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"]}
    r = call(app, "POST", "/v1/chat/completions", json=dict(CHAT, max_tokens=24,
                                                            response_format={"type": "json_object", "schema": schema}))
    assert r.status_code == 200, r.text
    assert isinstance(json.loads(r.json()["choices"][0]["message"]["content"])["answer"], bool)
    assert call(app, "POST", "/extras/detokenize", json={"tokens": [2, 3]}).status_code == 200


def test_streamed_llama_refuses_what_would_crash_it(app):
    """The same checks on the Python API (a bad grammar from any chat handler,
    a token outside the vocabulary), as errors instead of a crash."""
    from llama_cpp import LlamaGrammar

    llm = server.app_model(app)
    with pytest.raises(ValueError, match="cannot use this grammar"):
        llm.create_completion("hi", max_tokens=2, grammar=LlamaGrammar.from_string("root ::= ("))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.detokenize([10**9])


def test_concurrent_streams_all_complete(app):
    """5 streaming completions at once over HTTP: each runs to max_tokens and
    gives what it gives alone (llama_cpp.server's interrupt_requests cut a
    running stream off when the next request arrived)."""
    prompts = ["The capital of France is", "Once upon a time", "The quick brown fox", "In 1492 Columbus",
               "Water boils at"]
    want = {p: call(app, "POST", "/v1/completions", json=dict(COMPLETION, prompt=p, max_tokens=10)).json()
            for p in prompts}
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    got, errors = {}, []

    def stream(prompt):
        try:
            pieces, finish, done = [], None, False
            with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", headers=AUTH, timeout=TIMEOUT * 4,
                              json=dict(COMPLETION, prompt=prompt, max_tokens=10, stream=True)) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        choice = json.loads(line[6:])["choices"][0]
                        pieces.append(choice["text"])
                        finish = choice.get("finish_reason") or finish
            got[prompt] = ("".join(pieces), finish, done)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"{prompt}: {exc!r}")

    try:
        wait_for(lambda: srv.started or not thread.is_alive(), 30, "server start")
        clients = [threading.Thread(target=stream, args=(p,)) for p in prompts]
        for c in clients:
            c.start()
        for c in clients:
            c.join(timeout=TIMEOUT * 5)
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
    assert not errors, errors
    for p in prompts:
        text, finish = want[p]["choices"][0]["text"], want[p]["choices"][0]["finish_reason"]
        assert got[p] == (text, finish, True), p


def test_serve_flags_reach_the_app(capsys, monkeypatch, tiny_path):
    from gguf_stream import cli

    seen = {}

    def fake_create_app(path, **kw):
        seen.update(kw)
        raise ValueError("stopped before loading")

    monkeypatch.setattr(server, "create_app", fake_create_app)
    rc = cli.main(["serve", str(tiny_path), "--device", "host", "--port", str(free_port()), "--api-key", KEY,
                   "--cors", GOOD_ORIGIN, "--cors", "http://other.example"])
    assert rc == cli.EXIT_ERROR and "stopped before loading" in capsys.readouterr().err
    assert seen["api_key"] == KEY and seen["cors_origins"] == [GOOD_ORIGIN, "http://other.example"]
    assert seen["prompt_cache"] is True
    rc = cli.main(["serve", str(tiny_path), "--device", "host", "--port", str(free_port()), "--no-prompt-cache"])
    assert rc == cli.EXIT_ERROR and seen["prompt_cache"] is False
    capsys.readouterr()
    rc = cli.main(["serve", str(tiny_path), "--device", "host", "--api-key", " "])
    assert rc == cli.EXIT_ERROR and "--api-key is empty" in capsys.readouterr().err
