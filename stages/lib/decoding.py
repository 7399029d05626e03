"""Decoding base64 image TSVs into validated RGB JPEG shards + index (the
decode stage's library: ``stages/decode.py`` reads params and calls
:func:`decode_dataset`).

Streams ``train_images.tsv`` and ``test_images.tsv`` line by line, decodes
blocks of lines in a process pool, and writes (atomically) the shards,
``index.parquet``, ``rejects.tsv`` and ``stats.json``. Bad rows are rejected
with a reason; the stage fails only when a split's reject fraction passes
``decode.max_reject_fraction``.
"""
from __future__ import annotations

import array
import binascii
import collections
import contextlib
import hashlib
import io
import logging
import multiprocessing as mp
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from PIL import Image
from tqdm import tqdm

from stages.lib import layout
from stages.lib.atomic import atomic_dir, write_json
from stages.lib.cli import StageFailure
from stages.lib.images import INPUT_FORMATS, exif_orientation, to_rgb
from stages.lib.params import ConfigError, Section, check_value
from stages.lib.shards import IndexWriter, ShardWriter

log = logging.getLogger("decode")

SPLITS = (("train", layout.TRAIN_IMAGES), ("test", layout.TEST_IMAGES))
# the image files' roles, as data.files names them: the keys of a per-file decode.columns / decode.header
FILE_ROLES = tuple(name.removesuffix(".tsv") for _, name in SPLITS)
# Formats parsed from untrusted input: images.INPUT_FORMATS; everything leaves as JPEG.
# A block also closes at this many bytes, so that blocks of large images keep
# the memory in flight bounded whatever block_lines says.
BLOCK_BYTES = 8 << 20
KEY_PREFIX_BYTES = 4096  # what is read of an over-long line, to name its key
SCAN_CHUNK = 1 << 20
REJECT_KEY_CHARS = 200

# (line number, byte offset, byte length w/o newline): what the main process
# finds; workers read the bytes themselves, so lines never cross a pipe.
Span = tuple[int, int, int]
# (line number, key, reject reason or None, jpeg bytes, width, height, how,
#  breed column text or None where decode.columns has no breed column)
Result = tuple[int, str, "str | None", "bytes | None", int, int, str, "str | None"]


