"""One party's table (splitlearning/tables.py): round trips in every format, the id-type rule, `take`'s order,
`hold_out`, and each refusal naming the file and what it found."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from splitlearning import psi
from splitlearning.tables import FORMATS, PartyTable, TableError, hold_out, read_table, write_table


def _awkward_float32(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """float32 values a decimal round trip can get wrong: random bits' worth of mantissa, tiny, huge,
    subnormal, negative zero."""
    x = (rng.standard_normal(shape) * 10.0 ** rng.integers(-30, 30, shape)).astype(np.float32)
    x.flat[:4] = [np.float32(1.4e-45), np.finfo(np.float32).max, -0.0, np.float32(1) / np.float32(3)]
    return x


def _table(ids: list[str | int], *, x: bool = True, labels: str | None = "int", seed: int = 0) -> PartyTable:
    rng = np.random.default_rng(seed)
    y = None
    if labels == "int":
        y = rng.integers(0, 10, len(ids)).astype(np.int64)
    elif labels == "float":
        y = rng.standard_normal(len(ids)).astype(np.float32)
    columns = ["age", "income", "score"] if x else []
    return PartyTable(ids, _awkward_float32(rng, (len(ids), 3)) if x else None, y, columns, "made", "label")


def _read(path: Path, labels: bool = True) -> PartyTable:
    if path.suffix == ".npz":
        return read_table(path)
    return read_table(path, id_column="id", label_column="label" if labels else None)


def _same(read: PartyTable, written: PartyTable) -> None:
    assert read.columns == written.columns
    for got, expected in ((read.x, written.x), (read.y, written.y)):
        if expected is None:
            assert got is None
        else:
            assert got is not None and got.dtype == expected.dtype
            np.testing.assert_array_equal(got.view(np.uint8), expected.view(np.uint8))  # bit for bit


@pytest.mark.parametrize("suffix", FORMATS)
@pytest.mark.parametrize("labels", ["int", "float", None])
def test_round_trip_is_exact_in_every_format(tmp_path: Path, suffix: str, labels: str | None) -> None:
    written = _table([f"u{k:03d}" for k in range(40)], labels=labels)
    read = _read(write_table(written, tmp_path / f"party.{suffix}"), labels=labels is not None)
    assert read.ids == written.ids
    _same(read, written)
    assert read.source == str(tmp_path / f"party.{suffix}")


@pytest.mark.parametrize("suffix", FORMATS)
def test_a_label_party_with_labels_only(tmp_path: Path, suffix: str) -> None:
    written = _table([3, 1, 2], x=False)
    read = _read(write_table(written, tmp_path / f"label.{suffix}"))
    assert read.x is None and read.columns == []
    _same(read, written)


def test_id_types_integers_stay_ints_and_csv_ids_are_strings_as_written(tmp_path: Path) -> None:
    integers = _table([10, 2, 30])
    for suffix in ("npz", "parquet"):
        ids = _read(write_table(integers, tmp_path / f"ints.{suffix}")).ids
        assert ids == [10, 2, 30] and all(type(value) is int for value in ids)
    assert _read(write_table(integers, tmp_path / "ints.csv")).ids == ["10", "2", "30"]
    strings = _table(["00123", "NA", "7"])
    for suffix in FORMATS:
        ids = _read(write_table(strings, tmp_path / f"strs.{suffix}")).ids
        assert ids == ["00123", "NA", "7"] and all(type(value) is str for value in ids)
    (tmp_path / "raw.csv").write_text("id,a\n00123,1\n NA,2\n7.0,3\n")
    assert read_table(tmp_path / "raw.csv", id_column="id").ids == ["00123", " NA", "7.0"]  # no parsing, no strip


def test_a_parquet_index_is_a_column(tmp_path: Path) -> None:
    pd.DataFrame({"id": ["a", "b"], "v": [1.5, 2.5]}).set_index("id").to_parquet(tmp_path / "indexed.parquet")
    table = read_table(tmp_path / "indexed.parquet", id_column="id")
    assert table.ids == ["a", "b"] and table.columns == ["v"]


def test_csv_and_parquet_ids_meet_in_the_intersection(tmp_path: Path) -> None:
    """A .csv's "7" and a .parquet's 7 are one id to psi.canonical, so the parties align and `take` finds it."""
    csv = _read(write_table(_table([7, 8, 9]), tmp_path / "a.csv"))
    parquet = _read(write_table(_table([9, 7, 5], seed=1), tmp_path / "b.parquet"))
    mine, theirs = psi.intersect(csv.ids, parquet.ids)
    assert sorted(map(str, mine)) == ["7", "9"] and sorted(map(int, theirs)) == [7, 9]
    x, _ = csv.take(theirs)
    assert x is not None
    np.testing.assert_array_equal(x, csv.take(mine)[0])


def test_take_returns_rows_in_the_order_asked() -> None:
    table = _table(["a", "b", "c", "d"])
    assert table.x is not None and table.y is not None
    order = ["d", "a", "c"]
    x, y = table.take(order)
    assert x is not None and y is not None
    np.testing.assert_array_equal(x, table.x[[3, 0, 2]])
    np.testing.assert_array_equal(y, table.y[[3, 0, 2]])
    x[:] = 0  # a copy
    assert np.any(table.x[3] != 0)
    empty_x, empty_y = table.take([])
    assert empty_x is not None and empty_x.shape == (0, 3) and empty_y is not None and empty_y.shape == (0,)
    with pytest.raises(TableError, match=r"made: no row for id 'e' \(position 1 of the ids asked for\)"):
        table.take(["a", "e"])
    assert issubclass(TableError, ValueError)


def test_labels_are_int64_when_whole_else_float32(tmp_path: Path) -> None:
    (tmp_path / "whole.csv").write_text("id,label\na,1.0\nb,2\nc,-3e0\n")
    whole = read_table(tmp_path / "whole.csv", id_column="id", label_column="label")
    assert whole.y is not None and whole.y.dtype == np.int64 and whole.y.tolist() == [1, 2, -3]
    (tmp_path / "fraction.csv").write_text("id,label\na,1.0\nb,2.5\n")
    fraction = read_table(tmp_path / "fraction.csv", id_column="id", label_column="label")
    assert fraction.y is not None and fraction.y.dtype == np.float32 and fraction.y.tolist() == [1.0, 2.5]
    np.savez(tmp_path / "onehot.npz", ids=np.array([1, 2]), y=np.array([[0.0, 1.0], [1.0, 0.0]]))
    onehot = read_table(tmp_path / "onehot.npz")
    assert onehot.y is not None and onehot.y.dtype == np.int64 and onehot.y.shape == (2, 2) and onehot.x is None


def test_columns_pick_features_in_the_order_given(tmp_path: Path) -> None:
    path = write_table(_table(["a", "b"]), tmp_path / "t.csv")
    table = read_table(path, id_column="id", columns=["score", "age"])
    full = read_table(path, id_column="id", label_column="label")
    assert table.columns == ["score", "age"] and table.y is None
    assert table.x is not None and full.x is not None
    np.testing.assert_array_equal(table.x, full.x[:, [2, 0]])
    npz = read_table(write_table(_table(["a", "b"]), tmp_path / "t.npz"), columns=["income"])
    assert npz.columns == ["income"] and npz.x is not None and npz.x.shape == (2, 1)
    assert read_table(path, id_column="id", label_column="label", columns=[]).x is None
    np.savez(tmp_path / "plain.npz", ids=np.array(["a"]), x=np.ones((1, 2)))
    assert read_table(tmp_path / "plain.npz").columns == ["x0", "x1"]


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "party.csv"
    path.write_text(text)
    return path


def _refused(pattern: str, path: Path, **options: object) -> None:
    with pytest.raises(TableError, match=pattern) as caught:
        read_table(path, **options)  # type: ignore[arg-type]
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(path))


def test_refusals_of_files_and_formats(tmp_path: Path) -> None:
    _refused(r"unknown table format '\.xlsx'; expected \.npz, \.csv or \.parquet", tmp_path / "t.xlsx")
    _refused(r"no such file; expected a \.csv table", tmp_path / "missing.csv", id_column="id")
    path = _csv(tmp_path, "id,a,label\nx,1,0\n")
    _refused(r"needs id_column .*none given", path)
    _refused(r"no id column 'key'; found columns \['id', 'a', 'label'\]", path, id_column="key")
    _refused(r"no label column 'target'; found columns \['id', 'a', 'label'\]", path, id_column="id",
             label_column="target")  # fmt: skip
    _refused(r"no column 'b' \(of columns\); found columns", path, id_column="id", columns=["a", "b"])
    _refused(r"label column 'label' is also listed in columns", path, id_column="id", label_column="label",
             columns=["a", "label"])  # fmt: skip
    _refused(r"id column 'id' is also listed in columns", path, id_column="id", columns=["id"])
    _refused(r"columns name 'a' more than once", path, id_column="id", columns=["a", "a"])
    _refused(r"no feature columns and no labels", _csv(tmp_path, "id\nx\n"), id_column="id")
    _refused(r"empty file; expected a header row", _csv(tmp_path, ""), id_column="id")
    _refused(r"no rows; expected at least one after the header", _csv(tmp_path, "id,a\n"), id_column="id")
    (tmp_path / "bad.parquet").write_text("not parquet")
    _refused(r"not a readable Parquet table", tmp_path / "bad.parquet", id_column="id")


def test_refusals_of_ids(tmp_path: Path) -> None:
    _refused(r"ids must be unique; 'b' appears 3 times \(2 ids appear more than once\)",
             _csv(tmp_path, "id,a\nb,1\na,2\nb,3\nc,4\nb,5\nc,6\n"), id_column="id")  # fmt: skip
    _refused(r"id column 'id' is empty at line 3", _csv(tmp_path, "id,a\nx,1\n,2\n"), id_column="id")
    pd.DataFrame({"id": [1.0, 2.0], "a": [1, 2]}).to_parquet(tmp_path / "float.parquet")
    _refused(r"id column 'id' holds float64; expected integers or strings", tmp_path / "float.parquet",
             id_column="id")  # fmt: skip
    pd.DataFrame({"id": ["a", None], "a": [1, 2]}).to_parquet(tmp_path / "null.parquet")
    _refused(r"id column 'id' holds .* at row 1; expected an id", tmp_path / "null.parquet", id_column="id")
    with pytest.raises(TableError, match=r"made: ids must be unique; 7 appears 2 times"):
        PartyTable([7, "7"], None, np.zeros(2, np.int64), [], "made")  # one id to psi.canonical
    with pytest.raises(TableError, match=r"ids must be Python ints or strs; found float 1.5 at row 1"):
        PartyTable([1, 1.5], None, np.zeros(2, np.int64), [], "made")  # type: ignore[list-item]


def test_refusals_of_values(tmp_path: Path) -> None:
    _refused(r"column 'b' is not numeric: 'high' at id 'y'; expected numbers",
             _csv(tmp_path, "id,a,b\nx,1,2\ny,3,high\n"), id_column="id")  # fmt: skip
    _refused(r"column 'b' is not numeric: '' at id 'y'", _csv(tmp_path, "id,a,b\nx,1,2\ny,3,\n"), id_column="id")
    _refused(r"column 'label' is not numeric: 'cat' at id 'x'", _csv(tmp_path, "id,a,label\nx,1,cat\n"),
             id_column="id", label_column="label")  # fmt: skip
    _refused(r"column 'a' holds nan at id 'y'; expected finite numbers", _csv(tmp_path, "id,a\nx,1\ny,nan\n"),
             id_column="id")  # fmt: skip
    _refused(r"column 'label' holds -inf at id 'x'", _csv(tmp_path, "id,a,label\nx,1,-inf\n"), id_column="id",
             label_column="label")  # fmt: skip
    _refused(r"column 'a' holds 1e\+300 at id 'x', beyond float32", _csv(tmp_path, "id,a\nx,1e300\n"),
             id_column="id")  # fmt: skip
    pd.DataFrame({"id": [1, 2], "a": ["p", "q"]}).to_parquet(tmp_path / "text.parquet")
    _refused(r"column 'a' is not numeric \(str\): 'p' at id 1", tmp_path / "text.parquet", id_column="id")
    pd.DataFrame({"id": [1, 2], "a": pd.array([1, None], dtype="Int64")}).to_parquet(tmp_path / "na.parquet")
    _refused(r"column 'a' holds nan at id 2", tmp_path / "na.parquet", id_column="id")


def test_refusals_of_npz(tmp_path: Path) -> None:
    path = tmp_path / "t.npz"
    np.savez(path, x=np.ones((2, 3)))
    _refused(r"no array 'ids'; expected ids and x and/or y, found arrays \['x'\]", path)
    np.savez(path, ids=np.array([1, 2, 3]), x=np.ones((2, 3)))
    _refused(r"x has 2 rows but ids has 3; expected one row per id", path)
    np.savez(path, ids=np.array([1, 2]), y=np.ones(3))
    _refused(r"y has 3 rows but ids has 2", path)
    np.savez(path, ids=np.array([1.0, 2.0]), y=np.ones(2))
    _refused(r"ids must be a 1-d array of integers or strings; got float64", path)
    np.savez(path, ids=np.array([], dtype=np.int64), y=np.ones(0))
    _refused(r"no rows; expected at least one id", path)
    np.savez(path, ids=np.array([1, 2]), x=np.array([[1.0, np.nan], [1.0, 2.0]]), columns=np.array(["a", "b"]))
    _refused(r"column 'b' holds nan at id 1", path)
    np.savez(path, ids=np.array([1, 2]), x=np.ones((2, 2)), columns=np.array(["a"]))
    _refused(r"columns must be 2 strings", path)
    np.savez(path, ids=np.array([1, 2]), x=np.ones((2, 2)))
    _refused(r"id_column and label_column do not apply to \.npz", path, id_column="id")
    _refused(r"no column 'a' \(of columns\); found columns \['x0', 'x1'\]", path, columns=["a"])
    path.write_bytes(b"not a zip")
    _refused(r"not a readable \.npz archive", path)


def test_writing_refuses_what_it_cannot_read_back(tmp_path: Path) -> None:
    with pytest.raises(TableError, match=r"column 'y' would appear twice"):
        write_table(PartyTable(["a"], np.ones((1, 1), np.float32), np.ones(1, np.int64), ["y"]),
                    tmp_path / "t.csv")  # fmt: skip
    with pytest.raises(TableError, match=r"ids mix integers and strings"):
        write_table(_table([1, "b"]), tmp_path / "t.npz")
    with pytest.raises(TableError, match=r"unknown table format '\.txt'"):
        write_table(_table([1]), tmp_path / "t.txt")


def test_hold_out_depends_on_the_people_not_their_order() -> None:
    ids: list[str | int] = [f"p{k}" for k in range(200)]
    table = PartyTable(ids, None, np.arange(200, dtype=np.int64) % 4, [], "made")
    train, test = hold_out(table, ids, 0.2, seed=3)
    assert len(test) == 40 and sorted(train + test) == sorted(ids) and not set(train) & set(test)
    assert train == [value for value in ids if value in set(train)]  # each in the order given
    _, y = table.take(test)
    assert y is not None and np.bincount(y).tolist() == [10, 10, 10, 10]  # stratified by class
    shuffled = ids[:]
    random.Random(0).shuffle(shuffled)
    assert set(hold_out(table, shuffled, 0.2, seed=3)[1]) == set(test)
    assert set(hold_out(table, ids, 0.2, seed=4)[1]) != set(test)
    assert hold_out(table, ids, 0.0) == (ids, [])
    with pytest.raises(ValueError, match=re.escape("the test fraction must lie in [0, 1), got 1")):
        hold_out(table, ids, 1.0)
