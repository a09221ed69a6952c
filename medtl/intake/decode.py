"""The one intake: from a source item to checked, decoded images ready for `medtl.prepare.imaging.model_input`.

Every image that enters medtl passes through `decode_item`: ingest, external
sets (`evaluate.external`), `medtl predict`, self-supervised pretraining's
extra images and unlabelled target images (`medtl.prepare.unlabelled.read_unlabelled`). One policy
holds for all of them:

- walking: folders are walked by `medtl.intake.sources.walk_files`; a link that
  loops, dangles or leaves the root, and a hidden file, is counted with its
  reason, never read and never silently dropped (`folder_items`);
- decoding with the record's read options (`medtl.intake.readers.read`);
- library warnings, log records and errors become fixed-vocabulary reasons
  ("invalid_value:UI", "truncated"): their text may quote header values;
- header checks: BurnedInAnnotation YES (text such as a name drawn into the
  pixels) is refused unless the caller keeps it; whitelisted metadata only,
  each value in the form the standard gives it (a name typed into Modality
  or PhotometricInterpretation is never copied);
- naming: a file is named by its keyed ref (`medtl.intake.phi.source_ref` of its
  path relative to the root) and the sha256 of its bytes, never by its path;
  details carry fixed words, numbers and tag keywords, never a path segment.
"""
from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Literal

import numpy as np

from medtl.errors import ParamsError, UnreadableImage
from medtl.intake import phi
from medtl.intake.readers import read
from medtl.intake.readers.base import ReadOptions
from medtl.intake.readers.dicom import BURNED_IN
from medtl.io import sha256_file

if TYPE_CHECKING:
    from medtl.intake.sources import SourceItem

BurnedIn = Literal["quarantine", "keep"]
# Reasons every caller counts, even at zero, so a reviewer sees they were looked for.
COUNTED_REASONS = ("burned_in_annotation", "symlink_loop", "dangling_symlink", "link_outside_root")


@dataclass
class Image:
    pixels: np.ndarray  # float32 in [0, 1], (H, W) or (H, W, 3), as decoded
    metadata: dict[str, str]  # whitelisted header metadata, values checked (a bad one is "")
    blanked: tuple[str, ...] = ()  # metadata keys whose value was not of the standard's form


@dataclass
class Intake:
    """One source item through the intake: its images, or why there are none."""

    item: SourceItem
    ref: str = ""  # keyed ref of the item's relative path ("" for a file passed by itself)
    sha256: str = ""  # of the file's bytes (of the pixels for array items)
    images: list[Image] = field(default_factory=list)
    identity: dict[str, str] = field(default_factory=dict)  # header ids of the first image; never stored
    burned_in: bool = False  # BurnedInAnnotation YES, kept because the caller asked
    problem: str | None = None  # a fixed-vocabulary reason
    detail: str = ""  # fixed words, numbers and tag keywords
    warnings: list[str] = field(default_factory=list)  # kinds of library warnings (fixed words and tag names)


class _LogTally(logging.Handler):
    """Counts the decoding libraries' log records by level instead of letting them reach stderr (they may quote values)."""

    def __init__(self) -> None:
        super().__init__()
        self.kinds: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.kinds.append(f"library_log:{record.name.split('.')[0]}:{record.levelname.lower()}")


_TALLY = _LogTally()
for _name in ("pydicom", "nibabel", "PIL"):
    _logger = logging.getLogger(_name)
    _logger.addHandler(_TALLY)
    _logger.propagate = False


