"""Cursor pagination for newest-first listings (jobs, files, batches): the cursor is the last id a client saw."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement


def listed_after(model: Any, anchor: Any) -> ColumnElement[bool]:
    """Rows that come after `anchor` in newest-first order; ties on created_at are broken by id."""
    return (model.created_at < anchor.created_at) | ((model.created_at == anchor.created_at) & (model.id < anchor.id))


def listed_before(model: Any, anchor: Any) -> ColumnElement[bool]:
    """Rows that come before `anchor` in newest-first order (newer ones): the page a "newer" link shows."""
    return (model.created_at > anchor.created_at) | ((model.created_at == anchor.created_at) & (model.id > anchor.id))
