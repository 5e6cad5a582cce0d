"""The coordinator's store in one SQLite file in its data dir (the default store).

Layout (schema version 1, kept in ``PRAGMA user_version``)::

    state(key TEXT PRIMARY KEY, value BLOB NOT NULL)        the cluster state map
    history(seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL,  the event history; AUTOINCREMENT
            service TEXT, kind TEXT, message TEXT,           so a seq is never reused, even
            details BLOB)                                     after the oldest rows are deleted
    history_service_seq ON history(service, seq)
    meta(name TEXT PRIMARY KEY, value INTEGER NOT NULL)     "revision" and "term"

The database runs in WAL mode with ``synchronous=FULL``: a commit is fsynced before `commit`
returns and survives power loss. The stdlib `sqlite3` connection lives on one dedicated thread
(a single-worker executor) and is created, used and closed only there, so calls from the event
loop never block it and run one at a time in the order they were made.

One coordinator owns the file: `open` takes an exclusive ``flock`` on ``<path>.lock`` and keeps
it until `close` (or process exit); a second opener is refused with a ConfigError. The history is
bounded: a commit that records events deletes, in the same transaction, the rows more than
`history_max` seqs behind the newest.

Leadership: the lock is the leadership, so a handle leads from `open` to `close`; `resign`
steps down (commits then raise LeadershipLostError) and a later `campaign` leads again at once
under a new term (the persisted term raised by one), so the term only grows.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from failover import defaults
from failover.errors import (
    ConfigError,
    DiskFullError,
    LeadershipLostError,
    StorageError,
    StoreConflictError,
)
from failover.storage.atomic import fsync_dir
from failover.storage.modes import make_private_dir, open_private
from failover.storage.store import (
    CoordinatorInfo,
    HistoryEvent,
    HistoryRecord,
    Store,
    check_address,
    check_changes,
    check_event,
    check_history_limit,
    decode_details,
)

__all__ = ["SCHEMA_VERSION", "SqliteStore", "lock_path_for"]

SCHEMA_VERSION = 1
_BUSY_TIMEOUT_S = 5.0  # only an operator's read-only sqlite3 shell can contend with us

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS history (seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL, "
    "service TEXT, kind TEXT, message TEXT, details BLOB)",
    "CREATE INDEX IF NOT EXISTS history_service_seq ON history (service, seq)",
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)

_T = TypeVar("_T")


def lock_path_for(path: str | os.PathLike[str]) -> Path:
    """The lock file that marks the SQLite database at `path` as owned: ``<path>.lock``."""
    db = Path(path)
    return db.with_name(db.name + ".lock")


class SqliteStore(Store):
    """The cluster state in the SQLite file at `path` (its directory is created if missing).

    `history_max` bounds the history rows kept (tests make it small); `clock` gives the
    wall-clock time stamped on history events.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        history_max: int = defaults.HISTORY_EVENTS_MAX,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if history_max < 1:
            raise ConfigError(f"history_max is {history_max}: keep at least one history event")
        self.path = Path(path).absolute()
        self.lock_path = lock_path_for(self.path)
        self.description = f"sqlite://{self.path}"  # the path starts with "/": sqlite:///...
        self._history_max = history_max
        self._clock = clock
        self._executor: ThreadPoolExecutor | None = None
        self._revision = 0
        self._term = 0
        self._address = ""  # named by campaign
        self._leading = False
        self._lost: asyncio.Event | None = None  # set when this open's leadership ends
        # Touched only on the worker thread:
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None

    # --- Store -------------------------------------------------------------------------------

    @property
    def revision(self) -> int:
        """The revision as of this handle's last open, load or commit (commits count from 1)."""
        return self._revision

    @property
    def term(self) -> int:
        """The term of this open: one more than the previous open's, persisted."""
        return self._term

    async def open(self) -> None:
        """Takes the lock, opens (creating if missing) the database and upgrades its schema.

        Raises ConfigError when another coordinator holds the lock or the schema is newer than
        this code, StorageError when the file is not a usable SQLite database.
        """
        if self._executor is not None:
            raise RuntimeError(f"{self.description} is already open")
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        self._executor = executor
        try:
            self._revision, self._term = await asyncio.get_running_loop().run_in_executor(
                executor, self._open_sync
            )
            self._lost = asyncio.Event()
            self._leading = True  # the lock is the leadership
        except BaseException:
            # _open_sync cleans up after its own failures; this covers a cancelled open whose
            # _open_sync still runs: the close queues behind it on the one worker.
            self._executor = None
            executor.submit(self._close_sync)
            executor.shutdown(wait=False)
            raise

    async def close(self) -> None:
        """Closes the database and releases the lock, after the calls already made finish."""
        executor = self._executor
        if executor is None:
            return
        self._executor = None
        self._step_down()
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._close_sync)
        finally:
            executor.shutdown(wait=False)

    async def load(self) -> dict[str, bytes]:
        """Every key and value, read in one transaction."""
        state, revision = await self._run(self._load_sync)
        self._revision = max(self._revision, revision)
        return state

    async def commit(
        self,
        puts: Mapping[str, bytes],
        deletes: Iterable[str] = (),
        history: Sequence[HistoryEvent] = (),
        *,
        expect_revision: int | None = None,
    ) -> list[int]:
        """One transaction: check `expect_revision`, put, delete, record events, trim the
        history, raise the revision; fsynced before it returns. See `Store.commit`."""
        # Checked and copied here, on the loop, before anything is applied.
        put_items, delete_keys = check_changes(puts, deletes)
        if self._executor is not None and not self._leading:
            raise LeadershipLostError(
                f"{self.description}: this coordinator resigned its leadership (term "
                f"{self._term}); nothing was applied: campaign again before committing"
            )
        events = list(history)
        if not (put_items or delete_keys or events):
            if expect_revision is not None:
                # Nothing to apply (no new revision); still answer the compare-and-set.
                await self._run(self._check_revision_sync, expect_revision)
            return []
        seqs, revision = await self._run(
            self._commit_sync, put_items, delete_keys, events, expect_revision
        )
        self._revision = max(self._revision, revision)
        return seqs

    async def history(
        self, service: str | None = None, limit: int = 100, kind: str | None = None
    ) -> list[HistoryRecord]:
        """The newest `limit` matching events, newest last. See `Store.history`."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"history limit {limit!r} is not a count of events (an int >= 0)")
        if limit == 0:
            return []
        return await self._run(self._history_sync, service, limit, kind)

    # --- leadership ------------------------------------------------------------------------

    @property
    def leading(self) -> bool:
        """True from open until resign or close (the lock is the leadership)."""
        return self._leading

    async def campaign(self, address: str) -> int:
        """Leads at once (this handle holds the lock); after a resign, under a new term."""
        self._address = check_address(address)
        if not self._leading:
            self._term = await self._run(self._raise_term_sync)
            self._lost = asyncio.Event()
            self._leading = True
        return self._term

    async def wait_lost(self) -> None:
        """Returns when this handle resigns or closes; at once if it does not lead."""
        lost = self._lost
        if lost is None or not self._leading:
            return
        await lost.wait()

    async def resign(self) -> None:
        """Stops leading: commits raise LeadershipLostError until the next campaign."""
        self._step_down()

    async def leader(self) -> CoordinatorInfo | None:
        """This handle while it leads (no other can open the file), else None."""
        if not self._leading:
            return None
        return CoordinatorInfo(address=self._address, leader=True, term=self._term)

    async def coordinators(self) -> list[CoordinatorInfo]:
        """This handle, the only one on the file: [] once it resigned or closed."""
        info = await self.leader()
        return [info] if info is not None else []

    def _step_down(self) -> None:
        self._leading = False
        if self._lost is not None:
            self._lost.set()

    # --- the worker thread -------------------------------------------------------------------

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        executor = self._executor
        if executor is None:
            raise RuntimeError(f"{self.description} is not open: call open() first")
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    def _open_sync(self) -> tuple[int, int]:
        make_private_dir(self.path.parent)
        self._take_lock()
        try:
            existed = self.path.exists()
            if not existed:
                # Created 0600 here, not by SQLite (0644 less the umask); SQLite gives its
                # -wal and -shm files the database file's mode.
                os.close(open_private(self.path, os.O_RDWR | os.O_EXCL))
            conn = sqlite3.connect(
                self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=True
            )
            self._conn = conn
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise ConfigError(
                    f"{self.path}: SQLite cannot use write-ahead logging here (journal mode "
                    f"stays {mode!r}); put the coordinator's data dir on a local filesystem"
                )
            conn.execute("PRAGMA synchronous=FULL")
            if existed:
                # A damaged file is refused now, before the coordinator acts on what it read,
                # not at the first write (invariant 15).
                problems = [row[0] for row in conn.execute("PRAGMA integrity_check(8)")]
                if problems != ["ok"]:
                    raise sqlite3.DatabaseError("integrity check failed: "
                                                + "; ".join(map(str, problems)))
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ConfigError(
                    f"{self.path} has store schema version {version}, newer than this "
                    f"coordinator understands ({SCHEMA_VERSION}): run the newer "
                    "failover-coordinator that wrote it, or start from another data dir"
                )
            with _transaction(conn):
                if version < SCHEMA_VERSION:
                    for statement in _SCHEMA:
                        conn.execute(statement)
                term = _meta(conn, "term") + 1
                _set_meta(conn, "term", term)
                revision = _meta(conn, "revision")
            if not existed:
                fsync_dir(self.path.parent)  # the new file's name survives power loss too
            return revision, term
        except sqlite3.Error as exc:
            self._close_sync()
            raise StorageError(
                f"{self.path} is not a usable SQLite database ({exc}): restore it from a copy, "
                "or move it away to start the cluster state afresh"
            ) from exc
        except BaseException:
            self._close_sync()
            raise

    def _take_lock(self) -> None:
        fd = open_private(self.lock_path, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                pid = int(os.pread(fd, 32, 0).decode("ascii").strip())
                holder = f" (pid {pid})"
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise ConfigError(
                f"another coordinator{holder} uses this data dir ({self.path.parent}): it holds "
                f"the lock {self.lock_path}; stop it first, or give this coordinator its own "
                "--data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._lock_fd = fd

    def _close_sync(self) -> None:
        conn, self._conn = self._conn, None
        fd, self._lock_fd = self._lock_fd, None
        try:
            if conn is not None:
                conn.close()
        finally:
            if fd is not None:
                with contextlib.suppress(OSError):
                    fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"{self.description} is not open: call open() first")
        return self._conn

    def _load_sync(self) -> tuple[dict[str, bytes], int]:
        conn = self._connection()
        with _storage_errors(self.path), _transaction(conn, "BEGIN"):
            state = {
                key: bytes(value) for key, value in conn.execute("SELECT key, value FROM state")
            }
            return state, _meta(conn, "revision")

    def _check_revision_sync(self, expect_revision: int) -> None:
        conn = self._connection()
        with _storage_errors(self.path):
            revision = _meta(conn, "revision")
        if revision != expect_revision:
            raise StoreConflictError(expect_revision, revision)

    def _commit_sync(
        self,
        puts: list[tuple[str, bytes]],
        deletes: list[str],
        events: list[HistoryEvent],
        expect_revision: int | None,
    ) -> tuple[list[int], int]:
        conn = self._connection()
        # Keys and values were checked by `commit` (`check_changes`); an event is checked just
        # before it is written, so an invalid one rolls back the whole transaction.
        with _storage_errors(self.path), _transaction(conn):
            revision = _meta(conn, "revision")
            if expect_revision is not None and revision != expect_revision:
                raise StoreConflictError(expect_revision, revision)
            conn.executemany("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", puts)
            conn.executemany("DELETE FROM state WHERE key = ?", ((key,) for key in deletes))
            seqs: list[int] = []
            at = float(self._clock())
            for event in events:
                service, kind, message, details = check_event(event)
                cursor = conn.execute(
                    "INSERT INTO history (at, service, kind, message, details) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (at, service, kind, message, details),
                )
                assert cursor.lastrowid is not None
                seqs.append(cursor.lastrowid)
            if seqs:
                conn.execute("DELETE FROM history WHERE seq <= ?", (seqs[-1] - self._history_max,))
            revision += 1
            _set_meta(conn, "revision", revision)
        return seqs, revision

    def _raise_term_sync(self) -> int:
        conn = self._connection()
        with _storage_errors(self.path), _transaction(conn):
            term = _meta(conn, "term") + 1
            _set_meta(conn, "term", term)
        return term

    async def history_after(
        self, after_seq: int, service: str | None = None, limit: int = 100
    ) -> list[HistoryRecord]:
        """The oldest `limit` matching events after `after_seq`. See `Store.history_after`."""
        check_history_limit(limit)
        return await self._run(self._history_after_sync, max(0, int(after_seq)), service, limit)

    def _history_after_sync(
        self, after_seq: int, service: str | None, limit: int
    ) -> list[HistoryRecord]:
        where, params = "WHERE seq > ? ", [after_seq]
        if service is not None:
            where += "AND service = ? "
            params.append(service)
        sql = ("SELECT seq, at, service, kind, message, details FROM history "
               f"{where}ORDER BY seq ASC LIMIT ?")
        with _storage_errors(self.path):
            rows = self._connection().execute(sql, (*params, limit)).fetchall()
        return [_record(*row) for row in rows]

    def _history_sync(
        self, service: str | None, limit: int, kind: str | None
    ) -> list[HistoryRecord]:
        conn = self._connection()
        clauses: list[str] = []
        params: list[object] = []
        if service is not None:
            clauses.append("service = ?")
            params.append(service)
        if kind is not None:
            clauses.append("kind = ?")
            params.append(kind)
        where = f"WHERE {' AND '.join(clauses)} " if clauses else ""
        sql = (
            "SELECT seq, at, service, kind, message, details FROM history "
            f"{where}ORDER BY seq DESC LIMIT ?"
        )
        with _storage_errors(self.path):
            rows = conn.execute(sql, (*params, limit)).fetchall()
        return [_record(*row) for row in reversed(rows)]


def _record(seq: int, at: float | None, svc: str | None, knd: str | None,
            message: str | None, details: bytes | None) -> HistoryRecord:
    """One history row as a record."""
    return HistoryRecord(seq=seq, at=at if at is not None else 0.0, service=svc or "",
                         kind=knd or "", message=message or "", details=decode_details(details))


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> Iterator[None]:
    """Commits what the block did, or rolls all of it back if the block raises."""
    conn.execute(begin)
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):  # the first error is the one to report
                conn.execute("ROLLBACK")
        raise


@contextlib.contextmanager
def _storage_errors(path: Path) -> Iterator[None]:
    """Turns sqlite3 errors into this package's storage errors."""
    try:
        yield
    except sqlite3.Error as exc:
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            raise DiskFullError(
                f"{path}: no space left for the coordinator's store; nothing of the commit was "
                "applied: free space in its data dir"
            ) from exc
        raise StorageError(f"{path}: the coordinator's store failed: {exc}") from exc


def _meta(conn: sqlite3.Connection, name: str) -> int:
    row = conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
    return int(row[0]) if row else 0


def _set_meta(conn: sqlite3.Connection, name: str, value: int) -> None:
    conn.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, value))
