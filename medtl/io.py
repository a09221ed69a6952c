"""Atomic writes, hashing and safe checkpoint loading.

Every artifact is written to a temporary name in the same folder and renamed
into place, so a crash never leaves a half-written file at an output path.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

from medtl.errors import MedtlError

T = TypeVar("T")

_CHUNK = 1 << 20


def folder_argument(value: str) -> Path:
    """An `--out` that names a folder: `-` (stdout) cannot hold several files."""
    if value == "-":
        raise argparse.ArgumentTypeError("'-' (stdout) is for commands that write one file; this one writes a folder of files, give its path")
    return Path(value)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _temp_prefix(path: Path) -> str:
    # The writer's pid is in the name, so a later write can tell a crashed writer's leftovers from a live one's.
    return f".{path.name}.{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _sweep_leftovers(path: Path) -> None:
    """Remove temporaries beside `path` left by writers that were killed (SIGKILL, power loss)."""
    with contextlib.suppress(OSError):
        for p in path.parent.glob(f".{glob.escape(path.name)}.*"):
            parts = p.name[len(path.name) + 2:].split(".")
            stale = p.name == f".{path.name}.old" or (
                len(parts) >= 3 and parts[-1] == "tmp" and parts[0].isdigit() and not _alive(int(parts[0])))
            if stale:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umasked(mode: int) -> int:
    """`mode` as a plain open() or mkdir() would create it under the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


@contextlib.contextmanager
def atomic_path(path: str | Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The file gets `mode`, or by default the permissions a plain open() would give it (mkstemp's 0600 would
    hide outputs from the rest of a team sharing a project or a DVC cache).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
        os.fchmod(fd, _umasked(0o666) if mode is None else mode)
        os.close(fd)
    except OSError as e:
        raise MedtlError(f"cannot write {path}: {e.strerror or e}") from e
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        _sweep_leftovers(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise MedtlError(f"cannot write {path}: {e.strerror or e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
        os.chmod(tmp, _umasked(0o777))  # as mkdir would make it, not mkdtemp's 0700
    except OSError as e:
        raise MedtlError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _sweep_leftovers(path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MedtlError(f"cannot write {path}: {e.strerror or e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def open_npy(path: str | Path, dtype: Any, shape: tuple[int, ...]):
    """A new .npy file memory-mapped for writing, its blocks reserved on disk first.

    Writing into a mapped page the disk has no room for kills the process with SIGBUS;
    reserving the space up front turns a full disk into an OSError (ENOSPC) here instead.
    """
    import numpy as np

    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    try:
        with open(path, "rb+") as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    except OSError:
        del arr
        raise
    return arr


def save_torch(obj: Any, path: str | Path) -> None:
    import torch

    # Through a file object: given a path, torch names the zip's root folder after the (random)
    # temporary name, and the same weights would hash differently on every run.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def load_torch(path: str | Path) -> Any:
    """Load a checkpoint without unpickling code: a file that carries code is refused."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise MedtlError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError...
        raise MedtlError(
            f"checkpoint {path} cannot be loaded safely (expected tensors and plain values only, "
            f"no pickled code): {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e


def prefetch(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """The same items in the same order, the next `depth` produced in a thread meanwhile.

    Reading memory-mapped arrays (training batches) and decoding files (`medtl predict`) release the GIL,
    so producing the next items overlaps the model's work instead of leaving the cores idle. Only work
    without random draws belongs here: torch's global random stream is shared by every thread.
    """
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False  # the consumer has stopped

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # raised again in the consumer, where it belongs
            put(e)

    thread = threading.Thread(target=work, name="medtl-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()
