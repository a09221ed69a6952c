"""The `medtl` command. Each concern module registers its own subcommand."""
from __future__ import annotations

import argparse
import importlib
import sys

from medtl.errors import MedtlError

# Each module defines `register(subparsers)`, adding a subparser whose
# defaults carry `func(args) -> int`.
COMMAND_MODULES: list[str] = ["medtl.weights", "medtl.provenance.commands", "medtl.predict", "medtl.export", "medtl.locate"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medtl", description="Reproducible, auditable transfer learning for medical images.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MedtlError as e:
        print(f"medtl {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
