"""Where `gguf-stream run`'s time per generated token goes beyond the decode (issue #16).

    python tools/run_tg_overhead.py [run's flags: MODEL -p PROMPT --vram-budget SIZE -n 128 ...] [--reps 3]

Takes `gguf-stream run`'s own flags (same parser, defaults and load: the
placement run gets), loads once, then per repetition, from the same prompt
(the KV cache cleared before each loop):

  run     run's loop (cli/run.Generation, greedy: the argmax read in llama.cpp's
          logits buffer), its text through an incremental UTF-8 decoder to /dev/null
  old     the loop before issue #16: the logits copied to numpy every token,
          the argmax of the copy, n_vocab asked of llama.cpp at each use
  decode  bench's tg timing (bench/timing.decode_tps: eval + synchronize per
          token) after the prompt, over the tokens run generated, one decode each

and prints milliseconds per decode (median of the repetitions) of each and
what run and old add to decode; run's first decodes after the prompt (the
phase switch) apart from the rest; microseconds per token of each piece of
run's loop outside llama.cpp's compute (picks, text out, eval's Python). The
loops' tokens must agree (checked). On the GPU box, the issue's case (SIZE:
the budget bench's 0.5x row printed; run takes sizes only), then the same
with bench's context sizes (-c n_prompt + n_gen, -b/-ub 2048), whose
placement (plan line) may differ:

    python tools/run_tg_overhead.py llama3-8b.gguf -p "The capital of France is" --vram-budget SIZE -n 128
    python tools/run_tg_overhead.py llama3-8b.gguf -p "The capital of France is" --vram-budget SIZE -n 128 \
        -c 2176 -b 2048 -ub 2048
"""
from __future__ import annotations

import argparse
import codecs
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import gguf_stream  # noqa: E402,F401  (llama.cpp before numpy)
import numpy as np  # noqa: E402

from gguf_stream.bench.timing import decode_tps  # noqa: E402
from gguf_stream.cli import build_parser  # noqa: E402
from gguf_stream.cli.common import check_flags, describe_plan, output, prepare_load, quiet_llama_log  # noqa: E402
from gguf_stream.cli.run import Generation, _prompt_and_length  # noqa: E402


def old_pick(model):
    """The pick before issue #16: n_vocab asked of llama.cpp, the logits copied, argmax of the copy."""
    lc = model._lc

    def pick() -> int:
        ptr = lc.llama_get_logits_ith(model.ctx, -1)
        n_vocab = lc.llama_vocab_n_tokens(model.vocab)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()))

    return pick


def timed_loop(model, prompt, n, pick, stamps=None) -> tuple[float, list[int]]:
    """ms per decode of run's loop with this pick, and the tokens; stamps: each pick's end time."""
    sink = open(os.devnull, "w")
    if stamps is not None:
        inner = pick

        def pick():
            tok = inner()
            stamps.append(time.perf_counter())
            return tok
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def show(tok: int) -> None:
        sink.write(text.decode(model.token_bytes(tok)))
        sink.flush()

    model.reset()
    gen = Generation(model, pick, show, stop_at_eog=False)
    gen.run(prompt, n)
    sink.close()
    return gen.generate_seconds / max(gen.decodes, 1) * 1e3, gen.tokens


