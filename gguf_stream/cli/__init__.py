"""The ``gguf-stream`` command: plan, run, chat, serve, bench, models.

    gguf-stream run -p "The capital of France is" -n 16     # embedded default model
    gguf-stream plan MODEL --vram-budget 6GiB -c 4096
    gguf-stream chat MODEL --vram-budget 6GiB
    gguf-stream serve MODEL --vram-budget 6GiB --port 8000
    gguf-stream batch MODEL --vram-budget 6GiB -np 16 -f prompts.txt > results.jsonl
    gguf-stream models
    gguf-stream bench -m MODEL --vram-budget 0.5x,all

MODEL is a GGUF path or a name from models.toml. Flags mean what they mean in
llama.cpp (-m, -ngl, -c, -b, -ub, -n, -p, -t, -fa, -ctk, --mlock, --temp; the
engine's flags come from one table, cli/options.py). User errors print
one line, ``gguf-stream: error: ...``, and exit 1; Ctrl-C exits 130; progress
goes to stderr, generated text to stdout. One module per command, each with
its parser (add_parser) and its function; common.py holds what they share.
"""
from __future__ import annotations

import argparse
import sys
import traceback

from .. import __version__  # first: loads llama.cpp before anything imports numpy
from ..bench import cli as bench
from ..errors import GGUFStreamError
from . import batch, batched_bench, chat, list_models, plan, run, serve
from .common import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, PROG, Formatter, error, one_line, output, \
    quiet_llama_log, restore_llama_log

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_OK", "build_parser", "main"]


def _common_flags() -> argparse.ArgumentParser:
    """-v / -q also after the command (`gguf-stream run -q ...`)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="llama.cpp's log, and tracebacks on errors")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress lines on stderr")
    return common


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG, formatter_class=Formatter,
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
    parents = [_common_flags()]
    for command in (plan, run, chat, batch, bench, batched_bench, list_models, serve):
        command.add_parser(sub, parents)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``gguf-stream`` and ``python -m gguf_stream``; returns the exit code."""
    args = build_parser().parse_args(argv)
    output.verbose, output.quiet = args.verbose, args.quiet
    try:
        quiet_llama_log(args.verbose)
        return args.func(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        error("interrupted (Ctrl-C)")
        return EXIT_INTERRUPTED
    except (GGUFStreamError, ValueError, OSError) as exc:
        if output.verbose:
            traceback.print_exc()
        error(one_line(exc))
        return EXIT_ERROR
    finally:
        restore_llama_log()


if __name__ == "__main__":
    sys.exit(main())
