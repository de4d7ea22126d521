"""How many webhook `test` calls one API process runs at once.

`POST /v1/webhook_endpoints/{id}/test` POSTs to the tenant's URL while the request waits, and it is a sync route:
each call holds one thread of the API's threadpool (about 40, shared by every route and tenant) for as long as
the endpoint takes to answer, up to the webhook timeout. Forty tests pointed at an address that never answers
would stall the whole API. So a tenant runs one test at a time, and a process runs at most a few; a call past
either cap is refused at once with a 429 and `Retry-After` instead of waiting for a slot (waiting would hold the
very thread the cap protects).

The counts are process-local on purpose: what they protect (the threadpool) is the process's own, so a shared
count in Redis would add a round trip and a failure mode for nothing.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from api.errors import TooManyRequests

# Tests in flight per API process: a handful of threads of ~40 may wait on tenants' endpoints, never most of them.
MAX_TESTS_PER_PROCESS = 4


class WebhookTestSlots:
    """One per API process (app.state). Thread-safe: sync routes run on the threadpool's threads."""

    def __init__(self, *, per_process: int = MAX_TESTS_PER_PROCESS) -> None:
        self._slots = threading.BoundedSemaphore(per_process)
        self._tenants: set[int] = set()  # tenants with a test in flight
        self._lock = threading.Lock()
        self.per_process = per_process

    @contextmanager
    def held(self, *, tenant_id: int, retry_after: float) -> Iterator[None]:
        """A slot for one test of the tenant, for the `with` block; TooManyRequests at once when the tenant has a
        test in flight or the process runs its most. `retry_after`: seconds a test may take (Retry-After)."""
        wait = str(max(1, math.ceil(retry_after)))
        with self._lock:
            if tenant_id in self._tenants:
                raise TooManyRequests(
                    "a test of this tenant's webhook endpoints is already in flight; one runs at a time, "
                    f"retry in {wait} s",
                    code="webhook_test_in_progress",
                    headers={"Retry-After": wait},
                )
            if not self._slots.acquire(blocking=False):
                raise TooManyRequests(
                    f"this API process is already running {self.per_process} webhook tests, the most it runs "
                    f"at once; retry in {wait} s",
                    code="webhook_test_in_progress",
                    headers={"Retry-After": wait},
                )
            self._tenants.add(tenant_id)
        try:
            yield
        finally:
            with self._lock:
                self._tenants.discard(tenant_id)
                self._slots.release()
