"""serve --lookup N / -md DRAFT (create_app(lookup=..., draft_model=...)):
greedy completions through HTTP equal the server's without drafts, stream
and not, completion and chat; each request's acceptance logged; a negative
control (drafts taken unchecked) shows the comparison can fail; bad values
refused before loading; prompt lookup and a draft model with -np N draft
in the batch loop (host mode, Gemma)."""
import gguf_stream  # noqa: F401  (llama.cpp before numpy)

import asyncio
import json
import logging
import os

import pytest

from conftest import CPU

try:
    import httpx  # noqa: F401
    import uvicorn  # noqa: F401

    from gguf_stream import server
except ImportError:
    if os.environ.get("CI"):
        raise
    pytest.skip("needs the server extra: pip install -e '.[dev]'", allow_module_level=True)

from test_server_batch import _requests, call

# llama.cpp's CPU kernels are chosen by a decode's rows (llamafile's sgemm,
# the repacked weights' gemm from 4 rows: up to 0.6 apart in Gemma's
# logits), so a verify decode's logits - and the KV cells its accepted
# drafts leave - are not bit for bit a token-at-a-time decode's: a near-tie
# may go the other way (as in llama.cpp's own speculative decoding). The
# requests are plain greedy (no repeat penalty, whose pushes make such ties
# here) and a verify has 3 rows.
DRAFTS = 2

SETTINGS = dict(n_ctx=256, n_batch=CPU["n_batch"], n_ubatch=CPU["n_ubatch"], n_threads=CPU["n_threads"],
                verbose=False, device="host", n_streamed=6, n_slots=2)
# repeats, so that prompt lookup finds drafts in the text so far
PROMPT = "one two three four, one two three four, one two three four, one two"
GREEDY = {"temperature": 0, "repeat_penalty": 1.0}
REQUESTS = [("/v1/completions", {"prompt": PROMPT, "max_tokens": 24, **GREEDY}),
            ("/v1/completions", {"prompt": "The capital of France is", "max_tokens": 12, **GREEDY}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Repeat exactly: red green blue red "
                                                    "green blue red green blue"}], "max_tokens": 20, **GREEDY})]


def answer(app, path: str, body: dict, stream: bool) -> str:
    """The request's text, from a fresh context (Llama would reuse the
    cached prefix: the prompt decoded in two parts)."""
    server.app_model(app).reset()
    if not stream:
        choice = call(app, "POST", path, json=body).json()["choices"][0]
        return choice["text"] if "text" in choice else choice["message"]["content"]
    r = call(app, "POST", path, json=dict(body, stream=True))
    assert r.status_code == 200, r.text
    pieces = []
    for line in r.text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            choice = json.loads(line[6:])["choices"][0]
            pieces.append(choice["text"] if "text" in choice else choice["delta"].get("content") or "")
    return "".join(pieces)


def answers(app) -> list[str]:
    return [answer(app, path, body, stream) for path, body in REQUESTS for stream in (False, True)]


@pytest.fixture(scope="module")
def reference(gemma_path):
    """Every request's text from the server without drafts (one app per process)."""
    app = server.create_app(gemma_path, **SETTINGS)
    try:
        texts = answers(app)
    finally:
        server.close_app(app)
    assert all(t.strip() for t in texts)
    return texts


@pytest.fixture(scope="module")
def continued(gemma_path):
    """The server's texts without drafts for the repeating prompt, then for
    that prompt, its reply and more (Llama decodes only what follows what
    it holds)."""
    app = server.create_app(gemma_path, **SETTINGS)
    try:
        first = answer(app, *REQUESTS[0], stream=False)
        body = dict(REQUESTS[0][1], prompt=PROMPT + first + " one two", max_tokens=12)
        second = call(app, "POST", "/v1/completions", json=body).json()["choices"][0]["text"]
    finally:
        server.close_app(app)
    return first, second


