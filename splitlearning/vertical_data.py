"""The bundled vertical datasets (from scikit-learn's bundled data, no download): one table per party, the
label party's first, and the uncut table they were cut from, to train the joined model on the same rows.

`digits_halves`: the handwritten digits, each image's left and right halves at two feature parties, the
labels at a third. `breast_cancer_split`: the Wisconsin breast cancer table's 30 columns in three groups of
ten, the label party holding the first group and the labels. `write_party_files` writes a file per party for
`tables.read_table` (and the parties' CLIs) to read back. docs/vertical.md, "Party tables".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from splitlearning.psi import Id, IdT
from splitlearning.tables import FORMATS, ID_COLUMN, Format, PartyTable, hold_out, write_table

LABEL_COLUMN = "label"
"""The label column's name in the `.csv` and `.parquet` files `write_party_files` writes (`.npz`: array y)."""


@dataclass(frozen=True, eq=False)
class VerticalDataset:
    """Party tables (`names[i]` holds `tables[i]`; the label party first) cut from one uncut table.

    `reference` is the uncut table: every id, every column (in `reference.columns`' order) and the labels;
    `party_columns[i]` are the indices into its columns of party i's columns, in party i's order.
    `test_fraction` and `seed` fix which aligned ids `split` holds out for testing.
    """

    name: str
    names: list[str]
    tables: list[PartyTable]
    reference: PartyTable
    party_columns: list[list[int]]
    test_fraction: float
    seed: int

    @property
    def label_party(self) -> PartyTable:
        return self.tables[0]

    @property
    def feature_parties(self) -> list[PartyTable]:
        return self.tables[1:]

    def joined(self, ids: Sequence[Id]) -> tuple[list[np.ndarray], np.ndarray]:
        """The uncut model's inputs for the rows of `ids`, in that order, from the uncut table: one array per
        party that holds columns, in party order (the label party's own columns first, when it has any),
        and the labels. Equal to each party's `take(ids)` by construction of the cut."""
        x, y = self.reference.take(ids)
        assert x is not None and y is not None  # the uncut table holds every column and the labels
        return [x[:, columns] for columns in self.party_columns if columns], y

    def split(self, aligned: Sequence[IdT]) -> tuple[list[IdT], list[IdT]]:
        """The aligned ids split into (train, test), each in `aligned`'s order: `tables.hold_out` with this
        dataset's test fraction and seed (stratified by class), so the same people whatever the order."""
        return hold_out(self.label_party, aligned, self.test_fraction, self.seed)


def digits_halves(overlap: float = 0.9, test_fraction: float = 0.2, seed: int = 0) -> VerticalDataset:
    """scikit-learn's 1,797 handwritten digits (8x8 images scaled to [0, 1]) cut down the middle.

    Parties: `label` (ids and the digit, 0-9; no columns), `left` (columns 0-3 of each image row: 32 pixels
    named r{row}c{column}, row-major) and `right` (columns 4-7: 32 pixels). Ids are strings "p0001" ..
    "p1797". The label party holds every id; each feature party holds `overlap` of them (round(overlap *
    1797) ids, so 1,617 at 0.9), drawn at random without replacement, each party independently; so about
    overlap² of the ids (81%, some 1,456) are held by all three, which is what the private set intersection
    finds. Every party's rows are in an order of its own, drawn at random. All of it a function of `seed`.
    """
    if not 0.0 < overlap <= 1.0:
        raise ValueError(f"overlap must lie in (0, 1], got {overlap:g}")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    ids: list[str | int] = [f"p{number:04d}" for number in range(1, len(x) + 1)]
    names = [f"r{row}c{column}" for row in range(8) for column in range(8)]
    left = [8 * row + column for row in range(8) for column in range(4)]
    right = [8 * row + column for row in range(8) for column in range(4, 8)]
    reference = PartyTable(ids, x, y, names, "digits", LABEL_COLUMN)
    rng = np.random.default_rng(seed)
    held = round(overlap * len(ids))
    tables = [
        _cut(reference, rng.permutation(len(ids)), [], labels=True, source="label"),
        _cut(reference, rng.permutation(len(ids))[:held], left, labels=False, source="left"),
        _cut(reference, rng.permutation(len(ids))[:held], right, labels=False, source="right"),
    ]
    return VerticalDataset(
        "digits", ["label", "left", "right"], tables, reference, [[], left, right], test_fraction, seed
    )


def breast_cancer_split(test_fraction: float = 0.2, seed: int = 0) -> VerticalDataset:
    """scikit-learn's Wisconsin breast cancer table (569 rows, 30 columns, labels 0 malignant / 1 benign) in
    three parties of ten columns each, every party holding every id.

    Parties: `label` (the labels and the ten "mean ..." columns, its own bottom's input), `error` (the ten
    "... error" columns) and `worst` (the ten "worst ..." columns). Ids are the integers 0 .. 568. Each
    column is standardised with the whole table's mean and standard deviation (all 569 rows, test rows
    included): a demo's simplification, where each party would use statistics of its own training rows.
    Every party's rows are in an order of its own, drawn at random from `seed`.
    """
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    data = bunch.data.astype(np.float64)
    x = ((data - data.mean(axis=0)) / data.std(axis=0)).astype(np.float32)
    y = bunch.target.astype(np.int64)
    ids: list[str | int] = list(range(len(x)))
    names = [str(name) for name in bunch.feature_names]
    groups = [list(range(0, 10)), list(range(10, 20)), list(range(20, 30))]
    reference = PartyTable(ids, x, y, names, "breast_cancer", LABEL_COLUMN)
    rng = np.random.default_rng(seed)
    tables = [
        _cut(reference, rng.permutation(len(ids)), group, labels=index == 0, source=name)
        for index, (name, group) in enumerate(zip(("label", "error", "worst"), groups, strict=True))
    ]
    return VerticalDataset("breast_cancer", ["label", "error", "worst"], tables, reference, groups, test_fraction, seed)


def _cut(reference: PartyTable, rows: np.ndarray, columns: list[int], *, labels: bool, source: str) -> PartyTable:
    assert reference.x is not None and reference.y is not None
    return PartyTable(
        [reference.ids[row] for row in rows],
        reference.x[np.ix_(rows, np.array(columns))] if columns else None,
        reference.y[rows] if labels else None,
        [reference.columns[column] for column in columns],
        source,
        LABEL_COLUMN,
    )


def write_party_files(dataset: VerticalDataset, folder: str | Path, format: Format = "npz") -> list[Path]:
    """One file per party in `folder` (created if need be), `<party name>.<format>`, in party order: e.g.
    label.csv, left.csv, right.csv. `.csv` and `.parquet` files name their ids `id` and labels `label`, so
    `read_table(path, id_column="id", label_column="label")` reads the label party's back (no label_column
    for a feature party); `.npz` files need neither. Exact round trip for every format (`tables.write_table`),
    but a `.csv`'s integer ids come back as strings: the same ids to the private set intersection."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {format!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [
        write_table(table, folder / f"{name}.{format}", id_column=ID_COLUMN)
        for name, table in zip(dataset.names, dataset.tables, strict=True)
    ]
