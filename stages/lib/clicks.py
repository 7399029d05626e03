"""Click evidence per image and the weak-label filter of filter_clicks.

Notation (used by every docstring here):

* ``i`` an image key, ``b`` a breed (its index in the breed list);
* ``c[i, b]``: clicks on image ``i`` under queries that name breed ``b`` and no
  other breed, summed over those queries and over duplicate log lines;
* ``C[i] = sum_b c[i, b]``: the image's *breed clicks* (queries that name no
  breed or several breeds do not count);
* ``b*[i] = argmax_b c[i, b]``: the top breed; when several breeds share the
  top count there is no ``b*`` (the image is ambiguous);
* ``s[i] = c[i, b*] / C[i]``: the evidence share of the top breed.

An image is **kept** with label ``b*[i]`` when it is a decoded training image,
``b*[i]`` exists, ``c[i, b*] >= min_clicks``, ``s[i] >= min_share`` and
breed ``b*`` keeps at least ``min_images_per_class`` images. Otherwise it is
dropped with the first reason that applies, in the order of
:data:`DROP_REASONS`.

The log is read in blocks (pyarrow's streaming CSV reader), so memory grows
with the per-(image, breed) aggregate, the distinct queries and 8 bytes per
distinct (key, query) line (the duplicate count), never with the log's size in
bytes.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm import tqdm

from stages.lib.queries import MULTIPLE_BREEDS, NO_BREED, BreedMatcher

log = logging.getLogger(__name__)

# Why an image is not kept, in the order the checks apply.
NO_DECODED_IMAGE = "no_decoded_image"  # not among the decoded training images
NO_CLICKS = "no_clicks"                # a training image no valid log line mentions
NO_BREED_QUERY = "no_breed_query"      # clicked only under queries naming no / several breeds
TOO_FEW_CLICKS = "too_few_clicks"      # c[i, b*] < min_clicks
AMBIGUOUS = "ambiguous"                # tie at the top, or s[i] < min_share
CLASS_TOO_SMALL = "class_too_small"    # b* keeps < min_images_per_class images
DROP_REASONS = (NO_DECODED_IMAGE, NO_CLICKS, NO_BREED_QUERY, TOO_FEW_CLICKS, AMBIGUOUS, CLASS_TOO_SMALL)

# Why a log line is malformed (index 0 of the per-row code means "valid").
MALFORMED_REASONS = ("wrong_column_count", "empty_line", "invalid_utf8", "empty_key",
                     "bad_clicks", "nonpositive_clicks")
_WRONG_COLUMNS, _EMPTY_LINE, _BAD_UTF8, _EMPTY_KEY, _BAD_CLICKS, _NONPOSITIVE = range(1, 7)
_EXAMPLES = 5  # malformed lines quoted per reason in the report

DISTRACTOR = "distractor"  # truth.tsv's name for a non-dog image
LABEL_COLUMNS = ["key", "label", "breed", "clicks", "share"]
DROPPED_COLUMNS = ["key", "reason", "breed", "clicks", "share"]


# --------------------------------------------------------------------- readers
def _read_small_tsv(path: str | Path, names: list[str]) -> pd.DataFrame:
    """A small, trusted TSV (no header, no quoting) as strings."""
    return pd.read_csv(path, sep="\t", header=None, names=names, dtype=str, quoting=3,
                       keep_default_na=False, na_filter=False, encoding="utf-8")


def read_breeds(path: str | Path) -> list[str]:
    """Breed names of ``breed<TAB>label`` ordered by label (the class vocabulary)."""
    df = _read_small_tsv(path, ["breed", "label"])
    labels = pd.to_numeric(df["label"], errors="coerce")
    if df.empty or labels.isna().any() or (labels % 1 != 0).any():
        raise ValueError(f"{path}: every line must be 'breed<TAB>integer label'")
    if df["breed"].str.strip().eq("").any() or df["breed"].duplicated().any() or labels.duplicated().any():
        raise ValueError(f"{path}: breed names and labels must be non-empty and unique")
    return df.assign(label=labels).sort_values("label")["breed"].tolist()


def read_train_keys(index_path: str | Path) -> pa.Array:
    """Distinct keys of the decoded training images (``split == "train"``)."""
    index = pq.read_table(index_path, columns=["key", "split"])
    keys = index.filter(pc.equal(index["split"].cast(pa.string()), "train"))["key"]
    return pc.unique(keys.cast(pa.string())) if len(keys) else pa.array([], pa.string())


# ------------------------------------------------------------ the click log
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


def _hash_strings(arr: pa.Array) -> np.ndarray:
    """64-bit hashes of a string array's values, vectorised (no Python object
    per string: a dict or pandas' object hashing costs ~1 us per key here).

    h(s) = mix(len(s) + sum_w mix(word_w XOR seed_w)): ``word_w`` the w-th
    8 bytes of s (little endian, the last one zero padded), ``seed_w`` fixed
    random words, ``mix`` the splitmix64 finaliser. Equal-length strings (the
    usual keys) take a 2-D fast path computing the same function."""
    if not len(arr):
        return np.empty(0, np.uint64)
    buffers = arr.buffers()
    offsets = np.frombuffer(buffers[1], np.int32)[arr.offset:arr.offset + len(arr) + 1].astype(np.int64)
    data = np.frombuffer(buffers[2], np.uint8)[offsets[0]:offsets[-1]] if buffers[2] else np.empty(0, np.uint8)
    start, lens = offsets[:-1] - offsets[0], np.diff(offsets)
    n, nwords = len(arr), (lens + 7) // 8
    seeds = _seeds(int(nwords.max(initial=0)))
    total = np.zeros(n, np.uint64)
    with np.errstate(over="ignore"):
        if n and len(data) and (lens == lens[0]).all():
            width = int(nwords[0])
            padded = np.zeros((n, 8 * width), np.uint8)
            padded[:, :lens[0]] = data.reshape(n, -1)
            total = _mix(padded.view("<u8") ^ seeds[:width]).sum(axis=1, dtype=np.uint64)
        elif len(data):
            first_word = np.cumsum(nwords) - nwords
            pos = np.arange(len(data)) - np.repeat(start, lens)
            word = np.repeat(first_word, lens) + pos // 8  # each byte's word, non-decreasing
            shifted = data.astype(np.uint64) << (8 * (pos % 8)).astype(np.uint64)
            words = np.add.reduceat(shifted, np.flatnonzero(np.r_[True, word[1:] != word[:-1]]))
            mixed = _mix(words ^ seeds[np.arange(len(words)) - np.repeat(first_word, nwords)])
            some = nwords > 0
            total[some] = np.add.reduceat(mixed, first_word[some])
        return _mix(total + lens.astype(np.uint64))


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit flips each output bit with p ~ 1/2."""
    with np.errstate(over="ignore"):
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))


