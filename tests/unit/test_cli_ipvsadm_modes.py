"""ipvsadm for every forwarding mode: -g/-m/-i/-b/-J, SNAT match services (-H), persistence (-p/-M),
thresholds (-x/-y), scheduler flags, templates in -Lnc, and -S/-R round trips of all of it."""

import pytest

from cli import ipvsadm
from cli.common import UsageError
from hdslb.ctl import commands
from hdslb.errors import HdslbError

from .test_api import FakeCtx
from .test_cli_ipvsadm import FakeClient, dest, render, requests, service

VIP = {"proto": "tcp", "addr": "10.0.0.100", "port": 80}
MATCH = {"proto": "tcp", "src_range": "192.168.100.0-192.168.100.254", "dst_range": None, "iif": None,
         "oif": "dpdk1"}


# ------------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("switch, fwd", [("-g", "dr"), ("-m", "nat"), ("-i", "tunnel"), ("-b", "fnat"),
                                         ("--masquerading", "nat"), ("--ipip", "tunnel"), ("--gatewaying", "dr")])
def test_forwarding_switches(switch, fwd):
    (op, args), = requests("-a", "-t", "10.0.0.100:80", "-r", "192.168.100.2:8080", switch, "-w", "3")
    assert op == "dest.add" and args["fwd"] == fwd and args["weight"] == 3
    # DR and TUNNEL cannot change the port: ipvsadm forces the service's; NAT and FNAT map it
    assert args["port"] == (80 if fwd in ("dr", "tunnel") else 8080)


def test_tunnel_type_ipip_as_ipvsadm_1_31_saves_it_is_taken():
    """ipvsadm 1.31 writes `--tun-type ipip` on every tunnel line of -S, and takes --tun-type/--tun-port/--tun-*csum
    on -a/-e. hdslb's -R refused LVS's saved rules at the first tunnel server with "--tun-type: unknown option",
    which reads as a typo. IPIP (6in6 for IPv6) is what hdslb's -i does: taken; GUE/GRE and their options are
    refused by name with the reason, and tunnel options on a server that is not -i as ipvsadm refuses them."""
    sent = [r for _, inv in ipvsadm.parse_restore(
        "-A -t 10.0.0.100:80 -s wlc\n-a -t 10.0.0.100:80 -r 192.168.100.2:80 -i -w 1 --tun-type ipip\n"
        "-e -t 10.0.0.100:80 -r 192.168.100.2:80 -i -w 2 --tun-type=ipip\n") for r in inv.requests]
    assert sent[1:] == [("dest.add", {"svc": VIP, "addr": "192.168.100.2", "port": 80, "fwd": "tunnel", "weight": 1,
                                      "u_threshold": 0, "l_threshold": 0}),
                        ("dest.edit", {"svc": VIP, "addr": "192.168.100.2", "port": 80, "fwd": "tunnel", "weight": 2})]
    tun = ["-a", "-t", "10.0.0.100:80", "-r", "192.168.100.2", "-i"]
    for argv, start in (
            (tun + ["--tun-type", "gue", "--tun-port", "6080"], "--tun-type gue: not supported by hdslb: "),
            (tun + ["--tun-type", "gre"], "--tun-type gre: not supported by hdslb: "),
            (tun + ["--tun-type", "vxlan"], "illegal tunnel type specified"),
            (tun + ["--tun-port", "6080"], "--tun-port: not supported by hdslb: "),
            (tun + ["--tun-csum"], "--tun-csum: not supported by hdslb: "),
            (tun[:-1] + ["-m", "--tun-type", "ipip"], "Tunnel options conflict with forward method"),
            (tun[:-1] + ["--tun-type", "ipip"], "Tunnel options conflict with forward method"),
            (["-A", "-t", "10.0.0.100:80", "--tun-type", "ipip"], "Illegal 'tun-type' option with the 'add-service'")):
        with pytest.raises(UsageError) as e:
            ipvsadm.parse(argv)
        assert str(e.value).startswith(start), argv


