"""BPF_PROG_TEST_RUN through the raw bpf(2) syscall (bcc 0.26 has no wrapper): run a program on a packet."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_SYS_BPF = 321  # x86_64
BPF_PROG_TEST_RUN = 10

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)
VERDICTS = {0: "XDP_ABORTED", 1: "XDP_DROP", 2: "XDP_PASS", 3: "XDP_TX", 4: "XDP_REDIRECT"}


class _TestAttr(ctypes.Structure):
    # union bpf_attr, the "test" member (include/uapi/linux/bpf.h)
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


class _XdpMd(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_uint32),
        ("data_end", ctypes.c_uint32),
        ("data_meta", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("rx_queue_index", ctypes.c_uint32),
        ("egress_ifindex", ctypes.c_uint32),
    ]


def run_xdp(prog_fd: int, packet: bytes, repeat: int = 1, ingress_ifindex: int | None = None, rx_queue: int = 0):
    """Run an XDP program once (or `repeat` times) on `packet`.

    Returns (verdict, output bytes, mean duration ns). With ingress_ifindex the program sees that
    interface as ctx->ingress_ifindex (it must exist in the caller's network namespace) and rx_queue as
    ctx->rx_queue_index (one of the interface's receive queues).
    """
    inbuf = ctypes.create_string_buffer(bytes(packet), len(packet))
    outbuf = ctypes.create_string_buffer(len(packet) + 512)
    attr = _TestAttr()
    attr.prog_fd = prog_fd
    attr.data_in = ctypes.addressof(inbuf)
    attr.data_size_in = len(packet)
    attr.data_out = ctypes.addressof(outbuf)
    attr.data_size_out = len(outbuf)
    attr.repeat = repeat
    ctx = None
    if ingress_ifindex is not None:
        ctx = _XdpMd(0, len(packet), 0, ingress_ifindex, rx_queue, 0)
        attr.ctx_in = ctypes.addressof(ctx)
        attr.ctx_size_in = ctypes.sizeof(ctx)
    rc = _libc.syscall(_SYS_BPF, BPF_PROG_TEST_RUN, ctypes.byref(attr), ctypes.sizeof(attr))
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_PROG_TEST_RUN: {os.strerror(err)}")
    return attr.retval, outbuf.raw[: attr.data_size_out], attr.duration
