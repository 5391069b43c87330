"""dpip shim: argv -> control requests, reply data -> DPVS dpip text, and main()'s exit codes.

Expected layouts are DPVS tools/dpip printf formats (addr.c addr_dump, route.c route4_dump/route6_dump,
neigh.c neigh_dump, link.c dump_nic_*) written out by hand, trailing spaces included.
"""

import errno

import pytest

from cli import dpip
from cli.common import UsageError
from hdslb.ctl.client import DaemonUnreachable
from hdslb.errors import HdslbError


def requests(*argv):
    return dpip.parse(list(argv)).requests


# ------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("argv, expected", [
    (["addr", "add", "192.168.100.100/24", "dev", "veth-lb0"],
     ("addr.add", {"addr": "192.168.100.100", "prefixlen": 24, "ifname": "veth-lb0", "scope": None,
                   "sapool": False})),
    (["addr", "add", "192.168.100.200", "dev", "veth-lb0", "sapool", "scope", "host"],
     ("addr.add", {"addr": "192.168.100.200", "prefixlen": 32, "ifname": "veth-lb0", "scope": "host",
                   "sapool": True})),
    (["-6", "addr", "add", "2001:db8::1/64", "dev", "eth0"],
     ("addr.add", {"addr": "2001:db8::1", "prefixlen": 64, "ifname": "eth0", "scope": None, "sapool": False})),
    (["addr", "add", "192.168.100.100/24", "dev", "veth-lb0", "valid_lft", "forever", "prefered_lft", "forever"],
     ("addr.add", {"addr": "192.168.100.100", "prefixlen": 24, "ifname": "veth-lb0", "scope": None,
                   "sapool": False})),
    (["addr", "del", "192.168.100.100/24", "dev", "veth-lb0"],
     ("addr.del", {"addr": "192.168.100.100", "prefixlen": 24, "ifname": "veth-lb0"})),
    (["addr", "del", "192.168.100.100", "dev", "veth-lb0"],  # no length: whichever the address has
     ("addr.del", {"addr": "192.168.100.100", "ifname": "veth-lb0"})),
    (["addr", "flush", "dev", "veth-lb0"], ("addr.flush", {"ifname": "veth-lb0"})),
    (["addr", "show"], ("addr.list", {"ifname": None, "af": None})),
    (["-6", "addr", "list", "dev", "eth0"], ("addr.list", {"ifname": "eth0", "af": 6})),
    (["route", "add", "10.0.0.0/16", "dev", "dpdk1"],
     ("route.add", {"af": 4, "prefix": "10.0.0.0", "prefixlen": 16, "via": None, "src": None, "ifname": "dpdk1",
                    "mtu": None, "metric": None, "scope": None})),
    (["route", "add", "172.0.0.0/16", "via", "172.0.0.3", "dev", "dpdk0", "src", "172.0.0.1", "mtu", "1400",
      "metric", "10", "scope", "global"],
     ("route.add", {"af": 4, "prefix": "172.0.0.0", "prefixlen": 16, "via": "172.0.0.3", "src": "172.0.0.1",
                    "ifname": "dpdk0", "mtu": 1400, "metric": 10, "scope": "global"})),
    (["route", "add", "default", "via", "10.0.0.1", "dev", "dpdk0"],
     ("route.add", {"af": 4, "prefix": "0.0.0.0", "prefixlen": 0, "via": "10.0.0.1", "src": None,
                    "ifname": "dpdk0", "mtu": None, "metric": None, "scope": None})),
    (["-6", "route", "add", "default", "via", "2001:db8::ff", "dev", "dpdk0"],
     ("route.add", {"af": 6, "prefix": "::", "prefixlen": 0, "via": "2001:db8::ff", "src": None,
                    "ifname": "dpdk0", "mtu": None, "metric": None, "scope": None})),
    # DPVS takes default's family from the gateway (or source) when no -4/-6 names it
    (["route", "add", "default", "via", "2001:db8::ff", "dev", "dpdk0"],
     ("route.add", {"af": 6, "prefix": "::", "prefixlen": 0, "via": "2001:db8::ff", "src": None,
                    "ifname": "dpdk0", "mtu": None, "metric": None, "scope": None})),
    (["route", "del", "default", "src", "2001:db8::1"],
     ("route.del", {"af": 6, "prefix": "::", "prefixlen": 0, "via": None, "src": "2001:db8::1",
                    "ifname": None, "mtu": None, "metric": None, "scope": None})),
    (["route", "add", "10.1.1.1", "dev", "dpdk0", "scope", "kni_host"],
     ("route.add", {"af": 4, "prefix": "10.1.1.1", "prefixlen": 32, "via": None, "src": None, "ifname": "dpdk0",
                    "mtu": None, "metric": None, "scope": "kni_host"})),
    # DPVS's local (= scope host); onlink, proto and tos 0 change nothing (DPVS keeps none of them either)
    (["route", "add", "10.1.1.1", "dev", "dpdk0", "local"],
     ("route.add", {"af": 4, "prefix": "10.1.1.1", "prefixlen": 32, "via": None, "src": None, "ifname": "dpdk0",
                    "mtu": None, "metric": None, "scope": "host"})),
    (["route", "add", "10.0.0.0/16", "dev", "dpdk1", "onlink", "proto", "static", "tos", "0"],
     ("route.add", {"af": 4, "prefix": "10.0.0.0", "prefixlen": 16, "via": None, "src": None, "ifname": "dpdk1",
                    "mtu": None, "metric": None, "scope": None})),
    (["route", "change", "172.0.0.0/16", "via", "172.0.0.1", "dev", "dpdk0"],
     ("route.set", {"af": 4, "prefix": "172.0.0.0", "prefixlen": 16, "via": "172.0.0.1", "src": None,
                    "ifname": "dpdk0", "mtu": None, "metric": None, "scope": None})),
    # DPVS deletes by prefix alone
    (["route", "del", "172.0.0.0/16"],
     ("route.del", {"af": 4, "prefix": "172.0.0.0", "prefixlen": 16, "via": None, "src": None, "ifname": None,
                    "mtu": None, "metric": None, "scope": None})),
    (["route", "show"], ("route.list", {"af": 4})),
    (["-6", "route", "show"], ("route.list", {"af": 6})),
    (["route", "show", "dev", "dpdk0"], ("route.list", {"af": 4, "ifname": "dpdk0"})),  # DPVS filters by device
    (["--family", "inet6", "route", "flush"], ("route.flush", {"af": 6})),
    (["neigh", "add", "192.168.100.2", "lladdr", "52:54:0:AA:bb:cc", "dev", "veth-lb0"],
     ("neigh.add", {"addr": "192.168.100.2", "lladdr": "52:54:00:aa:bb:cc", "ifname": "veth-lb0"})),
    (["neigh", "del", "192.168.100.2", "lladdr", "52:54:00:aa:bb:cc", "dev", "veth-lb0"],
     ("neigh.del", {"addr": "192.168.100.2", "ifname": "veth-lb0"})),
    (["neigh", "del", "2001:db8::2"], ("neigh.del", {"addr": "2001:db8::2", "ifname": None})),
    (["neigh", "show"], ("neigh.list", {"ifname": None, "af": None})),
    (["-4", "neigh", "show", "dev", "veth-lb0"], ("neigh.list", {"ifname": "veth-lb0", "af": 4})),
    (["link", "show"], ("link.list", {"ifname": None})),
    (["link", "show", "veth-lb0"], ("link.list", {"ifname": "veth-lb0"})),
])
def test_parse_requests(argv, expected):
    assert requests(*argv) == [expected]


