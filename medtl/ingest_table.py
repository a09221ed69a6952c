"""What ingest holds of each decoded image until the split is drawn: about a hundred bytes.

The split needs every image at once (patients, classes, copies of one image),
but of each image only its label, group, fixed split, source item and file
and pixel digests. Those are kept as columns of numbers and fixed-width bytes,
not as an object per image, so memory stays nearly flat as the source grows.
What only the manifest needs (source ref, sha256, size, offset, metadata) is
written to an unnamed temporary file in the output folder and read back, in
order, when the manifest is written.
"""
from __future__ import annotations

import json
import tempfile
from array import array
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from medtl.phi import PSEUDONYM_HEX_CHARS, PSEUDONYM_PREFIX
from medtl.splits import NO_SPLIT, SPLITS

DIGEST = 32  # bytes of a sha256 digest
PSEUDONYM = len(PSEUDONYM_PREFIX) + PSEUDONYM_HEX_CHARS


class Codes:
    """Small integer codes for a few distinct values (labels, grouping kinds, sets of metadata keys)."""

    def __init__(self) -> None:
        self.values: list = []
        self._code: dict = {}

    def __call__(self, value) -> int:
        code = self._code.get(value)
        if code is None:
            code = self._code[value] = len(self.values)
            self.values.append(value)
        return code


@dataclass
class Record:
    """An image's manifest fields that the split does not need, as spilled."""

    source_ref: str
    sha256: str
    height: int
    width: int
    channels: int
    offset: int
    metadata: dict[str, str]
    index: str | None


@dataclass
class Columns:
    """The table as numpy arrays, one entry per image; `row` is the image's place in the spill."""

    row: np.ndarray  # int64
    item: np.ndarray  # int32: which source item (file), numbered from 1 as seen
    label: np.ndarray  # int32 code into ImageTable.labels
    group: np.ndarray  # S{PSEUDONYM}: the pseudonym
    kind: np.ndarray  # int32 code into ImageTable.kinds
    fixed: np.ndarray  # int8 code into SPLITS, NO_SPLIT if the source fixed none
    keyset: np.ndarray  # int32 code into ImageTable.keysets (the image's metadata keys)
    file_key: np.ndarray  # int64 id of the file's digest, -1 for array items (they share their container's)
    pixel_key: np.ndarray  # int64 id of the pixels' digest, numbered after every file id

    def __len__(self) -> int:
        return len(self.row)

    def take(self, keep: np.ndarray) -> Columns:
        return Columns(**{f.name: getattr(self, f.name)[keep] for f in fields(self)})


class ImageTable:
    def __init__(self, folder: Path):
        # Unnamed where the system allows: nothing is left behind, whatever happens to the process.
        self._spill = tempfile.TemporaryFile("w+", encoding="utf-8", newline="\n", dir=folder, prefix=".ingest-",
                                             suffix=".tmp")
        self.labels, self.kinds, self.keysets = Codes(), Codes(), Codes()
        self._item, self._label, self._kind, self._keyset = array("i"), array("i"), array("i"), array("i")
        self._fixed, self._has_file = array("b"), array("b")
        self._group, self._file, self._pixels = bytearray(), bytearray(), bytearray()

    def __len__(self) -> int:
        return len(self._item)

    def append(self, item: int, label: str, group: str, kind: str, fixed: str | None, file_digest: bytes | None,
               pixel_digest: bytes, record: Record) -> None:
        if len(group) != PSEUDONYM or len(pixel_digest) != DIGEST:
            raise ValueError("a group must be a pseudonym and a pixel hash a sha256 digest")
        self._item.append(item)
        self._label.append(self.labels(label))
        self._kind.append(self.kinds(kind))
        self._keyset.append(self.keysets(tuple(sorted(record.metadata))))
        self._fixed.append(NO_SPLIT if fixed is None else SPLITS.index(fixed))
        self._group += group.encode("ascii")
        self._has_file.append(file_digest is not None)
        self._file += file_digest if file_digest is not None else bytes(DIGEST)
        self._pixels += pixel_digest
        json.dump([record.source_ref, record.sha256, record.height, record.width, record.channels, record.offset,
                   record.metadata, record.index], self._spill, ensure_ascii=False, separators=(",", ":"))
        self._spill.write("\n")

    def columns(self) -> Columns:
        """The columns as arrays, digests numbered (equal digest, equal id); the table takes no more images."""
        n = len(self)
        has_file = np.frombuffer(self._has_file, dtype=np.int8).astype(bool)
        files, file_ids = np.unique(np.frombuffer(self._file, f"S{DIGEST}")[has_file], return_inverse=True)
        file_key = np.full(n, -1, dtype=np.int64)
        file_key[has_file] = file_ids
        _, pixel_key = np.unique(np.frombuffer(self._pixels, f"S{DIGEST}"), return_inverse=True)
        self._file, self._pixels = bytearray(), bytearray()  # the ids say all the split needs of them
        return Columns(
            row=np.arange(n), item=np.frombuffer(self._item, np.int32), label=np.frombuffer(self._label, np.int32),
            group=np.frombuffer(self._group, f"S{PSEUDONYM}"), kind=np.frombuffer(self._kind, np.int32),
            fixed=np.frombuffer(self._fixed, np.int8), keyset=np.frombuffer(self._keyset, np.int32),
            file_key=file_key, pixel_key=pixel_key.astype(np.int64) + len(files),
        )

    def records(self, rows: Iterable[int] | None = None) -> Iterator[tuple[int, Record]]:
        """(row, record) for the given rows (ascending), or every row, read back from the spill in order."""
        wanted = None if rows is None else iter(rows)
        want = -1 if wanted is None else next(wanted, None)
        if want is None:
            return
        self._spill.seek(0)
        for row, line in enumerate(self._spill):
            if wanted is not None and row != want:
                continue
            yield row, Record(*json.loads(line))
            if wanted is not None:
                want = next(wanted, None)
                if want is None:
                    return

    def lookup(self, rows: Iterable[int]) -> dict[int, Record]:
        """The records of a few rows (copies, conflicts) by row."""
        return dict(self.records(sorted(set(int(r) for r in rows))))

    def close(self) -> None:
        self._spill.close()
