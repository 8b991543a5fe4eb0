"""gguf-stream serve: llama-cpp-python's OpenAI-compatible server on a StreamedLlama."""
from __future__ import annotations

import logging
import time

from ..errors import EnvironmentMismatchError
from . import speculative
from .common import (EXIT_OK, Formatter, add_engine, add_model, check_flags, describe_plan, prepare_load, resolve_model,
                     say, threads)


def add_parser(sub, parents) -> None:
    p = sub.add_parser("serve", parents=parents,
                       help="OpenAI-compatible HTTP server (llama_cpp.server) on a streamed model",
                       formatter_class=Formatter, description="Serve MODEL through llama-cpp-python's server "
                       "(/v1/completions, /v1/chat/completions, ...) with a StreamedLlama. Needs the server "
                       "extra: pip install 'gguf-stream[server]'.")
    add_model(p, required=False)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--alias", metavar="NAME", help="model name clients use (default: the path)")
    p.add_argument("--chat-format", metavar="NAME", help="as in chat")
    p.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on every request "
                   "(default: none)")
    p.add_argument("--cors", metavar="ORIGIN", action="append", default=[],
                   help="let browser pages from ORIGIN (e.g. http://localhost:3000) call the server; repeatable "
                   "(default: no cross-origin requests)")
    p.add_argument("--no-prompt-cache", dest="prompt_cache", action="store_false",
                   help="-np N: decode every prompt whole (default: a request whose prompt continues what a free "
                   "slot holds takes that slot and decodes only the rest, as llama-server's prompt cache)")
    p.add_argument("--embedding", "--embeddings", action="store_true",
                   help="serve /v1/embeddings too (default: it answers 400)")
    p.add_argument("--pooling", choices=("none", "mean", "cls", "last"), default=None,
                   help="how --embedding pools a text's token vectors into one (default: the model's own where its "
                   "GGUF names one other than none, else mean; none: a vector per token, not OpenAI's shape)")
    speculative.add_speculative(p, "requests with temperature 0 (with -np N, in each slot); "
                                "each request's acceptance on stderr")
    add_engine(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    check_flags(args)
    try:
        import uvicorn

        from .. import server
    except ImportError as exc:
        raise EnvironmentMismatchError(
            f"serve needs llama-cpp-python's server packages ({exc.name or exc} is missing): "
            "pip install 'gguf-stream[server]' (or pip install 'llama-cpp-python[server]==0.3.36')") from None
    server.check_port(args.host, args.port)
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key is empty; give a key or leave the flag out")
    if args.pooling is not None and not args.embedding:
        raise ValueError("--pooling applies to embeddings: give --embedding too")
    speculative.check(args)
    device, path, options = prepare_load(args)
    draft = resolve_model(args.model_draft) if args.model_draft is not None else None
    t0 = time.perf_counter()
    app = server.create_app(path, host=args.host, port=args.port, **{**options, **threads(args)},
                            chat_format=args.chat_format, model_alias=args.alias, api_key=args.api_key,
                            cors_origins=args.cors, embedding=args.embedding, pooling=args.pooling,
                            lookup=args.lookup, draft_model=draft, draft_max=args.draft_max,
                            prompt_cache=args.prompt_cache)
    _say_server_log(server.log)
    try:
        llm = server.app_model(app)
        say(f"loaded in {time.perf_counter() - t0:.1f} s; {describe_plan(llm.plan, device)}")
        loop = app.state.gguf_stream_proxy.batch_loop
        if loop is not None:
            say(f"-np {loop.n_seats}: {loop.n_seats} sequences (llama-server's slots, GET /slots) of {loop.cells} "
                "KV cells each; concurrent completions are decoded together"
                + ("" if loop.unified else ", one pass over the streamed weights per run of consecutive busy slots "
                   "(llama.cpp's cache per slot; -kvu shares one cache: one pass whatever the slots)"))
        if (loop is not None and loop.drafter is not None) or app.state.gguf_stream_proxy.drafter is not None:
            say("speculative decoding: " + (f"up to {args.lookup} tokens per pass from prompt lookup" if args.lookup
                                            else f"draft model {draft}, up to {args.draft_max} tokens per pass")
                + " for greedy requests (temperature 0)" + (", in each slot" if loop is not None else ""))
        say(f"serving on http://{args.host}:{args.port}/v1 (OpenAI-compatible; API docs at /docs); Ctrl-C stops")
        if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
            say(f"anyone who can reach {args.host}:{args.port} can use it: give --api-key KEY to require a key")
        uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    finally:
        server.close_app(app)
    say("server stopped, model closed")
    return EXIT_OK


class _Say(logging.Handler):
    def emit(self, record) -> None:
        say(record.getMessage())


def _say_server_log(logger: logging.Logger) -> None:
    """The server's per-request lines (speculative acceptance) as progress lines on stderr."""
    if not any(isinstance(h, _Say) for h in logger.handlers):
        logger.addHandler(_Say())
    logger.setLevel(logging.INFO)
