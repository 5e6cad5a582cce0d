from pathlib import Path

import pytest

from failover.agent.config import AgentConfig, load_toml
from failover.agent.main import main
from failover.errors import ConfigError


def test_toml_and_flags_build_a_valid_config(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('host_id = "h1"\nlisten = "127.0.0.1:7101"\ndata-dir = "/tmp/x"\n'
                    'coordinator = "127.0.0.1:7000,127.0.0.1:7001"\nfsync_policy = "always"\n'
                    "snapshot_every_entries = 0\n")
    config = AgentConfig.from_mapping(load_toml(path))
    assert config.host_id == "h1" and config.address == "127.0.0.1:7101"
    assert [str(a) for a in config.coordinators] == ["127.0.0.1:7000", "127.0.0.1:7001"]
    assert config.fsync_policy == "always" and config.snapshot_every_entries == 0


@pytest.mark.parametrize(("raw", "message"), [
    ({"listen": "127.0.0.1:1", "data_dir": "d"}, "host_id is required"),
    ({"host_id": "h", "listen": "nope", "data_dir": "d"}, "HOST:PORT"),
    ({"host_id": "h", "listen": "a:1", "data_dir": "d", "fsync_policy": "sometimes"},
     "always, batch, never"),
    ({"host_id": "h", "listen": "a:1", "data_dir": "d", "heartbeat_ms": 0}, "heartbeat_ms"),
    ({"host_id": "h", "listen": "a:1", "data_dir": "d", "colour": "red"}, "unknown agent"),
    ({"host_id": "h/../x", "listen": "a:1", "data_dir": "d"}, "host_id"),
])
def test_bad_config_is_refused_with_a_plain_message(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AgentConfig.from_mapping(raw)


def test_bad_flags_exit_2_with_one_line(capsys: pytest.CaptureFixture[str],
                                        tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--host-id", "h", "--listen", "127.0.0.1:99999", "--data-dir", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "port must be" in err[0]
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(tmp_path / "missing.toml")])
    assert exc.value.code == 2
