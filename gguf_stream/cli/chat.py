"""gguf-stream chat: an interactive chat through StreamedLlama with the GGUF's chat template."""
from __future__ import annotations

import sys
import time
from types import SimpleNamespace

from . import speculative
from .common import EXIT_INTERRUPTED, EXIT_OK, CtrlC, Formatter, add_engine, add_model, check_flags, check_n_predict, describe_flash_attn, describe_plan, error, one_line, prepare_load, resolve_seed, say, streamed_llama

CHAT_N_PREDICT = 256


def add_parser(sub, parents) -> None:
    p = sub.add_parser("chat", parents=parents,
                       help="interactive chat with the GGUF's chat template (stdin lines)",
                       formatter_class=Formatter, description="Chat through StreamedLlama.create_chat_completion"
                       " (stream=True) with the GGUF's chat template. Reads one message per stdin line (at a "
                       "terminal with line editing and history, through readline where the platform has it); "
                       "/reset clears the conversation; /exit or EOF (Ctrl-D) ends. Ctrl-C during a reply stops "
                       "it (what it said so far stays in the conversation, as in llama-cli) and returns to the "
                       "prompt; Ctrl-C at the prompt, or twice during a reply, exits 130. After each reply, "
                       "prompt and generation t/s on stderr.")
    add_model(p, required=False)
    p.add_argument("-sys", "--system-prompt", metavar="TEXT", help="system message")
    p.add_argument("-n", "--n-predict", type=int, default=CHAT_N_PREDICT, metavar="N",
                   help=f"most tokens per reply (default {CHAT_N_PREDICT}; -1: until end of turn)")
    p.add_argument("--temp", type=float, default=0.0, help="temperature (default 0: greedy, reproducible)")
    p.add_argument("-s", "--seed", type=int, default=0, help="sampling seed (default 0; -1: random, said on stderr)")
    p.add_argument("--chat-format", metavar="NAME", help="llama-cpp-python chat format instead of the GGUF's "
                   "template (GGUFs without one: 'gemma' for Gemma, else llama-cpp-python's default)")
    speculative.add_speculative(p)
    add_engine(p)
    p.set_defaults(func=cmd_chat)


def cmd_chat(args) -> int:
    from ..llama_compat import apply_chat_format
    from ..speculative import LlamaDrafter, counted, llama_vocabulary

    check_flags(args)
    check_n_predict(args, "end of turn")
    device, path, options = prepare_load(args)
    drafter, extra = None, {}
    if speculative.wanted(args):
        speculative.check(args, SimpleNamespace(greedy=args.temp == 0))
        if options.get("generate_rows") is None:  # the split measured for verify decodes
            options["generate_rows"] = speculative.verify_rows(args)
        drafter = extra["draft_model"] = LlamaDrafter()
    t0 = time.perf_counter()
    llm = streamed_llama(args, path, options, seed=resolve_seed(args.seed), chat_format=args.chat_format, **extra)
    try:
        fmt = apply_chat_format(llm, args.chat_format)
        if drafter is not None:
            drafter.drafter = speculative.make_drafter(args, llama_vocabulary(llm), device, llm._streamer.config)
            counted(llm, drafter)
        say(f"loaded in {time.perf_counter() - t0:.1f} s; {describe_plan(llm.plan, device)}")
        say(describe_flash_attn(llm.flash_attn, llm._streamer.config.flash_attn))
        say(f"chat format: {fmt}; type a message and Enter; Ctrl-C stops a reply; /reset clears the "
            "conversation, /exit or EOF ends")
        return _chat_loop(llm, args, drafter)
    finally:
        llm.close()
        if drafter is not None:
            drafter.close()


