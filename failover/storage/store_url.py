"""A coordinator's store named by a URL (``--store``): the one place that knows every kind of
store, so that store.py (the interface) and each store know none of the others.
"""

from __future__ import annotations

import os
from pathlib import Path

from failover import defaults
from failover.errors import ConfigError
from failover.storage.etcd_store import EtcdStore, EtcdTls, parse_endpoints
from failover.storage.sqlite_store import SqliteStore
from failover.storage.store import Store

__all__ = ["DEFAULT_DB_NAME", "open_store"]

DEFAULT_DB_NAME = "cluster.db"

_ACCEPTED_FORMS = (
    "leave it unset for sqlite:///DATA-DIR/cluster.db, or give sqlite:///ABSOLUTE/PATH, or "
    "sqlite://PATH (relative to the data dir), or etcd://HOST:PORT[,HOST:PORT...] for etcd"
)


def open_store(
    url: str | None,
    data_dir: str | os.PathLike[str],
    *,
    cluster: str = "default",
    etcd_tls: EtcdTls | None = None,
    leader_ttl_ms: int = defaults.LEADER_TTL_MS,
) -> Store:
    """The store named by `url`, not yet opened (no I/O happens here).

    - None: ``sqlite:///<data_dir>/cluster.db``;
    - ``sqlite:///ABS/PATH``: the SQLite file at that absolute path;
    - ``sqlite://REL/PATH``: the SQLite file at that path relative to `data_dir`;
    - ``etcd://HOST:PORT[,HOST:PORT...]``: etcd (`failover.storage.etcd_store`), the keys under
      ``/failover/<cluster>/``, over TLS when `etcd_tls` (an `EtcdTls`) is given, the leader's
      lease `leader_ttl_ms`;
    - anything else: ConfigError listing the accepted forms.
    """
    base = Path(data_dir).absolute()
    if url is None:
        return SqliteStore(base / DEFAULT_DB_NAME)
    if not isinstance(url, str):
        raise ConfigError(f"store URL {url!r} is not text: {_ACCEPTED_FORMS}")
    text = url.strip()
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if sep and scheme == "etcd":
        if etcd_tls is not None and not isinstance(etcd_tls, EtcdTls):
            raise ConfigError(f"etcd_tls is a {type(etcd_tls).__name__}, not EtcdTls")
        if not rest or "/" in rest or "?" in rest:
            raise ConfigError(f"store URL {url!r} names no etcd endpoints: {_ACCEPTED_FORMS}")
        return EtcdStore(parse_endpoints(rest), cluster=cluster, tls=etcd_tls,
                         leader_ttl_ms=leader_ttl_ms)
    if not sep or scheme != "sqlite":
        raise ConfigError(f"store URL {url!r} is not understood: {_ACCEPTED_FORMS}")
    if not rest or rest.endswith("/") or rest in (".", "..") or "\x00" in rest:
        raise ConfigError(f"store URL {url!r} names no database file: {_ACCEPTED_FORMS}")
    path = Path(rest)
    return SqliteStore(path if path.is_absolute() else base / path)
