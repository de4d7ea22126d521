"""Which device this worker process computes on, and what it looks like.

Each GPU worker process sees exactly one GPU through CUDA_VISIBLE_DEVICES, set before the process starts, so
"the" GPU is always cuda:0. Nothing here runs at import time: CUDA initialised in a parent and then forked
breaks the child ("Cannot re-initialize CUDA in forked subprocess"), so call these after fork only.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import torch


def pick_device() -> torch.device:
    """cuda:0 when a GPU is visible, else the CPU."""
    return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")


def describe_device(device: torch.device) -> dict[str, Any]:
    """A JSON-ready description of ``device`` for worker status: name and memory for a GPU, cores for a CPU."""
    if device.type == "cuda":
        return _describe_gpu(device)
    return {
        "device": str(device),
        "name": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_total_bytes": _host_memory(),
    }


def _describe_gpu(device: torch.device) -> dict[str, Any]:
    index = device.index or 0
    info: dict[str, Any] = {"device": str(device), "name": torch.cuda.get_device_name(index)}
    try:
        # NVML sees memory used by every process on the GPU, not only this one's allocator.
        import pynvml

        pynvml.nvmlInit()
        try:
            # NVML numbers every GPU on the host, ignoring CUDA_VISIBLE_DEVICES; the UUID names the same card.
            uuid = str(torch.cuda.get_device_properties(index).uuid)
            handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            info.update(memory_total_bytes=int(memory.total), memory_used_bytes=int(memory.used))
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # pynvml missing or NVML unusable: the CUDA runtime's device-wide view will do
        free, total = torch.cuda.mem_get_info(index)
        info.update(memory_total_bytes=int(total), memory_used_bytes=int(total - free))
    info["torch_allocated_bytes"] = int(torch.cuda.memory_allocated(index))
    return info


def _host_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
