"""The server's prompt cache across requests: recent sequences' keys/values, reused by prefix.

A chat client resends the whole conversation every turn, so the server keeps the ids and
keys/values of recently finished sequences (each an ``engine``-filled ``PromptCache``) and
gives a new request the entry sharing the longest token prefix with its prompt; the engine
then prefills only the rest (llama.cpp's ``cache_prompt``). The pool holds at most
``budget`` tokens in all and evicts the least recently used entries first.

Entries are never written in place: a request borrows an entry's ids and keys/values in a
``PromptCache`` of its own (``lease``), and the engine gives that lease new keys/values when
the request ends (``Engine._save``), which ``keep`` then adds as an entry. So any number of
requests may read one entry at once. Only the engine thread calls ``lease`` and ``keep``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from gpt2cli.kvcache import PromptCache


@dataclass
class PoolStats:
    entries: int = 0
    tokens: int = 0  # ids held by all entries
    lookups: int = 0  # requests that asked the pool
    hits: int = 0  # ... and got at least one token from it
    hit_tokens: int = 0  # prompt tokens those requests did not prefill (filled in by the caller)


class PromptPool:
    """Recent sequences' ``PromptCache``s, at most ``budget`` tokens, least recently used out first."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._entries: OrderedDict[int, PromptCache] = OrderedDict()  # id(cache) -> cache, LRU first
        self._lock = threading.Lock()  # for ``stats`` read from the event loop
        self._stats = PoolStats()

    def lease(self, prompt: list[int]) -> PromptCache:
        """A cache for a request with this prompt: the best entry's contents, borrowed (or empty)."""
        with self._lock:
            self._stats.lookups += 1
            best, common = None, 0
            for entry in self._entries.values():
                n = entry.common_prefix(prompt)
                if n > common:
                    best, common = entry, n
            if best is None:
                return PromptCache()
            self._entries.move_to_end(id(best))
            return PromptCache(ids=list(best.ids), kv=best.kv)

    def keep(self, lease: PromptCache, *, reused: int = 0) -> None:
        """A request has ended: its lease (holding what it saved) becomes the newest entry.

        ``reused`` is how many prompt tokens the request took from the pool (for the stats).
        Entries the new one extends (their ids are a prefix of its ids) are dropped as redundant.
        """
        with self._lock:
            if reused:
                self._stats.hits += 1
                self._stats.hit_tokens += reused
            if self.budget <= 0 or lease.kv is None or not lease.ids or len(lease.ids) > self.budget:
                return
            if any(entry.kv is lease.kv for entry in self._entries.values()):
                return  # the request saved nothing (cancelled while waiting): it holds a borrowed entry
            for key, entry in list(self._entries.items()):
                if len(entry.ids) <= len(lease.ids) and lease.ids[: len(entry.ids)] == entry.ids:
                    del self._entries[key]
            self._entries[id(lease)] = lease
            while sum(len(e.ids) for e in self._entries.values()) > self.budget:
                self._entries.popitem(last=False)

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(
                entries=len(self._entries),
                tokens=sum(len(e.ids) for e in self._entries.values()),
                lookups=self._stats.lookups,
                hits=self._stats.hits,
                hit_tokens=self._stats.hit_tokens,
            )
