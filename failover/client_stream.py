"""The client's side of ExecuteStream: one long-lived stream to one agent (issue 16).

`failover.client.Client` keeps one `CallStream` per primary it calls. A call is queued with
`submit`; whenever the stream is free to write, everything queued goes out as one `CallBatch`
(up to STREAM_CALLS_PER_MESSAGE_MAX calls and STREAM_MESSAGE_BYTES_MAX payload bytes; the rest
goes in the next), so calls that are ready together travel together and none waits for
company. Answers come back in batches too and are matched to their calls by seq (unique per
client, the same for every attempt of a request, so the answer of any attempt is the
request's). The retry policy (redirects, reroutes, backoff, exactly-once) is the client's, the
same for this path and unary Execute: an attempt here ends in an `Answer` or a
`CallRefusal`, exactly what the client makes of an Execute reply or status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, NamedTuple

import grpc
import grpc.aio

from failover import defaults
from failover.net import channels
from failover.v1 import common_pb2, data_pb2, data_pb2_grpc

log = logging.getLogger(__name__)

_CODES = {code.value[0]: code for code in grpc.StatusCode}


class Answer(NamedTuple):
    """A request's answer, whichever path brought it (an ExecuteReply's fields): `outcome`
    is 0 for a result (msgpack `data`), 1 RequestRejected, 2 InvalidRequest (`data` is then
    the message)."""

    outcome: int
    data: bytes
    index: int
    commit_index: int
    epoch: int
    duplicate: bool
    session_known: bool

    @classmethod
    def of_reply(cls, reply: data_pb2.ExecuteReply) -> Answer:
        """The answer an Execute reply carries."""
        if reply.WhichOneof("outcome") == "rejected":
            outcome = 1 if reply.rejected.error_type == "RequestRejected" else 2
            data = reply.rejected.message.encode()
        else:
            outcome, data = 0, reply.result
        return cls(outcome, data, reply.index, reply.commit_index, reply.epoch,
                   reply.duplicate, reply.session_known)


class CallRefusal(Exception):
    """An attempt that got no answer of the service: the status an Execute of it ended with
    (or its CallRefused on a stream): code, details, the typed error it names, a redirect."""

    def __init__(self, code: grpc.StatusCode, details: str, error_type: str = "",
                 redirect: common_pb2.Redirect | None = None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.error_type = error_type
        self.redirect = redirect

    @classmethod
    def of_rpc_error(cls, exc: grpc.aio.AioRpcError) -> CallRefusal:
        """The refusal a unary call's status and trailing metadata carry."""
        error_type, redirect = _trailing(exc.trailing_metadata())
        return cls(exc.code(), exc.details() or "", error_type, redirect)

    @classmethod
    def of_refused(cls, refused: data_pb2.CallRefused) -> CallRefusal:
        return cls(_CODES.get(refused.code, grpc.StatusCode.UNKNOWN), refused.message,
                   refused.error_type,
                   refused.redirect if refused.HasField("redirect") else None)


# A queued call: (service, epoch_seen, client_id, seq, payload, deadline (loop time),
# opens_session, its future).
_Queued = tuple[str, int, str, int, bytes, float, bool, "asyncio.Future[Answer]"]


