"""Check the pipeline wiring after a full `dvc repro`: nothing is left to run,
and changing one param would re-run exactly the stages that read it and their
dependants. Run by .ci/run. The params are changed in a scratch copy of the
work tree made of hard links (``.check_wiring.tmp-<pid>-*``, git- and
dvc-ignored, removed afterwards or by the next run once its process is gone):
the real params.yaml is never edited, so a killed check leaves it as it was.

    python scripts/check_wiring.py
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from stages.lib.atomic import TMP_TAG, exit_on_sigterm, remove_stale_temporaries
from stages.lib.layout import WEIGHTS_DIR

ORDER = ["download", "decode", "filter_clicks", "train_naive", "train_references", "make_pairs", "train_siamese",
         "evaluate", "galleries"]
# param (section, key, new value) -> the stages `dvc repro --dry` must plan to run (in any order)
CASES = [
    (("siamese", "margin", 0.77), ["train_siamese", "evaluate"]),
    (("decode", "jpeg_quality", 77), ORDER[1:]),
    (("filter", "min_clicks", 7), ORDER[2:]),
    (("pairs", "relabel_min_prob", 0.77), ["make_pairs", "train_siamese", "evaluate", "galleries"]),
    (("reference", "labels", ["raw"]), ["train_references", "evaluate"]),
    (("evaluate", "batch_size", 77), ["evaluate"]),
    (("galleries", "per_reason", 7), ["galleries"]),  # redrawn without re-running the label filter's scorer
]


def planned_stages(repo: Path) -> list[str]:
    """Stages a `dvc repro` would run. Plain `--dry` lists only the stages whose
    own inputs changed (it cannot know whether their outputs will change);
    `--force-downstream` adds everything that depends on them."""
    out = subprocess.run(["dvc", "repro", "--dry", "--force-downstream"], capture_output=True, text=True,
                         check=True, cwd=repo).stdout
    return re.findall(r"Running stage '([\w-]+)'", out)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or no hard links there
        shutil.copy2(src, dst)


def scratch_copy(root: Path) -> Path:
    """The work tree as hard links (git and DVC replace files, never write into
    them), less the virtual environment, DVC's state database and its cache,
    which the copy reads where it is (an output missing from the cache counts
    as changed)."""
    remove_stale_temporaries(root / "check_wiring")
    dest = Path(tempfile.mkdtemp(prefix=f".check_wiring{TMP_TAG}{os.getpid()}-", dir=root))
    skip = {root / ".venv", root / ".dvc" / "tmp", root / ".dvc" / "cache", root / ".dvc" / "config.local"}
    shutil.copytree(root, dest, symlinks=True, copy_function=_link_or_copy, dirs_exist_ok=True,
                    ignore=lambda d, names: [n for n in names if Path(d) / n in skip or TMP_TAG in n])
    if (root / ".dvc" / "config.local").exists():  # a real copy: dvc config writes into the file
        shutil.copy2(root / ".dvc" / "config.local", dest / ".dvc" / "config.local")
    cache = subprocess.run(["dvc", "cache", "dir"], capture_output=True, text=True, check=True, cwd=root).stdout
    subprocess.run(["dvc", "config", "--local", "cache.dir", cache.strip()], check=True, cwd=dest)
    return dest


def main() -> int:
    exit_on_sigterm()  # the scratch copy is removed on SIGTERM too
    root = Path.cwd().resolve()
    original = (root / "params.yaml").read_text()
    failures = []
    repo = scratch_copy(root)
    params_path = repo / "params.yaml"

    def expect(what: str, expected: list[str]) -> None:
        """One case: the stages `dvc repro` would run now must be ``expected`` (in any order)."""
        got = planned_stages(repo)
        verdict = "ok" if sorted(got) == sorted(expected) else "WRONG"
        print(f"{what}: would run {got} [{verdict}]")
        if verdict != "ok":
            failures.append(f"{what}: expected {expected}, got {got}")

    try:
        stale = planned_stages(repo)
        print(f"after repro: would run {stale or 'nothing'}")
        if stale:
            failures.append(f"a second dvc repro would run {stale}")
        for (section, key, value), expected in CASES:
            params = yaml.safe_load(original)
            params[section][key] = value
            params_path.unlink()  # a hard link to the real params.yaml: replace it, never write into it
            params_path.write_text(yaml.safe_dump(params, sort_keys=False))
            expect(f"{section}.{key}={value}", expected)
        params_path.unlink()
        params_path.write_text(original)
        # models/weights' README is no weight (.dvcignore): editing it runs nothing; a weights file
        # (model.weights) added or replaced there re-runs every stage that may load it
        readme = repo / WEIGHTS_DIR / "README.md"
        text = readme.read_text()
        readme.unlink()  # a hard link to the real README: replace it, never write into it
        readme.write_text(text + "\nedited\n")
        for what, path, expected in ((f"an edited {WEIGHTS_DIR}/README.md", None, []),
                                     (f"a new file in {WEIGHTS_DIR}", repo / WEIGHTS_DIR / ".check_wiring.pth",
                                      ORDER[3:])):
            if path is not None:
                path.write_bytes(b"other weights")
            expect(what, expected)
    finally:
        shutil.rmtree(repo, ignore_errors=True)
    for f in failures:
        print(f"FAIL: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
