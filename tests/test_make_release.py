"""scripts/make_release.py: a labelled photo folder -> a Clickture-format release with the sample's click noise,
that decode, filter_clicks' click-log reader and ``data.source: path`` accept. Generated images, seconds."""
from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import load_script
from PIL import Image

from stages.lib import layout, release, sample
from stages.lib.clicklog import aggregate_clicks
from stages.lib.decoding import decode_dataset
from stages.lib.fetch import fetch_raw
from stages.lib.params import load_params
from stages.lib.queries import BreedMatcher
from stages.lib.release import Noise, click_rows, read_families, resolve_families
from stages.lib.shards import read_index
from stages.lib.tables import read_breeds, read_headerless

ROOT = Path(__file__).resolve().parents[1]
make_release = load_script("make_release")

BREEDS = {"golden_retriever": (200, 150, 50), "labrador_retriever": (225, 205, 130), "Pug": (110, 95, 80)}
FAMILIES = "families:\n  - [golden_retriever, labrador_retriever]   # pug: in no family\n"
KEY = re.compile(r"[A-Za-z0-9]{24}")  # the sample's keys


def photo(path: Path, colour: tuple[int, int, int], seed: int, size: tuple[int, int] = (90, 60)) -> None:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour) + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path)


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """3 breeds x 6 photos (one a PNG with transparency, one large), a text file and a broken .jpg."""
    root = tmp_path / "photos"
    for b, (name, colour) in enumerate(BREEDS.items()):
        (root / name).mkdir(parents=True)
        for i in range(6):
            photo(root / name / f"IMG_{i:03d}.jpg", colour, 10 * b + i, (400, 300) if i == 0 else (90, 60))
    Image.new("RGBA", (70, 50), (0, 0, 0, 0)).save(root / "Pug" / "IMG_006.png")
    (root / "Pug" / "notes.txt").write_text("not a photo")
    (root / "Pug" / "IMG_007.jpg").write_bytes(b"not a jpeg either")
    (root / ".hidden").mkdir()
    (tmp_path / "families.yaml").write_text(FAMILIES)
    return root


def run(photos: Path, out: Path, *args: str) -> dict:
    argv = [str(photos), str(out), "--families", str(photos.parent / "families.yaml"), "--max-short-side", "48",
            *args]
    assert make_release.main(argv) == 0
    return json.loads((out / release.MANIFEST).read_text())


def pairs(path: Path) -> dict[str, str]:
    return dict(read_headerless(path, ["key", "value"]).itertuples(index=False))


