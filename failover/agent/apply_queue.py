"""The entries a replica logged and has not applied yet, kept in memory for applying.

A primary keeps each entry it queues for its log; a duplica keeps what it decoded of each
shipped batch when it checked the records (invariant 12: every record is checked before it is
written), so that applying reads nothing back from disk and decodes nothing twice. What is
not kept (after a restart, past `SHIPPED_KEPT_BYTES_MAX`, or cut) is read back from the log.
How far to apply is the core's decision (`ReplicaCore.apply_limit`); this only finds entries.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable
from itertools import accumulate, repeat
from operator import itemgetter

from failover import defaults
from failover.storage.records import Entry

_payload_of = itemgetter(3)
# What a decoded entry holds in memory beyond its record's bytes (the tuple, two bytes objects'
# headers, an int): shipped entries kept to apply are counted with it.
_ENTRY_OVERHEAD_BYTES = 160

# A shipped batch's decoded entries: (epoch, index, request id, payload) rows.
Rows = list[tuple[int, int, bytes, bytes]]


class ApplyQueue:
    """Entries to apply, oldest first: those queued here, and shipped batches as decoded."""

    def __init__(self) -> None:
        self.unapplied: deque[Entry] = deque()
        # Shipped entries on disk and not applied yet, as (first, last, rows, bytes): plain
        # tuples, which the garbage collector soon stops tracking.
        self.shipped: deque[tuple[int, int, Rows, int]] = deque()
        self.shipped_bytes = 0  # bounded: past it, applying re-reads from the log

    def logged(self, entry: Entry) -> None:
        """An entry this replica queued for its log."""
        self.unapplied.append(entry)

    def shipped_batch(self, first: int, last: int, rows: Rows, record_bytes: int) -> None:
        """A shipped batch is on disk: keep its decoded rows, if the bound allows."""
        size = record_bytes + len(rows) * _ENTRY_OVERHEAD_BYTES
        if self.shipped_bytes + size <= defaults.SHIPPED_KEPT_BYTES_MAX:
            self.shipped.append((first, last, rows, size))
            self.shipped_bytes += size

    def drop_from(self, index: int) -> None:
        """Entries at or after `index` never reached the log: they are not to be applied."""
        while self.unapplied and self.unapplied[-1].index >= index:
            self.unapplied.pop()

    def cut_after(self, index: int) -> None:
        """The log was truncated after `index`. Batches past the cut go, and one straddling
        it too: its kept part is read back from the log when it is applied."""
        self.drop_from(index + 1)
        while self.shipped and self.shipped[-1][0] > index:
            self.shipped_bytes -= self.shipped.pop()[3]
        if self.shipped and self.shipped[-1][1] > index:
            self.shipped_bytes -= self.shipped.pop()[3]

    def clear(self) -> None:
        """The state was replaced: nothing kept is of use."""
        self.unapplied.clear()
        self.shipped.clear()
        self.shipped_bytes = 0

    def take(self, first: int, limit: int, count: int,
             read_log: Callable[[int, int], list[Entry]]) -> list[Entry]:
        """The consecutive entries from `first` to apply next: at most `count`, up to `limit`,
        and APPLY_CHUNK_BYTES of payload (at least one). Reads the log (`read_log(first,
        last)`) for what is not kept; its errors pass through."""
        if not self.unapplied or self.unapplied[0].index != first:
            self._reload(first, limit, read_log)
        return self._take_batch(first, min(limit - first + 1, count))

    def _take_batch(self, first: int, count: int) -> list[Entry]:
        unapplied = self.unapplied
        if count >= len(unapplied):
            batch = list(unapplied)
            unapplied.clear()
        else:
            popleft = unapplied.popleft
            batch = [popleft() for _ in range(count)]
        if batch[-1].index != first + len(batch) - 1:
            # A gap (not seen in practice): apply up to it; the next chunk reloads after it.
            keep = next(k for k, e in enumerate(batch) if e.index != first + k)
            unapplied.extendleft(reversed(batch[keep:]))
            del batch[keep:]
        if sum(map(len, map(_payload_of, batch))) > defaults.APPLY_CHUNK_BYTES:
            sizes = list(accumulate(map(len, map(_payload_of, batch))))
            keep = max(1, bisect.bisect_right(sizes, defaults.APPLY_CHUNK_BYTES))
            unapplied.extendleft(reversed(batch[keep:]))
            del batch[keep:]
        assert batch and batch[0].index == first, (first, batch[:1])
        return batch

    def _reload(self, first: int, limit: int,
                read_log: Callable[[int, int], list[Entry]]) -> None:
        """Finds the next entries to apply, up to `limit`: in shipped entries kept in memory,
        else in the log (after a restart, or when they were not kept in memory), reading
        ahead up to APPLY_READ_ENTRIES."""
        while self.shipped and self.shipped[0][1] < first:
            self.shipped_bytes -= self.shipped.popleft()[3]
        if self.shipped and self.shipped[0][0] <= first:
            # Decoded when it arrived; made entries a part at a time (a batch holds up to
            # BATCH_ENTRIES_MAX of them), so few entries live long.
            shipped_first, shipped_last, rows, size = self.shipped.popleft()
            self.shipped_bytes -= size
            start = first - shipped_first
            cut = start + defaults.APPLY_READ_ENTRIES
            entries = list(map(tuple.__new__, repeat(Entry), rows[start:cut]))
            last = entries[-1].index
            if cut < len(rows):
                rest = rows[cut:]
                rest_size = size * len(rest) // len(rows)
                self.shipped.appendleft((last + 1, shipped_last, rest, rest_size))
                self.shipped_bytes += rest_size
        else:
            last = min(limit, first + defaults.APPLY_READ_ENTRIES - 1)
            entries = read_log(first, last)
        kept = [e for e in self.unapplied if e.index > last]
        self.unapplied = deque(entries)
        self.unapplied.extend(kept)
