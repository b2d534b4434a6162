"""The layer table as terminal text, fitted to a width.

One row per layer when it fits (and always without a width: a file or a pipe keeps one line
per layer, for grep and diff). Narrower, each layer becomes a block: ``name (op weight)``
with its status at the right, its numbers under it (in as many lines as the width needs,
aligned across layers), then its reason, wrapped. Nothing is cut: a long name wraps.
"""
from __future__ import annotations

import textwrap

from onnxlr.records import CHANGED, DECLINED

#: Below this many columns the blocks would be mostly wrapping: lay them out at this width.
NARROWEST = 40


def table(header: list[str], rows: list[list[str]], statuses: list[tuple[str, str]],
          width: int | None = None) -> list[str]:
    """Lines of the table.

    Args:
        header: column names; the first three are layer, op and weight, the last the status.
        rows: printable cells, one row per layer (the last cell: status and reason).
        statuses: (status, reason) per row, for the narrow layout.
        width: columns to fit, or None for one line per layer.
    """
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1]
             for row in [header] + rows]
    if width is None or max(len(line) for line in lines) <= width:
        return lines
    return blocks(header, rows, statuses, max(width, NARROWEST))


def blocks(header: list[str], rows: list[list[str]], statuses: list[tuple[str, str]],
           width: int) -> list[str]:
    """The narrow layout: a block of lines per layer, none longer than ``width``."""
    numbers = list(range(3, len(header) - 1))       # method … timing columns
    measured = [row for row, (status, _) in zip(rows, statuses) if status != DECLINED]
    widths = {i: max(len(row[i]) for row in [header] + measured) for i in numbers}
    groups, line, used = [], [], 2
    for i in numbers:                                 # columns in lines of ``width``
        if line and used + widths[i] > width:
            groups.append(line)
            line, used = [], 2
        line.append(i)
        used += widths[i] + 2
    groups.append(line)

    def numbers_lines(row):
        return ["  " + "  ".join(row[i].ljust(widths[i]) for i in g).rstrip() for g in groups]

    def name_lines(name: str, status: str) -> list[str]:
        lines = textwrap.wrap(name, width, break_long_words=True, break_on_hyphens=False)
        if len(lines[-1]) + 2 + len(status) <= width:
            lines[-1] = lines[-1] + " " * (width - len(lines[-1]) - len(status)) + status
        else:
            lines.append(status.rjust(width))
        return lines

    out = name_lines(f"{header[0]} ({header[1]} {header[2]})", header[-1])
    out += numbers_lines(header)
    out.append("-" * width)
    for row, (status, reason) in zip(rows, statuses):
        out += name_lines(f"{row[0]} ({row[1]} {row[2]})", status)
        if status != DECLINED:
            out += numbers_lines(row)
        if reason and status not in CHANGED:
            out += textwrap.wrap(reason, width, initial_indent="  ", subsequent_indent="  ",
                                 break_on_hyphens=False)
    return out
