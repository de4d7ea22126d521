"""Requests per second per tenant, counted in Redis by the `limits` library so every API process shares the count.

A moving window of one second per tenant (`LMBATCH_MAX_REQUESTS_PER_SECOND`, or the tenant's override): a request
past it is a 429 with `Retry-After` (whole seconds until the window has room). If Redis does not answer, requests
are let through and the failure is logged: the rate limit protects the service, and an API that refuses every
read while Redis restarts would not.
"""

from __future__ import annotations

import logging
import math
import time

import redis
from limits import RateLimitItemPerSecond
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter

from api.errors import TooManyRequests

log = logging.getLogger("lmbatch.api")
NAMESPACE = "lmbatch-rate"


class TenantRateLimiter:
    """One per API process, over the process's Redis connection pool."""

    def __init__(self, client: redis.Redis) -> None:
        # The URI only names the storage kind: the connection comes from the API's own pool.
        storage = RedisStorage("redis://", connection_pool=client.connection_pool, key_prefix=NAMESPACE)
        self._limiter = MovingWindowRateLimiter(storage)

    def check(self, *, tenant_id: int, per_second: int) -> None:
        """Count one request of the tenant; raise TooManyRequests past `per_second` (0: no limit)."""
        if per_second <= 0:
            return
        item = RateLimitItemPerSecond(per_second)
        key = str(tenant_id)
        try:
            if self._limiter.hit(item, key):
                return
            reset_at = self._limiter.get_window_stats(item, key).reset_time
        except (redis.RedisError, OSError) as error:
            log.warning("rate limit not checked (Redis: %s): request let through", type(error).__name__)
            return
        wait = max(1, math.ceil(reset_at - time.time()))
        raise TooManyRequests(
            f"more than {per_second} requests per second for this tenant (max_requests_per_second); retry in {wait} s",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(wait)},
        )
