"""``sparse-parallel config show``: the resolved config, every default written out."""
from __future__ import annotations

import json


def run(args) -> int:
    import yaml

    from ..training.config import load_config

    cfg = load_config(args.config, args.overrides)
    out = {"config": cfg.to_dict()}
    if cfg.scheduler() is not None:  # as the trainer passes it (its length resolved)
        out["config"]["deepspeed"]["scheduler"] = cfg.scheduler()
    if args.world_size:
        from ..training.layout import build_layout

        out["derived"] = build_layout(cfg, args.world_size).sizes()
    print(json.dumps(out, indent=1) if args.json else yaml.safe_dump(out, sort_keys=False), end="")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("config", help="inspect training configs")
    csub = p.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print the resolved config with all defaults",
                           description="Load a YAML config, apply --set overrides, validate and print every "
                                       "field (defaults included), as the trainer will see it.")
    show.add_argument("config", help="YAML training config")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    show.add_argument("--world-size", type=int, default=0, help="also print the derived sizes at this world size")
    show.add_argument("--json", action="store_true", help="JSON instead of YAML")
    show.set_defaults(func=run)
