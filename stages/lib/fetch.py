"""Fetching the real raw files (``data.source: url`` or ``path``) into ``data/raw/``.

The contract, for both sources: every required raw role ends up as
``out_dir/<role>.tsv`` (a real file, never a link), checksummed in
``out_dir/SHA256SUMS``, or the call raises and leaves none of its outputs
behind. Downloads stream in chunks, resume through HTTP ``Range``, retry with
exponential backoff and are verified against the sha256 from params before
anything is placed. Archives are trusted no further than their checksum:
only the requested members are read, as streams, and a member's name never
becomes a path; the output names are the fixed role names of ``layout``.

Credentials never come from params (dvc.lock records the ``data`` section,
and git keeps both): a url with ``user:pass@`` is refused. The header comes
from the environment variable named by ``auth_env`` (its whole value, e.g.
``Bearer <token>``) or else from ``~/.netrc`` (basic auth), and is sent to
the url's own origin only, never to a redirect elsewhere. A download whose
length neither params nor the server give stops at ``max_download_mb``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from stages.lib import layout
from stages.lib.atomic import atomic_file, sha256_file
from stages.lib.httpget import (
    DEFAULT_MAX_DOWNLOAD_MB,
    ChecksumError,
    FetchError,
    auth_from_env,
    auth_header,
    download_file,
    redact,
)
from stages.lib.params import Section

log = logging.getLogger(__name__)

REQUIRED_ROLES: tuple[str, ...] = tuple(name.removesuffix(".tsv") for name in layout.RAW_FILES)
OPTIONAL_ROLES: tuple[str, ...] = tuple(name.removesuffix(".tsv") for name in layout.OPTIONAL_RAW_FILES)
SOURCES = ("url", "path")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")

_SPEC_KEYS = {  # source -> (required keys, optional keys)
    "url": ({"url", "sha256"}, {"member", "size", "auth_env"}),
    "path": ({"path"}, {"sha256", "member"}),
}
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
# The real Clickture-Dog files are a few GB: room for those, not for a server that never stops.
_CHUNK_BYTES = 1 << 20
# Server-side hiccups worth waiting out; any other HTTP error (404, 403...) will not fix itself.


@dataclass(frozen=True)
class _Spec:
    role: str
    location: str          # url (source url) or local path (source path)
    sha256: str | None     # of the file at ``location``: the archive when ``member`` is set
    member: str | None     # normalised path inside the archive
    size: int | None = None  # bytes of the download (url source), when params give it
    auth_env: str | None = None  # environment variable holding the Authorization header value (url source)


def fetch_raw(
    files: Mapping[str, Mapping[str, str]],
    out_dir: Path,
    *,
    source: str,
    retries: int = 5,
    timeout_s: float = 60.0,
    backoff_s: float = 1.0,
    cache_dir: Path | None = None,
    max_download_mb: float = DEFAULT_MAX_DOWNLOAD_MB,
    protected: Mapping[str | Path, str] | None = None,
) -> dict[str, str]:
    """Place the raw files named in ``files`` as ``out_dir/<role>.tsv``.

    ``files`` maps a role (``train_images``, ``test_images``, ``test_labels``,
    ``breeds``; optionally ``clicks``, which a release with labels in its image
    file lacks, and ``truth``) to a spec:

    - ``source="url"``: ``{url, sha256[, member][, size][, auth_env]}``.
      ``sha256`` is that of the downloaded file, i.e. of the archive when
      ``member`` names a file inside a .tar/.tar.gz/.tgz/.zip. Roles sharing
      an archive url download it once. ``size`` caps the download at that many
      bytes; without it ``max_download_mb`` does (10**6 bytes a MB).
      ``auth_env`` names the environment variable whose value is sent as the
      ``Authorization`` header; without it ``~/.netrc``'s entry for the host,
      if any, is sent as basic auth.
    - ``source="path"``: ``{path[, sha256][, member]}``; the file is copied.
      A path inside ``out_dir`` or inside a folder of ``protected`` (path ->
      who writes it, e.g. ``"stage decode"``) is refused: those get deleted.

    Downloads go to ``cache_dir`` (``<sha256>.part`` while incomplete, renamed
    to ``<sha256>`` once verified). Without ``cache_dir`` a temporary folder
    inside ``out_dir`` is used and removed, so resume works across retries
    but not across runs; pass a persistent ``cache_dir`` for the latter.
    A failed attempt is retried ``retries`` times, waiting ``backoff_s``,
    then twice as long each time. ``timeout_s`` bounds each socket operation.

    Writes ``out_dir/SHA256SUMS`` (sha256sum format, sorted) and returns
    ``{file name: sha256}`` of the placed files. Raises ``ValueError`` for bad
    arguments before touching the network, ``ChecksumError`` or
    ``FetchError`` otherwise; on any error, none of the role files asked for
    nor ``SHA256SUMS`` is left in ``out_dir`` (not even an older copy).
    """
    specs = _validate(files, source=source)
    if retries < 0 or timeout_s <= 0 or backoff_s < 0:
        raise ValueError(f"need retries >= 0, timeout_s > 0, backoff_s >= 0; got {retries}, {timeout_s}, {backoff_s}")
    if not 0 < max_download_mb < float("inf"):  # also refuses nan
        raise ValueError(f"data.max_download_mb must be > 0 and finite (MB of 10**6 bytes), got {max_download_mb}")
    out_dir = Path(out_dir)
    if source == "path":
        _refuse_inputs_in_outputs(specs, {out_dir: "", **(protected or {})})
    out_dir.mkdir(parents=True, exist_ok=True)
    own_cache = cache_dir is None
    cache = Path(tempfile.mkdtemp(prefix=".fetch-", dir=out_dir)) if own_cache else Path(cache_dir)
    targets = {spec.role: out_dir / f"{spec.role}.tsv" for spec in specs}
    uses = {loc: sum(s.location == loc for s in specs) for loc in {s.location for s in specs}}
    try:
        if source == "url":
            local = _download_all(specs, cache, retries=retries, timeout_s=timeout_s, backoff_s=backoff_s,
                                  max_bytes=int(max_download_mb * 1e6))
        else:
            local = {s.location: Path(s.location) for s in specs}
        sums: dict[str, str] = {}
        for spec in specs:
            target, src = targets[spec.role], local[spec.location]
            label = f"{spec.role} ({redact(spec.location) if source == 'url' else src})"
            if spec.member is not None:
                if source == "path" and spec.sha256 is not None:
                    _verify(src, spec.sha256, label=label)
                sums[target.name] = _extract_member(src, spec.member, target)
            elif source == "url" and own_cache and uses[spec.location] == 1:
                # Verified on download and nobody else needs it: move, not a second copy of a big file.
                os.replace(src, target)
                sums[target.name] = spec.sha256
            else:
                # A downloaded file was verified already; a local one is verified while copying.
                expected = spec.sha256 if source == "path" else None
                sums[target.name] = _copy(src, target, expected=expected, label=label)
            log.info("placed %s (sha256 %s…)", target, sums[target.name][:12])
        write_checksums(out_dir, sums)
    except BaseException:
        # Stale files from an earlier run would pass for this run's output: remove them too.
        for path in [*targets.values(), out_dir / layout.CHECKSUMS]:
            path.unlink(missing_ok=True)
        raise
    finally:
        if own_cache:
            shutil.rmtree(cache, ignore_errors=True)
    return dict(sorted(sums.items()))


def _validate(files: Mapping[str, Mapping[str, str]], *, source: str) -> list[_Spec]:
    """Check roles and specs up front, so that a typo fails before any download."""
    if source not in SOURCES:
        raise ValueError(f"data.source must be one of {SOURCES} here, got {source!r}")
    if not isinstance(files, Mapping):
        raise ValueError(f"data.files must be a mapping role -> spec, got {type(files).__name__}")
    unknown = sorted(set(files) - set(REQUIRED_ROLES) - set(OPTIONAL_ROLES))
    if unknown:
        raise ValueError(f"data.files: unknown role(s) {unknown}; known: {list(REQUIRED_ROLES + OPTIONAL_ROLES)}")
    missing = [r for r in REQUIRED_ROLES if r not in files]
    if missing:
        raise ValueError(f"data.files: missing required role(s) {missing} for source {source!r}")
    required, optional = _SPEC_KEYS[source]
    specs: list[_Spec] = []
    archive_sha: dict[str, str | None] = {}
    archive_auth: dict[str, str | None] = {}
    for role in sorted(files):
        spec = files[role]
        where = f"data.files.{role}"
        if not isinstance(spec, Mapping):
            raise ValueError(f"{where}: expected a mapping with keys {sorted(required)}, got {spec!r}")
        keys = set(spec)
        if required - keys:
            raise ValueError(f"{where}: missing {sorted(required - keys)} (source {source!r} needs {sorted(required)})")
        if keys - required - optional:
            raise ValueError(f"{where}: unexpected key(s) {sorted(keys - required - optional)}")
        size = spec.get("size")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
            raise ValueError(f"{where}: size must be the download's length in bytes (an integer > 0), got {size!r}")
        if not all(isinstance(v, str) and v for k, v in spec.items() if k != "size"):
            raise ValueError(f"{where}: every value must be a non-empty string, got {dict(spec)!r}")
        location = spec["url"] if source == "url" else spec["path"]
        if source == "url" and urllib.parse.urlsplit(location).scheme not in ("http", "https"):
            # urllib would also open file:// and ftp://; the url source is for the web only.
            raise ValueError(f"{where}: url must be http(s), got {redact(location)!r}")
        if source == "url" and "@" in urllib.parse.urlsplit(location).netloc:
            # params.yaml is in git, and dvc.lock copies the data section: a secret there is published.
            raise ValueError(f"{where}: credentials in the url ({redact(location)!r} with a user name or password) "
                             f"would be recorded in params.yaml and dvc.lock; remove them and name an environment "
                             f"variable holding the Authorization header in {where}.auth_env, or put the login in "
                             f"~/.netrc for host {urllib.parse.urlsplit(location).hostname}")
        auth_env = spec.get("auth_env")
        if auth_env is not None:
            auth_from_env(auth_env, where=f"{where}.auth_env")  # set and well-formed, before any download
        digest = spec.get("sha256")
        if digest is not None:
            digest = digest.lower()
            if not _SHA256_RE.fullmatch(digest):
                raise ValueError(f"{where}: sha256 must be 64 hex digits, got {spec['sha256']!r}")
        member = spec.get("member")
        if member is not None:
            member = _check_member_name(member, where=where)
        elif _looks_like_archive(location):
            raise ValueError(f"{where}: {redact(location)!r} is an archive; name the file inside it with 'member'")
        if location in archive_sha and archive_sha[location] != digest:
            raise ValueError(f"{where}: {redact(location)!r} is listed with different sha256 values")
        if location in archive_auth and archive_auth[location] != auth_env:
            raise ValueError(f"{where}: {redact(location)!r} is listed with different auth_env values")
        archive_sha[location] = digest
        archive_auth[location] = auth_env
        specs.append(_Spec(role, location, digest, member, size, auth_env))
    return specs


def _refuse_inputs_in_outputs(specs: list[_Spec], protected: Mapping[str | Path, str]) -> None:
    """Refuse a ``path`` input that resolves (links followed) inside an output folder.

    DVC deletes a stage's outputs before running it, and a direct run swaps
    the output folder and removes the old one: a file kept there is lost.
    ``protected`` maps a folder to who writes it; ``""`` means this call's
    ``out_dir``."""
    roots = [(Path(path), Path(path).resolve(), who) for path, who in protected.items()]
    for spec in specs:
        resolved = Path(spec.location).resolve()
        for path, root, who in roots:
            if resolved == root or root in resolved.parents:
                inside = f"{path}, an output of {who}" if who else f"the output folder {path}"
                raise ValueError(
                    f"data.files.{spec.role}: path {spec.location!r} lies inside {inside}, which is deleted and "
                    f"rewritten whenever that runs, so the file would be lost; keep it outside the project or in a "
                    f"folder that no stage writes (e.g. data/external/) and point data.files.{spec.role}.path there")


def _download_all(
    specs: list[_Spec], cache: Path, *, retries: int, timeout_s: float, backoff_s: float, max_bytes: int
) -> dict[str, Path]:
    """Download each distinct url once (keyed by its sha256); reuse a verified cached copy."""
    roles: dict[str, list[str]] = {}
    for spec in specs:
        roles.setdefault(spec.location, []).append(spec.role)
    sha = {spec.location: spec.sha256 for spec in specs}
    sizes = {spec.location: spec.size for spec in specs if spec.size is not None}
    auth_env = {spec.location: spec.auth_env for spec in specs}
    local: dict[str, Path] = {}
    for url, names in roles.items():
        label = f"{'+'.join(names)} ({redact(url)})"
        dest = cache / sha[url]  # a validated hex digest: the url never becomes a path
        if dest.exists():
            if sha256_file(dest) == sha[url]:
                log.info("%s: using verified copy in %s", label, cache)
                local[url] = dest
                continue
            log.warning("%s: cached copy is corrupt; downloading again", label)
            dest.unlink()
        authorization = auth_header(url, auth_env[url], where=f"data.files.{names[0]}.auth_env", label=label)
        local[url] = download_file(url, dest, sha256=sha[url], size=sizes.get(url), max_bytes=max_bytes,
                                   authorization=authorization, retries=retries, timeout_s=timeout_s,
                                   backoff_s=backoff_s, label=label, size_param=f"data.files.{names[0]}.size")
    return local


def _extract_member(archive: Path, member: str, target: Path) -> str:
    """Stream one regular-file ``member`` of a tar or zip ``archive`` to ``target``; return its sha256."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            infos = [i for i in zf.infolist() if _normalise(i.filename) == member]
            if len(infos) != 1:
                raise FetchError(f"{archive}: member {member!r} found {len(infos)} times in the zip, need exactly once")
            info = infos[0]
            _check_member_name(info.filename, where=str(archive))
            # Unix file type in the high bits; 0 (zips made on Windows, or without a type) means a plain file.
            kind = stat.S_IFMT(info.external_attr >> 16)
            if info.is_dir() or kind not in (0, stat.S_IFREG):
                raise FetchError(f"{archive}: member {member!r} is not a regular file (a link or device?)")
            with zf.open(info) as src:
                return _stream_to(src, target)
    if not tarfile.is_tarfile(archive):
        raise FetchError(f"{archive}: a member {member!r} was asked for, but this is neither a tar nor a zip archive")
    digest = None
    with tarfile.open(archive, "r:*") as tf:
        # One pass in archive order: a .tar.gz is never decompressed twice for one member.
        for info in tf:
            if _normalise(info.name) != member:
                continue
            if digest is not None:
                raise FetchError(f"{archive}: member {member!r} appears more than once")
            if not info.isreg():
                raise FetchError(f"{archive}: member {member!r} is not a regular file (a link or device?)")
            # The same rules as extractall(filter="data"): no absolute names, no "..", no special modes.
            tarfile.data_filter(info, str(target.parent))
            with tf.extractfile(info) as src:
                digest = _stream_to(src, target)
    if digest is None:
        raise FetchError(f"{archive}: no member {member!r}")
    return digest


