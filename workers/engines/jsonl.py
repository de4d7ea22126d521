"""JSON Lines read with a bounded readline: one line is never held in memory past a limit.

A file of a single 200 MB line read with ``for line in handle`` sits in memory whole before anything can look at
its length. ``bounded_lines`` asks each readline for at most the limit plus one byte, so a longer line is found,
and refused, after reading no more than that.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO


class LineTooLong(ValueError):
    """A line longer than the limit: ``number`` is its 1-based line number."""

    def __init__(self, number: int, max_bytes: int) -> None:
        super().__init__(f"line {number} is over the limit of {max_bytes} bytes per line (max_line_bytes)")
        self.number = number
        self.max_bytes = max_bytes


def bounded_lines(handle: BinaryIO, *, max_bytes: int | None) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line with its newline) for each line of ``handle``. A line whose bytes, newline left
    out, pass ``max_bytes`` raises LineTooLong; None reads lines whole (a worker re-reading a file the door
    accepted)."""
    if max_bytes is None:
        yield from enumerate(handle, start=1)
        return
    number = 0
    while line := handle.readline(max_bytes + 1):
        number += 1
        if len(line) > max_bytes and not line.endswith(b"\n"):
            raise LineTooLong(number, max_bytes)
        yield number, line
