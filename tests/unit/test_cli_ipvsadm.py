"""ipvsadm shim: argv -> control requests, reply data -> ipvsadm/DPVS text, and main()'s exit codes.

Expected layouts are ipvsadm 1.31 / DPVS tools/ipvsadm/ipvsadm.c printf formats written out by hand
(trailing spaces included: `%-10u` pads the last column too).
"""

import errno
import io
import re
import socket

import pytest

from cli import ipvsadm
from cli.common import UsageError
from hdslb.ctl.client import DaemonUnreachable
from hdslb.errors import HdslbError

VIP = {"proto": "tcp", "addr": "192.168.100.100", "port": 80}


def fake_services(monkeypatch, names: dict, ports: dict) -> None:
    """getservbyname/getservbyport over the given tables: {(name, proto): port}, {(port, proto): name}."""
    def byname(name, proto):
        if (name, proto) not in names:
            raise OSError("service/proto not found")
        return names[(name, proto)]

    def byport(port, proto):
        if (port, proto) not in ports:
            raise OSError("port/proto not found")
        return ports[(port, proto)]

    monkeypatch.setattr(socket, "getservbyname", byname)
    monkeypatch.setattr(socket, "getservbyport", byport)


@pytest.fixture(autouse=True)
def services_db(monkeypatch):
    """A fixed /etc/services, so port names do not depend on the machine."""
    names = {("http", "tcp"): 80, ("http", "udp"): 80, ("domain", "udp"): 53}
    fake_services(monkeypatch, names, {(v, p): n for (n, p), v in names.items()})


def requests(*argv):
    return ipvsadm.parse(list(argv)).requests


# ------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("argv, expected", [
    ([], [("service.list", {"svc": None, "laddr_conns": False})]),
    (["-Ln"], [("service.list", {"svc": None, "laddr_conns": False})]),
    (["-l", "-n", "--sort"], [("service.list", {"svc": None, "laddr_conns": False})]),
    (["-L", "-t", "192.168.100.100:80"], [("service.list", {"svc": VIP, "laddr_conns": False})]),
    (["-A", "-t", "192.168.100.100:80", "-s", "rr"],
     [("service.add", {**VIP, "sched": "rr", "persistent": None, "netmask": None, "flags": []})]),
    # default scheduler wlc; -p without a value is 300; clustered short options with an attached argument
    (["-At192.168.100.100:http", "-p"],
     [("service.add", {**VIP, "sched": "wlc", "persistent": 300, "netmask": None, "flags": []})]),
    (["--add-service", "--udp-service=10.0.0.1:domain", "--persistent=60", "--netmask", "255.255.255.0"],
     [("service.add", {"proto": "udp", "addr": "10.0.0.1", "port": 53, "sched": "wlc", "persistent": 60,
                       "netmask": "255.255.255.0", "flags": []})]),
    # port 0 is fine once the service is persistent
    (["-A", "-t", "10.0.0.1", "-p", "600"],
     [("service.add", {"proto": "tcp", "addr": "10.0.0.1", "port": 0, "sched": "wlc", "persistent": 600,
                       "netmask": None, "flags": []})]),
    (["-A", "-t", "[2001:db8::1]:443", "-p", "-M", "64"],
     [("service.add", {"proto": "tcp", "addr": "2001:db8::1", "port": 443, "sched": "wlc", "persistent": 300,
                       "netmask": "64", "flags": []})]),
    # edit changes only what it names (DPVS edits a service "by options")
    (["-E", "-t", "192.168.100.100:80", "-s", "wrr"], [("service.edit", {**VIP, "sched": "wrr"})]),
    (["-E", "-t", "192.168.100.100:80", "-p", "30"], [("service.edit", {**VIP, "persistent": 30})]),
    (["-D", "-t", "192.168.100.100:80"], [("service.del", VIP)]),
    (["-C"], [("service.flush", {})]),
    (["-Z"], [("stats.zero", {"svc": None})]),
    (["-Z", "-t", "192.168.100.100:80"], [("stats.zero", {"svc": VIP})]),
    # -a: DPVS's defaults are -g (direct routing) and weight 1; the port defaults to the service's
    (["-a", "-t", "192.168.100.100:80", "-r", "192.168.100.2"],
     [("dest.add", {"svc": VIP, "addr": "192.168.100.2", "port": 80, "fwd": "dr", "weight": 1,
                    "u_threshold": 0, "l_threshold": 0})]),
    (["-a", "-t", "192.168.100.100:80", "-r", "192.168.100.2:8080", "-b", "-w", "3", "-x", "100", "-y", "10"],
     [("dest.add", {"svc": VIP, "addr": "192.168.100.2", "port": 8080, "fwd": "fnat", "weight": 3,
                    "u_threshold": 100, "l_threshold": 10})]),
    # direct routing and tunnelling cannot change the port: the service's wins
    (["-a", "-t", "192.168.100.100:80", "-r", "192.168.100.2:8080", "-i"],
     [("dest.add", {"svc": VIP, "addr": "192.168.100.2", "port": 80, "fwd": "tunnel", "weight": 1,
                    "u_threshold": 0, "l_threshold": 0})]),
    (["-a", "-t", "192.168.100.100:80", "-r", "192.168.100.2", "-w", "0", "-m"],
     [("dest.add", {"svc": VIP, "addr": "192.168.100.2", "port": 80, "fwd": "nat", "weight": 0,
                    "u_threshold": 0, "l_threshold": 0})]),
    (["-e", "-t", "192.168.100.100:80", "-r", "192.168.100.2", "-w", "5"],
     [("dest.edit", {"svc": VIP, "addr": "192.168.100.2", "port": 80, "weight": 5})]),
    (["-e", "-t", "192.168.100.100:80", "-r", "192.168.100.2", "-J"],
     [("dest.edit", {"svc": VIP, "addr": "192.168.100.2", "port": 80, "fwd": "snat"})]),
    (["-d", "-t", "192.168.100.100:80", "-r", "192.168.100.2"],
     [("dest.del", {"svc": VIP, "addr": "192.168.100.2", "port": 80})]),
    (["-P", "-t", "192.168.100.100:80", "-z", "192.168.100.200", "-F", "dpdk0"],
     [("laddr.add", {"svc": VIP, "addr": "192.168.100.200", "ifname": "dpdk0"})]),
    (["--del-laddr", "-t", "192.168.100.100:80", "--laddr=192.168.100.200", "--ifname=dpdk0"],
     [("laddr.del", {"svc": VIP, "addr": "192.168.100.200", "ifname": "dpdk0"})]),
    (["-G"], [("laddr.list", {"svc": None})]),
    (["-G", "-t", "192.168.100.100:80"], [("laddr.list", {"svc": VIP})]),
    (["-Lnc"], [("conn.list", {})]),
    (["-S", "-n"], [("service.list", {"svc": None, "brief": True})]),
])
def test_parse_requests(argv, expected):
    assert requests(*argv) == expected


