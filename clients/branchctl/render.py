"""Pure text rendering for the CLI: tables, records, durations, sizes, times."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

DASH = "-"


def duration(seconds: float | None) -> str:
    """Humanise a duration: 12s, 3m05s, 1h02m, 2d03h; '-' for None."""
    if seconds is None:
        return DASH
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def size(n: float | None) -> str:
    """Humanise a byte count: 512 B, 1.5 KiB, 42.0 MiB; '-' for None."""
    if n is None:
        return DASH
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def timestamp(unix: float | None) -> str:
    """A UNIX time as local 'YYYY-MM-DD HH:MM:SS'; '-' for None."""
    if unix is None:
        return DASH
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix))


def cell(value: Any) -> str:
    """One value as table/record text: '-' for None, compact JSON for containers."""
    if value is None:
        return DASH
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces; no trailing blanks."""
    lines = [list(headers), *([cell(v) for v in row] for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def record(fields: Mapping[str, Any]) -> str:
    """'key  value' lines, keys aligned."""
    if not fields:
        return ""
    width = max(len(k) for k in fields)
    return "\n".join(f"{k.ljust(width)}  {cell(v)}".rstrip() for k, v in fields.items())