class Reject(Exception):
    """A row is bad; ``reason`` is the short code written to rejects.tsv."""

    def __init__(self, reason: str, key: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.key = key


class DecodeError(StageFailure):
    """The stage must fail (too many rejects, bad params, no input)."""


@dataclass(frozen=True)
class DecodeConfig(Section):
    """The ``decode`` section of params.yaml, checked (workers: 1 decodes in
    this process, 0 uses every core).

    ``columns`` names an image file's columns: ``key`` and ``image`` are
    required; ``breed`` (a release that ships weak labels in its image file)
    is kept in the index; any other name is read past. ``header``: the file
    starts with a header line. Each is either one layout for both image
    files (``columns: [key, image]``, ``header: false``) or a mapping that
    gives each file role its own (``columns: {train_images: [breed, key,
    image], test_images: [key, image]}``, ``header: {train_images: true,
    test_images: false}``): a mapping names both roles, no default stands in
    for a missing one. :meth:`for_file` resolves a role's layout; the column
    properties (``key_col`` ...) are those of a resolved config."""

    columns: tuple[str, ...] | dict[str, tuple[str, ...]]
    header: bool | dict[str, bool]
    max_short_side: int
    max_pixels: int
    max_line_bytes: int
    jpeg_quality: int
    shard_mb: float
    workers: int
    block_lines: int
    max_reject_fraction: float

    def __post_init__(self) -> None:
        for name, value in (("columns", self.columns), ("header", self.header)):
            if isinstance(value, dict) and set(value) != set(FILE_ROLES):
                raise ValueError(f"{name}: a mapping gives each image file its own layout and must name exactly "
                                 f"{' and '.join(FILE_ROLES)}, got {sorted(value)}")
        for role in FILE_ROLES:
            cols = self.layout_of(role)[0]
            if len(set(cols)) != len(cols) or "key" not in cols or "image" not in cols:
                where = f" ({role})" if isinstance(self.columns, dict) else ""
                raise ValueError(f"columns{where} must name 'key' and 'image' once each, got {list(cols)}")
        if not (self.max_line_bytes > 0 and self.max_pixels > 0 and self.shard_mb > 0
                and self.block_lines > 0 and self.max_short_side >= 0 and self.workers >= 0):
            raise ValueError("max_line_bytes, max_pixels, shard_mb and block_lines must be > 0; "
                             "max_short_side and workers >= 0")
        if not (1 <= self.jpeg_quality <= 95 and 0 <= self.max_reject_fraction <= 1):
            raise ValueError("jpeg_quality must be 1..95, max_reject_fraction 0..1")

    @classmethod
    def from_params(cls, params: dict[str, Any], name: str = "decode") -> DecodeConfig:
        try:
            if isinstance(params, dict):
                # each layout key as the form it takes (one layout, or a mapping per file), so that a wrong
                # value is named as that form's error, not as "none of" the two forms
                for key, one in (("columns", tuple[str, ...]), ("header", bool)):
                    if key in params:
                        value = params[key]
                        check_value(value, dict[str, one] if isinstance(value, dict) else one, f"{name}.{key}")
            return super().from_params(params, name)
        except ConfigError as err:  # the stage's own error type: main() turns it into exit 1
            raise DecodeError(str(err)) from err

    def layout_of(self, role: str) -> tuple[tuple[str, ...], bool]:
        """(columns, header) of the image file of ``role`` (``train_images`` or ``test_images``)."""
        if role not in FILE_ROLES:
            raise ValueError(f"no image file role {role!r}; known: {list(FILE_ROLES)}")
        columns = self.columns[role] if isinstance(self.columns, dict) else self.columns
        header = self.header[role] if isinstance(self.header, dict) else self.header
        return columns, header

    def for_file(self, role: str) -> DecodeConfig:
        """This config with the plain layout of ``role``'s image file (itself when it has one already)."""
        columns, header = self.layout_of(role)
        if columns == self.columns and header == self.header:
            return self
        return self.replace(columns=columns, header=header)

    @property
    def keeps_breeds(self) -> bool:
        """Some image file has a breed column: the index gets one (null where a file has none)."""
        return any("breed" in self.layout_of(role)[0] for role in FILE_ROLES)

    def _plain_columns(self) -> tuple[str, ...]:
        if isinstance(self.columns, dict):
            raise TypeError("decode.columns gives each image file its own layout: resolve it with for_file(role)")
        return self.columns

    @property
    def key_col(self) -> int:
        return self._plain_columns().index("key")

    @property
    def image_col(self) -> int:
        return self._plain_columns().index("image")

    @property
    def breed_col(self) -> int | None:
        cols = self._plain_columns()
        return cols.index("breed") if "breed" in cols else None


# --------------------------------------------------------------------------
# Reading: lines and blocks (main process)


def scan_lines(f: BinaryIO, header: bool) -> Iterator[Span]:
    """Yield (line number, offset, length without the newline) for the data
    lines of ``f``.

    Only newline positions are looked for, in fixed-size chunks, so memory is
    one chunk whatever the line or file length; an over-long line is just a
    large ``length`` that no one ever reads. Line numbers are 1-based and
    count the header, so they match ``sed -n Np``.
    """
    line_no, line_start, base = 0, 0, 0
    while chunk := f.read(SCAN_CHUNK):
        i = chunk.find(b"\n")
        while i >= 0:
            line_no += 1
            if not (header and line_no == 1):
                yield line_no, line_start, base + i - line_start
            line_start = base + i + 1
            i = chunk.find(b"\n", i + 1)
        base += len(chunk)
    if line_start < base:  # a last line without a newline
        line_no += 1
        if not (header and line_no == 1):
            yield line_no, line_start, base - line_start


def iter_blocks(spans: Iterable[Span], block_lines: int) -> Iterator[tuple[list[Span], int]]:
    """Group lines into (block, bytes) of at most ``block_lines`` lines or
    about ``BLOCK_BYTES`` bytes: the unit of work for the pool."""
    block: list[Span] = []
    size = 0
    for span in spans:
        block.append(span)
        size += span[2]
        if len(block) >= block_lines or size >= BLOCK_BYTES:
            yield block, size
            block, size = [], 0
    if block:
        yield block, size


# --------------------------------------------------------------------------
# Decoding (worker processes)


def init_worker() -> None:
    """Per-process Pillow set-up. Our own size check rejects images over
    max_pixels before decoding; Pillow's bomb guard stays on as a backstop
    (it raises at 2x its limit), and its warning would only repeat our check."""
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)