def test_parse_views_and_formats():
    inv = ipvsadm.parse(["-L", "-n", "--stats", "--exact", "--nosort"])
    assert inv.view == "services"
    assert inv.fmt == ipvsadm.Format(numeric=True, stats=True, exact=True, nosort=True)
    assert ipvsadm.parse(["-L", "-t", "192.168.100.100:80"]).view == "service"
    assert ipvsadm.parse(["-h"]).view == "help"
    assert ipvsadm.parse(["-Sn"]).view == "save"


@pytest.mark.parametrize("argv, message", [
    (["-A", "-t", "192.168.100.100:80", "-w", "3"], "Illegal 'weight' option with the 'add-service' command"),
    (["-a", "-t", "192.168.100.100:80"], "You need to supply the 'real-server' option for the 'add-server' command"),
    (["-A", "-s", "rr"], "You need to supply the 'service-address' option for the 'add-service' command"),
    (["-P", "-t", "192.168.100.100:80", "-z", "10.0.0.1"],
     "You need to supply the 'ifname' option for the 'add-laddr' command"),
    (["-L", "-c", "-t", "192.168.100.100:80"],
     "The option 'service-address' conflicts with the 'connection' option in the 'list' command"),
    (["-L", "-c", "--rate"], "options conflicts in the list command"),
    (["-C", "-n"], "Illegal 'numeric' option with the 'flush' command"),
    (["-A", "-t", "[fe80::1%eth0]:80"], "illegal virtual server address[:port] specified"),
    (["-a", "-t", "[2001:db8::1]:80", "-r", "[2001:db8::2%2]:80"], "illegal real server address[:port] specified"),
    (["-A", "-D", "-t", "192.168.100.100:80"], "multiple commands specified"),
    (["-A", "-t", "192.168.100.100:80", "-u", "192.168.100.100:53"],
     "multiple 'service-address' options specified"),
    (["-a", "-t", "192.168.100.100:80", "-r", "10.0.0.2", "-g", "-b"],
     "multiple 'forwarding-method' options specified"),
    (["-a", "-t", "192.168.100.100:80", "-r", "10.0.0.2", "-w", "65536"], "illegal weight specified"),
    (["-a", "-t", "192.168.100.100:80", "-r", "10.0.0.2", "-w", "heavy"], "illegal weight specified"),
    (["-a", "-t", "192.168.100.100:80", "-r", "10.0.0.2", "-x", "-1"], "illegal u_threshold specified"),
    (["-a", "-t", "192.168.100.100:80", "-r", "10.0.0.2", "-y", "x"], "illegal l_threshold specified"),
    (["-a", "-t", "192.168.100.100:80", "-r", "10.0.0.256"], "illegal real server address[:port] specified"),
    (["-A", "-t", "192.168.100.100:99999"], "illegal virtual server address[:port] specified"),
    (["-A", "-t", "www.example.com:80"], "illegal virtual server address[:port] specified"),
    (["-A", "-t", "8080"], "illegal virtual server address[:port] specified"),
    (["-A", "-t", "[2001:db8::1]"], "illegal virtual server address[:port] specified"),
    (["-A", "-t", "192.168.100.100:nosuchservice"], "illegal virtual server address[:port] specified"),
    (["-A", "-t", "192.168.100.100"], "Zero port specified for no-match and non-persistent service"),
    (["-A", "-t", "192.168.100.100:80", "-p", "0"], "invalid timeout value `0' specified"),
    (["-A", "-t", "192.168.100.100:80", "-p", "soon"], "invalid timeout value `soon' specified"),
    (["-A", "-t", "192.168.100.100:80", "-M", "255.0.255.0"], "illegal virtual server persistent mask specified"),
    (["-A", "-t", "192.168.100.100:80", "-M", "24"], "illegal virtual server persistent mask specified"),
    # a host mask is no persistence mask: it used to be read as the /24 it is the inverse of (the daemon and REST
    # refuse it)
    (["-A", "-t", "192.168.100.100:80", "-p", "-M", "0.0.0.255"], "illegal virtual server persistent mask specified"),
    (["-E", "-t", "192.168.100.100:80", "-M", "0.0.255.255"], "illegal virtual server persistent mask specified"),
    (["-A", "-t", "[2001:db8::1]:80", "-M", "129"], "illegal ipv6 netmask specified"),
    # ipvsadm 1.31's parse_sched_flags: a flag of another scheduler is a usage error (exit 2), not a daemon refusal
    (["-A", "-t", "192.168.100.100:80", "-s", "sh", "--sched-flags", "mh-port"], "incompatible scheduler flag `mh-port'"),
    (["-A", "-t", "192.168.100.100:80", "--sched-flags", "sh-port"], "incompatible scheduler flag `sh-port'"),
    (["-E", "-t", "192.168.100.100:80", "-s", "mh", "--sched-flags", "mh-port,sh-fallback"],
     "incompatible scheduler flag `sh-fallback'"),
    (["-P", "-t", "192.168.100.100:80", "-z", "nope", "-F", "eth0"], "illegal local address"),
    (["-L", "junk"], "unexpected argument junk"),
    (["-L", "--bogus"], "--bogus: unknown option"),
    (["-L", "-K"], "-K: unknown option"),
    (["-L", "--numeric=yes"], "--numeric: option does not take an argument"),
    (["-A", "-t"], "-t: missing argument"),
    (["-n"], ipvsadm.TRY_HELP),
])
def test_usage_errors(argv, message):
    with pytest.raises(UsageError) as e:
        ipvsadm.parse(argv)
    assert str(e.value) == message


