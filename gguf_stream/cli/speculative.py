"""run's speculative decoding flags (--lookup, -md/--model-draft,
--draft-max) and the generation loop they switch to (speculative.py)."""
from __future__ import annotations

import codecs
import sys
import time

from .. import speculative
from ..speculative import DEFAULT_DRAFT_MAX
from .common import EXIT_INTERRUPTED, EXIT_OK, CtrlC, error, resolve_model, say


GREEDY_ONLY = "greedy only: the output is the greedy output, in fewer passes"


def add_speculative(p, scope: str = GREEDY_ONLY) -> None:
    g = p.add_argument_group(f"speculative decoding ({scope})")
    g.add_argument("--lookup", type=int, metavar="N", help="draft up to N tokens per pass from n-grams of the text "
                   "so far (prompt lookup, as llama.cpp's llama-lookup); each pass checks them in one decode")
    g.add_argument("-md", "--model-draft", "--draft-model", dest="model_draft", metavar="MODEL",
                   help="a small model of the same vocabulary drafting greedily (fully on the GPU; its memory "
                   "is beyond --vram-budget)")
    g.add_argument("--draft-max", type=int, default=DEFAULT_DRAFT_MAX, metavar="N",
                   help=f"tokens the draft model proposes per pass at most (default {DEFAULT_DRAFT_MAX})")


def wanted(args) -> bool:
    return args.lookup is not None or args.model_draft is not None


def verify_rows(args) -> int:
    """Rows of a verify decode (speculative.verify_rows) for the flags."""
    return speculative.verify_rows(args.lookup, args.draft_max)


def check(args, sampling=None) -> None:
    """Speculative flags that make sense, before anything loads (sampling:
    the command's, which must be greedy; serve's requests choose theirs)."""
    speculative.check_options(args.lookup, args.model_draft, args.draft_max)
    if sampling is not None and not sampling.greedy:
        raise ValueError("speculative decoding here is greedy only: drop --temp / --repeat-penalty / the grammar, "
                         "or drop --lookup / --model-draft")


def make_drafter(args, model, device: str, config=None, seats: bool = False):
    """The drafter the flags ask for; a draft model gets the context shape of
    `config` (default model.config; seats: its sequences too, for batch) and
    must share `model`'s vocabulary (n_vocab, token_bytes)."""
    t0 = time.perf_counter()
    path = None if args.lookup is not None else resolve_model(args.model_draft)
    drafter = speculative.make_drafter(args.lookup, path, args.draft_max, model, cuda=device == "cuda",
                                       config=config if config is not None else model.config, verbose=args.verbose,
                                       seats=seats)
    if path is not None:
        say(f"draft model {path} loaded in {time.perf_counter() - t0:.1f} s (all layers "
            f"{'on the GPU' if device == 'cuda' else 'in host memory'})")
    return drafter


def generate(model, args, device: str, prompt: list[int], n: int) -> int:
    """run's generation with drafts; prints as run does, then the acceptance."""
    drafter = make_drafter(args, model, device)
    out = sys.stdout
    if not args.no_display_prompt:
        out.write(args.prompt)
        out.flush()
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def show(tok: int) -> None:
        if ctrl_c.hit:
            raise KeyboardInterrupt
        out.write(text.decode(model.token_bytes(tok)))
        out.flush()

    r = None
    try:
        with CtrlC() as ctrl_c:
            try:
                r = speculative.generate_speculative(model, prompt, n, drafter, stop_at_eog=not args.ignore_eos,
                                                     on_token=show)
            except KeyboardInterrupt:
                ctrl_c.hit = True
    finally:
        drafter.close()
    out.write(text.decode(b"", final=True) + "\n")
    out.flush()
    if r is None:
        error("interrupted (Ctrl-C)")
        return EXIT_INTERRUPTED
    n_gen = len(r.tokens)
    say(f"prompt: {len(prompt)} tokens in {r.prompt_seconds:.2f} s; generated: {n_gen} tokens in "
        f"{r.generate_seconds:.2f} s ({n_gen / r.generate_seconds if r.generate_seconds else 0:.1f} t/s)")
    say(r.summary())
    say(model.stats.summary())
    return EXIT_OK
