"""serve -np N (serve_batch): concurrent completion requests share one
batch loop (host mode, Gemma). Each greedy request gets exactly the text it
gets from the -np 1 server alone (streaming too, chat too, per-request
max_tokens), several requests are decoded per step, crossing two seats'
rows is caught, a client that goes away frees its seat, and -np 1 keeps
llama_cpp.server's own routes."""
import gguf_stream  # noqa: F401  (llama.cpp before numpy)

import asyncio
import json
import os
import threading
from contextlib import contextmanager

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

SETTINGS = dict(n_batch=CPU["n_batch"], n_ubatch=CPU["n_ubatch"], n_threads=CPU["n_threads"], verbose=False,
                device="host")
SEATS = 4
PROMPTS = ["The capital of France is", "Once upon a time", "The quick brown fox", "In 1492 Columbus",
           "Water boils at"]  # one more than the seats: the fifth waits for a free one
MAX_TOKENS = [6, 3, 8, 1, 5]  # per request
CHAT = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 6, "temperature": 0}


def completion(prompt, max_tokens, **kw):
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **kw}


def alone_app(gemma_path):
    return server.create_app(gemma_path, n_ctx=256, **SETTINGS)


@pytest.fixture(scope="module")
def reference(gemma_path):
    """What each request gets from the -np 1 server, one at a time (one app
    per process, as llama_cpp.server: made and closed before batch_app)."""
    app = alone_app(gemma_path)
    llm = server.app_model(app)

    def fresh(path, body):  # Llama would reuse the cached prefix (BOS): a prompt decoded in two parts
        llm.reset()
        return call(app, "POST", path, json=body).json()["choices"][0]

    try:
        texts = [fresh("/v1/completions", completion(p, n)) for p, n in zip(PROMPTS, MAX_TOKENS)]
        chat = fresh("/v1/chat/completions", CHAT)
    finally:
        server.close_app(app)
    return [(c["text"], c["finish_reason"]) for c in texts], (chat["message"]["content"], chat["finish_reason"])


FIRST = "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun while the fox runs."
FOLLOW = " What did the fox do next?"


@pytest.fixture(scope="module")
def continued(gemma_path):
    """The -np 1 server's texts for a prompt, then for that prompt, its reply
    and more (a chat client's next turn): llama_cpp.Llama decodes only what
    follows the tokens it holds."""
    app = alone_app(gemma_path)
    llm = server.app_model(app)
    try:
        llm.reset()
        first = call(app, "POST", "/v1/completions", json=completion(FIRST, 8)).json()["choices"][0]["text"]
        second = call(app, "POST", "/v1/completions",
                      json=completion(FIRST + first + FOLLOW, 6)).json()["choices"][0]["text"]
    finally:
        server.close_app(app)
    return first, second


@pytest.fixture(scope="module")
def batch_app(gemma_path, reference, continued):
    app = server.create_app(gemma_path, n_ctx=256 * SEATS, n_seq_max=SEATS, **SETTINGS)
    yield app
    server.close_app(app)


def call(app, method, path, **kw):
    return asyncio.run(_requests(app, [(method, path, kw)]))[0]


async def _requests(app, calls):
    """The calls at once, from one client."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://server", timeout=TIMEOUT * 4) as client:
        return await asyncio.gather(*(client.request(m, p, **kw) for m, p, kw in calls))


class Running:
    """The app on a real port (streams and disconnects need one)."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.srv.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        wait_for(lambda: self.srv.started or not self.thread.is_alive(), 30, "server start")
        return self

    def __exit__(self, *exc):
        self.srv.should_exit = True
        self.thread.join(timeout=30)


@contextmanager
def held(loop, n_requests: int):
    """The batch loop paused (an exclusive call that waits) until n_requests
    wait for a seat: then they are seated together, whatever the timing."""
    running, release = threading.Event(), threading.Event()

    def pause():
        running.set()
        release.wait(TIMEOUT)

    pauser = threading.Thread(target=loop.run_exclusive, args=(pause,))
    pauser.start()
    running.wait(TIMEOUT)
    try:
        yield lambda: wait_for(lambda: loop.health()["requests_waiting"] >= n_requests, TIMEOUT, "requests")
    finally:
        release.set()
        pauser.join(TIMEOUT)


def in_thread(fn, *args):
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("result", fn(*args)))
    thread.start()
    return thread, out


def stream_text(url, body) -> tuple[str, str | None, bool]:
    pieces, finish, done = [], None, False
    with httpx.stream("POST", url, json=dict(body, stream=True), timeout=TIMEOUT * 4) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                choice = json.loads(line[6:])["choices"][0]
                pieces.append(choice["text"] if "text" in choice else choice["delta"].get("content") or "")
                finish = choice.get("finish_reason") or finish
    return "".join(pieces), finish, done