def _copy(src: Path, target: Path, *, expected: str | None, label: str) -> str:
    """Copy ``src`` to ``target`` atomically, verifying ``expected`` before the rename."""
    if not src.is_file():
        raise FetchError(f"{label}: not a file")
    with open(src, "rb") as f:
        return _stream_to(f, target, expected=expected, label=label)


def _stream_to(src: BinaryIO, target: Path, *, expected: str | None = None, label: str = "") -> str:
    """Write ``src`` to ``target`` via a temporary sibling; a failed check leaves nothing."""
    h = hashlib.sha256()
    with atomic_file(target, "wb") as out:
        while chunk := src.read(_CHUNK_BYTES):
            h.update(chunk)
            out.write(chunk)
        if expected is not None and h.hexdigest() != expected:
            raise ChecksumError(f"sha256 mismatch for {label or target.name}: expected {expected}, got {h.hexdigest()}")
    return h.hexdigest()


def _verify(path: Path, expected: str, *, label: str) -> None:
    if not path.is_file():
        raise FetchError(f"{label}: not a file")
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(f"sha256 mismatch for {label}: expected {expected}, got {actual}")


def write_checksums(out_dir: Path, sums: dict[str, str]) -> None:
    """``out_dir/SHA256SUMS`` in sha256sum format (``sha256sum -c`` checks it),
    sorted by file name, written atomically: the one writer of that file."""
    with atomic_file(out_dir / layout.CHECKSUMS) as f:
        f.writelines(f"{digest}  {name}\n" for name, digest in sorted(sums.items()))


