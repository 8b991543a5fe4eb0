"""gguf-stream batch: many prompts, several sequences per decode (batch.py),
JSONL results with per-sequence and aggregate t/s."""
from __future__ import annotations

import json
import sys
import time

from . import speculative
from .common import EXIT_OK, Formatter, add_engine, add_model, add_sampling, check_flags, describe_plan, \
    prepare_load, sampling_params, say

DEFAULT_PARALLEL = 4
DEFAULT_N_PREDICT = 128


def add_parser(sub, parents) -> None:
    p = sub.add_parser("batch", parents=parents, formatter_class=Formatter,
                       help="generate for many prompts, several sequences per decode; JSONL out",
                       description="Generation for every prompt of a file (or stdin), --parallel sequences at a "
                       "time in one context: each decode carries the next token of every live sequence, so a "
                       "pass over the weights (an upload of every streamed layer) yields several tokens. "
                       "Prompts: one per line, or JSONL lines {\"prompt\": ..., \"id\": ...}. Results go to "
                       "stdout (or -o) as JSONL, one line per prompt as it finishes (its \"index\" is its line "
                       "among the prompts), then one {\"aggregate\": ...} line. -c is the context of all the "
                       "sequences together (-c / -np cells each), as in llama.cpp.")
    add_model(p, required=False)
    p.add_argument("-f", "--file", default="-", metavar="FILE", help="prompts file (default -: stdin)")
    p.add_argument("-o", "--output", default="-", metavar="FILE", help="JSONL results (default -: stdout)")
    p.add_argument("-n", "--n-predict", type=int, default=DEFAULT_N_PREDICT, metavar="N",
                   help=f"tokens to generate per prompt at most (default {DEFAULT_N_PREDICT})")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating after an end-of-text token")
    add_sampling(p)
    speculative.add_speculative(p, "greedy only: each sequence's drafts ride in its rows of the step decode")
    add_engine(p)  # -np / --parallel: the sequences decoded together (here 4 by default)
    p.set_defaults(func=cmd_batch, n_seq_max=DEFAULT_PARALLEL)


def read_prompts(text: str) -> list[dict]:
    """[{"prompt": str, "id"?: ...}] from plain lines or JSONL (a line
    starting with '{' must be a JSON object with a string "prompt")."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                item = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"prompts line {number}: not valid JSON ({exc.msg}); give one JSON object per "
                                 "line, or plain text") from None
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                raise ValueError(f"prompts line {number}: a JSON line needs a string \"prompt\"")
            out.append({k: item[k] for k in ("prompt", "id") if k in item})
        else:
            out.append({"prompt": line})
    if not out:
        raise ValueError("no prompts given (one per line, or JSONL lines with \"prompt\")")
    return out


def _read_input(path: str) -> str:
    if path == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise ValueError("no prompts: give -f FILE, or pipe them to stdin")
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise ValueError(f"-f {path}: not UTF-8 text") from None


def cmd_batch(args) -> int:
    from ..batch import cells_per_sequence
    from ..model import load

    check_flags(args)
    if args.n_predict < 1:
        raise ValueError(f"-n must be positive, got {args.n_predict}")
    items = read_prompts(_read_input(args.file))
    device, path, options = prepare_load(args)
    sampling = sampling_params(args, path)
    if speculative.wanted(args):
        speculative.check(args, sampling)
    out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    try:
        t0 = time.perf_counter()
        model = load(path, **options)
        drafter = None
        try:
            if speculative.wanted(args):  # a draft model: a sequence per seat, as the model's context
                drafter = speculative.make_drafter(args, model, device, seats=True)
            say(f"loaded in {time.perf_counter() - t0:.1f} s; {describe_plan(model.plan, device)}; "
                f"{model.config.n_seq_max} sequences of {cells_per_sequence(model)} KV cells")
            prompts = [model.tokenize(it["prompt"], add_bos=True, special=True) for it in items]

            def done(s) -> None:
                record = {"index": s.index, **({"id": items[s.index]["id"]} if "id" in items[s.index] else {}),
                          "prompt": items[s.index]["prompt"], "text": model.detokenize(s.tokens),
                          "n_prompt": len(s.prompt_tokens), "n_generated": len(s.tokens), "stop": s.stop,
                          "prompt_seconds": round(s.prompt_seconds, 4),
                          "generate_seconds": round(s.generate_seconds, 4),
                          "tokens_per_second": round(s.tokens_per_second, 2)}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                out.flush()

            r = model.generate_batch(prompts, args.n_predict, sampling=None if sampling.greedy else sampling,
                                     stop_at_eog=not args.ignore_eos, on_done=done, drafter=drafter)
            summary = {"sequences": len(r.sequences), "parallel": model.config.n_seq_max, "generated": r.n_generated,
                       "steps": r.steps, "tokens_per_step": round(r.tokens_per_step, 3),
                       "generate_seconds": round(r.generate_seconds, 4), "seconds": round(r.seconds, 4),
                       "aggregate_tokens_per_second": round(r.aggregate_tps, 2),
                       **({"drafted": r.drafted, "accepted": r.accepted} if drafter is not None else {})}
            out.write(json.dumps({"aggregate": summary}) + "\n")
            out.flush()
            say(f"{len(r.sequences)} prompts, {r.n_generated} tokens in {r.steps} decodes "
                f"({r.tokens_per_step:.2f} tokens per pass); aggregate {r.aggregate_tps:.1f} t/s"
                + (f"; {r.accepted} of {r.drafted} drafted tokens accepted" if drafter is not None else ""))
            say(model.stats.summary())
        finally:
            if drafter is not None:
                drafter.close()
            model.close()
    finally:
        if out is not sys.stdout:
            out.close()
    return EXIT_OK
