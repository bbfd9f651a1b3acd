"""Per-row values a run holds for every row (a corpus's prompts, their token ids, corpus index and
own limits) kept in unnamed temporary files and read back by offset (`os.pread`) a row or a
micro-batch at a time: the driver holds none of them, however many rows there are, bar the last
`FLUSH` bytes appended. The files go with the object (or the process)."""

from __future__ import annotations

import array
import os
import tempfile

import numpy as np


def _flat_index(i: int, n: int) -> int:
    if not -n <= i < n:
        raise IndexError(i)
    return i % n


class PackedRows:
    """Variable-length rows: token ids (`kind="ids"`: each read back as an int32 array) or texts
    (`kind="text"`). Their end offsets go to a second file (row i spans offsets i and i + 1)."""

    FLUSH = 1 << 20  # bytes appended before they go to the file

    def __init__(self, kind: str):
        self.kind = kind
        self._data, self._ends = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        self._pending, self._pending_ends = bytearray(), array.array("q", [0])
        self._size = self._rows = 0

    def append(self, row) -> None:
        raw = np.asarray(row, np.int32).tobytes() if self.kind == "ids" else row.encode("utf-8")
        self._pending += raw
        self._size += len(raw)
        self._pending_ends.append(self._size)
        self._rows += 1
        if len(self._pending) >= self.FLUSH:
            self._flush()

    def _flush(self) -> None:
        self._data.write(self._pending)
        self._ends.write(self._pending_ends.tobytes())
        self._data.flush()
        self._ends.flush()
        self._pending, self._pending_ends = bytearray(), array.array("q")

    def __len__(self) -> int:
        return self._rows

    def __getitem__(self, i: int):
        i = _flat_index(i, len(self))
        if self._pending_ends:
            self._flush()
        start, end = np.frombuffer(os.pread(self._ends.fileno(), 16, i * 8), np.int64)
        raw = os.pread(self._data.fileno(), int(end - start), int(start))
        if self.kind == "ids":
            return np.frombuffer(raw, np.int32)
        return raw.decode("utf-8")

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class PackedValues:
    """One fixed-width value per row (a numpy `dtype`): `[i]` one value (a Python number),
    `[a:b]` an array of rows a..b-1, `blocks()` every row a block at a time."""

    FLUSH = 1 << 16  # bytes appended before they go to the file
    BLOCK = 1 << 16  # rows read at a time by `blocks`

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)
        self._file = tempfile.TemporaryFile()
        self._pending = bytearray()
        self._rows = 0

    def append(self, value) -> None:
        self._pending += np.asarray(value, self.dtype).tobytes()
        self._rows += 1
        if len(self._pending) >= self.FLUSH:
            self._flush()

    def _flush(self) -> None:
        self._file.write(self._pending)
        self._file.flush()
        self._pending = bytearray()

    def __len__(self) -> int:
        return self._rows

    def __getitem__(self, key):
        if self._pending:
            self._flush()
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError(f"rows {key}: PackedValues reads contiguous rows only")
            n = max(stop - start, 0)
            raw = os.pread(self._file.fileno(), n * self.dtype.itemsize, start * self.dtype.itemsize)
            return np.frombuffer(raw, self.dtype)
        i = _flat_index(int(key), len(self))
        raw = os.pread(self._file.fileno(), self.dtype.itemsize, i * self.dtype.itemsize)
        return np.frombuffer(raw, self.dtype)[0].item()

    def blocks(self):
        """(first row, values) of every row, `BLOCK` rows at a time."""
        for start in range(0, len(self), self.BLOCK):
            yield start, self[start : start + self.BLOCK]
