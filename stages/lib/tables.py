"""The pipeline's TSV tables, read one way: tab-separated, UTF-8, quoting off
(a key may start with a quote character: it is data, not a quote), keys kept
as strings ("NA" stays a key, not a missing value)."""
from __future__ import annotations

import contextlib
import csv
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

KEY_COLUMNS = ("key", "key_a", "key_b")


def read_table(path: str | Path, **kwargs) -> pd.DataFrame:
    """A table written by a stage (header line, no quoting); ``kwargs`` go to
    pandas (``chunksize`` streams it, ``usecols``, or ``header=None, names=``
    for a raw file). A column of ``dtype=str`` keeps every column text."""
    kwargs.setdefault("dtype", dict.fromkeys(KEY_COLUMNS, str))
    return pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False, encoding="utf-8", **kwargs)


def read_headerless(path: str | Path, names: list[str]) -> pd.DataFrame:
    """A small raw-data TSV without a header (breeds, truth, test labels) as strings."""
    return pd.read_csv(path, sep="\t", header=None, names=names, dtype=str, quoting=csv.QUOTE_NONE,
                       keep_default_na=False, na_filter=False, encoding="utf-8")


def read_truth(path: str | Path) -> pd.Series:
    """``key<TAB>true breed`` (or "distractor") as a Series indexed by key
    (the sample's ``truth.tsv``; the first line of a repeated key wins)."""
    return read_headerless(path, ["key", "breed"]).drop_duplicates("key").set_index("key")["breed"]


def write_table(df: pd.DataFrame, path: str | Path | BinaryIO) -> None:
    """A stage's table: header plus rows, tab-separated, no quoting (decode
    lets only keys without tabs, line ends or quotes through), floats rounded
    to 4 decimals. Vectorised with pyarrow: pandas' to_csv formats each value
    in Python (seconds per million rows). The one writer of every table that
    :func:`read_table` reads."""
    cols = []
    for name in df.columns:
        col = pa.array(df[name])
        if pa.types.is_floating(col.type):
            col = pc.round(col, 4)
        cols.append(col.cast(pa.string()))
    with (contextlib.nullcontext(path) if hasattr(path, "write") else open(path, "wb")) as f:
        f.write(("\t".join(df.columns) + "\n").encode())
        for start in range(0, len(df), 1 << 20):  # slices: 32-bit string offsets
            part = [c.slice(start, 1 << 20) for c in cols]
            # a missing value (NaN, None) is an empty cell: the default would drop the whole row
            lines = pc.binary_join_element_wise(*part, pa.scalar(""), "\t",  # a trailing tab ...
                                                null_handling="replace")
            lines = pc.utf8_replace_slice(lines, -1, 2**31 - 1, "\n")      # ... becomes the newline
            offsets = np.frombuffer(lines.buffers()[1], np.int32)[lines.offset:lines.offset + len(lines) + 1]
            f.write(memoryview(lines.buffers()[2])[offsets[0]:offsets[-1]])  # the rows, back to back
