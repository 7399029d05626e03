"""filter_clicks: the query normaliser, the click filter, bad input, the stage."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from stages.lib import clicklog, layout
from stages.lib.clicklog import aggregate_clicks
from stages.lib.labelquality import label_quality, table_quality
from stages.lib.queries import MULTIPLE_BREEDS, NO_BREED, BreedMatcher, normalize_query
from stages.lib.weaklabels import (
    AMBIGUOUS,
    CLASS_TOO_SMALL,
    NO_BREED_LABEL,
    NO_BREED_QUERY,
    NO_CLICKS,
    NO_DECODED_IMAGE,
    TOO_FEW_CLICKS,
    UNKNOWN_BREED,
    find_weak_labels,
    labels_from_column,
)

ROOT = Path(__file__).resolve().parents[1]
BREEDS = ["golden retriever", "labrador retriever", "basset hound", "shih-tzu", "lhasa apso", "great pyrenees",
          "maltese dog", "bernese mountain dog", "collie", "siberian husky", "pug", "bull terrier",
          "staffordshire bull terrier", "yorkshire terrier"]
ALIASES = {"lab": "labrador retriever", "yorkie": "yorkshire terrier", "husky": "siberian husky"}


@pytest.fixture(scope="module")
def matcher() -> BreedMatcher:
    return BreedMatcher(BREEDS, ALIASES)


# ------------------------------------------------------------------ queries
@pytest.mark.parametrize("query, normalised, breeds", [
    ("golden retriever", "golden retriever", ["golden retriever"]),
    ("Golden Retrievers Puppies 1920x1080", "golden retriever", ["golden retriever"]),
    ("GOLDEN  RETRIEVER   pictures!!!", "golden retriever", ["golden retriever"]),
    ("ＧＯＬＤＥＮ　ＲＥＴＲＩＥＶＥＲ", "golden retriever", ["golden retriever"]),   # NFKC full width
    ("golden-retriever_wallpaper 2016", "golden retriever", ["golden retriever"]),
    ("golden retriever picures", "golden retriever", ["golden retriever"]),          # misspelt filler
    ("golden retriever pictues", "golden retriever", ["golden retriever"]),
    ("golden retriever imagenes", "golden retriever", ["golden retriever"]),
    ("golden retriever pictrues hd", "golden retriever", ["golden retriever"]),      # one edit away
    ("golden retriever 1920 x 1080 4k", "golden retriever", ["golden retriever"]),
    ("cute lab puppies", "lab", ["labrador retriever"]),                            # alias
    ("yellow labs", "yellow lab", ["labrador retriever"]),                          # alias plural
    ("Yorkies photos", "yorkie", ["yorkshire terrier"]),                            # ies -> ie (known word)
    ("huskies puppy", "husky", ["siberian husky"]),                                 # ies -> y (known word)
    ("collies", "collie", ["collie"]),
    ("basset hounds", "basset hound", ["basset hound"]),                            # basset: no s to strip
    ("Shih Tzus", "shih tzu", ["shih-tzu"]),                                        # hyphen in the name
    ("lhasa apsos", "lhasa apso", ["lhasa apso"]),
    ("great pyrenees dogs", "great pyrenees", ["great pyrenees"]),                  # name ending in s kept
    ("maltese puppies", "maltese", ["maltese dog"]),                                # filler inside a name
    ("Bernese Mountain Dogs", "bernese mountain", ["bernese mountain dog"]),
    ("staffordshire bull terriers", "staffordshire bull terrier", ["staffordshire bull terrier"]),  # longest
    ("bull terrier", "bull terrier", ["bull terrier"]),
    ("pug's toys", "pug toy", ["pug"]),                                             # apostrophe
    ("golden retriever vs labrador retriever", "golden retriever vs labrador retriever",
     ["golden retriever", "labrador retriever"]),                                   # two breeds
    ("pug and lab", "pug and lab", ["pug", "labrador retriever"]),
    ("golden retriever golden retrievers", "golden retriever golden retriever", ["golden retriever"]),
    ("labrador", "labrador", []),                                                   # word boundary
    ("labradoodle pictures", "labradoodle", []),
    ("cute dog pictures 2016", "", []),                                             # no breed
    ("", "", []),
])
def test_normaliser_and_matcher(matcher, query, normalised, breeds):
    assert matcher.normalize(query) == normalised
    assert [matcher.breeds[i] for i in matcher.match(query)] == breeds


def test_classify_codes(matcher):
    assert matcher.classify("pugs") == BREEDS.index("pug")
    assert matcher.classify("dog pictures") == NO_BREED
    assert matcher.classify("pug vs collie") == MULTIPLE_BREEDS


def test_normalize_query_without_vocabulary():
    assert normalize_query("Golden Retrievers Puppies 1920x1080") == "golden retriever"
    assert normalize_query("cute lab picures (2016)!") == "lab"


@pytest.mark.parametrize("breeds, aliases", [
    (["pug"], {"puggle": "beagle"}),                 # alias of an unknown breed
    (["pug", "dog"], {}),                            # a name of filler words only
    (["shih tzu", "shih-tzu"], {}),                  # two names, one phrase
    (["pug", "collie"], {"pug": "collie"}),          # alias clashing with a breed
])
def test_matcher_rejects_bad_vocabulary(breeds, aliases):
    with pytest.raises(ValueError):
        BreedMatcher(breeds, aliases)


def test_sample_generator_queries_match_their_breed():
    sample = pytest.importorskip("stages.lib.sample")
    aliases = yaml.safe_load((ROOT / "params.yaml").read_text())["filter"]["aliases"]
    m = BreedMatcher(list(sample.BREED_NAMES),
                     {a: b for a, b in aliases.items() if b in sample.BREED_NAMES})
    for code, breed in enumerate(sample.BREED_NAMES):
        for template in sample.OWN_QUERY_TEMPLATES:
            assert m.classify(template.format(b=breed, B=breed.title())) == code, template
        for query in sample.ALIAS_QUERIES.get(breed, ()):
            assert m.classify(query) == code, query
    assert all(m.classify(q) == NO_BREED for q in sample.NO_BREED_QUERIES)


# ------------------------------------------------------------- the click log
def write_log(path: Path, lines: list[str | bytes]) -> Path:
    path.write_bytes(b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines))
    return path


def test_malformed_lines_counted_not_fatal(tmp_path, matcher):
    log = write_log(tmp_path / "clicks.tsv", [
        "k1\tgolden retriever\t3",
        "k1\tgolden retriever\t2",          # duplicate (key, query): summed
        "k1\tGolden Retrievers\t1",         # another query of the same breed
        "k2\tpug\t1\textra",                # wrong column count
        "k2 pug 1",                         # wrong column count (spaces, not tabs)
        "",                                 # empty line
        b"k3\tpug\xff\xfe\t2",              # non-UTF-8
        "k4\tpug\ttwo",                     # non-integer clicks
        "k4\tpug\t2.5",
        "k4\tpug\t0",                       # non-positive clicks
        "k4\tpug\t-3",
        "\tpug\t4",                         # empty key
        "k5\tcaniche\t2",                   # valid, names no breed
        "k6\tmaltese \u00e9t\u00e9\t 4 ",   # valid UTF-8, clicks with spaces
        "a\rk5\tpug\t3",                    # a lone CR inside a key: not a line end
        '"k7\tpug\t3',                      # a quote: decode rejects such keys too
    ])
    agg, summary = aggregate_clicks(log, matcher, block_size=64)  # many tiny blocks
    assert summary.lines == 16 and summary.valid_lines == 5
    assert summary.malformed == {"wrong_column_count": 2, "empty_line": 1, "invalid_utf8": 1, "empty_key": 1,
                                 "bad_clicks": 2, "nonpositive_clicks": 2, "invalid_key": 2, "too_many_clicks": 0,
                                 "line_too_long": 0}
    assert summary.malformed_fraction == pytest.approx(11 / 16)
    assert summary.duplicate_lines == 1
    assert "\\xff" in summary.malformed_examples["invalid_utf8"][0]
    rows = {(r.key, r.breed): r.clicks for r in agg.itertuples()}
    assert rows == {("k1", 0): 6, ("k5", NO_BREED): 2, ("k6", BREEDS.index("maltese dog")): 4}
    assert summary.queries["no_breed"]["top"] == [["caniche", 1]]


def test_empty_log(tmp_path, matcher):
    agg, summary = aggregate_clicks(write_log(tmp_path / "c.tsv", []), matcher)
    assert agg.empty and summary.lines == 0 and summary.malformed_fraction == 0.0


# ---------------------------------------------------------------- the filter
def clicks_frame(rows: list[tuple[str, int, int]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["key", "breed", "clicks"]).astype({"breed": np.int16, "clicks": np.int64})


GOLDEN, LAB, PUG = 0, 1, BREEDS.index("pug")
HAND_LOG = clicks_frame([
    ("keep", GOLDEN, 9), ("keep", LAB, 1),                  # share 0.9: kept as golden
    ("keep2", GOLDEN, 2),                                   # exactly min_clicks, share 1
    ("keep3", GOLDEN, 7), ("keep3", LAB, 3),                # share exactly 0.7: kept
    ("keep3", NO_BREED, 50),                                # no-breed clicks do not dilute the share
    ("few", GOLDEN, 1),                                     # too few clicks
    ("tie", LAB, 4), ("tie", GOLDEN, 4),                    # tie at the top: ambiguous even at share 0.5
    ("low", GOLDEN, 6), ("low", LAB, 4),                    # share 0.6 < 0.7: ambiguous
    ("nob", NO_BREED, 10), ("nob", MULTIPLE_BREEDS, 3),     # only no-breed / several-breed queries
    ("test_img", GOLDEN, 50),                               # not a decoded training image
    ("lonely_pug", PUG, 5),                                 # the only pug: class too small
    ("dup", GOLDEN, 1), ("dup", GOLDEN, 2),                 # repeated rows are summed (3 clicks)
])
TRAIN = ["keep", "keep2", "keep3", "few", "tie", "low", "nob", "lonely_pug", "dup", "silent"]


def test_filter_known_answers():
    weak = find_weak_labels(HAND_LOG, BREEDS, train_keys=TRAIN, min_clicks=2, min_share=0.7,
                            min_images_per_class=2)
    assert weak.classes == ["golden retriever"]
    kept = weak.kept.set_index("key")
    assert sorted(kept.index) == ["dup", "keep", "keep2", "keep3"]
    assert (kept["label"] == 0).all() and (kept["breed"] == "golden retriever").all()
    assert kept.loc["keep", "clicks"] == 9 and kept.loc["keep", "share"] == pytest.approx(0.9)
    assert kept.loc["dup", "clicks"] == 3
    reasons = weak.dropped.set_index("key")["reason"].to_dict()
    assert reasons == {"few": TOO_FEW_CLICKS, "tie": AMBIGUOUS, "low": AMBIGUOUS, "nob": NO_BREED_QUERY,
                       "test_img": NO_DECODED_IMAGE, "lonely_pug": CLASS_TOO_SMALL, "silent": NO_CLICKS}
    # raw labels: every decoded image with a breed click, top breed, no thresholds;
    # a tie goes to the lower breed code; a breed outside the classes gets label -1
    raw = weak.raw.set_index("key")
    assert sorted(raw.index) == ["dup", "few", "keep", "keep2", "keep3", "lonely_pug", "low", "tie"]
    assert raw.loc["tie", "breed"] == "golden retriever" and raw.loc["lonely_pug", "label"] == -1
    per_class = weak.per_class.set_index("breed")
    assert per_class.loc["golden retriever"].tolist() == [7, 4, 4]  # raw, passed, kept
    assert per_class.loc["pug"].tolist() == [1, 1, 0]


def test_labels_from_an_image_files_breed_column(matcher):
    # a release without a click log: each image's breed cell, matched as a query is
    cells = {"g1": "Golden_Retriever", "g2": "golden retrievers", "g3": "GOLDEN RETRIEVER", "l1": "lab",
             "l2": "Labrador Retriever", "l3": "labrador_retriever", "e": "", "x": "cute dog pictures",
             "two": "pug and lab", "p1": "pug"}
    keys = pd.Series(list(cells))
    weak = labels_from_column(keys, pd.Series(list(cells.values())), BREEDS, matcher.classify,
                              min_images_per_class=2)
    assert weak.classes == ["golden retriever", "labrador retriever"]
    kept = weak.kept.set_index("key")
    assert kept["breed"].to_dict() == {"g1": "golden retriever", "g2": "golden retriever", "g3": "golden retriever",
                                       "l1": "labrador retriever", "l2": "labrador retriever",
                                       "l3": "labrador retriever"}
    assert kept["label"].to_dict() == {"g1": 0, "g2": 0, "g3": 0, "l1": 1, "l2": 1, "l3": 1}
    assert kept["clicks"].isna().all() and kept["share"].isna().all()  # no click counts: unknown, not zero
    assert weak.dropped.set_index("key")["reason"].to_dict() == {
        "e": NO_BREED_LABEL, "x": UNKNOWN_BREED, "two": UNKNOWN_BREED, "p1": CLASS_TOO_SMALL}
    # raw: every image whose cell names one breed, the lone pug too (label -1: no class)
    assert sorted(weak.raw["key"]) == ["g1", "g2", "g3", "l1", "l2", "l3", "p1"]
    assert weak.per_class.set_index("breed").loc["pug"].tolist() == [1, 1, 0]


def test_filter_thresholds_move_the_answer():
    weak = find_weak_labels(HAND_LOG, BREEDS, train_keys=TRAIN, min_clicks=1, min_share=0.5)
    assert "tie" not in set(weak.kept["key"])             # a tie is never enough
    assert {"few", "low", "lonely_pug"} <= set(weak.kept["key"])
    assert weak.classes == ["golden retriever", "pug"]     # breeds.tsv order
    assert weak.kept.set_index("key").loc["lonely_pug", "label"] == 1


def test_filter_without_train_keys_counts_every_clicked_key():
    weak = find_weak_labels(HAND_LOG, BREEDS, min_clicks=2, min_share=0.7)
    assert "test_img" in set(weak.kept["key"])


@pytest.mark.parametrize("kwargs", [dict(min_clicks=0), dict(min_share=1.5), dict(min_share=-0.1),
                                    dict(min_images_per_class=0), dict(min_clicks=1.5)])
def test_filter_rejects_bad_options(kwargs):
    with pytest.raises(ValueError):
        find_weak_labels(HAND_LOG, BREEDS, **kwargs)


@pytest.mark.parametrize("rows", [[("k", len(BREEDS), 1)], [("k", -3, 1)], [("k", 0, 0)]])
def test_filter_rejects_bad_clicks_frame(rows):
    with pytest.raises(ValueError):
        find_weak_labels(clicks_frame(rows), BREEDS)


def test_label_quality_definitions():
    weak = find_weak_labels(HAND_LOG, BREEDS, train_keys=TRAIN, min_clicks=2, min_share=0.7)
    truth = pd.Series({"keep": "golden retriever", "keep2": "distractor", "keep3": "labrador retriever",
                       "few": "golden retriever", "tie": "labrador retriever", "low": "golden retriever",
                       "dup": "golden retriever", "lonely_pug": "pug", "nob": "pug"})
    q = label_quality(weak, truth)
    # raw: 8 labelled; correct: keep, few, low, dup, lonely_pug (tie went to golden: wrong)
    assert q["raw"] == {"labelled": 8, "correct": 5, "distractors": 1, "precision": 0.625, "recall": 1.0,
                        "coverage": round(5 / 8, 4)}
    # kept: keep, keep2, keep3, dup, lonely_pug (min_images_per_class=1); correct: keep, dup, lonely_pug
    assert q["filtered"] == {"labelled": 5, "correct": 3, "distractors": 1, "precision": 0.6, "recall": 0.6,
                             "coverage": round(3 / 8, 4)}
    # make_pairs' form (label tables, labels possibly changed) gives the same numbers
    for name, table in (("raw", weak.raw), ("filtered", weak.kept)):
        t = table_quality(table, weak.raw, truth)
        assert (t["images"], t["correct"], t["distractors"], t["precision"], t["recall"]) == \
            (q[name]["labelled"], q[name]["correct"], q[name]["distractors"], q[name]["precision"], q[name]["recall"])
    # rounded as label_quality rounds (metrics.json showed 0.8844519966015293 beside 0.6605)
    thirds = table_quality(weak.raw[weak.raw["key"].isin(["keep", "keep2", "tie"])], weak.raw, truth)
    assert thirds["precision"] == 0.3333


# ------------------------------------------------------------- generated sample
@pytest.fixture(scope="module")
def sample_raw(tmp_path_factory) -> Path:
    sample = pytest.importorskip("stages.lib.sample")
    out = tmp_path_factory.mktemp("sample")
    sample.generate_sample(out, seed=0, n_train=360, test_per_breed=1, min_side=32, max_side=32,
                           lookalike_share=0.25, lookalike_only_share=0.4, best_known_share=0.5,
                           distractor_share=0.10, no_breed_query_share=0.05)
    return out


def test_filter_raises_precision_on_generated_sample(sample_raw):
    from stages.lib.tables import read_breeds, read_truth
    breeds = read_breeds(sample_raw / layout.BREEDS)
    truth = read_truth(sample_raw / layout.TRUTH)
    aliases = yaml.safe_load((ROOT / "params.yaml").read_text())["filter"]["aliases"]
    matcher = BreedMatcher(breeds, {a: b for a, b in aliases.items() if b in breeds})
    agg, summary = aggregate_clicks(sample_raw / layout.CLICKS, matcher)
    assert summary.malformed_fraction == 0.0
    weak = find_weak_labels(agg, breeds, train_keys=truth.index, min_clicks=2, min_share=0.7,
                            min_images_per_class=5)
    q = label_quality(weak, truth)
    assert q["raw"]["labelled"] >= 340  # nearly every image has a breed click
    assert q["filtered"]["precision"] > q["raw"]["precision"] + 0.03
    assert q["filtered"]["distractors"] < q["raw"]["distractors"]
    assert 0.5 < q["filtered"]["recall"] < 1.0


# ------------------------------------------------------------------ the stage
def make_stage_inputs(root: Path, *, filter_params: dict | None = None, bad_lines: int = 0) -> Path:
    raw, images = root / "data/raw", root / "data/images"
    raw.mkdir(parents=True)
    images.mkdir(parents=True)
    (raw / layout.BREEDS).write_text("golden retriever\t0\nlabrador retriever\t1\npug\t2\nbeagle\t3\n")
    lines = [f"g{i}\tgolden retrievers\t{3 + i % 4}" for i in range(6)]
    lines += [f"l{i}\tcute lab puppies\t5" for i in range(6)] + [f"l{i}\tlabrador retriever\t1" for i in range(3)]
    lines += ["p0\tpug\t9", "x0\tpug vs beagle\t2", "n0\tdog pictures\t4", "t0\tgolden retriever\t8",
              "g0\tlabrador retriever\t1", "g1\tgolden retriever\t1"] + ["bad"] * bad_lines
    (raw / layout.CLICKS).write_text("\n".join(lines) + "\n")
    (raw / layout.TRUTH).write_text("\n".join([f"g{i}\tgolden retriever" for i in range(6)]
                                              + [f"l{i}\tlabrador retriever" for i in range(5)]
                                              + ["l5\tdistractor", "p0\tpug", "x0\tbeagle", "n0\tpug"]) + "\n")
    keys = [f"g{i}" for i in range(6)] + [f"l{i}" for i in range(6)] + ["p0", "x0", "n0", "nc0"]
    pd.DataFrame({"key": keys + ["t0"], "split": ["train"] * len(keys) + ["test"]}).to_parquet(
        images / layout.INDEX)
    params = {"min_clicks": 2, "min_share": 0.7, "min_images_per_class": 3, "min_kept_share": 0.1,
              "max_reject_fraction": 0.05, "max_clicks_per_line": 1000, "max_line_bytes": 4096,
              "aliases": {"lab": "labrador retriever", "yorkie": "yorkshire terrier"}, **(filter_params or {})}
    (root / "params.yaml").write_text(yaml.safe_dump({"filter": params}))
    return root


def run_stage(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.filter_clicks", *args], cwd=root, text=True,
                          capture_output=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_stage_end_to_end(tmp_path):
    root = make_stage_inputs(tmp_path)
    proc = run_stage(root, "data/raw", "data/images", "data/filtered")
    assert proc.returncode == 0, proc.stderr
    out = root / "data/filtered"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [layout.LABELS, layout.RAW_LABELS, layout.DROPPED, layout.CLASSES, layout.REPORT])
    assert json.loads((out / layout.CLASSES).read_text()) == ["golden retriever", "labrador retriever"]
    labels = pd.read_csv(out / layout.LABELS, sep="\t")
    assert list(labels.columns) == ["key", "label", "breed", "clicks", "share"]
    assert sorted(labels["key"]) == [f"g{i}" for i in range(6)] + [f"l{i}" for i in range(6)]
    assert set(zip(labels["breed"], labels["label"])) == {("golden retriever", 0), ("labrador retriever", 1)}
    dropped = pd.read_csv(out / layout.DROPPED, sep="\t", keep_default_na=False).set_index("key")["reason"]
    assert dropped.to_dict() == {"p0": CLASS_TOO_SMALL, "x0": NO_BREED_QUERY, "n0": NO_BREED_QUERY,
                                 "nc0": NO_CLICKS, "t0": NO_DECODED_IMAGE}
    assert len(pd.read_csv(out / layout.RAW_LABELS, sep="\t")) == 13
    report = json.loads((out / layout.REPORT).read_text())
    assert report["lines"]["total"] == 21 and report["lines"]["malformed_fraction"] == 0
    assert report["queries"]["multiple_breeds"]["queries"] == 1
    assert report["queries"]["no_breed"]["queries"] == 1
    assert report["images"]["dropped"][CLASS_TOO_SMALL] == 1
    assert report["per_class"]["pug"] == {"raw": 1, "passed": 1, "kept": 0}
    assert report["quality"]["filtered"]["precision"] == pytest.approx(11 / 12, abs=1e-4)
    assert report["quality"]["raw"]["precision"] == pytest.approx(12 / 13, abs=1e-4)
    assert "yorkshire terrier" in proc.stderr  # the skipped alias is reported


def test_stage_fails_clearly_on_too_many_malformed_lines(tmp_path):
    root = make_stage_inputs(tmp_path, bad_lines=3)  # 3 of 24 lines > 5 %
    proc = run_stage(root, "data/raw", "data/images", "data/filtered")
    assert proc.returncode != 0
    assert "malformed" in proc.stderr and "max_reject_fraction" in proc.stderr
    assert not (root / "data/filtered").exists()


def test_stage_sweep(tmp_path, monkeypatch, capsys):
    from stages import filter_clicks
    root = make_stage_inputs(tmp_path, filter_params={"min_images_per_class": 1})
    monkeypatch.chdir(root)
    assert filter_clicks.main(["data/raw", "data/images", "--sweep", "sweep"]) == 0
    table = pd.read_csv(root / "sweep/filter_sweep.csv")
    assert list(table.columns) == ["min_clicks", "min_share", "kept", "classes", "precision", "recall", "coverage"]
    assert len(table) == 1 + 6 * 6 and table["kept"].iloc[0] == 13
    assert (root / "sweep/filter_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (root / "sweep/filter_sweep.md").read_text().startswith("| min_clicks")
    assert "precision" in capsys.readouterr().out


def test_dvc_stage_depends_on_the_filter_section_alone():
    """Changing a filter.* key (or adding a misspelt one) re-runs this stage and
    its dependants only (its code deps: tests/test_wiring.py)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert stages["filter_clicks"]["params"] == ["filter"]
    assert all(not any(str(p).split(".")[0] == "filter" for p in s.get("params", []))
               for name, s in stages.items() if name != "filter_clicks")


