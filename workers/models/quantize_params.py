"""A quantize job's params, checked at the door (the API, which never imports torch) and read by the worker.

Torch-free on purpose: api/schemas/models.py builds the request body from these models.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# The shipped check set's sizes (workers/models/data/): a check may use fewer, never more.
CHECK_PROMPTS = 64
CHECK_SENTENCES = 200
# Mirrors workers.models.quantize.DEFAULT_OUTLIER_RATIO, which imports torch.
DEFAULT_OUTLIER_RATIO = 64.0


class QualityCheckSize(BaseModel):
    """How much of the shipped check set the job runs: the first ``prompts`` chat prompts (greedy generation of
    ``new_tokens`` tokens, fp32 against int8) and the first ``sentences`` labelled sentences (zero-shot accuracy,
    or agreement of a classification head's predictions). The defaults are the whole set."""

    model_config = ConfigDict(extra="forbid")

    prompts: int = Field(CHECK_PROMPTS, ge=1, le=CHECK_PROMPTS)
    sentences: int = Field(CHECK_SENTENCES, ge=2, le=CHECK_SENTENCES)
    new_tokens: int = Field(32, ge=1, le=256)


class QuantizeParams(BaseModel):
    """``method``: only ``int8`` (dynamic int8 linear layers, CPU only). ``output_name``: the new version's model
    name (the door fixes it: the caller's namespace, or a catalogue name for an admin). ``outlier_ratio``: linear
    layers whose calibration inputs peak above this many times their median channel stay in fp32; null quantizes
    them too (faster, and the quality check may then refuse the result). The output head always stays fp32."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["int8"]
    output_name: str | None = Field(None, min_length=1, max_length=100)
    outlier_ratio: float | None = Field(DEFAULT_OUTLIER_RATIO, ge=1.0, le=1e9)
    check: QualityCheckSize = Field(default_factory=QualityCheckSize)