_SEEDS = np.empty(0, np.uint64)


def _seeds(n: int) -> np.ndarray:
    global _SEEDS
    if len(_SEEDS) < n:  # deterministic: the same generator extends the same sequence
        _SEEDS = np.random.default_rng(0x5EED).integers(0, 2**64, max(n, 16), np.uint64, endpoint=False)
    return _SEEDS


class _KeyTable:
    """Image key -> dense integer id, in order of first appearance.

    Keys are found by their 64-bit hash in a sorted array (numpy, no Python
    object per key); each block checks that its keys equal the stored key of
    their hash, so a collision fails loudly instead of merging two images."""

    def __init__(self) -> None:
        self.hashes = np.empty(0, np.uint64)  # sorted
        self.ids = np.empty(0, np.int64)      # id of each sorted hash
        self.keys = pa.array([], pa.string())  # the keys, in id order (one array: take is faster)

    def encode(self, key: pa.Array) -> np.ndarray:
        if not len(key):
            return np.empty(0, np.int64)
        h = _hash_strings(key)
        order = np.argsort(h)
        sorted_h = h[order]
        first = order[np.r_[True, sorted_h[1:] != sorted_h[:-1]]]  # a row of each distinct hash
        uniq = h[first]  # sorted: searchsorted then walks the table in order (cache friendly)
        pos = np.searchsorted(self.hashes, uniq)
        known = (pos < len(self.hashes)) & (self.hashes[np.minimum(pos, len(self.hashes) - 1)] == uniq) \
            if len(self.hashes) else np.zeros(len(uniq), bool)
        new = np.flatnonzero(~known)
        new_ids = np.arange(len(self.ids), len(self.ids) + len(new))
        if len(new):
            self.keys = pa.concat_arrays([self.keys, key.take(pa.array(first[new]))])
            self.hashes = np.insert(self.hashes, pos[new], uniq[new])
            self.ids = np.insert(self.ids, pos[new], new_ids)
        ids = np.empty(len(h), np.int64)
        ids[order] = self.ids[np.searchsorted(self.hashes, sorted_h)]
        if not pc.all(pc.equal(key, self.keys.take(pa.array(ids)))).as_py():
            raise ValueError("two image keys share a 64-bit hash; cannot aggregate safely")
        return ids

    def sorted_keys(self) -> tuple[pa.Array, np.ndarray]:
        """The keys in sorted order, and each id's position in that order."""
        keys = self.keys
        order = pc.sort_indices(keys).to_numpy().astype(np.int64)
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        return keys.take(pa.array(order)), rank


