"""Downloading one url over HTTP(S), for ``fetch``: the Authorization header from the environment or
``~/.netrc`` (sent to the url's own origin only, never to a redirect elsewhere), resume through
``Range`` into a ``.part`` file, retries with exponential backoff, a size cap, and the sha256 check
before the file appears. ``fetch`` validates the ``data`` params, handles archives and places the
files; this module only gets bytes."""
from __future__ import annotations

import base64
import dataclasses
import http.client
import logging
import netrc
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from stages.lib.atomic import sha256_file
from stages.lib.cli import StageFailure

log = logging.getLogger(__name__)

_CHUNK_BYTES = 1 << 20
_MAX_BACKOFF_S = 60.0
DEFAULT_MAX_DOWNLOAD_MB = 20_000.0
_RETRY_HTTP_CODES = frozenset({408, 425, 429, 500, 502, 503, 504})
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class FetchError(StageFailure):
    """A raw file could not be obtained (network, HTTP status, archive content)."""


class ChecksumError(FetchError):
    """A file's sha256 differs from the one in params."""


class _Retryable(Exception):
    """An attempt failed in a way that another attempt may not."""


def auth_from_env(name: str, *, where: str) -> str:
    """The Authorization header value held by environment variable ``name``; errors never show it."""
    if not _ENV_NAME_RE.fullmatch(name):
        raise ValueError(f"{where}: auth_env must name an environment variable (letters, digits, _), got {name!r}")
    value = os.environ.get(name)
    if not value:
        raise ValueError(f"{where}: environment variable {name} is not set (or is empty); export it with the whole "
                         f"Authorization header value, e.g. 'Bearer <token>'")
    if any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in value):
        # http.client would refuse it too, but with the value in its message.
        raise ValueError(f"{where}: {name} holds a line break or another control character (value not shown)")
    return value


def auth_header(url: str, auth_env: str | None, *, where: str, label: str) -> str | None:
    """The Authorization header for ``url``: from ``auth_env``, else ``~/.netrc``, else none."""
    if auth_env is not None:
        value, source = auth_from_env(auth_env, where=where), f"${auth_env}"
        if " " not in value.strip():
            log.warning("%s: $%s holds no space; it must be the whole header value, e.g. 'Bearer <token>', not "
                        "the token alone", label, auth_env)
    else:
        value, source = _netrc_authorization(urllib.parse.urlsplit(url).hostname or ""), "~/.netrc"
        if value is None:
            return None
    if urllib.parse.urlsplit(url).scheme == "http":
        log.warning("%s: sending the credentials from %s over plain http (unencrypted)", label, source)
    else:
        log.info("%s: sending the credentials from %s", label, source)
    return value


def _netrc_authorization(host: str) -> str | None:
    """Basic auth from ``~/.netrc``'s entry for ``host`` (or its ``default``); None without one."""
    try:
        entries = netrc.netrc()
    except FileNotFoundError:
        return None
    except netrc.NetrcParseError as e:
        # Its message may quote a token of the file, a password perhaps: file and line only, no chained error.
        raise FetchError(f"{e.filename}, line {e.lineno}: cannot read this netrc file (a syntax error, or a "
                         f"password in a file that others may read: chmod 600 it)") from None
    except OSError as e:
        raise FetchError(f"~/.netrc: cannot read it ({e.strerror})") from None
    entry = entries.authenticators(host)
    if entry is None:
        return None
    login, _, password = entry
    return "Basic " + base64.b64encode(f"{login}:{password or ''}".encode()).decode("ascii")


