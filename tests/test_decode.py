"""decode stage: bad rows, layouts, shards, size cap, determinism, failure."""
from __future__ import annotations

import base64
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from stages.lib import decoding, layout
from stages.lib.decoding import DecodeConfig, DecodeError, Reject, decode_dataset, decode_image
from stages.lib.shards import ShardReader, read_index

REPO = Path(__file__).resolve().parents[1]

PARAMS = {
    "columns": ["key", "image"],
    "header": False,
    "max_short_side": 0,
    "max_pixels": 20_000,
    "max_line_bytes": 50_000,
    "jpeg_quality": 90,
    "shard_mb": 256,
    "workers": 1,
    "block_lines": 4,
    "max_reject_fraction": 1.0,
}


def image_bytes(w: int, h: int, seed: int = 0, fmt: str = "JPEG", mode: str = "RGB",
                **save: object) -> bytes:
    """A small deterministic image with structure (so resizes are visible)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1),
                     np.full_like(x, seed * 37 % 256)], -1)
    arr = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    # an adaptive palette: a dithered web palette would be mostly noise
    img = img.convert(mode, palette=Image.Palette.ADAPTIVE) if mode == "P" else img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def write_tsv(path: Path, lines: list[bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def good_lines(prefix: str, n: int, size: tuple[int, int] = (40, 30)) -> list[bytes]:
    return [f"{prefix}{i}".encode() + b"\t" + b64(image_bytes(*size, seed=i)) for i in range(n)]


def make_raw(tmp_path: Path, train: list[bytes], test: list[bytes] | None = None) -> Path:
    raw = tmp_path / "raw"
    write_tsv(raw / layout.TRAIN_IMAGES, train)
    write_tsv(raw / layout.TEST_IMAGES, test if test is not None else good_lines("t", 2))
    return raw


def read_rejects(images: Path) -> pd.DataFrame:
    return pd.read_csv(images / layout.REJECTS, sep="\t", dtype=str, keep_default_na=False)


def test_every_bad_row_kind_is_rejected_with_its_reason(tmp_path: Path) -> None:
    jpeg = image_bytes(40, 30, seed=1)
    bad = {
        "wrong_columns": b"k_cols\t" + b64(jpeg) + b"\textra",
        "bad_base64": b"k_b64\t" + b"!!notbase64" + b64(jpeg),
        "not_an_image": b"k_noimg\t" + b64(b"GIF89a? not really" * 20),
        "truncated_image": b"k_trunc\t" + b64(jpeg[:-50]),  # cut inside the scan
        "empty_image": b"k_empty\t",
        "too_many_pixels": b"k_big\t" + b64(image_bytes(200, 150)),  # 30,000 > 20,000
        "duplicate_key": b"a0\t" + b64(jpeg),
        "line_too_long": b"k_long\t" + b"A" * 60_000,
        "not_utf8": b"k_\xff\xfe\t" + b64(jpeg),
        "empty_key": b" \t" + b64(jpeg),
        "blank_line": b"",
    }
    train = good_lines("a", 3) + list(bad.values()) + good_lines("z", 2)
    raw = make_raw(tmp_path, train)
    stats = decode_dataset(raw, tmp_path / "images", PARAMS)

    rejects = read_rejects(tmp_path / "images")
    assert list(rejects.columns) == ["file", "line", "key", "reason"]
    assert list(rejects["reason"]) == list(bad)
    assert list(rejects["line"].astype(int)) == list(range(4, 4 + len(bad)))
    assert set(rejects["file"]) == {layout.TRAIN_IMAGES}
    keys = dict(zip(rejects["reason"], rejects["key"]))
    assert keys["line_too_long"] == "k_long" and keys["not_utf8"] == "k_\\xff\\xfe"

    index = read_index(tmp_path / "images")
    assert list(index["key"]) == ["a0", "a1", "a2", "z0", "z1", "t0", "t1"]
    assert list(index["split"]) == ["train"] * 5 + ["test"] * 2
    assert stats["splits"]["train"] == {**stats["splits"]["train"], "lines": 16, "images": 5,
                                        "rejected": 11}
    assert stats["rejects"] == {reason: 1 for reason in bad}
    on_disk = json.loads((tmp_path / "images" / layout.STATS).read_text())
    assert on_disk["images"] == 7 and on_disk["rejects"] == stats["rejects"]


def test_a_jpeg_cut_inside_its_header_is_truncated_too() -> None:
    jpeg = image_bytes(40, 30)
    with pytest.raises(Reject, match="truncated_image"):
        decode_image(jpeg[:300], DecodeConfig.from_params(PARAMS))


def test_header_and_three_column_layout_with_crlf(tmp_path: Path) -> None:
    jpeg = image_bytes(40, 30)
    train = [b"breed\tkey\timage"] + [
        f"beagle\tb{i}\t".encode() + b64(jpeg) + b"\r" for i in range(2)
    ] + [b" Basset_Hound \tb2\t" + b64(jpeg) + b"\r", b"beagle\tb9\t" + b64(jpeg) + b"\tspare"]
    test = [b"breed\tkey\timage", b"\tp0\t" + b64(jpeg)]
    raw = make_raw(tmp_path, train, test)
    params = {**PARAMS, "columns": ["breed", "key", "image"], "header": True}
    decode_dataset(raw, tmp_path / "images", params)
    index = read_index(tmp_path / "images")
    assert list(index["key"]) == ["b0", "b1", "b2", "p0"]
    # the breed column is kept (the weak labels of a release without a click log), as written, less the blanks
    assert list(index["breed"]) == ["beagle", "beagle", "Basset_Hound", ""]
    rejects = read_rejects(tmp_path / "images")
    assert rejects.to_dict("records") == [
        {"file": layout.TRAIN_IMAGES, "line": "5", "key": "b9", "reason": "wrong_columns"}]


def test_an_index_without_a_breed_column_keeps_its_schema(tmp_path: Path) -> None:
    raw = make_raw(tmp_path, good_lines("a", 3))
    decode_dataset(raw, tmp_path / "images", PARAMS)
    assert list(read_index(tmp_path / "images").columns) == ["key", "split", "shard", "offset", "length", "width",
                                                            "height"]


def test_shards_round_trip_and_roll(tmp_path: Path) -> None:
    originals = {
        "rgb": image_bytes(40, 30, seed=1),                              # copied as is
        "gray": image_bytes(40, 30, seed=2, mode="L"),                   # -> RGB
        "png": image_bytes(40, 30, seed=3, fmt="PNG"),                   # -> JPEG
        "rgba": image_bytes(40, 30, seed=4, fmt="PNG", mode="RGBA"),
        "gif": image_bytes(40, 30, seed=5, fmt="GIF", mode="P"),
        "progressive": image_bytes(40, 30, seed=6, progressive=True),   # re-encoded
    }
    raw = make_raw(tmp_path, [k.encode() + b"\t" + b64(v) for k, v in originals.items()])
    # ~1.5 KB shards: every image or two starts a new shard.
    stats = decode_dataset(raw, tmp_path / "images", {**PARAMS, "shard_mb": 1.5 / 1024})
    index = read_index(tmp_path / "images")
    assert stats["shards"] == index["shard"].nunique() > 2
    assert sorted(p.name for p in (tmp_path / "images").glob("shard-*.bin")) == [
        f"shard-{i:05d}.bin" for i in range(stats["shards"])]
    assert stats["how"] == {"copied": 3, "reencoded": 5}  # rgb + the 2 test images

    reader = ShardReader(tmp_path / "images")
    for row in index.itertuples():
        img = reader.open_image(row)
        assert img.mode == "RGB" and img.size == (row.width, row.height) == (40, 30)
        if row.key in originals:
            expected = np.asarray(Image.open(io.BytesIO(originals[row.key])).convert("RGB"), float)
            # re-encoding at quality 90 changes pixels only a little
            assert np.abs(np.asarray(img, float) - expected).mean() < 6
    row = index.set_index("key").loc["rgb"]
    assert reader.read(row["shard"], row["offset"], row["length"]) == originals["rgb"]
    # a reader handed to another process (DataLoader workers) opens its own files
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.open_image(index.iloc[0]).size == (40, 30)
    reader.close()


def test_size_cap_downscales_only_large_images(tmp_path: Path) -> None:
    raw = make_raw(tmp_path, [b"wide\t" + b64(image_bytes(100, 60)),
                              b"tall\t" + b64(image_bytes(45, 120, fmt="PNG")),
                              b"small\t" + b64(image_bytes(20, 16))])
    decode_dataset(raw, tmp_path / "images", {**PARAMS, "max_short_side": 32})
    index = read_index(tmp_path / "images").set_index("key")
    assert index.loc["wide", ["width", "height"]].tolist() == [53, 32]
    assert index.loc["tall", ["width", "height"]].tolist() == [32, 85]
    assert index.loc["small", ["width", "height"]].tolist() == [20, 16]
    reader = ShardReader(tmp_path / "images")
    assert reader.open_image(index.loc["wide"]).size == (53, 32)


def test_output_is_deterministic_whatever_the_workers(tmp_path: Path) -> None:
    train = good_lines("a", 10) + [b"bad\t!!"] + [
        f"g{i}".encode() + b"\t" + b64(image_bytes(50, 40, seed=i, fmt="PNG")) for i in range(6)]
    raw = make_raw(tmp_path, train)
    params = {**PARAMS, "shard_mb": 4 / 1024, "block_lines": 3}
    decode_dataset(raw, tmp_path / "one", {**params, "workers": 1})
    decode_dataset(raw, tmp_path / "two", {**params, "workers": 2})
    names = sorted(p.name for p in (tmp_path / "one").iterdir() if p.name != layout.STATS)
    assert len([n for n in names if n.startswith("shard-")]) > 1
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir() if p.name != layout.STATS)
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_fails_past_max_reject_fraction_and_leaves_nothing(tmp_path: Path) -> None:
    raw = make_raw(tmp_path, good_lines("a", 8) + [b"x\t!!", b"y\t!!"])  # 20% bad
    out = tmp_path / "out" / "images"
    with pytest.raises(DecodeError, match=r"2 of 10 lines rejected.*bad_base64: 2"):
        decode_dataset(raw, out, {**PARAMS, "max_reject_fraction": 0.1})
    assert list((tmp_path / "out").iterdir()) == []  # no output, no temporary left
    decode_dataset(raw, out, {**PARAMS, "max_reject_fraction": 0.2})  # at the limit: passes
    assert len(read_index(out)) == 10


def test_cli_reads_params_yaml(tmp_path: Path) -> None:
    make_raw(tmp_path, good_lines("a", 3) + [b"bad\t!!"])
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def run(max_reject_fraction: float) -> subprocess.CompletedProcess:
        params = {"decode": {**PARAMS, "workers": 2, "max_reject_fraction": max_reject_fraction}}
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        return subprocess.run([sys.executable, "-m", "stages.decode", "raw", "images"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    failed = run(0.1)
    assert failed.returncode == 1 and "1 of 4 lines rejected" in failed.stderr
    assert not (tmp_path / "images").exists()
    ok = run(0.5)
    assert ok.returncode == 0, ok.stderr
    assert list(read_index(tmp_path / "images")["key"]) == ["a0", "a1", "a2", "t0", "t1"]
    stats = json.loads((tmp_path / "images" / layout.STATS).read_text())
    assert stats["images"] == 5 and "seconds" not in stats  # stats.json stays the same run to run
    assert "(2 workers)" in ok.stderr


def test_keys_that_would_break_a_tsv_round_trip_are_rejected(tmp_path: Path) -> None:
    """A key with a quote, a control character or absurd length used to pass:
    a leading quote then swallowed the following rows of every label table."""
    from stages.lib.decoding import MAX_KEY_CHARS
    from stages.lib.tables import read_table

    jpeg = image_bytes(40, 30, seed=1)
    bad_keys = ['"quoted', 'in"side', "ctrl\x01key", "bell\x07", "k" * (MAX_KEY_CHARS + 1)]
    train = good_lines("a", 2) + [k.encode() + b"\t" + b64(jpeg) for k in bad_keys] + \
        [("k" * MAX_KEY_CHARS).encode() + b"\t" + b64(jpeg), "héllo wörld".encode() + b"\t" + b64(jpeg)]
    stats = decode_dataset(make_raw(tmp_path, train), tmp_path / "images", PARAMS)
    assert stats["rejects"] == {"invalid_key": len(bad_keys)}
    kept = set(read_index(tmp_path / "images")["key"])
    assert {"k" * MAX_KEY_CHARS, "héllo wörld", "a0", "a1"} <= kept and not kept & set(bad_keys)
    # what passes survives the pipeline's tables: written without quoting, read back row for row
    table = pd.DataFrame({"key": sorted(kept), "label": range(len(kept))})
    table.to_csv(tmp_path / "t.tsv", sep="\t", index=False)
    back = read_table(tmp_path / "t.tsv")
    assert back["key"].tolist() == table["key"].tolist() and back["label"].tolist() == table["label"].tolist()


def test_a_leading_quote_no_longer_swallows_rows(tmp_path: Path) -> None:
    """The readers treat a quote as data (the table of the issue: 10 rows
    written, 9 read back, labels turned into strings)."""
    from stages.lib.tables import read_table

    rows = ['"k0\t0'] + [f"k{i}\t{i}" for i in range(1, 10)]
    (tmp_path / "t.tsv").write_text("key\tlabel\n" + "\n".join(rows) + "\n")
    back = read_table(tmp_path / "t.tsv")
    assert len(back) == 10 and back["label"].tolist() == list(range(10)) and back["key"][0] == '"k0'


def test_the_table_writer_keeps_rows_with_missing_values(tmp_path: Path) -> None:
    """write_table joined the cells with pyarrow, whose default turns a row
    with a missing value into no row at all: a dropped image without a share
    vanished from dropped.tsv."""
    import numpy as np

    from stages.lib.tables import read_table, write_table

    df = pd.DataFrame({"key": ["a", "b", "c"], "label": [1, 2, 3], "share": [0.123456, np.nan, 1.0],
                       "breed": ["pug", None, "basset hound"]})
    write_table(df, tmp_path / "t.tsv")
    back = read_table(tmp_path / "t.tsv")
    assert back["key"].tolist() == ["a", "b", "c"] and back["label"].tolist() == [1, 2, 3]
    assert str(back["share"][0]) == "0.1235" and back["share"][1] == ""  # missing: an empty cell
    assert back.loc[1, "breed"] == "" and back.loc[2, "breed"] == "basset hound"


_decode_line = decoding.decode_line


def _die_on_boom(line_no: int, line: bytes, too_long: bool, cfg: DecodeConfig):
    # a worker killed mid-block, as the kernel's out-of-memory killer or a segfault would
    if line.startswith(b"boom\t"):
        os.kill(os.getpid(), signal.SIGKILL)
    return _decode_line(line_no, line, too_long, cfg)


def test_a_dying_decode_worker_fails_the_stage_at_once_and_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    train = good_lines("a", 30)
    train.insert(17, b"boom\t" + b64(image_bytes(40, 30)))
    raw = make_raw(tmp_path, train)
    monkeypatch.setattr(decoding, "decode_line", _die_on_boom)  # the fork-started workers inherit it
    start = time.monotonic()
    with pytest.raises(DecodeError, match=r"train_images.tsv: a decode worker died while decoding the block "
                                          r"from line 17 \(killed for memory"):
        decode_dataset(raw, tmp_path / "images", {**PARAMS, "workers": 2})
    assert time.monotonic() - start < 30  # multiprocessing.Pool waited forever here
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def _oriented_jpeg(orientation: int) -> bytes:
    """A 40x30 JPEG (left half dark, right half light) tagged with an EXIF orientation."""
    arr = np.zeros((30, 40, 3), np.uint8)
    arr[:, 20:] = 220
    arr[:10, :, 0] = 255  # and a red top band: every turn and flip is distinct
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_to_rgb_turns_photos_upright_as_pillow_exif_transpose(orientation: int) -> None:
    from PIL import ImageOps

    from stages.lib.images import to_rgb
    img = Image.open(io.BytesIO(_oriented_jpeg(orientation)))
    want = ImageOps.exif_transpose(Image.open(io.BytesIO(_oriented_jpeg(orientation)))).convert("RGB")
    got = to_rgb(img)
    assert got.size == want.size and np.array_equal(np.asarray(got), np.asarray(want))


def test_decode_and_predict_see_a_phone_photo_upright(tmp_path: Path) -> None:
    from PIL import ImageOps

    from stages.predict import load_image
    data = _oriented_jpeg(6)  # stored 40x30, upright 30x40
    raw = make_raw(tmp_path, [b"phone\t" + b64(data)] + good_lines("a", 3))
    decode_dataset(raw, tmp_path / "images", PARAMS)
    row = read_index(tmp_path / "images").set_index("key").loc["phone"]
    assert (row["width"], row["height"]) == (30, 40)
    with ShardReader(tmp_path / "images") as reader:
        decoded = np.asarray(reader.open_image(row), dtype=np.int16)
    want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"), dtype=np.int16)
    assert np.abs(decoded - want).mean() < 3  # one more JPEG generation
    (tmp_path / "phone.jpg").write_bytes(data)
    assert np.array_equal(np.asarray(load_image(tmp_path / "phone.jpg")), np.asarray(want, dtype=np.uint8))


def test_sixteen_bit_images_keep_their_tones() -> None:
    grey = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (16, 1))  # a dark-to-light ramp
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, "PNG")
    jpeg, width, height, how = decode_image(buf.getvalue(), DecodeConfig.from_params(PARAMS))
    out = np.asarray(Image.open(io.BytesIO(jpeg)).convert("L"), dtype=np.float64)
    assert (width, height, how) == (64, 16, "reencoded")
    assert abs(out.mean() - 127.5) < 3 and out[:, :8].mean() < 20  # not clipped to white


def test_bytes_after_a_jpeg_end_stay_out_of_the_shards() -> None:
    cfg = DecodeConfig.from_params(PARAMS)
    clean = image_bytes(40, 30)
    assert decode_image(clean, cfg)[3] == "copied"
    jpeg, _, _, how = decode_image(clean + b"MotionPhoto_Data" + b"\0" * 3000, cfg)
    assert how == "reencoded" and jpeg.endswith(b"\xff\xd9") and b"MotionPhoto" not in jpeg


def test_key_set_finds_every_repeat_and_grows() -> None:
    from stages.lib.decoding import KeySet
    keys = KeySet(capacity=8)
    rng = np.random.default_rng(0)
    names = [f"k{i}" for i in rng.integers(0, 3000, 10_000)]
    assert [keys.add(k) for k in names] == [k not in set(names[:i]) for i, k in enumerate(names)]
    assert len(keys) == len(set(names)) and len(keys.table) >= 2 * len(keys)
    assert keys.add("\udcff odd") and not keys.add("\udcff odd")  # surrogates from undecodable bytes


BOOM_SCRIPT = """
import os, signal, sys
from stages.lib import decoding
from stages.lib.atomic import exit_on_sigterm
_decode_line = decoding.decode_line
def die(line_no, line, too_long, cfg):
    if line.startswith(b"boom\\t"):
        os.kill(os.getpid(), signal.SIGKILL)
    return _decode_line(line_no, line, too_long, cfg)