def _sum_sorted(packed: np.ndarray, values: np.ndarray, *, merge: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ``packed`` (sorted) and the sum of ``values`` over each."""
    if len(packed) and (packed[1:] > packed[:-1]).all():  # already an aggregate
        return packed, values
    # quicksort for a block in log order; a merge is sorted runs, where timsort shines
    order = np.argsort(packed, kind="stable" if merge else None)
    packed, values = packed[order], values[order]
    del order
    start = np.flatnonzero(np.r_[True, packed[1:] != packed[:-1]]) if len(packed) else np.empty(0, np.int64)
    return packed[start], (np.add.reduceat(values, start) if len(values) else values)


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    """Distinct values of a fresh array (sorted in place, saving a copy).

    np.unique hashes 64-bit values first in numpy 2: several times slower."""
    a.sort()
    return a[np.r_[True, a[1:] != a[:-1]]] if len(a) else a


class _Aggregate:
    """Clicks per (key id, query class), packed as ``id << 16 | class + 2``, and
    the distinct (key id, query id) pairs, packed as ``id << 32 | query id``,
    that count duplicate lines.

    Blocks are summed on arrival; pending partial sums are merged as soon as
    they reach half the merged part, so memory stays within a small factor of
    the final aggregate (plus 8 bytes per distinct pair), whatever the log's
    length."""

    def __init__(self) -> None:
        self.packed: list[np.ndarray] = [np.empty(0, np.int64)]
        self.clicks: list[np.ndarray] = [np.empty(0, np.int64)]
        self.pairs: list[np.ndarray] = [np.empty(0, np.int64)]

    def add(self, kid: np.ndarray, qid: np.ndarray, code: np.ndarray, clicks: np.ndarray) -> None:
        packed, summed = _sum_sorted((kid << 16) | (code.astype(np.int64) + 2), clicks)
        self.packed.append(packed)
        self.clicks.append(summed)
        self.pairs.append(_sorted_unique((kid << 32) | qid))
        if sum(map(len, self.packed[1:])) > max(len(self.packed[0]) // 2, 1 << 20):
            self._merge_clicks()
        if sum(map(len, self.pairs[1:])) > max(len(self.pairs[0]) // 2, 1 << 20):
            self._merge_pairs()

    def _merge_clicks(self) -> None:
        packed, clicks = np.concatenate(self.packed), np.concatenate(self.clicks)
        self.packed, self.clicks = [], []  # free the pieces before sorting
        packed, clicks = _sum_sorted(packed, clicks, merge=True)
        self.packed, self.clicks = [packed], [clicks]

    def _merge_pairs(self) -> None:
        pairs = np.concatenate(self.pairs)
        self.pairs = []
        self.pairs = [_sorted_unique(pairs)]

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Key id, class code and clicks per (key, class); the distinct (key, query) count."""
        self._merge_clicks()
        self._merge_pairs()
        packed, clicks = self.packed[0], self.clicks[0]
        return packed >> 16, (packed & 0xFFFF) - 2, clicks, len(self.pairs[0])


def _read_blocks(path: Path, summary: ClickLogSummary, block_size: int, progress: bool) -> Iterator[pa.RecordBatch]:
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
    with pa.OSFile(str(path)) as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                          desc="clicks", disable=not progress) as bar:
        try:
            reader = pacsv.open_csv(f, read_options=read, parse_options=parse, convert_options=convert)
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


