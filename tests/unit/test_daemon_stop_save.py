"""A daemon that stops saves every change it acknowledged: the control socket and the REST API may still answer
while the stop waits for other things (a /metrics scrape in flight, the slow path closing), so the model is saved
for the last time once neither takes requests any more, and a restart restores what ipvsadm was told was done."""

import asyncio

import msgpack

from hdslb.ctl.client import Client
from hdslb.ctl.server import CtlServer
from hdslb.daemon import Daemon
from tests.unit.test_api_security import BASE, HarnessDaemon

SVC = {"proto": "tcp", "addr": "10.0.0.100", "port": 80}


class SavingDaemon(HarnessDaemon):
    _save_state = Daemon._save_state  # the real save, to the test's state dir


def saved_dests(d) -> set:
    with open(d.settings.state_file, "rb") as f:
        snap = msgpack.unpackb(f.read(), strict_map_key=False)
    return {x["addr"] for s in snap["services"] for x in s["dests"]}


async def test_a_change_acknowledged_while_stopping_is_saved(tmp_path):
    conf = tmp_path / "hdslb.conf"
    conf.write_text(BASE)
    d = SavingDaemon(conf, tmp_path)
    await d.reload_config()
    path = str(tmp_path / "ctl.sock")
    d.ctl = CtlServer(path, d.dispatch)
    await d.ctl.start()
    told = []

    class SlowPath:  # the stop closes the slow path while the control socket still answers
        async def close(self):
            def ipvsadm_a():
                with Client(path, timeout=10) as c:
                    told.append(c.call("dest.add", {"svc": SVC, "addr": "192.168.100.9", "port": 80}))

            await asyncio.to_thread(ipvsadm_a)

    d.slow = SlowPath()
    await d.stop()
    assert told == [None], "the change was acknowledged"
    assert "192.168.100.9" in saved_dests(d), "acknowledged while stopping, and not saved: a restart drops it"
