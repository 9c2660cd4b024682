"""Brokers that a :class:`~uow.relay.Relay` sends the outbox to, each behind an extra.

Each one is built from a URL, sends a batch with the broker's own
acknowledgement, and keeps the order of each key.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from .errors import ConfigurationError
from .relay import Record

__all__ = ["RedisStreams"]


def _missing(extra: str, module: str) -> ConfigurationError:
    return ConfigurationError(f"this broker needs {module}: pip install 'uow[{extra}]'")


class RedisStreams:
    """Redis Streams: each message is an entry (``XADD``) on the stream named by its topic, after *prefix*.

    An entry's fields are ``id`` (the message's id, for consumers to drop
    copies), ``key`` (empty for none), ``payload`` and ``headers`` (a JSON
    object). A batch goes in one pipeline, which Redis runs in order; an
    entry is there once Redis answered, and with *maxlen* a stream keeps
    about that many entries. Redis acknowledges a write when it holds it in
    memory: with persistence off, a restart of Redis loses what consumers
    had not read.
    """

    def __init__(self, url: str = "redis://127.0.0.1:6379", *, prefix: str = "", maxlen: int | None = None) -> None:
        try:
            import redis.asyncio
        except ImportError:
            raise _missing("redis", "redis") from None
        self.client: Any = redis.asyncio.from_url(url)
        self.prefix = prefix
        self.maxlen = maxlen

    async def send(self, records: Sequence[Record]) -> list[BaseException | None]:
        """Add the records to their streams in one pipeline; raises if Redis cannot be reached."""
        async with self.client.pipeline(transaction=False) as pipe:
            for record in records:
                fields = {
                    "id": record.id,
                    "key": record.key or "",
                    "payload": record.payload,
                    "headers": json.dumps(record.headers),
                }
                pipe.xadd(self.prefix + record.topic, fields, maxlen=self.maxlen, approximate=self.maxlen is not None)
            results = await pipe.execute(raise_on_error=False)
        outcomes: list[BaseException | None] = []
        failed: dict[object, BaseException] = {}
        for record, result in zip(records, results, strict=True):
            chain = record.key if record.key is not None else ("no key", record.position)
            if isinstance(result, BaseException) or chain in failed:
                failed.setdefault(chain, result if isinstance(result, BaseException) else RuntimeError("not sent"))
                outcomes.append(failed[chain])
            else:
                outcomes.append(None)
        return outcomes

    async def close(self) -> None:
        await self.client.aclose()