def _origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port): credentials for one origin are not sent to another."""
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or {"http": 80, "https": 443}.get(parts.scheme)


def download_file(
    url: str,
    dest: Path,
    *,
    sha256: str,
    size: int | None = None,
    max_bytes: int = int(DEFAULT_MAX_DOWNLOAD_MB * 1e6),
    authorization: str | None = None,
    retries: int = 5,
    timeout_s: float = 60.0,
    backoff_s: float = 1.0,
    label: str | None = None,
    size_param: str = "data.files.<role>.size",
) -> Path:
    """Download ``url`` to ``dest`` and verify it; return ``dest``.

    Bytes accumulate in ``dest + ".part"``, which a later call resumes with an
    HTTP Range request (a server that ignores Range is read from the start).
    ``dest`` itself only ever appears complete and verified: a checksum
    mismatch deletes the part file and raises ``ChecksumError``. A body longer
    than ``size`` (or than the server's own Content-Length) stops the download
    with ``FetchError`` at that length, not when the disk is full; without
    ``size``, a body longer than ``max_bytes`` stops it too, and removes the
    part file (``size_param`` names the param that would raise it).
    ``authorization`` is sent as the Authorization header to ``url``'s origin
    only (scheme, host and port), never to a redirect elsewhere.
    """
    label = label or redact(url)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    get = _Get(url, size, max_bytes, authorization, size_param)
    resumed = _download_with_retries(get, part, retries=retries, timeout_s=timeout_s, backoff_s=backoff_s,
                                     label=label)
    actual = sha256_file(part)
    if actual != sha256 and resumed:
        # The kept prefix may come from another version of the file: one fresh try before blaming the source.
        log.warning("%s: sha256 mismatch after a resumed download; downloading again from the start", label)
        part.unlink()
        _download_with_retries(get, part, retries=retries, timeout_s=timeout_s, backoff_s=backoff_s, label=label)
        actual = sha256_file(part)
    if actual != sha256:
        part.unlink()
        raise ChecksumError(f"sha256 mismatch for {label}: expected {sha256}, got {actual}")
    os.replace(part, dest)
    return dest



@dataclass(frozen=True)
class _Get:
    """What every attempt of one download asks for."""

    url: str
    size: int | None        # exact length from params, or None
    max_bytes: int          # the cap when ``size`` is None
    authorization: str | None = dataclasses.field(default=None, repr=False)  # a secret: kept out of reprs
    size_param: str = "data.files.<role>.size"


def _download_with_retries(
    get: _Get, part: Path, *, retries: int, timeout_s: float, backoff_s: float, label: str
) -> bool:
    """Run attempts until one completes; return whether any resumed from kept bytes."""
    resumed = False
    for attempt in range(retries + 1):
        try:
            resumed |= _attempt(get, part, timeout_s=timeout_s, label=label)
            return resumed
        except urllib.error.HTTPError as e:
            if e.code not in _RETRY_HTTP_CODES:
                hint = ""
                if e.code in (401, 403):
                    hint = ("; credentials were sent" if get.authorization else
                            "; no credentials were sent: name an environment variable in data.files.<role>.auth_env "
                            "or add the host to ~/.netrc")
                raise FetchError(f"{label}: HTTP {e.code} {e.reason}{hint}") from e
            error: Exception = e
        except (_Retryable, OSError, http.client.HTTPException) as e:  # OSError covers timeouts and resets
            error = e
        if attempt == retries:
            raise FetchError(f"{label}: giving up after {retries + 1} attempt(s): {error}") from error
        delay = min(backoff_s * 2**attempt, _MAX_BACKOFF_S)
        log.warning("%s: attempt %d/%d failed (%s); retrying in %.1fs", label, attempt + 1, retries + 1, error, delay)
        time.sleep(delay)
    raise AssertionError("unreachable")


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only, at every hop: urllib's own handler
    also follows ``ftp://``, which the url source never asked for.

    The Authorization header is an "unredirected" header, which urllib drops
    on every redirect; it is put back only when the new url has the same
    origin (scheme, host, port), as requests does: a file host that sends the
    client on to a CDN or another site must not hand it the token."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 (urllib's signature)
        if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
            raise FetchError(f"{redact(req.full_url)}: redirected to {redact(newurl)!r}; only http(s) "
                             f"redirects are followed")
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        authorization = req.unredirected_hdrs.get("Authorization")
        if new is not None and authorization is not None:
            if _origin(newurl) == _origin(req.full_url):
                new.add_unredirected_header("Authorization", authorization)
            else:
                log.info("%s: redirected to %s, another origin: not sending the credentials there",
                         redact(req.full_url), redact(newurl))
        return new


_OPENER = urllib.request.build_opener(_HttpOnlyRedirects)


def _attempt(get: _Get, part: Path, *, timeout_s: float, label: str) -> bool:
    """One GET appending to ``part`` from its current size; return whether it resumed.

    Raises ``_Retryable`` when the body ends short, so the caller tries again
    from the new, longer part file.
    """
    size = get.size
    offset = part.stat().st_size if part.exists() else 0
    # identity: a transparently gzipped body would make byte offsets meaningless for Range.
    headers = {"User-Agent": "clickdog-fetch", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(get.url, headers=headers)
    if get.authorization is not None:
        # Unredirected: urllib does not copy it to a redirect; _HttpOnlyRedirects decides.
        request.add_unredirected_header("Authorization", get.authorization)
    try:
        response = _OPENER.open(request, timeout=timeout_s)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not offset:
            raise
        _, total = _content_range(e.headers.get("Content-Range"))
        if total == offset:  # complete already (a run stopped before verifying it)
            return True
        part.unlink()  # longer than the file: not a prefix of it
        raise _Retryable(f"kept {offset} bytes but the server refuses that range; restarting") from e
    with response:
        total = _int_or_none(response.headers.get("Content-Length"))
        if offset and response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range"))
            if start != offset:
                part.unlink()
                raise _Retryable(f"asked for bytes from {offset}, server sent from {start}; restarting")
            log.info("%s: resuming at byte %d", label, offset)
        elif response.status == 200:
            if offset:
                log.info("%s: server ignored the Range request; restarting from byte 0", label)
            offset = 0
        else:
            raise FetchError(f"{label}: unexpected HTTP status {response.status}")
        if size is not None and total is not None and total != size:
            raise FetchError(f"{label}: the server announces {total} bytes, data.files gives size {size}")
        cap = f"data.max_download_mb ({get.max_bytes / 1e6:g} MB)"
        advice = f"give the download's length in bytes as {get.size_param}, or raise data.max_download_mb"
        if size is None and total is not None and total > get.max_bytes:
            part.unlink(missing_ok=True)
            raise FetchError(f"{label}: the server announces {total} bytes, more than {cap}; {advice}")
        limit = size if size is not None else total if total is not None else get.max_bytes
        started = time.monotonic()
        with open(part, "ab" if offset else "wb") as f, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=label, leave=False, disable=None,
        ) as bar:
            written = offset
            while chunk := response.read(_CHUNK_BYTES):
                written += len(chunk)
                if written > limit:
                    f.close()
                    part.unlink()
                    if size is None and total is None:
                        raise FetchError(f"{label}: the server sent more than {cap} without a Content-Length; "
                                         f"stopped and removed the partial download; {advice}")
                    raise FetchError(f"{label}: the server sent more than the {limit} bytes of "
                                     f"{'data.files size' if size is not None else 'its Content-Length'}; stopped")
                f.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    # http.client returns b"" (no error) when a server closes before Content-Length: check ourselves.
    if total is not None and size != total:
        raise _Retryable(f"connection ended at byte {size} of {total}")
    elapsed = max(time.monotonic() - started, 1e-9)
    log.info("%s: %d bytes in %.1fs (%.1f MB/s)", label, size, elapsed, (size - offset) / elapsed / 1e6)
    return bool(offset)



def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """Parse ``bytes START-END/TOTAL`` or ``bytes */TOTAL`` into (start, total)."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None
    return _int_or_none(m.group(1)), _int_or_none(m.group(2))


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


def redact(url: str) -> str:
    """The url without credentials or query string, for messages and logs."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))
