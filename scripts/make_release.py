"""A Clickture-format release from a labelled photo folder, with a click log
drawn from the embedded sample's noise model (stages/lib/release.py).

    python scripts/make_release.py PHOTOS_DIR OUT [--families FILE] [--seed N] ...
    python scripts/make_release.py ../shared/dog_photos /tmp/photo_release

PHOTOS_DIR holds one folder per breed (``beagle/*.jpg``; the folder name,
``_`` read as a space, is the breed). OUT receives the raw files that
``data.source: path`` reads (train_images.tsv, test_images.tsv,
test_labels.tsv, clicks.tsv, breeds.tsv, truth.tsv), ``sources.tsv`` (each
key's photo), ``release.json`` (options, counts, the raw click labels'
measured precision) and ``params_data.yaml``: the ``data`` keys that run the
pipeline on it, also printed at the end. Photos are never copied as they
are: each is re-encoded as a JPEG with its short side capped.

Distractors (non-dog images clicked under breed queries) come only from
``--distractors DIR``, a folder of non-dog photos; without it the release
has none.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from stages.lib.params import ConfigError, load_params
from stages.lib.release import DATA_PARAMS, Noise, make_release, read_families

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FAMILIES = Path(__file__).resolve().with_name("dog_photos_families.yaml")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("photos_dir", type=Path, metavar="PHOTOS_DIR", help="one folder of photos per breed")
    p.add_argument("out_dir", type=Path, metavar="OUT", help="the release folder (new, or an earlier release)")
    p.add_argument("--families", type=Path, default=DEFAULT_FAMILIES,
                   help="YAML of look-alike families, best-known breed first (default: %(default)s, "
                        "made for ../shared/dog_photos)")
    p.add_argument("--no-families", action="store_true", help="no look-alike families: no breed is confused")
    p.add_argument("--seed", type=int, default=0, help="keys, test split, order and clicks (default: %(default)s)")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--test-fraction", type=float, default=0.2,
                       help="share of each breed's photos in the clean test split (default: %(default)s)")
    split.add_argument("--test-per-breed", type=int, default=None, help="or this many test photos per breed")
    p.add_argument("--distractors", type=Path, default=None,
                   help="a folder of non-dog photos: training distractors, clicked once or twice under random "
                        "breeds (default: none)")
    noise = Noise()
    p.add_argument("--lookalike-share", type=float, default=noise.lookalike_share,
                   help="dogs also or only clicked under a look-alike breed (default: %(default)s, the sample's)")
    p.add_argument("--lookalike-only-share", type=float, default=noise.lookalike_only_share,
                   help="of those: clicked only under the look-alike, a wrong label (default: %(default)s)")
    p.add_argument("--best-known-share", type=float, default=noise.best_known_share,
                   help="the look-alike is the family's best-known breed (default: %(default)s)")
    p.add_argument("--best-known-lookalike-share", type=float, default=None,
                   help="--lookalike-share for the images of each family's best-known breed (default: the same, "
                        "as in the sample; lower makes the confusion one-sided also in families of two)")
    p.add_argument("--no-breed-query-share", type=float, default=noise.no_breed_query_share,
                   help="images also clicked under a query that names no breed (default: %(default)s)")
    p.add_argument("--max-short-side", type=int, default=256,
                   help="cap on a photo's short side in px, 0 keeps it (default: %(default)s)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="(default: %(default)s)")
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml",
                   help="params.yaml whose filter.aliases read the click log for the measured noise only "
                        "(default: the project's)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    families = [] if args.no_families else read_families(args.families)
    try:
        aliases = load_params("filter", path=args.params)["aliases"] if args.params.is_file() else {}
        noise = Noise(args.lookalike_share, args.lookalike_only_share, args.best_known_share,
                      args.no_breed_query_share, args.best_known_lookalike_share)
        manifest = make_release(
            args.photos_dir, args.out_dir, families=families, seed=args.seed, noise=noise,
            test_per_breed=args.test_per_breed, test_fraction=args.test_fraction,
            distractors_dir=args.distractors, max_short_side=args.max_short_side,
            jpeg_quality=args.jpeg_quality, aliases=aliases or {})
    except (ValueError, ConfigError) as err:
        print(f"make_release: {err}", file=sys.stderr)
        return 2
    images, raw = manifest["images"], manifest["raw_labels"]
    print(f"{args.out_dir}: {images['train']} training dogs, {images['distractors']} distractors, "
          f"{images['test']} test images, {images['click_lines']} click lines, {len(manifest['skipped'])} "
          f"unreadable photos skipped; raw click labels right for {raw['precision']:.1%} of the training dogs")
    print(json.dumps({f: v["precision"] for f, v in raw["per_family"].items()}, indent=1))
    print(f"\n{(args.out_dir / DATA_PARAMS).read_text(encoding='utf-8')}", end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
