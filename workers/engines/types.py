"""What engines take and give back: one EngineItem in, one ItemResult out, matched by ``index``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EngineItem:
    index: int  # position in the job's input; results are returned in this order
    custom_id: str | None
    input: dict[str, Any]  # as normalized by params.parse_item


@dataclass
class ItemResult:
    """Exactly one of ``output`` and ``error`` is set; ``error`` is ``{"code": ..., "message": ...}``."""

    index: int
    custom_id: str | None
    output: dict[str, Any] | None
    error: dict[str, str] | None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @classmethod
    def failed(cls, item: EngineItem, code: str, message: str) -> ItemResult:
        return cls(item.index, item.custom_id, None, {"code": code, "message": message})


# Error codes an item can end with.
INVALID_ITEM = "invalid_item"
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
OUT_OF_MEMORY = "out_of_memory"
ENGINE_ERROR = "engine_error"
