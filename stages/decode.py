"""decode stage: base64 image TSVs -> validated RGB JPEG shards + index.

    python -m stages.decode data/raw data/images [data/test_images]

Streams ``train_images.tsv`` and ``test_images.tsv`` line by line, decodes
blocks of lines in a process pool, and writes (atomically) the shards,
``index.parquet``, ``rejects.tsv`` and ``stats.json`` (stages.lib.decoding):
the training images into the first output folder and the test images into the
second (the pipeline's: evaluate depends on the test images alone), or both
into one folder when no second is given.
Bad rows are rejected with a reason; the stage fails only when a split's
reject fraction passes ``decode.max_reject_fraction``.
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from stages.lib.atomic import exit_on_sigterm, refuse_overlapping_args
from stages.lib.cli import run_stage
from stages.lib.decoding import DecodeConfig, DecodeError, decode_dataset
from stages.lib.params import ConfigError, load_params

log = logging.getLogger("decode")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw_dir", type=Path, help="folder with the image TSVs (data/raw)")
    parser.add_argument("out_dir", type=Path, help="output folder (data/images)")
    parser.add_argument("test_dir", type=Path, nargs="?", default=None,
                        help="output folder of the test images (data/test_images; default: out_dir)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    exit_on_sigterm()  # a killed stage removes its partial outputs
    refuse_overlapping_args(args, "out_dir", "decode")  # replacing the output must not delete an input
    refuse_overlapping_args(args, "test_dir", "decode")
    try:
        decode_dataset(args.raw_dir, args.out_dir, DecodeConfig.from_params(load_params("decode", path=args.params)),
                       test_dir=args.test_dir)
    except (DecodeError, ConfigError) as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(run_stage(main, "decode"))