def _check_member_name(name: str, *, where: str) -> str:
    """Return the normalised member name, or refuse one that could point outside a folder."""
    if "\x00" in name or "\\" in name or name.startswith("/") or re.match(r"[A-Za-z]:", name):
        raise ValueError(f"{where}: unsafe archive member name {name!r} (absolute or odd characters)")
    if ".." in name.split("/"):
        raise ValueError(f"{where}: unsafe archive member name {name!r} (contains '..')")
    normalised = _normalise(name)
    if not normalised or normalised == ".":
        raise ValueError(f"{where}: empty archive member name {name!r}")
    return normalised


def _normalise(name: str) -> str:
    # "./a/b" and "a//b" name the same member. A name with ".." is left as is (so it never
    # matches a requested name, which cannot hold one): resolving it is what zip-slip exploits.
    return name if ".." in name.split("/") else posixpath.normpath(name)


def _looks_like_archive(location: str) -> bool:
    path = urllib.parse.urlsplit(location).path if "://" in location else location
    return path.lower().endswith(ARCHIVE_SUFFIXES)


# ------------------------------------------------------------------ params
@dataclass(frozen=True)
class SampleConfig(Section):
    """``data.sample``: the generated Clickture-Dog-like set (stages.lib.sample)."""

    n_train: int
    test_per_breed: int
    min_side: int
    max_side: int
    lookalike_share: float
    lookalike_only_share: float
    best_known_share: float
    distractor_share: float
    no_breed_query_share: float


@dataclass(frozen=True)
class DataConfig(Section):
    """params.yaml ``data``: where the raw files come from."""

    source: Literal["sample", "url", "path"]
    seed: int
    sample: SampleConfig
    files: dict[str, dict[str, Any]]
    retries: int
    timeout_s: float
    max_download_mb: float

    def __post_init__(self) -> None:
        if not 0 < self.max_download_mb < float("inf"):  # also refuses nan
            raise ValueError(f"max_download_mb must be > 0 and finite (MB of 10**6 bytes), got {self.max_download_mb}")
