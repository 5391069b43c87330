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

A settle waits for the burst of changes to end (a full collection is expensive). Inside a burst that grows the
model, CPython itself runs a full collection each time the objects it tracks grew by a quarter, each one walking
everything the burst made so far (at 10k REST PUTs of a service with 10 real servers, 0.8 s). So inside a burst
what is alive is frozen, without a collection (gc.freeze() is a list splice), each time the model grew by
MIN_CHANGE: full collections then walk only what came since. Cycles that died inside the burst are collected by
the settle after it.
"""

from __future__ import annotations

import contextlib
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
        self.frozen_size: int | None = None  # the model's size at the last settle or burst freeze
        self.burst_freezes = 0

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
        self.frozen_size = size
        self.settles += 1
        log.debug("heap settled at a model of %d objects: %d frozen, %.3f s", size, self.frozen, pause)
        return pause

    def grew(self, size: int) -> bool:
        """Inside a burst (the settle waits for it to end): freeze what is alive now, without a collection, if the
        model grew by min_change since the last settle or freeze (a freeze costs nothing, and what is left to walk
        stays small). Returns whether it froze."""
        if not self.enabled:
            return False
        if size < (self.frozen_size or 0):
            # The model shrank (ipvsadm -C, a flush) and a burst went on before the settle: growth counts from here.
            # Counted from the bigger size it waited until the model was that big again, full collections walking
            # all of the new burst meanwhile (0.7 s of 10k REST PUTs right after a flush).
            self.frozen_size = size
            return False
        if size - (self.frozen_size or 0) < self.min_change:
            return False
        gc.freeze()
        self.frozen_size = size
        self.burst_freezes += 1
        return True

    def maybe_settle(self, size: int) -> bool:
        if not self.due(size):
            return False
        self.settle(size)
        return True

    def status(self) -> dict:
        return {"enabled": self.enabled, "frozen_objects": self.frozen, "settles": self.settles,
                "burst_freezes": self.burst_freezes,
                "model_size": self.size,
                "last_pause_ms": None if self.last_pause_s is None else round(self.last_pause_s * 1e3, 1)}


_paused = 0  # collections_paused() entered and not left yet (on the event loop's thread)
_resume = False  # whether the collector was on when the first of them began
_collected_at = 0.0  # when the pause began, or when a long one last collected the young generations
# Overlapping uses (two clients listing back to back, scrapes close together) could keep the collector off for
# good, and cycles made meanwhile would never be freed: a pause held this long collects the young generations
# (what was made during it) each time one of its uses ends.
PAUSE_MAX_S = 10.0


@contextlib.contextmanager
def collections_paused():
    """The cyclic collector off while a big reply is built and encoded (service.list or /metrics at 10k services x
    10 real servers: ~1M short-lived objects with no cycles among them). CPython otherwise ran four full
    collections per listing, each walking the reply built so far (15, 55, 95, 130 ms, the event loop held each
    time), and could free none of it: reference counting does, once the reply is sent. Cycles others make meanwhile
    are collected when it is back on, or after PAUSE_MAX_S of a pause that overlapping uses keep going. Nested and
    overlapping uses share one pause."""
    global _paused, _resume, _collected_at
    if _paused == 0:
        _resume = gc.isenabled()
        _collected_at = time.monotonic()
        gc.disable()
    _paused += 1
    try:
        yield
    finally:
        _paused -= 1
        if _paused == 0:
            if _resume:
                gc.enable()
        elif _resume and time.monotonic() - _collected_at >= PAUSE_MAX_S:
            _collected_at = time.monotonic()
            gc.collect(1)


def model_size(b) -> int:
    """How big the model is, in the units due() compares: services, real servers, local addresses, addresses,
    routes and neighbours (each a handful of Python objects)."""
    n = len(b.services) + len(b.addrs) + len(b.routes) + len(b.neighs)
    for v in b.services.values():
        n += len(v.dests) + len(v.laddrs)
    return n
