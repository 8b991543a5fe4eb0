"""gguf-stream chat: an interactive chat through StreamedLlama with the GGUF's chat template."""
from __future__ import annotations

import sys
import time

from .common import EXIT_INTERRUPTED, EXIT_OK, CtrlC, Formatter, add_context, add_model, add_placement, \
    check_flags, check_n_predict, describe_plan, error, one_line, prepare_load, say, streamed_llama

CHAT_N_PREDICT = 256


def add_parser(sub, parents) -> None:
    p = sub.add_parser("chat", parents=parents,
                       help="interactive chat with the GGUF's chat template (stdin lines)",
                       formatter_class=Formatter, description="Chat through StreamedLlama.create_chat_completion"
                       " (stream=True) with the GGUF's chat template. Reads one message per stdin line; /reset "
                       "clears the conversation; /exit or EOF (Ctrl-D) ends.")
    add_model(p, required=False)
    p.add_argument("-sys", "--system-prompt", metavar="TEXT", help="system message")
    p.add_argument("-n", "--n-predict", type=int, default=CHAT_N_PREDICT, metavar="N",
                   help=f"most tokens per reply (default {CHAT_N_PREDICT}; -1: until end of turn)")
    p.add_argument("--temp", type=float, default=0.0, help="temperature (default 0: greedy, reproducible)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--chat-format", metavar="NAME", help="llama-cpp-python chat format instead of the GGUF's "
                   "template (GGUFs without one: 'gemma' for Gemma, else llama-cpp-python's default)")
    add_placement(p)
    add_context(p)
    p.set_defaults(func=cmd_chat)


def cmd_chat(args) -> int:
    from ..llama_compat import apply_chat_format

    check_flags(args)
    check_n_predict(args, "end of turn")
    device, path, options = prepare_load(args)
    t0 = time.perf_counter()
    llm = streamed_llama(args, path, device, options, seed=args.seed, chat_format=args.chat_format)
    try:
        fmt = apply_chat_format(llm, args.chat_format)
        say(f"loaded in {time.perf_counter() - t0:.1f} s; {describe_plan(llm.plan, device)}")
        say(f"chat format: {fmt}; type a message and Enter; /reset clears the conversation, /exit or EOF ends")
        return _chat_loop(llm, args)
    finally:
        llm.close()


def _chat_loop(llm, args) -> int:
    system = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    messages = list(system)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return EXIT_INTERRUPTED
        if not line:
            return EXIT_OK
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return EXIT_OK
        if line == "/reset":
            messages = list(system)
            say("conversation cleared")
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        try:
            with CtrlC() as ctrl_c:
                try:
                    stream = llm.create_chat_completion(messages, stream=True, temperature=args.temp,
                                                        max_tokens=None if args.n_predict == -1 else args.n_predict)
                    for chunk in stream:
                        piece = chunk["choices"][0]["delta"].get("content")
                        if piece:
                            reply.append(piece)
                            sys.stdout.write(piece)
                            sys.stdout.flush()
                        if ctrl_c.hit:
                            break
                except KeyboardInterrupt:  # a second Ctrl-C
                    ctrl_c.hit = True
            if ctrl_c.hit:
                sys.stdout.write("\n")
                sys.stdout.flush()
                error("interrupted (Ctrl-C)")
                return EXIT_INTERRUPTED
        except ValueError as exc:  # e.g. the conversation outgrew the context
            sys.stdout.write("\n")
            error(f"{one_line(exc)}; conversation cleared (raise -c for longer ones)")
            messages = list(system)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": "".join(reply)})
