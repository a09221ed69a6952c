"""What every stage script shares: one-paragraph errors instead of tracebacks."""
from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path
from typing import Callable

import medtl

from medtl.errors import MedtlError


def main(name: str, run: Callable[[], str]) -> None:
    """Run a stage; `run` returns its one-line summary. User mistakes exit 2 with a clear message."""
    start = time.perf_counter()
    try:
        check_own_code(sys.argv[0])
        summary = run()
    except MedtlError as e:
        print(textwrap.fill(f"{name}: error: {e}", width=100), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{name}: interrupted; outputs were left as they were", file=sys.stderr)
        sys.exit(130)
    print(f"{name}: {summary} ({time.perf_counter() - start:.1f} s)")


def check_own_code(script: str) -> None:
    """Refuse to run with a medtl other than the one beside the stage script.

    dvc.lock records the md5 of the workspace's medtl/; a stage that imported another copy (an editable
    install pointing at another checkout, a PYTHONPATH) would attribute its outputs to code that did not run.
    """
    if not script or not Path(script).is_file():
        return  # not started as a script (a test calling main() directly)
    project = Path(script).resolve().parents[1]
    imported = Path(medtl.__file__).resolve().parent
    if (project / "medtl").is_dir() and imported != (project / "medtl").resolve():
        raise MedtlError(f"this stage would run the medtl package at {imported}, not the one of this workspace "
                         f"({project / 'medtl'}) whose md5 dvc.lock records; run the stage script from the project "
                         "(python stages/<stage>.py), which puts its own medtl first")
