"""Benchmark results as a Markdown table on stdout (one row as soon as it is measured) and CSV.

A row is a dict; a table prints the values of its `columns`, floats with `float_format`,
absent values as `missing`. The CSV holds every key of every row (first-seen order), so it
keeps fields the printed table leaves out.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence

from tttjax import storage


class MarkdownTable:
    """Prints a header on creation and a line per `row(...)`, flushed, so long runs show progress."""

    def __init__(self, columns: Sequence[str], *, float_format: str = ".2f", missing: str = ""):
        self.columns, self.float_format, self.missing = tuple(columns), float_format, missing
        print("| " + " | ".join(self.columns) + " |")
        print("|" + "---|" * len(self.columns))

    def cell(self, value) -> str:
        return format(value, self.float_format) if isinstance(value, float) else str(value)

    def row(self, row: dict) -> None:
        cells = [self.cell(row[c]) if c in row else self.missing for c in self.columns]
        print("| " + " | ".join(cells) + " |", flush=True)


def write_csv(rows: Iterable[dict], path: str) -> None:
    """Writes `rows` to `path` (columns: every key, in first-seen order) and says so."""
    rows = list(rows)
    fields = list(dict.fromkeys(key for row in rows for key in row))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    storage.path(path).write_text(text.getvalue())   # a local file or gs://...
    print(f"# wrote {path}")
