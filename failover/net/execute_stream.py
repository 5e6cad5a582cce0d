"""The agent's side of ExecuteStream, the streaming data path (issue 16).

A client keeps one long-lived stream per primary and sends, in one `CallBatch`, whatever calls
were queued when the stream was free. `ExecuteStream.take` checks each call as Execute checks
its request (names, request id, size), groups the message's calls by service and hands each
group to its replica at once (`Replica.execute_many`): the new writes of one message become one
group-commit append and one shipped batch. Answers are sent as they come: whatever answers are
ready when the stream is free to write go back as one `AnswerBatch`, each matched by its seq.

Bounds: a message carries at most STREAM_CALLS_PER_MESSAGE_MAX calls and
STREAM_MESSAGE_BYTES_MAX payload bytes (more, or columns of unequal length, end the stream with
INVALID_ARGUMENT); a stream holds at most STREAM_PENDING_CALLS_MAX calls unanswered (then its
next message is read only once some are answered); each call is answered by its deadline
(`deadline_ms`, else CALL_DEADLINE_MS; at most STREAM_CALL_DEADLINE_MS_MAX) at the latest, with
UNAVAILABLE (the outcome is unknown: retry with the same request id).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc

from failover import defaults
from failover.agent.replica import Answered, StreamCall
from failover.core.names import check_service_name
from failover.core.sessions import ReplyStatus
from failover.errors import InvalidRequest, SessionExpired, Unavailable
from failover.net.refusals import HANDLED, refusal_of
from failover.v1 import data_pb2

if TYPE_CHECKING:
    from failover.agent.host import Agent
    from failover.agent.replica import Replica

log = logging.getLogger(__name__)
_CODE_NAMES = {code.value[0]: code.name.lower() for code in grpc.StatusCode}  # for metrics

_RESULT, _REJECTED, _INVALID = 0, 1, 2  # AnswerBatch.outcome
_OUTCOME = {ReplyStatus.OK: _RESULT, ReplyStatus.REJECTED: _REJECTED,
            ReplyStatus.INVALID: _INVALID}


def check_request_id(client_id: str, seq: int) -> None:
    """Raises InvalidRequest unless (client_id, seq) can be a request id."""
    if not client_id or not 0 < seq < 1 << 63:
        raise InvalidRequest("request_id needs a client_id and a seq >= 1")
    raw = client_id.encode()
    if len(raw) > defaults.CLIENT_ID_BYTES_MAX or b"\x00" in raw:
        raise InvalidRequest(f"client_id must be 1-{defaults.CLIENT_ID_BYTES_MAX} bytes, no NUL")


def check_payload_size(payload: bytes) -> None:
    """Raises InvalidRequest for a request over REQUEST_BYTES_MAX."""
    if len(payload) > defaults.REQUEST_BYTES_MAX:
        raise InvalidRequest(f"request of {len(payload)} bytes is over "
                             f"request_bytes_max ({defaults.REQUEST_BYTES_MAX})")


def check_batch(batch: data_pb2.CallBatch) -> int:
    """The number of calls in `batch`; raises InvalidRequest (which ends the stream) for
    columns of unequal length or a message past its bounds."""
    count = len(batch.seq)
    lengths = {len(batch.service), len(batch.epoch_seen), len(batch.client_id), count,
               len(batch.payload), len(batch.deadline_ms), len(batch.opens_session)}
    if len(lengths) != 1:
        raise InvalidRequest("a CallBatch's fields must each hold one entry per call; "
                             f"they hold {sorted(lengths)}")
    if count > defaults.STREAM_CALLS_PER_MESSAGE_MAX:
        raise InvalidRequest(f"a CallBatch of {count} calls is over "
                             f"stream_calls_per_message_max "
                             f"({defaults.STREAM_CALLS_PER_MESSAGE_MAX}): send fewer at once")
    size = sum(map(len, batch.payload))
    if size > defaults.STREAM_MESSAGE_BYTES_MAX:
        raise InvalidRequest(f"a CallBatch of {size} payload bytes is over "
                             f"stream_message_bytes_max ({defaults.STREAM_MESSAGE_BYTES_MAX})")
    return count


class ExecuteStream:
    """One ExecuteStream call on an agent: the calls it holds unanswered and the answers
    ready to send. Lives on the agent's event loop; `close` when the call ends."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._tokens = 0
        # token -> (seq, its message's first token), for the calls not answered yet
        self.pending: dict[int, tuple[int, int]] = {}
        self._left: dict[int, int] = {}  # a message's first token -> its calls unanswered
        self.ready = asyncio.Event()  # answers wait, or the stream's end
        self.room = asyncio.Event()  # fewer than STREAM_PENDING_CALLS_MAX unanswered
        self.room.set()
        self._tasks: set[asyncio.Task[None]] = set()  # calls run one by one
        self._timers: dict[int, asyncio.TimerHandle] = {}  # by a message's first token
        self.closed = False
        self._clear_answers()
        # With --metrics-listen (issue 17): when each call came in, by token, so that its
        # answer is counted and timed as an Execute's is (`AgentMetrics.request_done`).
        self._metrics = agent.metrics
        self._started: dict[int, float] = {}

    def _clear_answers(self) -> None:
        self._seq: list[int] = []
        self._data: list[bytes] = []
        self._outcome: list[int] = []
        self._index: list[int] = []
        self._commit: list[int] = []
        self._epoch: list[int] = []
        self._duplicate: list[bool] = []
        self._known: list[bool] = []
        self._refused: list[data_pb2.CallRefused] = []

    # --- calls in ------------------------------------------------------------------------

    def take(self, batch: data_pb2.CallBatch) -> None:
        """Starts every call of one message (checked by `check_batch`, whose InvalidRequest
        ends the stream). Raises nothing else: should starting its calls fail unexpectedly
        (a bug, in this code or a kind's), the calls not answered yet are refused
        UNAVAILABLE, their outcome unknown, and the stream goes on. Every call taken is
        answered by its message's deadline at the latest."""
        count = check_batch(batch)
        if not count:
            return
        first = self._tokens
        end = self._tokens = first + count
        # Every call is pending from here on, so that whatever happens next, each is answered
        # (by its outcome, a refusal, or the expiry timer armed below).
        self.pending.update((token, (seq, first))
                            for token, seq in zip(range(first, end), batch.seq, strict=True))
        self._left[first] = count
        if self._metrics is not None:
            self._started.update(dict.fromkeys(range(first, end), time.perf_counter()))
        try:
            self._start(batch, first, count)
        except Exception as exc:
            log.error("ExecuteStream: starting a message's %d calls failed; those not "
                      "answered yet are refused UNAVAILABLE", count, exc_info=exc)
            self._refuse(first, end, _failed(exc))
        finally:
            # Whatever is still unanswered at the message's last deadline is told so (the
            # client has given up on it by then): a stream's state stays bounded in time.
            if first in self._left:  # some call is not answered yet
                budget_ms = max(batch.deadline_ms) or defaults.CALL_DEADLINE_MS
                budget_ms = min(budget_ms, defaults.STREAM_CALL_DEADLINE_MS_MAX)
                loop = asyncio.get_running_loop()
                self._timers[first] = loop.call_later(budget_ms / 1000, self._expire, first,
                                                      end)
            if len(self.pending) >= defaults.STREAM_PENDING_CALLS_MAX:
                self.room.clear()

    def _start(self, batch: data_pb2.CallBatch, first: int, count: int) -> None:
        """Checks the calls of one message (tokens `first`.. on, already pending) and hands
        them, grouped by service, to their replicas."""
        services, seen, client_ids, seqs = (batch.service, batch.epoch_seen,
                                            batch.client_id, batch.seq)
        payloads, opens, deadlines = batch.payload, batch.opens_session, batch.deadline_ms
        groups: dict[str, list[StreamCall]] = {}
        names_ok: set[str] = set()  # a message's calls mostly share a service and session
        ids_ok: set[str] = set()
        for i in range(count):
            token = first + i
            service, client_id, seq, payload = services[i], client_ids[i], seqs[i], payloads[i]
            call = (token, seen[i], client_id, seq, payload, opens[i])
            try:
                if service not in names_ok:
                    check_service_name(service)
                    names_ok.add(service)
                if client_id not in ids_ok or not 0 < seq < 1 << 63:
                    check_request_id(client_id, seq)
                    ids_ok.add(client_id)
                check_payload_size(payload)
            except InvalidRequest as exc:
                self._answer(None, call, exc)
                continue
            group = groups.get(service)
            if group is None:
                group = groups[service] = []
            group.append(call)
        for service, calls in groups.items():
            try:
                replica = self.agent.data_replica(service)
            except HANDLED as exc:
                for call in calls:
                    self._answer(None, call, exc)
                continue
            answer = functools.partial(self._answer, replica)
            try:
                for call in replica.execute_many(calls, answer):
                    self._run_one(replica, call, deadlines[call[0] - first], answer)
            except Exception as exc:
                # One service's failure (a bug in a kind's is_read_only, say) leaves the
                # other services' calls of the message going. Calls it logged or ran
                # already are answered when done: only the first answer of a call is sent.
                log.error("ExecuteStream: %s failed to take %d calls; those not answered "
                          "yet are refused UNAVAILABLE", service, len(calls), exc_info=exc)
                refusal = _failed(exc)
                for call in calls:
                    self._answer(replica, call, refusal)

    def _run_one(self, replica: Replica, call: StreamCall, deadline_ms: int,
                 answer: Callable[[StreamCall, Answered | Exception], None]) -> None:
        """Runs a call through `Replica.execute` (a read, or a write held or throttled)."""
        timeout_s = min(deadline_ms or defaults.CALL_DEADLINE_MS,
                        defaults.STREAM_CALL_DEADLINE_MS_MAX) / 1000

        async def run() -> None:
            _token, epoch_seen, client_id, seq, payload, opens = call
            try:
                outcome: Answered | Exception = await replica.execute(
                    epoch_seen, client_id, seq, payload, timeout_s, opens)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # answered as Execute would end, bugs as UNKNOWN
                outcome = exc
            answer(call, outcome)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _expire(self, first: int, end: int) -> None:
        self._timers.pop(first, None)
        self._refuse(first, end, Unavailable(
            "not answered within the call's deadline; the outcome is unknown: retry with the "
            "same request id"))

    def _refuse(self, first: int, end: int, error: Exception) -> None:
        """Answers `error` to every call of tokens first..end-1 not answered yet."""
        pending = self.pending
        for token in range(first, end):
            entry = pending.get(token)
            if entry is not None:
                self._answer(None, (token, 0, "", entry[0], b"", False), error)

    def refuse_all(self, error: Exception) -> None:
        """Answers `error` to every call of the stream not answered yet (the stream ends)."""
        for token, (seq, _first) in list(self.pending.items()):
            self._answer(None, (token, 0, "", seq, b"", False), error)

    # --- answers out ---------------------------------------------------------------------

    def _answer(self, replica: Replica | None, call: StreamCall,
                outcome: Answered | Exception) -> None:
        """Queues the answer of `call` (once: a later one, after its deadline, is dropped)."""
        entry = self.pending.pop(call[0], None)
        if entry is None or self.closed:
            return
        seq, first = entry
        left = self._left[first] - 1
        if left:
            self._left[first] = left
        else:  # the message is answered: its expiry timer goes (one per message otherwise
            del self._left[first]  # stayed armed, up to 600 s, on a long-lived stream)
            timer = self._timers.pop(first, None)
            if timer is not None:
                timer.cancel()
        if not isinstance(outcome, Exception):
            reply, duplicate, epoch = outcome
            status = reply.status
            if status != ReplyStatus.EXPIRED:
                assert replica is not None
                if self._metrics is not None:
                    self._measure(replica, call[0],
                                  "ok" if status == ReplyStatus.OK else "rejected")
                self._seq.append(seq)
                self._data.append(reply.data)
                self._outcome.append(_OUTCOME[status])
                self._index.append(reply.index)
                self._commit.append(replica.commit_index)
                self._epoch.append(epoch)
                self._duplicate.append(duplicate)
                self._known.append(replica.sm.sessions.knows(call[2]))
                self._wake()
                return
            # The entry changed nothing: no reply to give.
            outcome = SessionExpired(reply.data.decode(errors="replace"))
        refused = _refused(seq, outcome)
        if self._metrics is not None:
            self._measure(replica, call[0], _CODE_NAMES.get(refused.code, "unknown"))
        self._refused.append(refused)
        self._wake()

    def _measure(self, replica: Replica | None, token: int, outcome: str) -> None:
        started = self._started.pop(token, None)
        if self._metrics is not None and started is not None:
            self._metrics.request_done(replica.service if replica is not None else "",
                                       "execute", outcome, time.perf_counter() - started)

    def _wake(self) -> None:
        self.ready.set()
        if not self.room.is_set() and len(self.pending) < defaults.STREAM_PENDING_CALLS_MAX:
            self.room.set()

    def has_answers(self) -> bool:
        return bool(self._seq or self._refused)

    def flush(self) -> data_pb2.AnswerBatch:
        """The answers ready, as one message of at most STREAM_MESSAGE_BYTES_MAX result
        bytes (at least one answer); clears them, and leaves the rest for the next message.
        Reads answer with values up to REQUEST_BYTES_MAX: a few of them together passed
        gRPC's message bound, and the stream ended with every call on it unanswered."""
        take, size = 0, 0
        for data in self._data:
            if take and size + len(data) > defaults.STREAM_MESSAGE_BYTES_MAX:
                break
            size += len(data)
            take += 1
        out = data_pb2.AnswerBatch(
            seq=self._seq[:take], data=self._data[:take], outcome=self._outcome[:take],
            index=self._index[:take], commit_index=self._commit[:take],
            epoch=self._epoch[:take], duplicate=self._duplicate[:take],
            session_known=self._known[:take], refused=self._refused)
        if take == len(self._seq):
            self._clear_answers()
            self.ready.clear()
            return out
        for column in (self._seq, self._data, self._outcome, self._index, self._commit,
                       self._epoch, self._duplicate, self._known):
            del column[:take]
        self._refused = []
        return out  # `ready` stays set: the rest goes next

    def close(self) -> None:
        """The call ended: calls still running are cancelled (their entries, if logged,
        are applied all the same; the client retries them with the same ids)."""
        self.closed = True
        self._started.clear()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in list(self._tasks):
            task.cancel()


def _failed(exc: Exception) -> Unavailable:
    """The refusal of a call whose taking failed unexpectedly: UNAVAILABLE, so that the client
    retries it with the same request id (it may have been logged: exactly-once holds)."""
    return Unavailable(f"the agent failed to take this call ({type(exc).__name__}: {exc}); "
                       "the outcome is unknown: retry with the same request id")


def _refused(seq: int, exc: Exception) -> data_pb2.CallRefused:
    """A call's refusal as Execute would have ended with it; an unexpected error (a bug) is
    logged and told as UNKNOWN."""
    refusal = refusal_of(exc)
    if refusal is None:
        log.error("an ExecuteStream call failed unexpectedly", exc_info=exc)
        return data_pb2.CallRefused(seq=seq, code=grpc.StatusCode.UNKNOWN.value[0],
                                    message=f"{type(exc).__name__}: {exc}")
    out = data_pb2.CallRefused(seq=seq, code=refusal.code.value[0], message=refusal.message,
                               error_type=refusal.error_type)
    if refusal.redirect is not None:
        out.redirect.CopyFrom(refusal.redirect)
    return out
