"""gguf-stream plan: the plan for a budget, from the GGUF header alone."""
from __future__ import annotations

from .common import EXIT_OK, Formatter, add_engine, add_model, check_flags, engine_config_of, explicit_placement, \
    model_arg, resolve_model


def add_parser(sub, parents) -> None:
    p = sub.add_parser("plan", parents=parents,
                       help="print which layers stay resident and which stream, slots and bytes",
                       formatter_class=Formatter, description="Print the plan for a VRAM budget (no GPU needed: "
                       "sizes come from the GGUF header): per layer where it lives, then the device-memory and "
                       "host-memory estimates.")
    add_model(p, required=False)
    # the options of run, chat and serve; the generate placement shown is a CUDA run's (its default: the
    # measured split, every overflow layer counted, the most it can choose; --exact: none)
    add_engine(p)
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    from ..gguf_file import read_model
    from ..placement import initial_plan

    check_flags(args)
    if args.vram_budget is None and args.n_streamed is None and args.streamed_layers is None \
            and args.n_gpu_layers is None:
        raise ValueError("plan needs --vram-budget B (or --n-streamed K, --streamed-layers L,L, -ngl N)")
    path = resolve_model(model_arg(args))
    mf = read_model(path)
    config = engine_config_of(args, **_context(args, mf), **explicit_placement(args, mf))
    plan = _as_on_cuda(mf, initial_plan(mf, config, cuda=False), config)
    if args.host_budget is not None:
        from ..disk import assign_disk_tier, staging_bytes, staging_options
        from ..memory import parse_size

        # as a CUDA run places it: its staging buffers count against the host budget
        staging = staging_bytes(mf, staging_options(True), cuda=True)
        plan = assign_disk_tier(plan, parse_size(args.host_budget), staging)
    print(plan.table())
    fa = " -fa auto (planned as off: the larger compute buffer; llama.cpp decides when it creates the " \
         "context)" if config.flash_attn == "auto" else ""
    print(f"(estimates from the GGUF header at -c {config.n_ctx} -ub {config.n_ubatch}{fa}; "
          "`run` measures the real figures)")
    return EXIT_OK


def _context(args, mf) -> dict:
    from .common import context_options

    return context_options(args, mf.hparams["n_ctx_train"])


def _as_on_cuda(mf, plan, config):
    """The plan with the generate placement a CUDA run would start from."""
    from dataclasses import replace

    from ..placement import expected_generate_plan

    return expected_generate_plan(mf, plan, replace(config, device="cuda"), cuda=True)
