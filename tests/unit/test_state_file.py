"""The saved model (the state file) against what disks and people do to files: torn, emptied, replaced by a newer
version's, unreadable, unwritable. With pinned maps forwarding, a file that cannot be used must stop the start
with a message naming it and the way out; it used to be "ignored", and the daemon then threw the pinned
services and flows away and came up empty."""

import asyncio
import logging
import os

import msgpack
import pytest

from hdslb.balancer import Balancer, snapshot
from hdslb.daemon import Daemon, settings_from_args
from hdslb.errors import HdslbError

from .test_balancer import Recorder
from .test_batch import IFACES

SVC = {"proto": "tcp", "addr": "10.0.0.1", "port": 80}


class Pins:
    def __init__(self, present):
        self.present = present

    def has_pins(self):
        return self.present


def _daemon(tmp_path, pins=True) -> Daemon:
    d = Daemon(settings_from_args(["eth0", "--state-dir", str(tmp_path / "state"), "--pin-root", str(tmp_path / "bpf")]))
    d.bal = Balancer(Recorder(), dict(IFACES))
    d.ctl_checks = {}
    d.fp = Pins(pins)
    return d


def _model(d: Daemon) -> bytes:
    d.bal.service_add(dict(SVC, sched="rr"))
    d.bal.dest_add({"svc": SVC, "addr": "192.168.100.2", "port": 80})
    d.bal.route_add({"prefix": "20.0.0.0", "prefixlen": 16, "ifname": "eth1"})
    d._save_state()
    with open(d.settings.state_file, "rb") as f:
        return f.read()


