"""`failoverctl top` (issue 17 item 6): one frame drawn from status and history documents,
and the write rates from successive reads."""

from __future__ import annotations

from rich.console import Console

from failover.cli.top import WriteRates, top_frame


def _replica(host: str, role: str, commit: int, lag: int = 0, in_sync: bool = True) -> dict:
    return {"host_id": host, "role": role, "durable_index": commit, "commit_index": commit,
            "applied_index": commit, "lag_entries": lag, "in_sync": in_sync}


STATUS = {
    "hosts": [{"host_id": h, "alive": h != "host3"} for h in ("host1", "host2", "host3")],
    "coordinators": [{"address": "127.0.0.1:7000", "leader": True, "term": 3}],
    "services": [
        {"name": "kv1", "kind": "kv", "mode": "sync", "epoch": 4, "desired_replicas": 3,
         "placement": "worst-fit", "unplaced": "",
         "replicas": [_replica("host2", "primary", 500), _replica("host1", "duplica", 497, 3),
                      _replica("host3", "building", 0, 0, False)]},
        {"name": "bank", "kind": "bank", "mode": "sync", "epoch": 1, "desired_replicas": 2,
         "placement": "worst-fit", "unplaced": "", "replicas": []},
    ],
}
EVENTS = [
    {"seq": 7, "at": 1000.0, "service": "kv1", "kind": "failover",
     "message": "kv1: host1 failed; host2 promoted at epoch 4", "details": {}},
    {"seq": 8, "at": 1001.0, "service": "", "kind": "host", "message": "host host3 is back",
     "details": {}},
]


def test_one_frame_shows_services_roles_lag_rates_and_events() -> None:
    console = Console(record=True, width=180, color_system=None)
    console.print(top_frame(STATUS, EVENTS, {"kv1": 1234.4}, now_s=1010.0))
    text = console.export_text()
    assert "hosts 2/3 alive" in text and "services 2" in text and "127.0.0.1:7000" in text
    row = next(line for line in text.splitlines() if line.lstrip("│ ").startswith("kv1"))
    for cell in ("kv", "4", "host2", "host1, host3 (building)", "1/2", "3", "1,234",
                 "failover 10s ago"):
        assert cell in row, (cell, row)
    bank = next(line for line in text.splitlines() if line.lstrip("│ ").startswith("bank"))
    assert "none" in bank
    assert text.index("host host3 is back") < text.index("kv1: host1 failed")  # newest first


def test_write_rates_come_from_the_primary_commit_index() -> None:
    rates = WriteRates()
    assert rates.update(STATUS["services"], 10.0) == {}
    later = [{**STATUS["services"][0], "replicas": [_replica("host2", "primary", 700)]}]
    assert rates.update(later, 12.0) == {"kv1": 100.0}
    # After a failover the new primary's index may be lower: no rate, not a negative one.
    back = [{**STATUS["services"][0], "replicas": [_replica("host1", "primary", 650)]}]
    assert rates.update(back, 13.0) == {}
