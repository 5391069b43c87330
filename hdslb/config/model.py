"""The validated result of reading hdslb.conf: frozen dataclasses the daemon reads, plus errors and notices.

Field names are the config keywords themselves, so an operator's `conn_pool_size` and the code's
`cfg.ipvs_defs.conn.conn_pool_size` are the same word. Defaults live in the keyword table
(schema.py), not here: the loader always passes every field.
"""

from __future__ import annotations

import errno
import ipaddress
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, Mapping, Optional, Tuple, Union

from hdslb.errors import HdslbError

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

# Connection idle timeouts are 1..31 days: ipvsadm's MAX_TIMEOUT, and within the fast path's u32 jiffies
# (fp_cfg.idle_tmo) at any HZ up to 1600. The config, ipvsadm --set, timeouts.set and REST share this bound.
MAX_TIMEOUT_S = 31 * 86400
# LVS's three settable timeouts (ipvsadm --set tcp tcpfin udp, keepalived's lvs_timeouts) -> the state each sets.
LVS_TIMEOUTS = {"tcp": "established", "tcpfin": "fin_wait", "udp": "udp"}


@dataclass(frozen=True)
class Where:
    """A place in a config file; columns count characters from 1, as editors do."""

    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


class ConfigError(HdslbError):
    """A config the loader refuses. str() is `FILE:LINE:COL: KEYWORD: reason`, the shape editors jump to."""

    def __init__(self, where: Where, keyword: str, reason: str):
        self.where = where
        self.keyword = keyword
        self.reason = reason
        # check() collects every error; load() raises the first and keeps the rest here.
        self.errors: Tuple["ConfigError", ...] = (self,)
        super().__init__(errno.EINVAL, f"{where}: {keyword}: {reason}")

    @property
    def file(self) -> str:
        return self.where.file

    @property
    def line(self) -> int:
        return self.where.line

    @property
    def col(self) -> int:
        return self.where.col


@dataclass(frozen=True)
class Notice:
    """An accepted option that does nothing under XDP; the daemon logs each once at start."""

    file: str
    line: int
    keyword: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.keyword}: {self.reason}"


@dataclass(frozen=True)
class Setting:
    """One option as written, whether or not it applies; reload compares these to find restart-only changes."""

    path: str  # e.g. "netif_defs.device[dpdk0].rx.queue_number"
    keyword: str
    value: Any
    where: Where
    marked_init: bool  # written under `<init>` (itself, or an enclosing block)
    init_only: bool  # the keyword table says it only takes effect at start
    applies: bool  # False: accepted for compatibility, has no effect under XDP

    @property
    def needs_restart(self) -> bool:
        return self.marked_init or self.init_only


@dataclass(frozen=True)
class Endpoint:
    """An address and port: a virtual_server_group member or a sorry_server."""

    ip: IPAddress
    port: int

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if self.ip.version == 6 else f"{self.ip}:{self.port}"


# ---------------------------------------------------------------- the DPVS *_defs sections


@dataclass(frozen=True)
class GlobalDefs:
    log_level: str  # EMERG … DEBUG, DPVS's names
    log_file: Optional[str]  # None: log to stderr (journald)
    script_user: Optional[str]  # MISC_CHECK scripts run as this user (keepalived)
    enable_script_security: bool
    # keepalived's `lvs_timeouts tcp N tcpfin N udp N`: ((LVS name, seconds), ...), those set (0 = not set)
    lvs_timeouts: Tuple[Tuple[str, int], ...] = ()


@dataclass(frozen=True)
class QueueConf:
    queue_number: Optional[int]  # informational: the driver's queue count is ethtool's business


@dataclass(frozen=True)
class Device:
    """A `device NAME` block: a kernel interface the XDP program attaches to."""

    name: str
    rx: QueueConf
    tx: QueueConf
    promisc_mode: bool
    mtu: Optional[int]
    where: Optional[Where] = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class NetifDefs:
    device: Tuple[Device, ...]

    @property
    def interfaces(self) -> Tuple[str, ...]:
        """Interfaces to attach the XDP program to, in file order."""
        return tuple(d.name for d in self.device)


