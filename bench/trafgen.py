"""trafgen (netsniff-ng) as the second, slower opinion on 64-byte UDP packets/s.

The live-frames generator (livegen.py) transmits from inside the kernel's test-run loop; trafgen is an
ordinary user-space generator (PF_PACKET with a TX ring) sending the same frame with a random 2-byte UDP
source port per packet. Same interface as livegen.LiveGen (start, stop, sent, rate), so the e2e section
pumps either one the same way. It runs pinned to one CPU inside the client's namespace and never touches
host-wide settings (--no-sock-mem, --notouch-irq).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time

ETH_UDP_SPORT_OFF = 14 + 20


def config(frame: bytes, sport_off: int = ETH_UDP_SPORT_OFF) -> str:
    """trafgen's packet config: the frame's bytes, the UDP source port random for every packet."""
    b = [f"0x{x:02x}" for x in frame]
    b[sport_off:sport_off + 2] = ["drnd(2)"]
    return "{ " + ", ".join(b) + " }\n"


def _tx_packets(ns: str, ifname: str) -> int:
    r = subprocess.run(["ip", "netns", "exec", ns, "cat", f"/sys/class/net/{ifname}/statistics/tx_packets"],
                       capture_output=True, text=True, check=True, timeout=10)
    return int(r.stdout)


class TrafGen:
    def __init__(self, ns: str, ifname: str, frame: bytes, cpu: int | None = 0):
        self.exe = shutil.which("trafgen")
        if self.exe is None:
            raise FileNotFoundError("trafgen not installed (Debian package netsniff-ng; `make bench` installs it)")
        self.ns, self.ifname, self.cpu = ns, ifname, cpu
        fd, self.cfg = tempfile.mkstemp(prefix="hdslb-trafgen-", suffix=".cfg")
        with os.fdopen(fd, "w") as f:
            f.write(config(frame))
        self.proc: subprocess.Popen | None = None
        self.sent = 0
        self._tx0 = 0
        self._t0 = self._t1 = 0.0

    def start(self) -> "TrafGen":
        self._tx0 = _tx_packets(self.ns, self.ifname)
        pin = ["taskset", "-c", str(self.cpu)] if self.cpu is not None else []
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, *pin, self.exe, "--dev", self.ifname,
                                      "--conf", self.cfg, "--cpus", "1", "--no-sock-mem", "--notouch-irq"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self._t0 = time.monotonic()
        return self

    def stop(self) -> None:
        err = b""
        try:
            if self.proc is not None:
                if self.proc.poll() is None:
                    os.killpg(self.proc.pid, signal.SIGINT)
                try:
                    _, err = self.proc.communicate(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    _, err = self.proc.communicate()
                self._t1 = time.monotonic()
                self.sent = _tx_packets(self.ns, self.ifname) - self._tx0
                if self.sent <= 0:
                    raise RuntimeError(f"trafgen sent nothing: {err.decode(errors='replace').strip()[-300:]}")
        finally:
            self.proc = None
            try:
                os.unlink(self.cfg)
            except FileNotFoundError:
                pass

    @property
    def rate(self) -> float:
        """Frames per second the client's interface transmitted while trafgen ran."""
        return self.sent / (self._t1 - self._t0) if self._t1 > self._t0 else 0.0