@pytest.mark.parametrize("argv, start", [
    (["-A", "-f", "1"], "-f (--fwmark-service): not supported by hdslb: firewall-mark services need netfilter"),
    (["--start-daemon", "master"], "--start-daemon: not supported by hdslb: connection sync daemons are not needed"),
    (["-U", "-t", "10.0.0.1:80", "-k", "1.2.3.4"], "-U (--add-blklst): not supported by hdslb: deny lists"),
    (["-Lnc", "--sockpair", "x"], "--sockpair: not supported by hdslb"),
    # DPVS 1.9's and LVS 1.31's newer ones: "unknown option" read as a typo in a script brought over
    (["-A", "-t", "10.0.0.1:80", "--conn-timeout", "60"], "--conn-timeout: not supported by hdslb: per-service"),
    (["-A", "-t", "10.0.0.1:80", "--proxy-protocol", "v2"], "--proxy-protocol: not supported by hdslb: "),
    (["-E", "-t", "10.0.0.1:80", "--expire-quiescent"], "--expire-quiescent: not supported by hdslb: "),
    (["-A", "-t", "10.0.0.1:80", "--dest-check", "default"], "--dest-check: not supported by hdslb: "),
    (["-A", "-t", "10.0.0.1:80", "--quic"], "--quic: not supported by hdslb: "),
    (["-A", "--sctp-service", "10.0.0.1:80"], "--sctp-service: not supported by hdslb: "),
    (["-A", "--icmpv6-service", "[2001:db8::1]:0"], "--icmpv6-service: not supported by hdslb: "),
    (["-O", "-t", "10.0.0.1:80", "-2", "1.2.3.4"], "-O (--add-whtlst): not supported by hdslb: allow lists"),
    (["-W"], "-W (--get-whtlst): not supported by hdslb: allow lists"),
    (["-G", "--cpu", "1"], "--cpu: not supported by hdslb: "),
    (["--sync-maxlen", "1400"], "--sync-maxlen: not supported by hdslb: connection sync daemons"),
    (["-A", "-t", "10.0.0.1:80", "--frobnicate"], "--frobnicate: unknown option"),
])
def test_options_of_lvs_and_dpvs_that_hdslb_lacks_are_named_with_the_reason(argv, start):
    """Not "unknown option" (which reads as a typo): the option exists in ipvsadm, hdslb says why it has none."""
    with pytest.raises(UsageError) as e:
        ipvsadm.parse(argv)
    assert str(e.value).startswith(start)


def test_table_is_complete():
    """Every command has one rule per column, and every option the parser knows has a column."""
    assert all(len(row) == len(ipvsadm._COLUMNS) for row in ipvsadm._LEGAL.values())
    assert {o.option for o in ipvsadm._OPTIONS if o.option} == set(ipvsadm._COLUMNS)
    assert {o.command for o in ipvsadm._OPTIONS if o.command} - {"help", "version"} == set(ipvsadm._LEGAL)


# ---------------------------------------------------------------------------------------- formatting

ZERO_STATS = {"conns": 0, "inpkts": 0, "outpkts": 0, "inbytes": 0, "outbytes": 0}
ZERO_RATES = {"cps": 0, "inpps": 0, "outpps": 0, "inbps": 0, "outbps": 0}


