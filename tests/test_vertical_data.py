"""The bundled vertical datasets (splitlearning/vertical_data.py): the cut, the overlap, the parties' own orders,
the uncut reference, determinism, and files that read back exactly."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_digits

from splitlearning import psi
from splitlearning.tables import FORMATS, PartyTable, read_table
from splitlearning.vertical_data import VerticalDataset, breast_cancer_split, digits_halves, write_party_files


@pytest.fixture(scope="module")
def digits() -> VerticalDataset:
    return digits_halves()


@pytest.fixture(scope="module")
def cancer() -> VerticalDataset:
    return breast_cancer_split()


def _common(dataset: VerticalDataset) -> list[str | int]:
    """The ids every party holds, in the label party's row order (what the intersection finds, in some order)."""
    held = set.intersection(*(set(table.ids) for table in dataset.tables))
    return [value for value in dataset.label_party.ids if value in held]


def test_digits_parties(digits: VerticalDataset) -> None:
    label, left, right = digits.tables
    assert digits.names == ["label", "left", "right"]
    assert label.x is None and label.columns == [] and label.y is not None and label.y.dtype == np.int64
    assert sorted(label.ids) == [f"p{number:04d}" for number in range(1, 1798)]
    assert set(np.unique(label.y)) == set(range(10))
    for party in (left, right):
        assert party.y is None and party.x is not None
        assert party.x.shape == (1617, 32) and party.x.dtype == np.float32  # round(0.9 * 1797) rows
        assert party.x.min() >= 0.0 and party.x.max() <= 1.0
    assert left.columns[:5] == ["r0c0", "r0c1", "r0c2", "r0c3", "r1c0"]
    assert right.columns[:5] == ["r0c4", "r0c5", "r0c6", "r0c7", "r1c4"]


def test_digits_halves_put_back_together_are_the_images(digits: VerticalDataset) -> None:
    """Checked against scikit-learn itself, not against the dataset's own reference."""
    left, right = digits.feature_parties
    images = (load_digits().data / 16.0).astype(np.float32).reshape(-1, 8, 8)
    ids = _common(digits)
    x_left, _ = left.take(ids)
    x_right, _ = right.take(ids)
    _, y = digits.label_party.take(ids)
    assert x_left is not None and x_right is not None and y is not None
    rows = [int(str(value)[1:]) - 1 for value in ids]  # "p0001" is scikit-learn's row 0
    np.testing.assert_array_equal(x_left.reshape(-1, 8, 4), images[rows, :, :4])
    np.testing.assert_array_equal(x_right.reshape(-1, 8, 4), images[rows, :, 4:])
    np.testing.assert_array_equal(y, load_digits().target[rows])


def test_digits_overlap_is_the_fraction_of_the_label_partys_ids_each_feature_party_holds() -> None:
    for overlap in (0.9, 0.5):
        dataset = digits_halves(overlap=overlap, seed=1)
        label = set(dataset.label_party.ids)
        held = [set(party.ids) for party in dataset.feature_parties]
        for ids in held:
            assert ids <= label and len(ids) == round(overlap * 1797)
        assert held[0] != held[1]  # drawn independently
        common = len(held[0] & held[1])
        assert abs(common - overlap**2 * 1797) < 5 * np.sqrt(1797 * overlap**2 * (1 - overlap**2))
    assert all(len(party) == 1797 for party in digits_halves(overlap=1.0).tables)
    with pytest.raises(ValueError, match=r"overlap must lie in \(0, 1\], got 0"):
        digits_halves(overlap=0.0)


def test_every_party_has_its_own_row_order(digits: VerticalDataset, cancer: VerticalDataset) -> None:
    for dataset in (digits, cancer):
        common = set(_common(dataset))
        orders = [[value for value in table.ids if value in common] for table in dataset.tables]
        assert orders[0] != sorted(orders[0], key=psi.canonical)
        assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]


def test_breast_cancer_parties(cancer: VerticalDataset) -> None:
    label, error, worst = cancer.tables
    assert cancer.names == ["label", "error", "worst"]
    names = [str(name) for name in load_breast_cancer().feature_names]
    assert label.columns == names[:10] and error.columns == names[10:20] and worst.columns == names[20:]
    assert (
        label.columns[0] == "mean radius" and error.columns[0] == "radius error" and worst.columns[0] == "worst radius"
    )
    for party in cancer.tables:
        assert sorted(party.ids) == list(range(569)) and all(type(value) is int for value in party.ids)
        assert party.x is not None and party.x.shape == (569, 10) and party.x.dtype == np.float32
    assert label.y is not None and label.y.dtype == np.int64 and set(label.y.tolist()) == {0, 1}
    assert error.y is None and worst.y is None
    reference = cancer.reference.x
    assert reference is not None
    np.testing.assert_allclose(reference.mean(axis=0), 0.0, atol=1e-5)  # the whole table's statistics
    np.testing.assert_allclose(reference.std(axis=0), 1.0, atol=1e-5)
    data = load_breast_cancer().data
    x, _ = error.take([0, 5])
    assert x is not None
    np.testing.assert_allclose(x, (data[[0, 5], 10:20] - data[:, 10:20].mean(0)) / data[:, 10:20].std(0), rtol=1e-6)


