"""Reading a Clickture click log (``key<TAB>query<TAB>clicks``) into clicks
per (image, query class), streamed, with malformed lines counted by reason
(the numpy counting core is ``keyagg``; breeds.tsv and the decoded keys are
read by ``tables``).

The log is read in blocks (pyarrow's streaming CSV reader), so memory grows
with the per-(image, breed) aggregate, the distinct queries and 8 bytes per
distinct (key, query) line (the duplicate count), never with the log's size in
bytes.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from tqdm import tqdm

from stages.lib.keyagg import Aggregate, KeyTable
from stages.lib.queries import MULTIPLE_BREEDS, NO_BREED, BreedMatcher

log = logging.getLogger(__name__)

# Why a log line is malformed (index 0 of the per-row code means "valid").
MALFORMED_REASONS = ("wrong_column_count", "empty_line", "invalid_utf8", "empty_key",
                     "bad_clicks", "nonpositive_clicks", "invalid_key", "too_many_clicks", "line_too_long")
(_WRONG_COLUMNS, _EMPTY_LINE, _BAD_UTF8, _EMPTY_KEY, _BAD_CLICKS, _NONPOSITIVE, _BAD_KEY, _TOO_MANY,
 _TOO_LONG) = range(1, 10)
# what an over-long line reads as (see _LineEnds): a NUL in a key is invalid anywhere else
_TOO_LONG_ROW = b"\x00line_too_long\t\t0"
# every (image, class) sum is at most the log's total: kept below this, no int64 sum can overflow
_MAX_TOTAL_CLICKS = 2**62
# decode's key rule (decoding.valid_key), vectorised: no quote or control character, at most 256 characters
_BAD_KEY_CHARS = r'["\x00-\x1f\x7f]'
_EXAMPLES = 5  # malformed lines quoted per reason in the report


# --------------------------------------------------------------------- the click log
@dataclass
class ClickLogSummary:
    """What :func:`aggregate_clicks` saw: line counts, malformed lines, queries."""

    lines: int = 0
    valid_lines: int = 0
    duplicate_lines: int = 0  # valid lines repeating an earlier (key, query): clicks summed
    malformed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MALFORMED_REASONS, 0))
    malformed_examples: dict[str, list[str]] = field(default_factory=dict)
    queries: dict[str, Any] = field(default_factory=dict)

    @property
    def malformed_fraction(self) -> float:
        return sum(self.malformed.values()) / self.lines if self.lines else 0.0

    def note_malformed(self, reason: str, texts: Iterable[str]) -> None:
        examples = self.malformed_examples.setdefault(reason, [])
        for text in texts:
            if len(examples) >= _EXAMPLES:
                break
            examples.append(text[:200])


class _QueryTable:
    """Distinct queries -> id, breed code and line/click counts.

    A block looks up only its own distinct queries (pyarrow dictionary
    encoding). A new query is classified through a cache keyed by the query
    with its whitespace-separated numbers removed (vectorised): the normaliser
    drops such numbers anyway, and a log's long tail ("pug 1920 1080",
    "pug 2013", ...) then costs one classification."""

    _NUMBERS = r"(^|\s)[0-9]+(\s[0-9]+)*(\s|$)"

    def __init__(self, matcher: BreedMatcher) -> None:
        self.matcher = matcher
        self.ids: dict[str, int] = {}
        self.texts: list[str] = []
        self.codes = np.zeros(1024, np.int16)
        self.lines = np.zeros(1024, np.int64)
        self.clicks = np.zeros(1024, np.int64)
        self._cache: dict[str, int] = {}
        # a vocabulary word made of digits would be removed with the numbers
        self._strip_numbers = not any(w.isdigit() for w in matcher.vocabulary)

    def encode(self, query: pa.Array, clicks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (query id, breed code) per row and count the block's lines."""
        enc = pc.dictionary_encode(query)
        local = enc.dictionary.to_pylist()
        n_old, ids = len(self.ids), self.ids
        # setdefault(q, len(ids)): a new query gets the next id, a known one keeps its own
        lut = np.fromiter((ids.setdefault(q, len(ids)) for q in local), np.int64, len(local))
        new = np.flatnonzero(lut >= n_old)  # in id order: ids are handed out in this order
        if len(new):
            self._grow(len(ids))
            self.texts.extend(local[i] for i in new)
            texts = enc.dictionary.take(pa.array(new))
            if self._strip_numbers:
                texts = pc.replace_substring_regex(texts, self._NUMBERS, " ")
            self.codes[lut[new]] = [self._classify(t) for t in texts.to_pylist()]
        idx = enc.indices.to_numpy()
        # lut holds distinct ids (a dictionary is unique), so += cannot collide
        self.lines[lut] += np.bincount(idx, minlength=len(lut))
        self.clicks[lut] += np.bincount(idx, weights=clicks, minlength=len(lut)).astype(np.int64)
        return lut[idx], self.codes[lut][idx]

    def _classify(self, text: str) -> int:
        code = self._cache.get(text)
        if code is None:
            code = self._cache[text] = self.matcher.classify(text)
        return code

    def _grow(self, n: int) -> None:
        old = len(self.codes)
        if n > old:
            size = max(n, 2 * old)
            self.codes, self.lines, self.clicks = (np.concatenate([a, np.zeros(size - old, a.dtype)])
                                                   for a in (self.codes, self.lines, self.clicks))

    def summary(self, top: int = 10) -> dict[str, Any]:
        n = len(self.texts)
        codes, lines, clicks = self.codes[:n], self.lines[:n], self.clicks[:n]
        out: dict[str, Any] = {"distinct": n}
        for name, sel in (("one_breed", codes >= 0), ("no_breed", codes == NO_BREED),
                          ("multiple_breeds", codes == MULTIPLE_BREEDS)):
            order = np.flatnonzero(sel)[np.argsort(-lines[sel], kind="stable")][:top]
            out[name] = {"queries": int(sel.sum()), "lines": int(lines[sel].sum()),
                         "clicks": int(clicks[sel].sum()),
                         "top": [[self.texts[i], int(lines[i])] for i in order]}
        return out


