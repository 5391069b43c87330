"""What the in-process bench scripts (config_load, health_burst) share: a daemon over a config file whose own
side effects (saving the model, resolving next hops, announcing addresses) do nothing, so what is measured is
its config and health code alone; give it a Balancer over hdslb.balancer.NullDataPath or real maps."""

from __future__ import annotations

import os
import time

IFACES = (("eth0", 2, b"\x02" * 6, 1500), ("eth1", 3, b"\x04" * 6, 1500))


def quiet_daemon(conf: str, state_dir: str):
    from hdslb.daemon import Daemon, settings_from_args

    class Quiet(Daemon):
        def _save_state(self):  # the model file is not what is measured (saves stay coalesced as they would be)
            self._last_save = time.monotonic()

        def resolve_soon(self):
            pass

        def announce(self, *x):
            pass

    os.environ.pop("HDSLB_CTRL", None)
    return Quiet(settings_from_args(["-f", conf, "eth0", "--state-dir", state_dir]))


def ifaces() -> dict:
    from hdslb.balancer import Iface

    return {name: Iface(name, idx, mac, mtu) for name, idx, mac, mtu in IFACES}