@dataclass(frozen=True)
class Worker:
    """A `worker NAME` block. Only slave workers mean something: their CPUs run the fast path."""

    name: str
    type: str  # "master" | "slave"
    cpu_id: int
    where: Optional[Where] = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class WorkerDefs:
    worker: Tuple[Worker, ...]

    @property
    def fastpath_cpus(self) -> FrozenSet[int]:
        """CPUs allowed to run the fast path; empty means every online CPU (no worker_defs given)."""
        return frozenset(w.cpu_id for w in self.worker if w.type == "slave")


@dataclass(frozen=True)
class NeighDefs:
    unres_queue_length: int  # packets the slow path holds per unresolved neighbour
    timeout: int  # seconds a resolved neighbour stays valid


@dataclass(frozen=True)
class FragmentPolicy:
    """Fragments are punted to the slow path; these bound how much it keeps while reassembling."""

    bucket_number: int
    bucket_entries: int
    max_entries: int  # datagrams being reassembled at once
    ttl: int  # seconds an incomplete datagram is kept


@dataclass(frozen=True)
class Ipv4Defs:
    default_ttl: int  # TTL of packets the LB originates (synproxy SYN-ACKs, ICMP)
    fragment: FragmentPolicy


@dataclass(frozen=True)
class Ipv6Defs:
    disable: bool  # True: the fast path passes every IPv6 packet to the kernel


@dataclass(frozen=True)
class IpcMsg:
    unix_domain: str  # control socket path


@dataclass(frozen=True)
class CtrlDefs:
    ipc_msg: IpcMsg

    @property
    def ctl_socket(self) -> str:
        return self.ipc_msg.unix_domain


@dataclass(frozen=True)
class ConnDefs:
    conn_pool_size: int  # entries in the IPv4 conn map (its max_entries)
    conn6_pool_size: Optional[int]  # entries in the IPv6/NAT64 conn map; None: conn_pool_size / 4 (hdslb's own)
    conn_table: str  # "percpu": a value per CPU in each entry; "shared": one; "auto": by the CPU count (hdslb's own)
    conn_init_timeout: int  # seconds a conn lives before its protocol state is known
    expire_quiescent_template: bool  # drop persistence templates whose dest has weight 0


@dataclass(frozen=True)
class UdpTimeouts:
    normal: int  # seconds
    last: int


@dataclass(frozen=True)
class UdpDefs:
    defence_udp_drop: bool  # drop UDP to a VIP with no matching service instead of passing it up
    uoa_mode: str  # "opp" | "ipo": how UOA carries the client address to the real server
    uoa_max_trail: int
    timeout: UdpTimeouts


@dataclass(frozen=True)
class TcpTimeouts:
    """Per-state conn timeouts in seconds, named as DPVS/LVS name the states."""

    none: int
    established: int
    syn_sent: int
    syn_recv: int
    fin_wait: int
    time_wait: int
    close: int
    close_wait: int
    last_ack: int
    listen: int
    synack: int
    last: int

    def as_dict(self) -> Dict[str, int]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class SynackOptions:
    mss: int
    ttl: int
    sack: bool
    wscale: bool
    timestamp: bool


@dataclass(frozen=True)
class SynproxyDefs:
    synack_options: SynackOptions
    defer_rs_syn: bool
    rs_syn_max_retry: int
    ack_storm_thresh: int
    max_ack_saved: int
    conn_reuse_state: FrozenSet[str]  # TCP states in which a new SYN may reuse the conn


@dataclass(frozen=True)
class TcpDefs:
    defence_tcp_drop: bool
    timeout: TcpTimeouts
    synproxy: SynproxyDefs


@dataclass(frozen=True)
class IpvsDefs:
    conn: ConnDefs
    udp: UdpDefs
    tcp: TcpDefs


@dataclass(frozen=True)
class SaPoolDefs:
    pool_hash_size: int  # informational: local ports are per-CPU ranges, not a hashed pool


# ---------------------------------------------------------------- keepalived-style declarations


@dataclass(frozen=True)
class HttpUrl:
    path: str
    status_code: Tuple[Tuple[int, int], ...]  # inclusive ranges; empty: any 2xx
    digest: Optional[str]  # md5 of the body, lower-case hex
    username: Optional[str] = None  # HTTP basic authentication (keepalived's url username/password)
    password: Optional[str] = None
    virtualhost: Optional[str] = None  # this URL's Host header; None: the check's

    def accepts(self, code: int) -> bool:
        if not self.status_code:
            return 200 <= code <= 299
        return any(lo <= code <= hi for lo, hi in self.status_code)


