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

from medtl.ingest.splits import NO_SPLIT, SPLITS
from medtl.intake.phi import PSEUDONYM_HEX_CHARS, PSEUDONYM_PREFIX

DIGEST = 32  # bytes of a sha256 digest
# A pseudonym is held as its hash: 16 hex digits, one big-endian 64-bit number, which sorts as the text does.
assert PSEUDONYM_HEX_CHARS == 16


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

    row: np.ndarray  # int32
    item: np.ndarray  # int32: which source item (file), numbered from 1 as seen
    label: np.ndarray  # int32 code into ImageTable.labels
    group: np.ndarray  # >u8: the pseudonym's hash (see `pseudonym`)
    kind: np.ndarray  # int8 code into ImageTable.kinds
    fixed: np.ndarray  # int8 code into SPLITS, NO_SPLIT if the source fixed none
    keyset: np.ndarray  # int32 code into ImageTable.keysets (the image's metadata keys)
    file_key: np.ndarray  # int32 id of the file's digest, -1 for array items (they share their container's)
    pixel_key: np.ndarray  # int32 id of the pixels' digest, numbered after every file id

    def __len__(self) -> int:
        return len(self.row)

    def take(self, keep: np.ndarray) -> Columns:
        return Columns(**{f.name: getattr(self, f.name)[keep] for f in fields(self)})


def digest_ids(digests: np.ndarray) -> tuple[int, np.ndarray]:
    """How many distinct digests, and each one's id (int32) among them.

    An indirect sort and a comparison of neighbours a block at a time, rather
    than `np.unique`, which would copy every digest at the moment memory is fullest.
    """
    order = np.argsort(digests, kind="stable")
    new = np.ones(len(order), dtype=bool)  # where a run of equal digests starts
    block = 1 << 16
    for start in range(0, len(order), block):
        part = digests[order[start : start + block + 1]]
        new[start + 1 : start + len(part)] = part[1:] != part[:-1]
    ids = np.empty(len(order), dtype=np.int32)
    ids[order] = np.cumsum(new, dtype=np.int32) - 1
    return int(new.sum()), ids


class ImageTable:
    """Decoded images as appended by the decode loop: columns in memory, manifest fields in the spill."""

    def __init__(self, folder: Path):
        # Unnamed where the system allows: nothing is left behind, whatever happens to the process.
        self._spill = tempfile.TemporaryFile("w+", encoding="utf-8", newline="\n", dir=folder, prefix=".ingest-",
                                             suffix=".tmp")
        self.labels, self.kinds, self.keysets = Codes(), Codes(), Codes()
        self._item, self._label, self._keyset = array("i"), array("i"), array("i")
        self._kind, self._fixed, self._has_file = array("b"), array("b"), array("b")
        self._group, self._file, self._pixels = bytearray(), bytearray(), bytearray()

    def __len__(self) -> int:
        return len(self._item)

    def append(self, item: int, label: str, group: str, kind: str, fixed: str | None, file_digest: bytes | None,
               pixel_digest: bytes, record: Record) -> None:
        if not (group.startswith(PSEUDONYM_PREFIX) and len(group) == len(PSEUDONYM_PREFIX) + 16
                and len(pixel_digest) == DIGEST):
            raise ValueError("a group must be a pseudonym and a pixel hash a sha256 digest")
        self._item.append(item)
        self._label.append(self.labels(label))
        self._kind.append(self.kinds(kind))
        self._keyset.append(self.keysets(tuple(sorted(record.metadata))))
        self._fixed.append(NO_SPLIT if fixed is None else SPLITS.index(fixed))
        self._group += bytes.fromhex(group[len(PSEUDONYM_PREFIX):])
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
        file_digests = np.frombuffer(self._file, f"S{DIGEST}")
        if has_file.all():  # the usual case: no copy of the digests
            files, file_key = digest_ids(file_digests)
        else:
            files, ids = digest_ids(file_digests[has_file])
            file_key = np.full(n, -1, dtype=np.int32)
            file_key[has_file] = ids
        del file_digests
        self._file = bytearray()  # the ids say all the split needs of the digests
        _, pixel_key = digest_ids(np.frombuffer(self._pixels, f"S{DIGEST}"))
        self._pixels = bytearray()
        return Columns(
            row=np.arange(n, dtype=np.int32), item=np.frombuffer(self._item, np.int32),
            label=np.frombuffer(self._label, np.int32), group=np.frombuffer(self._group, ">u8"),
            kind=np.frombuffer(self._kind, np.int8), fixed=np.frombuffer(self._fixed, np.int8),
            keyset=np.frombuffer(self._keyset, np.int32), file_key=file_key, pixel_key=pixel_key + files,
        )

    @staticmethod
    def pseudonym(group: np.integer) -> str:
        """The pseudonym whose hash a group column holds."""
        return f"{PSEUDONYM_PREFIX}{int(group):016x}"

    def records(self, rows: Iterable[int] | None = None) -> Iterator[tuple[int, Record]]:
        """(row, record) for the given rows (ascending), or every row, read back from the spill in order."""
        self._spill.seek(0)
        lines = enumerate(self._spill)
        if rows is None:
            for row, line in lines:
                yield row, Record(*json.loads(line))
            return
        for wanted in rows:
            for row, line in lines:
                if row == wanted:
                    yield row, Record(*json.loads(line))
                    break

    def lookup(self, rows: Iterable[int]) -> dict[int, Record]:
        """The records of a few rows (copies, conflicts) by row."""
        return dict(self.records(sorted(set(int(r) for r in rows))))

    def close(self) -> None:
        self._spill.close()
