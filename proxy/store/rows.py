"""Records as rows: the column lists and value conversions, all derived from the models.

A row is a plain dict of `completions` column values plus a `choices` list of dicts: what the writer
batches, the spool stores as JSON lines, and insert.py sends to the database.
"""

from __future__ import annotations

import contextlib
import dataclasses
import operator
from datetime import UTC, datetime
from typing import Any

from ..parse.fields import clean_text
from ..parse.record import ChoiceRecord, CompletionRecord
from .models import choices_table, completions_table
from .types import Converter, driver_converter, json_converter

# columns the writer computes from other columns rather than taking from the record
DERIVED: tuple[str, ...] = ("started_hour",)
COLUMNS: tuple[str, ...] = tuple(column.name for column in completions_table.columns if column.name != "id")
RECORD_COLUMNS: tuple[str, ...] = tuple(name for name in COLUMNS if name not in DERIVED)
CHOICE_COLUMNS: tuple[str, ...] = tuple(
    column.name for column in choices_table.columns if column.name not in ("id", "completion_pk")
)


def _check_record_matches_schema() -> None:
    """CompletionRecord and ChoiceRecord carry exactly the columns: a field added to one and not the other
    would be dropped silently."""
    record_fields = {f.name for f in dataclasses.fields(CompletionRecord)} - {"choices"}
    choice_fields = {f.name for f in dataclasses.fields(ChoiceRecord)}
    if record_fields != set(RECORD_COLUMNS) or choice_fields != set(CHOICE_COLUMNS):
        raise RuntimeError(
            "CompletionRecord/ChoiceRecord fields and the completions/completion_choices columns differ: "
            f"{sorted(record_fields ^ set(RECORD_COLUMNS))} {sorted(choice_fields ^ set(CHOICE_COLUMNS))}"
        )


_check_record_matches_schema()

_record_values = operator.attrgetter(*RECORD_COLUMNS)
_choice_values = operator.attrgetter(*CHOICE_COLUMNS)
_UNTRUSTED_TEXT = ("path", "user", "upstream_request_id", "error")  # may hold header bytes or OS messages


def record_to_row(record: CompletionRecord) -> dict[str, Any]:
    """A record as a row.

    Text parsed from JSON is already clean (orjson refuses lone surrogates; parsing drops NUL); the
    few fields that can carry undecodable header bytes are cleaned here, so no row can poison a batch.
    """
    row = dict(zip(RECORD_COLUMNS, _record_values(record), strict=False))  # the getter is made of them
    row["started_hour"] = started_hour(record.started_at)
    for name in _UNTRUSTED_TEXT:
        value = row[name]
        if value is not None:
            row[name] = clean_text(value)
    if record.tags:
        row["tags"] = {clean_text(str(key)): clean_text(str(value)) for key, value in record.tags.items()}
    row["choices"] = [dict(zip(CHOICE_COLUMNS, _choice_values(choice), strict=True)) for choice in record.choices]
    return row


def started_hour(started_at: Any) -> int | None:
    """Hours since the Unix epoch, UTC (naive times are UTC by construction); None for a bad value, which
    the database then refuses with the row's other columns."""
    if not isinstance(started_at, datetime):
        return None
    if started_at.tzinfo is None:
        started_at = started_at.replace(tzinfo=UTC)
    return int(started_at.timestamp()) // 3600


def driver_converters(dialect: str) -> list[tuple[int, Converter]]:
    """(position in COLUMNS, converter) for the columns whose values the driver cannot take as they are."""
    found = [(i, driver_converter(completions_table.c[name].type, dialect)) for i, name in enumerate(COLUMNS)]
    return [(i, convert) for i, convert in found if convert is not None]


_JSON_CONVERTERS = [
    (name, convert)
    for name in COLUMNS
    if (convert := json_converter(completions_table.c[name].type)) is not None
]


def row_from_json(row: dict[str, Any]) -> dict[str, Any]:
    """Undo the JSON encoding of a spooled row (timestamps and money); a bad value is left as it is for the
    database to refuse, which sets the row aside."""
    for name, convert in _JSON_CONVERTERS:
        value = row.get(name)
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            with contextlib.suppress(ValueError, ArithmeticError, TypeError):
                row[name] = convert(value)
    if row.get("started_hour") is None and isinstance(row.get("started_at"), datetime):
        row["started_hour"] = started_hour(row["started_at"])  # spooled before the column existed
    return row
