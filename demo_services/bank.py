"""`bank`: accounts with integer balances; transfers keep the total constant.

Requests (account names are non-empty str; amounts are int, never bool):

==============================================  =============================================
``{"op": "open", "account", "balance"}``        ``{"ok": True, "account", "balance"}``
``{"op": "transfer", "from", "to", "amount"}``  ``{"ok": True, "from_balance", "to_balance"}``
``{"op": "balance", "account"}`` (read-only)    ``{"ok": True, "account", "balance"}``
``{"op": "total"}`` (read-only)                 ``{"ok": True, "total", "accounts"}``
``{"op": "read_all"}`` (read-only)              ``{"ok": True, "balances": {...}, "total"}``
==============================================  =============================================

``read_all`` is one consistent cut of every balance (checkers use it after each fault); it
grows with the number of accounts, so it is meant for tests and audits, not hot paths.

Refusals (RequestRejected): reopening an account, an unknown account, a transfer to the same
account, an overdraw, and an open that would take the total past the int64 range (kept so that
every balance and total stays msgpack-able).

The state is a plain dict; a snapshot is one msgpack document of the sorted accounts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

import msgpack

from failover import defaults
from failover.errors import InvalidRequest, RequestRejected, StateCorruptError
from failover.service import ServiceKind, require, require_int, require_op

__all__ = ["ACCOUNT_BYTES_MAX", "BALANCE_MAX", "BankService"]

ACCOUNT_BYTES_MAX = 256
BALANCE_MAX = (1 << 63) - 1  # int64: msgpack's signed range, so totals stay encodable

_SNAP_MAGIC = "failover.bank"
_SNAP_FORMAT = 1

_OPS = frozenset({"open", "transfer", "balance", "total", "read_all"})


def _account(request: dict, field: str) -> str:
    name: str = require(request, field, str, max_bytes=ACCOUNT_BYTES_MAX)
    if not name:
        raise InvalidRequest(f"field {field!r} of {request['op']!r} request must not be empty")
    return name


class BankService(ServiceKind):
    """The `bank` kind: account name -> balance, with a total invariant under transfers."""

    name = "bank"
    version = 1
    read_only_ops = frozenset({"balance", "total", "read_all"})

    def __init__(self) -> None:
        """No accounts."""
        self._accounts: dict[str, int] = {}
        self._total = 0  # kept alongside, so `total` is O(1) and the invariant is checkable

    def apply(self, command: dict) -> dict:
        """Apply open or transfer (or answer a read-only op); see the module doc."""
        op = require_op(command, _OPS)
        if op == "open":
            return self._open(command)
        if op == "transfer":
            return self._transfer(command)
        return self._read(op, command)

    def query(self, request: dict) -> dict:
        """Answer balance or total."""
        op = require_op(request, _OPS)
        if op not in self.read_only_ops:
            raise InvalidRequest(f"op {op!r} changes state; send it as a write, not a query")
        return self._read(op, request)

    def snapshot(self) -> Iterator[bytes]:
        """One msgpack document, cut into chunks of SNAPSHOT_CHUNK_BYTES."""
        # Serialized now, so that later applies cannot change the chunks.
        data = self._encode()
        step = defaults.SNAPSHOT_CHUNK_BYTES
        return iter([data[start : start + step] for start in range(0, len(data), step)])

    def restore(self, chunks: Iterable[bytes]) -> None:
        """Replace the state by a snapshot's; StateCorruptError leaves the old state in place."""
        data = b"".join(chunks)
        try:
            doc = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception as exc:  # msgpack raises several unrelated types on bad input
            raise StateCorruptError(f"bank snapshot does not decode: {exc}") from exc
        if (
            not isinstance(doc, list)
            or len(doc) != 3
            or doc[0] != _SNAP_MAGIC
            or not isinstance(doc[1], int)
            or not 1 <= doc[1] <= self.version
            or not isinstance(doc[2], list)
        ):
            raise StateCorruptError("not a bank snapshot of a known format")
        accounts: dict[str, int] = {}
        for item in doc[2]:
            if (
                not isinstance(item, list)
                or len(item) != 2
                or not isinstance(item[0], str)
                or not item[0]
                or type(item[1]) is not int
                or not 0 <= item[1] <= BALANCE_MAX
                or item[0] in accounts
            ):
                raise StateCorruptError(f"bank snapshot holds a bad account entry {item!r:.80}")
            accounts[item[0]] = item[1]
        total = sum(accounts.values())
        if total > BALANCE_MAX:
            raise StateCorruptError(f"bank snapshot total {total} is out of range")
        self._accounts = accounts
        self._total = total

    def digest(self) -> bytes:
        """blake2b-256 of the accounts in name order."""
        return hashlib.blake2b(self._encode(), digest_size=32, person=b"failover.bank").digest()

    # --- ops -----------------------------------------------------------------------------

    def _encode(self) -> bytes:
        # Sorted, so that equal states encode (and digest) alike whatever the insertion order.
        items = [[name, self._accounts[name]] for name in sorted(self._accounts)]
        return msgpack.packb([_SNAP_MAGIC, _SNAP_FORMAT, items], use_bin_type=True)

    def _existing(self, name: str) -> int:
        balance = self._accounts.get(name)
        if balance is None:
            raise RequestRejected(f"no account named {name!r}; open it first")
        return balance

    def _open(self, command: dict) -> dict:
        name = _account(command, "account")
        balance = require_int(command, "balance", minimum=0, maximum=BALANCE_MAX)
        if name in self._accounts:
            raise RequestRejected(f"account {name!r} is already open; it cannot be reopened")
        if self._total + balance > BALANCE_MAX:
            raise RequestRejected(
                f"opening {name!r} with {balance} would take the bank's total past {BALANCE_MAX}"
            )
        self._accounts[name] = balance
        self._total += balance
        return {"ok": True, "account": name, "balance": balance}

    def _transfer(self, command: dict) -> dict:
        source = _account(command, "from")
        target = _account(command, "to")
        amount = require_int(command, "amount", minimum=1, maximum=BALANCE_MAX)
        if source == target:
            raise RequestRejected(f"transfer from {source!r} to itself is refused")
        source_balance = self._existing(source)
        target_balance = self._existing(target)
        if amount > source_balance:
            raise RequestRejected(
                f"overdraw: account {source!r} holds {source_balance}, the transfer needs {amount}"
            )
        self._accounts[source] = source_balance - amount
        self._accounts[target] = target_balance + amount
        return {
            "ok": True,
            "from_balance": source_balance - amount,
            "to_balance": target_balance + amount,
        }

    def _read(self, op: str, request: dict) -> dict:
        if op == "balance":
            name = _account(request, "account")
            return {"ok": True, "account": name, "balance": self._existing(name)}
        if op == "read_all":
            return {"ok": True, "balances": dict(self._accounts), "total": self._total}
        return {"ok": True, "total": self._total, "accounts": len(self._accounts)}
