"""CI, before anything runs: the committed dvc.lock records this commit's code and params.

    python -m stages.check_lock

``dvc status`` on the fresh clone: every stage dependency the commit holds (its
code files, its params.yaml keys) must be as dvc.lock records it, every stage
must have a lock entry with the command dvc.yaml gives. Otherwise the committed
models and metrics came from other code or params than the commit's: a user's
``dvc repro`` re-runs the stage unasked, and CI's fresh run (which re-runs it
too) would compare numbers the commit never produced. Data and models a clone
lacks are not stale (stages.lib.metriccheck.stale_lock). The fix is to re-run
the stage (``dvc repro``) or, when the change cannot move its outputs, to say so
with ``dvc commit STAGE``. Exit 0 when the lock is current, 1 when it is stale,
2 when dvc cannot answer.
"""
from __future__ import annotations

import json
import sys

from stages.lib.metriccheck import CheckError, Checks, dvc, stale_lock


def main(argv: list[str] | None = None) -> int:
    if argv:
        print(f"check_lock: takes no arguments, got {argv}", file=sys.stderr)
        return 2
    checks = Checks("check_lock")
    try:
        status = json.loads(dvc("status", "--json") or "{}")
    except (CheckError, json.JSONDecodeError) as exc:
        print(f"check_lock: {exc}", file=sys.stderr)
        return 2
    checks.report("dvc.lock records this commit's code, params and commands (dvc status)", stale_lock(status))
    return checks.close()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