UDP_MAX_REPLY_LENGTH = 255  # UDP_CHECK max_reply_length default (check_udp.c: UINT8_MAX)


@dataclass(frozen=True)
class Checker:
    """What every checker shares; the health module runs them."""

    kind: str  # TCP_CHECK | HTTP_GET | SSL_GET | UDP_CHECK | SMTP_CHECK | MISC_CHECK
    retry: int  # retries after a failure before the real server is declared down
    delay_before_retry: float  # seconds
    delay_loop: float  # seconds between checks (the virtual_server's unless set here)
    warmup: Optional[float]  # seconds: random delay before the first check


@dataclass(frozen=True)
class NetChecker(Checker):
    """A checker that connects. None for connect_ip/connect_port means the real server's own."""

    connect_ip: Optional[IPAddress]
    connect_port: Optional[int]
    bindto: Optional[IPAddress]
    bind_port: Optional[int]
    connect_timeout: float  # seconds


@dataclass(frozen=True)
class TcpCheck(NetChecker):
    where: Optional[Where] = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class SslDefs:
    """keepalived's top-level `SSL { }` block (check_parser.c): the TLS context every SSL_GET uses. The client
    certificate (with its key, and the key's password) is presented to servers that ask for one; the CA is loaded,
    and, as in keepalived, verifies nothing."""

    password: Optional[str]
    ca: Optional[str]
    certificate: Optional[str]
    key: Optional[str]
    where: Optional[Where] = field(default=None, compare=False, repr=False)

    def __repr__(self) -> str:  # no password in logs or tracebacks
        return f"SslDefs(ca={self.ca!r}, certificate={self.certificate!r}, key={self.key!r})"


@dataclass(frozen=True)
class HttpCheck(NetChecker):
    url: Tuple[HttpUrl, ...]
    virtualhost: Optional[str]  # Host header; the virtual_server's unless set here
    where: Optional[Where] = field(default=None, compare=False, repr=False)
    http_protocol: str = "1.0C"  # keepalived's: "1.0", "1.0C" (Connection: close) or "1.1"
    enable_sni: bool = False  # SSL_GET: send the virtualhost as TLS SNI
    tls: Optional[SslDefs] = None  # SSL_GET: the file's SSL block (set by the loader); None: no client certificate


@dataclass(frozen=True)
class UdpCheck(NetChecker):
    payload: Optional[bytes]
    # None: any outcome but ICMP port-unreachable counts as up; b"": a reply is needed; else its prefix.
    require_reply: Optional[bytes]
    where: Optional[Where] = field(default=None, compare=False, repr=False)
    # keepalived's bounds (check_udp.c) on a reply judged against require_reply DATA: shorter or longer fails
    min_reply_length: int = 0
    max_reply_length: int = UDP_MAX_REPLY_LENGTH


@dataclass(frozen=True)
class SmtpHost:
    """An SMTP_CHECK `host { }` block: another address the dialogue must pass at; None: the check's own."""

    connect_ip: Optional[IPAddress]
    connect_port: Optional[int]
    bindto: Optional[IPAddress]
    bind_port: Optional[int]
    connect_timeout: Optional[float]  # seconds
    where: Optional[Where] = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class SmtpCheck(NetChecker):
    helo_name: str  # sent in HELO
    hosts: Tuple[SmtpHost, ...]  # empty: the check's own address (the real server's unless connect_ip)
    where: Optional[Where] = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class MiscCheck(Checker):
    misc_path: str  # a command line, run through no shell
    misc_timeout: Optional[float]  # seconds; None: the virtual_server's delay_loop
    misc_dynamic: bool  # exit codes 2..255 set weight = code - 2
    user: Optional[str]
    where: Optional[Where] = field(default=None, compare=False, repr=False)
    # global_defs enable_script_security, set by the health manager (not a keyword of the check itself): refuse
    # to run the command as root when it, or a directory on its path, is writable by anyone but root
    script_security: bool = False


