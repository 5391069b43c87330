"""A UDP flow whose real server failed its health check is scheduled afresh, as one whose server was removed by
hand: keepalived removes a failed server from LVS (expire_nodest_conn then reschedules the flow), unless
inhibit_on_failure keeps it in at weight 0, which keeps its flows as a drain does.

Found in a netns lab: a client sending on one UDP tuple every 0.2 s stayed on a server whose HTTP_GET had failed
for 20 s (ipvsadm -Lnc still showed the flow to it), while the README says such flows go at the next sweep. The
sweep asks Daemon.real_servers for the servers that are there; a server down by its check was still listed, since
the model keeps it (at weight 0) to bring it back when its check passes."""

import types

from hdslb.balancer import restore, snapshot
from hdslb.daemon import Daemon

from .test_balancer_modes import make

USVC = {"proto": "udp", "addr": "10.0.0.100", "port": 53}


def _bal():
    bal = make()
    bal.service_add(dict(USVC, sched="rr"))
    for rs in ("192.168.100.2", "192.168.100.3", "192.168.100.4"):
        bal.dest_add({"svc": USVC, "addr": rs, "port": 53, "fwd": "fnat"})
    return bal


def _listed(bal) -> set:
    """The real servers the sweep counts as there, by address."""
    svc = bal.get_service(USVC)
    by_slot = {d.slot: str(d.addr) for d in svc.dests.values()}
    return {by_slot[slot] for slot, _, _ in Daemon.real_servers(types.SimpleNamespace(bal=bal))}


def test_a_server_down_by_its_check_is_gone_for_the_udp_sweep_an_inhibited_one_is_not():
    bal = _bal()
    rs = lambda a: {"svc": USVC, "addr": a, "port": 53}  # noqa: E731
    bal.dest_health(rs("192.168.100.2"), False, None, "connect refused")  # removed, as keepalived would
    bal.dest_health(rs("192.168.100.3"), False, 0, "connect refused")     # inhibit_on_failure: in at weight 0
    bal.dest_edit(dict(rs("192.168.100.4"), weight=0))                     # drained by hand
    assert _listed(bal) == {"192.168.100.3", "192.168.100.4"}
    bal.dest_health(rs("192.168.100.2"), True, None, "")
    assert _listed(bal) == {"192.168.100.2", "192.168.100.3", "192.168.100.4"}, "back once its check passes"


def test_inhibited_survives_a_restart():
    bal = _bal()
    bal.dest_health({"svc": USVC, "addr": "192.168.100.2", "port": 53}, False, None, "down")
    bal.dest_health({"svc": USVC, "addr": "192.168.100.3", "port": 53}, False, 0, "down")
    again = make()
    restore(again, snapshot(bal))
    assert _listed(again) == {"192.168.100.3", "192.168.100.4"}


def test_a_server_alpha_holds_down_before_its_first_checks_keeps_its_flows():
    """alpha starts every server of its service down until its checks pass, also after a restart that adopted a
    running fast path: nothing failed, so the sweep must not reschedule their UDP flows (a restart loses no flow)."""
    from hdslb.health.manager import ALPHA_PENDING

    bal = _bal()
    bal.dest_health({"svc": USVC, "addr": "192.168.100.2", "port": 53}, False, None, ALPHA_PENDING)
    assert _listed(bal) == {"192.168.100.2", "192.168.100.3", "192.168.100.4"}
