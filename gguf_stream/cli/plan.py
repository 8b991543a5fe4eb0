"""gguf-stream plan: the plan for a budget, from the GGUF header alone."""
from __future__ import annotations

from .common import EXIT_OK, Formatter, add_context, add_model, add_placement, check_flags, context_options, \
    explicit_placement, model_arg, resolve_model


def add_parser(sub, parents) -> None:
    p = sub.add_parser("plan", parents=parents,
                       help="print which layers stay resident and which stream, slots and bytes",
                       formatter_class=Formatter, description="Print the plan for a VRAM budget (no GPU needed: "
                       "sizes come from the GGUF header).")
    add_model(p, required=True)
    add_placement(p, device=False)
    add_context(p, threads=False)
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    from ..gguf_file import read_model
    from ..planner import make_plan

    check_flags(args)
    if model_arg(args) is None:
        raise ValueError("plan needs MODEL (a GGUF path or a models.toml name; `gguf-stream models` lists them)")
    if args.vram_budget is None and args.n_streamed is None and args.n_gpu_layers is None:
        raise ValueError("plan needs --vram-budget B (or --n-streamed K / -ngl N)")
    path = resolve_model(model_arg(args))
    mf = read_model(path)
    ctx = context_options(args, mf.hparams["n_ctx_train"])
    plan = make_plan(mf, n_ctx=ctx["n_ctx"], n_ubatch=ctx["n_ubatch"], flash_attn=ctx["flash_attn"],
                     whole_layers=True if args.whole_layers else None, **explicit_placement(args, mf))
    print(plan.table())
    print(f"(estimates from the GGUF header at -c {ctx['n_ctx']} -ub {ctx['n_ubatch']}; "
          "`run` measures the real figures)")
    return EXIT_OK