@dataclass(frozen=True)
class NotifyScript:
    """keepalived's `notify_up|notify_down|quorum_up|quorum_down SCRIPT [USER [GROUP]]`: SCRIPT is one word or a
    quoted command line (split into words like misc_path, run through no shell); USER [GROUP] run it as them."""

    command: str
    user: Optional[str] = None  # "USER" or "USER GROUP"; None: global_defs script_user, else hdslbd's own


@dataclass(frozen=True)
class RealServer:
    ip: IPAddress
    port: int  # 0 only under SNAT, or in a `virtual_server group`: each member's port
    weight: int  # 0..65535; 0 keeps existing conns but schedules nothing new
    inhibit_on_failure: bool  # on failure set weight 0 instead of removing the server
    uthreshold: Optional[int]  # upper conn threshold (None: unlimited)
    lthreshold: Optional[int]
    notify_up: Optional[NotifyScript]  # run when its checks bring it up
    notify_down: Optional[NotifyScript]  # run when its checks take it down
    checkers: Tuple[Checker, ...]
    where: Optional[Where] = field(default=None, compare=False, repr=False)
    # keepalived 2's defaults for this server's checkers (None: the virtual server's, then the checker kind's);
    # the checkers carry the resolved values, these stay as written
    retry: Optional[int] = None
    delay_before_retry: Optional[float] = None  # seconds
    warmup: Optional[float] = None  # seconds
    connect_timeout: Optional[float] = None  # seconds
    delay_loop: Optional[float] = None  # seconds
    virtualhost: Optional[str] = None

    @property
    def key(self) -> Tuple[IPAddress, int]:
        return (self.ip, self.port)


@dataclass(frozen=True)
class VirtualServer:
    """`virtual_server IP PORT { … }` (ip/port set), `virtual_server group NAME { … }` (group set) or, for SNAT,
    DPVS keepalived's `virtual_server match NAME { … }` (match set: src-range/dst-range/iif/oif select it)."""

    ip: Optional[IPAddress]
    port: Optional[int]
    group: Optional[str]
    match: Optional[str]  # the name of a SNAT match service
    protocol: str  # "TCP" | "UDP" | "ICMP" (ICMP: SNAT match services only)
    lb_algo: str  # rr wrr lc wlc sh dh mh conhash fo
    lb_kind: str  # NAT DR TUNNEL FNAT SNAT
    src_range: Optional[str]  # SNAT match: inside source addresses, IP or IP1-IP2
    dst_range: Optional[str]  # SNAT match: destinations, IP or IP1-IP2
    iif: Optional[str]  # SNAT match: ingress interface
    oif: Optional[str]  # SNAT match: egress interface (the route to the destination's)
    sh_port: bool  # keepalived sh-port: sh hashes the client port too
    sh_fallback: bool  # keepalived sh-fallback: what hdslb always does
    mh_port: bool  # keepalived mh-port
    mh_fallback: bool  # keepalived mh-fallback: what hdslb always does
    hash_table_size: Optional[int]  # hdslb: buckets of an sh/dh/mh/conhash table (mh: a prime)
    delay_loop: float  # seconds between health checks
    persistence_timeout: int  # seconds; 0: no persistence
    persistence_granularity: Optional[int]  # prefix length of the client mask; None: host
    virtualhost: Optional[str]
    alpha: bool  # real servers start down until their first check passes
    omega: bool  # run quorum_down when the service is removed
    quorum: int
    hysteresis: int
    quorum_up: Optional[NotifyScript]  # run when the live weight regains quorum + hysteresis
    quorum_down: Optional[NotifyScript]  # run when it falls below quorum - hysteresis
    sorry_server: Optional[Endpoint]
    sorry_server_inhibit: bool
    inhibit_on_failure: bool
    ha_suspend: bool
    ops: bool  # one-packet scheduling (UDP): no conn entry
    syn_proxy: bool
    establish_timeout: Optional[int]  # seconds, overrides tcp timeout established for this service
    laddr_group_name: Optional[str]
    daddr_group_name: Optional[str]  # deny_address_group
    waddr_group_name: Optional[str]  # allow_address_group
    real_servers: Tuple[RealServer, ...]
    where: Optional[Where] = field(default=None, compare=False, repr=False)
    hash_target: Optional[str] = None  # DPVS keepalived's conhash key: "sip", what conhash hashes (source address)
    # keepalived 2's defaults for every checker of the service (None: the checker kind's)
    retry: Optional[int] = None
    delay_before_retry: Optional[float] = None  # seconds
    warmup: Optional[float] = None  # seconds
    connect_timeout: Optional[float] = None  # seconds

    @property
    def key(self) -> Tuple[str, str]:
        """Identity across reloads: (protocol, "IP:PORT", "group NAME" or "match NAME")."""
        if self.group is not None:
            return (self.protocol, f"group {self.group}")
        if self.match is not None:
            return (self.protocol, f"match {self.match}")
        return (self.protocol, str(Endpoint(self.ip, self.port)))

    def __str__(self) -> str:
        return f"{self.key[1]}/{self.protocol}"


