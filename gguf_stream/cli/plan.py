"""gguf-stream plan: the plan for a budget, from the GGUF header alone."""
from __future__ import annotations

from .common import EXIT_OK, Formatter, add_engine, add_model, check_flags, describe_auto_flash_attn, \
    engine_config_of, explicit_placement, model_arg, moe_placement_flags, resolve_model


def add_parser(sub, parents) -> None:
    p = sub.add_parser("plan", parents=parents,
                       help="print which layers stay resident and which stream, slots and bytes",
                       formatter_class=Formatter, description="Print the plan for a VRAM budget (no GPU needed: "
                       "sizes come from the GGUF header): per layer where it lives, then the device-memory and "
                       "host-memory estimates, the three tiers (GPU-resident, pinned host, disk) under the host "
                       "budget, and the speeds they allow.")
    add_model(p, required=False)
    # the options of run, chat and serve; the placement shown is a CUDA run's (--device host: a host-mode run's),
    # chosen by the load's own function (placement.host_tiers)
    add_engine(p)
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    from dataclasses import replace

    from ..config import cuda_available, resolve_flash_attn
    from ..disk import tier_bounds
    from ..gguf_file import read_model
    from ..placement import initial_plan, run_tiers

    check_flags(args)
    if args.vram_budget is None and args.n_streamed is None and args.streamed_layers is None \
            and args.n_gpu_layers is None and not moe_placement_flags(args):
        raise ValueError("plan needs --vram-budget B (or --n-streamed K, --streamed-layers L,L, -ngl N, and for a "
                         "mixture of experts --n-cpu-moe N)")
    path = resolve_model(model_arg(args))
    mf = read_model(path)
    cuda = args.device != "host"
    config = engine_config_of(args, **_context(args, mf), **explicit_placement(args, mf))
    config = replace(config, device="cuda" if cuda else "host")
    if not cuda or cuda_available():  # -fa auto asked of the device a load would ask (none here: planned off)
        config = resolve_flash_attn(config, mf.hparams, cuda)
    lookup, rates = cached_calibration(str(path), config) if cuda else (None, None)
    # the load's own decision (placement.run_tiers); initial_plan without the device's size: plan needs no GPU
    tiers = run_tiers(mf, initial_plan(mf, config, cuda, check_device=False), config, cuda, lookup)
    plan = tiers.plan
    print(plan.table())
    if plan.streamed:
        print(f"generate split: {tiers.split}")
        if plan.host_budget is None:
            print(plan.tiers_line() + " (no host budget: --host-budget none)")
        print(tier_bounds(plan, config.n_ubatch, rates))
    if tiers.notice():
        print(tiers.notice())
    fa = f" -fa auto ({describe_auto_flash_attn(config)})" if config.flash_attn == "auto" else ""
    print(f"(estimates from the GGUF header at -c {config.n_ctx} -ub {config.n_ubatch}{fa}, as a "
          f"{'CUDA' if cuda else 'host-mode'} run places it; `run` measures the real figures)")
    return EXIT_OK


def _context(args, mf) -> dict:
    from .common import context_options

    return context_options(args, mf.hparams["n_ctx_train"])


def cached_calibration(path: str, config):
    """(split lookup, cached rates) of a CUDA run on this machine: what its
    load will find in the calibration cache; (None, None) without a CUDA
    device here (plan needs none: a GPU run then measures at its first load)."""
    from ..config import cuda_available
    from ..errors import GGUFStreamError

    try:
        if not cuda_available():
            return None, None
        from .. import native
        from ..split_cache import RatesCache, cache_key, split_lookup

        total = native.device_memory("CUDA0")[1]
    except (GGUFStreamError, OSError):  # no native helper or llama.cpp libraries here: nothing cached to read
        return None, None
    return split_lookup(path, config, total), RatesCache(cache_key(path, config, total)).rates()