def per_call_us(fn, reps: int = 200) -> float:
    """Median microseconds of fn() over reps calls, in blocks of 10 (robust to a busy machine)."""
    blocks = []
    for _ in range(reps // 10):
        t0 = time.perf_counter()
        for _ in range(10):
            fn()
        blocks.append((time.perf_counter() - t0) / 10)
    return statistics.median(blocks) * 1e6


def parts(model, prompt) -> dict[str, float]:
    """Microseconds per token of each piece of run's loop apart from llama.cpp's compute: the picks
    (after the prompt, logits ready), the text out, the end-of-text check, and eval's own Python
    (llama_decode stubbed: batch, phase, the hook's route and status)."""
    from gguf_stream.sampling import Sampler, SamplingParams

    model.reset()
    model.eval(prompt)
    model.synchronize()
    tok = model.greedy_token()
    sink = open(os.devnull, "w")
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = {"pick (run: argmax in place)": per_call_us(model.greedy_token),
           "pick (old: copy + argmax)": per_call_us(old_pick(model)),
           "text out (token_bytes, decode, write, flush)":
               per_call_us(lambda: (sink.write(text.decode(model.token_bytes(tok))), sink.flush())),
           "end-of-text check": per_call_us(lambda: model.is_eog(tok))}
    with Sampler(model, SamplingParams(temp=0.8, seed=1)) as sampler:  # its chain only: no accept effects
        out["pick (sampled: --temp 0.8 chain)"] = per_call_us(lambda: sampler.sample(model.logits_view()), 50)
    sink.close()
    s = getattr(model, "streamer", None)
    lc = s.lc if s is not None else model._lc
    real = lc.llama_decode
    lc.llama_decode = lambda ctx, batch: 0  # eval's Python side only (the KV cache does not move)
    try:
        out["eval's Python (llama_decode stubbed)"] = per_call_us(lambda: model.eval([tok]))
    finally:
        lc.llama_decode = real
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--reps", type=int, default=3)
    own, rest = ap.parse_known_args(argv)
    args = build_parser().parse_args(["run", *rest])
    output.verbose, output.quiet = args.verbose, args.quiet
    quiet_llama_log(args.verbose)
    check_flags(args)
    device, path, options = prepare_load(args)
    from gguf_stream.model import load

    model = load(path, **options)
    try:
        print(describe_plan(model.plan, device), f"(-c {model.config.n_ctx} -ub {model.config.n_ubatch})")
        prompt, n = _prompt_and_length(model, args)
        times = {"run": [], "old": [], "decode": []}
        firsts = []  # per repetition: ms of the first 3 decodes after the prompt, and the median of the rest
        for rep in range(own.reps + 1):  # the first: warm-up (graph capture, first-use buffers), not counted
            stamps = []
            ms_run, toks = timed_loop(model, prompt, n, model.greedy_token, stamps)
            steps = [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]
            if len(steps) > 3:
                firsts.append((steps[:3], statistics.median(steps[3:])))
            ms_old, _ = timed_loop(model, prompt, n, old_pick(model))
            model.reset()
            model.eval(prompt)
            model.synchronize()
            ms_decode = 1e3 / decode_tps(model, toks[:-1], one_at_a_time=True)  # the decodes run made
            if rep:
                for k, v in (("run", ms_run), ("old", ms_old), ("decode", ms_decode)):
                    times[k].append(v)
        # Both picks on the same logits at every step, not two generations'
        # tokens: on the H200 a second greedy generation after reset() drifted
        # from the first (3rd token) with the CPU layers' KV in host memory,
        # and not without it (BENCHMARKS.md, third session)
        old = old_pick(model)

        def both() -> int:
            new_tok, old_tok = model.greedy_token(), old()
            if new_tok != old_tok:
                raise SystemExit(f"the old and new picks disagree on the same logits: {new_tok} vs {old_tok}")
            return new_tok

        timed_loop(model, prompt, n, both)
        print(f"  the in-place and the copied greedy pick agree on {n} tokens' logits")
        for i, (first, rest) in enumerate(firsts):
            print(f"  run, {'warm-up' if i == 0 else f'rep {i}'}: first decodes after the prompt "
                  + " ".join(f"{t:.2f}" for t in first) + f" ms, then median {rest:.2f} ms")
        for what, us in parts(model, prompt).items():
            print(f"  {what:45s} {us:8.1f} us")
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{len(prompt)} prompt tokens, {n} generated, {own.reps} repetitions (median ms per decode)")
        for k in ("decode", "run", "old"):
            extra = "" if k == "decode" else f"  (+{med[k] - med['decode']:.3f} ms over decode)"
            print(f"  {k:6s} {med[k]:8.3f} ms  {1e3 / med[k]:7.1f} t/s{extra}   all: "
                  + " ".join(f"{v:.3f}" for v in times[k]))
    finally:
        model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