decoding.decode_line = die  # the fork-started workers inherit it
exit_on_sigterm()  # as every stage does: the workers inherit this handler too
try:
    decoding.decode_dataset(sys.argv[1], sys.argv[2], {**eval(sys.argv[3]), "workers": 2, "block_lines": 64})
except decoding.DecodeError as err:
    print(err)
    sys.exit(3)
"""


def test_a_dying_worker_does_not_hang_the_stage_when_results_fill_the_pipe(tmp_path: Path) -> None:
    """Python 3.11's executor joins the surviving workers after one died; one blocked writing a result
    larger than the pipe buffer (64 KB: here a block of 64 noise images re-encoded, MBs) was joined for
    ever (seen: 3 of 3 runs hung before the fix)."""
    def noise(i: int) -> bytes:
        arr = np.random.default_rng(i).integers(0, 256, (160, 160, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG", compress_level=1)
        return f"n{i}".encode() + b"\t" + b64(buf.getvalue())

    train = [noise(i) for i in range(1000)]
    train.insert(500, b"boom\t" + train[0].split(b"\t")[1])
    raw = make_raw(tmp_path, train)
    params = {**PARAMS, "max_pixels": 10**7, "max_line_bytes": 10**7}
    proc = subprocess.Popen([sys.executable, "-c", BOOM_SCRIPT, str(raw), str(tmp_path / "images"), repr(params)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the stage and its workers
        proc.communicate()
        pytest.fail("decode hung after a worker died")
    assert proc.returncode == 3 and "a decode worker died while decoding the block from line" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_each_image_file_can_have_its_own_layout(tmp_path: Path) -> None:
    """A Thumb-style training file (breed, key, image, a header line) beside a
    test file of key, image: one decode.columns / decode.header for both
    rejected every test line as wrong_columns and skipped its first image as a
    header. A mapping per file role reads each as it is."""
    jpeg = image_bytes(40, 30)
    train = [b"breed\tkey\timage"] + [f"Beagle\tb{i}\t".encode() + b64(jpeg) for i in range(3)]
    test = [f"t{i}\t".encode() + b64(image_bytes(40, 30, seed=i)) for i in range(3)]
    raw = make_raw(tmp_path, train, test)
    params = {**PARAMS, "columns": {"train_images": ["breed", "key", "image"], "test_images": ["key", "image"]},
              "header": {"train_images": True, "test_images": False}}
    stats = decode_dataset(raw, tmp_path / "images", {**params, "max_reject_fraction": 0.0})
    index = read_index(tmp_path / "images")
    assert list(index["key"]) == ["b0", "b1", "b2", "t0", "t1", "t2"]
    assert list(index["split"]) == ["train"] * 3 + ["test"] * 3
    # the training file's weak labels are kept; the test file has none (null, not a guess)
    assert list(index["breed"][:3]) == ["Beagle"] * 3 and index["breed"][3:].isna().all()
    assert stats["rejected"] == 0 and len(read_rejects(tmp_path / "images")) == 0
    # one layout for both files, as before: the test file's lines are wrong_columns, its first one a "header"
    with pytest.raises(DecodeError, match=r"test_images.tsv: 2 of 2 lines rejected.*wrong_columns: 2"):
        decode_dataset(raw, tmp_path / "one", {**PARAMS, "columns": ["breed", "key", "image"], "header": True,
                                               "max_reject_fraction": 0.0})


def test_a_per_file_layout_equal_to_the_shared_one_decodes_byte_for_byte_the_same(tmp_path: Path) -> None:
    """The shared form (the sample's decode.columns: [key, image]) and a mapping that says the same per file
    write identical outputs, index.parquet included."""
    train = good_lines("a", 5) + [b"bad\t!!"] + [
        f"g{i}".encode() + b"\t" + b64(image_bytes(50, 40, seed=i, fmt="PNG")) for i in range(3)]
    raw = make_raw(tmp_path, train)
    decode_dataset(raw, tmp_path / "shared", PARAMS)
    per_file = {**PARAMS, "columns": {"train_images": ["key", "image"], "test_images": ["key", "image"]},
                "header": {"train_images": False, "test_images": False}}
    decode_dataset(raw, tmp_path / "per_file", per_file)
    names = sorted(p.name for p in (tmp_path / "shared").iterdir())
    assert layout.INDEX in names and names == sorted(p.name for p in (tmp_path / "per_file").iterdir())
    for name in names:
        assert (tmp_path / "shared" / name).read_bytes() == (tmp_path / "per_file" / name).read_bytes(), name


@pytest.mark.parametrize(("change", "message"), [
    ({"columns": {"train_images": ["key", "image"]}}, r"decode: columns: a mapping .* must name exactly "
                                                      r"train_images and test_images, got \['train_images'\]"),
    ({"header": {"train_images": True, "test_images": False, "clicks": False}},
     r"decode: header: a mapping .* got \['clicks', 'test_images', 'train_images'\]"),
    ({"columns": {"train_images": ["breed", "key", "image"], "test_images": ["key"]}},
     r"columns \(test_images\) must name 'key' and 'image' once each, got \['key'\]"),
    ({"header": {"train_images": "yes", "test_images": False}},
     r"decode\.header\.train_images: must be true or false, got 'yes'"),
    ({"header": "false"}, r"decode\.header: must be true or false, got 'false'"),
    ({"columns": "key image"}, r"decode\.columns: must be a list, got 'key image'"),
    ({"columns": {"train_images": ["key", "image"], "test_images": "key image"}},
     r"decode\.columns\.test_images: must be a list"),
])
def test_per_file_layouts_are_checked(change: dict, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        DecodeConfig.from_params({**PARAMS, **change})


def test_a_config_resolves_each_files_layout() -> None:
    cfg = DecodeConfig.from_params({**PARAMS, "columns": {"train_images": ["breed", "key", "image"],
                                                          "test_images": ["key", "image"]}})
    assert cfg.keeps_breeds and cfg.layout_of("test_images") == (("key", "image"), False)
    train, test = cfg.for_file("train_images"), cfg.for_file("test_images")
    assert (train.key_col, train.image_col, train.breed_col, train.header) == (1, 2, 0, False)
    assert (test.key_col, test.image_col, test.breed_col) == (0, 1, None)
    with pytest.raises(TypeError, match="for_file"):
        cfg.key_col  # noqa: B018 (the property raises)
    plain = DecodeConfig.from_params(PARAMS)
    assert plain.for_file("test_images") is plain and not plain.keeps_breeds


def test_test_images_in_a_folder_of_their_own(tmp_path: Path) -> None:
    """With ``test_dir`` each split has its own shards, index, rejects and stats (evaluate depends on the
    test folder alone); keys stay unique across the two; the returned stats are both splits'."""
    train = good_lines("a", 3) + [b"a0\t" + b64(image_bytes(40, 30, seed=5))]   # a duplicate inside train
    test = good_lines("t", 2) + [b"a1\t" + b64(image_bytes(40, 30, seed=6))]    # a training key again
    raw = make_raw(tmp_path, train, test)
    stats = decode_dataset(raw, tmp_path / "images", PARAMS, test_dir=tmp_path / "test_images")

    train_index, test_index = read_index(tmp_path / "images"), read_index(tmp_path / "test_images")
    assert list(train_index["key"]) == ["a0", "a1", "a2"] and set(train_index["split"]) == {"train"}
    assert list(test_index["key"]) == ["t0", "t1"] and set(test_index["split"]) == {"test"}
    assert list(read_rejects(tmp_path / "images")["reason"]) == ["duplicate_key"]
    test_rejects = read_rejects(tmp_path / "test_images")
    assert list(test_rejects["key"]) == ["a1"] and list(test_rejects["file"]) == [layout.TEST_IMAGES]
    with ShardReader(tmp_path / "test_images") as reader:  # the shards hold the images the index points at
        row = test_index.iloc[1]
        assert Image.open(io.BytesIO(reader.read(int(row["shard"]), int(row["offset"]), int(row["length"])))).size \
            == (40, 30)
    train_stats = json.loads((tmp_path / "images" / layout.STATS).read_text())
    test_stats = json.loads((tmp_path / "test_images" / layout.STATS).read_text())
    assert list(train_stats["splits"]) == ["train"] and train_stats["images"] == 3
    assert list(test_stats["splits"]) == ["test"] and test_stats["images"] == 2
    assert test_stats["rejects"] == {"duplicate_key": 1} and test_stats["shards"] == 1
    assert stats["images"] == 5 and stats["rejected"] == 2 and stats["shards"] == 2


def test_a_failed_test_split_leaves_neither_folder(tmp_path: Path) -> None:
    raw = make_raw(tmp_path, good_lines("a", 3), [b"t0\tnot base64!"] * 3)
    with pytest.raises(DecodeError, match="test_images.tsv: 3 of 3 lines rejected"):
        decode_dataset(raw, tmp_path / "images", {**PARAMS, "max_reject_fraction": 0.5},
                       test_dir=tmp_path / "test_images")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]
