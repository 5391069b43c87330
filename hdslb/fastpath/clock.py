"""The fast path's connection clock: bpf_jiffies64(), converted here to CLOCK_MONOTONIC nanoseconds.

Why jiffies: the verifier inlines bpf_jiffies64() into a load of one kernel variable, while
bpf_ktime_get_coarse_ns() stays a helper call; every established packet stamps last_seen, and the call was
18 ns of a ~100 ns path (bench/ref_progs ref_alt_jiffies). The price is resolution: one tick (1/HZ, 4 ms at
HZ=250), far below any aging timeout.

The kernel does not export jiffies to user space except through /proc/timer_list ("jiffies: N"), read
here as root; HZ is derived from jiffies' boot offset (INITIAL_JIFFIES = 2**32 - 300 * HZ), or, early after
boot, by watching it tick. The jiffies-to-monotonic offset is re-taken every RECALIBRATE_S, so converting
the same stamp twice gives the same answer within that window.
"""

from __future__ import annotations

import re
import threading
import time

TIMER_LIST = "/proc/timer_list"
KNOWN_HZ = (100, 250, 300, 1000)
RECALIBRATE_S = 10.0
_JIFFIES_RE = re.compile(rb"^jiffies: (\d+)$", re.M)


def read_jiffies(path: str = TIMER_LIST) -> int:
    with open(path, "rb") as f:
        m = _JIFFIES_RE.search(f.read())
    if m is None:
        raise RuntimeError(f"{path}: no 'jiffies:' line (cannot convert the fast path's timestamps)")
    return int(m.group(1))


def _nearest_hz(estimate: float) -> int | None:
    best = min(KNOWN_HZ, key=lambda hz: abs(hz - estimate))
    return best if abs(best - estimate) <= 0.05 * best else None


def detect_hz(read=read_jiffies, mono=time.monotonic, sleep=time.sleep) -> int:
    """CONFIG_HZ of the running kernel."""
    j, t = read(), mono()
    if t > 600:  # jiffies = INITIAL_JIFFIES + HZ * uptime (uptime as CLOCK_MONOTONIC counts it)
        hz = _nearest_hz((j - 2**32) / (t - 300))
        if hz is not None:
            return hz
    sleep(0.25)
    j2, t2 = read(), mono()
    hz = _nearest_hz((j2 - j) / (t2 - t))
    if hz is None:
        raise RuntimeError(f"cannot tell HZ: {j2 - j} jiffies in {t2 - t:.3f} s")
    return hz


class JiffiesClock:
    """jiffies -> CLOCK_MONOTONIC ns."""

    def __init__(self, read=read_jiffies, mono_ns=time.monotonic_ns, hz: int | None = None):
        self._read = read
        self._mono_ns = mono_ns
        self.hz = hz
        self._offset = None
        self._taken = 0
        self._lock = threading.Lock()  # the aging sweep converts from an executor thread

    @property
    def tick_ns(self) -> int:
        if self.hz is None:
            self.hz = detect_hz(self._read)
        return 1_000_000_000 // self.hz

    def _calibrate(self) -> int:
        now = self._mono_ns()
        with self._lock:
            if self._offset is None or now - self._taken > RECALIBRATE_S * 1e9:
                tick = self.tick_ns
                # jiffies advance at the tick, so mono - jiffies*tick is the offset plus up to one tick
                self._offset = min(self._mono_ns() - self._read() * tick for _ in range(3))
                self._taken = now
            return self._offset

    def to_mono_ns(self, jiffies: int) -> int:
        return jiffies * self.tick_ns + self._calibrate()

    def seconds_to_jiffies(self, seconds: float) -> int:
        return int(seconds * 1_000_000_000) // self.tick_ns

    def mono_to_jiffies(self, mono_ns: int) -> int:
        """The jiffies value at CLOCK_MONOTONIC mono_ns (the inverse of to_mono_ns, to within a tick)."""
        return (mono_ns - self._calibrate()) // self.tick_ns