def _check_rows(batch: pa.RecordBatch, summary: ClickLogSummary) -> tuple[pa.Array, pa.Array, np.ndarray]:
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
    code = np.where(is_int & (values <= 0), _NONPOSITIVE, 0)
    code = np.where(~is_int, _BAD_CLICKS, code)
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
    block_size: int = 4 << 20,
    progress: bool = False,
) -> tuple[pd.DataFrame, ClickLogSummary]:
    """Stream a ``key<TAB>query<TAB>clicks`` log into clicks per (image, query class).

    Malformed lines (see :data:`MALFORMED_REASONS`) are counted in the summary
    and skipped. Duplicate (key, query) lines are summed and counted.

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
    path = Path(path)
    summary = ClickLogSummary()
    queries, keys, agg = _QueryTable(matcher), _KeyTable(), _Aggregate()
    for batch in _read_blocks(path, summary, block_size, progress):
        key, query, clicks = _check_rows(batch, summary)
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
def image_evidence(clicks: pd.DataFrame, train_keys: Iterable[str] | pa.Array | None = None) -> pd.DataFrame:
    """Per image: ``b*`` (``breed``, -1 when none), ``c[i, b*]`` (``clicks``),
    ``C[i]`` (``breed_clicks``), ``s[i]`` (``share``), ``tie``, ``other_clicks``
    (under queries naming no or several breeds) and ``decoded``.

    Rows: every key in ``clicks`` plus every training key (``train_keys``;
    None: every clicked key counts as decoded), sorted by key. A tie at the top
    sets ``tie`` and reports the tied breed with the lowest code as ``breed``,
    so that the raw click label is still deterministic.
    """
    key_code, keys = _key_codes(clicks["key"])
    n = len(keys)
    # Sum repeated (key, breed) rows: the input need not be an aggregate. After
    # this, rows are sorted by key, then breed code.
    pair, count = _sum_sorted((key_code << 16) | (clicks["breed"].to_numpy(np.int64) + 2),
                              clicks["clicks"].to_numpy(np.int64).copy())
    key_code, breed = pair >> 16, (pair & 0xFFFF) - 2
    is_breed = breed >= 0
    total = np.bincount(key_code[is_breed], weights=count[is_breed], minlength=n).astype(np.int64)
    other = np.bincount(key_code[~is_breed], weights=count[~is_breed], minlength=n).astype(np.int64)
    # Top breed per key, over each key's run of breed rows (no sort needed):
    # the most clicks; among tied rows the lowest code; a tie when several.
    kb, bb, cb = key_code[is_breed], breed[is_breed], count[is_breed]
    top_breed, top_clicks, tie = np.full(n, -1), np.zeros(n, np.int64), np.zeros(n, bool)
    if len(kb):
        start = np.flatnonzero(np.r_[True, kb[1:] != kb[:-1]])
        run = np.cumsum(np.r_[True, kb[1:] != kb[:-1]]) - 1  # each row's run number
        best = np.maximum.reduceat(cb, start)
        at_top = cb == best[run]
        top_clicks[kb[start]] = best
        top_breed[kb[start]] = np.minimum.reduceat(np.where(at_top, bb, np.iinfo(np.int64).max), start)
        tie[kb[start]] = np.add.reduceat(at_top.astype(np.int64), start) > 1
    decoded = np.ones(n, bool)
    if train_keys is not None:  # add the training images that no valid line mentions
        train = _distinct_strings(train_keys)
        # pyarrow's hash lookup, not Series.isin: pandas' Arrow strings test
        # membership element by element in Python (seconds per million keys)
        where = pc.index_in(train, value_set=keys)
        decoded = np.zeros(n, bool)
        decoded[where.drop_null().to_numpy()] = True
        missing = train.filter(where.is_null())
        m = len(missing)
        keys = pa.concat_arrays([keys, missing])
        top_breed, top_clicks = np.r_[top_breed, np.full(m, -1)], np.r_[top_clicks, np.zeros(m, np.int64)]
        total, other = np.r_[total, np.zeros(m, np.int64)], np.r_[other, np.zeros(m, np.int64)]
        tie, decoded = np.r_[tie, np.zeros(m, bool)], np.r_[decoded, np.ones(m, bool)]
    order = pc.sort_indices(keys).to_numpy()
    share = np.divide(top_clicks, total, out=np.zeros(len(total)), where=total > 0)
    return pd.DataFrame({"key": keys.take(pa.array(order)).to_pandas(), "breed": top_breed[order],
                         "clicks": top_clicks[order], "breed_clicks": total[order], "share": share[order],
                         "tie": tie[order], "other_clicks": other[order], "decoded": decoded[order]})


def _distinct_strings(values: Iterable[str] | pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if not isinstance(values, pa.Array):
        values = pa.array(np.asarray(list(values) if not hasattr(values, "__len__") else values, dtype=object))
    return pc.unique(values.cast(pa.string()))


def _key_codes(keys: pd.Series) -> tuple[np.ndarray, pa.Array]:
    """Integer codes of a key column and its distinct keys; a Categorical
    (as from :func:`aggregate_clicks`) brings its own, without hashing strings."""
    if isinstance(keys.dtype, pd.CategoricalDtype):
        codes = keys.cat.codes.to_numpy(np.int64)
        categories = pa.array(keys.cat.categories).cast(pa.string())
        used = np.zeros(len(categories), bool)
        used[codes] = True
        if used.all():
            return codes, categories
        return (np.cumsum(used) - 1)[codes], categories.filter(pa.array(used))
    codes, uniques = pd.factorize(keys.astype(str))
    return codes.astype(np.int64), pa.array(np.asarray(uniques, dtype=object), pa.string())


@dataclass
class WeakLabels:
    """The filter's result.

    ``kept`` and ``raw`` have :data:`LABEL_COLUMNS`; ``label`` indexes
    ``classes`` (-1 in ``raw`` for a breed that is not a training class).
    ``raw`` is the no-threshold baseline: every decoded training image with a
    breed click, labelled with its top breed. ``dropped`` has
    :data:`DROPPED_COLUMNS`. ``per_class``: breed, raw (images whose raw label
    it is), passed (images passing the click thresholds), kept.
    ``evidence``: the :func:`image_evidence` table the labels come from,
    with each image's drop ``reason`` ("" when kept).
    """

    kept: pd.DataFrame
    raw: pd.DataFrame
    dropped: pd.DataFrame
    classes: list[str]
    per_class: pd.DataFrame
    evidence: pd.DataFrame


def check_thresholds(*, min_clicks: int, min_share: float, min_images_per_class: int) -> None:
    """Raise ValueError unless the filter's thresholds are usable."""
    if not isinstance(min_clicks, (int, np.integer)) or isinstance(min_clicks, bool) or min_clicks < 1:
        raise ValueError(f"min_clicks must be an integer >= 1, got {min_clicks!r}")
    if not isinstance(min_share, (int, float)) or isinstance(min_share, bool) or not 0.0 <= min_share <= 1.0:
        raise ValueError(f"min_share must be a number in [0, 1], got {min_share!r}")
    if not isinstance(min_images_per_class, (int, np.integer)) or isinstance(min_images_per_class, bool) \
            or min_images_per_class < 1:
        raise ValueError(f"min_images_per_class must be an integer >= 1, got {min_images_per_class!r}")


