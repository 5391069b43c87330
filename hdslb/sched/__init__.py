"""Schedulers as pure functions: a service's real servers in, the lookup table the XDP fast path indexes out.

    table = build_table("wrr", [Dest(slot_id=3, weight=3), Dest(slot_id=7, weight=1)], max_len=1024)

See model.py for how the fast path reads a Table, hashing.py for the hash C must mirror. No I/O, no bcc.
"""

from __future__ import annotations

import inspect
from typing import Callable, Iterable, Optional

from . import hashed, ring
from .hashed import conhash, dh, is_prime, mh, sh
from .hashing import addr_word, flow_hash, jhash, jhash2, jhash_1word, jhash_2words, jhash_3words
from .model import (HASH, KEY_DST, KEY_NONE, KEY_SRC, KEY_SRC_PORT, RING, Dest, DestFlag, SchedError, Table,
                    available, check_dests, scale_weights)
from .ring import fo, lc, overhead, pick_least, rr, wlc, wrr, wrr_sequence

# Operator-facing names (ipvsadm -s / keepalived lb_algo) to builders; every builder takes
# (dests, max_len=None, **its own parameters) and returns a Table.
BUILDERS: dict[str, Callable[..., Table]] = {
    "rr": rr,
    "wrr": wrr,
    "lc": lc,
    "wlc": wlc,
    "sh": sh,
    "dh": dh,
    "mh": mh,
    "conhash": conhash,
    "fo": fo,
}


_PARAMS: dict = {}  # builder -> its parameters: inspect.signature costs ~50 us, once per table in bulk loads


def params_of(sched: str) -> dict[str, object]:
    """The tunables a scheduler accepts and their defaults (e.g. mh: size, port, seed), for config and `show`."""
    if sched not in BUILDERS:
        raise SchedError(f"unknown scheduler {sched!r} (known: {', '.join(BUILDERS)})")
    fn = BUILDERS[sched]
    params = _PARAMS.get(fn)
    if params is None:
        sig = inspect.signature(fn)
        params = _PARAMS[fn] = {n: p.default for n, p in sig.parameters.items() if n not in ("dests", "max_len")}
    return dict(params)


def build_table(sched: str, dests: Iterable[Dest], max_len: Optional[int] = None, **params) -> Table:
    """Build the table for `sched` over `dests` (list order matters for rr, wrr, fo, lc, wlc, sh, dh).

    max_len is the longest table the fast path holds: rr/wrr rings longer than it are scaled down (wrr), hash
    tables larger than it are refused; None means no limit. Unknown parameters are refused by name rather than
    ignored, so a typo in a config never silently falls back to a default.
    """
    allowed = params_of(sched)
    for name in params:
        if name not in allowed:
            raise SchedError(f"scheduler {sched} takes no parameter {name!r} "
                             f"(it takes: {', '.join(allowed) or 'none'})")
    if max_len is not None and (not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1):
        raise SchedError(f"max_len must be a positive integer, got {max_len!r}")
    return BUILDERS[sched](check_dests(dests), max_len=max_len, **params)


__all__ = [
    "BUILDERS", "HASH", "KEY_DST", "KEY_NONE", "KEY_SRC", "KEY_SRC_PORT", "RING", "Dest", "DestFlag",
    "SchedError", "Table", "addr_word", "available", "build_table", "conhash", "dh", "flow_hash", "fo",
    "hashed", "is_prime", "jhash", "jhash2", "jhash_1word", "jhash_2words", "jhash_3words", "lc",
    "mh", "overhead", "params_of", "pick_least", "ring", "rr", "scale_weights", "sh", "wlc",
    "wrr", "wrr_sequence",
]
