"""run's speculative decoding flags (--lookup, -md/--model-draft,
--draft-max) and the generation loop they switch to (speculative.py)."""
from __future__ import annotations

import codecs
import sys
import time

from .common import EXIT_INTERRUPTED, EXIT_OK, CtrlC, error, resolve_model, say

DEFAULT_DRAFT_MAX = 16  # llama.cpp's --draft-max


def add_speculative(p) -> None:
    g = p.add_argument_group("speculative decoding (greedy only: the output is the greedy output, in fewer passes)")
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
    """Rows of a verify decode: the most drafts per pass and the last kept
    token (EngineConfig.generate_rows: the generate split is measured for them)."""
    return (args.lookup if args.lookup is not None else args.draft_max) + 1


def check(args, sampling) -> None:
    """Speculative flags that make sense, before anything loads."""
    if args.lookup is not None and args.model_draft is not None:
        raise ValueError("--lookup and --model-draft both draft; give one")
    if args.lookup is not None and not 1 <= args.lookup <= 256:
        raise ValueError(f"--lookup must be in 1..256 (tokens drafted per pass), got {args.lookup}")
    if not 1 <= args.draft_max <= 256:
        raise ValueError(f"--draft-max must be in 1..256, got {args.draft_max}")
    if not sampling.greedy:
        raise ValueError("speculative decoding here is greedy only: drop --temp / --repeat-penalty / the grammar, "
                         "or drop --lookup / --model-draft")


def make_drafter(args, model, device: str, config=None):
    """The drafter the flags ask for; a draft model gets the context shape of
    `config` (default model.config) and must share `model`'s vocabulary
    (n_vocab, token_bytes)."""
    from ..model import StockModel
    from ..speculative import DraftModel, PromptLookup

    if args.lookup is not None:
        return PromptLookup(args.lookup)
    c = config if config is not None else model.config
    path = resolve_model(args.model_draft)
    t0 = time.perf_counter()
    draft = StockModel(path, -1 if device == "cuda" else 0, device=device, n_ctx=c.n_ctx, n_batch=c.n_batch,
                       n_ubatch=c.n_ubatch, n_threads=c.n_threads, flash_attn=c.flash_attn, verbose=args.verbose)
    drafter = DraftModel(draft, args.draft_max)
    try:
        drafter.check_vocabulary(model)
    except BaseException:
        draft.close()
        raise
    say(f"draft model {path} loaded in {time.perf_counter() - t0:.1f} s (all layers "
        f"{'on the GPU' if device == 'cuda' else 'in host memory'})")
    return drafter


def generate(model, args, device: str, prompt: list[int], n: int) -> int:
    """run's generation with drafts; prints as run does, then the acceptance."""
    from ..speculative import generate_speculative

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
                r = generate_speculative(model, prompt, n, drafter, stop_at_eog=not args.ignore_eos, on_token=show)
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