def capped_size(width: int, height: int, max_short_side: int) -> tuple[int, int]:
    """(width, height) with the shorter side capped at ``max_short_side``."""
    short = min(width, height)
    if max_short_side <= 0 or short <= max_short_side:
        return width, height
    scale = max_short_side / short
    if width <= height:
        return max_short_side, max(1, round(height * scale))
    return max(1, round(width * scale)), max_short_side


def _is_truncation(e: Exception) -> bool:
    return isinstance(e, EOFError) or "truncated" in str(e).lower()


def decode_image(data: bytes, cfg: DecodeConfig) -> tuple[bytes, int, int, str]:
    """Validate one image; return (jpeg bytes, width, height, how).

    ``how`` is "copied" when the input already is an upright baseline RGB
    JPEG of the right size that ends at its end-of-image marker: its bytes are
    kept as they are (no generation loss, no encode cost) once a decode has
    proven them sound. Otherwise the image is made RGB and upright
    (:func:`~stages.lib.images.to_rgb`, as predict does), capped in size and
    re-encoded ("reencoded"/"resized"); bytes after a JPEG's end (phone
    metadata, an appended video) are not carried into the shards.
    """
    if not data:
        raise Reject("empty_image")
    try:
        img = Image.open(io.BytesIO(data), formats=INPUT_FORMATS)
    except Image.DecompressionBombError:
        raise Reject("too_many_pixels") from None
    except Exception as e:  # Pillow's parsers raise many types on garbage input
        # A known signature whose header then runs out is a truncated image.
        raise Reject("truncated_image" if _is_truncation(e) else "not_an_image") from None
    with img:
        width, height = img.size
        if width <= 0 or height <= 0:
            raise Reject("empty_image")
        if width * height > cfg.max_pixels:
            raise Reject("too_many_pixels")  # before any pixel is decoded
        orientation = exif_orientation(img)
        turned = orientation in (5, 6, 7, 8)  # upright, it is height x width
        upright = (height, width) if turned else (width, height)
        target = capped_size(*upright, cfg.max_short_side)
        copy = (img.format == "JPEG" and img.mode == "RGB" and target == (width, height)
                and not img.info.get("progressive") and orientation == 1 and data.endswith(b"\xff\xd9"))
        if copy:
            # A 1/8-scale decode still entropy-decodes every coefficient, so a
            # truncated or corrupt stream fails as in a full decode, at about
            # two thirds of the cost.
            img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
        elif target != upright:
            img.draft("RGB", target[::-1] if turned else target)  # JPEG: DCT-domain downscale, much faster
        try:
            img.load()
        except Image.DecompressionBombError:
            raise Reject("too_many_pixels") from None
        except Exception as e:
            raise Reject("truncated_image" if _is_truncation(e) else "corrupt_image") from None
        if copy:
            return data, width, height, "copied"
        try:
            out = to_rgb(img)
            if out.size != target:
                out = out.resize(target, Image.Resampling.BICUBIC)
        except Exception:
            raise Reject("corrupt_image") from None
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=cfg.jpeg_quality)
    return buf.getvalue(), target[0], target[1], ("reencoded" if target == upright else "resized")