@pytest.mark.parametrize("drafting", ["lookup", "draft model"])
def test_drafted_answers_equal_the_plain_server(gemma_path, reference, drafting, caplog):
    """With prompt lookup, and with the model itself as its draft model
    (every draft right: passes far fewer than tokens), each request's text
    is the server's without drafts; one log line per request."""
    spec = dict(lookup=DRAFTS) if drafting == "lookup" else dict(draft_model=gemma_path, draft_max=DRAFTS)
    app = server.create_app(gemma_path, **SETTINGS, **spec)
    try:
        llm, drafter = server.app_model(app), app.state.gguf_stream_proxy.drafter
        assert llm._streamer.config.generate_rows == DRAFTS + 1  # the split measured for verify decodes
        with caplog.at_level(logging.INFO, logger="gguf_stream.server"):
            texts, results = [], []
            for path, body in REQUESTS:
                for stream in (False, True):
                    texts.append(answer(app, path, body, stream))
                    results.append(drafter.result)
        assert texts == reference
        lines = [r.getMessage() for r in caplog.records if r.name == "gguf_stream.server"]
        assert len(lines) == len(texts) and all(" drafted tokens accepted " in line for line in lines)
        assert all(r.drafted >= r.accepted for r in results)
        first = results[0]  # the repeating prompt: lookup's drafts are mostly right
        assert first.accepted > 0 and first.passes + 1 < len(first.tokens)
        if drafting == "draft model":  # the repeating prompt: every draft right, but for the last pass's
            assert all(r.drafted - DRAFTS <= r.accepted for r in results[:2])  # that max_tokens cut off
            assert all(r.tokens_per_pass > 2 for r in results[:2])
    finally:
        server.close_app(app)
    if drafting == "draft model":
        assert drafter.drafter.model.ctx is None  # the draft model closed with the app


