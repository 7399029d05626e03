"""download stage: put the raw Clickture-format TSVs in ``data/raw``.

``data.source: sample`` generates the embedded sample (offline, deterministic
from ``data.seed``); ``url`` downloads the files listed in ``data.files``
(resumable, retried, checksummed, safely extracted); ``path`` copies files
already on disk. Either way the output is written atomically and ends with a
``SHA256SUMS`` file.

    python -m stages.download data/raw
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from stages.lib import layout
from stages.lib.atomic import atomic_dir, exit_on_sigterm, sha256_file
from stages.lib.cli import run_stage
from stages.lib.fetch import DataConfig, fetch_raw, write_checksums
from stages.lib.params import load_sections, read_yaml

log = logging.getLogger("download")


def checksum_all(out_dir: Path) -> dict[str, str]:
    """Checksums of every file in ``out_dir`` (the generated sample), written
    to its SHA256SUMS."""
    sums = {p.name: sha256_file(p) for p in sorted(out_dir.iterdir()) if p.is_file() and p.name != layout.CHECKSUMS}
    write_checksums(out_dir, sums)
    return sums


def pipeline_outputs(dvc_file: Path = Path("dvc.yaml")) -> dict[str, str]:
    """Every output (outs, metrics, plots) of every stage in ``dvc_file`` -> ``"stage <name>"``.

    DVC deletes a stage's outputs before running it, so no ``path`` input may
    live there. dvc.yaml is read for this refusal only (it never changes what
    the stage writes), hence no dep of the stage. Outside a DVC project (no
    dvc.yaml) only the output folder itself is guarded.
    """
    if not dvc_file.is_file():
        return {}
    outputs: dict[str, str] = {}
    for name, stage in (read_yaml(dvc_file).get("stages") or {}).items():
        for kind in ("outs", "metrics", "plots"):
            for entry in (stage.get(kind) or []) if isinstance(stage, dict) else []:
                path = next(iter(entry), None) if isinstance(entry, dict) else entry  # "p" or {p: {cache: false}}
                if isinstance(path, str):
                    outputs.setdefault(path, f"stage {name}")
    return outputs


def download(params: DataConfig, out_dir: Path) -> None:
    source = params.source
    start = time.time()
    with atomic_dir(out_dir) as tmp:
        if source == "sample":
            from stages.lib.sample import generate_sample

            counts = generate_sample(tmp, seed=params.seed, **params.sample.as_dict())
            log.info("generated sample: %s", counts)
            sums = checksum_all(tmp)
        else:
            # tmp is what fetch_raw writes; out_dir (and every other stage output) is what gets deleted
            protected = {**pipeline_outputs(), out_dir: "this run"} if source == "path" else {}
            # partial downloads live beside the output, so an interrupted run resumes them;
            # fetch_raw verifies and writes SHA256SUMS itself
            sums = fetch_raw(params.files, tmp, source=source, retries=params.retries,
                             timeout_s=params.timeout_s, cache_dir=out_dir.parent / ".download-cache",
                             max_download_mb=params.max_download_mb, protected=protected)
    log.info("wrote %d files to %s in %.1fs", len(sums), out_dir, time.time() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    exit_on_sigterm()  # a killed stage removes its partial outputs
    download(load_sections(args.params, data=DataConfig)["data"], args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_stage(main, "download"))
