"""The pipeline's TSV tables, read one way: tab-separated, UTF-8, quoting off
(a key may start with a quote character: it is data, not a quote), keys kept
as strings ("NA" stays a key, not a missing value)."""
from __future__ import annotations

import codecs
import contextlib
import csv
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

KEY_COLUMNS = ("key", "key_a", "key_b")


def read_table(path: str | Path, **kwargs) -> pd.DataFrame:
    """A table written by a stage (header line, no quoting); ``kwargs`` go to
    pandas (``chunksize`` streams it, ``usecols``, or ``header=None, names=``
    for a raw file). A column of ``dtype=str`` keeps every column text."""
    kwargs.setdefault("dtype", dict.fromkeys(KEY_COLUMNS, str))
    return pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False, encoding="utf-8", **kwargs)


def read_headerless(path: str | Path, names: list[str]) -> pd.DataFrame:
    """A small raw-data TSV without a header (breeds, truth, test labels) as
    strings, indexed by line number (1-based: what an error about a row names).

    Every line must hold exactly ``len(names)`` tab-separated fields: pandas
    with ``names=`` silently made the first of three columns the index (keys
    then read as breed names and nothing matched) and filled a missing one
    with "". Empty lines hold no row and are skipped (as pandas did); a CRLF
    line end and a UTF-8 BOM are not data. Python per line, not pandas: a
    few hundred ms for a 100k-line ``truth.tsv``, and the line of the first
    bad row is known."""
    path = Path(path)
    lines: list[int] = []
    rows: list[list[str]] = []
    with open(path, "rb") as f:
        # only LF ends a line (as in the click log reader): a lone CR stays in its field, where a
        # breed name check refuses it (pandas ended a line there: the row before it lost its breed)
        for number, raw in enumerate(f, 1):
            line = raw.removesuffix(b"\n").removesuffix(b"\r")
            if number == 1:
                line = line.removeprefix(codecs.BOM_UTF8)
            if not line:
                continue
            try:
                fields = line.decode("utf-8").split("\t")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path} line {number}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
            if len(fields) != len(names):
                raise ValueError(f"{path} line {number}: {len(fields)} tab-separated fields, expected "
                                 f"{len(names)} ({'<TAB>'.join(names)})")
            lines.append(number)
            rows.append(fields)
    columns = dict(zip(names, zip(*rows))) if rows else dict.fromkeys(names, ())
    return pd.DataFrame(columns, index=pd.Index(lines, dtype=np.int64, name="line"), dtype=str)


# Breed names travel far: into reports/live/plots/*.json, from there unescaped
# into the HTML page that `dvc plots show` writes (a "</script>" in a name
# ends the page's script element, whatever JSON quoting it has), into
# matplotlib titles and tick labels (an even number of "$" is mathtext, and
# a bad expression raises at savefig), and into TSV tables written without
# quoting. So a name is refused, never escaped, at every reader that brings
# one in (breeds.tsv, test_labels.tsv, a model file's classes):
# - < > & : HTML markup and entities;
# - " ' ` : string and attribute delimiters of HTML and JavaScript. No real
#   breed name needs one (none of the sample's, ImageNet's or Stanford
#   Dogs' 120 hold an apostrophe: "St. Bernard", "Shih-Tzu"), and a name
#   that is safe inside JSON today is not safe in the next page template;
# - $ \ : matplotlib mathtext and escapes;
# - non-printable characters: tabs, line ends and NUL break the TSV tables,
#   control and invisible format characters (zero width, bidi overrides)
#   make names that look alike but differ;
# - leading or trailing white space: an invisible twin of another name.
# Letters of any script, digits, spaces, "-", ".", ",", "(" and ")" pass.
MAX_BREED_CHARS = 100
BREED_NAME_FORBIDDEN = frozenset("<>&\"'`$\\")


def check_breed_name(name: str, where: str) -> None:
    """Raise ValueError (starting with ``where``: a file and line) unless
    ``name`` is a breed name the reports can show as it is (see above)."""
    problem = None
    if not isinstance(name, str) or not name:
        problem = "is empty or not text"
    elif len(name) > MAX_BREED_CHARS:
        problem = f"has more than {MAX_BREED_CHARS} characters"
    elif not name.isprintable():
        problem = "holds a tab, line end, control or invisible character"
    elif bad := sorted(BREED_NAME_FORBIDDEN.intersection(name)):
        problem = f"holds {''.join(bad)!r}"
    elif name != name.strip():
        problem = "starts or ends with white space"
    if problem is not None:
        shown = name[:MAX_BREED_CHARS] + "..." if isinstance(name, str) and len(name) > MAX_BREED_CHARS else name
        raise ValueError(f"{where}: breed name {shown!r} {problem}; a breed name is 1 to {MAX_BREED_CHARS} "
                         f"printable characters without {' '.join(sorted(BREED_NAME_FORBIDDEN))}")


def check_breed_column(df: pd.DataFrame, column: str, path: str | Path) -> None:
    """:func:`check_breed_name` on each row of a :func:`read_headerless`
    frame; the first bad one is named by its line. Each distinct name once
    (first rows, in file order: the first bad one is the file's first)."""
    for line, name in df[column].drop_duplicates().items():
        check_breed_name(name, f"{path} line {line}")


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


def read_breeds(path: str | Path) -> list[str]:
    """Breed names of ``breed<TAB>label`` ordered by label (the class
    vocabulary); each name one that reports can show (``check_breed_name``)."""
    df = read_headerless(path, ["breed", "label"])
    if df.empty:
        raise ValueError(f"{path}: no breeds; every line must be 'breed<TAB>integer label'")
    labels = pd.to_numeric(df["label"], errors="coerce")
    not_integer = labels.isna() | (labels % 1 != 0)
    if not_integer.any():
        line = not_integer.idxmax()
        raise ValueError(f"{path} line {line}: label {df.loc[line, 'label']!r} is not an integer; "
                         f"every line must be 'breed<TAB>integer label'")
    check_breed_column(df, "breed", path)
    for column, values in (("breed", df["breed"]), ("label", labels)):  # "1" and "1.0" are one label
        repeated = values.duplicated()
        if repeated.any():
            line = repeated.idxmax()
            raise ValueError(f"{path} line {line}: {column} {df.loc[line, column]!r} is given twice; "
                             f"breed names and labels must be unique")
    return df.assign(label=labels).sort_values("label")["breed"].tolist()


def read_train_keys(index_path: str | Path) -> pa.Array:
    """Distinct keys of the decoded training images (``split == "train"``)."""
    index = pq.read_table(index_path, columns=["key", "split"])
    keys = index.filter(pc.equal(index["split"].cast(pa.string()), "train"))["key"]
    return pc.unique(keys.cast(pa.string())) if len(keys) else pa.array([], pa.string())