def dest(addr, port, fwd="fnat", weight=1, active=0, inactive=0, stats=ZERO_STATS, rates=ZERO_RATES):
    return {"addr": addr, "port": port, "fwd": fwd, "weight": weight, "active": active, "inactive": inactive,
            "u_threshold": 0, "l_threshold": 0, "stats": stats, "rates": rates}


def service(proto, addr, port, sched, dests, persistent=None, netmask=None, laddrs=(), stats=ZERO_STATS,
            rates=ZERO_RATES):
    return {"proto": proto, "addr": addr, "port": port, "sched": sched, "persistent": persistent,
            "netmask": netmask, "flags": [], "dests": dests, "laddrs": list(laddrs), "stats": stats,
            "rates": rates}


# The DPVS README's two-arm FullNAT example, as `ipvsadm -ln` prints it.
TUTORIAL = {"version": "1.2.1", "size": 4096, "services": [
    service("tcp", "10.0.0.100", 80, "rr", [dest("192.168.100.3", 80), dest("192.168.100.2", 80)],
            laddrs=[{"addr": "192.168.100.200", "ifname": "dpdk0", "conns": 0, "conflicts": 0}]),
]}


def render(argv, data):
    return ipvsadm.render(ipvsadm.parse(argv), data)


def test_list_numeric_matches_ipvsadm():
    assert render(["-ln"], TUTORIAL) == (
        "IP Virtual Server version 1.2.1 (size=4096)\n"
        "Prot LocalAddress:Port Scheduler Flags\n"
        "  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n"
        "TCP  10.0.0.100:80 rr\n"
        "  -> 192.168.100.2:80             FullNat 1      0          0         \n"
        "  -> 192.168.100.3:80             FullNat 1      0          0         \n")


def test_list_sorting_forward_names_persistence_and_ipv6():
    data = {"services": [
        service("udp", "10.0.0.100", 53, "wrr", [dest("10.0.1.1", 53, "nat", 2, 7, 12345)]),
        service("tcp", "2001:db8::100", 80, "rr", [dest("2001:db8::2", 80, "tunnel")], persistent=300,
                netmask="64"),
        service("tcp", "10.0.0.100", 443, "wlc", [dest("10.0.1.2", 443, "dr"), dest("10.0.1.1", 443, "snat")],
                persistent=600, netmask="255.255.255.0"),
    ]}
    assert render(["-Ln"], data).splitlines()[1:] == [
        "Prot LocalAddress:Port Scheduler Flags",
        "  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn",
        "TCP  10.0.0.100:443 wlc persistent 600 mask 255.255.255.0",
        "  -> 10.0.1.1:443                 SNAT    1      0          0         ",
        "  -> 10.0.1.2:443                 Route   1      0          0         ",
        "UDP  10.0.0.100:53 wrr",
        "  -> 10.0.1.1:53                  Masq    2      7          12345     ",
        "TCP  [2001:db8::100]:80 rr persistent 300 mask 64",
        "  -> [2001:db8::2]:80             Tunnel  1      0          0         ",
    ]
    # without -n ports get their service names; the default header values apply when the daemon sends none
    text = render(["-L"], data)
    assert text.startswith("IP Virtual Server version 1.2.1 (size=4096)\n")
    assert "UDP  10.0.0.100:domain wrr\n" in text
    assert "  -> 10.0.1.1:domain              Masq    2" in text
    # --nosort keeps the daemon's order
    assert render(["-Ln", "--nosort"], data).splitlines()[3] == "UDP  10.0.0.100:53 wrr"


def test_list_one_service_has_no_version_header():
    assert render(["-L", "-n", "-t", "10.0.0.100:80"], TUTORIAL).splitlines()[0] == \
        "Prot LocalAddress:Port Scheduler Flags"


@pytest.mark.parametrize("n, text, exact", [
    (0, "        0", "        0"),
    (99_999_999, " 99999999", " 99999999"),
    (100_000_000, "  100000K", " 100000000"),
    (999_999_999, "  999999K", " 999999999"),
    (1_000_000_000, "    1000M", " 1000000000"),
    (99_999_999_999, "   99999M", " 99999999999"),
    (100_000_000_000, "     100G", " 100000000000"),
    (100_000_000_000_000, "     100T", " 100000000000000"),
])
def test_largenum(n, text, exact):
    assert ipvsadm.largenum(n, exact=False) == text
    assert ipvsadm.largenum(n, exact=True) == exact


def test_stats_and_rate_layouts():
    s = {"conns": 12, "inpkts": 3_000_000_000, "outpkts": 4, "inbytes": 150_000_000, "outbytes": 6}
    r = {"cps": 1, "inpps": 2, "outpps": 3, "inbps": 1_500_000_000, "outbps": 5}
    data = {"services": [service("tcp", "10.0.0.100", 80, "rr", [dest("192.168.100.2", 80, stats=s, rates=r)],
                                 stats=s, rates=r)]}
    assert render(["-Ln", "--stats"], data).splitlines()[1:] == [
        "Prot LocalAddress:Port               Conns   InPkts  OutPkts  InBytes OutBytes",
        "  -> RemoteAddress:Port",
        "TCP  10.0.0.100:80                      12    3000M        4  150000K        6",
        "  -> 192.168.100.2:80                   12    3000M        4  150000K        6",
    ]
    assert render(["-Ln", "--stats", "--exact"], data).splitlines()[3] == \
        "TCP  10.0.0.100:80                      12 3000000000        4 150000000        6"
    assert render(["-Ln", "--rate"], data).splitlines()[1:] == [
        "Prot LocalAddress:Port                 CPS    InPPS   OutPPS    InBPS   OutBPS",
        "  -> RemoteAddress:Port",
        "TCP  10.0.0.100:80                       1        2        3    1500M        5",
        "  -> 192.168.100.2:80                    1        2        3    1500M        5",
    ]


