"""What every command shares: output, flag checks, the model and its
placement, the parser's option groups, Ctrl-C handling."""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import time

from ..bench.budgets import is_relative, parse_budgets
from ..memory import format_size

PROG = "gguf-stream"
EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 130
MAX_SEED = 2**32 - 2  # llama.cpp's 2**32 - 1 (LLAMA_DEFAULT_SEED) means "random"


class _Output:
    verbose = False  # llama.cpp's log and tracebacks (-v)
    quiet = False  # no progress lines (-q)


output = _Output()


def say(msg: str) -> None:
    """A progress line on stderr (not with -q)."""
    if not output.quiet:
        print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


# library messages speak to the Python API; on the command line these are flags
_API_TO_FLAGS = (("run with verbose=True", "run with -v"), ("lower n_ctx / n_ubatch", "lower -c / -ub"),
                 ("(device='host')", "(--device host)"), ("raise n_ctx", "raise -c"),
                 ("set flash_attn=True, or use type_v='f16'", "give -fa on, or -ctv f16"),
                 ("a larger vram_budget", "a larger --vram-budget"), ("give a host_budget", "give --host-budget"),
                 ("(exact=True, or fewer generate_cpu_layers)", "(--exact, or fewer --generate-cpu-layers)"))


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
        if output.verbose:
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


# ------------------------------------------------------------ the model

def resolve_model(name: str | None) -> os.PathLike:
    """A GGUF path for a path or a models.toml name (None: the default model)."""
    from ..models import resolve

    if name is None:
        say("no MODEL given: using the embedded default model (gemma3-270m, Gemma 3 270M Q4_K_M)")
    t0 = time.perf_counter()
    path = resolve(name, progress=None if output.quiet else lambda m: say(m + " (first use only)"))
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
    """Every number in range and every engine option valid before anything
    loads (argparse only checks it is an int), named by its flag."""
    from ..config import MAX_CONTEXT, MAX_SLOTS, max_threads

    moe = moe_placement_flags(args)
    ngl_all = args.n_gpu_layers is not None and (args.n_gpu_layers < 0 or args.n_gpu_layers >= 99)
    chosen = [f for f, v in (("--vram-budget", args.vram_budget), ("--n-streamed", args.n_streamed),
                             ("--streamed-layers", args.streamed_layers),
                             ("-ngl", None if moe and ngl_all else args.n_gpu_layers)) if v is not None]
    if len(chosen + moe) > 1:
        raise ValueError(f"{' and '.join(chosen + moe)} both choose the placement; give only one"
                         + (" (-ngl 99 goes with them: every layer's other tensors on the GPU)" if moe else ""))
    if getattr(args, "n_cpu_moe", None) is not None and args.n_cpu_moe < 0:
        raise ValueError(f"--n-cpu-moe must be at least 0, got {args.n_cpu_moe}")
    if args.mmap:
        raise ValueError("--mmap: gguf-stream loads models without mmap (streamed layers must sit in pinned host "
                         "memory, which llama.cpp does not give a memory-mapped file); leave it out (--no-mmap is "
                         "what it does)")
    for flag, name, lo, hi, note in (
            ("-c", "n_ctx", 0, MAX_CONTEXT, "0: the model's training context"),
            ("-b", "n_batch", 1, MAX_CONTEXT, ""), ("-ub", "n_ubatch", 1, MAX_CONTEXT, ""),
            ("-t", "n_threads", 1, max_threads(), "8 per CPU at most"),
            ("-tb", "n_threads_batch", 1, max_threads(), "8 per CPU at most"),
            ("--n-streamed", "n_streamed", 0, MAX_SLOTS, ""), ("--n-slots", "n_slots", 1, MAX_SLOTS, ""),
            ("-ngl", "n_gpu_layers", -1, MAX_CONTEXT, "-1: all"), ("--seed", "seed", -1, MAX_SEED, "-1: random"),
            ("--top-k", "top_k", 0, MAX_CONTEXT, "0: off"),
            ("--repeat-last-n", "repeat_last_n", -1, MAX_CONTEXT, "0: off, -1: the context size")):
        value = getattr(args, name, None)
        if value is not None and not lo <= value <= hi:
            raise ValueError(f"{flag} must be in {lo}..{hi}{f' ({note})' if note else ''}, got {value}")
    for flag, name, lo, hi, note in (("--temp", "temp", 0, 100, "0: greedy"), ("--top-p", "top_p", 0, 1, "1: off"),
                                     ("--min-p", "min_p", 0, 1, "0: off")):
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and lo <= value <= hi):
            raise ValueError(f"{flag} must be a number in {lo}..{hi} ({note}), got {value}")
    penalty = getattr(args, "repeat_penalty", None)
    if penalty is not None and not (math.isfinite(penalty) and 0 < penalty <= 100):
        raise ValueError(f"--repeat-penalty must be a number over 0, at most 100 (1: off), got {penalty}")
    relative = is_relative(args.vram_budget)
    if relative:
        parse_budgets(args.vram_budget, 1)  # 'Nx' is read against the model once it is known
    # the rest of the engine's checks (a quantized V cache without -fa, a budget, ...)
    engine_config_of(args, **({"vram_budget": None} if relative else {}))
    for flag, name in (("-p", "prompt"), ("-sys", "system_prompt")):
        check_utf8(flag, getattr(args, name, None))