def test_global_options_anywhere():
    for argv in (["-s", "link", "show"], ["link", "show", "-s"], ["link", "-s", "show"], ["--stats", "link", "show"]):
        inv = dpip.parse(argv)
        assert inv.stats and inv.requests == [("link.list", {"ifname": None})]
    assert dpip.parse(["-6s", "addr", "show"]).requests == [("addr.list", {"ifname": None, "af": 6})]
    # DPVS's -v and -C only change what a show prints: taken
    for argv in (["-v", "addr", "show"], ["-sv", "addr", "show"], ["-C", "addr", "show"], ["--verbose", "addr", "show"],
                 ["--color", "addr", "show"]):
        assert dpip.parse(argv).requests == [("addr.list", {"ifname": None, "af": None})]
    inv = dpip.parse(["-s", "link", "show", "--interval=2", "--count", "3"])
    assert (inv.interval, inv.count) == (2.0, 3)


def test_help_and_version_send_nothing():
    assert dpip.parse(["-h"]).text == dpip.USAGE
    assert dpip.parse(["route", "help"]).text == dpip.OBJECT_HELP["route"]
    assert dpip.parse(["-h", "neigh"]).text == dpip.OBJECT_HELP["neigh"]
    assert dpip.parse(["-V"]).text.startswith("dpip-hdslb-")
    assert all(not dpip.parse(a).requests for a in (["-h"], ["route", "help"], ["-V"]))


