"""Connection timeouts an operator sees and sets at run time (ipvsadm --set / -L --timeout, timeouts.set/get):
applied as a reload applies timeouts, refused whole on a bad value, kept across a restart in the state file, and
given up for a timeout the config file changes (a reload, or a restart with an edited file)."""

import errno

import msgpack
import pytest

from hdslb.balancer import Balancer
from hdslb.ctl import commands
from hdslb.daemon import Daemon, settings_from_args
from hdslb.errors import HdslbError

from .test_api_security import BASE, HarnessDaemon
from .test_balancer import Recorder
from .test_batch import IFACES

UDP_600 = """ipvs_defs {
    udp {
        timeout {
            normal 600
        }
    }
}
"""


async def harness(tmp_path, text=BASE):
    conf = tmp_path / "hdslb.conf"
    conf.write_text(text)
    d = HarnessDaemon(conf, tmp_path)
    await d.reload_config()
    d.seen = []
    d.maps.set_idle_timeouts = lambda t: d.seen.append(dict(t))
    return d, conf


async def test_set_applies_live_as_a_reload_does_and_zero_keeps(tmp_path):
    d, _ = await harness(tmp_path)
    r = d.dispatch("timeouts.set", {"tcp": 900, "tcpfin": 0, "udp": 2})
    assert (r["tcp"], r["tcpfin"], r["udp"]) == (900, 7, 2)
    assert d.settings.timeouts == dict(d.file_timeouts, established=900, udp=2)
    assert d.seen == [d.settings.timeouts]  # the fast path's cfg map (port reclaiming)
    assert d.idle_limits().udp == 2  # what the aging sweep uses
    got = d.dispatch("timeouts.get", {})
    assert (got["tcp"], got["tcpfin"], got["udp"]) == (900, 7, 2) and got["set"] == {"established": 900, "udp": 2}
    assert got["config"]["udp"] == 300 and got["states"]["syn_recv"] == 30
    d.dispatch("timeouts.set", {"tcp": 0, "tcpfin": 0, "udp": 0})  # all zero: nothing changes
    assert d.settings.timeouts["established"] == 900 and len(d.seen) == 1
    d.dispatch("timeouts.set", {"udp": 300})  # back to the config's own value: nothing stands over it
    assert d.timeout_overrides == {"established": {"value": 900, "base": 90}}


@pytest.mark.parametrize("args", [{"udp": -1}, {"udp": "2"}, {"udp": True}, {"udp": 2.0}, {"tcp": 31 * 86400 + 1},
                                  {"tcp": 900, "udp": 2**32}, {"tcp": 900, "tcpfn": 1}, {"established": 5}])
async def test_a_bad_value_is_refused_and_changes_nothing(tmp_path, args):
    d, _ = await harness(tmp_path)
    before = dict(d.settings.timeouts)
    with pytest.raises(HdslbError) as e:
        d.dispatch("timeouts.set", args)
    assert e.value.errno == errno.EINVAL
    assert d.settings.timeouts == before and d.seen == [] and d.timeout_overrides == {}


async def test_the_largest_value_is_31_days(tmp_path):
    d, _ = await harness(tmp_path)
    d.dispatch("timeouts.set", {"tcp": 31 * 86400})
    assert d.settings.timeouts["established"] == 31 * 86400


async def test_a_reload_that_changes_a_timeout_wins_for_that_timeout_only(tmp_path):
    d, conf = await harness(tmp_path)
    d.dispatch("timeouts.set", {"tcp": 900, "udp": 2})
    conf.write_text(BASE.replace("log_level INFO", "log_level DEBUG"))  # a reload that leaves timeouts alone
    await d.reload_config()
    assert d.settings.timeouts["udp"] == 2 and d.settings.timeouts["established"] == 900
    conf.write_text(BASE + UDP_600)  # the file changes udp: the file wins there, the --set tcp stays
    r = await d.reload_config()
    assert d.settings.timeouts["udp"] == 600 and d.settings.timeouts["established"] == 900
    assert d.seen[-1] == d.settings.timeouts
    assert d.timeout_overrides == {"established": {"value": 900, "base": 90}}
    assert any("ipvs_defs.udp.timeout.normal" in line for line in r["applied"])
    d.dispatch("timeouts.set", {"udp": 5})  # set again over the new file value
    assert d.timeout_overrides["udp"] == {"value": 5, "base": 600}


