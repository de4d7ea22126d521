"""Job parameters and input items, validated with pydantic.

The API imports this module to refuse malformed requests at the door, so it must never import torch.

Structurally wrong items (wrong types, unknown fields, a missing field) are refused by ``parse_item``. Items that
are well-formed but unusable (an empty prompt, empty messages, empty text) are accepted here and rejected by the
engine in that item's result, so one bad line never sinks a batch.

Two kinds of rule live here. The models' own fields say what a worker can run at all; it re-validates an accepted
job's params with them. The caps on size (stop sequences, seeds, labels, text per item) are the door's: they apply
only when validation is given an ``InputCaps`` as its context (``model_validate(raw, context=caps)``), which the API
does and a worker does not, so a job accepted before a cap existed, or under a larger one, still runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

# Fixed caps, the same for every deployment. OpenAI allows 4 stop sequences; custom_id fills a 512-character column;
# a seed must fit the signed 64-bit integer that torch and every client library take.
MAX_STOP_SEQUENCES = 4
MAX_CUSTOM_ID_CHARS = 512
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# The pydantic error type of a cap: the door answers it with its own code, and a batch refuses the whole file.
LIMIT_EXCEEDED = "limit_exceeded"


@dataclass(frozen=True)
class InputCaps:
    """The caps a deployment sets on what one request may hold (the API builds them from its settings)."""

    max_stop_chars: int  # per stop sequence: matching a stop string costs memory per character
    max_item_chars: int  # prompt or text characters of one item, all messages of a chat together
    max_labels: int
    max_label_chars: int
    max_template_chars: int  # a classify template, filled and tokenized once per label
    max_new_tokens: int  # the deployment's cap on max_new_tokens (a batch line's max_tokens)


def door_caps(info: ValidationInfo) -> InputCaps | None:
    """The caps of this validation: the door's, or None for a worker re-validating an accepted job."""
    return info.context if isinstance(info.context, InputCaps) else None


def over_limit(message: str) -> PydanticCustomError:
    """A cap's refusal, as a pydantic error of its own type (``LIMIT_EXCEEDED``)."""
    return PydanticCustomError(LIMIT_EXCEEDED, message)


def check_labels(labels: list[str] | None, info: ValidationInfo) -> None:
    """The door's caps on a list of labels: how many, and how long each."""
    caps = door_caps(info)
    if caps is None or labels is None:
        return
    if len(labels) > caps.max_labels:
        raise over_limit(f"{len(labels)} labels, over the limit of {caps.max_labels} (max_labels)")
    longest = max(labels, key=len)
    if len(longest) > caps.max_label_chars:
        raise over_limit(
            f"a label of {len(longest)} characters, over the limit of {caps.max_label_chars} (max_label_chars)"
        )


def text_chars(item: Mapping[str, Any]) -> int:
    """The characters of an item's text: its prompt, its text, or the contents of all its messages together."""
    if "messages" in item:
        return sum(len(str(message.get("content") or "")) for message in item["messages"] if isinstance(message, dict))
    return len(str(item.get("prompt", item.get("text", "")) or ""))


def check_item_chars(chars: int, info: ValidationInfo) -> None:
    caps = door_caps(info)
    if caps is not None and chars > caps.max_item_chars:
        raise over_limit(f"{chars} characters, over the limit of {caps.max_item_chars} per item (max_item_chars)")


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
    # 8: what workers have always run (jobs accepted before the door's cap of 4 keep theirs).
    stop: list[str] = Field(default_factory=list, max_length=8)
    seed: int | None = None

    @field_validator("stop")
    @classmethod
    def _non_empty_stops(cls, stop: list[str], info: ValidationInfo) -> list[str]:
        if any(s == "" for s in stop):
            raise ValueError("stop strings must be non-empty")
        caps = door_caps(info)
        if caps is None:
            return stop
        if len(stop) > MAX_STOP_SEQUENCES:
            raise over_limit(f"{len(stop)} stop sequences, over the limit of {MAX_STOP_SEQUENCES}")
        longest = max(map(len, stop), default=0)
        if longest > caps.max_stop_chars:
            raise over_limit(
                f"a stop sequence of {longest} characters, over the limit of {caps.max_stop_chars} (max_stop_chars)"
            )
        return stop

    @field_validator("max_new_tokens")
    @classmethod
    def _within_the_deployments_cap(cls, max_new_tokens: int, info: ValidationInfo) -> int:
        caps = door_caps(info)
        if caps is not None and max_new_tokens > caps.max_new_tokens:
            raise over_limit(f"at most {caps.max_new_tokens} (max_new_tokens_cap), not {max_new_tokens}")
        return max_new_tokens

    @field_validator("seed")
    @classmethod
    def _seed_in_int64(cls, seed: int | None, info: ValidationInfo) -> int | None:
        if seed is not None and door_caps(info) is not None and not INT64_MIN <= seed <= INT64_MAX:
            raise over_limit("the seed must be a signed 64-bit integer (from -2**63 to 2**63 - 1)")
        return seed


