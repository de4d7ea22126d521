"""Errors raised by workers and engines.

    JobError                      anything that stops a shard or a job (never an item alone)
    ├── RetryableJobError         the same work may succeed later: a lost connection, a busy GPU
    └── PermanentJobError         retrying cannot help: bad params, a missing model, a wrong capability
        └── ModelIntegrityError   a model version's files no longer match their checksum

A bad *item* is not an exception: engines report it in that item's result (``ItemResult.error``) and go on.
"""

from __future__ import annotations


class JobError(Exception):
    """Base class: a shard or job cannot go on as it is."""

    code = "job_error"


class RetryableJobError(JobError):
    """Try the shard again later; its attempts are counted."""

    code = "retryable"


class PermanentJobError(JobError):
    """Fail the shard now; retrying would fail the same way."""

    code = "permanent"


class ModelIntegrityError(PermanentJobError):
    """A model version's files were altered after registration."""

    code = "model_integrity"