def _check_breeds(breeds: Sequence[str]) -> None:
    if len(set(breeds)) != len(breeds) or not all(isinstance(b, str) and b for b in breeds):
        raise ValueError("breeds must be distinct non-empty strings")


def _validate_clicks(clicks: pd.DataFrame, n_breeds: int) -> None:
    missing = {"key", "breed", "clicks"} - set(clicks.columns)
    if missing:
        raise ValueError(f"clicks lacks column(s) {sorted(missing)}")
    if clicks["key"].isna().any():
        raise ValueError("clicks.key must not be missing")
    breed, count = clicks["breed"].to_numpy(), clicks["clicks"].to_numpy()
    if len(clicks) and not (np.issubdtype(breed.dtype, np.integer) and np.issubdtype(count.dtype, np.integer)):
        raise ValueError("clicks.breed and clicks.clicks must be integers")
    if len(clicks) and (breed.min() < MULTIPLE_BREEDS or breed.max() >= n_breeds or count.min() < 1):
        raise ValueError(f"clicks.breed must lie in [{MULTIPLE_BREEDS}, {n_breeds}) and clicks.clicks >= 1")


def _label(ev: pd.DataFrame, breeds: Sequence[str], min_clicks: int, min_share: float,
           min_images_per_class: int) -> WeakLabels:
    """Apply the thresholds to an :func:`image_evidence` table."""
    reason = np.select(
        [~ev["decoded"], ev["breed_clicks"].eq(0) & ev["other_clicks"].eq(0), ev["breed"].lt(0),
         ev["clicks"].lt(min_clicks), ev["tie"] | ev["share"].lt(min_share - 1e-12)],
        [NO_DECODED_IMAGE, NO_CLICKS, NO_BREED_QUERY, TOO_FEW_CLICKS, AMBIGUOUS], default="")
    breed = ev["breed"].to_numpy()
    nb = len(breeds)
    raw_sel = ev["decoded"].to_numpy() & (breed >= 0)
    passed = np.bincount(breed[reason == ""], minlength=nb)
    class_ok = passed >= min_images_per_class
    reason = np.where((reason == "") & ~class_ok[np.maximum(breed, 0)], CLASS_TOO_SMALL, reason)
    small = [breeds[b] for b in np.flatnonzero(~class_ok & (passed > 0))]
    if small:
        log.warning("classes with < %d images dropped from training: %s", min_images_per_class, small)
    classes = [breeds[b] for b in np.flatnonzero(class_ok)]
    class_index = np.cumsum(class_ok) - 1  # breed code -> class label
    names = np.asarray(list(breeds) + [""], dtype=object)  # code -1 -> ""

    def labelled(sel: np.ndarray) -> pd.DataFrame:
        rows = ev.loc[sel]
        b = rows["breed"].to_numpy()
        label = np.where(class_ok[b], class_index[b], -1)
        return pd.DataFrame({"key": rows["key"], "label": label, "breed": names[b], "clicks": rows["clicks"],
                             "share": rows["share"]}, columns=LABEL_COLUMNS).reset_index(drop=True)

    kept_sel = reason == ""
    drop = ev.loc[~kept_sel]
    dropped = pd.DataFrame({"key": drop["key"], "reason": reason[~kept_sel],
                            "breed": names[drop["breed"].to_numpy()],
                            "clicks": drop["clicks"], "share": drop["share"]},
                           columns=DROPPED_COLUMNS).reset_index(drop=True)
    per_class = pd.DataFrame({"breed": list(breeds), "raw": np.bincount(breed[raw_sel], minlength=nb),
                              "passed": passed, "kept": np.where(class_ok, passed, 0)})
    return WeakLabels(labelled(kept_sel), labelled(raw_sel), dropped, classes, per_class,
                      ev.assign(reason=reason))