def test_list_formats_combine_as_in_ipvsadm():
    """--stats, --rate, --thresholds and --persistent-conn are each optional in the list command, not exclusive:
    given together, the first of them in that order sets the layout (ipvsadm's print_title)."""
    d = {**dest("192.168.100.2", 80), "u_threshold": 5, "l_threshold": 1}
    data = {"services": [service("tcp", "10.0.0.100", 80, "rr", [d])]}
    for argv, alone in ((["--stats", "--rate"], "--stats"), (["--rate", "--thresholds"], "--rate"),
                        (["--thresholds", "--persistent-conn"], "--thresholds"), (["--persistent-conn"], None)):
        assert render(["-Ln", *argv], data) == render(["-Ln", alone or argv[0]], data)
    assert render(["-Ln", "--rate", "--stats"], data) == render(["-Ln", "--stats"], data)


def test_thresholds_layout():
    """DPVS's columns and nothing else (an overloaded server, the estimator's age: not in the listing)."""
    d = {**dest("192.168.100.2", 80, active=4, inactive=2), "u_threshold": 1000, "l_threshold": 10,
         "overloaded": True}
    data = {"services": [service("tcp", "10.0.0.100", 80, "rr", [d])], "counts_age_max_s": 3}
    assert render(["-Ln", "--thresholds"], data).splitlines()[1:] == [
        "Prot LocalAddress:Port            Uthreshold Lthreshold ActiveConn InActConn ",
        "  -> RemoteAddress:Port",
        "TCP  10.0.0.100:80 rr",
        "  -> 192.168.100.2:80             1000       10         4          2         ",
    ]


def test_get_laddr_layout_matches_dpvs():
    data = {"services": [
        {"proto": "tcp", "addr": "192.168.100.100", "port": 80,
         "laddrs": [{"addr": "192.168.100.200", "ifname": "dpdk0", "conns": 7, "conflicts": 1}]},
        {"proto": "udp", "addr": "2001:db8::1", "port": 53, "laddrs": []},
    ]}
    assert render(["-G"], data) == (
        "VIP:VPORT            TOTAL    SNAT_IP              CONFLICTS  CONNS     \n"
        "192.168.100.100:80   1        \n"
        "                              192.168.100.200      1          7         \n"
        "[2001:db8::1]:53     0        \n")
    assert render(["-G"], {"services": []}) == ""


def test_connection_layout_matches_dpvs():
    conn = {"proto": 6, "af": 4, "saddr": "10.0.0.9", "sport": 53210, "daddr": "10.0.0.100", "dport": 80,
            "to_saddr": "192.168.100.200", "to_sport": 1025, "to_daddr": "192.168.100.2", "to_dport": 80,
            "out": False, "state": "established", "cpu": 1, "idle_s": 3, "expire_s": 87}
    reply = {**conn, "out": True}  # the same connection's other direction: not listed again
    assert render(["-Lnc"], {"conns": [conn, reply]}) == (
        "[1]tcp 87s    ESTABLISHED 10.0.0.9:53210     10.0.0.100:80      192.168.100.200:1025 192.168.100.2:80\n")
    # a shared conn table has no owning CPU: "-", as for persistence templates
    assert render(["-Lnc"], {"conns": [{**conn, "cpu": None}]}).startswith("[-]tcp 87s    ESTABLISHED")


def test_connection_time_column_is_the_time_left_not_the_idle_time():
    """The time column counts down as LVS's expire column does (seconds left before the entry expires: expire_s),
    never the seconds idle (idle_s); 0 for an entry past its timeout that the sweep has not removed yet; in DPVS's
    "%-6s" form, a wider value pushing the line right as DPVS's printf would. No header line (DPVS prints none)."""
    base = {"proto": 6, "af": 4, "saddr": "10.0.0.9", "sport": 53210, "daddr": "10.0.0.100", "dport": 80,
            "to_saddr": "192.168.100.200", "to_sport": 1025, "to_daddr": "192.168.100.2", "to_dport": 80,
            "out": False, "state": "established", "cpu": 0}
    conns = [{**base, "idle_s": 0, "expire_s": 90},  # fresh: the whole ESTABLISHED timeout
             {**base, "sport": 53211, "state": "fin_wait", "idle_s": 9, "expire_s": 0},  # past its 7 s: 0
             {**base, "sport": 53212, "proto": 17, "state": "udp", "idle_s": 1, "expire_s": 299},
             {**base, "sport": 53213, "idle_s": 5, "expire_s": 2678395}]  # --set tcp 2678400 (31 days)
    assert render(["-Lnc"], {"conns": conns}).splitlines() == [
        "[0]tcp 90s    ESTABLISHED 10.0.0.9:53210     10.0.0.100:80      192.168.100.200:1025 192.168.100.2:80",
        "[0]tcp 0s     FIN_WAIT    10.0.0.9:53211     10.0.0.100:80      192.168.100.200:1025 192.168.100.2:80",
        "[0]udp 299s   UDP         10.0.0.9:53212     10.0.0.100:80      192.168.100.200:1025 192.168.100.2:80",
        "[0]tcp 2678395s ESTABLISHED 10.0.0.9:53213     10.0.0.100:80      192.168.100.200:1025 192.168.100.2:80",
    ]
    # ipvsadm's -c options: -n only names or numbers the addresses; --exact changes nothing (it scales counters)
    assert render(["-Lnc", "--exact"], {"conns": conns}) == render(["-Lnc"], {"conns": conns})
    assert render(["-Lc"], {"conns": conns[:1]}) == (
        "[0]tcp 90s    ESTABLISHED 10.0.0.9:53210     10.0.0.100:http    192.168.100.200:1025 192.168.100.2:http\n")