class CallStream:
    """One ExecuteStream to the agent at `address`. Once it breaks (`broken`), every call
    waiting on it is refused UNAVAILABLE (its outcome unknown) and the client opens another."""

    def __init__(self, stub: data_pb2_grpc.DataStub, address: str) -> None:
        self.address = address
        self._loop = asyncio.get_running_loop()
        self._queue: list[_Queued] = []
        # seq -> (the attempt's future, its deadline timer), from queueing to the answer.
        self._waiting: dict[int, tuple[asyncio.Future[Answer], asyncio.TimerHandle]] = {}
        self._wakeup = asyncio.Event()
        self.broken = False
        self._call = stub.ExecuteStream()
        self._writer = self._loop.create_task(self._write_loop())
        self._reader = self._loop.create_task(self._read_loop())

    def submit(self, service: str, epoch_seen: int, client_id: str, seq: int, payload: bytes,
               deadline: float, opens_session: bool) -> asyncio.Future[Answer]:
        """Queues one attempt; its future ends in an `Answer` or a `CallRefusal`
        (DEADLINE_EXCEEDED at `deadline`, in the loop's time)."""
        future: asyncio.Future[Answer] = self._loop.create_future()
        if self.broken:
            future.set_exception(CallRefusal(grpc.StatusCode.UNAVAILABLE,
                                             f"the stream to {self.address} broke"))
            return future
        timer = self._loop.call_at(deadline, self._expire, seq, future, deadline, 0)
        self._waiting[seq] = (future, timer)
        self._queue.append((service, epoch_seen, client_id, seq, payload, deadline,
                            opens_session, future))
        self._wakeup.set()
        return future

    def _expire(self, seq: int, future: asyncio.Future[Answer], due: float,
                graces: int) -> None:
        """The deadline timer of the attempt `future` of `seq`, due at `due`: refuses it
        DEADLINE_EXCEEDED, unless the timer ran late. Then the event loop was stalled (a
        blocking call in the application, a long pause) and the answer may have come during
        the stall: gRPC holds it, but the reader only gets it some loop iterations after this
        timer, which the stall made due first. Unary Execute keeps such an answer (its
        deadline is kept by gRPC, off the loop), and so must the stream: the refusal waits a
        grace (CLIENT_STREAM_STALL_GRACE_MS) in which the reader takes what arrived."""
        if future.done():
            return
        now = self._loop.time()
        if (now - due >= defaults.CLIENT_STREAM_STALL_MS / 1000
                and graces < defaults.CLIENT_STREAM_STALL_GRACES_MAX):
            waiting = self._waiting.get(seq)
            if waiting is not None and waiting[0] is future:
                due = now + defaults.CLIENT_STREAM_STALL_GRACE_MS / 1000
                timer = self._loop.call_at(due, self._expire, seq, future, due, graces + 1)
                self._waiting[seq] = (future, timer)
                return
        future.set_exception(CallRefusal(grpc.StatusCode.DEADLINE_EXCEEDED,
                                         "no answer before the call's deadline"))

    def forget(self, seq: int, future: asyncio.Future[Answer]) -> None:
        """The attempt `future` of `seq` ended without its answer (a reroute, a deadline, a
        cancelled caller): an answer that still comes is dropped."""
        waiting = self._waiting.get(seq)
        if waiting is not None and waiting[0] is future:
            del self._waiting[seq]
            waiting[1].cancel()

    async def close(self) -> None:
        """Ends the stream; calls still waiting are refused UNAVAILABLE."""
        self._break("the client closed")
        for task in (self._writer, self._reader):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # --- the stream ----------------------------------------------------------------------

    def _next_batch(self) -> data_pb2.CallBatch | None:
        """Takes what is queued (still waited for), up to the bounds of one message."""
        queue = self._queue
        calls_max = defaults.STREAM_CALLS_PER_MESSAGE_MAX
        bytes_left = defaults.STREAM_MESSAGE_BYTES_MAX
        taken: list[_Queued] = []
        used = 0
        for item in queue:
            used += 1
            if item[7].done():
                continue  # given up on before it was sent
            size = len(item[4])
            if len(taken) >= calls_max or (taken and size > bytes_left):
                used -= 1
                break
            bytes_left -= size
            taken.append(item)
        del queue[:used]
        if not taken:
            return None
        now = self._loop.time()
        return data_pb2.CallBatch(
            service=[c[0] for c in taken], epoch_seen=[c[1] for c in taken],
            client_id=[c[2] for c in taken], seq=[c[3] for c in taken],
            payload=[c[4] for c in taken],
            deadline_ms=[max(1, int((c[5] - now) * 1000)) for c in taken],
            opens_session=[c[6] for c in taken])

    async def _write_loop(self) -> None:
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                if self.broken:
                    return  # `_break` woke it: nothing more goes on this stream
                while (batch := self._next_batch()) is not None:
                    await self._call.write(batch)
        except asyncio.CancelledError:
            if _task_cancelled():
                raise
            self._break("the call was cancelled")  # under this stream (its channel closed)
            return
        except Exception as exc:
            # The call ended: its status says why (a refused certificate, too many streams),
            # which the reader reports too; whichever comes first refuses the calls.
            try:
                code = await asyncio.wait_for(
                    self._call.code(), defaults.CLIENT_STREAM_STATUS_WAIT_MS / 1000)
                details = await self._call.details()
                metadata = await self._call.trailing_metadata()
            except Exception:
                self._break(f"writing failed: {exc}")
                return
            self._break_with(code, details, metadata)

    async def _read_loop(self) -> None:
        try:
            async for batch in self._call:
                self._answered(batch)
        except asyncio.CancelledError:
            if _task_cancelled():
                raise
            self._break("the call was cancelled")  # under this stream (its channel closed)
            return
        except grpc.aio.AioRpcError as exc:
            self._break_with(exc.code(), exc.details() or "", exc.trailing_metadata())
            return
        except Exception as exc:
            self._break(f"reading failed: {exc}")
            return
        self._break("the agent ended the stream")

    def _break_with(self, code: grpc.StatusCode, details: str, metadata: Any) -> None:
        """The call ended with `code`: its waiting calls are refused so. A refused
        certificate is told as such (the client raises), and so is the agent's refusal of
        the stream itself, too many streams (RESOURCE_EXHAUSTED naming Overloaded in its
        trailing metadata: nothing on it was logged; the client backs off). Anything else,
        another RESOURCE_EXHAUSTED too (a message past gRPC's size bound, with calls on the
        stream that may be logged), is UNAVAILABLE: the outcome unknown."""
        why = f"{code.name}: {details}"
        error_type, _redirect = _trailing(metadata)
        if code == grpc.StatusCode.PERMISSION_DENIED:
            self._break(why, grpc.StatusCode.PERMISSION_DENIED)
        elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and error_type == "Overloaded":
            self._break(why, grpc.StatusCode.RESOURCE_EXHAUSTED, "Overloaded")
        else:
            self._break(why)

    def _answered(self, batch: data_pb2.AnswerBatch) -> None:
        waiting = self._waiting
        for seq, data, outcome, index, commit, epoch, duplicate, known in zip(
                batch.seq, batch.data, batch.outcome, batch.index, batch.commit_index,
                batch.epoch, batch.duplicate, batch.session_known, strict=True):
            entry = waiting.pop(seq, None)
            if entry is None:
                continue
            future, timer = entry
            timer.cancel()
            if not future.done():
                future.set_result(Answer(outcome, data, index, commit, epoch, duplicate, known))
        for refused in batch.refused:
            entry = waiting.pop(refused.seq, None)
            if entry is None:
                continue
            future, timer = entry
            timer.cancel()
            if not future.done():
                future.set_exception(CallRefusal.of_refused(refused))

    def _break(self, why: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
               error_type: str = "") -> None:
        """The stream is done: every call waiting on it is refused (`code`; UNAVAILABLE:
        the outcome is unknown, retried with the same id)."""
        if not self.broken:
            self.broken = True
            self._call.cancel()
            log.debug("the call stream to %s broke: %s", self.address, why)
        waiting, self._waiting = self._waiting, {}
        self._queue.clear()
        self._wakeup.set()  # the writer ends
        for future, timer in waiting.values():
            timer.cancel()
            if not future.done():
                future.set_exception(CallRefusal(
                    code, f"the stream to {self.address} broke: {why}", error_type))


def _task_cancelled() -> bool:
    """Whether the running task itself is being cancelled (`close`), rather than gRPC
    raising CancelledError for a call cancelled under it: a stream whose call was cancelled
    so must break, or its calls would wait out their deadlines on a stream nobody reads."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _trailing(metadata: Any) -> tuple[str, common_pb2.Redirect | None]:
    """The typed error a status's trailing metadata names ("" for none), and its redirect."""
    error_type = ""
    redirect = None
    for key, value in metadata or ():
        if key == channels.ERROR_TYPE_METADATA_KEY:
            error_type = value if isinstance(value, str) else value.decode()
        elif key == channels.REDIRECT_METADATA_KEY:
            redirect = common_pb2.Redirect.FromString(value)
    return error_type, redirect
