"""A daemon whose listen address another process holds is refused at once, in one line with
exit 2 (`channels.check_listen_free`): under its supervisor, an agent whose child could not
bind was started again five times and gave up with exit 1 seconds later."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from failover.agent.main import main
from failover.errors import ConfigError
from failover.net import channels
from failover.processes import free_port


@pytest.fixture
def busy() -> Iterator[int]:
    """A port another process (here, a socket of this one) listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", free_port()))
        listener.listen()
        yield int(listener.getsockname()[1])


def test_an_address_another_process_listens_on_is_refused(busy: int) -> None:
    with pytest.raises(ConfigError, match="another process listens there"):
        channels.check_listen_free(f"127.0.0.1:{busy}")
    with pytest.raises(ConfigError, match="another process listens there"):
        channels.check_listen_free(f"localhost:{busy}")


def test_a_free_address_and_port_zero_pass() -> None:
    channels.check_listen_free(f"127.0.0.1:{free_port()}")
    channels.check_listen_free("127.0.0.1:0")


def test_a_port_left_by_a_closed_connection_passes() -> None:
    # TIME_WAIT after a connection closed does not keep a daemon from binding, nor this.
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            accepted, _ = listener.accept()
            accepted.close()  # the server side closes first: its side waits in TIME_WAIT
            client.recv(1)
    channels.check_listen_free(f"127.0.0.1:{port}")


def test_the_agent_refuses_a_taken_port_at_once_with_exit_2_and_one_line(
        busy: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    with pytest.raises(SystemExit) as exited:
        main(["--host-id", "h1", "--listen", f"127.0.0.1:{busy}", "--data-dir",
              str(tmp_path / "data")])
    assert exited.value.code == 2
    assert time.monotonic() - started < 5  # no child started, none restarted
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot listen on 127.0.0.1:{busy}" in err[0], err
    assert not (tmp_path / "data").exists()  # nothing was made


def test_the_coordinator_refuses_a_taken_port_with_exit_2_and_one_line(
        busy: int, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "failover.coordinator", "--listen", f"127.0.0.1:{busy}",
         "--data-dir", str(tmp_path / "c")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and f"cannot listen on 127.0.0.1:{busy}" in err[0], err