def check_utf8(flag: str, text: str | None) -> None:
    """Text from the command line the model can tokenize: Python keeps bytes
    that are not UTF-8 as surrogates, which only fail when encoded."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{flag} is not valid UTF-8 (at character {exc.start}); give UTF-8 text") from None


def check_n_predict(args, until: str) -> None:
    if args.n_predict == 0 or args.n_predict < -1:
        raise ValueError(f"-n must be positive or -1 (until {until}), got {args.n_predict}")


def resolve_seed(seed: int) -> int:
    """--seed -1 (llama.cpp's "random"): a fresh seed, said on stderr so that the run can be repeated."""
    if seed != -1:
        return seed
    import secrets

    seed = secrets.randbelow(MAX_SEED + 1)
    say(f"sampling seed {seed} (give --seed {seed} to repeat this run)")
    return seed


def sampling_grammar(args, model_path) -> str | None:
    """The GBNF grammar of --grammar / --grammar-file / --json-schema / --json-schema-file
    (at most one), checked by llama.cpp's parser in a child process: a grammar
    it cannot parse would crash this one at the first token."""
    from ..grammar import grammar_error

    given = [(flag, value) for flag, value in (("--grammar", args.grammar), ("--grammar-file", args.grammar_file),
                                               ("--json-schema", args.json_schema),
                                               ("--json-schema-file", args.json_schema_file)) if value is not None]
    if not given:
        return None
    if len(given) > 1:
        raise ValueError(f"{' and '.join(f for f, _ in given)} both constrain the output; give only one")
    flag, value = given[0]
    text = _read_text(flag, value) if flag.endswith("-file") else value
    check_utf8(flag, text)
    grammar = _schema_to_grammar(flag, text) if flag.startswith("--json-schema") else text
    reason = grammar_error(model_path, grammar)
    if reason is not None:
        raise ValueError(f"{flag}: llama.cpp cannot use this grammar: {reason}")
    return grammar


def _read_text(flag: str, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{flag} {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None


def _schema_to_grammar(flag: str, text: str) -> str:
    """A JSON schema's grammar, as llama-cpp-python makes it (LlamaGrammar.from_json_schema)."""
    import json

    from ..grammar import schema_grammar

    try:
        schema = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{flag} is not JSON ({exc})") from None
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"{flag} must be a JSON object (a JSON schema), not {type(schema).__name__}")
    try:
        return schema_grammar(schema)
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None


def sampling_params(args, model_path):
    """sampling.SamplingParams from run's sampling flags (check_flags checked their ranges)."""
    from ..sampling import SamplingParams

    grammar = sampling_grammar(args, model_path)
    seed = resolve_seed(args.seed) if args.temp > 0 else max(args.seed, 0)  # greedy draws nothing
    return SamplingParams(temp=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n, seed=seed,
                          grammar=grammar)


def pick_device(requested: str) -> str:
    """'cuda' or 'host' for --device auto|cuda|host (config.select_device)."""
    from ..config import select_device

    return select_device(requested)


def context_options(args, n_ctx_train: int | None = None) -> dict:
    """n_ctx, n_batch, n_ubatch from -c / -b / -ub (EngineConfig's defaults
    where not given) as llama.cpp clamps them (a batch no larger than the
    context, a ubatch no larger than the batch; -c 0: the training context,
    once the model's is known, else left to the engine)."""
    from ..config import EngineConfig, context_sizes

    default = EngineConfig()
    n_ctx, n_batch, n_ubatch = (default.n_ctx if args.n_ctx is None else args.n_ctx,
                                default.n_batch if args.n_batch is None else args.n_batch,
                                default.n_ubatch if args.n_ubatch is None else args.n_ubatch)
    if n_ctx or n_ctx_train is not None:
        n_ctx, n_batch, n_ubatch = context_sizes(n_ctx, n_batch, n_ubatch, n_ctx_train or 0)
    return dict(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=min(n_ubatch, n_batch))


def engine_options(args, n_ctx_train: int | None = None) -> dict:
    """EngineConfig keyword arguments from the engine flags (cli/options.py's
    table), the context sizes clamped as llama.cpp clamps them: one
    derivation for plan, run, chat and serve."""
    from .options import given_engine_options

    return {**given_engine_options(args), **context_options(args, n_ctx_train)}


def engine_config_of(args, **more):
    """EngineConfig of the flags (with `more`); its errors name the flags."""
    from ..config import EngineConfig
    from .options import in_flag_terms

    try:
        return EngineConfig(**{**engine_options(args), **more})
    except ValueError as exc:
        raise ValueError(in_flag_terms(str(exc))) from None


def moe_placement_flags(args) -> list[str]:
    """llama.cpp's mixture-of-experts placement flags given (--n-cpu-moe, --cpu-moe, -ot)."""
    return [f for f, v in (("--n-cpu-moe", getattr(args, "n_cpu_moe", None)),
                           ("--cpu-moe", getattr(args, "cpu_moe", None) or None),
                           ("-ot", getattr(args, "override_tensor", None))) if v is not None]


def moe_host_layers(args, mf) -> tuple[int, ...]:
    """The layers whose experts llama.cpp's --n-cpu-moe N / --cpu-moe / -ot
    PATTERN=CPU put in host memory: here their expert parts stream (the
    dense parts stay on the GPU, as they do there with -ngl 99). Each flag is
    the tensor-name rules llama.cpp makes of it (common/arg.cpp), matched as
    it matches them; a rule the user wrote (-ot) must match expert tensors only."""
    import re

    from ..gguf_file import is_expert_tensor
    from ..llama_abi import LLM_FFN_EXPS_REGEX, n_cpu_moe_pattern

    flag = moe_placement_flags(args)[0]
    if not any(t.layer is not None and is_expert_tensor(t.name) for t in mf.tensors):
        raise ValueError(f"{flag}: {mf.arch} has no experts (a dense model); give -ngl N or --vram-budget B")
    if flag != "-ot":  # (the rules match chunked experts, _chexps, too: not ones the planner places)
        if flag == "--cpu-moe":
            rule = LLM_FFN_EXPS_REGEX
        else:
            rule = n_cpu_moe_pattern(args.n_cpu_moe) if args.n_cpu_moe > 0 else None  # --n-cpu-moe 0: no rule
        return tuple(sorted({t.layer for t in mf.tensors
                             if rule and re.search(rule, t.name) and is_expert_tensor(t.name)}))
    layers = set()
    for spec in (s for given in args.override_tensor for s in given.split(",") if s.strip()):
        pattern, _, buft = spec.rpartition("=")
        if not pattern or buft.strip().upper() != "CPU":
            raise ValueError(f"-ot {spec}: gguf-stream takes PATTERN=CPU for expert tensors (their layers' experts "
                             "out of VRAM); other buffer types are the planner's to choose")
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"-ot {spec}: not a regular expression ({exc})") from None
        matched = [t for t in mf.tensors if regex.search(t.name)]
        dense = next((t.name for t in matched if not is_expert_tensor(t.name)), None)
        if dense is not None:
            raise ValueError(f"-ot {spec} matches {dense}: only expert tensors (ffn_*_exps) leave VRAM here, the "
                             "rest stays on the GPU; narrow the pattern (e.g. exps=CPU)")
        if not matched:
            raise ValueError(f"-ot {spec} matches no tensor of the model")
        layers |= {t.layer for t in matched}
    return tuple(sorted(layers))


def explicit_placement(args, mf) -> dict | None:
    """The placement options from --vram-budget / --n-streamed / --streamed-layers / -ngl
    (or llama.cpp's --n-cpu-moe / --cpu-moe / -ot), or None."""
    if moe_placement_flags(args):
        if getattr(args, "whole_layers", None):
            raise ValueError(f"{moe_placement_flags(args)[0]} places experts: leave out --whole-layers")
        layers = moe_host_layers(args, mf)
        return {"streamed_layers": layers} if layers else {"n_streamed": 0}
    if args.n_gpu_layers is not None:
        ngl = args.n_gpu_layers
        return {"n_streamed": 0 if ngl < 0 or ngl >= mf.n_layer else mf.n_layer - ngl}
    if args.n_streamed is not None and args.n_streamed > mf.n_layer:
        raise ValueError(f"--n-streamed {args.n_streamed}: the model has only {mf.n_layer} layers")
    if args.streamed_layers is not None:
        from .options import ENGINE_FLAGS

        layers = next(f for f in ENGINE_FLAGS if f.field == "streamed_layers").convert(args.streamed_layers)
        if max(layers) >= mf.n_layer:
            raise ValueError(f"--streamed-layers {args.streamed_layers}: the model has layers 0..{mf.n_layer - 1}")
    if is_relative(args.vram_budget):  # the bench's 'Nx': N times the model file's bytes
        budgets = parse_budgets(args.vram_budget, mf.total_bytes)
        if len(budgets) > 1:
            raise ValueError(f"--vram-budget {args.vram_budget}: give one budget (the bench takes a list)")
        return {"vram_budget": budgets[0].nbytes}
    for name in ("n_streamed", "streamed_layers", "vram_budget"):
        if getattr(args, name) is not None:
            return {}  # the flag's own value, in engine_options
    return None


def placement(args, path, device: str) -> dict:
    """Placement options from the flags, or the defaults; says what it chose."""
    from ..config import GPU_HEADROOM, free_vram_budget
    from ..gguf_file import read_model

    mf = read_model(path)
    train = mf.hparams["n_ctx_train"]
    if train and args.n_ctx is not None and args.n_ctx > train:
        say(f"-c {args.n_ctx} is past the model's training context ({train}): llama.cpp runs it, but "
            "output may degrade there")
    context_options(args, train)  # a context far past it is an error before anything loads
    chosen = explicit_placement(args, mf)
    if chosen is not None:
        if moe_placement_flags(args) and chosen.get("streamed_layers"):
            say(f"{moe_placement_flags(args)[0]}: the experts of layers {', '.join(map(str, chosen['streamed_layers']))} "
                "leave VRAM as with llama.cpp, and stream through slots that take VRAM llama.cpp's placement does not "
                "(one layer's experts each, held while generating); --vram-budget B plans within B instead")
        if args.vram_budget is not None and device == "host":
            say(f"no CUDA device: simulating the plan for a {args.vram_budget} VRAM budget with slots in host "
                "memory (exact, for testing, not fast)")
        return chosen
    if device == "cuda":
        budget, free = free_vram_budget()  # what the engine does without a placement, said here
        say(f"no --vram-budget: planning for {format_size(budget)} (free VRAM {format_size(free)} minus "
            f"{format_size(GPU_HEADROOM)} headroom); give --vram-budget B to choose")
        return {"vram_budget": budget}
    n_streamed = max(mf.n_layer // 2, 1)
    say(f"no CUDA device and no budget: streaming {n_streamed} of {mf.n_layer} layers through host-memory "
        "slots so the engine runs (exact, for testing, not fast); give --n-streamed K or -ngl N to change")
    return {"n_streamed": n_streamed}


def prepare_load(args) -> tuple[str, os.PathLike, dict]:
    """(device, model path, EngineConfig options) for a command that loads a
    model; the device first, so that a GPU asked for without CUDA fails
    before anything is assembled or loaded."""
    device = pick_device(args.device or "auto")
    path = resolve_model(model_arg(args))
    options = {**engine_options(args), **placement(args, path, device), "device": device}
    say(f"loading {path} ({device} mode)")
    return device, path, options


def describe_plan(plan, device: str) -> str:
    where = "VRAM" if device == "cuda" else "host memory"
    if getattr(plan, "stock_gpu_layers", None) is not None:
        return (f"plan: below streaming's minimum, llama.cpp's own split -ngl {plan.stock_gpu_layers} "
                f"({plan.n_layer - plan.stock_gpu_layers} of {plan.n_layer} layers in host memory)")
    if not plan.streamed:
        return f"plan: all {plan.n_layer} layers resident, nothing streamed"
    layers = ", ".join(map(str, plan.streamed))
    cpu = tuple(getattr(plan, "cpu_layers", ()) or ())
    experts = getattr(plan, "part", "layer") == "experts"
    generate = (f"; while generating, the CPU computes {'the experts of ' if experts else ''}layers "
                f"{', '.join(map(str, cpu))} (--exact: every layer on the GPU)" if cpu else "")
    what = "layers' experts" if experts else "layers"
    return (f"plan: {len(plan.streamed)} of {plan.n_layer} {what} streamed ({layers}) through "
            f"{plan.n_slots} slot(s) of {format_size(plan.slot_bytes)} in {where}; estimated device memory "
            f"{format_size(plan.device_bytes)}{generate}")


def describe_auto_flash_attn(config) -> str:
    """How a plan sizes -fa auto's compute buffer (config.resolve_flash_attn)."""
    on = "on" if config.planned_flash_attn else "off"
    if config.flash_attn_auto is None:
        why = "a quantized V cache turns it on" if config.planned_flash_attn else \
            "no CUDA device here to ask; the larger compute buffer"
        return f"planned as {on}: {why}"
    return f"planned as {on}: the device's answer to the question llama.cpp asks when it creates the context"


def describe_flash_attn(on: bool | None, setting) -> str:
    """After the load: whether flash attention ended on (-fa auto: llama.cpp's choice at context creation)."""
    state = "unknown (llama.cpp did not say)" if on is None else "on" if on else "off"
    return f"flash attention {state}" + (" (-fa auto, llama.cpp's choice)" if setting == "auto" else "")


def streamed_llama(args, path, options: dict, **llama_kwargs):
    """The StreamedLlama behind chat (serve builds its own through llama_cpp.server)."""
    from ..llama_compat import StreamedLlama

    return StreamedLlama(path, **{**options, **threads(args)}, **llama_kwargs)


def threads(args) -> dict:
    """-t and -tb as llama.cpp's tools take them (config.thread_counts), given
    to front ends built on llama_cpp.Llama, whose defaults are half the CPUs and all of them."""
    from ..config import thread_counts

    n, n_batch = thread_counts(args.n_threads, getattr(args, "n_threads_batch", None))
    return dict(n_threads=n, n_threads_batch=n_batch)


class CtrlC:
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


# ------------------------------------------------------------ parser pieces

class Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=30)


def add_model(p, required: bool) -> None:
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="GGUF path or models.toml name" + ("" if required else
                                                          " (default: the embedded gemma3-270m)"))
    p.add_argument("-m", "--model", dest="model_opt", metavar="MODEL", help=argparse.SUPPRESS)