MAX_KEY_CHARS = 256  # Clickture keys are ~40 characters; a longer one is garbage, not a key


def valid_key(key: str) -> bool:
    """What an image key may be: 1..MAX_KEY_CHARS printable characters and no
    quote (tab, CR, LF and NUL are not printable). Keys are untrusted; one
    that breaks a TSV round trip (a tab, a line end, a quote) would shift or
    swallow rows in the tables downstream, so decode rejects it
    (``invalid_key``) and every later stage sees only valid keys."""
    return 0 < len(key) <= MAX_KEY_CHARS and key.isprintable() and '"' not in key


def parse_line(line: bytes, cfg: DecodeConfig) -> tuple[str, bytes, str | None]:
    """Split one TSV line into (key, base64 field, breed text or None), or
    raise :class:`Reject`."""
    if line.endswith(b"\r"):  # CRLF files; the scanner already dropped the LF
        line = line[:-1]
    if len(line) <= 1 and not line.strip():
        raise Reject("blank_line")
    cols = line.split(b"\t")
    key_col, image_col = cfg.key_col, cfg.image_col
    if len(cols) != len(cfg.columns):
        key = cols[key_col].decode("utf-8", "backslashreplace") if len(cols) > key_col else ""
        raise Reject("wrong_columns", key)
    try:
        # every column as text but the image's (None): texts[c] is column c
        texts = [None if i == image_col else c.decode("utf-8") for i, c in enumerate(cols)]
    except UnicodeDecodeError:
        raise Reject("not_utf8", cols[key_col].decode("utf-8", "backslashreplace")) from None
    key = texts[key_col]
    if not key.strip():
        raise Reject("empty_key", key)
    if not valid_key(key):
        raise Reject("invalid_key", key)
    breed_col = cfg.breed_col
    # the breed text is kept as the file has it: filter_clicks matches it to breeds.tsv
    breed = None if breed_col is None else texts[breed_col].strip()
    return key, cols[image_col], breed


def decode_line(line_no: int, line: bytes, too_long: bool, cfg: DecodeConfig) -> Result:
    """Decode one line into an image result or a reject result. For an
    over-long line, ``line`` is only its first bytes."""
    key, breed = "", None
    try:
        if too_long:
            cols = line.split(b"\t", cfg.key_col + 1)
            if len(cols) > cfg.key_col + 1:  # the key field ends inside the prefix
                key = cols[cfg.key_col].decode("utf-8", "backslashreplace")
            raise Reject("line_too_long", key)
        key, b64, breed = parse_line(line, cfg)
        try:
            data = binascii.a2b_base64(b64.strip(), strict_mode=True)
        except (binascii.Error, ValueError):
            raise Reject("bad_base64", key) from None
        jpeg, width, height, how = decode_image(data, cfg)
        return line_no, key, None, jpeg, width, height, how, breed
    except Reject as r:
        return line_no, r.key or key, r.reason, None, 0, 0, "", None


def decode_block(cfg: DecodeConfig, path: str, block: Sequence[Span]) -> list[Result]:
    """Read and decode a block of lines of ``path`` (runs in a worker process).

    ``os.pread`` from the page cache is far cheaper than pickling the lines
    through a pipe from the process that scanned them.
    """
    results = []
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()
        for line_no, offset, length in block:
            # Of an over-long line only the first bytes are read, to name
            # its key in rejects.tsv.
            too_long = length > cfg.max_line_bytes
            line = os.pread(fd, min(length, KEY_PREFIX_BYTES) if too_long else length, offset)
            results.append(decode_line(line_no, line, too_long, cfg))
    return results