def test_tun_info_lists_the_tunnel_type_column_as_ipvsadm_1_31():
    data = {"services": [service("tcp", "10.0.0.100", 80, "rr", [dest("192.168.100.2", 80, "tunnel", weight=2),
                                                                 dest("192.168.100.3", 80, "dr")])]}
    assert render(["-Ln", "--tun-info"], data).splitlines()[1:] == [
        "Prot LocalAddress:Port Scheduler Flags",
        "  -> RemoteAddress:Port           Forward TunnelInfo    Weight ActiveConn InActConn",
        "TCP  10.0.0.100:80 rr",
        "  -> 192.168.100.2:80             Tunnel  ipip          2      0          0         ",
        "  -> 192.168.100.3:80             Route   n/a           1      0          0         ",
    ]
    # the layouts before it in ipvsadm's print_title win, as they do there
    assert render(["-Ln", "--tun-info", "--stats"], data) == render(["-Ln", "--stats"], data)


def test_default_forwarding_is_dr_like_dpvs():
    (_, args), = requests("-a", "-t", "10.0.0.100:80", "-r", "192.168.100.2")
    assert (args["fwd"], args["port"]) == ("dr", 80)


def test_thresholds_on_add_and_edit():
    (_, args), = requests("-a", "-t", "10.0.0.100:80", "-r", "192.168.100.2:80", "-b", "-x", "100", "-y", "50")
    assert (args["u_threshold"], args["l_threshold"]) == (100, 50)
    # an edit sends only what it mentions
    (op, args), = requests("-e", "-t", "10.0.0.100:80", "-r", "192.168.100.2:80", "-x", "10")
    assert op == "dest.edit" and args == {"svc": VIP, "addr": "192.168.100.2", "port": 80, "u_threshold": 10}
    with pytest.raises(UsageError, match="illegal u_threshold specified"):
        requests("-a", "-t", "10.0.0.100:80", "-r", "192.168.100.2", "-x", "-1")


def test_persistence_options():
    (_, args), = requests("-A", "-t", "10.0.0.100:80", "-s", "sh", "-p", "-M", "255.255.0.0")
    assert (args["sched"], args["persistent"], args["netmask"]) == ("sh", 300, "255.255.0.0")
    (_, args), = requests("-A", "-t", "[2001:db8::1]:80", "-p", "60", "-M", "48")
    assert (args["persistent"], args["netmask"]) == (60, "48")
    with pytest.raises(UsageError, match="illegal ipv6 netmask"):
        requests("-A", "-t", "[2001:db8::1]:80", "-p", "60", "-M", "255.255.0.0")


def test_match_service_and_its_source_addresses():
    (op, args), = requests("-A", "-s", "rr", "-H", "proto=tcp,src-range=192.168.100.0-192.168.100.254,oif=dpdk1")
    assert op == "service.add" and args == {"match": MATCH, "sched": "rr", "persistent": None, "netmask": None,
                                            "flags": []}
    # DPVS's own example: `-a -H ... -r 101.0.0.11:0 -J`; -J is the default under -H, the port is 0
    for extra in (["-J"], []):
        (op, args), = requests("-a", "-H", "proto=tcp,src-range=192.168.100.0-192.168.100.254,oif=dpdk1",
                               "-r", "101.0.0.11:0", "-w", "100", *extra)
        assert op == "dest.add" and args["svc"] == {"match": MATCH}
        assert (args["addr"], args["port"], args["fwd"], args["weight"]) == ("101.0.0.11", 0, "snat", 100)
    (op, args), = requests("-d", "-H", "proto=icmp,dst-range=8.8.8.8,iif=", "-r", "0.0.0.0")
    assert op == "dest.del" and args == {"svc": {"match": {"proto": "icmp", "src_range": None,
                                                           "dst_range": "8.8.8.8", "iif": None, "oif": None}},
                                         "addr": "0.0.0.0", "port": 0}
    (op, args), = requests("-D", "-H", "proto=udp")
    assert op == "service.del" and args["match"]["proto"] == "udp"


