"""The generated sample: real Clickture formats, determinism, and the noise it promises."""
from __future__ import annotations

import base64
import contextlib
import io
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stages import download
from stages.lib import layout
from stages.lib import sample as sample_module
from stages.lib.atomic import sha256_file
from stages.lib.sample import ALIAS_QUERIES, BREED_NAMES, BREEDS, click_rows, generate_sample

SMALL = dict(n_train=120, test_per_breed=2, min_side=64, max_side=96, lookalike_share=0.25,
             lookalike_only_share=0.4, best_known_share=0.5,
             distractor_share=0.1, no_breed_query_share=0.05)


def read(path: Path, names: list[str]) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", names=names, dtype=str, keep_default_na=False, quoting=3)


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("raw")
    generate_sample(out, seed=3, **SMALL)
    return out


def test_formats_are_the_clickture_ones(sample: Path) -> None:
    breeds = read(sample / layout.BREEDS, ["breed", "label"])
    assert breeds["breed"].tolist() == list(BREED_NAMES) and len(breeds) >= 12
    assert breeds["label"].astype(int).tolist() == list(range(len(breeds)))
    images = read(sample / layout.TRAIN_IMAGES, ["key", "image"])
    assert len(images) == 120 and images["key"].is_unique
    for b64 in images["image"].head(5):
        with Image.open(io.BytesIO(base64.b64decode(b64, validate=True))) as img:
            assert img.format == "JPEG" and 64 <= img.width <= 96 and img.mode == "RGB"
    clicks = read(sample / layout.CLICKS, ["key", "query", "clicks"])
    assert set(clicks["key"]) <= set(images["key"])
    assert (clicks["clicks"].astype(int) >= 1).all()
    test = read(sample / layout.TEST_LABELS, ["key", "breed"])
    assert test["breed"].value_counts().to_dict() == {b: 2 for b in BREED_NAMES}
    truth = read(sample / layout.TRUTH, ["key", "breed"])
    assert truth["key"].tolist() == images["key"].tolist()
    assert (truth["breed"] == "distractor").sum() == 12


def test_same_seed_same_bytes_other_seed_other_data(sample: Path, tmp_path: Path) -> None:
    generate_sample(tmp_path / "again", seed=3, **SMALL)
    generate_sample(tmp_path / "other", seed=4, **SMALL)
    for name in (layout.TRAIN_IMAGES, layout.CLICKS, layout.TRUTH, layout.TEST_IMAGES):
        assert (tmp_path / "again" / name).read_bytes() == (sample / name).read_bytes(), name
        assert (tmp_path / "other" / name).read_bytes() != (sample / name).read_bytes(), name


