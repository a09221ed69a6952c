"""models/model.pt on disk, its one writer and reader: a plain dict (loadable with torch's weights_only)
holding the format version, architecture, classes, backbone and head tensors, and the preprocessing
record. Building the classifier from it is medtl.model.classifier's job; this module needs no torch until a
file is read or written, so commands and the audit can name and read the file cheaply."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from medtl.errors import MedtlError

MODEL_FORMAT = "medtl-model/2"
PROJECT_MODEL = Path("models/model.pt")  # where the pipeline (dvc.yaml) puts it


def save_model(ckpt: dict[str, Any], path: str | Path) -> None:
    from medtl.io import save_torch

    if ckpt.get("format") != MODEL_FORMAT:
        raise MedtlError(f"refusing to write {path}: not a {MODEL_FORMAT} model dict (build it with model_file)")
    save_torch(ckpt, path)


def read_model_file(path: str | Path, check_format: bool = True) -> dict[str, Any]:
    """The model file's dict; refused when it is not a dict, or (with `check_format`) of another format version."""
    from medtl.io import load_torch

    ckpt = load_torch(path)
    if not isinstance(ckpt, dict):
        raise MedtlError(f"{path} is not a medtl model file (expected a dict with arch, classes, backbone and head)")
    found = ckpt.get("format")
    if check_format and found != MODEL_FORMAT:
        raise MedtlError(f"{path} has format {found!r}, this medtl reads {MODEL_FORMAT!r}; retrain it with the "
                         "fine-tune stage (dvc repro)")
    return ckpt