def alone(app, loop, path, body, stream):
    """(text, steps, tokens) of one request with the loop to itself, from a
    fresh cache (as the reference's context was)."""
    loop.run_exclusive(lambda: None)
    steps, generated = loop.steps, loop.generated
    if stream:
        r = call(app, "POST", path, json=dict(body, stream=True))
        chunks = [json.loads(line[6:])["choices"][0] for line in r.text.splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        text = "".join(c["text"] if "text" in c else c["delta"].get("content") or "" for c in chunks)
    else:
        choice = call(app, "POST", path, json=body).json()["choices"][0]
        text = choice["text"] if "text" in choice else choice["message"]["content"]
    return text, loop.steps - steps, loop.generated - generated


def at_once(app) -> list[str]:
    """The texts of REQUESTS sent together (not streamed)."""
    got = asyncio.run(_requests(app, [("POST", path, {"json": body}) for path, body in REQUESTS]))
    choices = [r.json()["choices"][0] for r in got]
    return [c["text"] if "text" in c else c["message"]["content"] for c in choices]


def test_np_n_drafts_with_prompt_lookup_in_the_batch_loop(gemma_path, reference, continued, caplog):
    """-np 2 with --lookup: the batch loop drafts for greedy requests from
    their own text and checks a seat's drafts in its rows of the step
    decode. Each request alone (the seats' cells cleared between, as the
    reference's context was) gets the server's text without drafts, the
    repeating prompt in fewer steps than tokens, one log line each; the
    three at once get the same texts. A drafted reply's slot keeps exactly
    its tokens' cells: the conversation's next turn, which starts from
    them, gets the -np 1 server's text."""
    app = server.create_app(gemma_path, **{**SETTINGS, "n_ctx": 2 * SETTINGS["n_ctx"]}, n_seq_max=2, lookup=DRAFTS)
    try:
        proxy = app.state.gguf_stream_proxy
        loop = proxy.batch_loop
        assert loop.drafter is not None and proxy.drafter is None  # the loop drafts, not Llama
        with caplog.at_level(logging.INFO, logger="gguf_stream.server"):
            got = [alone(app, loop, path, body, stream) for path, body in REQUESTS for stream in (False, True)]
            loop.run_exclusive(lambda: None)  # the last request out of its seat (and logged)
        assert [text for text, _, _ in got] == reference
        _, steps, generated = got[0]  # the repeating prompt: most drafts right
        assert loop.accepted > 0 and steps + 1 < generated
        lines = [r.getMessage() for r in caplog.records if " drafted tokens accepted " in r.getMessage()]
        assert len(lines) == len(got)
        assert at_once(app) == reference[::2]
        first, _, _ = alone(app, loop, *REQUESTS[0], stream=False)
        cached = loop.cached_tokens
        body = dict(REQUESTS[0][1], prompt=PROMPT + first + " one two", max_tokens=12)
        second = call(app, "POST", "/v1/completions", json=body).json()["choices"][0]["text"]
        assert loop.cached_tokens > cached and (first, second) == continued
    finally:
        server.close_app(app)


def test_np_n_drafts_with_a_draft_model_in_the_batch_loop(gemma_path, reference, caplog):
    """-np 2 with -md (the model itself as its draft model: its drafts are
    right but where a decode's row count tips a near tie): the batch loop
    drafts for every greedy slot from one draft context with a sequence per
    slot (both slots' drafts from --draft-max decodes). Each request alone
    gets the server's text without drafts, most in fewer steps than tokens;
    the three at once get the same texts; the draft model closes with the app."""
    from gguf_stream.speculative import DraftModel

    app = server.create_app(gemma_path, **{**SETTINGS, "n_ctx": 2 * SETTINGS["n_ctx"]}, n_seq_max=2,
                            draft_model=gemma_path, draft_max=DRAFTS)
    try:
        proxy = app.state.gguf_stream_proxy
        loop, drafter = proxy.batch_loop, proxy.batch_loop.drafter
        assert isinstance(drafter, DraftModel) and proxy.drafter is None
        assert drafter.model.config.n_seq_max == 2 and drafter.n_draft == DRAFTS
        with caplog.at_level(logging.INFO, logger="gguf_stream.server"):
            got = [alone(app, loop, path, body, stream) for path, body in REQUESTS for stream in (False, True)]
            loop.run_exclusive(lambda: None)  # the last request out of its seat (and logged)
        assert [text for text, _, _ in got] == reference
        assert loop.accepted > 0.8 * loop.drafted
        assert sum(steps + 1 < generated for _, steps, generated in got) >= len(got) - 1
        lines = [r.getMessage() for r in caplog.records if " drafted tokens accepted " in r.getMessage()]
        assert len(lines) == len(got)
        drafted, accepted = loop.drafted, loop.accepted
        assert at_once(app) == reference[::2]
        # seats drafting together get their own drafts (drafts crossed between seats would be rejected)
        assert loop.accepted - accepted > 0.8 * (loop.drafted - drafted) > 0
        # a failing draft model: the requests go on without drafts, with a warning
        drafter.draft_seats = lambda asks: 1 / 0
        with caplog.at_level(logging.WARNING, logger="gguf_stream.server"):
            text, _, _ = alone(app, loop, *REQUESTS[0], stream=False)
        assert text == reference[0] and loop.drafter is None
        assert any("drafting failed (ZeroDivisionError" in r.getMessage() for r in caplog.records)
    finally:
        server.close_app(app)
    assert drafter.model.ctx is None


def test_unchecked_drafts_change_the_answers(gemma_path, reference, monkeypatch):
    """Negative control: a sampler that takes every drafted token as the
    model's (no verification) gives other text, so the equality above is
    a real check of the verify path."""
    app = server.create_app(gemma_path, **SETTINGS, lookup=DRAFTS)
    try:
        llm = server.app_model(app)
        real = llm.sample

        def trusting(*args, idx=None, **kwargs):  # the next position's token as it was drafted
            if idx is not None and idx + 1 < llm.n_tokens:
                return int(llm._input_ids[idx + 1])
            return real(*args, idx=idx, **kwargs)

        monkeypatch.setattr(llm, "sample", trusting)
        path, body = REQUESTS[1]  # where lookup's drafts are mostly wrong
        wrong = answer(app, path, body, stream=False)
        result = app.state.gguf_stream_proxy.drafter.result
        assert result.drafted > 0 and result.accepted == result.drafted  # every draft taken
        assert wrong != reference[2]
    finally:
        server.close_app(app)


def test_sampled_requests_get_no_drafts(gemma_path, caplog):
    """Drafts are greedy's: a request with temperature > 0 is generated
    without them (and the log says so)."""
    app = server.create_app(gemma_path, **SETTINGS, lookup=4)
    try:
        with caplog.at_level(logging.INFO, logger="gguf_stream.server"):
            r = call(app, "POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0.7,
                                                          "seed": 1})
        assert r.status_code == 200, r.text
        result = app.state.gguf_stream_proxy.drafter.result
        assert result.drafted == 0 and result.passes >= 1
        assert any("without drafts" in rec.getMessage() for rec in caplog.records)
    finally:
        server.close_app(app)