def decode_item(item: SourceItem, options: ReadOptions, burned_in: BurnedIn = "quarantine") -> Intake:
    """Decode one item with `options` and check it; never raises for a bad file (the reason is in `problem`)."""
    res = Intake(item, phi.source_ref(item.ref_key) if item.relative else "")
    _TALLY.kinds = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if item.problem:
                raise UnreadableImage(item.problem, item.detail)
            if item.pixels is not None:
                found = [(item.pixels, {})]
                res.sha256 = item.sha256 or hashlib.sha256(np.ascontiguousarray(item.pixels).tobytes()).hexdigest()
            else:
                res.sha256 = sha256_file(item.path)
                decoded = read(item.path, options)
                found = [(d.pixels, d.metadata) for d in decoded]
                res.identity = dict(decoded[0].identity)
            if res.identity.get(BURNED_IN) == "YES":
                if burned_in == "quarantine":
                    raise UnreadableImage("burned_in_annotation",
                                          "BurnedInAnnotation is YES: text is drawn into the pixels")
                res.burned_in = True
            for pixels, meta in found:
                checked, blanked = phi.check_header_metadata(meta)
                res.warnings += [f"invalid_value:{k}" for k in blanked]
                res.images.append(Image(pixels, checked, tuple(blanked)))
        except UnreadableImage as e:
            res.problem, res.detail = e.reason, safe_detail(e.detail, item)
        except OSError as e:
            res.problem, res.detail = "unreadable_file", f"the file cannot be read ({phi.error_kind(e)})"
        except Exception as e:  # a reader bug must not take the whole run down; it is reported
            res.problem, res.detail = "decode_error", f"unexpected {phi.error_kind(e)} while decoding"
        if res.problem:
            res.images, res.identity = [], {}
    res.warnings += [phi.warning_kind(w) for w in caught] + _TALLY.kinds
    return res


def safe_detail(detail: str, item: SourceItem) -> str:
    """A reader's detail without the file's path (or any longer segment of it): files are named by ref."""
    return phi.scrub_path(detail, item.path, item.relative, keep=(item.label,) if item.label else ())


def folder_items(root: Path, hidden: Counter | None = None) -> Iterator[SourceItem]:
    """Every file under `root` as an unlabelled SourceItem; links that cannot be followed carry their problem.

    Hidden files and folders are not read; each is counted in `hidden` (under "hidden_file").
    """
    from medtl.intake.sources import entry_item, walk_files

    for entry in walk_files(root, hidden=hidden):
        yield entry_item(entry, root)


def check_data_paths(data: str, paths: list[tuple[str, str]], data_key: str) -> None:
    """Refuse, before any work, a relative path that leaves the project and a source path outside `data`.

    DVC runs queued experiments (`dvc exp run --queue`, `medtl cv run`) from a copy of the project inside
    .dvc/tmp, where a relative path out of the project leads nowhere; and what lies outside `data`, the path
    dvc.yaml declares as the input, can change without DVC rerunning anything. `paths` are (params key, value).
    """
    for name, value in [(data_key, data), *paths]:
        if value and not Path(value).is_absolute() and Path(os.path.normpath(value)).parts[:1] == ("..",):
            raise ParamsError(
                f"params key '{name}' is {value!r}, a relative path that leaves the project; DVC runs queued "
                "experiments (dvc exp run --queue, medtl cv run) from a copy of the project inside .dvc/tmp, where "
                f"it leads nowhere. Use an absolute path ({Path(value).resolve()}), or bring the data inside the "
                "project (`dvc import` or `dvc add`)")
    inside = Path(data).resolve()
    for name, value in paths:
        if value and not Path(value).resolve().is_relative_to(inside):
            raise ParamsError(
                f"params key '{name}' is {value!r}, which is not inside {data_key} ({data!r}), the path DVC tracks "
                "as this input: files changed there would leave the results marked up to date. Set "
                f"{data_key} to a folder that holds it")


def describe_source(items_seen: int, skipped: Counter, hidden: Counter) -> dict:
    """The counts every unlabelled read reports: files seen, skipped by reason (counted reasons at zero), hidden."""
    return {"files": items_seen, "skipped": dict(sorted({**dict.fromkeys(COUNTED_REASONS, 0), **skipped}.items())),
            "hidden_files": int(hidden.get("hidden_file", 0))}