class _LineEnds:
    """A binary file whose CRLF line ends read as LF, whose lone CR reads as
    NUL, and whose lines longer than ``max_line`` bytes read as one short
    marker row. pyarrow's CSV parser also ends a line at a lone CR, so
    ``a<CR>b<TAB>pug<TAB>3`` credited key ``b``; as ``a<NUL>b`` the key is
    invalid and the line is counted as malformed (``invalid_key``). A line
    longer than the parser's block stops the parser: as the marker it is
    counted (``line_too_long``) and the read goes on. Only whole lines are
    handed on; the incomplete last one waits (at most ``max_line`` bytes)."""

    def __init__(self, f: BinaryIO, max_line: int) -> None:
        self.f, self.closed, self.max_line = f, False, max_line
        self.tail = b""  # the start of a line whose end has not been read yet
        self.skipping = False  # inside an over-long line: drop bytes up to its end

    def read(self, n: int = -1) -> bytes:
        while True:
            data = self.f.read(n) if n is not None and n >= 0 else self.f.read()
            if data.endswith(b"\r"):
                data += self.f.read(1)  # the LF of a CRLF that a read boundary split
            if not data:  # the end: a last line without a newline
                last = _TOO_LONG_ROW if self.skipping else self.tail
                self.tail, self.skipping = b"", False
                return last
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\x00")
            end = data.rfind(b"\n")
            if end < 0:  # no line ends here
                if not self.skipping:
                    self.tail += data
                    if len(self.tail) > self.max_line:
                        self.tail, self.skipping = b"", True
                continue
            whole, rest = data[:end + 1], data[end + 1:]
            if self.skipping:  # the end of an over-long line
                whole = _TOO_LONG_ROW + whole[whole.find(b"\n"):]
            else:
                whole = self.tail + whole
            self.tail, self.skipping = (b"", True) if len(rest) > self.max_line else (rest, False)
            return _mark_long_lines(whole, self.max_line)

    def tell(self) -> int:
        return self.f.tell()


def _mark_long_lines(data: bytes, max_line: int) -> bytes:
    """``data`` (whole lines) with each line over ``max_line`` bytes as the marker row."""
    ends = np.flatnonzero(np.frombuffer(data, np.uint8) == ord("\n"))
    starts = np.r_[0, ends[:-1] + 1]
    long = np.flatnonzero(ends - starts > max_line)
    if not len(long):  # the usual case: one vectorised check
        return data
    parts, at = [], 0
    for i in long:
        parts += [data[at:starts[i]], _TOO_LONG_ROW]
        at = ends[i]
    return b"".join([*parts, data[at:]])


