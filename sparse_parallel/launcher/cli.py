"""``sparse-parallel``: the command line.

Each subcommand lives in its own module exposing ``add_parser(subparsers)``;
the parser sets ``func`` to the handler.  Modules are listed in ``COMMANDS``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from ..training import USER_ERRORS

COMMANDS = (
    "sparse_parallel.launcher.pattern_cmd",
    "sparse_parallel.launcher.train_cmd",
    "sparse_parallel.launcher.launch",
    "sparse_parallel.launcher.submit",
    "sparse_parallel.launcher.tokenizer_cmd",
    "sparse_parallel.launcher.export_cmd",
    "sparse_parallel.launcher.generate_cmd",
    "sparse_parallel.launcher.eval_cmd",
    "sparse_parallel.launcher.config_cmd",
)


class Parser(argparse.ArgumentParser):
    """No prefix matching (``--resum none`` is not ``--resume none``), here and in every subcommand."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="sparse-parallel", description="Sparse attention for million-token contexts.")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"sparse-parallel {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        code = int(args.func(args) or 0)
    except USER_ERRORS as e:
        print(f"sparse-parallel {args.command}: error: {e}", file=sys.stderr)
        code = 2
    on_exit = getattr(args, "on_exit", None)
    if on_exit is not None:
        on_exit(code)
    return code


def entry() -> None:
    """The ``sparse-parallel`` program: :func:`main`, then the end of the process.  A process that trained
    ends through ``training.end_process`` (it explains why); the trainer is imported only by then."""
    code = main()
    trainer = sys.modules.get("sparse_parallel.training.trainer")
    if trainer is not None:
        trainer.end_process(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
