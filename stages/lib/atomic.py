"""Atomic outputs: a stage writes to a temporary sibling, then renames, so an
interrupted run never leaves a half-written output that DVC would cache.

Temporary siblings are named ``.<name>.tmp-<host>-<pid>-<random>``: a run
that was killed (SIGKILL, out of memory, power loss) cannot clean up, so the
next atomic write to the same target removes the temporaries of processes of
*this host* that no longer exist (a checkout shared by two hosts or
containers: a PID says nothing about another host's processes, so their
temporaries are left alone). SIGTERM (what ``timeout``, schedulers and ``kill`` send) is
turned into a normal exit by :func:`exit_on_sigterm`, so the clean-up of
these context managers runs.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_TAG = ".tmp-"
log = logging.getLogger("atomic")


def exit_on_sigterm() -> None:
    """Make SIGTERM raise SystemExit(143) in the main thread: ``finally``
    blocks and the context managers here remove partial outputs, as they do
    for an exception or Ctrl-C. Each stage calls it first thing."""
    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _host() -> str:
    """This host's name as it stands in temporary names (no "-": it separates the fields)."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove the temporary siblings of ``target`` whose process, on this host, is gone."""
    removed = []
    prefix = f".{target.name}{TMP_TAG}{_host()}-"
    for path in target.parent.glob(glob.escape(prefix) + "*"):
        pid = path.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        log.warning("removed %d temporary output(s) of killed runs: %s", len(removed), [p.name for p in removed])
    return removed


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}{TMP_TAG}{_host()}-{os.getpid()}-"


def refuse_overlapping_args(args: Any, output: str, stage: str) -> None:
    """:func:`refuse_overlap` for a stage's parsed arguments: the Path argument ``output`` against every
    other Path argument but ``--params``."""
    inputs = {k: v for k, v in vars(args).items() if isinstance(v, Path) and k not in (output, "params")}
    if getattr(args, output) is not None:
        refuse_overlap(getattr(args, output), inputs, stage)


def refuse_overlap(output: str | Path, inputs: dict[str, str | Path], stage: str) -> None:
    """Stop when ``output`` is one of ``inputs``, contains one or lies inside one: replacing the output
    deletes the folder it replaces (``python -m stages.decode data/raw data/raw`` deleted the raw files).
    ``inputs`` maps a name for the message to a path; paths are compared resolved (links followed)."""
    out = Path(output).resolve()
    for name, path in inputs.items():
        inp = Path(path).resolve()
        if out == inp or out in inp.parents or inp in out.parents:
            how = "is" if out == inp else "contains" if out in inp.parents else "lies inside"
            raise SystemExit(f"{stage}: the output folder {output} {how} the input {name} ({path}): writing "
                             "the output would delete or change it; give the output a folder of its own")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``target`` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target), dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; outputs are ordinary folders
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


@contextlib.contextmanager
def atomic_file(target: str | Path, mode: str = "w", **open_kwargs: Any) -> Iterator[Any]:
    """Open a temporary sibling of ``target`` for writing; rename on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(target), dir=target.parent)
    os.close(fd)
    if "b" not in mode:
        open_kwargs.setdefault("encoding", "utf-8")
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: after a crash, the old file or the new one, whole
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def sha256_file(*paths: str | Path) -> str:
    """Hex sha256 of the files' contents, one after another, read in 1 MiB chunks: the one file hasher
    (download's SHA256SUMS, releases, the checkpoint fingerprint)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON, atomically."""
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
