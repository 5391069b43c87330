"""A reload that puts back a real server its health check holds down puts it back down.

Found in a netns lab: with 192.168.100.4 down by its HTTP_GET, `ipvsadm -d` of it and a `hdslb-ctl reload` of the
unchanged file added it again at its configured weight, up, and there it stayed taking its share of new connections
(`health show`: "down weight 1"): the checker, down already, had no transition to report. keepalived's reload adds
only the real servers its checkers hold alive."""

from __future__ import annotations

from tests.unit.test_health import until
from tests.unit.test_health_restore import CONF, RS2, SVC, daemon, dests, probe, stop  # noqa: F401 — a fixture

PLAIN = CONF.replace("    quorum 2\n    sorry_server 192.168.100.9 80\n", "")


async def reload(d, text):
    with open(d.settings.config_file, "w") as f:
        f.write(text)
    await d.reload_config()
    await d.health.settle()


async def _down_then_deleted_by_hand(tmp_path, probe, text):  # noqa: F811
    probe["192.168.100.2"] = False
    d = await daemon(tmp_path, text)
    await until(lambda: dests(d)[RS2].health == "down")
    await d.health.settle()
    d.bal.dest_del({"svc": SVC, "addr": "192.168.100.2", "port": 80})  # ipvsadm -d
    return d


async def test_a_reload_puts_back_a_server_its_check_holds_down_down(tmp_path, probe):  # noqa: F811
    d = await _down_then_deleted_by_hand(tmp_path, probe, PLAIN)
    try:
        await reload(d, PLAIN)
        x = dests(d)[RS2]
        assert (x.health, x.eff_weight, x.inhibited) == ("down", 0, False), "back in the model, out of rotation"
        probe["192.168.100.2"] = True
        await until(lambda: dests(d)[RS2].health == "up")  # and its check still brings it back
        assert dests(d)[RS2].eff_weight == 1
    finally:
        await stop(d)


async def test_inhibit_on_failure_puts_it_back_inhibited(tmp_path, probe):  # noqa: F811
    text = PLAIN.replace("    laddr_group_name lg\n", "    laddr_group_name lg\n    inhibit_on_failure\n")
    d = await _down_then_deleted_by_hand(tmp_path, probe, text)
    try:
        await reload(d, text)
        x = dests(d)[RS2]
        assert (x.health, x.eff_weight, x.inhibited) == ("down", 0, True)
    finally:
        await stop(d)


async def test_a_start_from_an_older_saved_model_marks_inhibited_servers(tmp_path, probe):  # noqa: F811
    """A model saved before Dest.inhibited has none: the start sets it for the servers inhibit_on_failure holds at
    weight 0 (else their UDP flows would be expired as a removed server's until the next reload)."""
    from hdslb.balancer import snapshot

    text = PLAIN.replace("    laddr_group_name lg\n", "    laddr_group_name lg\n    inhibit_on_failure\n")
    probe["192.168.100.2"] = False
    old = await daemon(tmp_path, text)
    await until(lambda: dests(old)[RS2].health == "down")
    await old.health.settle()
    snap = snapshot(old.bal)
    await stop(old)
    for v in snap["services"]:
        for x in v["dests"]:
            x.pop("inhibited", None)  # as an older hdslbd saved it
    new = await daemon(tmp_path, text, snap)
    try:
        await new.health.settle()
        x = dests(new)[RS2]
        assert (x.health, x.inhibited) == ("down", True)
    finally:
        await stop(new)


async def test_a_server_added_by_hand_while_its_check_holds_it_down_comes_in_down(tmp_path, probe):  # noqa: F811
    """`ipvsadm -d` then `ipvsadm -a` (or a REST PUT, a batch) of a server its check holds down: it came back up at
    its weight, in rotation for good (health show: down, yet weight 1), as a reload did."""
    from hdslb.api import dispatch_async

    d = await _down_then_deleted_by_hand(tmp_path, probe, PLAIN)
    try:
        await dispatch_async(d, "dest.add", {"svc": SVC, "addr": "192.168.100.2", "port": 80, "fwd": "fnat"})
        x = dests(d)[RS2]
        assert (x.health, x.eff_weight) == ("down", 0)
        await dispatch_async(d, "dest.del", {"svc": SVC, "addr": "192.168.100.2", "port": 80})
        await dispatch_async(d, "batch", {"ops": [["dest.add", {"svc": SVC, "addr": "192.168.100.2", "port": 80,
                                                                "fwd": "fnat", "weight": 3}]]})
        x = dests(d)[RS2]
        assert (x.health, x.eff_weight, x.weight) == ("down", 0, 3)
        await dispatch_async(d, "dest.add", {"svc": SVC, "addr": "192.168.100.7", "port": 80, "fwd": "fnat"})
        assert dests(d)[(RS2[0].__class__("192.168.100.7"), 80)].health == "up", "no check watches it"
        probe["192.168.100.2"] = True
        await until(lambda: dests(d)[RS2].health == "up")
        assert dests(d)[RS2].eff_weight == 3
    finally:
        await stop(d)
