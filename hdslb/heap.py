"""Keeps CPython's cyclic garbage collector off the daemon's long-lived model.

A big installation's model (10k services x 10 real servers, 100k routes) is hundreds of thousands of Python
objects that live as long as the daemon. Every full collection walks all of them with the event loop held (the
slow path's ARP/ND answers, health checks and every control call wait), and full collections come often while
big replies are built (service.list at 10k x 10 builds ~110k dicts a call). gc.freeze() moves what is alive to a
permanent generation that no collection walks.

Frozen objects that later become unreachable are still freed by their reference counts; only reference cycles
among them would wait for the next settle. So a settle unfreezes, collects once and freezes again, and settles
come only when the model has grown or shrunk by a lot since the last one (a bulk load, a reload, a restore),
never for each small change: one full collection then, instead of one every few listings.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)

# A settle when the model's size moved by this many objects (services + real servers + routes + ...) since the
# last one, or by a quarter of it, whichever is more.
MIN_CHANGE = 2000


class HeapSettler:
    """Decides when to freeze the heap again, does it, and says what it did (daemon.status "heap")."""

    def __init__(self, enabled: bool = False, min_change: int = MIN_CHANGE):
        # Off unless the process is hdslbd itself: freezing a test runner's heap would keep every earlier
        # test's cycles alive.
        self.enabled = enabled
        self.min_change = min_change
        self.size: int | None = None  # the model's size at the last settle
        self.settles = 0
        self.last_pause_s: float | None = None
        self.frozen = 0  # objects frozen at the last settle (gc.get_freeze_count() walks them all: 7 ms at 500k)

    def due(self, size: int) -> bool:
        if not self.enabled:
            return False
        if self.size is None:
            return True
        return abs(size - self.size) >= max(self.min_change, self.size // 4)

    def settle(self, size: int) -> float:
        """Collect once and freeze what is left; returns the pause (seconds)."""
        t0 = time.perf_counter()
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        pause = time.perf_counter() - t0
        self.size, self.last_pause_s, self.frozen = size, pause, gc.get_freeze_count()
        self.settles += 1
        log.debug("heap settled at a model of %d objects: %d frozen, %.3f s", size, self.frozen, pause)
        return pause

    def maybe_settle(self, size: int) -> bool:
        if not self.due(size):
            return False
        self.settle(size)
        return True

    def status(self) -> dict:
        return {"enabled": self.enabled, "frozen_objects": self.frozen, "settles": self.settles,
                "model_size": self.size,
                "last_pause_ms": None if self.last_pause_s is None else round(self.last_pause_s * 1e3, 1)}


def model_size(b) -> int:
    """How big the model is, in the units due() compares: services, real servers, local addresses, addresses,
    routes and neighbours (each a handful of Python objects)."""
    n = len(b.services) + len(b.addrs) + len(b.routes) + len(b.neighs)
    for v in b.services.values():
        n += len(v.dests) + len(v.laddrs)
    return n
