"""Jenkins hash exactly as the kernel's include/linux/jhash.h, and the flow hash the XDP fast path mirrors in C.

Everything here is u32 arithmetic modulo 2**32, written so each line maps onto one line of C. The fast path
computes only `flow_hash()` (one jhash_2words call); the byte-string `jhash()` is used by the control plane alone
(Maglev permutations, consistent-hash virtual nodes), so it needs no C twin but still follows jhash.h to the
letter: the kernel's jhash on a little-endian CPU, which is also Bob Jenkins' lookup3 hashlittle().
"""

from __future__ import annotations

import ipaddress
from typing import Sequence, Union

JHASH_INITVAL = 0xDEADBEEF  # jhash.h: "an arbitrary initial parameter"
_M = 0xFFFFFFFF

Address = Union[str, int, ipaddress.IPv4Address, ipaddress.IPv6Address]


def _rol32(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & _M


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    """__jhash_mix: mix three u32 values reversibly (every two lines here are one line of jhash.h)."""
    a = ((a - c) & _M) ^ _rol32(c, 4)
    c = (c + b) & _M
    b = ((b - a) & _M) ^ _rol32(a, 6)
    a = (a + c) & _M
    c = ((c - b) & _M) ^ _rol32(b, 8)
    b = (b + a) & _M
    a = ((a - c) & _M) ^ _rol32(c, 16)
    c = (c + b) & _M
    b = ((b - a) & _M) ^ _rol32(a, 19)
    a = (a + c) & _M
    c = ((c - b) & _M) ^ _rol32(b, 4)
    b = (b + a) & _M
    return a, b, c


def _final(a: int, b: int, c: int) -> int:
    """__jhash_final: final mixing of (a, b, c) into c; only c is returned, as in the kernel."""
    c = ((c ^ b) - _rol32(b, 14)) & _M
    a = ((a ^ c) - _rol32(c, 11)) & _M
    b = ((b ^ a) - _rol32(a, 25)) & _M
    c = ((c ^ b) - _rol32(b, 16)) & _M
    a = ((a ^ c) - _rol32(c, 4)) & _M
    b = ((b ^ a) - _rol32(a, 14)) & _M
    c = ((c ^ b) - _rol32(b, 24)) & _M
    return c


def jhash(key: bytes, initval: int = 0) -> int:
    """jhash(key, length, initval) over bytes; whole 12-byte blocks are read little-endian (x86/arm64 CPUs)."""
    n = len(key)
    a = b = c = (JHASH_INITVAL + n + initval) & _M
    i = 0
    # All but the last block, which may be a full 12 bytes: jhash.h loops while length > 12, not >= 12.
    while n > 12:
        a = (a + int.from_bytes(key[i:i + 4], "little")) & _M
        b = (b + int.from_bytes(key[i + 4:i + 8], "little")) & _M
        c = (c + int.from_bytes(key[i + 8:i + 12], "little")) & _M
        a, b, c = _mix(a, b, c)
        n -= 12
        i += 12
    if n == 0:
        return c  # empty key (or nothing left): no final mix, exactly as the kernel's `case 0`
    # The tail is assembled byte by byte, least significant first, which equals a little-endian read of the
    # zero-padded block; that is what the kernel's switch with fall-through does.
    tail = key[i:i + n] + bytes(12 - n)
    a = (a + int.from_bytes(tail[0:4], "little")) & _M
    b = (b + int.from_bytes(tail[4:8], "little")) & _M
    c = (c + int.from_bytes(tail[8:12], "little")) & _M
    return _final(a, b, c)


def jhash2(words: Sequence[int], initval: int = 0) -> int:
    """jhash2(k, length, initval) over u32 words (length counts words)."""
    n = len(words)
    a = b = c = (JHASH_INITVAL + (n << 2) + initval) & _M
    i = 0
    while n > 3:
        a = (a + words[i]) & _M
        b = (b + words[i + 1]) & _M
        c = (c + words[i + 2]) & _M
        a, b, c = _mix(a, b, c)
        n -= 3
        i += 3
    if n == 0:
        return c
    rest = list(words[i:i + n]) + [0] * (3 - n)
    return _final((a + rest[0]) & _M, (b + rest[1]) & _M, (c + rest[2]) & _M)


def _nwords(a: int, b: int, c: int, initval: int) -> int:
    """__jhash_nwords: hash exactly 3, 2 or 1 word(s); initval already carries JHASH_INITVAL + (n << 2)."""
    return _final((a + initval) & _M, (b + initval) & _M, (c + initval) & _M)


def jhash_3words(a: int, b: int, c: int, initval: int = 0) -> int:
    return _nwords(a & _M, b & _M, c & _M, (initval + JHASH_INITVAL + (3 << 2)) & _M)


def jhash_2words(a: int, b: int, initval: int = 0) -> int:
    return _nwords(a & _M, b & _M, 0, (initval + JHASH_INITVAL + (2 << 2)) & _M)


def jhash_1word(a: int, initval: int = 0) -> int:
    return _nwords(a & _M, 0, 0, (initval + JHASH_INITVAL + (1 << 2)) & _M)


def addr_word(addr: Address) -> int:
    """An address as one u32 in host order, the way the C side reads it from the packet.

    IPv4: bpf_ntohl(iph->saddr), so 10.0.0.1 is 0x0a000001. IPv6: the XOR of the four bpf_ntohl(s6_addr32[i]),
    the same fold LVS's sh/dh/mh and DPVS's conhash use, so one code path serves both families.
    An int is taken as an IPv4 address already in host order.
    """
    if isinstance(addr, int) and not isinstance(addr, bool):
        if not 0 <= addr <= _M:
            raise ValueError(f"address word {addr!r} does not fit in 32 bits")
        return addr
    ip = addr if isinstance(addr, (ipaddress.IPv4Address, ipaddress.IPv6Address)) else ipaddress.ip_address(addr)
    v = int(ip)
    if ip.version == 4:
        return v
    return (v >> 96 ^ v >> 64 ^ v >> 32 ^ v) & _M


def flow_hash(addr: Address, port: int = 0, seed: int = 0) -> int:
    """The one hash the fast path computes for a new flow: jhash_2words(addr_word, port, seed).

    `port` is in host order (bpf_ntohs) and is 0 unless the table hashes the port too (Table.key ends in
    "+port"); keeping the port argument even when it is 0 means C has a single call and no branch on the key.
    """
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port!r} out of range 0..65535")
    return jhash_2words(addr_word(addr), port, seed & _M)