def run_blocks(path: Path, blocks: Iterable[tuple[list[Span], int]], cfg: DecodeConfig,
               pool: Any | None, workers: int) -> Iterator[tuple[list[Result], int]]:
    """Decode the blocks of ``path`` in order; yield (results, bytes) per block.

    ``Executor.map`` would also keep the order, but it submits the whole input
    at once, and its results wait in memory when the writer falls behind. A
    window of ``2 * workers`` blocks in flight keeps both the order and the
    memory fixed. A worker that dies (killed for memory, a crash in an image
    library) breaks the pool: :class:`DecodeError`, not a wait for a block
    that will never come (``multiprocessing.Pool`` replaces the worker and
    loses its task).
    """
    if pool is None:
        for block, size in blocks:
            yield decode_block(cfg, str(path), block), size
        return
    pending: collections.deque = collections.deque()
    try:
        for block, size in blocks:
            pending.append((pool.submit(decode_block, cfg, str(path), block), size, block[0][0]))
            if len(pending) >= 2 * workers:
                future, nbytes, _ = pending[0]
                yield future.result(), nbytes
                pending.popleft()
        while pending:
            future, nbytes, _ = pending[0]
            yield future.result(), nbytes
            pending.popleft()
    except BrokenProcessPool as err:
        kill_workers(pool)
        where = f" while decoding the block from line {pending[0][2]}" if pending else ""
        raise DecodeError(
            f"{path}: a decode worker died{where} (killed for memory "
            f"by the system, or a crash in the image library): lower decode.workers or decode.block_lines, or "
            f"look for the line that kills it with decode.workers: 1") from err


def kill_workers(pool: ProcessPoolExecutor) -> None:
    """SIGKILL the pool's surviving workers. After one worker died, the executor's thread (Python < 3.12)
    stops reading results and joins the others; one blocked writing a result larger than the pipe buffer
    would be joined for ever, and so would this process at shutdown."""
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(OSError, ValueError):
            proc.kill()


# --------------------------------------------------------------------------
# Writing (main process)


class KeySet:
    """The keys stored so far, as 8-byte digests in an open-addressing table
    at most half full (16-32 bytes a key) instead of a set of strings (~105
    bytes a key: 4 GB for Clickture-Full's 40M images). Two distinct keys
    share a digest with probability about n^2 / 2^65 (4e-5 for 40M keys); the
    later one would then be rejected as a duplicate_key."""

    def __init__(self, capacity: int = 1 << 16) -> None:
        self.table = array.array("Q", bytes(8 * capacity))  # 0: an empty slot
        self.size = 0

    def add(self, key: str) -> bool:
        """Add ``key``; False if it was there already."""
        h = int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                           "little") or 1  # 0 marks an empty slot
        table, mask = self.table, len(self.table) - 1
        i = h & mask
        while (v := table[i]) != 0:
            if v == h:
                return False
            i = (i + 1) & mask
        table[i] = h
        self.size += 1
        if 2 * self.size > len(table):
            self._grow()
        return True

    def _grow(self) -> None:
        old = self.table
        self.table = array.array("Q", bytes(16 * len(old)))
        mask = len(self.table) - 1
        for h in old:
            if h:
                i = h & mask
                while self.table[i]:
                    i = (i + 1) & mask
                self.table[i] = h

    def __len__(self) -> int:
        return self.size


def _clean_key(key: str) -> str:
    # Keys are untrusted text; in rejects.tsv they must stay one TSV cell.
    key = key[:REJECT_KEY_CHARS]
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in key)


