"""What every stage script shares: one-paragraph errors instead of tracebacks."""
from __future__ import annotations

import sys
import textwrap
import time
from typing import Callable

from medtl.errors import MedtlError


def main(name: str, run: Callable[[], str]) -> None:
    """Run a stage; `run` returns its one-line summary. User mistakes exit 2 with a clear message."""
    start = time.perf_counter()
    try:
        summary = run()
    except MedtlError as e:
        print(textwrap.fill(f"{name}: error: {e}", width=100), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{name}: interrupted; outputs were left as they were", file=sys.stderr)
        sys.exit(130)
    print(f"{name}: {summary} ({time.perf_counter() - start:.1f} s)")
