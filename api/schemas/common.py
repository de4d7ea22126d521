"""What every part of the HTTP contract shares: strict request bodies, ids, timestamps as epochs."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

# An id lmbatch made (`file-…`, `job-…`, `batch_…`): anything else cannot name an object, and is refused before
# it reaches a query (PostgreSQL text cannot even hold some of it, like NUL).
ObjectId = Annotated[str, Field(min_length=1, max_length=40, pattern=r"^[A-Za-z0-9_-]+$")]
# Integer columns are 32-bit: a larger offset or cursor could match nothing, and PostgreSQL refuses to compare it.
MAX_INT32 = 2**31 - 1

# OpenAI's caps on `metadata`, the same at every door that takes it (jobs, batches, fine-tunes): at most 16 pairs,
# keys of at most 64 characters, values of at most 512.
MAX_METADATA_PAIRS, MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 16, 64, 512
Metadata = Annotated[
    dict[
        Annotated[str, Field(max_length=MAX_METADATA_KEY_CHARS)],
        Annotated[str, Field(max_length=MAX_METADATA_VALUE_CHARS)],
    ],
    Field(max_length=MAX_METADATA_PAIRS),
]


# OpenAI's bounds on a file's `expires_after.seconds` (an hour to 30 days), for uploads and batch outputs alike.
MIN_EXPIRY_SECONDS, MAX_EXPIRY_SECONDS = 3600, 30 * 24 * 3600


def epoch(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment else None


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExpiresAfter(Strict):
    """OpenAI's expiration policy: the file goes this many seconds after its anchor (its own creation)."""

    anchor: Literal["created_at"]
    seconds: int = Field(ge=MIN_EXPIRY_SECONDS, le=MAX_EXPIRY_SECONDS)