def test_key_hash_same_for_fixed_and_mixed_length_blocks():
    """Equal-length keys take a fast path: it must give the same hash, or one
    image would get two ids (its clicks split) across blocks."""
    import pyarrow as pa

    from stages.lib.keyagg import hash_strings
    fixed = pa.array(["abcdefghijk", "abcdefghijl", "zzzzzzzzzzz"])
    mixed = pa.array(["", "abcdefghijk", "x", "abcdefghijl", "zzzzzzzzzzz", "\u00e9" * 20])
    h_fixed, h_mixed = hash_strings(fixed), hash_strings(mixed)
    assert (h_fixed == h_mixed[[1, 3, 4]]).all()
    assert len(set(h_mixed.tolist())) == len(mixed)


def test_same_key_across_blocks_of_both_kinds(tmp_path, matcher):
    lines = [f"k{i:02d}\tpug\t1" for i in range(30)] + ["long_key_0\tpug\t1", "k05\tpug\t2", "k05\tpugs\t4"]
    agg, _ = aggregate_clicks(write_log(tmp_path / "c.tsv", lines), matcher, block_size=40)
    assert agg["key"].is_unique and agg.set_index("key").loc["k05", "clicks"] == 7


@pytest.mark.parametrize("bad", [{"min_share": 1.5}, {"min_clicks": 0}, {"aliases": ["lab"]},
                                 {"aliases": {"lab": "poodle"}, "min_images_per_class": 4}])
