"""galleries stage: thumbnails of what each label filter kept and dropped.

    python -m stages.galleries data/raw data/filtered data/pairs data/images reports/galleries

Reads params ``galleries.*``; the click filter's tables (``filtered/labels.tsv``,
``dropped.tsv``), the label filter's (``pairs/clean.tsv``, ``scores.tsv``,
``report.json``), the decoded training images and, where it exists,
``raw/truth.tsv`` (a red caption is a wrong label). Writes
``gallery_click_filter.png`` and ``gallery_prob_filter.png`` (the folder replaced
as a whole). A stage of its own: the galleries show training images, which
evaluate must not depend on (re-validating a run pulls the test set, not the
training set), and a change of ``galleries.per_reason`` redraws them without
re-running the label filter's scorer.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from stages.lib import layout
from stages.lib.atomic import exit_on_sigterm, refuse_overlapping_args
from stages.lib.cli import run_stage
from stages.lib.galleries import GalleriesConfig, write_galleries
from stages.lib.params import load_sections
from stages.lib.shards import read_index

log = logging.getLogger("galleries")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("raw", "filtered", "pairs", "images", "out"):
        parser.add_argument(name, type=Path)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    exit_on_sigterm()  # a killed stage removes its partial outputs
    refuse_overlapping_args(args, "out", "galleries")  # replacing the output must not delete an input
    cfg = load_sections(args.params, galleries=GalleriesConfig)["galleries"]
    start = time.time()
    pairs_report = json.loads((args.pairs / layout.REPORT).read_text(encoding="utf-8"))
    write_galleries(args.out, raw_dir=args.raw, filtered_dir=args.filtered, pairs_dir=args.pairs,
                    images_dir=args.images, index=read_index(args.images), pairs_report=pairs_report,
                    n=cfg.per_reason)
    log.info("galleries written to %s in %.1f s", args.out, time.time() - start)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_stage(main, "galleries"))