def _bad_files(good: bytes) -> dict:
    snap = msgpack.unpackb(good, raw=False)
    no_dests = dict(snap, services=[{k: v for k, v in snap["services"][0].items() if k != "dests"}])

    def dest_field(k, v):  # well-formed, but a real server's field the model would refuse (the scheduler did,
        svc = snap["services"][0]  # mid-restore, after the maps were opened, naming neither file nor --fresh)
        return msgpack.packb(dict(snap, services=[dict(svc, dests=[dict(d, **{k: v}) for d in svc.get("dests", [])])]))
    return {
        "bad weight": (dest_field("weight", "x"), "does not hold a valid model"),
        "weight out of range": (dest_field("weight", 70000), "does not hold a valid model"),
        "bad method": (dest_field("fwd", "teleport"), "does not hold a valid model"),
        "bad threshold": (dest_field("u_threshold", -1), "does not hold a valid model"),
        "empty": (b"", "is empty"),
        "truncated": (good[: len(good) // 2], "undecodable"),
        "garbage": (b"\x00GARBAGE\xff" * 10, "not a saved model"),
        "not a map": (msgpack.packb([1, 2, 3]), "not a map"),
        "newer": (msgpack.packb(dict(snap, version=2)), "newer hdslbd (state version 2"),
        "no version": (msgpack.packb({"services": []}), "unknown state version None"),
        "missing field": (msgpack.packb(no_dests), "does not hold a valid model"),
        "wrong type": (msgpack.packb(dict(snap, addrs=[{"addr": 7}])), "does not hold a valid model"),
        "bad checks": (msgpack.packb(dict(snap, checks=[1])), "does not hold a valid model"),
    }


@pytest.mark.parametrize("case", list(_bad_files(msgpack.packb({"version": 1, "services": [{"dests": []}]}))))
def test_an_unusable_state_file_with_pins_refuses_the_start_naming_the_file_and_fresh(tmp_path, case):
    d = _daemon(tmp_path)
    good = _model(d)
    data, why = _bad_files(good)[case]
    with open(d.settings.state_file, "wb") as f:
        f.write(data)
    with pytest.raises(HdslbError) as e:
        _daemon(tmp_path)._read_state()
    msg = e.value.message
    assert d.settings.state_file in msg and why in msg and "--fresh" in msg and d.pin_dir in msg, msg
    with open(d.settings.state_file, "rb") as f:  # nothing touched: the operator decides
        assert f.read() == data


def test_an_unreadable_state_file_with_pins_refuses_the_start(tmp_path):
    d = _daemon(tmp_path)
    os.makedirs(d.settings.state_file)  # read() fails (EISDIR), as an I/O error would
    with pytest.raises(HdslbError, match="cannot be read.*--fresh"):
        d._read_state()


def test_without_pins_an_unusable_file_is_ignored_with_a_warning(tmp_path, caplog):
    d = _daemon(tmp_path, pins=False)
    _model(d)
    with open(d.settings.state_file, "r+b") as f:
        f.truncate(10)
    with caplog.at_level(logging.WARNING):
        assert d._read_state() is None
    assert d.settings.state_file in caplog.text and "starting empty" in caplog.text


def test_a_good_state_file_is_adopted_and_a_missing_one_is_none(tmp_path):
    assert _daemon(tmp_path, pins=False)._read_state() is None  # a first start (with pins: see test_daemon_instance)
    d = _daemon(tmp_path)
    _model(d)
    snap = _daemon(tmp_path)._read_state()
    assert snap == dict(snapshot(d.bal), checks=[])


def test_a_failed_save_keeps_the_last_good_file_and_does_not_fail_the_change(tmp_path, monkeypatch, caplog):
    """ENOSPC on /run (a tmpfs) used to raise out of the control op that had already been applied (the client got
    "internal error"), out of the deferred save's callback, and left a torn temp file behind."""
    d = _daemon(tmp_path)
    good = _model(d)
    real_replace = os.replace

    def full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    d.bal.service_add({"proto": "udp", "addr": "10.0.0.2", "port": 53, "sched": "rr"})
    with caplog.at_level(logging.ERROR):
        d._save_state()
        d._save_state()
    assert caplog.text.count("cannot save the model") == 1 and "No space left" in caplog.text
    with open(d.settings.state_file, "rb") as f:
        assert f.read() == good
    assert os.listdir(os.path.dirname(d.settings.state_file)) == [os.path.basename(d.settings.state_file)]
    monkeypatch.setattr(os, "replace", real_replace)
    d._save_state()
    assert len(_daemon(tmp_path)._read_state()["services"]) == 2


def test_the_state_file_is_root_only(tmp_path):
    d = _daemon(tmp_path)
    old = os.umask(0)
    try:
        _model(d)
    finally:
        os.umask(old)
    assert os.stat(d.settings.state_file).st_mode & 0o777 == 0o600


async def test_a_failed_save_is_retried_shown_and_made_at_the_stop(tmp_path, monkeypatch, caplog):
    """A full state file system: the change was acknowledged and forwarded, the save failed, and nothing tried it
    again but the next change, nor did a stop; the next start adopted the pins with the older model and removed
    the acknowledged service ("a crash before they were saved"), with space long since freed."""
    from hdslb import daemon as daemon_mod
    from hdslb.ctl import commands

    monkeypatch.setattr(daemon_mod, "SAVE_RETRY_S", 0.05)
    d = _daemon(tmp_path)
    _model(d)
    real_replace = os.replace
    full = {"on": True}

    def replace(src, dst):
        if full["on"]:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    d.bal.service_add({"proto": "udp", "addr": "10.0.0.2", "port": 53, "sched": "rr"})
    d._save_state()
    assert "No space left" in d.save_error
    d.pid, d.ctl_path, d.pin_dir, d.xdp_modes, d.started = 1, "x", "y", {}, 0
    d.sizes = type("S", (), {"conn_table": "percpu", "max_conns": 1, "conn6_entries": lambda self: 1})()
    assert "No space left" in commands.dispatch(d, "daemon.status", {})["save_error"]
    full["on"] = False  # space freed: the retry saves it with no change made
    for _ in range(100):
        if d.save_error is None:
            break
        await asyncio.sleep(0.02)
    assert d.save_error is None and len(_daemon(tmp_path)._read_state()["services"]) == 2
    # at a stop: one more try, and a loud line when it still fails
    full["on"] = True
    d.bal.service_add({"proto": "udp", "addr": "10.0.0.3", "port": 53, "sched": "rr"})
    d._save_state()
    full["on"] = False
    d._final_save()
    assert d.save_error is None and len(_daemon(tmp_path)._read_state()["services"]) == 3
    full["on"] = True
    d.bal.service_add({"proto": "udp", "addr": "10.0.0.4", "port": 53, "sched": "rr"})
    d._save_state()
    with caplog.at_level(logging.ERROR):
        d._final_save()
    assert "stopping with the saved model" in caplog.text and d._save_retry is None
