"""The provenance record each stage writes beside its outputs.

    with stage_record("ingest", params=p, inputs=[...], outputs=[...],
                      record_path="data/ingested.provenance.json") as rec:
        ...
        rec.seeds["split"] = 42

The record is written only when the block succeeds, after the outputs exist,
so its output hashes describe what the stage actually wrote. It is a DVC
output of its stage (dvc.yaml), so `dvc checkout`, `dvc exp apply` and the run
cache restore it with the outputs it describes. It holds nothing that varies
between two runs of the same code on the same data: the wall-clock times go
to an untracked log beside it, one JSON line per run, keyed by the record's
sha256 (`<record>.log`, e.g. models/model.pt.provenance.json.log).
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import json
import time
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import Any, Iterator

from medtl.errors import MedtlError
from medtl.io import write_json
from medtl.provenance import environment as env
from medtl.provenance.hashing import describe

RECORD_SCHEMA = "medtl.stage-record/1"
RECORD_SUFFIX = ".provenance.json"
TIMES_SUFFIX = ".log"
# Stages without a model (ingest, preprocess) still state where they ran and at what precision.
NO_MODEL = {"device": "cpu", "precision": "not applicable: no model computation (pixels decoded and resized on the CPU)"}


def record_path_for(output: str | Path) -> Path:
    """Where a stage's record sits: beside its first output, e.g. models/model.pt.provenance.json."""
    p = Path(output)
    return p.with_name(p.name + RECORD_SUFFIX)


def times_path_for(record: str | Path) -> Path:
    """The untracked log of a record's wall-clock times: <record>.log."""
    p = Path(record)
    return p.with_name(p.name + TIMES_SUFFIX)


def run_times(record: str | Path) -> dict | None:
    """{started, ended, duration_s} of the run that wrote this record (the last logged run with its sha256), or None."""
    log, record = times_path_for(record), Path(record)
    if not log.is_file() or not record.is_file():
        return None
    sha = hashlib.sha256(record.read_bytes()).hexdigest()
    found = None
    with contextlib.suppress(OSError, UnicodeDecodeError):
        for line in log.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and entry.get("record_sha256") == sha:
                    found = {k: entry.get(k) for k in ("started", "ended", "duration_s")}
    return found


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def to_jsonable(value: Any) -> Any:
    """Params dataclasses, paths, tuples, devices and numpy scalars as plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return [to_jsonable(v) for v in items]
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value)
    if isinstance(value, PurePath):
        return value.as_posix()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        with contextlib.suppress(Exception):
            return to_jsonable(value.item())
    return str(value)  # torch.device, dtype: their str is the useful form


def _rel(path: str | Path) -> str:
    """The path relative to the project; outside it, only the last name: evidence holds no local path."""
    p = Path(path)
    with contextlib.suppress(ValueError):
        return p.resolve().relative_to(Path.cwd().resolve()).as_posix()
    return f"(outside the project)/{p.name}"


project_path = _rel


@dataclasses.dataclass
class StageRecord:
    stage: str
    params: Any = None
    inputs: list[str | Path] = dataclasses.field(default_factory=list)
    outputs: list[str | Path] = dataclasses.field(default_factory=list)
    seeds: dict[str, Any] = dataclasses.field(default_factory=dict)
    hardware: dict[str, Any] | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    started: str = dataclasses.field(default_factory=utc_now)
    _t0: float = dataclasses.field(default_factory=time.monotonic, repr=False)
    _inputs_hashed: list[dict] = dataclasses.field(default_factory=list, repr=False)

    def times(self) -> dict:
        return {"started": self.started, "ended": utc_now(), "duration_s": round(time.monotonic() - self._t0, 3)}

    def to_dict(self) -> dict:
        """The record: the same bytes for the same code, params, inputs, outputs and machine."""
        missing = [str(p) for p in self.outputs if not Path(p).exists()]
        if missing:
            raise MedtlError(f"stage {self.stage} finished but its outputs are missing: {', '.join(missing)}")
        return {
            "schema": RECORD_SCHEMA,
            "stage": self.stage,
            "params": to_jsonable(self.params),
            "inputs": self._inputs_hashed,
            "outputs": [describe(p, _rel(p)) for p in self.outputs],
            "code": env.git_state(),
            "environment": env.environment(),
            "dvc": env.dvc_context(),
            "seeds": to_jsonable(self.seeds),
            "hardware": to_jsonable(self.hardware if self.hardware is not None else NO_MODEL),
            "extra": to_jsonable(self.extra),
        }


@contextlib.contextmanager
def stage_record(
    stage: str,
    params: Any = None,
    inputs: list[str | Path] | tuple = (),
    outputs: list[str | Path] | tuple = (),
    record_path: str | Path | None = None,
) -> Iterator[StageRecord]:
    """Yield a StageRecord to fill in; write it atomically to `record_path` if the block succeeds.

    Inputs are hashed on entry (what the stage read), outputs on exit (what it
    wrote). `record_path` defaults to `<first output>.provenance.json`.
    """
    if record_path is None:
        if not outputs:
            raise MedtlError(f"stage_record({stage!r}) needs outputs or a record_path")
        record_path = record_path_for(outputs[0])
    absent = [str(p) for p in inputs if not Path(p).exists()]
    if absent:
        raise MedtlError(f"stage {stage} cannot start: inputs not found: {', '.join(absent)}")
    rec = StageRecord(stage=stage, params=params, inputs=list(inputs), outputs=list(outputs))
    # inputs by digest and file count only: an input folder may be source data whose file names identify patients
    rec._inputs_hashed = [describe(p, _rel(p), list_files=False) for p in inputs]
    yield rec
    record = rec.to_dict()
    write_json(record_path, record)
    sha = hashlib.sha256(Path(record_path).read_bytes()).hexdigest()
    with contextlib.suppress(OSError):  # the times are a convenience; the record is the evidence
        with open(times_path_for(record_path), "a", encoding="utf-8") as f:
            f.write(json.dumps({"record_sha256": sha, **rec.times()}) + "\n")


def load_record(path: str | Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MedtlError(f"provenance record {path} cannot be read: {e}") from e
    if not isinstance(data, dict) or data.get("schema") != RECORD_SCHEMA:
        raise MedtlError(f"{path} is not a medtl stage record (expected schema {RECORD_SCHEMA!r})")
    return data