class ClassifyParams(_Strict):
    labels: list[str] | None = Field(default=None, min_length=2, max_length=100)
    template: str = Field(default="This text is {}.", description="zero-shot hypothesis for encoder models")
    top_k: int | None = Field(default=None, ge=1, description="keep only the k best labels in 'scores'")

    @field_validator("labels")
    @classmethod
    def _distinct_labels(cls, labels: list[str] | None, info: ValidationInfo) -> list[str] | None:
        check_labels(labels, info)
        return distinct_labels(labels)

    @field_validator("template")
    @classmethod
    def _one_placeholder(cls, template: str, info: ValidationInfo) -> str:
        if template.count("{}") != 1:
            raise ValueError("template must contain '{}' exactly once (where the label goes)")
        caps = door_caps(info)
        # The worker fills the template once per label and tokenizes every copy: its length counts labels times.
        if caps is not None and len(template) > caps.max_template_chars:
            raise over_limit(
                f"{len(template)} characters, over the limit of {caps.max_template_chars} (max_template_chars)"
            )
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


ChatRole = Literal["system", "user", "assistant", "tool"]
CHAT_ROLES: tuple[str, ...] = get_args(ChatRole)


class ChatMessage(_StrictItem):
    role: ChatRole
    content: str


# Only the door parses items (a worker reads them as stored), so this cap can be a plain field constraint.
CustomId = Annotated[str, Field(max_length=MAX_CUSTOM_ID_CHARS)]
# An item's own cap on new tokens, under the job's: lengths vary per item (the engine ends that row at its cap).
ItemMaxNewTokens = Annotated[int, Field(ge=1, le=4096)]


def check_item_max_new_tokens(max_new_tokens: int | None, info: ValidationInfo) -> int | None:
    caps = door_caps(info)
    if max_new_tokens is not None and caps is not None and max_new_tokens > caps.max_new_tokens:
        raise over_limit(f"at most {caps.max_new_tokens} (max_new_tokens_cap), not {max_new_tokens}")
    return max_new_tokens


class PromptItem(_StrictItem):
    prompt: str
    custom_id: CustomId | None = None
    max_new_tokens: ItemMaxNewTokens | None = None

    _capped_tokens = field_validator("max_new_tokens")(check_item_max_new_tokens)

    @field_validator("prompt")
    @classmethod
    def _capped(cls, prompt: str, info: ValidationInfo) -> str:
        check_item_chars(len(prompt), info)
        return prompt


class ChatItem(_StrictItem):
    messages: list[ChatMessage]
    custom_id: CustomId | None = None
    max_new_tokens: ItemMaxNewTokens | None = None

    _capped_tokens = field_validator("max_new_tokens")(check_item_max_new_tokens)

    @field_validator("messages")
    @classmethod
    def _capped(cls, messages: list[ChatMessage], info: ValidationInfo) -> list[ChatMessage]:
        check_item_chars(sum(len(message.content) for message in messages), info)
        return messages


class TextItem(_StrictItem):
    text: str
    custom_id: CustomId | None = None

    @field_validator("text")
    @classmethod
    def _capped(cls, text: str, info: ValidationInfo) -> str:
        check_item_chars(len(text), info)
        return text


class InvalidItem(ValueError):
    """An item ``parse_item`` refuses; ``over_limit`` when what it broke is one of the door's caps."""

    def __init__(self, message: str, *, over_limit: bool = False) -> None:
        super().__init__(message)
        self.over_limit = over_limit


def parse_item(
    kind: str, raw: dict[str, Any], *, caps: InputCaps | None = None, max_new_tokens: int | None = None
) -> dict[str, Any]:
    """Validate one raw input item for a job kind and return it normalized (``custom_id`` always present).

    generate takes ``{"prompt": ...}`` or ``{"messages": [...]}``, either with an optional ``max_new_tokens`` of its
    own (kept only when given); classify and embed take ``{"text": ...}``. With ``caps`` (the door), an item over
    them is refused too; with ``max_new_tokens`` (the job's), so is an item asking for more than the job. Raises
    InvalidItem (a ValueError) with a message naming the problem.
    """
    if not isinstance(raw, dict):
        raise InvalidItem(f"an item must be a JSON object, got {type(raw).__name__}")
    model: type[BaseModel]
    if kind == "generate":
        model = ChatItem if "messages" in raw else PromptItem
    elif kind in ("classify", "embed"):
        model = TextItem
    else:
        raise InvalidItem(f"unknown job kind {kind!r}; expected one of {', '.join(PARAMS_BY_KIND)}")
    try:
        item = model.model_validate(raw, context=caps).model_dump()
    except ValidationError as exc:
        errors = exc.errors()
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'item'}: {err['msg']}" for err in errors)
        capped = any(err["type"] == LIMIT_EXCEEDED for err in errors)
        raise InvalidItem(f"invalid {kind} item: {problems}", over_limit=capped) from None
    if kind == "generate":
        own = item.pop("max_new_tokens")
        if own is not None:
            if max_new_tokens is not None and own > max_new_tokens:
                raise InvalidItem(
                    f"invalid {kind} item: max_new_tokens: at most the job's max_new_tokens ({max_new_tokens}), "
                    f"not {own}"
                )
            item["max_new_tokens"] = own
    return item