class OutputWriter:
    """Everything the main process writes: shards, index, rejects, counts."""

    def __init__(self, out_dir: Path, cfg: DecodeConfig, seen: KeySet | None = None) -> None:
        self.dir = out_dir
        self.shards = ShardWriter(out_dir, int(cfg.shard_mb * (1 << 20)))
        self.index = IndexWriter(out_dir / layout.INDEX, breeds=cfg.keeps_breeds)
        self.rejects: TextIO = open(out_dir / layout.REJECTS, "w", encoding="utf-8", newline="\n")
        self.rejects.write("file\tline\tkey\treason\n")
        # Keys are unique across splits (a writer per split shares one set): later stages look images up by key.
        self.seen = KeySet() if seen is None else seen
        self.reasons: collections.Counter[str] = collections.Counter()
        self.how: collections.Counter[str] = collections.Counter()

    def add(self, file: str, split: str, result: Result, counts: collections.Counter) -> None:
        """Store one decoded line: an image in the shards and index, or a reject."""
        line_no, key, reason, jpeg, width, height, how, breed = result
        counts["lines"] += 1
        if reason is None and not self.seen.add(key):
            reason = "duplicate_key"  # the first valid copy wins
        if reason is not None:
            counts["rejected"] += 1
            self.reasons[reason] += 1
            self.rejects.write(f"{file}\t{line_no}\t{_clean_key(key)}\t{reason}\n")
            return
        assert jpeg is not None
        shard, offset = self.shards.write(jpeg)
        self.index.add(key, split, shard, offset, len(jpeg), width, height, breed)
        counts["images"] += 1
        self.how[how] += 1

    def close(self) -> None:
        self.shards.close()
        self.index.close()
        self.rejects.close()


def decode_split(path: Path, split: str, cfg: DecodeConfig, out: OutputWriter,
                 pool: Any | None, workers: int) -> dict[str, Any]:
    """Stream one image TSV through the pool into ``out``; return its counts."""
    counts: collections.Counter[str] = collections.Counter()
    total = path.stat().st_size
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f, \
            tqdm(total=total, unit="B", unit_scale=True, desc=f"decode {split}",
                 mininterval=1.0, file=sys.stderr) as bar:
        blocks = iter_blocks(scan_lines(f, cfg.header), cfg.block_lines)
        for results, nbytes in run_blocks(path, blocks, cfg, pool, workers):
            for result in results:
                out.add(path.name, split, result, counts)
            bar.update(nbytes)
            bar.set_postfix(images=counts["images"], rejected=counts["rejected"], refresh=False)
        bar.update(total - bar.n)  # newlines and the header were not counted
    seconds = time.perf_counter() - start
    log.info("%s: %d lines -> %d images, %d rejected in %.1f s (%.0f images/s, %.1f MB/s)",
             path.name, counts["lines"], counts["images"], counts["rejected"], seconds,
             counts["images"] / max(seconds, 1e-9), total / 1e6 / max(seconds, 1e-9))
    return {"file": path.name, "lines": counts["lines"], "images": counts["images"],
            "rejected": counts["rejected"], "bytes": total}


def check_rejects(split_stats: dict[str, Any], cfg: DecodeConfig, out: OutputWriter) -> None:
    """Fail the stage when too large a share of a file's lines was rejected."""
    lines, rejected = split_stats["lines"], split_stats["rejected"]
    if lines == 0:
        raise DecodeError(f"{split_stats['file']}: no data lines")
    if rejected / lines > cfg.max_reject_fraction:
        reasons = ", ".join(f"{r}: {n}" for r, n in out.reasons.most_common())
        raise DecodeError(
            f"{split_stats['file']}: {rejected} of {lines} lines rejected "
            f"({rejected / lines:.1%} > decode.max_reject_fraction={cfg.max_reject_fraction}); "
            f"reasons so far: {reasons}. Check decode.columns / decode.header against the file (read as columns "
            f"{list(cfg.columns)}, header: {str(cfg.header).lower()}).")