def find_weak_labels(
    clicks: pd.DataFrame,
    breeds: Sequence[str],
    *,
    train_keys: Iterable[str] | pa.Array | None = None,
    min_clicks: int = 2,
    min_share: float = 0.7,
    min_images_per_class: int = 1,
) -> WeakLabels:
    """Turn click evidence into weak breed labels, dropping the weak evidence.

    Args:
        clicks: one row per (key, breed) or more (repeats are summed): ``key``,
            ``breed`` (int: index into ``breeds``, or ``NO_BREED`` /
            ``MULTIPLE_BREEDS``), ``clicks`` (int >= 1); as returned by
            :func:`aggregate_clicks`.
        breeds: the class vocabulary in label order.
        train_keys: keys of the decoded training images; clicked keys outside
            it are dropped (``no_decoded_image``), keys in it without clicks
            too (``no_clicks``). None: every clicked key counts as decoded.
        min_clicks: ``c[i, b*]`` must reach it.
        min_share: ``s[i]`` must reach it (a tie is never enough).
        min_images_per_class: a breed keeping fewer images is dropped from
            ``classes`` and its images with ``class_too_small``.

    Returns:
        :class:`WeakLabels`; ``classes`` keeps the order of ``breeds``.
    """
    check_thresholds(min_clicks=min_clicks, min_share=min_share, min_images_per_class=min_images_per_class)
    _check_breeds(breeds)
    _validate_clicks(clicks, len(breeds))
    ev = image_evidence(clicks, train_keys)
    return _label(ev, breeds, min_clicks, min_share, min_images_per_class)


# ------------------------------------------------------------ label quality
def _ratio(num: float, den: float) -> float | None:
    """num / den rounded for the report; None (JSON null) when undefined."""
    return round(float(num) / float(den), 4) if den else None


