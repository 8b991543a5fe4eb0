"""gguf-stream plan: the plan for a budget, from the GGUF header alone."""
from __future__ import annotations

from .common import EXIT_OK, Formatter, add_context, add_model, add_placement, check_flags, context_options, \
    explicit_placement, model_arg, parse_layers, resolve_model


def add_parser(sub, parents) -> None:
    p = sub.add_parser("plan", parents=parents,
                       help="print which layers stay resident and which stream, slots and bytes",
                       formatter_class=Formatter, description="Print the plan for a VRAM budget (no GPU needed: "
                       "sizes come from the GGUF header): per layer where it lives, then the device-memory and "
                       "host-memory estimates.")
    add_model(p, required=False)
    add_placement(p, device=False)
    p.add_argument("--generate-cpu-layers", metavar="auto|none|L,L", default=None,
                   help="plan the generate placement of a CUDA run with this choice (as in run; default auto, "
                   "as a CUDA run's default; --exact: none): the layers kept resident while generating and the "
                   "CPU layers, whose repacked copy adds pageable host memory (auto: every overflow layer, the "
                   "most the measured split can choose)")
    p.add_argument("-np", "--parallel", type=int, default=1, metavar="K",
                   help="sequences sharing -c (as batch -np: -c / K KV cells each, padded to 256)")
    p.add_argument("-kvu", "--kv-unified", action="store_true", help="the sequences share one KV cache")
    add_context(p, threads=False)
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    from ..gguf_file import read_model
    from ..planner import make_plan

    check_flags(args)
    if not 1 <= args.parallel <= 256:
        raise ValueError(f"-np must be in 1..256, got {args.parallel}")
    if args.vram_budget is None and args.n_streamed is None and args.n_gpu_layers is None:
        raise ValueError("plan needs --vram-budget B (or --n-streamed K / -ngl N)")
    split = None if args.generate_cpu_layers is None else parse_layers(args.generate_cpu_layers)
    if args.exact and split not in (None, "none"):
        raise ValueError(f"--exact computes every layer on the GPU; it cannot be combined with "
                         f"--generate-cpu-layers {args.generate_cpu_layers}")
    path = resolve_model(model_arg(args))
    mf = read_model(path)
    ctx = context_options(args, mf.hparams["n_ctx_train"])
    plan = make_plan(mf, n_ctx=ctx["n_ctx"], n_ubatch=ctx["n_ubatch"], flash_attn=ctx["flash_attn"],
                     type_k=ctx["type_k"], type_v=ctx["type_v"], n_seq=1 if args.kv_unified else args.parallel,
                     whole_layers=True if args.whole_layers else None, **explicit_placement(args, mf))
    plan = _as_on_cuda(mf, plan, ctx, split, args.exact)
    print(plan.table())
    print(f"(estimates from the GGUF header at -c {ctx['n_ctx']} -ub {ctx['n_ubatch']}; "
          "`run` measures the real figures)")
    return EXIT_OK


def _as_on_cuda(mf, plan, ctx: dict, split, exact: bool):
    """The plan with the generate placement a CUDA run would start from
    (split None: the default, the measured split)."""
    from ..config import EngineConfig
    from ..streamer import expected_generate_plan

    config = EngineConfig(device="cuda", generate_cpu_layers=split, exact=exact, **ctx)
    return expected_generate_plan(mf, plan, config, cuda=True)
