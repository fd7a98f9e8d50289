"""Writing experiment results: CSV, JSON, a short Markdown summary, and progress bars.

Every experiment writes ``<out>/<name>.csv`` (one row per configuration), ``<out>/<name>.json``
(the rows plus run metadata), and ``<out>/summary.md``; plots are a separate step (``plots``).
"""

from __future__ import annotations

import csv
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any


def run_metadata(command: Sequence[str] | None = None) -> dict[str, Any]:
    """Where and when a result was produced (goes into every JSON file)."""
    return {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "command": list(command) if command is not None else sys.argv,
    }


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Rows of flat dicts as CSV; the columns are the union of keys in first-seen order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns and not isinstance(row[key], (dict, list)):
                columns.append(key)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _cell(row.get(key)) for key in columns})
    return path


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6f}"
    return "" if value is None else value


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    return path


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A GitHub Markdown table of the given columns (floats in [0,1] shown as percentages)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---:" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_md_cell(row.get(col)) for col in columns) + " |")
    return "\n".join(lines)


def _md_cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{100 * value:.2f} %" if 0.0 <= value <= 1.0 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "" if value is None else str(value)


def write_summary(path: Path, title: str, sections: Iterable[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}", ""]
    for heading, body in sections:
        parts += [f"## {heading}", "", body.rstrip(), ""]
    path.write_text("\n".join(parts))
    return path


class Progress:
    """A tqdm bar when stderr is a terminal and not ``quiet``; otherwise a no-op callable.

    Call it with the number of requests just processed. Use as a context manager.
    """

    def __init__(self, total: int, desc: str, *, quiet: bool = False) -> None:
        self._bar = None
        if not quiet and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc=desc, unit="req", unit_scale=True, leave=False)

    def __call__(self, done: int) -> None:
        if self._bar is not None:
            self._bar.update(done)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()

    @property
    def callback(self) -> Callable[[int], None] | None:
        return self if self._bar is not None else None


def percent(value: float) -> str:
    return f"{100 * value:.2f} %"
