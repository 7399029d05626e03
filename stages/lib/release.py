"""A Clickture-format release from a labelled photo folder (``scripts/make_release.py``).

A breed-per-folder tree of photos (``PHOTOS/<breed>/*.jpg``) becomes the raw
files that ``data.source: path`` reads (``stages.lib.layout``): the images as
``key<TAB>base64 JPEG`` (re-encoded, the short side capped), a clean,
stratified test split with its labels, ``breeds.tsv``, ``truth.tsv``, and a
click log drawn from the embedded sample's own noise model
(:func:`stages.lib.sample.click_rows`, here for any breeds and look-alike
families: :func:`click_rows`). So the method can be measured on real photos,
anyone's breeds, with click noise of the sample's kind and strength: dogs
also or only clicked under a look-alike, mostly under the family's
best-known breed (a one-sided confusion), query variants with misspelt
filler words, sizes, years and aliases, queries that name no breed, and,
where a folder of non-dog photos is given, distractors clicked once or twice
under random breeds.

The look-alike families come from a small YAML file::

    families:                       # the first breed of each is its best-known
      - [german_shepherd, siberian_husky]
      - [toy_poodle, maltese]

Names are folder names or breed names (``_`` and ``-`` read as spaces, any
case). A breed in no family is never confused with another.

Everything is deterministic from ``seed``: image keys (random, like the
sample's, never derived from file names), the test split, the file order and
each image's clicks. Nothing here reads or writes params.yaml.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from stages.lib import layout
from stages.lib.atomic import atomic_dir, refuse_overlap, sha256_file
from stages.lib.clicklog import aggregate_clicks
from stages.lib.decoding import capped_size
from stages.lib.images import DEFAULT_MAX_PIXELS, TooManyPixels, open_image, to_rgb
from stages.lib.params import ConfigError, read_yaml
from stages.lib.queries import BreedMatcher
from stages.lib.sample import DISTRACTOR, NO_BREED_QUERIES, _clicks, _key, _query
from stages.lib.tables import check_breed_name, read_breeds, read_headerless, read_truth
from stages.lib.weaklabels import image_evidence

log = logging.getLogger("make_release")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
MANIFEST = "release.json"        # what was made and how: options, counts, skipped photos, measured noise
SOURCES = "sources.tsv"          # key, split, truth, file (relative to its folder): to look an image up
DATA_PARAMS = "params_data.yaml"  # the data section that runs the pipeline on this release
# rng streams: np.random.default_rng([seed, STREAM, ...])
_KEYS, _SPLIT, _ORDER, _CLICKS = 10, 11, 12, 13


@dataclass(frozen=True)
class Noise:
    """The click model's strengths: ``data.sample``'s keys of the same names
    (and their committed values as the script's defaults)."""

    lookalike_share: float = 0.4       # dogs also or only clicked under a look-alike breed
    lookalike_only_share: float = 0.6  # of those: only under the look-alike (a wrong label)
    best_known_share: float = 0.8      # the look-alike is the family's best-known breed
    no_breed_query_share: float = 0.05  # images also clicked under a query that names no breed
    # lookalike_share for the images of a family's best-known breed (None: lookalike_share, the sample's
    # model). Their look-alike clicks go to a random look-alike, so in a family of two the breeds swap labels
    # at the same rate (symmetric noise); a lower value keeps the confusion one-sided there too
    best_known_lookalike_share: float | None = None

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value is not None and not 0 <= value <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")

    def lookalike_share_of(self, breed: str, family: Sequence[str]) -> float:
        """The share of ``breed``'s images also or only clicked under a look-alike."""
        if family and breed == family[0] and self.best_known_lookalike_share is not None:
            return self.best_known_lookalike_share
        return self.lookalike_share


# ------------------------------------------------------------------ breeds and families
def breed_name(name: str) -> str:
    """A folder name (or a families file's entry) as a breed name: ``_`` and
    ``-`` read as spaces, white space collapsed, lower case ("German_Shepherd"
    -> "german shepherd"): the sample's style, and what the query variants
    (plural, title case, ...) are made from."""
    return " ".join(re.sub(r"[_-]+", " ", name).split()).lower()


def scan_photos(photos_dir: Path) -> tuple[dict[str, list[Path]], list[str]]:
    """Breed -> its photo files (sorted), from ``photos_dir/<breed>/**``, and
    the files passed over (not an image suffix). Hidden files and folders are
    left out; a breed folder is a non-hidden sub-folder."""
    photos_dir = Path(photos_dir)
    if not photos_dir.is_dir():
        raise SystemExit(f"make_release: {photos_dir} is not a folder of breed folders")
    breeds: dict[str, list[Path]] = {}
    folder_of: dict[str, str] = {}
    passed_over: list[str] = []
    for folder in sorted(p for p in photos_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        name = breed_name(folder.name)
        try:
            check_breed_name(name, f"{folder}")
        except ValueError as err:
            raise SystemExit(f"make_release: {err}: rename the folder") from None
        if name in folder_of:
            raise SystemExit(f"make_release: folders {folder_of[name]!r} and {folder.name!r} are both breed {name!r}")
        folder_of[name] = folder.name
        files, skipped = _image_files(folder, photos_dir)
        passed_over += skipped
        if files:
            breeds[name] = files
        else:
            log.warning("%s: no photos (%s), left out", folder, ", ".join(IMAGE_SUFFIXES))
    if len(breeds) < 2:
        raise SystemExit(f"make_release: {photos_dir} needs at least 2 breed folders with photos, found "
                         f"{sorted(breeds)}")
    return dict(sorted(breeds.items())), passed_over


def _image_files(folder: Path, root: Path) -> tuple[list[Path], list[str]]:
    files, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            (files if path.suffix.lower() in IMAGE_SUFFIXES else skipped).append(path)
    return sorted(files), [str(p.relative_to(root)) for p in skipped]


def read_families(path: str | Path) -> list[list[str]]:
    """The look-alike families of a YAML file: ``families: [[best known,
    look-alike, ...], ...]`` (names as written; :func:`resolve_families`
    checks them against the photos)."""
    try:
        data = read_yaml(path)
    except (OSError, ConfigError) as err:
        raise SystemExit(f"make_release: families file: {err}") from None
    families = data.get("families") if set(data) == {"families"} else None
    if not isinstance(families, list) or not all(isinstance(f, list) and all(isinstance(n, str) for n in f)
                                                 for f in families):
        raise SystemExit(f"make_release: {path} must hold one key, families: a list of lists of breed names "
                         f"(the best-known breed of each first), got {data!r:.200}")
    return families


def resolve_families(families: Sequence[Sequence[str]], breeds: Sequence[str]) -> list[list[str]]:
    """``families`` as breed names (:func:`breed_name`); each name must be a
    breed of the photos, in one family at most, and a family needs two."""
    out: list[list[str]] = []
    seen: dict[str, int] = {}
    for i, family in enumerate(families):
        names = [breed_name(n) for n in family]
        if len(names) < 2 or len(set(names)) != len(names):
            raise SystemExit(f"make_release: look-alike family {i + 1} {list(family)} needs 2 or more distinct "
                             f"breeds")
        for name in names:
            if name not in breeds:
                raise SystemExit(f"make_release: look-alike family {i + 1} names {name!r}, which is no breed folder "
                                 f"of the photos ({', '.join(breeds)})")
            if name in seen:
                raise SystemExit(f"make_release: {name!r} is in look-alike families {seen[name] + 1} and {i + 1}")
            seen[name] = i
        out.append(names)
    alone = [b for b in breeds if b not in seen]
    if alone:
        log.warning("breeds in no look-alike family (never confused with another): %s", alone)
    return out


# ------------------------------------------------------------------ the click model
def click_rows(key: str, true_breed: str | None, rng: np.random.Generator, *, breeds: Sequence[str],
               family: Sequence[str], noise: Noise) -> list[tuple[str, str, int]]:
    """The click-log lines of one training image: :func:`stages.lib.sample.click_rows`
    for any breeds (``true_breed`` None: a distractor, clicked once or twice
    under random ``breeds``) and look-alike ``family`` (the true breed's,
    best-known first; empty or the breed alone: never confused). The same
    draws in the same order, so on the sample's breeds and families it gives
    the sample's very rows (tests/test_make_release.py)."""
    if true_breed is None:
        n = 1 if rng.random() < 0.7 else 2
        return [(key, _query(str(rng.choice(breeds)), rng), int(rng.integers(1, 3))) for _ in range(n)]
    lookalikes = [b for b in family if b != true_breed]
    rows: list[tuple[str, str, int]] = []
    mode = "own"
    if lookalikes and rng.random() < noise.lookalike_share_of(true_breed, family):
        mode = "only" if rng.random() < noise.lookalike_only_share else "also"
    if mode in ("own", "also"):
        for _ in range(1 + int(rng.random() < 0.4) + int(rng.random() < 0.15)):
            rows.append((key, _query(true_breed, rng), _clicks(rng)))
    if mode in ("also", "only"):
        best = family[0]
        other = best if best != true_breed and rng.random() < noise.best_known_share else \
            str(rng.choice(lookalikes))
        rows.append((key, _query(other, rng), _clicks(rng, 0.5 if mode == "also" else 0.8)))
    if rng.random() < noise.no_breed_query_share:
        rows.append((key, str(rng.choice(NO_BREED_QUERIES)), _clicks(rng)))
    if lookalikes and rng.random() < 0.01:  # a query naming two breeds
        other = str(rng.choice(lookalikes))
        rows.append((key, f"{true_breed} vs {other}", 1))
    return rows


# ------------------------------------------------------------------ images
def encode_photo(path: Path, *, max_short_side: int, quality: int,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """A photo as RGB, upright (EXIF), its short side capped at
    ``max_short_side`` (0: kept), re-encoded as a baseline JPEG. Raises
    ValueError (with the reason) for a file that is not a readable image."""
    try:
        with open(path, "rb") as f, open_image(f, max_pixels=max_pixels) as img:
            target = capped_size(*img.size, max_short_side)  # a cap on the short side: the same turned
            if target != img.size:
                img.draft("RGB", target)  # JPEG: decode at a reduced scale, still >= target
            img.load()
            out = to_rgb(img)
            upright = capped_size(*out.size, max_short_side)
            if out.size != upright:
                out = out.resize(upright, Image.Resampling.LANCZOS)
    except TooManyPixels as err:
        raise ValueError(f"too_many_pixels: {err}") from None
    except UnidentifiedImageError:
        raise ValueError("not_an_image") from None
    except Exception as err:  # Pillow raises many types on a broken file
        raise ValueError(f"unreadable: {type(err).__name__}: {err}") from None
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


# ------------------------------------------------------------------ the release
@dataclass(frozen=True)
class Item:
    key: str
    split: str          # train | test
    truth: str          # breed name, or "distractor"
    path: Path
    root: Path          # the folder the path is shown relative to in sources.tsv


def plan_release(breeds: dict[str, list[Path]], distractors: Sequence[Path], *, seed: int,
                 test_per_breed: int | None, test_fraction: float | None,
                 photos_dir: Path, distractors_dir: Path | None) -> list[Item]:
    """Keys, splits and file order of every image. The test split is drawn per
    breed (stratified): ``test_per_breed`` photos of each, or
    ``test_fraction`` of each (rounded, at least 1); every breed keeps at
    least one training photo."""
    all_files = [(b, p) for b, files in breeds.items() for p in files] + [(None, p) for p in distractors]
    key_rng = np.random.default_rng([seed, _KEYS])
    keys: list[str] = []
    taken: set[str] = set()
    while len(keys) < len(all_files):
        k = _key(key_rng)
        if k not in taken:  # 62**24 keys: a repeat is all but impossible, but a key must be unique
            taken.add(k)
            keys.append(k)
    key_of = {p: k for (_, p), k in zip(all_files, keys)}
    split_rng = np.random.default_rng([seed, _SPLIT])
    train: list[Item] = []
    test: list[Item] = []
    for breed, files in breeds.items():
        n = len(files)
        n_test = test_per_breed if test_per_breed is not None else max(1, round(n * float(test_fraction)))
        if n_test >= n:
            raise SystemExit(f"make_release: breed {breed!r} has {n} photos: a test split of {n_test} leaves none "
                             f"to train on; lower --test-per-breed / --test-fraction or add photos")
        order = split_rng.permutation(n)
        for rank, i in enumerate(order):
            item = Item(key_of[files[i]], "test" if rank < n_test else "train", breed, files[i], photos_dir)
            (test if item.split == "test" else train).append(item)
    train += [Item(key_of[p], "train", DISTRACTOR, p, distractors_dir or p.parent) for p in distractors]
    order_rng = np.random.default_rng([seed, _ORDER])
    # a release is not sorted by breed: each split shuffled (the lists were built from sorted breeds and
    # files, so the order depends on the seed alone, not on how the file system lists the folders)
    train = [train[i] for i in order_rng.permutation(len(train))]
    test = [test[i] for i in order_rng.permutation(len(test))]
    return train + test


def _family_of(families: Sequence[Sequence[str]]) -> dict[str, list[str]]:
    return {b: list(f) for f in families for b in f}


def make_release(photos_dir: str | Path, out_dir: str | Path, *, families: Sequence[Sequence[str]],
                 seed: int = 0, noise: Noise = Noise(), test_per_breed: int | None = None,
                 test_fraction: float = 0.2, distractors_dir: str | Path | None = None,
                 max_short_side: int = 256, jpeg_quality: int = 90, aliases: dict[str, str] | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Write the release to ``out_dir`` (atomically; an earlier release there
    is replaced, any other existing folder refused) and return its manifest
    (also ``release.json``). ``families``: the look-alike families, best-known
    breed first (:func:`read_families`); ``aliases`` (filter.aliases) serve
    only the noise measured on the written click log
    (:func:`measure_raw_labels`)."""
    photos_dir, out_dir = Path(photos_dir), Path(out_dir)
    if test_per_breed is not None:
        if test_per_breed < 1:
            raise ValueError(f"test_per_breed must be >= 1, got {test_per_breed}")
        test_fraction = None  # test_per_breed, when given, sets the split
    elif not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    if not (max_short_side >= 0 and 1 <= jpeg_quality <= 95):
        raise ValueError("max_short_side must be >= 0 and jpeg_quality 1..95")
    inputs = {"PHOTOS_DIR": photos_dir, **({"--distractors": Path(distractors_dir)} if distractors_dir else {})}
    refuse_overlap(out_dir, inputs, "make_release")  # replacing the output must not delete the photos
    if out_dir.exists() and not (out_dir / MANIFEST).is_file() and any(out_dir.iterdir()):
        raise SystemExit(f"make_release: {out_dir} exists and holds no earlier release ({MANIFEST}): give a new "
                         f"or empty folder (an earlier release there is replaced)")
    breeds_found, passed_over = scan_photos(photos_dir)
    breed_list = list(breeds_found)
    families = resolve_families(families, breed_list)
    distractors: list[Path] = []
    if distractors_dir is not None:
        distractors, skipped = _image_files(Path(distractors_dir), Path(distractors_dir))
        passed_over = [*passed_over, *(f"distractors/{s}" for s in skipped)]
        if not distractors:
            raise SystemExit(f"make_release: --distractors {distractors_dir}: no photos ({', '.join(IMAGE_SUFFIXES)})")
    family_of = _family_of(families)
    items = plan_release(breeds_found, distractors, seed=seed, test_per_breed=test_per_breed,
                         test_fraction=test_fraction, photos_dir=photos_dir,
                         distractors_dir=Path(distractors_dir) if distractors_dir else None)
    skipped: list[dict[str, str]] = []
    counts = {"train": 0, "test": 0, "distractors": 0, "click_lines": 0}
    with atomic_dir(out_dir) as tmp:
        with open(tmp / layout.TRAIN_IMAGES, "w", encoding="utf-8", newline="\n") as f_train, \
                open(tmp / layout.TEST_IMAGES, "w", encoding="utf-8", newline="\n") as f_test, \
                open(tmp / layout.TEST_LABELS, "w", encoding="utf-8", newline="\n") as f_labels, \
                open(tmp / layout.CLICKS, "w", encoding="utf-8", newline="\n") as f_clicks, \
                open(tmp / layout.TRUTH, "w", encoding="utf-8", newline="\n") as f_truth, \
                open(tmp / SOURCES, "w", encoding="utf-8", newline="\n") as f_sources:
            f_sources.write("key\tsplit\ttruth\tfile\n")
            n_train = 0
            for item in tqdm(items, desc="photos", unit="photo", disable=not progress, mininterval=1.0):
                source = _shown_path(item)
                try:
                    jpeg = encode_photo(item.path, max_short_side=max_short_side, quality=jpeg_quality)
                except ValueError as err:
                    skipped.append({"file": source, "reason": str(err)})
                    log.warning("%s: skipped (%s)", item.path, err)
                    continue
                line = f"{item.key}\t{base64.b64encode(jpeg).decode('ascii')}\n"
                f_sources.write(f"{item.key}\t{item.split}\t{item.truth}\t{source}\n")
                if item.split == "test":
                    f_test.write(line)
                    f_labels.write(f"{item.key}\t{item.truth}\n")
                    counts["test"] += 1
                    continue
                f_train.write(line)
                f_truth.write(f"{item.key}\t{item.truth}\n")
                dog = item.truth != DISTRACTOR
                rng = np.random.default_rng([seed, _CLICKS, n_train])
                n_train += 1
                rows = click_rows(item.key, item.truth if dog else None, rng, breeds=breed_list,
                                  family=family_of.get(item.truth, []), noise=noise)
                f_clicks.writelines(f"{k}\t{q}\t{c}\n" for k, q, c in rows)
                counts["click_lines"] += len(rows)
                counts["train" if dog else "distractors"] += 1
        with open(tmp / layout.BREEDS, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(f"{name}\t{i}\n" for i, name in enumerate(breed_list))
        per_breed = _per_breed(tmp)
        short = [b for b in breed_list if not per_breed[b]["train"] or not per_breed[b]["test"]]
        if short:
            raise SystemExit(f"make_release: after unreadable photos were skipped, breeds {short} have no training "
                             f"or no test image left (skipped: {skipped[:5]})")
        files = {name.removesuffix(".tsv"): {"path": str((out_dir / name).resolve()),
                                             "sha256": sha256_file(tmp / name)}
                 for name in (layout.TRAIN_IMAGES, layout.TEST_IMAGES, layout.TEST_LABELS, layout.CLICKS,
                              layout.BREEDS, layout.TRUTH)}
        manifest = {
            "photos": str(photos_dir.resolve()),
            "distractors": str(Path(distractors_dir).resolve()) if distractors_dir else None,
            "options": {"seed": seed, **asdict(noise), "test_per_breed": test_per_breed,
                        "test_fraction": test_fraction, "max_short_side": max_short_side,
                        "jpeg_quality": jpeg_quality},
            "families": [list(f) for f in families],
            "breeds": breed_list,
            "images": {**counts, "per_breed": per_breed},
            "skipped": skipped,
            "passed_over": list(passed_over),
            "raw_labels": measure_raw_labels(tmp, families, aliases or {}),
            "data": {"source": "path", "files": files},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        (tmp / DATA_PARAMS).write_text(data_params_yaml(files), encoding="utf-8")
    return manifest


def _shown_path(item: Item) -> str:
    rel = item.path.relative_to(item.root).as_posix()
    shown = f"distractors/{rel}" if item.truth == DISTRACTOR else rel
    return "".join(ch if ch.isprintable() and ch != "\t" else "?" for ch in shown)  # one TSV cell


def _per_breed(release: Path) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for name in (b for b, _ in _read_pairs(release / layout.BREEDS)):
        counts[name] = {"train": 0, "test": 0}
    for split, path in (("train", layout.TRUTH), ("test", layout.TEST_LABELS)):
        df = read_headerless(release / path, ["key", "breed"])
        for breed, n in df["breed"].value_counts().items():
            if breed in counts:
                counts[breed][split] = int(n)
    return counts


def _read_pairs(path: Path) -> Iterator[tuple[str, str]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            a, b = line.rstrip("\n").split("\t")
            yield a, b


def data_params_yaml(files: dict[str, dict[str, str]]) -> str:
    """The ``data`` keys that run the pipeline on a release: paste them into
    params.yaml's ``data`` section (its other keys stay as they are)."""
    block = yaml.safe_dump({"data": {"source": "path", "files": dict(sorted(files.items()))}}, sort_keys=False,
                           width=200)
    return ("# params.yaml: set these two keys of the data section (the others stay), then `dvc repro`.\n"
            "# The sha256 pin each file: a changed release is refused, not silently used.\n" + block)


# ------------------------------------------------------------------ measured noise
def measure_raw_labels(release: str | Path, families: Sequence[Sequence[str]],
                       aliases: dict[str, str]) -> dict[str, Any]:
    """How noisy the raw click labels are, read the way filter_clicks reads
    them (``aggregate_clicks`` with the breed matcher, each image's top breed
    ``b*`` without thresholds, ties to the lowest breed code): per training
    dog, is ``b*`` its true breed. ``precision``: the share of dogs with a
    breed click whose ``b*`` is right; ``wrong_to``: where the wrong ones go
    (true -> raw label -> count); per breed and per family; distractors
    with a breed label are counted apart (no label is right for them)."""
    release = Path(release)
    breeds = read_breeds(release / layout.BREEDS)
    aliases = {a: b for a, b in aliases.items() if b in breeds}
    clicks, _ = aggregate_clicks(release / layout.CLICKS, BreedMatcher(breeds, aliases))
    ev = image_evidence(clicks)
    raw = dict(zip(ev["key"], [breeds[b] if b >= 0 else None for b in ev["breed"]]))
    truth = read_truth(release / layout.TRUTH)
    per_breed: dict[str, dict[str, Any]] = {b: {"images": 0, "right": 0, "no_label": 0} for b in breeds}
    wrong_to: dict[str, dict[str, int]] = {}
    distractors = {"images": 0, "labelled": 0}
    for key, true in truth.items():
        label = raw.get(key)
        if true == DISTRACTOR:
            distractors["images"] += 1
            distractors["labelled"] += label is not None
            continue
        row = per_breed[true]
        row["images"] += 1
        if label is None:
            row["no_label"] += 1
        elif label == true:
            row["right"] += 1
        else:
            to = wrong_to.setdefault(true, {})
            to[label] = to.get(label, 0) + 1

    def summary(names: Sequence[str]) -> dict[str, Any]:
        images = sum(per_breed[b]["images"] for b in names)
        labelled = images - sum(per_breed[b]["no_label"] for b in names)
        right = sum(per_breed[b]["right"] for b in names)
        return {"images": images, "labelled": labelled, "right": right,
                "precision": round(right / labelled, 4) if labelled else None}

    for b in breeds:
        per_breed[b] = {**per_breed[b], **summary([b])}
    grouped = [list(f) for f in families] + [[b] for b in breeds if b not in _family_of(families)]
    return {"aliases": aliases, **summary(breeds), "per_family": {" / ".join(f): summary(f) for f in grouped},
            "per_breed": per_breed, "wrong_to": wrong_to, "distractors": distractors}
