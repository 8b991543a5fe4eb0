"""The engine's options on the command line: one table, ENGINE_FLAGS, with a
row per flag naming the EngineConfig field it sets. Every command that loads
or plans a model builds its option groups from it (add_engine_options) and
reads them back with engine_options, so a field added to EngineConfig and
given a row here reaches plan, run, chat and serve alike (tests/test_options.py
fails for a field without a row). Defaults are EngineConfig's: a flag not
given leaves the field to it."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields

from ..config import EngineConfig
from ..memory import KV_CACHE_TYPES

PLACEMENT = ("placement (give at most one of --vram-budget, --n-streamed, --streamed-layers, -ngl, and for a "
             "mixture of experts --n-cpu-moe / --cpu-moe / -ot, which go with -ngl 99)")
CONTEXT = "context and memory (as in llama.cpp)"
GENERATE = "what streamed layers do while generating"
TUNING = "engine internals (A/B aids and tests; the defaults are what you want)"
# EngineConfig fields set by a flag every command has (cli.main's -v)
GLOBAL_FIELDS = {"verbose": "-v", "progress": "-q"}
FLASH_ATTN = {"on": True, "off": False, "auto": "auto"}


def _default(name: str):
    return next(f.default for f in fields(EngineConfig) if f.name == name)


def _shown(name: str) -> str:
    """EngineConfig's default for a field, as its flag writes it."""
    value = _default(name)
    if name == "flash_attn":
        return "on" if value is True else "off" if value is False else str(value)
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def parse_layers(spec: str, flag: str = "--generate-cpu-layers", words=("auto", "none")):
    """'auto' | 'none' | '3,7,11' for --generate-cpu-layers and --generate-resident
    (layer numbers only for --streamed-layers: words=())."""
    spec = spec.strip().lower()
    if spec in words:
        return spec
    takes = f"{', '.join(words)} or layer numbers" if words else "layer numbers"
    try:
        layers = tuple(int(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{flag} takes {takes} like 3,7,11; got {spec!r}") from None
    if not layers or min(layers) < 0:
        raise ValueError(f"{flag}: give {takes.replace('layer numbers', 'non-negative layer numbers')}; "
                         f"got {spec!r}") from None
    return layers


def _layers(flag: str, words=("auto", "none")):
    return lambda spec: parse_layers(spec, flag, words)


def parse_moe_split(spec: str, flag: str = "--moe-split") -> int | str:
    """'auto' | 'off' | N for --moe-split."""
    spec = spec.strip().lower()
    if spec in ("auto", "off"):
        return spec
    try:
        n = int(spec)
    except ValueError:
        raise ValueError(f"{flag} takes auto, off or a number of experts like 3; got {spec!r}") from None
    if n < 0:
        raise ValueError(f"{flag}: give a non-negative number of experts; got {spec!r}")
    return n


@dataclass(frozen=True)
class Flag:
    """One command-line flag: the EngineConfig field it sets (None: a flag of
    the CLI alone), argparse's arguments, and how its value becomes the
    field's (convert; const for flags without a value)."""

    field: str | None
    flags: tuple[str, ...]
    group: str
    help: str
    argparse: dict = field(default_factory=dict)
    convert: object = None

    def add(self, group) -> None:
        dest = self.field or self.flags[-1].lstrip("-").replace("-", "_")
        group.add_argument(*self.flags, dest=dest, default=None, help=self.help, **self.argparse)


ENGINE_FLAGS = (
    # placement
    Flag("vram_budget", ("--vram-budget",), PLACEMENT, "GPU memory the run may use (e.g. 6GiB, 7.5GB, or 0.5x: half "
         "the model file, as the bench's budgets); the planner streams the layers that do not fit (default: the free "
         "VRAM less 1 GiB)", dict(metavar="B")),
    Flag("n_streamed", ("--n-streamed",), PLACEMENT, "stream K layers (spread evenly); 0: every layer resident",
         dict(type=int, metavar="K")),
    Flag("streamed_layers", ("--streamed-layers",), PLACEMENT, "stream these layers", dict(metavar="L,L"),
         _layers("--streamed-layers", ())),
    Flag(None, ("-ngl", "--n-gpu-layers"), PLACEMENT, "keep N layers resident, stream the others (llama.cpp "
         "would compute them on the CPU)", dict(type=int, metavar="N")),
    Flag(None, ("--n-cpu-moe",), PLACEMENT, "mixture-of-experts models, as llama.cpp's: the experts of layers "
         "0..N-1 out of VRAM (streamed for prompts; while generating on the CPU, split with uploads, or held in "
         "the slots); every other tensor resident", dict(type=int, metavar="N")),
    Flag(None, ("--cpu-moe",), PLACEMENT, "the same for every layer's experts", dict(action="store_true")),
    Flag(None, ("-ot", "--override-tensor"), PLACEMENT, "llama.cpp's PATTERN=CPU[,...] for expert tensors: the "
         "experts of the layers whose expert tensors match (regular expressions, e.g. exps=CPU or "
         "\\.(1[0-9])\\.ffn_.*_exps=CPU) out of VRAM, as --n-cpu-moe", dict(metavar="PATTERN=CPU", action="append")),
    Flag("n_slots", ("--n-slots",), PLACEMENT, "slots streamed layers rotate through (default: the planner's "
         "choice, at most --max-slots)", dict(type=int, metavar="S")),
    Flag("max_slots", ("--max-slots",), PLACEMENT, "most slots the planner may choose; a slot beyond two is taken "
         "where it costs at most one more streamed layer (default 3 where a CUDA split is chosen for 8 rows or more: "
         "-np 8, a verify of 7 drafts; else 2)",
         dict(type=int, metavar="S")),
    Flag("whole_layers", ("--whole-layers",), PLACEMENT, "mixture-of-experts models: place whole layers, as for "
         "dense ones (default: place the experts; every layer's attention, norms and router stay on the GPU)",
         dict(action="store_const", const=True)),
    Flag("host_budget", ("--host-budget",), PLACEMENT, "host memory the weights may hold (default: what the "
         "machine can spare, MemAvailable less max(1 GiB, 10%%); none: no budget); streamed layers beyond it go to "
         "the disk tier, read from the GGUF file at every use (see also --disk-direct)", dict(metavar="B")),
    Flag("disk_direct", ("--disk-direct",), PLACEMENT, "the disk tier reads the GGUF file with O_DIRECT, bypassing "
         "the page cache (buffered where the filesystem refuses it; default: buffered reads with read-ahead)",
         dict(action="store_const", const=True)),
    Flag("device", ("--device",), PLACEMENT, "cuda: GPU slots (needs a CUDA build of llama-cpp-python); host: slots "
         "in host memory, CPU compute (exact, for testing, not fast); auto: cuda if there is one (default "
         f"{_shown('device')})", dict(choices=("auto", "cuda", "host"))),
    Flag("prefetch", ("--no-prefetch",), PLACEMENT, "upload streamed layers synchronously",
         dict(action="store_const", const=False)),
    # context and memory
    Flag("n_ctx", ("-c", "--ctx-size"), CONTEXT, f"context size (default {_shown('n_ctx')}; 0: the model's training "
         "context)", dict(type=int, metavar="N")),
    Flag("n_batch", ("-b", "--batch-size"), CONTEXT, f"logical batch (default {_shown('n_batch')})",
         dict(type=int, metavar="N")),
    Flag("n_ubatch", ("-ub", "--ubatch-size"), CONTEXT, f"physical batch (default {_shown('n_ubatch')})",
         dict(type=int, metavar="N")),
    Flag("flash_attn", ("-fa", "--flash-attn"), CONTEXT, f"flash attention (default {_shown('flash_attn')}; auto: "
         "llama.cpp decides when it creates the context, the plan assumes off, the larger compute buffer)",
         dict(choices=tuple(FLASH_ATTN)), FLASH_ATTN.get),
    Flag("type_k", ("-ctk", "--cache-type-k"), CONTEXT, f"KV cache type for K: {', '.join(KV_CACHE_TYPES)} (default "
         f"{_shown('type_k')})", dict(choices=tuple(KV_CACHE_TYPES), metavar="TYPE")),
    Flag("type_v", ("-ctv", "--cache-type-v"), CONTEXT, f"KV cache type for V (default {_shown('type_v')}); a "
         "quantized one needs flash attention", dict(choices=tuple(KV_CACHE_TYPES), metavar="TYPE")),
    Flag("n_seq_max", ("-np", "--parallel"), CONTEXT, "sequences the context holds, as llama.cpp's -np: -c is "
         f"shared, -c / K KV cells each, padded to 256 (default {_shown('n_seq_max')}; batch: 4; serve: K slots "
         "whose requests are decoded together)",
         dict(type=int, metavar="K")),
    Flag("kv_unified", ("-kvu", "--kv-unified"), CONTEXT, "the sequences share one KV cache (-c cells in all), as "
         "llama.cpp's -kvu", dict(action="store_const", const=True)),
    Flag("n_threads", ("-t", "--threads"), CONTEXT, "CPU threads (default: the physical cores)",
         dict(type=int, metavar="N")),
    Flag("n_threads_batch", ("-tb", "--threads-batch"), CONTEXT, "CPU threads for decodes of several tokens "
         "(prompts, batches, speculative verifies), as llama.cpp's -tb (default: -t's)", dict(type=int, metavar="N")),
    Flag("use_mlock", ("--mlock",), CONTEXT, "lock the model's host memory in RAM, as llama.cpp's --mlock (streamed "
         "layers' pinned copies are locked anyway)", dict(action="store_const", const=True)),
    Flag(None, ("--no-mmap",), CONTEXT, "load without mmap: what gguf-stream always does (streamed layers live in "
         "pinned memory)", dict(action="store_true")),
    Flag(None, ("--mmap",), CONTEXT, argparse.SUPPRESS, dict(action="store_true")),  # refused with the reason
    # while generating
    Flag("generate_cpu_layers", ("--generate-cpu-layers",), GENERATE, "streamed layers the CPU computes while "
         "generating instead of uploading them: none (every streamed layer uploaded, results bit-identical to "
         "all-in-VRAM), auto (a split measured on this machine: faster generation, CPU rounding like stock -ngl's) "
         "or layer numbers (default: auto on CUDA, cached after the first load; none in host mode)",
         dict(metavar="auto|none|L,L"),
         _layers("--generate-cpu-layers")),
    Flag("moe_split", ("--moe-split",), GENERATE, "mixture-of-experts models: the CPU expert layers upload N of "
         "each token's routed experts while generating and the CPU computes the others at the same time (PCIe and "
         "the CPU's memory on one layer at once; sums in another order than stock); auto: N timed on the first "
         "generated tokens; off: the CPU computes them all, as --n-cpu-moe. Default: auto on CUDA for qwen3moe, "
         "qwen2moe and glm4moe, off in host mode and for other architectures (gpt-oss and deepseek2 split when asked)", dict(metavar="auto|off|N"),
         lambda spec: parse_moe_split(spec)),
    Flag("prompt_cpu_experts", ("--prompt-cpu-experts",), GENERATE, "mixture-of-experts models whose CPU expert "
         "layers split (--moe-split): in prompts the CPU computes those layers' last N experts at the routing "
         "boundary instead of uploading them (PCIe moves the rest; default 0: every expert streams; measured slower "
         "on a PCIe gen5 H200, where the CPU's part outlasts the upload it saves)",
         dict(type=int, metavar="N")),
    Flag("exact", ("--exact",), GENERATE, "while generating, compute every layer on the GPU (streamed ones "
         "uploaded each token): tokens bit-identical to an all-in-VRAM run, slower. Default on CUDA: the CPU computes "
         "some streamed layers (a split measured on this machine), rounding like stock -ngl's CPU layers, which are "
         "not bit-identical to all-in-VRAM either", dict(action="store_const", const=True)),
    Flag("cpu_layers_max_batch", ("--cpu-layers-max-batch",), GENERATE, "the most rows of a decode (parallel "
         "sequences, a speculative verify) the CPU layers compute on the CPU; a larger decode takes the prompt "
         "placement, every streamed layer through the slots and all rows on the GPU (default: llama.cpp's "
         "offload threshold, 31)", dict(type=int, metavar="M")),
    Flag("generate_rows", ("--generate-rows",), GENERATE, "rows of the generate decodes the measured split is "
         "chosen for (parallel sequences, or a speculative verify: drafts + 1): the CPU layers' work grows with the "
         "rows, a streamed layer's upload does not (default: -np; run --lookup N / --draft-max N: N + 1)",
         dict(type=int, metavar="K")),
    Flag("calibrate_on_tokens", ("--calibrate-at-load",), GENERATE, "a first load times the candidate splits "
         "of --generate-cpu-layers auto before it returns (default: on the first generated tokens)",
         dict(action="store_const", const=False)),
    Flag("generate_resident", ("--generate-resident",), GENERATE, "streamed layers kept resident while generating, "
         "in the compute buffer a prompt needs and a token leaves idle: auto (as many as fit), none, or layer numbers "
         f"(default {_shown('generate_resident')})", dict(metavar="auto|none|L,L"), _layers("--generate-resident")),
    # engine internals
    Flag("cpu_repack", ("--repack",), TUNING, "repack CPU layers' weights for llama.cpp's CPU kernels (default: on, "
         "except in host mode, where stock and streamed must use the same kernels)",
         dict(action="store_const", const=True)),
    Flag("cpu_repack", ("-nr", "--no-repack"), TUNING, "do not repack (llama.cpp's --no-repack)",
         dict(action="store_const", const=False)),
    Flag("cpu_layer_host_kv", ("--no-cpu-layer-host-kv",), TUNING, "CPU layers keep their KV cache on the GPU",
         dict(action="store_const", const=False)),
    Flag("cpu_layer_device", ("--no-cpu-layer-device",), TUNING, "CPU layers stay GPU layers for llama.cpp's graph "
         "(their norms on the GPU)", dict(action="store_const", const=False)),
    Flag("graph_reuse", ("--no-graph-reuse",), TUNING, "rebuild llama.cpp's graph at every decode",
         dict(action="store_const", const=False)),
    Flag("host_copy_delay_us", ("--host-copy-delay-us",), TUNING, "host mode: delay each upload by US "
         "microseconds (a slow link, for tests)", dict(type=int, metavar="US")),
    Flag("host_memory_check", ("--no-host-memory-check",), TUNING, "load even when the plan's host memory exceeds "
         "what is available", dict(action="store_const", const=False)),
)
GROUP_ORDER = (PLACEMENT, CONTEXT, GENERATE, TUNING)


def add_engine_options(p) -> None:
    """The engine's option groups, from ENGINE_FLAGS."""
    for title in GROUP_ORDER:
        group = p.add_argument_group(title)
        for flag in ENGINE_FLAGS:
            if flag.group == title:
                flag.add(group)


def given_engine_options(args) -> dict:
    """EngineConfig keyword arguments of the engine flags given (their values
    converted), and -v; flags not given are left to EngineConfig's defaults."""
    options = {}
    for flag in ENGINE_FLAGS:
        if flag.field is None:
            continue
        value = getattr(args, flag.field)
        if value is not None:
            options[flag.field] = flag.convert(value) if flag.convert else value
    options["verbose"] = bool(getattr(args, "verbose", False))
    options["progress"] = not getattr(args, "quiet", False)  # progress of the long steps, unless -q
    return options


def flag_of(name: str) -> str:
    """The flag that sets EngineConfig field `name` (its long form)."""
    if name in GLOBAL_FIELDS:
        return GLOBAL_FIELDS[name]
    return next(f.flags[-1] for f in ENGINE_FLAGS if f.field == name)


def in_flag_terms(message: str) -> str:
    """An EngineConfig error message with the field it starts with (or that
    'each of' names) as its flag."""
    for flag in ENGINE_FLAGS:
        if flag.field is None:
            continue
        for prefix in (f"{flag.field} ", f"each of {flag.field} "):
            if message.startswith(prefix):
                return prefix.replace(flag.field, flag_of(flag.field)) + message[len(prefix):]
    return message