@pytest.mark.parametrize("argv, message", [
    (["route", "show", "-x"], "dpip: invalid option: -x"),
    (["--bogus", "route", "show"], "dpip: invalid option: --bogus"),
    (["--family=ipx", "route", "show"], "dpip: invalid family"),
    (["bogus", "show"], "dpip: invalid object, use `-h' for help."),
    # DPVS objects and commands hdslb has no counterpart for: refused with the reason
    (["vlan", "add", "dev", "dpdk0", "id", "102"], "dpip: vlan is not supported: hdslb creates no devices; a VLAN "
     "interface is the kernel's (ip link add ... type vlan), attached by naming it in hdslb.conf"),
    (["tunnel", "show"], "dpip: tunnel is not supported: hdslb creates no devices; a tunnel interface is the "
     "kernel's (ip link / ip tunnel), and TUNNEL forwarding (ipvsadm -i) encapsulates without one"),
    (["eal-mem", "show"], "dpip: eal-mem is not supported: there is no DPDK (EAL) memory: the fast path is XDP"),
    (["addr", "frob"], "dpip: invalid command frob"),
    (["link", "set", "eth0", "promisc", "on"], "dpip: link set is not supported: the interface is the kernel's "
     "(ip link set DEV promisc|up|down|address ...); hdslb has no forward2kni, bonding or tc of its own"),
    (["link", "show", "bond0", "status"], "dpip: link show status is not supported: hdslb has no bonding devices "
     "of its own (a kernel bond is shown as any interface)"),
    (["link", "show", "cpux"], "dpip: invalid CPU-NAME 'cpux' (cpu or cpuN)"),
    (["addr", "set", "10.0.0.1/24", "dev", "eth0"],
     "dpip: addr set is not supported: delete the address and add it again with the new scope or flags"),
    (["neigh", "flush"], "dpip: neigh flush is not supported: use: add, del, show"),
    (["-F", "addr", "flush", "dev", "eth0"], "dpip: -F (force) is not taken: no command here has a forced form"),
    (["--force", "route", "flush"], "dpip: -F (force) is not taken: no command here has a forced form"),
    (["addr", "add", "dev", "eth0"], "dpip: missing IFADDR"),
    (["addr", "add", "10.0.0.1/24"], "dpip: no device specified."),
    (["addr", "add", "10.0.0.256/24", "dev", "eth0"], "dpip: invalid IFADDR '10.0.0.256/24'"),
    (["addr", "add", "10.0.0.1/33", "dev", "eth0"], "dpip: invalid IFADDR '10.0.0.1/33'"),
    (["-6", "addr", "add", "10.0.0.1/24", "dev", "eth0"], "dpip: IFADDR 10.0.0.1/24 is not an IPv6 address"),
    (["addr", "add", "10.0.0.1/24", "dev", "eth0", "scope", "universe"],
     "dpip: invalid scope 'universe' (host | link | global)"),
    (["addr", "add", "10.0.0.1/24", "dev", "eth0", "broadcast", "10.0.0.255"],
     "dpip: broadcast is not supported: hdslb keeps no broadcast address"),
    (["addr", "add", "10.0.0.1/24", "dev", "eth0", "valid_lft", "3600"],
     "dpip: valid_lft 3600 is not supported: addresses stay until deleted (forever)"),
    (["addr", "add", "10.0.0.1/24", "dev", "eth0", "prefered_lft", "60"],
     "dpip: prefered_lft 60 is not supported: addresses stay until deleted (forever)"),
    (["addr", "del", "10.0.0.1/24", "dev", "eth0", "sapool"], "dpip: unexpected argument 'sapool'"),
    (["addr", "flush"], "dpip: no device specified."),
    (["addr", "show", "10.0.0.1"], "dpip: unexpected argument '10.0.0.1'"),
    (["addr", "show", "dev"], "dpip: missing argument for 'dev'"),
    (["route", "add", "via", "10.0.0.1", "dev", "eth0"], "dpip: missing prefix"),
    (["route", "add", "10.0.0.1/16", "dev", "eth0"], "dpip: invalid prefix '10.0.0.1/16'"),
    (["route", "add", "10.0.0.0/16"], "dpip: no device specified."),
    (["-6", "route", "add", "10.0.0.0/16", "dev", "eth0"], "dpip: prefix 10.0.0.0/16 is not an IPv6 prefix"),
    (["route", "add", "10.0.0.0/16", "via", "2001:db8::1", "dev", "eth0"],
     "dpip: gateway 2001:db8::1 is not an IPv4 address"),
    (["route", "add", "10.0.0.0/16", "src", "nowhere", "dev", "eth0"], "dpip: invalid source address 'nowhere'"),
    (["route", "add", "10.0.0.0/16", "dev", "eth0", "mtu", "big"], "dpip: invalid mtu 'big'"),
    (["route", "add", "10.0.0.0/16", "dev", "eth0", "metric", "-1"], "dpip: invalid option: -1"),
    (["route", "add", "10.0.0.0/16", "dev", "eth0", "scope", "site"],
     "dpip: invalid scope 'site' (host | link | global | kni_host)"),
    (["route", "show", "table", "main"], "dpip: unexpected argument 'table'"),
    (["route", "flush", "dev", "eth0"], "dpip: unexpected argument 'dev'"),
    (["route", "add", "10.0.0.0/16", "dev", "eth0", "tos", "16"],
     "dpip: tos 16 is not supported: routes here match on the destination alone"),
    (["route", "add", "10.0.0.0/16", "dev", "eth0", "proto", "kernel"],
     "dpip: invalid proto 'kernel' (auto | boot | static | ra | NUM)"),
    (["route", "add", "10.0.0.1", "dev", "eth0", "local", "scope", "link"],
     "dpip: local is scope host, not scope link"),
    (["route", "show", "-c", "2"], "dpip: -i and -c sample the counters of -s link show only"),
    (["link", "show", "-i", "1"], "dpip: -i and -c sample the counters of -s link show only"),
    (["-s", "link", "show", "-c", "3"], "dpip: missing option '-i'"),
    (["-s", "link", "show", "-i", "0"], "dpip: invalid interval: '0'"),
    # numbers are ASCII digits: int() and float() also read "٨٠" (80), "1_0" (10), "nan" and "1e400" (a traceback
    # from sleep), and str.isdigit() takes any script's digits
    (["route", "add", "10.0.0.0/16", "dev", "eth0", "mtu", "\u0668\u0660"], "dpip: invalid mtu '\u0668\u0660'"),
    (["route", "add", "10.0.0.0/16", "dev", "eth0", "metric", "\u0661"], "dpip: invalid metric '\u0661'"),
    (["route", "add", "10.0.0.0/16", "dev", "eth0", "proto", "\u0663"],
     "dpip: invalid proto '\u0663' (auto | boot | static | ra | NUM)"),
    (["link", "show", "cpu\u0661"], "dpip: invalid CPU-NAME 'cpu\u0661' (cpu or cpuN)"),
    (["-s", "link", "show", "-i", "nan", "-c", "1"], "dpip: invalid interval: 'nan'"),
    (["-s", "link", "show", "-i", "1e400", "-c", "1"], "dpip: invalid interval: '1e400'"),
    (["-s", "link", "show", "-i", "inf"], "dpip: invalid interval: 'inf'"),
    (["-s", "link", "show", "-i", "1_0"], "dpip: invalid interval: '1_0'"),
    (["-s", "link", "show", "-i", "1", "-c", "\u0663"], "dpip: invalid count: '\u0663'"),
    (["-s", "link", "show", "-i", "1", "--count= 3"], "dpip: invalid count: ' 3'"),
    (["neigh", "add", "lladdr", "52:54:00:aa:bb:cc", "dev", "eth0"], "dpip: missing ip address"),
    (["neigh", "add", "192.168.100.2", "lladdr", "52:54:00:aa:bb", "dev", "eth0"], "dpip: invalid link layer addr"),
    (["neigh", "add", "192.168.100.2", "lladdr", "00:00:00:00:00:00", "dev", "eth0"], "dpip: invalid MAC address"),
    (["neigh", "add", "192.168.100.2", "dev", "eth0"], "dpip: invalid MAC address"),
    (["neigh", "add", "192.168.100.2", "lladdr", "52:54:00:aa:bb:cc"], "dpip: no device specified."),
    (["neigh", "add", "host.example", "lladdr", "52:54:00:aa:bb:cc", "dev", "eth0"],
     "dpip: invalid IP address 'host.example'"),
    (["-6", "neigh", "del", "192.168.100.2"], "dpip: IP address 192.168.100.2 is not an IPv6 address"),
    (["link", "show", "eth0", "eth1"], "dpip: unexpected argument 'eth1'"),
])
def test_usage_errors(argv, message):
    with pytest.raises(UsageError) as e:
        dpip.parse(argv)
    assert str(e.value) == message


