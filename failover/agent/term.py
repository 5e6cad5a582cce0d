"""The highest coordinator term this agent has seen, kept in its data dir (issue 15).

Several coordinators may run; only the leader acts, and each new leader has a higher term
(etcd: the leader key's create revision; SQLite: raised at each open). A leader that was
deposed but does not know it yet (paused, partitioned) may still send control calls: the agent
refuses every change stamped with a term older than the highest it has seen, so such a call
changes nothing (`failover.net.authorization.TermFence`). The term is learnt from accepted
control calls and from the coordinator's Register and Heartbeat replies, and written to disk
(0600, replaced atomically) before the call that raised it runs, so a restarted agent still
refuses the deposed coordinator.
"""

from __future__ import annotations

import logging
from pathlib import Path

from failover.errors import StaleCoordinatorTermError, StorageError
from failover.storage.atomic import read_counter, write_atomic

log = logging.getLogger(__name__)

TERM_FILE = "coordinator-term"
# A term is a uint64 on the wire; its decimal text is at most 20 digits.
TERM_MAX = (1 << 64) - 1
_TERM_FILE_BYTES_MAX = 64


class CoordinatorTerm:
    """The highest coordinator term seen, in memory and in `data_dir / TERM_FILE`."""

    def __init__(self, data_dir: str | Path) -> None:
        self.path = Path(data_dir) / TERM_FILE
        self._seen = _read(self.path)
        self._last_refused = -1  # the term of the last refusal logged

    @property
    def seen(self) -> int:
        """The highest term seen (0: none yet)."""
        return self._seen

    def check(self, term: int) -> None:
        """Raises StaleCoordinatorTermError if `term` is older than the highest seen."""
        if term < self._seen:
            if term != self._last_refused:  # once per term: a deposed leader retries
                self._last_refused = term
                log.warning(
                    "refused a control call at coordinator term %d: this agent has seen term "
                    "%d, so that coordinator was deposed. Only if the coordinators' store was "
                    "rebuilt from nothing (its terms started over) delete %s on every agent to "
                    "accept the new coordinators", term, self._seen, self.path)
            raise StaleCoordinatorTermError(term, self._seen)

    def observe(self, term: int) -> bool:
        """Records `term` if it is higher than any seen (durably, before returning); True if
        it was. Raises StorageError if the file cannot be written (the term is then kept in
        memory only, so this process still refuses older ones)."""
        if not 0 <= term <= TERM_MAX:
            raise ValueError(f"coordinator term {term} is outside 0..{TERM_MAX}")
        if term <= self._seen:
            return False
        previous, self._seen = self._seen, term
        log.info("coordinator term %d (was %d): calls from older terms are refused", term,
                 previous)
        try:
            write_atomic(self.path, f"{term}\n".encode())
        except OSError as exc:
            raise StorageError(
                f"cannot record coordinator term {term} in {self.path}: {exc}; a restart "
                "would forget it: free space or fix the data dir's permissions") from exc
        return True

    def admit(self, term: int) -> None:
        """`check`, then `observe`: what a control call that changes something goes through."""
        self.check(term)
        self.observe(term)


def _read(path: Path) -> int:
    try:
        value = read_counter(path, _TERM_FILE_BYTES_MAX)
    except OSError as exc:
        raise StorageError(f"cannot read the coordinator term file {path}: {exc}; fix its "
                           "permissions (it belongs to the agent's user, mode 0600)") from exc
    if isinstance(value, str) or value > TERM_MAX:
        raise StorageError(
            f"the coordinator term file {path} holds {str(value)!r}, not a term: it records "
            "the highest coordinator term this agent has seen, so that a deposed coordinator "
            "is refused; write the current term into it (`failoverctl status` shows it) or "
            "delete it to accept any coordinator's next call")
    return value
