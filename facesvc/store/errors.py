"""Store-level failures shared by every Redis-backed part (caps, templates, challenges, tokens).

Decision (fail closed): any error talking to Redis -- refused connection, timeout, a server
that is loading its AOF, a read-only replica after a failover, a cluster that is down -- is
raised as one exception, :class:`StoreUnavailable`. The engine maps it to gRPC UNAVAILABLE
and never hands out a verification or a token without a completed cap check. Callers retry
later; nothing here retries on its own beyond the client's connection retry policy.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from redis.exceptions import RedisError

from facesvc.errors import Unavailable

log = logging.getLogger(__name__)


class StoreUnavailable(Unavailable):
    """Redis could not answer: the request must fail closed (gRPC UNAVAILABLE); retry later.

    Its message goes to callers as is: it says what could not be done, never the client
    error's own text, which names Redis's host and port (the detail is logged instead).
    """


@asynccontextmanager
async def store_errors(operation: str) -> AsyncIterator[None]:
    """Translate every Redis client error inside the block into :class:`StoreUnavailable`.

    ``operation`` names what was being done (e.g. "reserve an attempt"): the caller hears
    that, and the operator's log has the client error with it. Also catches ``OSError``
    (socket errors that escape the client) and ``TimeoutError`` (asyncio deadlines), which
    are the same condition.
    """
    try:
        yield
    except (RedisError, OSError, TimeoutError) as exc:
        log.warning(
            "Redis is unavailable",
            extra={"operation": operation, "error": f"{type(exc).__name__}: {exc}"},
        )
        raise StoreUnavailable(
            f"the service's store is unavailable, so it could not {operation}; retry in a "
            "few seconds"
        ) from exc