@pytest.mark.parametrize("which", ["digits", "cancer"])
def test_joined_reference_matches_the_parties(which: str, request: pytest.FixtureRequest) -> None:
    dataset: VerticalDataset = request.getfixturevalue(which)
    ids = _common(dataset)
    random.Random(0).shuffle(ids)  # any order, as the intersection's
    xs, y = dataset.joined(ids)
    parts = [table.take(ids)[0] for table in dataset.tables]
    assert len(xs) == sum(part is not None for part in parts)  # the label party's own columns first, if any
    for x, part in zip(xs, [part for part in parts if part is not None], strict=True):
        np.testing.assert_array_equal(x, part)
    np.testing.assert_array_equal(y, dataset.label_party.take(ids)[1])
    assert len(y) == len(ids)


def test_same_seed_same_dataset_other_seed_other_orders() -> None:
    first, second, other = digits_halves(seed=3), digits_halves(seed=3), digits_halves(seed=4)
    for a, b, c in zip(first.tables, second.tables, other.tables, strict=True):
        assert a.ids == b.ids and a.ids != c.ids
        for x, y in ((a.x, b.x), (a.y, b.y)):
            assert (x is None and y is None) or np.array_equal(x, y)  # type: ignore[arg-type]
    cancer, again = breast_cancer_split(seed=5), breast_cancer_split(seed=5)
    assert [t.ids for t in cancer.tables] == [t.ids for t in again.tables]
    assert [t.ids for t in cancer.tables] != [t.ids for t in breast_cancer_split(seed=6).tables]


def test_split_holds_out_the_same_people_whatever_the_order(digits: VerticalDataset) -> None:
    aligned = _common(digits)
    train, test = digits.split(aligned)
    assert not set(train) & set(test) and len(train) + len(test) == len(aligned)
    assert abs(len(test) - 0.2 * len(aligned)) <= 10  # 0.2 of each class, rounded
    assert test == [value for value in aligned if value in set(test)]
    shuffled = aligned[:]
    random.Random(1).shuffle(shuffled)
    assert set(digits.split(shuffled)[1]) == set(test)


def _same_table(read: PartyTable, written: PartyTable, *, ids_as_strings: bool) -> None:
    assert read.ids == ([str(value) for value in written.ids] if ids_as_strings else written.ids)
    assert read.columns == written.columns
    for got, expected in ((read.x, written.x), (read.y, written.y)):
        assert (got is None) == (expected is None)
        if got is not None and expected is not None:
            assert got.dtype == expected.dtype
            np.testing.assert_array_equal(got.view(np.uint8), expected.view(np.uint8))  # bit for bit


@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize("which", ["digits", "cancer"])
def test_party_files_read_back_exactly(tmp_path: Path, format: str, which: str, request: pytest.FixtureRequest) -> None:
    dataset: VerticalDataset = request.getfixturevalue(which)
    paths = write_party_files(dataset, tmp_path / "parties", format)  # type: ignore[arg-type]
    assert [path.name for path in paths] == [f"{name}.{format}" for name in dataset.names]
    for index, (path, written) in enumerate(zip(paths, dataset.tables, strict=True)):
        if format == "npz":
            read = read_table(path)
        else:
            read = read_table(path, id_column="id", label_column="label" if index == 0 else None)
        _same_table(read, written, ids_as_strings=format == "csv" and which == "cancer")


def test_files_to_aligned_rows(tmp_path: Path, cancer: VerticalDataset) -> None:
    """What the parties' programs do: read their files, align by the private set intersection, take rows;
    the rows are the uncut table's rows of the label party's aligned ids (integer ids from .csv included)."""
    paths = write_party_files(cancer, tmp_path, "csv")
    label = read_table(paths[0], id_column="id", label_column="label")
    features = [read_table(path, id_column="id") for path in paths[1:]]
    aligned = psi.intersect(label.ids, *(table.ids for table in features))
    own_x, y = label.take(aligned[0])
    xs = [own_x, *(table.take(ids)[0] for table, ids in zip(features, aligned[1:], strict=True))]
    expected_xs, expected_y = cancer.joined(aligned[0])
    for x, expected in zip(xs, expected_xs, strict=True):
        np.testing.assert_array_equal(x, expected)
    np.testing.assert_array_equal(y, expected_y)


def test_write_party_files_refuses_an_unknown_format(tmp_path: Path, cancer: VerticalDataset) -> None:
    with pytest.raises(ValueError, match=r"format must be one of \['npz', 'csv', 'parquet'\], got 'xlsx'"):
        write_party_files(cancer, tmp_path, "xlsx")  # type: ignore[arg-type]