@pytest.mark.parametrize("match", ["src-range=1.2.3.4", "proto=sctp", "proto=tcp,via=eth0", "proto=tcp,oif"])
def test_illegal_match(match):
    with pytest.raises(UsageError, match="illegal match specified"):
        requests("-A", "-H", match)


def test_match_and_vip_are_one_option():
    with pytest.raises(UsageError, match="multiple 'service-address' options"):
        requests("-A", "-t", "10.0.0.1:80", "-H", "proto=tcp")


def test_sched_flags():
    (_, args), = requests("-A", "-t", "10.0.0.100:80", "-s", "mh", "--sched-flags", "mh-port,size=4093,seed=7")
    assert (args["flags"], args["sched_params"]) == (["mh-port"], {"size": 4093, "seed": 7})
    (op, args), = requests("-E", "-t", "10.0.0.100:80", "--sched-flags", "mh-fallback")
    assert op == "service.edit" and (args["flags"], args["sched_params"]) == (["mh-fallback"], {})
    for bad in ("sh-nope", "size=x", "colour=3"):
        with pytest.raises(UsageError, match="invalid scheduler flag"):
            requests("-A", "-t", "10.0.0.100:80", "--sched-flags", bad)
    with pytest.raises(UsageError, match="Illegal 'sched-flags' option"):
        requests("-a", "-t", "10.0.0.100:80", "-r", "10.0.0.2", "--sched-flags", "sh-port")


def test_connection_listing_requests():
    assert requests("-Lnc") == [("conn.list", {})]
    assert requests("-Lnc", "--persistent-conn") == [("conn.list", {"templates_only": True})]
    assert requests("-Ln", "--persistent-conn") == [("service.list", {"svc": None, "laddr_conns": False})]
    assert requests("-Ln", "--thresholds", "--persistent-conn") == \
        [("service.list", {"svc": None, "laddr_conns": False})]
    with pytest.raises(UsageError, match="options conflicts"):
        requests("-Lnc", "--thresholds")


# ---------------------------------------------------------------------------------------- formatting
def snat_service():
    return {**service("tcp", "0.0.0.0", 0, "rr", [dest("101.0.0.11", 0, "snat", weight=100)]), "match": MATCH}


def test_every_forward_name_and_the_match_line():
    data = {"services": [
        service("tcp", "10.0.0.100", 80, "rr", [dest("192.168.100.2", 80, "fnat"), dest("192.168.100.3", 80, "dr"),
                                                dest("192.168.100.4", 8080, "nat"),
                                                dest("192.168.100.5", 80, "tunnel")]),
        snat_service(),
    ]}
    lines = render(["-Ln"], data).splitlines()[3:]
    assert lines == [
        "MATCH tcp,from=192.168.100.0-192.168.100.254,oif=dpdk1 rr",
        "  -> 101.0.0.11:0                 SNAT    100    0          0         ",
        "TCP  10.0.0.100:80 rr",
        "  -> 192.168.100.2:80             FullNat 1      0          0         ",
        "  -> 192.168.100.3:80             Route   1      0          0         ",
        "  -> 192.168.100.4:8080           Masq    1      0          0         ",
        "  -> 192.168.100.5:80             Tunnel  1      0          0         ",
    ]


def test_sched_flags_are_shown_as_lvs_does():
    s = {**service("tcp", "10.0.0.100", 80, "mh", [], persistent=300, netmask="255.255.255.0"),
         "flags": ["mh-port"], "sched_params": {"size": 4093}}
    assert render(["-Ln"], {"services": [s]}).splitlines()[3] == \
        "TCP  10.0.0.100:80 mh (mh-port,size=4093) persistent 300 mask 255.255.255.0"


