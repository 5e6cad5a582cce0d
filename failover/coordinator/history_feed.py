"""WatchHistory (issue 17, `failoverctl events`): history events to the watchers that follow
them, as the coordinator commits them.

A watch reads its backlog from the store (the kept events after a seq, page by page, or the
newest few), then takes the events the coordinator publishes after each commit that recorded
some (`publish`, called with the seqs the store assigned). It is registered before the
backlog is read, so an event committed meanwhile is in the backlog, in its queue or both; the
seq, which only grows, tells the copies apart. Nothing waits for a watcher: `publish` puts an
event in each watcher's bounded queue (`HISTORY_WATCH_QUEUE_MAX`) and a watcher whose queue is
full is cut off (`WatcherBehind`, naming the seq to resume after). A coordinator that stops
leading ends every watch (`end_all`): it commits nothing more, and the caller goes to the
leader.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Callable, Sequence

from failover import defaults
from failover.errors import Overloaded, Unavailable, WatcherBehind
from failover.storage.store import HistoryEvent, HistoryRecord, Store


class _Ended(Exception):
    """Raised inside a watch whose queue overflowed (`behind`) or that was ended."""

    def __init__(self, behind: bool) -> None:
        super().__init__("behind" if behind else "ended")
        self.behind = behind


class _Watcher:
    """One watch: its service filter (None: every event), its queue and why it ends."""

    __slots__ = ("ended", "queue", "ready", "service")

    def __init__(self, service: str | None) -> None:
        self.service = service
        self.queue: collections.deque[HistoryRecord] = collections.deque()
        self.ready = asyncio.Event()
        self.ended: _Ended | None = None

    def offer(self, record: HistoryRecord) -> None:
        if self.ended is not None or (self.service is not None
                                      and record.service != self.service):
            return
        if len(self.queue) >= defaults.HISTORY_WATCH_QUEUE_MAX:
            self.queue.clear()  # what it holds is in the store: it resumes from there
            self.end(behind=True)
            return
        self.queue.append(record)
        self.ready.set()

    def end(self, behind: bool) -> None:
        if self.ended is None:
            self.ended = _Ended(behind)
        self.ready.set()

    async def next(self) -> HistoryRecord:
        while not self.queue:
            if self.ended is not None:
                raise self.ended
            self.ready.clear()
            await self.ready.wait()
        if self.ended is not None and self.ended.behind:
            raise self.ended
        return self.queue.popleft()


class HistoryFeed:
    """The watchers of one coordinator's history."""

    def __init__(self, store: Store, not_leading: Callable[[], Unavailable],
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self._not_leading = not_leading  # the error a watch ends with when leadership ends
        self._clock = clock  # wall-clock stamp of a live event (the store stamps its own)
        self._watchers: set[_Watcher] = set()

    @property
    def watchers(self) -> int:
        return len(self._watchers)

    @property
    def queued(self) -> int:
        """Events offered to watchers and not taken by them yet."""
        return sum(len(w.queue) for w in self._watchers)

    def publish(self, seqs: Sequence[int], events: Sequence[HistoryEvent]) -> None:
        """The events of one commit, with the seqs the store gave them; never waits."""
        if not self._watchers or not seqs:
            return
        at = self._clock()
        watchers = list(self._watchers)  # `offer` never changes the set
        for seq, (service, kind, message, details) in zip(seqs, events, strict=True):
            record = HistoryRecord(seq, at, service, kind, message, dict(details))
            for watcher in watchers:
                watcher.offer(record)

    def end_all(self) -> None:
        """This coordinator stopped leading: every watch ends (UNAVAILABLE)."""
        for watcher in list(self._watchers):
            watcher.end(behind=False)

    async def watch(self, service: str | None, after_seq: int | None, last: int,
                    follow: bool) -> AsyncIterator[HistoryRecord]:
        """The kept events after `after_seq` (or, with `after_seq` None, the newest `last`),
        of `service` (None: all), oldest first; then, with `follow`, each new one as it is
        committed. Raises Overloaded past `HISTORY_WATCHERS_MAX` watches, WatcherBehind when
        this watch fell behind, Unavailable when this coordinator stopped leading."""
        if len(self._watchers) >= defaults.HISTORY_WATCHERS_MAX:
            raise Overloaded(f"{defaults.HISTORY_WATCHERS_MAX} history watchers already "
                             "(history_watchers_max); try again later")
        watcher = _Watcher(service)
        if follow:
            self._watchers.add(watcher)  # before the backlog: nothing falls in between
        sent = after_seq or 0
        try:
            if after_seq is None:
                backlog = await self.store.history(service, last) if last else []
            else:
                backlog = await self.store.history_after(
                    after_seq, service, defaults.HISTORY_WATCH_PAGE_EVENTS)
            while backlog:
                for record in backlog:
                    yield record
                    sent = record.seq
                if after_seq is None or len(backlog) < defaults.HISTORY_WATCH_PAGE_EVENTS:
                    break
                backlog = await self.store.history_after(
                    sent, service, defaults.HISTORY_WATCH_PAGE_EVENTS)
            if not follow:
                return
            while True:
                try:
                    record = await watcher.next()
                except _Ended as ended:
                    if ended.behind:
                        raise WatcherBehind(
                            f"this history watch fell more than "
                            f"{defaults.HISTORY_WATCH_QUEUE_MAX} events behind and was cut "
                            f"off (a watcher never slows the coordinator); resume after seq "
                            f"{sent}: failoverctl events --follow --since {sent}") from None
                    raise self._not_leading() from None
                if record.seq > sent:  # else the backlog had it already
                    yield record
                    sent = record.seq
        finally:
            self._watchers.discard(watcher)