@pytest.mark.parametrize("argv, help_text", [([], dpip.USAGE), (["addr"], dpip.OBJECT_HELP["addr"])])
def test_missing_words_show_usage_as_an_error(argv, help_text):
    with pytest.raises(UsageError) as e:
        dpip.parse(argv)
    assert str(e.value) == help_text.rstrip("\n")


# ---------------------------------------------------------------------------------------- formatting


def show(argv, data):
    return dpip.render(dpip.parse(argv), data)


def route(prefix, plen, ifname, scope, via="0.0.0.0", src="0.0.0.0", af=4, mtu=1500, metric=0):
    return {"af": af, "prefix": prefix, "prefixlen": plen, "via": via, "src": src, "ifname": ifname, "mtu": mtu,
            "tos": 0, "scope": scope, "metric": metric, "proto": "auto", "flags": []}


def test_route_show_matches_dpvs_readme():
    """route4_dump ends `proto %s %s\n` with an empty flags field: a space before the newline (DPVS's README
    lost it; its tutorial's dpdk0.102 listing keeps it)."""
    data = {"routes": [
        route("10.0.0.100", 32, "dpdk1", "host"),
        route("192.168.100.200", 32, "dpdk0", "host"),
        route("192.168.100.0", 24, "dpdk0", "link"),
        route("10.0.0.0", 16, "dpdk1", "link"),
    ]}
    assert show(["route", "show"], data) == (
        "inet 10.0.0.100/32 via 0.0.0.0 src 0.0.0.0 dev dpdk1 mtu 1500 tos 0 scope host metric 0 proto auto \n"
        "inet 192.168.100.200/32 via 0.0.0.0 src 0.0.0.0 dev dpdk0 mtu 1500 tos 0 scope host metric 0 proto auto \n"
        "inet 192.168.100.0/24 via 0.0.0.0 src 0.0.0.0 dev dpdk0 mtu 1500 tos 0 scope link metric 0 proto auto \n"
        "inet 10.0.0.0/16 via 0.0.0.0 src 0.0.0.0 dev dpdk1 mtu 1500 tos 0 scope link metric 0 proto auto \n")


