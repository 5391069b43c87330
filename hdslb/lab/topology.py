"""The two lab topologies (one-arm and two-arm), built from namespaces, veths and a bridge namespace.

OneArm: every host hangs off one switch; the LB shares the servers' subnet.

    <p>-cl  eth0 192.168.100.1 ─┐
    <p>-lb  veth-lb0 (no IPv4) ─┤ sw-*  br0 in <p>-sw     (XDP_PASS on sw-lb0)
    <p>-rsN eth0 192.168.100.N+1┘

TwoArm: the client is wired straight to the LB; the LB's second arm joins the servers' switch.

    <p>-cl eth0 10.0.0.1 ── veth-lb0 <p>-lb veth-lb1 ── sw-lb1  br0 in <p>-sw ── eth0 <p>-rsN 192.168.100.N+1
    (XDP_PASS on the client's eth0 and on sw-lb1)

The LB's interfaces get no kernel IPv4 address: the balancer owns its VIPs and local addresses and answers
ARP for them in XDP. XDP_PASS sits on the far end of each LB veth because native XDP_TX/redirect on veth
needs a program on the peer (ENV-NOTES).

    python -m hdslb.lab.topology onearm|twoarm [--servers N] [--nginx] [--udp-echo]   # up until Ctrl-C
    python -m hdslb.lab.topology gc                                                    # clean crashed labs
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from hdslb.lab import netns as nx
from hdslb.lab.netns import Lab

SERVER_NET = ipaddress.ip_network("192.168.100.0/24")
SERVER_NET6 = ipaddress.ip_network("fd00:100::/64")
CLIENT_NET = ipaddress.ip_network("10.0.0.0/24")  # TwoArm only
CLIENT_NET6 = ipaddress.ip_network("fd00:10::/64")
MAX_SERVERS = 64  # keeps server addresses (.2 .. .65) clear of the suggested VIP (.100) and laddr (.254)
BRIDGE = "br0"


@dataclass
class Iface:
    """One veth end and its peer; MACs are read back after setup."""

    ns: str
    name: str
    peer_ns: str
    peer_name: str
    mac: str = ""
    peer_mac: str = ""


@dataclass
class Host:
    """A client or real server: its namespace, its one interface, and its kernel addresses."""

    role: str  # 'cl', 'rs1', ...
    ns: str
    iface: Iface
    ip: str  # IPv4 without prefix length
    plen: int
    ip6: str | None = None  # only with ipv6=True
    name: str = field(default="")  # what servers answer with ('rs1'); defaults to role

    def __post_init__(self):
        self.name = self.name or self.role

    @property
    def ifname(self) -> str:
        return self.iface.name

    @property
    def mac(self) -> str:
        return self.iface.mac

    @property
    def cidr(self) -> str:
        return f"{self.ip}/{self.plen}"


class _Topology(Lab):
    """What OneArm and TwoArm share: namespaces per role, switch ports, LB environment, run helpers."""

    LB_IFACES: Sequence[str] = ()

    def __init__(self, prefix: str | None = None, n_servers: int = 2, ipv6: bool = False,
                 keep_workdir: bool | None = None):
        super().__init__(prefix, keep_workdir)
        if not 1 <= n_servers <= MAX_SERVERS:
            raise ValueError(f"n_servers must be 1..{MAX_SERVERS}")
        self.n_servers = n_servers
        self.ipv6 = ipv6
        self.cl_ns = self.ns("cl")
        self.lb_ns = self.ns("lb")
        self.sw_ns = self.ns("sw")
        self.bridge = BRIDGE
        self.client: Host | None = None
        self.servers: list[Host] = []  # servers[0] is rs1
        self.lb_ifaces: dict[str, Iface] = {}  # 'veth-lb0' -> Iface
        self.xdp_pass_on: list[tuple[str, str]] = []  # (ns, ifname) carrying the XDP_PASS helper
        self.ctrl_path = nx.RUN_DIR / f"{self.prefix}.ctrl"  # per-lab control socket (HDSLB_CTRL)
        self.pin_dir = nx.BPFFS_DIR / self.prefix  # suggested per-lab pin directory, removed at teardown
        self.server_net = str(SERVER_NET)

    # -- building blocks

    def _sysctls(self) -> dict[str, object]:
        s: dict[str, object] = {
            # Asymmetric paths are normal here (FNAT/DR replies, XDP-injected packets): no reverse-path drops.
            "net.ipv4.conf.all.rp_filter": 0,
            "net.ipv4.conf.default.rp_filter": 0,
        }
        if Path("/proc/sys/net/ipv6").is_dir():
            if self.ipv6:
                s["net.ipv6.conf.all.accept_dad"] = 0  # addresses usable at once
                s["net.ipv6.conf.default.accept_dad"] = 0
            else:
                # No link-local addresses, router solicitations or MLD reports: the LB's counters and
                # captures then show only the traffic a test sent.
                s["net.ipv6.conf.all.disable_ipv6"] = 1
                s["net.ipv6.conf.default.disable_ipv6"] = 1
        return s

    def _wire(self, ns: str, ifname: str, peer_ns: str, peer_name: str) -> Iface:
        """A veth between two lab namespaces, offloads off on both ends, both ends up."""
        nx.veth_add(ns, ifname, peer_ns, peer_name)
        for n, i in ((ns, ifname), (peer_ns, peer_name)):
            nx.offloads_off(n, i)
            nx.link_up(n, i)
        return Iface(ns, ifname, peer_ns, peer_name)

    def _switch_port(self, ns: str, ifname: str, port: str) -> Iface:
        iface = self._wire(ns, ifname, self.sw_ns, port)
        nx.bridge_attach(self.sw_ns, self.bridge, port)
        return iface

    def _host(self, role: str, ip: ipaddress.IPv4Address, plen: int, iface: Iface,
              ip6: ipaddress.IPv6Address | None, plen6: int = 64) -> Host:
        nx.addr_add(iface.ns, iface.name, f"{ip}/{plen}")
        if self.ipv6 and ip6 is not None:
            nx.addr_add(iface.ns, iface.name, f"{ip6}/{plen6}")
        return Host(role, iface.ns, iface, str(ip), plen, str(ip6) if self.ipv6 and ip6 else None)

    def _servers(self) -> None:
        for i in range(1, self.n_servers + 1):
            role = f"rs{i}"
            ns = self.add_netns(role, self._sysctls())
            iface = self._switch_port(ns, "eth0", f"sw-{role}")
            self.servers.append(self._host(role, SERVER_NET[i + 1], SERVER_NET.prefixlen, iface,
                                           SERVER_NET6[i + 1]))

    def _xdp_pass(self, ns: str, ifname: str) -> None:
        nx.xdp_pass_attach(ns, ifname)  # native mode
        self.xdp_pass_on.append((ns, ifname))

    def _read_macs(self) -> None:
        ifaces = list(self.lb_ifaces.values()) + [h.iface for h in ([self.client] + self.servers) if h]
        for i in ifaces:
            i.mac = nx.link_mac(i.ns, i.name)
            i.peer_mac = nx.link_mac(i.peer_ns, i.peer_name)

    def _build(self) -> None:
        self.add_path(self.ctrl_path)  # a daemon may leave its socket behind
        self.add_path(self.pin_dir)  # and its pins; the bpffs itself stays mounted
        self._build_topology()
        self._read_macs()

    def _build_topology(self) -> None:
        raise NotImplementedError

    # -- accessors

    def server(self, i: int) -> Host:
        """Server i, 1-based like its name (server(1) is rs1 at 192.168.100.2)."""
        if not 1 <= i <= len(self.servers):
            raise IndexError(f"no server {i}: this lab has rs1..rs{len(self.servers)}")
        return self.servers[i - 1]

    @property
    def server_ips(self) -> list[str]:
        return [s.ip for s in self.servers]

    @property
    def lb_mac(self) -> str:
        """MAC of veth-lb0, where the LB answers ARP for its client-facing addresses."""
        return self.lb_ifaces["veth-lb0"].mac

    # -- running things

    def lb_env(self, extra: Mapping[str, object] | None = None) -> dict[str, str]:
        """Environment for commands in the LB namespace: this checkout on PYTHONPATH, the lab's ctrl socket."""
        env = nx.package_env({nx_ctl_env(): str(self.ctrl_path)})
        if extra:
            env.update({k: str(v) for k, v in extra.items()})
        return env

    def lb_run(self, argv: Sequence[str], extra_env: Mapping[str, object] | None = None,
               **kw) -> subprocess.CompletedProcess:
        """Run argv in the LB namespace with lb_env(); kw as nx.run (check, timeout, input)."""
        return nx.run(self.lb_ns, argv, env=self.lb_env(extra_env), **kw)

    def lb_spawn(self, argv: Sequence[str], extra_env: Mapping[str, object] | None = None,
                 log: str | Path | None = None) -> subprocess.Popen:
        """Start argv (e.g. the daemon) in the LB namespace in the background; stopped at teardown."""
        return self.spawn(self.lb_ns, argv, env=self.lb_env(extra_env), log=log)

    def client_run(self, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
        kw.setdefault("env", nx.package_env())
        return nx.run(self.cl_ns, argv, **kw)

    def server_run(self, i: int, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
        """Run argv in server i's namespace (1-based)."""
        kw.setdefault("env", nx.package_env())
        return nx.run(self.server(i).ns, argv, **kw)

    def describe(self) -> str:
        """Human summary for `make demo` and failing tests."""
        lines = [f"{type(self).__name__} lab {self.prefix}  (workdir {self.workdir}, ctrl {self.ctrl_path})"]
        c = self.client
        if c:
            lines.append(f"  client  {c.ns:<12} {c.ifname:<9} {c.cidr:<18} {c.mac}")
        for name, i in self.lb_ifaces.items():
            lines.append(f"  lb      {i.ns:<12} {name:<9} {'(no IPv4)':<18} {i.mac}  peer {i.peer_ns}/{i.peer_name}")
        for s in self.servers:
            lines.append(f"  {s.role:<7} {s.ns:<12} {s.ifname:<9} {s.cidr:<18} {s.mac}")
        lines.append(f"  switch  {self.sw_ns:<12} {self.bridge}")
        lines.append(f"  XDP_PASS (native) on {', '.join(f'{n}/{i}' for n, i in self.xdp_pass_on)}")
        lines.append(f"  suggested VIP {self.vip}, local address {self.laddr}")
        return "\n".join(lines)


def nx_ctl_env() -> str:
    """Name of the control-socket variable, taken from the protocol module so the two never drift."""
    try:
        from hdslb.ctl.protocol import ENV_CTL_SOCKET
    except ImportError:  # the lab must stay usable on its own
        return "HDSLB_CTRL"
    return ENV_CTL_SOCKET


class OneArm(_Topology):
    """Client, LB and servers on one switched subnet 192.168.100.0/24 (DPVS "one-arm").

    Attributes: cl_ns, lb_ns, sw_ns, client (.1), servers (.2, .3, ...), lb_ifaces {'veth-lb0'},
    vip/laddr (suggested addresses for the balancer, unused by the lab), ctrl_path, pin_dir, workdir.
    """

    LB_IFACES = ("veth-lb0",)

    def __init__(self, prefix: str | None = None, n_servers: int = 2, ipv6: bool = False,
                 keep_workdir: bool | None = None):
        super().__init__(prefix, n_servers, ipv6, keep_workdir)
        self.vip = str(SERVER_NET[100])
        self.laddr = str(SERVER_NET[254])
        self.vip6 = str(SERVER_NET6[100]) if ipv6 else None

    def _build_topology(self) -> None:
        sysctls = self._sysctls()
        self.add_netns("sw", sysctls)
        nx.bridge_add(self.sw_ns, self.bridge)
        self.add_netns("cl", sysctls)
        self.add_netns("lb", sysctls)
        cl = self._switch_port(self.cl_ns, "eth0", "sw-cl")
        self.client = self._host("cl", SERVER_NET[1], SERVER_NET.prefixlen, cl, SERVER_NET6[1])
        self.lb_ifaces["veth-lb0"] = self._switch_port(self.lb_ns, "veth-lb0", "sw-lb0")
        self._servers()
        self._xdp_pass(self.sw_ns, "sw-lb0")


class TwoArm(_Topology):
    """Client on 10.0.0.0/24 wired to the LB's veth-lb0; veth-lb1 joins the servers' switch (192.168.100.0/24).

    Attributes as OneArm; the client has only its connected route, so it reaches servers through the LB
    or not at all. vip is 10.0.0.100 (on the client's subnet: the LB answers ARP for it on veth-lb0).
    """

    LB_IFACES = ("veth-lb0", "veth-lb1")

    def __init__(self, prefix: str | None = None, n_servers: int = 2, ipv6: bool = False,
                 keep_workdir: bool | None = None):
        super().__init__(prefix, n_servers, ipv6, keep_workdir)
        self.vip = str(CLIENT_NET[100])
        self.laddr = str(SERVER_NET[254])
        self.vip6 = str(CLIENT_NET6[100]) if ipv6 else None
        self.client_net = str(CLIENT_NET)

    def _build_topology(self) -> None:
        sysctls = self._sysctls()
        self.add_netns("sw", sysctls)
        nx.bridge_add(self.sw_ns, self.bridge)
        self.add_netns("cl", sysctls)
        self.add_netns("lb", sysctls)
        cl = self._wire(self.cl_ns, "eth0", self.lb_ns, "veth-lb0")
        self.client = self._host("cl", CLIENT_NET[1], CLIENT_NET.prefixlen, cl, CLIENT_NET6[1])
        # Seen from the LB, veth-lb0's peer is the client's eth0.
        self.lb_ifaces["veth-lb0"] = Iface(self.lb_ns, "veth-lb0", self.cl_ns, "eth0")
        self.lb_ifaces["veth-lb1"] = self._switch_port(self.lb_ns, "veth-lb1", "sw-lb1")
        self._servers()
        self._xdp_pass(self.cl_ns, "eth0")
        self._xdp_pass(self.sw_ns, "sw-lb1")


TOPOLOGIES = {"onearm": OneArm, "twoarm": TwoArm}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hdslb.lab.topology",
                                 description="Bring a lab up until interrupted, or clean up crashed labs.")
    ap.add_argument("kind", choices=[*TOPOLOGIES, "gc"])
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--prefix", help="namespace prefix (default: hl + 4 random hex digits)")
    ap.add_argument("--ipv6", action="store_true")
    ap.add_argument("--nginx", action="store_true", help="start nginx on every server")
    ap.add_argument("--udp-echo", action="store_true", help="start the UDP echo on port 53 on every server")
    args = ap.parse_args(argv)
    if args.kind == "gc":
        for p in nx.gc():
            print(f"removed lab {p}")
        return 0

    from hdslb.lab import servers as srv

    # SIGTERM and SIGINT become an exception so the context manager tears the lab down (SIGINT is set
    # explicitly: a shell starting us in the background would have it ignored).
    def _stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    with TOPOLOGIES[args.kind](args.prefix, args.servers, ipv6=args.ipv6) as lab:
        if args.nginx:
            srv.start_nginx(lab)
        if args.udp_echo:
            srv.start_udp_echo(lab)
        print(lab.describe(), flush=True)
        print(f"export {nx_ctl_env()}={lab.ctrl_path}; ip netns exec {lab.lb_ns} ...   (Ctrl-C tears down)",
              flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
