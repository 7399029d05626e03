"""Image shards: a few large files of concatenated JPEG bytes plus an index.

One file per image would mean millions of tiny files for the real data (slow
to list, hash and cache in DVC); a shard is one file that DVC hashes once and
that a reader addresses by (shard, offset, length) from ``index.parquet``.

Writing side (decode stage): :class:`ShardWriter` and :class:`IndexWriter`.
Reading side (training, evaluation): :func:`read_index` and :class:`ShardReader`.
"""
from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from stages.lib.layout import INDEX

SHARD_NAME = "shard-{:05d}.bin"

INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("split", pa.string()),
        ("shard", pa.int32()),
        ("offset", pa.int64()),
        ("length", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)


def shard_path(images_dir: str | Path, shard: int) -> Path:
    """Path of shard number ``shard``; the name comes from the number only,
    never from a key, so untrusted keys cannot become file names."""
    return Path(images_dir) / SHARD_NAME.format(int(shard))


class ShardWriter:
    """Append blobs to ``shard-00000.bin``, ``shard-00001.bin``, ...

    A new shard starts when the next blob would push the current one past
    ``max_bytes`` (a blob larger than ``max_bytes`` gets a shard of its own).
    """

    def __init__(self, out_dir: str | Path, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
        self.out_dir = Path(out_dir)
        self.max_bytes = int(max_bytes)
        self.shard = -1
        self.bytes_written = 0
        self._size = 0
        self._file: io.BufferedWriter | None = None

    @property
    def n_shards(self) -> int:
        return self.shard + 1

    def write(self, data: bytes) -> tuple[int, int]:
        """Append ``data``; return its (shard, offset)."""
        if self._file is None or (self._size and self._size + len(data) > self.max_bytes):
            self._roll()
        assert self._file is not None
        offset = self._size
        self._file.write(data)
        self._size += len(data)
        self.bytes_written += len(data)
        return self.shard, offset

    def _roll(self) -> None:
        self.close()
        self.shard += 1
        self._size = 0
        # "x": the output folder is fresh, so an existing shard means a bug.
        self._file = open(shard_path(self.out_dir, self.shard), "xb", buffering=1 << 20)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class IndexWriter:
    """Stream index rows into ``index.parquet`` in row groups, so that the
    index of 40M images never has to sit in memory."""

    def __init__(self, path: str | Path, rows_per_group: int = 65536, *, breeds: bool = False) -> None:
        # breeds: a ``breed`` column (the image file's own label column); without it the
        # schema, and so the file, is what it was before the column existed
        self._schema = INDEX_SCHEMA.append(pa.field("breed", pa.string())) if breeds else INDEX_SCHEMA
        self._writer = pq.ParquetWriter(str(path), self._schema)
        self._rows_per_group = rows_per_group
        self._cols: dict[str, list[Any]] = {name: [] for name in self._schema.names}
        self.rows = 0

    def add(self, key: str, split: str, shard: int, offset: int, length: int,
            width: int, height: int, breed: str | None = None) -> None:
        for name, value in zip(self._schema.names,
                               (key, split, shard, offset, length, width, height, breed)):
            self._cols[name].append(value)
        self.rows += 1
        if len(self._cols["key"]) >= self._rows_per_group:
            self._flush()

    def _flush(self) -> None:
        if self._cols["key"]:
            self._writer.write_table(pa.Table.from_pydict(self._cols, schema=self._schema))
            self._cols = {name: [] for name in self._schema.names}

    def close(self) -> None:
        """Write the last row group; an index with no rows still has the schema."""
        self._flush()
        self._writer.close()

    def __enter__(self) -> IndexWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_index(images_dir: str | Path) -> pd.DataFrame:
    """The index of a decoded image folder: one row per image with key, split,
    shard, offset, length, width, height (in decode order), and ``breed`` where
    the image file had a breed column (decode.columns)."""
    return pd.read_parquet(Path(images_dir) / INDEX)


def index_rows(index: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """The index rows of ``keys``, in their order, indexed by key (the first
    row of a key given twice); KeyError naming the keys that have none."""
    rows = index.drop_duplicates("key").set_index("key")
    missing = [k for k in keys if k not in rows.index]
    if missing:
        raise KeyError(f"{len(missing)} keys have no decoded image, e.g. {missing[:3]}")
    return rows.loc[list(keys)]


def _field(row: Any, name: str) -> Any:
    # Accept a pandas row/dict (row["shard"]) and an itertuples() namedtuple.
    try:
        return row[name]
    except (TypeError, KeyError, IndexError):
        return getattr(row, name)


class ShardReader:
    """Random access to the JPEG bytes of a decoded image folder.

    File descriptors open lazily and belong to the process that opened them:
    after a fork (torch DataLoader workers) or an unpickle (spawn), the reader
    opens its own, so one reader object can be handed to a Dataset. Reads use
    ``os.pread``, which has no shared file position, so threads may share it.
    """

    def __init__(self, images_dir: str | Path) -> None:
        self.images_dir = Path(images_dir)
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():
            # Inherited descriptors are the parent's; drop our copies.
            self.close()
            self._pid = os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = os.open(shard_path(self.images_dir, shard), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            self._fds[shard] = fd
        return fd

    def read(self, shard: int, offset: int, length: int) -> bytes:
        """The ``length`` bytes at ``offset`` of shard number ``shard``."""
        data = os.pread(self._fd(int(shard)), int(length), int(offset))
        if len(data) != length:
            raise OSError(f"{shard_path(self.images_dir, shard)}: short read at {offset} "
                          f"({len(data)} of {length} bytes); index and shards disagree")
        return data

    def open_image(self, row: Any) -> Image.Image:
        """Decode the image of an index row (Series, dict or namedtuple) as RGB."""
        data = self.read(_field(row, "shard"), _field(row, "offset"), _field(row, "length"))
        img = Image.open(io.BytesIO(data), formats=["JPEG"])
        img.load()
        return img if img.mode == "RGB" else img.convert("RGB")  # decode writes RGB: skip the copy

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = {}

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if self._pid == os.getpid():
            self.close()

    def __getstate__(self) -> dict[str, Any]:
        # Descriptors are per-process: never pickle them.
        return {"images_dir": self.images_dir}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["images_dir"])