def test_concurrent_requests_get_what_each_gets_alone(batch_app, reference):
    texts, chat = reference
    loop = batch_app.state.gguf_stream_proxy.batch_loop
    steps, generated = loop.steps, loop.generated
    calls = [("POST", "/v1/completions", {"json": completion(p, n)}) for p, n in zip(PROMPTS, MAX_TOKENS)]
    calls.append(("POST", "/v1/chat/completions", {"json": CHAT}))
    with held(loop, len(calls)) as all_waiting:
        thread, result = in_thread(lambda: asyncio.run(_requests(batch_app, calls)))
        all_waiting()
    thread.join(TIMEOUT * 4)
    out = result["result"]
    assert all(r.status_code == 200 for r in out), [r.text for r in out]
    got = [(r.json()["choices"][0]["text"], r.json()["choices"][0]["finish_reason"]) for r in out[:-1]]
    assert got == texts
    for r, n in zip(out, MAX_TOKENS):  # max_tokens per request: each stops at its own
        used, finish = r.json()["usage"]["completion_tokens"], r.json()["choices"][0]["finish_reason"]
        assert used == n if finish == "length" else used < n
    message = out[-1].json()["choices"][0]
    assert (message["message"]["content"], message["finish_reason"]) == chat
    assert loop.max_parallel == SEATS and loop.steps - steps < loop.generated - generated  # several per step


def test_concurrent_streams_get_what_each_gets_alone(batch_app, reference):
    texts, chat = reference
    got, errors = {}, []

    def one(i):
        try:
            if i == len(PROMPTS):
                got[i] = stream_text(f"{running.url}/v1/chat/completions", CHAT)
            else:
                got[i] = stream_text(f"{running.url}/v1/completions", completion(PROMPTS[i], MAX_TOKENS[i]))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    loop = batch_app.state.gguf_stream_proxy.batch_loop
    with Running(batch_app) as running:
        clients = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS) + 1)]
        with held(loop, len(clients)) as all_waiting:
            for c in clients:
                c.start()
            all_waiting()
        for c in clients:
            c.join(timeout=TIMEOUT * 4)
    assert not errors, errors
    assert [got[i] for i in range(len(PROMPTS) + 1)] == [(t, f, True) for t, f in [*texts, chat]]


def test_negative_control_crossed_seats_are_caught(batch_app, reference, monkeypatch):
    """Two seats' rows swapped in the step decode: the texts change, so the
    comparisons above would catch a loop that mixes its requests up."""
    from gguf_stream import batch

    step = batch.BatchDecoder.step

    def swapped(self, entries):
        out = step(self, entries)
        return out[1::-1] + out[2:] if len(out) > 1 else out

    monkeypatch.setattr(batch.BatchDecoder, "step", swapped)
    loop = batch_app.state.gguf_stream_proxy.batch_loop
    calls = [("POST", "/v1/completions", {"json": completion(p, n)}) for p, n in zip(PROMPTS[:2], MAX_TOKENS)]
    with held(loop, 2) as all_waiting:
        thread, result = in_thread(lambda: asyncio.run(_requests(batch_app, calls)))
        all_waiting()
    thread.join(TIMEOUT * 4)
    got = [(r.json()["choices"][0]["text"], r.json()["choices"][0]["finish_reason"]) for r in result["result"]]
    assert got[0] != reference[0][0] and got[1] != reference[0][1]


def test_client_gone_mid_stream_frees_its_seat(batch_app, reference):
    """Every seat busy with a long stream whose client goes after the first
    tokens: the seats free at once (not after max_tokens) and the next
    request is served."""
    texts, _ = reference
    loop = batch_app.state.gguf_stream_proxy.batch_loop
    long = 200
    generated = loop.generated
    with Running(batch_app) as running:
        def leave_early(i):
            body = completion(PROMPTS[i], long, stream=True)
            with httpx.stream("POST", f"{running.url}/v1/completions", json=body, timeout=TIMEOUT * 4) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        return  # closes the connection after the first chunk

        clients = [threading.Thread(target=leave_early, args=(i,)) for i in range(SEATS)]
        for c in clients:
            c.start()
        for c in clients:
            c.join(timeout=TIMEOUT * 4)
        wait_for(lambda: loop.health()["slots_processing"] == 0, TIMEOUT, "the seats to free")
        assert loop.generated - generated < SEATS * long // 2  # they stopped early
        health = httpx.get(f"{running.url}/health", timeout=TIMEOUT).json()
        assert health == {"status": "ok", "slots_idle": SEATS, "slots_processing": 0, "requests_waiting": 0}
        assert stream_text(f"{running.url}/v1/completions", completion(PROMPTS[0], MAX_TOKENS[0])) == \
            (*texts[0], True)
        slots = httpx.get(f"{running.url}/slots", timeout=TIMEOUT).json()
        assert [s["is_processing"] for s in slots] == [False] * SEATS