def test_the_sample_pool_spawns_its_workers(monkeypatch) -> None:
    """A forked worker inherits this process's threads' locks and signal handlers: it can hang."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    with sample_module._pool() as pool:
        assert pool._mp_context.get_start_method() == "spawn"


def test_worker_processes_write_the_bytes_of_one_process(tmp_path: Path, monkeypatch) -> None:
    # the images are drawn in a process per core: 3 spawned workers or none, the files are the same
    monkeypatch.setattr(sample_module, "_pool", lambda: ProcessPoolExecutor(3, mp_context=mp.get_context("spawn")))
    generate_sample(tmp_path / "pool", seed=3, **SMALL)
    monkeypatch.setattr(sample_module, "_pool", lambda: contextlib.nullcontext(sample_module._Serial()))
    generate_sample(tmp_path / "serial", seed=3, **SMALL)
    for name in (layout.TRAIN_IMAGES, layout.CLICKS, layout.TRUTH, layout.TEST_IMAGES, layout.TEST_LABELS):
        assert (tmp_path / "serial" / name).read_bytes() == (tmp_path / "pool" / name).read_bytes(), name


def test_click_log_carries_the_promised_noise(tmp_path: Path) -> None:
    generate_sample(tmp_path, seed=0, **{**SMALL, "n_train": 600})
    clicks = read(tmp_path / layout.CLICKS, ["key", "query", "clicks"])
    truth = read(tmp_path / layout.TRUTH, ["key", "breed"]).set_index("key")["breed"]
    clicks["true"] = clicks["key"].map(truth)
    dogs = clicks[clicks["true"] != "distractor"]
    own = dogs.apply(lambda r: r["true"] in r["query"].lower() or r["true"] + "s" in r["query"].lower(), axis=1)
    family = {b.name: b.family for b in BREEDS}
    # look-alike clicks: a query naming another breed of the same family
    lookalike = dogs[~own].apply(lambda r: any(family[b] == family[r["true"]] and b != r["true"]
                                               and b in r["query"].lower() for b in BREED_NAMES), axis=1)
    assert 0.05 < lookalike.sum() / dogs["key"].nunique() < 0.4
    distractors = clicks[clicks["true"] == "distractor"]
    assert distractors["clicks"].astype(int).max() <= 2
    counts = dogs.groupby("key")["clicks"].apply(lambda c: c.astype(int).sum())
    assert counts.max() > 20 * counts.median()  # heavy tail
    assert clicks["query"].str.contains("picures|pictues|imagenes|1920x1080").any()


def test_download_stage_writes_checksummed_sample(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(
        "data:\n  source: sample\n  seed: 1\n  sample: {n_train: 24, test_per_breed: 1, min_side: 64, max_side: 64,"
        " lookalike_share: 0.25, lookalike_only_share: 0.4, best_known_share: 0.5, distractor_share: 0.1,"
        " no_breed_query_share: 0.05}\n"
        "  files: {}\n  retries: 1\n  timeout_s: 5\n  max_download_mb: 1\n")
    old = Path.cwd()
    os.chdir(tmp_path)
    try:
        download.main(["data/raw"])
    finally:
        os.chdir(old)
    raw = tmp_path / "data" / "raw"
    sums = dict(line.split("  ")[::-1] for line in (raw / layout.CHECKSUMS).read_text().split("\n") if line)
    assert set(sums) == {*layout.RAW_FILES, *layout.OPTIONAL_RAW_FILES}  # the sample has a click log and truth
    assert sums[layout.CLICKS] == sha256_file(raw / layout.CLICKS)
    assert [p.name for p in raw.parent.iterdir()] == ["raw"]  # no temporary folder left behind


def test_bad_source_is_refused(tmp_path: Path) -> None:
    sample = {"n_train": 24, "test_per_breed": 1, "min_side": 64, "max_side": 64, "lookalike_share": 0.25,
              "lookalike_only_share": 0.4, "best_known_share": 0.5, "distractor_share": 0.1,
              "no_breed_query_share": 0.05}
    data = {"source": "ftp", "seed": 0, "sample": sample, "files": {}, "retries": 1, "timeout_s": 5,
            "max_download_mb": 1}
    with pytest.raises(ValueError, match=r"data.source: must be one of \['sample', 'url', 'path'\], got 'ftp'"):
        download.DataConfig.from_params(data, "data")


def test_lookalike_clicks_lean_to_the_best_known_breed() -> None:
    def named(true_breed: str, seed: int, **shares) -> list[str]:
        rows = click_rows("k", true_breed, np.random.default_rng(seed), no_breed_query_share=0.0, **shares)
        alias = {q: b for b, queries in ALIAS_QUERIES.items() for q in queries}
        return [alias.get(q) or next(b for b in BREED_NAMES if b in q.lower()) for _, q, _ in rows if " vs " not in q]

    always = dict(lookalike_share=1.0, lookalike_only_share=1.0, best_known_share=1.0)
    # a labrador clicked only under a look-alike: always the family's best-known, golden
    assert {tuple(named("labrador retriever", s, **always)) for s in range(50)} == {("golden retriever",)}
    # the best-known breed itself is confused with either of the others
    assert {tuple(named("golden retriever", s, **always)) for s in range(50)} == \
        {("labrador retriever",), ("chesapeake bay retriever",)}
    # without the lean, both look-alikes are drawn
    even = {**always, "best_known_share": 0.0}
    assert {tuple(named("labrador retriever", s, **even)) for s in range(50)} == \
        {("golden retriever",), ("chesapeake bay retriever",)}
    # "also": the own breed keeps its (larger) clicks beside the look-alike's
    also = {**always, "lookalike_only_share": 0.0}
    assert all(set(named("basset hound", s, **also)) == {"basset hound", "beagle"} for s in range(20))
