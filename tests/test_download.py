"""The download stage run as ``python -m stages.download data/raw`` in a
project folder: inputs of ``data.source: path`` inside a stage's output are
refused, since the pipeline deletes those folders."""
from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import yaml

from stages import download
from stages.lib.fetch import REQUIRED_ROLES

ROOT = Path(__file__).resolve().parents[1]


def project(tmp_path: Path, archive: str) -> Path:
    """A project folder (dvc.yaml, params.yaml) whose data.files are the members of the zip ``archive``
    (a path relative to the project), which is written too."""
    root = tmp_path / "project"
    root.mkdir()
    (root / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    zip_path = root / archive
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path, "w") as zf:
        for role in REQUIRED_ROLES:
            zf.writestr(f"clickture/{role}.tsv", f"{role}\t1\n")
    data = yaml.safe_load((ROOT / "params.yaml").read_text())["data"]
    data.update(source="path", files={r: {"path": archive, "member": f"clickture/{r}.tsv"} for r in REQUIRED_ROLES})
    (root / "params.yaml").write_text(yaml.safe_dump({"data": data}))
    return root


def test_an_input_inside_the_output_folder_is_refused_and_kept(tmp_path: Path, monkeypatch) -> None:
    root = project(tmp_path, "data/raw/Clickture.zip")
    monkeypatch.chdir(root)
    with pytest.raises(ValueError, match=r"data.files.\w+: path 'data/raw/Clickture.zip' lies inside data/raw, an "
                                         r"output of stage download.*data/external/"):
        download.main(["data/raw"])
    assert (root / "data/raw/Clickture.zip").is_file()  # still there: a direct run used to delete it


@pytest.mark.parametrize("out", ["data/images", "models/naive/checkpoints", "reports/figures"])
def test_an_input_inside_any_stage_output_is_refused(tmp_path: Path, monkeypatch, out: str) -> None:
    root = project(tmp_path, f"{out}/Clickture.zip")
    monkeypatch.chdir(root)
    with pytest.raises(ValueError, match=f"lies inside {out}, an output of stage"):
        download.main(["data/raw"])
    assert (root / out / "Clickture.zip").is_file()


def test_a_link_into_an_output_is_refused_and_a_file_elsewhere_is_copied(tmp_path: Path, monkeypatch) -> None:
    root = project(tmp_path, "data/external/Clickture.zip")
    monkeypatch.chdir(root)
    download.main(["data/raw"])  # data/external: no stage writes there
    assert (root / "data/raw/breeds.tsv").read_text() == "breeds\t1\n"
    (root / "data/images").mkdir()
    (root / "data/external/Clickture.zip").rename(root / "data/images/Clickture.zip")
    (root / "data/external/Clickture.zip").symlink_to(root / "data/images/Clickture.zip")
    with pytest.raises(ValueError, match="lies inside data/images"):
        download.main(["data/raw"])


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf")])
def test_max_download_mb_is_checked_with_the_params(value: float) -> None:
    data = yaml.safe_load((ROOT / "params.yaml").read_text())["data"]
    data["max_download_mb"] = value
    with pytest.raises(ValueError, match=r"data: max_download_mb must be > 0 and finite"):
        download.DataConfig.from_params(data, "data")
