"""`hdslb-ctl status | head -1`: a reader that goes away before the tools finish writing ends them quietly, status 0.

They said `hdslb-ctl: [Errno 32] Broken pipe` and exited 1 (the catch-all for socket errors took the write's
BrokenPipeError for the daemon's), or printed a traceback (`health show`, `ipvsadm -h`). Each case here writes to a
pipe whose read end is already closed, as `| head -1` leaves it once head has its line.
"""

import io
import os
import sys

import pytest

from cli import dpip, hdslb_ctl, ipvsadm

STATUS = {"version": "0", "pid": 1, "uptime_s": 3, "ctl_socket": "/x", "pin_dir": "/p", "services": 1,
          "interfaces": {"lb1": "native"}, "ready": True}
HEALTH = {"tcp:10.0.0.1:80": {"quorum": 1, "quorum_needed": 1,
                              "real_servers": {"10.0.0.2:80": {"state": "UP", "weight": 1, "reason": "ok"}}}}
REPLIES = {"daemon.status": STATUS, "stats.get": {}, "health.list": {"health": HEALTH},
           "config.reload": {"applied": ["a change"], "needs_restart": []},
           "service.list": {"services": [{"proto": "tcp", "addr": "10.0.0.1", "port": 80, "sched": "rr",
                                          "dests": [], "flags": [], "persistent": None, "netmask": None}]}}
CONF = "virtual_server 10.0.0.1 80 {\n    protocol TCP\n    real_server 10.0.0.2 80 {\n    }\n}\n"


class FakeClient:
    def __init__(self, path=None, timeout=None):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def call(self, op, args=None):
        return REPLIES[op]

    def close(self):
        pass


def closed_stdout(monkeypatch):
    """sys.stdout on a pipe nobody reads any more (the process's own fd 1 is left alone); sys.stderr a StringIO.
    Called in the test itself: pytest's capture puts its own streams back between a fixture's setup and the call."""
    r, w = os.pipe()
    os.close(r)
    out = os.fdopen(w, "w")
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.setattr(hdslb_ctl, "Client", FakeClient)
    monkeypatch.setattr(ipvsadm, "Client", FakeClient)
    return out


@pytest.mark.parametrize("main, argv", [
    (hdslb_ctl.main, ["status"]),
    (hdslb_ctl.main, ["health", "show"]),
    (hdslb_ctl.main, ["reload"]),
    (hdslb_ctl.main, ["check", "-f", "CONF"]),
    (hdslb_ctl.main, ["--help"]),
    (hdslb_ctl.main, ["health", "--help"]),
    (hdslb_ctl.main, ["decap", "show"]),
    (ipvsadm.main, ["-Ln"]),
    (ipvsadm.main, ["-h"]),
    (dpip.main, ["-h"]),
], ids=lambda x: " ".join(x) if isinstance(x, list) else x.__module__)
def test_a_reader_that_went_away_ends_the_tool_quietly(tmp_path, monkeypatch, main, argv):
    from hdslb.fastpath import decap

    monkeypatch.setattr(decap, "show", lambda iface, pin_root: [])
    monkeypatch.setattr(decap, "netns_name", lambda: "lab")
    conf = tmp_path / "lb.conf"
    conf.write_text(CONF)
    argv = [str(conf) if a == "CONF" else a for a in argv]
    out = closed_stdout(monkeypatch)
    try:
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse's --help: it exits after writing, status 0
            rc = e.code
        err = sys.stderr.getvalue()
        print("after the pipe closed", flush=True)  # stdout now leads nowhere: the exit's own flush stays silent
    finally:
        monkeypatch.undo()
        out.close()
    assert (rc, err) == (0, "")


def test_the_daemon_closing_the_socket_is_still_reported(monkeypatch, capsys):
    """Only our stdout's EPIPE is quiet: a control connection that breaks is an error, as before."""
    from hdslb.ctl.client import DaemonUnreachable

    class Gone(FakeClient):
        def call(self, op, args=None):
            raise DaemonUnreachable("hdslbd at /x went away: Broken pipe")

    monkeypatch.setattr(hdslb_ctl, "Client", Gone)
    assert hdslb_ctl.main(["health", "show"]) == 1
    assert "went away" in capsys.readouterr().err
