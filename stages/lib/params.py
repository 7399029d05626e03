"""Reading ``params.yaml``: each stage reads only its own sections."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

PARAMS_FILE = Path("params.yaml")


def load_params(*sections: str, path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """Return the named top-level sections of the params file.

    Untrusted YAML stays data: ``safe_load`` only. A missing section is an
    error, not an empty dict, so that a typo in a stage cannot silently run
    with defaults.
    """
    with open(path, encoding="utf-8") as f:
        params = yaml.safe_load(f) or {}
    missing = [s for s in sections if s not in params]
    if missing:
        raise KeyError(f"{path}: missing section(s) {missing}")
    if len(sections) == 1:
        return params[sections[0]]
    return {s: params[s] for s in sections}
