"""The filter galleries (the galleries stage): a sample of what each filter
kept and dropped, as thumbnails captioned with the click evidence (and, where
truth.tsv exists, the true breed: a red caption is a wrong label). Tables are
streamed in chunks, so the real data's label tables need not fit in memory."""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages.lib import figures, layout
from stages.lib.atomic import atomic_dir
from stages.lib.params import Section
from stages.lib.shards import ShardReader
from stages.lib.tables import read_table

log = logging.getLogger("galleries")

CHUNK_ROWS = 200_000     # label tables are streamed in chunks of this many rows
THUMB_PX = 128           # gallery thumbnails are at most this size
HASH_KEY = "clickdog-gallery"  # 16 characters, as pandas' row hash wants


@dataclass(frozen=True)
class GalleriesConfig(Section):
    """params.yaml ``galleries``."""

    per_reason: int  # thumbnails per group (kept, and each reason a filter dropped an image for); 0: none

    def __post_init__(self) -> None:
        if self.per_reason < 0:
            raise ValueError(f"per_reason must be >= 0, got {self.per_reason}")


def read_tsv_chunks(path: Path, **kwargs: Any) -> Iterable[pd.DataFrame]:
    """A pipeline TSV (header, tab-separated, no quoting) in chunks of rows:
    label tables of the real data do not have to fit in memory."""
    return read_table(path, chunksize=CHUNK_ROWS, **kwargs)


def sample_by_group(path: Path, n: int, group_of: Callable[[pd.DataFrame], pd.Series],
                    showable: Callable[[pd.DataFrame], pd.Series] | None = None) -> tuple[pd.DataFrame, pd.Series]:
    """Up to ``n`` rows per group of a TSV, streamed, and each group's size.

    The rows are those with the smallest hash of their key: the same whatever
    the chunking, the same from run to run, and spread over the table rather
    than its first lines (which are often one breed). Only ``showable`` rows
    are sampled (e.g. those with a decoded image), but all are counted."""
    best, sizes = [], pd.Series(dtype=np.int64)
    for chunk in read_tsv_chunks(path):
        chunk = chunk.assign(_group=group_of(chunk).to_numpy())
        sizes = sizes.add(chunk["_group"].value_counts(), fill_value=0)
        if showable is not None:
            chunk = chunk[showable(chunk).to_numpy()]
        chunk = chunk.assign(_rank=pd.util.hash_pandas_object(chunk["key"], index=False, hash_key=HASH_KEY))
        best.append(chunk)
        best = [pd.concat(best).sort_values(["_rank", "key"]).groupby("_group", sort=False).head(n)]
    rows = pd.concat(best) if best else pd.DataFrame(columns=["key", "_group"])
    return rows.drop(columns="_rank", errors="ignore"), sizes.astype(np.int64)


def lookup(path: Path, keys: set[str], column: str, names: list[str] | None = None) -> dict[str, Any]:
    """``column`` of the rows of ``keys`` in a (possibly large) TSV, streamed."""
    header = None if names else "infer"
    out: dict[str, Any] = {}
    for chunk in read_table(path, dtype=str, header=header, names=names, chunksize=CHUNK_ROWS):
        if column not in chunk:
            log.warning("%s has no column %r: left out of the figures", path, column)
            return {}
        hit = chunk[chunk["key"].isin(keys)]
        out.update(zip(hit["key"], hit[column]))
    return out


def _number(value: Any, fmt: str) -> str:
    num = pd.to_numeric(value, errors="coerce")
    return "?" if pd.isna(num) else format(num, fmt)


def make_thumbs(rows: pd.DataFrame, reader: ShardReader, locations: pd.DataFrame, truth: dict[str, str] | None,
                caption: Callable[[Any], str]) -> list[figures.Thumb]:
    """Thumbnails with captions; a label is judged right or wrong where truth is known."""
    thumbs = []
    for row in rows.itertuples(index=False):
        if row.key not in locations.index:
            continue  # e.g. dropped because it has no decoded image: nothing to show
        image = reader.open_image(locations.loc[row.key])
        image.thumbnail((THUMB_PX, THUMB_PX))
        text, correct = caption(row), None
        true = truth.get(row.key) if truth is not None else None
        if true is not None:
            text += f"\ntrue: {true[:18]}"
            correct = row.breed == true if row.breed else None  # no label: nothing to judge
        thumbs.append(figures.Thumb(image, text, correct))
    return thumbs