def _truth_codes(evidence: pd.DataFrame, truth: pd.Series, breeds: Sequence[str]) -> np.ndarray:
    """Per evidence row: the true breed's code, -1 distractor, -2 no truth entry,
    -3 a true breed outside the vocabulary."""
    pos = pc.index_in(pa.array(evidence["key"], pa.string()),
                      value_set=pa.array(truth.index, pa.string())).to_numpy(zero_copy_only=False)
    code_of = {b: i for i, b in enumerate(breeds)}
    names = truth.astype(str).to_numpy(dtype=object)
    codes = np.array([code_of.get(b, -1 if b == DISTRACTOR else -3) for b in names] + [-2], np.int64)
    return codes[np.where(np.isnan(pos), -1, np.nan_to_num(pos)).astype(np.int64)]


def _quality(evidence: pd.DataFrame, true: np.ndarray) -> dict[str, dict[str, float | int | None]]:
    breed = evidence["breed"].to_numpy()
    decoded = evidence["decoded"].to_numpy()
    has_truth = true != -2
    correct = (breed >= 0) & (breed == true)
    raw = decoded & (breed >= 0)
    correctly_clicked = raw & correct  # a real dog whose top click is its breed
    dogs = int((decoded & (true >= 0)).sum())
    out = {}
    for name, sel in (("raw", raw), ("filtered", (evidence["reason"] == "").to_numpy())):
        n, n_correct = int((sel & has_truth).sum()), int((sel & correct).sum())
        out[name] = {"labelled": n, "correct": n_correct, "distractors": int((sel & (true == -1)).sum()),
                     "precision": _ratio(n_correct, n),
                     "recall": _ratio((sel & correctly_clicked).sum(), correctly_clicked.sum()),
                     "coverage": _ratio(n_correct, dogs)}
    return out


def label_quality(weak: WeakLabels, truth: pd.Series) -> dict[str, dict[str, float | int | None]]:
    """Precision, recall and coverage of the raw (``"raw"``) and the kept
    (``"filtered"``) labels, given ``truth``: the true breed per key
    ("distractor" for a non-dog image). Over decoded training images:

    * precision = share of the labelled images with a truth entry whose label
      is the true breed;
    * recall = among the *correctly clicked* images (raw click label == true
      breed: a dog whose top-clicked breed is right), the share that keeps its
      label; 1.0 for the raw labels by definition, lower when the filter
      throws correct evidence away;
    * coverage = correctly labelled images / decoded training images whose
      true breed is in the vocabulary (the clean data the labels reach).

    Also ``labelled``, ``correct`` and ``distractors`` (labelled non-dogs).
    Ratios are None when undefined.
    """
    return _quality(weak.evidence, _truth_codes(weak.evidence, truth, weak.per_class["breed"].tolist()))


def sweep_thresholds(
    clicks: pd.DataFrame,
    breeds: Sequence[str],
    truth: pd.Series,
    *,
    train_keys: Iterable[str] | pa.Array | None = None,
    min_clicks_grid: Sequence[int] = (1, 2, 3, 4, 6, 10),
    min_share_grid: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
    min_images_per_class: int = 1,
) -> pd.DataFrame:
    """Label quality over a grid of (min_clicks, min_share), evidence built once.

    Returns one row per grid point: min_clicks, min_share, kept, classes,
    precision, recall, coverage (see :func:`label_quality`); the first row is
    the raw labels (min_clicks 0, min_share 0: no filter).
    """
    for mc in min_clicks_grid:
        for ms in min_share_grid:
            check_thresholds(min_clicks=mc, min_share=ms, min_images_per_class=min_images_per_class)
    _check_breeds(breeds)
    _validate_clicks(clicks, len(breeds))
    ev = image_evidence(clicks, train_keys)
    true = _truth_codes(ev, truth, breeds)
    rows = []
    for mc in min_clicks_grid:
        for ms in min_share_grid:
            weak = _label(ev, breeds, mc, ms, min_images_per_class)
            q = _quality(weak.evidence, true)
            if not rows:
                rows.append({"min_clicks": 0, "min_share": 0.0, "kept": len(weak.raw), "classes": len(breeds),
                             **{k: q["raw"][k] for k in ("precision", "recall", "coverage")}})
            rows.append({"min_clicks": mc, "min_share": ms, "kept": len(weak.kept), "classes": len(weak.classes),
                         **{k: q["filtered"][k] for k in ("precision", "recall", "coverage")}})
    return pd.DataFrame(rows)
