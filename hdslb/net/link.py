"""What `dpip link show` says of an interface beyond the model's name/index/MAC/MTU: the kernel's view from sysfs.

DPVS prints a port's NUMA socket, queue counts, link state, speed and duplex (link.c dump_nic_basic); scripts count
its `UP` words. The kernel keeps the same facts under /sys/class/net/IF. A sysfs mounted for another network
namespace may hold a different interface of the same name: its ifindex is checked, and a mismatch (or no
directory) gives the unknown values below rather than another device's state.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct

SYSFS_NET = "/sys/class/net"

UNKNOWN = {"state": "UNKNOWN", "speed": 0, "duplex": "", "numa": 0, "rxq": 0, "txq": 0}


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:  # EINVAL: speed/duplex/carrier of a device that is down; ENOENT: not there
        return None


def _int(text: str | None, default: int) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


def link_facts(name: str, ifindex: int, root: str = SYSFS_NET) -> dict:
    """{state: UP|DOWN|UNKNOWN, speed: Mbps (0 unknown), duplex: full-duplex|half-duplex|'', numa: node (0 when
    the device has none, as DPDK reports a single-socket port), rxq, txq: queue counts}."""
    base = os.path.join(root, name)
    if _int(_read(os.path.join(base, "ifindex")), -1) != ifindex:
        return dict(UNKNOWN)
    oper = _read(os.path.join(base, "operstate"))
    carrier = _read(os.path.join(base, "carrier"))
    # "unknown" is what drivers without operstate support (tun, dummy) report: their carrier says it
    up = oper == "up" or (oper == "unknown" and carrier == "1")
    speed = _int(_read(os.path.join(base, "speed")), 0)
    duplex = _read(os.path.join(base, "duplex"))
    try:
        queues = os.listdir(os.path.join(base, "queues"))
    except OSError:
        queues = []
    return {"state": "UP" if up else "DOWN",
            "speed": max(speed, 0),  # -1: the driver does not know
            "duplex": f"{duplex}-duplex" if duplex in ("full", "half") else "",
            "numa": max(_int(_read(os.path.join(base, "device", "numa_node")), 0), 0),
            "rxq": sum(q.startswith("rx-") for q in queues),
            "txq": sum(q.startswith("tx-") for q in queues)}


SIOCGIFMTU = 0x8921  # struct ifreq: the name (16 bytes), then ifr_mtu (int) in a 24-byte union


def link_mtu(name: str) -> int:
    """The interface's MTU now, from the kernel of the namespace we run in (SIOCGIFMTU: sysfs may be another
    namespace's). Raises OSError when there is no such interface."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        req = struct.pack("16si12x", name.encode()[:15], 0)
        return struct.unpack("16si12x", fcntl.ioctl(s.fileno(), SIOCGIFMTU, req))[1]