def click_caption(row: Any) -> str:
    """Click label, its clicks and its share of the image's breed clicks."""
    breed = (row.breed or "(no breed)")[:18]
    return f"{breed}\n{_number(row.clicks, 'g')} clicks, share {_number(row.share, '.2f')}"


def click_gallery(filtered_dir: Path, reader: ShardReader, locations: pd.DataFrame,
                  truth: Callable[[set[str]], dict[str, str] | None], n: int, path: Path) -> None:
    """What the click filter kept, and what it dropped for each reason."""
    kept, kept_n = sample_by_group(filtered_dir / layout.LABELS, n, lambda d: pd.Series("kept", d.index))
    dropped, dropped_n = sample_by_group(filtered_dir / layout.DROPPED, n, lambda d: d["reason"],
                                         showable=lambda d: d["key"].isin(locations.index))
    known = truth(set(kept["key"]) | set(dropped["key"]))
    rows = [(f"kept\n({int(kept_n.get('kept', 0))} images)", make_thumbs(kept, reader, locations, known,
                                                                          click_caption))]
    for reason in sorted(dropped_n.index):
        rows.append((f"{reason}\n({int(dropped_n[reason])} dropped)",
                     make_thumbs(dropped[dropped["_group"] == reason], reader, locations, known, click_caption)))
    figures.gallery_figure(rows, "click filter: what it kept and what it dropped, by reason", path, n)


def prob_gallery(filtered_dir: Path, pairs_dir: Path, pairs_report: dict[str, Any], reader: ShardReader,
                 locations: pd.DataFrame, truth: Callable[[set[str]], dict[str, str] | None], n: int,
                 path: Path) -> None:
    """What the probability filter kept and dropped among the click-filtered
    images (dropped = in labels.tsv, not in clean.tsv), with p(label)."""
    clean = set()
    for chunk in read_tsv_chunks(pairs_dir / layout.CLEAN, usecols=["key"]):
        clean.update(chunk["key"])
    dropped_name = f"dropped\np < {pairs_report.get('min_prob', 'min_prob')}"
    rows_df, sizes = sample_by_group(filtered_dir / layout.LABELS, n, lambda d: pd.Series(
        np.where(d["key"].isin(clean), "kept", dropped_name), d.index))
    # scores.tsv has p(label) of every click-filtered image under each scorer
    p_col = f"p_{pairs_report.get('scorer', 'label')}"
    p_label = lookup(pairs_dir / layout.SCORES, set(rows_df["key"]), p_col) if len(rows_df) else {}
    known = truth(set(rows_df["key"]))

    def caption(row: Any) -> str:
        return f"{row.breed[:18]}\n{_number(row.clicks, 'g')} clicks, p {_number(p_label.get(row.key), '.2f')}"

    rows = [(f"{g}\n({int(sizes.get(g, 0))} images)",
             make_thumbs(rows_df[rows_df["_group"] == g], reader, locations, known, caption))
            for g in ("kept", dropped_name)]
    figures.gallery_figure(rows, "probability filter: what it kept and dropped (p = out-of-sample p(label))",
                           path, n)


def write_galleries(out: Path, *, raw_dir: Path, filtered_dir: Path, pairs_dir: Path, images_dir: Path,
                    index: pd.DataFrame, pairs_report: dict[str, Any], n: int) -> None:
    """``out``/gallery_click_filter.png and gallery_prob_filter.png (``out``
    replaced as a whole; empty when ``n`` is 0): ``n`` images per group of
    what filter_clicks (``filtered_dir``) and the label filter (``pairs_dir``:
    clean.tsv, scores.tsv) kept and dropped, read from the decoded training
    images; captions in red where ``raw_dir``/truth.tsv says the label is wrong."""
    truth_path = raw_dir / layout.TRUTH

    def truth(keys: set[str]) -> dict[str, str] | None:
        return lookup(truth_path, keys, "breed", ["key", "breed"]) if truth_path.is_file() and keys else None

    with atomic_dir(out) as tmp:
        if n <= 0:
            log.info("galleries.per_reason is 0: no galleries")
            return
        locations = index.drop_duplicates("key").set_index("key")
        with ShardReader(images_dir) as reader:
            click_gallery(filtered_dir, reader, locations, truth, n, tmp / "gallery_click_filter.png")
            prob_gallery(filtered_dir, pairs_dir, pairs_report, reader, locations, truth, n,
                         tmp / "gallery_prob_filter.png")