def test_save_restore_round_trip():
    data = {"services": [
        service("tcp", "10.0.0.100", 80, "rr", [dest("192.168.100.2", 80), dest("192.168.100.3", 80, weight=2)],
                persistent=600, netmask="255.255.255.0",
                laddrs=[{"addr": "192.168.100.200", "ifname": "dpdk0", "conns": 0, "conflicts": 0}]),
        service("udp", "2001:db8::1", 53, "wlc", [{**dest("2001:db8::2", 53, "dr"), "u_threshold": 9}]),
    ]}
    saved = render(["-S", "-n"], data)
    assert saved == (
        "-A -t 10.0.0.100:80 -s rr -p 600 -M 255.255.255.0\n"
        "-a -t 10.0.0.100:80 -r 192.168.100.2:80 -b -w 1\n"
        "-a -t 10.0.0.100:80 -r 192.168.100.3:80 -b -w 2\n"
        "-P -t 10.0.0.100:80 -z 192.168.100.200 -F dpdk0\n"
        "-A -u [2001:db8::1]:53 -s wlc\n"
        "-a -u [2001:db8::1]:53 -r [2001:db8::2]:53 -g -w 1 -x 9\n")
    # without -n the ports are named, and -R reads the names back
    assert render(["-S"], data).startswith("-A -t 10.0.0.100:http -s rr")
    sent = [r for _, inv in ipvsadm.parse_restore(render(["-S"], data)) for r in inv.requests]
    svc = {"proto": "tcp", "addr": "10.0.0.100", "port": 80}
    dns = {"proto": "udp", "addr": "2001:db8::1", "port": 53}
    assert sent == [
        ("service.add", {**svc, "sched": "rr", "persistent": 600, "netmask": "255.255.255.0", "flags": []}),
        ("dest.add", {"svc": svc, "addr": "192.168.100.2", "port": 80, "fwd": "fnat", "weight": 1,
                      "u_threshold": 0, "l_threshold": 0}),
        ("dest.add", {"svc": svc, "addr": "192.168.100.3", "port": 80, "fwd": "fnat", "weight": 2,
                      "u_threshold": 0, "l_threshold": 0}),
        ("laddr.add", {"svc": svc, "addr": "192.168.100.200", "ifname": "dpdk0"}),
        ("service.add", {**dns, "sched": "wlc", "persistent": None, "netmask": None, "flags": []}),
        ("dest.add", {"svc": dns, "addr": "2001:db8::2", "port": 53, "fwd": "dr", "weight": 1,
                      "u_threshold": 9, "l_threshold": 0}),
    ]


def test_save_writes_the_configured_weight_not_the_one_a_health_check_set():
    """A real server that a failing check holds at weight 0 (inhibit) is listed with 0 but saved with the weight
    it was configured with: save, clear and restore must not turn a check's verdict into configuration."""
    down = {**dest("192.168.100.3", 80, weight=0), "conf_weight": 5,
            "health": {"state": "down", "reason": "connect refused", "sorry": False}}
    data = {"services": [service("tcp", "10.0.0.100", 80, "rr", [dest("192.168.100.2", 80), down])]}
    assert "-a -t 10.0.0.100:80 -r 192.168.100.3:80 -b -w 5\n" in render(["-S", "-n"], data)
    assert re.search(r"192\.168\.100\.3:80 +FullNat +0 ", render(["-L", "-n"], data)), "listed as it runs"


def test_save_leaves_out_the_sorry_server_a_lost_quorum_put_in():
    """While a virtual server's quorum is lost its sorry_server is in the pool (keepalived's), put there and taken
    out by the health checks, not configuration. -S wrote it as a real server like the others: -S, -C, -R made it
    one for good, and when quorum came back it stayed in rotation, serving its sorry page to a share of the
    clients. -S saves configuration, as it saves the configured weight of a server a check holds down."""
    held = {**dest("192.168.100.3", 80, weight=0), "conf_weight": 1,
            "health": {"state": "up", "reason": "", "sorry": False, "held": True}}
    sorry = {**dest("192.168.100.9", 80), "conf_weight": 1,
             "health": {"state": "up", "reason": "", "sorry": True, "held": False}}
    data = {"services": [service("tcp", "10.0.0.100", 80, "wrr", [dest("192.168.100.2", 80, weight=0), held, sorry])]}
    assert render(["-S", "-n"], data) == ("-A -t 10.0.0.100:80 -s wrr\n"
                                          "-a -t 10.0.0.100:80 -r 192.168.100.2:80 -b -w 0\n"
                                          "-a -t 10.0.0.100:80 -r 192.168.100.3:80 -b -w 1\n")
    assert "192.168.100.9:80" in render(["-L", "-n"], data), "listed as it runs"


