"""The photo study's variants change only what they name, against the profile's params, and its report
pairs them by release seed."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


photo_study, apply_profile = load_script("photo_study"), load_script("apply_profile")


def _profile_params() -> dict:
    """params.yaml with profiles/photos-cpu.yaml applied, as the study applies it (not written)."""
    return yaml.safe_load(apply_profile.apply_profile(photo_study.PROFILE, ROOT / "params.yaml", write=False))


@pytest.mark.parametrize("variant", photo_study.VARIANTS)
def test_each_variant_changes_existing_keys_to_another_value(variant: str) -> None:
    params = _profile_params()
    change = photo_study._variant(variant, params)
    assert change
    for section, keys in change.items():
        for key, value in keys.items():
            assert key in params[section], f"{variant}: {section}.{key} is not a param"
            if variant != "crossfit":  # crossfit also sets its epochs, which may equal the profile's
                assert value != params[section][key], f"{variant}: {section}.{key} stays {value!r}"
    with pytest.raises(ValueError, match="unknown variant"):
        photo_study._variant("nonsense", params)


def _run(seed: int, variant: str, siamese: float, breed_share: str = "kept") -> dict:
    top1 = {"truth": 0.9, "raw": 0.8, "naive": 0.82, "siamese": siamese, "probe_truth": 0.9, "probe_raw": 0.8,
            "probe_naive": 0.81, "probe_kept": 0.85}
    return {"seed": seed, "variant": variant, "top1": top1, "make_pairs_s": 10.0, "test_images": 100,
            "label_filter": {"images": 400, "precision": 0.95, "recall": 0.9}, "contrastive": "batch",
            "contrastive_weight": 0.0, "start": "naive", "filter_by": "prune_by_class", "breed_share": breed_share}


def test_the_breed_variant_is_paired_by_seed_whichever_share_the_profile_has() -> None:
    runs = [_run(3, "final", 0.85), _run(3, "breed", 0.87, "clicks"),
            _run(4, "final", 0.86, "clicks"), _run(4, "breed", 0.85, "kept")]
    text = photo_study.report(runs, pilot=[])
    # seed 3: clicks 0.87 - kept 0.85; seed 4: clicks 0.86 - kept 0.85
    assert "| siamese.breed_share clicks − kept | +0.015 ± 0.005 | +0.020, +0.010 |" in text
    assert "| gap recovery with breed_share clicks | 0.650 ± 0.050 | 0.700, 0.600 |" in text
