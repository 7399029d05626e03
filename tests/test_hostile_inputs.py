"""Hostile names and tables: breed names that would inject markup into the
plot page or break matplotlib, and headerless TSVs with the wrong column
count, are refused with the file and line; real names and tidy files pass."""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from stages.lib import layout
from stages.lib.sample import BREED_NAMES
from stages.lib.tables import check_breed_name, read_breeds, read_headerless, read_truth
from stages.lib.testset import read_test_set

HOSTILE_NAMES = [
    "</script><script>alert(1)</script>",  # ends the plot page's script element
    "pug & co",                            # an HTML entity start
    "$\\foo$",                             # matplotlib mathtext: savefig raises
    "pug\\n",                              # a backslash escape
    'say "pug"', "o'pug", "`pug`",         # string and template delimiters
    "pug\x07", "pug\x00", "pug\u202e",     # control and invisible format characters
    " pug", "pug ",                        # an invisible twin of "pug"
    "p" * 101,                             # past the length bound
]
REAL_NAMES = [*BREED_NAMES, "st. bernard", "Saint Bernard, St Bernard", "shih-tzu", "Cardigan, Cardigan Welsh corgi",
              "black-and-tan coonhound", "Löwchen", "Dandie Dinmont terrier", "great pyrenees (mountain dog)",
              "p" * 100]


def _index(keys: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"key": keys, "split": ["test"] * len(keys)})


# ------------------------------------------------------------ breed names
@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_read_breeds_refuses_a_hostile_name_naming_file_and_line(tmp_path: Path, name: str) -> None:
    path = tmp_path / layout.BREEDS
    path.write_text(f"pug\t0\n{name}\t1\nbeagle\t2\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} line 2: breed name "):
        read_breeds(path)


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_read_test_set_refuses_a_hostile_breed_naming_file_and_line(tmp_path: Path, name: str) -> None:
    (tmp_path / layout.TEST_LABELS).write_text(f"k1\tpug\nk2\tpug\nk3\t{name}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{re.escape(layout.TEST_LABELS)} line 3: breed name "):
        read_test_set(tmp_path, _index(["k1", "k2", "k3"]))


def test_real_breed_names_pass(tmp_path: Path) -> None:
    path = tmp_path / layout.BREEDS
    path.write_text("".join(f"{n}\t{i}\n" for i, n in enumerate(REAL_NAMES)), encoding="utf-8")
    assert read_breeds(path) == REAL_NAMES
    for name in REAL_NAMES:
        check_breed_name(name, "here")


def test_breed_name_error_says_what_is_wrong() -> None:
    with pytest.raises(ValueError, match=r"^breeds\.tsv line 7: breed name '\$\\\\foo\$' holds '\$\\\\'"):
        check_breed_name("$\\foo$", "breeds.tsv line 7")
    with pytest.raises(ValueError, match="more than 100 characters"):
        check_breed_name("p" * 101, "x")


@pytest.mark.parametrize("content, message", [
    ("pug\t0\nbeagle\tone\n", r"line 2: label 'one' is not an integer"),
    ("pug\t0\nbeagle\t1\npug\t2\n", r"line 3: breed 'pug' is given twice"),
    ("pug\t0\n\nbeagle\t0\n", r"line 3: label '0' is given twice"),
    ("", r"no breeds"),
])
def test_read_breeds_names_the_line_of_a_bad_label_or_repeat(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / layout.BREEDS
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}( |: ){message}"):
        read_breeds(path)


# ------------------------------------------------------- column counts
@pytest.mark.parametrize("reader", ["breeds", "test_labels", "truth"])
@pytest.mark.parametrize("bad_line", ["extra\tcolumn\there", "one column only"])
def test_a_line_with_another_column_count_is_refused(tmp_path: Path, reader: str, bad_line: str) -> None:
    """A third column used to become the pandas index (keys turned into
    breed names and nothing matched); a missing one an empty breed."""
    path = tmp_path / {"breeds": layout.BREEDS, "test_labels": layout.TEST_LABELS, "truth": layout.TRUTH}[reader]
    path.write_text(f"a\t0\nb\t1\n{bad_line}\nd\t3\n", encoding="utf-8")
    fields = bad_line.count("\t") + 1
    match = rf"^{re.escape(str(path))} line 3: {fields} tab-separated fields, expected 2"
    with pytest.raises(ValueError, match=match):
        if reader == "breeds":
            read_breeds(path)
        elif reader == "test_labels":
            read_test_set(tmp_path, _index(["a"]))
        else:
            read_truth(path)


def test_a_three_column_test_label_file_is_refused_from_its_first_line(tmp_path: Path) -> None:
    (tmp_path / layout.TEST_LABELS).write_text("pug\tk1\tpug\npug\tk2\tpug\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 1: 3 tab-separated fields, expected 2 \(key<TAB>breed\)"):
        read_test_set(tmp_path, _index(["k1", "k2"]))


def test_read_headerless_keeps_what_pandas_accepted(tmp_path: Path) -> None:
    """Empty file: an empty frame with the named columns. Blank lines hold no
    row, CRLF ends and a UTF-8 BOM are not data, quotes and "NA" are text."""
    empty = tmp_path / "empty.tsv"
    empty.write_bytes(b"")
    df = read_headerless(empty, ["key", "breed"])
    assert list(df.columns) == ["key", "breed"] and df.empty
    messy = tmp_path / "messy.tsv"
    messy.write_bytes('\ufeff"k1\tpug\r\n\nNA\tbasset hound\n\nk3\tst. bernard'.encode())
    df = read_headerless(messy, ["key", "breed"])
    assert df.to_dict("list") == {"key": ['"k1', "NA", "k3"], "breed": ["pug", "basset hound", "st. bernard"]}
    assert df.index.tolist() == [1, 3, 5]  # line numbers: what later checks name


def test_read_headerless_names_a_line_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.tsv"
    path.write_bytes("k1\tpug\nk2\tl\u00f6wchen\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} line 2: not UTF-8"):
        read_headerless(path, ["key", "breed"])
