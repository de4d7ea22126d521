"""Job parameters and input items, validated with pydantic.

The API imports this module to refuse malformed requests at the door, so it must never import torch.

Structurally wrong items (wrong types, unknown fields, a missing field) are refused by ``parse_item``. Items that
are well-formed but unusable (an empty prompt, empty messages, empty text) are accepted here and rejected by the
engine in that item's result, so one bad line never sinks a batch.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


def distinct_labels(labels: list[str] | None) -> list[str] | None:
    """Labels name classes: each non-empty, none twice (classification and classifier fine-tunes alike)."""
    if labels is None:
        return None
    if any(not label.strip() for label in labels):
        raise ValueError("labels must be non-empty strings")
    if len(set(labels)) != len(labels):
        raise ValueError("labels must be distinct")
    return labels


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerateParams(_Strict):
    max_new_tokens: int = Field(default=128, ge=1, le=4096)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="0 means greedy decoding")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, description="0 turns top-k filtering off")
    stop: list[str] = Field(default_factory=list, max_length=8)
    seed: int | None = None

    @field_validator("stop")
    @classmethod
    def _non_empty_stops(cls, stop: list[str]) -> list[str]:
        if any(s == "" for s in stop):
            raise ValueError("stop strings must be non-empty")
        return stop


class ClassifyParams(_Strict):
    labels: list[str] | None = Field(default=None, min_length=2, max_length=100)
    template: str = Field(default="This text is {}.", description="zero-shot hypothesis for encoder models")
    top_k: int | None = Field(default=None, ge=1, description="keep only the k best labels in 'scores'")

    @field_validator("labels")
    @classmethod
    def _distinct_labels(cls, labels: list[str] | None) -> list[str] | None:
        return distinct_labels(labels)

    @field_validator("template")
    @classmethod
    def _one_placeholder(cls, template: str) -> str:
        if template.count("{}") != 1:
            raise ValueError("template must contain '{}' exactly once (where the label goes)")
        return template


class EmbedParams(_Strict):
    normalize: bool = True


PARAMS_BY_KIND: dict[str, type[BaseModel]] = {
    "generate": GenerateParams,
    "classify": ClassifyParams,
    "embed": EmbedParams,
}


class _StrictItem(BaseModel):
    # strict: a number where text belongs is a client bug, not something to coerce.
    model_config = ConfigDict(extra="forbid", strict=True)


class ChatMessage(_StrictItem):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class PromptItem(_StrictItem):
    prompt: str
    custom_id: str | None = None


class ChatItem(_StrictItem):
    messages: list[ChatMessage]
    custom_id: str | None = None


class TextItem(_StrictItem):
    text: str
    custom_id: str | None = None


def parse_item(kind: str, raw: dict[str, Any]) -> dict[str, Any]:
    """Validate one raw input item for a job kind and return it normalized (``custom_id`` always present).

    generate takes ``{"prompt": ...}`` or ``{"messages": [...]}``; classify and embed take ``{"text": ...}``.
    Raises ValueError with a message naming the problem.
    """
    if not isinstance(raw, dict):
        raise ValueError(f"an item must be a JSON object, got {type(raw).__name__}")
    model: type[BaseModel]
    if kind == "generate":
        model = ChatItem if "messages" in raw else PromptItem
    elif kind in ("classify", "embed"):
        model = TextItem
    else:
        raise ValueError(f"unknown job kind {kind!r}; expected one of {', '.join(PARAMS_BY_KIND)}")
    try:
        return model.model_validate(raw).model_dump()
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'item'}: {err['msg']}" for err in exc.errors())
        raise ValueError(f"invalid {kind} item: {problems}") from None
