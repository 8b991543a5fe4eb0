"""gguf-stream run: generation from a prompt (greedy by default; llama.cpp's
sampling flags and grammars), then t/s and counters."""
from __future__ import annotations

import codecs
import sys
import time

from .common import EXIT_INTERRUPTED, EXIT_OK, CtrlC, Formatter, add_engine, add_model, add_sampling, check_flags, \
    check_n_predict, describe_plan, error, prepare_load, sampling_params, say
from . import speculative

DEFAULT_N_PREDICT = 128


def add_parser(sub, parents) -> None:
    p = sub.add_parser("run", parents=parents,
                       help="generate text from a prompt (greedy by default), then print t/s and the counters",
                       formatter_class=Formatter, description="Generation from a prompt: greedy by default, or "
                       "sampled with llama.cpp's flags (--temp, --top-k, ..., --seed), optionally constrained by a "
                       "grammar or JSON schema. Text goes to stdout; load progress, t/s and streaming counters to "
                       "stderr.")
    add_model(p, required=False)
    p.add_argument("-p", "--prompt", required=True, help="the prompt")
    p.add_argument("-n", "--n-predict", type=int, default=DEFAULT_N_PREDICT, metavar="N",
                   help=f"tokens to generate (default {DEFAULT_N_PREDICT}; -1: until end of text)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating after an end-of-text token")
    p.add_argument("--no-display-prompt", action="store_true", help="print only the generated text")
    add_sampling(p)
    speculative.add_speculative(p)
    add_engine(p)
    p.set_defaults(func=cmd_run)


def cmd_run(args) -> int:
    from ..model import load

    check_flags(args)
    check_n_predict(args, "end of text")
    device, path, options = prepare_load(args)
    sampling = sampling_params(args, path)  # a bad grammar or schema fails before the load
    if speculative.wanted(args):
        speculative.check(args, sampling)
        if options.get("generate_rows") is None:  # the split measured for verify decodes
            options["generate_rows"] = speculative.verify_rows(args)
    t0 = time.perf_counter()
    model = load(path, **options)
    try:
        say(f"loaded in {time.perf_counter() - t0:.1f} s; {describe_plan(model.plan, device)}")
        if speculative.wanted(args):
            prompt, n = _prompt_and_length(model, args)
            return speculative.generate(model, args, device, prompt, n)
        if sampling.greedy:  # the argmax itself: today's output, byte for byte
            return _generate(model, args, _argmax)
        from ..sampling import Sampler

        with Sampler(model, sampling) as sampler:  # freed before the model (it holds the vocabulary)
            return _generate(model, args, sampler.sample, sampler.feed_prompt)
    finally:
        model.close()


def _argmax(logits) -> int:
    import numpy as np

    return int(np.argmax(logits))


def _prompt_and_length(model, args) -> tuple[list[int], int]:
    """The prompt's tokens and how many to generate (-n; -1: up to the context's end)."""
    prompt = model.tokenize(args.prompt, add_bos=True, special=True)
    n_ctx = model.config.n_ctx  # -c 0: the training context
    room = n_ctx - len(prompt)
    n = room if args.n_predict == -1 else args.n_predict
    if n > room:
        raise ValueError(f"the prompt ({len(prompt)} tokens) plus -n {n} exceed the context -c {n_ctx}; "
                         "raise -c or lower -n")
    return prompt, n


def _generate(model, args, pick, see_prompt=None) -> int:
    """Generate with pick(logits) -> token; see_prompt(tokens) first, where the sampler wants the prompt."""
    prompt, n = _prompt_and_length(model, args)
    out = sys.stdout
    if not args.no_display_prompt:
        out.write(args.prompt)
        out.flush()
    tokens: list[int] = []
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")  # holds a split multi-byte character back
    t_prompt = t_gen = 0.0
    if see_prompt is not None:
        see_prompt(prompt)
    with CtrlC() as ctrl_c:
        try:
            t0 = time.perf_counter()
            model.eval(prompt)
            t_prompt = time.perf_counter() - t0
            t0 = time.perf_counter()
            for i in range(n):
                if ctrl_c.hit:
                    break
                tok = pick(model.logits())
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
