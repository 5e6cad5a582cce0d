import pytest

from failover.errors import ConfigError
from failover.net.address import Address, parse_address, parse_address_list


def test_parses_ipv4_and_ipv6() -> None:
    assert parse_address("127.0.0.1:7100") == Address("127.0.0.1", 7100)
    assert str(parse_address("[::1]:80")) == "[::1]:80"
    assert parse_address_list("a:1, b:2") == [Address("a", 1), Address("b", 2)]


@pytest.mark.parametrize("bad", ["", "host", ":80", "h:x", "h:0", "h:70000", "::1:80", "[::1]"])
def test_rejects_bad_addresses_with_a_message(bad: str) -> None:
    with pytest.raises(ConfigError, match="address"):
        parse_address(bad)


def test_empty_list_is_refused() -> None:
    with pytest.raises(ConfigError, match="empty"):
        parse_address_list(" , ")