def add_engine(p) -> None:
    """The engine's options: one group per kind, from cli/options.py's table."""
    from .options import add_engine_options

    add_engine_options(p)


def add_sampling(p) -> None:
    """llama.cpp's sampling flags, with its defaults except --temp (0: greedy, reproducible)."""
    from ..sampling import DEFAULT_MIN_P, DEFAULT_REPEAT_LAST_N, DEFAULT_TOP_K, DEFAULT_TOP_P

    g = p.add_argument_group("sampling (as in llama.cpp; the default --temp 0 is greedy)")
    g.add_argument("--temp", type=float, default=0.0, metavar="T", help="temperature (default 0: greedy, the "
                   "largest logit each time; top-k/p and min-p apply only above 0)")
    g.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, metavar="K", help=f"keep the K most likely tokens "
                   f"(default {DEFAULT_TOP_K}; 0: off)")
    g.add_argument("--top-p", type=float, default=DEFAULT_TOP_P, metavar="P", help="keep the most likely tokens "
                   f"up to probability P (default {DEFAULT_TOP_P}; 1: off)")
    g.add_argument("--min-p", type=float, default=DEFAULT_MIN_P, metavar="P", help="drop tokens below P times the "
                   f"most likely one's probability (default {DEFAULT_MIN_P}; 0: off)")
    g.add_argument("--repeat-penalty", type=float, default=1.0, metavar="X", help="penalize tokens seen in the "
                   "last --repeat-last-n (prompt included) (default 1: off)")
    g.add_argument("--repeat-last-n", type=int, default=DEFAULT_REPEAT_LAST_N, metavar="N",
                   help=f"tokens the repeat penalty looks back on (default {DEFAULT_REPEAT_LAST_N}; 0: off; "
                   "-1: the context size)")
    g.add_argument("-s", "--seed", type=int, default=-1, metavar="N", help="sampling seed (default -1: random, "
                   "said on stderr)")
    g.add_argument("--grammar", metavar="GBNF", help="constrain the output to a GBNF grammar (rule 'root')")
    g.add_argument("--grammar-file", metavar="FILE", help="the same, read from FILE")
    g.add_argument("-j", "--json-schema", metavar="SCHEMA", help="constrain the output to JSON matching this JSON "
                   "schema (turned into a grammar as llama-cpp-python does), e.g. '{}' for any JSON object")
    g.add_argument("-jf", "--json-schema-file", metavar="FILE", help="the same, read from FILE")
