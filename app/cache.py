"""The response cache: answers to repeated images, without decoding or queueing them again.

Keyed by the SHA-256 of the request body and everything else that decides the answer: the
model's name, version and variant, and the answer's parameters (`top_k`, `coverage`). A
cryptographic hash because the cache is shared by every client: one must not be able to make
another's image answer with its own. SHA-256 runs at about 2 GB/s with the CPU's SHA extensions
(0.17 ms for a 300 KB photo), a few percent of decoding it, and the body is hashed chunk by
chunk as it arrives, so that the digest is ready soon after its last byte.

Bounded in bytes (each entry counts its answer, its key and a fixed overhead), least recently
used first out. Identical requests that miss at the same time run once: the first computes, the
others wait for its answer (`coalesced`); if it fails, each computes its own. A model's entries
are dropped when it reloads or leaves (`drop_model`); the version in the key already keeps a new
version from reading an old answer, this frees the memory.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from typing import TYPE_CHECKING

from app.errors import DeadlineExceeded

if TYPE_CHECKING:
    from app.metrics import ServiceMetrics

# What an entry costs besides its answer and digest: the key tuple, the dict slot, the bytes
# headers (measured with sys.getsizeof on CPython 3.11, rounded up).
ENTRY_OVERHEAD_BYTES = 400
ENTRY_FIXED_BYTES = 32 + ENTRY_OVERHEAD_BYTES  # the digest, and the above
# (model name, version, variant) + the answer's parameters + the body's digest
Key = tuple[object, ...]


def cache_bypassed(cache_control: bytes | None) -> tuple[bool, bool]:
    """(skip the lookup, skip the store) for a request's Cache-Control header.

    `no-cache`: answer afresh (and keep that answer); `no-store`: answer afresh, keep nothing.
    """
    if not cache_control:
        return False, False
    directives = {d.strip().split(b"=", 1)[0] for d in cache_control.lower().split(b",")}
    no_store = b"no-store" in directives
    return no_store or b"no-cache" in directives, no_store


def new_digest() -> hashlib._Hash:
    """What keys an image: SHA-256 of its bytes, fed as they arrive."""
    return hashlib.sha256()


class ResponseCache:
    def __init__(self, max_bytes: int, metrics: ServiceMetrics) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[Key, bytes] = OrderedDict()
        # keys being computed, with the future of those waiting for them (None: nobody yet)
        self._computing: dict[Key, asyncio.Future[bytes | None] | None] = {}
        self._metrics = metrics
        if not metrics.multiprocess:  # read at scrape time: requests pay nothing for them
            metrics.cache_bytes.set_function(lambda: self.bytes)
            metrics.cache_entries.set_function(lambda: len(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Key) -> bytes | None:
        body = self._entries.get(key)
        if body is not None:
            self._entries.move_to_end(key)
        return body

    def put(self, key: Key, body: bytes) -> None:
        size = len(body) + ENTRY_FIXED_BYTES
        if size > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= len(old) + ENTRY_FIXED_BYTES
        self._entries[key] = body
        self.bytes += size
        evicted = 0
        while self.bytes > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self.bytes -= entry_bytes(dropped)
            evicted += 1
        if evicted:
            self._metrics.cache_evictions.inc(evicted)
        self._publish()

    def drop_model(self, name: str) -> int:
        """Forget every answer of model `name` (any version); how many there were."""
        stale = [key for key in self._entries if key[0] == name]
        for key in stale:
            self.bytes -= entry_bytes(self._entries.pop(key))
        self._publish()
        return len(stale)

    def claim(self, key: Key) -> asyncio.Future[bytes | None] | None:
        """After a miss: None if the caller is the first to ask (it computes the answer, then
        `settle`s it); else a future that the first one's answer (or None, if it failed) will
        settle. The future is made only when a second request asks: a lone miss makes none."""
        if key not in self._computing:
            self._computing[key] = None
            return None
        waiting = self._computing[key]
        if waiting is None:
            waiting = self._computing[key] = asyncio.get_running_loop().create_future()
        return waiting

    def settle(self, key: Key, body: bytes | None) -> None:
        """The claimed answer, kept and handed to those waiting; None: it failed, and each
        waiting request computes its own (its failure is not theirs)."""
        waiting = self._computing.pop(key)
        if body is not None:
            self.put(key, body)
        if waiting is not None:
            waiting.set_result(body)

    async def wait(self, waiting: asyncio.Future[bytes | None], wait_s: float) -> bytes | None:
        """The answer an identical request is computing, within the caller's deadline."""
        try:
            return await asyncio.wait_for(asyncio.shield(waiting), wait_s)
        except TimeoutError:
            raise DeadlineExceeded("the request's deadline passed before its answer") from None

    def _publish(self) -> None:
        if self._metrics.multiprocess:  # each worker writes its own file
            self._metrics.cache_bytes.set(self.bytes)
            self._metrics.cache_entries.set(len(self._entries))


def entry_bytes(body: bytes) -> int:
    return len(body) + ENTRY_FIXED_BYTES
