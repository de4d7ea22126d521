"""One page of a newest-first list paged by keyset: `?after=<last id seen>` for older rows, `?before=<first id
seen>` for newer ones. The list is read with one row more than a page, which says whether another page follows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

Row = TypeVar("Row")


@dataclass(frozen=True)
class Page(Generic[Row]):
    rows: list[Row]
    has_newer: bool
    has_older: bool


def cut_page(rows: list[Row], *, size: int, after: bool, before: bool) -> Page[Row]:
    """`rows`: up to size + 1 rows, newest first, read after the anchor `after` names (older ones), or read before
    the anchor `before` names (newer ones: the extra row, if any, is the newest). Neither: the first page. Nothing
    read (an anchor that names nothing, or nothing left) links nowhere: there is no row to page from."""
    if not rows:
        return Page([], has_newer=False, has_older=False)
    if before:
        return Page(rows[-size:], has_newer=len(rows) > size, has_older=True)
    return Page(rows[:size], has_newer=after, has_older=len(rows) > size)