def _read_blocks(path: Path, summary: ClickLogSummary, block_size: int, progress: bool,
                 max_line: int) -> Iterator[pa.RecordBatch]:
    """Stream the log as binary columns; count lines with a wrong column count.

    Binary, not string, so that one non-UTF-8 line is a malformed line, not a
    failed read. No quoting: a quote character is data in these logs."""
    def on_invalid(row: pacsv.InvalidRow) -> str:
        reason = MALFORMED_REASONS[_WRONG_COLUMNS - 1]
        summary.lines += 1
        summary.malformed[reason] += 1
        summary.note_malformed(reason, [repr(row.text)])
        return "skip"

    # One thread: the handler above then sees bad lines in file order, so the
    # report's examples are reproducible (and threads did not read faster here).
    read = pacsv.ReadOptions(column_names=["key", "query", "clicks"], block_size=block_size, use_threads=False)
    parse = pacsv.ParseOptions(delimiter="\t", quote_char=False, escape_char=False, double_quote=False,
                               ignore_empty_lines=False, invalid_row_handler=on_invalid)
    convert = pacsv.ConvertOptions(column_types=dict.fromkeys(["key", "query", "clicks"], pa.binary()),
                                   null_values=[], strings_can_be_null=False)
    if path.stat().st_size == 0:  # pyarrow refuses an empty file; an empty log is just empty
        return
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                      desc="clicks", disable=not progress) as bar:
        try:
            reader = pacsv.open_csv(pa.PythonFile(_LineEnds(f, max_line), mode="r"), read_options=read,
                                    parse_options=parse, convert_options=convert)
            for batch in reader:
                bar.update(f.tell() - bar.n)
                yield batch
        except pa.ArrowInvalid as err:  # e.g. one line longer than a block
            raise ValueError(f"{path}: cannot parse the click log ({err}; block size {block_size} bytes)") from err


def _utf8_ok(col: pa.Array) -> np.ndarray:
    """Per-row UTF-8 validity; only non-ASCII rows (rare) are checked one by one."""
    ok = pc.string_is_ascii(col.view(pa.string())).to_numpy(zero_copy_only=False)
    rest = np.flatnonzero(~ok)
    if len(rest):
        try:  # usually all valid: one vectorised check
            col.take(rest).view(pa.string()).validate(full=True)
            ok[rest] = True
        except pa.ArrowInvalid:
            for i, value in zip(rest, col.take(rest).to_pylist()):
                try:
                    value.decode("utf-8")
                    ok[i] = True
                except UnicodeDecodeError:
                    pass
    return ok


def _check_rows(batch: pa.RecordBatch, summary: ClickLogSummary,
                max_clicks: int) -> tuple[pa.Array, pa.Array, np.ndarray]:
    """Validate a block: return the valid rows' key, query (strings) and clicks."""
    key, query, clicks = batch.columns
    n = len(batch)
    utf8 = _utf8_ok(key) & _utf8_ok(query) & _utf8_ok(clicks)
    lens = [pc.binary_length(c).to_numpy() for c in batch.columns]
    # clicks: an integer >= 1, at most 18 digits (int64); white space around is tolerated
    text = pc.utf8_trim_whitespace(pc.if_else(pa.array(utf8), clicks, b"").view(pa.string()))
    is_int = pc.match_substring_regex(text, r"^-?[0-9]{1,18}$").to_numpy(zero_copy_only=False)
    values = pc.cast(pc.if_else(pa.array(is_int), text, "0"), pa.int64()).to_numpy()
    # the first matching reason wins: later np.where calls overwrite earlier ones
    code = np.where(is_int & (values > max_clicks), _TOO_MANY, 0)
    code = np.where(is_int & (values <= 0), _NONPOSITIVE, code)
    code = np.where(~is_int, _BAD_CLICKS, code)
    key_text = pc.if_else(pa.array(utf8), key, b"").view(pa.string())
    bad_key = pc.match_substring_regex(key_text, _BAD_KEY_CHARS).to_numpy(zero_copy_only=False)
    bad_key |= pc.utf8_length(key_text).to_numpy() > 256
    code = np.where(bad_key, _BAD_KEY, code)
    code = np.where(pc.equal(key, pa.scalar(_TOO_LONG_ROW.split(b"\t")[0], pa.binary())).to_numpy(
        zero_copy_only=False), _TOO_LONG, code)
    code = np.where(lens[0] == 0, _EMPTY_KEY, code)
    code = np.where(~utf8, _BAD_UTF8, code)
    code = np.where((lens[0] == 0) & (lens[1] == 0) & (lens[2] == 0), _EMPTY_LINE, code)
    summary.lines += n
    bad = np.flatnonzero(code)
    if len(bad):
        counts = np.bincount(code[bad], minlength=len(MALFORMED_REASONS) + 1)
        for c in np.flatnonzero(counts):
            reason = MALFORMED_REASONS[c - 1]
            summary.malformed[reason] += int(counts[c])
            rows = batch.take(bad[code[bad] == c][:_EXAMPLES]).to_pylist()
            summary.note_malformed(reason, [repr(b"\t".join(r.values())) for r in rows])
    good = pa.array(code == 0)
    summary.valid_lines += n - len(bad)
    return (key.filter(good).view(pa.string()), query.filter(good).view(pa.string()),
            values[code == 0])


