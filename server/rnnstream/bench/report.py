"""Latency percentiles, benchmark records as dicts, and plain-text tables of them."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

PERCENTILES = (50, 95, 99)


def percentile(sorted_values: Sequence[float], percent: float) -> float:
    """Return the nearest-rank percentile of ascending values: the smallest value with `percent`% at or below it."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    rank = max(1, math.ceil(percent / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def latency_summary_ms(latencies_s: Sequence[float]) -> dict:
    """Return p50, p95, p99 and mean in milliseconds; all None for an empty sample."""
    if not latencies_s:
        return {"p50": None, "p95": None, "p99": None, "mean": None}
    ordered = sorted(latencies_s)
    summary = {f"p{percent}": percentile(ordered, percent) * 1000 for percent in PERCENTILES}
    summary["mean"] = sum(ordered) / len(ordered) * 1000
    return summary


def write_json(record: dict | list, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if value else "0"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]], markdown: bool = False) -> str:
    """Render rows as a table; columns are (heading, key), and a key may be dotted to reach nested dicts."""

    def lookup(row: dict, key: str):
        value = row
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return value

    headings = [heading for heading, _ in columns]
    cells = [[_cell(lookup(row, key)) for _, key in columns] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(headings) + " |", "|" + "|".join("---:" for _ in headings) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(lines)
    widths = [max([len(heading), *(len(row[index]) for row in cells)]) for index, heading in enumerate(headings)]
    lines = ["  ".join(heading.rjust(width) for heading, width in zip(headings, widths))]
    lines += ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in cells]
    return "\n".join(lines)