@pytest.mark.parametrize("options,needle", [
    (dict(lookup=0), "--lookup must be in 1..256"),
    (dict(lookup=True), "--lookup must be in 1..256"),
    (dict(lookup=4, draft_model="{gemma}"), "give one"),
    (dict(draft_model="{gemma}", draft_max=0), "--draft-max must be in 1..256"),
    (dict(draft_model="/nonexistent/draft.gguf"), "is not a file"),
    (dict(draft_model_num_pred_tokens=5), "goes with draft_model='prompt-lookup-decoding'"),
    (dict(lookup=4, draft_model="prompt-lookup-decoding"), "give one"),
])
def test_bad_speculative_options_are_refused_before_loading(gemma_path, options, needle, monkeypatch):
    import gguf_stream.llama_compat as compat

    monkeypatch.setattr(compat.StreamedLlama, "__init__", lambda *a, **k: pytest.fail("loaded"))
    options = {k: v.format(gemma=gemma_path) if isinstance(v, str) else v for k, v in options.items()}
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        server.create_app(gemma_path, **{**SETTINGS, **options})


def test_llama_cpp_servers_spelling_is_prompt_lookup():
    """llama_cpp.server's draft_model="prompt-lookup-decoding" with
    draft_model_num_pred_tokens is our prompt lookup."""
    settings = {"draft_model_num_pred_tokens": 5, "chat_format": "gemma"}
    got = server.speculative_options(None, "prompt-lookup-decoding", 16, settings)
    assert got == {"lookup": 5, "draft_model": None, "draft_max": 16} and settings == {"chat_format": "gemma"}
    assert server.speculative_options(None, "prompt-lookup-decoding", 16, {})["lookup"] == 10  # its default
    assert server.speculative_options(None, None, 16, {}) is None


def test_a_draft_model_of_another_vocabulary_is_refused(gemma_path, tiny_path, monkeypatch):
    """...after loading both: the model and the draft model are closed again."""
    import gguf_stream.llama_compat as compat
    import gguf_stream.model as model_mod

    closed = []
    for cls in (compat.StreamedLlama, model_mod.StockModel):
        monkeypatch.setattr(cls, "close", lambda self, _close=cls.close: closed.append(type(self)) or _close(self))
    with pytest.raises(ValueError, match="vocabulary"):
        server.create_app(gemma_path, **SETTINGS, draft_model=tiny_path)
    assert compat.StreamedLlama in closed and model_mod.StockModel in closed


def test_serve_cli_refuses_bad_speculative_flags(gemma_path, capsys):
    from test_cli import assert_user_error, run_main

    for extra, needle in ((["--lookup", "0"], "--lookup must be in 1..256"),
                          (["--lookup", "4", "-md", str(gemma_path)], "give one")):
        rc, _, err = run_main(capsys, "serve", str(gemma_path), "--device", "host", "--port", "0", *extra)
        assert_user_error(rc, err, needle)


def test_serve_prints_the_servers_lines(capsys):
    """gguf-stream serve shows the per-request lines on stderr, once each."""
    from gguf_stream.cli import serve

    level = server.log.level
    try:
        serve._say_server_log(server.log)
        serve._say_server_log(server.log)  # again (a second app in one process): still one handler
        server.log.info("speculative: 3 of 4 drafted tokens accepted")
        assert capsys.readouterr().err.count("gguf-stream: speculative: 3 of 4 drafted tokens accepted\n") == 1
    finally:
        for h in [h for h in server.log.handlers if isinstance(h, serve._Say)]:
            server.log.removeHandler(h)
        server.log.setLevel(level)
