"""One party's table for vertical split learning: its sample ids, feature columns and (at the label party)
labels, read from `.npz`, `.csv` or `.parquet` (no TensorFlow, no gRPC).

`read_table` reads a file into a `PartyTable`; `PartyTable.take` returns the rows of ids in a given order
(the order the private set intersection agrees on, splitlearning/psi.py); `write_table` writes one back;
`hold_out` splits aligned ids into training and test rows by the people, not by their order. The file
formats, the id-type rule and every refusal are in docs/vertical.md, "Party tables".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from splitlearning.psi import Id, IdT, canonical

Format = Literal["npz", "csv", "parquet"]
FORMATS: tuple[Format, ...] = ("npz", "csv", "parquet")

ID_COLUMN = "id"
"""The id column's name in the `.csv` and `.parquet` files `write_table` writes."""
NPZ_LABEL = "y"
"""An `.npz` table's label array (and the label column's name of a table read from one)."""

_WHOLE_LIMIT = 2.0**53  # whole-number float labels up to this size are integers exactly: int64 keeps them


class TableError(ValueError):
    """A party's table cannot be read or used: the message names the file and what was expected and found."""


@dataclass(frozen=True, eq=False)
class PartyTable:
    """One party's rows: `ids` (Python ints or strs, as `psi.canonical` takes them), `x` (float32, shape
    [rows, len(columns)]; None when the party holds no feature columns), `y` (labels: int64 when whole numbers,
    else float32; None at a party without labels), `columns` (the feature columns' names, in `x`'s order).

    `source` (the file, or a name) and `label_column` name things in messages. Checked when built: at least
    one row, ids of the right types and unique (as `psi.canonical` sees them: the integer 7 and the string
    "7" are one id), as many rows of `x` and `y` as ids, finite values; a TableError otherwise.
    """

    ids: list[str | int]
    x: np.ndarray | None
    y: np.ndarray | None
    columns: list[str]
    source: str = "table"
    label_column: str = NPZ_LABEL
    _rows: dict[bytes, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        rows = len(self.ids)
        if rows == 0:
            raise TableError(f"{self.source}: no rows; expected at least one")
        object.__setattr__(self, "_rows", _index(self.ids, self.source))
        if self.x is None:
            if self.columns:
                raise TableError(f"{self.source}: {len(self.columns)} column names but no feature array x")
        else:
            if self.x.dtype != np.float32 or self.x.ndim != 2:
                raise TableError(
                    f"{self.source}: x must be float32 of shape [rows, features], got {self.x.dtype} "
                    f"of shape {list(self.x.shape)}"
                )
            if len(self.x) != rows:
                raise TableError(f"{self.source}: x has {len(self.x)} rows but there are {rows} ids")
            if self.x.shape[1] != len(self.columns):
                raise TableError(f"{self.source}: x has {self.x.shape[1]} columns but {len(self.columns)} column names")
            _finite(self.x, self.columns, self.ids, self.source)
        if self.y is not None:
            if self.y.dtype not in (np.int64, np.float32) or self.y.ndim == 0:
                raise TableError(
                    f"{self.source}: y must be int64 or float32 with a row per id, got {self.y.dtype} "
                    f"of shape {list(self.y.shape)}"
                )
            if len(self.y) != rows:
                raise TableError(f"{self.source}: y has {len(self.y)} rows but there are {rows} ids")
            if self.y.dtype == np.float32:
                flat = self.y.reshape(rows, -1)
                _finite(flat, [self.label_column] * flat.shape[1], self.ids, self.source)
        if self.x is None and self.y is None:
            raise TableError(f"{self.source}: no feature columns and no labels; expected at least one of them")

    def __len__(self) -> int:
        return len(self.ids)

    def rows_of(self, ids: Sequence[Id]) -> np.ndarray:
        """The row indices of `ids`, in their order; a TableError naming the first id this table lacks."""
        indices = np.empty(len(ids), dtype=np.int64)
        for position, value in enumerate(ids):
            row = self._rows.get(canonical(value))
            if row is None:
                raise TableError(
                    f"{self.source}: no row for id {value!r} (position {position} of the ids asked for); "
                    f"the table holds {len(self.ids):,} ids"
                )
            indices[position] = row
        return indices

    def take(self, ids: Sequence[Id]) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(x, y) of the rows of `ids`, in that order (copies; None where the table has no x or y). An id
        matches as `psi.canonical` sees it (7 finds the row of "7"); a missing one: TableError naming it."""
        indices = self.rows_of(ids)
        x = None if self.x is None else self.x[indices]
        y = None if self.y is None else self.y[indices]
        return x, y


def read_table(
    path: str | Path,
    *,
    id_column: str | None = None,
    label_column: str | None = None,
    columns: Sequence[str] | None = None,
) -> PartyTable:
    """One party's table from `path`, by its suffix.

    - `.npz`: arrays `ids` (integers or strings, 1-d), optionally `x` (numbers, [rows, features]), `y`
      (labels) and `columns` (x's column names; else x0, x1, ...). `id_column` and `label_column` do not apply.
    - `.csv` (a header row) and `.parquet`: `id_column` names the ids; `label_column`, if given, the labels;
      the feature columns are all the others, in the file's order, or the names in `columns`, in that order.

    Ids from a `.csv` are strings exactly as written ("00123" stays "00123"); from `.npz` and `.parquet`
    integers stay Python ints and strings strs. Features become float32; labels int64 when every one is a
    whole number, else float32. Any problem: a TableError, one line naming the file, expected and found.
    """
    path = Path(path)
    source = str(path)
    suffix = path.suffix.lower()
    if suffix not in (".npz", ".csv", ".parquet"):
        raise TableError(f"{source}: unknown table format {path.suffix!r}; expected .npz, .csv or .parquet")
    if not path.is_file():
        raise TableError(f"{source}: no such file; expected a {suffix} table")
    if columns is not None:
        columns = list(columns)
        repeated = [name for name, count in Counter(columns).items() if count > 1]
        if repeated:
            raise TableError(f"{source}: columns name {repeated[0]!r} more than once; expected each once")
        if label_column is not None and label_column in columns:
            raise TableError(
                f"{source}: label column {label_column!r} is also listed in columns; expected it in one of them"
            )
        if id_column is not None and id_column in columns:
            raise TableError(f"{source}: id column {id_column!r} is also listed in columns; expected it apart")
    if suffix == ".npz":
        if id_column is not None or label_column is not None:
            raise TableError(
                f"{source}: id_column and label_column do not apply to .npz (its arrays are named ids, x, y); "
                f"got id_column={id_column!r}, label_column={label_column!r}"
            )
        return _read_npz(path, columns)
    if id_column is None:
        raise TableError(f"{source}: a {suffix} table needs id_column (the column of sample ids); none given")
    frame = _read_csv(path) if suffix == ".csv" else _read_parquet(path)
    return _from_frame(frame, source, id_column, label_column, columns, text=suffix == ".csv")


def write_table(table: PartyTable, path: str | Path, *, id_column: str = ID_COLUMN) -> Path:
    """Write `table` to `path` in the format of its suffix, for `read_table` to read back.

    `.npz`: arrays ids, x, y, columns. `.csv` and `.parquet`: the column `id_column`, the feature columns,
    then `table.label_column`. Exact round trip for `.npz` and `.parquet`; `.csv` writes floats with 9
    significant digits (`%.9g`), enough to read every float32 back exactly, and integer ids come back as
    strings (the same ids to `psi.canonical`).
    """
    path = Path(path)
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise TableError(f"{path}: unknown table format {path.suffix!r}; expected .npz, .csv or .parquet")
    if suffix == "npz":
        arrays: dict[str, np.ndarray] = {"ids": _ids_array(table.ids, str(path))}
        if table.x is not None:
            arrays["x"] = table.x
            arrays["columns"] = np.array(table.columns, dtype=str)
        if table.y is not None:
            arrays[NPZ_LABEL] = table.y
        with open(path, "wb") as file:
            np.savez(file, allow_pickle=False, **arrays)
        return path
    names = [id_column, *table.columns, *([table.label_column] if table.y is not None else [])]
    repeated = [name for name, count in Counter(names).items() if count > 1]
    if repeated:
        raise TableError(
            f"{path}: column {repeated[0]!r} would appear twice; expected distinct id, feature and label column names"
        )
    if table.y is not None and table.y.ndim != 1:
        raise TableError(f"{path}: a {suffix} table holds one label column; got labels of shape {list(table.y.shape)}")
    data: dict[str, Any] = {id_column: _ids_array(table.ids, str(path))}
    for position, name in enumerate(table.columns):
        assert table.x is not None  # columns are empty without x (checked when built)
        data[name] = table.x[:, position]
    if table.y is not None:
        data[table.label_column] = table.y
    frame = pd.DataFrame(data)
    if suffix == "csv":
        frame.to_csv(path, index=False, float_format="%.9g")
    else:
        frame.to_parquet(path, engine="pyarrow", index=False)
    return path


def hold_out(table: PartyTable, ids: Sequence[IdT], fraction: float, seed: int = 0) -> tuple[list[IdT], list[IdT]]:
    """`ids` (rows of `table`, typically the aligned ids) split into (train, test), each in `ids`' order.

    Which ids go to test depends on the set of ids, their labels and `seed`, not on their order: every run
    of the private set intersection (whose common order is random) holds out the same people. About
    `fraction` of them, stratified by label when the labels are integer classes with at least two rows each.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the test fraction must lie in [0, 1), got {fraction:g}")
    ids = list(ids)
    if fraction == 0.0 or not ids:
        return ids, []
    order = sorted(range(len(ids)), key=lambda position: canonical(ids[position]))
    rng = np.random.default_rng(seed)
    test: set[int] = set()
    groups: list[list[int]] = [order]
    if table.y is not None and table.y.dtype == np.int64 and table.y.ndim == 1:
        labels = table.y[table.rows_of([ids[position] for position in order])]
        classes, counts = np.unique(labels, return_counts=True)
        if counts.min() >= 2:
            groups = [[order[k] for k in np.flatnonzero(labels == label)] for label in classes]
    for group in groups:
        count = round(fraction * len(group))
        test.update(group[k] for k in rng.permutation(len(group))[:count])
    train = [value for position, value in enumerate(ids) if position not in test]
    return train, [value for position, value in enumerate(ids) if position in test]


def _index(ids: Sequence[Any], source: str) -> dict[bytes, int]:
    rows: dict[bytes, int] = {}
    for row, value in enumerate(ids):
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise TableError(
                f"{source}: ids must be Python ints or strs; found {type(value).__name__} {value!r} at row {row}"
            )
        if value == "":
            raise TableError(f"{source}: id at row {row} is an empty string; expected an id")
        rows.setdefault(canonical(value), row)
    if len(rows) != len(ids):
        counts = Counter(canonical(value) for value in ids)
        repeated = [key for key, count in counts.items() if count > 1]
        first = ids[min(row for row, value in enumerate(ids) if canonical(value) == repeated[0])]
        raise TableError(
            f"{source}: ids must be unique; {first!r} appears {counts[repeated[0]]} times "
            f"({len(repeated)} ids appear more than once)"
        )
    return rows


def _finite(values: np.ndarray, names: Sequence[str], ids: Sequence[Any], source: str) -> None:
    bad = np.argwhere(~np.isfinite(values))
    if len(bad):
        row, column = bad[0]
        raise TableError(
            f"{source}: column {names[column]!r} holds {values[row, column]} at id {ids[row]!r}; "
            "expected finite numbers"
        )


def _ids_array(ids: Sequence[str | int], source: str) -> np.ndarray:
    if all(isinstance(value, int) for value in ids):
        return np.array(ids, dtype=np.int64)
    if all(isinstance(value, str) for value in ids):
        return np.array(ids, dtype=str)
    raise TableError(f"{source}: ids mix integers and strings; a file holds one kind")


def _read_csv(path: Path) -> pd.DataFrame:
    # Every cell as the text written (no NA guessing: an id "NA" stays "NA"); numbers are parsed by _numbers.
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except pd.errors.EmptyDataError:
        raise TableError(f"{path}: empty file; expected a header row, then a row per sample") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise TableError(f"{path}: not a readable CSV table: {_one_line(error)}") from None


def _read_parquet(path: Path) -> pd.DataFrame:
    import pyarrow

    try:
        frame = pd.read_parquet(path, engine="pyarrow")
    except (pyarrow.ArrowException, OSError, ValueError) as error:
        raise TableError(f"{path}: not a readable Parquet table: {_one_line(error)}") from None
    if any(name is not None for name in frame.index.names):  # a named index (pandas' set_index) is a column too
        frame = frame.reset_index()
    return frame


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _from_frame(
    frame: pd.DataFrame,
    source: str,
    id_column: str,
    label_column: str | None,
    columns: list[str] | None,
    *,
    text: bool,
) -> PartyTable:
    found = [str(name) for name in frame.columns]
    frame.columns = pd.Index(found)
    for role, name in (("id", id_column), ("label", label_column)):
        if name is not None and name not in found:
            raise TableError(f"{source}: no {role} column {name!r}; found columns {found}")
    if columns is None:
        columns = [name for name in found if name not in (id_column, label_column)]
    else:
        unknown = [name for name in columns if name not in found]
        if unknown:
            raise TableError(f"{source}: no column {unknown[0]!r} (of columns); found columns {found}")
    if len(frame) == 0:
        raise TableError(f"{source}: no rows; expected at least one after the header")
    ids = _frame_ids(frame[id_column], source, id_column, text=text)
    x = None
    if columns:
        x64 = np.stack([_numbers(frame[name], source, name, ids, text=text) for name in columns], axis=1)
        _finite(x64, columns, ids, source)
        with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, refused next
            x = x64.astype(np.float32)
        _finite_after_cast(x, x64, columns, ids, source)
    y = None
    if label_column is not None:
        y = _labels(_numbers(frame[label_column], source, label_column, ids, text=text), label_column, ids, source)
    return PartyTable(ids, x, y, list(columns), source, label_column or NPZ_LABEL)


def _frame_ids(series: pd.Series, source: str, name: str, *, text: bool) -> list[str | int]:
    values = series.to_numpy(dtype=object).tolist()
    if text:
        for row, value in enumerate(values):
            if value == "":
                raise TableError(f"{source}: id column {name!r} is empty at line {row + 2}; expected an id")
        return values
    if pd.api.types.is_bool_dtype(series) or not (
        pd.api.types.is_integer_dtype(series) or pd.api.types.is_string_dtype(series)
    ):
        raise TableError(f"{source}: id column {name!r} holds {series.dtype}; expected integers or strings")
    for row, value in enumerate(values):
        if not isinstance(value, int | str):
            raise TableError(f"{source}: id column {name!r} holds {value!r} at row {row}; expected an id")
    return values


def _numbers(series: pd.Series, source: str, name: str, ids: Sequence[Any], *, text: bool) -> np.ndarray:
    if text:
        values = series.to_numpy(dtype=object)
        try:
            return values.astype(np.float64)  # each cell through float(): correctly rounded
        except ValueError:
            for row, value in enumerate(values):
                try:
                    float(value)
                except ValueError:
                    raise TableError(
                        f"{source}: column {name!r} is not numeric: {value!r} at id {ids[row]!r}; expected numbers"
                    ) from None
            raise
    if pd.api.types.is_bool_dtype(series) or pd.api.types.is_numeric_dtype(series):
        return series.to_numpy(dtype=np.float64, na_value=np.nan)
    value = series.iloc[0]
    raise TableError(
        f"{source}: column {name!r} is not numeric ({series.dtype}): {value!r} at id {ids[0]!r}; expected numbers"
    )


def _finite_after_cast(x: np.ndarray, x64: np.ndarray, names: Sequence[str], ids: Sequence[Any], source: str) -> None:
    bad = np.argwhere(~np.isfinite(x))
    if len(bad):
        row, column = bad[0]
        raise TableError(
            f"{source}: column {names[column]!r} holds {x64[row, column]} at id {ids[row]!r}, beyond float32; "
            "expected finite float32 numbers"
        )


def _labels(values: np.ndarray, name: str, ids: Sequence[Any], source: str) -> np.ndarray:
    """Labels as int64 when every one is a whole number (within 2**53), else float32; finite either way."""
    flat = values.reshape(len(values), -1)
    _finite(flat, [name] * flat.shape[1], ids, source)
    if np.all(values == np.round(values)) and np.all(np.abs(values) <= _WHOLE_LIMIT):
        return values.astype(np.int64)
    with np.errstate(over="ignore"):
        labels = values.astype(np.float32)
    _finite_after_cast(labels.reshape(len(labels), -1), flat, [name] * flat.shape[1], ids, source)
    return labels


def _read_npz(path: Path, columns: list[str] | None) -> PartyTable:
    source = str(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise TableError(f"{source}: not a readable .npz archive: {_one_line(error)}") from None
    with archive:
        found = sorted(archive.files)
        if "ids" not in found:
            raise TableError(f"{source}: no array 'ids'; expected ids and x and/or y, found arrays {found}")
        try:
            arrays = {name: archive[name] for name in ("ids", "x", NPZ_LABEL, "columns") if name in found}
        except ValueError as error:  # an object array, which would need pickle
            raise TableError(f"{source}: an array needs pickle, which is not read: {_one_line(error)}") from None
    raw_ids = arrays["ids"]
    if raw_ids.ndim != 1 or raw_ids.dtype.kind not in "iuU":
        raise TableError(
            f"{source}: ids must be a 1-d array of integers or strings; got {raw_ids.dtype} "
            f"of shape {list(raw_ids.shape)}"
        )
    ids: list[str | int] = raw_ids.tolist()
    if not ids:
        raise TableError(f"{source}: no rows; expected at least one id")
    x = y = None
    names: list[str] = []
    if "x" in arrays:
        raw_x = arrays["x"]
        if raw_x.ndim != 2 or raw_x.dtype.kind not in "biuf":
            raise TableError(
                f"{source}: x must be numbers of shape [rows, features]; got {raw_x.dtype} of shape {list(raw_x.shape)}"
            )
        if len(raw_x) != len(ids):
            raise TableError(f"{source}: x has {len(raw_x)} rows but ids has {len(ids)}; expected one row per id")
        names = _npz_columns(arrays.get("columns"), raw_x.shape[1], source)
        if columns is not None:
            unknown = [name for name in columns if name not in names]
            if unknown:
                raise TableError(f"{source}: no column {unknown[0]!r} (of columns); found columns {names}")
            raw_x = raw_x[:, [names.index(name) for name in columns]]
            names = list(columns)
        x64 = raw_x.astype(np.float64)
        _finite(x64, names, ids, source)
        with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, refused next
            x = x64.astype(np.float32)
        _finite_after_cast(x, x64, names, ids, source)
        if not names:
            x = None
    elif columns:
        raise TableError(f"{source}: columns {columns} asked for, but there is no array x; found arrays {found}")
    if NPZ_LABEL in arrays:
        raw_y = arrays[NPZ_LABEL]
        if raw_y.ndim == 0 or raw_y.dtype.kind not in "biuf":
            raise TableError(
                f"{source}: y must be numbers with a row per id; got {raw_y.dtype} of shape {list(raw_y.shape)}"
            )
        if len(raw_y) != len(ids):
            raise TableError(f"{source}: y has {len(raw_y)} rows but ids has {len(ids)}; expected one row per id")
        y = (
            raw_y.astype(np.int64)
            if raw_y.dtype.kind in "biu"
            else _labels(raw_y.astype(np.float64), NPZ_LABEL, ids, source)
        )
    return PartyTable(ids, x, y, names, source, NPZ_LABEL)


def _npz_columns(raw: np.ndarray | None, width: int, source: str) -> list[str]:
    if raw is None:
        return [f"x{position}" for position in range(width)]
    if raw.ndim != 1 or raw.dtype.kind != "U" or len(raw) != width:
        raise TableError(
            f"{source}: columns must be {width} strings (one per column of x); "
            f"got {raw.dtype} of shape {list(raw.shape)}"
        )
    names: list[str] = raw.tolist()
    return names
