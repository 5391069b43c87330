"""A two-instruction XDP_PASS program, loaded with raw bpf(2) and attached over netlink (no bcc).

Why it exists: on veth, native-mode XDP_TX and redirects into a veth only work when the *peer* of the
target veth runs an XDP program (ENV-NOTES "XDP on veth"); XDP_PASS is the cheapest program that wakes
the peer's NAPI. The labs attach it to the far end of every veth the balancer transmits on.

Run inside a namespace:  ip netns exec NS python -m hdslb.fastpath.xdp_pass IFACE [--detach] [--generic]
The attachment outlives this process (netlink attach holds its own reference to the program).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import os
import platform
import socket
import struct
import sys

# bpf(2) syscall number per architecture (asm-generic numbering on arm64/riscv).
_SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "i686": 357, "armv7l": 386}

BPF_PROG_LOAD = 5
BPF_PROG_TYPE_XDP = 6
XDP_PASS = 2

# linux/if_link.h XDP_FLAGS_*: attach mode requested on IFLA_XDP_FLAGS.
XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1  # generic (skb) mode
XDP_FLAGS_DRV_MODE = 1 << 2  # native (driver) mode: what veth needs for the peer's NAPI
XDP_FLAGS_HW_MODE = 1 << 3
XDP_FLAGS_REPLACE = 1 << 4  # only over the program IFLA_XDP_EXPECTED_FD names (-1: none), else EEXIST

# IFLA_XDP_ATTACHED values, as reported by the kernel.
XDP_ATTACHED = {0: None, 1: "native", 2: "generic", 3: "offload", 4: "multi"}


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """struct bpf_insn: u8 code, u8 dst:4|src:4 (little-endian bitfield order), s16 off, s32 imm."""
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


# r0 = XDP_PASS (BPF_ALU64 | BPF_MOV | BPF_K); exit (BPF_JMP | BPF_EXIT)
PROGRAM = _insn(0xB7, dst=0, imm=XDP_PASS) + _insn(0x95)


class _ProgLoadAttr(ctypes.Structure):
    """The BPF_PROG_LOAD prefix of union bpf_attr; the kernel accepts any size whose tail is zero."""

    _fields_ = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),  # user pointer
        ("license", ctypes.c_uint64),  # user pointer to a C string
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),  # user pointer
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16),
        ("prog_ifindex", ctypes.c_uint32),
        ("expected_attach_type", ctypes.c_uint32),
    ]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


def load() -> int:
    """Load the XDP_PASS program; return its fd (the caller owns it and closes it after attaching)."""
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        raise OSError(f"bpf(2) syscall number unknown for {platform.machine()}")
    insns = ctypes.create_string_buffer(PROGRAM, len(PROGRAM))
    lic = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(4096)
    attr = _ProgLoadAttr(
        prog_type=BPF_PROG_TYPE_XDP,
        insn_cnt=len(PROGRAM) // 8,
        insns=ctypes.addressof(insns),
        license=ctypes.addressof(lic),
        log_level=1,  # the verifier log is only filled on failure, but then it says why
        log_size=len(log),
        log_buf=ctypes.addressof(log),
        prog_name=b"hdslb_xdp_pass",
    )
    fd = _libc.syscall(ctypes.c_long(nr), ctypes.c_int(BPF_PROG_LOAD), ctypes.byref(attr),
                       ctypes.c_uint(ctypes.sizeof(attr)))
    if fd < 0:
        err = ctypes.get_errno()
        detail = log.value.decode(errors="replace").strip()
        raise OSError(err, f"BPF_PROG_LOAD xdp_pass: {os.strerror(err)}" + (f"\n{detail}" if detail else ""))
    return fd


def _ifindex(ipr, ifname: str) -> int:
    idx = ipr.link_lookup(ifname=ifname)
    if not idx:
        raise OSError(f"no interface {ifname!r} in this network namespace")
    return idx[0]


def attach(ifname: str, generic: bool = False) -> None:
    """Attach XDP_PASS to ifname in the current netns, native mode unless generic; replaces any program."""
    from pyroute2 import IPRoute  # imported late: load() stays usable without pyroute2

    flags = XDP_FLAGS_SKB_MODE if generic else XDP_FLAGS_DRV_MODE
    fd = load()
    try:
        with IPRoute() as ipr:
            ipr.link("set", index=_ifindex(ipr, ifname),
                     xdp={"attrs": [("IFLA_XDP_FD", fd), ("IFLA_XDP_FLAGS", flags)]})
    finally:
        os.close(fd)  # the netlink attachment keeps the program alive


class _XdpAttachOpts(ctypes.Structure):
    """libbpf's struct bpf_xdp_attach_opts (libbpf 1.x): its size, then the program expected in place."""

    _fields_ = [("sz", ctypes.c_size_t), ("old_prog_fd", ctypes.c_int), ("_pad", ctypes.c_int)]


