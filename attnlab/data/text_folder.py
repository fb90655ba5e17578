"""The user's own text: a folder with a metadata.jsonl (or .csv) whose `text` column holds one
document per row, in the `folder` dataset's convention. Optional columns: `split` (train,
eval/test/validation, ref) and condition columns named in `condition_columns`, each value becoming
one condition token "column=value". Without a `split` column a hash of the text picks the split
(80 / 10 / 10 %), as for the built-in scenes. A bad row stops with one DataError naming it; with
`skip_bad` it is skipped and counted instead."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

from attnlab.data.folder import SPLIT_NAMES, Problems, jsonl_rows, metadata_file
from attnlab.data.folder import Row as Row
from attnlab.data.scenes import TextSplit, split_of

TEXT_SPLIT_NAMES = {**SPLIT_NAMES, "ref": "ref", "reference": "ref"}


def _csv_rows(path: Path, problems: Problems) -> list[Row]:
    reader = csv.DictReader(path.read_text(encoding="utf-8-sig").splitlines())
    rows = []
    for fields in reader:
        if None in fields or None in fields.values():
            problems(f"{path} line {reader.line_num}: expected {len(reader.fieldnames or [])} fields")
            continue
        rows.append(Row(f"{path} line {reader.line_num}", dict(fields)))
    return rows


def read_text_folder(
    root: str | Path, split: str, condition_columns: tuple[str, ...] = (), skip_bad: bool = False
) -> tuple[TextSplit, int]:
    """One split of the folder's text, and how many bad rows were skipped (0 unless skip_bad).

    Raises:
        DataError: no metadata file, a row without a non-empty string `text`, a bad split name, a
            missing condition column, or no rows in the split.
    """
    from attnlab.errors import DataError

    root = Path(root).expanduser()
    path = metadata_file(root)
    problems = Problems(skip_bad)
    if path.suffix == ".jsonl":
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read {path}: {e}") from None
        rows = jsonl_rows(str(path), text, problems)
    else:
        rows = _csv_rows(path, problems)
    texts, conds = [], []
    for row in rows:
        got = _row(row, condition_columns, problems)
        if got is not None and got[2] == split:
            texts.append(got[0])
            conds.append(got[1])
    if not texts:
        raise DataError(f"{path}: no usable rows in the {split} split")
    if problems.messages:
        warnings.warn(
            f"{path}: skipped {len(problems.messages)} bad row(s); first: {problems.messages[0]}",
            stacklevel=2,
        )
    return TextSplit(texts, conds, [None] * len(texts)), len(problems.messages)


def _row(row: Row, columns: tuple[str, ...], problems: Problems) -> tuple[str, list[str], str] | None:
    text = row.fields.get("text")
    if not isinstance(text, str) or not text.strip():
        problems(f"{row.where}: no 'text' (a non-empty string; fields: {', '.join(map(str, row.fields))})")
        return None
    missing = [c for c in columns if row.fields.get(c) in (None, "")]
    if missing:
        problems(f"{row.where}: no value in condition column {missing[0]!r}")
        return None
    if "split" in row.fields:
        split = TEXT_SPLIT_NAMES.get(str(row.fields["split"]).strip().lower())
        if split is None:
            problems(
                f"{row.where}: split {row.fields['split']!r} is not one of {', '.join(TEXT_SPLIT_NAMES)}"
            )
            return None
    else:
        split = split_of(text)
    return text.strip(), [f"{c}={row.fields[c]}" for c in columns], split
