"""The control plane's fast address parser agrees with ipaddress, remembers, and stays bounded."""

import ipaddress

import pytest

from hdslb.net import addr


@pytest.mark.parametrize("s", ["10.0.0.1", "0.0.0.0", "255.255.255.255", "2001:db8::1", "::", "::ffff:10.0.0.1",
                               "2001:DB8::A"])
def test_same_answer_as_ipaddress(s):
    assert addr.ip_address(s) == ipaddress.ip_address(s)
    assert type(addr.ip_address(s)) is type(ipaddress.ip_address(s))


@pytest.mark.parametrize("s", ["010.0.0.1", "10.0.0", "10.0.0.256", "1.2.3.4 ", "", "x", "2001:db8:::1", "1.2.3.4/24"])
def test_refuses_what_ipaddress_refuses(s):
    with pytest.raises(ValueError):
        ipaddress.ip_address(s)
    with pytest.raises(ValueError):
        addr.ip_address(s)


@pytest.mark.parametrize("s", ["fe80::1%eth0", "2001:db8::1%2", "2001:db8::1%"])
def test_refuses_scoped_ipv6_addresses(s):
    """ipaddress takes a %zone; the fast path keys on the address bytes alone, so two services or real servers
    differing only in their zone would share (and the delete of one would remove) a single map entry."""
    with pytest.raises(ValueError, match="scoped IPv6"):
        addr.ip_address(s)
    with pytest.raises(ValueError, match="scoped IPv6"):
        addr.ip_address(ipaddress.ip_address("fe80::1%eth0") if s == "fe80::1%eth0" else s)


def test_non_strings_as_ipaddress_does():
    assert addr.ip_address(167772161) == ipaddress.IPv4Address("10.0.0.1")
    with pytest.raises(ValueError):
        addr.ip_address(None)


def test_remembered_and_bounded(monkeypatch):
    monkeypatch.setattr(addr, "_MEMO", {})
    monkeypatch.setattr(addr, "_MEMO_MAX", 4)
    a = addr.ip_address("10.9.9.9")
    assert addr.ip_address("10.9.9.9") is a
    for i in range(10):
        addr.ip_address(f"10.0.0.{i}")
    assert len(addr._MEMO) <= 4


@pytest.mark.parametrize("s", ["10.0.0.1", "0.0.0.0", "255.255.255.255", "2001:db8::1", "::ffff:10.0.0.1", "::"])
def test_ip_str_is_str(s):
    a = ipaddress.ip_address(s)
    assert addr.ip_str(a) == str(a)