def test_save_names_a_port_only_when_the_name_reads_back_as_that_port(monkeypatch):
    """/etc/services lists dicom twice (104/tcp and 11112/tcp): getservbyport(11112) says dicom, getservbyname(dicom)
    says 104. -S wrote `:dicom` for a DICOM service on 11112 and -R restored it on port 104: the service moved."""
    names = {("dicom", "tcp"): 104, ("http", "tcp"): 80}
    fake_services(monkeypatch, names, {(104, "tcp"): "dicom", (11112, "tcp"): "dicom", (80, "tcp"): "http"})
    data = {"services": [service("tcp", "10.0.0.100", 11112, "rr", [dest("192.168.100.2", 11112, "nat"),
                                                                     dest("192.168.100.3", 104, "nat")])]}
    saved = render(["-S"], data)
    assert saved == ("-A -t 10.0.0.100:11112 -s rr\n"
                     "-a -t 10.0.0.100:11112 -r 192.168.100.2:11112 -m -w 1\n"
                     "-a -t 10.0.0.100:11112 -r 192.168.100.3:dicom -m -w 1\n")
    sent = [r for _, inv in ipvsadm.parse_restore(saved) for r in inv.requests]
    assert [(a.get("port"), a.get("svc", {}).get("port")) for _, a in sent] == [(11112, None), (11112, 11112),
                                                                                (104, 11112)]
    assert "TCP  10.0.0.100:dicom rr" in render(["-L"], data), "-L names ports as ipvsadm does"


def test_restore_rejects_bad_lines_with_their_number():
    with pytest.raises(UsageError, match=r"^line 3: illegal weight specified$"):
        ipvsadm.parse_restore("# saved\n-A -t 10.0.0.1:80 -s rr\n-a -t 10.0.0.1:80 -r 10.0.0.2 -w x\n")
    with pytest.raises(UsageError, match=r"^line 1: Try"):
        ipvsadm.parse_restore("-R\n")
    with pytest.raises(UsageError, match=r"^line 1: "):
        ipvsadm.parse_restore("-A -t '10.0.0.1:80\n")


# ---------------------------------------------------------------------------------------------- main


class FakeClient:
    """Stands in for hdslb.ctl.client.Client: replies by op, records what was sent."""

    def __init__(self, replies=None, fail=None):
        self.replies, self.fail, self.calls, self.path = replies or {}, fail or {}, [], None

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

    def batch(self, ops):
        return self.call("batch", {"ops": [[op, args] for op, args in ops]})


@pytest.fixture
def client(monkeypatch):
    fake = FakeClient()
    monkeypatch.setattr(ipvsadm, "Client", fake)
    return fake


def test_main_lists(client, capsys):
    client.replies["service.list"] = TUTORIAL
    assert ipvsadm.main(["-Ln", "--ctl-socket", "/tmp/x.sock"]) == 0
    assert client.path == "/tmp/x.sock"
    assert client.calls == [("service.list", {"svc": None, "laddr_conns": False})]
    assert capsys.readouterr().out.startswith("IP Virtual Server version 1.2.1 (size=4096)\n")


def test_main_no_arguments_lists_and_ctl_socket_defaults_to_none(client, capsys):
    client.replies["service.list"] = TUTORIAL
    assert ipvsadm.main([]) == 0
    assert client.path is None  # the client resolves $HDSLB_CTRL and the default itself
    assert "TCP  10.0.0.100:http rr" in capsys.readouterr().out


def test_main_usage_error_exits_2_without_a_request(client, capsys):
    assert ipvsadm.main(["-A", "-t", "10.0.0.1:80", "-w", "3"]) == 2
    assert client.calls == []
    assert capsys.readouterr().err == "Illegal 'weight' option with the 'add-service' command\n"
    assert ipvsadm.main(["-L", "--ctl-socket"]) == 2


def test_main_daemon_error_prints_message_and_exits_1(client, capsys):
    client.fail["service.add"] = HdslbError(errno.EEXIST, "service tcp 10.0.0.1:80 already exists")
    assert ipvsadm.main(["-A", "-t", "10.0.0.1:80"]) == 1
    assert capsys.readouterr().err == "service tcp 10.0.0.1:80 already exists\n"


def test_main_unsupported_op_is_reported(client, capsys):
    client.fail["conn.list"] = HdslbError(errno.EOPNOTSUPP, "unknown operation 'conn.list'")
    assert ipvsadm.main(["-Lnc"]) == 1
    assert capsys.readouterr().err == "unknown operation 'conn.list'\n"


def test_main_unreachable_daemon_exits_1(client, capsys):
    client.fail["service.list"] = DaemonUnreachable("cannot reach hdslbd at /x: No such file or directory")
    assert ipvsadm.main(["-L"]) == 1
    assert capsys.readouterr().err == "cannot reach hdslbd at /x: No such file or directory\n"


