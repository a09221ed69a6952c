"""The `medtl` command. Each concern module registers its own subcommand.

A command module is imported to build the parser, for every command and for
`--help`: it imports only the standard library and light medtl modules at
the top, and its handler imports the training stack (torch, numpy, ...) when
it runs. So `medtl --help`, `medtl verify` and `medtl keygen` start fast and
work in the base install, which has no torch (tests/test_cli.py).

Exit codes (README, "Exit codes"): 0 success; 1 a check failed (verify found
a mismatch or nothing to check, audit found the workspace dirty); 2 a usage
or input error, with a message naming what was wrong; 3 the command needs the
training stack and it is not installed; 130 interrupted.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import shutil
import sys
import tempfile
from pathlib import Path

from medtl.errors import MedtlError
from medtl.io import folder_argument  # noqa: F401  (command modules take it from here)

# Each module defines `register(subparsers)`, adding a subparser whose
# defaults carry `func(args) -> int`.
COMMAND_MODULES: list[str] = ["medtl.model.weights", "medtl.provenance.commands", "medtl.deploy.predict", "medtl.deploy.export_command", "medtl.deploy.locate",
                              "medtl.experiments.exps", "medtl.experiments.cv_command", "medtl.experiments.curve", "medtl.intake.phi"]

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_MISSING_EXTRA, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
# Top-level packages of the `train` extra: a handler that needs one of them in the base install exits 3.
TRAIN_PACKAGES = frozenset({"torch", "torchvision", "numpy", "scipy", "sklearn", "cv2", "pydicom", "nibabel", "PIL",
                            "tqdm", "dvc", "dvclive", "jsonschema", "referencing", "pylibjpeg", "gdcm", "jpeg_ls"})


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("medtl")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


class UsageError(Exception):
    """A command-line mistake argparse found, raised instead of printed when the command asked for --json."""

    def __init__(self, prog: str, message: str):
        super().__init__(f"{prog}: error: {message}")
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """argparse, except that under --json a usage error becomes a UsageError, printed by main() as JSON."""

    json_errors = False

    def error(self, message):
        if Parser.json_errors:
            raise UsageError(self.prog, message)
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="medtl", description="Reproducible, auditable transfer learning for medical images.",
                                     epilog="Exit codes: 0 success, 1 a check failed, 2 usage or input error, "
                                            "3 needs the train extra (pip install 'medtl[train]'), 130 interrupted.")
    parser.add_argument("--version", action="version", version=f"medtl {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] not in TRAIN_PACKAGES:
                raise
            # A command module that imports the training stack at the top: in the base install it is
            # listed, and says what to install, instead of breaking every other command.
            _register_missing(sub, name.rsplit(".", 1)[-1], e.name)
            continue
        module.register(sub)
    return parser


def _register_missing(sub, command: str, missing: str) -> None:
    def needs_train(args: argparse.Namespace) -> int:
        raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)

    p = sub.add_parser(command, help="(needs the train extra: pip install 'medtl[train]')", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=needs_train)


def _stdout_out(args: argparse.Namespace) -> bool:
    return str(getattr(args, "out", None)) == "-"


class _Renamed:
    """A text stream that writes `old` as `new`: with `--out -`, messages name stdout, not the temporary file."""

    def __init__(self, stream, old: str, new: str):
        self._stream, self._old, self._new = stream, old, new

    def write(self, text: str) -> int:
        return self._stream.write(text.replace(self._old, self._new))

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _run(args: argparse.Namespace) -> int:
    """Run the handler; with `--out -` it writes to a temporary file that is then copied to stdout."""
    if not _stdout_out(args):
        return int(args.func(args) or 0)
    with tempfile.TemporaryDirectory(prefix="medtl-out-") as tmp:
        target = Path(tmp) / "out"
        args.out = type(args.out)(target) if isinstance(args.out, Path) else str(target)
        # The handler's own messages go to stderr, so stdout carries only the output.
        messages = _Renamed(sys.stderr, str(target), "stdout")
        with contextlib.redirect_stdout(messages), contextlib.redirect_stderr(messages):
            code = int(args.func(args) or 0)
        if target.is_file():
            with open(target, "rb") as f:
                shutil.copyfileobj(f, sys.stdout.buffer)
            sys.stdout.flush()
        return code


def _json_error(command: str | None, message: str, code: int) -> int:
    """Under --json, an error is one JSON object on stdout too, so a script parses every outcome the same way."""
    import json

    print(json.dumps({"format": "medtl-error/1", "command": command, "status": "error",
                      "exit_code": code, "error": message}, indent=2))
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    Parser.json_errors = "--json" in argv
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        command = next((a for a in argv if not a.startswith("-")), None)
        return _json_error(command, str(e), EXIT_USAGE)
    finally:
        Parser.json_errors = False
    as_json = bool(getattr(args, "json", False))
    try:
        return _run(args)
    except MedtlError as e:
        if as_json:
            return _json_error(args.command, f"medtl {args.command}: error: {e}", EXIT_USAGE)
        print(f"medtl {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in TRAIN_PACKAGES:
            raise
        message = (f"medtl {args.command}: error: this command needs the training stack ({e.name} is not installed); "
                   "install it with: pip install 'medtl[train]'")
        if as_json:
            return _json_error(args.command, message, EXIT_MISSING_EXTRA)
        print(message, file=sys.stderr)
        return EXIT_MISSING_EXTRA
    except KeyboardInterrupt:
        print(f"medtl {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
