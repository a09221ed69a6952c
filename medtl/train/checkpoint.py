"""Resumable training state: one file rewritten atomically after every epoch, keyed by what it was trained from.

The key is a hash of the params, the input files' sha256, the hardware and
the number of processes. A checkpoint left by a different run (changed
params or data) is never resumed: training starts over and replaces it.
"""
from __future__ import annotations

import hashlib
import json
import sys
import threading
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from medtl.errors import MedtlError
import torch

from medtl.io import load_torch, save_torch, sha256_file

FORMAT = "medtl-finetune-resume/1"


def input_digest(paths: list[Path]) -> dict[str, str]:
    return {p.as_posix(): sha256_file(p) for p in paths}


def code_digest() -> str:
    """sha256 over the medtl package's source: a checkpoint left by other code is not resumed."""
    root = Path(__file__).resolve().parent.parent  # the whole medtl package
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode("utf-8") + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def resume_key(params: Any, inputs: dict[str, str], extra: dict[str, Any]) -> str:
    """sha256 over the params, the inputs' hashes and anything else that changes the result."""
    body = {"format": FORMAT, "params": asdict(params) if is_dataclass(params) else params,
            "inputs": inputs, "extra": extra}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode("utf-8")).hexdigest()


class ResumeFile:
    """Where the state after the last complete epoch lives, and which run it belongs to."""

    def __init__(self, path: str | Path, key: str):
        self.path, self.key = Path(path), key
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None

    def load(self) -> dict | None:
        """The saved state if it belongs to this run; None (with a note on stderr) otherwise."""
        if not self.path.exists():
            return None
        try:
            state = load_torch(self.path)
        except MedtlError as e:
            print(f"fine-tune: ignoring unreadable resume checkpoint: {e}", file=sys.stderr)
            return None
        if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("key") != self.key:
            print(f"fine-tune: {self.path} is from other params or data; starting over", file=sys.stderr)
            return None
        return state

    def save(self, state: dict) -> None:
        """Write `state` atomically in a background thread, so the next epoch need not wait for the disk.

        The state is copied first (training goes on changing the tensors in place);
        at most one write is in flight, and `wait` joins it.
        """
        self.wait()
        snapshot = _clone({"format": FORMAT, "key": self.key, **state})

        def write() -> None:
            try:
                save_torch(snapshot, self.path)
            except BaseException as e:  # re-raised by wait() in the training thread
                self._error = e
        self._writer = threading.Thread(target=write, name="medtl-resume-writer", daemon=True)
        self._writer.start()

    def wait(self) -> None:
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def clean_partial(self) -> None:
        """Remove temporary files a killed write left beside the checkpoint."""
        for tmp in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            tmp.unlink(missing_ok=True)

    def remove(self) -> None:
        self.wait()
        self.path.unlink(missing_ok=True)


def _clone(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_clone(v) for v in obj)
    return obj