def decode_dataset(raw_dir: str | Path, out_dir: str | Path, params: dict[str, Any] | DecodeConfig,
                   test_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the stage: decode both image TSVs of ``raw_dir`` into ``out_dir``,
    or, with ``test_dir``, the training images into ``out_dir`` and the test
    images into ``test_dir`` (each folder its own shards, index, rejects and
    stats: evaluate then depends on the test images alone, and re-validating a
    run does not pull the training set).

    Returns the stats of both splits (each folder's stats.json has its own).
    Raises :class:`DecodeError` (leaving both folders untouched) when the stage must fail.
    """
    cfg = params if isinstance(params, DecodeConfig) else DecodeConfig.from_params(params)
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    folders = {"train": out_dir, "test": Path(test_dir) if test_dir is not None else out_dir}
    for _, name in SPLITS:
        if not (raw_dir / name).is_file():
            raise DecodeError(f"missing input {raw_dir / name}")
    Image.MAX_IMAGE_PIXELS = cfg.max_pixels  # this process decodes when workers == 1
    init_worker()
    workers = cfg.workers or os.cpu_count() or 1
    start = time.perf_counter()
    stats: dict[str, Any] = {"splits": {}}
    with contextlib.ExitStack() as stack:
        pool = None
        if workers > 1:
            pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=mp.get_context(),
                                                           initializer=_pool_init, initargs=(cfg.max_pixels,)))
            # the first task forks every worker, before tqdm starts its monitor thread (fork after threads
            # is unsafe) and before the executor's own thread
            pool.submit(int).result()
        seen = KeySet()
        writers: dict[Path, OutputWriter] = {}  # one atomic folder and writer per distinct output folder
        for folder in dict.fromkeys(folders.values()):
            writers[folder] = OutputWriter(stack.enter_context(atomic_dir(folder)), cfg, seen)
        try:
            for split, name in SPLITS:
                file_cfg = cfg.for_file(name.removesuffix(".tsv"))  # this file's columns and header
                out = writers[folders[split]]
                stats["splits"][split] = decode_split(raw_dir / name, split, file_cfg, out, pool, workers)
                check_rejects(stats["splits"][split], file_cfg, out)
        finally:
            for out in writers.values():
                out.close()
        seconds = time.perf_counter() - start
        for folder, out in writers.items():
            # no timings in stats.json: it is part of an output that later stages depend on
            write_json(out.dir / layout.STATS,
                       output_stats({s: v for s, v in stats["splits"].items() if folders[s] == folder}, out))
        stats = output_stats(stats["splits"], *writers.values())
        speed = {"seconds": round(seconds, 3), "images_per_s": round(stats["images"] / max(seconds, 1e-9), 1),
                 "mb_per_s": round(stats["bytes_in"] / 1e6 / max(seconds, 1e-9), 2)}
    log.info("%d images in %d shards, %d rejected %s; %.1f s, %.0f images/s, %.1f MB/s (%d workers)",
             stats["images"], stats["shards"], stats["rejected"], stats["rejects"], seconds,
             speed["images_per_s"], speed["mb_per_s"], workers)
    return {**stats, **speed}


def output_stats(splits: dict[str, dict[str, Any]], *outs: OutputWriter) -> dict[str, Any]:
    """Counts of ``splits`` (each :func:`decode_split`'s) written by ``outs``: lines, images, rejects
    by reason, how images were stored, shards and bytes."""
    reasons: collections.Counter[str] = sum((o.reasons for o in outs), collections.Counter())
    how: collections.Counter[str] = sum((o.how for o in outs), collections.Counter())
    return {"splits": splits,
            **{k: sum(s[k] for s in splits.values()) for k in ("lines", "images", "rejected")},
            "rejects": dict(sorted(reasons.items())), "how": dict(sorted(how.items())),
            "shards": sum(o.shards.n_shards for o in outs),
            "bytes_in": sum(s["bytes"] for s in splits.values()),
            "bytes_out": sum(o.shards.bytes_written for o in outs)}


def _pool_init(max_pixels: int) -> None:
    # the stage's SIGTERM handler (atomic.exit_on_sigterm) is inherited by fork: a worker must die on the
    # executor's terminate(), not run the stage's clean-up
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    Image.MAX_IMAGE_PIXELS = max_pixels
    init_worker()
