"""`GET /v1/workers`'s body: the worker processes alive now, as each publishes itself (workers/presence.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class WorkerPublic(BaseModel):
    """One pool process and its device. A GPU worker reports its memory (``memory_used_bytes``,
    ``torch_allocated_bytes``), a CPU worker its cores (``cpu_count``, ``torch_threads``); a record carries only
    the fields its worker wrote (the route leaves out the unset ones)."""

    # A worker newer than this API may publish more: it is shown as it came.
    model_config = ConfigDict(extra="allow")

    name: str
    pid: int
    queues: list[str]
    started_at: int
    seen_at: int
    # The GPUs the launcher pinned the worker to ("0", "0,1"); empty for a CPU worker.
    cuda_visible_devices: str | None
    device: str
    device_name: str | None
    memory_total_bytes: int | None = None
    memory_used_bytes: int | None = None
    torch_allocated_bytes: int | None = None
    cpu_count: int | None = None
    torch_threads: int | None = None


class WorkerList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WorkerPublic]