def aggregate_clicks(
    path: str | Path,
    matcher: BreedMatcher,
    *,
    max_clicks: int = 10**9,
    max_line_bytes: int | None = None,
    block_size: int = 4 << 20,
    progress: bool = False,
) -> tuple[pd.DataFrame, ClickLogSummary]:
    """Stream a ``key<TAB>query<TAB>clicks`` log into clicks per (image, query class).

    Malformed lines (see :data:`MALFORMED_REASONS`) are counted in the summary
    and skipped: among them lines of more than ``max_clicks`` clicks
    (``too_many_clicks``) and lines longer than ``max_line_bytes`` (default:
    what fits in a parser block; ``line_too_long``). Duplicate (key, query) lines are summed
    and counted; the sums are checked (a log whose clicks total 2**62 or more
    is refused rather than summed past int64).

    Returns:
        A DataFrame with one row per (key, breed), sorted by key and breed:
        ``key`` (a Categorical with sorted categories: the strings once),
        ``breed`` the breed code (index into ``matcher.breeds``) or
        ``NO_BREED`` / ``MULTIPLE_BREEDS`` for the clicks under queries naming
        no or several breeds, ``clicks`` = ``c[i, b]``. And the
        :class:`ClickLogSummary`.
    """
    if len(matcher.breeds) > 0xFFFF - 3:
        raise ValueError("at most 65532 breeds")  # the class code is packed into 16 bits
    max_line = block_size - 2 if max_line_bytes is None else max_line_bytes  # a row must fit in a block
    if not 0 < max_clicks <= 10**12:
        raise ValueError(f"max_clicks must be in [1, 10**12], got {max_clicks}")
    if not 0 < max_line < block_size:
        raise ValueError(f"max_line_bytes must be in [1, block_size), got {max_line} (block {block_size})")
    path = Path(path)
    summary = ClickLogSummary()
    queries, keys, agg = _QueryTable(matcher), KeyTable(), Aggregate()
    total = 0
    for batch in _read_blocks(path, summary, block_size, progress, max_line):
        key, query, clicks = _check_rows(batch, summary, max_clicks)
        total += int(clicks.sum())  # a block: < 1M lines of <= 10**12 clicks, no overflow
        if total >= _MAX_TOTAL_CLICKS:
            raise ValueError(f"{path}: the clicks total {total} by line {summary.lines}, past what int64 sums "
                             f"hold (2**62): lower filter.max_clicks_per_line ({max_clicks}) or split the log")
        if len(key):
            qid, code = queries.encode(query, clicks)
            agg.add(keys.encode(key), qid, code, clicks)
    kid, code, clicks, distinct = agg.result()
    summary.duplicate_lines = summary.valid_lines - distinct
    summary.queries = queries.summary()
    sorted_keys, rank = keys.sorted_keys()
    kid = rank[kid]
    order = np.lexsort((code, kid))
    categories = pd.Index(sorted_keys.to_pandas())  # Arrow-backed strings: no Python object per key
    return pd.DataFrame({
        "key": pd.Categorical.from_codes(kid[order], categories=categories, validate=False),
        "breed": code[order].astype(np.int16), "clicks": clicks[order]}), summary


# --------------------------------------------------------------- the filter
