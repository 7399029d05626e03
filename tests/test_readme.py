"""README's results block is what scripts/update_readme.py makes from the committed reports/."""
from __future__ import annotations

from pathlib import Path

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
update_readme = load_script("update_readme")


def test_readme_results_are_the_committed_reports() -> None:
    text, regenerated = update_readme.regenerated(ROOT / "README.md", ROOT / "reports")
    assert text == regenerated, "README.md's results block differs from reports/: python scripts/update_readme.py"


def test_a_hand_edited_number_is_caught(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    begin = text.index(update_readme.BEGIN)
    end = text.index(update_readme.END)
    block = text[begin:end]
    digit = next(i for i, ch in enumerate(block) if ch.isdigit() and i > len(update_readme.BEGIN))
    edited = block[:digit] + str((int(block[digit]) + 1) % 10) + block[digit + 1:]
    readme.write_text(text[:begin] + edited + text[end:], encoding="utf-8")
    before, after = update_readme.regenerated(readme, ROOT / "reports")
    assert before != after
