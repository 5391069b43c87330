"""The aging sweep's template renewal (Daemon.keep_templates) finds each template's -M mask through its service once.

It maps every real server's slot to its service's persistence mask; it walked the service's real servers once per
template due for renewal: a full table (65,536 templates) over 100 real servers was 6.5M steps of the sweep's
thread at every look, holding the GIL the event loop needs."""

from __future__ import annotations

import ipaddress
import time
import types

import numpy as np

from hdslb.balancer import Balancer, Iface, NullDataPath
from hdslb.daemon import Daemon
from hdslb.fastpath import aging

SVC = {"proto": "tcp", "addr": "10.0.0.100", "port": 80}
N_RS, N_TEMPLATES = 20, 500


class CountingDests(dict):
    walks = 0

    def values(self):
        CountingDests.walks += 1
        return super().values()


def test_each_service_is_walked_once_and_live_clients_keep_their_templates():
    bal = Balancer(NullDataPath(), {"eth0": Iface("eth0", 2, b"\x02" * 6, 1500)})
    bal.service_add(dict(SVC, sched="rr", persistent=60, netmask="255.255.255.0"))
    for i in range(N_RS):
        bal.dest_add({"svc": SVC, "addr": f"192.168.100.{i + 2}", "port": 80, "fwd": "fnat"})
    svc = bal.get_service(SVC)
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    temps = [{"svc_id": svc.svc_id, "af": 4, "addr": ipaddress.ip_address(0x0A000000 + (i << 8)),
              "dest_slot": i % N_RS, "expires_ns": now + 10**9} for i in range(N_TEMPLATES)]  # 1 s of 60 left
    renewed = []
    maps = types.SimpleNamespace(persists=lambda: [dict(t) for t in temps],
                                 renew_persists=lambda keep: renewed.extend(keep) or len(keep))
    # live inbound flows from the first 10 client networks (host .7 in each), each to its template's server
    n = 10
    keys = np.zeros((n, aging.KEY_SIZE), np.uint8)
    for i in range(n):
        keys[i, aging.K_SADDR:aging.K_SADDR + 4] = list((0x0A000000 + (i << 8) + 7).to_bytes(4, "big"))
        keys[i, aging.K_AF] = 4

    class Cols(types.SimpleNamespace):  # what keep_templates reads of aging.Columns
        def __len__(self):
            return n

    cols = Cols(out=np.zeros(n, bool), slot=np.array([i % N_RS for i in range(n)], np.uint32), keys=keys)
    d = types.SimpleNamespace(bal=bal, maps=maps)
    svc.dests = CountingDests(svc.dests)
    CountingDests.walks = 0
    assert Daemon.keep_templates(d, cols, now) == n
    assert sorted(str(t["addr"]) for t in renewed) == sorted(f"10.0.{i}.0" for i in range(n))
    assert CountingDests.walks <= 2, f"the real servers were walked {CountingDests.walks} times"
