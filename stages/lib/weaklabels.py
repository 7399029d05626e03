"""The weak-label filter of filter_clicks: click evidence per image, and the
thresholds that turn it into labels.

Click evidence per image and the weak-label filter of filter_clicks.

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
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from stages.lib.keyagg import sum_sorted
from stages.lib.params import Section, in_range
from stages.lib.queries import MULTIPLE_BREEDS

log = logging.getLogger(__name__)

# Why an image is not kept, in the order the checks apply.
NO_DECODED_IMAGE = "no_decoded_image"  # not among the decoded training images
NO_CLICKS = "no_clicks"                # a training image no valid log line mentions
NO_BREED_QUERY = "no_breed_query"      # clicked only under queries naming no / several breeds
TOO_FEW_CLICKS = "too_few_clicks"      # c[i, b*] < min_clicks
AMBIGUOUS = "ambiguous"                # tie at the top, or s[i] < min_share
CLASS_TOO_SMALL = "class_too_small"    # b* keeps < min_images_per_class images
DROP_REASONS = (NO_DECODED_IMAGE, NO_CLICKS, NO_BREED_QUERY, TOO_FEW_CLICKS, AMBIGUOUS, CLASS_TOO_SMALL)
# ... and why, when the labels come from the image file's breed column (no click log)
NO_BREED_LABEL = "no_breed_label"      # the breed cell is empty
UNKNOWN_BREED = "unknown_breed"        # the cell names no breed of breeds.tsv (or several)
COLUMN_DROP_REASONS = (NO_BREED_LABEL, UNKNOWN_BREED, CLASS_TOO_SMALL)
LABEL_COLUMNS = ["key", "label", "breed", "clicks", "share"]
DROPPED_COLUMNS = ["key", "reason", "breed", "clicks", "share"]


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
    pair, count = sum_sorted((key_code << 16) | (clicks["breed"].to_numpy(np.int64) + 2),
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


def check_inputs(clicks: pd.DataFrame, breeds: Sequence[str]) -> None:
    """The breed vocabulary and the click table of :func:`find_weak_labels`, checked."""
    _check_breeds(breeds)
    _validate_clicks(clicks, len(breeds))


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


def apply_thresholds(ev: pd.DataFrame, breeds: Sequence[str], min_clicks: int, min_share: float,
           min_images_per_class: int) -> WeakLabels:
    """Apply the thresholds to an :func:`image_evidence` table."""
    reason = np.select(
        [~ev["decoded"], ev["breed_clicks"].eq(0) & ev["other_clicks"].eq(0), ev["breed"].lt(0),
         ev["clicks"].lt(min_clicks), ev["tie"] | ev["share"].lt(min_share - 1e-12)],
        [NO_DECODED_IMAGE, NO_CLICKS, NO_BREED_QUERY, TOO_FEW_CLICKS, AMBIGUOUS], default="")
    return _weak_labels(ev, reason, breeds, min_images_per_class)


def labels_from_column(keys: pd.Series, texts: pd.Series, breeds: Sequence[str], classify: Callable[[str], int],
                       *, min_images_per_class: int) -> WeakLabels:
    """Weak labels of a release without a click log: each training image's
    breed column (decode keeps it in the index), read as a query would be
    (``classify``: :meth:`BreedMatcher.classify`, so case, plurals and
    aliases match). There are no click counts: ``clicks`` and ``share`` are
    missing, and an image is kept unless its cell is empty
    (``no_breed_label``), names no breed or several (``unknown_breed``), or
    its breed keeps fewer than ``min_images_per_class`` images."""
    _check_breeds(breeds)
    order = np.argsort(keys.to_numpy(dtype=object), kind="stable")  # key order, as image_evidence's
    keys, texts = keys.iloc[order].reset_index(drop=True), texts.fillna("").iloc[order].reset_index(drop=True)
    codes = {t: classify(t) for t in texts.unique() if t}
    code = texts.map(codes).fillna(-1).astype(np.int64).to_numpy()
    reason = np.select([texts.eq("").to_numpy(), code < 0], [NO_BREED_LABEL, UNKNOWN_BREED], default="")
    ev = pd.DataFrame({"key": keys, "breed": code, "clicks": np.nan, "share": np.nan, "decoded": True,
                       "text": texts})
    return _weak_labels(ev, reason, breeds, min_images_per_class)


def _weak_labels(ev: pd.DataFrame, reason: np.ndarray, breeds: Sequence[str],
                 min_images_per_class: int) -> WeakLabels:
    """The tables of :class:`WeakLabels` from per-image evidence (key, breed
    code, clicks, share, decoded) and each image's drop reason so far ("" when
    it passes); a breed passing fewer than ``min_images_per_class`` images is
    no class, and its images are dropped with ``class_too_small``."""
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
    check_inputs(clicks, breeds)
    ev = image_evidence(clicks, train_keys)
    return apply_thresholds(ev, breeds, min_clicks, min_share, min_images_per_class)


# ------------------------------------------------------------------ params
@dataclass(frozen=True)
class FilterConfig(Section):
    """params.yaml ``filter``: the click-count thresholds and the guards."""

    min_clicks: int
    min_share: float
    min_images_per_class: int
    min_kept_share: float
    aliases: dict[str, str]
    max_clicks_per_line: int
    max_line_bytes: int
    max_reject_fraction: float

    def __post_init__(self) -> None:
        in_range("max_clicks_per_line", self.max_clicks_per_line, 1, 10**12)
        in_range("max_line_bytes", self.max_line_bytes, 64, 1 << 26)
        check_thresholds(min_clicks=self.min_clicks, min_share=self.min_share,
                         min_images_per_class=self.min_images_per_class)
        in_range("max_reject_fraction", self.max_reject_fraction, 0, 1)
        in_range("min_kept_share", self.min_kept_share, 0, 1)