def _line_editing() -> bool:
    """Line editing and history (for this session) through readline when
    both ends are a terminal: input() uses it then, with its prompt on
    stdout. Not every platform has readline; elsewhere lines come from
    stdin as they are."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return False
    try:
        import readline  # noqa: F401  (importing it is what gives input() editing and history)
    except ImportError:
        return False
    return True


def _read_message(editing: bool, interactive: bool) -> str | None:
    """The next line, None at end of input. Ctrl-C raises KeyboardInterrupt
    (the caller exits 130)."""
    if editing:
        try:
            return input("> ")
        except EOFError:  # Ctrl-D
            print()
            return None
    if interactive:
        print("> ", end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    return line or None


class ReplyTimer:
    """Prompt and generation time of one streamed reply, from the model's
    token count (Llama.n_tokens): at the first chunk the prompt has been
    decoded and the first token sampled; each later decode adds one token.
    Tokens the KV cache already held (the conversation so far) are not
    decoded again (llama-cpp-python reuses the longest common prefix, all
    but the prompt's last token at most)."""

    def __init__(self, llm):
        self.llm = llm
        self.t0 = time.perf_counter()
        self.cached = llm.input_ids[:llm.n_tokens].tolist()
        self.t_first = None

    def chunk(self) -> None:
        if self.t_first is None:
            self.t_first = time.perf_counter()
            self.n_first = self.llm.n_tokens
            prompt = self.llm.input_ids[:self.n_first].tolist()
            reused = 0
            for a, b in zip(self.cached, prompt[:-1]):
                if a != b:
                    break
                reused += 1
            self.n_prompt = self.n_first - reused

    def summary(self, n_gen: int | None = None) -> str | None:
        """'prompt: ...; generated: ...' like run prints, or None before any
        token. n_gen: the tokens generated where the context holds more
        (drafts decoded past the reply's end)."""
        if self.t_first is None:
            return None
        t_prompt, t_gen = self.t_first - self.t0, time.perf_counter() - self.t_first
        decodes = self.llm.n_tokens - self.n_first  # one per token after the first, as run counts
        if n_gen is None:
            n_gen = decodes + 1  # the first token came from the prompt's logits
        return (f"prompt: {self.n_prompt} new tokens ({self.n_first} in context) in {t_prompt:.2f} s "
                f"({self.n_prompt / t_prompt if t_prompt else 0:.1f} t/s); generated: {n_gen} tokens in "
                f"{t_gen:.2f} s ({(n_gen - 1) / t_gen if t_gen else 0:.1f} t/s)")  # the tokens after the first


def _reply(llm, messages, args, drafter=None) -> tuple[str, bool, str | None]:
    """Stream one reply to stdout: (its text, whether Ctrl-C stopped it, the
    timing line). The first Ctrl-C stops it after the token being decoded; a
    second one raises KeyboardInterrupt (the caller exits 130)."""
    timer, pieces = ReplyTimer(llm), []
    with CtrlC() as ctrl_c:
        stream = llm.create_chat_completion(messages, stream=True, temperature=args.temp,
                                            max_tokens=None if args.n_predict == -1 else args.n_predict)
        try:
            for chunk in stream:
                timer.chunk()
                piece = chunk["choices"][0]["delta"].get("content")
                if piece:
                    pieces.append(piece)
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                if ctrl_c.hit:
                    break
        finally:
            stream.close()  # a stopped reply's generator ends here, not at some later collection
    return "".join(pieces), ctrl_c.hit, timer.summary(None if drafter is None else len(drafter.result.tokens))


def _chat_loop(llm, args, drafter=None) -> int:
    system = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    messages = list(system)
    interactive = sys.stdin.isatty()
    editing = _line_editing()
    while True:
        try:
            line = _read_message(editing, interactive)
        except KeyboardInterrupt:  # Ctrl-C at the prompt ends the chat
            print(file=sys.stderr)
            return EXIT_INTERRUPTED
        if line is None:
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
        try:
            reply, stopped, timing = _reply(llm, messages, args, drafter)
        except KeyboardInterrupt:  # a second Ctrl-C during the reply: end the chat
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
        # As llama.cpp's llama-cli: a reply stopped by Ctrl-C stays in the
        # conversation as the assistant's turn, as far as it got.
        messages.append({"role": "assistant", "content": reply})
        if stopped:
            say("reply stopped (Ctrl-C); what it said so far stays in the conversation; Ctrl-C at the "
                "prompt ends the chat")
        if timing and drafter is not None:
            timing += f"; {drafter.result.summary()}"
        if timing:
            say(timing)