def test_stage_rejects_bad_params_clearly(tmp_path, monkeypatch, bad):
    from stages import filter_clicks
    root = make_stage_inputs(tmp_path, filter_params=bad)
    monkeypatch.chdir(root)
    if bad.get("aliases") == {"lab": "poodle"}:  # an alias of a breed not in breeds.tsv: skipped
        assert filter_clicks.main(["data/raw", "data/images", "out"]) == 0
        return
    with pytest.raises(SystemExit, match="params.yaml: filter"):
        filter_clicks.main(["data/raw", "data/images", "out"])


def test_thresholds_that_keep_too_little_stop_the_stage(tmp_path, monkeypatch):
    """Thresholds that keep less than filter.min_kept_share of the clicked
    images stop the stage with the numbers (an emptied class too: test_noise)."""
    from stages import filter_clicks
    root = make_stage_inputs(tmp_path, filter_params={"min_kept_share": 0.99})
    monkeypatch.chdir(root)
    with pytest.raises(SystemExit, match=r"filter_clicks: the filter leaves too little.*below min_kept_share 99%.*"
                                         r"Loosen filter\.min_clicks"):
        filter_clicks.main(["data/raw", "data/images", "out"])
    assert not (root / "out").exists()


@pytest.mark.parametrize("block_size", [37, 38, 64, 1 << 20])  # CR and LF on both sides of a block boundary
def test_crlf_logs_read_like_lf_logs(tmp_path, matcher, block_size):
    lines = [f"k{i}\tpug\t{i + 1}" for i in range(20)] + ["k3\tgolden retriever\t2"]
    lf, _ = aggregate_clicks(write_log(tmp_path / "lf.tsv", lines), matcher)
    crlf_path = tmp_path / "crlf.tsv"
    crlf_path.write_bytes(b"".join(ln.encode() + b"\r\n" for ln in lines))
    crlf, summary = aggregate_clicks(crlf_path, matcher, block_size=block_size)
    assert summary.valid_lines == len(lines) and sum(summary.malformed.values()) == 0
    assert crlf.astype({"key": str}).equals(lf.astype({"key": str}))