@dataclass(frozen=True)
class VirtualServerGroup:
    name: str
    members: Tuple[Endpoint, ...]  # ranges are expanded
    where: Optional[Where] = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class LocalAddress:
    ip: IPAddress
    interface: Optional[str]  # where the address lives; None: the route to the real server decides

    def __str__(self) -> str:
        return f"{self.ip} {self.interface}" if self.interface else str(self.ip)


@dataclass(frozen=True)
class LocalAddressGroup:
    name: str
    addresses: Tuple[LocalAddress, ...]  # ranges are expanded
    where: Optional[Where] = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class AddressGroup:
    """deny_address_group / allow_address_group: client networks (ranges collapse to CIDRs for an LPM map)."""

    name: str
    networks: Tuple[IPNetwork, ...]
    where: Optional[Where] = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Config:
    source: str
    files: Tuple[str, ...]  # every file read, includes too: what a reload watcher stats
    global_defs: GlobalDefs
    netif_defs: NetifDefs
    worker_defs: WorkerDefs
    neigh_defs: NeighDefs
    ipv4_defs: Ipv4Defs
    ipv6_defs: Ipv6Defs
    ctrl_defs: CtrlDefs
    ipvs_defs: IpvsDefs
    sa_pool: SaPoolDefs
    virtual_servers: Tuple[VirtualServer, ...]
    virtual_server_groups: Mapping[str, VirtualServerGroup]
    local_address_groups: Mapping[str, LocalAddressGroup]
    deny_address_groups: Mapping[str, AddressGroup]
    allow_address_groups: Mapping[str, AddressGroup]
    ssl: Optional[SslDefs]  # keepalived's SSL block; its SSL_GET checkers carry it too (HttpCheck.tls)
    notices: Tuple[Notice, ...] = field(compare=False)
    settings: Mapping[str, Setting] = field(compare=False, repr=False)
    # the top file's text as it was read for this Config (what GET /v2/config shows while it runs: the file on disk
    # may have been edited since, or refused by a reload); None where no file was read
    text: Optional[str] = field(default=None, compare=False, repr=False)

    @property
    def ctl_socket(self) -> Optional[str]:
        """The control socket the file names (`ctrl_defs { ipc_msg { unix_domain PATH } }`), or None where it names
        none: the keyword's default must not stand over $HDSLB_CTRL, which selects the instance when the file is
        silent (hdslbd and `hdslb-ctl up` resolve --ctl-socket, then this, then $HDSLB_CTRL, then the default)."""
        return self.ctrl_defs.ctl_socket if "ctrl_defs.ipc_msg.unix_domain" in self.settings else None

    def endpoints(self, vs: VirtualServer) -> Tuple[Endpoint, ...]:
        """The (VIP, port) pairs a virtual_server answers on: one, or its group's members."""
        if vs.group is not None:
            return self.virtual_server_groups[vs.group].members
        if vs.match is not None:
            return ()
        return (Endpoint(vs.ip, vs.port),)

    def virtual_server(self, protocol: str, address: str) -> VirtualServer:
        """Look one up by key, e.g. ("TCP", "10.0.0.1:80") or ("UDP", "group dns")."""
        for vs in self.virtual_servers:
            if vs.key == (protocol.upper(), address):
                return vs
        raise KeyError(f"{address}/{protocol}")
