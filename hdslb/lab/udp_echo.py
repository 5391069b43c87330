"""A tiny asyncio UDP server for the labs: answers each datagram with "<name> <src ip>:<src port>".

    python -m hdslb.lab.udp_echo --port 53 --name rs1 [--bind 0.0.0.0 | --bind ::]

The reply leaves from the address the request was sent to (IP_PKTINFO / IPV6_PKTINFO), not from the
route's preferred source: with DR or TUNNEL the request is addressed to a VIP held on lo, and a reply
from the server's own address would never match the client's flow.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import signal
import socket
import struct
import sys

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # Linux value; CPython does not always export it
_IN_PKTINFO = struct.Struct("=i4s4s")  # ifindex, spec_dst, addr (header destination)
_IN6_PKTINFO = struct.Struct("=16sI")  # addr, ifindex
_CMSG_SPACE = socket.CMSG_SPACE(max(_IN_PKTINFO.size, _IN6_PKTINFO.size))


def _display(ip: str) -> str:
    """A v4-mapped source on a dual-stack socket is shown as the IPv4 address it is."""
    try:
        a = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    return str(a.ipv4_mapped) if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped else ip


def reply_text(name: str, ip: str, port: int) -> bytes:
    """'rs1 192.168.100.1:40000'; IPv6 sources are bracketed ('rs1 [fd00:100::1]:40000')."""
    shown = _display(ip)
    return (f"{name} [{shown}]:{port}" if ":" in shown else f"{name} {shown}:{port}").encode()


class UdpEcho:
    """One bound socket served from the event loop through add_reader (asyncio's datagram transport
    hides ancillary data, which we need for the reply's source address)."""

    def __init__(self, name: str, bind: str = "0.0.0.0", port: int = 53):
        self.name = name
        self.v6 = ":" in bind
        self.sock = socket.socket(socket.AF_INET6 if self.v6 else socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.v6:
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # also serve IPv4
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        self.sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)  # v4 (and v4-mapped on a dual socket)
        self.sock.bind((bind, port))
        self.sock.setblocking(False)
        self.count = 0

    def _on_readable(self) -> None:
        while True:
            try:
                _data, anc, _flags, src = self.sock.recvmsg(65535, _CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # e.g. an ICMP error queued by an earlier reply; keep serving
            self.count += 1
            try:
                self.sock.sendmsg([reply_text(self.name, src[0], src[1])], self._reply_cmsg(anc), 0, src)
            except OSError:
                pass  # a client gone or unreachable must not stop the server

    @staticmethod
    def _reply_cmsg(anc) -> list:
        """Turn the request's destination into the reply's source (ifindex 0: let routing pick the link)."""
        for level, kind, data in anc:
            if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= _IN_PKTINFO.size:
                _ifindex, _spec, dst = _IN_PKTINFO.unpack_from(data)
                return [(socket.IPPROTO_IP, IP_PKTINFO, _IN_PKTINFO.pack(0, dst, b"\0" * 4))]
            if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= _IN6_PKTINFO.size:
                dst, _ifindex = _IN6_PKTINFO.unpack_from(data)
                return [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, _IN6_PKTINFO.pack(dst, 0))]
        return []

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
        loop.add_reader(self.sock.fileno(), self._on_readable)
        try:
            await stop
        finally:
            loop.remove_reader(self.sock.fileno())
            self.sock.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hdslb.lab.udp_echo", description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=53)
    ap.add_argument("--name", default=socket.gethostname())
    ap.add_argument("--bind", default="0.0.0.0", help="'::' serves IPv4 and IPv6 on one socket")
    args = ap.parse_args(argv)
    server = UdpEcho(args.name, args.bind, args.port)
    print(f"udp_echo {args.name} on {args.bind}:{args.port}", flush=True)
    asyncio.run(server.serve())
    print(f"udp_echo {args.name}: {server.count} datagrams answered", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