def test_huge_click_counts_are_malformed_and_sums_are_checked(tmp_path, matcher, monkeypatch):
    # ten lines of 999999999999999999 clicks summed to -8.4e18 (int64 overflow)
    lines = ["k1\tpug\t999999999999999999"] * 10 + ["k2\tpug\t3", "k3\tpug\t1000"]
    agg, summary = aggregate_clicks(write_log(tmp_path / "c.tsv", lines), matcher, max_clicks=1000)
    assert summary.malformed["too_many_clicks"] == 10 and summary.valid_lines == 2
    assert {r.key: r.clicks for r in agg.itertuples()} == {"k2": 3, "k3": 1000}
    monkeypatch.setattr(clicklog, "_MAX_TOTAL_CLICKS", 1002)  # as if the log summed past int64
    with pytest.raises(ValueError, match=r"c.tsv: the clicks total 1003 by line 12, past what int64 sums hold"):
        aggregate_clicks(tmp_path / "c.tsv", matcher, max_clicks=1000)


@pytest.mark.parametrize("block_size", [4096, 1 << 20])
def test_over_long_click_lines_are_counted_not_fatal(tmp_path, matcher, block_size):
    good = [f"k{i}\tpug\t{i + 1}" for i in range(30)]
    long = "x" * 9000 + "\tpug\t1"  # over the block: pyarrow's parser stopped the stage here
    lines = good[:10] + [long] + good[10:20] + [long, long] + good[20:] + ["k0\t" + "pug " * 600 + "\t2"]
    path = write_log(tmp_path / "c.tsv", lines)
    path.write_bytes(path.read_bytes() + b"y" * 5000)  # and a last over-long line without a newline
    agg, summary = aggregate_clicks(path, matcher, max_line_bytes=2000, block_size=block_size)
    assert summary.malformed["line_too_long"] == 5 and summary.lines == 35 and summary.valid_lines == 30
    want, _ = aggregate_clicks(write_log(tmp_path / "good.tsv", good), matcher)
    assert agg.astype({"key": str}).equals(want.astype({"key": str}))
    with pytest.raises(ValueError, match="max_line_bytes must be in"):
        aggregate_clicks(path, matcher, max_line_bytes=4096, block_size=4096)