def test_route6_show_matches_dpvs():
    data = {"routes": [
        route("2001::1", 128, "dpdk0.102", "host", via="::", src="::", af=6),
        route("2001::", 64, "dpdk0.102", "link", via="::", src="2001::28", af=6),
        route("::", 0, "dpdk0", "global", via="2001::ff", src="::", af=6, mtu=0),
    ]}
    assert show(["-6", "route", "show"], data) == (
        "inet6 2001::1/128 dev dpdk0.102 mtu 1500 scope host\n"
        "inet6 2001::/64 src 2001::28 dev dpdk0.102 mtu 1500 scope link\n"
        "inet6 default via 2001::ff dev dpdk0 scope global\n")


def test_addr_show_matches_dpvs():
    data = {"addrs": [
        {"addr": "192.168.100.100", "prefixlen": 24, "ifname": "dpdk0", "scope": "global", "sapool": False,
         "af": 4},
        {"addr": "2001:db8::1", "prefixlen": 64, "ifname": "dpdk0", "scope": "link", "sapool": True, "af": 6},
    ]}
    assert show(["addr", "show"], data) == (
        "inet 192.168.100.100/24 scope global dpdk0\n"
        "     valid_lft forever preferred_lft forever\n"
        "inet6 2001:db8::1/64 scope link dpdk0\n"
        "     valid_lft forever preferred_lft forever sapool\n")


def test_addr_show_marks_sapool_addresses(monkeypatch, capsys):
    """Over the daemon's own addr.list: DPVS ends a sapool address's line with its pool's figures; hdslb keeps
    none per address, so the word says which addresses SNAT may hand out as sources."""
    from .test_api import FakeCtx
    from .test_batch import ModelClient
    ctx = FakeCtx()
    monkeypatch.setattr(dpip, "Client", ModelClient(ctx))
    assert dpip.main(["addr", "add", "203.0.113.1/24", "dev", "eth0", "sapool"]) == 0
    assert dpip.main(["addr", "add", "203.0.113.2/24", "dev", "eth0"]) == 0
    capsys.readouterr()
    assert dpip.main(["addr", "show"]) == 0
    assert capsys.readouterr().out == (
        "inet 203.0.113.1/24 scope global eth0\n"
        "     valid_lft forever preferred_lft forever sapool\n"
        "inet 203.0.113.2/24 scope global eth0\n"
        "     valid_lft forever preferred_lft forever\n")


def test_neigh_show_matches_dpvs():
    data = {"neighs": [
        {"addr": "192.168.100.2", "lladdr": "52:54:00:aa:bb:cc", "ifname": "veth-lb0", "state": "REACHABLE",
         "flags": ["static"], "cpu": 0},
        {"addr": "192.168.100.3", "lladdr": "52:54:00:aa:bb:cd", "ifname": "veth-lb0", "state": "REACHABLE",
         "flags": ["learned"], "cpu": 1},
        {"addr": "192.168.100.4", "lladdr": None, "ifname": "veth-lb0", "state": "SEND", "flags": [], "cpu": 0},
    ]}
    pad = " " * (48 - len("192.168.100.2"))
    assert show(["neigh", "show"], data) == (
        f"ip: 192.168.100.2{pad} mac: 52:54:00:aa:bb:cc   state: REACHABLE     dev: veth-lb0  core: 0  static\n"
        f"ip: 192.168.100.3{pad} mac: 52:54:00:aa:bb:cd   state: REACHABLE     dev: veth-lb0  core: 1  \n"
        f"ip: 192.168.100.4{pad} mac:incomplate                       state: SEND           "
        f"dev: veth-lb0  core: 0  \n")


LINK = {"ifname": "veth-lb0", "ifindex": 7, "mac": "52:54:00:aa:bb:01", "mtu": 1500, "xdp_mode": "native",
        "state": "UP", "speed": 10000, "duplex": "full-duplex", "numa": 0, "rxq": 2, "txq": 2,
        "stats": {"rx_packets": 10, "rx_bytes": 1000, "tx_packets": 20, "tx_bytes": 2000, "drops": 3, "pass": 4}}