async def test_a_batch_carries_timeouts_and_a_bad_one_applies_nothing(tmp_path):
    d, _ = await harness(tmp_path)
    svc = {"proto": "tcp", "addr": "10.9.9.9", "port": 80}
    with pytest.raises(HdslbError) as e:
        d.dispatch("batch", {"ops": [["service.add", dict(svc, sched="rr")], ["timeouts.set", {"udp": -5}]]})
    assert e.value.index == 1 and d.settings.timeouts["udp"] == 300
    assert d.bal.svc_key(svc) not in d.bal.services
    d.dispatch("batch", {"ops": [["service.add", dict(svc, sched="rr")], ["timeouts.set", {"udp": 7}]]})
    assert d.settings.timeouts["udp"] == 7 and d.bal.svc_key(svc) in d.bal.services


# --- the state file -------------------------------------------------------------------------------------------
def _daemon(tmp_path, *args) -> Daemon:
    d = Daemon(settings_from_args(["eth0", "--state-dir", str(tmp_path / "state"), "--pin-root",
                                   str(tmp_path / "bpf"), *args]))
    d.bal = Balancer(Recorder(), dict(IFACES))
    d.ctl_checks = {}
    return d


class Pins:
    def has_pins(self):
        return True


def _restart(tmp_path, *args) -> Daemon:
    d = _daemon(tmp_path, *args)
    d.fp = Pins()
    snap = d._read_state()
    d._adopt_saved_timeouts(snap)
    return d


def test_a_set_survives_a_restart(tmp_path):
    d = _daemon(tmp_path)
    d.set_timeouts({"udp": 2, "established": 900})
    d._save_state()
    d2 = _restart(tmp_path)
    assert d2.settings.timeouts["udp"] == 2 and d2.settings.timeouts["established"] == 900
    assert d2.timeouts()["set"] == {"udp": 2, "established": 900}


def test_a_restart_with_a_file_that_changed_the_timeout_takes_the_file(tmp_path):
    conf = tmp_path / "hdslb.conf"
    conf.write_text(BASE)
    d = _daemon(tmp_path, "-f", str(conf))
    d.set_timeouts({"udp": 2, "established": 900})
    d._save_state()
    conf.write_text(BASE + UDP_600)  # edited while the daemon was down
    d2 = _restart(tmp_path, "-f", str(conf))
    assert d2.settings.timeouts["udp"] == 600 and d2.settings.timeouts["established"] == 900
    assert d2.timeout_overrides == {"established": {"value": 900, "base": 90}}


def test_a_state_file_without_timeouts_still_loads(tmp_path):
    d = _daemon(tmp_path)
    d.bal.service_add({"proto": "tcp", "addr": "10.0.0.1", "port": 80, "sched": "rr"})
    d._save_state()
    with open(d.settings.state_file, "rb") as f:
        assert "timeouts" not in msgpack.unpackb(f.read(), raw=False)  # no --set: the file as before
    d.set_timeouts({"udp": 2})
    d._save_state()
    with open(d.settings.state_file, "rb") as f:
        snap = msgpack.unpackb(f.read(), raw=False)
    del snap["timeouts"]  # as hdslbd wrote it before ipvsadm --set
    with open(d.settings.state_file, "wb") as f:
        f.write(msgpack.packb(snap))
    d2 = _restart(tmp_path)
    assert d2.settings.timeouts == d.file_timeouts and d2.timeout_overrides == {}


@pytest.mark.parametrize("bad", [[1], {"udp": 2}, {"udp": {"value": 0, "base": 300}},
                                 {"udp": {"value": 2, "base": 300, "x": 1}}, {"nope": {"value": 2, "base": 3}}])
def test_a_state_file_with_bad_timeouts_is_refused_naming_it(tmp_path, bad):
    d = _daemon(tmp_path)
    d._save_state()
    with open(d.settings.state_file, "rb") as f:
        snap = msgpack.unpackb(f.read(), raw=False)
    with open(d.settings.state_file, "wb") as f:
        f.write(msgpack.packb(dict(snap, timeouts=bad)))
    d2 = _daemon(tmp_path)
    d2.fp = Pins()
    with pytest.raises(HdslbError) as e:
        d2._read_state()
    assert "does not hold a valid model" in e.value.message and "timeout" in e.value.message


def test_timeouts_args_maps_lvs_names_to_states():
    assert commands.timeouts_args({"tcp": 1, "tcpfin": 2, "udp": 3}) == {"established": 1, "fin_wait": 2, "udp": 3}
    assert commands.timeouts_args({"tcpfin": 0}) == {}
