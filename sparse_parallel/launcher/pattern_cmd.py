"""``sparse-parallel pattern show``: draw a pattern and print its description."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from ..patterns import Pattern, component_from_dict


def parse_component(spec: str):
    """``window:left=1024`` / ``strided:stride=64,span=4096`` / ``global:first=128,queries=false``."""
    kind, _, rest = spec.partition(":")
    d: dict = {"type": kind.strip()}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"component spec {spec!r}: expected key=value, got {item!r}")
        d[key.strip()] = yaml.safe_load(value)
    return component_from_dict(d)


def load_pattern(file: str | None, specs: list[str], causal: bool) -> Pattern:
    if file:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"pattern file {file} does not exist")
        data = yaml.safe_load(path.read_text())
        data = data.get("pattern", data) if isinstance(data, dict) else data
        return Pattern.from_dict(data)
    if not specs:
        raise ValueError("give component specs (e.g. window:left=64 strided:stride=16) or --file")
    parts = [parse_component(s) for s in specs]  # a shorthand (dilated) gives a whole causal pattern
    components = tuple(c for p in parts for c in (p.components if isinstance(p, Pattern) else (p,)))
    return Pattern(components, causal=causal)


def run(args) -> int:
    pattern = load_pattern(args.file, args.components, not args.non_causal)
    heads = args.heads if pattern.per_head else None
    if args.out:
        pattern.draw(min(args.n, args.draw_n), args.out, heads)
        print(f"wrote {args.out}")
    desc = pattern.describe(args.n, heads=args.heads, dim=args.dim)
    print(json.dumps({"pattern": pattern.to_dict(), "describe": desc}, indent=2))
    return 0


def components_help() -> str:
    """The component types and their keys (with defaults), from the registry the configs read."""
    import inspect

    from ..patterns.pattern import KINDS

    lines = ["component types (spec: TYPE:key=value,key=value):"]
    for kind, make in sorted(KINDS.items()):
        keys = []
        for name, p in inspect.signature(make).parameters.items():
            has_default = p.default is not inspect.Parameter.empty
            keys.append(f"{name}={p.default!r}" if has_default else f"{name} (required)")
        doc = (make.__doc__ or "").strip().splitlines()[0]
        lines.append(f"  {kind}: {', '.join(keys)}\n      {doc}")
    lines.append("example: sparse-parallel pattern show window:left=64 strided:stride=16 global:first=4 --out p.png")
    return "\n".join(lines)


def add_parser(sub) -> None:
    import argparse

    p = sub.add_parser("pattern", help="inspect attention patterns")
    psub = p.add_subparsers(dest="pattern_command", required=True)
    show = psub.add_parser("show", help="draw a pattern as a PNG and print its description",
                           epilog=components_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    show.add_argument("components", nargs="*", help="component specs, e.g. window:left=64 strided:stride=16")
    show.add_argument("--file", help="YAML/JSON file holding a pattern dict (or a config with a 'pattern' key)")
    show.add_argument("--non-causal", action="store_true", help="a bidirectional pattern")
    show.add_argument("--n", type=int, default=256, help="sequence length to describe")
    show.add_argument("--draw-n", type=int, default=256, help="sequence length to draw (<= 8192)")
    show.add_argument("--heads", type=int, default=1)
    show.add_argument("--dim", type=int, default=128, help="head dim for the FLOP count")
    show.add_argument("--out", help="PNG file to write")
    show.set_defaults(func=run)
