"""The pipeline's TSV tables, read one way: tab-separated, UTF-8, quoting off
(a key may start with a quote character: it is data, not a quote), keys kept
as strings ("NA" stays a key, not a missing value)."""
from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd

KEY_COLUMNS = ("key", "key_a", "key_b")


def read_table(path: str | Path) -> pd.DataFrame:
    """A table written by a stage (header line, no quoting)."""
    return pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, dtype=dict.fromkeys(KEY_COLUMNS, str),
                       keep_default_na=False, encoding="utf-8")


def read_headerless(path: str | Path, names: list[str]) -> pd.DataFrame:
    """A small raw-data TSV without a header (breeds, truth, test labels) as strings."""
    return pd.read_csv(path, sep="\t", header=None, names=names, dtype=str, quoting=csv.QUOTE_NONE,
                       keep_default_na=False, na_filter=False, encoding="utf-8")


def read_truth(path: str | Path) -> pd.Series:
    """``key<TAB>true breed`` (or "distractor") as a Series indexed by key
    (the sample's ``truth.tsv``; the first line of a repeated key wins)."""
    return read_headerless(path, ["key", "breed"]).drop_duplicates("key").set_index("key")["breed"]