def test_link_show_matches_dpvs_dump_nic_basic():
    """link.c: "%d: %s: socket %d mtu %d rx-queue %d tx-queue %d\\n", then "    " and each of state, "N Mbps",
    duplex, flags followed by a space, then "    addr %s " and offload flags; DPDK prints the MAC in capitals.
    Scripts count the UP words."""
    assert show(["link", "show"], {"links": [LINK]}) == (
        "7: veth-lb0: socket 0 mtu 1500 rx-queue 2 tx-queue 2\n"
        "    UP 10000 Mbps full-duplex xdp-native \n"
        "    addr 52:54:00:AA:BB:01 \n")
    down = {**LINK, "state": "DOWN", "speed": 0, "duplex": "", "xdp_mode": "generic"}
    assert show(["link", "show"], {"links": [down]}).splitlines()[1] == "    DOWN 0 Mbps xdp-generic "


def test_link_show_with_stats():
    assert show(["-s", "link", "show"], {"links": [LINK]}).splitlines()[3:] == [
        "    ipackets            opackets            ibytes              obytes              ",
        "    10                  20                  1000                2000                ",
        "    drops               kernel              ",
        "    3                   4                   ",
    ]


class SequenceClient:
    """Replies to each op with the next of its replies, records the calls."""

    def __init__(self, replies):
        self.replies, self.calls = {k: list(v) for k, v in replies.items()}, []

    def call(self, op, args=None):
        self.calls.append((op, args))
        return self.replies[op].pop(0)


def test_link_show_interval_prints_rates_as_dpvs(capsys):
    """dpip -s link show IF -i 2 -c 2 (link.c dump_nic_stats_velocity): the basic lines once, then per sample two
    readings SECS apart and (after - before) / SECS in %-16s columns."""
    def at(k):
        return {"links": [{**LINK, "stats": {"rx_packets": 100 * k, "tx_packets": 50 * k, "rx_bytes": 6000 * k,
                                             "tx_bytes": 3000 * k, "drops": 2 * k, "pass": 0}}]}

    client = SequenceClient({"link.list": [at(0), at(0), at(1), at(1), at(3)]})
    slept = []
    dpip.sample(client, dpip.parse(["-s", "link", "show", "veth-lb0", "-i", "2", "-c", "2"]), sleep=slept.append)
    assert capsys.readouterr().out.splitlines() == [
        "7: veth-lb0: socket 0 mtu 1500 rx-queue 2 tx-queue 2",
        "    UP 10000 Mbps full-duplex xdp-native ",
        "    addr 52:54:00:AA:BB:01 ",
        "    ipackets/pps    opackets/pps    ibytes/Bps      obytes/Bps      ",
        "    50              25              3000            1500            ",
        "    drops/pps       kernel/pps      ",
        "    1               0               ",
        "    ipackets/pps    opackets/pps    ibytes/Bps      obytes/Bps      ",
        "    100             50              6000            3000            ",
        "    drops/pps       kernel/pps      ",
        "    2               0               "]
    assert slept == [2.0, 2.0]
    assert client.calls == [("link.list", {"ifname": "veth-lb0"})] * 5


def test_link_show_cpu():
    inv = dpip.parse(["-s", "link", "show", "cpu"])
    assert inv.requests == [("stats.get", {})] and inv.cpu is None
    pc = {"rx": [5, 7], "verdict_tx": [4, 6], "verdict_redirect": [0, 0], "verdict_pass": [1, 0], "verdict_drop": [0, 1]}
    lines = show(["-s", "link", "show", "cpu"], {"per_cpu": pc}).splitlines()
    assert lines[0].split() == ["cpu", "rx", "tx", "redirect", "pass", "drop"]
    assert lines[1].split() == ["0", "5", "4", "0", "1", "0"] and lines[2].split() == ["1", "7", "6", "0", "0", "1"]
    # DPVS's CPU-NAME cpuN: that CPU alone
    assert dpip.parse(["link", "show", "cpu1"]).cpu == 1
    assert show(["link", "show", "cpu1"], {"per_cpu": pc}).splitlines() == [lines[0], lines[2]]
    with pytest.raises(HdslbError) as e:
        show(["link", "show", "cpu2"], {"per_cpu": pc})
    assert e.value.message == "cpu2 is not a CPU of the fast path (cpu0..cpu1)"


def test_link_show_cpu_interval_prints_rates(capsys):
    def at(k):
        return {"per_cpu": {"rx": [10 * k, 20 * k], "verdict_tx": [10 * k, 0], "verdict_redirect": [0, 0],
                            "verdict_pass": [0, 20 * k], "verdict_drop": [0, 0]}}

    client = SequenceClient({"stats.get": [at(0), at(1)]})
    dpip.sample(client, dpip.parse(["-s", "link", "show", "cpu1", "-i", "0.5", "-c", "1"]), sleep=lambda s: None)
    assert capsys.readouterr().out.splitlines() == [
        "cpu   rx/pps        tx/pps        redirect/pps  pass/pps      drop/pps      ",
        "1     40            0             0             40            0             "]


