"""gguf-stream run: generation from a prompt (greedy by default; llama.cpp's
sampling flags and grammars), then t/s and counters."""
from __future__ import annotations

import codecs
import sys
import time

from .common import EXIT_INTERRUPTED, EXIT_OK, CtrlC, Formatter, add_engine, add_model, add_sampling, check_flags, \
    check_n_predict, describe_flash_attn, describe_plan, error, prepare_load, sampling_params, say
from . import speculative

DEFAULT_N_PREDICT = 128


def add_parser(sub, parents) -> None:
    p = sub.add_parser("run", parents=parents,
                       help="generate text from a prompt (greedy by default), then print t/s and the counters",
                       formatter_class=Formatter, description="Generation from a prompt: greedy by default, or "
                       "sampled with llama.cpp's flags (--temp, --top-k, ..., --seed), optionally constrained by a "
                       "grammar or JSON schema. Text goes to stdout; load progress, t/s and streaming counters to "
                       "stderr. The generation t/s counts as llama.cpp's eval time and bench's tg do: the first "
                       "token comes from the prompt's logits (in the prompt's time), each later one costs one "
                       "decode, and the rate is those decodes over their time.")
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
        say(describe_flash_attn(model.flash_attn, model.config.flash_attn))
        if speculative.wanted(args):
            prompt, n = _prompt_and_length(model, args)
            return speculative.generate(model, args, device, prompt, n)
        if sampling.greedy:  # the argmax itself, read in llama.cpp's logits buffer: today's output, byte for byte
            return _generate(model, args, model.greedy_token)
        from ..sampling import Sampler

        with Sampler(model, sampling) as sampler:  # freed before the model (it holds the vocabulary)
            return _generate(model, args, lambda: sampler.sample(model.logits_view()), sampler.feed_prompt)
    finally:
        model.close()


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


class Generation:
    """run's loop: the prompt in one eval, then pick a token, show it, decode
    it, pick the next. Timed as llama.cpp times it (llama_perf's prompt eval
    and eval time, and llama-bench's tg): the prompt's time ends with the
    first token, picked from the prompt's logits; each later token costs one
    single-token decode and its pick, and the generation rate is those decodes
    over their time (the last token picked is never decoded)."""

    def __init__(self, model, pick, show=None, stop_at_eog: bool = True):
        self.model, self.pick, self.show, self.stop_at_eog = model, pick, show, stop_at_eog
        self.tokens: list[int] = []
        self.prompt_seconds = self.generate_seconds = 0.0
        self.decodes = 0

    def run(self, prompt: list[int], n: int, stop=lambda: False) -> list[int]:
        """Up to n tokens after prompt; stop() ends it early (Ctrl-C)."""
        model, t0 = self.model, time.perf_counter()
        model.eval(prompt)
        tok = self.pick()  # waits for the prompt's logits
        t1 = time.perf_counter()
        self.prompt_seconds = t1 - t0
        try:
            while not stop() and not (self.stop_at_eog and model.is_eog(tok)):
                self.tokens.append(tok)
                if self.show is not None:
                    self.show(tok)
                if len(self.tokens) == n:
                    break
                model.eval([tok])
                self.decodes += 1
                tok = self.pick()
        finally:  # a second Ctrl-C still reports what was generated
            self.generate_seconds = time.perf_counter() - t1
        return self.tokens

    @property
    def tokens_per_second(self) -> float:
        return self.decodes / self.generate_seconds if self.decodes else 0.0

    def summary(self, n_prompt: int) -> str:
        rate = f"{self.tokens_per_second:.1f} t/s" if self.decodes else "no decode timed"
        return (f"prompt: {n_prompt} tokens in {self.prompt_seconds:.2f} s "
                f"({n_prompt / self.prompt_seconds if self.prompt_seconds else 0:.1f} t/s); "
                f"generated: {len(self.tokens)} tokens in {self.generate_seconds:.2f} s ({rate})")


def _generate(model, args, pick, see_prompt=None) -> int:
    """Generate with pick() -> token over the model's last logits; see_prompt(tokens) first, where the
    sampler wants the prompt."""
    prompt, n = _prompt_and_length(model, args)
    out = sys.stdout
    if not args.no_display_prompt:
        out.write(args.prompt)
        out.flush()
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")  # holds a split multi-byte character back

    def show(tok: int) -> None:
        out.write(text.decode(model.token_bytes(tok)))
        out.flush()

    if see_prompt is not None:
        see_prompt(prompt)
    gen = Generation(model, pick, show, stop_at_eog=not args.ignore_eos)
    with CtrlC() as ctrl_c:
        try:
            gen.run(prompt, n, stop=lambda: ctrl_c.hit)
        except KeyboardInterrupt:  # a second Ctrl-C
            ctrl_c.hit = True
    out.write(text.decode(b"", final=True) + "\n")
    out.flush()
    if gen.prompt_seconds:
        say(gen.summary(len(prompt)))
    say(model.stats.summary())
    if ctrl_c.hit:
        error(f"interrupted (Ctrl-C) after {len(gen.tokens)} generated tokens")
        return EXIT_INTERRUPTED
    return EXIT_OK
