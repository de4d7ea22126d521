"""Wrong keys typed into the sign-in form, counted per client address in Redis (the `limits` library, as the API's
per-tenant rate limit in api/rate_limit.py), so guessing keys through the form stops after a few tries a minute.

Only wrong keys count: a person who signs in and out is never held back. If Redis does not answer, attempts are let
through (logged), as the API's rate limit does: keys are 256-bit random, so the limit slows guessing, it is not
what makes it hopeless.
"""

from __future__ import annotations

import logging

import redis
from limits import RateLimitItemPerMinute
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter

log = logging.getLogger("lmbatch.api")
NAMESPACE = "lmbatch-console-sign-in"
WRONG_KEYS_PER_MINUTE = 10


class SignInAttempts:
    """One per API process, over the process's Redis connection pool."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        storage = RedisStorage("redis://", connection_pool=client.connection_pool, key_prefix=NAMESPACE)
        self._limiter = MovingWindowRateLimiter(storage)
        self._item = RateLimitItemPerMinute(WRONG_KEYS_PER_MINUTE)

    def allowed(self, address: str) -> bool:
        """Whether `address` may try a key now (it has not typed too many wrong ones this last minute)."""
        try:
            return bool(self._limiter.test(self._item, address))
        except (redis.RedisError, OSError) as error:
            log.warning("console sign-in attempts not checked (Redis: %s): let through", type(error).__name__)
            return True

    def wrong_key(self, address: str) -> None:
        """Count a wrong key from `address`."""
        try:
            self._limiter.hit(self._item, address)
        except (redis.RedisError, OSError) as error:
            log.warning("console sign-in attempt not counted (Redis: %s)", type(error).__name__)