def test_link_show_interval_runs_through_main(client, monkeypatch, capsys):
    client.replies["link.list"] = {"links": [LINK]}
    monkeypatch.setattr(dpip.time, "sleep", lambda s: None)
    assert dpip.main(["-s", "link", "show", "-i", "1", "-c", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[4] == "    " + "0".ljust(16) * 4
    assert [op for op, _ in client.calls] == ["link.list"] * 3


def test_commands_that_change_state_print_nothing():
    assert show(["route", "add", "10.0.0.0/16", "dev", "eth0"], None) == ""


# ---------------------------------------------------------------------------------------------- main


class FakeClient:
    """Stands in for hdslb.ctl.client.Client: replies by op, records what was sent."""

    def __init__(self):
        self.replies, self.fail, self.calls, self.path = {}, {}, [], None

    def __call__(self, path=None):
        self.path = path
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def call(self, op, args=None):
        self.calls.append((op, args))
        if op in self.fail:
            raise self.fail[op]
        return self.replies.get(op)


@pytest.fixture
def client(monkeypatch):
    fake = FakeClient()
    monkeypatch.setattr(dpip, "Client", fake)
    return fake


def test_main_shows(client, capsys):
    client.replies["route.list"] = {"routes": [route("10.0.0.0", 16, "dpdk1", "link")]}
    assert dpip.main(["--ctl-socket=/run/x.sock", "route", "show"]) == 0
    assert client.path == "/run/x.sock"
    assert client.calls == [("route.list", {"af": 4})]
    assert capsys.readouterr().out.startswith("inet 10.0.0.0/16 via 0.0.0.0")


def test_main_change_prints_nothing(client, capsys):
    assert dpip.main(["addr", "add", "192.168.100.100/24", "dev", "veth-lb0", "--ctl-socket", "/s"]) == 0
    assert client.path == "/s"
    assert [op for op, _ in client.calls] == ["addr.add"]
    assert capsys.readouterr() == ("", "")


def test_main_usage_error_exits_2_without_a_request(client, capsys):
    assert dpip.main(["route", "add", "10.0.0.0/33", "dev", "eth0"]) == 2
    assert client.calls == []
    assert capsys.readouterr().err == "dpip: invalid prefix '10.0.0.0/33'\n"
    assert dpip.main([]) == 2
    assert capsys.readouterr().err.startswith("Usage:\n")


def test_main_daemon_error_exits_1(client, capsys):
    client.fail["neigh.del"] = HdslbError(errno.ENOENT, "neighbour 192.168.100.9 not found")
    assert dpip.main(["neigh", "del", "192.168.100.9"]) == 1
    assert capsys.readouterr().err == "dpip: neighbour 192.168.100.9 not found\n"


def test_main_unreachable_daemon_exits_1(client, capsys):
    client.fail["link.list"] = DaemonUnreachable("cannot reach hdslbd at /s: Connection refused")
    assert dpip.main(["link", "show"]) == 1
    assert capsys.readouterr().err == "cannot reach hdslbd at /s: Connection refused\n"


def test_main_help_needs_no_daemon(client, capsys):
    assert dpip.main(["addr", "help"]) == 0
    assert capsys.readouterr().out == dpip.OBJECT_HELP["addr"]
    assert client.calls == []


def test_link_show_interval_ends_quietly_on_ctrl_c(client, monkeypatch, capsys):
    client.replies["link.list"] = {"links": [LINK]}

    def interrupted(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(dpip.time, "sleep", interrupted)
    try:
        rc = dpip.main(["-s", "link", "show", "-i", "1"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C came out of main as a traceback")
    assert rc == 130
    out = capsys.readouterr()
    assert out.out.splitlines()[0].startswith("7: veth-lb0: socket 0") and out.err == ""


def test_neigh_show_without_the_slow_path_names_static_entries_as_dpvs():
    """The fast path's neighbour map (no --slowpath): a static entry is `REACHABLE ... static`, as DPVS and the slow
    path show it (there is no PERMANENT state in DPVS's nud_state_names)."""
    import ipaddress
    from types import SimpleNamespace

    from hdslb.ctl import commands

    def entry(ip, mac, permanent):
        return {"addr": ipaddress.ip_address(ip), "lladdr": mac, "ifindex": 3, "permanent": permanent}

    maps = SimpleNamespace(neighs=lambda: [entry("192.168.100.2", "52:54:00:aa:bb:cc", True),
                                           entry("192.168.100.3", "52:54:00:aa:bb:cd", False)])
    eth = SimpleNamespace(name="veth-lb0", ifindex=3)
    ctx = SimpleNamespace(bal=SimpleNamespace(ifaces={"veth-lb0": eth}, iface=lambda n: eth), maps=maps, slow=None)
    pad = " " * (48 - len("192.168.100.2"))
    assert show(["neigh", "show"], commands.COMMANDS["neigh.list"](ctx, {})) == (
        f"ip: 192.168.100.2{pad} mac: 52:54:00:aa:bb:cc   state: REACHABLE     dev: veth-lb0  core: 0  static\n"
        f"ip: 192.168.100.3{pad} mac: 52:54:00:aa:bb:cd   state: REACHABLE     dev: veth-lb0  core: 0  \n")


def test_batch_and_restore_lines_split_exactly_as_a_shell_would_and_plain_lines_skip_shlex(monkeypatch):
    """dpip -b and ipvsadm -R split each line as shlex does (quotes, backslashes, '#' comments for dpip), but a
    plain line (nearly every line of a generated 100k-route file) by str.split(): shlex was 70 % of parsing one.
    The two must never differ: a non-breaking space is a word character to a shell, a separator to str.split()."""
    import random
    import shlex

    from cli.common import shell_words

    rng = random.Random(7)
    alphabet = ["a", "1", "-", "/", ".", " ", " ", "\t", '"', "'", "\\", "#", "\xa0", "\u2003", "\x1f"]
    for _ in range(40_000):
        line = "".join(rng.choice(alphabet) for _ in range(rng.randrange(14)))
        for comments in (False, True):
            try:
                want = shlex.split(line, comments=comments)
            except ValueError:
                want = ValueError
            try:
                got = shell_words(line, comments=comments)
            except ValueError:
                got = ValueError
            assert got == want, (line, comments)
    assert shell_words("route add 10.0.0.0/8\xa0dev eth1") == ["route", "add", "10.0.0.0/8\xa0dev", "eth1"]
    calls = []
    real = shlex.split
    monkeypatch.setattr(shlex, "split", lambda *a, **kw: calls.append(a[0]) or real(*a, **kw))
    lines = dpip.parse_batch("route add 10.1.0.0/16 dev eth1\nroute add 10.2.0.0/16 dev eth1 # second\n"
                             'addr add 10.0.0.1/24 dev "eth0"\n')
    assert [inv.requests[0][0] for _, inv in lines] == ["route.add", "route.add", "addr.add"]
    assert calls == ["route add 10.2.0.0/16 dev eth1 # second", 'addr add 10.0.0.1/24 dev "eth0"']


def test_route_show_dev_lists_the_routes_leaving_by_that_device():
    """DPVS's `dpip route show dev IF` lists IF's routes; here it was refused ("unexpected argument 'dev'")."""
    from types import SimpleNamespace

    from hdslb.balancer import Balancer, Iface
    from hdslb.ctl import commands

    from .test_balancer import Recorder

    bal = Balancer(Recorder(), {"eth0": Iface("eth0", 2, b"\x02" * 6, 1500),
                                "eth1": Iface("eth1", 3, b"\x04" * 6, 9000)})
    bal.route_add({"prefix": "10.0.0.0", "prefixlen": 8, "ifname": "eth0"})
    bal.route_add({"prefix": "10.1.0.0", "prefixlen": 16, "ifname": "eth1"})
    ctx = SimpleNamespace(bal=bal)
    inv = dpip.parse(["route", "show", "dev", "eth1"])
    assert dpip.render(inv, commands.COMMANDS[inv.requests[0][0]](ctx, inv.requests[0][1])) == (
        "inet 10.1.0.0/16 via 0.0.0.0 src 0.0.0.0 dev eth1 mtu 9000 tos 0 scope link metric 0 proto auto \n")
    with pytest.raises(HdslbError) as e:
        commands.COMMANDS["route.list"](ctx, {"af": 4, "ifname": "eth9"})
    assert e.value.errno == errno.ENODEV


def test_batch_line_ending_in_a_backslash_goes_on_on_the_next_as_ip_batch_reads_it():
    """A long route split with `\\` (ip -batch files do it) was "No escaped character", exit 2."""
    lines = dpip.parse_batch("route add 10.0.0.0/16 via 10.1.0.1 \\\n    dev eth0 metric 5\n# done\nroute show\n")
    assert [(n, inv.requests) for n, inv in lines] == [
        (1, [("route.add", {"af": 4, "prefix": "10.0.0.0", "prefixlen": 16, "via": "10.1.0.1", "src": None,
                            "ifname": "eth0", "mtu": None, "metric": 5, "scope": None})]),
        (4, [("route.list", {"af": 4})])]
    with pytest.raises(UsageError) as e:
        dpip.parse_batch("route show\nroute add 10.0.0.0/16 \\\n dev eth0 mtu big\n")
    assert str(e.value) == "dpip: line 2: invalid mtu 'big'"
