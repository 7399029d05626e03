"""Apply a params profile (profiles/*.yaml: only the keys that differ) to params.yaml.

    python scripts/apply_profile.py profiles/gpu.yaml [--params params.yaml] [--check]

Every key of the profile must exist in params.yaml (a typo is refused, not added), except inside the
free mappings ``data.files`` and ``filter.aliases``; the merged file is validated section by section
with the stages' own declarations before it is written (atomically, with params.yaml's comments kept:
ruamel.yaml's round trip, as ``dvc exp run -S`` does). ``--check`` validates without writing. Exit 1
with the offending key on any error.
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML

from stages.lib.atomic import atomic_file
from stages.lib.classifier import ModelConfig, TrainConfig
from stages.lib.decoding import DecodeConfig
from stages.lib.fetch import DataConfig
from stages.lib.galleries import GalleriesConfig
from stages.lib.imagecache import CacheConfig
from stages.lib.labelsets import ReferenceConfig
from stages.lib.metriccheck import CheckConfig
from stages.lib.pairs import PairsConfig
from stages.lib.params import ConfigError, parse_yaml
from stages.lib.reports import EvaluateConfig
from stages.lib.siamese import SiameseConfig
from stages.lib.weaklabels import FilterConfig

SECTIONS = {"data": DataConfig, "decode": DecodeConfig, "filter": FilterConfig, "cache": CacheConfig,
            "model": ModelConfig, "train": TrainConfig, "pairs": PairsConfig, "siamese": SiameseConfig,
            "reference": ReferenceConfig, "evaluate": EvaluateConfig, "galleries": GalleriesConfig,
            "check": CheckConfig}
FREE = {("data", "files"), ("filter", "aliases")}  # mappings whose keys are the user's (file roles, words)


def merge(params: Any, profile: dict[str, Any], path: tuple[str, ...] = ()) -> None:
    """Write ``profile``'s values into ``params`` in place; a key params does not have is a ConfigError."""
    for key, value in profile.items():
        where = path + (str(key),)
        if key not in params and path not in FREE:
            raise ConfigError(f"{'.'.join(where)}: not a key of params.yaml")
        if isinstance(value, dict) and isinstance(params.get(key), dict) and where not in FREE:
            merge(params[key], value, where)
        else:
            params[key] = value


def validate(data: dict[str, Any]) -> None:
    """Every section through its declaration (unknown, missing and mistyped keys, ranges)."""
    missing = sorted(set(SECTIONS) - set(data))
    unknown = sorted(set(data) - set(SECTIONS))
    if missing or unknown:
        raise ConfigError(f"sections missing {missing}, unknown {unknown}")
    for name, cls in SECTIONS.items():
        cls.from_params(data[name], name)


def apply_profile(profile_path: Path, params_path: Path, write: bool = True) -> str:
    """The merged params.yaml text, validated; written to ``params_path`` when ``write``."""
    profile = parse_yaml(profile_path.read_text(encoding="utf-8"), str(profile_path))
    rt = YAML()  # round trip: comments and key order stay
    rt.width = 4096
    params = rt.load(params_path.read_text(encoding="utf-8"))
    merge(params, profile)
    buf = io.StringIO()
    rt.dump(params, buf)
    text = buf.getvalue()
    validate(yaml.safe_load(text))
    if write:
        with atomic_file(params_path) as f:
            f.write(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", type=Path)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--check", action="store_true", help="validate the merged params, write nothing")
    args = parser.parse_args(argv)
    try:
        apply_profile(args.profile, args.params, write=not args.check)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"apply_profile: {args.profile}: {exc}", file=sys.stderr)
        return 1
    print(f"apply_profile: {args.profile} {'checks against' if args.check else 'applied to'} {args.params}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