def test_sched_flags_are_bits_listed_and_saved_in_ipvsadms_order():
    """LVS's scheduler flags are bits, printed by ipvsadm's print_sched_flags in one order (sh-fallback before
    sh-port): `--sched-flags sh-port,sh-fallback,sh-port` was kept as written, duplicate included, and -Ln showed
    `(sh-port,sh-fallback,sh-port)` where ipvsadm shows `(sh-fallback,sh-port)`."""
    (_, args), = requests("-A", "-t", "10.0.0.100:80", "-s", "sh",
                          "--sched-flags", "sh-port,size=512,sh-fallback,sh-port")
    assert args["flags"] == ["sh-fallback", "sh-port"]
    s = {**service("tcp", "10.0.0.100", 80, "sh", []), "flags": ["sh-port", "sh-fallback", "sh-port"],
         "sched_params": {"size": 512}}
    assert render(["-Ln"], {"services": [s]}).splitlines()[3] == "TCP  10.0.0.100:80 sh (sh-fallback,sh-port,size=512)"
    assert render(["-Sn"], {"services": [s]}) == \
        "-A -t 10.0.0.100:80 -s sh --sched-flags sh-fallback,sh-port,size=512\n"


def test_persistent_conn_view():
    d = {**dest("192.168.100.2", 80, weight=2, active=3, inactive=4), "persist_conns": 7}
    lines = render(["-Ln", "--persistent-conn"], {"services": [service("tcp", "10.0.0.100", 80, "rr", [d])]})
    assert lines.splitlines()[1:] == [
        "Prot LocalAddress:Port            Weight    PersistConn ActiveConn InActConn ",
        "  -> RemoteAddress:Port",
        "TCP  10.0.0.100:80 rr",
        "  -> 192.168.100.2:80             2         7           3          4         ",
    ]


def test_templates_are_listed_like_lvs_connections():
    t = {"proto": "tcp", "client": "10.1.2.0", "plen": 24, "vaddr": "10.0.0.100", "vport": 80, "daddr": "192.168.100.2",
         "dport": 80, "dest_slot": 0, "expire_s": 285}
    t6 = {**t, "client": "2001:db8:1::", "vaddr": "2001:db8::100", "daddr": "2001:db8::2"}
    assert render(["-Lnc"], {"conns": [], "templates": [t, t6]}) == (
        "[-]tcp 285s   NONE        10.1.2.0:0         10.0.0.100:80      -                  192.168.100.2:80\n"
        "[-]tcp 285s   NONE        [2001:db8:1::]:0   [2001:db8::100]:80 -                  [2001:db8::2]:80\n")