def swap(ifname: str, fd: int, flags: int, expected_fd: int = -1) -> None:
    """Set ifname's XDP program to fd (-1: remove it) in the mode of flags, atomically and only while the program
    there is expected_fd's (-1: none runs there): another program attached since the caller looked is never
    replaced or removed, the kernel refuses (FileExistsError). libbpf's netlink call, not pyroute2's synchronous
    one, which refuses to run inside an event loop (hdslbd's stop detaches from the loop)."""
    lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    lib.bpf_xdp_attach.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_uint32, ctypes.POINTER(_XdpAttachOpts)]
    lib.bpf_xdp_attach.restype = ctypes.c_int
    try:
        ifindex = socket.if_nametoindex(ifname)
    except OSError:
        raise OSError(errno.ENODEV, f"no interface {ifname!r} in this network namespace") from None
    # (libbpf reads old_prog_fd 0 as "none given": -1, the kernel's "none attached", is what REPLACE then expects)
    opts = _XdpAttachOpts(sz=ctypes.sizeof(_XdpAttachOpts), old_prog_fd=max(expected_fd, 0))
    err = lib.bpf_xdp_attach(ifindex, fd, flags | XDP_FLAGS_REPLACE, ctypes.byref(opts))
    if err < 0:
        raise OSError(-err, os.strerror(-err))


def detach(ifname: str, generic: bool = False) -> None:
    """Remove whatever XDP program is attached to ifname in the given mode (fd -1 means none)."""
    from pyroute2 import IPRoute

    flags = XDP_FLAGS_SKB_MODE if generic else XDP_FLAGS_DRV_MODE
    with IPRoute() as ipr:
        ipr.link("set", index=_ifindex(ipr, ifname),
                 xdp={"attrs": [("IFLA_XDP_FD", -1), ("IFLA_XDP_FLAGS", flags)]})


def query(ifname: str) -> tuple[str | None, int | None]:
    """(attach mode, program id) of ifname in the current netns; (None, None) when nothing is attached."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        link = ipr.get_links(_ifindex(ipr, ifname))[0]
    xdp = link.get_attr("IFLA_XDP")
    if xdp is None:
        return None, None
    mode = xdp.get_attr("IFLA_XDP_ATTACHED")
    # pyroute2 decodes the mode through its own value map ('xdp', 'xdpgeneric', ...); normalise.
    mode = {"xdp": "native", "xdpgeneric": "generic", "xdpoffload": "offload", "xdpmulti": "multi"}.get(
        mode, XDP_ATTACHED.get(mode) if isinstance(mode, int) else mode)
    return mode, xdp.get_attr("IFLA_XDP_PROG_ID")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hdslb.fastpath.xdp_pass",
                                 description="Attach (or detach) a bare XDP_PASS program to an interface.")
    ap.add_argument("iface")
    ap.add_argument("--detach", action="store_true", help="remove the program instead of attaching it")
    ap.add_argument("--generic", action="store_true", help="generic (skb) mode instead of native")
    args = ap.parse_args(argv)
    try:
        if args.detach:
            detach(args.iface, args.generic)
        else:
            attach(args.iface, args.generic)
    except OSError as e:
        print(f"xdp_pass: {args.iface}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