def test_main_help_and_version_need_no_daemon(client, capsys):
    assert ipvsadm.main(["-h"]) == 0
    assert "--add-service     -A" in capsys.readouterr().out
    assert ipvsadm.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("ipvsadm hdslb-")
    assert client.calls == []


def test_main_restore_sends_one_batch_and_names_the_refused_line(client, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(
        "-A -t 10.0.0.1:80 -s rr\n# comment\n-a -t 10.0.0.1:80 -r 10.0.0.2 -b\n-a -t 10.0.0.1:80 -r 10.0.0.3 -b\n"))
    err = HdslbError(errno.ENOENT, "no such interface")
    err.index = 1  # the daemon refused the batch's second op: line 3 of the input
    client.fail["batch"] = err
    assert ipvsadm.main(["-R"]) == 2
    assert [op for op, _ in client.calls] == ["batch"]
    assert [op for op, _ in client.calls[0][1]["ops"]] == ["service.add", "dest.add", "dest.add"]
    assert capsys.readouterr().err == "line 3: no such interface; nothing of the restore was applied\n"


def test_main_restore_with_a_bad_line_sends_nothing(client, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("-A -t 10.0.0.1:80\n-A -t 10.0.0.2:80 -w 1\n"))
    assert ipvsadm.main(["-R"]) == 2
    assert client.calls == []
    assert capsys.readouterr().err == "line 2: Illegal 'weight' option with the 'add-service' command\n"


@pytest.mark.parametrize("argv, shown", [
    (["-A", "-t", "10.0.0.1:80", "-s", "rr\udcff"], "rr\\xff"),
    (["-P", "-t", "10.0.0.1:80", "-z", "10.0.0.9", "-F", "eth\udcff0"], "eth\\xff0"),
])
def test_main_argument_that_is_not_utf8_is_a_usage_error(client, capsys, argv, shown):
    """A byte that is not UTF-8 (argv holds it as a surrogate escape) cannot go into a control frame: msgpack's
    UnicodeEncodeError came out of ipvsadm as a traceback, exit 1. Now it is refused as a bad argument."""
    assert ipvsadm.main(argv) == 2
    assert client.calls == []
    assert capsys.readouterr().err == f"illegal argument `{shown}' (not UTF-8)\n"


def test_main_restore_line_that_is_not_utf8_names_the_line_and_sends_nothing(client, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("-A -t 10.0.0.1:80 -s rr\n-A -t 10.0.0.2:80 -s wrr\udcff\n"))
    assert ipvsadm.main(["-R"]) == 2
    assert client.calls == []
    assert capsys.readouterr().err == "line 2: illegal argument `wrr\\xff' (not UTF-8)\n"


@pytest.mark.parametrize("argv, op", [
    (["-a", "-t", "10.0.0.1:80", "-r", "10.0.0.2"], "dest.add"),
    (["-e", "-t", "10.0.0.1:80", "-r", "10.0.0.2", "-w", "2"], "dest.edit"),
    (["-d", "-t", "10.0.0.1:80", "-r", "10.0.0.2"], "dest.del"),
    (["-P", "-t", "10.0.0.1:80", "-z", "10.0.0.9", "-F", "eth0"], "laddr.add"),
    (["-Q", "-t", "10.0.0.1:80", "-z", "10.0.0.9", "-F", "eth0"], "laddr.del"),
])
def test_main_server_commands_on_a_missing_service_say_service_not_defined(client, capsys, argv, op):
    """libipvs's ipvs_strerror words ESRCH by the call: "Service not defined" for a real server or local address
    command (-a/-e/-d/-P/-Q), "No such service" for the service commands. Scripts written against ipvsadm match
    the former; hdslb printed the daemon's "No such service" for every command."""
    client.fail[op] = HdslbError(errno.ESRCH, "No such service")
    assert ipvsadm.main(argv) == 1
    assert capsys.readouterr().err == "Service not defined\n"


def test_main_service_commands_keep_no_such_service_and_other_reasons_stand(client, capsys):
    client.fail["service.edit"] = HdslbError(errno.ESRCH, "No such service")
    assert ipvsadm.main(["-E", "-t", "10.0.0.1:80", "-s", "rr"]) == 1
    assert capsys.readouterr().err == "No such service\n"
    client.fail["laddr.del"] = HdslbError(errno.ENOENT, "No such local address")
    assert ipvsadm.main(["-Q", "-t", "10.0.0.1:80", "-z", "10.0.0.9", "-F", "eth0"]) == 1
    assert capsys.readouterr().err == "No such Local address\n"  # DPVS's ipvs_strerror, capital L
    client.fail["dest.add"] = HdslbError(errno.ESRCH, "something more precise")
    assert ipvsadm.main(["-a", "-t", "10.0.0.1:80", "-r", "10.0.0.2"]) == 1
    assert capsys.readouterr().err == "something more precise\n"


def test_main_restore_words_the_refused_line_as_ipvsadm(client, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("-A -t 10.0.0.1:80 -s rr\n-a -t 10.0.0.2:80 -r 10.0.0.3 -m\n"))
    err = HdslbError(errno.ESRCH, "No such service")
    err.index = 1
    client.fail["batch"] = err
    assert ipvsadm.main(["-R"]) == 2
    assert capsys.readouterr().err == "line 2: Service not defined; nothing of the restore was applied\n"