def test_save_restore_round_trip_of_every_mode():
    persist = {**service("tcp", "10.0.0.100", 80, "sh", [
        dest("192.168.100.2", 80, "dr"), {**dest("192.168.100.3", 80, "tunnel"), "u_threshold": 100, "l_threshold": 50},
        dest("192.168.100.4", 8080, "nat", weight=0)], persistent=300, netmask="255.255.255.0"), "flags": ["sh-port"],
        "sched_params": {"size": 1024}}
    nat64 = service("tcp", "2001:db8::100", 80, "mh", [dest("192.168.100.2", 80)],
                    laddrs=[{"addr": "192.168.100.200", "ifname": "dpdk1", "conns": 0, "conflicts": 0}])
    data = {"services": [persist, nat64, snat_service()]}
    saved = render(["-S", "-n"], data)
    assert saved == (
        "-A -H proto=tcp,src-range=192.168.100.0-192.168.100.254,oif=dpdk1 -s rr\n"
        "-a -H proto=tcp,src-range=192.168.100.0-192.168.100.254,oif=dpdk1 -r 101.0.0.11:0 -J -w 100\n"
        "-A -t 10.0.0.100:80 -s sh --sched-flags sh-port,size=1024 -p 300 -M 255.255.255.0\n"
        "-a -t 10.0.0.100:80 -r 192.168.100.2:80 -g -w 1\n"
        "-a -t 10.0.0.100:80 -r 192.168.100.3:80 -i -w 1 -x 100 -y 50\n"
        "-a -t 10.0.0.100:80 -r 192.168.100.4:8080 -m -w 0\n"
        "-A -t [2001:db8::100]:80 -s mh\n"
        "-a -t [2001:db8::100]:80 -r 192.168.100.2:80 -b -w 1\n"
        "-P -t [2001:db8::100]:80 -z 192.168.100.200 -F dpdk1\n")
    sent = [r for _, inv in ipvsadm.parse_restore(saved) for r in inv.requests]
    svc, v6 = VIP, {"proto": "tcp", "addr": "2001:db8::100", "port": 80}
    assert sent == [
        ("service.add", {"match": MATCH, "sched": "rr", "persistent": None, "netmask": None, "flags": []}),
        ("dest.add", {"svc": {"match": MATCH}, "addr": "101.0.0.11", "port": 0, "fwd": "snat", "weight": 100,
                      "u_threshold": 0, "l_threshold": 0}),
        ("service.add", {**svc, "sched": "sh", "persistent": 300, "netmask": "255.255.255.0", "flags": ["sh-port"],
                         "sched_params": {"size": 1024}}),
        ("dest.add", {"svc": svc, "addr": "192.168.100.2", "port": 80, "fwd": "dr", "weight": 1, "u_threshold": 0,
                      "l_threshold": 0}),
        ("dest.add", {"svc": svc, "addr": "192.168.100.3", "port": 80, "fwd": "tunnel", "weight": 1,
                      "u_threshold": 100, "l_threshold": 50}),
        ("dest.add", {"svc": svc, "addr": "192.168.100.4", "port": 8080, "fwd": "nat", "weight": 0,
                      "u_threshold": 0, "l_threshold": 0}),
        ("service.add", {**v6, "sched": "mh", "persistent": None, "netmask": None, "flags": []}),
        ("dest.add", {"svc": v6, "addr": "192.168.100.2", "port": 80, "fwd": "fnat", "weight": 1, "u_threshold": 0,
                      "l_threshold": 0}),
        ("laddr.add", {"svc": v6, "addr": "192.168.100.200", "ifname": "dpdk1"}),
    ]
    # what -S wrote, listed again after -R, saves the same text
    assert render(["-S", "-n"], data) == saved


# ---------------------------------------------------------------------------------------------- main
@pytest.mark.parametrize("sched", ["fo", "sh", "dh", "rr"])
def test_save_keeps_the_order_the_schedulers_walk_so_restore_builds_the_same_table(sched):
    """fo sends every new flow to the first of the highest-weight servers, sh and dh lay their buckets out in the
    servers' order (as LVS): the order they were added is part of the table. -S wrote them sorted by address, so
    -S, -C, -R of an fo pair added .30 then .2 moved every new flow to .2, and an sh service's clients all moved.
    -S now writes them in the daemon's order (-L still sorts, as ipvsadm)."""
    ctx = FakeCtx()
    commands.dispatch(ctx, "service.add", dict(VIP, sched=sched))
    for addr in ("192.168.1.30", "192.168.1.2", "192.168.1.10"):
        commands.dispatch(ctx, "dest.add", {"svc": VIP, "addr": addr, "port": 80, "fwd": "nat"})

    def table(c):
        slots = {d.slot: str(d.addr) for d in c.bal.services[next(iter(c.bal.services))].dests.values()}
        return [slots[s] for s in [x for x in c.bal.dp.calls if x[0] == "sched_set"][-1][1][1].entries]

    listed = commands.dispatch(ctx, "service.list", {})
    saved = ipvsadm.format_save(listed, ipvsadm.Format(numeric=True))
    assert [ln.split()[4] for ln in saved.splitlines()[1:]] == ["192.168.1.30:80", "192.168.1.2:80", "192.168.1.10:80"]
    assert [ln.split()[1] for ln in ipvsadm.format_list(listed, ipvsadm.Format(numeric=True)).splitlines()[4:]] == \
        ["192.168.1.2:80", "192.168.1.10:80", "192.168.1.30:80"]
    again = FakeCtx()
    commands.dispatch(again, "batch", {"ops": [[op, a] for _, inv in ipvsadm.parse_restore(saved)
                                               for op, a in inv.requests]})
    assert table(again) == table(ctx)