def test_a_prompt_that_continues_a_seat_is_not_decoded_again(batch_app, continued, caplog):
    """A request whose prompt continues an earlier one's prompt and reply (a
    chat client resending its conversation) takes the free seat whose cells
    hold them and decodes only the rest: its text equals the -np 1 server's,
    which reuses its cache the same way, and the loop counts the tokens it
    found. Negative controls: a prompt sharing only BOS with a seat finds
    nothing (its decodes stay those of a fresh run), nor does the
    continuation once the seats' cells are cleared (an exclusive call).
    Each request's line on the server log says what it found and decoded."""
    import logging
    import re

    caplog.set_level(logging.INFO, logger="gguf_stream.server")
    loop = batch_app.state.gguf_stream_proxy.batch_loop
    llm = server.app_model(batch_app)

    def ask(prompt, n):
        before = loop.cached_tokens
        text = call(batch_app, "POST", "/v1/completions", json=completion(prompt, n)).json()["choices"][0]["text"]
        return text, loop.cached_tokens - before

    first, found = ask(FIRST, 8)
    assert (first, found) == (continued[0], 0)
    second, found = ask(FIRST + first + FOLLOW, 6)
    assert second == continued[1]
    n_prompt = len(llm.tokenize((FIRST + first + FOLLOW).encode()))
    assert len(llm.tokenize(FIRST.encode())) - 1 <= found < n_prompt
    said = re.compile(rf"slot \d+: prompt {n_prompt} tokens, {found} from the cache, {n_prompt - found} decoded in "
                      r"[\d.]+ s; generated 6 tokens in [\d.]+ s")
    # (the line comes as the request leaves its seat, which may be just after its reply)
    wait_for(lambda: any(said.match(r.getMessage()) for r in caplog.records), TIMEOUT, "the request's log line")
    assert ask("Water boils at", 2)[1] == 0  # BOS alone is not a reason to reuse
    loop.run_exclusive(lambda: None)  # clears the cache, and with it what the seats held
    assert ask(FIRST + first + FOLLOW, 6)[1] == 0
    # (a seat keeps its tokens as the request leaves it, which may be just after its reply)
    wait_for(lambda: any(s.get("n_kept_tokens", 0) > 0 for s in loop.slots()), TIMEOUT, "a seat keeping its tokens")
    loop.prompt_cache = False  # (--no-prompt-cache): nothing kept, nothing found
    loop.run_exclusive(lambda: None)
    assert ask(FIRST, 8) == (continued[0], 0) and ask(FIRST + first + FOLLOW, 6)[1] == 0
    assert all(s.get("n_kept_tokens", 0) == 0 for s in loop.slots())
    loop.prompt_cache = True


def test_sampling_options_and_refusals(batch_app):
    grammar = 'root ::= "yes" | "no"'
    r = call(batch_app, "POST", "/v1/completions",
             json=completion("Is water wet?", 4, grammar=grammar, temperature=0.7, seed=3))
    assert r.status_code == 200 and r.json()["choices"][0]["text"] in ("yes", "no")
    seeded = [call(batch_app, "POST", "/v1/completions", json=completion("Once", 6, temperature=1.0, seed=5))
              .json()["choices"][0]["text"] for _ in range(2)]
    assert seeded[0] == seeded[1]  # a seed draws the same tokens again
    r = call(batch_app, "POST", "/v1/completions", json=completion("Once", 4, mirostat_mode=2))
    assert r.status_code == 400 and "-np 1" in r.json()["error"]["message"]
    r = call(batch_app, "POST", "/v1/completions", json=completion("word " * 300, 4))
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]


def test_np1_keeps_llama_cpp_servers_routes(gemma_path, batch_app):  # last: it closes batch_app's model
    app = alone_app(gemma_path)
    try:
        assert app.state.gguf_stream_proxy.batch_loop is None
        assert call(app, "GET", "/health").json() == {"status": "ok"}
        assert call(app, "GET", "/slots").status_code == 404
        assert not any(getattr(r, "path", "") == "/v1/completions" for r in app.router.routes)  # theirs serve
    finally:
        server.close_app(app)


def test_embeddings_run_between_batched_requests(gemma_path):  # last: a new app closes the others' models
    """--embedding with -np 2: embeddings (they clear the cache) run in the
    loop between requests, while completions arrive at the same time; each
    answers, the same input gives the same vector, the slots end free."""
    app = server.create_app(gemma_path, n_ctx=512, n_seq_max=2, embedding=True, **SETTINGS)
    try:
        calls = [("POST", "/v1/embeddings", {"json": {"input": "hello"}}),
                 *[("POST", "/v1/completions", {"json": completion(p, 4)}) for p in PROMPTS[:3]],
                 ("POST", "/v1/embeddings", {"json": {"input": "hello"}})]
        out = asyncio.run(_requests(app, calls))
        assert [r.status_code for r in out] == [200] * len(calls), [r.text[:200] for r in out]
        first, last = (r.json()["data"][0]["embedding"] for r in (out[0], out[-1]))
        assert first == last and len(first) > 0
        assert all(r.json()["usage"]["completion_tokens"] >= 1 for r in out[1:-1])
        assert app.state.gguf_stream_proxy.batch_loop.health()["slots_processing"] == 0
    finally:
        server.close_app(app)