def test_a_photo_folder_becomes_a_release_the_pipeline_reads(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "release"
    manifest = run(photos, out, "--test-per-breed", "2")
    assert {layout.TRAIN_IMAGES, layout.TEST_IMAGES, layout.TEST_LABELS, layout.CLICKS, layout.BREEDS,
            layout.TRUTH} <= {p.name for p in out.iterdir()}
    assert read_breeds(out / layout.BREEDS) == ["golden retriever", "labrador retriever", "pug"]
    truth, test = pairs(out / layout.TRUTH), pairs(out / layout.TEST_LABELS)
    # a clean test split of 2 per breed; the rest trains; the broken file is skipped and said so
    assert collections.Counter(test.values()) == {"golden retriever": 2, "labrador retriever": 2, "pug": 2}
    assert collections.Counter(truth.values()) == {"golden retriever": 4, "labrador retriever": 4, "pug": 5}
    assert [s["file"] for s in manifest["skipped"]] == ["Pug/IMG_007.jpg"]
    assert manifest["passed_over"] == ["Pug/notes.txt"]
    assert manifest["images"]["per_breed"]["pug"] == {"train": 5, "test": 2}
    keys = [*truth, *test]
    assert len(set(keys)) == len(keys) and all(KEY.fullmatch(k) for k in keys)
    sources = read_headerless(out / release.SOURCES, ["key", "split", "truth", "file"]).iloc[1:]
    assert set(sources["key"]) == set(keys) and not any("IMG" in k for k in keys)  # keys say nothing of files
    for key, split, true, file in sources.itertuples(index=False):
        assert (test if split == "test" else truth)[key] == true
        assert file.split("/")[0].replace("_", " ").lower() == true
    # the click log: only training images, read by filter_clicks' reader without a malformed line
    matcher = BreedMatcher(read_breeds(out / layout.BREEDS))
    clicks, summary = aggregate_clicks(out / layout.CLICKS, matcher)
    assert summary.valid_lines == summary.lines == manifest["images"]["click_lines"] > len(truth)
    assert set(clicks["key"].astype(str)) == set(truth)
    # decode with the committed params: every line an image, the short side capped, RGB JPEG
    images = tmp_path / "images"
    stats = decode_dataset(out, images, {**load_params("decode", path=ROOT / "params.yaml"), "workers": 1})
    assert stats["rejected"] == 0 and stats["images"] == 19
    index = read_index(images)
    assert index[["width", "height"]].min(axis=1).max() == 48 and set(index["key"]) == set(keys)
    assert dict(zip(index["key"], index["split"])) == {**dict.fromkeys(truth, "train"), **dict.fromkeys(test, "test")}
    # the data block: what data.source: path copies, checksums verified
    data = yaml.safe_load((out / release.DATA_PARAMS).read_text())["data"]
    assert data["source"] == "path" and data == manifest["data"]
    sums = fetch_raw(data["files"], tmp_path / "raw", source="path")
    assert set(sums) == {f"{role}.tsv" for role in data["files"]}


def test_the_same_seed_gives_the_same_bytes_and_another_seed_another_test_split(photos: Path,
                                                                                tmp_path: Path) -> None:
    run(photos, tmp_path / "a", "--seed", "3")
    run(photos, tmp_path / "b", "--seed", "3")
    for name in (layout.TRAIN_IMAGES, layout.TEST_IMAGES, layout.TEST_LABELS, layout.CLICKS, layout.TRUTH,
                 layout.BREEDS, release.SOURCES):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    run(photos, tmp_path / "c", "--seed", "4")

    def test_files(out: Path) -> set[str]:
        df = read_headerless(out / release.SOURCES, ["key", "split", "truth", "file"])
        return set(df.loc[df["split"] == "test", "file"])

    assert test_files(tmp_path / "c") != test_files(tmp_path / "a")
    assert len(test_files(tmp_path / "c")) == len(test_files(tmp_path / "a"))
    # an earlier release is replaced in place
    run(photos, tmp_path / "a", "--seed", "4")
    assert (tmp_path / "a" / layout.CLICKS).read_bytes() == (tmp_path / "c" / layout.CLICKS).read_bytes()


def test_the_confusion_stays_inside_a_family_and_runs_to_its_best_known_breed(photos: Path, tmp_path: Path) -> None:
    # every look-alike only clicked under the best-known breed, which users never confuse
    one_sided = ["--lookalike-share", "1", "--lookalike-only-share", "1", "--best-known-share", "1",
                 "--best-known-lookalike-share", "0"]
    raw = run(photos, tmp_path / "one", *one_sided)["raw_labels"]
    assert raw["per_breed"]["labrador retriever"]["right"] == 0
    assert raw["wrong_to"] == {"labrador retriever": {"golden retriever": raw["per_breed"]["labrador retriever"]
                                                      ["images"]}}
    assert raw["per_breed"]["golden retriever"]["precision"] == raw["per_breed"]["pug"]["precision"] == 1.0
    # no look-alike clicks: every raw label right
    assert run(photos, tmp_path / "none", "--lookalike-share", "0")["raw_labels"]["precision"] == 1.0


def test_distractors_come_from_a_folder_of_non_dog_photos(photos: Path, tmp_path: Path) -> None:
    other = tmp_path / "not_dogs"
    other.mkdir()
    for i in range(3):
        photo(other / f"car{i}.jpg", (40, 40, 200), 100 + i)
    manifest = run(photos, tmp_path / "release", "--distractors", str(other))
    truth = pairs(tmp_path / "release" / layout.TRUTH)
    assert manifest["images"]["distractors"] == sum(v == "distractor" for v in truth.values()) == 3
    assert "distractor" not in pairs(tmp_path / "release" / layout.TEST_LABELS).values()
    clicks = read_headerless(tmp_path / "release" / layout.CLICKS, ["key", "query", "clicks"])
    per_distractor = clicks[clicks["key"].map(truth).eq("distractor")].groupby("key")["clicks"]
    assert per_distractor.size().between(1, 2).all() and per_distractor.max().astype(int).le(2).all()


def test_the_click_model_is_the_samples() -> None:
    """On the sample's breeds and families, the release's click model draws the sample's very rows."""
    families = {b.name: [x.name for x in sample.BREEDS if x.family == b.family] for b in sample.BREEDS}
    shares = dict(lookalike_share=0.4, lookalike_only_share=0.6, best_known_share=0.8, no_breed_query_share=0.05)
    for i in range(600):
        true = None if i % 10 == 0 else sample.BREED_NAMES[i % 12]
        expected = sample.click_rows(f"k{i}", true, np.random.default_rng([7, i]), **shares)
        got = click_rows(f"k{i}", true, np.random.default_rng([7, i]), breeds=sample.BREED_NAMES,
                         family=families.get(true, []), noise=Noise(**shares))
        assert got == expected


def test_the_defaults_are_the_committed_samples() -> None:
    committed = load_params("data", path=ROOT / "params.yaml")["sample"]
    noise = Noise()
    for name in ("lookalike_share", "lookalike_only_share", "best_known_share", "no_breed_query_share"):
        assert getattr(noise, name) == committed[name]


def raw_labels(noise: Noise, families: list[list[str]], n: int) -> tuple[dict[str, int], collections.Counter]:
    """Draw ``n`` dogs per breed; return images per breed and (true, raw label) counts of the wrong ones."""
    breeds = sorted(b for f in families for b in f)
    matcher = BreedMatcher(breeds)
    family_of = {b: f for f in families for b in f}
    wrong: collections.Counter = collections.Counter()
    for i in range(n * len(breeds)):
        true = breeds[i % len(breeds)]
        clicks: collections.Counter = collections.Counter()
        for _, query, count in click_rows("k", true, np.random.default_rng([1, i]), breeds=breeds,
                                          family=family_of[true] if len(family_of[true]) > 1 else [], noise=noise):
            if (code := matcher.classify(query)) >= 0:
                clicks[code] += count
        top = max(clicks.values())
        label = breeds[min(b for b, c in clicks.items() if c == top)]
        if label != true:
            wrong[true, label] += 1
    return dict.fromkeys(breeds, n), wrong


def test_click_noise_has_the_samples_strength_and_direction() -> None:
    families = [["golden retriever", "saint bernard", "beagle"], ["toy poodle", "maltese"], ["pug"]]
    images, wrong = raw_labels(Noise(), families, 400)
    dogs_in_families = 5 * 400
    share = sum(wrong.values()) / dogs_in_families
    assert 0.25 < share < 0.32  # the sample's model: ~0.29 of its dogs' raw labels are wrong (distractors aside)
    family_of = {b: f for f in families for b in f}
    assert all(label in family_of[true] for true, label in wrong)  # never outside the family
    assert not any(true == "pug" for true, _ in wrong)  # a breed in no family is never confused
    # the look-alikes' wrong labels run to the best-known breed (0.8 + 0.2 / 2 of them)
    for true in ("saint bernard", "beagle"):
        to_best = wrong[true, "golden retriever"] / sum(n for (t, _), n in wrong.items() if t == true)
        assert to_best > 0.83
    # one-sided also in a family of two: the best-known breed's own images no longer confused
    _, wrong = raw_labels(Noise(best_known_lookalike_share=0.0), families, 200)
    assert {true for true, _ in wrong} == {"saint bernard", "beagle", "maltese"}


def test_the_default_families_fit_the_shared_dog_photos() -> None:
    breeds = ["beagle", "german shepherd", "golden retriever", "maltese", "saint bernard", "siberian husky",
              "toy poodle"]  # ../shared/dog_photos' folders; the photos themselves are not needed
    families = resolve_families(read_families(make_release.DEFAULT_FAMILIES), breeds)
    assert sorted(b for f in families for b in f) == breeds
    assert [f[0] for f in families] == ["german shepherd", "toy poodle", "golden retriever"]


@pytest.mark.parametrize(("families", "message"), [
    ("families:\n  - [golden_retriever, chihuahua]\n", "names 'chihuahua', which is no breed folder"),
    ("families:\n  - [golden_retriever, pug]\n  - [pug, labrador_retriever]\n",
     "'pug' is in look-alike families 1 and 2"),
    ("families:\n  - [pug]\n", "needs 2 or more distinct breeds"),
    ("breeds: [pug]\n", "must hold one key, families"),
])
def test_bad_families_are_refused(photos: Path, tmp_path: Path, families: str, message: str) -> None:
    (photos.parent / "families.yaml").write_text(families)
    with pytest.raises(SystemExit, match=re.escape(message)):
        make_release.main([str(photos), str(tmp_path / "out"), "--families", str(photos.parent / "families.yaml")])
    assert not (tmp_path / "out").exists()


def test_an_output_that_would_overwrite_something_else_is_refused(photos: Path, tmp_path: Path) -> None:
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.tex").write_text("keep me")
    with pytest.raises(SystemExit, match="holds no earlier release"):
        run(photos, other)
    with pytest.raises(SystemExit, match="lies inside the input PHOTOS_DIR"):
        run(photos, photos / "release")
    with pytest.raises(SystemExit, match="has 6 photos: a test split of 6 leaves none"):
        run(photos, tmp_path / "out", "--test-per-breed", "6")
    assert (other / "thesis.tex").read_text() == "keep me" and not (tmp_path / "out").exists()