def test_save_reads_the_model_only_not_the_maps():
    """-S writes rules: it asked for the full listing, whose connection counts, local addresses' connections
    (every entry of the conn table read as a dict: 15-22 s at a million connections in the bench), persistence
    templates and stats it never prints, so a backup's `ipvsadm -S` on a busy FullNAT balancer ran for tens of
    seconds, up to the client's 30 s timeout. It now asks for the model alone (service.list brief)."""
    ctx = FakeCtx()
    ctx.bal.addr_add({"addr": "192.168.100.200", "prefixlen": 24, "ifname": "eth1"})
    commands.dispatch(ctx, "service.add", dict(VIP, sched="wlc", persistent=60))
    commands.dispatch(ctx, "dest.add", {"svc": VIP, "addr": "192.168.100.2", "port": 80, "fwd": "fnat"})
    commands.dispatch(ctx, "laddr.add", {"svc": VIP, "addr": "192.168.100.200", "ifname": "eth1"})
    full = ipvsadm.format_save(commands.dispatch(ctx, "service.list", {"svc": None}), ipvsadm.Format(numeric=True))

    def no_map_reads(*a):
        raise AssertionError("-S read the maps")

    for reader in ("conn_counts", "laddr_conns", "svc_stats", "dest_stats", "persist_list"):
        setattr(ctx, reader, no_map_reads)
    inv = ipvsadm.parse(["-Sn"])
    assert ipvsadm.render(inv, commands.dispatch(ctx, *inv.requests[0])) == full


@pytest.mark.parametrize("argv", [["-Ln"], ["-L"], ["-Ln", "--stats"], ["-Ln", "--rate"], ["-Ln", "--thresholds"],
                                  ["-Ln", "--persistent-conn"], ["-Ln", "-t", "10.0.0.100:80"]])
def test_list_does_not_count_the_local_addresses_connections_it_never_prints(argv):
    """The listing counted each local address's connections (ipvsadm -G's CONNS) by reading every entry of the
    conn table as a dict: 15-22 s at a million connections in the bench, on every `ipvsadm -Ln` of a FullNAT
    balancer, whose layouts never show that count; near the client's 30 s timeout on a busy box. ipvsadm -L now
    asks service.list to leave it out (REST's listing, which shows it, still counts it)."""
    ctx = FakeCtx()
    ctx.bal.addr_add({"addr": "192.168.100.200", "prefixlen": 24, "ifname": "eth1"})
    commands.dispatch(ctx, "service.add", dict(VIP, sched="wlc"))
    commands.dispatch(ctx, "dest.add", {"svc": VIP, "addr": "192.168.100.2", "port": 80, "fwd": "fnat"})
    commands.dispatch(ctx, "laddr.add", {"svc": VIP, "addr": "192.168.100.200", "ifname": "eth1"})
    inv = ipvsadm.parse(argv)
    counted = ipvsadm.render(inv, commands.dispatch(ctx, "service.list", {"svc": inv.requests[0][1]["svc"]}))
    ctx.laddr_conns = lambda: pytest.fail("-L read every connection to count the local addresses'")
    assert ipvsadm.render(inv, commands.dispatch(ctx, *inv.requests[0])) == counted
    with pytest.raises(HdslbError, match="laddr_conns must be true or false"):
        commands.dispatch(ctx, "service.list", {"svc": None, "laddr_conns": "no"})


def test_warnings_go_to_stderr_and_the_change_stands(monkeypatch, capsys):
    fake = FakeClient(replies={"dest.add": {"warnings": ["no outer source address for the tunnel to 1.2.3.4"]}})
    monkeypatch.setattr(ipvsadm, "Client", fake)
    assert ipvsadm.main(["-a", "-t", "10.0.0.100:80", "-r", "1.2.3.4", "-i"]) == 0
    assert capsys.readouterr().err == "ipvsadm: warning: no outer source address for the tunnel to 1.2.3.4\n"
